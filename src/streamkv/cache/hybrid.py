"""Caches for hybrid models: one streaming cache per layer type, behind one `Cache`.

Hybrid models (Gemma 2/3, gpt-oss, Mistral-style) mix sliding-window layers,
which attend only the model's last W positions, with global layers, which
attend everything.  Eviction then means two things:

* global layers ("full_attention") keep the method's sinks and window under the cap;
* sliding layers ("sliding_attention") keep what the model's own window lets them
  attend among the cached keys: the most recent min(cap, W) tokens (fewer when a
  lazy method overshoots its cap between prunes, so a sliding layer never holds
  more keys than its window needs), without the sinks -- they sit outside the
  model's window -- unless `sink_layers="all"` gives them the sinks too (the
  sink-by-layer-type ablation).

Each layer type is its own `StreamingCache` (the method's class, its policy with
that type's budget, its RoPE aligner with that type's base), holding that type's
layers; this cache routes each layer's update to its group's cache and shows the
layers in the model's order, so transformers sizes each mask type from a layer of
that type (`is_sliding`).  The counters, the policy and the step record are the
global layers'; the bytes and the update time are summed over the groups.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from transformers.cache_utils import Cache

from streamkv.cache.streaming import StreamingCache
from streamkv.errors import StreamkvError

GLOBAL = "full_attention"
SLIDING = "sliding_attention"
LAYER_TYPES = (GLOBAL, SLIDING)


def layer_types(model) -> list[str] | None:
    """Each layer's attention type, for a hybrid model (both types present); None for a model of one type."""
    config = model.config.get_text_config()
    types = getattr(config, "layer_types", None)
    if not types or set(types) == {GLOBAL}:
        return None
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise StreamkvError(f"layer types {', '.join(unknown)} are not supported; streamkv's caches know "
                            f"{' and '.join(LAYER_TYPES)} layers")
    return list(types)


def sliding_window(model) -> int:
    """The sliding layers' window W: a query attends itself and the W - 1 positions before it."""
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    if not window:
        raise StreamkvError(f"{type(model).__name__} has sliding-attention layers but no sliding_window in its config")
    return int(window)


class LayerGroupsCache(Cache):
    """One `StreamingCache` per layer type; layer i of the model is layer `where[i]` of its type's cache."""

    def __init__(self, groups: dict[str, StreamingCache], types: list[str]):
        if GLOBAL not in groups:
            raise StreamkvError("a hybrid cache needs a global-layer group")
        self.groups = groups
        self.types = types
        self.main = groups[GLOBAL]
        local = {t: 0 for t in groups}
        self.where: list[tuple[StreamingCache, int]] = []
        for t in types:
            self.where.append((groups[t], local[t]))
            local[t] += 1
        for t, group in groups.items():
            if len(group.layers) != local[t]:
                raise StreamkvError(f"the {t} group has {len(group.layers)} layers, the model {local[t]}")
            for layer in group.layers:
                layer.is_sliding = t == SLIDING  # (an instance flag: the class is shared with plain caches)
        super().__init__(layers=[group.layers[i] for group, i in self.where])

    # --- what a StreamingCache shows, from the global layers (counts) or all groups (bytes, time)

    @property
    def policy(self):
        return self.main.policy

    @property
    def aligner(self):
        return self.main.aligner

    @property
    def seen(self) -> int:
        return self.main.seen

    @property
    def kv_length(self) -> int:
        return self.main.kv_length

    @property
    def n_prunes(self) -> int:
        return self.main.n_prunes

    @property
    def tokens_dropped(self) -> int:
        return self.main.tokens_dropped

    @property
    def n_emergency(self) -> int:
        return self.main.n_emergency

    @property
    def n_forced(self) -> int:
        return self.main.n_forced

    @property
    def last_step(self):
        step = self.main.last_step
        if step is None:
            return None
        steps = [g.last_step for g in self.groups.values() if g.last_step is not None]
        return replace(step, update_s=sum(s.update_s for s in steps), plan_s=sum(s.plan_s for s in steps))

    @property
    def sync(self) -> Callable[[], None] | None:
        return self.main.sync

    @sync.setter
    def sync(self, fn: Callable[[], None] | None) -> None:
        for group in self.groups.values():
            group.sync = fn

    def nbytes(self) -> int:
        return sum(group.nbytes() for group in self.groups.values())

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        group, i = self.where[layer_idx]
        return group.update(key_states, value_states, i, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.main.get_seq_length()

    def reset(self):
        for group in self.groups.values():
            group.reset()

    # --- the ring's fixed-shape step (`streamkv.cache.compiled.RingDecoder`), when every group is a ring

    @property
    def is_ring(self) -> bool:
        from streamkv.cache.ring import RingCache

        return all(isinstance(group, RingCache) for group in self.groups.values())

    @property
    def cap(self) -> int:
        """The most slots of any group (the global layers'): every group is full from there on."""
        return max(group.cap for group in self.groups.values())

    @property
    def static(self) -> bool:
        return self.main.static

    def make_static(self) -> None:
        for group in self.groups.values():
            group.make_static()

    def make_dynamic(self) -> None:
        for group in self.groups.values():
            group.make_dynamic()

    def advance(self) -> None:
        for group in self.groups.values():
            group.advance()

    def static_tensors(self) -> list:
        return [t for group in self.groups.values() for t in group.static_tensors()]
