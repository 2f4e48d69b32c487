"""Exact parallel evaluation: every per-token NLL of the decode loop, chunk by chunk.

For caches whose contents depend on positions only (`dense`, `window`,
`start_recent` without refresh, `mit`, `ring`), the decode loop's step t
attends a set of earlier tokens that is known in advance: the sinks
0..S-1 and a contiguous window ws(t)..t, L(t) keys in all, its own
included.  Token t's keys and values were computed at its own step with
exactly that set, so one layer-by-layer forward over a chunk of queries, each
with its own key set and the loop's query-key distances, reproduces every
hidden state of the loop, and so every NLL, up to float rounding.

Distances, as the caches keep them:

* window key j: t - j for every method (window keys keep their rotation);
* sink i under pos-shift (`positions: cache`, `mit`, `ring`): the sinks sit
  just before the window, so the distance is L(t) - 1 - i; with
  `positions: original` it is t - i.

The schedule -- L(t), and the prunes, their sizes and kinds -- comes from the
cache's own policy object (`StartRecent`, `KeepAll`), run without the model as
`StreamingCache` runs it, so this evaluator cannot drift from the loop's
definition of a method.

The model runs unchanged, one forward per chunk, with its own rotary module:
queries and keys are rotated at positions re-based per chunk (distances are
all that matter, and small positions keep float32 angles precise over
millions of tokens); an attention function registered with transformers joins
each chunk's queries with the sinks, the kept history and the chunk itself
under a per-query mask, and re-rotates the queries for the sink columns.
Memory stays bounded: a chunk attends the sinks plus its history and itself,
never an N x N matrix.

Hybrid models (`streamkv.cache.hybrid`) cache each layer type under its own
policy: each type gets its own schedule (`schedules_of`), and its layers their
own masks, sinks and re-rotations (with that type's RoPE base); the chunks and
the positions the model sees are shared.  The result's KV lengths and prunes are
the global layers'.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from streamkv.cache.hybrid import GLOBAL, LayerGroupsCache
from streamkv.cache.rope import REBASE, RotaryAligner
from streamkv.cache.streaming import RefreshCache, num_attention_layers
from streamkv.errors import StreamkvError

ATTN_NAME = "streamkv_parallel"
DEFAULT_CHUNK = 256  # queries per forward: larger chunks attend more history columns per query
# Positions are re-based (the kept history rotated back by one rotation) only when a chunk would reach past
# REBASE (streamkv.cache.rope): until then queries and keys sit at the decode loop's own absolute positions, with
# its own roundings.


# ----------------------------------------------------------------------------- the schedule (no model)


@dataclass
class Schedule:
    """What the decode loop's cache does at every input position t in [0, n): keys attended and prunes."""

    kv_len: np.ndarray  # keys the step of input t attends to, its own included
    dropped: np.ndarray  # tokens the forward of input t evicted (the prefill's on its last row)
    kind: np.ndarray  # the prune's kind (policy.LAZY, FORCED, EMERGENCY or "")
    sink: int
    prefill: int

    def window_start(self) -> np.ndarray:
        """First window token ws(t): the window is ws(t)..t, the sinks 0..min(S, t+1)-1."""
        t = np.arange(self.kv_len.size)
        return t + 1 - (self.kv_len - np.minimum(self.sink, t + 1))


def schedule(policy, n_inputs: int, prefill: int) -> Schedule:
    """Run `policy` as `StreamingCache._plan` does: a prefill of `prefill` tokens, then one token per step."""
    kv = np.empty(n_inputs, dtype=np.int64)
    dropped = np.zeros(n_inputs, dtype=np.int64)
    kind = np.full(n_inputs, "", dtype=object)
    prune = policy.plan(0, prefill, 0)
    if prune.dropped:  # (an empty cache has nothing to drop: a policy that says otherwise is not this one)
        raise StreamkvError(f"the policy prunes {prune.dropped} tokens of an empty cache at the prefill")
    kv[:prefill] = np.arange(1, prefill + 1)  # the prefill is causal over its own tokens
    length = prefill
    plan = policy.plan
    for t in range(prefill, n_inputs):
        prune = plan(length, 1, t)
        length += 1 - prune.dropped
        kv[t] = length
        if prune.dropped:
            dropped[t], kind[t] = prune.dropped, prune.kind
    return Schedule(kv, dropped, kind, getattr(policy, "sink", 0), prefill)


