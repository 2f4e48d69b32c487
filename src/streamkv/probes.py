"""The probes: controlled comparisons read off the pipeline summary, one table (and one finding) each.

Every function takes the summary rows of one (model, text) and probe group,
plus the per-event spike table, and returns a frame with one row per point of
the probe's grid.  Nothing is re-run here: a probe is a view of runs the
pipeline already made under its own parameters.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

QUALITY = ["ppl", "delta_ppl_pct", "tpot_ms", "speedup", "spike_events", "spike_peak", "spike_width", "spike_area"]


def _drops(events: pd.DataFrame, file: str) -> list[int]:
    return events.loc[events.file == file, "dropped"].astype(int).tolist() if len(events) else []


def drop_histogram(drops: list[int]) -> str:
    """Drop sizes as `size x count`, largest count first: `8x12, 4x3`."""
    if not drops:
        return "none"
    sizes, counts = np.unique(drops, return_counts=True)
    order = np.lexsort((-sizes, -counts))
    return ", ".join(f"{sizes[i]}x{counts[i]}" for i in order)


def max_drop_effect(part: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Per softlite mode and delta: prune count and kinds, drop sizes, spikes, PPL and TPOT."""
    rows = []
    for r in part[part.status == "ok"].itertuples():
        drops = _drops(events, r.file)
        rows.append({"mode": r.softlite_mode, "compress_every": r.compress_every, "cache_slack": r.cache_slack,
                     "max_drop": r.max_drop, "n_prunes": r.n_prunes, "n_emergency": r.n_emergency_prunes,
                     "n_forced": r.n_forced_prunes, "drop_mean": float(np.mean(drops)) if drops else None,
                     "drop_max": r.drop_max, "drops": drop_histogram(drops),
                     **{k: getattr(r, k) for k in QUALITY}})
    return pd.DataFrame(rows).sort_values(["cache_slack", "mode", "max_drop"]).reset_index(drop=True) if rows else pd.DataFrame()


def slack_effect(part: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Per sigma (and mode): control (delta = 0) against staged (delta > 0), side by side, with differences."""
    ok = part[part.status == "ok"]
    rows = []
    for (sigma, mode), grp in ok.groupby(["cache_slack", "softlite_mode"], sort=True):
        control = grp[grp.max_drop == 0]
        for staged in grp[grp.max_drop > 0].itertuples():
            if control.empty:
                continue
            c = control.iloc[0]
            same = _drops(events, c.file) == _drops(events, staged.file)
            rows.append({
                "cache_slack": sigma, "mode": mode, "max_drop": staged.max_drop, "window": staged.window,
                "prunes_control": c.n_prunes, "prunes_staged": staged.n_prunes,
                "emergency_staged": staged.n_emergency_prunes, "same_drops": same,
                "ppl_control": c.ppl, "ppl_staged": staged.ppl, "ppl_diff_pct": (staged.ppl / c.ppl - 1) * 100,
                "area_control": c.spike_area, "area_staged": staged.spike_area,
                "area_diff": _diff(staged.spike_area, c.spike_area),
                "tpot_control": c.tpot_ms, "tpot_staged": staged.tpot_ms,
                "tpot_diff_pct": (staged.tpot_ms / c.tpot_ms - 1) * 100,
                "delta_ppl_control": c.delta_ppl_pct, "delta_ppl_staged": staged.delta_ppl_pct,
            })
    return pd.DataFrame(rows)


def _diff(a, b):
    return None if a is None or b is None or pd.isna(a) or pd.isna(b) else a - b


def prune_overhead(part: pd.DataFrame) -> pd.DataFrame:
    """Per K: the step split into forward and cache update, and what one prune costs in the update."""
    rows = []
    for r in part[part.status == "ok"].sort_values("compress_every").itertuples():
        prune_cost = _diff(r.update_ms_prune, r.update_ms_noprune)
        rows.append({"compress_every": r.compress_every, "n_prunes": r.n_prunes, "tpot_ms": r.tpot_ms,
                     "forward_ms": r.tpot_ms - r.update_ms_mean if r.update_ms_mean is not None else None,
                     "update_ms": r.update_ms_mean, "update_ms_prune": r.update_ms_prune,
                     "update_ms_other": r.update_ms_noprune, "prune_cost_ms": prune_cost,
                     "update_share_pct": 100 * r.update_ms_mean / r.tpot_ms if r.update_ms_mean is not None else None,
                     "speedup": r.speedup})
    return pd.DataFrame(rows)


def k_quality(part: pd.DataFrame) -> pd.DataFrame:
    """Per K: quality (PPL, delta PPL, spikes), speed, and the KV overshoot lazy pruning allows."""
    cols = ["compress_every", *QUALITY, "kv_len_max", "n_prunes", "tokens_dropped"]
    ok = part[part.status == "ok"].sort_values("compress_every")
    return ok[cols].reset_index(drop=True)


TABLES = {
    "verify_max_drop_effect": lambda part, events: max_drop_effect(part, events),
    "verify_slack_effect": lambda part, events: slack_effect(part, events),
    "profile_prune_overhead": lambda part, events: prune_overhead(part),
    "summarize_k_quality": lambda part, events: k_quality(part),
}


def probe_table(probe: str, summary: pd.DataFrame, events: pd.DataFrame, model: str, text: str) -> pd.DataFrame:
    part = summary[(summary.group == f"probe:{probe}") & (summary.model_key == model) & (summary.text_key == text)]
    part = part.drop_duplicates("file")
    return TABLES[probe](part, events)
