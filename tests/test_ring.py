"""The ring cache: equal to MIT strict Start+Recent, in fixed preallocated buffers, under generate, re-based."""

import numpy as np
import pytest
import torch

from conftest import TINY
from streamkv import EvalParams, StreamkvError, evaluate, make_cache

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)


def stream(model, cache, tokens, chunk=1):
    """Log-probabilities of every position, feeding `tokens` in chunks."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(tokens), chunk):
            ids = torch.tensor([tokens[i : i + chunk]])
            out.append(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0].log_softmax(-1))
    return torch.cat(out)


@pytest.mark.parametrize("name,prefill", [(name, 20) for name in TINY] + [("tiny:llama", 1)])
def test_ring_gives_the_nll_of_mit(tiny, hamlet_bytes, name, prefill):
    loaded, tokens = tiny(name), hamlet_bytes[:2048]
    mit, a = evaluate(loaded, tokens, EvalParams("m", "t", "mit", cap=32, max_tokens=2048, prefill=prefill),
                      progress=False)
    ring, b = evaluate(loaded, tokens, EvalParams("m", "t", "ring", cap=32, max_tokens=2048, prefill=prefill),
                       progress=False)
    assert np.abs(a.nll.values - b.nll.values).max() <= 1e-4
    assert b.kv_len.tolist() == a.kv_len.tolist()
    assert ring["metrics"]["n_prunes"] == mit["metrics"]["n_prunes"] > 0


def test_chunks_after_the_ring_wrapped_follow_mit(tiny, hamlet_bytes):
    """Chunks need position order for the causal mask (eager attention checks the mask sizes)."""
    model = tiny("tiny:llama").model
    a = stream(model, make_cache("mit", model, cap=32, sink=4), hamlet_bytes[:300], chunk=5)
    b = stream(model, make_cache("ring", model, cap=32, sink=4), hamlet_bytes[:300], chunk=5)
    assert (a - b).abs().max() <= 1e-4


def test_a_first_chunk_longer_than_the_ring_follows_mit(tiny, hamlet_bytes):
    model = tiny("tiny:llama").model
    logprobs = []
    for method in ("mit", "ring"):
        cache = make_cache(method, model, cap=32, sink=4)
        first = stream(model, cache, hamlet_bytes[:50], chunk=50)  # attends to all 50, keeps 4 + the last 28
        logprobs.append(torch.cat((first, stream(model, cache, hamlet_bytes[50:200]))))
        assert cache.kv_length == 32
    assert (logprobs[0] - logprobs[1]).abs().max() <= 1e-4


def test_eviction_overwrites_in_place(tiny, hamlet_bytes):
    """After the first forward: no allocation, the same buffers, constant bytes."""
    model = tiny("tiny:llama").model
    cache = make_cache("ring", model, cap=32, sink=4)
    stream(model, cache, hamlet_bytes[:8], chunk=8)
    pointers = [(lay.buf_k.data_ptr(), lay.buf_v.data_ptr()) for lay in cache.layers]
    nbytes = cache.nbytes()
    seen = []
    with torch.inference_mode():
        for tok in hamlet_bytes[8:200]:
            model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            seen.append(cache.nbytes())
    assert [(lay.buf_k.data_ptr(), lay.buf_v.data_ptr()) for lay in cache.layers] == pointers
    assert set(seen) == {nbytes} and cache.kv_length == 32 and cache.n_prunes == 200 - 32


def test_generate_streams_past_the_cap_like_mit(tiny):
    model = tiny("tiny:gpt_neox").model
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([list(b"To be, or not to be")])
    outs = [model.generate(prompt, max_new_tokens=150, do_sample=False,
                           past_key_values=make_cache(m, model, cap=24, sink=4))
            for m in ("mit", "ring")]
    assert torch.equal(*outs) and outs[0].shape[-1] == prompt.shape[-1] + 150


def ordered_keys(ring, layer=0):
    """The ring's keys in position order (sinks, then the window from its oldest), moved to positions 0..cap-1."""
    order = list(range(ring.sink)) + [ring._slot(p) for p in range(ring.seen - ring.window, ring.seen)]
    keys = ring.layers[layer].buf_k[:, :, order]
    return ring.aligner.shift(keys, -(ring.seen - ring.base - ring.cap))


@pytest.mark.parametrize("name", ["tiny:llama", "tiny:gpt_neox"])
def test_rebased_positions_stay_small_and_exact(tiny, hamlet_bytes, name):
    """Re-basing moves every key by the same offset: the keys, in the cache's own frame, are MIT's keys.

    The reference for the log-probabilities is a ring that re-bases every step, so that its positions
    never pass cap + 1 (MIT's absolute positions lose float32 precision as the stream grows).
    """
    model = tiny(name).model
    ring = make_cache("ring", model, cap=32, sink=4, rebase_every=100)
    mit = make_cache("mit", model, cap=32, sink=4)
    with torch.inference_mode():
        for i, tok in enumerate(hamlet_bytes[:400]):
            for cache in (ring, mit):
                model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            if i > 40 and not ring.pending_rebase:  # (a pending re-base rotates the keys at the next step)
                for layer in (0, len(ring.layers) - 1):
                    reference = mit.aligner.rotate(mit.layers[layer].keys, *mit.aligner.angles(torch.arange(32)))
                    assert (ordered_keys(ring, layer) - reference).abs().max() <= 1e-4
    assert ring.base > 200 and ring.get_seq_length() < 100 + 32
    a = stream(model, make_cache("ring", model, cap=32, sink=4, rebase_every=32), hamlet_bytes[:700])
    b = stream(model, make_cache("ring", model, cap=32, sink=4, rebase_every=100), hamlet_bytes[:700])
    assert (a - b).abs().max() <= 1e-4