def policy_of(cache) -> object:
    """The policy object of a cache this evaluator can follow, or an error that says why it cannot."""
    if isinstance(cache, RefreshCache):
        raise StreamkvError("refresh re-inserts evicted tokens at the tail, so the keys attended are not a sink "
                            "prefix plus a contiguous window: use the decode loop (--evaluator decode)")
    return cache.policy


@dataclass
class LayerSchedule:
    """The schedule of some of the model's layers (all of them, or one layer type's) and their RoPE's layer type."""

    layers: list[int]
    sched: Schedule
    layer_type: str | None = None


def schedules_of(cache, n_inputs: int, prefill: int) -> list[LayerSchedule]:
    """The schedules of a cache's layers: one for all layers, or one per layer type of a hybrid model's cache."""
    if not isinstance(cache, LayerGroupsCache):
        return [LayerSchedule(list(range(len(cache.layers))), schedule(policy_of(cache), n_inputs, prefill))]
    return [LayerSchedule([i for i, t in enumerate(cache.types) if t == layer_type],
                          schedule(policy_of(group), n_inputs, prefill), layer_type)
            for layer_type, group in cache.groups.items()]


def main_schedule(groups: list[LayerSchedule]) -> Schedule:
    """The schedule a result reports (KV lengths, prunes): the global layers'."""
    for g in groups:
        if g.layer_type in (None, GLOBAL):
            return g.sched
    return groups[0].sched


# ----------------------------------------------------------------------------- one chunk's attention


class _Chunk:
    """Everything the attention function needs for one chunk (passed through the model's forward kwargs)."""

    def __init__(self, state: "_State", mask: torch.Tensor, sink_cos, sink_sin, keep_from: int, shift_cos, shift_sin,
                 capture_sinks: bool):
        self.state = state
        self.mask = mask  # [q, sinks + history + q] additive float mask
        self.sink_cos, self.sink_sin = sink_cos, sink_sin  # per-query re-rotation for the sink columns
        self.keep_from = keep_from  # first column of history + chunk that the next chunk still needs
        self.shift_cos, self.shift_sin = shift_cos, shift_sin  # re-basing of the history first (None: none)
        self.capture_sinks = capture_sinks


class _State:
    """Per layer: the sinks' keys and values (rotated at 0..S-1) and the kept history (at the current base)."""

    def __init__(self, num_layers: int, sink: int, aligner: RotaryAligner):
        self.sink = sink
        self.aligner = aligner
        self.sink_k = [None] * num_layers
        self.sink_v = [None] * num_layers
        self.hist_k = [None] * num_layers
        self.hist_v = [None] * num_layers


def _attend(module, query, key, value, attention_mask, scaling, dropout=0.0, streamkv_chunk=None, **kwargs):
    """Attention of a chunk's queries over the sinks, the kept history and the chunk, with the loop's distances."""
    if streamkv_chunk is None:
        raise StreamkvError("the parallel evaluator's attention ran outside a parallel forward")
    layer = module.layer_idx
    ch = streamkv_chunk[layer]  # the chunk of this layer's schedule
    st, s = ch.state, ch.state.sink
    if ch.capture_sinks:
        st.sink_k[layer], st.sink_v[layer] = key[:, :, :s], value[:, :, :s]
    if st.hist_k[layer] is None:
        keys, values = key, value
    else:
        hist_k = st.hist_k[layer]
        if ch.shift_cos is not None:  # the history was rotated at the previous base
            hist_k = st.aligner.rotate(hist_k, ch.shift_cos, ch.shift_sin)
        keys, values = torch.cat((hist_k, key), dim=-2), torch.cat((st.hist_v[layer], value), dim=-2)
    st.hist_k[layer], st.hist_v[layer] = keys[:, :, ch.keep_from :], values[:, :, ch.keep_from :]

    b, hq, q, d = query.shape
    g = hq // key.shape[1]  # grouped-query attention: query heads per key head
    query = query * scaling
    scores = torch.matmul(query.reshape(b, -1, g * q, d), keys.transpose(-1, -2)).view(b, hq, q, -1)
    if s:  # the sink columns: the query re-rotated to the sinks' distance (keys are at 0..S-1)
        q_sink = st.aligner.rotate(query, ch.sink_cos, ch.sink_sin).reshape(b, -1, g * q, d)
        sink_scores = torch.matmul(q_sink, st.sink_k[layer].transpose(-1, -2)).view(b, hq, q, s)
        scores = torch.cat((sink_scores, scores), dim=-1)
        values = torch.cat((st.sink_v[layer], values), dim=-2)
    scores += ch.mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs.view(b, -1, g * q, probs.shape[-1]), values).view(b, hq, q, d)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTN_NAME, _attend)
