"""The stepper interface: what the decode loop, the timing part and the bench call on a method.

A stepper runs a method's forwards, one call per chunk of tokens (the prefill,
then one token per step), and says what its last forward did.  The members a
method may not have (cache timers, a forward timed in another process, a
peer's versions) have defaults here that mean "none", so callers never probe
for them.
"""

from __future__ import annotations

import math
import time

import torch


class Stepper:
    """One method's forwards; subclasses implement `forward` and `kv_bytes`."""

    kv_len: int = 0  # keys the last forward attended to, its own included
    dropped: int = 0  # tokens the last forward evicted
    kind: str = ""  # the kind of that prune (streamkv.cache.policy: LAZY, FORCED, EMERGENCY), "" without one
    update_ms: float = math.nan  # the cache's own timer of its update in the last forward (NaN: no such timer)
    plan_ms: float = math.nan  # the part of it spent planning (policy, layout, counters)
    forward_ms: float | None = None  # the last forward as timed where it ran (a peer's worker); None: time it here
    peak_memory_mb: float | None = None  # where the forwards run in another process, its peak memory
    versions: dict | None = None  # a peer's package versions, recorded with the result

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits of the tokens `ids` ([1, q]), which extend the stream."""
        raise NotImplementedError

    def skip(self, ids: torch.Tensor) -> None:
        """Extend the stream by `ids` without scoring them (the recompute baseline skips the forward)."""
        self.forward(ids)

    def kv_bytes(self) -> int:
        """Bytes of the keys and values held (or, for recompute, computed by the last forward)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the stepper holds outside this process (a peer's worker); nothing by default."""


class CachedStepper(Stepper):
    """Runs forwards through the model with a cache; a streaming cache's record of its last step (`last_step`)
    says what the forward did, a cache without one (the timing reference) keeps the defaults."""

    def __init__(self, model: torch.nn.Module, cache):
        self.model = model
        self.cache = cache

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True).logits
        step = self.cache.last_step
        if step is not None:
            self.kv_len, self.dropped, self.kind = step.kv_len, step.dropped, step.kind
            self.update_ms, self.plan_ms = step.update_s * 1e3, step.plan_s * 1e3
        return logits

    def kv_bytes(self) -> int:
        return self.cache.nbytes()


def forward_time_ms(stepper, t0: float) -> float:
    """The forward's time: the stepper's own where it runs elsewhere (a peer's worker), else since t0."""
    return stepper.forward_ms or (time.perf_counter() - t0) * 1e3
