"""`streamkv bench`: what eviction costs, as ratios measured side by side in one run.

Step times on a shared machine drift by +-10 % between runs, so every figure
here is a ratio of two things timed in the same run with their steps
interleaved (step t of every method, in a new seeded random order, then step t+1).  A
method's step time is the median, over blocks of `block` consecutive steps, of
the block's mean: a block holds a whole lazy period, so a lazy prune is
charged to the method instead of being hidden by a median of single steps.

* overhead: TPOT(method) / TPOT(reference).  The reference is the same forward
  over exactly `cap` keys with no eviction work (`SameLengthCache`: `cap`
  slots, each new token written into the last one; its logits are meaningless,
  its cost is the floor every cache pays; a lazy method attends to up to
  cap + K - 1 keys, so its ratio includes those extra keys);
  llama.cpp's rows (with peers) are another engine: their overhead is against
  llama.cpp's own decode over cap keys with no shift, and they have no speedup;
* speedup: TPOT(recompute) / TPOT(method); the ideal is TPOT(recompute) /
  TPOT(reference), a forward over the whole budget against one token;
* time split: the forward (everything but the cache), the cache update and
  its planning (policy, layout, counters), from the cache's own timers;
* compile: the ring's fixed-shape step through `torch.compile` against the
  same step eager (TPOT ratio, largest NLL difference, graphs compiled after
  warm-up), or the exact error if the stack refuses it;
* memory: over a long stream, the cache's bytes (min and max once it is
  full) and the process RSS from step `rss_from` to the end, per method;
* weights: the ring's fixed-shape step with each weights variant
  (`streamkv.weights`), eager and, for `weights_compile`, through
  `torch.compile`, against the float32 eager step and llama.cpp's own
  decode over cap keys (when installed), in one interleaved run; the
  fastest variant's TPOT against the goal of at most 2x llama.cpp's.

A section that raises is recorded as failed, with its error, and the others
still run; given a file, `run` rewrites it as each part of a section finishes,
so a run that dies later keeps what it had measured.
"""

from __future__ import annotations

import resource
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import meta, methods
from .bench_tables import (
    GOALS,
    LAZY,
    LLAMACPP,
    LLAMACPP_REFERENCE,
    RECOMPUTE,
    REFERENCE,
    SPEEDUP_GOAL,
    STRICT,
    llamacpp_shift,
)
from .cache import num_attention_layers
from .compiled import RingDecoder
from .errors import StreamkvError, error_text
from .extras import kvpress_python, llamacpp_version
from .factory import make_cache, make_stepper
from .jobio import write_json
from .params import BENCH_SECTIONS, RING_STATIC, BenchConfig, EvalParams
from .peers import LlamaCppStepper
from .sources import gguf_path
from .stepper import CachedStepper, Stepper
from .timing import SameLengthCache, block_median, interleave, step_ratio_interval


class _Decoder(Stepper):
    """A decoder (`ids -> logits`: a RingDecoder, a compiled forward) as a stepper; no cache timers inside it."""

    def __init__(self, decoder: Callable[[torch.Tensor], torch.Tensor]):
        self.decoder = decoder

    def forward(self, ids):
        return self.decoder(ids)

    def kv_bytes(self) -> int:
        return self.decoder.cache.nbytes()  # (a RingDecoder's)


def _gguf(source: str | None) -> Path | None:
    """The model's GGUF file, None where it has none (a model without one has no llama.cpp rows)."""
    try:
        return gguf_path(source) if source else None
    except StreamkvError:
        return None


