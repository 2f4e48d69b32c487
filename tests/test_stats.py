"""The paired block bootstrap: intervals that cover a known mean, blocks of positions, too few blocks, identical
runs, pairing on common targets, verdicts."""

import numpy as np
import pandas as pd
import pytest

from streamkv.analysis.stats import (
    IDENTICAL,
    MIN_BLOCKS,
    OK,
    TOO_FEW,
    Difference,
    block_bootstrap,
    compare,
    paired_differences,
)


def _trace(positions, nll):
    return pd.DataFrame({"position": positions, "nll": nll})


# The autocorrelation of a real pair: AR(16) coefficients fitted (least squares) to the per-token NLL differences of
# lazy K=32 against strict Start+Recent, SmolLM2-135M on Hamlet at cap 256, the 4,096 targets under eviction (lag-1
# autocorrelation 0.40, 0.23 at lag 2, under 0.1 from lag 4; docs/pipeline.md, "Block length").
REAL_AR = (0.358, 0.102, -0.08, 0.035, -0.003, 0.137, 0.076, -0.049, 0.019, -0.068, 0.022, -0.02, -0.013, -0.006,
           -0.002, 0.018)


def _coverage(make, n: int, reps: int, **bootstrap) -> float:
    """How often the 95 % interval of the mean of `make(rng, n)` (a series of mean zero) covers zero."""
    covered = 0
    for rep in range(reps):
        d = block_bootstrap(make(np.random.default_rng(10_000 + rep), n), n_boot=1000, seed=rep, **bootstrap)
        covered += d.lo <= 0 <= d.hi
    return covered / reps


def _real_like(rng, n):
    """The AR(16) process of REAL_AR with heavy-tailed innovations (Student's t, 4 degrees of freedom)."""
    from scipy.signal import lfilter

    e = rng.standard_t(4, n + 500) * 0.12
    return lfilter([1.0], [1.0, *(-c for c in REAL_AR)], e)[500:]


def _windowed(rng, n, window=128):
    """A moving sum over `window` tokens (correlated over the whole window, as an eviction's effect could be),
    plus independent noise."""
    e = rng.normal(size=n + window)
    return np.convolve(e, np.ones(window) / np.sqrt(window), mode="valid")[:n] * 0.1 + rng.normal(0, 0.05, n)


@pytest.mark.parametrize("make, n", [(_real_like, 2048), (_windowed, 8192)])
def test_the_automatic_block_length_covers_at_the_nominal_level(make, n):
    """400 seeded series with the memory of a real pair (and one correlated over 128 tokens): the automatic block
    length with the expanded percentile interval covers the true mean in at least 93 % of them at nominal 95 %;
    blocks of one token, which treat the tokens as independent, cover far less."""
    assert _coverage(make, n, 400) >= 0.93
    assert _coverage(make, n, 100, block=1) < 0.85


def test_the_block_length_follows_the_memory_of_the_series():
    from streamkv.analysis.stats import BLOCK_FLOOR, block_length

    rng = np.random.default_rng(0)
    assert block_length(rng.normal(size=4096)) == BLOCK_FLOOR  # independent: the floor
    assert block_length(_windowed(rng, 8192)) > 2 * BLOCK_FLOOR  # correlated over 128 tokens: longer blocks
    assert block_length(_real_like(rng, 4096)) == BLOCK_FLOOR  # the real pair's memory is under 64 tokens
    assert block_length(np.zeros(100)) == BLOCK_FLOOR
    # a baseline scored on every 32nd position: the length in values times the spacing, in positions
    thinned = block_length(rng.normal(size=136), np.arange(0, 4352, 32))
    assert thinned >= BLOCK_FLOOR and thinned % 1 == 0


def test_a_real_difference_is_distinguishable_and_no_difference_is_not():
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 1.0, 4096)
    worse = compare(_trace(np.arange(4096), base + 0.05 + rng.normal(0, 0.05, 4096)), _trace(np.arange(4096), base))
    same = compare(_trace(np.arange(4096), base + rng.normal(0, 0.05, 4096)), _trace(np.arange(4096), base))
    assert worse.verdict == "higher" and worse.pct == pytest.approx((np.exp(worse.mean) - 1) * 100)
    assert same.verdict == "not distinguishable from zero" and same.lo < 0 < same.hi
    assert worse.text().startswith("+5.") and "[" in worse.text()


def test_pairing_is_on_the_positions_both_scored():
    """A baseline scored on every 4th target is compared on those only (its stride)."""
    a = _trace(np.arange(100), np.arange(100) * 0.01)
    b = _trace(np.arange(0, 100, 4), np.zeros(25))
    d = paired_differences(a, b)
    assert d.size == 25 and np.allclose(d, np.arange(0, 100, 4) * 0.01)


def test_the_same_seed_gives_the_same_interval_and_bad_input_gives_none():
    x = np.random.default_rng(3).normal(0.1, 1, 2000)
    assert block_bootstrap(x, seed=7) == block_bootstrap(x, seed=7)
    assert np.isnan(block_bootstrap(np.array([np.nan, 1.0])).mean)
    assert block_bootstrap(np.array([])).n == 0
    assert Difference(10, -0.2, -0.3, -0.1).verdict == "lower"


