"""streamkv.cpu: the CPU's features, their override, and torch.compile's kernel cache kept apart per kernel level."""

import os
import subprocess
import sys

from streamkv import cpu

SHOW = "import os, streamkv; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"


def _cache_dir(**env) -> str:
    # (without the settings this test varies, whatever the run that holds it set: an AVX2 emulation, say)
    drop = ("TORCHINDUCTOR_CACHE_DIR", cpu.CHOSEN_CACHE, "ATEN_CPU_CAPABILITY", cpu.OVERRIDE)
    base = {k: v for k, v in os.environ.items() if k not in drop}
    out = subprocess.run([sys.executable, "-c", SHOW], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_the_override_stands_for_the_cpus_flags(monkeypatch):
    monkeypatch.setenv(cpu.OVERRIDE, "sse4_2 avx avx2 fma")
    assert cpu.flags() == {"sse4_2", "avx", "avx2", "fma"}
    assert cpu.has("AVX2") and not cpu.has("AVX-512") and not cpu.has("VNNI")
    assert cpu.summary() == {"AVX2": True, "AVX-512": False, "VNNI": False, "AMX": False}
    assert cpu.describe().startswith("AVX2 (no AVX-512, VNNI, AMX); torch kernels ")
    monkeypatch.setenv(cpu.OVERRIDE, "avx2 avx512f avx_vnni")
    assert cpu.has("VNNI") and cpu.has("AVX-512")


def test_compiled_kernels_of_another_kernel_level_or_cpu_go_to_another_folder(tmp_path):
    """Inductor's cache does not key on ATEN_CPU_CAPABILITY: kernels compiled at AVX2 crashed the next process at
    AVX-512. streamkv gives each torch, kernel level and set of CPU flags a folder of its own."""
    home = str(tmp_path)
    default = _cache_dir(STREAMKV_CACHE=home)
    avx2 = _cache_dir(STREAMKV_CACHE=home, ATEN_CPU_CAPABILITY="avx2")
    other_cpu = _cache_dir(STREAMKV_CACHE=home, STREAMKV_CPU_FLAGS="sse4_2 avx avx2")
    assert len({default, avx2, other_cpu}) == 3 and all(p.startswith(f"{home}/inductor/") for p in (default, avx2))
    assert _cache_dir(STREAMKV_CACHE=home) == default  # the same setting, the same folder
    # a child whose kernel level differs chooses again; a folder the user named is kept
    assert _cache_dir(STREAMKV_CACHE=home, TORCHINDUCTOR_CACHE_DIR=default, ATEN_CPU_CAPABILITY="avx2",
                      **{cpu.CHOSEN_CACHE: default}) == avx2
    assert _cache_dir(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "mine")) == str(tmp_path / "mine")
