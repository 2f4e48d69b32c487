"""The bench's weights section: the ring's fixed-shape step with each weights variant, eager and compiled,
against the float32 eager step and llama.cpp's own decode over cap keys, in one interleaved run."""

from __future__ import annotations

import numpy as np
import torch

from streamkv.bench.compile import target_nll
from streamkv.bench.goals import (
    LLAMACPP_REFERENCE,
    WEIGHTS_GOAL,
    verdict,
)
from streamkv.bench.overhead import DecoderStepper, model_gguf, step_interval
from streamkv.cache.compiled import RingDecoder
from streamkv.cache.factory import make_cache
from streamkv.errors import StreamkvError, error_text
from streamkv.evaluation.loop import RUN_FAILURES
from streamkv.evaluation.params import BenchConfig
from streamkv.evaluation.timing import block_median, interleave
from streamkv.peers.engines import LlamaCppStepper
from streamkv.peers.installed import llamacpp_version

WEIGHTS_REFERENCE = "float32 eager"



def weights_contenders(model, cap: int, cfg: BenchConfig, source: str | None = None) -> tuple[dict, dict]:
    """(steppers, failures): the ring's fixed-shape step per weights variant, eager and compiled, on copies of `model`.

    A variant that cannot be applied is a failure (its error), not a stepper; llama.cpp's reference decode over
    cap keys joins when it is installed and the model has a GGUF file.
    """
    import copy

    from streamkv.models.weights import DEFAULT, apply_weights

    steppers, failures = {}, {}
    for name in dict.fromkeys((DEFAULT, *cfg.weights)):
        try:
            variant = model if name == DEFAULT else apply_weights(copy.deepcopy(model), name)
        except StreamkvError as exc:
            failures[f"{name} eager"] = str(exc)
            continue
        label = WEIGHTS_REFERENCE if name == DEFAULT else f"{name} eager"
        steppers[label] = DecoderStepper(RingDecoder(variant, make_cache("ring", variant, cap=cap, sink=cfg.sink)))
        if name in cfg.weights_compile:
            kwargs = {"mode": cfg.compile_mode} if cfg.compile_mode else {}
            steppers[f"{name} compiled"] = DecoderStepper(RingDecoder(
                variant, make_cache("ring", variant, cap=cap, sink=cfg.sink), compile=True, **kwargs))
    gguf = model_gguf(source) if llamacpp_version() else None
    if gguf is not None:
        try:
            steppers[LLAMACPP_REFERENCE] = LlamaCppStepper(gguf, "llamacpp:shift", cap, cfg.sink, 1, cap,
                                                           reference=True)
        except RUN_FAILURES as exc:  # its worker did not start: a failed row, the variants still run
            failures[LLAMACPP_REFERENCE] = error_text(exc)
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
        nll[name][i] = target_nll(logits, ids[0, cap + i + 1])
        if not np.isfinite(nll[name][i]):
            raise StreamkvError(f"non-finite NLL ({nll[name][i]}) at step {i} of the timed stream")

    # (a variant that fails mid-run, e.g. a compile error at the first single-token step, is a failed row)
    step_ms = interleave(steppers, ids, cap, n, after=after, failures=failures, desc=f"weights cap {cap}",
                         progress=progress)
    for stepper in steppers.values():
        stepper.close()
    reference = block_median(step_ms[WEIGHTS_REFERENCE][cfg.warmup:], cfg.block)
    engine = LLAMACPP_REFERENCE in step_ms and LLAMACPP_REFERENCE not in failures

    engine_ms = block_median(step_ms[LLAMACPP_REFERENCE][cfg.warmup:], cfg.block) if engine else float("nan")
    rows = []
    for name in step_ms:
        if name in failures:
            continue
        tpot = block_median(step_ms[name][cfg.warmup:], cfg.block)
        vs_ref = step_interval(step_ms, name, WEIGHTS_REFERENCE, cfg)
        vs_engine = step_interval(step_ms, name, LLAMACPP_REFERENCE, cfg) if engine else (np.nan, np.nan)
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
        weights, _, mode = (None, None, "llama.cpp") if name == LLAMACPP_REFERENCE else name.rpartition(" ")
        rows.append({"cap": cap, "variant": name, "weights": weights, "mode": mode, "status": "failed",
                     "error": error})
    return rows
