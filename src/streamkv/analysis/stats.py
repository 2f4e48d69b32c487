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
positions holds two targets, not 64 targets spread over 2,048 positions.
Its length comes from the data (`block_length`): Politis and White's automatic
length (2004, as corrected by Patton, Politis and White 2009; `arch`) for the
pair's own difference series, made 1.5^(1/3) longer for non-overlapping blocks,
and never under 64 positions (docs/pipeline.md gives the autocorrelation it
answers to).  With k blocks the resampled means are spread about the mean by
sqrt(k / (k - 1)) t_(k-1) / z (the expanded percentile interval): the bootstrap
of k blocks underestimates the spread of their mean, and its normal tails are
too thin for a few dozen blocks.  The
interval is only as good as the number of blocks it resamples, so it is given
only from `min_blocks` blocks or more; with fewer the difference says so
("too few targets for an interval").  A zero-width interval appears only when
the two runs' NLLs are identical on every common target, and it says
"identical".  A difference whose interval contains zero is not
distinguishable from zero, and the report says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from streamkv.errors import StreamkvError

BLOCK = "auto"  # positions per block: chosen from the data (`block_length`), or a fixed number
BLOCK_FLOOR = 64  # the shortest block the automatic rule gives, in positions
NBB_FACTOR = 1.5 ** (1 / 3)  # Politis-White's length is the circular bootstrap's; non-overlapping blocks need more
MIN_BLOCKS = 20  # fewer blocks than this give no interval
N_BOOT = 2000
LEVEL = 0.95
SEED = 0

OK, IDENTICAL, TOO_FEW = "ok", "identical", "too few"
ABOVE, BELOW, ACROSS, NO_INTERVAL = "above", "below", "across", "no interval"


def resample(statistic, *sizes: int, n_boot: int = N_BOOT, seed: int | np.random.Generator = SEED) -> np.ndarray:
    """The `n_boot` resampled values of `statistic` (see `bootstrap`), NaN for a degenerate resample."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    draws = [rng.integers(0, size, size=(n_boot, size)) for size in sizes]
    return np.asarray(statistic(*draws), dtype=np.float64)


def bootstrap(statistic, *sizes: int, n_boot: int = N_BOOT, seed: int | np.random.Generator = SEED,
              level: float = LEVEL) -> tuple[float, float]:
    """The one resampler: the percentile interval of `statistic` over `n_boot` resamples of whole units.

    `sizes`: the number of units (blocks, paired steps, segments) of each group; every group is resampled with
    replacement within itself, and `statistic(*draws)` gets one (n_boot, size) array of unit indices per group,
    in that order, and returns the n_boot resampled values.  A NaN value (a degenerate resample) is left out.
    `seed`: an integer, or a generator whose draws continue (several intervals from one seeded stream).
    """
    return percentile_interval(resample(statistic, *sizes, n_boot=n_boot, seed=seed), level)


def percentile_interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = (1 - level) / 2 * 100
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
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
    boot: np.ndarray | None = field(default=None, compare=False, repr=False)  # the resampled means (nats)
    block: int | None = None  # positions per block

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

    def p_values(self, expect: str, margin: float | None = None) -> tuple[float, float]:
        """(p of the claim, p of its opposite): one-sided bootstrap p-values of the claim `expect` about a against
        b (see `claim_p_values`); NaN, NaN without an interval."""
        if self.status == IDENTICAL:  # exactly zero, not estimated: true of a margin, never of a direction
            return (1.0, 1.0) if expect in SUPERIORITY else (0.0, 1.0)
        if self.status != OK or self.boot is None:
            return float("nan"), float("nan")
        return claim_p_values(self.boot, expect, margin)


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


def block_length(diff: np.ndarray, positions: np.ndarray | None = None, floor: int = BLOCK_FLOOR) -> int:
    """Positions per block for the series `diff` (values in position order, at `positions`): Politis-White's
    circular-bootstrap length of the series (in values), times NBB_FACTOR, times the median spacing of the
    positions (1 for a row scored on every target, s for a baseline scored on every s-th), at least `floor`."""
    diff = np.asarray(diff, dtype=np.float64)
    spacing = 1.0 if positions is None or len(positions) < 2 else max(1.0, float(np.median(np.diff(positions))))
    if diff.size < 16 or not np.isfinite(diff).all() or np.ptp(diff) == 0:
        return floor
    try:
        from arch.bootstrap import optimal_block_length
    except ImportError:  # (the library without its pipeline extra)
        raise StreamkvError("stats.block 'auto' chooses block lengths with the arch package, which is not "
                            "installed: pip install '.[pipeline]', or give stats.block a number") from None
    values = optimal_block_length(diff)["circular"].to_numpy()
    if not np.isfinite(values).all():
        return floor
    return max(floor, math.ceil(NBB_FACTOR * float(values[0]) * spacing))


def expansion(k: int, level: float = LEVEL) -> float:
    """The expanded percentile interval's factor for k blocks: sqrt(k / (k - 1)) t_(k-1) / z at `level`."""
    from statistics import NormalDist

    from scipy.stats import t

    tail = 1 - (1 - level) / 2
    return math.sqrt(k / (k - 1)) * float(t.ppf(tail, k - 1)) / NormalDist().inv_cdf(tail)


