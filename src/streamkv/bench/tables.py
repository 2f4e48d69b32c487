"""The tables and findings of `streamkv bench` (torch-free): the command and the pipeline's Performance section
print them; the rows' names and the goals they are read against are `streamkv.bench.goals`'."""

from __future__ import annotations

import numpy as np
import pandas as pd

from streamkv.analysis import fmt
from streamkv.analysis.fmt import to_markdown
from streamkv.bench.goals import EVALUATOR_GOAL, LAZY, REFERENCE, STRICT, llamacpp_shift, verdict
from streamkv.evaluation.params import RING_STATIC


def _bench_cell(v) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return ""
    if isinstance(v, bool):
        return "yes" if v else "**no**"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v).replace("|", "\\|")


def _ratio_ci(frame: pd.DataFrame, column: str) -> pd.Series:
    """'value [lo, hi]' of a bench ratio and its 95 % interval over paired steps ('' where there is no value)."""
    def cell(row) -> str:
        return fmt.ratio(row.get(column), row.get(f"{column}_lo"), row.get(f"{column}_hi"), empty="")

    return frame.apply(cell, axis=1)


def bench_overhead_table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame = frame.assign(met=frame.met.astype(object).where(frame.met.notna(), None),
                         overhead=_ratio_ci(frame, "overhead"), speedup=_ratio_ci(frame, "speedup"))
    return frame.reindex(columns=["cap", "method", "tpot_ms", "overhead", "cache_work", "speedup", "forward_ms",
                                  "update_ms", "plan_ms", "goal", "met"]).rename(
        columns={"tpot_ms": "TPOT ms", "overhead": "x no-eviction [95 % CI]", "cache_work": "cache work / step",
                 "speedup": "speedup vs recompute [95 % CI]", "met": "verdict",
                 "forward_ms": "forward ms", "update_ms": "cache update ms", "plan_ms": "planning ms"})


def _compiled_step(method: str) -> str:
    return "the ring's fixed-shape step" if method == RING_STATIC else f"{method}'s general step"


def bench_compile_table(rows: list[dict]) -> pd.DataFrame:
    cols = ["cap", "method", "mode", "status", "eager_ms", "compiled_ms", "ratio", "nll_max_abs_diff", "compile_sec",
            "graphs_first_steps", "graphs_after_warmup", "graph_breaks", "error"]
    frame = pd.DataFrame([{"method": RING_STATIC, **r} for r in rows]).reindex(columns=cols)  # (older results:
    # the ring's fixed-shape step only)
    return frame.rename(columns={"eager_ms": "eager TPOT ms", "compiled_ms": "compiled TPOT ms",
                                 "ratio": "compiled / eager", "nll_max_abs_diff": "max abs dNLL",
                                 "compile_sec": "first step s", "graphs_first_steps": "graphs (warm-up)",
                                 "graphs_after_warmup": "graphs after warm-up", "graph_breaks": "graph breaks"})


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


def bench_failures(result: dict) -> dict[str, str]:
    """Each failed section of a bench result -> its error on one line, shortened (results without
    section statuses, from before they were recorded, have none)."""
    out = {}
    for name, section in (result.get("sections") or {}).items():
        if section["status"] == "failed":
            error = " ".join(str(section.get("error") or "no error recorded").split())
            out[name] = error if len(error) <= 500 else error[:499] + "…"
    return out


def bench_markdown(result: dict) -> str:
    """The tables of a `streamkv bench` result as markdown (what the command prints, the Performance section).

    A failed section is a line with its error (its table follows with the rows it finished, if any); a
    section still running is one the run never finished (its file was written before it stopped).
    """
    parts = []
    for name, error in bench_failures(result).items():
        parts += [f"**Section {name} failed:** {_bench_cell(error)}", ""]
    for name, section in (result.get("sections") or {}).items():
        if section["status"] == "running":
            parts += [f"**Section {name} did not finish** (the run stopped during it).", ""]
    if result["overhead"]:
        parts += ["Eviction overhead, speedup and time split (medians of block means, methods interleaved):", "",
                  to_markdown(bench_overhead_table(result["overhead"]), _bench_cell), ""]
        parts += [f"**Row {r['method']} at cap {r['cap']} failed:** {_bench_cell(_error_cell(r['error']))}"
                  for r in result["overhead"] if r.get("status") == "failed"]
        parts += [""] * any(r.get("status") == "failed" for r in result["overhead"])
    if result["compile"]:
        parts += ["Decode steps, torch.compile vs eager (graphs: compiled in the first two steps and after them; "
                  "a step that keeps recompiling falls back to eager at dynamo's recompile limit):", "",
                  to_markdown(bench_compile_table(result["compile"]), _bench_cell), ""]
    if result.get("evaluator"):
        parts += ["The parallel evaluator against the decode loop, same method, same tokens (each whole run):", "",
                  to_markdown(bench_evaluator_table(result["evaluator"]), _bench_cell), ""]
    if result.get("weights"):
        parts += ["Weights variants: the ring's fixed-shape step, eager and compiled, against float32 eager and "
                  "llama.cpp's own decode over the same KV length (medians of block means, interleaved):", "",
                  to_markdown(bench_weights_table(result["weights"]), _bench_cell), ""]
    if result["memory"]:
        parts += ["Memory over a long stream (KV bytes once the cache is full; process RSS; median step time of the "
                  "first and last 256 steps, or halves of a shorter stream):", "",
                  to_markdown(bench_memory_table(result["memory"]), _bench_cell), ""]
    return "\n".join(parts)


