"""The decode loop: exactness against a full forward, equality of methods that must agree."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, full_forward_nll
from streamkv import EvalParams, evaluate
from streamkv.evaluation.results import METRIC_KEYS, TRACE_COLUMNS

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)


def run(loaded, tokens, method, **kw):
    kw.setdefault("max_tokens", len(tokens))
    return evaluate(loaded, tokens, EvalParams("m", "t", method, **kw), progress=False)


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:gpt_neox"])
@pytest.mark.parametrize("prefill", [1, 37])
def test_dense_decode_loop_ppl_equals_one_full_forward(tiny, hamlet_bytes, name, prefill):
    loaded, tokens = tiny(name), hamlet_bytes[:300]
    record, trace = run(loaded, tokens, "dense", prefill=prefill)
    full = full_forward_nll(loaded.model, tokens)
    assert abs(record["metrics"]["ppl"] / math.exp(full.mean().item()) - 1) <= 1e-4
    assert np.allclose(trace.nll.values, full.numpy(), atol=1e-4)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("method", ["window", "start_recent", "mit", "recompute"])
def test_nothing_evicted_gives_the_dense_nll(tiny, hamlet_bytes, name, method):
    loaded, tokens = tiny(name), hamlet_bytes[:150]
    _, dense = run(loaded, tokens, "dense", prefill=10)
    record, trace = run(loaded, tokens, method, cap=150, prefill=10)
    assert record["metrics"]["tokens_dropped"] == 0
    assert np.abs(trace.nll.values - dense.nll.values).max() <= 1e-4


@pytest.mark.parametrize("name", TINY)
def test_strict_start_recent_equals_mit_with_real_eviction(tiny, hamlet_bytes, name):
    loaded, tokens = tiny(name), hamlet_bytes[:400]
    rec_sr, sr = run(loaded, tokens, "start_recent", cap=48, sink=4, prefill=16)
    rec_mit, mit = run(loaded, tokens, "mit", cap=48, sink=4, prefill=16)
    _, dense = run(loaded, tokens, "dense", prefill=16)
    assert rec_sr["metrics"]["tokens_dropped"] == rec_mit["metrics"]["tokens_dropped"] == 400 - 1 - 48
    assert np.abs(sr.nll.values - mit.nll.values).max() <= 1e-4
    # the eviction is real: the streams differ from dense by far more than the tolerance
    assert np.abs(sr.nll.values - dense.nll.values).max() > 0.1


def test_lazy_pruning_is_between_strict_and_dense_in_kv(tiny, hamlet_bytes):
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:300]
    record, trace = run(loaded, tokens, "start_recent", cap=40, compress_every=16, prefill=8)
    m = record["metrics"]
    assert m["kv_len_max"] == 40 + 16 - 1
    assert m["n_prunes"] == int(trace.pruned.sum()) and m["tokens_dropped"] == int(trace.dropped.sum())
    assert set(trace.loc[trace.pruned, "position"] % 16) == {0}


def test_recompute_sees_sinks_plus_window(tiny, hamlet_bytes):
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:120]
    record, trace = run(loaded, tokens, "recompute", cap=32, sink=4, prefill=4)
    assert record["metrics"]["kv_len_max"] == 32
    # the step for the token at position t reads the 4 sinks and the last 28 tokens at fresh positions
    t = 100
    ctx = tokens[:4] + tokens[t - 27 : t + 1]
    with torch.no_grad():
        logits = loaded.model(torch.tensor([ctx])).logits[0, -1]
    expected = torch.nn.functional.cross_entropy(logits[None], torch.tensor([tokens[t + 1]])).item()
    assert trace.loc[trace.position == t, "nll"].item() == pytest.approx(expected, abs=1e-5)


def test_record_and_trace_have_the_contract_fields(tiny, hamlet_bytes):
    record, trace = run(tiny("tiny:llama"), hamlet_bytes[:140], "start_recent", cap=32, prefill=5)
    assert record["status"] == "ok" and record["error"] is None
    assert set(METRIC_KEYS) <= set(record["metrics"])
    assert record["metrics"]["n_scored"] == 139 == len(trace)
    assert record["params"]["window"] == 28
    assert tuple(trace.columns) == TRACE_COLUMNS
    assert (trace.target.values == np.array(hamlet_bytes[1:140])).all()
    assert list(trace.step[:5]) == [0] * 5 and trace.step.iloc[-1] == 139 - 5
    for key in ("git_commit", "code_hash", "versions", "python", "device", "cpu_features", "dtype", "tf32", "threads",
                "seed", "host_time"):
        assert key in record["meta"]
    assert record["meta"]["versions"]["torch"].startswith(torch.__version__.split("+")[0])


def test_non_finite_nll_marks_the_run_failed(tiny, hamlet_bytes):
    from streamkv import load_model

    broken = load_model("tiny:llama")
    with torch.no_grad():
        broken.model.lm_head.weight[7] = float("nan")
    record, _ = run(broken, hamlet_bytes[:40], "start_recent", cap=16, prefill=2)
    assert record["status"] == "failed"
    assert record["error"].startswith("non-finite NLL at 39 of 39 targets")
    assert record["metrics"]["ppl"] is None


def test_every_module_a_result_runs_is_hashed_with_it(tmp_path):
    """The code hash of a result covers every streamkv module its job imported (lazy imports included)."""
    script = tmp_path / "job.py"
    script.write_text(
        "import sys\n"
        "from streamkv import load_model\n"
        "from streamkv.bench.run import run\n"
        "from streamkv.evaluation.loop import EvalParams, evaluate, load_tokens\n"
        "from streamkv.jobio import write_json\n"
        "from streamkv.provenance import EVALUATION_MODULES\n"
        "from streamkv.evaluation.params import BenchConfig\n"
        "loaded = load_model('tiny:llama')\n"
        "tokens = load_tokens(loaded, 'embedded:shakespeare/hamlet', 400)\n"
        "for evaluator in ('parallel', 'decode'):\n"
        "    p = EvalParams('tiny:llama', 'hamlet', 'start_recent', cap=32, compress_every=4, max_tokens=200,\n"
        "                   evaluator=evaluator, timing_steps=8)\n"
        "    record, trace = evaluate(loaded, tokens, p, progress=False)\n"
        "write_json(record, sys.argv[1])\n"
        "run(loaded.model, tokens, BenchConfig(caps=(32,), compress_every=4, blocks=2, block=4, warmup=1,\n"
        "    compile=False, stream_tokens=100, dense_tokens=80, rss_from=40, evaluator_tokens=80), progress=False)\n"
        "ran = {m.removeprefix('streamkv.') for m in sys.modules if m.startswith('streamkv.')}\n"
        "print(sorted(ran - set(EVALUATION_MODULES)))\n")
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "r.json")], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"  # nothing ran that the hash leaves out


def test_the_timing_part_splits_update_time_by_prune_steps(tiny, hamlet_bytes):
    """A lazy row's timed steps: the cache's update time on the steps that pruned and on the others (what the
    prune-overhead probe subtracts), the tails of the step time and of the reference's, and the prunes timed."""
    from streamkv.evaluation.timing import time_interleaved

    loaded = tiny("tiny:llama")
    params = EvalParams("tiny:llama", "t", "start_recent", cap=32, max_tokens=400, compress_every=4,
                        timing_steps=64).resolved()
    m = time_interleaved(loaded, hamlet_bytes, params, params.timing_steps)
    assert m["timed_prunes"] == m["timed_steps"] // 4  # one prune every K steps
    assert m["update_ms_prune"] > 0 and m["update_ms_noprune"] >= 0
    assert m["tpot_p50_ms"] <= m["tpot_p90_ms"] <= m["tpot_p99_ms"]
    assert m["tpot_ref_p50_ms"] <= m["tpot_ref_p90_ms"] <= m["tpot_ref_p99_ms"]
    strict = time_interleaved(loaded, hamlet_bytes, EvalParams("tiny:llama", "t", "start_recent", cap=32,
                                                                max_tokens=400, timing_steps=64).resolved(), 64)
    assert strict["timed_prunes"] == strict["timed_steps"] and strict["update_ms_noprune"] is None
