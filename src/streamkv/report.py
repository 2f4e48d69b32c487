"""The paper report: markdown tables (jinja2) and figures (seaborn) from the pipeline summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .pipeline import max_tokens, text_source

FAILED = "FAILED"


def configuration(row) -> str:
    """The parameters that define a row, in the seeds' notation."""
    if row.method == "dense":
        return "full cache"
    parts = [f"S={_count(row.sink)}", f"W={_count(row.window)}"]
    if row.method in ("start_recent", "window") and row.compress_every != 1:
        parts.append(f"K={_count(row.compress_every)}")
    if row.cache_slack:
        parts.append(f"σ={_count(row.cache_slack)}")
    if row.max_drop:
        parts.append(f"δ={_count(row.max_drop)}")
    return ", ".join(parts)


def _count(value) -> str:
    return "?" if value is None or (isinstance(value, float) and not math.isfinite(value)) else str(int(value))


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def table_rows(frame: pd.DataFrame) -> list[dict]:
    rows = []
    for row in frame.itertuples(index=False):
        ok = row.status == "ok"
        rows.append({
            "name": row.name, "method": row.method, "configuration": configuration(row), "status": row.status,
            "ppl": _fmt(row.ppl, 3) if ok else FAILED,
            "delta_ppl": (f"{row.delta_ppl_pct:+.2f}" if ok and row.group != "baseline" else ("0" if ok else "–")),
            "tpot": _fmt(row.tpot_ms) if ok else "–",
            "tpot_steady": _fmt(row.tpot_steady_ms) if ok else "–",
            "speedup": f"{row.speedup:.2f}×" if ok and math.isfinite(row.speedup) else "–",
            "kv": f"{int(row.kv_len_min)} / {row.kv_len_mean:.1f} / {int(row.kv_len_max)}" if ok else "–",
            "kv_mib": _fmt(row.kv_bytes_peak / 2**20) if ok else "–",
            "prunes": f"{int(row.n_prunes)} / {int(row.tokens_dropped)}" if ok else "–",
            "error": row.error if not ok else "",
            "value": row.name.split("=", 1)[-1],
        })
    return rows


def sections(frame: pd.DataFrame, config: dict) -> list[dict]:
    """One section per (model, text): the method table and each ablation table."""
    out = []
    for (model_key, text_key), part in frame.groupby(["model_key", "text_key"], sort=False):
        methods = part[part.group.isin(["baseline", "methods"])]
        ablations = []
        for group, ab in part[part.group.str.startswith("ablation:")].groupby("group", sort=False):
            ablations.append({"param": group.split(":", 1)[1], "rows": table_rows(ab.sort_values("order"))})
        out.append({"model_key": model_key, "text_key": text_key, "model": config["models"][model_key],
                    "text": text_source(config, text_key), "max_tokens": max_tokens(config, text_key), "methods": table_rows(methods), "ablations": ablations,
                    "figures": {"pareto": f"figures/{model_key}/{text_key}/pareto.png",
                                "nll_trace": f"figures/{model_key}/{text_key}/nll_trace.png"}})
    return out


def provenance(frame: pd.DataFrame) -> dict:
    ok = frame[frame.status == "ok"]
    src = ok if len(ok) else frame

    def distinct(col):
        return sorted({str(v) for v in src[col].dropna()}) if col in src else []

    return {"commits": distinct("meta_git_commit"), "code_hashes": distinct("meta_code_hash"),
            "devices": distinct("meta_device"), "dtypes": distinct("meta_dtype"), "threads": distinct("meta_threads"),
            "tf32": distinct("meta_tf32"), "pythons": distinct("meta_python"),
            "versions": [json.loads(v) for v in distinct("meta_versions")],
            "first": min(distinct("meta_host_time"), default="–"), "last": max(distinct("meta_host_time"), default="–")}


def render(frame: pd.DataFrame, template: str | Path, config: dict) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(template).parent)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    failed = frame[frame.status != "ok"]
    return env.get_template(Path(template).name).render(
        protocol=config["protocol"], baseline=config["baseline"], sections=sections(frame, config),
        failed=[{"name": r.name, "text": r.text_key, "model": r.model_key, "error": r.error} for r in failed.itertuples()],
        meta=provenance(frame),
    )


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
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


_SYMBOL = {"compress_every": "K", "sink": "S", "cache_slack": "σ", "max_drop": "δ"}


def _short(name: str) -> str:
    """Ablation rows as `K=16`; method-table names as they are."""
    param, eq, value = name.partition("=")
    return f"{_SYMBOL.get(param, param)}={value}" if eq and param in _SYMBOL else name


def pareto_figure(part: pd.DataFrame, path: str | Path, title: str) -> None:
    """TPOT vs delta PPL for every configuration that finished; lower left is better."""
    plt, sns = _plt()
    from matplotlib.ticker import ScalarFormatter

    ok = part[(part.status == "ok") & part.delta_ppl_pct.notna()].copy()
    # an ablation value that repeats a method-table row is the same job: draw it once, under the row's name
    ok = ok[ok.group.isin(["baseline", "methods"]) | ~ok.file.isin(ok.loc[ok.group == "methods", "file"])]
    ok = ok.drop_duplicates(subset=["group", "file"])
    ok["kind"] = ok.group.map(lambda g: "baseline" if g == "baseline" else ("method" if g == "methods" else g.split(":")[1] + " ablation"))
    ok["short"] = [_short(row.name) for row in ok.itertuples()]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(ok):
        sns.scatterplot(data=ok, x="tpot_ms", y="delta_ppl_pct", hue="kind", style="kind", s=70, ax=ax)
        for row in ok.itertuples():
            ax.annotate(row.short, (row.tpot_ms, row.delta_ppl_pct), textcoords="offset points", xytext=(4, 3), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(ScalarFormatter())
        ax.tick_params(axis="x", which="minor", labelsize=6)
    ax.set_xlabel("TPOT (ms, log scale)")
    ax.set_ylabel("Δ PPL vs baseline (%)")
    ax.set_title(title)
    _save(fig, path)


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
        excess = (run.set_index("position").nll - baseline.set_index("position").nll).rolling(smooth, min_periods=1).mean()
        bottom.plot(excess.index, excess.values, color="C1", lw=1)
        for pos in run.loc[run.pruned.astype(bool), "position"]:
            for ax in (top, bottom):
                ax.axvline(pos, color="tab:red", alpha=0.3, lw=0.7, zorder=0)
    bottom.axhline(0, color="black", lw=0.6)
    bottom.set_ylabel("excess NLL")
    bottom.set_xlabel("position (red lines: prune events)")
    top.set_title(title)
    _save(fig, path)