def bench_evaluator_table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return pd.DataFrame({"cap": frame.cap, "method": frame.method, "tokens": frame.tokens,
                         "parallel tok/s": frame.parallel_tok_s, "decode loop tok/s": frame.decode_tok_s,
                         "speedup": frame.speedup,
                         "max abs dNLL": frame.nll_max_abs_diff.map(lambda v: f"{v:.1e}")})


def bench_weights_table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows).reindex(columns=["cap", "variant", "status", "tpot_ms", "vs_float32", "vs_float32_lo",
                                                "vs_float32_hi", "vs_llamacpp", "vs_llamacpp_lo", "vs_llamacpp_hi",
                                                "nll_mean", "best", "goal", "met", "error"])
    return pd.DataFrame({
        "cap": frame.cap, "variant": frame.variant, "status": frame.status, "TPOT ms": frame.tpot_ms,
        "x float32 eager [95 % CI]": _ratio_ci(frame, "vs_float32"),
        "x llama.cpp [95 % CI]": _ratio_ci(frame, "vs_llamacpp"),
        "mean NLL (timed steps)": frame.nll_mean,
        "fastest": frame.best.map(lambda v: "yes" if v is True else ""),
        "goal": frame.goal.where(frame.goal.notna(), None), "verdict": frame.met.where(frame.met.notna(), None),
        "error": frame.error.map(_error_cell)})


def _error_cell(error, limit: int = 300) -> str | None:
    """An error as one table cell: its lines joined, cut at `limit` characters (the result keeps all of it)."""
    if not isinstance(error, str):
        return None
    text = " ".join(error.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _bench_interval(row: dict, column: str) -> str:
    """The interval of a ratio the sentence already gives: "[lo, hi]", "(identical)" or "(no interval)"."""
    return fmt.ratio_interval(row.get(f"{column}_lo"), row.get(f"{column}_hi"))


def bench_findings(result: dict) -> list[str]:
    """One line per goal of the benchmark, in numbers."""
    lines = []
    for row in result.get("evaluator") or []:
        met = verdict(row["speedup"], row["speedup"], EVALUATOR_GOAL, ">=")  # (one measurement: no interval)
        lines.append(f"parallel evaluator, {row['method']} at cap {row['cap']} over {row['tokens']} tokens: "
                     f"{row['parallel_tok_s']:.0f} tokens/s against the decode loop's {row['decode_tok_s']:.1f}, "
                     f"{row['speedup']:.1f}x (goal >= {EVALUATOR_GOAL:g}x: {met}), max |dNLL| "
                     f"{row['nll_max_abs_diff']:.1e}")
    for cap in sorted({row["cap"] for row in result["overhead"]}):
        rows = {row["method"]: row for row in result["overhead"] if row["cap"] == cap}
        ideal = rows.get(REFERENCE, {}).get("speedup")
        for method, row in rows.items():
            if not row.get("goal"):
                continue
            lines.append(f"cap {cap}, {method}: x{row['overhead']:.3f} {_bench_interval(row, 'overhead')} "
                         f"the no-eviction forward, {row['speedup']:.2f}x {_bench_interval(row, 'speedup')} "
                         f"faster than recompute (ideal {ideal:.2f}x); goal {row['goal']}: {row.get('met') or ''}")
        for method, row in rows.items():
            if row.get("status") == "failed":  # a peer whose worker died, hung or did not start
                lines.append(f"cap {cap}, {method} failed: {_error_cell(row['error'])}")
        for k, ours in ((1, STRICT), (result["config"]["compress_every"], LAZY)):
            peer = rows.get(llamacpp_shift(k))
            if peer and ours in rows and peer.get("overhead") is not None:
                lines.append(f"cap {cap}, {peer['method']}: x{peer['overhead']:.3f} llama.cpp's own decode without a "
                             f"shift, where our {ours} is x{rows[ours]['overhead']:.3f} our no-eviction forward")
    for c in result["compile"]:
        step = _compiled_step(c.get("method", RING_STATIC))
        if c["status"] == "ok":
            breaks = f", {c['graph_breaks']} graph breaks" if c.get("graph_breaks") else ""
            lines.append(f"torch.compile ({c['mode']}) of {step} at cap {c['cap']}: TPOT "
                         f"x{c['ratio']:.3f} of eager, max |dNLL| {c['nll_max_abs_diff']:.1e}, "
                         f"{c['graphs_first_steps']} graphs in the first steps, {c['graphs_after_warmup']} compiled "
                         f"after warm-up{breaks} (first step {c['compile_sec']:.0f} s)")
        else:
            lines.append(f"torch.compile ({c['mode']}) of {step} failed: {c['error']}")
    for row in result.get("weights") or []:
        if row.get("best"):
            engine = (f", x{row['vs_llamacpp']:.2f} {_bench_interval(row, 'vs_llamacpp')} llama.cpp's decode; goal "
                      f"{row['goal']}: {row['met']}" if row.get("goal") else ", llama.cpp not installed: no goal")
            lines.append(f"fastest weights variant at cap {row['cap']}: {row['variant']}, {row['tpot_ms']:.1f} ms a "
                         f"step, x{row['vs_float32']:.3f} {_bench_interval(row, 'vs_float32')} float32 eager{engine}")
        elif row["status"] != "ok":
            lines.append(f"weights variant {row['variant']} failed: {_error_cell(row['error'])}")
    for m in result["memory"]:
        growth = "n/a" if m["rss_growth"] is None else f"{m['rss_growth'] * 100:+.2f} %"
        lines.append(f"{m['method']} over {m['tokens']} tokens: KV bytes max/min {m['kv_max_over_min']:.3f}, "
                     f"RSS {growth} from step {m['rss_from_step']} to the end")
    return lines
