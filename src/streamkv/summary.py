"""Results to tables: one row per run, compared with its recompute baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from .params import LAZY_METHODS

# A run is compared with the recompute baseline that scored the same tokens under the same budget.
BASELINE_KEYS = ("model", "text", "cap", "max_tokens", "prefill", "dtype", "device")


def load_results(paths) -> pd.DataFrame:
    """Flatten result JSON files into a frame: params, metrics, status, error, source file."""
    rows = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        meta = record.get("meta") or {}
        row = {**record["params"], **record["metrics"], "status": record["status"], "error": record["error"],
               "file": str(path), **{f"meta_{k}": v for k, v in meta.items() if k != "versions"},
               "meta_versions": json.dumps(meta.get("versions", {}), sort_keys=True)}
        rows.append(row)
    return pd.DataFrame(rows)


def with_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Add `delta_ppl_pct` and `speedup` against the recompute row of the same setting (NaN where there is none)."""
    keys = [k for k in BASELINE_KEYS if k in frame.columns]
    base = frame[(frame.method == "recompute") & (frame.status == "ok")]
    base = base[keys + ["ppl", "tpot_ms"]].rename(columns={"ppl": "baseline_ppl", "tpot_ms": "baseline_tpot_ms"})
    base = base.drop_duplicates(subset=keys, keep="last")
    return _add_deltas(frame.merge(base, on=keys, how="left"))


def _add_deltas(frame: pd.DataFrame) -> pd.DataFrame:
    """delta PPL % and speedup from the merged `baseline_ppl` and `baseline_tpot_ms` columns."""
    frame["delta_ppl_pct"] = (frame.ppl / frame.baseline_ppl - 1) * 100
    frame["speedup"] = frame.baseline_tpot_ms / frame.tpot_ms
    return frame


def label(row) -> str:
    name = row.method + (" (original positions)" if getattr(row, "positions", "cache") == "original" else "")
    if row.method in LAZY_METHODS and row.compress_every != 1:
        return f"{name} K={row.compress_every}"
    return name


def method_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The comparison table: one row per run with the columns a paper's method table needs."""
    out = with_baseline(frame)
    out.insert(0, "run", out.apply(label, axis=1))
    cols = ["run", "status", "sink", "window", "compress_every", "ppl", "delta_ppl_pct", "tpot_ms", "tpot_steady_ms",
            "speedup", "kv_len_min", "kv_len_mean", "kv_len_max", "n_prunes", "tokens_dropped", "error"]
    return out[cols]


def _cell(v) -> str:
    if isinstance(v, float):
        return "" if pd.isna(v) else f"{v:.3f}"
    return "" if v is None else str(v).replace("|", "\\|")


def to_markdown(frame: pd.DataFrame, cell=_cell) -> str:
    """A plain markdown table (pandas' own needs a newer tabulate than snakemake allows); `cell` formats a value."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def markdown(paths) -> str:
    return to_markdown(method_table(load_results(paths)))


def pipeline_summary(rows) -> pd.DataFrame:
    """The pipeline's summary: one row per report row (a result can fill several), baseline columns merged.

    `rows` holds `[path, model_key, text_key, labels]` with labels `(group, name, order)`;
    the row of group "baseline" of each (model, text) is what the others are compared with.
    """
    results = load_results([r[0] for r in rows]).set_index("file")
    out = []
    for path, model_key, text_key, labels in rows:
        for group, name, order in labels:
            out.append({"model_key": model_key, "text_key": text_key, "group": group, "name": name, "order": order,
                        **results.loc[str(path)].to_dict(), "file": str(path)})
    frame = pd.DataFrame(out)
    base = frame[frame.group == "baseline"][["model_key", "text_key", "ppl", "tpot_ms", "status"]]
    base = base.rename(columns={"ppl": "baseline_ppl", "tpot_ms": "baseline_tpot_ms", "status": "baseline_status"})
    frame = _add_deltas(frame.merge(base, on=["model_key", "text_key"], how="left"))
    frame["label"] = frame.apply(label, axis=1)
    return frame.sort_values(["model_key", "text_key", "group", "order"], kind="stable").reset_index(drop=True)


def trace_path(result_file: str) -> str:
    return str(result_file).removesuffix(".json") + ".parquet"


def spike_diagnosis(frame: pd.DataFrame, horizon: int = 32, threshold: float = 0.1):
    """Spike metrics of every finished run against its baseline's per-token NLL.

    Returns the frame with the `spikes.SPIKE_COLUMNS` added, the per-event table and the
    mean-excess-by-steps-since-prune curves (both keyed by result `file`).
    """
    from .spikes import SPIKE_COLUMNS, diagnose

    baselines = {(r.model_key, r.text_key): r.file for r in frame[frame.group == "baseline"].itertuples()}
    metrics, events, curves, traces = {}, [], [], {}

    def trace(path):
        if path not in traces:
            traces[path] = pd.read_parquet(trace_path(path))
        return traces[path]

    for row in frame.drop_duplicates("file").itertuples():
        base = baselines.get((row.model_key, row.text_key))
        if row.status != "ok" or row.group == "baseline" or base is None or row.baseline_status != "ok":
            continue
        summary, ev, curve = diagnose(trace(row.file), trace(base), horizon, threshold)
        metrics[row.file] = summary
        events.append(ev.assign(file=row.file))
        curves.append(curve.assign(file=row.file))
    spikes = pd.DataFrame.from_dict(metrics, orient="index", columns=list(SPIKE_COLUMNS))
    frame = frame.drop(columns=[c for c in SPIKE_COLUMNS if c in frame]).merge(
        spikes, left_on="file", right_index=True, how="left")
    events = pd.concat(events, ignore_index=True) if events else pd.DataFrame(columns=["file"])
    curves = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["file"])
    return frame, events, curves
