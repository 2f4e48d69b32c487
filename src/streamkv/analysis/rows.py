"""The rows of the report's tables: a run's configuration in the study's notation, its cells (PPL, the
differences with their intervals, × ref, KV, prunes), the KV column's notes and the spike table's rows."""

from __future__ import annotations

import math

import pandas as pd

from streamkv.analysis import fmt
from streamkv.analysis.stats import interval_text
from streamkv.analysis.summary import ROW_GROUPS
from streamkv.evaluation.params import DENSE_METHODS, LAZY_METHODS, SINK_LAYERS, WEIGHTS
from streamkv.methods import REGISTRY as METHODS
from streamkv.methods import get as method_record

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
    if getattr(row, "sink_layers", SINK_LAYERS[0]) != SINK_LAYERS[0]:
        parts.append(f"sinks in {row.sink_layers} layers")
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


def interval_cell(row, prefix: str, n_col: str) -> str:
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
                    else (not_installed_text(row.method) if row.status == NOT_INSTALLED else FAILED)),
            "delta_ppl": (interval_cell(row, "delta_ppl", "n_paired")
                          if ok and row.group != "baseline" else ("0" if ok else "–")),
            "delta_ref": interval_cell(row, "delta_ref", "n_ref") if ok else "–",
            "n": fmt.count(row.n_scored) if ok else "–",
            "evaluator": nlls_cell(row),
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


def nlls_cell(row) -> str:
    """Which evaluator produced the row's NLLs, and whose run they are where the row shares another's: strict
    `mit` and `ring` take strict `start_recent`'s per-token NLLs (one attention schedule, `grid.quality_run`), so
    they are not a measurement of their own, and the cell says so: "parallel, start_recent's NLLs"."""
    evaluator = getattr(row, "evaluator", None) or "decode"
    source = getattr(row, "meta_nll_params", None)
    if not isinstance(source, dict):
        return evaluator
    shared = [k for k in ("method", "overlap") if k in source and source[k] is not None
              and str(source[k]) != str(getattr(row, k, source[k]))]
    if not shared:
        return evaluator
    run = source["method"] + (f" O={source['overlap']}" if "overlap" in shared else "")
    return f"{evaluator}, {run}'s NLLs"


def _ratio(row) -> str:
    """The row's "× ref" with its interval where the timing part gave one: "1.013 [0.998, 1.027]"."""
    return fmt.ratio(*(getattr(row, k, None) for k in ("tpot_ratio", "tpot_ratio_lo", "tpot_ratio_hi")))


def not_installed_text(method: str) -> str:
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
               "configuration": configuration(r), "delta_ref": interval_cell(r, "delta_ref", "n_ref")}
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
