"""Reduced-precision weights: a run parameter separate from the cache's precision.

A decode step on a CPU reads every weight once per token, so it is bound by
the bytes of the linear layers (540 MB in float32 for SmolLM2-135M).  A
variant changes how the model's `nn.Linear` layers (the LM head included)
store and multiply their weights; their outputs keep the activation dtype
(`--dtype`), so the KV cache, the norms, the rotary embeddings and the
attention stay what they were.  Each variant is one record with one function
that rewrites a loaded model in place; every method, the recompute baseline
and `model.generate` then run the variant, because they all run the model.

The quantised variants are torchao's configurations (the studied notes'
int8 weight-only is `Int8WeightOnlyConfig`), plus PyTorch's own fbgemm dynamic
int8 linears and ATen's int8 weight-only kernel (the one that compiles into a
fast step).  Which one is fast here, and what each costs in PPL, is measured
(`streamkv bench`'s weights section, the pipeline's weights ablation), not
assumed.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamkv import cpu
from streamkv.errors import StreamkvError, first_line

DEFAULT = "float32"


class CastLinear(torch.nn.Module):
    """A linear layer whose weight is stored (and multiplied) in `dtype`; the output is cast back to the input's dtype.

    The activations are rounded to `dtype` on the way in: the matrix product runs in the weight's precision,
    as a bfloat16 GEMV does, with float32 accumulation inside the kernel.
    """

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = torch.nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)
        self.bias = (None if linear.bias is None else
                     torch.nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.weight.dtype}"


def _linears(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """(parent, attribute, layer) of every nn.Linear, the LM head included."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, torch.nn.Linear)]


def _untie(model: torch.nn.Module) -> None:
    """Give the LM head a weight of its own: a quantised head must not change the (tied) input embedding."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False


def _replace_linears(make: Callable[[torch.nn.Linear], torch.nn.Module]) -> Callable[[torch.nn.Module], None]:
    """A variant that puts `make(layer)` in place of every nn.Linear of the model."""
    def apply(model: torch.nn.Module) -> None:
        for parent, name, layer in _linears(model):
            setattr(parent, name, make(layer))
    return apply


def _torchao():
    """torchao, imported quietly: it logs a warning for each optional GPU kernel library it cannot load on a CPU."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise StreamkvError("this weights variant needs torchao: pip install torchao (make setup installs it)") \
            from None
    finally:
        log.setLevel(level)
    return quantization


def _torchao_config(make: Callable) -> Callable[[torch.nn.Module], None]:
    def apply(model: torch.nn.Module) -> None:
        _torchao().quantize_(model, make(), filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))
    return apply


def _int8_weight_only():
    return _torchao().Int8WeightOnlyConfig()


def _intx_int8():
    return _torchao().IntxWeightOnlyConfig(weight_dtype=torch.int8)


def _int8_dynamic():
    return _torchao().Int8DynamicActivationInt8WeightConfig()


def _int4_weight_only():
    _torchao()
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

    return PrototypeInt4WeightOnlyConfig(group_size=32)


VNNI_FLAGS = cpu.FEATURES["VNNI"]


def has_vnni() -> bool:
    """The CPU multiplies int8 by uint8 with int32 sums (what int8-fbgemm's 8-bit activations need)."""
    return cpu.has("VNNI")


def runs_here(name: str) -> bool:
    """Whether the variant `name` runs on this CPU (it needs no feature, or the CPU has it); elsewhere it refuses."""
    needs = get(name).needs
    return needs is None or cpu.has(needs)


def check_runs_here(name: str) -> None:
    """The refusal of a variant this CPU lacks the instructions for (the CLI asks before it loads a model)."""
    if not runs_here(name):
        raise StreamkvError(get(name).refusal)


