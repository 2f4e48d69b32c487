"""The paper report's tables: the markdown of `report/paper_tables.md` (jinja2) from the pipeline summary.

The figures are `streamkv.figures`', the bench tables `streamkv.bench_tables`', the probes' tables, findings
and figures `streamkv.probes`'.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from . import fmt
from .bench_tables import LLAMACPP, LLAMACPP_REFERENCE, REFERENCE, bench_failures, bench_findings, bench_markdown
from .methods import REGISTRY as METHODS
from .methods import get as method_record
from .params import DENSE_METHODS, LAZY_METHODS, TIMING_BLOCK, WEIGHTS
from .pipeline import max_tokens, text_source
from .probes import PROBES
from .probes import finding as probe_finding
from .probes import markdown as probe_markdown
from .stats import MIN_BLOCKS, block_bootstrap, interval_text, paired
from .summary import ROW_GROUPS, trace_path

FAILED = "FAILED"


NOT_INSTALLED = "not_installed"  # the status of a peer row whose optional package is absent




def configuration(row) -> str:
    """The parameters that define a row, in the study's notation."""
    if row.method in DENSE_METHODS:
        return "full cache"
    parts = [f"S={fmt.count(row.sink)}", f"W={fmt.count(row.window)}"]
    if row.method in LAZY_METHODS and row.compress_every != 1:
        parts.append(f"K={fmt.count(row.compress_every)}")
    if getattr(row, "positions", "cache") == "original":
        parts.append("original positions")
    if row.cache_slack:
        parts.append(f"σ={fmt.count(row.cache_slack)}")
    if row.max_drop:
        parts.append(f"δ={fmt.count(row.max_drop)}")
    if (row.cache_slack or row.max_drop) and getattr(row, "softlite_mode", "naive") == "cooldown":
        parts.append("cooldown")
    if getattr(row, "overlap", 0):
        parts.append(f"O={fmt.count(row.overlap)}")
    if getattr(row, "refresh", 0):
        parts.append(f"R={fmt.count(row.refresh)}")
    if getattr(row, "weights", WEIGHTS[0]) != WEIGHTS[0]:
        parts.append(f"{row.weights} weights")
    return ", ".join(parts)


def _marked(row) -> str:
    """Emergency and forced prunes, where there were any."""
    marks = [f"{int(n)} {what}" for n, what in ((getattr(row, "n_emergency_prunes", 0), "emergency"),
                                                 (getattr(row, "n_forced_prunes", 0), "forced")) if n and n == n]
    return f" ({', '.join(marks)})" if marks else ""


def _interval(row, prefix: str, n_col: str) -> str:
    """The row's difference `prefix` (`delta_ppl`: against the baseline, `delta_ref`: against the reference) as a
    cell: "+1.23 [+0.40, +2.05]", "identical", or the value with why it has no interval."""
    value = getattr(row, f"{prefix}_pct", None)
    return interval_text(value, getattr(row, f"{prefix}_lo", None), getattr(row, f"{prefix}_hi", None),
                         getattr(row, f"{prefix}_status", None), getattr(row, n_col, None))


def table_rows(frame: pd.DataFrame, versus: dict | None = None) -> list[dict]:
    """Rows of a table; `versus`: row name -> its comparison with its control ("vs control" column)."""
    rows = []
    for row in frame.itertuples(index=False):
        ok = row.status == "ok"
        rows.append({
            "name": row.name, "method": row.method, "configuration": configuration(row), "status": row.status,
            "ppl": (fmt.num(row.ppl, 3) if ok
                    else (_not_installed(row.method) if row.status == NOT_INSTALLED else FAILED)),
            "delta_ppl": (_interval(row, "delta_ppl", "n_paired")
                          if ok and row.group != "baseline" else ("0" if ok else "–")),
            "delta_ref": _interval(row, "delta_ref", "n_ref") if ok else "–",
            "n": fmt.count(row.n_scored) if ok else "–",
            "evaluator": getattr(row, "evaluator", None) or "decode",
            "ratio": _ratio(row) if ok else "–",
            "versus": (versus or {}).get(row.name, "control" if versus is not None else ""),
            "tpot": fmt.num(row.tpot_ms) if ok else "–",
            "tpot_steady": fmt.num(row.tpot_steady_ms) if ok else "–",
            "speedup": f"{row.speedup:.2f}×" if ok and math.isfinite(row.speedup) else "–",
            "kv": f"{int(row.kv_len_min)} / {row.kv_len_mean:.1f} / {int(row.kv_len_max)}" if ok else "–",
            "kv_mib": (fmt.num(row.kv_bytes_peak / 2**20) + (COMPUTED_MARK if _kv_computed(row.method) else "")
                       if ok else "–"),
            "prunes": (f"{int(row.n_prunes)} / {int(row.tokens_dropped)}" + _marked(row)) if ok else "–",
            "error": row.error if not ok else "",
            "value": fmt.short(row.name),
        })
    return rows


