"""Softlite, overlap and refresh on tiny models, through the decode loop: bounds, marks, equalities."""

import numpy as np
import pytest
import torch

from streamkv import EvalParams, StreamkvError, evaluate, make_cache
from streamkv.cache.streaming import select_uniform

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

CAP, SINK = 48, 4


def run(loaded, tokens, **kw):
    kw = {"method": "start_recent", "cap": CAP, "sink": SINK, "max_tokens": len(tokens), **kw}
    return evaluate(loaded, tokens, EvalParams("m", "t", **kw), progress=False)


@pytest.mark.parametrize("mode", ["naive", "cooldown"])
@pytest.mark.parametrize("k,slack,delta", [(8, 4, 2), (8, 2, 4), (16, 8, 4), (4, 8, 0), (8, 0, 3)])
def test_softlite_invariants(tiny, hamlet_bytes, k, slack, delta, mode):
    """|KV| <= H on every step; drops above delta or off the rhythm are marked, and only those."""
    record, trace = run(tiny("tiny:llama"), hamlet_bytes[:400], compress_every=k, cache_slack=slack, max_drop=delta,
                        softlite_mode=mode, prefill=CAP - slack)
    soft = CAP - slack  # sink + window under Auto-cap
    hard = soft + slack if slack else soft + k - 1
    decode = trace[trace.step > 0]
    assert decode.kv_len.max() <= hard
    events = trace[trace.pruned]
    assert len(events) == record["metrics"]["n_prunes"] > 0
    marked = events.prune_kind.isin(["emergency", "forced"])
    if delta:
        assert (events.dropped[~marked] <= delta).all()
    assert (events.prune_kind[~marked] == "lazy").all()
    assert (events.position[events.prune_kind == "emergency"] % k != 0).all()  # position: the token fed
    assert record["metrics"]["n_emergency_prunes"] == (events.prune_kind == "emergency").sum()
    assert record["metrics"]["n_forced_prunes"] == (events.prune_kind == "forced").sum()
    assert record["metrics"]["drop_max"] == events.dropped.max()


@pytest.mark.parametrize("mode", ["naive", "cooldown"])
def test_no_slack_and_no_max_drop_is_plain_lazy(tiny, hamlet_bytes, mode):
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:300]
    _, plain = run(loaded, tokens, compress_every=8)
    _, soft = run(loaded, tokens, compress_every=8, cache_slack=0, max_drop=0, softlite_mode=mode)
    assert plain.nll.tolist() == soft.nll.tolist() and plain.dropped.tolist() == soft.dropped.tolist()


def test_cooldown_keeps_the_rhythm_and_naive_falls_into_the_trap(tiny, hamlet_bytes):
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:400]
    k, slack, delta = 8, 2, 3
    plain, _ = run(loaded, tokens, compress_every=k, prefill=CAP)
    naive, _ = run(loaded, tokens, compress_every=k, cache_slack=slack, max_drop=delta, prefill=CAP)
    cool, trace = run(loaded, tokens, compress_every=k, cache_slack=slack, max_drop=delta, softlite_mode="cooldown",
                      prefill=CAP)
    m = {name: r["metrics"] for name, r in (("plain", plain), ("naive", naive), ("cool", cool))}
    assert m["cool"]["n_prunes"] <= m["plain"]["n_prunes"]
    assert m["cool"]["n_emergency_prunes"] == 0
    assert m["naive"]["n_prunes"] > m["plain"]["n_prunes"] and m["naive"]["n_emergency_prunes"] > 0
    assert (trace.position[trace.pruned & (trace.step > 0)] % k == 0).all()


def test_overlap_is_a_reallocation_of_the_window(tiny, hamlet_bytes):
    """Under Auto-cap, O extra recent tokens come out of the window: the same keys, the same NLL."""
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:300]
    with_overlap, a = run(loaded, tokens, compress_every=8, overlap=8)
    _, b = run(loaded, tokens, compress_every=8)
    assert with_overlap["params"]["window"] == CAP - SINK - 8
    assert a.nll.tolist() == b.nll.tolist() and a.kv_len.tolist() == b.kv_len.tolist()


def test_refresh_with_nothing_evicted_is_dense(tiny, hamlet_bytes):
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:120]
    _, dense = run(loaded, tokens, method="dense", prefill=10)
    record, trace = run(loaded, tokens, cap=200, refresh=16, prefill=10)
    assert record["metrics"]["tokens_dropped"] == 0
    assert np.abs(trace.nll.values - dense.nll.values).max() <= 1e-4


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:gpt_neox"])
def test_refresh_keeps_evicted_tokens_at_the_tail_within_the_cap(tiny, hamlet_bytes, name):
    model = tiny(name).model
    refresh, k = 8, 4
    cache = make_cache("start_recent", model, cap=CAP, sink=SINK, compress_every=k, refresh=refresh)
    with torch.no_grad():
        for i in range(0, 300, 3):  # chunks: the mask must follow the refresh layout
            model(input_ids=torch.tensor([hamlet_bytes[i : i + 3]]), past_key_values=cache, use_cache=True)
            assert cache.kv_length == cache.last_step.kv_len <= CAP + k - 1  # hard (soft + K - 1) + R
    assert cache.n_refresh == refresh and cache.tokens_dropped > refresh
    s, a = SINK, cache.n_before
    positions = cache.slot_pos
    refreshed = positions[s + a : s + a + refresh]
    recent = torch.cat((positions[s : s + a], positions[s + a + refresh :]))
    assert torch.equal(positions[:s], torch.arange(s))  # the sinks stay
    assert (refreshed < recent.min()).all()  # evicted tokens, older than every recent token...
    assert torch.equal(recent, torch.arange(recent[0], 300))  # ...while the window stays contiguous
    assert (refreshed.diff() > 0).all() and refreshed[-1] - refreshed[0] > 2 * refresh  # spread over the past


def test_uniform_selection_is_evenly_spaced():
    assert select_uniform(torch.arange(100), 4).tolist() == [12, 37, 62, 87]
    assert select_uniform(torch.arange(3), 8).tolist() == [0, 1, 2]


def test_refresh_and_softlite_options_are_checked(tiny):
    model = tiny("tiny:llama").model
    with pytest.raises(StreamkvError, match="budget overflow|budget leaves no window"):
        make_cache("start_recent", model, cap=32, sink=4, refresh=20, overlap=10)
    with pytest.raises(StreamkvError, match="refresh applies to start_recent, not to 'mit'"):
        make_cache("mit", model, cap=32, refresh=4)
    with pytest.raises(StreamkvError, match="unknown refresh selection 'best'"):
        make_cache("start_recent", model, cap=32, refresh=4, refresh_select="best")
    with pytest.raises(StreamkvError, match="unknown softlite-mode 'eager'"):
        EvalParams("m", "t", "start_recent", softlite_mode="eager").resolved()
    with pytest.raises(StreamkvError, match="refresh applies to start_recent, not to 'mit'"):
        EvalParams("m", "t", "mit", refresh=4).resolved()