# The mask is built per chunk by the evaluator; the model must not build one of its own.
AttentionMaskInterface.register(ATTN_NAME, lambda *args, **kwargs: None)


class _ParallelAttention:
    """Switches the model to the parallel attention for the duration of a `with` block."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.saved = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTN_NAME)
        return self

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.saved)


# ----------------------------------------------------------------------------- the evaluator


def nll_parallel(model, ids: torch.Tensor, sched: Schedule | list[LayerSchedule], positions: str = "cache",
                 chunk: int = DEFAULT_CHUNK, progress: bool = False, desc: str = "parallel", rebase: int = REBASE,
                 hits: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Per-token NLL of targets ids[:, 1:] under the schedule, chunk by chunk (ids: [B, n + 1] on the model's
    device: B independent streams of one length, which the one schedule serves alike, as positions are all it
    reads).  An array [n] for one stream, [B, n] for several; with `hits`, also whether the model's top guess was
    the target, of the same shape.

    `sched`: one schedule for every layer, or one per group of layers (`schedules_of`: a hybrid model's layer
    types).  `positions`: "cache" (pos-shift: the sinks sit just before the window) or "original" (where they
    were rotated).
    """
    num_layers = num_attention_layers(model)
    groups = [LayerSchedule(list(range(num_layers)), sched)] if isinstance(sched, Schedule) else sched
    n = groups[0].sched.kv_len.size
    most_sinks = max(g.sched.sink for g in groups)
    if chunk < max(1, most_sinks):
        raise StreamkvError(f"chunk ({chunk}) must hold the {most_sinks} sinks")
    device = ids.device
    dtype = next(model.parameters()).dtype
    t_all = np.arange(n)
    bounds = list(range(0, n, chunk)) + [n]
    plans = [_GroupPlan(model, g, num_layers, positions, bounds, t_all) for g in groups]
    nll = np.empty((ids.shape[0], n))
    hit = np.empty((ids.shape[0], n), dtype=bool)
    base = 0  # token j is rotated at position j - base
    chunks: list = [None] * num_layers
    for c, (a, b) in enumerate(tqdm(list(zip(bounds[:-1], bounds[1:])), desc=desc, disable=not progress,
                                    mininterval=2.0, leave=False)):
        lo = min(plan.h0[c] for plan in plans)  # the oldest column any layer still attends
        shift = None
        if b - base > rebase and lo != base:
            shift = base - lo  # every layer's kept history moves back by as many positions as the base moves on
            base = lo
        t = t_all[a:b]
        for plan in plans:
            ch = plan.chunk(c, a, b, t, base, shift, device, dtype)
            for layer in plan.layers:
                chunks[layer] = ch
        pos = torch.arange(a - base, b - base, device=device).unsqueeze(0)
        logits = model(input_ids=ids[:, a:b], position_ids=pos, use_cache=False, streamkv_chunk=chunks).logits
        for row in range(ids.shape[0]):
            target = ids[row, a + 1 : b + 1]
            nll[row, a:b] = F.cross_entropy(logits[row].float(), target, reduction="none").cpu().numpy()
            if hits:
                hit[row, a:b] = (logits[row].argmax(-1) == target).cpu().numpy()
    nll = nll[0] if ids.shape[0] == 1 else nll
    return (nll, hit[0] if ids.shape[0] == 1 else hit) if hits else nll


