"""How sure a difference is: paired block bootstraps over per-token NLL differences and over step times.

Two runs that score the same targets are compared target by target: d_i =
NLL_a(i) - NLL_b(i), and PPL_a / PPL_b = exp(mean d) on those targets.  The
per-token differences are not independent (an eviction hurts a stretch of
tokens, a hard passage is hard for both runs), so the interval resamples
whole blocks, drawn with replacement `n_boot` times from a seeded generator,
and reads the percentile interval of the mean.

A block is a stretch of consecutive *positions* of the stream (`block`
positions: [0, block), [block, 2 block), ...), whatever subset of targets a
comparison has: against a baseline scored on every 32nd target a block of 64
positions holds two targets, not 64 targets spread over 2,048 positions.  The
interval is only as good as the number of blocks it resamples, so it is given
only from `min_blocks` blocks or more; with fewer the difference says so
("too few targets for an interval").  A zero-width interval appears only when
the two runs' NLLs are identical on every common target, and it says
"identical".  A difference whose interval contains zero is not
distinguishable from zero, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

BLOCK = 64  # positions per block
MIN_BLOCKS = 20  # fewer blocks than this give no interval
N_BOOT = 2000
LEVEL = 0.95
SEED = 0

OK, IDENTICAL, TOO_FEW = "ok", "identical", "too few"
ABOVE, BELOW, ACROSS, NO_INTERVAL = "above", "below", "across", "no interval"


def bootstrap(statistic, *sizes: int, n_boot: int = N_BOOT, seed: int | np.random.Generator = SEED,
              level: float = LEVEL) -> tuple[float, float]:
    """The one resampler: the percentile interval of `statistic` over `n_boot` resamples of whole units.

    `sizes`: the number of units (blocks, paired steps, segments) of each group; every group is resampled with
    replacement within itself, and `statistic(*draws)` gets one (n_boot, size) array of unit indices per group,
    in that order, and returns the n_boot resampled values.  A NaN value (a degenerate resample) is left out.
    `seed`: an integer, or a generator whose draws continue (several intervals from one seeded stream).
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    draws = [rng.integers(0, size, size=(n_boot, size)) for size in sizes]
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(statistic(*draws), [tail, 100 - tail])
    return float(lo), float(hi)


def side(lo: float, hi: float, value: float) -> str:
    """Where an interval lies against a value: wholly ABOVE it, wholly BELOW it, ACROSS it (touching counts), or
    NO_INTERVAL (an end is missing).  Every verdict of the project reads an interval through this: a difference
    against zero, a ratio against its goal, a trend against no change."""
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return NO_INTERVAL
    if lo > value:
        return ABOVE
    if hi < value:
        return BELOW
    return ACROSS


@dataclass(frozen=True)
class Difference:
    """Run a against run b on their common targets: mean NLL difference (nats) and its interval.

    `blocks`: the blocks of positions the targets fall in; `status`: "ok" (an interval), "identical" (the NLLs
    agree on every target: the interval is that point) or "too few" (fewer than `MIN_BLOCKS` blocks, or no
    finite difference: no interval, lo and hi NaN).
    """

    n: int  # paired targets
    mean: float
    lo: float
    hi: float
    level: float = LEVEL
    blocks: int = 0
    status: str = OK

    @property
    def pct(self) -> float:
        """PPL of a over PPL of b on the paired targets, as a change in %."""
        return _pct(self.mean)

    @property
    def pct_lo(self) -> float:
        return _pct(self.lo)

    @property
    def pct_hi(self) -> float:
        return _pct(self.hi)

    @property
    def half_width_pct(self) -> float:
        return (self.pct_hi - self.pct_lo) / 2

    @property
    def verdict(self) -> str:
        """"higher" (a worse), "lower" (a better), "not distinguishable from zero", "identical" or
        "too few targets"."""
        if self.status == IDENTICAL:
            return "identical"
        if self.status == TOO_FEW:
            return "too few targets"
        return {ABOVE: "higher", BELOW: "lower"}.get(side(self.lo, self.hi, 0.0), "not distinguishable from zero")

    def text(self) -> str:
        """E.g. "+1.23 % [+0.40, +2.05]": the PPL change with its interval; or why there is none."""
        return interval_text(self.pct, self.pct_lo, self.pct_hi, self.status, self.n, unit=" %")


