"""The paper report's tables: the markdown of `report/paper_tables.md` (jinja2) from the pipeline summary.

The figures are `streamkv.analysis.figures`', the bench tables `streamkv.bench.tables`', the probes' tables, findings
and figures `streamkv.probes`'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from streamkv.analysis import fmt
from streamkv.analysis.cross_checks import cross_check_notes, cross_checks, llamacpp_engine
from streamkv.analysis.grid import max_tokens, model_ceiling, model_source, text_source
from streamkv.analysis.rows import NOT_INSTALLED, configuration, kv_note, reference_kv, spike_rows, table_rows
from streamkv.analysis.stats import LEVEL, MIN_BLOCKS, SUPERIORITY, holm
from streamkv.analysis.summary import claim_margin
from streamkv.bench.goals import LLAMACPP, LLAMACPP_REFERENCE, REFERENCE
from streamkv.bench.tables import bench_failures, bench_findings, bench_markdown
from streamkv.evaluation.params import TIMING_BLOCK
from streamkv.probes import PROBES
from streamkv.probes import finding as probe_finding
from streamkv.probes.common import markdown as probe_markdown


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def weights_speed(bench: list[dict] | None, model_key: str) -> dict[tuple[str, str], str]:
    """(weights variant, "eager" or "compiled") -> its step against float32 eager, "ratio [lo, hi]", from the bench
    of `model_key` (the bench's weights section: one interleaved run, where the pipeline's jobs each time their own
    model)."""
    out = {}
    for b in bench or []:
        if b["config"].get("model_key", b["config"].get("model")) not in (model_key, None):
            continue
        for r in b.get("weights") or []:
            if r.get("mode") in ("eager", "compiled") and r.get("status") == "ok" and _finite(r.get("vs_float32")):
                out[r["weights"], r["mode"]] = fmt.ratio(r["vs_float32"], r.get("vs_float32_lo"),
                                                         r.get("vs_float32_hi"))
    return out


def sections(frame: pd.DataFrame, config: dict, probes_dir: str | Path = "results/probes",
             compared: pd.DataFrame | None = None, bench: list[dict] | None = None) -> list[dict]:
    """One section per (model, text): method table, findings, ablations, probes, spike diagnosis, negative results.

    `compared`: the intervals of sweep points against their controls and of the findings (`summary.comparisons`);
    `bench`: `streamkv bench` results, whose weights section gives the weights ablation its speed column.
    """
    out = []
    empty = pd.DataFrame(columns=["model_key", "text_key", "kind", "group", "claim"])
    compared = compared if compared is not None else empty
    order = {model: i for i, model in enumerate(config["models"])}  # the models in the config's order
    groups = sorted(frame.groupby(["model_key", "text_key"], sort=False), key=lambda g: order.get(g[0][0], len(order)))
    for (model_key, text_key), part in groups:
        here = compared[(compared.model_key == model_key) & (compared.text_key == text_key)]
        methods = part[part.group.isin(["baseline", "methods"])]
        ablations = []
        for group, ab in part[part.group.str.startswith("ablation:")].groupby("group", sort=False):
            key = group.split(":", 1)[1]
            ctl = here[(here.kind == "control") & (here.group == group)]
            versus = {r.a: f"{r.text} vs {r.b}" for r in ctl.itertuples()}
            rows = table_rows(ab.sort_values("order"), versus)
            speed = weights_speed(bench, model_key) if key == "weights" else {}
            for row, weights in zip(rows, ab.sort_values("order").weights):
                row["bench"] = speed.get((weights, "eager"), "–")
                row["bench_compiled"] = speed.get((weights, "compiled"), "–")
            ablations.append({"param": key, "rows": rows, "bench": key == "weights",
                              "figure": f"figures/{model_key}/{text_key}/ablation_{key}.png"})
        probes = []
        for probe in PROBES:
            path = Path(probes_dir) / probe / model_key / f"{text_key}.csv"
            if (part.group == f"probe:{probe}").any() and path.exists():
                table = pd.read_csv(path) if path.stat().st_size > 1 else pd.DataFrame()
                probes.append({"name": probe, "title": PROBES[probe].title, "table": probe_markdown(table),
                               "finding": probe_finding(probe, table),
                               "figure": f"figures/{model_key}/{text_key}/{probe}.png"})
        peers = part[part.group == "peers"]
        checks = cross_checks(part, config, config.get("stats"))
        dtype = config["protocol"].get("dtype", "float32")
        method_rows, peer_rows = table_rows(methods), table_rows(peers)
        n, ceiling = max_tokens(config, text_key, model_key), model_ceiling(config, model_key)
        out.append({"model_key": model_key, "text_key": text_key, "model": model_source(config, model_key),
                    "peers": peer_rows, "cross_checks": checks,
                    "cross_notes": cross_check_notes(checks, dtype), "llamacpp": llamacpp_engine(peers, dtype),
                    "kv_notes": {"methods": kv_note(method_rows), "peers": kv_note(peer_rows)},
                    "reference_kv": reference_kv(pd.concat([methods, peers])),
                    "text": text_source(config, text_key), "max_tokens": n,
                    "ceiling": ceiling if ceiling is not None and ceiling < max_tokens(config, text_key) else None,
                    "methods": method_rows, "ablations": ablations, "probes": probes,
                    "findings": findings(here[here.kind == "finding"]),
                    "spikes": spike_rows(part), "negative": negative_results(part),
                    "figures": {kind: f"figures/{model_key}/{text_key}/{kind}.png"
                                for kind in ("pareto", "nll_trace", "spikes")}})
    return out


def negative_results(part: pd.DataFrame) -> list[str]:
    """The study's negative results, re-measured: overlap and refresh against the same run without them."""
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
            if key == "overlap":  # what the study found by measurement holds here by definition
                verdict += (": by construction, not a measurement (under Auto-cap the overlap's O tokens come out of "
                            "the window, so the cache keeps the keys of O=0, whose evaluation this row shares)")
            out.append(f"{key} {symbol}={int(getattr(r, key))} vs {symbol}=0 ({configuration(b)}): ΔPPL "
                       f"{fmt.pct(b.delta_ppl_pct)} → {fmt.pct(r.delta_ppl_pct)} ({verdict}); TPOT {b.tpot_ms:.1f} → "
                       f"{r.tpot_ms:.1f} ms.")
    md = ok[(ok.group == "probe:verify_max_drop_effect") & (ok.softlite_mode == "naive")]
    for _, g in md.groupby("cache_slack"):
        naive_on, naive_off = g[g.max_drop > 0], g[g.max_drop == 0]
        if not (len(naive_on) and len(naive_off)):
            continue
        a, b = naive_off.iloc[0], naive_on.iloc[0]
        out.append(f"max_drop, naive rule (K={int(b.compress_every)}, σ={int(b.cache_slack)}): δ={int(b.max_drop)} "
                   f"makes {int(b.n_prunes)} prunes against {int(a.n_prunes)} with δ=0 "
                   f"({int(b.n_emergency_prunes)} of them emergency prunes); "
                   f"mean spike area {fmt.num(a.spike_area)} → {fmt.num(b.spike_area)}; "
                   f"TPOT {a.tpot_ms:.1f} → {b.tpot_ms:.1f} ms, "
                   f"ΔPPL {fmt.pct(a.delta_ppl_pct)} → {fmt.pct(b.delta_ppl_pct)}.")
    return out