def block_bootstrap(diff: np.ndarray, positions: np.ndarray | None = None, block: int | str = BLOCK,
                    n_boot: int = N_BOOT, seed: int = SEED, level: float = LEVEL,
                    min_blocks: int = MIN_BLOCKS) -> Difference:
    """The mean of `diff` with an (expanded) percentile interval from resampling blocks of consecutive positions.

    `block`: positions per block, or "auto" (`block_length`).  `positions`: the position of each value (default:
    0, 1, 2, ...); a block holds the values whose position falls in it, however many (a block with none is not a
    block).  A resampled mean weighs each block by its count, so it is the mean over the targets drawn; the
    resampled means are spread about the mean by `expansion(blocks)`.
    """
    diff = np.asarray(diff, dtype=np.float64)
    positions = np.arange(diff.size) if positions is None else np.asarray(positions, dtype=np.int64)
    if diff.size == 0 or not np.isfinite(diff).all():
        nan = float("nan")
        return Difference(int(diff.size), nan, nan, nan, level, 0, TOO_FEW)
    if block == "auto":
        order = np.argsort(positions, kind="stable")
        block = block_length(diff[order], positions[order])
    ids, lens = np.unique(positions // block, return_counts=True)
    mean = float(diff.mean())
    if not diff.any():  # the same NLL on every common target: the difference is exactly zero, not estimated
        return Difference(int(diff.size), 0.0, 0.0, 0.0, level, int(ids.size), IDENTICAL, block=int(block))
    if ids.size < min_blocks:
        return Difference(int(diff.size), mean, float("nan"), float("nan"), level, int(ids.size), TOO_FEW,
                          block=int(block))
    order = np.argsort(positions, kind="stable")
    sums = np.add.reduceat(diff[order], np.concatenate([[0], np.cumsum(lens)[:-1]]))
    boot = resample(lambda draws: sums[draws].sum(axis=1) / lens[draws].sum(axis=1), ids.size, n_boot=n_boot,
                    seed=seed)
    boot = mean + expansion(int(ids.size), level) * (boot - mean)
    lo, hi = percentile_interval(boot, level)
    return Difference(int(diff.size), mean, lo, hi, level, int(ids.size), OK, boot, int(block))


def compare(a: pd.DataFrame, b: pd.DataFrame, **bootstrap) -> Difference:
    """Run a (trace) against run b (trace), paired on their common targets, in blocks of positions."""
    both = paired(a, b)
    return block_bootstrap((both.nll_a - both.nll_b).to_numpy(), both.position.to_numpy(), **bootstrap)


# ----------------------------------------------------------------------------- claims

# What a claim about run a against run b says, and how it is tested (`claim_p_values`):
#   lower / higher  superiority: a's PPL is lower (higher) than b's; the interval excludes zero that way
#   noninferior     a is no worse than b by more than the margin m: PPL_a / PPL_b - 1 < m (the interval's upper
#                   end below m)
#   equivalent      a and b differ by less than m either way (two one-sided tests: the whole interval within +-m)
# A margin is a PPL change in %.  No claim of "no difference" is read from an interval that contains zero: the less
# data, the wider the interval, and the stronger such a claim would look.
SUPERIORITY = ("lower", "higher")
KINDS = (*SUPERIORITY, "noninferior", "equivalent")
# The margins a claim gets where its config entry names none (docs/pipeline.md, "Claims and margins"): eviction
# choices move PPL by 0.1-3 %; the study treats changes under 1 % as noise (equivalence within +-1 %), and a rival
# of the same cap is matched if ours is no more than 2 % worse (the SnapKV-class rivals sit 1-2 % from strict).
DEFAULT_MARGIN = {"noninferior": 2.0, "equivalent": 1.0}


def _nats(pct: float) -> float:
    return math.log1p(pct / 100)


def claim_p_values(boot: np.ndarray, expect: str, margin: float | None = None) -> tuple[float, float]:
    """(p, p of the opposite): one-sided bootstrap p-values from the resampled mean differences `boot` (nats).

    p is the share of resamples on the far side of the claim's null hypothesis, (count + 1) / (n + 1); a claim
    holds at one-sided level alpha when p <= alpha, which for a single pair is the percentile interval at level
    1 - 2 alpha lying where the claim says.  The opposite: for superiority, the other direction; for
    non-inferiority, a worse by more than the margin; for equivalence, a difference beyond the margin (either way).
    """
    if expect not in KINDS:
        raise ValueError(f"unknown claim kind {expect!r}; one of {', '.join(KINDS)}")
    boot = np.asarray(boot, dtype=np.float64)
    boot = boot[np.isfinite(boot)]
    n = boot.size

    def share(mask) -> float:
        return float((np.count_nonzero(mask) + 1) / (n + 1))

    if expect == "lower":
        return share(boot >= 0), share(boot <= 0)
    if expect == "higher":
        return share(boot <= 0), share(boot >= 0)
    m = _nats(margin)
    if expect == "noninferior":
        return share(boot >= m), share(boot <= m)
    lo = _nats(-margin)  # equivalent
    return max(share(boot >= m), share(boot <= lo)), min(share(boot <= m), share(boot >= lo))


def holm(p: np.ndarray | list, alpha: float) -> np.ndarray:
    """Which hypotheses Holm's step-down procedure rejects at family-wise level `alpha` (NaN: never rejected).

    Sorted p_(1) <= ... <= p_(k): reject while p_(i) <= alpha / (k - i + 1); the first that fails stops it.
    """
    p = np.asarray(p, dtype=np.float64)
    reject = np.zeros(p.size, dtype=bool)
    finite = np.flatnonzero(np.isfinite(p))
    k = finite.size
    for rank, i in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        if p[i] > alpha / (k - rank):
            break
        reject[i] = True
    return reject


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
