"""The paper report: markdown tables (jinja2) and figures (seaborn) from the pipeline summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .params import DENSE_METHODS, LAZY_METHODS, PEER_SETUP
from .pipeline import max_tokens, text_source
from .summary import to_markdown, trace_path

FAILED = "FAILED"
NOT_INSTALLED = "not_installed"  # the status of a peer row whose optional package is absent
ROW_GROUPS = ("methods", "peers")  # rows the config names itself (method table, peers): shown under their own names


def configuration(row) -> str:
    """The parameters that define a row, in the seeds' notation."""
    if row.method in DENSE_METHODS:
        return "full cache"
    parts = [f"S={_count(row.sink)}", f"W={_count(row.window)}"]
    if row.method in LAZY_METHODS and row.compress_every != 1:
        parts.append(f"K={_count(row.compress_every)}")
    if getattr(row, "positions", "cache") == "original":
        parts.append("original positions")
    if row.cache_slack:
        parts.append(f"σ={_count(row.cache_slack)}")
    if row.max_drop:
        parts.append(f"δ={_count(row.max_drop)}")
    if (row.cache_slack or row.max_drop) and getattr(row, "softlite_mode", "naive") == "cooldown":
        parts.append("cooldown")
    if getattr(row, "overlap", 0):
        parts.append(f"O={_count(row.overlap)}")
    if getattr(row, "refresh", 0):
        parts.append(f"R={_count(row.refresh)}")
    return ", ".join(parts)


def _count(value) -> str:
    return "?" if value is None or (isinstance(value, float) and not math.isfinite(value)) else str(int(value))


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _marked(row) -> str:
    """Emergency and forced prunes, where there were any."""
    marks = [f"{int(n)} {what}" for n, what in ((getattr(row, "n_emergency_prunes", 0), "emergency"),
                                                 (getattr(row, "n_forced_prunes", 0), "forced")) if n and n == n]
    return f" ({', '.join(marks)})" if marks else ""


def _interval(pct, lo, hi) -> str:
    """"+1.23 [+0.40, +2.05]", or the value alone where there is no interval."""
    if pct is None or not math.isfinite(pct):
        return "–"
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{pct:+.2f}"
    return f"{pct:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def table_rows(frame: pd.DataFrame, versus: dict | None = None) -> list[dict]:
    """Rows of a table; `versus`: row name -> its comparison with its control ("vs control" column)."""
    rows = []
    for row in frame.itertuples(index=False):
        ok = row.status == "ok"
        rows.append({
            "name": row.name, "method": row.method, "configuration": configuration(row), "status": row.status,
            "ppl": _fmt(row.ppl, 3) if ok else (_not_installed(row.method) if row.status == NOT_INSTALLED else FAILED),
            "delta_ppl": (_interval(row.delta_ppl_pct, getattr(row, "delta_ppl_lo", None),
                                    getattr(row, "delta_ppl_hi", None))
                          if ok and row.group != "baseline" else ("0" if ok else "–")),
            "n": _count(row.n_scored) if ok else "–",
            "evaluator": getattr(row, "evaluator", None) or "decode",
            "ratio": f"{row.tpot_ratio:.3f}" if ok and _finite(getattr(row, "tpot_ratio", None)) else "–",
            "versus": (versus or {}).get(row.name, "control" if versus is not None else ""),
            "tpot": _fmt(row.tpot_ms) if ok else "–",
            "tpot_steady": _fmt(row.tpot_steady_ms) if ok else "–",
            "speedup": f"{row.speedup:.2f}×" if ok and math.isfinite(row.speedup) else "–",
            "kv": f"{int(row.kv_len_min)} / {row.kv_len_mean:.1f} / {int(row.kv_len_max)}" if ok else "–",
            "kv_mib": _fmt(row.kv_bytes_peak / 2**20) if ok else "–",
            "prunes": (f"{int(row.n_prunes)} / {int(row.tokens_dropped)}" + _marked(row)) if ok else "–",
            "error": row.error if not ok else "",
            "value": _short(row.name),
        })
    return rows


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _not_installed(method: str) -> str:
    return f"not installed (install with `{PEER_SETUP[method.split(':', 1)[0]]}`)"


