"""Peers as steppers of the one decode loop: kvpress presses and llama.cpp's context shift.

kvpress 0.5.x pins `transformers<5.3` (and `pandas<3`), so its presses run in a
second environment (`make setup-kvpress` builds `.venv-kvpress`), in a worker
process (`streamkv/kvpress_worker.py`) that the stepper feeds one forward at
a time.  The decode loop, the targets, the NLL and every metric stay the
same as for our own methods; the worker times its forward itself, so the
pipe is not charged to the method.

Methods (the K of `compress_every` is DecodingPress's `compression_interval`;
every press keeps cap - 1 keys after compressing, so a query attends to at
most cap keys with its own, like ours; between compressions the cache grows
by K - 1 past that, like our lazy pruning):

* `kvpress:streaming_llm`: StreamingLLMPress with its kept indices sorted (our
  fix of upstream issue #173), keys at their original positions;
* `kvpress:streaming_llm_unsorted`: the upstream press as it is;
* `kvpress:streaming_llm+rerotate`: KeyRerotationPress around it, the kept keys
  rotated to 0..n-1 and the query at n (StreamingLLM's pos-shift);
* `kvpress:knorm`: KnormPress, a score-based press (keeps the keys of lowest norm);
* `kvpress:snapkv`, `kvpress:tova`, `kvpress:expected_attention`, `kvpress:keydiff`,
  `kvpress:observed_attention`: the other score-based presses DecodingPress takes
  (see `kvpress_worker.build_press` for the settings each needs while decoding).

A press that raises in the worker ends the run with a `StreamkvError` that
names the press and carries the worker's error line (the traceback is in the
log), so the evaluation records a failed row with kvpress's reason.

llama.cpp (the optional extra `llama-cpp-python`, `make setup-llamacpp`) runs
in a worker process of its own (`streamkv/peers/llamacpp_worker.py`, in this
environment), so that a crash of its native code is a failed row, not a dead
job; on the model's GGUF file, with its own kernels, the file's weight type
and its context's cache type (both recorded with the result), through its C
API:

* `llamacpp:shift`: its context shift, which is StreamingLLM: when a token
  would exceed the budget, keep the first `sink` cells (n_keep), remove the
  next K (n_discard = `compress_every`), move the rest K positions back so
  that positions stay consecutive (llama.cpp re-rotates the cached keys),
  then decode.  The budget is cap + K - 1 cells, so a query attends to
  between cap and cap + K - 1 keys, like our lazy pruning (cap at K = 1);
* `llamacpp:dense`: no eviction, a context as long as the text.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from streamkv.cache.budget import Budget
from streamkv.errors import NotInstalled, StreamkvError
from streamkv.evaluation.params import LLAMACPP_METHODS, PEER_METHODS
from streamkv.evaluation.stepper import Stepper
from streamkv.models.sources import gguf_path, save_checkpoint
from streamkv.peers.installed import INSTALL_HINT, LLAMACPP_HINT, kvpress_python, llamacpp_version
from streamkv.peers.pipe import REQUEST_LIMIT_S, Worker, exit_text
from streamkv.peers.pipe import has_fileno as _has_fileno

WORKER = Path(__file__).with_name("kvpress_worker.py")
LLAMACPP_WORKER = Path(__file__).with_name("llamacpp_worker.py")


def is_peer(method: str) -> bool:
    return method in PEER_METHODS


def make_peer_stepper(model: torch.nn.Module, source: str, method: str, cap: int, sink: int | None, compress_every: int,
                      dtype: str, max_tokens: int):
    if method in LLAMACPP_METHODS:
        return LlamaCppStepper(gguf_path(source), method, cap, sink, compress_every, max_tokens)
    return KvpressStepper(model, method, cap, sink, compress_every, dtype)


class KvpressStepper(Stepper):
    """A stepper of the decode loop whose forwards run in the kvpress worker (no cache timers here)."""

    def __init__(self, model: torch.nn.Module, method: str, cap: int, sink: int, compress_every: int, dtype: str):
        python = kvpress_python()
        if python is None:
            raise NotInstalled(f"method '{method}' needs kvpress, which is not installed: {INSTALL_HINT}")
        if not hasattr(model, "model"):
            raise StreamkvError(f"kvpress presses hook the decoder layers at model.model (Llama-family models); "
                                f"{type(model).__name__} has none")
        if next(model.parameters()).device.type != "cpu":
            raise StreamkvError(f"method '{method}' runs on the CPU only in this version")
        # The worker loads the very weights of this run: saved once, as transformers writes them.
        self._dir = tempfile.TemporaryDirectory(prefix="streamkv-kvpress-")
        hf_logging.disable_progress_bar()
        save_checkpoint(model, self._dir.name)
        hf_logging.enable_progress_bar()
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
        self.proc = subprocess.Popen(
            [python, str(WORKER), "--model", self._dir.name, "--press", method.split(":", 1)[1], "--cap", str(cap),
             "--sink", str(sink), "--compress-every", str(compress_every), "--dtype", dtype, "--attn", attn,
             "--threads", str(torch.get_num_threads())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sys.stderr.fileno() if _has_fileno() else None)
        self.method = method
        self.kv_len = self.dropped = self._kv_bytes = 0
        self.forward_ms = self.peak_memory_mb = None
        self.versions: dict | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        try:
            self.proc.stdin.write((json.dumps({"ids": ids.tolist()}) + "\n").encode())
            self.proc.stdin.flush()
            header = self.proc.stdout.readline()
        except BrokenPipeError:  # the worker is gone; its last line may say why
            header = b""
        reply = json.loads(header) if header.strip() else self._last_words()
        if "error" in reply or "stopped" in reply:
            self._reap()
            if "stopped" in reply:
                raise StreamkvError(f"the kvpress worker of '{self.method}' stopped: it {reply['stopped']}; "
                                    "its error is in the log above")
            raise StreamkvError(f"the kvpress worker of '{self.method}' failed: {reply['error']}")
        shape = reply["shape"]
        raw = self.proc.stdout.read(int(np.prod(shape)) * 4)
        self.forward_ms, self.kv_len, self.dropped = reply["ms"], reply["kv_len"], reply["dropped"]
        self._kv_bytes, self.peak_memory_mb = reply["kv_bytes"], reply["rss_mb"]
        self.versions = reply.get("versions", self.versions)
        self.kind = "lazy" if self.dropped else ""
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).view(shape)

    def _last_words(self) -> dict:
        """What a worker that stopped without a reply left: its error line, else how it ended (a signal, a status)."""
        rest = self.proc.stdout.read().decode(errors="replace").strip().splitlines()
        for line in reversed(rest):
            try:
                return {"error": json.loads(line)["error"]}
            except (ValueError, KeyError, TypeError):
                continue
        return {"stopped": exit_text(self.proc.wait())}

    def _reap(self) -> None:
        """Wait for a failed worker to exit and remove its copy of the weights."""
        try:
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=60)
        self._dir.cleanup()

    def kv_bytes(self) -> int:
        return self._kv_bytes

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"quit": true}\n')
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)
        self._dir.cleanup()


class LlamaCppStepper(Stepper):
    """A stepper of the decode loop whose forwards are llama.cpp decodes; `llamacpp:shift` or `llamacpp:dense`.

    llama.cpp runs in a worker process (`streamkv/peers/llamacpp_worker.py`), one forward per request: a crash
    of its native code, a hang or an abort ends the worker, and the forward raises a `StreamkvError` that says
    how (the signal that killed it), which becomes a failed row.  Every token's logits come back (teacher
    forcing), positions are consecutive from 0, and the shift happens inside the forward the worker times, as
    the eviction work of our own caches does.
    """

    # (no cache timers: the shift's work is done inside the next decode)

    def __init__(self, gguf: Path, method: str, cap: int, sink: int | None, compress_every: int, max_tokens: int,
                 threads: int | None = None, reference: bool = False, limit_s: float = REQUEST_LIMIT_S):
        if llamacpp_version() is None:
            raise NotInstalled(f"method '{method}' needs llama-cpp-python, which is not installed: {LLAMACPP_HINT}")
        sink = sink or 0
        self.method = method
        # The timing reference of `streamkv bench`: a decode over the prefill's cells (cap), after which the new
        # cell is removed again; what the shift costs on top of llama.cpp's own decode.
        self.reference = reference
        self.dense = method == "llamacpp:dense"
        self.budget = max_tokens if self.dense else cap + compress_every - 1
        if not self.dense:
            Budget.derive(cap, sink=sink)  # (sink < cap, as for our own caches)
        argv = [sys.executable, str(LLAMACPP_WORKER), "--gguf", str(gguf), "--method", method,
                "--cells", str(self.budget), "--sink", str(sink), "--discard", str(compress_every),
                "--threads", str(threads or torch.get_num_threads())]
        argv += ["--dense"] * self.dense + ["--reference"] * reference
        self.worker = Worker(argv, f"the llama.cpp worker of '{method}'", limit_s)
        try:
            info, _ = self.worker.receive(f"while loading {Path(gguf).name}")
        except StreamkvError:
            self.worker.close()
            raise
        self.cells, self.cell_bytes = info["cells"], info["cell_bytes"]
        self.seen = self.kv_len = self.dropped = 0
        self.kind = ""
        self.forward_ms = self.peak_memory_mb = None
        # What the report says of this engine is read, not assumed: the file's weight type, the cache's number
        # type and the cells llama.cpp allocated for the budget.
        self.versions = {"llama-cpp-python": llamacpp_version(), "gguf": Path(gguf).name,
                         "gguf_type": gguf_file_type(gguf), "kv_cache": _ggml_type_name(info["type_k"], "f16"),
                         "kv_cells": int(self.cells), "kv_budget": int(self.budget), "threads": info["threads"]}

    @property
    def pid(self) -> int:
        """The worker's process id."""
        return self.worker.proc.pid

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tokens = ids[0].tolist()
        self.dropped, self.kind = 0, ""
        during = (f"at token {self.seen}" if len(tokens) == 1 else
                  f"at tokens {self.seen}..{self.seen + len(tokens) - 1}")
        reply, raw = self.worker.request({"ids": tokens}, during)
        self.seen += len(tokens)
        self.forward_ms, self.kv_len, self.dropped = reply["ms"], reply["kv_len"], reply["dropped"]
        self.peak_memory_mb = reply["rss_mb"]
        self.kind = "lazy" if self.dropped else ""  # (what our caches call a prune on their rhythm, strict included)
        rows, vocab = reply["shape"]
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float32)).view(1, rows, vocab)

    def kv_bytes(self) -> int:
        """The cells llama.cpp allocated for the context (it holds them all from the start)."""
        return self.cells * self.cell_bytes

    def close(self) -> None:
        self.worker.close()


