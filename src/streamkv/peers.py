"""Peers as steppers of the one decode loop: kvpress presses, run in their own environment.

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
* `kvpress:knorm`: KnormPress, a score-based press (keeps the keys of lowest norm).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from .errors import StreamkvError
from .params import PEER_METHODS
from .sources import save_checkpoint

WORKER = Path(__file__).with_name("kvpress_worker.py")
ENV_VAR = "STREAMKV_KVPRESS_PYTHON"
INSTALL_HINT = "run `make setup-kvpress` (it builds .venv-kvpress), or point STREAMKV_KVPRESS_PYTHON at a python with kvpress"


def is_peer(method: str) -> bool:
    return method in PEER_METHODS


def kvpress_python() -> str | None:
    """The peer environment's python; None if there is none.

    $STREAMKV_KVPRESS_PYTHON if set, else `.venv-kvpress/bin/python` in the working directory or in the
    checkout this package is installed from (editable installs, as the Makefile makes them).
    """
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR] if Path(os.environ[ENV_VAR]).exists() else None
    for root in (Path.cwd(), Path(__file__).absolute().parents[2]):
        candidate = root / ".venv-kvpress" / "bin" / "python"  # (a venv's python is a link: not resolved)
        if candidate.exists():
            return str(candidate)
    return None


class KvpressStepper:
    """A stepper of the decode loop whose forwards run in the kvpress worker."""

    kind = ""
    update_ms = plan_ms = float("nan")

    def __init__(self, model: torch.nn.Module, method: str, cap: int, sink: int, interval: int, dtype: str):
        python = kvpress_python()
        if python is None:
            raise StreamkvError(f"method '{method}' needs kvpress, which is not installed: {INSTALL_HINT}")
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
             "--sink", str(sink), "--interval", str(interval), "--dtype", dtype, "--attn", attn,
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
            if not header:
                raise StreamkvError(f"the kvpress worker of '{self.method}' stopped (exit status {self.proc.wait()}); "
                                    "its error is in the log above")
            reply = json.loads(header)
            rows, vocab = reply["shape"]
            raw = self.proc.stdout.read(rows * vocab * 4)
        except BrokenPipeError as exc:
            raise StreamkvError(f"the kvpress worker of '{self.method}' stopped (exit status {self.proc.wait()})") from exc
        self.forward_ms, self.kv_len, self.dropped = reply["ms"], reply["kv_len"], reply["dropped"]
        self._kv_bytes, self.peak_memory_mb = reply["kv_bytes"], reply["rss_mb"]
        self.versions = reply.get("versions", self.versions)
        self.kind = "lazy" if self.dropped else ""
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).view(1, rows, vocab)

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


def _has_fileno() -> bool:
    try:
        sys.stderr.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False
