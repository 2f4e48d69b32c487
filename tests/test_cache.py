"""Caches as transformers Cache objects: bounds, masks, generate."""

import pytest
import torch

from streamkv import StreamkvError, make_cache
from streamkv.cache.streaming import StreamingCache

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)


def feed(model, cache, tokens, chunk=1):
    """Stream `tokens` through `model` in chunks; return the keys attended per forward and the logits."""
    lens, logits = [], []
    with torch.no_grad():
        for i in range(0, len(tokens), chunk):
            ids = torch.tensor([tokens[i : i + chunk]])
            logits.append(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0])
            lens.append(cache.last_step.kv_len)
            assert cache.kv_length == cache.last_step.kv_len
    return lens, torch.cat(logits)


@pytest.mark.parametrize("method,k,slack,delta,bound", [
    ("start_recent", 1, 0, 0, 40), ("mit", 1, 0, 0, 40), ("window", 1, 0, 0, 40), ("start_recent", 8, 0, 0, 47),
    ("start_recent", 5, 0, 0, 44), ("start_recent", 16, 8, 4, 40), ("start_recent", 4, 8, 0, 35),
    ("ring", 1, 0, 0, 40)])
def test_kv_length_never_exceeds_the_promise(tiny, hamlet_bytes, method, k, slack, delta, bound):
    model = tiny("tiny:llama").model
    cache = make_cache(method, model, cap=40, sink=4, compress_every=k, cache_slack=slack, max_drop=delta)
    lens, _ = feed(model, cache, hamlet_bytes[:300])
    assert max(lens) == bound  # reached, never exceeded
    assert cache.policy.max_kv == bound
    assert cache.seen == 300 and cache.n_prunes > 0


def test_lazy_prunes_only_on_multiples_of_k(tiny, hamlet_bytes):
    model = tiny("tiny:llama").model
    cache = make_cache("start_recent", model, cap=40, sink=4, compress_every=8)
    pruned_at = []
    with torch.no_grad():
        for t, tok in enumerate(hamlet_bytes[:200]):
            model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            if cache.last_step.dropped:
                pruned_at.append(t)
    assert pruned_at and all(t % 8 == 0 for t in pruned_at)
    assert pruned_at == list(range(pruned_at[0], 200, 8))


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:gpt_neox"])
@pytest.mark.parametrize("method", ["dense", "start_recent", "mit", "window", "ring"])
def test_chunks_with_eager_attention_match_a_full_forward_when_nothing_is_evicted(tiny, hamlet_bytes, name, method):
    """Multi-token chunks exercise the mask sizes (sdpa with one token would skip the mask)."""
    model = tiny(name).model
    tokens = hamlet_bytes[:90]
    cache = make_cache(method, model, cap=128, sink=4)
    _, logits = feed(model, cache, tokens, chunk=7)
    with torch.no_grad():
        full = model(torch.tensor([tokens])).logits[0]
    assert torch.allclose(logits, full, atol=1e-4, rtol=0)


def test_chunks_that_evict_keep_the_mask_consistent(tiny, hamlet_bytes):
    model = tiny("tiny:llama").model
    strict = make_cache("start_recent", model, cap=32, sink=4)
    ref = make_cache("mit", model, cap=32, sink=4)
    a_lens, a = feed(model, strict, hamlet_bytes[:120], chunk=5)
    b_lens, b = feed(model, ref, hamlet_bytes[:120], chunk=5)
    assert a_lens == b_lens and max(a_lens) == 32
    assert torch.allclose(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["start_recent", "mit", "window", "ring"])
def test_generate_streams_past_the_cap(tiny, method):
    model = tiny("tiny:llama").model
    model.generation_config.pad_token_id = 0
    prompt = torch.tensor([list(b"Who's there? Nay, answer me")])
    dense = model.generate(prompt, max_new_tokens=30, do_sample=False)
    roomy = make_cache(method, model, cap=128, sink=4)
    assert torch.equal(model.generate(prompt, max_new_tokens=30, do_sample=False, past_key_values=roomy), dense)
    tight = make_cache(method, model, cap=24, sink=4)
    out = model.generate(prompt, max_new_tokens=200, do_sample=False, past_key_values=tight)
    assert out.shape[-1] == prompt.shape[-1] + 200
    assert tight.kv_length <= 24 and tight.n_prunes > 0


def test_start_recent_and_mit_generate_the_same_stream(tiny):
    model = tiny("tiny:gpt_neox").model
    model.generation_config.pad_token_id = 0
    prompt = torch.tensor([list(b"To be, or not to be")])
    outs = [model.generate(prompt, max_new_tokens=150, do_sample=False,
                           past_key_values=make_cache(m, model, cap=20, sink=4))
            for m in ("start_recent", "mit")]
    assert torch.equal(*outs)


def test_is_a_transformers_cache(tiny):
    from transformers.cache_utils import Cache

    cache = make_cache("start_recent", tiny("tiny:llama").model, cap=16)
    assert isinstance(cache, StreamingCache) and isinstance(cache, Cache)


def test_unknown_cache_method(tiny):
    with pytest.raises(StreamkvError) as err:
        make_cache("h2o", tiny("tiny:llama").model)
    assert str(err.value) == "unknown cache method 'h2o'; choose one of: dense, window, start_recent, mit, ring, tova"


@pytest.mark.parametrize("k", [1, 8])
def test_start_recent_writes_in_place_and_follows_mit(tiny, hamlet_bytes, k):
    """One buffer per layer after the first forward, compacted now and then; the NLL of mit when strict."""
    model = tiny("tiny:llama").model
    cache = make_cache("start_recent", model, cap=32, sink=4, compress_every=k)
    ref = make_cache("mit", model, cap=32, sink=4)
    with torch.inference_mode():
        model(input_ids=torch.tensor([hamlet_bytes[:8]]), past_key_values=cache, use_cache=True)
        model(input_ids=torch.tensor([hamlet_bytes[:8]]), past_key_values=ref, use_cache=True)
        pointers = [layer.buf_k.data_ptr() for layer in cache.layers]
        worst = 0.0
        for i in range(8, 400):
            ids, target = torch.tensor([[hamlet_bytes[i]]]), hamlet_bytes[i + 1]
            a = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].log_softmax(-1)[target]
            b = model(input_ids=ids, past_key_values=ref, use_cache=True).logits[0, -1].log_softmax(-1)[target]
            worst = max(worst, abs(a - b).item())  # the NLL of the next token
            assert all(layer.buf_k.data_ptr() == p for layer, p in zip(cache.layers, pointers))
            assert cache.kv_length <= cache.policy.max_kv
    assert cache.layers[0].buf_k.shape[-2] == cache.policy.max_kv + 16  # room: max(16, max_kv // 8)
    if k == 1:
        assert worst <= 1e-4