class _GroupPlan:
    """One schedule's layers: their state across chunks, and each chunk's mask and sink re-rotation."""

    def __init__(self, model, group: LayerSchedule, num_layers: int, positions: str, bounds: list[int],
                 t_all: np.ndarray):
        sched = group.sched
        self.layers = group.layers
        self.sink = sched.sink
        self.aligner = RotaryAligner(model, group.layer_type)
        self.state = _State(num_layers, self.sink, self.aligner)
        self.ws = sched.window_start()
        # query t's sink columns sit at distance sink_pos(t) - i from it
        self.sink_pos = (sched.kv_len - 1) if positions == "cache" else t_all
        # history each chunk needs: tokens [h0(c), c0) with h0 the smallest window start among its queries
        self.h0 = [0] + [max(self.sink, int(self.ws[a:b].min())) for a, b in zip(bounds[1:-1], bounds[2:])]

    def chunk(self, c: int, a: int, b: int, t: np.ndarray, base: int, shift: int | None, device, dtype) -> _Chunk:
        s, lo = self.sink, self.h0[c]  # the columns after the sinks: tokens lo..b-1 (the kept history, the chunk)
        shift_cos = shift_sin = None
        if shift is not None:
            shift_cos, shift_sin = self.aligner.angles(torch.tensor([shift]))
        cols = np.arange(lo, b)
        win = (cols[None, :] >= self.ws[a:b, None]) & (cols[None, :] <= t[:, None])
        sink_ok = np.arange(s)[None, :] <= t[:, None]
        allowed = torch.from_numpy(np.concatenate((sink_ok, win), axis=1)).to(device)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        sink_cos = sink_sin = None
        if s:
            delta = torch.from_numpy(self.sink_pos[a:b] - (t - base)).to(device)
            sink_cos, sink_sin = self.aligner.angles(delta)
        keep_from = (self.h0[c + 1] if c + 1 < len(self.h0) else b) - lo
        return _Chunk(self.state, mask, sink_cos, sink_sin, keep_from, shift_cos, shift_sin,
                      capture_sinks=c == 0 and s > 0)


@torch.inference_mode()
def evaluate_parallel(loaded, tokens: list[int], params, progress: bool = True, chunk: int = DEFAULT_CHUNK,
                      rebase: int = REBASE):
    """The parallel evaluator's result record and per-token trace (the decode loop's format; no step times).

    `params` must be resolved; the cache is built as the decode loop builds it, and only its policy is used.
    """
    from streamkv.cache.factory import make_stepper
    from streamkv.evaluation.results import peak_memory_mb, quality_metrics, trace_frame
    from streamkv.provenance import collect

    p = params
    model = loaded.model
    device = next(model.parameters()).device
    torch.manual_seed(p.seed)
    n = p.max_tokens
    cache = make_stepper(model, p, loaded.source).cache
    groups = schedules_of(cache, n - 1, p.prefill)
    sched = main_schedule(groups)
    provenance = collect(device, next(model.parameters()).dtype, p.seed)
    ids = torch.tensor(tokens[:n], dtype=torch.long, device=device).unsqueeze(0)
    started = time.perf_counter()
    with _ParallelAttention(model):
        nll = nll_parallel(model, ids, groups, p.positions, chunk, progress, f"{p.method} (parallel)", rebase)
    total_sec = time.perf_counter() - started
    pre = p.prefill
    untimed = np.full(n - 1 - pre, np.nan)
    trace = trace_frame(ids, nll, pre, math.nan, untimed, sched.kv_len[pre:], sched.dropped[pre:], sched.kind[pre:],
                        untimed)
    metrics = quality_metrics(nll, pre, sched.kv_len[pre:], sched.dropped[pre:], sched.kind[pre:])
    metrics.update(total_sec=total_sec, peak_memory_mb=peak_memory_mb(device))
    return metrics, trace, provenance
