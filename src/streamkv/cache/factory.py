"""The cache factory: the streaming cache of a method, built from its registry record's options.

Kept apart from `streamkv.cache.streaming` and `streamkv.cache.ring` (the ring's cache subclasses the streaming
cache), so that no module imports the module that imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from streamkv import methods
from streamkv.cache.budget import Budget
from streamkv.cache.hybrid import GLOBAL, SLIDING, LayerGroupsCache, layer_types, sliding_window
from streamkv.cache.policy import KeepAll, StartRecent
from streamkv.cache.ring import LazyRingCache, RingCache
from streamkv.cache.rope import REBASE, RotaryAligner
from streamkv.cache.streaming import (
    REFRESH_SELECTORS,
    MitLayer,
    RealignedLayer,
    RefreshCache,
    StreamingCache,
    num_attention_layers,
)
from streamkv.errors import StreamkvError
from streamkv.evaluation.params import POSITIONS, SINK_LAYERS, EvalParams
from streamkv.evaluation.recompute import RecomputeStepper
from streamkv.evaluation.stepper import CachedStepper
from streamkv.peers.engines import is_peer, make_peer_stepper


def make_stepper(model: torch.nn.Module, p: EvalParams, source: str | None = None):
    """The object that runs the forwards of method `p.method`; `source`: the model's source (peers that load it)."""
    if p.method == "recompute":
        return RecomputeStepper(model, p.sink, p.cap - p.sink)
    if is_peer(p.method):
        return make_peer_stepper(model, source or p.model, p.method, p.cap, p.sink, p.compress_every, p.dtype,
                                 p.max_tokens)
    cache = make_cache(p.method, model, cap=p.cap, sink=p.sink, compress_every=p.compress_every,
                       cache_slack=p.cache_slack, max_drop=p.max_drop, softlite_mode=p.softlite_mode,
                       positions=p.positions, overlap=p.overlap, refresh=p.refresh,
                       sink_layers=getattr(p, "sink_layers", "global"),
                       # this loop passes no position_ids, so the ring may keep its positions small
                       rebase_every=REBASE if p.method == "ring" else None)
    device = next(model.parameters()).device
    if p.profile and device.type == "cuda":
        cache.sync = lambda: torch.cuda.synchronize(device)
    # a scored cache's scores come from the attention weights, handed over by its attention function
    if any(layer.scored for layer in cache.layers):
        from streamkv.cache.scored import ScoringStepper

        return ScoringStepper(model, cache)
    return CachedStepper(model, cache)


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
    sink_layers: str = "global",
) -> StreamingCache | LayerGroupsCache:
    """Build the cache of `method` for `model`.

    `dense` keeps everything (`cap` unused); `ring` is Start+Recent in
    preallocated buffers, strict or (`compress_every` > 1) lazy (see `streamkv.cache.ring`;
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
    default "cache" moves the sinks next to the window).  `tova` keeps the
    `sink` first tokens and the keys the newest query attended to most
    (`streamkv.cache.scored`; the model must run its attention function).  Use with
    `model.generate(..., past_key_values=cache)` or in a forward loop.

    On a hybrid model (sliding-window and global layers, e.g. Gemma 3) every method builds one cache per layer
    type (`streamkv.cache.hybrid`): the global layers as above; the sliding layers the same method with the
    most recent min(cap, W) keys their window allows (W: the model's sliding window), without sinks unless
    `sink_layers="all"`; each type re-rotates with its own RoPE base.
    """
    n = num_attention_layers(model)
    if method not in BUILDERS:
        raise StreamkvError(f"unknown cache method '{method}'; choose one of: {', '.join(BUILDERS)}")
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
    if isinstance(refresh_select, str):
        if refresh_select not in REFRESH_SELECTORS:
            raise StreamkvError(f"unknown refresh selection '{refresh_select}'; "
                                f"choose one of: {', '.join(REFRESH_SELECTORS)}")
        refresh_select = REFRESH_SELECTORS[refresh_select]
    if sink_layers not in SINK_LAYERS:
        raise StreamkvError(f"unknown sink_layers '{sink_layers}'; choose one of: {', '.join(SINK_LAYERS)}")
    options = Options(n, cap, sink, compress_every, cache_slack, max_drop, softlite_mode, overlap, refresh,
                      refresh_select, rebase_every, positions)
    types = layer_types(model)
    if types is None:
        return BUILDERS[method](model, options)
    return _layer_groups(method, model, options, types, sink_layers)


@dataclass(frozen=True)
class Options:
    """A cache's settings, checked against its method's record (`make_cache`'s arguments)."""

    num_layers: int
    cap: int | None
    sink: int
    compress_every: int
    cache_slack: int
    max_drop: int
    softlite_mode: str
    overlap: int
    refresh: int
    refresh_select: Callable[[torch.Tensor, int], torch.Tensor]
    rebase_every: int | None
    positions: str
    layer_type: str | None = None  # a hybrid model's layer type this cache serves (its RoPE base); None: all layers


def _aligner(model: nn.Module, o: Options) -> RotaryAligner:
    return RotaryAligner(model, o.layer_type)


