"""summarize_k_quality: quality (PPL, spike diagnosis) and speed against the prune period K."""

from __future__ import annotations

import pandas as pd

from streamkv.analysis import fmt
from streamkv.probes.common import QUALITY, log2_axis


def k_quality(part: pd.DataFrame) -> pd.DataFrame:
    """Per K: quality (PPL, delta PPL, spikes), speed, and the KV overshoot lazy pruning allows."""
    cols = ["compress_every", *QUALITY, "kv_len_max", "n_prunes", "tokens_dropped"]
    ok = part[part.status == "ok"].sort_values("compress_every")
    return ok[cols].reset_index(drop=True)


def k_quality_finding(t: pd.DataFrame) -> str:
    first, last = t.iloc[0], t.iloc[-1]
    return (f"From K={int(first.compress_every)} to K={int(last.compress_every)}: ΔPPL {fmt.pct(first.delta_ppl_pct)} "
            f"→ {fmt.pct(last.delta_ppl_pct)}, speedup {first.speedup:.2f}× → {last.speedup:.2f}×, "
            f"KV max {int(first.kv_len_max)} → {int(last.kv_len_max)}.")


def k_quality_figure(t: pd.DataFrame, axes, sns) -> None:
    sns.lineplot(data=t, x="compress_every", y="delta_ppl_pct", marker="o", ax=axes[0])
    axes[0].set_ylabel("Δ PPL vs baseline (%)")
    sns.lineplot(data=t, x="compress_every", y="speedup", marker="o", ax=axes[1])
    axes[1].set_ylabel("speedup (×)")
    for ax in axes:
        log2_axis(ax)
        ax.set_xlabel("K")
