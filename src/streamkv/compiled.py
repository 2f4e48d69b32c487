"""Decoding with the ring at fixed shapes, optionally through `torch.compile`.

A general streaming cache changes the shapes the attention sees and decides
its layout in Python on every step, so a compiled decode step would
re-specialise (recompile) again and again.  Once the ring is full, a
single-token step is the same graph every time (see `RingCache.make_static`):
`RingDecoder` runs the general path for the first forwards and any chunk, and
the fixed-shape path, compiled if asked, for every single token after that.
"""

from __future__ import annotations

import torch

from .errors import StreamkvError
from .ring import RingCache


class RingDecoder:
    """`decoder(ids) -> logits` over a `RingCache`; `compile=True` compiles the fixed-shape step.

    `compile_kwargs` go to `torch.compile` (e.g. `mode="reduce-overhead"` for
    CUDA graphs on a GPU; `backend=`).  The first compiled step compiles
    (tens of seconds on a CPU); the graph is then reused for every step,
    across re-bases too.  On CUDA graphs the returned logits are overwritten by
    the next step: use them (or clone them) before calling again.
    """

    def __init__(self, model: torch.nn.Module, cache: RingCache, compile: bool = False, **compile_kwargs):
        if not isinstance(cache, RingCache):
            raise StreamkvError(f"RingDecoder needs a ring cache (make_cache('ring', ...)), got {type(cache).__name__}")
        self.model, self.cache = model, cache
        self.compiled = compile
        step = self._forward
        if compile:
            step = torch.compile(self._forward, fullgraph=True, dynamic=False, **compile_kwargs)
        self._step = step

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, past_key_values=self.cache, use_cache=True).logits

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if ids.shape[-1] == 1 and cache.seen >= cache.cap:
            if not cache.static:
                cache.make_static()
            logits = self._step(ids)
            cache.advance()
            return logits
        if cache.static:
            cache.make_dynamic()
        return self._forward(ids)