def sections(frame: pd.DataFrame, config: dict, probes_dir: str | Path = "results/probes",
             compared: pd.DataFrame | None = None) -> list[dict]:
    """One section per (model, text): method table, findings, ablations, probes, spike diagnosis, negative results.

    `compared`: the intervals of sweep points against their controls and of the findings (`summary.comparisons`).
    """
    out = []
    compared = compared if compared is not None else pd.DataFrame(columns=["model_key", "text_key", "kind", "group"])
    for (model_key, text_key), part in frame.groupby(["model_key", "text_key"], sort=False):
        here = compared[(compared.model_key == model_key) & (compared.text_key == text_key)]
        methods = part[part.group.isin(["baseline", "methods"])]
        ablations = []
        for group, ab in part[part.group.str.startswith("ablation:")].groupby("group", sort=False):
            key = group.split(":", 1)[1]
            ctl = here[(here.kind == "control") & (here.group == group)]
            versus = {r.a: f"{r.text} vs {r.b}" for r in ctl.itertuples()}
            ablations.append({"param": key, "rows": table_rows(ab.sort_values("order"), versus),
                              "figure": f"figures/{model_key}/{text_key}/ablation_{key}.png"})
        probes = []
        for probe in PROBE_TITLES:
            path = Path(probes_dir) / probe / model_key / f"{text_key}.csv"
            if (part.group == f"probe:{probe}").any() and path.exists():
                table = pd.read_csv(path) if path.stat().st_size > 1 else pd.DataFrame()
                probes.append({"name": probe, "title": PROBE_TITLES[probe], "table": probe_markdown(table),
                               "finding": probe_finding(probe, table),
                               "figure": f"figures/{model_key}/{text_key}/{probe}.png"})
        peers = part[part.group == "peers"]
        out.append({"model_key": model_key, "text_key": text_key, "model": config["models"][model_key],
                    "peers": table_rows(peers), "cross_checks": cross_checks(part, config),
                    "text": text_source(config, text_key), "max_tokens": max_tokens(config, text_key),
                    "methods": table_rows(methods), "ablations": ablations, "probes": probes,
                    "findings": findings(here[here.kind == "finding"]),
                    "spikes": spike_rows(part), "negative": negative_results(part),
                    "figures": {kind: f"figures/{model_key}/{text_key}/{kind}.png"
                                for kind in ("pareto", "nll_trace", "spikes")}})
    return out


def cross_checks(part: pd.DataFrame, config: dict) -> list[dict]:
    """Each peer row with a `cross_check` against the row it names: per-token NLL and PPL, side by side.

    A peer's `noise_floor` names another peer row whose own cross-check differs only in what the two
    implementations do anyway (llama.cpp dense against our dense, say): its PPL difference is shown beside.
    """
    checks = {}
    by_name = {r.name: r for r in part.itertuples() if r.group in ROW_GROUPS}
    for spec in config.get("peers") or []:
        peer, ours = by_name.get(spec["name"]), by_name.get(spec.get("cross_check"))
        if peer is None or ours is None:
            continue  # not run on this text, or no cross-check asked for
        check = {"peer": peer.name, "ours": ours.name, "max_dnll": "–", "mean_dnll": "–", "dppl": "–", "first": "–",
                 "floor": "–"}
        if peer.status == "ok" and ours.status == "ok":
            a = pd.read_parquet(trace_path(peer.file), columns=["position", "nll"]).set_index("position").nll
            b = pd.read_parquet(trace_path(ours.file), columns=["position", "nll"]).set_index("position").nll
            diff = (a - b).abs().dropna()
            above = diff.index[diff > CROSS_CHECK_TOL]
            check.update(max_dnll=f"{diff.max():.1e}", mean_dnll=f"{diff.mean():.1e}",
                         dppl=f"{(peer.ppl / ours.ppl - 1) * 100:+.3f}",
                         first=str(int(above[0])) if len(above) else "none")
        elif peer.status == NOT_INSTALLED:
            check["dppl"] = _not_installed(peer.method)
        checks[peer.name] = check
    for spec in config.get("peers") or []:
        floor = checks.get(spec.get("noise_floor"))
        if spec["name"] in checks and floor is not None:
            checks[spec["name"]]["floor"] = f"{floor['dppl']} ({floor['peer']} vs {floor['ours']})"
    return list(checks.values())