def expect_words(expect: str, margin: float | None = None) -> str:
    """What a claim says of a against b, in words: "a lower PPL", "no worse by more than 2 %", ..."""
    if expect == "noninferior":
        return f"no worse than b by more than {margin:g} % (non-inferiority)"
    if expect == "equivalent":
        return f"the same PPL within ±{margin:g} % (equivalence)"
    return {"higher": "a higher PPL", "lower": "a lower PPL"}[expect]


def findings(found: pd.DataFrame) -> list[dict]:
    """Each claim with its pairs' intervals and a verdict, judged over its pairs at one family-wise level.

    Every pair gives a one-sided p-value for the claim and one for its opposite (`stats.claim_p_values`); Holm's
    procedure over the claim's tested pairs, at one-sided level (1 - level) / 2 (2.5 % for 95 % intervals), says
    which pairs show it and which show the opposite.  Superiority (lower / higher): holds, reversed, mixed or not
    shown.  Non-inferiority: non-inferior, does not hold (worse by more than the margin) or not shown.
    Equivalence: equivalent, does not hold (a difference beyond the margin) or not shown.  A pair with too few
    targets for an interval is left out, and said so.
    """
    out = []
    for claim, rows in found.groupby("claim", sort=False):
        expect = rows.expect.iloc[0]
        margin = float(rows.margin.iloc[0]) if "margin" in rows and expect not in SUPERIORITY else None
        level = float(rows.level.iloc[0]) if "level" in rows else 0.95
        alpha = (1 - level) / 2
        tested = rows[rows.verdict != "too few targets"]
        k = len(tested)
        shown = holm(tested.p.to_numpy(), alpha)
        opposite = holm(tested.p_opposite.to_numpy(), alpha)
        x, y = int(shown.sum()), int(opposite.sum())
        of = f"{k} pair{'s' if k != 1 else ''}, Holm at {alpha * 100:g} % one-sided"
        if not k:
            verdict = "not tested: no pair has enough targets for an interval"
        elif expect in SUPERIORITY:
            if x == k:
                verdict = f"holds: every interval excludes zero, in the claimed direction ({of})"
            elif x == 0 and y == 0:
                verdict = f"not shown: no pair shows a difference either way ({of}); this is not evidence of none"
            elif x == 0:
                verdict = f"reversed: {y} of {k} pairs show the opposite direction ({of})"
            else:
                verdict = (f"mixed: {x} of {k} pairs in the claimed direction, {y} the opposite, "
                           f"{k - x - y} neither ({of})")
        elif expect == "noninferior":
            if x == k:
                verdict = f"non-inferior: every interval's upper end lies below the +{margin:g} % margin ({of})"
            elif y:
                verdict = (f"does not hold: {y} of {k} pairs are worse than b by more than the {margin:g} % "
                           f"margin ({of})")
            else:
                verdict = (f"not shown: {x} of {k} pairs non-inferior at the claim's level, the rest inconclusive "
                           f"(their intervals reach the +{margin:g} % margin, or Holm's step stops before them) "
                           f"({of})")
        else:
            if x == k:
                verdict = f"equivalent: every interval lies within ±{margin:g} % ({of})"
            elif y:
                verdict = f"does not hold: {y} of {k} pairs differ by more than ±{margin:g} % ({of})"
            else:
                verdict = (f"not shown: {x} of {k} pairs equivalent at the claim's level, the rest too wide to "
                           f"show equivalence within ±{margin:g} %, and none shows a difference beyond it ({of})")
        if len(tested) < len(rows):
            verdict += f" ({len(rows) - len(tested)} pair(s) with too few targets for an interval left out)"
        pairs = []
        for r in rows.itertuples():
            width = ((r.pct_hi - r.pct_lo) / 2 if r.status == "ok" and _finite(r.pct_lo) and _finite(r.pct_hi)
                     else None)
            cell = f"half-width {width:.2f} %; " if width is not None else ""
            pairs.append(f"{r.a} vs {r.b}: PPL {r.text} (n = {int(r.n)}; {cell}{r.verdict})")
        out.append({"claim": claim, "expect": expect_words(expect, margin), "margin": margin, "verdict": verdict,
                    "pairs": pairs})
    return out


