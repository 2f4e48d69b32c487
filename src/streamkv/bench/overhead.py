"""The bench's overhead section: every method's step against the no-eviction reference over cap keys
(and llama.cpp's rows against llama.cpp's own decode), its speedup over recompute, and the goals' verdicts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from streamkv.bench.goals import (
    GOALS,
    LAZY,
    LLAMACPP,
    LLAMACPP_REFERENCE,
    RECOMPUTE,
    REFERENCE,
    SPEEDUP_GOAL,
    STRICT,
    llamacpp_shift,
    verdict,
)
from streamkv.cache.compiled import RingDecoder
from streamkv.cache.factory import make_cache, make_stepper
from streamkv.cache.streaming import num_attention_layers
from streamkv.errors import StreamkvError, error_text
from streamkv.evaluation.loop import RUN_FAILURES
from streamkv.evaluation.params import BENCH_KVPRESS, SINKLESS_METHODS, BenchConfig, EvalParams
from streamkv.evaluation.stepper import CachedStepper, Stepper
from streamkv.evaluation.timing import SameLengthCache, block_median, interleave, step_ratio_interval
from streamkv.models.sources import gguf_path
from streamkv.peers.engines import KvpressStepper, LlamaCppStepper
from streamkv.peers.installed import kvpress_python, llamacpp_version


class DecoderStepper(Stepper):
    """A decoder (`ids -> logits`: a RingDecoder, a compiled forward) as a stepper; no cache timers inside it."""

    def __init__(self, decoder: Callable[[torch.Tensor], torch.Tensor]):
        self.decoder = decoder

    def forward(self, ids):
        return self.decoder(ids)

    def kv_bytes(self) -> int:
        return self.decoder.cache.nbytes()  # (a RingDecoder's)


def model_gguf(source: str | None) -> Path | None:
    """The model's GGUF file, None where it has none (a model without one has no llama.cpp rows)."""
    try:
        return gguf_path(source) if source else None
    except StreamkvError:
        return None


