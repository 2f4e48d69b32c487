"""What the probes share: the quality columns they report, which tokens a run dropped where (from its prune
events), and a probe table's markdown in the study's symbols."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from streamkv.analysis.fmt import to_markdown

QUALITY = ["ppl", "delta_ppl_pct", "tpot_ms", "speedup", "spike_events", "spike_peak", "spike_width", "spike_area"]


def drops_of(events: pd.DataFrame, file: str) -> list[int]:
    return events.loc[events.file == file, "dropped"].astype(int).tolist() if len(events) else []


def dropped_tokens(events: pd.DataFrame, row) -> dict[int, tuple[int, int]] | None:
    """Which tokens a run dropped where: decode position -> [first, end) of the token positions dropped there.

    A prune drops the oldest tokens after the `sink` first (`policy.Policy`), so the prune steps and sizes fix
    the tokens: the i-th token dropped is token sink + i.  Position -1 stands for the prefill's prune (the
    spike events hold the decode steps only; the prefill's drops are the rest of `tokens_dropped`).  None where
    that does not determine them: a method whose layout is not Start+Recent's (refresh re-inserts evicted
    tokens, a peer picks its own), or prune events that do not account for every prune of the run.
    """
    from streamkv.methods import REGISTRY

    method = REGISTRY.get(row.method)
    if method is None or method.family != "cache" or method.dense or getattr(row, "refresh", 0):
        return None
    ev = events[events.file == row.file].sort_values("position") if len(events) else events
    decode = [(int(p), int(d)) for p, d in zip(ev.get("position", []), ev.get("dropped", []))]
    prefill = int(row.tokens_dropped) - sum(d for _, d in decode)
    if prefill < 0 or len(decode) + (prefill > 0) != int(row.n_prunes):
        return None
    out, first = {}, int(row.sink or 0)
    for position, n in ([(-1, prefill)] if prefill else []) + decode:
        out[position] = (first, first + n)
        first += n
    return out


def first_difference(a: dict | None, b: dict | None) -> int | None:
    """The first decode position (-1: the prefill) where two runs dropped different tokens; None if nowhere."""
    return next((p for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)), None)


def position_text(p) -> str:
    """Where a run first dropped another token: the prefill (-1) or a decode position."""
    return "the prefill" if p == -1 else f"position {int(p)}"


def drop_histogram(drops: list[int]) -> str:
    """Drop sizes as `size x count`, largest count first: `8x12, 4x3`."""
    if not drops:
        return "none"
    sizes, counts = np.unique(drops, return_counts=True)
    order = np.lexsort((-sizes, -counts))
    return ", ".join(f"{sizes[i]}x{counts[i]}" for i in order)


def diff(a, b):
    return None if a is None or b is None or pd.isna(a) or pd.isna(b) else a - b


def log2_axis(ax) -> None:
    """A log-2 x axis labelled with plain numbers (K = 1, 2, 4, ...)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


_COLUMN_NAMES = {"compress_every": "K", "cache_slack": "σ", "max_drop": "δ", "delta_ppl_pct": "ΔPPL %",
                 "tpot_ms": "TPOT ms", "speedup": "speedup", "spike_events": "events", "spike_peak": "peak",
                 "spike_width": "width", "spike_area": "area", "kv_len_max": "KV max"}


def markdown(table: pd.DataFrame) -> str:
    """A probe's table in the report, its columns in the study's symbols."""
    if table.empty:
        return "(no finished runs)"
    return to_markdown(table.rename(columns=_COLUMN_NAMES), cell=_probe_cell)


def _probe_cell(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "–"
        return f"{v:.0f}" if float(v).is_integer() else (f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}")
    return str(v).replace("|", "\\|")
