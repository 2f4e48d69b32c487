"""Eviction policies on their own: bounds and schedules over long streams of single tokens."""

import pytest

from streamkv.policy import StartRecent


def simulate(policy, n=2000, start=0):
    """Feed one token at a time; return (position, length before, dropped, length after) per step."""
    length, steps = start, []
    for position in range(start, n):
        dropped = policy.plan(length, 1, position)
        policy.commit(length, 1, position, dropped)
        after = length - dropped + 1
        steps.append((position, length, dropped, after))
        length = after
    return steps


@pytest.mark.parametrize("k", [1, 4, 32])
def test_plain_lazy_schedule(k):
    """Prune exactly at multiples of K once over sink + window, back to sink + window."""
    policy = StartRecent(sink=4, window=60, compress_every=k)
    for position, before, dropped, after in simulate(policy):
        if dropped:
            assert position % k == 0 and after == 64
        elif position % k == 0:
            assert before + 1 <= 64
        assert after <= 64 + k - 1
    assert max(s[3] for s in simulate(StartRecent(4, 60, k))) == 64 + k - 1


@pytest.mark.parametrize("k,slack,delta", [(8, 8, 4), (32, 16, 8), (16, 4, 0), (4, 16, 2), (64, 2, 32)])
def test_softlite_never_exceeds_the_hard_cap_and_stages_drops(k, slack, delta):
    policy = StartRecent(sink=4, window=100, compress_every=k, cache_slack=slack, max_drop=delta)
    steps = simulate(policy)
    assert max(after for *_, after in steps) <= 104 + slack == policy.max_kv
    for position, before, dropped, after in steps:
        if not dropped:
            continue
        emergency = before + 1 > policy.hard
        if not emergency:
            assert position % k == 0
            if delta:
                assert dropped <= delta


def test_softlite_with_no_slack_and_no_max_drop_is_plain_lazy():
    plain = simulate(StartRecent(4, 100, 16))
    soft = simulate(StartRecent(4, 100, 16, cache_slack=0, max_drop=0))
    assert plain == soft


def test_max_drop_spreads_one_lazy_prune_over_several():
    policy = StartRecent(sink=4, window=100, compress_every=32, cache_slack=0, max_drop=8)
    drops = [d for *_, d, _ in simulate(policy, n=400) if d]
    assert drops and max(drops) == 8


def test_sinks_are_never_dropped():
    policy = StartRecent(sink=4, window=10, compress_every=1)
    assert policy.plan(length=4, q=11, position=4) == 0  # only sinks cached: nothing evictable
    assert policy.plan(length=14, q=1, position=14) == 1