def gguf_file_type(path: str | Path) -> str | None:
    """The weight type of a GGUF file as llama.cpp names it (`Q8_0`, `Q4_K_M`, `F16`), or None if unreadable.

    `general.file_type` where the file records it; otherwise the type that holds most of the tensors' elements.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        logging.getLogger(__name__).warning("could not read the GGUF header of %s: %s", path, exc)
        return None
    field = reader.fields.get("general.file_type")
    if field is not None and field.data:
        try:
            kind = gguf.LlamaFileType(int(field.parts[field.data[0]][0]))
        except ValueError:
            kind = None
        if kind is not None and kind != gguf.LlamaFileType.GUESSED:
            return kind.name.removeprefix("MOSTLY_").removeprefix("ALL_")
    elements: dict[str, int] = {}
    for tensor in reader.tensors:
        name = gguf.GGMLQuantizationType(tensor.tensor_type).name
        elements[name] = elements.get(name, 0) + int(tensor.n_elements)
    return max(elements, key=elements.get) if elements else None


def _ggml_type_name(value, default: str) -> str:
    """A ggml type number (a llama.cpp context's cache type) as its lower-case name (`f16`)."""
    import gguf

    try:
        return gguf.GGMLQuantizationType(int(value)).name.lower()
    except (TypeError, ValueError):
        return default