def conclusions(compared: pd.DataFrame, config: dict, models: list[str]) -> list[dict]:
    """Each claim of `findings` with its verdict on each of `models` (`findings`' verdict over every pair of its rows
    on that model, whatever the text): which of the study's conclusions hold on which model; "–" where the claim
    has no pair on a model (its rows do not run there)."""
    found = compared[compared.kind == "finding"]
    out = []
    for claim in dict.fromkeys(f["claim"] for f in config.get("findings") or []):
        cells = []
        for model in models:
            rows = found[(found.claim == claim) & (found.model_key == model)]
            if rows.empty:
                cells.append("–")
                continue
            head = findings(rows)[0]["verdict"].split(":", 1)[0]
            texts = ", ".join(dict.fromkeys(rows.text_key))
            cells.append(f"{head} ({len(rows)} pair{'s' if len(rows) != 1 else ''}; {texts})")
        finding = next(f for f in config["findings"] if f["claim"] == claim)
        out.append({"claim": claim, "expect": expect_words(finding["expect"], claim_margin(finding)),
                    "cells": cells})
    return out


def block_lengths(frame: pd.DataFrame, compared: pd.DataFrame | None) -> str:
    """The block lengths the intervals of this run used, in words: "64 positions for every pair" or "64-192
    positions (median 64) over 40 pairs"."""
    cols = [frame[c] for c in ("delta_ppl_block", "delta_ref_block") if c in frame]
    if compared is not None and "block" in compared:
        cols.append(compared["block"])
    values = pd.to_numeric(pd.concat(cols), errors="coerce").dropna() if cols else pd.Series(dtype=float)
    if values.empty:
        return "no interval"
    lo, hi = int(values.min()), int(values.max())
    if lo == hi:
        return f"{lo} positions for every pair"
    return f"{lo}–{hi} positions (median {int(values.median())}) over {len(values)} pairs"