CROSS_CHECK_TOL = 1e-4  # |dNLL| at which two implementations of the same semantics are said to differ

PROBE_TITLES = {
    "verify_max_drop_effect": "verify_max_drop_effect: delta on/off, naive and cooldown, at fixed K and sigma",
    "verify_slack_effect": "verify_slack_effect: sigma swept (window derived), control delta = 0 vs staged delta > 0",
    "profile_prune_overhead": "profile_prune_overhead: forward vs cache update per decode step, against K",
    "summarize_k_quality": "summarize_k_quality: quality and speed against K",
}

_COLUMN_NAMES = {"compress_every": "K", "cache_slack": "σ", "max_drop": "δ", "delta_ppl_pct": "ΔPPL %",
                 "tpot_ms": "TPOT ms", "speedup": "speedup", "spike_events": "events", "spike_peak": "peak",
                 "spike_width": "width", "spike_area": "area", "kv_len_max": "KV max"}


def probe_markdown(table: pd.DataFrame) -> str:
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


def _pct(v) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:+.2f} %"


def probe_finding(probe: str, t: pd.DataFrame) -> str:
    """The probe's result in one or two sentences, numbers only (no verdict the numbers do not carry)."""
    if t.empty:
        return "No finished runs."
    if probe == "verify_max_drop_effect":
        parts = []
        for (sigma, mode), g in t.groupby(["cache_slack", "mode"], sort=False):
            off, on = g[g.max_drop == 0], g[g.max_drop > 0]
            for r in on.itertuples():
                base = off.iloc[0] if len(off) else None
                if base is None:
                    continue
                parts.append(
                    f"σ={sigma} {mode}, δ={r.max_drop} vs δ=0: {int(base.n_prunes)} → {int(r.n_prunes)} prunes "
                    f"({int(r.n_emergency)} emergency, {int(r.n_forced)} forced), drop sizes [{base.drops}] → [{r.drops}], "
                    f"mean spike area {_fmt(base.spike_area)} → {_fmt(r.spike_area)}, "
                    f"ΔPPL {_pct(base.delta_ppl_pct)} → {_pct(r.delta_ppl_pct)}, TPOT {base.tpot_ms:.1f} → {r.tpot_ms:.1f} ms")
        return "; ".join(parts) + "." if parts else "No δ = 0 / δ > 0 pair finished."
    if probe == "verify_slack_effect":
        same = int(t.same_drops.sum())
        return (f"At {same} of {len(t)} σ values the staged run (δ > 0) dropped exactly the same tokens at the same steps "
                f"as its control (δ = 0). Staged minus control: PPL {t.ppl_diff_pct.min():+.2f} % to "
                f"{t.ppl_diff_pct.max():+.2f} %, prune events {int((t.prunes_staged - t.prunes_control).min()):+d} to "
                f"{int((t.prunes_staged - t.prunes_control).max()):+d}, TPOT {t.tpot_diff_pct.min():+.1f} % to "
                f"{t.tpot_diff_pct.max():+.1f} %.")
    if probe == "profile_prune_overhead":
        first, last = t.iloc[0], t.iloc[-1]
        costs = t.prune_cost_ms.dropna()
        return (f"A prune step spends {_fmt(costs.min())}–{_fmt(costs.max())} ms more in the cache update than a step "
                f"without one. The update takes {_fmt(first.update_share_pct)} % of the step at K={int(first.compress_every)} "
                f"and {_fmt(last.update_share_pct)} % at K={int(last.compress_every)}; TPOT goes from "
                f"{first.tpot_ms:.1f} to {last.tpot_ms:.1f} ms.")
    if probe == "summarize_k_quality":
        first, last = t.iloc[0], t.iloc[-1]
        return (f"From K={int(first.compress_every)} to K={int(last.compress_every)}: ΔPPL {_pct(first.delta_ppl_pct)} → "
                f"{_pct(last.delta_ppl_pct)}, speedup {first.speedup:.2f}× → {last.speedup:.2f}×, "
                f"KV max {int(first.kv_len_max)} → {int(last.kv_len_max)}.")
    return ""


