"""NLL spike diagnosis: what a prune costs in quality, token by token.

The excess NLL of a run is its per-token NLL minus a reference's on the same
target (the full-coverage reference row, or the dense row), on the targets
both scored: a reference that scored only some targets (a strided baseline)
would leave most windows without a value.  Each prune event (a decode step that dropped tokens) opens a window
that lasts until the next event or `horizon` steps, whichever comes first; in
it the spike has a peak (largest excess), a width (steps whose excess is above
`threshold`) and an area (sum of the positive excess).  The prune step itself
is step 0 of its window: the token it scores already sees the pruned cache.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SPIKE_COLUMNS = ("spike_events", "spike_peak", "spike_width", "spike_area", "excess_nll_mean")


def excess_nll(run: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """The decode steps of `run` that `baseline` (the reference) also scored, with `excess` = run NLL - reference
    NLL at the same position."""
    base = baseline.set_index("position").nll
    out = run[run.step > 0].copy()
    out["excess"] = out.nll.to_numpy() - base.reindex(out.position).to_numpy()
    return out[out.excess.notna()].reset_index(drop=True)


def spike_events(excess: np.ndarray, events: np.ndarray, horizon: int = 32, threshold: float = 0.1) -> pd.DataFrame:
    """Peak, width and area of the excess after each event (indices into `excess`)."""
    events = np.sort(np.asarray(events, dtype=np.int64))
    ends = np.minimum(np.append(events[1:], len(excess)), events + horizon)
    rows = []
    for start, end in zip(events, ends):
        window = np.asarray(excess[start:end], dtype=float)
        rows.append({"index": int(start), "length": int(end - start), "peak": float(window.max()),
                     "width": int((window > threshold).sum()), "area": float(np.clip(window, 0, None).sum())})
    return pd.DataFrame(rows, columns=["index", "length", "peak", "width", "area"])


def steps_since_prune(pruned: np.ndarray) -> np.ndarray:
    """For each step, the steps since the latest prune event (0 on the event; -1 before the first)."""
    idx = np.where(pruned, np.arange(len(pruned)), -1)
    last = np.maximum.accumulate(idx) if len(idx) else idx
    return np.where(last >= 0, np.arange(len(pruned)) - last, -1)


def diagnose(run: pd.DataFrame, baseline: pd.DataFrame, horizon: int = 32,
             threshold: float = 0.1) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Per-run spike summary, the per-event table and the mean excess by steps since prune."""
    ex = excess_nll(run, baseline)
    pruned = ex.pruned.to_numpy(dtype=bool)
    events = spike_events(ex.excess.to_numpy(), np.flatnonzero(pruned), horizon, threshold)
    if len(events):
        events["position"] = ex.position.to_numpy()[events["index"]]
        events["dropped"] = ex.dropped.to_numpy()[events["index"]]
        events["kind"] = ex.prune_kind.to_numpy()[events["index"]] if "prune_kind" in ex else ""
    since = steps_since_prune(pruned)
    keep = (since >= 0) & (since < horizon)
    curve = (pd.DataFrame({"since": since[keep], "excess": ex.excess.to_numpy()[keep]})
             .groupby("since").excess.agg(["mean", "count"]).reset_index())
    summary = {
        "spike_events": int(len(events)),
        "spike_peak": float(events.peak.mean()) if len(events) else None,
        "spike_width": float(events.width.mean()) if len(events) else None,
        "spike_area": float(events.area.mean()) if len(events) else None,
        "excess_nll_mean": float(ex.excess.mean()) if len(ex) else None,
    }
    return summary, events, curve
