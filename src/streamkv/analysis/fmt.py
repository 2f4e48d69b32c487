"""Numbers as the report writes them: counts, values, changes in %, sweep points (`K=16, σ=2`).

Shared by the paper tables, the bench tables, the probes and the figures; kept free of torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def count(value) -> str:
    return "?" if value is None or (isinstance(value, float) and not math.isfinite(value)) else str(int(value))


def num(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _ratio_digits(lo, hi) -> int:
    """Decimals of a timing ratio: 3, or more where the interval [lo, hi] would otherwise read as a point."""
    from streamkv.analysis.stats import decimals

    return decimals(lo, hi, 3) if _finite(lo) and _finite(hi) else 3


def ratio_interval(lo=None, hi=None) -> str:
    """A timing ratio's interval alone: "[0.998, 1.027]"; "(identical)" for a series over itself (a zero-width
    interval: the reference's own row), "(no interval)" where there is none."""
    if not (_finite(lo) and _finite(hi)):
        return "(no interval)"
    if lo == hi:
        return "(identical)"
    digits = _ratio_digits(lo, hi)
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def ratio(v, lo=None, hi=None, empty: str = "–") -> str:
    """A timing ratio with its interval (`ratio_interval`): "1.013 [0.998, 1.027]", written with the interval's
    decimals."""
    if not _finite(v):
        return empty
    return f"{v:.{_ratio_digits(lo, hi)}f} {ratio_interval(lo, hi)}"


def pct(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:+.2f} %"


SYMBOL = {"compress_every": "K", "sink": "S", "cache_slack": "σ", "max_drop": "δ", "softlite_mode": "mode",
           "overlap": "O", "refresh": "R"}


def short(name: str) -> str:
    """Sweep rows as `K=16, σ=2`; method-table names as they are."""
    parts = [part.strip().partition("=") for part in name.split(",")]
    if not all(eq and param in SYMBOL for param, eq, _ in parts):
        return name
    return ", ".join(f"{SYMBOL[param]}={value}" for param, _, value in parts)


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.3f}"
    return "" if v is None else str(v).replace("|", "\\|")


def to_markdown(frame: pd.DataFrame, cell=_cell) -> str:
    """A plain markdown table (pandas' own needs a newer tabulate than snakemake allows); `cell` formats a value."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)
