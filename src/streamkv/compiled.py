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

    The compiled step does not guard on the model's modules: a decoder keeps
    its model, whose layers and weights nobody swaps between steps, and those
    guards (a check of every module's attributes and parameters before each
    step) cost 1.3 ms of a 16 ms int8 step of SmolLM2 on 2 cores.  The guards
    on the inputs and on the cache's tensors stay.  Without them a graph
    compiled for one model would serve any other model's decoder, since
    torch.compile keeps its graphs per function; so every decoder keeps its own
    (`isolate_recompiles`).
    """

    def __init__(self, model: torch.nn.Module, cache: RingCache, compile: bool = False, **compile_kwargs):
        if not isinstance(cache, RingCache):
            raise StreamkvError(f"RingDecoder needs a ring cache (make_cache('ring', ...)), got {type(cache).__name__}")
        self.model, self.cache = model, cache
        self.compiled = compile
        step = self._forward
        if compile:
            step = torch.compile(self._forward, fullgraph=True, dynamic=False, **_without_module_guards(compile_kwargs))
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


def _without_module_guards(kwargs: dict) -> dict:
    """`torch.compile` arguments that drop the guards on nn.Module state (a mode becomes its options: the two
    cannot be given together)."""
    kwargs = dict(kwargs)
    options = dict(kwargs.pop("options", None) or {})
    mode = kwargs.pop("mode", None)
    if mode is not None:
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), **options}
    options.setdefault("guard_filter_fn", torch.compiler.skip_guard_on_all_nn_modules_unsafe)
    return {"isolate_recompiles": True, **kwargs, "options": options}