def contenders(model, cap: int, sink: int, compress_every: int, peers: bool = False, source: str | None = None) -> dict:
    """Every method of the overhead table, each with its own state, built by the decode loop's factory.

    The two references are the bench's own: the no-eviction forward (`SameLengthCache`) and, with peers,
    llama.cpp's decode over cap keys without a shift.  With `peers`: kvpress rows where its environment is,
    llama.cpp rows where it is installed and the model (`source`) has a GGUF file.
    """
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def stepper(method: str, k: int = 1) -> Stepper:
        p = EvalParams(source or "-", "-", method, cap=cap, sink=sink, compress_every=k, max_tokens=cap, dtype=dtype)
        return make_stepper(model, p.resolved(), source)

    kvpress, llamacpp = {}, {}
    if peers and kvpress_python() and hasattr(model, "model"):
        kvpress = {f"kvpress streaming_llm K={k}": stepper("kvpress:streaming_llm", k) for k in (1, compress_every)}
    gguf = _gguf(source) if peers and llamacpp_version() else None
    if gguf is not None:
        llamacpp = {LLAMACPP_REFERENCE: LlamaCppStepper(gguf, "llamacpp:shift", cap, sink, 1, cap, reference=True),
                    **{llamacpp_shift(k): stepper("llamacpp:shift", k) for k in (1, compress_every)}}
    return {
        REFERENCE: CachedStepper(model, SameLengthCache(num_attention_layers(model), cap)),
        STRICT: stepper("start_recent"),
        LAZY: stepper("start_recent", compress_every),
        "mit": stepper("mit"),
        "ring": stepper("ring"),
        "ring lazy": stepper("ring", compress_every),
        "ring (fixed shapes)": _Decoder(RingDecoder(model, make_cache("ring", model, cap=cap, sink=sink))),
        **kvpress,
        **llamacpp,
        RECOMPUTE: stepper("recompute"),
    }


@torch.inference_mode()
def overhead(model, tokens: list[int], cap: int, cfg: BenchConfig, progress: bool = True,
             source: str | None = None) -> pd.DataFrame:
    """The overhead, speedup and time-split table at one cap (`source`: the model's, for the peers' rows)."""
    device = next(model.parameters()).device
    n = cfg.warmup + cfg.blocks * cfg.block
    if len(tokens) < cap + n:
        raise StreamkvError(f"the bench needs {cap + n} tokens of text at cap {cap}, the text has {len(tokens)}")
    ids = torch.tensor(tokens[: cap + n], device=device).unsqueeze(0)
    steppers = contenders(model, cap, cfg.sink, cfg.compress_every, peers=cfg.peers, source=source)
    names = list(steppers)
    for stepper in steppers.values():
        stepper.forward(ids[:, :cap])
    update_ms = {m: np.full(n, np.nan) for m in names}
    plan_ms = {m: np.full(n, np.nan) for m in names}

    def after(i, name, stepper, logits):  # the cache's own timers of the forward just run
        update_ms[name][i], plan_ms[name][i] = stepper.update_ms, stepper.plan_ms

    step_ms = interleave(steppers, ids, cap, n, skip=lambda i, name: name == RECOMPUTE and i % cfg.recompute_every,
                         after=after, desc=f"overhead cap {cap}", progress=progress)
    for stepper in steppers.values():
        stepper.close()  # (a peer's worker)
    # The intervals of the ratios resample paired steps (`_interval`): step i of every method ran side by side.
    rows = []
    for name in names:
        tpot = block_median(step_ms[name][cfg.warmup:], cfg.block)
        update = block_median(update_ms[name][cfg.warmup:], cfg.block)
        plan = block_median(plan_ms[name][cfg.warmup:], cfg.block)
        rows.append({"cap": cap, "method": name, "tpot_ms": tpot,
                     "forward_ms": tpot - update if np.isfinite(update) else tpot,
                     "update_ms": update - plan if np.isfinite(update) else float("nan"), "plan_ms": plan,
                     "kv_bytes": steppers[name].kv_bytes(),
                     "timed_steps": int(np.isfinite(step_ms[name][cfg.warmup:]).sum())})
    table = pd.DataFrame(rows)
    reference = table.loc[table.method == REFERENCE, "tpot_ms"].item()
    recompute = table.loc[table.method == RECOMPUTE, "tpot_ms"].item()
    table["overhead"] = table.tpot_ms / reference
    table[["overhead_lo", "overhead_hi"]] = [_interval(step_ms, m, REFERENCE, cfg) for m in names]
    # The cache's own timers are not subject to the drift between methods: its work as a share of the step.
    table["cache_work"] = (table.update_ms + table.plan_ms) / reference
    table["speedup"] = recompute / table.tpot_ms  # the reference's speedup is the ideal
    table[["speedup_lo", "speedup_hi"]] = [_interval(step_ms, RECOMPUTE, m, cfg) for m in names]
    table.loc[table.method == RECOMPUTE, ["overhead", "overhead_lo", "overhead_hi"]] = np.nan
    engine = table.method.str.startswith(LLAMACPP)
    if engine.any():  # another engine: against its own decode, and no speedup over our float32 recompute
        table.loc[engine, "overhead"] = table.tpot_ms / table.loc[table.method == LLAMACPP_REFERENCE, "tpot_ms"].item()
        table.loc[engine, ["overhead_lo", "overhead_hi"]] = [
            _interval(step_ms, m, LLAMACPP_REFERENCE, cfg) for m in table.method[engine]]
        table.loc[engine, ["speedup", "speedup_lo", "speedup_hi"]] = np.nan
    table["goal"] = [_goal_text(m, cap) for m in table.method]
    table["met"] = [_goal_met(row, cap) for row in table.itertuples()]
    return table


