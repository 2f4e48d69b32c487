"""Streaming KV caches as `transformers` Cache objects.

One `StreamingCache` per stream: a list of per-layer objects behind the
`Cache` interface (as in `transformers.cache_utils`), one eviction policy that
decides once per forward how many tokens to drop, and one RoPE aligner.

Position contract (the same for every method, and the one `generate` uses):
the model places the incoming tokens at their absolute positions, i.e. the
number of tokens the stream has seen (`get_seq_length()`; transformers' own
sliding-window layers count the same way).  The cached keys are kept
contiguous and ending at the query, so query-key distances are the distances
*inside the cache* -- the pos-shift semantics of StreamingLLM -- while the
query itself needs no help from the cache:

* `start_recent` stores rotated keys.  The window keys already sit at their
  absolute positions; when `d` tokens are evicted after the sinks, only the
  sink keys are rotated forward by `d` so that they sit right before the
  window again.
* `mit` (the reference, written independently) stores un-rotated keys and
  rotates all of them at their in-cache positions on every step.

Both give the same attention; the tests hold them to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .budget import Budget
from .errors import StreamkvError
from .params import CACHE_METHODS
from .policy import KeepAll, StartRecent
from .rope import RotaryAligner


@dataclass
class Step:
    """What the forward in flight does to the cache (decided once, at layer 0)."""

    position: int  # absolute position of the first incoming token
    q: int  # incoming tokens
    dropped: int  # tokens evicted before appending
    kv_len: int  # keys the queries attend to after the update
    memo: dict = field(default_factory=dict)  # per-step values shared by all layers


class StreamingLayer(CacheLayerMixin):
    """One layer's keys and values; the owning cache decides what to evict."""

    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, owner: "StreamingCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = (*key_states.shape[:2], 0, key_states.shape[-1])
        self.keys = key_states.new_empty(shape)
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def get_seq_length(self) -> int:
        return self.owner.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.mask_sizes(query_length)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def _evict_and_append(self, stored: torch.Tensor, new: torch.Tensor, dropped: int, sinks=None) -> torch.Tensor:
        if not dropped:
            return torch.cat((stored, new), dim=-2)
        s = self.owner.policy.sink
        head = stored[:, :, :s] if sinks is None else sinks
        return torch.cat((head, stored[:, :, s + dropped :], new), dim=-2)

    def update(self, key_states, value_states, step: Step):  # pragma: no cover - abstract
        raise NotImplementedError


class RealignedLayer(StreamingLayer):
    """Rotated keys; on eviction the sinks move forward next to the window."""

    def update(self, key_states, value_states, step: Step):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        sinks = None
        s = self.owner.policy.sink
        if step.dropped and s:
            sinks = self.owner.aligner.shift(self.keys[:, :, :s], step.dropped)
        self.keys = self._evict_and_append(self.keys, key_states, step.dropped, sinks)
        self.values = self._evict_and_append(self.values, value_states, step.dropped)
        return self.keys, self.values


class MitLayer(StreamingLayer):
    """MIT StreamingLLM reference: un-rotated keys, rotated at their in-cache positions every step."""

    def update(self, key_states, value_states, step: Step):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        aligner = self.owner.aligner
        if "unrotate" not in step.memo:
            incoming = step.position + torch.arange(step.q)
            step.memo["unrotate"] = aligner.angles(-incoming)
            first = step.position + step.q - step.kv_len
            step.memo["rotate"] = aligner.angles(first + torch.arange(step.kv_len))
        raw = aligner.rotate(key_states, *step.memo["unrotate"])
        self.keys = self._evict_and_append(self.keys, raw, step.dropped)
        self.values = self._evict_and_append(self.values, value_states, step.dropped)
        return aligner.rotate(self.keys, *step.memo["rotate"]), self.values


class StreamingCache(Cache):
    """A `transformers` Cache that keeps a bounded KV by an eviction policy.

    Pass it to a model's forward or to `generate` as `past_key_values`.
    `n_prunes`, `tokens_dropped`, `last_step` and `nbytes()` expose what it did.
    """

    def __init__(self, layer_cls: type[StreamingLayer], num_layers: int, policy, aligner: RotaryAligner | None):
        self.policy = policy
        self.aligner = aligner
        self.seen = 0
        self.n_prunes = 0
        self.tokens_dropped = 0
        self.last_step: Step | None = None
        super().__init__(layers=[layer_cls(self) for _ in range(num_layers)])

    @property
    def kv_length(self) -> int:
        """Tokens currently stored (per layer)."""
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def mask_sizes(self, q: int) -> tuple[int, int]:
        # The mask is built before the layers run, from the same plan the
        # update will follow: `kv_length` keys, the last of them the newest.
        length = self.kv_length
        kv_length = length - self.policy.plan(length, q, self.seen) + q
        return kv_length, self.seen + q - kv_length

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            q = key_states.shape[-2]
            length = self.kv_length
            dropped = self.policy.plan(length, q, self.seen)
            self.policy.commit(length, q, self.seen, dropped)
            self.last_step = Step(self.seen, q, dropped, length - dropped + q)
            self.seen += q
            if dropped:
                self.n_prunes += 1
                self.tokens_dropped += dropped
        return self.layers[layer_idx].update(key_states, value_states, self.last_step)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reset(self):
        super().reset()
        self.seen = self.n_prunes = self.tokens_dropped = 0
        self.last_step = None


def num_attention_layers(model: nn.Module) -> int:
    return model.config.get_text_config().num_hidden_layers


def make_cache(
    method: str,
    model: nn.Module,
    cap: int | None = 256,
    sink: int = 4,
    compress_every: int = 1,
    cache_slack: int = 0,
    max_drop: int = 0,
) -> StreamingCache:
    """Build the cache of `method` for `model`.

    `dense` keeps everything (`cap` unused); `window` keeps the last `cap`
    tokens; `start_recent` keeps `sink` + `cap - sink` recent tokens and prunes
    every `compress_every` positions (with softlite `cache_slack` / `max_drop`,
    the window shrinks by the slack: see `StartRecent`); `mit` is strict Start+Recent as MIT
    StreamingLLM does it.  Use with `model.generate(..., past_key_values=cache)`
    or in a forward loop.
    """
    n = num_attention_layers(model)
    if method == "dense":
        return StreamingCache(RealignedLayer, n, KeepAll(), None)
    if method not in CACHE_METHODS:
        raise StreamkvError(f"unknown cache method '{method}'; choose one of: {', '.join(CACHE_METHODS)}")
    if compress_every < 1:
        raise StreamkvError(f"compress_every must be >= 1, got {compress_every}")
    if max_drop < 0:
        raise StreamkvError(f"max_drop must be >= 0, got {max_drop}")
    if (cache_slack or max_drop) and method != "start_recent":
        raise StreamkvError(f"cache_slack and max_drop (softlite) apply to start_recent, not to '{method}'")
    if method == "window":
        budget = Budget.derive(cap, sink=0)
        return StreamingCache(RealignedLayer, n, StartRecent(0, budget.window, compress_every), None)
    budget = Budget.derive(cap, sink=sink, cache_slack=cache_slack)
    if method == "mit" and compress_every != 1:
        raise StreamkvError("method 'mit' is strict Start+Recent (compress_every 1); use start_recent for lazy pruning")
    policy = StartRecent(budget.sink, budget.window, compress_every, budget.cache_slack, max_drop)
    layer_cls = MitLayer if method == "mit" else RealignedLayer
    return StreamingCache(layer_cls, n, policy, RotaryAligner(model))
