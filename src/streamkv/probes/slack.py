"""verify_slack_effect: the cache slack sigma swept (the window derived from the cap), delta = 0 as the control
against a staged delta > 0."""

from __future__ import annotations

import pandas as pd

from streamkv.probes.common import diff, dropped_tokens, first_difference, position_text


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
            a, b = dropped_tokens(events, c), dropped_tokens(events, staged)
            differ = first_difference(a, b) if a is not None and b is not None else None
            same = "–" if a is None or b is None else ("yes" if differ is None else "no")
            rows.append({
                "cache_slack": sigma, "mode": mode, "max_drop": staged.max_drop, "window": staged.window,
                "prunes_control": c.n_prunes, "prunes_staged": staged.n_prunes,
                "emergency_staged": staged.n_emergency_prunes, "same_tokens_dropped": same,
                "first_difference": differ,
                "ppl_control": c.ppl, "ppl_staged": staged.ppl, "ppl_diff_pct": (staged.ppl / c.ppl - 1) * 100,
                "area_control": c.spike_area, "area_staged": staged.spike_area,
                "area_diff": diff(staged.spike_area, c.spike_area),
                "tpot_control": c.tpot_ms, "tpot_staged": staged.tpot_ms,
                "tpot_diff_pct": (staged.tpot_ms / c.tpot_ms - 1) * 100,
                "delta_ppl_control": c.delta_ppl_pct, "delta_ppl_staged": staged.delta_ppl_pct,
            })
    return pd.DataFrame(rows)


def slack_finding(t: pd.DataFrame) -> str:
    same = t.same_tokens_dropped.astype(str)
    known = t[same.isin(["yes", "no"])]
    differ = known[known.same_tokens_dropped == "no"]
    compared = (f"In {int((same == 'yes').sum())} of {len(known)} pairs the staged run (δ > 0) dropped the same "
                "tokens at the same decode steps as its control (δ = 0), compared step by step (a prune drops the "
                "oldest tokens after the sinks, so each run's prune steps and sizes give the tokens)")
    if not len(known):
        compared = ("Which tokens the runs dropped could not be compared (no prune events that account for every "
                    "prune, or a layout that re-inserts tokens)")
    elif len(differ):
        compared += "; they first differ at " + ", ".join(
            f"{position_text(r.first_difference)} (σ={r.cache_slack}, {r.mode})" for r in differ.itertuples())
    if len(known) < len(t):
        compared += f"; {len(t) - len(known)} pair(s) not comparable"
    return (f"{compared}. Staged minus control: PPL {t.ppl_diff_pct.min():+.2f} % to "
            f"{t.ppl_diff_pct.max():+.2f} %, prune events {int((t.prunes_staged - t.prunes_control).min()):+d} to "
            f"{int((t.prunes_staged - t.prunes_control).max()):+d}, TPOT {t.tpot_diff_pct.min():+.1f} % to "
            f"{t.tpot_diff_pct.max():+.1f} %.")


def slack_figure(t: pd.DataFrame, axes, sns) -> None:
    long = pd.concat([
        t.assign(arm="control (δ=0)", prunes=t.prunes_control, dppl=t.delta_ppl_control),
        t.assign(arm="staged (δ=" + t.max_drop.astype(str) + ")", prunes=t.prunes_staged, dppl=t.delta_ppl_staged),
    ])
    long["arm"] = long.arm + ", " + long["mode"]
    sns.lineplot(data=long, x="cache_slack", y="prunes", hue="arm", marker="o", ax=axes[0])
    sns.lineplot(data=long, x="cache_slack", y="dppl", hue="arm", marker="o", ax=axes[1], legend=False)
    axes[0].set_ylabel("prune events")
    axes[1].set_ylabel("Δ PPL vs baseline (%)")
    for ax in axes:
        ax.set_xlabel("σ (cache_slack; window derived by Auto-cap)")