def spike_rows(part: pd.DataFrame) -> list[dict]:
    """Spike metrics of every finished run that pruned after the prefill, each run once."""
    if "spike_events" not in part:
        return []
    ok = part[(part.status == "ok") & (part.spike_events > 0)]
    ok = ok.assign(rank=ok.group.map(lambda g: 0 if g in ROW_GROUPS else 1)).sort_values(["rank", "group", "order"])
    rows = []
    for r in ok.drop_duplicates("file").itertuples():
        rows.append({"name": r.name if r.group in ROW_GROUPS else f"{r.group.split(':', 1)[1]}: {_short(r.name)}",
                     "configuration": configuration(r), "events": int(r.spike_events), "peak": _fmt(r.spike_peak),
                     "width": _fmt(r.spike_width, 1), "area": _fmt(r.spike_area), "excess": _fmt(r.excess_nll_mean, 3),
                     "delta_ppl": _pct(r.delta_ppl_pct)})
    return rows


def negative_results(part: pd.DataFrame) -> list[str]:
    """The seeds' negative results, re-measured: overlap and refresh against the same run without them."""
    out = []
    ok = part[part.status == "ok"]
    for key, symbol in (("refresh", "R"), ("overlap", "O")):
        ab = ok[ok.group == f"ablation:{key}"]
        base = ab[ab[key] == 0]
        if base.empty:
            continue
        b = base.iloc[0]
        for r in ab[ab[key] > 0].itertuples():
            verdict = ("identical PPL" if abs(r.ppl - b.ppl) < 1e-9 else
                       f"PPL {'worse' if r.ppl > b.ppl else 'better'} by {abs(r.ppl / b.ppl - 1) * 100:.2f} %")
            out.append(f"{key} {symbol}={int(getattr(r, key))} vs {symbol}=0 ({configuration(b)}): ΔPPL "
                       f"{_pct(b.delta_ppl_pct)} → {_pct(r.delta_ppl_pct)} ({verdict}); TPOT {b.tpot_ms:.1f} → "
                       f"{r.tpot_ms:.1f} ms.")
    md = ok[(ok.group == "probe:verify_max_drop_effect") & (ok.softlite_mode == "naive")]
    for _, g in md.groupby("cache_slack"):
        naive_on, naive_off = g[g.max_drop > 0], g[g.max_drop == 0]
        if not (len(naive_on) and len(naive_off)):
            continue
        a, b = naive_off.iloc[0], naive_on.iloc[0]
        out.append(f"max_drop, naive rule (K={int(b.compress_every)}, σ={int(b.cache_slack)}): δ={int(b.max_drop)} makes "
                   f"{int(b.n_prunes)} prunes against {int(a.n_prunes)} with δ=0 ({int(b.n_emergency_prunes)} of them "
                   f"emergency prunes); mean spike area {_fmt(a.spike_area)} → {_fmt(b.spike_area)}; TPOT "
                   f"{a.tpot_ms:.1f} → {b.tpot_ms:.1f} ms, ΔPPL {_pct(a.delta_ppl_pct)} → {_pct(b.delta_ppl_pct)}.")
    return out


EXPECT_WORDS = {"higher": "a higher PPL", "lower": "a lower PPL", "zero": "no difference"}


def findings(found: pd.DataFrame) -> list[dict]:
    """Each claim with its pairs' intervals and a verdict: holds, reversed, or not shown at this scale."""
    out = []
    for claim, rows in found.groupby("claim", sort=False):
        expect = rows.expect.iloc[0]
        verdicts = set(rows.verdict)
        if expect == "zero":
            holds = verdicts == {"not distinguishable from zero"}
            verdict = ("holds: every interval contains zero" if holds else
                       f"does not hold: {sum(rows.verdict != 'not distinguishable from zero')} of {len(rows)} "
                       "differences are distinguishable from zero")
        elif verdicts == {expect}:
            verdict = "holds: every interval excludes zero, in the claimed direction"
        elif verdicts == {"not distinguishable from zero"}:
            verdict = "not shown: every interval contains zero"
        elif expect not in verdicts and verdicts - {"not distinguishable from zero"}:
            verdict = "reversed: the intervals that exclude zero point the other way"
        else:
            verdict = (f"mixed: {sum(rows.verdict == expect)} of {len(rows)} pairs in the claimed direction, "
                       f"{sum(rows.verdict == 'not distinguishable from zero')} not distinguishable from zero")
        pairs = [f"{r.a} vs {r.b}: PPL {r.text} (n = {int(r.n)}; {r.verdict})" for r in rows.itertuples()]
        out.append({"claim": claim, "expect": EXPECT_WORDS[expect], "verdict": verdict, "pairs": pairs})
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