def test_ring_options_are_checked(tiny, hamlet_bytes):
    model = tiny("tiny:llama").model
    with pytest.raises(StreamkvError, match="cache-slack applies to start_recent, not to 'ring'"):
        make_cache("ring", model, cap=32, cache_slack=4)
    with pytest.raises(StreamkvError, match="rebase_every \\(16\\) must be at least the ring's slots \\(32\\)"):
        make_cache("ring", model, cap=32, rebase_every=16)
    with pytest.raises(StreamkvError, match="rebase_every \\(32\\) must be at least the ring's slots \\(39\\)"):
        make_cache("ring", model, cap=32, compress_every=8, rebase_every=32)
    cache = make_cache("ring", model, cap=32, sink=4)
    stream(model, cache, hamlet_bytes[:40])
    with pytest.raises(StreamkvError, match="a chunk of 30 tokens does not fit the ring's window \\(28\\)"):
        stream(model, cache, hamlet_bytes[40:70], chunk=30)
    with pytest.raises(StreamkvError, match="compress-every applies to window, start_recent, ring, tova, the kvpress "
                                            "methods and llamacpp:shift, not to 'mit'"):
        EvalParams("m", "t", "mit", compress_every=8).resolved()


# The lazy ring: start_recent's lazy pruning (K > 1) in fixed buffers.

@pytest.mark.parametrize("name,prefill,k",
                         [(name, 20, 8) for name in TINY] + [("tiny:llama", 1, 4), ("tiny:llama", 32, 5)])
def test_lazy_ring_gives_the_nll_of_lazy_start_recent(tiny, hamlet_bytes, name, prefill, k):
    loaded, tokens = tiny(name), hamlet_bytes[:1024]
    runs = [evaluate(loaded, tokens, EvalParams("m", "t", method, cap=32, compress_every=k, max_tokens=1024,
                                                prefill=prefill), progress=False)
            for method in ("start_recent", "ring")]
    (ours, a), (ring, b) = runs
    assert np.abs(a.nll.values - b.nll.values).max() <= 1e-4
    assert b.kv_len.tolist() == a.kv_len.tolist() and b.kv_len.max() == 32 + k - 1
    assert ring["metrics"]["n_prunes"] == ours["metrics"]["n_prunes"] > 0
    assert ring["metrics"]["tokens_dropped"] == ours["metrics"]["tokens_dropped"]


def test_lazy_ring_overwrites_in_place(tiny, hamlet_bytes):
    """cap + K - 1 slots allocated once; a prune moves only the staged tokens; the bytes never change."""
    model = tiny("tiny:gpt_neox").model
    cache = make_cache("ring", model, cap=32, sink=4, compress_every=8)
    stream(model, cache, hamlet_bytes[:8], chunk=8)
    pointers = [(lay.buf_k.data_ptr(), lay.buf_v.data_ptr()) for lay in cache.layers]
    nbytes, lengths = cache.nbytes(), []
    with torch.inference_mode():
        for tok in hamlet_bytes[8:300]:
            model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True)
            assert cache.nbytes() == nbytes
            lengths.append(cache.kv_length)
    assert [(lay.buf_k.data_ptr(), lay.buf_v.data_ptr()) for lay in cache.layers] == pointers
    assert cache.layers[0].buf_k.shape[-2] == 39 and max(lengths) == 39 and min(lengths[40:]) == 32


def test_lazy_ring_under_generate_and_rebased(tiny, hamlet_bytes):
    model = tiny("tiny:llama").model
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([list(b"To be, or not to be")])
    outs = [model.generate(prompt, max_new_tokens=150, do_sample=False,
                           past_key_values=make_cache(m, model, cap=24, sink=4, compress_every=6))
            for m in ("start_recent", "ring")]
    assert torch.equal(*outs)
    # re-basing rotates the window (staging included) and the sinks: the same log-probabilities (over 300
    # tokens, where the absolute positions of start_recent are still precise in float32) ...
    a = stream(model, make_cache("start_recent", model, cap=32, sink=4, compress_every=8), hamlet_bytes[:300])
    rebased = make_cache("ring", model, cap=32, sink=4, compress_every=8, rebase_every=40)
    b = stream(model, rebased, hamlet_bytes[:300])
    assert rebased.base > 200 and (a - b).abs().max() <= 1e-4
    # ... and further on, whatever the re-base schedule
    a = stream(model, make_cache("ring", model, cap=32, sink=4, compress_every=8, rebase_every=40), hamlet_bytes[:700])
    b = stream(model, make_cache("ring", model, cap=32, sink=4, compress_every=8, rebase_every=97), hamlet_bytes[:700])
    assert (a - b).abs().max() <= 1e-4


def test_lazy_ring_refuses_what_it_cannot_lay_out(tiny, hamlet_bytes):
    model = tiny("tiny:llama").model
    with pytest.raises(StreamkvError, match="a first chunk of 40 tokens does not fit the lazy ring's 39 slots"):
        stream(model, make_cache("ring", model, cap=32, sink=4, compress_every=8), hamlet_bytes[:40], chunk=40)
    cache = make_cache("ring", model, cap=32, sink=4, compress_every=8)
    stream(model, cache, hamlet_bytes[:36], chunk=36)  # fits: no prune yet
    with pytest.raises(StreamkvError, match="the lazy ring takes one token per forward once it evicts"):
        stream(model, cache, hamlet_bytes[36:40], chunk=4)
    with pytest.raises(StreamkvError, match="fixed-shape steps need the strict ring"):
        cache.make_static()