def _ratio(row) -> str:
    """The row's "× ref" with its interval where the timing part gave one: "1.013 [0.998, 1.027]"."""
    return fmt.ratio(*(getattr(row, k, None) for k in ("tpot_ratio", "tpot_ratio_lo", "tpot_ratio_hi")))


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _not_installed(method: str) -> str:
    return f"not installed (install with `{method_record(method).setup}`)"


COMPUTED_MARK = "†"  # a KV MiB value computed from shapes or allocations, not read from cache tensors
# How each family's computed KV bytes come about (`methods.Method.kv_bytes`).
KV_COMPUTED = {
    "baseline": "recompute keeps no cache; its value is the keys and values its forward computes over the sinks "
                "and the window (layers × KV heads × head dim × bytes per value × keys)",
    "kvpress": "a kvpress cache lives in its worker process; its value is the bytes of the worker's cache tensors "
               "scaled to the keys a step attends (the press evicts after the attention)",
    "llamacpp": "llama.cpp's is its allocation: the cells of its context × the bytes of one cell, from the "
                "model's dimensions",
}


def _kv_computed(method: str) -> bool:
    record = METHODS.get(method)
    return record is not None and record.kv_bytes == "computed"


def kv_note(rows: list[dict]) -> str:
    """The footnote of a table's KV MiB column: how its computed (marked) values come about; "" if none is."""
    families = []
    for r in rows:
        if r["status"] == "ok" and _kv_computed(r["method"]) and METHODS[r["method"]].family not in families:
            families.append(METHODS[r["method"]].family)
    if not families:
        return ""
    return (f"{COMPUTED_MARK} KV MiB computed, not measured: " + "; ".join(KV_COMPUTED[f] for f in families)
            + ". Unmarked KV MiB values are measured: the bytes of the cache's key and value tensors at their peak.")


def _peer_meta(row) -> dict:
    """What a peer recorded about itself (`meta.peer_versions`): a dict, whichever way the frame stored it."""
    meta = getattr(row, "meta_peer_versions", None)
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            meta = None
    return {k: v for k, v in meta.items() if v is not None} if isinstance(meta, dict) else {}


def llamacpp_engine(peers: pd.DataFrame, dtype: str) -> str:
    """What the llama.cpp rows ran, as their results record it: the GGUF file's weight type, the KV cache's type,
    the cells allocated for the budget; "" without a llama.cpp row."""
    rows = [r for r in peers.itertuples() if METHODS.get(r.method) is not None
            and METHODS[r.method].family == "llamacpp"]
    if not rows:
        return ""
    metas = [(r, _peer_meta(r)) for r in rows if r.status == "ok"]
    weights = sorted({str(m["gguf_type"]) for _, m in metas if m.get("gguf_type")})
    caches = sorted({str(m["kv_cache"]).upper() for _, m in metas if m.get("kv_cache")})
    kernels = (f"its own kernels, {' / '.join(weights)} weights (the GGUF file's type)" if weights
               else "its own kernels and its own weight format")
    kernels += f" and a KV cache in {' / '.join(caches)}" if caches else ""
    cells = [f"{r.name}: {int(m['kv_cells'])} cells for a budget of {int(m['kv_budget'])}" for r, m in metas
             if m.get("kv_cells") is not None and m.get("kv_budget") is not None]
    allocated = f"the cells it allocates ({'; '.join(cells)})" if cells else "the cells it allocates"
    return (f"llama.cpp runs the model's GGUF file with {kernels}, so its PPL, TPOT and speedup (against our "
            f"{dtype} recompute) are those of another engine; its KV MiB is computed from {allocated}")