def _fbgemm_rows(x: torch.Tensor, packed, out_features: int) -> torch.Tensor:
    """fbgemm's dynamic int8 product of every token of `x` on its own (one activation scale per token)."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1:  # a decode step of one stream
        out = torch.ops.quantized.linear_dynamic(rows, packed, reduce_range=False)
    else:
        out = torch.cat([torch.ops.quantized.linear_dynamic(row, packed, reduce_range=False) for row in rows.split(1)])
    return out.reshape(*x.shape[:-1], out_features).to(x.dtype)


# torch.compile cannot trace fbgemm's packed weights (a TorchScript object), so inside a compiled step each
# linear is one opaque op that names its layer by number: the rest of the step (norms, rotary, attention, the
# cache) compiles around them in one graph.  It compiles; it does not pay on a CPU: the op's Python dispatch, once
# per linear, costs more than the compiled rest saves (the bench's weights section measures it: docs/performance.md).
_FBGEMM_LINEARS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # (a dropped model leaves it)
_FBGEMM_IDS = itertools.count()


@torch.library.custom_op("streamkv::fbgemm_linear", mutates_args=())
def fbgemm_linear(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    return _fbgemm_rows(x, _FBGEMM_LINEARS[index]._packed_params._packed_params, out_features)


@fbgemm_linear.register_fake
def _(x: torch.Tensor, index: int, out_features: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _fbgemm_dynamic(model: torch.nn.Module) -> None:
    """PyTorch's dynamic int8 linears, with activations quantised to all 8 bits (see `FullRangeDynamicLinear`)."""
    import warnings

    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    class FullRangeDynamicLinear(DynamicLinear):
        """fbgemm's dynamic int8 linear with 8-bit activations, quantised token by token.

        PyTorch's module asks fbgemm for 7-bit activations (reduce_range), which keeps the int16 sums of CPUs
        without VNNI from saturating; with VNNI the products accumulate in int32, and the eighth bit halves the
        rounding error of every activation (on SmolLM2, +0.045 instead of +0.106 nats against float32 over 512
        decoded Hamlet tokens, at the same speed).  fbgemm takes one activation scale per call, so a chunk of
        tokens (a prefill, a batch of streams) goes one token per call: one scale for a whole 256-token prefill
        let the largest outlier of any token set every token's rounding (+66 % PPL on the prefill's targets),
        and would make a stream's output depend on the other streams of its batch.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.index = next(_FBGEMM_IDS)
            _FBGEMM_LINEARS[self.index] = self

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.compiler.is_compiling():
                return fbgemm_linear(x, self.index, self.out_features)
            return _fbgemm_rows(x, self._packed_params._packed_params, self.out_features)

    with warnings.catch_warnings():  # (PyTorch's notice that torch.ao.quantization moves to torchao)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True,
                         mapping={torch.nn.Linear: FullRangeDynamicLinear})


class Int8PackLinear(torch.nn.Module):
    """int8 weights, one bfloat16 scale per output channel, multiplied by ATen's `_weight_int8pack_mm`.

    The kernel reads a quarter of float32's bytes and widens the int8 weights in registers; it takes bfloat16
    activations (its float32 path is about 8 times slower here), so the activations are rounded to bfloat16 as
    in the bfloat16 variant and the output comes back in their dtype.  Unlike torchao's int8 (a tensor
    subclass) and fbgemm's (packed weights that cannot be traced), it is one plain ATen op on plain tensors:
    the fixed-shape step compiles around it into one graph, and that compiled step is the fastest one here.
    """

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        # the scale is rounded to bfloat16 first, so the int8 weights are quantised against the scale the kernel uses
        scale = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).to(dtype)
        self.register_buffer("weight", (weight / scale.float()[:, None]).round().clamp(-128, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = (None if linear.bias is None else
                     torch.nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scale.dtype)
        out = torch._weight_int8pack_mm(rows, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str  # one line for the CLI help and the report
    apply: Callable[[torch.nn.Module], None]
    needs: str | None = None  # the CPU feature (a key of streamkv.cpu.FEATURES) it runs only with
    refusal: str = ""  # why, and what to use instead, on a CPU without it


REGISTRY: dict[str, Variant] = {v.name: v for v in (
    Variant(DEFAULT, "the weights as loaded (--dtype)", lambda model: None),
    Variant("bfloat16", "linear weights in bfloat16, products in bfloat16, outputs back in --dtype",
            _replace_linears(lambda layer: CastLinear(layer, torch.bfloat16))),
    Variant("int8", "torchao Int8WeightOnlyConfig: int8 weights, one scale per output channel",
            _torchao_config(_int8_weight_only)),
    Variant("int8-intx", "torchao IntxWeightOnlyConfig(int8): the same weights through the configuration the studied "
            "notes moved to when Int8WeightOnlyConfig gave NaNs", _torchao_config(_intx_int8)),
    Variant("int8-dynamic", "torchao Int8DynamicActivationInt8WeightConfig: int8 weights and per-token int8 "
            "activations", _torchao_config(_int8_dynamic)),
    Variant("int8-fbgemm", "PyTorch's quantize_dynamic (fbgemm, CPUs with VNNI): int8 weights per channel, "
            "activations quantised to 8 bits per token at run time", _fbgemm_dynamic, needs="VNNI",
            refusal="weights 'int8-fbgemm' quantises activations to the full 8 bits, which fbgemm multiplies exactly "
            f"only with VNNI instructions ({' or '.join(VNNI_FLAGS)}); this CPU has neither: use bfloat16 or int8"),
    Variant("int8-pack", "int8 weights per channel, bfloat16 activations, ATen's _weight_int8pack_mm",
            _replace_linears(Int8PackLinear)),
    Variant("int4", "torchao int4 weight-only for CPU: groups of 32 weights with a scale and a zero point",
            _torchao_config(_int4_weight_only)),
)}
NAMES = tuple(REGISTRY)


def get(name: str) -> Variant:
    if name not in REGISTRY:
        raise StreamkvError(f"unknown weights '{name}'; choose one of: {', '.join(NAMES)}")
    return REGISTRY[name]


def apply_weights(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """Rewrite `model`'s linear layers in place to the variant `name`; return the model.

    An error inside the quantiser (an unsupported shape or op) is a `StreamkvError` naming the variant.
    """
    variant = get(name)
    if name == DEFAULT:
        return model
    check_runs_here(name)
    if next(model.parameters()).device.type != "cpu" and name == "int8-fbgemm":
        raise StreamkvError("weights 'int8-fbgemm' runs on the CPU only (fbgemm kernels); use int8 on a GPU")
    _untie(model)
    try:
        with torch.no_grad():
            variant.apply(model)
    except StreamkvError:
        raise
    except (RuntimeError, ValueError, AssertionError, NotImplementedError, TypeError) as exc:
        raise StreamkvError(f"weights '{name}' cannot be applied to this model: {type(exc).__name__}: "
                            f"{first_line(exc)}") from None
    model.streamkv_weights = name  # read back by weights_of()
    return model


def weights_of(model: torch.nn.Module) -> str:
    """The variant `apply_weights` gave the model (float32: none)."""
    return getattr(model, "streamkv_weights", DEFAULT)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the linear layers' weights as stored (packed int8/int4 included), the LM head included."""
    total = 0
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, CastLinear)):
            total += _tensor_bytes(module.weight)
        elif isinstance(module, Int8PackLinear):
            total += _tensor_bytes(module.weight) + _tensor_bytes(module.scale)
        elif isinstance(module, torch.ao.nn.quantized.dynamic.Linear):  # (fbgemm-packed: weight() unpacks it)
            weight = module.weight()
            total += weight.numel() * weight.element_size()
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    """A tensor's bytes; for a torchao tensor subclass, the sum over its inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = flatten()
    return sum(_tensor_bytes(getattr(t, n)) for n in names if isinstance(getattr(t, n), torch.Tensor))