def interval_text(pct: float, lo: float, hi: float, status: str | None, n, unit: str = "") -> str:
    """A difference as a table cell: "+1.23 [+0.40, +2.05]", "identical", "+1.23 (too few targets for an interval,
    n = 23)", or "–" where there is no value."""
    if pct is None or not math.isfinite(pct):
        return "–"
    if status == IDENTICAL:
        return "identical"
    if status == TOO_FEW or lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        count = f", n = {int(n):,}" if n is not None and n == n else ""
        return f"{pct:+.2f}{unit} (too few targets for an interval{count})"
    digits = decimals(lo, hi, 2)
    return f"{pct:+.{digits}f}{unit} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def decimals(lo: float, hi: float, least: int) -> int:
    """Decimals that show an interval's two ends apart (at least `least`; at most 6): a narrow interval written
    with two would read "[-0.00, +0.00]", as if it had no width."""
    width = hi - lo
    return least if not width > 0 else int(min(6, max(least, 1 - math.floor(math.log10(width)))))


def _pct(nats: float) -> float:
    return (math.exp(nats) - 1) * 100 if math.isfinite(nats) else float("nan")


def paired(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """The positions both traces scored, in order, with `nll_a` and `nll_b`."""
    both = a[["position", "nll"]].merge(b[["position", "nll"]], on="position", suffixes=("_a", "_b"))
    return both.sort_values("position").reset_index(drop=True)


def paired_differences(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
    """NLL_a - NLL_b on the positions both traces scored, in position order."""
    both = paired(a, b)
    return (both.nll_a - both.nll_b).to_numpy()


def block_bootstrap(diff: np.ndarray, positions: np.ndarray | None = None, block: int = BLOCK,
                    n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL,
                    min_blocks: int = MIN_BLOCKS) -> Difference:
    """The mean of `diff` with a percentile interval from resampling blocks of `block` consecutive positions.

    `positions`: the position of each value (default: 0, 1, 2, ...); a block holds the values whose position
    falls in it, however many (a block with none is not a block).  A resampled mean weighs each block by its
    count, so it is the mean over the targets drawn.
    """
    diff = np.asarray(diff, dtype=np.float64)
    positions = np.arange(diff.size) if positions is None else np.asarray(positions, dtype=np.int64)
    if diff.size == 0 or not np.isfinite(diff).all():
        nan = float("nan")
        return Difference(int(diff.size), nan, nan, nan, level, 0, TOO_FEW)
    ids, lens = np.unique(positions // block, return_counts=True)
    mean = float(diff.mean())
    if not diff.any():  # the same NLL on every common target: the difference is exactly zero, not estimated
        return Difference(int(diff.size), 0.0, 0.0, 0.0, level, int(ids.size), IDENTICAL)
    if ids.size < min_blocks:
        return Difference(int(diff.size), mean, float("nan"), float("nan"), level, int(ids.size), TOO_FEW)
    order = np.argsort(positions, kind="stable")
    sums = np.add.reduceat(diff[order], np.concatenate([[0], np.cumsum(lens)[:-1]]))
    lo, hi = bootstrap(lambda draws: sums[draws].sum(axis=1) / lens[draws].sum(axis=1), ids.size,
                       n_boot=n_boot, seed=seed, level=level)
    return Difference(int(diff.size), mean, lo, hi, level, int(ids.size), OK)


def compare(a: pd.DataFrame, b: pd.DataFrame, **bootstrap) -> Difference:
    """Run a (trace) against run b (trace), paired on their common targets, in blocks of positions."""
    both = paired(a, b)
    return block_bootstrap((both.nll_a - both.nll_b).to_numpy(), both.position.to_numpy(), **bootstrap)


# ----------------------------------------------------------------------------- step times


def ratio_interval(num: np.ndarray, den: np.ndarray, n_boot: int = N_BOOT, level: float = LEVEL,
                   seed: int = SEED, statistic=np.median, min_pairs: int = 2) -> tuple[float, float]:
    """Percentile interval of statistic(num) / statistic(den), resampling paired entries (seeded).

    Entries are paired (block means of two methods timed interleaved, or the two forwards of one interleaved
    step), so the drift of a shared machine falls on both sides of each resampled ratio.  NaN, NaN with fewer
    than `min_pairs` finite pairs.
    """
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    ok = np.isfinite(num) & np.isfinite(den)
    num, den = num[ok], den[ok]
    if num.size < max(2, min_pairs):
        return float("nan"), float("nan")
    return bootstrap(lambda draws: statistic(num[draws], axis=1) / statistic(den[draws], axis=1), num.size,
                     n_boot=n_boot, seed=seed, level=level)


# ----------------------------------------------------------------------------- proportions


def proportion_interval(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n (independent trials; NaN, NaN for n = 0).

    Not a bootstrap: k = 0 or k = n resamples to a zero-width interval, while 0 of 20 is compatible with a rate
    of up to about 16 %.
    """
    if n <= 0:
        return float("nan"), float("nan")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - level) / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)
