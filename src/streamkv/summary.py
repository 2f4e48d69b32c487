"""Results to tables: one row per run, compared with its recompute baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

# A run is compared with the recompute baseline that scored the same tokens under the same budget.
BASELINE_KEYS = ("model", "text", "cap", "max_tokens", "prefill", "dtype", "device")


def load_results(paths) -> pd.DataFrame:
    """Flatten result JSON files into a frame: params, metrics, status, error, source file."""
    rows = []
    for path in paths:
        record = json.loads(Path(path).read_text())
        row = {**record["params"], **record["metrics"], "status": record["status"], "error": record["error"],
               "file": str(path)}
        rows.append(row)
    return pd.DataFrame(rows)


def with_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Add `delta_ppl_pct` and `speedup` against the recompute row of the same setting (NaN where there is none)."""
    keys = [k for k in BASELINE_KEYS if k in frame.columns]
    base = frame[(frame.method == "recompute") & (frame.status == "ok")]
    base = base[keys + ["ppl", "tpot_ms"]].rename(columns={"ppl": "baseline_ppl", "tpot_ms": "baseline_tpot_ms"})
    base = base.drop_duplicates(subset=keys, keep="last")
    out = frame.merge(base, on=keys, how="left")
    out["delta_ppl_pct"] = (out.ppl / out.baseline_ppl - 1) * 100
    out["speedup"] = out.baseline_tpot_ms / out.tpot_ms
    return out


def label(row) -> str:
    if row.method in ("start_recent", "window") and row.compress_every != 1:
        return f"{row.method} K={row.compress_every}"
    return row.method


def method_table(frame: pd.DataFrame) -> pd.DataFrame:
    """The comparison table: one row per run with the columns a paper's method table needs."""
    out = with_baseline(frame)
    out.insert(0, "run", out.apply(label, axis=1))
    cols = ["run", "status", "sink", "window", "compress_every", "ppl", "delta_ppl_pct", "tpot_ms", "tpot_steady_ms",
            "speedup", "kv_len_min", "kv_len_mean", "kv_len_max", "n_prunes", "tokens_dropped", "error"]
    return out[cols]


def markdown(paths) -> str:
    return method_table(load_results(paths)).to_markdown(index=False, floatfmt=".3f")
