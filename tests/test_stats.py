"""The paired block bootstrap: intervals that cover a known mean, pairing on common targets, verdicts."""

import numpy as np
import pandas as pd
import pytest

from streamkv.stats import Difference, block_bootstrap, compare, paired_differences


def _trace(positions, nll):
    return pd.DataFrame({"position": positions, "nll": nll})


def test_interval_covers_the_true_mean_about_as_often_as_it_says():
    """AR(1) noise (correlated, as per-token NLL differences are) around a known mean: 95 % intervals from blocks
    longer than the correlation cover it in most draws, and shrink with more tokens."""
    rng = np.random.default_rng(1)
    covered, widths = 0, {}
    for trial in range(60):
        for n in (2048, 8192):
            e = np.empty(n)
            e[0] = rng.normal()
            for i in range(1, n):
                e[i] = 0.6 * e[i - 1] + rng.normal()
            d = block_bootstrap(0.05 + 0.1 * e, block=64, n_boot=400, seed=trial)
            widths.setdefault(n, []).append(d.hi - d.lo)
            covered += n == 8192 and d.lo <= 0.05 <= d.hi
    assert covered >= 50  # of 60, for a nominal 95 %
    assert np.mean(widths[8192]) < 0.65 * np.mean(widths[2048])  # about 1/2 for 4x the tokens


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
    x = np.random.default_rng(3).normal(0.1, 1, 1000)
    assert block_bootstrap(x, seed=7) == block_bootstrap(x, seed=7)
    assert np.isnan(block_bootstrap(np.array([np.nan, 1.0])).mean)
    assert block_bootstrap(np.array([])).n == 0
    assert Difference(10, -0.2, -0.3, -0.1).verdict == "lower"


def test_bench_verdicts_read_the_interval_of_paired_blocks():
    from streamkv.bench import ratio_interval, verdict

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
