"""The report's figures (seaborn): Pareto, NLL traces, ablations, softlite heatmaps, spike curves, probes.

Each function draws one figure from the pipeline summary (or a probe's table) and saves it; matplotlib is
imported when a figure is drawn, so the tables load without it.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from streamkv.analysis import fmt
from streamkv.analysis.summary import ROW_GROUPS
from streamkv.jobio import atomic_path
from streamkv.probes import PROBES, STREAM_PROBES
from streamkv.probes.common import log2_axis


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


# The zoom panel's half-height in ΔPPL %: the streaming rows (strict, lazy, sweep points) land within a few
# percent of the reference, while no-sink windows and original-position rows are tens to hundreds of percent off
# and would flatten them on one scale.
ZOOM_PCT = 5.0
# Key entries per column before the key starts another (at its 6 pt font about 40 lines fill the panel's height),
# and the characters an entry is wrapped at.
KEY_LINES = 40
KEY_WIDTH = 46


def _pareto_rank(group: str) -> int:
    """Where a row's group comes in the Pareto numbering: baseline, methods, peers, ablations, probes."""
    if group == "baseline":
        return 0
    if group in ROW_GROUPS:
        return 1 + ROW_GROUPS.index(group)
    return 3 if group.startswith("ablation:") else 4 if group.startswith("probe:") else 5


