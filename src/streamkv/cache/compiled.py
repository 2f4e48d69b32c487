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

from streamkv.cache.hybrid import LayerGroupsCache
from streamkv.cache.ring import RingCache
from streamkv.errors import StreamkvError

# The fixed-shape step's one query sees every slot of the ring, so it needs no attention mask.  transformers drops
# such a mask itself in eager mode; under torch.compile (torch < 2.14) it cannot tell, builds one, and SDPA with a
# mask repeats the grouped keys and values once per query head (a copy of every layer's cache, each step).  The step
# therefore runs under an attention implementation of its own: transformers' SDPA function, registered without a
# mask function, for which transformers builds no mask (what it saves: docs/library.md).
ONE_QUERY_SDPA = "streamkv_one_query_sdpa"


def _register_one_query_sdpa() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(ONE_QUERY_SDPA, sdpa_attention_forward)


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
    step) cost 1.3 ms of a 16 ms int8-pack step of SmolLM2 on 2 cores.  The guards
    on the inputs and on the cache's tensors stay.  Without them a graph
    compiled for one model would serve any other model's decoder, since
    torch.compile keeps its graphs per function; so every decoder keeps its own
    (`isolate_recompiles`).
    """

    def __init__(self, model: torch.nn.Module, cache: RingCache | LayerGroupsCache, compile: bool = False,
                 **compile_kwargs):
        hybrid = isinstance(cache, LayerGroupsCache) and cache.is_ring
        if not (isinstance(cache, RingCache) or hybrid):
            raise StreamkvError(f"RingDecoder needs a ring cache (make_cache('ring', ...)), got {type(cache).__name__}")
        self.model, self.cache = model, cache
        self.compiled = compile
        step = self._forward
        if compile:
            step = torch.compile(self._forward, fullgraph=True, dynamic=False, **_without_module_guards(compile_kwargs))
        self._step = step
        self._unmasked = getattr(model.config, "_attn_implementation", None) == "sdpa"
        if self._unmasked:
            _register_one_query_sdpa()
        elif hybrid:
            # The fixed-shape step's mask places every slot at positions 0..cap-1, which a sliding-window mask reads
            # as out of a late query's window; without a mask (SDPA, above) every slot is visible, as it should be.
            raise StreamkvError("the ring's fixed-shape step on a hybrid model needs attn_implementation 'sdpa' "
                                f"(the model runs '{model.config._attn_implementation}')")

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, past_key_values=self.cache, use_cache=True).logits

    def _static_step(self, ids: torch.Tensor) -> torch.Tensor:
        """The fixed-shape step, without an attention mask where the model runs SDPA (see ONE_QUERY_SDPA)."""
        if not self._unmasked:
            return self._step(ids)
        config = self.model.config
        config._attn_implementation = ONE_QUERY_SDPA
        try:
            return self._step(ids)
        finally:
            config._attn_implementation = "sdpa"

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        if ids.shape[-1] == 1 and cache.seen >= cache.cap:
            if not cache.static:
                cache.make_static()
            logits = self._static_step(ids)
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