def test_blocks_are_stretches_of_positions_whatever_targets_a_comparison_has():
    """Against a baseline scored on every 32nd target, a block of 64 positions holds 2 targets: 4,351 targets give
    68 blocks (an interval), where blocks of 64 *targets* would have been 3 (no interval worth the name)."""
    rng = np.random.default_rng(2)
    positions = np.arange(0, 4351, 32)
    d = block_bootstrap(rng.normal(0.02, 0.3, positions.size), positions, block=64)
    assert d.n == positions.size == 136 and d.blocks == 68 and d.status == OK
    assert d.lo < d.mean < d.hi
    # the same 136 values as consecutive positions: 3 blocks, too few for an interval
    short = block_bootstrap(rng.normal(0.02, 0.3, 136), block=64)
    assert short.blocks == 3 and short.status == TOO_FEW and np.isnan(short.lo) and np.isnan(short.hi)
    assert np.isfinite(short.mean)


@pytest.mark.parametrize("n, blocks", [(767, 12), (1216, 19), (1280, 20), (2047, 32)])
def test_an_interval_needs_twenty_blocks(n, blocks):
    d = block_bootstrap(np.random.default_rng(n).normal(0, 0.3, n), block=64)
    assert d.blocks == blocks
    assert (d.status == OK) == (blocks >= MIN_BLOCKS)
    if d.status == TOO_FEW:
        assert d.text() == f"{d.pct:+.2f} % (too few targets for an interval, n = {n:,})"
        assert d.verdict == "too few targets"
    else:
        assert d.lo < d.hi and "[" in d.text()


def test_a_zero_width_interval_only_for_identical_nlls():
    """Identical NLLs: "identical", whatever the number of targets; one differing target anywhere: an interval of
    width above zero, or none."""
    nll = np.random.default_rng(5).normal(3, 1, 3000)
    same = compare(_trace(np.arange(3000), nll), _trace(np.arange(3000), nll.copy()))
    assert same.status == IDENTICAL and same.text() == "identical" and same.lo == same.hi == same.mean == 0
    assert compare(_trace(np.arange(30), nll[:30]), _trace(np.arange(30), nll[:30])).status == IDENTICAL
    other = nll.copy()
    other[1234] += 0.5
    one = compare(_trace(np.arange(3000), other), _trace(np.arange(3000), nll))
    assert one.status == OK and one.hi > one.lo and one.mean > 0
    # with every resample a point, the bootstrap never gives a zero-width interval for differing runs
    for n in (1280, 4096):
        d = block_bootstrap(np.full(n, 0.01) + np.random.default_rng(n).normal(0, 1e-3, n))
        assert d.hi > d.lo


def test_strided_and_short_inputs_pair_on_common_positions_in_blocks_of_positions():
    """A run over 4,352 tokens against a baseline on every 32nd target and a peer over the first 768: the blocks
    count positions, and the peer's 768 targets are 12 blocks, too few."""
    rng = np.random.default_rng(4)
    run = _trace(np.arange(4351), rng.normal(3, 1, 4351))
    base = _trace(np.arange(0, 4351, 32), rng.normal(3, 1, 136))
    peer = _trace(np.arange(767), rng.normal(3, 1, 767))
    assert compare(run, base, block=64).blocks == 68 and compare(run, base, block=64).status == OK
    d = compare(peer, run, block=64)
    assert d.n == 767 and d.blocks == 12 and d.status == TOO_FEW
    assert compare(peer, base, block=64).n == 24 and compare(peer, base, block=64).status == TOO_FEW


def test_a_narrow_interval_is_written_with_the_decimals_that_keep_its_ends_apart():
    from streamkv.analysis.fmt import ratio
    from streamkv.analysis.stats import interval_text

    assert interval_text(-0.001, -0.004, 0.004, "ok", 4351) == "-0.0010 [-0.0040, +0.0040]"
    assert interval_text(1.234, 0.4, 2.05, "ok", 4351) == "+1.23 [+0.40, +2.05]"
    assert ratio(1.0002, 1.0001, 1.0004) == "1.00020 [1.00010, 1.00040]"
    assert ratio(1.2, 1.1, 1.3) == "1.200 [1.100, 1.300]"


def test_the_timing_ratio_interval_comes_from_paired_steps():
    from streamkv.evaluation.timing import step_ratio_interval

    rng = np.random.default_rng(0)
    drift = 50 + np.cumsum(rng.normal(0, 0.5, 64))  # the machine's speed drifts; both forwards of a step share it
    ref = drift * (1 + rng.normal(0, 0.01, 64))
    lo, hi = step_ratio_interval(1.1 * drift * (1 + rng.normal(0, 0.01, 64)), ref, block=32)
    assert lo < 1.1 < hi and hi - lo < 0.02
    assert np.isnan(step_ratio_interval(ref[:10], ref[:10], block=32)).all()  # fewer than 20 steps: none


def test_bench_verdicts_read_the_interval_of_paired_blocks():
    from streamkv.analysis.stats import ratio_interval
    from streamkv.bench.goals import verdict

    ref = 50 + np.random.default_rng(1).normal(0, 2, 8)  # block means drifting together across methods
    lo, hi = ratio_interval(ref * 1.2, ref)
    assert lo == pytest.approx(1.2) and hi == pytest.approx(1.2)  # paired blocks: the drift cancels
    noisy = ref * np.tile([0.98, 1.02], 4)
    lo, hi = ratio_interval(noisy, ref)
    assert lo < 1 < hi
    assert verdict(lo, hi, 1.0, "<=") == "within noise"
    assert verdict(0.99, 1.005, 1.01, "<=") == "met" and verdict(1.02, 1.03, 1.01, "<=") == "missed"
    assert verdict(9.6, 9.9, 9.5, ">=") == "met" and verdict(9.0, 9.4, 9.5, ">=") == "missed"
    assert verdict(9.4, 9.6, 9.5, ">=") == "within noise"
    assert np.isnan(ratio_interval(ref[:1], ref[:1])).all()  # one block: no interval
    assert verdict(float("nan"), float("nan"), 9.5, ">=") == "no interval"