def _interval(step_ms: dict, num: str, den: str, cfg: BenchConfig) -> tuple[float, float]:
    """The interval of step_ms[num]'s TPOT over step_ms[den]'s after the warm-up: paired steps resampled
    (`timing.step_ratio_interval`)."""
    return step_ratio_interval(step_ms[num][cfg.warmup:], step_ms[den][cfg.warmup:], cfg.block)


def _goal_text(method: str, cap: int) -> str:
    parts = []
    if method in GOALS:
        column, bound, op = GOALS[method]
        parts.append(f"overhead {op} {bound}")
    if cap in SPEEDUP_GOAL and method not in (REFERENCE, RECOMPUTE) and not method.startswith(LLAMACPP):
        parts.append(f"speedup >= {SPEEDUP_GOAL[cap]}")
    return ", ".join(parts)


def verdict(lo: float, hi: float, bound: float, op: str) -> str:
    """"met" when the whole interval satisfies `op bound`, "missed" when none of it does, else "within noise";
    "no interval" where there is none (fewer than `stats.MIN_BLOCKS` timed steps)."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "no interval"
    good_lo, good_hi = (lo <= bound, hi <= bound) if op == "<=" else (lo >= bound, hi >= bound)
    if good_lo and good_hi:
        return "met"
    if not (good_lo or good_hi):
        return "missed"
    return "within noise"


def _goal_met(row, cap: int) -> str | None:
    """The row's verdict on its goals, from the intervals: "met", "missed" or "within noise" (None: no goal)."""
    checks = []
    if row.method in GOALS:
        column, bound, op = GOALS[row.method]
        checks.append(verdict(getattr(row, f"{column}_lo"), getattr(row, f"{column}_hi"), bound, op))
    if cap in SPEEDUP_GOAL and row.method not in (REFERENCE, RECOMPUTE) and not row.method.startswith(LLAMACPP):
        checks.append(verdict(row.speedup_lo, row.speedup_hi, SPEEDUP_GOAL[cap], ">="))
    if not checks:
        return None
    for worst in ("missed", "within noise", "no interval"):
        if worst in checks:
            return worst
    return "met"


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _target_nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    return F.cross_entropy(logits[0, -1:].float(), target.reshape(1)).item()


