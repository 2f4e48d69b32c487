"""The ring cache: Start+Recent in preallocated buffers, evicting by overwrite.

`RingCache` is strict (every step evicts one token); `LazyRingCache` (below)
prunes lazily every K positions, as `start_recent` does, in the same way.

Each layer owns one key and one value buffer of exactly `cap` slots: the
first `sink` slots hold the sinks, the other `window` slots are a ring.  The
incoming token overwrites the oldest window slot in place: no `torch.cat`, no
copy of the window, no allocation after the first forward, and the buffers the
attention reads are always the same tensors (fixed shapes once full).

Positions: window keys keep the rotation the model gave them (their absolute
position); the query sits at its absolute position; only the `sink` keys are
re-rotated on each step, from un-rotated copies, to the positions just before
the window.  Query-key distances are then exactly those of MIT strict
Start+Recent, whatever order the slots are in (attention does not care about
slot order once every key is visible).

Absolute positions grow with the stream and float32 angles lose precision
(float32 angles are off by about 1e-4 at position 20k).  With `rebase_every`, once the stream is that
far past the last base the cache subtracts an offset from every position: the
window keys are rotated back once and `get_seq_length()` reports positions
from the new base, so a forward without explicit `position_ids` places the
query there too.  `generate` feeds absolute `position_ids` of its own, so keep
`rebase_every=None` (the default) under `generate`.

Static mode (`make_static`, used by `RingDecoder`): once the ring is full,
a single-token step needs nothing but tensors of fixed shape -- the incoming
token's position and slot live in 0-d device tensors, the update is one
`index_copy_` per buffer plus the sinks' rotation, the attention reads all
`cap` slots and the mask sizes are constants -- so a compiled decode step
sees the same graph on every step.  The Python counters move outside the
forward, in `advance()`.
"""

from __future__ import annotations

import torch

from streamkv.cache.policy import LAZY, StartRecent
from streamkv.cache.streaming import Step, StreamingCache, StreamingLayer
from streamkv.errors import StreamkvError


