"""The report's figures (seaborn): Pareto, NLL traces, ablations, softlite heatmaps, spike curves, probes.

Each function draws one figure from the pipeline summary (or a probe's table) and saves it; matplotlib is
imported when a figure is drawn, so the tables load without it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import fmt
from .jobio import atomic_path
from .probes import PROBES, log2_axis
from .summary import ROW_GROUPS


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def _save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130)
    plt.close(fig)


def spike_runs(part: pd.DataFrame) -> dict:
    """The runs the spike figure draws, {file: label}: the K sweep (lazy runs), else the method rows that prune."""
    ok = part[(part.status == "ok") & (part.n_prunes > 0)]
    sweep = ok[ok.group.isin(["probe:summarize_k_quality", "ablation:compress_every"]) & (ok.compress_every > 1)]
    if len(sweep):
        sweep = sweep.drop_duplicates("file").sort_values("compress_every")
        return {r.file: f"K={int(r.compress_every)}" for r in sweep.itertuples()}
    rows = ok[ok.group == "methods"].drop_duplicates("file")
    return {r.file: r.name for r in rows.itertuples()}


def pareto_figure(part: pd.DataFrame, path: str | Path, title: str) -> None:
    """TPOT vs delta PPL (with its interval) for every configuration that finished; lower left is better.

    Left: every configuration and the baseline.  Right: the streaming configurations within a few
    percent of the baseline's PPL, where most of them crowd, on a linear scale.  The x axis is a row's
    TPOT over the no-eviction reference it was timed with (the drift between jobs cancels), where every
    row has one; else its TPOT in ms.
    """
    plt, sns = _plt()
    ok = part[(part.status == "ok") & part.delta_ppl_pct.notna()].copy()
    relative = "tpot_ratio" in ok and ok.tpot_ratio.notna().all() and len(ok)
    ok["x"] = ok.tpot_ratio if relative else ok.tpot_ms
    x_label = "TPOT / no-eviction reference (×)" if relative else "TPOT (ms)"
    for col in ("delta_ppl_lo", "delta_ppl_hi"):
        if col not in ok:
            ok[col] = float("nan")
    # a run that fills several rows (a method row repeated by an ablation or probe) is drawn once,
    # under its most prominent name: method table, then ablations, then probes
    rank = ok.group.map(lambda g: 0 if g == "baseline" or g in ROW_GROUPS else (1 if g.startswith("ablation:") else 2))
    ok = ok.assign(rank=rank).sort_values(["rank", "order"], kind="stable").drop_duplicates("file")
    ok["kind"] = ok.group.map(lambda g: g if g == "baseline" or g in ROW_GROUPS else g.replace(":", " "))
    ok["short"] = [fmt.short(row.name) for row in ok.itertuples()]
    kinds = list(dict.fromkeys(ok.kind))
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=(1, 1.3))
    near = ok[(ok.group != "baseline") & (ok.delta_ppl_pct.abs() <= ZOOM_PCT)]
    texts = {full: [], zoom: []}
    for ax, data, labels in ((full, ok, ok[ok["rank"] == 0]), (zoom, near, near)):
        if not len(data):
            continue
        bars = data[data.delta_ppl_lo.notna()]
        ax.errorbar(bars.x, bars.delta_ppl_pct, yerr=[bars.delta_ppl_pct - bars.delta_ppl_lo,
                                                       bars.delta_ppl_hi - bars.delta_ppl_pct],
                    fmt="none", ecolor="grey", elinewidth=0.8, alpha=0.6, zorder=1)
        sns.scatterplot(data=data, x="x", y="delta_ppl_pct", hue="kind", style="kind", hue_order=kinds,
                        style_order=kinds, s=55, ax=ax, legend=ax is full, zorder=2)
        for row in labels.itertuples():
            texts[ax].append(ax.text(row.x, row.delta_ppl_pct, row.short, fontsize=7 if row.rank == 0 else 5.5,
                                     alpha=1 if row.rank == 0 else 0.75))
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel(x_label)
        ax.set_ylabel("Δ PPL vs baseline (%)")
    if len(ok):
        from matplotlib.ticker import ScalarFormatter

        full.set_xscale("log")
        full.xaxis.set_major_formatter(ScalarFormatter())
        full.xaxis.set_minor_formatter(ScalarFormatter())
        full.tick_params(axis="x", which="minor", labelsize=6)
        full.set_xlabel(f"{x_label}, log scale")
        full.legend(fontsize=7, loc="best")
    full.set_title("every configuration (labels: the method table)")
    zoom.set_title(f"streaming configurations within ±{ZOOM_PCT:g} % of the baseline PPL (every label)")
    # labels moved apart (adjustText) once the axes have their final scales, each tied to its point by a line
    from adjustText import adjust_text

    for ax, ax_texts in texts.items():
        if ax_texts:
            adjust_text(ax_texts, ax=ax, arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    fig.suptitle(title)
    _save(fig, path)


ZOOM_PCT = 5.0


def nll_trace_figure(baseline: pd.DataFrame, run: pd.DataFrame | None, run_name: str, path: str | Path,
                     title: str, smooth: int = 16) -> None:
    """Per-token NLL (rolling mean) of the baseline and one run, and the run's excess NLL; prune events as lines."""
    plt, sns = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, height_ratios=(2, 1))
    curves = [("baseline (recompute)", baseline)] + ([(run_name, run)] if run is not None and len(run) else [])
    for name, trace in curves:
        top.plot(trace.position, trace.nll.rolling(smooth, min_periods=1).mean(), label=name, lw=1)
    top.set_ylabel(f"NLL (rolling mean, {smooth})")
    top.legend(loc="upper right", fontsize=8)
    if run is not None and len(run):
        excess = (run.set_index("position").nll
                  - baseline.set_index("position").nll).rolling(smooth, min_periods=1).mean()
        bottom.plot(excess.index, excess.values, color="C1", lw=1)
        for pos in run.loc[run.pruned.astype(bool), "position"]:
            for ax in (top, bottom):
                ax.axvline(pos, color="tab:red", alpha=0.3, lw=0.7, zorder=0)
    bottom.axhline(0, color="black", lw=0.6)
    bottom.set_ylabel("excess NLL")
    bottom.set_xlabel("position (red lines: prune events)")
    top.set_title(title)
    _save(fig, path)


