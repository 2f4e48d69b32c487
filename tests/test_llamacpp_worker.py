"""llama.cpp out of process: a worker that dies (a signal), hangs or cannot start is a failed row that says so, in an
evaluation and in the bench, and everything else is kept; and the build flags that leave ggml's AMX path out."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optional_peers import HAS_KVPRESS, needs_kvpress, needs_llamacpp
from streamkv import EvalParams, StreamkvError, evaluate
from streamkv.evaluation.loop import RUN_FAILURES, failure, load_tokens
from streamkv.peers.pipe import exit_text

ROOT = Path(__file__).resolve().parents[1]
N, CAP, PREFILL = 120, 64, 16


def dying_at(monkeypatch, sig: int, call: int) -> list:
    """Every llama.cpp stepper sends `sig` to its worker just before its `call`-th forward; the steppers, as built."""
    from streamkv.peers.engines import LlamaCppStepper

    forward, seen = LlamaCppStepper.forward, []

    def patched(self, ids):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == 1:
            seen.append(self)
        if self.calls == call:
            os.kill(self.pid, sig)
        return forward(self, ids)

    monkeypatch.setattr(LlamaCppStepper, "forward", patched)
    return seen


def test_a_dead_workers_return_code_is_named():
    assert exit_text(-signal.SIGSEGV) == "died of SIGSEGV (signal 11)"
    assert exit_text(-signal.SIGKILL) == "died of SIGKILL (signal 9)"
    assert exit_text(-signal.SIGABRT) == "died of SIGABRT (signal 6)"
    assert exit_text(3) == "exited with status 3"
    proc = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"])
    assert exit_text(proc.wait()) == "died of SIGSEGV (signal 11)"


# flags lines as /proc/cpuinfo prints them: an AMD EPYC of the Zen 3 kind (AVX2, no AVX-512) and the AMD EPYC of
# the Zen 4 kind the suite runs on here (AVX-512 with VNNI and BF16, no AMX); docs/testing.md lists the CPUs tried
ZEN3 = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall "
        "nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid aperfmperf pni "
        "pclmulqdq monitor ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand lahf_lm "
        "cmp_legacy svm extapic cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw ibs skinit wdt tce topoext "
        "perfctr_core perfctr_nb bpext perfctr_llc mwaitx cpb cat_l3 cdp_l3 invpcid_single hw_pstate ssbd mba ibrs "
        "ibpb stibp vmmcall fsgsbase bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a rdseed adx smap clflushopt clwb "
        "sha_ni xsaveopt xsavec xgetbv1 xsaves cqm_llc cqm_occup_llc cqm_mbm_total cqm_mbm_local clzero irperf "
        "xsaveerptr rdpru wbnoinvd amd_ppin arat npt lbrv svm_lock nrip_save tsc_scale vmcb_clean flushbyasid "
        "decodeassists pausefilter pfthreshold v_vmsave_vmload vgif v_spec_ctrl umip pku ospke vaes vpclmulqdq rdpid "
        "overflow_recov succor smca")
ZEN4 = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht syscall "
        "nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid extd_apicid "
        "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt tsc_deadline_timer aes "
        "xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw "
        "topoext cpuid_fault vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid avx512f avx512dq rdseed adx "
        "smap avx512ifma clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 "
        "clzero xsaveerptr arat avx512vbmi umip avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg "
        "avx512_vpopcntdq rdpid fsrm")


@pytest.mark.parametrize("cpu, native, on", [
    ("fpu sse4_2 avx avx2 fma f16c bmi2 avx512f avx512cd avx512bw avx512dq avx512vl avx512_vnni avx512_bf16 "
     "amx_bf16 amx_tile amx_int8 avx_vnni", "OFF", {"AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI"}),
    ("fpu sse4_2 avx avx2 fma f16c bmi2", "OFF", {"AVX2", "FMA", "F16C"}),
    (ZEN3, "OFF", {"AVX2", "FMA", "F16C", "BMI2"}),  # AVX2 only: no AVX-512, no VNNI (Zen 2 and Zen 3 servers)
    (ZEN4, "OFF", {"AVX2", "AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"}),  # AVX-512 with VNNI, no AMX
    ("fpu sse4_2 avx avx2 fma f16c bmi2 avx_vnni", "OFF", {"AVX2", "AVX_VNNI"}),  # AVX-VNNI without AVX-512
    (None, "ON", set()),  # no x86 flags (an ARM cpuinfo): tuned for the CPU, as before
])
def test_the_llamacpp_build_leaves_the_amx_path_out(tmp_path, cpu, native, on):
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {cpu}\n" if cpu else "processor\t: 0\nFeatures\t: fp asimd\n")
    env = {k: v for k, v in os.environ.items() if k != "STREAMKV_CPU_FLAGS"}  # (the override would stand for it)
    args = subprocess.run(["sh", str(ROOT / "envs/llamacpp-cmake-args.sh")], env={**env, "CPUINFO": str(info)},
                          capture_output=True, text=True, check=True).stdout.split()
    options = dict(a.removeprefix("-DGGML_").split("=") for a in args)
    assert options.pop("NATIVE") == native
    assert {name for name, value in options.items() if value == "ON"} >= on
    assert all(options.get(f"AMX_{x}", "OFF") == "OFF" for x in ("TILE", "INT8", "BF16"))
    if cpu and "avx512f" not in cpu:
        assert options["AVX512"] == options["AVX512_VNNI"] == "OFF"
    if cpu and "vnni" not in cpu:
        assert options["AVX_VNNI"] == options["AVX512_VNNI"] == "OFF"


def test_the_llamacpp_build_reads_streamkvs_cpu_override():
    """STREAMKV_CPU_FLAGS stands for /proc/cpuinfo's flags in the build script as in streamkv.cpu: a build for a
    CPU without AVX-512 and VNNI on any machine."""
    args = subprocess.run(["sh", str(ROOT / "envs/llamacpp-cmake-args.sh")],
                          env={**os.environ, "STREAMKV_CPU_FLAGS": ZEN3, "CPUINFO": "/nonexistent"},
                          capture_output=True, text=True, check=True).stdout.split()
    options = dict(a.removeprefix("-DGGML_").split("=") for a in args)
    assert options["NATIVE"] == "OFF" and options["AVX2"] == "ON"
    assert options["AVX512"] == options["AVX512_VNNI"] == options["AVX_VNNI"] == "OFF"


@needs_llamacpp
def test_a_worker_killed_mid_stream_is_a_failed_record_naming_the_signal(smollm2, monkeypatch):
    steppers = dying_at(monkeypatch, signal.SIGKILL, call=80)  # the prefill, then token 16 at call 2: token 94
    params = EvalParams("m", "t", "llamacpp:shift", cap=CAP, prefill=PREFILL, max_tokens=N)
    with pytest.raises(RUN_FAILURES) as caught:
        evaluate(smollm2, load_tokens(smollm2, "embedded:shakespeare/hamlet", N), params, progress=False)
    record = failure(params, caught.value)  # what the CLI and the pipeline's job write
    assert record["status"] == "failed" and record["metrics"]["ppl"] is None
    assert record["error"] == ("StreamkvError: the llama.cpp worker of 'llamacpp:shift' died of SIGKILL (signal 9) "
                               "at token 94")
    assert steppers[0].worker.proc.returncode == -signal.SIGKILL  # reaped, not left running


@needs_llamacpp
def test_a_worker_that_segfaults_is_a_failed_record(smollm2, monkeypatch):
    dying_at(monkeypatch, signal.SIGSEGV, call=1)  # in its first forward, as the crash on AMX did
    params = EvalParams("m", "t", "llamacpp:dense", prefill=PREFILL, max_tokens=N)
    with pytest.raises(RUN_FAILURES) as caught:
        evaluate(smollm2, load_tokens(smollm2, "embedded:shakespeare/hamlet", N), params, progress=False)
    record = failure(params, caught.value)
    assert record["status"] == "failed"
    assert record["error"] == ("StreamkvError: the llama.cpp worker of 'llamacpp:dense' died of SIGSEGV (signal 11) "
                               "at tokens 0..15")


@needs_llamacpp
def test_the_bench_keeps_its_other_rows_and_sections_when_llamacpp_segfaults(tiny, hamlet_bytes, monkeypatch):
    from streamkv.bench.goals import LLAMACPP, LLAMACPP_REFERENCE, RECOMPUTE, REFERENCE, STRICT
    from streamkv.bench.run import run
    from streamkv.bench.tables import bench_findings, bench_markdown
    from streamkv.evaluation.params import BenchConfig

    steppers = dying_at(monkeypatch, signal.SIGSEGV, call=3)  # mid-run: after the prefill and one timed step
    cfg = BenchConfig(caps=(48,), compress_every=8, block=8, blocks=2, warmup=1, compile=False, peers=True,
                      sections=("overhead", "weights"), weights=(), weights_compile=(),
                      kvpress_methods=("kvpress:streaming_llm",)).check()
    # byte tokens are valid ids of the embedded model too; the torch rows run the tiny model, llama.cpp the GGUF
    result = run(tiny("tiny:llama").model, hamlet_bytes, cfg, progress=False, source="embedded:smollm2-135m")
    assert {s: result["sections"][s]["status"] for s in ("overhead", "weights")} == {"overhead": "ok", "weights": "ok"}
    assert result["status"] == "ok" and len(steppers) == 4  # three overhead rows, the weights section's reference
    rows = {r["method"]: r for r in result["overhead"]}
    engine = {m: r for m, r in rows.items() if m.startswith(LLAMACPP)}
    assert len(engine) == 3 and all(r["status"] == "failed" and r["tpot_ms"] is None for r in engine.values())
    assert all(r["error"].endswith("died of SIGSEGV (signal 11) at token 49") for r in engine.values())
    ours = {m: r for m, r in rows.items() if m not in engine}
    assert {REFERENCE, STRICT, RECOMPUTE} <= set(ours) and len(ours) == 10 + 2 * HAS_KVPRESS
    assert all(r["status"] == "ok" and r["tpot_ms"] > 0 and r["timed_steps"] > 0 for r in ours.values())
    weights = {r["variant"]: r for r in result["weights"]}
    assert weights["float32 eager"]["status"] == "ok" and weights["float32 eager"]["tpot_ms"] > 0
    assert weights[LLAMACPP_REFERENCE]["status"] == "failed" and "SIGSEGV" in weights[LLAMACPP_REFERENCE]["error"]
    text = bench_markdown(result)
    assert f"**Row {LLAMACPP_REFERENCE} at cap 48 failed:** StreamkvError: the llama.cpp worker" in text
    assert any(line.startswith(f"cap 48, {LLAMACPP}shift K=8 failed: ") for line in bench_findings(result))
    assert all(s.worker.proc.returncode == -signal.SIGSEGV for s in steppers)


@needs_kvpress
def test_a_killed_kvpress_worker_is_named_the_same_way(tiny):
    from streamkv.peers.engines import KvpressStepper

    stepper = KvpressStepper(tiny("tiny:llama").model, "kvpress:streaming_llm", 32, 4, 1, "float32")
    try:
        stepper.forward(torch.arange(1, 20).unsqueeze(0))
        os.kill(stepper.proc.pid, signal.SIGKILL)
        with pytest.raises(StreamkvError, match=r"^the kvpress worker of 'kvpress:streaming_llm' stopped: it died of "
                                                r"SIGKILL \(signal 9\)"):
            stepper.forward(torch.tensor([[5]]))
    finally:
        stepper.close()


@needs_llamacpp
@pytest.mark.slow
def test_a_hung_worker_is_killed_at_the_time_limit():
    from streamkv.models.sources import gguf_path
    from streamkv.peers.engines import LlamaCppStepper

    stepper = LlamaCppStepper(gguf_path("embedded:smollm2-135m"), "llamacpp:shift", cap=32, sink=4, compress_every=1,
                              max_tokens=64, limit_s=3)
    try:
        logits = stepper.forward(torch.arange(100, 116).unsqueeze(0))
        assert logits.shape[:2] == (1, 16) and np.isfinite(logits.numpy()).all()
        assert 0 < stepper.forward_ms  # the worker's own time of its forward
        os.kill(stepper.pid, signal.SIGSTOP)  # alive, never answering: a hang
        with pytest.raises(StreamkvError, match=r"^the llama.cpp worker of 'llamacpp:shift' did not answer within "
                                                r"3 s at token 16; it was killed$"):
            stepper.forward(torch.tensor([[116]]))
        assert stepper.worker.proc.returncode == -signal.SIGKILL
    finally:
        stepper.close()
