"""Re-rotation exactness: a key rotated at p and moved by d equals the key rotated at p + d."""

import sys

import pytest
import torch

from streamkv import RotaryAligner, StreamkvError
from streamkv.cache.rope import find_rotary_module

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

FAMILIES = ("tiny:gpt_neox", "tiny:llama", "tiny:llama-linear", "tiny:llama-llama3")


def model_rotate(model, keys, positions):
    """Rotate un-rotated keys exactly as the model's attention does (its own module's function)."""
    apply = sys.modules[type(model).__module__].apply_rotary_pos_emb
    cos, sin = find_rotary_module(model)(keys, position_ids=positions.reshape(1, -1))
    _, k = apply(keys, keys, cos, sin)
    return k


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("p,d", [(0, 1), (3, 29), (100, -60), (1000, 7)])
def test_shift_equals_rotation_at_target(tiny, name, p, d):
    model = tiny(name).model
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    raw = torch.randn(1, 2, 5, head_dim, generator=torch.Generator().manual_seed(p))
    positions = p + torch.arange(5)
    moved = RotaryAligner(model).shift(model_rotate(model, raw, positions), d)
    assert torch.allclose(moved, model_rotate(model, raw, positions + d), atol=1e-5, rtol=0)


def test_partial_rotary_leaves_the_rest_untouched(tiny):
    model = tiny("tiny:gpt_neox").model
    aligner = RotaryAligner(model)
    assert aligner.rotary_dim == 4  # 16-dim heads, rotary_pct 0.25
    keys = torch.randn(1, 4, 3, 16)
    moved = aligner.shift(keys, 11)
    assert torch.equal(moved[..., 4:], keys[..., 4:])
    assert not torch.allclose(moved[..., :4], keys[..., :4])


def test_llama3_scaling_really_changes_frequencies(tiny):
    """Otherwise the llama3 case would test nothing beyond the default rope."""
    plain = find_rotary_module(tiny("tiny:llama").model).inv_freq
    scaled = find_rotary_module(tiny("tiny:llama-llama3").model).inv_freq
    assert plain[0] == scaled[0]  # short wavelengths keep their frequency
    assert torch.allclose(scaled[-2:], plain[-2:] / 8)  # long ones are divided by the factor


def test_dynamic_rope_is_refused():
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(StreamkvError, match="rope type 'dynamic' is not shift-invariant"):
        RotaryAligner(AutoModelForCausalLM.from_config(cfg))
