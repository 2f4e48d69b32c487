"""TOVA: score-based eviction, keeping the keys the newest query attended to most.

When a prune is due (lazy Start+Recent's count: at multiples of K, whatever is
over `cap` keys with the incoming token), each layer keeps its `sink` first
keys and, among the others, those with the highest attention weight from the
last query of the previous forward, averaged over the query heads.  That
query's own key always stays: it is the scorer, not a candidate.  This is the
rule of kvpress's TOVAPress under DecodingPress, which compresses to cap - 1
keys right after the attention of every K-th step; here the eviction happens
at the start of the next forward, with the same weights, so with `sink = 0`
both keep the same keys (the tests hold them to it).

Positions are "original": the kept keys stay where they were rotated and the
query sits at its absolute position, as in kvpress (scattered keys have no
contiguous positions to re-align to).

The weights come from the attention itself, computed once: the model runs the
attention function registered here as `ATTENTION`, which is the model's own
eager attention (the `eager_attention_forward` of its modeling file), and which
hands the last query's weights to the layer whose keys it attends.
Transformers gives an attention function the module and the tensors but not
the cache, so a layer marks itself in flight, with the key tensor it returned,
right before the attention runs, and the function takes the mark only for that
very tensor.  The decode loop's `ScoringStepper` switches the model to
`ATTENTION` for its own forwards only; under `generate`, set it on the model
(`model.set_attn_implementation(ATTENTION)`).
"""

from __future__ import annotations

import sys
import threading

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from streamkv.cache.streaming import Step, StreamingLayer
from streamkv.errors import StreamkvError
from streamkv.evaluation.stepper import CachedStepper

ATTENTION = "streamkv_scores"
_IN_FLIGHT = threading.local()  # .pending: (layer, the key tensor its update returned), until the attention runs


def _eager_of(module: torch.nn.Module):
    """The model's own eager attention: the `eager_attention_forward` of the module's modeling file."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise StreamkvError(f"{type(module).__name__}'s modeling file defines no eager_attention_forward, so its "
                            "attention weights cannot be read for a score-based cache")
    return fn


def scoring_attention(module, query, key, value, attention_mask, **kwargs):
    """Eager attention that hands the last query's weights to the scored layer whose keys it attends."""
    out, weights = _eager_of(module)(module, query, key, value, attention_mask, **kwargs)
    pending = getattr(_IN_FLIGHT, "pending", None)
    if pending is not None and pending[1] is key:
        _IN_FLIGHT.pending = None
        pending[0].observe(weights)
    return out, weights


AttentionInterface.register(ATTENTION, scoring_attention)
AttentionMaskInterface.register(ATTENTION, eager_mask)


class ScoredLayer(StreamingLayer):
    """One layer's keys and values; a prune keeps the sinks and the best-scored others, in their order."""

    scored = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.scores = None

    def reset(self) -> None:
        super().reset()
        self.scores = None

    def observe(self, weights: torch.Tensor) -> None:
        """Take the attention weights of the forward ([batch, heads, queries, keys]): its last query's, head mean."""
        self.scores = weights[:, :, -1].float().mean(dim=1)

    def kept(self, dropped: int) -> torch.Tensor:
        """The slots that stay after evicting `dropped` ([batch, length - dropped], in slot order)."""
        n, s = self.length, self.owner.policy.sink
        if self.scores is None or self.scores.shape[-1] != n:
            raise StreamkvError(
                "a score-based cache evicts by the attention weights of the last query, and none reached it for its "
                f"{n} keys: run the model with attn_implementation='{ATTENTION}' (streamkv.cache.scored.ATTENTION), "
                "e.g. model.set_attn_implementation(ATTENTION) before generate; the decode loop does it itself")
        candidates = self.scores[:, s:].clone()
        candidates[:, -1] = torch.inf  # the scoring query's own key
        best = candidates.topk(n - s - dropped, dim=-1).indices.sort(dim=-1).values + s
        sinks = torch.arange(s, device=best.device).expand(best.shape[0], s)
        return torch.cat((sinks, best), dim=-1)

    def update(self, key_states, value_states, step: Step):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if step.dropped:
            slots = self.kept(step.dropped)[:, None, :, None]
            self.keys = self.keys.gather(2, slots.expand(-1, self.keys.shape[1], -1, self.keys.shape[-1]))
            self.values = self.values.gather(2, slots.expand(-1, self.values.shape[1], -1, self.values.shape[-1]))
        self.keys = torch.cat((self.keys, key_states), dim=-2)
        self.values = torch.cat((self.values, value_states), dim=-2)
        self.scores = None  # they scored the keys before this forward
        _IN_FLIGHT.pending = (self, self.keys)
        return self.keys, self.values


class ScoringStepper(CachedStepper):
    """The stepper of a scored cache: the model runs the scoring attention during these forwards only, so other
    caches on the same model (the bench's rows) keep the model's own attention."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        config = self.model.config
        saved = config._attn_implementation
        config._attn_implementation = ATTENTION
        try:
            return super().forward(ids)
        finally:
            config._attn_implementation = saved