def _pareto_points(part: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The points the Pareto figure draws, numbered, with `x`, `y` and their intervals; and the x axis label.

    A point is a finished row with a ΔPPL against the reference and an x. A run that fills several rows is drawn
    once, under its first row in the numbering order (baseline, methods, peers by `order`, then each ablation
    and each probe in the frame's order), so a sweep point that repeats a method row keeps the method's name.
    Missing columns (older summaries) count as NaN.
    """
    ok = part[part.status == "ok"].copy()
    for col in ("delta_ref_pct", "delta_ref_lo", "delta_ref_hi", "tpot_ratio", "tpot_ratio_lo", "tpot_ratio_hi",
                "tpot_ms", "order"):
        ok[col] = pd.to_numeric(ok[col], errors="coerce") if col in ok else float("nan")
    # the ratio to the no-eviction reference timed beside each row (the drift between jobs cancels); a summary
    # from before the interleaved timing has only the TPOT, with no interval
    relative = bool(ok.tpot_ratio.notna().any())
    x, lo, hi = ("tpot_ratio", "tpot_ratio_lo", "tpot_ratio_hi") if relative else ("tpot_ms", None, None)
    nan = float("nan")
    ok = ok.assign(x=ok[x], x_lo=ok[lo] if lo else nan, x_hi=ok[hi] if hi else nan,
                   y=ok.delta_ref_pct, y_lo=ok.delta_ref_lo, y_hi=ok.delta_ref_hi)
    ok = ok[ok.x.notna() & ok.y.notna()]
    groups = list(dict.fromkeys(ok.group))
    ok = ok.assign(rank=ok.group.map(_pareto_rank), group_at=ok.group.map(groups.index))
    ok = ok.sort_values(["rank", "group_at", "order"], kind="stable").drop_duplicates("file")
    prefixed = ok.group.str.contains(":")
    ok["kind"] = ok.group.str.split(":").str[-1]
    ok["key"] = [f"{g.partition(':')[2]}: {fmt.short(n)}" if p else fmt.short(n)
                 for g, n, p in zip(ok.group, ok.name, prefixed)]
    ok.insert(0, "number", range(1, len(ok) + 1))
    label = "TPOT / no-eviction reference (×)" if relative else "TPOT (ms)"
    return ok.reset_index(drop=True), label


def pareto_numbers(part: pd.DataFrame) -> pd.DataFrame:
    """The Pareto figure's key: `number`, `name` (as the key writes it: `<sweep>: <point>` for a sweep's row)
    and `file` of every drawn point, in the figure's numbering."""
    points, _ = _pareto_points(part)
    return points[["number", "key", "file"]].rename(columns={"key": "name"})


def _bars(ax, data: pd.DataFrame) -> None:
    """The points' 95 % intervals, ΔPPL upright and the step-time ratio across, light grey behind the markers."""
    for value, lo, hi, axis in (("y", "y_lo", "y_hi", "yerr"), ("x", "x_lo", "x_hi", "xerr")):
        has = data[data[lo].notna() & data[hi].notna()]
        if len(has):
            # (clipped at 0: a point estimate just outside its bootstrap interval must not break the bar)
            err = [(has[value] - has[lo]).clip(lower=0), (has[hi] - has[value]).clip(lower=0)]
            ax.errorbar(has.x, has.y, fmt="none", ecolor="lightgrey", elinewidth=0.9, capsize=1.5, zorder=1,
                        **{axis: err})


def _number(ax, data: pd.DataFrame) -> None:
    """Each point's number beside its marker, pushed apart (adjustText) where points crowd, a thin line back."""
    import matplotlib.patheffects as pe
    from adjustText import adjust_text

    halo = [pe.withStroke(linewidth=1.5, foreground="white")]
    texts = [ax.text(r.x, r.y, str(r.number), fontsize=6, ha="center", va="center", zorder=3, path_effects=halo)
             for r in data.itertuples()]
    if texts:
        # a fixed number of iterations rather than adjustText's default time limit: the same summary gives the
        # same figure on any machine
        adjust_text(texts, x=list(data.x), y=list(data.y), ax=ax, iter_lim=300, expand=(1.4, 1.6), min_arrow_len=3,
                    force_static=(0.3, 0.4), arrowprops={"arrowstyle": "-", "color": "dimgrey", "lw": 0.5})


def _key_columns(points: pd.DataFrame) -> list[list[tuple[str, str]]]:
    """The key's entries, (`number  name` wrapped at KEY_WIDTH, kind), split into columns of at most KEY_LINES
    lines, an entry never split between two."""
    import textwrap

    entries = [("\n".join(textwrap.wrap(f"{r.number:>2}  {r.key}", KEY_WIDTH, subsequent_indent="    ")), r.kind)
               for r in points.itertuples()]
    lines = sum(text.count("\n") + 1 for text, _ in entries)
    per_column = -(-lines // max(1, -(-lines // KEY_LINES)))  # columns of even length
    columns, used = [[]], 0
    for text, kind in entries:
        height = text.count("\n") + 1
        if used and used + height > per_column:
            columns.append([])
            used = 0
        columns[-1].append((text, kind))
        used += height
    return [column for column in columns if column]


def _key(ax, columns: list, colours: dict) -> None:
    """The key in the kinds' colours, packed by its rendered size (offsetbox), so columns never run into each other."""
    from matplotlib.offsetbox import AnchoredOffsetbox, HPacker, TextArea, VPacker

    ax.axis("off")
    if not columns:
        return
    style = {"family": "monospace", "fontsize": 6}
    packed = HPacker(children=[VPacker(children=[TextArea(text, textprops={**style, "color": colours[kind]})
                                                 for text, kind in column], align="left", pad=0, sep=1.5)
                               for column in columns], align="top", pad=0, sep=10)
    ax.add_artist(AnchoredOffsetbox("upper left", child=packed, pad=0, borderpad=0, frameon=False,
                                    bbox_to_anchor=(0, 1), bbox_transform=ax.transAxes))


def _log_x(ax, label: str) -> None:
    """A log x axis labelled in plain numbers, once the axis has its limits.

    Over a factor of 4 or more, ticks at powers of two (×0.5, ×1, ×2: the unlabelled minor ticks at 0.8 and
    0.9 would run into the 1); over less, every minor tick labelled (the powers would leave one label or none);
    under a factor of 2, evenly spaced ticks (no minor tick of the log scale but 1 falls in a span of 1 to 1.2).
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    wide = hi / lo >= 4
    ax.xaxis.set_major_formatter(plain)
    ax.set_xlabel(f"{label}, log scale")
    if hi / lo < 2:
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.xaxis.set_minor_locator(NullLocator())
        return
    ax.xaxis.set_major_locator(LogLocator(base=2 if wide else 10))
    ax.xaxis.set_minor_locator(LogLocator(base=10, subs=range(1, 10)))
    ax.xaxis.set_minor_formatter(NullFormatter() if wide else plain)
    ax.tick_params(axis="x", which="minor", labelsize=6)


def pareto_figure(part: pd.DataFrame, path: str | Path, title: str) -> None:
    """Step time against ΔPPL (both with their 95 % intervals) of every finished configuration; lower left is better.

    ΔPPL is against the full-coverage reference row; the x axis is a row's step time over the no-eviction
    reference it was timed beside, where the rows have one, else its TPOT in ms. Left: every point (x on a log
    scale); right: the streaming points within ±ZOOM_PCT % of the reference. Each point carries a number (names would
    overlap where the streaming rows crowd); the key on the right gives each number's row (`pareto_numbers`).
    """
    plt, sns = _plt()
    points, x_label = _pareto_points(part)
    # (a summary without a configured reference names it "")
    names = part.reference.dropna().astype(str).str.strip() if "reference" in part else pd.Series(dtype=str)
    ref = names[names != ""].iloc[0] if (names != "").any() else "reference"
    kinds = list(dict.fromkeys(points.kind))
    # deep's ten colours, else as many distinct hues (deep would repeat its colours past ten)
    colours = dict(zip(kinds, sns.color_palette("deep" if len(kinds) <= 10 else "husl", len(kinds))))
    columns = _key_columns(points)
    # the key's width in inches: a 6 pt monospace character is 0.05 in wide, and a column gap 0.15 in; the axis
    # is given a fifth more, the share of the figure's width the margins and gaps between axes take
    key_width = 1.2 * sum(max((len(line) for text, _ in column for line in text.split("\n")), default=0) * 0.05
                          + 0.15 for column in columns)
    fig, (full, zoom, key) = plt.subplots(1, 3, figsize=(11 + key_width, 7.5), width_ratios=(5, 6, key_width))
    # the zoom holds the streaming configurations: the recompute baseline, several times slower than any of them,
    # would stretch its x axis until they crowd into one column
    near = points[(points.y.abs() <= ZOOM_PCT) & (points.group != "baseline")]
    far = points.drop(near.index)
    for ax, data in ((full, points), (zoom, near)):
        if len(data):
            _bars(ax, data)
            sns.scatterplot(data=data, x="x", y="y", hue="kind", style="kind", hue_order=kinds, style_order=kinds,
                            palette=colours, s=28, ax=ax, legend=ax is full, zorder=2, edgecolor="white",
                            linewidth=0.4)
        ax.axhline(0, color="black", lw=0.6, zorder=0)
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"Δ PPL vs {ref} (%)")
    if len(points):
        _log_x(full, x_label)
        full.legend(fontsize=6, title=None, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                    ncol=min(4, len(kinds)), frameon=False)
        # the zoomed band, numbered in the right panel
        full.axhspan(-ZOOM_PCT, ZOOM_PCT, color="tab:blue", alpha=0.07, lw=0, zorder=0)
    if len(near):
        # limits from the points, not their bars: a wide interval would otherwise flatten the crowd it zooms
        # into; and from all of them, not a percentile range: a point off the axes would lose its number
        spread = (near.x.max() / near.x.min()) ** 0.05 * 1.01
        zoom.set_xlim(near.x.min() / spread, near.x.max() * spread)
        pad = max((near.y.max() - near.y.min()) * 0.06, 0.1)
        zoom.set_ylim(near.y.min() - pad, near.y.max() + pad)
        _log_x(zoom, x_label)
    else:
        zoom.text(0.5, 0.5, f"no point within ±{ZOOM_PCT:g} %", transform=zoom.transAxes, ha="center")
    full.set_title(f"every point (shaded: ±{ZOOM_PCT:g} %, numbered on the right)", fontsize=9)
    zoom.set_title(f"within ±{ZOOM_PCT:g} % of {ref}", fontsize=9)
    _key(key, columns, colours)
    key.set_title("key", fontsize=9, loc="left")
    # numbers placed last, once every axis has its final limits (adjustText moves them in display space)
    fig.suptitle(title)
    fig.tight_layout()
    _number(full, far)
    _number(zoom, near)
    _save(fig, path)


def nll_trace_figure(baseline: pd.DataFrame, run: pd.DataFrame | None, run_name: str, path: str | Path,
                     title: str, smooth: int = 16, anchor: str = "baseline (recompute)") -> None:
    """Per-token NLL (rolling mean) of the anchor (`baseline`: the full-coverage reference, or the recompute
    baseline) and one run, and the run's excess NLL over it; prune events as lines."""
    plt, sns = _plt()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5), sharex=True, height_ratios=(2, 1))
    curves = [(anchor, baseline)] + ([(run_name, run)] if run is not None and len(run) else [])
    for name, trace in curves:
        top.plot(trace.position, trace.nll.rolling(smooth, min_periods=1).mean(), label=name, lw=1)
    top.set_ylabel(f"NLL (rolling mean, {smooth})")
    top.legend(loc="upper right", fontsize=8)
    if run is not None and len(run):
        excess = (run.set_index("position").nll  # on the targets both scored
                  - baseline.set_index("position").nll).dropna().rolling(smooth, min_periods=1).mean()
        bottom.plot(excess.index, excess.values, color="C1", lw=1)
        for pos in run.loc[run.pruned.astype(bool), "position"]:
            for ax in (top, bottom):
                ax.axvline(pos, color="tab:red", alpha=0.3, lw=0.7, zorder=0)
    bottom.axhline(0, color="black", lw=0.6)
    bottom.set_ylabel(f"excess NLL over\n{anchor.split(' (')[0]}")
    bottom.set_xlabel("position (red lines: prune events)")
    top.set_title(title)
    _save(fig, path)