def render(frame: pd.DataFrame, template: str | Path, config: dict, bench: list[dict] | None = None,
           compared: pd.DataFrame | None = None) -> str:
    """The report; `bench`: `streamkv bench` results for the Performance section; `compared`: the intervals of
    sweep points against their controls and of the findings."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(template).parent)), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    failed = frame[~frame.status.isin(["ok", NOT_INSTALLED])]  # a peer not installed shows in its own table
    return env.get_template(Path(template).name).render(
        protocol=config["protocol"], baseline=config["baseline"], diagnostics=config["diagnostics"],
        stats=config["stats"], sections=sections(frame, config, compared=compared),
        failed=[{"name": r.name, "text": r.text_key, "model": r.model_key, "error": r.error} for r in failed.itertuples()],
        meta=provenance(frame),
        performance=[{"model": b["config"].get("model_key", b["config"].get("model")),
                      "text": b["config"].get("text_key", b["config"].get("text")),
                      "findings": bench_findings(b), "tables": bench_markdown(b)} for b in bench or []],
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


_SYMBOL = {"compress_every": "K", "sink": "S", "cache_slack": "σ", "max_drop": "δ", "softlite_mode": "mode",
           "overlap": "O", "refresh": "R"}


def _short(name: str) -> str:
    """Sweep rows as `K=16, σ=2`; method-table names as they are."""
    parts = [part.strip().partition("=") for part in name.split(",")]
    if not all(eq and param in _SYMBOL for param, eq, _ in parts):
        return name
    return ", ".join(f"{_SYMBOL[param]}={value}" for param, _, value in parts)


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
    ok["short"] = [_short(row.name) for row in ok.itertuples()]
    kinds = list(dict.fromkeys(ok.kind))
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=(1, 1.3))
    near = ok[(ok.group != "baseline") & (ok.delta_ppl_pct.abs() <= ZOOM_PCT)]
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
            ax.annotate(row.short, (row.x, row.delta_ppl_pct), textcoords="offset points", xytext=(4, 3),
                        fontsize=7 if row.rank == 0 else 5.5, alpha=1 if row.rank == 0 else 0.75)
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
    full.set_title("every configuration")
    zoom.set_title(f"streaming configurations within ±{ZOOM_PCT:g} % of the baseline PPL")
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


def _log2(ax) -> None:
    """A log-2 x axis labelled with plain numbers (K = 1, 2, 4, ...)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


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
            ok["combo"] = ok[swept[1:]].astype(str).agg(lambda r: ", ".join(f"{_SYMBOL.get(c, c)}={v}" for c, v in zip(swept[1:], r)), axis=1)
            hue = "combo"
        for ax, y, label in ((axes[0], "delta_ppl_pct", "Δ PPL vs baseline (%)"), (axes[1], "speedup", "speedup (×)")):
            _lines(ax, ok.sort_values(x), x, y, hue)
            ax.set_xlabel(_SYMBOL.get(x, x))
            ax.set_ylabel(label)
            if ok[x].dtype.kind in "iu" and ok[x].min() > 0 and ok[x].max() / ok[x].min() >= 8:
                _log2(ax)
    fig.suptitle(title)
    _save(fig, path)


