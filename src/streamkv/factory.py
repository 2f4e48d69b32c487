"""The cache factory: the streaming cache of a method, built from its registry record's options.

Kept apart from `streamkv.cache` and `streamkv.ring` (the ring's cache subclasses the streaming cache), so
that no module imports the module that imports it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from . import methods
from .budget import Budget
from .cache import (
    REFRESH_SELECTORS,
    MitLayer,
    RealignedLayer,
    StreamingCache,
    num_attention_layers,
)
from .errors import StreamkvError
from .params import POSITIONS
from .policy import KeepAll, StartRecent
from .ring import LazyRingCache, RingCache
from .rope import RotaryAligner


def make_cache(
    method: str,
    model: nn.Module,
    cap: int | None = 256,
    sink: int = 4,
    compress_every: int = 1,
    cache_slack: int = 0,
    max_drop: int = 0,
    softlite_mode: str = "naive",
    overlap: int = 0,
    refresh: int = 0,
    refresh_select: str | Callable[[torch.Tensor, int], torch.Tensor] = "uniform",
    rebase_every: int | None = None,
    positions: str = "cache",
) -> StreamingCache:
    """Build the cache of `method` for `model`.

    `dense` keeps everything (`cap` unused); `ring` is Start+Recent in
    preallocated buffers, strict or (`compress_every` > 1) lazy (see `streamkv.ring`;
    `rebase_every` keeps its positions small in forward loops without `position_ids`,
    never under `generate`);
    `window` keeps the last `cap`
    tokens; `start_recent` keeps `sink` sinks and a recent window and prunes
    every `compress_every` positions; `mit` is strict Start+Recent as MIT
    StreamingLLM does it.  Every term is charged to `cap` (Auto-cap): the
    window is `cap - sink - cache_slack - overlap - refresh`, and `overlap`
    extra recent tokens are kept on top of it.  Softlite (`cache_slack`,
    `max_drop`, `softlite_mode`): see `StartRecent`.  `refresh` re-inserts that
    many evicted tokens at the tail, chosen by `refresh_select` ("uniform",
    "recent" or a callable `(positions, budget) -> indices` that returns
    min(budget, len(positions)) distinct indices into the candidates, sorted by position).
    `positions="original"` (start_recent) leaves the kept keys where they were
    rotated, the query at its absolute position (kvpress's semantics; the
    default "cache" moves the sinks next to the window).  Use with
    `model.generate(..., past_key_values=cache)` or in a forward loop.
    """
    n = num_attention_layers(model)
    if method not in methods.names(family="cache"):
        raise StreamkvError(f"unknown cache method '{method}'; "
                            f"choose one of: {', '.join(methods.names(family='cache'))}")
    if compress_every < 1:
        raise StreamkvError(f"compress_every must be >= 1, got {compress_every}")
    if max_drop < 0:
        raise StreamkvError(f"max_drop must be >= 0, got {max_drop}")
    if positions not in POSITIONS:
        raise StreamkvError(f"unknown positions '{positions}'; choose one of: {', '.join(POSITIONS)}")
    if positions == "original" and refresh:
        raise StreamkvError("positions 'original' (kept keys stay where they were rotated) applies to start_recent "
                            "without refresh")
    methods.check_options(method, compress_every=compress_every, cache_slack=cache_slack, max_drop=max_drop,
                          softlite_mode=softlite_mode, positions=positions, overlap=overlap, refresh=refresh)
    if method == "dense":
        return StreamingCache(RealignedLayer, n, KeepAll(), None)
    if method == "ring":
        budget = Budget.derive(cap, sink=sink)
        if compress_every > 1:
            return LazyRingCache(n, budget.cap, budget.sink, compress_every, RotaryAligner(model), rebase_every)
        return RingCache(n, budget.cap, budget.sink, RotaryAligner(model), rebase_every)
    if method == "window":
        budget = Budget.derive(cap, sink=0)
        return StreamingCache(RealignedLayer, n, StartRecent(0, budget.window, compress_every), None)
    budget = Budget.derive(cap, sink=sink, cache_slack=cache_slack, overlap=overlap, refresh=refresh)
    if isinstance(refresh_select, str):
        if refresh_select not in REFRESH_SELECTORS:
            raise StreamkvError(f"unknown refresh selection '{refresh_select}'; "
                                f"choose one of: {', '.join(REFRESH_SELECTORS)}")
        refresh_select = REFRESH_SELECTORS[refresh_select]
    policy = StartRecent(budget.sink, budget.window + budget.overlap, compress_every, budget.cache_slack, max_drop,
                         softlite_mode)
    layer_cls = MitLayer if method == "mit" or refresh else RealignedLayer
    aligner = None if positions == "original" else RotaryAligner(model)
    return StreamingCache(layer_cls, n, policy, aligner, refresh, refresh_select)
