"""Eviction policies on their own: bounds and schedules over long streams of single tokens."""

import pytest

from streamkv import StreamkvError
from streamkv.cache.policy import EMERGENCY, FORCED, LAZY, StartRecent


def simulate(policy, n=2000, start=0):
    """Feed one token at a time; return (position, length before, dropped, kind, length after) per step."""
    length, steps = start, []
    for position in range(start, n):
        prune = policy.plan(length, 1, position)
        after = length - prune.dropped + 1
        steps.append((position, length, prune.dropped, prune.kind, after))
        length = after
    return steps


def prunes(steps):
    return [s for s in steps if s[2]]


@pytest.mark.parametrize("k", [1, 4, 32])
def test_plain_lazy_schedule(k):
    """Prune exactly at multiples of K once over sink + window, back to sink + window."""
    policy = StartRecent(sink=4, window=60, compress_every=k)
    for position, before, dropped, kind, after in simulate(policy):
        if dropped:
            assert position % k == 0 and after == 64 and kind == LAZY
        elif position % k == 0:
            assert before + 1 <= 64
        assert after <= 64 + k - 1
    assert max(s[4] for s in simulate(StartRecent(4, 60, k))) == 64 + k - 1 == policy.max_kv


GRID = [(k, slack, delta, mode) for k, slack, delta in
        [(8, 8, 4), (32, 16, 8), (16, 4, 0), (4, 16, 2), (64, 2, 32), (8, 2, 4), (32, 0, 8), (8, 0, 3)]
        for mode in ("naive", "cooldown")]


@pytest.mark.parametrize("k,slack,delta,mode", GRID)
def test_softlite_never_exceeds_the_hard_cap_and_marks_what_is_not_staged(k, slack, delta, mode):
    policy = StartRecent(sink=4, window=100, compress_every=k, cache_slack=slack, max_drop=delta, mode=mode)
    steps = simulate(policy)
    assert max(after for *_, after in steps) <= policy.max_kv <= policy.hard
    for position, before, dropped, kind, after in prunes(steps):
        if kind == LAZY:  # on the rhythm, and never more than delta
            assert position % k == 0 and (not delta or dropped <= delta)
        elif kind == FORCED:
            assert position % k == 0
        else:
            assert kind == EMERGENCY and position % k != 0 and before + 1 > policy.hard


@pytest.mark.parametrize("mode", ["naive", "cooldown"])
@pytest.mark.parametrize("k", [1, 8, 32])
def test_softlite_with_no_slack_and_no_max_drop_is_plain_lazy(k, mode):
    plain = simulate(StartRecent(4, 100, k))
    assert simulate(StartRecent(4, 100, k, cache_slack=0, max_drop=0, mode=mode)) == plain


@pytest.mark.parametrize("k,slack,delta", [(8, 2, 4), (32, 16, 8), (16, 4, 0), (8, 0, 3), (64, 8, 16), (4, 16, 2)])
def test_cooldown_never_prunes_more_often_than_plain_lazy(k, slack, delta):
    """Cooldown prunes only on the rhythm (no emergency), so at most once per K positions, as plain lazy does.

    From an empty cache it may start one period earlier (the cache would otherwise reach H before the
    first scheduled prune), hence at most one prune more over a whole stream.
    """
    cool = prunes(simulate(StartRecent(4, 100, k, slack, delta, mode="cooldown")))
    plain = prunes(simulate(StartRecent(4, 100, k)))
    assert all(position % k == 0 and kind != EMERGENCY for position, _, _, kind, _ in cool)
    assert len(plain) <= len(cool) <= len(plain) + 1


def test_the_naive_rule_falls_into_the_frequency_trap():
    """delta < K: the cache climbs to the hard cap and emergency prunes every delta steps take over."""
    k, delta = 32, 4
    naive = prunes(simulate(StartRecent(4, 100, k, cache_slack=8, max_drop=delta)))
    plain = prunes(simulate(StartRecent(4, 100, k)))
    assert len(naive) > 4 * len(plain)
    assert sum(kind == EMERGENCY for *_, kind, _ in naive) > len(naive) // 2
    assert all(dropped <= delta for _, _, dropped, _, _ in naive)


def test_max_drop_spreads_one_lazy_prune_over_several():
    """A backlog over the soft size (after a long prefill) goes at most 12 per scheduled prune, 4 net per period."""
    policy = StartRecent(sink=4, window=100, compress_every=8, cache_slack=40, max_drop=12)
    steps = simulate(policy, n=400, start=140)
    drops = [d for _, _, d, _, _ in prunes(steps)]
    assert drops[:9] == [12] * 8 + [9] and set(drops[9:]) == {8}  # then the plain lazy rhythm
    assert all(kind == LAZY for *_, kind, _ in prunes(steps))  # the cap (144) is never at stake


def test_sinks_are_never_dropped():
    policy = StartRecent(sink=4, window=10, compress_every=1)
    assert policy.plan(length=4, q=11, position=4).dropped == 0  # only sinks cached: nothing evictable
    assert policy.plan(length=14, q=1, position=14).dropped == 1


def test_unknown_mode():
    with pytest.raises(StreamkvError, match="unknown softlite mode 'lazy'; choose one of: naive, cooldown"):
        StartRecent(4, 10, mode="lazy")