def _layer_groups(method: str, model: nn.Module, o: Options, types: list[str], sink_layers: str) -> LayerGroupsCache:
    """The cache of a hybrid model: the method's cache for the global layers, and for the sliding layers the same
    method within their window (streamkv.cache.hybrid)."""
    window = sliding_window(model)
    record = methods.get(method)
    groups = {GLOBAL: BUILDERS[method](model, replace(o, num_layers=types.count(GLOBAL), layer_type=GLOBAL))}
    n_sliding = types.count(SLIDING)
    if n_sliding:
        sliding = replace(o, num_layers=n_sliding, layer_type=SLIDING)
        if record.dense:  # no eviction: the sliding layers keep exactly their window, as the model attends it
            build, sliding = BUILDERS["window"], replace(sliding, cap=window, compress_every=1)
        else:
            build = BUILDERS[method]
            sinks = o.sink if sink_layers == "all" else 0
            # Between prunes a lazy cache holds more than its cap: the sliding layers' cap leaves room for that
            # overshoot inside the window, so they never hold a key their window cannot attend.
            overshoot = 0 if o.cache_slack else o.compress_every - 1
            cap = min(o.cap, window - overshoot)
            if cap <= sinks:
                raise StreamkvError(
                    f"the sliding attention layers' cache (cap {cap}: the model's window {window} less the lazy "
                    f"overshoot {overshoot}) cannot hold {sinks} sinks and a window; lower compress_every or sink")
            sliding = replace(sliding, cap=cap, sink=sinks)
        groups[SLIDING] = build(model, sliding)
    rings = [g for g in groups.values() if isinstance(g, RingCache)]
    if rings:  # every layer type's ring re-bases by the same offset, as the model's positions do
        room = max(ring.size for ring in rings)
        for ring in rings:
            ring.rebase_room = room
    return LayerGroupsCache(groups, types)


# method name -> (model, Options) -> cache.  A new cache method: a record in streamkv.methods and a builder here
# (`register` does both at run time, e.g. for a policy defined outside the package).
BUILDERS: dict[str, Callable[[nn.Module, Options], StreamingCache]] = {}


def register(method: methods.Method, build: Callable[[nn.Module, Options], StreamingCache]) -> None:
    """Add a cache method: its registry record and the function that builds its cache."""
    if method.family != "cache":
        raise StreamkvError(f"'{method.name}': only cache methods have a builder (family 'cache')")
    methods.REGISTRY[method.name] = method
    BUILDERS[method.name] = build


def builder(name: str):
    def add(build):
        BUILDERS[name] = build
        return build

    return add


@builder("dense")
def _dense(model: nn.Module, o: Options) -> StreamingCache:
    return StreamingCache(RealignedLayer, o.num_layers, KeepAll(), None)


@builder("window")
def _window(model: nn.Module, o: Options) -> StreamingCache:
    budget = Budget.derive(o.cap, sink=0)
    return StreamingCache(RealignedLayer, o.num_layers, StartRecent(0, budget.window, o.compress_every), None)


def _start_recent_policy(o: Options) -> StartRecent:
    budget = Budget.derive(o.cap, sink=o.sink, cache_slack=o.cache_slack, overlap=o.overlap, refresh=o.refresh)
    return StartRecent(budget.sink, budget.window + budget.overlap, o.compress_every, budget.cache_slack, o.max_drop,
                       o.softlite_mode)


@builder("start_recent")
def _start_recent(model: nn.Module, o: Options) -> StreamingCache:
    policy = _start_recent_policy(o)
    if o.refresh:
        return RefreshCache(o.num_layers, policy, _aligner(model, o), o.refresh, o.refresh_select)
    aligner = None if o.positions == "original" else _aligner(model, o)
    return StreamingCache(RealignedLayer, o.num_layers, policy, aligner)


@builder("mit")
def _mit(model: nn.Module, o: Options) -> StreamingCache:
    return StreamingCache(MitLayer, o.num_layers, _start_recent_policy(o), _aligner(model, o))


@builder("ring")
def _ring(model: nn.Module, o: Options) -> StreamingCache:
    budget = Budget.derive(o.cap, sink=o.sink)
    if o.compress_every > 1:
        return LazyRingCache(o.num_layers, budget.cap, budget.sink, o.compress_every, _aligner(model, o),
                             o.rebase_every)
    return RingCache(o.num_layers, budget.cap, budget.sink, _aligner(model, o), o.rebase_every)


@builder("tova")
def _tova(model: nn.Module, o: Options) -> StreamingCache:
    # (imported here: registering its attention function imports transformers' modeling side, about 2 s)
    from streamkv.cache.scored import ScoredLayer

    budget = Budget.derive(o.cap, sink=o.sink)
    # How many and when: lazy Start+Recent's count (cap keys with the query, every K positions); which: the layers
    # choose by score.  Kept keys stay at their original positions (no aligner).
    return StreamingCache(ScoredLayer, o.num_layers, StartRecent(budget.sink, budget.window, o.compress_every), None)