def graph_breaks() -> int:
    """Graph breaks dynamo has met in this process so far."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def _compile_pair(model, cap: int, cfg: BenchConfig, method: str) -> tuple[tuple, tuple]:
    """(prefill, step) of the eager and of the compiled decoder of `method`; prefills run eagerly in both.

    RING_STATIC is the ring's fixed-shape step (`RingDecoder`, one graph for every step); any other method is the
    model's forward over its cache, compiled as it is (no full graph asked): what dynamo makes of the cache's
    Python (guards on its counters, graph breaks, recompiles) is what is measured.
    """
    kwargs = {"mode": cfg.compile_mode} if cfg.compile_mode else {}
    if method == RING_STATIC:
        eager = RingDecoder(model, make_cache("ring", model, cap=cap, sink=cfg.sink))
        compiled = RingDecoder(model, make_cache("ring", model, cap=cap, sink=cfg.sink), compile=True, **kwargs)
        return (eager, eager), (compiled, compiled)
    sink = 0 if methods.get(method).sinkless else cfg.sink

    def plain():
        cache = make_cache(method, model, cap=cap, sink=sink)
        return lambda ids: model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    eager, compiled = plain(), plain()
    return (eager, eager), (compiled, torch.compile(compiled, **kwargs))


@torch.inference_mode()
def compile_ratio(model, tokens: list[int], cap: int, cfg: BenchConfig, progress: bool = True,
                  method: str = RING_STATIC) -> dict:
    """A method's decode step compiled vs eager, interleaved, with the graphs it took; the exact error if it fails."""
    import torch._dynamo

    device = next(model.parameters()).device
    warm = 2  # compiled steps before the graph count is taken
    n = warm + cfg.compile_steps
    if len(tokens) < cap + n + 1:
        raise StreamkvError(f"the compile comparison needs {cap + n + 1} tokens of text, the text has {len(tokens)}")
    ids = torch.tensor(tokens[: cap + n + 1], device=device).unsqueeze(0)
    record = {"cap": cap, "method": method, "mode": cfg.compile_mode or "default", "status": "ok", "error": None}
    torch._dynamo.reset()  # every method compiles from nothing, against a recompile limit of its own
    (eager_prefill, eager), (compiled_prefill, compiled) = _compile_pair(model, cap, cfg, method)
    eager_prefill(ids[:, :cap])
    compiled_prefill(ids[:, :cap])
    graphs0, breaks0 = compiled_graphs(), graph_breaks()
    nll = {"eager": np.full(n, np.nan), "compiled": np.full(n, np.nan)}
    graphs_warm = graphs0

    def after(i, name, stepper, logits):
        nonlocal graphs_warm
        nll[name][i] = _target_nll(logits, ids[0, cap + i + 1])
        if i == warm - 1:  # (the second of these calls comes after both forwards: the count before step `warm`)
            graphs_warm = compiled_graphs()

    try:
        times = interleave({"eager": _Decoder(eager), "compiled": _Decoder(compiled)}, ids, cap, n, after=after,
                           desc=f"compile {method}", progress=progress)
    except Exception as exc:  # a measured negative: keep the stack's own words
        record.update(status="failed", error=error_text(exc), where=traceback.format_exc(limit=-3)[-2000:])
        return record
    eager_ms, compiled_ms = np.median(times["eager"][warm:]), np.median(times["compiled"][warm:])
    record.update(
        compile_sec=float(times["compiled"][0] / 1e3),  # the first compiled step compiles
        eager_ms=float(eager_ms), compiled_ms=float(compiled_ms), ratio=float(compiled_ms / eager_ms),
        nll_max_abs_diff=float(np.abs(nll["eager"] - nll["compiled"]).max()),
        graphs_first_steps=graphs_warm - graphs0,
        graphs_after_warmup=compiled_graphs() - graphs_warm, graph_breaks=graph_breaks() - breaks0,
        recompile_limit=int(torch._dynamo.config.recompile_limit), steps=cfg.compile_steps,
    )
    return record


WEIGHTS_REFERENCE = "float32 eager"
WEIGHTS_GOAL = 2.0  # the fastest variant's TPOT over llama.cpp's own decode at the same KV length


def weights_contenders(model, cap: int, cfg: BenchConfig, source: str | None = None) -> tuple[dict, dict]:
    """(steppers, failures): the ring's fixed-shape step per weights variant, eager and compiled, on copies of `model`.

    A variant that cannot be applied is a failure (its error), not a stepper; llama.cpp's reference decode over
    cap keys joins when it is installed and the model has a GGUF file.
    """
    import copy

    from .weights import DEFAULT, apply_weights

    steppers, failures = {}, {}
    for name in dict.fromkeys((DEFAULT, *cfg.weights)):
        try:
            variant = model if name == DEFAULT else apply_weights(copy.deepcopy(model), name)
        except StreamkvError as exc:
            failures[f"{name} eager"] = str(exc)
            continue
        label = WEIGHTS_REFERENCE if name == DEFAULT else f"{name} eager"
        steppers[label] = _Decoder(RingDecoder(variant, make_cache("ring", variant, cap=cap, sink=cfg.sink)))
        if name in cfg.weights_compile:
            kwargs = {"mode": cfg.compile_mode} if cfg.compile_mode else {}
            steppers[f"{name} compiled"] = _Decoder(RingDecoder(
                variant, make_cache("ring", variant, cap=cap, sink=cfg.sink), compile=True, **kwargs))
    gguf = _gguf(source) if llamacpp_version() else None
    if gguf is not None:
        steppers[LLAMACPP_REFERENCE] = LlamaCppStepper(gguf, "llamacpp:shift", cap, cfg.sink, 1, cap, reference=True)
    return steppers, failures