def _lines(ax, data, x, y, hue=None, label=None):
    import seaborn as sns

    # (a label beside a hue: seaborn passes both to its legend entries, which refuse two labels)
    extra = {"label": label} if hue is None and label is not None else {}
    sns.lineplot(data=data, x=x, y=y, hue=hue, marker="o", ax=ax, **extra)


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
    cols = [c for c in ("compress_every", "sink", "sink_layers", "cache_slack", "max_drop", "softlite_mode", "overlap",
                        "refresh", "weights")
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


def spike_curve_figure(curves: pd.DataFrame, names: dict, path: str | Path, title: str,
                       reference: str | None = None) -> None:
    """Mean excess NLL against steps since the latest prune, one line per run: over the full-coverage reference
    (left) and over the dense row (right), each on the targets both scored."""
    plt, sns = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    against = curves.against if "against" in curves else pd.Series("reference", index=curves.index)
    for ax, which, label in ((axes[0], "reference", reference or "the reference"), (axes[1], "dense", "dense")):
        data = curves[curves.file.isin(list(names)) & (against == which)].copy()
        if len(data):
            data["run"] = data.file.map(names)
            sns.lineplot(data=data, x="since", y="mean", hue="run", ax=ax, lw=1.2)
        else:
            ax.text(0.5, 0.5, f"no run diagnosed against {label}", ha="center", va="center", transform=ax.transAxes)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("steps since the latest prune (0 = the prune step)")
        ax.set_ylabel(f"mean excess NLL over {label} (nats)")
    fig.suptitle(title)
    _save(fig, path)


def probe_figure(probe: str, table: pd.DataFrame, path: str | Path, title: str) -> None:
    """One figure per probe, drawn from its table by the probe's own function (two panels)."""
    _two_panels(PROBES[probe].figure, table, path, title)


def stream_probe_figure(probe: str, table: pd.DataFrame, path: str | Path, title: str) -> None:
    """The figure of a probe with streams of its own (STREAM_PROBES), two panels likewise."""
    _two_panels(STREAM_PROBES[probe].figure, table, path, title)


def _two_panels(draw, table: pd.DataFrame, path: str | Path, title: str) -> None:
    plt, sns = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    if len(table):
        draw(table.copy(), axes, sns)
    fig.suptitle(title)
    _save(fig, path)