def contenders(model, cap: int, sink: int, compress_every: int, peers: bool = False, source: str | None = None,
               kvpress_methods: tuple[str, ...] = BENCH_KVPRESS, failures: dict[str, str] | None = None) -> dict:
    """Every method of the overhead table, each with its own state, built by the decode loop's factory.

    The two references are the bench's own: the no-eviction forward (`SameLengthCache`) and, with peers,
    llama.cpp's decode over cap keys without a shift.  With `peers`: kvpress rows where its environment is
    (`kvpress_methods`: StreamingLLM at K = 1 and `compress_every`, the others at `compress_every`), llama.cpp
    rows where it is installed and the model (`source`) has a GGUF file.  `tova` runs the model's eager attention
    (it needs the weights), the reference the model's own: its overhead includes that difference.  A peer whose
    worker fails to start is left out, its error kept in `failures` (without `failures`, the error propagates).
    """
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")

    def stepper(method: str, k: int = 1) -> Stepper:
        p = EvalParams(source or "-", "-", method, cap=cap, sink=None if method in SINKLESS_METHODS else sink,
                       compress_every=k, max_tokens=cap, dtype=dtype)
        return make_stepper(model, p.resolved(), source)

    built = {}

    def peer(name: str, build: Callable[[], Stepper]) -> None:
        try:
            built[name] = build()
        except RUN_FAILURES as exc:
            if failures is None:
                raise
            failures[name] = error_text(exc)

    if peers and kvpress_python() and hasattr(model, "model"):
        for method in kvpress_methods:
            for k in (1, compress_every) if method == "kvpress:streaming_llm" else (compress_every,):
                peer(f"kvpress {method.split(':', 1)[1]} K={k}", lambda method=method, k=k: stepper(method, k))
    gguf = model_gguf(source) if peers and llamacpp_version() else None
    if gguf is not None:
        peer(LLAMACPP_REFERENCE, lambda: LlamaCppStepper(gguf, "llamacpp:shift", cap, sink, 1, cap, reference=True))
        for k in (1, compress_every):
            peer(llamacpp_shift(k), lambda k=k: stepper("llamacpp:shift", k))
    return {
        REFERENCE: CachedStepper(model, SameLengthCache(num_attention_layers(model), cap)),
        STRICT: stepper("start_recent"),
        LAZY: stepper("start_recent", compress_every),
        "mit": stepper("mit"),
        "ring": stepper("ring"),
        "ring lazy": stepper("ring", compress_every),
        "ring (fixed shapes)": DecoderStepper(RingDecoder(model, make_cache("ring", model, cap=cap, sink=sink))),
        "tova": stepper("tova"),
        "tova lazy": stepper("tova", compress_every),
        **built,
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
    failures: dict[str, str] = {}  # a peer whose worker died, hung or failed to start: a failed row
    steppers = contenders(model, cap, cfg.sink, cfg.compress_every, peers=cfg.peers, source=source,
                          kvpress_methods=cfg.kvpress_methods, failures=failures)
    peers = {name for name, stepper in steppers.items() if isinstance(stepper, (KvpressStepper, LlamaCppStepper))}
    names = list(steppers)
    for name, stepper in list(steppers.items()):
        try:
            stepper.forward(ids[:, :cap])
        except RUN_FAILURES as exc:
            if name not in peers:
                raise
            failures[name] = error_text(exc)
            steppers.pop(name).close()
    update_ms = {m: np.full(n, np.nan) for m in names}
    plan_ms = {m: np.full(n, np.nan) for m in names}

    def after(i, name, stepper, logits):  # the cache's own timers of the forward just run
        update_ms[name][i], plan_ms[name][i] = stepper.update_ms, stepper.plan_ms

    step_ms = interleave(steppers, ids, cap, n, skip=lambda i, name: name == RECOMPUTE and i % cfg.recompute_every,
                         after=after, failures=failures, desc=f"overhead cap {cap}", progress=progress)
    for stepper in steppers.values():
        stepper.close()  # (a peer's worker)
    ours = [name for name in failures if name not in peers]
    if ours:  # our own methods and the references do not fail: a bug, the section fails
        raise StreamkvError(f"{ours[0]} failed in the overhead section: {failures[ours[0]]}")
    # The intervals of the ratios resample paired steps (`step_interval`): step i of every method ran side by side.
    names = [name for name in names if name not in failures]
    rows = []
    for name in names:
        tpot = block_median(step_ms[name][cfg.warmup:], cfg.block)
        update = block_median(update_ms[name][cfg.warmup:], cfg.block)
        plan = block_median(plan_ms[name][cfg.warmup:], cfg.block)
        rows.append({"cap": cap, "method": name, "status": "ok", "error": None, "tpot_ms": tpot,
                     "forward_ms": tpot - update if np.isfinite(update) else tpot,
                     "update_ms": update - plan if np.isfinite(update) else float("nan"), "plan_ms": plan,
                     "kv_bytes": steppers[name].kv_bytes(),
                     "timed_steps": int(np.isfinite(step_ms[name][cfg.warmup:]).sum())})
    table = pd.DataFrame(rows)
    reference = table.loc[table.method == REFERENCE, "tpot_ms"].item()
    recompute = table.loc[table.method == RECOMPUTE, "tpot_ms"].item()
    table["overhead"] = table.tpot_ms / reference
    table[["overhead_lo", "overhead_hi"]] = [step_interval(step_ms, m, REFERENCE, cfg) for m in names]
    # The cache's own timers are not subject to the drift between methods: its work as a share of the step.
    table["cache_work"] = (table.update_ms + table.plan_ms) / reference
    table["speedup"] = recompute / table.tpot_ms  # the reference's speedup is the ideal
    table[["speedup_lo", "speedup_hi"]] = [step_interval(step_ms, RECOMPUTE, m, cfg) for m in names]
    table.loc[table.method == RECOMPUTE, ["overhead", "overhead_lo", "overhead_hi"]] = np.nan
    engine = table.method.str.startswith(LLAMACPP)
    if engine.any():  # another engine: against its own decode (none if that failed), no speedup over our recompute
        if LLAMACPP_REFERENCE in names:
            own = table.loc[table.method == LLAMACPP_REFERENCE, "tpot_ms"].item()
            table.loc[engine, "overhead"] = table.tpot_ms / own
            table.loc[engine, ["overhead_lo", "overhead_hi"]] = [
                step_interval(step_ms, m, LLAMACPP_REFERENCE, cfg) for m in table.method[engine]]
        else:
            table.loc[engine, ["overhead", "overhead_lo", "overhead_hi"]] = np.nan
        table.loc[engine, ["speedup", "speedup_lo", "speedup_hi"]] = np.nan
    if failures:  # with no measurement, before recompute (the last row)
        failed = pd.DataFrame([{"cap": cap, "method": name, "status": "failed", "error": failures[name],
                                "timed_steps": 0} for name in failures])
        table = pd.concat([table, failed], ignore_index=True)
        last = (table.method == RECOMPUTE).astype(int)
        table = table.iloc[np.argsort(last.to_numpy(), kind="stable")].reset_index(drop=True)
    table["goal"] = [_goal_text(m, cap) for m in table.method]
    table["met"] = [_goal_met(row, cap) for row in table.itertuples()]
    table.loc[table.status == "failed", ["goal", "met"]] = ["", None]  # (a row with no measurement has no verdict)
    return table


def step_interval(step_ms: dict, num: str, den: str, cfg: BenchConfig) -> tuple[float, float]:
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