@torch.inference_mode()
def weights_speed(model, tokens: list[int], cap: int, cfg: BenchConfig, progress: bool = True,
                  source: str | None = None) -> list[dict]:
    """TPOT of every weights variant (eager, compiled) against float32 eager and llama.cpp, interleaved.

    Every row also carries the NLL it gave on the timed steps (teacher-forced on the same tokens), a check that
    the variant decodes text and not noise; quality proper is the pipeline's weights ablation (4,096 tokens,
    with intervals).  A variant that fails to apply, to compile or mid-run is a failed row with its error.
    """
    device = next(model.parameters()).device
    n = cfg.warmup + cfg.blocks * cfg.block
    if len(tokens) < cap + n + 1:
        raise StreamkvError(f"the weights section needs {cap + n + 1} tokens of text at cap {cap}, "
                            f"the text has {len(tokens)}")
    ids = torch.tensor(tokens[: cap + n + 1], device=device).unsqueeze(0)
    steppers, failures = weights_contenders(model, cap, cfg, source)
    for name, stepper in list(steppers.items()):
        try:
            stepper.forward(ids[:, :cap])
        except Exception as exc:  # noqa: BLE001 - a variant the stack refuses is a measured negative
            failures[name] = error_text(exc)
            steppers.pop(name).close()
    nll = {m: np.full(n, np.nan) for m in steppers}

    def after(i, name, stepper, logits):  # the NLL of the next token: a variant that decodes noise fails here
        if name == LLAMACPP_REFERENCE:  # (its logits are the reference decode's, meaningless)
            return
        nll[name][i] = _target_nll(logits, ids[0, cap + i + 1])
        if not np.isfinite(nll[name][i]):
            raise StreamkvError(f"non-finite NLL ({nll[name][i]}) at step {i} of the timed stream")

    # (a variant that fails mid-run, e.g. a compile error at the first single-token step, is a failed row)
    step_ms = interleave(steppers, ids, cap, n, after=after, failures=failures, desc=f"weights cap {cap}",
                         progress=progress)
    for stepper in steppers.values():
        stepper.close()
    reference = block_median(step_ms[WEIGHTS_REFERENCE][cfg.warmup:], cfg.block)
    engine = LLAMACPP_REFERENCE in step_ms and np.isfinite(step_ms[LLAMACPP_REFERENCE]).any()

    engine_ms = block_median(step_ms[LLAMACPP_REFERENCE][cfg.warmup:], cfg.block) if engine else float("nan")
    rows = []
    for name in step_ms:
        if name in failures:
            continue
        tpot = block_median(step_ms[name][cfg.warmup:], cfg.block)
        vs_ref = _interval(step_ms, name, WEIGHTS_REFERENCE, cfg)
        vs_engine = _interval(step_ms, name, LLAMACPP_REFERENCE, cfg) if engine else (np.nan, np.nan)
        weights, _, mode = name.rpartition(" ")
        rows.append({"cap": cap, "variant": name, "weights": weights if name != LLAMACPP_REFERENCE else None,
                     "mode": mode if name != LLAMACPP_REFERENCE else "llama.cpp", "status": "ok", "error": None,
                     "tpot_ms": tpot, "vs_float32": tpot / reference, "vs_float32_lo": vs_ref[0],
                     "vs_float32_hi": vs_ref[1], "vs_llamacpp": tpot / engine_ms, "vs_llamacpp_lo": vs_engine[0],
                     "vs_llamacpp_hi": vs_engine[1],
                     "nll_mean": float(np.nanmean(nll[name][cfg.warmup:])) if name != LLAMACPP_REFERENCE else None,
                     "timed_steps": int(np.isfinite(step_ms[name][cfg.warmup:]).sum())})
    ours = [r for r in rows if r["mode"] != "llama.cpp"]
    if ours:
        best = min(ours, key=lambda r: r["tpot_ms"])
        best["best"] = True
        if engine:
            best["goal"] = f"TPOT <= {WEIGHTS_GOAL:g}x llama.cpp"
            best["met"] = verdict(best["vs_llamacpp_lo"], best["vs_llamacpp_hi"], WEIGHTS_GOAL, "<=")
    for name, error in failures.items():
        weights, _, mode = name.rpartition(" ")
        rows.append({"cap": cap, "variant": name, "weights": weights, "mode": mode, "status": "failed",
                     "error": error})
    return rows


