"""kvpress as a peer: run in its own environment, scored by our decode loop, and cross-checked against our caches.

These tests need the peer environment (`make setup-kvpress`, which `make test`
runs). Without it they are skipped, except in CI, where a missing peer
environment is a failure.
"""

import numpy as np
import pytest

from optional_peers import needs_kvpress
from streamkv import EvalParams, StreamkvError, evaluate

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

CAP, SINK = 32, 4
# A prefill that is a multiple of K and leaves room for the query (<= cap - 1): kvpress compresses every K decode
# steps counted from the first, we prune at positions that are multiples of K; from this prefill on they agree.
PREFILL = 24


def run(loaded, tokens, method, k=1, sink=SINK, **kw):
    params = EvalParams("m", "t", method, cap=CAP, sink=sink, compress_every=k, max_tokens=len(tokens),
                        prefill=PREFILL, **kw)
    return evaluate(loaded, tokens, params, progress=False)


@needs_kvpress
@pytest.mark.parametrize("k", [1, 8])
def test_streaming_llm_press_gives_the_nll_of_start_recent_at_original_positions(tiny, hamlet_bytes, k):
    """kvpress keeps the kept keys where they were rotated; so does start_recent with positions='original'."""
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:400]
    peer, a = run(loaded, tokens, "kvpress:streaming_llm", k)
    ours, b = run(loaded, tokens, "start_recent", k, positions="original")
    assert np.abs(a.nll.values - b.nll.values).max() <= 1e-4
    assert a.kv_len.tolist() == b.kv_len.tolist() and a.kv_len.max() == CAP + k - 1
    assert peer["metrics"]["tokens_dropped"] == ours["metrics"]["tokens_dropped"] > 0
    # and the positions matter: the same evictions at cache positions give other NLLs
    _, shifted = run(loaded, tokens, "start_recent", k)
    assert np.abs(a.nll.values - shifted.nll.values).max() > 1e-3


@needs_kvpress
@pytest.mark.parametrize("k", [1, 8])
def test_rerotated_press_gives_the_nll_of_start_recent(tiny, hamlet_bytes, k):
    """KeyRerotationPress moves the kept keys to 0..n-1 and the query to n: StreamingLLM's pos-shift, as ours."""
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:300]
    _, a = run(loaded, tokens, "kvpress:streaming_llm+rerotate", k)
    _, b = run(loaded, tokens, "start_recent", k)
    assert np.abs(a.nll.values - b.nll.values).max() <= 1e-4


@needs_kvpress
def test_upstream_unsorted_indices_evict_other_tokens(tiny, hamlet_bytes):
    """Upstream issue #173: with an interval > 1 the unsorted press loses the age order and evicts wrongly."""
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:300]
    _, fixed = run(loaded, tokens, "kvpress:streaming_llm", 8)
    _, upstream = run(loaded, tokens, "kvpress:streaming_llm_unsorted", 8)
    assert np.abs(fixed.nll.values - upstream.nll.values).max() > 1e-3
    assert upstream.kv_len.tolist() == fixed.kv_len.tolist()  # the same budget, other tokens


@needs_kvpress
def test_a_score_based_press_keeps_the_budget(tiny, hamlet_bytes):
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:200]
    record, trace = run(loaded, tokens, "kvpress:knorm", 4, sink=None)  # no sinks: it keeps the keys of lowest norm
    assert record["status"] == "ok" and trace.kv_len.max() == CAP + 3 and record["metrics"]["n_prunes"] > 0


def test_a_missing_peer_environment_is_named(tiny, hamlet_bytes, monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMKV_KVPRESS_PYTHON", str(tmp_path / "no-python"))
    with pytest.raises(StreamkvError, match="needs kvpress, which is not installed: run `make setup-kvpress`"):
        run(tiny("tiny:llama"), hamlet_bytes[:100], "kvpress:streaming_llm")


def test_kvpress_needs_a_model_it_knows(tiny, hamlet_bytes):
    with pytest.raises(StreamkvError, match="kvpress presses hook the decoder layers at model.model"):
        run(tiny("tiny:gpt_neox"), hamlet_bytes[:100], "kvpress:streaming_llm")


def test_peer_options_are_checked():
    with pytest.raises(StreamkvError, match="cache-slack applies to start_recent, not to 'kvpress:streaming_llm'"):
        EvalParams("m", "t", "kvpress:streaming_llm", cache_slack=2).resolved()
    with pytest.raises(StreamkvError, match="positions applies to start_recent, not to 'mit'"):
        EvalParams("m", "t", "mit", positions="original").resolved()
    with pytest.raises(StreamkvError, match="unknown positions 'absolute'; choose one of: cache, original"):
        EvalParams("m", "t", "start_recent", positions="absolute").resolved()
