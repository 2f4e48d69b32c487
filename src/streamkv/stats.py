"""How sure a difference in perplexity is: a paired block bootstrap over per-token NLL differences.

Two runs that score the same targets are compared target by target: d_i =
NLL_a(i) - NLL_b(i), and PPL_a / PPL_b = exp(mean d) on those targets.  The
per-token differences are not independent (an eviction hurts a stretch of
tokens, a hard passage is hard for both runs), so the interval resamples
whole blocks of consecutive targets (non-overlapping blocks of `block`
tokens, drawn with replacement, `n_boot` times, from a seeded generator) and
reads the percentile interval of the mean.  A difference whose interval
contains zero is not distinguishable from zero, and the report says so.

Runs are paired on the positions both scored: a baseline evaluated on every
s-th target (`baseline.stride`) is compared on its targets only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

BLOCK = 64
N_BOOT = 2000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class Difference:
    """Run a against run b on their common targets: mean NLL difference (nats) and its interval."""

    n: int  # paired targets
    mean: float
    lo: float
    hi: float
    level: float = LEVEL

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
        """"higher" (a worse), "lower" (a better) or "not distinguishable from zero"."""
        if self.lo > 0:
            return "higher"
        if self.hi < 0:
            return "lower"
        return "not distinguishable from zero"

    def text(self) -> str:
        """E.g. "+1.23 % [+0.40, +2.05]": the PPL change with its interval."""
        return f"{self.pct:+.2f} % [{self.pct_lo:+.2f}, {self.pct_hi:+.2f}]"


def _pct(nats: float) -> float:
    return (math.exp(nats) - 1) * 100 if math.isfinite(nats) else float("nan")


def paired_differences(a: pd.DataFrame, b: pd.DataFrame) -> np.ndarray:
    """NLL_a - NLL_b on the positions both traces scored, in position order."""
    both = a[["position", "nll"]].merge(b[["position", "nll"]], on="position", suffixes=("_a", "_b"))
    both = both.sort_values("position")
    return (both.nll_a - both.nll_b).to_numpy()


def block_bootstrap(diff: np.ndarray, block: int = BLOCK, n_boot: int = N_BOOT, seed: int = SEED,
                    level: float = LEVEL) -> Difference:
    """The mean of `diff` with a percentile interval from resampling blocks of `block` consecutive values.

    The last block may be shorter; a resampled mean weighs each block by its length, so it is the mean over
    the tokens drawn.
    """
    diff = np.asarray(diff, dtype=np.float64)
    if diff.size == 0 or not np.isfinite(diff).all():
        return Difference(int(diff.size), float("nan"), float("nan"), float("nan"), level)
    starts = np.arange(0, diff.size, block)
    sums = np.add.reduceat(diff, starts)
    lens = np.diff(np.append(starts, diff.size))
    draws = np.random.default_rng(seed).integers(0, starts.size, size=(n_boot, starts.size))
    means = sums[draws].sum(axis=1) / lens[draws].sum(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return Difference(int(diff.size), float(diff.mean()), float(lo), float(hi), level)


def compare(a: pd.DataFrame, b: pd.DataFrame, **bootstrap) -> Difference:
    """Run a (trace) against run b (trace), paired on their common targets."""
    return block_bootstrap(paired_differences(a, b), **bootstrap)