def current_rss_mb() -> float:
    """Resident set size now (Linux /proc; elsewhere the peak, which can only grow)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.inference_mode()
def memory_stream(model, tokens: list[int], method: str, cap: int, cfg: BenchConfig, progress: bool = True) -> dict:
    """KV bytes and RSS over one long stream (first forward: `cap` tokens, then one token per step)."""
    device = next(model.parameters()).device
    n = cfg.dense_tokens if method == "dense" and cfg.dense_tokens else cfg.stream_tokens
    if len(tokens) < n:
        raise StreamkvError(f"the memory stream needs {n} tokens of text, the text has {len(tokens)}")
    ids = torch.tensor(tokens[:n], device=device).unsqueeze(0)
    cache = make_cache(method, model, cap=cap, sink=0 if method == "window" else cfg.sink)
    stepper = CachedStepper(model, cache)
    stepper.forward(ids[:, :cap])
    rss_from = cfg.rss_from if cfg.rss_from < n else (n + cap) // 2  # dense's shorter stream: its middle
    kv = np.empty(n - cap, dtype=np.int64)
    step_ms = np.empty(n - cap)
    rss_start = None
    for i, t in enumerate(tqdm(range(cap, n), desc=f"memory {method}", disable=not progress, mininterval=5.0,
                               leave=False)):
        if t == rss_from:
            rss_start = current_rss_mb()
        t0 = time.perf_counter()
        stepper.forward(ids[:, t : t + 1])
        step_ms[i] = (time.perf_counter() - t0) * 1e3
        kv[i] = cache.nbytes()
    rss_end = current_rss_mb()
    edge = min(256, len(step_ms) // 2)
    return {
        "method": method, "cap": cap, "tokens": n, "kv_bytes_min": int(kv.min()), "kv_bytes_max": int(kv.max()),
        "kv_max_over_min": float(kv.max() / kv.min()), "rss_from_step": rss_from, "rss_start_mb": rss_start,
        "rss_end_mb": rss_end, "rss_growth": (rss_end / rss_start - 1) if rss_start else None,
        "step_ms_first": float(np.median(step_ms[:edge])), "step_ms_last": float(np.median(step_ms[-edge:])),
    }


def evaluator_speed(model, tokens: list[int], cap: int, cfg: BenchConfig, progress: bool = True,
                    source: str | None = None) -> list[dict]:
    """Tokens per second of the parallel evaluator and of the decode loop on the same method and tokens.

    Both score the same targets of `evaluator_tokens` tokens (prefill = cap); the loop's time is its whole
    run (prefill, steps and scoring), as a quality job spends it, and so is the parallel evaluator's.
    """
    from .evaluation import evaluate
    from .sources import LoadedModel

    n = cfg.evaluator_tokens
    loaded = LoadedModel(model, None, source or "")
    rows = []
    for method, k in (("start_recent", 1), ("start_recent", cfg.compress_every)):
        runs = {}
        for evaluator in ("parallel", "decode"):
            p = EvalParams("-", "-", method, cap=cap, sink=cfg.sink, compress_every=k, max_tokens=n, prefill=cap,
                           evaluator=evaluator)
            t0 = time.perf_counter()
            record, trace = evaluate(loaded, tokens[:n], p, progress=progress)
            runs[evaluator] = (time.perf_counter() - t0, trace.nll.to_numpy(), record["metrics"]["ppl"])
        (par_s, par_nll, par_ppl), (loop_s, loop_nll, loop_ppl) = runs["parallel"], runs["decode"]
        scored = len(par_nll)
        rows.append({"cap": cap, "method": f"{method} K={k}", "tokens": n, "parallel_sec": par_s, "decode_sec": loop_s,
                     "parallel_tok_s": scored / par_s, "decode_tok_s": scored / loop_s, "speedup": loop_s / par_s,
                     "nll_max_abs_diff": float(np.abs(par_nll - loop_nll).max()), "ppl_parallel": par_ppl,
                     "ppl_decode": loop_ppl})
    return rows


def stream_tokens(loaded, text_src: str, n: int) -> list[int]:
    """`n` tokens of the text, the text repeated end to end if it is shorter (costs do not depend on the words)."""
    from .sources import encode, load_text

    ids = encode(loaded.tokenizer, load_text(text_src, min_chars=16 * n))
    if not ids:
        raise StreamkvError(f"text '{text_src}' has no tokens")
    return (ids * (n // len(ids) + 1))[:n]


def _plain(record: dict) -> dict:
    """JSON-ready values: Python numbers and bools, None for NaN (no measurement)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (np.bool_, bool)):
            value = bool(value)
        elif isinstance(value, (np.integer,)):
            value = int(value)
        elif isinstance(value, (np.floating, float)):
            value = float(value) if np.isfinite(value) else None
        out[key] = value
    return out


