"""Provenance recorded with every result: code, versions, device, numerics."""

from __future__ import annotations

import ast
import datetime as _dt
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_VERSIONED = ("streamkv", "torch", "transformers", "numpy", "pandas", "datasets", "gguf", "accelerate", "kvpress",
              "llama-cpp-python")


def imported_modules(roots: tuple[str, ...]) -> tuple[str, ...]:
    """The streamkv modules `roots` import, directly or through others, lazy imports included.

    Read from the source (`ast`), not by importing: the pipeline computes its code hashes without torch.
    """
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen or not (PACKAGE_DIR / f"{name}.py").exists():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((PACKAGE_DIR / f"{name}.py").read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level == 1:  # from .x import y / from . import x
                todo += [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
            elif node.level == 0 and (node.module or "").startswith("streamkv."):
                todo.append(node.module.split(".")[1])
    return tuple(sorted(seen))


# The modules a result depends on (the decode loop, the parallel evaluator, the bench, the job I/O, and everything
# they import) and the ones that only read results (aggregation, diagnosis, probes, report): editing a module of the
# latter alone must not re-run evaluations.
EVALUATION_MODULES = imported_modules(("evaluation", "parallel", "timing", "bench", "jobio", "sources",
                                       "kvpress_worker"))
ANALYSIS_MODULES = tuple(m for m in imported_modules(("summary", "spikes", "stats", "probes", "report", "figures",
                                                      "bench_tables"))
                         if m not in EVALUATION_MODULES)


def code_hash(modules: tuple[str, ...] | None = None) -> str:
    """sha256 over the library's source files (or the named modules): changes whenever they change."""
    digest = hashlib.sha256()
    paths = sorted(PACKAGE_DIR.rglob("*.py")) if modules is None else [PACKAGE_DIR / f"{m}.py" for m in sorted(modules)]
    for path in paths:
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(PACKAGE_DIR), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(PACKAGE_DIR), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def device_name(device) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}"


def collect(device, dtype, seed: int) -> dict:
    import torch

    return {
        "git_commit": git_commit(),
        "code_hash": code_hash(EVALUATION_MODULES),
        "versions": versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "host_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
