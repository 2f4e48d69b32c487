"""A kvpress press applied during decoding, served to streamkv's decode loop over a pipe.

kvpress 0.5.x pins `transformers<5.3`, so it cannot share streamkv's
environment: this file runs as a script in the peer environment
(`.venv-kvpress`, see the Makefile) and imports nothing from streamkv.
`streamkv.peers.engines.KvpressStepper` starts it and talks to it:

    request  (one JSON line on stdin):  {"ids": [[...], ...]} (streams x tokens)   or  {"quit": true}
    reply    (on stdout):  one JSON line {"ms", "kv_len", "dropped", "kv_bytes", "shape"}
                           then shape[0] * shape[1] * shape[2] float32 logits (streams x tokens x vocab)
             or, once, when the worker fails:  {"error": "<exception type>: <message> (<file>:<line>)"}
                           and the worker exits (the traceback goes to stderr, the job's log)

`ms` is the forward alone, timed here, so the pipe costs nothing to the
method; `kv_len` is the number of keys the last query attended to; the press
compresses after the attention, in a forward hook, so `dropped` is what the
previous forward evicted: the eviction counts at the first query it affects,
as in streamkv's traces.

Positions are those kvpress's own generation pipeline uses: the query at its
absolute position and every kept key at the position it was rotated at.  With
`KeyRerotationPress` the kept keys are rotated to 0..n-1, so the query goes to
n, the cache's length (StreamingLLM's pos-shift).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch

PRESSES = ("streaming_llm", "streaming_llm_unsorted", "streaming_llm+rerotate", "knorm", "snapkv", "tova",
           "expected_attention", "keydiff", "observed_attention")
# Presses that read the attention weights of the forward, which only eager attention returns.
EAGER_PRESSES = ("observed_attention",)


def build_press(name: str, cap: int, sink: int, compress_every: int):
    """The DecodingPress of `name`: compress every `compress_every` steps to cap - 1 keys (the next query is the
    cap-th)."""
    from kvpress import (
        DecodingPress,
        ExpectedAttentionPress,
        KeyDiffPress,
        KeyRerotationPress,
        KnormPress,
        ObservedAttentionPress,
        SnapKVPress,
        StreamingLLMPress,
        TOVAPress,
    )
    from kvpress.utils import compute_n_kept

    class SortedStreamingLLMPress(StreamingLLMPress):
        """StreamingLLMPress with its kept indices in position order.

        Upstream returns `topk` indices unsorted (kvpress issue #173); the next
        compression then takes the slots after the sinks for the oldest tokens
        and evicts the wrong ones.  Sorting is the fix.
        """

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            if self.compression_ratio == 0:
                return keys, values
            scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
            kept = scores.topk(compute_n_kept(keys.shape[2], self.compression_ratio), dim=-1).indices
            kept = kept.sort(dim=-1).values.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            return keys.gather(2, kept).contiguous(), values.gather(2, kept).contiguous()

    class AnyDecodingPress(DecodingPress):
        """DecodingPress that also takes a KeyRerotationPress (upstream asserts a ScorerPress; compress delegates)."""

        def __post_init__(self):
            self.hidden_states_buffer = defaultdict(list)
            self.layer_step_counts = defaultdict(int)

    k = compress_every
    if name == "expected_attention" and k <= sink:
        # (it would score with the mean and covariance of no queries: NaN scores, arbitrary evictions)
        raise ValueError(f"ExpectedAttentionPress leaves the first n_sink={sink} buffered queries out of its query "
                         f"statistics, and DecodingPress buffers the {k} queries since its last compression: none "
                         f"remain; use a compression interval above {sink}")
    # SnapKV scores with its last `window_size` queries and keeps their keys.  DecodingPress hands it the queries
    # buffered since the last compression (at most the interval K), so the window must be shorter than K; K - 1
    # keeps it on the newest keys, which sit at the end of the cache only since the last compression.
    window = min(SnapKVPress.window_size, max(1, k - 1))
    scorer = {
        "streaming_llm": lambda: SortedStreamingLLMPress(n_sink=sink),
        "streaming_llm_unsorted": lambda: StreamingLLMPress(n_sink=sink),
        "streaming_llm+rerotate": lambda: KeyRerotationPress(StreamingLLMPress(n_sink=sink)),
        "knorm": lambda: KnormPress(),
        "snapkv": lambda: SnapKVPress(window_size=window),
        "tova": lambda: TOVAPress(),
        "expected_attention": lambda: ExpectedAttentionPress(n_sink=sink),
        "keydiff": lambda: KeyDiffPress(),
        "observed_attention": lambda: ObservedAttentionPress(),
    }[name]()
    cls = AnyDecodingPress if name == "streaming_llm+rerotate" else DecodingPress
    # The hook always scores with the current query's hidden state; a buffer of K holds every query since the last
    # compression, which the presses that estimate from several queries (SnapKV, ExpectedAttention) need.  The
    # others read keys, values or the attention weights only.
    buffered = k if name in ("snapkv", "expected_attention") else 0
    return cls(base_press=scorer, compression_interval=k, target_size=cap - 1, hidden_states_buffer_size=buffered)


def serve(args) -> int:
    """Answer requests until told to quit; on an exception, send its line as the reply and exit with status 1."""
    # The protocol owns the real stdout; anything a library prints goes to stderr.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    try:
        _serve(args, channel)
    except Exception as exc:  # (any: the stepper turns the line into the run's error)
        traceback.print_exc()
        channel.write((json.dumps({"error": error_line(exc)}) + "\n").encode())
        channel.flush()
        return 1
    return 0


def error_line(exc: BaseException) -> str:
    """The exception's type and message, and where it was raised (the innermost frame)."""
    text = f"{type(exc).__name__}: {exc}".strip().rstrip(":")
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{text} ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else text


def _serve(args, channel) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    attn = "eager" if args.press in EAGER_PRESSES else args.attn
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation=attn).eval()
    press = build_press(args.press, args.cap, args.sink, args.compress_every)
    cache = DynamicCache(config=model.config)
    in_cache_positions = args.press.endswith("+rerotate")
    seen = evicted = 0
    with torch.inference_mode(), press(model):
        for line in sys.stdin.buffer:
            request = json.loads(line)
            if request.get("quit"):
                break
            ids = torch.tensor(request["ids"], dtype=torch.long)
            q = ids.shape[-1]
            before = cache.get_seq_length()
            first = before if in_cache_positions else seen
            positions = torch.arange(first, first + q).unsqueeze(0)
            t0 = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True).logits
            ms = (time.perf_counter() - t0) * 1e3
            seen += q
            after = cache.get_seq_length()
            stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            out = logits.float().contiguous().numpy()  # every stream's: a batch is pressed per stream
            # The press evicts after the attention; streamkv counts an eviction at the query it first affects.
            header = {"ms": ms, "kv_len": before + q, "dropped": evicted,
                      "kv_bytes": stored * (before + q) // max(after, 1), "shape": list(out.shape),
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # the worker's peak
            if seen == q:  # the first reply
                header["versions"] = {**versions(), "attn_implementation": attn}
            evicted = before + q - after
            channel.write((json.dumps(header) + "\n").encode())
            channel.write(out.tobytes())
            channel.flush()


def versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("kvpress", "transformers", "torch")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a transformers model directory")
    parser.add_argument("--press", choices=PRESSES)
    parser.add_argument("--cap", type=int)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--compress-every", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
