"""One teacher-forced decode loop for every method.

Protocol: tokens x_0..x_{N-1}.  The first P tokens go through one forward
(the prefill, P <= cap); then one token per step.  Every method scores the
same targets x_1..x_{N-1}, so PPL = exp(mean NLL) is comparable across
methods.  Methods differ only in the object that runs a forward: a streaming
cache, or the recompute baseline.  Step times cover the forward (device
synchronised) and nothing else: scoring and bookkeeping happen outside the
timer.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from streamkv.cache.factory import make_stepper
from streamkv.errors import NotInstalled, StreamkvError, error_text
from streamkv.evaluation.params import EvalParams
from streamkv.evaluation.results import METRIC_KEYS, TIMING_KEYS, peak_memory_mb, quality_metrics, trace_frame
from streamkv.evaluation.stepper import forward_time_ms
from streamkv.evaluation.timing import sync_of
from streamkv.models.sources import LoadedModel, encode, start_tokens
from streamkv.models.texts import load_text
from streamkv.models.weights import weights_of
from streamkv.provenance import collect

STEADY_SKIP = 64  # steady-state TPOT ignores the first steps (allocator and cache warm-up)


def load_tokens(loaded: LoadedModel, text_src: str, n: int, text: str | None = None) -> list[int]:
    """The first `n` tokens of the stream: the tokenizer's start tokens (Gemma's BOS; none for SmolLM2), then the
    text (read from `text_src` unless given); an error if it is shorter."""
    if text is None:
        text = load_text(text_src, min_chars=16 * n)
    ids = start_tokens(loaded.tokenizer) + encode(loaded.tokenizer, text)
    if len(ids) < n:
        raise StreamkvError(f"text '{text_src}' has {len(ids)} tokens, fewer than max-tokens ({n}); lower --max-tokens")
    return ids[:n]


def _mean(values: np.ndarray) -> float | None:
    """Mean of the finite values, None if there are none (e.g. the recompute baseline has no cache updates)."""
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else None


@torch.inference_mode()
def evaluate(loaded: LoadedModel, tokens: list[int], params: EvalParams,
             progress: bool = True) -> tuple[dict, pd.DataFrame]:
    """Evaluate one configuration; return the result record and the per-token trace.

    The NLLs come from the evaluator `params.evaluator` resolves to (recorded in the result's params): the
    decode loop, which also times every step, or the parallel evaluator (`streamkv.evaluation.parallel`), which gives
    the loop's NLLs at a fraction of the cost and times nothing.
    With `params.timing_steps`, the step times come from a separate timing part instead
    (`streamkv.evaluation.timing.time_interleaved`): that many decode steps after a prefill of `cap`, interleaved with
    a no-eviction reference, so that `tpot_ratio` can be compared across jobs.
    """
    p = params.resolved()
    if weights_of(loaded.model) != p.weights:  # a result must say which weights produced it
        raise StreamkvError(f"the model runs weights '{weights_of(loaded.model)}' but the parameters say "
                            f"'{p.weights}'; load it with load_model(..., weights='{p.weights}')")
    if len(tokens) < p.max_tokens:  # a short list would end the loop early and score fewer targets than asked
        raise StreamkvError(f"evaluate() got {len(tokens)} tokens, fewer than max_tokens ({p.max_tokens}); pass at "
                            f"least max_tokens tokens (load_tokens gives them) or lower max_tokens")
    if p.evaluator == "parallel":
        from streamkv.evaluation.parallel import evaluate_parallel

        metrics, trace, provenance = evaluate_parallel(loaded, tokens, p, progress=progress)
        record = _record(p, metrics, provenance, trace.nll.to_numpy())
    else:
        record, trace = _decode_loop(loaded, tokens, p, progress)
    _timing_part(record, loaded, tokens, p)
    return record, trace


def _timing_part(record: dict, loaded: LoadedModel, tokens: list[int], p: EvalParams) -> None:
    """With `p.timing_steps`, the step-time metrics of `record` from the interleaved timing part."""
    if not p.timing_steps or record["status"] != "ok":
        return
    from streamkv.evaluation.timing import time_interleaved

    started = time.perf_counter()
    with torch.inference_mode():
        record["metrics"].update(time_interleaved(loaded, tokens, p, p.timing_steps, seed=p.seed))
    if record["metrics"].get("total_sec") is not None:
        record["metrics"]["total_sec"] += time.perf_counter() - started


def _decode_loop(loaded: LoadedModel, tokens: list[int], p: EvalParams, progress: bool) -> tuple[dict, pd.DataFrame]:
    model = loaded.model
    device = next(model.parameters()).device
    sync = sync_of(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(p.seed)
    n, pre = p.max_tokens, p.prefill
    ids = torch.tensor(tokens[:n], dtype=torch.long, device=device).unsqueeze(0)
    stepper = make_stepper(model, p, loaded.source)
    provenance = collect(device, next(model.parameters()).dtype, p.seed)  # the code as loaded, before the run
    started = time.perf_counter()

    t0 = time.perf_counter()
    logits = stepper.forward(ids[:, :pre])
    sync()
    prefill_sec = forward_time_ms(stepper, t0) / 1e3
    nll = F.cross_entropy(logits[0].float(), ids[0, 1 : pre + 1], reduction="none").tolist()
    n_dec = n - 1 - pre
    step_ms = np.empty(n_dec)
    kv_len = np.empty(n_dec, dtype=np.int64)
    dropped = np.empty(n_dec, dtype=np.int64)
    update_ms = np.empty(n_dec)
    kinds = np.empty(n_dec, dtype=object)
    prefill_dropped, prefill_kind = stepper.dropped, stepper.kind
    kv_bytes_peak = stepper.kv_bytes()

    # With a stride s (the recompute baseline at scale), only every s-th target is scored: the other steps
    # only extend the history.  Targets are picked by position, so the pairing with other runs is plain.
    scored = np.arange(n - 1) % p.stride == 0
    for i, t in enumerate(tqdm(range(pre, n - 1), desc=f"{p.method}", disable=not progress, mininterval=2.0,
                               leave=False)):
        if not scored[t]:
            stepper.skip(ids[:, t : t + 1])
            nll.append(np.nan)
            step_ms[i] = update_ms[i] = np.nan
            kv_len[i] = dropped[i] = 0
            kinds[i] = ""
            continue
        t0 = time.perf_counter()
        logits = stepper.forward(ids[:, t : t + 1])
        sync()
        step_ms[i] = forward_time_ms(stepper, t0)
        nll.append(F.cross_entropy(logits[0, -1:].float(), ids[0, t + 1 : t + 2]).item())
        kv_len[i] = stepper.kv_len
        dropped[i] = stepper.dropped
        kinds[i] = stepper.kind
        update_ms[i] = stepper.update_ms
        kv_bytes_peak = max(kv_bytes_peak, stepper.kv_bytes())
    total_sec = time.perf_counter() - started
    stepper.close()

    nll_arr = np.asarray(nll)
    trace = trace_frame(ids, nll_arr, pre, prefill_sec * 1e3, step_ms, kv_len, dropped, kinds, update_ms)
    if prefill_dropped:
        trace.loc[pre - 1, ["pruned", "dropped", "prune_kind"]] = [True, prefill_dropped, prefill_kind]
    if p.stride > 1:
        keep = scored[pre:]
        trace, nll_arr = trace[scored].reset_index(drop=True), nll_arr[scored]
        step_ms, kv_len, dropped, kinds, update_ms = (a[keep] for a in (step_ms, kv_len, dropped, kinds, update_ms))
        n_dec = int(keep.sum())
    metrics = quality_metrics(nll_arr, pre, kv_len, dropped, kinds, prefill_dropped, prefill_kind)
    steady = step_ms[STEADY_SKIP:]
    metrics.update({
        "tpot_ms": float(step_ms.mean()) if n_dec else None,
        "tpot_steady_ms": float(steady.mean()) if steady.size else None,
        "tpot_p50_ms": float(np.percentile(step_ms, 50)) if n_dec else None,
        "tpot_p90_ms": float(np.percentile(step_ms, 90)) if n_dec else None,
        "ttft_ms": prefill_sec * 1e3,
        "prefill_sec": prefill_sec,
        "total_sec": total_sec,
        "peak_memory_mb": stepper.peak_memory_mb or peak_memory_mb(device),
        "kv_bytes_peak": int(kv_bytes_peak),
        "update_ms_mean": _mean(update_ms),
        "update_ms_prune": _mean(update_ms[dropped > 0]),
        "update_ms_noprune": _mean(update_ms[dropped == 0]),
    })
    if stepper.versions:
        provenance["peer_versions"] = stepper.versions
    return _record(p, metrics, provenance, nll_arr), trace


def _record(p: EvalParams, metrics: dict, provenance: dict, nll: np.ndarray) -> dict:
    """The result record; a run with a non-finite NLL or perplexity is failed, and says why."""
    status, error = "ok", None
    bad = np.flatnonzero(~np.isfinite(nll))
    if bad.size:
        status = "failed"
        error = f"non-finite NLL at {bad.size} of {nll.size} targets (first at position {int(bad[0])})"
    elif metrics["ppl"] is None:
        status = "failed"
        error = (f"the mean NLL ({metrics['nll_mean']:.1f} nats) overflowed exp: the perplexity is past the float "
                 "range, the model's predictions have collapsed"
                 + ("; float16 overflows do this, try --dtype bfloat16 or float32" if p.dtype == "float16" else ""))
    return {"status": status, "error": error, "params": p.record(), "metrics": metrics, "meta": provenance}


def timed_row(loaded: LoadedModel | None, tokens: list[int], params: EvalParams, quality: dict) -> dict:
    """A report row's result: the NLL-side metrics of `quality` (the evaluation it shares with the rows of the
    same attention schedule), its own parameters, and its decode step timed (`params.timing_steps`).

    The result's `params.evaluator` says which evaluator produced the NLLs, `meta.nll_params` of which run.
    """
    p = params.resolved()
    device = next(loaded.model.parameters()).device if loaded is not None else torch.device(p.device)
    nll_side = {k: v for k, v in quality["metrics"].items() if k not in TIMING_KEYS}  # not the other run's times
    record = {"status": quality["status"], "error": quality["error"], "params": p.record(),
              "metrics": {**dict.fromkeys(METRIC_KEYS), **nll_side},
              "meta": collect(device, getattr(torch, p.dtype, torch.float32), p.seed)}
    record["params"]["evaluator"] = quality["params"].get("evaluator", "decode")
    record["meta"]["nll_params"] = quality["params"]
    if "peer_versions" in quality.get("meta", {}):
        record["meta"]["peer_versions"] = quality["meta"]["peer_versions"]
    _timing_part(record, loaded, tokens, p)
    return record


# What a run may raise and still leave a record: a bad input found late, a peer's pipe or a full disk (OSError),
# a kernel's or a worker's error, memory.  Anything else is a bug and propagates.
RUN_FAILURES = (StreamkvError, OSError, RuntimeError, MemoryError)


def failure(params: EvalParams, exc: BaseException) -> dict:
    """The record of a run that raised one of RUN_FAILURES: "not_installed" with the install hint for an absent
    optional peer, else "failed" with the exception's type and message."""
    if isinstance(exc, NotInstalled):
        return failed_record(params, str(exc), status="not_installed")
    return failed_record(params, error_text(exc))


def failed_record(params: EvalParams, error: str, status: str = "failed") -> dict:
    """The record of a run that could not produce metrics (with its resolved parameters where they resolve).

    `status`: "failed", or "not_installed" for a peer whose optional package is absent.
    """
    try:
        rec = params.resolved().record()
    except StreamkvError:
        rec = asdict(params)
    return {"status": status, "error": error, "params": rec, "metrics": {k: None for k in METRIC_KEYS},
            "meta": collect(params.device, getattr(torch, params.dtype, torch.float32), params.seed)}

