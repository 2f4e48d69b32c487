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
  absolute positions; when tokens are evicted after the sinks, only the sink
  keys move: rotated, from a copy kept at their own positions 0..S-1, forward
  by every token evicted so far, so that they sit right before the window
  again.  (One rotation from the copy, not one more per prune: rotations
  applied on top of each other add their roundings, and after thousands of
  prunes the sinks would drift.)
* `mit` (the reference, written independently) stores un-rotated keys and
  rotates all of them at their in-cache positions on every step.

Both give the same attention; the tests hold them to it.

`refresh` (the study's tail re-insertion) keeps up to R evicted tokens, chosen
by a selection strategy, and puts them back at the tail of the cache at every
prune, so they sit next to the newest tokens whatever their original position.
It needs keys that can move freely, so it runs on the un-rotated (`mit`)
storage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin

from streamkv.cache.policy import EMERGENCY, FORCED, Prune
from streamkv.cache.rope import RotaryAligner
from streamkv.errors import StreamkvError


@dataclass
class Step:
    """What the forward in flight does to the cache (decided once, at layer 0)."""

    position: int  # absolute position of the first incoming token
    q: int  # incoming tokens
    dropped: int  # tokens evicted before appending
    kv_len: int  # keys the queries attend to after the update
    kind: str = ""  # the prune's kind (policy.LAZY, FORCED or EMERGENCY; "" without one)
    update_s: float = 0.0  # time spent in the cache update, all layers (plan_s included)
    plan_s: float = 0.0  # of which deciding the step (policy, layout, counters), once per forward
    memo: dict = field(default_factory=dict)  # per-step values shared by all layers


class StreamingLayer(CacheLayerMixin):
    """One layer's keys and values; the owning cache decides what to evict."""

    is_sliding = False
    scored = False  # True: its evictions read the attention weights (a `cache.scored.ScoringStepper` runs it)
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

    def _evict_and_append(self, stored: torch.Tensor, new: torch.Tensor, dropped: int, sinks=None,
                          keep=None) -> torch.Tensor:
        if keep is not None:  # an explicit layout (refresh): the slots to keep, in their new order
            return torch.cat((stored.index_select(-2, keep), new), dim=-2)
        if not dropped:
            return torch.cat((stored, new), dim=-2)
        s = self.owner.policy.sink
        head = stored[:, :, :s] if sinks is None else sinks
        return torch.cat((head, stored[:, :, s + dropped :], new), dim=-2)

    def update(self, key_states, value_states, step: Step):  # pragma: no cover - abstract
        raise NotImplementedError


class RealignedLayer(StreamingLayer):
    """Rotated keys; on eviction the sinks move forward next to the window.

    Unbounded (dense) caches concatenate.  A bounded one keeps its keys in a
    buffer with some room past the largest cache (`max_kv + room` slots):
    the stored keys are the slice [start, end), new tokens are written at
    `end`, and a prune of d tokens writes the shifted sinks d slots further on
    and moves `start` there -- the window itself is never copied.  Only when
    the room is used up is the slice moved back to slot 0, once every
    `room` / (tokens per step) steps or so.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.buf_k = self.buf_v = None
        self.start = 0
        self.raw_sinks = None  # the sink keys at their own positions 0..S-1 (kept from the first prune on)

    def reset(self) -> None:
        super().reset()
        self.buf_k = self.buf_v = self.raw_sinks = None

    def _moved_sinks(self, step: Step) -> torch.Tensor:
        """The sinks right before the window: rotated from their copy by every token evicted so far."""
        s, aligner = self.owner.policy.sink, self.owner.aligner
        if aligner is None:  # positions "original": they stay where they were rotated
            return self.keys[:, :, :s].clone()
        if self.raw_sinks is None:  # the first prune: nothing has moved them yet
            self.raw_sinks = self.keys[:, :, :s].clone()
        if "sink_angles" not in step.memo:  # once per forward, for every layer
            step.memo["sink_angles"] = aligner.angles(torch.tensor([self.owner.tokens_dropped]))
        return aligner.rotate(self.raw_sinks, *step.memo["sink_angles"])

    def nbytes(self) -> int:
        if self.buf_k is None:
            return super().nbytes()
        return self.buf_k.nbytes + self.buf_v.nbytes  # what is allocated, room included

    def update(self, key_states, value_states, step: Step):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s, d = self.owner.policy.sink, step.dropped
        sinks = self._moved_sinks(step) if d and s else None
        if self.owner.policy.max_kv is None:
            self.keys = self._evict_and_append(self.keys, key_states, d, sinks)
            self.values = self._evict_and_append(self.values, value_states, d)
            return self.keys, self.values
        n, q = self.keys.shape[-2], key_states.shape[-2]
        start = self.start + d  # the sinks move onto the first d evicted slots
        end = self.start + n + q
        if self.buf_k is None or end > self.buf_k.shape[-2]:
            start, end = self._make_room(n - d + q, d)
        if sinks is not None:
            self.buf_k[:, :, start : start + s] = sinks
            self.buf_v[:, :, start : start + s] = self.buf_v[:, :, self.start : self.start + s].clone()
        self.buf_k[:, :, end - q : end] = key_states
        self.buf_v[:, :, end - q : end] = value_states
        self.start = start
        self.keys, self.values = self.buf_k[:, :, start:end], self.buf_v[:, :, start:end]
        return self.keys, self.values

    def _make_room(self, need: int, d: int) -> tuple[int, int]:
        """Move the kept keys (sinks and the window after the d evicted) to slot 0 of a buffer that fits `need`."""
        s, n = self.owner.policy.sink, self.keys.shape[-2]
        max_kv = self.owner.policy.max_kv
        size = max(need, max_kv) + max(16, max_kv // 8)
        kept = [(0, min(s, n)), (min(s, n) + d, n)]  # slices of the stored keys that stay
        old_k, old_v = self.keys, self.values
        if self.buf_k is None or size > self.buf_k.shape[-2]:
            self.buf_k = old_k.new_empty((*old_k.shape[:2], size, old_k.shape[-1]))
            self.buf_v = old_v.new_empty((*old_v.shape[:2], size, old_v.shape[-1]))
        else:  # the same buffer: the source may overlap the destination
            old_k, old_v = old_k.clone(), old_v.clone()
        at = 0
        for a, b in kept:
            self.buf_k[:, :, at : at + b - a] = old_k[:, :, a:b]
            self.buf_v[:, :, at : at + b - a] = old_v[:, :, a:b]
            at += b - a
        # The sinks (if any) stay at slot 0: the caller writes the shifted ones there.
        self.start = 0
        self.keys, self.values = self.buf_k[:, :, :at], self.buf_v[:, :, :at]
        return 0, at + (need - (n - d))


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
        keep = step.memo.get("keep")
        self.keys = self._evict_and_append(self.keys, raw, step.dropped, keep=keep)
        self.values = self._evict_and_append(self.values, value_states, step.dropped, keep=keep)
        return aligner.rotate(self.keys, *step.memo["rotate"]), self.values


def select_uniform(positions: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of `budget` candidates evenly spaced in rank (the study's uniform strategy)."""
    n = positions.numel()
    if n <= budget:
        return torch.arange(n)
    return ((torch.arange(budget) * 2 + 1) * n // (2 * budget)).long()


def select_recent(positions: torch.Tensor, budget: int) -> torch.Tensor:
    """Indices of the `budget` most recently evicted candidates."""
    return torch.arange(max(0, positions.numel() - budget), positions.numel())


REFRESH_SELECTORS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "uniform": select_uniform,
    "recent": select_recent,
}


class StreamingCache(Cache):
    """A `transformers` Cache that keeps a bounded KV by an eviction policy.

    Pass it to a model's forward or to `generate` as `past_key_values`.
    `n_prunes`, `tokens_dropped`, `n_emergency`, `n_forced`, `last_step`
    (with the update time of the last forward) and `nbytes()` expose what it did.
    """

    def __init__(self, layer_cls: type[StreamingLayer], num_layers: int, policy, aligner: RotaryAligner | None):
        self.policy = policy
        self.aligner = aligner
        self.sync: Callable[[], None] | None = None  # set to a device synchronise to time updates exactly on GPU
        self.seen = 0
        self.n_prunes = self.tokens_dropped = self.n_emergency = self.n_forced = 0
        self.last_step: Step | None = None
        super().__init__(layers=[layer_cls(self) for _ in range(num_layers)])

    @property
    def kv_length(self) -> int:
        """Tokens currently stored (per layer)."""
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def _plan(self, q: int) -> tuple[Prune, int]:
        """The prune this forward makes and the number of keys it attends to."""
        length = self.kv_length
        prune = self.policy.plan(length, q, self.seen)
        return prune, length - prune.dropped + q

    def mask_sizes(self, q: int) -> tuple[int, int]:
        # The mask is built before the layers run, from the same plan the
        # update will follow: `kv_length` keys, the last of them the newest.
        kv_length = self._plan(q)[1]
        return kv_length, self.seen + q - kv_length

    def _begin_step(self, key_states, value_states) -> Step:
        """What this forward does to the cache, decided once (at layer 0) for every layer."""
        q = key_states.shape[-2]
        prune, kv_len = self._plan(q)
        return Step(self.seen, q, prune.dropped, kv_len, prune.kind)

    def _after_begin(self) -> None:
        """Called once per forward, after `seen` counts its tokens (subclasses hook in here)."""

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.sync is not None:
            self.sync()
        t0 = time.perf_counter()
        if layer_idx == 0:
            step = self.last_step = self._begin_step(key_states, value_states)
            self.seen += step.q
            if step.dropped:
                self.n_prunes += 1
                self.tokens_dropped += step.dropped
                self.n_emergency += step.kind == EMERGENCY
                self.n_forced += step.kind == FORCED
            self._after_begin()
            step.plan_s = time.perf_counter() - t0
        out = self.layers[layer_idx].update(key_states, value_states, self.last_step)
        if self.sync is not None:
            self.sync()
        self.last_step.update_s += time.perf_counter() - t0
        return out

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reset(self):
        super().reset()
        self.seen = self.n_prunes = self.tokens_dropped = self.n_emergency = self.n_forced = 0
        self.last_step = None


class RefreshCache(StreamingCache):
    """Start+Recent that re-inserts up to `refresh` evicted tokens at the tail (the study's refresh).

    The layout is [sinks][recent, older part][refreshed tokens][recent, newer part]: the policy counts the
    sinks and the recent tokens; at every prune the refreshed tokens and the ones just evicted are the
    candidates, `select` picks `refresh` of them, and they go back between the recent ones.  Keys are kept
    un-rotated and rotated at their in-cache positions every step (`MitLayer`), since a refreshed token
    moves.
    """

    def __init__(self, num_layers: int, policy, aligner: RotaryAligner, refresh: int,
                 select: Callable[[torch.Tensor, int], torch.Tensor] = select_uniform):
        self.refresh = refresh
        self.select = select
        self.n_before = self.n_refresh = 0
        self.slot_pos = torch.empty(0, dtype=torch.long)  # original position of every stored slot
        super().__init__(MitLayer, num_layers, policy, aligner)

    def _plan(self, q: int) -> tuple[Prune, int]:
        length = self.kv_length - self.n_refresh  # the refreshed tokens are outside the policy's count
        prune = self.policy.plan(length, q, self.seen)
        refreshed = min(self.refresh, self.n_refresh + prune.dropped) if prune.dropped else self.n_refresh
        return prune, length - prune.dropped + q + refreshed

    def _begin_step(self, key_states, value_states) -> Step:
        step = super()._begin_step(key_states, value_states)
        self._refresh_layout(step)
        return step

    def _refresh_layout(self, step: Step) -> None:
        """Evict the oldest recent tokens, re-select the refreshed ones and put them at the tail."""
        s, a, r = self.policy.sink, self.n_before, self.n_refresh
        total = self.slot_pos.numel()
        if step.dropped:
            recent = torch.cat((torch.arange(s, s + a), torch.arange(s + a + r, total)))
            candidates = torch.cat((torch.arange(s + a, s + a + r), recent[: step.dropped]))
            candidates = candidates[torch.argsort(self.slot_pos[candidates])]
            chosen = candidates[self.select(self.slot_pos[candidates], self.refresh)]
            if chosen.numel() != min(self.refresh, candidates.numel()):  # the mask was sized for that many
                raise StreamkvError(f"refresh selection returned {chosen.numel()} tokens; it must return "
                                    f"min(budget, candidates) = {min(self.refresh, candidates.numel())}")
            keep = torch.cat((torch.arange(s), recent[step.dropped :], chosen))
            step.memo["keep"] = keep.to(self.layers[0].keys.device)
            self.slot_pos = self.slot_pos[keep]
            self.n_before, self.n_refresh = recent.numel() - step.dropped, chosen.numel()
        self.slot_pos = torch.cat((self.slot_pos, step.position + torch.arange(step.q)))

    def reset(self):
        super().reset()
        self.n_before = self.n_refresh = 0
        self.slot_pos = torch.empty(0, dtype=torch.long)


def num_attention_layers(model: nn.Module) -> int:
    return model.config.get_text_config().num_hidden_layers