def provenance(frame: pd.DataFrame) -> dict:
    ok = frame[frame.status == "ok"]
    src = ok if len(ok) else frame

    def distinct(col):
        return sorted({str(v) for v in src[col].dropna()}) if col in src else []

    return {"commits": distinct("meta_git_commit"), "code_hashes": distinct("meta_code_hash"),
            "devices": distinct("meta_device"), "cpu_features": distinct("meta_cpu_features"),
            "dtypes": distinct("meta_dtype"), "threads": distinct("meta_threads"),
            "tf32": distinct("meta_tf32"), "pythons": distinct("meta_python"),
            "versions": [json.loads(v) for v in distinct("meta_versions")],
            "first": min(distinct("meta_host_time"), default="–"), "last": max(distinct("meta_host_time"), default="–")}


def timing_notes(frame: pd.DataFrame, bench: list[dict] | None = None) -> dict:
    """What this run's numbers say about the drift of step times, for the prose around the timed columns.

    `drift`: the spread of the no-eviction reference's TPOT, which every timed row's job measures again on the
    same forward (model and cap), so its spread is the drift between jobs; `bench_width`: the half-widths of the
    bench's ratio intervals, relative to the ratio; `evaluator`: the bench's check of the parallel evaluator;
    `llamacpp_bench`: whether the bench timed llama.cpp against its own decode; `block`: the steps per block of a
    timing part.
    """
    notes = {"drift": "", "bench_width": "", "evaluator": "", "block": TIMING_BLOCK,
             "llamacpp_bench": any(str(r.get("method", "")).startswith(LLAMACPP) for b in bench or []
                                   for r in b.get("overhead") or [])}
    if "tpot_ref_ms" in frame:
        ok = frame[frame.status == "ok"].drop_duplicates("file")
        ok = ok.assign(ref=pd.to_numeric(ok.tpot_ref_ms, errors="coerce")).dropna(subset=["ref"])
        spreads = [(g.ref.max() / g.ref.min() - 1, model, int(cap), g) for (model, cap), g in
                   ok.groupby(["model_key", "cap"]) if len(g) > 1 and g.ref.min() > 0]
        if spreads:
            spread, model, cap, g = max(spreads, key=lambda s: s[0])
            notes["drift"] = (f"the no-eviction reference's TPOT, timed again in each of {len(g)} jobs on the same "
                              f"forward ({model}, cap {cap}), ranged from {g.ref.min():.2f} to {g.ref.max():.2f} ms "
                              f"(+{spread * 100:.1f} %)")
    halves = []
    for b in bench or []:
        for r in b.get("overhead") or []:
            if r.get("method") in (REFERENCE, LLAMACPP_REFERENCE):
                continue  # (a reference over itself: 1 exactly)
            v, lo, hi = (r.get(k) for k in ("overhead", "overhead_lo", "overhead_hi"))
            if all(isinstance(x, (int, float)) and math.isfinite(x) for x in (v, lo, hi)) and v > 0:
                halves.append((hi - lo) / 2 / v * 100)
    if halves:
        notes["bench_width"] = (f"the 95 % intervals of the ratios below are ±{pd.Series(halves).median():.1f} % "
                                f"of the ratio at the median and ±{max(halves):.1f} % at the widest "
                                f"({len(halves)} ratios)")
    checks = [r for b in bench or [] for r in b.get("evaluator") or [] if _finite(r.get("nll_max_abs_diff"))]
    if checks:
        notes["evaluator"] = (f"the Performance section's check measures a max |ΔNLL| of "
                              f"{max(r['nll_max_abs_diff'] for r in checks):.1e} against the decode loop")
    return notes


