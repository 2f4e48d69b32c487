"""Provenance recorded with every result: code, versions, device, numerics."""

from __future__ import annotations

import ast
import datetime as _dt
import hashlib
import importlib.metadata
import platform
import subprocess
from pathlib import Path

from streamkv import cpu

PACKAGE_DIR = Path(__file__).resolve().parent
_VERSIONED = ("streamkv", "torch", "transformers", "numpy", "pandas", "datasets", "gguf", "accelerate", "kvpress",
              "llama-cpp-python")


def module_path(name: str) -> Path | None:
    """The source file of streamkv module `name` (dotted, relative to the package: "cache.ring"), None if none."""
    base = PACKAGE_DIR.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imported_modules(roots: tuple[str, ...]) -> tuple[str, ...]:
    """The streamkv modules `roots` import, directly or through others, lazy imports and the packages that hold
    them included (dotted, relative to the package: "cache.ring", "cache").

    Read from the source (`ast`), not by importing: the pipeline computes its code hashes without torch.
    """
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        path = module_path(name)
        if name in seen or path is None:
            continue
        seen.add(name)
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]  # its packages' __init__
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                todo += [a.name.removeprefix("streamkv.") for a in node.names if a.name.startswith("streamkv.")]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("streamkv"):
                module = node.module.removeprefix("streamkv").removeprefix(".")
                # from streamkv.x import y: y is a module of package x, or a name defined in x
                todo += [f"{module}.{a.name}".lstrip(".") for a in node.names]
                todo += [module] if module else []
    return tuple(sorted(seen))


# The modules a result depends on (the decode loop, the parallel evaluator, the bench, the job I/O, and everything
# they import) and the ones that only read results (aggregation, diagnosis, probes, report): editing a module of the
# latter alone must not re-run evaluations.
EVALUATION_MODULES = imported_modules(("evaluation.loop", "evaluation.parallel", "evaluation.timing", "bench.run",
                                       "evaluation.recall", "jobio", "models.sources", "peers.kvpress_worker",
                                       "peers.llamacpp_worker"))
ANALYSIS_MODULES = tuple(m for m in imported_modules(("analysis.summary", "analysis.spikes", "analysis.stats", "probes",
                                                      "analysis.report", "analysis.figures", "analysis.recall_jobs",
                                                      "bench.tables"))
                         if m not in EVALUATION_MODULES)


def code_hash(modules: tuple[str, ...] | None = None) -> str:
    """sha256 over the library's source files (or the named modules): changes whenever they change."""
    digest = hashlib.sha256()
    paths = sorted(PACKAGE_DIR.rglob("*.py")) if modules is None else [module_path(m) for m in sorted(modules)]
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
        "cpu_features": cpu.describe(),
        "dtype": str(dtype).removeprefix("torch."),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "threads": torch.get_num_threads(),
        "seed": seed,
        "host_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
