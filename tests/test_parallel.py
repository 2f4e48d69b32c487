"""The parallel evaluator gives the decode loop's per-token NLL (within 1e-4) and its schedule, for every method
and parameter family it serves, on every tiny model family with real eviction and on the embedded model."""

import numpy as np
import pytest

from conftest import TINY
from streamkv.cache.policy import StartRecent
from streamkv.errors import StreamkvError
from streamkv.evaluation.loop import evaluate, load_tokens
from streamkv.evaluation.parallel import evaluate_parallel, schedule
from streamkv.evaluation.params import EvalParams

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

TOL = 1e-4
CAP, N = 32, 300  # more than 4 x cap tokens: many prunes of every kind
FAMILIES = {
    "strict": dict(method="start_recent"),
    "lazy": dict(method="start_recent", compress_every=8),
    "mit": dict(method="mit"),
    "ring": dict(method="ring"),
    "ring lazy": dict(method="ring", compress_every=5),
    "window": dict(method="window", compress_every=4),
    "dense": dict(method="dense"),
    "softlite naive": dict(method="start_recent", compress_every=8, cache_slack=2, max_drop=4),
    "softlite cooldown": dict(method="start_recent", compress_every=8, cache_slack=4, max_drop=2,
                              softlite_mode="cooldown"),
    "overlap": dict(method="start_recent", compress_every=4, overlap=4),
    "original positions": dict(method="start_recent", positions="original"),
    "original positions lazy": dict(method="start_recent", positions="original", compress_every=4),
    "sink 1": dict(method="start_recent", sink=1, compress_every=4),
}


def _both(loaded, tokens, chunk, rebase=4096, **kw):
    p = EvalParams("m", "t", max_tokens=len(tokens), **kw)
    loop, a = evaluate(loaded, tokens, p, progress=False)
    metrics, b, _ = evaluate_parallel(loaded, tokens, EvalParams(**{**vars(p), "evaluator": "parallel"}).resolved(),
                                      progress=False, chunk=chunk, rebase=rebase)
    return loop, a, metrics, b


def _assert_same(loop, a, metrics, b):
    assert np.abs(a.nll.to_numpy() - b.nll.to_numpy()).max() <= TOL
    for col in ("position", "target", "kv_len", "pruned", "dropped", "prune_kind"):
        assert (a[col].to_numpy() == b[col].to_numpy()).all(), col
    for key in ("n_scored", "kv_len_min", "kv_len_max", "n_prunes", "tokens_dropped", "n_emergency_prunes",
                "n_forced_prunes", "drop_max"):
        assert loop["metrics"][key] == metrics[key], key
    assert metrics["kv_len_mean"] == pytest.approx(loop["metrics"]["kv_len_mean"])


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parallel_equals_decode_loop(tiny, hamlet_bytes, name, family):
    """Prefill below and equal to the cap; chunks that do not divide the text, smaller and larger than the cap."""
    loaded = tiny(name)
    for prefill, chunk in ((20, 37), (CAP, 64)):
        _assert_same(*_both(loaded, hamlet_bytes[:N], chunk, cap=CAP, prefill=prefill, **FAMILIES[family]))


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:gpt_neox"])
def test_parallel_rebased_positions(tiny, hamlet_bytes, name):
    """Re-based every few chunks (as in a long stream), the positions still give the loop's NLL."""
    for family in ("strict", "lazy", "window", "original positions"):
        _assert_same(*_both(tiny(name), hamlet_bytes[:700], 48, rebase=100, cap=CAP, prefill=8, **FAMILIES[family]))


def test_schedule_is_the_policy_run_without_the_model():
    """The schedule's KV lengths follow the lazy bound and the prune rhythm, as the policy says."""
    policy = StartRecent(4, 28, compress_every=8)
    sched = schedule(policy, 500, 16)
    assert list(sched.kv_len[:16]) == list(range(1, 17))
    full = sched.kv_len[40:]  # once the cache has filled: between the soft size and the lazy bound
    assert full.min() == policy.soft == 32 and full.max() == policy.max_kv == 32 + 7
    pruned = np.flatnonzero(sched.dropped)
    assert (pruned % 8 == 0).all() and (sched.kind[pruned] == "lazy").all()
    ws = sched.window_start()
    assert (ws[32:] >= 4).all() and (ws <= np.arange(500) + 1).all()


def test_evaluator_choice_and_errors():
    assert EvalParams("m", "t", "start_recent", evaluator="auto").resolved().evaluator == "parallel"
    assert EvalParams("m", "t", "recompute", evaluator="auto").resolved().evaluator == "decode"
    assert EvalParams("m", "t", "start_recent", refresh=4, evaluator="auto").resolved().evaluator == "decode"
    assert EvalParams("m", "t", "kvpress:streaming_llm", evaluator="auto").resolved().evaluator == "decode"
    with pytest.raises(StreamkvError, match="refresh"):
        EvalParams("m", "t", "start_recent", refresh=4, evaluator="parallel").resolved()
    with pytest.raises(StreamkvError, match="method 'recompute' runs only in the decode loop"):
        EvalParams("m", "t", "recompute", evaluator="parallel").resolved()
    with pytest.raises(StreamkvError, match="unknown evaluator 'fast'"):
        EvalParams("m", "t", "mit", evaluator="fast").resolved()


def test_result_records_its_evaluator(tiny, hamlet_bytes):
    record, trace = evaluate(tiny("tiny:llama"), hamlet_bytes[:100],
                             EvalParams("m", "t", "start_recent", cap=CAP, max_tokens=100, evaluator="auto"),
                             progress=False)
    assert record["status"] == "ok" and record["params"]["evaluator"] == "parallel"
    assert record["metrics"]["tpot_ms"] is None and trace.step_ms.isna().all()  # it times nothing


EMBEDDED = {
    "strict": dict(method="start_recent"),
    "lazy K=32": dict(method="start_recent", compress_every=32),
    "softlite naive": dict(method="start_recent", compress_every=8, cache_slack=2, max_drop=4),
    "softlite cooldown": dict(method="start_recent", compress_every=8, cache_slack=2, max_drop=4,
                              softlite_mode="cooldown"),
    "window": dict(method="window"),
    "original positions": dict(method="start_recent", positions="original"),
}


@pytest.mark.parametrize("family", list(EMBEDDED))
def test_parallel_equals_decode_loop_on_the_embedded_model(smollm2, family):
    """2,048 Hamlet tokens at cap 256 (prefill = cap): the studied setting, scaled."""
    tokens = load_tokens(smollm2, "embedded:shakespeare/hamlet", 2048)
    _assert_same(*_both(smollm2, tokens, 256, cap=256, prefill=256, **EMBEDDED[family]))
