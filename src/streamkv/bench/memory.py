"""The bench's memory and evaluator sections: the cache's bytes and the process RSS over a long stream, and
the exact parallel evaluator's speed and NLLs against the decode loop's."""

from __future__ import annotations

import resource
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from streamkv.cache.factory import make_cache
from streamkv.errors import StreamkvError
from streamkv.evaluation.params import BenchConfig, EvalParams
from streamkv.evaluation.stepper import CachedStepper


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
    from streamkv.evaluation.loop import evaluate
    from streamkv.models.sources import LoadedModel

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