def _swept(ok: pd.DataFrame) -> list[str]:
    """Run parameters that vary among the rows, most values first."""
    cols = [c for c in ("compress_every", "sink", "cache_slack", "max_drop", "softlite_mode", "overlap", "refresh")
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
    """One figure per probe, drawn from its table."""
    plt, sns = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.8))
    if len(table):
        t = table.copy()
        if probe == "verify_max_drop_effect":
            t["setting"] = "σ=" + t.cache_slack.astype(str) + "\n" + t["mode"] + ", δ=" + t.max_drop.astype(str)
            t["lazy"] = t.n_prunes - t.n_emergency - t.n_forced
            t.set_index("setting")[["lazy", "n_forced", "n_emergency"]].rename(
                columns={"n_forced": "forced", "n_emergency": "emergency"}).plot.bar(stacked=True, ax=axes[0], rot=0)
            axes[0].set_ylabel("prune events")
            axes[0].tick_params(axis="x", labelsize=7)
            sns.barplot(data=t, x="setting", y="delta_ppl_pct", ax=axes[1], color="C1")
            axes[1].set_ylabel("Δ PPL vs baseline (%)")
            axes[1].tick_params(axis="x", labelsize=7)
        elif probe == "verify_slack_effect":
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
        elif probe == "profile_prune_overhead":
            t.set_index("compress_every")[["forward_ms", "update_ms"]].plot.bar(stacked=True, ax=axes[0], rot=0)
            axes[0].set_xlabel("K")
            axes[0].set_ylabel("ms per decode step")
            sns.lineplot(data=t, x="compress_every", y="prune_cost_ms", marker="o", ax=axes[1], label="update on a prune step - other steps")
            sns.lineplot(data=t, x="compress_every", y="update_ms", marker="o", ax=axes[1], label="update per step (mean)")
            _log2(axes[1])
            axes[1].set_xlabel("K")
            axes[1].set_ylabel("ms")
        elif probe == "summarize_k_quality":
            sns.lineplot(data=t, x="compress_every", y="delta_ppl_pct", marker="o", ax=axes[0])
            axes[0].set_ylabel("Δ PPL vs baseline (%)")
            sns.lineplot(data=t, x="compress_every", y="speedup", marker="o", ax=axes[1])
            axes[1].set_ylabel("speedup (×)")
            for ax in axes:
                _log2(ax)
                ax.set_xlabel("K")
    fig.suptitle(title)
    _save(fig, path)


def _bench_cell(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v).replace("|", "\\|")


def bench_overhead_table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame = frame.assign(met=frame.met.astype(object).where(frame.met.notna(), None))
    return frame.reindex(columns=["cap", "method", "tpot_ms", "overhead", "cache_work", "speedup", "forward_ms", "update_ms",
                                  "plan_ms", "goal", "met"]).rename(
        columns={"tpot_ms": "TPOT ms", "overhead": "x no-eviction", "cache_work": "cache work / step",
                 "speedup": "speedup vs recompute",
                 "forward_ms": "forward ms", "update_ms": "cache update ms", "plan_ms": "planning ms"})


def bench_compile_table(rows: list[dict]) -> pd.DataFrame:
    cols = ["cap", "mode", "status", "eager_ms", "compiled_ms", "ratio", "nll_max_abs_diff", "compile_sec",
            "graphs_first_steps", "graphs_after_warmup", "error"]
    frame = pd.DataFrame(rows).reindex(columns=cols)
    return frame.rename(columns={"eager_ms": "eager TPOT ms", "compiled_ms": "compiled TPOT ms",
                                 "ratio": "compiled / eager", "nll_max_abs_diff": "max abs dNLL",
                                 "compile_sec": "first step s", "graphs_first_steps": "graphs (warm-up)",
                                 "graphs_after_warmup": "graphs after warm-up"})


def bench_memory_table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["rss_growth"] = frame.rss_growth * 100
    frame["kv_bytes_min"] = frame.kv_bytes_min / 2**20
    frame["kv_bytes_max"] = frame.kv_bytes_max / 2**20
    return frame[["method", "cap", "tokens", "kv_bytes_min", "kv_bytes_max", "kv_max_over_min", "rss_from_step",
                  "rss_start_mb", "rss_end_mb", "rss_growth", "step_ms_first", "step_ms_last"]].rename(
        columns={"kv_bytes_min": "KV MiB min", "kv_bytes_max": "KV MiB max", "kv_max_over_min": "KV max/min",
                 "rss_from_step": "RSS from step", "rss_start_mb": "RSS then MiB", "rss_end_mb": "RSS end MiB",
                 "rss_growth": "RSS growth %", "step_ms_first": "step ms, start",
                 "step_ms_last": "step ms, end"})


