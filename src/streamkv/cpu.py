"""The CPU's instruction sets, as far as streamkv depends on them.

A few parts run only where the CPU has an instruction set: the `int8-fbgemm` weights need VNNI, and llama.cpp's
build takes its options from the same flags (`envs/llamacpp-cmake-args.sh`, which reads `$CPUINFO`, or the
override below).  Everything
else runs on any x86-64 CPU with AVX2, and on ARM.

`STREAMKV_CPU_FLAGS` replaces the flags read from /proc/cpuinfo (a space-separated list, as on its `flags` line):
it lets the tests, and a user who wants to see what another CPU gets, run the refusal paths on a CPU that has the
feature.  It reaches Snakemake's jobs and the CLI like any environment variable.
"""

from __future__ import annotations

import hashlib
import os

OVERRIDE = "STREAMKV_CPU_FLAGS"
# The flags that decide what runs here, by the name the report and docs/testing.md give them.
FEATURES = {
    "AVX2": ("avx2",),
    "AVX-512": ("avx512f",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "AMX": ("amx_tile",),
}


def flags() -> set[str]:
    """This CPU's flags: `$STREAMKV_CPU_FLAGS` where set, else /proc/cpuinfo's (empty where it has none)."""
    if (given := os.environ.get(OVERRIDE)) is not None:
        return set(given.split())
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def has(feature: str) -> bool:
    """Whether the CPU has `feature` (a key of FEATURES): any one of its flags."""
    return summary()[feature]


def summary() -> dict[str, bool]:
    """Every feature of FEATURES, present or not (what a result's metadata records)."""
    found = flags()
    return {name: bool(set(names) & found) for name, names in FEATURES.items()}


def describe() -> str:
    """One line for a result's metadata and the report: the features present and absent, and which kernels torch
    dispatches to (`torch.backends.cpu.get_cpu_capability()`, which `ATEN_CPU_CAPABILITY` can lower)."""
    import torch

    found = summary()
    have = [name for name, present in found.items() if present]
    lacking = [name for name, present in found.items() if not present]
    if not have:
        features = "none of " + ", ".join(lacking)
    else:
        features = ", ".join(have) + (f" (no {', '.join(lacking)})" if lacking else "")
    return f"{features}; torch kernels {torch.backends.cpu.get_cpu_capability()}"


CHOSEN_CACHE = "STREAMKV_INDUCTOR_CACHE"  # the kernel cache folder streamkv chose (not the user)


def isolate_compile_cache() -> str:
    """Point torch.compile's kernel cache (TORCHINDUCTOR_CACHE_DIR) at a folder of its own for this torch, this
    kernel level and these CPU flags, unless the user named one; returns the folder in use.

    Inductor keys its cache on neither: kernels compiled under `ATEN_CPU_CAPABILITY=avx2` (or on another CPU
    sharing the folder) are loaded by the next process at AVX-512 and crash it ("double free or corruption",
    seen with the int8-pack step).  The package calls this when it is imported, before torch or torchao (whose
    import sets inductor's default); without importing torch: the kernel level is what `ATEN_CPU_CAPABILITY`
    asks for, else what the flags give.  A child process whose level or flags differ chooses again.
    """
    from importlib.metadata import PackageNotFoundError, version

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given is not None and given != os.environ.get(CHOSEN_CACHE):
        return given  # the user's
    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "none"
    level = os.environ.get("ATEN_CPU_CAPABILITY", "auto").lower()
    found = hashlib.sha256(" ".join(sorted(flags())).encode()).hexdigest()[:10]
    home = os.environ.get("STREAMKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "streamkv")
    path = os.path.join(home, "inductor", f"torch{torch_version}-{level}-{found}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ[CHOSEN_CACHE] = path
    return path
