"""Exact RoPE re-alignment of cached keys, using the model's own rotary module.

transformers applies RoPE to keys *before* `Cache.update`, so a cache holds
rotated keys and must rotate them again when it wants a key to sit at another
position.  Rotations compose: R(p + d) = R(d) R(p), so moving a key by `d`
positions is one more rotation by the angles of position `d`.  The angles come
from the model's rotary module (which knows its rope type, scaling and partial
rotary fraction), never from a per-model formula written here; only the
"rotate half" pairing that every supported family shares is applied locally.
"""

from __future__ import annotations

import torch
from torch import nn

from streamkv.errors import StreamkvError

# Rope types whose rotation depends only on the position difference, so a
# shift by `d` is exact.  `dynamic` changes its frequencies with the sequence
# length (and mutates the module when called); `longrope` switches factor sets
# by length: neither can be re-aligned exactly.
SHIFT_INVARIANT_ROPE = ("default", "linear", "llama3", "yarn")
# How far positions may grow before they are re-based (rotated back by one offset): float32 rotary angles lose
# precision with the position, so the ring's pipeline rows and the parallel evaluator keep theirs below this + cap.
REBASE = 4096


def find_rotary_module(model: nn.Module) -> nn.Module:
    """The model-level rotary embedding (`model.model.rotary_emb`, `model.gpt_neox.rotary_emb`, ...)."""
    base = getattr(model, "base_model", model)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        candidates = [m for name, m in model.named_modules() if name.endswith("rotary_emb")]
        rotary = candidates[0] if len(candidates) == 1 else None
    if rotary is None:
        raise StreamkvError(
            f"{type(model).__name__} has no single model-level rotary embedding; "
            "streamkv re-aligns keys only for RoPE models such as Llama-family and GPT-NeoX"
        )
    return rotary


def rope_parameters(model: nn.Module, layer_type: str | None = None) -> dict:
    """The RoPE parameters of the model, or of one layer type's (hybrid models such as Gemma 3 keep one set per
    layer type, keyed by it)."""
    params = getattr(model.config, "rope_parameters", None) or {}
    if layer_type is not None and isinstance(params.get(layer_type), dict):
        return params[layer_type]
    return params


def rope_type(model: nn.Module, layer_type: str | None = None) -> str:
    return rope_parameters(model, layer_type).get("rope_type", "default")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryAligner:
    """Rotates cached keys by position offsets with the model's rotary module.

    Keys have shape `[batch, kv_heads, seq, head_dim]`; only the first
    `rotary_dim` channels are rotated (GPT-NeoX rotates a fraction of each
    head; Llama-family all of it), the rest pass through unchanged.

    `layer_type` (hybrid models, e.g. Gemma 3's "sliding_attention" and
    "full_attention"): the rotation of that layer type, whose RoPE base may
    differ from the others'; the model's one rotary module takes it as an argument.
    """

    def __init__(self, model: nn.Module, layer_type: str | None = None):
        kind = rope_type(model, layer_type)
        if kind not in SHIFT_INVARIANT_ROPE:
            raise StreamkvError(
                f"rope type '{kind}' is not shift-invariant, so cached keys cannot be re-aligned exactly; "
                f"supported: {', '.join(SHIFT_INVARIANT_ROPE)}"
            )
        self.rotary = find_rotary_module(model)
        self.layer_type = layer_type
        scaling = getattr(self.rotary, f"{layer_type}_attention_scaling", None) if layer_type else None
        if scaling is None:
            scaling = getattr(self.rotary, "attention_scaling", 1.0)
        self.scaling = float(scaling or 1.0)
        self.device = next(model.parameters()).device
        self._probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        self._shift_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rotary_dim = self.angles(torch.zeros(1, dtype=torch.long))[0].shape[-1]

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 `(cos, sin)` of shape `[len(positions), rotary_dim]` for (possibly negative) positions."""
        position_ids = positions.to(self.device).reshape(1, -1)
        if self.layer_type is None:
            cos, sin = self.rotary(self._probe, position_ids=position_ids)
        else:
            cos, sin = self.rotary(self._probe, position_ids=position_ids, layer_type=self.layer_type)
        # The module folds `attention_scaling` (yarn) into cos/sin; the keys
        # already carry it once, so a re-rotation must not apply it again.
        return cos[0] / self.scaling, sin[0] / self.scaling

    def rotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate `keys` by the angles `(cos, sin)` (broadcast over batch and heads)."""
        rd = self.rotary_dim
        x = keys[..., :rd].float()
        rotated = (x * cos + rotate_half(x) * sin).to(keys.dtype)
        if rd == keys.shape[-1]:
            return rotated
        return torch.cat((rotated, keys[..., rd:]), dim=-1)

    def shift(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        """Move every key in `keys` by `delta` positions (exact up to fp32 angle rounding)."""
        if delta == 0:
            return keys
        if delta not in self._shift_cache:
            # A prune usually moves by the same amount each time (1 or K):
            # compute the angles once per delta and reuse them for every layer.
            self._shift_cache[delta] = self.angles(torch.tensor([delta]))
        cos, sin = self._shift_cache[delta]
        return self.rotate(keys, cos, sin)
