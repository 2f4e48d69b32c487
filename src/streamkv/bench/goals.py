"""What `streamkv bench` measures against what: the names of its rows (the measuring sections, the tables, the
report and the tests read them from here) and every goal a ratio is read against, with the one rule that reads an
interval against a goal."""

from __future__ import annotations

from streamkv.analysis.stats import ABOVE, BELOW, NO_INTERVAL, side

REFERENCE = "no eviction (reference)"
RECOMPUTE = "recompute"
STRICT = "start_recent strict"
LAZY = "start_recent lazy"
# llama.cpp's rows are another engine: their ratios are against llama.cpp's own decode without a shift.
LLAMACPP = "llama.cpp: "
LLAMACPP_REFERENCE = LLAMACPP + "no shift (its reference)"
# The goals the ratios are read against: (column, bound, "<=" or ">=").
GOALS = {
    STRICT: ("overhead", 1.03, "<="),
    LAZY: ("overhead", 1.01, "<="),
    "ring": ("overhead", 1.01, "<="),
    "ring lazy": ("overhead", 1.01, "<="),
    "ring (fixed shapes)": ("overhead", 1.01, "<="),
}
SPEEDUP_GOAL = {256: 9.5}  # vs recompute, for the streaming methods at this cap
EVALUATOR_GOAL = 20.0  # the parallel evaluator's speed over the decode loop's, on 2 CPU cores
WEIGHTS_GOAL = 2.0  # the fastest weights variant's TPOT over llama.cpp's own decode at the same KV length


def llamacpp_shift(k: int) -> str:
    """The name of llama.cpp's context-shift row at prune period k."""
    return f"{LLAMACPP}shift K={k}"


def verdict(lo: float, hi: float, bound: float, op: str) -> str:
    """"met" when the whole interval satisfies `op bound`, "missed" when none of it does, else "within noise";
    "no interval" where there is none (fewer than `stats.MIN_BLOCKS` timed steps).  A point estimate with no
    interval of its own is read as lo = hi."""
    where = side(lo, hi, bound)
    if where == NO_INTERVAL:
        return "no interval"
    good, bad = (BELOW, ABOVE) if op == "<=" else (ABOVE, BELOW)
    return {good: "met", bad: "missed"}.get(where, "within noise")
