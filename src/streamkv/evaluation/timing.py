"""Step times that can be compared: a method's decode step against a no-eviction reference, interleaved.

Step times on a shared machine drift by +-10 % between runs and between jobs,
while eviction costs 1-3 % of a step.  So a method's time per output token is
measured side by side with a reference that does the same forward at the same
KV length with no eviction work (`SameLengthCache`), step for step in a seeded
random order; what is reported is the ratio of the two, and the method's TPOT.
A step time is the median, over blocks of `block` steps, of the block's mean:
a block holds a whole lazy period, so a lazy prune is charged to the method.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, CacheLayerMixin

from streamkv.errors import StreamkvError, error_text
from streamkv.evaluation.params import TIMING_BLOCK as BLOCK
from streamkv.evaluation.results import finite
from streamkv.evaluation.stepper import forward_time_ms

WARMUP = 16


class _SameLengthLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False

    def __init__(self, owner: "SameLengthCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        cap = self.owner.cap
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_zeros((*key_states.shape[:2], cap, key_states.shape[-1]))
        self.values = value_states.new_zeros((*value_states.shape[:2], cap, value_states.shape[-1]))
        self.last = torch.tensor([cap - 1], device=key_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if q == 1:
            self.keys.index_copy_(2, self.last, key_states)
            self.values.index_copy_(2, self.last, value_states)
        else:  # the prefill fills the slots
            self.keys[:, :, :q] = key_states
            self.values[:, :, :q] = value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.cap, self.owner.seen + query_length - self.owner.cap

    def get_max_length(self) -> int:
        return self.owner.cap


class SameLengthCache(Cache):
    """The timing reference: attention over `cap` keys, one slot written per step, nothing evicted or rotated."""

    last_step = None  # (a streaming cache's record of its last step: this one does no eviction work to record)

    def __init__(self, num_layers: int, cap: int):
        self.cap, self.seen = cap, 0
        super().__init__(layers=[_SameLengthLayer(self) for _ in range(num_layers)])

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            if self.seen == 0 and key_states.shape[-2] != self.cap:
                raise StreamkvError(f"the reference cache is filled by one prefill of exactly cap ({self.cap}) tokens")
            self.seen += key_states.shape[-2]
        return self.layers[layer_idx].update(key_states, value_states)

    def nbytes(self) -> int:
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)


def block_means(values: np.ndarray, block: int) -> np.ndarray:
    """The mean of each whole block of `block` steps (NaN entries, untimed steps, ignored; NaN for an untimed block)."""
    blocks = values[: len(values) // block * block].reshape(-1, block)
    out = np.full(len(blocks), np.nan)
    timed = np.isfinite(blocks).any(axis=1)
    out[timed] = np.nanmean(blocks[timed], axis=1)
    return out


def block_median(values: np.ndarray, block: int) -> float:
    """Median over blocks of the block's mean (NaN entries, untimed steps, ignored)."""
    means = block_means(values, block)
    means = means[np.isfinite(means)]
    return float(np.median(means)) if means.size else float("nan")


def step_ratio_interval(method_ms: np.ndarray, reference_ms: np.ndarray, block: int = BLOCK) -> tuple[float, float]:
    """The interval of a timing part's ratio (TPOT over the reference's): paired steps resampled, each resample
    read as the ratio is (median over blocks of `block` steps of the block mean); NaN with fewer than
    `stats.MIN_BLOCKS` timed steps.

    The steps are the units resampled, not the blocks: a timing part has only a few blocks (two for 64 steps), and
    each step's two forwards ran side by side, so the drift of the machine falls on both.  A lazy row's prune
    steps are drawn as often as chance has it, so the interval carries the uncertainty of how many of them a
    stretch of steps holds.
    """
    from streamkv.analysis.stats import MIN_BLOCKS, ratio_interval

    def statistic(x, axis):  # the ratio's own reading, along the resample's steps
        whole = x.shape[axis] // block * block or x.shape[axis]
        per = np.moveaxis(x, axis, -1)[..., :whole]
        return np.median(per.reshape(*per.shape[:-1], -1, min(block, whole)).mean(axis=-1), axis=-1)

    lo, hi = ratio_interval(method_ms, reference_ms, statistic=statistic, min_pairs=MIN_BLOCKS)
    return lo, hi