def _lines(ax, data, x, y, hue=None, label=None):
    import seaborn as sns

    sns.lineplot(data=data, x=x, y=y, hue=hue, marker="o", ax=ax, label=label if hue is None else None)


def ablation_figure(part: pd.DataFrame, key: str, path: str | Path, title: str) -> None:
    """An ablation: delta PPL and speedup against the swept value (one line per other swept parameter)."""
    plt, sns = _plt()
    ok = part[part.status == "ok"].drop_duplicates("file").copy()
    swept = _swept(ok)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    if len(ok) and swept:
        x, hue = swept[0], (swept[1] if len(swept) > 1 else None)
        if len(swept) > 2:  # a grid of three or more: one line per combination of the others
            ok["combo"] = ok[swept[1:]].astype(str).agg(
                lambda r: ", ".join(f"{fmt.SYMBOL.get(c, c)}={v}" for c, v in zip(swept[1:], r)), axis=1)
            hue = "combo"
        for ax, y, label in ((axes[0], "delta_ppl_pct", "Δ PPL vs baseline (%)"), (axes[1], "speedup", "speedup (×)")):
            # (named values, e.g. weights variants, in the config's order)
            _lines(ax, ok.sort_values(x if ok[x].dtype.kind in "iufb" else "order"), x, y, hue)
            ax.set_xlabel(fmt.SYMBOL.get(x, x))
            ax.set_ylabel(label)
            if ok[x].dtype.kind in "iu" and ok[x].min() > 0 and ok[x].max() / ok[x].min() >= 8:
                log2_axis(ax)
    fig.suptitle(title)
    _save(fig, path)


def _swept(ok: pd.DataFrame) -> list[str]:
    """Run parameters that vary among the rows, most values first."""
    cols = [c for c in ("compress_every", "sink", "cache_slack", "max_drop", "softlite_mode", "overlap", "refresh",
                        "weights")
            if c in ok and ok[c].nunique() > 1]
    return sorted(cols, key=lambda c: -ok[c].nunique())


def softlite_heatmap(part: pd.DataFrame, path: str | Path, title: str) -> None:
    """Softlite grid: one heatmap of delta PPL per K over sigma x delta, cells annotated with the speedup."""
    plt, sns = _plt()
    ok = part[part.status == "ok"].drop_duplicates("file")
    ks = sorted(ok.compress_every.unique()) if len(ok) else []
    fig, axes = plt.subplots(1, max(1, len(ks)), figsize=(4.2 * max(1, len(ks)), 3.6), squeeze=False)
    for ax, k in zip(axes[0], ks):
        cell = ok[ok.compress_every == k]
        dppl = cell.pivot_table(index="cache_slack", columns="max_drop", values="delta_ppl_pct")
        speed = cell.pivot_table(index="cache_slack", columns="max_drop", values="speedup")
        notes = dppl.map(lambda v: f"{v:+.2f}%") + "\n" + speed.map(lambda v: f"{v:.2f}×")
        sns.heatmap(dppl, annot=notes, fmt="", cmap="RdYlGn_r", center=0, cbar=False, ax=ax, annot_kws={"fontsize": 8})
        ax.set_title(f"K={k}: Δ PPL % / speedup")
        ax.set_xlabel("δ (max_drop)")
        ax.set_ylabel("σ (cache_slack)")
    fig.suptitle(title)
    _save(fig, path)


def spike_curve_figure(curves: pd.DataFrame, names: dict, path: str | Path, title: str) -> None:
    """Mean excess NLL over the baseline against steps since the latest prune, one line per run."""
    plt, sns = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    data = curves[curves.file.isin(list(names))].copy()
    if len(data):
        data["run"] = data.file.map(names)
        sns.lineplot(data=data, x="since", y="mean", hue="run", ax=ax, lw=1.2)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("steps since the latest prune (0 = the prune step)")
    ax.set_ylabel("mean excess NLL (nats)")
    ax.set_title(title)
    _save(fig, path)


def probe_figure(probe: str, table: pd.DataFrame, path: str | Path, title: str) -> None:
    """One figure per probe, drawn from its table by the probe's own function (two panels)."""
    plt, sns = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    if len(table):
        PROBES[probe].figure(table.copy(), axes, sns)
    fig.suptitle(title)
    _save(fig, path)