def reference_kv(rows: pd.DataFrame) -> str:
    """How many keys the timed rows attend to, against the timing reference's cap keys at every step.

    The reference holds exactly cap keys; a lazy row holds between cap and cap + K - 1 between its prunes, a
    softlite row may hold fewer than cap.  The numbers are the row's KV len over its evaluation.
    """
    if "tpot_ratio" not in rows:
        return ""
    timed = rows[(rows.status == "ok") & pd.to_numeric(rows.tpot_ratio, errors="coerce").notna()]
    if timed.empty:
        return ""
    caps = sorted({int(c) for c in timed.cap})
    other, dense = [], []
    for r in timed.itertuples():
        if r.method in DENSE_METHODS or (METHODS.get(r.method) is not None and METHODS[r.method].dense):
            dense.append(r.name)
        elif (int(r.kv_len_min), int(r.kv_len_max)) != (int(r.cap), int(r.cap)):
            other.append(f"{r.name} {int(r.kv_len_min)} to {int(r.kv_len_max)} keys, mean {r.kv_len_mean:.1f}")
    text = (f"The timing reference (× ref) attends to cap = {' / '.join(map(str, caps))} keys at every step; "
            + (f"rows that attend to another number (KV len over their evaluation): {'; '.join(other)}"
               if other else "every timed row attends to cap keys as well (KV len over its evaluation)"))
    if dense:
        text += (f"; {', '.join(dense)} keeps every token, so at its i-th timed step it attends to cap + i keys "
                 "(after a prefill of cap)")
    return text + "."


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
    for (model_key, text_key), part in frame.groupby(["model_key", "text_key"], sort=False):
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
        out.append({"model_key": model_key, "text_key": text_key, "model": config["models"][model_key],
                    "peers": peer_rows, "cross_checks": checks,
                    "cross_notes": cross_check_notes(checks, dtype), "llamacpp": llamacpp_engine(peers, dtype),
                    "kv_notes": {"methods": kv_note(method_rows), "peers": kv_note(peer_rows)},
                    "reference_kv": reference_kv(pd.concat([methods, peers])),
                    "text": text_source(config, text_key), "max_tokens": max_tokens(config, text_key),
                    "methods": method_rows, "ablations": ablations, "probes": probes,
                    "findings": findings(here[here.kind == "finding"]),
                    "spikes": spike_rows(part), "negative": negative_results(part),
                    "figures": {kind: f"figures/{model_key}/{text_key}/{kind}.png"
                                for kind in ("pareto", "nll_trace", "spikes")}})
    return out


