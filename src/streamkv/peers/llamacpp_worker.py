"""llama.cpp's decode and context shift, served to streamkv's decode loop over a pipe.

llama.cpp is native code: a crash in its kernels (a segfault in ggml's AMX
path on one Intel Xeon, docs/setup.md) kills the process it runs in.  So it
runs here, in a worker process of its own, and a crash, a hang or an abort
ends this process only: the stepper that started it
(`streamkv.peers.engines.LlamaCppStepper`) turns that into a failed row that
names the signal.  This file runs as a script in streamkv's environment and
imports llama-cpp-python and numpy, not torch and not streamkv.

    start-up  (one JSON line on stdout):  {"cells", "cell_bytes", "type_k", "threads", "vocab"}  or  {"error"}
    request   (one JSON line on stdin):   {"ids": [...]}   or  {"quit": true}
    reply     (on stdout):  one JSON line {"ms", "kv_len", "dropped", "shape", "rss_mb"}
                            then shape[0] * shape[1] float32 logits;  or  {"error"}

`ms` is the forward alone (the shift, the decode and the copy of its logits),
timed here, so the pipe costs nothing to the method.  Positions are
consecutive from 0.  When a token would exceed the budget (`--cells`), the
context shift keeps the first `--sink` cells (n_keep), removes the next
`--discard` (n_discard) and moves the rest that many positions back; with
`--dense` or `--reference` nothing is shifted and an overflow is an error.
With `--reference` (the bench's timing reference) the cell each decode writes
is removed again, so every step attends to as many keys.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import resource
import sys
import time

import numpy as np


class Engine:
    """One llama.cpp model and context on the GGUF file, stepped through a stream of tokens."""

    def __init__(self, args):
        import llama_cpp as lc

        self.lc, self.args = lc, args
        # llama-cpp-python logs every tensor it loads through this logger; only errors reach the job's log
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        lc.llama_backend_init()
        self.model = lc.llama_model_load_from_file(args.gguf.encode(), lc.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {args.gguf}")
        params = lc.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = args.cells
        params.n_threads = params.n_threads_batch = args.threads
        self.ctx = lc.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {args.cells} cells for {args.gguf}")
        self.mem = lc.llama_get_memory(self.ctx)
        self.vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(args.cells, 0, 1)
        # A cell holds a key and a value of every layer's kv heads, F16 (the context's default cache type).
        n_layer, n_head = lc.llama_model_n_layer(self.model), lc.llama_model_n_head(self.model)
        head_dim = lc.llama_model_n_embd(self.model) // n_head
        self.info = {"cells": int(lc.llama_n_ctx(self.ctx)),
                     "cell_bytes": 2 * n_layer * lc.llama_model_n_head_kv(self.model) * head_dim * 2,
                     "type_k": int(params.type_k), "threads": int(params.n_threads), "vocab": int(self.vocab)}
        self.n_past = 0

    def _shift(self) -> int:
        """llama.cpp's context shift: drop cells [sink, sink + K), move the rest K positions back; K."""
        lc, keep, n = self.lc, self.args.sink, self.args.discard  # n_keep, n_discard
        lc.llama_memory_seq_rm(self.mem, 0, keep, keep + n)
        lc.llama_memory_seq_add(self.mem, 0, keep + n, self.n_past, -n)
        self.n_past -= n
        return n

    def forward(self, tokens: list[int]):
        """(logits [len(tokens), vocab] as float32, header of the reply without its shape)."""
        args = self.args
        t0 = time.perf_counter()
        dropped = 0
        if self.n_past + len(tokens) > args.cells:
            if args.dense or args.reference or len(tokens) > 1:  # (EvalParams keeps every run of the loop from here)
                return None, {"error": f"{args.method}: {self.n_past + len(tokens)} tokens do not fit "
                                       f"{args.cells} cells"}
            dropped = self._shift()
        b = self.batch
        b.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, self.n_past + i, 1, 1
            b.seq_id[i][0] = 0
        status = self.lc.llama_decode(self.ctx, b)
        if status != 0:
            return None, {"error": f"llama.cpp's decode failed with status {status} at position {self.n_past}"}
        logits = np.ctypeslib.as_array(self.lc.llama_get_logits(self.ctx), shape=(len(tokens), self.vocab)).copy()
        self.n_past += len(tokens)
        kv_len = self.n_past
        if args.reference:  # the cell just written goes again: every step attends to as many keys, nothing shifts
            self.n_past -= 1
            self.lc.llama_memory_seq_rm(self.mem, 0, self.n_past, -1)
        ms = (time.perf_counter() - t0) * 1e3
        return logits, {"ms": ms, "kv_len": kv_len, "dropped": dropped,
                        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # the worker's peak


def serve(args) -> None:
    # The protocol owns the real stdout; anything llama.cpp or a library prints goes to stderr.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def send(header: dict, payload: bytes = b"") -> None:
        channel.write((json.dumps(header) + "\n").encode())
        channel.write(payload)
        channel.flush()

    try:
        engine = Engine(args)
    except RuntimeError as exc:
        send({"error": str(exc)})
        return
    send(engine.info)
    for line in sys.stdin.buffer:
        request = json.loads(line)
        if request.get("quit"):
            break
        logits, header = engine.forward(request["ids"])
        if logits is None:
            send(header)
            continue
        send({**header, "shape": list(logits.shape)}, logits.tobytes())


def main(argv=None) -> int:
    # A crash in native code prints the Python stack to stderr (the job's log) before the process dies of it.
    faulthandler.enable()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True, help="the model's GGUF file")
    parser.add_argument("--method", required=True, help="the method's name, for error messages")
    parser.add_argument("--cells", type=int, required=True, help="the context's budget of cells")
    parser.add_argument("--sink", type=int, default=0, help="n_keep")
    parser.add_argument("--discard", type=int, default=1, help="n_discard")
    parser.add_argument("--dense", action="store_true", help="never shift")
    parser.add_argument("--reference", action="store_true", help="remove each decode's cell again")
    parser.add_argument("--threads", type=int, default=1)
    serve(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
