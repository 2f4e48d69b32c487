"""The probes: controlled comparisons read off the pipeline summary, one table (and one finding) each.

Every function takes the summary rows of one (model, text) and probe group,
plus the per-event spike table, and returns a frame with one row per point of
the probe's grid.  Nothing is re-run here: a probe is a view of runs the
pipeline already made under its own parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from . import fmt
from .fmt import to_markdown

QUALITY = ["ppl", "delta_ppl_pct", "tpot_ms", "speedup", "spike_events", "spike_peak", "spike_width", "spike_area"]


def _drops(events: pd.DataFrame, file: str) -> list[int]:
    return events.loc[events.file == file, "dropped"].astype(int).tolist() if len(events) else []


def dropped_tokens(events: pd.DataFrame, row) -> dict[int, tuple[int, int]] | None:
    """Which tokens a run dropped where: decode position -> [first, end) of the token positions dropped there.

    A prune drops the oldest tokens after the `sink` first (`policy.Policy`), so the prune steps and sizes fix
    the tokens: the i-th token dropped is token sink + i.  Position -1 stands for the prefill's prune (the
    spike events hold the decode steps only; the prefill's drops are the rest of `tokens_dropped`).  None where
    that does not determine them: a method whose layout is not Start+Recent's (refresh re-inserts evicted
    tokens, a peer picks its own), or prune events that do not account for every prune of the run.
    """
    from .methods import REGISTRY

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
    return (pd.DataFrame(rows).sort_values(["cache_slack", "mode", "max_drop"]).reset_index(drop=True) if rows
            else pd.DataFrame())


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


# ----------------------------------------------------------------------------- findings (numbers only)


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
            f"{_position(r.first_difference)} (σ={r.cache_slack}, {r.mode})" for r in differ.itertuples())
    if len(known) < len(t):
        compared += f"; {len(t) - len(known)} pair(s) not comparable"
    return (f"{compared}. Staged minus control: PPL {t.ppl_diff_pct.min():+.2f} % to "
            f"{t.ppl_diff_pct.max():+.2f} %, prune events {int((t.prunes_staged - t.prunes_control).min()):+d} to "
            f"{int((t.prunes_staged - t.prunes_control).max()):+d}, TPOT {t.tpot_diff_pct.min():+.1f} % to "
            f"{t.tpot_diff_pct.max():+.1f} %.")


def _position(p) -> str:
    return "the prefill" if p == -1 else f"position {int(p)}"


def prune_overhead_finding(t: pd.DataFrame) -> str:
    first, last = t.iloc[0], t.iloc[-1]
    costs = t.prune_cost_ms.dropna()
    spread = f"{costs.min():+.2f} to {costs.max():+.2f} ms" if len(costs) else "– (no step of each kind)"
    return (f"The cache update of a prune step minus that of a step without one: {spread}. The update takes "
            f"{fmt.num(first.update_share_pct)} % of the step at K={int(first.compress_every)} and "
            f"{fmt.num(last.update_share_pct)} % at K={int(last.compress_every)}; "
            f"TPOT goes from {first.tpot_ms:.1f} to {last.tpot_ms:.1f} ms.")


def k_quality_finding(t: pd.DataFrame) -> str:
    first, last = t.iloc[0], t.iloc[-1]
    return (f"From K={int(first.compress_every)} to K={int(last.compress_every)}: ΔPPL {fmt.pct(first.delta_ppl_pct)} "
            f"→ {fmt.pct(last.delta_ppl_pct)}, speedup {first.speedup:.2f}× → {last.speedup:.2f}×, "
            f"KV max {int(first.kv_len_max)} → {int(last.kv_len_max)}.")


# ----------------------------------------------------------------------------- figures (two panels each)


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


def k_quality_figure(t: pd.DataFrame, axes, sns) -> None:
    sns.lineplot(data=t, x="compress_every", y="delta_ppl_pct", marker="o", ax=axes[0])
    axes[0].set_ylabel("Δ PPL vs baseline (%)")
    sns.lineplot(data=t, x="compress_every", y="speedup", marker="o", ax=axes[1])
    axes[1].set_ylabel("speedup (×)")
    for ax in axes:
        log2_axis(ax)
        ax.set_xlabel("K")


def log2_axis(ax) -> None:
    """A log-2 x axis labelled with plain numbers (K = 1, 2, 4, ...)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Probe:
    """One probe: the parameters its grid must sweep, its table, its one-line finding and its figure."""

    name: str
    sweeps: tuple[str, ...]  # it compares rows that differ in these parameters
    title: str
    table: Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]  # (its summary rows, spike events) -> table
    finding: Callable[[pd.DataFrame], str]  # table -> numbers in a sentence or two
    figure: Callable  # (table, two axes, seaborn) -> None


PROBES: dict[str, Probe] = {p.name: p for p in (
    Probe("verify_max_drop_effect", ("max_drop",),
          "verify_max_drop_effect: delta on/off, naive and cooldown, at fixed K and sigma",
          max_drop_effect, max_drop_finding, max_drop_figure),
    Probe("verify_slack_effect", ("cache_slack", "max_drop"),
          "verify_slack_effect: sigma swept (window derived), control delta = 0 vs staged delta > 0",
          slack_effect, slack_finding, slack_figure),
    Probe("profile_prune_overhead", ("compress_every",),
          "profile_prune_overhead: forward vs cache update per decode step, against K",
          lambda part, events: prune_overhead(part), prune_overhead_finding, prune_overhead_figure),
    Probe("summarize_k_quality", ("compress_every",), "summarize_k_quality: quality and speed against K",
          lambda part, events: k_quality(part), k_quality_finding, k_quality_figure),
)}


def finding(probe: str, table: pd.DataFrame) -> str:
    """The probe's result in one or two sentences, numbers only (no verdict the numbers do not carry)."""
    return PROBES[probe].finding(table) if len(table) else "No finished runs."


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


def probe_table(probe: str, summary: pd.DataFrame, events: pd.DataFrame, model: str, text: str) -> pd.DataFrame:
    part = summary[(summary.group == f"probe:{probe}") & (summary.model_key == model) & (summary.text_key == text)]
    part = part.drop_duplicates("file")
    if "against" in events:  # every run's prune events, once: those of its diagnosis against the reference
        events = events[events.against == "reference"]
    return PROBES[probe].table(part, events)
