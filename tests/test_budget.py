import itertools

import pytest

from streamkv import Budget, EvalParams, StreamkvError
from streamkv.cache.policy import StartRecent


def test_window_is_derived_from_cap():
    b = Budget.derive(256, sink=4)
    assert (b.sink, b.window, b.soft) == (4, 252, 256)
    b = Budget.derive(2048, sink=32, cache_slack=16, overlap=8, refresh=0)
    assert b.window == 2048 - 32 - 16 - 8


@pytest.mark.parametrize("terms", [dict(sink=0), dict(sink=7, cache_slack=3), dict(sink=1, overlap=2, refresh=5)])
def test_derived_budget_fills_cap_exactly(terms):
    b = Budget.derive(64, **terms)
    assert b.sink + b.window + b.cache_slack + b.overlap + b.refresh == 64


def test_overflow_names_every_term_and_the_sum():
    with pytest.raises(StreamkvError) as err:
        Budget.derive(256, sink=4, window=250, cache_slack=8)
    assert str(err.value) == (
        "budget overflow: sink (4) + window (250) + cache_slack (8) + overlap (0) + refresh (0) = 262 > cap (256)"
    )


def test_no_window_left():
    with pytest.raises(StreamkvError, match=r"budget leaves no window: cap \(16\) - sink \(4\) - cache_slack \(12\)"):
        Budget.derive(16, sink=4, cache_slack=12)


@pytest.mark.parametrize("cap,sink,msg", [(-1, 4, "cap must be a positive"),
                                          (8, 8, "sink \\(8\\) must be smaller than cap \\(8\\)"),
                                          (8, -1, "sink must be >= 0")])
def test_bad_terms(cap, sink, msg):
    with pytest.raises(StreamkvError, match=msg):
        Budget.derive(cap, sink=sink)


@pytest.mark.parametrize("sink,slack,overlap,refresh", list(itertools.product((0, 4), (0, 2), (0, 8), (0, 16))))
def test_window_is_derived_for_every_term_combination(sink, slack, overlap, refresh):
    """The budget, the recorded parameters and the cache's policy agree on the window."""
    b = Budget.derive(128, sink=sink, cache_slack=slack, overlap=overlap, refresh=refresh)
    assert b.window == 128 - sink - slack - overlap - refresh
    p = EvalParams("m", "t", "start_recent", cap=128, sink=sink, cache_slack=slack, overlap=overlap, refresh=refresh)
    assert p.resolved().record()["window"] == b.window
    policy = StartRecent(b.sink, b.window + b.overlap, 8, b.cache_slack)
    # at its hard limit a configuration sees cap - refresh keys in the policy's count, the refreshed ones on top
    assert (policy.hard if slack else policy.soft) + refresh == 128
