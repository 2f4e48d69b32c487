"""TOVA, the native score-based cache: what it keeps, its budget, and its attention hand-over.

Its agreement with kvpress's TOVAPress is in tests/test_peers.py (it needs the peer environment).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from streamkv import EvalParams, StreamkvError, evaluate, make_cache
from streamkv.cache.scored import ATTENTION, ScoredLayer
from streamkv.cache.streaming import Step

CAP = 32


def run(loaded, tokens, method, k=1, cap=CAP, prefill=24, **kw):
    params = EvalParams("m", "t", method, cap=cap, compress_every=k, max_tokens=len(tokens), prefill=prefill, **kw)
    return evaluate(loaded, tokens, params, progress=False)


def test_with_nothing_evicted_tova_is_the_dense_cache(tiny, hamlet_bytes):
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:120]
    record, a = run(loaded, tokens, "tova", 4, cap=len(tokens))
    _, b = run(loaded, tokens, "dense")
    assert record["metrics"]["n_prunes"] == 0
    assert np.abs(a.nll.values - b.nll.values).max() <= 1e-6


@pytest.mark.parametrize("k", [1, 4])
def test_tova_keeps_its_budget_and_evicts_by_score(tiny, hamlet_bytes, k):
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:200]
    record, trace = run(loaded, tokens, "tova", k)
    assert record["status"] == "ok" and record["params"]["evaluator"] == "decode"
    assert trace.kv_len.max() == CAP + k - 1 and record["metrics"]["n_prunes"] > 0
    # the same prunes as Start+Recent at original positions, other tokens kept
    ours, recent = run(loaded, tokens, "start_recent", k, positions="original")
    assert trace.kv_len.tolist() == recent.kv_len.tolist()
    assert record["metrics"]["tokens_dropped"] == ours["metrics"]["tokens_dropped"]
    assert np.abs(trace.nll.values - recent.nll.values).max() > 1e-3


def test_tova_leaves_the_model_attention_as_it_was(tiny, hamlet_bytes):
    loaded = tiny("tiny:llama")
    before = loaded.model.config._attn_implementation
    run(loaded, hamlet_bytes[:60], "tova", 4)
    assert loaded.model.config._attn_implementation == before


def _layer(sink: int, n: int, scores: list[float]) -> ScoredLayer:
    no_weights = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: SimpleNamespace(num_hidden_layers=1)))
    cache = make_cache("tova", no_weights, cap=CAP, sink=sink)  # (a policy and layers: no model needed)
    layer = cache.layers[0]
    keys = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(1, 2, n, 3).contiguous()
    layer.update(keys, keys.clone(), Step(0, n, 0, n))
    layer.observe(torch.tensor(scores).view(1, 1, 1, n).expand(1, 4, 1, n))  # the same weights in every head
    return layer


def test_a_prune_keeps_the_sinks_the_best_scored_and_the_scoring_query():
    # slots 0-1 sinks (scored lowest), the newest (slot 7) scored lowest of the others
    layer = _layer(sink=2, n=8, scores=[0.0, 0.0, 0.5, 0.1, 0.9, 0.2, 0.8, 0.05])
    assert layer.kept(3).tolist() == [[0, 1, 4, 6, 7]]
    keys, _ = layer.update(torch.full((1, 2, 1, 3), -1.0), torch.zeros(1, 2, 1, 3), Step(8, 1, 3, 6))
    assert keys[0, 0, :, 0].tolist() == [0, 1, 4, 6, 7, -1]  # in slot order, the new token last


def test_without_the_scoring_attention_a_prune_says_what_to_do():
    layer = _layer(sink=0, n=8, scores=[0.1] * 8)
    layer.scores = None  # (as when the model ran another attention)
    with pytest.raises(StreamkvError, match=f"attn_implementation='{ATTENTION}'"):
        layer.kept(1)


def test_tova_streams_under_generate(tiny):
    model = tiny("tiny:llama").model
    saved = model.config._attn_implementation
    ids = torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(0))
    try:
        with pytest.raises(StreamkvError, match="run the model with attn_implementation"):
            model.generate(ids, past_key_values=make_cache("tova", model, cap=16, sink=2), max_new_tokens=8,
                           do_sample=False)
        model.set_attn_implementation(ATTENTION)
        cache = make_cache("tova", model, cap=16, sink=2, compress_every=4)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=30, do_sample=False)
    finally:
        model.set_attn_implementation(saved)
    assert out.shape[-1] == 50 and cache.kv_length <= 16 + 4 - 1 and cache.tokens_dropped > 0


def test_the_parallel_evaluator_refuses_tova():
    with pytest.raises(StreamkvError, match="method 'tova' runs only in the decode loop"):
        EvalParams("m", "t", "tova", evaluator="parallel").resolved()
    assert EvalParams("m", "t", "tova").resolved().sink == 4
    assert EvalParams("m", "t", "tova", sink=0).resolved().sink == 0  # what kvpress's TOVAPress keeps
