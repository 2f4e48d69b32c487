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


@needs_kvpress
@pytest.mark.parametrize("k", [1, 8])
def test_tova_press_gives_the_nll_of_the_native_tova(tiny, hamlet_bytes, k):
    """DecodingPress(TOVAPress) keeps no sinks; the native policy with sink 0 keeps the same keys, at the same
    original positions, so every NLL agrees."""
    loaded, tokens = tiny("tiny:llama"), hamlet_bytes[:400]
    peer, a = run(loaded, tokens, "kvpress:tova", k, sink=None)
    ours, b = run(loaded, tokens, "tova", k, sink=0)
    assert np.abs(a.nll.values - b.nll.values).max() <= 1e-4
    assert a.kv_len.tolist() == b.kv_len.tolist() and a.kv_len.max() == CAP + k - 1
    assert peer["metrics"]["tokens_dropped"] == ours["metrics"]["tokens_dropped"] > 0
    _, sinks = run(loaded, tokens, "tova", k)  # and the sinks matter: kept always, they change what is kept
    assert np.abs(a.nll.values - sinks.nll.values).max() > 1e-3


@needs_kvpress
@pytest.mark.parametrize("press", ["snapkv", "tova", "expected_attention", "keydiff", "observed_attention"])
def test_a_score_based_press_streams_within_its_budget(tiny, hamlet_bytes, press):
    """Each runs to the end under eviction, attends to at most cap + K - 1 keys, and keeps other tokens than
    Start+Recent with its sinks (it evicts by score, not by age)."""
    loaded, tokens, k = tiny("tiny:llama"), hamlet_bytes[:200], 8
    record, trace = run(loaded, tokens, f"kvpress:{press}", k, sink=None)
    assert record["status"] == "ok" and record["metrics"]["n_prunes"] > 0
    assert trace.kv_len.max() == CAP + k - 1
    _, recent = run(loaded, tokens, "start_recent", k, sink=record["params"]["sink"], positions="original")
    assert trace.kv_len.tolist() == recent.kv_len.tolist()
    assert np.abs(trace.nll.values - recent.nll.values).max() > 1e-3


@needs_kvpress
def test_observed_attention_runs_eager_whatever_the_model_runs(hamlet_bytes):
    """ObservedAttentionPress reads the attention weights, which only eager attention returns."""
    from streamkv import load_model

    loaded = load_model("tiny:llama", attn_implementation="sdpa")
    record, _ = run(loaded, hamlet_bytes[:60], "kvpress:observed_attention", 4, sink=None)
    assert record["status"] == "ok" and record["metrics"]["n_prunes"] > 0
    assert record["meta"]["peer_versions"]["attn_implementation"] == "eager"


@needs_kvpress
@pytest.mark.parametrize("press, k, reason", [
    ("snapkv", 1, r"AssertionError: Query length 1 should be greater than the window size 1 \(snapkv_press.py:\d+\)"),
    ("expected_attention", 4, "leaves the first n_sink=4 buffered queries out"),
])
def test_a_press_that_cannot_run_fails_with_its_reason(tiny, hamlet_bytes, press, k, reason):
    from streamkv.evaluation.loop import failure

    params = EvalParams("m", "t", f"kvpress:{press}", cap=CAP, compress_every=k, max_tokens=100, prefill=PREFILL)
    with pytest.raises(StreamkvError, match=f"the kvpress worker of 'kvpress:{press}' failed: .*{reason}") as exc:
        evaluate(tiny("tiny:llama"), hamlet_bytes[:100], params, progress=False)
    record = failure(params, exc.value)
    assert record["status"] == "failed" and f"kvpress:{press}" in record["error"]


def test_a_worker_that_dies_without_a_word_is_named(tiny, hamlet_bytes, monkeypatch, tmp_path):
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nexit 3\n")
    python.chmod(0o755)
    monkeypatch.setenv("STREAMKV_KVPRESS_PYTHON", str(python))
    with pytest.raises(StreamkvError, match=r"the kvpress worker of 'kvpress:tova' stopped: it exited with "
                                            r"status 3; its error is in the log above"):
        run(tiny("tiny:llama"), hamlet_bytes[:100], "kvpress:tova", sink=None)
