"""llama.cpp's context shift as a peer: the same embedded GGUF file, scored token by token by our decode loop.

These tests need llama-cpp-python (`make setup-llamacpp`, which `make test`
runs). Without it they are skipped, except in CI, where a missing llama.cpp is a failure.
llama.cpp runs its own kernels (the GGUF file's Q4_1 weights, F16 keys and values), so against our
float32 forward the per-token NLL differs everywhere; the tests compare each shift row with the difference of
the dense rows (the noise floor) and check llama.cpp against itself exactly.
"""

import numpy as np
import pytest

from optional_peers import needs_llamacpp
from streamkv import EvalParams, StreamkvError, evaluate
from streamkv.errors import NotInstalled
from streamkv.evaluation.loop import load_tokens

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

N, CAP, PREFILL = 400, 64, 16


@pytest.fixture(scope="session")
def runs(smollm2):
    """Each (method, options) run once per worker; the record's metrics and the trace."""
    loaded = smollm2
    tokens = load_tokens(loaded, "embedded:shakespeare/hamlet", N)
    done = {}

    def run(method, **kw):
        key = (method, tuple(sorted(kw.items())))
        if key not in done:
            kw = {"cap": CAP, "prefill": PREFILL, **kw}
            record, trace = evaluate(loaded, tokens, EvalParams("m", "t", method, max_tokens=N, **kw), progress=False)
            assert record["status"] == "ok", record["error"]
            done[key] = record["metrics"], trace
        return done[key]

    return run


def mean_dnll(a, b) -> float:
    return float(np.abs(a.nll.values - b.nll.values).mean())


@needs_llamacpp
def test_dense_llamacpp_scores_the_text_as_our_dense_does(runs):
    """Same tokens, same targets, every token's logits: only the engines' rounding differs (no off-by-one)."""
    ours, a = runs("dense")
    peer, b = runs("llamacpp:dense")
    assert abs(peer["ppl"] / ours["ppl"] - 1) < 0.02
    assert mean_dnll(a, b) < 0.1  # a target shifted by one position would differ by several nats
    assert peer["kv_len_max"] == ours["kv_len_max"] == N - 1 and peer["tokens_dropped"] == 0


@needs_llamacpp
def test_a_shift_that_never_fires_is_dense_exactly(runs):
    """With a budget the text never fills, the shift row runs the very decodes of the dense row."""
    _, a = runs("llamacpp:shift", cap=N)
    _, b = runs("llamacpp:dense")
    assert np.array_equal(a.nll.values, b.nll.values)


@needs_llamacpp
def test_strict_shift_is_mit_up_to_the_engines_noise_floor(runs):
    """n_keep = 4, n_discard = 1 keeps the tokens mit keeps: the NLL differs from mit's no more than dense from
    dense."""
    mit, a = runs("mit")
    peer, b = runs("llamacpp:shift")
    floor = mean_dnll(runs("dense")[1], runs("llamacpp:dense")[1])
    assert mean_dnll(a, b) < 1.5 * floor
    assert abs(peer["ppl"] / mit["ppl"] - 1) < 0.02
    assert peer["kv_len_max"] == CAP and peer["tokens_dropped"] == mit["tokens_dropped"] == N - 1 - CAP
    assert set(b.dropped[b.dropped > 0]) == {1}


@needs_llamacpp
def test_n_keep_is_applied(runs):
    """Without the sinks (n_keep = 0) the shift loses what attention sinks give: far worse PPL."""
    with_sinks, _ = runs("llamacpp:shift")
    without, _ = runs("llamacpp:shift", sink=0)
    assert without["ppl"] > 3 * with_sinks["ppl"]


@needs_llamacpp
def test_lazy_shift_discards_k_cells_when_the_budget_is_full(runs):
    """n_discard = K: between cap and cap + K - 1 keys once full, K tokens dropped per shift."""
    k = 8
    peer, t = runs("llamacpp:shift", compress_every=k)
    decode = t[t.step > 0]
    full = decode[decode.position >= CAP + k - 1]
    assert full.kv_len.min() == CAP and full.kv_len.max() == CAP + k - 1
    assert set(t.dropped[t.dropped > 0]) == {k}
    assert peer["tokens_dropped"] == k * ((N - 1 - CAP) // k)
    assert peer["kv_bytes_peak"] > 0


def test_a_missing_llamacpp_is_named_with_its_install_command(smollm2, monkeypatch):
    import streamkv.peers.engines

    monkeypatch.setattr(streamkv.peers.engines, "llamacpp_version", lambda: None)
    loaded, tokens = smollm2, load_tokens(smollm2, "embedded:shakespeare/hamlet", N)
    with pytest.raises(NotInstalled, match="needs llama-cpp-python, which is not installed: run `make setup-llamacpp`"):
        evaluate(loaded, tokens, EvalParams("m", "t", "llamacpp:shift", cap=CAP, max_tokens=N), progress=False)


def test_llamacpp_needs_a_gguf_model(tiny, hamlet_bytes):
    with pytest.raises(StreamkvError, match="model source 'tiny:llama' has no GGUF file, which llama.cpp runs"):
        evaluate(tiny("tiny:llama"), hamlet_bytes[:100], EvalParams("m", "t", "llamacpp:shift", cap=32, max_tokens=100),
                 progress=False)


def test_llamacpp_options_are_checked():
    with pytest.raises(StreamkvError, match="compress-every applies to .*llamacpp:shift, not to 'llamacpp:dense'"):
        EvalParams("m", "t", "llamacpp:dense", compress_every=4).resolved()
    assert EvalParams("m", "t", "llamacpp:dense", cap=32, prefill=64, max_tokens=100).resolved().sink is None