def bench_markdown(result: dict) -> str:
    """The tables of a `streamkv bench` result as markdown (what the command prints, the Performance section)."""
    parts = []
    if result["overhead"]:
        parts += ["Eviction overhead, speedup and time split (medians of block means, methods interleaved):", "",
                  to_markdown(bench_overhead_table(result["overhead"]), _bench_cell), ""]
    if result["compile"]:
        parts += ["The ring's fixed-shape step, torch.compile vs eager:", "",
                  to_markdown(bench_compile_table(result["compile"]), _bench_cell), ""]
    if result.get("evaluator"):
        parts += ["The parallel evaluator against the decode loop, same method, same tokens (each whole run):", "",
                  to_markdown(bench_evaluator_table(result["evaluator"]), _bench_cell), ""]
    if result["memory"]:
        parts += ["Memory over a long stream (KV bytes once the cache is full; process RSS; median step time of the first "
                  "and last 256 steps, or halves of a shorter stream):", "",
                  to_markdown(bench_memory_table(result["memory"]), _bench_cell), ""]
    return "\n".join(parts)


EVALUATOR_GOAL = 20.0  # the parallel evaluator's speed over the decode loop's, on 2 CPU cores


def bench_evaluator_table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return pd.DataFrame({"cap": frame.cap, "method": frame.method, "tokens": frame.tokens,
                         "parallel tok/s": frame.parallel_tok_s, "decode loop tok/s": frame.decode_tok_s,
                         "speedup": frame.speedup,
                         "max abs dNLL": frame.nll_max_abs_diff.map(lambda v: f"{v:.1e}")})


def bench_findings(result: dict) -> list[str]:
    """One line per goal of the benchmark, in numbers."""
    lines = []
    for row in result.get("evaluator") or []:
        verdict = "met" if row["speedup"] >= EVALUATOR_GOAL else "missed"
        lines.append(f"parallel evaluator, {row['method']} at cap {row['cap']} over {row['tokens']} tokens: "
                     f"{row['parallel_tok_s']:.0f} tokens/s against the decode loop's {row['decode_tok_s']:.1f}, "
                     f"{row['speedup']:.1f}x (goal >= {EVALUATOR_GOAL:g}x: {verdict}), max |dNLL| "
                     f"{row['nll_max_abs_diff']:.1e}")
    for cap in sorted({row["cap"] for row in result["overhead"]}):
        rows = {row["method"]: row for row in result["overhead"] if row["cap"] == cap}
        ideal = rows.get("no eviction (reference)", {}).get("speedup")
        for method, row in rows.items():
            if not row.get("goal"):
                continue
            verdict = {True: "met", False: "missed", None: ""}[row.get("met")]
            lines.append(f"cap {cap}, {method}: x{row['overhead']:.3f} the no-eviction forward, "
                         f"{row['speedup']:.2f}x faster than recompute (ideal {ideal:.2f}x); goal {row['goal']}: {verdict}")
        for k, ours in ((1, "start_recent strict"), (result["config"]["lazy_k"], "start_recent lazy")):
            peer = rows.get(f"llama.cpp: shift K={k}")
            if peer and ours in rows:
                lines.append(f"cap {cap}, {peer['method']}: x{peer['overhead']:.3f} llama.cpp's own decode without a "
                             f"shift, where our {ours} is x{rows[ours]['overhead']:.3f} our no-eviction forward")
    for c in result["compile"]:
        if c["status"] == "ok":
            lines.append(f"torch.compile ({c['mode']}) of the ring's fixed-shape step at cap {c['cap']}: TPOT "
                         f"x{c['ratio']:.3f} of eager, max |dNLL| {c['nll_max_abs_diff']:.1e}, "
                         f"{c['graphs_after_warmup']} graphs compiled after warm-up (first step {c['compile_sec']:.0f} s)")
        else:
            lines.append(f"torch.compile ({c['mode']}) of the ring's fixed-shape step failed: {c['error']}")
    for m in result["memory"]:
        growth = "n/a" if m["rss_growth"] is None else f"{m['rss_growth'] * 100:+.2f} %"
        lines.append(f"{m['method']} over {m['tokens']} tokens: KV bytes max/min {m['kv_max_over_min']:.3f}, "
                     f"RSS {growth} from step {m['rss_from_step']} to the end")
    return lines