def cross_checks(part: pd.DataFrame, config: dict, bootstrap: dict | None = None) -> list[dict]:
    """Each peer row with a `cross_check` against the row it names: per-token NLL and PPL, side by side, on the
    targets both scored (the PPL difference paired, with its interval: `stats.block_bootstrap`).

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
                 "floor": "–", "differing": "–", "method": peer.method, "prefill": _int(getattr(peer, "prefill", None)),
                 "cap": _int(getattr(peer, "cap", None)), "max_abs": None, "n_above": None, "n": None,
                 "half_width": None}
        if peer.status == "ok" and ours.status == "ok":
            # both PPLs over the targets both scored, and their paired difference with its interval
            a, b = (pd.read_parquet(trace_path(r.file), columns=["position", "nll"]) for r in (peer, ours))
            both = paired(a, b)
            d = block_bootstrap((both.nll_a - both.nll_b).to_numpy(), both.position.to_numpy(), **(bootstrap or {}))
            diff = (both.nll_a - both.nll_b).abs()
            above = both.position[diff > CROSS_CHECK_TOL]
            check.update(max_dnll=f"{diff.max():.1e}", mean_dnll=f"{diff.mean():.1e}", dppl=d.text(),
                         first=str(int(above.iloc[0])) if len(above) else "none",
                         differing=f"{len(above)} of {len(diff)}", max_abs=float(diff.max()), n_above=len(above),
                         n=len(diff), half_width=d.half_width_pct)
        elif peer.status == NOT_INSTALLED:
            check["dppl"] = _not_installed(peer.method)
        checks[peer.name] = check
    for spec in config.get("peers") or []:
        floor = checks.get(spec.get("noise_floor"))
        if spec["name"] in checks and floor is not None:
            checks[spec["name"]]["floor"] = f"{floor['dppl']} ({floor['peer']} vs {floor['ours']})"
    return list(checks.values())


CROSS_CHECK_TOL = 1e-4  # |dNLL| at which two implementations of the same semantics are said to differ


def _int(v) -> int | None:
    return int(v) if v is not None and v == v else None


def _family(method: str) -> str | None:
    record = METHODS.get(method)
    return record.family if record is not None else None


def cross_check_notes(checks: list[dict], dtype: str) -> list[str]:
    """What the cross-checks of this run show, in sentences computed from them (measured ones only)."""
    notes = []
    measured = [c for c in checks if c["max_abs"] is not None]
    kvpress = [c for c in measured if _family(c["method"]) == "kvpress"]
    full = [c for c in kvpress if c["prefill"] is not None and c["cap"] is not None and c["prefill"] >= c["cap"]]
    below = [c for c in kvpress if c["prefill"] is not None and c["cap"] is not None and c["prefill"] < c["cap"]]
    if full:
        worst = max(c["max_abs"] for c in full)
        notes.append("kvpress compresses after the attention, from the first decode step on: after a prefill that "
                     "fills the cap its first decode step attends cap + 1 keys, and the states that step leaves in "
                     f"the cache {'differ from' if worst > CROSS_CHECK_TOL else 'still agree within 1e-4 with'} "
                     f"ours until the cross-check ends (max |ΔNLL| {worst:.1e} over "
                     f"{len(full)} such cross-check{'s' if len(full) > 1 else ''}).")
    if below:
        worst = max(c["max_abs"] for c in below)
        where = ", ".join(f"{c['peer']} (prefill {c['prefill']}, cap {c['cap']})" for c in below)
        notes.append(f"With a prefill below the cap, kvpress and our row differ by at most {worst:.1e} in NLL "
                     f"({'within' if worst <= CROSS_CHECK_TOL else 'above'} the 1e-4 tolerance): {where}.")
    elif kvpress:
        notes.append("With a prefill below the cap (a multiple of K) the test suite checks that kvpress and our "
                     "rows agree within 1e-4 in NLL (`tests/test_peers.py`, on a tiny model); no cross-check of this "
                     "run has such a prefill, so it is not measured here.")
    llama = [c for c in measured if _family(c["method"]) == "llamacpp"]
    dense = [c for c in llama if METHODS[c["method"]].dense]
    if dense:
        c = dense[0]
        notes.append(f"llama.cpp's NLLs differ from our {dtype} forward's by more than 1e-4 at {c['n_above']} of "
                     f"{c['n']} targets without eviction ({c['peer']} vs {c['ours']}); that difference is the noise "
                     "floor, so a shift row's difference beyond it is what the two evictions do differently.")
    elif llama:
        notes.append(f"llama.cpp runs another forward than our {dtype} one, and no dense cross-check of this run "
                     "measures that difference alone: a shift row's difference holds both.")
    return notes


def spike_rows(part: pd.DataFrame) -> list[dict]:
    """Spike metrics of every finished run that pruned after the prefill, each run once: against the full-coverage
    reference and against the dense row (`summary.spike_diagnosis`), "–" where that row does not cover the run."""
    if "spike_events" not in part:
        return []
    events = part.spike_events.fillna(part.get("dense_spike_events", pd.Series(0, index=part.index)))
    ok = part[(part.status == "ok") & (events > 0)]
    ok = ok.assign(rank=ok.group.map(lambda g: 0 if g in ROW_GROUPS else 1)).sort_values(["rank", "group", "order"])
    rows = []
    for r in ok.drop_duplicates("file").itertuples():
        row = {"name": r.name if r.group in ROW_GROUPS else f"{r.group.split(':', 1)[1]}: {fmt.short(r.name)}",
               "configuration": configuration(r), "delta_ref": _interval(r, "delta_ref", "n_ref")}
        for prefix, key in (("", "ref"), ("dense_", "dense")):
            n = getattr(r, f"{prefix}spike_events", None)
            row[key] = ({"events": int(n), "peak": fmt.num(getattr(r, f"{prefix}spike_peak")),
                         "width": fmt.num(getattr(r, f"{prefix}spike_width"), 1),
                         "area": fmt.num(getattr(r, f"{prefix}spike_area")),
                         "excess": fmt.num(getattr(r, f"{prefix}excess_nll_mean"), 3)}
                        if n is not None and n == n else dict.fromkeys(("events", "peak", "width", "area", "excess"),
                                                                        "–"))
        rows.append(row)
    return rows


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


EXPECT_WORDS = {"higher": "a higher PPL", "lower": "a lower PPL", "zero": "no difference"}


def findings(found: pd.DataFrame) -> list[dict]:
    """Each claim with its pairs' intervals and a verdict: holds, reversed, or not shown at this scale.

    A pair whose NLLs are identical shows no difference; a pair with too few targets for an interval counts as
    not tested.
    """
    out = []
    for claim, rows in found.groupby("claim", sort=False):
        expect = rows.expect.iloc[0]
        zero = rows.verdict.isin(["not distinguishable from zero", "identical"])
        tested = rows[rows.verdict != "too few targets"]
        verdicts = set(tested.verdict.where(~zero, "not distinguishable from zero"))
        if tested.empty:
            verdict = "not tested: no pair has enough targets for an interval"
        elif expect == "zero":
            verdict = ("holds: every interval contains zero" if verdicts == {"not distinguishable from zero"} else
                       f"does not hold: {int((~zero[tested.index]).sum())} of {len(tested)} differences are "
                       "distinguishable from zero")
        elif verdicts == {expect}:
            verdict = "holds: every interval excludes zero, in the claimed direction"
        elif verdicts == {"not distinguishable from zero"}:
            verdict = "not shown: every interval contains zero"
        elif expect not in verdicts and verdicts - {"not distinguishable from zero"}:
            verdict = "reversed: the intervals that exclude zero point the other way"
        else:
            verdict = (f"mixed: {int((tested.verdict == expect).sum())} of {len(tested)} pairs in the claimed "
                       f"direction, {int(zero[tested.index].sum())} not distinguishable from zero")
        if len(tested) < len(rows):
            verdict += f" ({len(rows) - len(tested)} pair(s) with too few targets for an interval left out)"
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


def render(frame: pd.DataFrame, template: str | Path, config: dict, bench: list[dict] | None = None,
           compared: pd.DataFrame | None = None) -> str:
    """The report; `bench`: `streamkv bench` results for the Performance section; `compared`: the intervals of
    sweep points against their controls and of the findings."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(template).parent)),
                             undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    failed = frame[~frame.status.isin(["ok", NOT_INSTALLED])]  # a peer not installed shows in its own table
    return env.get_template(Path(template).name).render(
        protocol=config["protocol"], baseline=config["baseline"], diagnostics=config["diagnostics"],
        stats={"min_blocks": MIN_BLOCKS, **config["stats"]}, reference=config.get("reference"),
        sections=sections(frame, config, compared=compared, bench=bench),
        failed=[{"name": r.name, "text": r.text_key, "model": r.model_key, "error": r.error}
                for r in failed.itertuples()],
        meta=provenance(frame), timing=timing_notes(frame, bench),
        performance=[{"model": b["config"].get("model_key", b["config"].get("model")),
                      "text": b["config"].get("text_key", b["config"].get("text")),
                      "findings": bench_findings(b), "tables": bench_markdown(b),
                      "failed": list(bench_failures(b))} for b in bench or []],
    )