def sync_of(device: torch.device) -> Callable[[], None]:
    """What waits for the device's queued work (nothing on a CPU): called around every timed forward."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def interleave(steppers: dict, ids: torch.Tensor, start: int, n: int, seed: int = 0,
               skip: Callable[[int, str], bool] | None = None,
               after: Callable[[int, str, object, torch.Tensor], None] | None = None,
               failures: dict[str, str] | None = None, desc: str | None = None,
               progress: bool = False) -> dict[str, np.ndarray]:
    """Step every stepper through the tokens ids[:, start + i] (i < n), timing each forward; ms per step.

    Every step runs the steppers in a new seeded random order: none always runs first, and none always runs after
    the same one (a peer's worker process, say, whose threads may still be spinning when the next one starts), so
    the drift of a shared machine falls on all of them alike.  A time is NaN where a step was not timed.
    `skip(i, name)`: feed that token untimed (`stepper.skip`).  `after(i, name, stepper, logits)`: read what the
    forward did (its cache timers, the NLL of its logits).  With `failures`, an exception in a forward or in
    `after` is kept there as text and that stepper is closed and left out from then on; without, it propagates.
    """
    sync = sync_of(ids.device)
    names = list(steppers)
    step_ms = {name: np.full(n, np.nan) for name in names}
    orders = np.random.default_rng(seed).permuted(np.tile(np.arange(len(names)), (n, 1)), axis=1)
    for i in tqdm(range(n), desc=desc, disable=not progress, mininterval=2.0, leave=False):
        token = ids[:, start + i : start + i + 1]
        for name in (names[j] for j in orders[i]):
            stepper = steppers.get(name)
            if stepper is None:  # (it failed earlier)
                continue
            if skip is not None and skip(i, name):
                stepper.skip(token)
                continue
            try:
                sync()
                t0 = time.perf_counter()
                logits = stepper.forward(token)
                sync()
                step_ms[name][i] = forward_time_ms(stepper, t0)  # (a peer's forward as its worker timed it)
                if after is not None:
                    after(i, name, stepper, logits)
            except Exception as exc:
                if failures is None:
                    raise
                failures[name] = error_text(exc)
                steppers.pop(name).close()
    return step_ms


def timing_steps(steps: int, compress_every: int, block: int = BLOCK) -> int:
    """Timed steps for a row: at least `steps` and two prune periods, in whole blocks."""
    need = max(steps, 2 * compress_every)
    return -(-need // block) * block


def batch_streams(tokens: list[int], length: int, batch: int) -> list[list[int]]:
    """`batch` streams of `length` tokens from the text: as far apart as it allows, disjoint where it is long enough
    (on a text of exactly `length` tokens they are the same stream; the step's cost does not depend on the text)."""
    shift = 0 if batch == 1 else min(length, (len(tokens) - length) // (batch - 1))
    return [tokens[b * shift : b * shift + length] for b in range(batch)]


@torch.inference_mode()
def time_interleaved(loaded, tokens: list[int], params, steps: int, warmup: int = WARMUP, block: int = BLOCK,
                     seed: int = 0) -> dict:
    """TPOT of `params`' decode step and of the no-eviction reference, interleaved after a prefill of `cap`.

    With `params.timing_batch` B > 1, each forward decodes one token of each of B streams (`batch_streams`):
    TPOT is then the time of such a step, `tokens_per_s` the tokens of all streams per second and
    `tokens_per_s_stream` each stream's.  Returns the timing metrics of a result (`tpot_ms`, `tpot_ref_ms`,
    `tpot_ratio`, percentiles, TTFT, the cache's update times and its bytes at peak, the tokens per second).
    """
    from streamkv.cache.factory import make_stepper
    from streamkv.cache.streaming import num_attention_layers
    from streamkv.evaluation.stepper import CachedStepper

    model = loaded.model
    device = next(model.parameters()).device
    sync = sync_of(device)
    cap = params.cap
    steps = timing_steps(steps, params.compress_every, block)
    n = warmup + steps
    if len(tokens) < cap + n:
        raise StreamkvError(f"timing needs {cap + n} tokens of text (a prefill of cap {cap}, {n} steps), "
                            f"the text has {len(tokens)}")
    ids = torch.tensor(batch_streams(tokens, cap + n, params.timing_batch), dtype=torch.long, device=device)
    # the prefill fills the budget, so every timed step streams under eviction
    steppers = {"method": make_stepper(model, replace(params, prefill=cap), loaded.source),
                "reference": CachedStepper(model, SameLengthCache(num_attention_layers(model), cap))}
    sync()
    t0 = time.perf_counter()
    steppers["method"].forward(ids[:, :cap])
    sync()
    ttft_ms = forward_time_ms(steppers["method"], t0)
    steppers["reference"].forward(ids[:, :cap])
    kv_bytes = steppers["method"].kv_bytes()
    update_ms, kv_bytes_at, dropped = np.full(n, np.nan), np.zeros(n), np.zeros(n, dtype=np.int64)

    def after(i, name, stepper, logits):  # the method's cache timer, bytes and prune, read after each forward
        if name == "method":
            update_ms[i], kv_bytes_at[i], dropped[i] = stepper.update_ms, stepper.kv_bytes(), stepper.dropped

    step_ms = interleave(steppers, ids, cap, n, seed=seed, after=after)
    kv_bytes = max(kv_bytes, int(kv_bytes_at.max()))
    steppers["method"].close()
    timed = step_ms["method"][warmup:]
    ref_steps = step_ms["reference"][warmup:]
    tpot, ref = block_median(timed, block), block_median(ref_steps, block)
    ratio_lo, ratio_hi = step_ratio_interval(timed, ref_steps, block)
    upd, pruned = update_ms[warmup:], dropped[warmup:] > 0
    timed_upd = np.isfinite(upd)
    batch = ids.shape[0]  # every step gives each stream one token

    def mean_of(values):
        return float(values.mean()) if values.size else None

    def tail(values, q):
        return float(np.percentile(values, q))

    # (the timed steps all come after the warm-up, so the "steady" TPOT, which leaves out the first steps of a
    # stream, is TPOT itself here: the mean step over the timed part, which a prune's spike enters as it happens)
    return {"tpot_ms": tpot, "tpot_ref_ms": ref, "tpot_ratio": tpot / ref, "tpot_ratio_lo": finite(ratio_lo),
            "tpot_ratio_hi": finite(ratio_hi), "timed_steps": steps,
            "tokens_per_s": batch * 1e3 / tpot, "tokens_per_s_stream": 1e3 / tpot,
            "tpot_steady_ms": float(np.nanmean(timed)), "tpot_p50_ms": tail(timed, 50),
            "tpot_p90_ms": tail(timed, 90), "tpot_p99_ms": tail(timed, 99), "tpot_ref_p50_ms": tail(ref_steps, 50),
            "tpot_ref_p90_ms": tail(ref_steps, 90), "tpot_ref_p99_ms": tail(ref_steps, 99),
            "ttft_ms": ttft_ms, "prefill_sec": ttft_ms / 1e3, "kv_bytes_peak": int(kv_bytes),
            "update_ms_mean": mean_of(upd[timed_upd]), "update_ms_prune": mean_of(upd[timed_upd & pruned]),
            "update_ms_noprune": mean_of(upd[timed_upd & ~pruned]), "timed_prunes": int(pruned.sum())}
