"""Batches of streams: every cache (and the recompute baseline) decodes B independent streams at once, each of
them per token as it would alone; `generate` takes a batch; the timing part times B streams at once."""

import pytest
import torch

from streamkv import make_cache
from streamkv.cache.compiled import RingDecoder
from streamkv.cache.factory import make_stepper
from streamkv.errors import StreamkvError
from streamkv.evaluation.params import EvalParams
from streamkv.evaluation.timing import batch_streams, time_interleaved
from streamkv.models import weights as W
from streamkv.models.sources import load_model

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

B, N, PREFILL, CAP = 3, 120, 16, 32

# Every cache method and the options that change its update: strict and lazy, softlite, Auto-cap overlap, refresh,
# both position modes, the strict and the lazy ring.
CACHES = [("dense", {}), ("window", {}), ("start_recent", {}), ("start_recent", {"compress_every": 8}),
          ("start_recent", {"cache_slack": 4, "max_drop": 2}), ("start_recent", {"overlap": 4}),
          ("start_recent", {"refresh": 4}), ("start_recent", {"positions": "original"}), ("mit", {}),
          ("ring", {}), ("ring", {"compress_every": 8})]


@pytest.fixture(scope="module")
def streams(hamlet_bytes):
    """B different stretches of Hamlet (tiny models read bytes), N tokens each."""
    return torch.tensor(batch_streams(hamlet_bytes, N, B))


def decode(forward, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of a prefill, then one token per forward: [batch, N, vocab]."""
    out = [forward(ids[:, :PREFILL])]
    out += [forward(ids[:, t : t + 1]).clone() for t in range(PREFILL, ids.shape[1])]
    return torch.cat(out, dim=1).log_softmax(-1)


def assert_streams_alone(run, streams):
    """Each stream of the batch equals its own single-stream run, per token, within 1e-4."""
    with torch.inference_mode():
        batch = run(streams)
        for b in range(streams.shape[0]):
            alone = run(streams[b : b + 1])[0]
            assert (batch[b] - alone).abs().max().item() < 1e-4, f"stream {b} differs from its single-stream run"


@pytest.mark.parametrize("family", ["tiny:llama", "tiny:gpt_neox"])
@pytest.mark.parametrize("method,options", CACHES, ids=[f"{m}-{'-'.join(map(str, o.values())) or 'default'}"
                                                        for m, o in CACHES])
def test_each_stream_of_a_batch_decodes_as_alone(tiny, streams, family, method, options):
    model = tiny(family).model

    def run(ids):
        cache = make_cache(method, model, cap=CAP, sink=4 if method != "window" else 0, **options)
        forward = lambda x: model(input_ids=x, past_key_values=cache, use_cache=True).logits  # noqa: E731
        out = decode(forward, ids)
        if method != "dense":  # the batch is bounded like one stream
            assert cache.kv_length <= CAP + options.get("compress_every", 1) - 1
        return out

    assert_streams_alone(run, streams)


@pytest.mark.parametrize("weights", ["int8", "int8-dynamic", "int8-fbgemm", "int8-pack", "int4"])
def test_streams_stay_independent_under_quantised_weights(streams, weights):
    """Weights quantised per channel, activations (where quantised at run time) per token: a stream's output does
    not depend on the other streams of its batch.  (bfloat16 is the exception: its products round differently for
    a batch; docs/library.md says so.)"""
    if not W.runs_here(weights):
        pytest.skip(f"{weights} needs a CPU with {W.get(weights).needs}")
    model = load_model("tiny:llama", weights=weights).model

    def run(ids):
        cache = make_cache("start_recent", model, cap=CAP, sink=4)
        return decode(lambda x: model(input_ids=x, past_key_values=cache, use_cache=True).logits, ids)

    assert_streams_alone(run, streams)


def test_the_fixed_shape_ring_step_takes_a_batch(tiny, streams):
    model = tiny("tiny:llama").model

    def run(ids):
        decoder = RingDecoder(model, make_cache("ring", model, cap=CAP, sink=4))
        out = decode(decoder, ids)
        assert decoder.cache.static  # the batch ran the fixed-shape path
        return out

    assert_streams_alone(run, streams)


def test_the_recompute_baseline_takes_a_batch(tiny, streams):
    loaded = tiny("tiny:llama")
    params = EvalParams(model="tiny:llama", text="t", method="recompute", cap=CAP, prefill=PREFILL,
                        max_tokens=N).resolved()
    assert_streams_alone(lambda ids: decode(make_stepper(loaded.model, params, loaded.source).forward, ids), streams)


@pytest.mark.parametrize("method,options", [("start_recent", {}), ("start_recent", {"compress_every": 8}),
                                            ("ring", {}), ("ring", {"compress_every": 8})])
def test_generate_with_a_batch_gives_each_prompt_its_own_stream(tiny, streams, method, options):
    model = tiny("tiny:llama").model
    prompts = streams[:, :20]  # prompts of one length: a batch of streams has no padding

    def generate(ids):
        return model.generate(ids, max_new_tokens=60, do_sample=False,
                              past_key_values=make_cache(method, model, cap=CAP, sink=4, **options))

    batch = generate(prompts)
    for b in range(B):
        assert torch.equal(batch[b], generate(prompts[b : b + 1])[0])


def test_batch_streams_are_disjoint_where_the_text_allows():
    tokens = list(range(100))
    assert batch_streams(tokens, 30, 3) == [tokens[0:30], tokens[30:60], tokens[60:90]]
    assert batch_streams(tokens, 60, 3) == [tokens[0:60], tokens[20:80], tokens[40:100]]  # overlapping, all in range
    assert batch_streams(tokens, 100, 2) == [tokens, tokens]
    assert batch_streams(tokens, 50, 1) == [tokens[:50]]


def test_the_timing_part_times_a_batch_of_streams(tiny, hamlet_bytes):
    loaded = tiny("tiny:llama")
    params = EvalParams(model="tiny:llama", text="t", method="start_recent", cap=CAP, max_tokens=2048,
                        timing_steps=32, timing_batch=4).resolved()
    seen = []
    real_forward = loaded.model.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["input_ids"].shape[0])
        return real_forward(*args, **kwargs)

    loaded.model.forward = spy
    try:
        metrics = time_interleaved(loaded, hamlet_bytes, params, params.timing_steps)
    finally:
        del loaded.model.forward
    assert set(seen) == {4}  # every forward, method's and reference's, prefill and steps, decodes 4 streams
    assert metrics["tokens_per_s"] == pytest.approx(4 * metrics["tokens_per_s_stream"])
    assert metrics["tokens_per_s_stream"] == pytest.approx(1e3 / metrics["tpot_ms"])


@pytest.mark.parametrize("change,message", [
    ({"timing_batch": 0}, "timing-batch must be >= 1"),
    ({"timing_batch": 2}, "add --timing-steps"),
    ({"timing_batch": 2, "timing_steps": 32, "method": "llamacpp:shift"}, "leave --timing-batch out"),
])
def test_bad_timing_batches_are_refused_with_the_fix(change, message):
    params = EvalParams(**{"model": "tiny:llama", "text": "t", "method": "start_recent", **change})
    with pytest.raises(StreamkvError, match=message):
        params.resolved()