def _section_parts(model, tokens: list[int], cfg: BenchConfig, progress: bool,
                   source: str | None) -> dict[str, Callable[[], Iterator[list[dict]]]]:
    """Each section as its parts (a cap, a stream method), each part's rows computed when it is reached."""
    cap = cfg.caps[0]
    return {
        "overhead": lambda: ([_plain(r) for r in overhead(model, tokens, c, cfg, progress, source).to_dict("records")]
                             for c in cfg.caps),
        "compile": lambda: ([_plain(compile_ratio(model, tokens, cap, cfg, progress, m))] for m in cfg.compile_methods),
        "memory": lambda: ([_plain(memory_stream(model, tokens, m, cap, cfg, progress))] for m in cfg.stream_methods),
        "evaluator": lambda: iter([[_plain(r) for r in evaluator_speed(model, tokens, cap, cfg, progress, source)]]),
        "weights": lambda: iter([[_plain(r) for r in weights_speed(model, tokens, cap, cfg, progress, source)]]),
    }


def run(model, tokens: list[int], cfg: BenchConfig, progress: bool = True, source: str | None = None,
        out: str | Path | None = None, context: dict | None = None) -> dict:
    """Every section of the benchmark on one model; a dict ready for JSON (`source`: the model's, for llama.cpp).

    `out`: the result file, rewritten (atomically) as each section starts and each of its parts finishes;
    `context`: what the caller adds to the result's config (model, text, ...), in every version of the file.
    The result's `sections` holds each section's status ("pending", "running", "ok", "failed" or "skipped"),
    error and seconds; `failed` names the failed ones and `status` is "failed" if there are any.
    """
    cfg.check()
    device = next(model.parameters()).device
    chosen = [s for s in BENCH_SECTIONS if s in cfg.sections and (s != "compile" or cfg.compile)]
    result = {"config": {**asdict(cfg), **(context or {})}, "status": "running", "failed": [],
              "sections": {s: {"status": "pending" if s in chosen else "skipped", "error": None, "seconds": None}
                           for s in BENCH_SECTIONS},
              "overhead": [], "compile": [], "memory": [], "evaluator": [], "weights": [],
              "meta": meta.collect(device, next(model.parameters()).dtype, 0)}

    def save():
        if out is not None:
            write_json(result, out)

    parts = _section_parts(model, tokens, cfg, progress, source)
    for name in chosen:
        section = result["sections"][name]
        section["status"] = "running"
        save()
        t0 = time.perf_counter()
        try:
            for rows in parts[name]():
                result[name] += rows
                save()
        except Exception as exc:  # the other sections still run; the rows of the parts done so far stay
            where = "".join(traceback.format_tb(exc.__traceback__, limit=-3))[-2000:]  # the message is in error
            section.update(status="failed", error=error_text(exc), where=where)
        else:
            # torch.compile refusing the ring's fixed-shape step is measured, not raised: its row carries the error,
            # and the section fails (that step is made to compile).  A weights variant or a cache's general step that
            # fails is a row of its own, a measured negative: the section still compares the others.
            refused = [r["error"] for r in result[name] if r.get("status") == "failed" and name != "weights"
                       and r.get("method", RING_STATIC) == RING_STATIC]
            section.update(status="failed" if refused else "ok", error=refused[0] if refused else None)
        section["seconds"] = time.perf_counter() - t0
        if section["status"] == "failed":
            result["failed"].append(name)
        save()
    result["status"] = "failed" if result["failed"] else "ok"
    save()
    return result