def recall_sections(tables: dict[str, pd.DataFrame], config: dict) -> list[dict]:
    """The recall probe's section per model (`tables`: model key -> the probe's table)."""
    from streamkv.evaluation.recall import spec
    from streamkv.probes import STREAM_PROBES

    probe = STREAM_PROBES["recall"]
    out = []
    for model, table in tables.items():
        s = spec(config)
        failed = [f"{r.name} failed: {r.error}" for r in table[table.status != "ok"].itertuples()]
        out.append({"model": model, "title": probe.title, "cap": s["cap"], "instances": s["instances"],
                    "passage": s["passage_tokens"], "table": probe.markdown(table[table.status == "ok"]),
                    "finding": probe.finding(table, s["reference"]), "failed": failed,
                    "figure": f"figures/{model}/recall.png"})
    return out


def render(frame: pd.DataFrame, template: str | Path, config: dict, bench: list[dict] | None = None,
           compared: pd.DataFrame | None = None, recall: dict[str, pd.DataFrame] | None = None) -> str:
    """The report; `bench`: `streamkv bench` results for the Performance section; `compared`: the intervals of
    sweep points against their controls and of the findings; `recall`: the recall probe's table per model."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(template).parent)),
                             undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    failed = frame[~frame.status.isin(["ok", NOT_INSTALLED])]  # a peer not installed shows in its own table
    parts = sections(frame, config, compared=compared, bench=bench)
    models = list(dict.fromkeys(s["model_key"] for s in parts))
    return env.get_template(Path(template).name).render(
        protocol=config["protocol"], baseline=config["baseline"], diagnostics=config["diagnostics"],
        stats={"min_blocks": MIN_BLOCKS, "level": LEVEL, **config["stats"]}, reference=config.get("reference"),
        sections=parts, models=models,
        conclusions=conclusions(compared, config, models) if len(models) > 1 and compared is not None else [],
        failed=[{"name": r.name, "text": r.text_key, "model": r.model_key, "error": r.error}
                for r in failed.itertuples()],
        meta=provenance(frame), timing=timing_notes(frame, bench), block_lengths=block_lengths(frame, compared),
        recall=recall_sections(recall or {}, config),
        performance=[{"model": b["config"].get("model_key", b["config"].get("model")),
                      "text": b["config"].get("text_key", b["config"].get("text")),
                      "findings": bench_findings(b), "tables": bench_markdown(b),
                      "failed": list(bench_failures(b))} for b in bench or []],
    )