class RingLayer(StreamingLayer):
    """One layer's view of the cache's stacked buffers; sinks kept un-rotated on the side."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        owner = self.owner
        if owner.store_k is None:
            owner.allocate(key_states, value_states)
        if key_states.shape[:2] != owner.store_k.shape[1:3] or key_states.shape[-1] != owner.store_k.shape[-1]:
            raise StreamkvError(f"the ring stacks every layer's keys in one buffer, so all layers need the same "
                                f"KV shape; got {tuple(key_states.shape)} after {tuple(owner.store_k.shape[1:])}")
        i = next(i for i, layer in enumerate(owner.layers) if layer is self)
        self.dtype, self.device = key_states.dtype, key_states.device
        self.buf_k, self.buf_v, self.raw_sinks = owner.store_k[i], owner.store_v[i], owner.raw_sinks[i]
        self.keys, self.values = self.buf_k[:, :, :0], self.buf_v[:, :, :0]
        self.is_initialized = True

    @property
    def length(self) -> int:
        return 0 if not self.is_initialized else self.owner.stored

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.buf_k.nbytes + self.buf_v.nbytes + self.raw_sinks.nbytes

    def reset(self) -> None:
        super().reset()
        self.buf_k = self.buf_v = self.raw_sinks = None

    def update(self, key_states, value_states, step: Step):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner, memo = self.owner, step.memo
        if "rebase" in memo and "rebased" not in memo:  # positions moved back: rotate every window once
            owner.rotate_windows(*memo["rebase"])
            memo["rebased"] = True
        if "flush" in memo and "flushed" not in memo:  # a lazy prune: staged tokens overwrite the oldest (all layers)
            owner.flush(*memo["flush"])
            memo["flushed"] = True
        slots, src, sink_idx = memo["slots"], memo["src"], memo["sink_idx"]
        kept_k = key_states if src is None else key_states.index_select(2, src)
        kept_v = value_states if src is None else value_states.index_select(2, src)
        self.buf_k.index_copy_(2, slots, kept_k)
        self.buf_v.index_copy_(2, slots, kept_v)
        if sink_idx is not None:  # new sink tokens: keep them un-rotated as well
            raw = owner.aligner.rotate(key_states.index_select(2, memo["sink_src"]), *memo["unrotate"])
            self.raw_sinks.index_copy_(2, sink_idx, raw)
        if "sinks" in memo:  # once tokens are evicted, the sinks sit just before the oldest window key
            if sink_idx is not None:  # this layer's sinks just arrived
                self.buf_k[:, :, : owner.sink] = owner.aligner.rotate(self.raw_sinks, *memo["sinks"])
            elif "sinks_done" not in memo:  # every layer's sinks are stored: one rotation for all of them
                owner.rotate_sinks(*memo["sinks"])
                memo["sinks_done"] = True
        n = step.kv_len
        if src is not None:  # a first chunk longer than the ring: it attends to itself, the ring keeps its ends
            return key_states, value_states
        if memo["order"] is not None:  # a chunk after the ring wrapped: causal masking needs position order
            return self.buf_k.index_select(2, memo["order"]), self.buf_v.index_select(2, memo["order"])
        return self.buf_k[:, :, :n], self.buf_v[:, :, :n]

    def update_static(self, key_states, value_states, first_layer: bool):
        """A full ring, one token: write its slot (the sinks of every layer move at the first layer); return all
        slots."""
        owner = self.owner
        if first_layer:  # pos_t + 1 - cap: the sinks' positions, just before the window
            owner.rotate_sinks(*owner.aligner.angles(owner.pos_t + (1 - owner.cap) + owner.sink_offsets))
        self.buf_k.index_copy_(2, owner.slot_t, key_states)
        self.buf_v.index_copy_(2, owner.slot_t, value_states)
        return self.buf_k, self.buf_v


class RingCache(StreamingCache):
    """Strict Start+Recent with `sink` sinks in a `cap`-slot ring; see the module docstring."""

    def __init__(self, num_layers: int, cap: int, sink: int, aligner, rebase_every: int | None = None):
        self.cap, self.sink, self.window = cap, sink, cap - sink
        if rebase_every is not None and rebase_every < self.size:
            raise StreamkvError(f"rebase_every ({rebase_every}) must be at least the ring's slots ({self.size})")
        self.rebase_every = rebase_every
        # Positions kept below the stream's end at a re-base: the ring's own slots, or more where several rings
        # serve one model and must re-base alike (a hybrid model's layer types, streamkv.cache.hybrid).
        self.rebase_room: int | None = None
        self.base = 0  # positions are reported relative to this
        self.pending_rebase = 0
        self.static = False  # see make_static()
        self.pos_t = self.slot_t = self.sink_offsets = None
        # Every layer's keys and values in one tensor each ([layer, batch, heads, cap, dim]): the sinks of all
        # layers are re-rotated by one operation per step instead of one per layer.
        self.store_k = self.store_v = self.raw_sinks = None
        super().__init__(RingLayer, num_layers, StartRecent(sink, cap - sink), aligner)  # strict: K = 1

    @property
    def size(self) -> int:
        """Slots per layer: the most keys a step attends to."""
        return self.cap

    def allocate(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        n, (b, h, _, d) = len(self.layers), key_states.shape
        self.store_k = key_states.new_zeros((n, b, h, self.size, d))
        self.store_v = value_states.new_zeros((n, b, h, self.size, value_states.shape[-1]))
        self.raw_sinks = key_states.new_zeros((n, b, h, self.sink, d))

    def rotate_sinks(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Every layer's sinks, from their un-rotated copies, to the angles given."""
        if self.sink:
            self.store_k[..., : self.sink, :] = self.aligner.rotate(self.raw_sinks, cos, sin)

    def flush(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Every layer's slots `src` copied onto slots `dst` (keys and values)."""
        for store in (self.store_k, self.store_v):
            store.index_copy_(3, dst, store.index_select(3, src))

    def rotate_windows(self, cos: torch.Tensor, sin: torch.Tensor) -> None:
        w = self.store_k[..., self.sink : self.size, :]
        w.copy_(self.aligner.rotate(w, cos, sin))

    @property
    def stored(self) -> int:  # (after the first chunk, however long it was)
        return min(self.seen, self.cap)

    def get_seq_length(self, layer_idx: int = 0):
        if self.static:  # a tensor, as transformers' StaticLayer does: a compiled step must not specialise on it
            return self.pos_t
        return self.seen - self.base

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if self.static:
            if key_states.shape[-2] != 1:
                raise StreamkvError("a static ring takes one token per forward; call make_dynamic() to feed chunks")
            return self.layers[layer_idx].update_static(key_states, value_states, layer_idx == 0)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def make_static(self) -> None:
        """Switch to fixed-shape single-token steps (the ring must be full); call `advance()` after each forward."""
        if self.seen < self.cap:
            raise StreamkvError(f"the ring holds {self.seen} of {self.cap} tokens; make_static() needs a full ring")
        if self.pending_rebase:
            self._rebase_now()
        device = self.layers[0].buf_k.device
        self.pos_t = torch.tensor(self.seen - self.base, device=device)
        self.slot_t = torch.tensor([self._slot(self.seen)], device=device)
        self.sink_offsets = torch.arange(self.sink, device=device)
        if not torch.compiler.is_compiling():  # fixed addresses: what CUDA graphs need
            for t in self.static_tensors():
                torch._dynamo.mark_static_address(t)
        self.static = True

    def static_tensors(self) -> list[torch.Tensor]:
        """Every tensor a fixed-shape step reads or writes besides the model's: the stacked buffers, each layer's
        views of them (the step reaches them through the layers: a mark on the stack does not carry over to a
        view, and CUDA graphs skip a graph whose mutated inputs are not marked) and the position and slot."""
        views = [t for layer in self.layers for t in (layer.buf_k, layer.buf_v, layer.raw_sinks)]
        return [self.store_k, self.store_v, self.raw_sinks, *views, self.pos_t, self.slot_t]

    def make_dynamic(self) -> None:
        """Back to the general update (any chunk size); the counters are already up to date."""
        self.static = False

    def advance(self) -> None:
        """The bookkeeping of one static step, outside the (compiled) forward."""
        self.last_step = Step(self.seen, 1, 1, self.cap, LAZY)
        self.seen += 1
        self.n_prunes += 1
        self.tokens_dropped += 1
        if self.rebase_every and self.seen - self.base >= self.rebase_every:
            self.pending_rebase = self.seen - self.base - (self.rebase_room or self.cap)
            self.base += self.pending_rebase
            self._rebase_now()
        self.pos_t.fill_(self.seen - self.base)
        self.slot_t.fill_(self._slot(self.seen))

    def _rebase_now(self) -> None:
        """Rotate every window key back by the pending offset (the base already moved)."""
        self.rotate_windows(*self.aligner.angles(torch.tensor([-self.pending_rebase])))
        self.pending_rebase = 0

    def _kv_len(self, q: int) -> int:
        if self.seen == 0:  # the first chunk attends to all of itself, however long
            return q
        return min(self.seen + q, self.cap)

    def mask_sizes(self, q: int) -> tuple[int, int]:
        if self.static:  # every slot is visible to the one query
            return self.cap, 0
        kv_len = self._kv_len(q)
        return kv_len, self.seen - self.base + q - kv_len

    def _slot(self, position: int) -> int:
        if position < self.sink:
            return position
        return self.sink + (position - self.sink) % self.window

    def _begin_step(self, key_states, value_states) -> Step:
        """Work out, once per forward, where the tokens go and how the sinks are rotated."""
        if not self.layers[0].is_initialized:  # the buffers' device is needed for the slot indices
            self.layers[0].lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        if self.seen and self.seen + q > self.cap and q > self.window:
            raise StreamkvError(f"a chunk of {q} tokens does not fit the ring's window ({self.window}); "
                                "after the first forward, feed chunks of at most the window")
        kv_len = self._kv_len(q)
        src = None
        if self.seen == 0 and q > self.cap:  # keep the sinks and the last `window` tokens of the chunk
            src = list(range(self.sink)) + list(range(q - self.window, q))
        positions = range(self.seen, self.seen + q) if src is None else [self.seen + i for i in src]
        dropped = max(0, self.seen + q - self.cap) - max(0, self.seen - self.cap)
        step = Step(self.seen, q, dropped, kv_len, LAZY if dropped else "")
        device = self.layers[0].buf_k.device if self.layers[0].is_initialized else None
        memo = step.memo
        memo["slots"] = torch.tensor([self._slot(p) for p in positions], device=device)
        memo["src"] = None if src is None else torch.tensor(src, device=device)
        self._note_sinks_and_rebase(memo, positions, device)
        evicted = max(0, self.seen + q - self.cap)
        if evicted:
            first = evicted - self.base  # the sinks' new (rebased) positions: just before the window
            memo["sinks"] = self.aligner.angles(first + torch.arange(self.sink))
        memo["order"] = None
        if q > 1 and evicted and src is None:  # sinks, then the window from its oldest token on
            window = [self._slot(p) for p in range(self.seen + q - self.window, self.seen + q)]
            memo["order"] = torch.tensor(list(range(self.sink)) + window, device=device)
        return step

    def _note_sinks_and_rebase(self, memo: dict, positions, device) -> None:
        """Sink tokens among the incoming ones (kept un-rotated too) and a pending re-base, in the step's memo."""
        sinks_new = [i for i, p in enumerate(positions) if p < self.sink]
        memo["sink_idx"] = memo["sink_src"] = None
        if sinks_new:  # (the sinks come first among the kept tokens, so i is also their index in the chunk)
            memo["sink_idx"] = torch.tensor([positions[i] for i in sinks_new], device=device)
            memo["sink_src"] = torch.tensor(sinks_new, device=device)
            memo["unrotate"] = self.aligner.angles(-(torch.tensor([positions[i] for i in sinks_new]) - self.base))
        if self.pending_rebase:
            memo["rebase"] = self.aligner.angles(torch.tensor([-self.pending_rebase]))
            self.pending_rebase = 0

    def _after_begin(self) -> None:
        # This forward's positions are already set; the next one's come from get_seq_length(), so
        # the base moves now and the window keys follow at the next forward (memo "rebase").
        if self.rebase_every and self.seen - self.base >= self.rebase_every:
            shift = self.seen - self.base - (self.rebase_room or self.size)
            self.base += shift
            self.pending_rebase = shift

    def reset(self):
        super().reset()
        self.base = self.pending_rebase = 0
        self.static = False
        self.store_k = self.store_v = self.raw_sinks = None


class LazyRingCache(RingCache):
    """Lazy Start+Recent (prune every K positions) in fixed buffers; the same keys as `start_recent` with K.

    Lazy pruning lets the window grow from W to W + K - 1 tokens between
    prunes and then drops back to W.  A plain ring cannot show a window of
    varying length without a mask (the stale slots sit anywhere in it), so the
    buffer of C + K - 1 slots (the lazy bound) is laid out as

        [sinks: S][ring: W - 1 tokens, oldest at `head`][staging: K slots]

    and the keys attended are always the prefix [0, S + W - 1 + staged): the
    ring holds the W - 1 tokens before the current lazy period, the staging
    area the tokens of the period so far, in order.  A prune (every K
    positions, as `start_recent`) copies the staged tokens over the oldest ring
    slots -- K tokens, once per K steps, never the window -- and rotates the
    sinks, from their un-rotated copies, to just before the new oldest token.
    Between prunes a step writes one slot and rotates nothing.  Window keys keep
    their absolute rotation, as in the strict ring.

    After the first prune it takes one token per forward (the decode loop and
    `generate` do); the first forward may hold up to C + K - 1 tokens.  Fixed
    shapes (`make_static`) need the strict ring: here the attended length
    changes every step.
    """

    def __init__(self, num_layers: int, cap: int, sink: int, compress_every: int, aligner,
                 rebase_every: int | None = None):
        if compress_every < 2:
            raise StreamkvError(f"the lazy ring needs compress_every >= 2 (got {compress_every}); use the strict ring")
        if cap - sink < 2:
            raise StreamkvError(f"the lazy ring needs a window of at least 2 tokens (cap {cap}, sink {sink})")
        self.k = compress_every  # (before the ring's init, which sizes the buffers with it)
        super().__init__(num_layers, cap, sink, aligner, rebase_every)
        self.policy = StartRecent(sink, cap - sink, compress_every)
        self.ring = self.window - 1  # ring slots; the staging area holds the other K
        self.count = 0  # keys stored, all of them attended
        self.head = 0  # ring index of its oldest token

    @property
    def size(self) -> int:
        return self.cap + self.k - 1

    @property
    def stored(self) -> int:
        return self.count

    def make_static(self) -> None:
        raise StreamkvError("fixed-shape steps need the strict ring (compress_every 1): the lazy ring's attended "
                            "length changes from step to step")

    def _kv_len(self, q: int) -> int:
        return self.count - self.policy.plan(self.count, q, self.seen).dropped + q

    def _begin_step(self, key_states, value_states) -> Step:
        if not self.layers[0].is_initialized:
            self.layers[0].lazy_initialization(key_states, value_states)
        q, device = key_states.shape[-2], self.store_k.device
        prune = self.policy.plan(self.count, q, self.seen)
        if self.count - prune.dropped + q > self.size:
            raise StreamkvError(f"a first chunk of {q} tokens does not fit the lazy ring's {self.size} slots "
                                f"(cap + compress_every - 1); feed at most that many, then one token per forward")
        if prune.dropped and q > 1:
            raise StreamkvError(f"the lazy ring takes one token per forward once it evicts (got a chunk of {q}); "
                                "feed tokens one by one, or use start_recent for chunks")
        step = Step(self.seen, q, prune.dropped, self.count - prune.dropped + q, prune.kind)
        memo = step.memo
        if prune.dropped:
            staged = self.count - self.sink - self.ring
            if prune.dropped != staged:  # plain lazy always drops what is over C, i.e. the staged tokens
                raise StreamkvError(f"the lazy ring can drop only its {staged} staged tokens, the policy asked for "
                                    f"{prune.dropped}")
            moved = min(staged, self.ring)  # the newest staged tokens replace the oldest ring tokens
            first = self.sink + self.ring + staged - moved
            memo["flush"] = (torch.arange(first, first + moved, device=device),
                             torch.tensor([self.sink + (self.head + i) % self.ring for i in range(moved)],
                                          device=device))
            self.head = (self.head + moved) % self.ring
            self.count -= staged
        positions = list(range(self.seen, self.seen + q))
        memo["slots"] = torch.arange(self.count, self.count + q, device=device)
        memo["src"] = memo["order"] = None  # the new tokens come last, in order: the causal mask holds
        self.count += q
        self._note_sinks_and_rebase(memo, positions, device)
        if prune.dropped or ("rebase" in memo and self.tokens_dropped):
            # evicted so far: positions sink .. sink + dropped - 1; the sinks sit just before the oldest kept token
            first = self.tokens_dropped + prune.dropped - self.base
            memo["sinks"] = self.aligner.angles(first + torch.arange(self.sink))
        return step

    def reset(self):
        super().reset()
        self.count = self.head = 0
