"""profile_prune_overhead: the forward against the cache update per decode step, as the prune period K grows."""

from __future__ import annotations

import pandas as pd

from streamkv.analysis import fmt
from streamkv.probes.common import diff, log2_axis


def prune_overhead(part: pd.DataFrame) -> pd.DataFrame:
    """Per K: the step split into forward and cache update, and what one prune costs in the update."""
    rows = []
    for r in part[part.status == "ok"].sort_values("compress_every").itertuples():
        prune_cost = diff(r.update_ms_prune, r.update_ms_noprune)
        rows.append({"compress_every": r.compress_every, "n_prunes": r.n_prunes, "tpot_ms": r.tpot_ms,
                     "forward_ms": r.tpot_ms - r.update_ms_mean if r.update_ms_mean is not None else None,
                     "update_ms": r.update_ms_mean, "update_ms_prune": r.update_ms_prune,
                     "update_ms_other": r.update_ms_noprune, "prune_cost_ms": prune_cost,
                     "update_share_pct": 100 * r.update_ms_mean / r.tpot_ms if r.update_ms_mean is not None else None,
                     "speedup": r.speedup})
    return pd.DataFrame(rows)


def prune_overhead_finding(t: pd.DataFrame) -> str:
    first, last = t.iloc[0], t.iloc[-1]
    costs = t.prune_cost_ms.dropna()
    spread = f"{costs.min():+.2f} to {costs.max():+.2f} ms" if len(costs) else "– (no step of each kind)"
    return (f"The cache update of a prune step minus that of a step without one: {spread}. The update takes "
            f"{fmt.num(first.update_share_pct)} % of the step at K={int(first.compress_every)} and "
            f"{fmt.num(last.update_share_pct)} % at K={int(last.compress_every)}; "
            f"TPOT goes from {first.tpot_ms:.1f} to {last.tpot_ms:.1f} ms.")


def prune_overhead_figure(t: pd.DataFrame, axes, sns) -> None:
    t.set_index("compress_every")[["forward_ms", "update_ms"]].plot.bar(stacked=True, ax=axes[0], rot=0)
    axes[0].set_xlabel("K")
    axes[0].set_ylabel("ms per decode step")
    sns.lineplot(data=t, x="compress_every", y="prune_cost_ms", marker="o", ax=axes[1],
                 label="update on a prune step - other steps")
    sns.lineplot(data=t, x="compress_every", y="update_ms", marker="o", ax=axes[1], label="update per step (mean)")
    log2_axis(axes[1])
    axes[1].set_xlabel("K")
    axes[1].set_ylabel("ms")
