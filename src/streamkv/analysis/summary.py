"""Results to tables: one row per run, compared with its recompute baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from streamkv import methods
from streamkv.analysis.fmt import to_markdown
from streamkv.analysis.grid import NAMED_ROWS, RUN_KEYS
from streamkv.errors import StreamkvError
from streamkv.evaluation.params import LAZY_METHODS, SINK_LAYERS, WEIGHTS

ROW_GROUPS = ("methods", "peers")  # rows the config names itself (method table, peers): shown under their own names

# A run is compared with the recompute baseline that scored the same tokens under the same budget (and the
# same sink: see `baseline_of`).
BASELINE_KEYS = ("model", "text", "cap", "max_tokens", "prefill", "dtype", "device")
RESULT_KEYS = ("status", "error", "params", "metrics")  # what every result file holds


def read_result(path, rerun: str | None = None) -> dict:
    """One result file's record, or an error that names the file and says what is wrong with it.

    `rerun`: how to write the file again (with `{path}`), the fix a broken file's message gives; by default the
    command line's (run it again, or leave it out).
    """
    fix = rerun.format(path=path) if rerun else None  # (None: the command line's fixes, below)
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise StreamkvError(f"cannot read result file '{path}': {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise StreamkvError(f"'{path}' is not a streamkv result: it is not UTF-8 JSON text; "
                            f"{fix or 'pass the files `streamkv eval --out` writes'}") from None
    except json.JSONDecodeError as exc:
        raise StreamkvError(f"result file '{path}' is not valid JSON ({exc.msg} at line {exc.lineno}, column "
                            f"{exc.colno}); it may have been cut short: "
                            f"{fix or 'run it again or leave it out'}") from None
    missing = [k for k in RESULT_KEYS if k not in record] if isinstance(record, dict) else list(RESULT_KEYS)
    if not missing:
        missing = [name for name, there in (("params.method", isinstance(record["params"], dict)
                                             and "method" in record["params"]),
                                            ("metrics", isinstance(record["metrics"], dict))) if not there]
    if missing:
        raise StreamkvError(f"'{path}' is not a streamkv result (it has no {', '.join(missing)}); "
                            f"{fix or 'pass the files `streamkv eval --out` writes'}")
    return record


def load_results(paths, rerun: str | None = None) -> pd.DataFrame:
    """Flatten result JSON files into a frame: params, metrics, status, error, source file (`rerun`: see
    `read_result`)."""
    rows = []
    for path in paths:
        record = read_result(path, rerun)
        meta = record.get("meta") or {}
        row = {**record["params"], **record["metrics"], "status": record["status"], "error": record["error"],
               "file": str(path), **{f"meta_{k}": v for k, v in meta.items() if k != "versions"},
               "meta_versions": json.dumps(meta.get("versions", {}), sort_keys=True)}
        rows.append(row)
    frame = pd.DataFrame(rows)
    # (results written before the weights variants existed ran the weights as loaded; those from before sink_layers
    # ran models without sliding layers, where every setting of it is the default's)
    frame["weights"] = frame["weights"].fillna(WEIGHTS[0]) if "weights" in frame else WEIGHTS[0]
    frame["sink_layers"] = frame["sink_layers"].fillna(SINK_LAYERS[0]) if "sink_layers" in frame else SINK_LAYERS[0]
    return frame


def _equal(column: pd.Series, value) -> pd.Series:
    """Where `column` equals `value`, a missing value (None, NaN) equal to a missing one."""
    return (column == value) | (column.isna() & pd.isna(value))


def baseline_of(run: dict, frame: pd.DataFrame) -> str | None:
    """The file of `run`'s recompute baseline among the rows of `frame`, None if it has none.

    The baseline is the finished recompute run with the same tokens and budget (`BASELINE_KEYS`) and the same
    sink, since recompute keeps sinks as a Start+Recent cache does.  A run that keeps no sinks by design (dense,
    window) takes the one at its own sink if there is one, else the one at recompute's default sink, as
    `streamkv eval --method recompute` runs it.  Two baselines that both fit are an error: the table would
    depend on which came last.
    """
    rows = frame[(frame.method == "recompute") & (frame.status == "ok")]
    for key in BASELINE_KEYS:
        if key in frame.columns:
            rows = rows[_equal(rows[key], run[key])]
    # the baseline with the run's own weights where there is one, else the one with the weights as loaded
    same = rows[rows.weights == run.get("weights", WEIGHTS[0])]
    rows = same if not same.empty else rows[rows.weights == WEIGHTS[0]]
    found = rows[_equal(rows.sink, run["sink"])]
    method = methods.REGISTRY.get(run["method"])
    if found.empty and method is not None and (method.dense or method.sinkless):
        found = rows[rows.sink == methods.get("recompute").default_sink]
    if len(found) > 1:
        setting = ", ".join(f"{k} {run[k]}" for k in ("cap", "sink", "max_tokens", "prefill") if k in run)
        raise StreamkvError(f"{len(found)} recompute baselines fit '{run['file']}' ({setting}): "
                            f"{', '.join(found.file)}; summarize only one of them")
    return None if found.empty else found.file.iloc[0]


def with_baseline(frame: pd.DataFrame) -> pd.DataFrame:
    """Add `baseline` (its file), `delta_ppl_pct` and `speedup` against each run's recompute baseline (see
    `baseline_of`; "none" and NaN where there is none)."""
    frame = frame.copy()
    frame["baseline"] = [baseline_of(run, frame) for run in frame.to_dict("records")]
    base = frame[["file", "ppl", "tpot_ms"]].drop_duplicates("file").rename(
        columns={"file": "baseline", "ppl": "baseline_ppl", "tpot_ms": "baseline_tpot_ms"})
    out = _add_deltas(frame.merge(base, on="baseline", how="left"))
    out["baseline"] = out.baseline.fillna("none")
    return out


def _add_deltas(frame: pd.DataFrame) -> pd.DataFrame:
    """delta PPL % and speedup from the merged `baseline_*` columns.

    Where both were timed against the no-eviction reference, the speedup is the ratio of their ratios (the drift
    between the two jobs cancels); otherwise the ratio of their TPOTs.
    """
    frame["delta_ppl_pct"] = (frame.ppl / frame.baseline_ppl - 1) * 100
    frame["speedup"] = frame.baseline_tpot_ms / frame.tpot_ms
    if "tpot_ratio" in frame and "baseline_tpot_ratio" in frame:
        relative = (pd.to_numeric(frame.baseline_tpot_ratio, errors="coerce")
                    / pd.to_numeric(frame.tpot_ratio, errors="coerce"))
        frame["speedup"] = relative.where(relative.notna(), frame.speedup)
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
            "speedup", "kv_len_min", "kv_len_mean", "kv_len_max", "n_prunes", "tokens_dropped", "baseline", "error"]
    return out[cols]


def markdown(paths) -> str:
    return to_markdown(method_table(load_results(dict.fromkeys(paths))))  # (a file named twice is one run)


def pipeline_summary(rows) -> pd.DataFrame:
    """The pipeline's summary: one row per report row (a result can fill several), baseline columns merged.

    `rows` holds `[path, model_key, text_key, labels]` with labels `(group, name, order)`;
    the row of group "baseline" of each (model, text) is what the others are compared with.
    """
    results = load_results([r[0] for r in rows], rerun="run its job again: snakemake --forcerun {path}")
    results = results.set_index("file")
    out = []
    for path, model_key, text_key, labels in rows:
        for group, name, order in labels:
            out.append({"model_key": model_key, "text_key": text_key, "group": group, "name": name, "order": order,
                        **results.loc[str(path)].to_dict(), "file": str(path)})
    frame = pd.DataFrame(out)
    if "tpot_ratio" not in frame:  # results from before the interleaved timing
        frame["tpot_ratio"] = float("nan")
    base = frame[frame.group == "baseline"][["model_key", "text_key", "ppl", "tpot_ms", "tpot_ratio", "status"]]
    base = base.rename(columns={"ppl": "baseline_ppl", "tpot_ms": "baseline_tpot_ms",
                                "tpot_ratio": "baseline_tpot_ratio", "status": "baseline_status"})
    frame = _add_deltas(frame.merge(base, on=["model_key", "text_key"], how="left"))
    other_budget = frame.cap != frame.groupby(["model_key", "text_key"]).cap.transform(
        lambda caps: caps[frame.loc[caps.index, "group"] == "baseline"].max())
    frame.loc[other_budget, ["delta_ppl_pct", "speedup"]] = float("nan")  # a sweep's own cap: no baseline for it
    frame["label"] = frame.apply(label, axis=1)
    return frame.sort_values(["model_key", "text_key", "group", "order"], kind="stable").reset_index(drop=True)


def trace_path(result_file: str) -> str:
    return str(result_file).removesuffix(".json") + ".parquet"


def reference_rows(frame: pd.DataFrame, reference: str | None) -> dict:
    """(model_key, text_key) -> the finished row named `reference` (the full-coverage reference), where it ran."""
    if not reference:
        return {}
    rows = frame[(frame.group == "methods") & (frame.name == reference) & (frame.status == "ok")]
    return {(r.model_key, r.text_key): r for r in rows.itertuples()}


def dense_rows(frame: pd.DataFrame) -> dict:
    """(model_key, text_key) -> the finished dense row of the method table (no eviction), where there is one."""
    dense = [m for m, record in methods.REGISTRY.items() if record.dense and record.family == "cache"]
    rows = frame[(frame.group == "methods") & frame.method.isin(dense) & (frame.status == "ok")]
    return {(r.model_key, r.text_key): r for r in rows.drop_duplicates(["model_key", "text_key"]).itertuples()}


# Spike columns: against the full-coverage reference (`spike_*`) and against the dense row (`dense_spike_*`).
DENSE_PREFIX = "dense_"


def spike_diagnosis(frame: pd.DataFrame, reference: str | None = None, horizon: int = 32, threshold: float = 0.1,
                    traces=None):
    """Spike metrics of every finished run against the full-coverage reference's per-token NLL, and against the
    dense row's where there is one, each on the targets both scored.

    The reference is compared with rows at its own cap only (a sweep's own budget is another comparison); the
    dense row, which evicts nothing, with every row.  Returns the frame with the `spikes.SPIKE_COLUMNS` added
    (and the same prefixed `dense_`), the per-event table and the mean-excess-by-steps-since-prune curves (both
    keyed by result `file` and `against`: "reference" or "dense").
    """
    from streamkv.analysis.spikes import SPIKE_COLUMNS, diagnose

    traces = traces or _Traces(("position", "nll", "step", "pruned", "dropped", "prune_kind"))
    anchors = {"reference": reference_rows(frame, reference), "dense": dense_rows(frame)}
    metrics, events, curves = {"reference": {}, "dense": {}}, [], []
    for row in frame.drop_duplicates("file").itertuples():
        if row.status != "ok" or row.group == "baseline":
            continue
        for against, rows in anchors.items():
            ref = rows.get((row.model_key, row.text_key))
            if ref is None or (against == "reference" and row.cap != ref.cap):
                continue
            summary, ev, curve = diagnose(traces(row.file), traces(ref.file), horizon, threshold)
            metrics[against][row.file] = summary
            events.append(ev.assign(file=row.file, against=against))
            curves.append(curve.assign(file=row.file, against=against))
    frame = frame.drop(columns=[c for c in frame if c.removeprefix(DENSE_PREFIX) in SPIKE_COLUMNS])
    for against, prefix in (("reference", ""), ("dense", DENSE_PREFIX)):
        spikes = pd.DataFrame.from_dict(metrics[against], orient="index", columns=list(SPIKE_COLUMNS))
        frame = frame.merge(spikes.add_prefix(prefix), left_on="file", right_index=True, how="left")
    events = pd.concat(events, ignore_index=True) if events else pd.DataFrame(columns=["file", "against"])
    curves = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["file", "against"])
    return frame, events, curves


# ----------------------------------------------------------------------------- intervals

# The parameters that tell two rows of one sweep apart (the swept ones differ, the rest are equal).
RUN_PARAMS = tuple(k for k in RUN_KEYS if k != "profile")  # (a synchronised timer changes no NLL)
COMPARISON_COLUMNS = ("model_key", "text_key", "kind", "group", "a", "b", "claim", "expect", "margin", "n", "blocks",
                      "block", "status", "mean", "lo", "hi", "pct", "pct_lo", "pct_hi", "level", "p", "p_opposite",
                      "verdict", "text")


def claim_margin(finding: dict) -> float:
    """A finding's margin (PPL %): its own, else the default of its kind; NaN for a superiority claim."""
    from streamkv.analysis.stats import DEFAULT_MARGIN

    return float(finding.get("margin", DEFAULT_MARGIN.get(finding["expect"], math.nan)))


def _difference_row(d, expect: str = "", margin: float = math.nan, **keys) -> dict:
    p, p_opposite = d.p_values(expect, margin) if expect else (math.nan, math.nan)
    return {**keys, "expect": expect, "margin": margin, "n": d.n, "blocks": d.blocks, "block": d.block,
            "status": d.status,
            "mean": d.mean, "lo": d.lo, "hi": d.hi, "pct": d.pct, "pct_lo": d.pct_lo, "pct_hi": d.pct_hi,
            "level": d.level, "p": p, "p_opposite": p_opposite, "verdict": d.verdict, "text": d.text()}


class _Traces:
    """Per-token traces read once each (the columns asked for)."""

    def __init__(self, columns=("position", "nll")):
        self.cache, self.columns = {}, list(columns)

    def __call__(self, result_file: str) -> pd.DataFrame:
        if result_file not in self.cache:
            self.cache[result_file] = pd.read_parquet(trace_path(result_file), columns=self.columns)
        return self.cache[result_file]


def _against(frame: pd.DataFrame, anchors: dict, prefix: str, n_col: str, bootstrap: dict | None,
             traces) -> pd.DataFrame:
    """Every finished row against the anchor row of its (model, text) (`anchors`), paired on the targets both
    scored: `{prefix}_pct` (PPL change, %), `_lo`, `_hi`, `_status` (`stats.Difference.status`), `_blocks`,
    `_block` (positions per block), and `n_col` (the paired targets).  NaN where the row failed, has no anchor or
    another cap."""
    from streamkv.analysis.stats import compare

    cols = {f"{prefix}_{k}": [] for k in ("pct", "lo", "hi", "status", "blocks", "block")}
    cols[n_col] = []
    for row in frame.itertuples():
        anchor = anchors.get((row.model_key, row.text_key))
        if row.status != "ok" or anchor is None or row.cap != anchor.cap:
            values = (math.nan, math.nan, math.nan, None, None, None, None)
        else:
            d = compare(traces(row.file), traces(anchor.file), **(bootstrap or {}))
            values = (d.pct, d.pct_lo, d.pct_hi, d.status, d.blocks, d.block, d.n)
        for name, value in zip(cols, values):
            cols[name].append(value)
    frame = frame.copy()
    for name, values in cols.items():
        frame[name] = values
    return frame


def with_intervals(frame: pd.DataFrame, bootstrap: dict | None = None, traces=None,
                   reference: str | None = None) -> pd.DataFrame:
    """Every row's delta PPL against its baseline and against the full-coverage reference, each paired on the
    targets both scored, with its interval (blocks of positions, `stats.block_bootstrap`).

    Against the baseline: `delta_ppl_pct` (recomputed on the paired targets), `delta_ppl_lo`, `delta_ppl_hi`,
    `delta_ppl_status`, `delta_ppl_blocks`, `n_paired` (the baseline row itself is "identical").  Against the row named
    `reference` (a method row scored on every target, e.g. strict StreamingLLM): `delta_ref_pct`, `_lo`, `_hi`,
    `_status`, `_blocks`, `n_ref`, and `reference` (its name); the reference row itself is "identical".
    """
    traces = traces or _Traces()
    base = {(r.model_key, r.text_key): r
            for r in frame[(frame.group == "baseline") & (frame.status == "ok")].itertuples()}
    out = _against(frame, base, "delta_ppl", "n_paired", bootstrap, traces)
    out = _against(out, reference_rows(frame, reference), "delta_ref", "n_ref", bootstrap, traces)
    out["reference"] = reference or ""
    return out


def _params(row) -> dict:
    return {k: getattr(row, k) for k in RUN_PARAMS}


def _partner(rows: pd.DataFrame, row, change: dict):
    """The row of `rows` with `row`'s parameters but those in `change`."""
    want = {**_params(row), **change}
    for other in rows.itertuples():
        if all(_same(getattr(other, k), v) for k, v in want.items()):
            return other
    return None


def _same(x, y) -> bool:
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    try:
        return x == y or float(x) == float(y)
    except (TypeError, ValueError):
        return False


def _matches(row, spec: dict) -> bool:
    return all(_same(getattr(row, k), v) for k, v in spec.items())


def sweep_pairs(part: pd.DataFrame, a: dict, b: dict) -> list[tuple]:
    """(row a, row b) of one sweep: every finished row whose swept values match `a`, with the row that differs
    from it only in the values of `b`."""
    ok = part[part.status == "ok"]
    pairs = []
    for row in ok.itertuples():
        if _matches(row, a):
            other = _partner(ok, row, b)
            if other is not None and other.file != row.file:
                pairs.append((row, other))
    return pairs


def named_pairs(part: pd.DataFrame, a: str, b: str) -> list[tuple]:
    """[(row a, row b)]: the finished rows of the method table or the peers named `a` and `b`, if both are."""
    ok = part[(part.status == "ok") & part.group.isin(("methods", "peers"))]
    ra, rb = (next(ok[ok.name == name].itertuples(), None) for name in (a, b))
    return [(ra, rb)] if ra is not None and rb is not None else []


def comparisons(frame: pd.DataFrame, controls: dict, findings: list, bootstrap: dict | None = None,
                traces=None) -> pd.DataFrame:
    """Intervals of every sweep point against its control, and of the findings' pairs.

    `controls`: sweep group (e.g. "ablation:sink") -> the swept values of its control (e.g. {"sink": 4}).
    `findings`: [{"claim", "group", "a": {...}, "b": {...}, "expect": "higher"|"lower"|"noninferior"|"equivalent",
    "margin": PPL %, "texts": [...], "models": [...]}] (`stats.claim_p_values` says what each kind tests);
    a group of "rows" pairs two named rows ({"name": ...}) of the method table or the peers.
    """
    from streamkv.analysis.stats import compare

    traces = traces or _Traces()
    out = []
    for (model_key, text_key), part in frame.groupby(["model_key", "text_key"], sort=False):
        for group, ctl in controls.items():
            rows = part[part.group == group]
            ok = rows[rows.status == "ok"]
            for row in ok.itertuples():
                if _matches(row, ctl):
                    continue
                other = _partner(ok, row, ctl)
                if other is None:
                    continue
                d = compare(traces(row.file), traces(other.file), **(bootstrap or {}))
                out.append(_difference_row(d, model_key=model_key, text_key=text_key, kind="control", group=group,
                                           a=row.name, b=other.name, claim=""))
        for f in findings:
            if (f.get("texts") and text_key not in f["texts"]) or (f.get("models") and model_key not in f["models"]):
                continue
            pairs = (named_pairs(part, f["a"]["name"], f["b"]["name"]) if f["group"] == NAMED_ROWS
                     else sweep_pairs(part[part.group == f["group"]], f["a"], f["b"]))
            for ra, rb in pairs:
                d = compare(traces(ra.file), traces(rb.file), **(bootstrap or {}))
                out.append(_difference_row(d, f["expect"], claim_margin(f), model_key=model_key,
                                           text_key=text_key, kind="finding", group=f["group"], a=ra.name,
                                           b=rb.name, claim=f["claim"]))
    return pd.DataFrame(out, columns=list(COMPARISON_COLUMNS))
