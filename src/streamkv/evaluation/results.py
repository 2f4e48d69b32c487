"""What a run's result holds: its metric keys, its per-token trace, and the metrics read off the NLLs.

Shared by the decode loop (`streamkv.evaluation.loop`) and the parallel evaluator
(`streamkv.evaluation.parallel`), so both write the same record and trace.
"""

from __future__ import annotations

import math
import resource

import numpy as np
import pandas as pd
import torch

from streamkv.cache.policy import EMERGENCY, FORCED

TRACE_COLUMNS = ("step", "position", "target", "nll", "step_ms", "kv_len", "pruned", "dropped", "prune_kind",
                 "update_ms")


METRIC_KEYS = ("ppl", "nll_mean", "n_scored", "tpot_ms", "tpot_steady_ms", "tpot_p50_ms", "tpot_p90_ms", "ttft_ms",
               "prefill_sec", "total_sec", "peak_memory_mb", "kv_bytes_peak", "kv_len_min", "kv_len_mean",
               "kv_len_max", "n_prunes", "tokens_dropped", "n_emergency_prunes", "n_forced_prunes", "drop_max",
               "update_ms_mean", "update_ms_prune", "update_ms_noprune", "tpot_ref_ms", "tpot_ratio", "tpot_ratio_lo",
               "tpot_ratio_hi", "timed_steps", "tokens_per_s", "tokens_per_s_stream", "tpot_p99_ms",
               "tpot_ref_p50_ms", "tpot_ref_p90_ms", "tpot_ref_p99_ms", "timed_prunes")


# What the timing part measures (the rest of the metrics come from the NLLs and the cache's schedule).
TIMING_KEYS = ("tpot_ms", "tpot_steady_ms", "tpot_p50_ms", "tpot_p90_ms", "ttft_ms", "prefill_sec", "kv_bytes_peak",
               "update_ms_mean", "update_ms_prune", "update_ms_noprune", "tpot_ref_ms", "tpot_ratio", "tpot_ratio_lo",
               "tpot_ratio_hi", "timed_steps", "tokens_per_s", "tokens_per_s_stream", "tpot_p99_ms",
               "tpot_ref_p50_ms", "tpot_ref_p90_ms", "tpot_ref_p99_ms", "timed_prunes")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def perplexity(nll_mean: float) -> float | None:
    """exp(mean NLL); None where that is not a finite float (a non-finite NLL, or one past ~709.8 nats)."""
    try:
        return finite(math.exp(nll_mean))
    except OverflowError:
        return None


def trace_frame(ids: torch.Tensor, nll: np.ndarray, pre: int, prefill_ms: float, step_ms: np.ndarray,
                kv_len: np.ndarray, dropped: np.ndarray, kinds: np.ndarray, update_ms: np.ndarray) -> pd.DataFrame:
    """The per-token trace: the prefill's scored targets (step 0) first, then one row per decode step."""
    n = ids.shape[-1]
    n_dec = n - 1 - pre
    return pd.DataFrame({
        "step": np.concatenate([np.zeros(pre, dtype=np.int64), np.arange(1, n_dec + 1)]),
        "position": np.arange(n - 1),
        "target": ids[0, 1:].cpu().numpy(),
        "nll": nll,
        "step_ms": np.concatenate([np.full(pre, prefill_ms), step_ms]),
        "kv_len": np.concatenate([np.full(pre, pre, dtype=np.int64), kv_len]),
        "pruned": np.concatenate([np.zeros(pre, dtype=bool), dropped > 0]),
        "dropped": np.concatenate([np.zeros(pre, dtype=np.int64), dropped]),
        "prune_kind": np.concatenate([np.full(pre, "", dtype=object), kinds]).astype(str),
        "update_ms": np.concatenate([np.full(pre, np.nan), update_ms]),
    })


def quality_metrics(nll: np.ndarray, pre: int, kv_len: np.ndarray, dropped: np.ndarray, kinds: np.ndarray,
                    prefill_dropped: int = 0, prefill_kind: str = "") -> dict:
    """Every metric that does not time anything (PPL, KV lengths, prunes); the timed ones are None."""
    nll_mean = float(nll.mean())
    kv_decode = kv_len if kv_len.size else np.array([pre])
    metrics = dict.fromkeys(METRIC_KEYS)
    metrics.update({
        "ppl": perplexity(nll_mean),
        "nll_mean": finite(nll_mean),
        "n_scored": int(nll.size),
        "kv_len_min": int(kv_decode.min()),
        "kv_len_mean": float(kv_decode.mean()),
        "kv_len_max": int(kv_decode.max()),
        "n_prunes": int((dropped > 0).sum() + (prefill_dropped > 0)),
        "tokens_dropped": int(dropped.sum() + prefill_dropped),
        "n_emergency_prunes": int((kinds == EMERGENCY).sum() + (prefill_kind == EMERGENCY)),
        "n_forced_prunes": int((kinds == FORCED).sum() + (prefill_kind == FORCED)),
        "drop_max": int(max(dropped.max(initial=0), prefill_dropped)),
    })
    return metrics
