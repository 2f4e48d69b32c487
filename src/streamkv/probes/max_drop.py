"""verify_max_drop_effect: max drop (delta) on and off, under the naive rule and the cooldown rule, at fixed K
and sigma: prunes, emergency prunes, dropped tokens, spike area, TPOT and PPL."""

from __future__ import annotations

import numpy as np
import pandas as pd

from streamkv.analysis import fmt
from streamkv.probes.common import QUALITY, drop_histogram, drops_of


def max_drop_effect(part: pd.DataFrame, events: pd.DataFrame) -> pd.DataFrame:
    """Per softlite mode and delta: prune count and kinds, drop sizes, spikes, PPL and TPOT."""
    rows = []
    for r in part[part.status == "ok"].itertuples():
        drops = drops_of(events, r.file)
        rows.append({"mode": r.softlite_mode, "compress_every": r.compress_every, "cache_slack": r.cache_slack,
                     "max_drop": r.max_drop, "n_prunes": r.n_prunes, "n_emergency": r.n_emergency_prunes,
                     "n_forced": r.n_forced_prunes, "drop_mean": float(np.mean(drops)) if drops else None,
                     "drop_max": r.drop_max, "drops": drop_histogram(drops),
                     **{k: getattr(r, k) for k in QUALITY}})
    return (pd.DataFrame(rows).sort_values(["cache_slack", "mode", "max_drop"]).reset_index(drop=True) if rows
            else pd.DataFrame())


def max_drop_finding(t: pd.DataFrame) -> str:
    parts = []
    for (sigma, mode), g in t.groupby(["cache_slack", "mode"], sort=False):
        off, on = g[g.max_drop == 0], g[g.max_drop > 0]
        for r in on.itertuples():
            base = off.iloc[0] if len(off) else None
            if base is None:
                continue
            parts.append(
                f"σ={sigma} {mode}, δ={r.max_drop} vs δ=0: {int(base.n_prunes)} → {int(r.n_prunes)} prunes "
                f"({int(r.n_emergency)} emergency, {int(r.n_forced)} forced), drop sizes [{base.drops}] → "
                f"[{r.drops}], mean spike area {fmt.num(base.spike_area)} → {fmt.num(r.spike_area)}, "
                f"ΔPPL {fmt.pct(base.delta_ppl_pct)} → {fmt.pct(r.delta_ppl_pct)}, TPOT {base.tpot_ms:.1f} → "
                f"{r.tpot_ms:.1f} ms")
    return "; ".join(parts) + "." if parts else "No δ = 0 / δ > 0 pair finished."


def max_drop_figure(t: pd.DataFrame, axes, sns) -> None:
    t["setting"] = "σ=" + t.cache_slack.astype(str) + "\n" + t["mode"] + ", δ=" + t.max_drop.astype(str)
    t["lazy"] = t.n_prunes - t.n_emergency - t.n_forced
    t.set_index("setting")[["lazy", "n_forced", "n_emergency"]].rename(
        columns={"n_forced": "forced", "n_emergency": "emergency"}).plot.bar(stacked=True, ax=axes[0], rot=0)
    axes[0].set_ylabel("prune events")
    axes[0].tick_params(axis="x", labelsize=7)
    sns.barplot(data=t, x="setting", y="delta_ppl_pct", ax=axes[1], color="C1")
    axes[1].set_ylabel("Δ PPL vs baseline (%)")
    axes[1].tick_params(axis="x", labelsize=7)
