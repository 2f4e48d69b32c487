"""The recall probe: its streams put the passage and the pass key at the intended distances (per tokenizer), the
batched scorer agrees with the decode loop, its intervals are never zero-width by accident, and its config errors
name the key."""

import copy

import numpy as np
import pandas as pd
import pytest
import yaml

from optional_peers import needs_kvpress
from streamkv.analysis import recall_jobs
from streamkv.errors import StreamkvError
from streamkv.evaluation import recall
from streamkv.evaluation.params import EvalParams
from streamkv.evaluation.streams import score_streams
from streamkv.models.sources import SMOLLM2_GGUF, ByteTokenizer, embedded_model_dir, encode
from streamkv.models.texts import load_text
from streamkv.probes import STREAM_PROBES

SPEC = {**recall.DEFAULTS, "cap": 32, "instances": 20, "passage_tokens": 12, "prefix_tokens": 8}


def _tokenizers():
    from transformers import AutoTokenizer

    return {"bytes": ByteTokenizer(), "smollm2": AutoTokenizer.from_pretrained(embedded_model_dir(),
                                                                               gguf_file=SMOLLM2_GGUF)}


@pytest.fixture(scope="module", params=["bytes", "smollm2"])
def built(request):
    tok = _tokenizers()[request.param]
    filler = encode(tok, load_text("embedded:shakespeare/hamlet"))
    passages = encode(tok, load_text(SPEC["passages"]))
    return tok, filler, passages, recall.build(tok, filler, passages, SPEC)


def test_the_copy_lands_at_its_distance(built):
    tok, filler, passages, batches = built
    p, pre, n = SPEC["passage_tokens"], SPEC["prefix_tokens"], SPEC["instances"]
    copies = [b for b in batches if b["task"] == "copy"]
    assert [b["distance"] for b in copies] == recall.distances(SPEC) == [16, 32, 64, 256]
    first_of = {}
    for b in copies:
        d, ids = b["distance"], b["ids"]
        assert ids.shape == (2 * n, pre + 2 * p + d)  # one length per batch: the copies, then the controls
        for row in range(n):
            stream, control = ids[row].tolist(), ids[n + row].tolist()
            passage = stream[pre : pre + p]
            assert stream[pre + p + d : pre + 2 * p + d] == passage  # D tokens strictly between the two
            assert control[pre + p + d :] == passage and control[pre : pre + p] != passage  # a decoy instead
            assert control[:pre] == stream[:pre] and control[pre + p :] == stream[pre + p :]
            assert _is_slice(passage, passages) and _is_slice(control[pre : pre + p], passages)
            assert _is_slice(stream[pre + p : pre + p + d], filler)
            first_of.setdefault(row, passage)
            assert first_of[row] == passage  # an instance keeps its passage across D
        targets = b["targets"][0]
        assert targets.tolist() == list(range(pre + p + d + 1, pre + 2 * p + d))  # the second copy, its first left out


def test_the_pass_key_lands_at_its_distance(built):
    tok, filler, passages, batches = built
    question = encode(tok, recall.QUESTION)
    for b in (b for b in batches if b["task"] == "passkey"):
        d, ids = b["distance"], b["ids"]
        assert len({len(r) for r in ids}) == 1
        for row, targets in zip(ids.tolist(), b["targets"]):
            text = tok.decode(row[targets[0] - len(question) - 1 :])
            key = "".join(tok.decode([row[t]]) for t in targets).strip()
            assert len(key) == 5 and key.isdigit() and key in text
            needle = encode(tok, recall.NEEDLE.format(key=key))
            answer = encode(tok, recall.ANSWER.format(key=key))
            q0 = len(row) - len(answer) - len(question)  # where the question starts
            assert row[q0 : q0 + len(question)] == question and row[q0 + len(question) :] == answer
            n0 = q0 - d - len(needle)  # the needle ends D tokens before the question
            assert row[n0 : n0 + len(needle)] == needle and n0 >= SPEC["prefix_tokens"]
            assert _is_slice(row[n0 + len(needle) : q0], filler)


def _is_slice(part: list[int], whole: list[int]) -> bool:
    n = len(part)
    first = part[0]
    return any(whole[i : i + n] == part for i in np.flatnonzero(np.asarray(whole) == first))


def test_the_streams_are_seeded():
    tok = ByteTokenizer()
    filler, passages = encode(tok, load_text("embedded:shakespeare/hamlet")), encode(tok, load_text(SPEC["passages"]))
    a, b = recall.build(tok, filler, passages, SPEC), recall.build(tok, filler, passages, SPEC)
    c = recall.build(tok, filler, passages, {**SPEC, "seed": 1})
    assert all((x["ids"] == y["ids"]).all() for x, y in zip(a, b))
    assert not all((x["ids"] == y["ids"]).all() for x, y in zip(a, c))


def test_batched_streams_score_as_the_decode_loop(tiny):
    """The parallel evaluator over a batch, and the stepper fed a batch, give each stream the decode loop's NLLs."""
    from streamkv.evaluation.loop import evaluate

    loaded = tiny("tiny:llama")
    tok = loaded.tokenizer
    batches = recall.build(tok, encode(tok, load_text("embedded:shakespeare/hamlet")),
                           encode(tok, load_text(SPEC["passages"])), SPEC)
    ids = batches[2]["ids"][::8]  # copy streams at D = cap, and their controls
    for method, extra in (("start_recent", {"compress_every": 4}), ("window", {}), ("dense", {})):
        params = EvalParams(model="tiny:llama", text="x", method=method, cap=32, **extra)
        par = score_streams(loaded, ids, EvalParams(**{**vars(params), "evaluator": "parallel"}))
        dec = score_streams(loaded, ids, params)
        assert np.abs(par[0] - dec[0]).max() < 1e-4 and (par[1] == dec[1]).mean() > 0.99
        # the one decode loop, on one stream of the batch
        _, trace = evaluate(loaded, ids[1].tolist(), EvalParams(**{**vars(params), "max_tokens": ids.shape[1]}),
                            progress=False)
        assert np.abs(trace.nll.to_numpy() - dec[0][1]).max() < 1e-4


@pytest.mark.parametrize("method, extra", [
    ("tova", {"compress_every": 4}),
    pytest.param("kvpress:tova", {"compress_every": 4, "sink": None}, marks=needs_kvpress),
    pytest.param("kvpress:snapkv", {"compress_every": 4, "sink": None}, marks=needs_kvpress),
])
def test_score_based_rows_evict_each_stream_of_a_batch_by_its_own_scores(tiny, method, extra):
    """A batch through the stepper (native) or the kvpress worker scores each stream as it would alone: the
    scores, and so the keys kept, are per stream."""
    loaded = tiny("tiny:llama")
    tok = loaded.tokenizer
    batches = recall.build(tok, encode(tok, load_text("embedded:shakespeare/hamlet")),
                           encode(tok, load_text(SPEC["passages"])), SPEC)
    ids = batches[2]["ids"][:3]
    params = EvalParams(model="tiny:llama", text="x", method=method, cap=32, **extra)
    together = score_streams(loaded, ids, params)
    for b in range(len(ids)):
        alone = score_streams(loaded, ids[b : b + 1], params)
        assert np.abs(together[0][b] - alone[0][0]).max() < 1e-4
    assert np.abs(together[0][0] - together[0][1]).max() > 1e-2  # different streams, different scores


def _instances(gains, exact, name="A"):
    n = len(gains)
    copy_rows = pd.DataFrame({"task": "copy", "distance": 64, "instance": range(n), "gain": gains})
    key_rows = pd.DataFrame({"task": "passkey", "distance": 64, "instance": range(n), "exact": exact, "nll": 1.0})
    return pd.concat([copy_rows, key_rows]).assign(name=name, status="ok", error=None)


def test_the_table_gives_no_zero_width_interval_by_accident():
    probe = STREAM_PROBES["recall"]
    rng = np.random.default_rng(0)
    frame = pd.concat([_instances(rng.normal(0.5, 0.2, 20), [False] * 20, "A"),
                       _instances(np.zeros(20), [True] * 20, "B"),
                       pd.DataFrame({"distance": [None], "task": [None], "name": "C", "status": "failed",
                                     "error": "RuntimeError: boom"})])
    t = probe.table(frame, cap=32)
    a, b, c = (t[t.name == x].iloc[0] for x in "ABC")
    assert a.gain_lo < a.gain < a.gain_hi and a.gain_status == "ok"
    assert (a.exact, a.rate_lo) == (0, 0.0) and 0.15 < a.rate_hi < 0.17  # 0 of 20: Wilson, not [0, 0]
    assert b.gain_status == "identical" and b.rate_hi == 1.0 and 0.83 < b.rate_lo < 0.85
    assert c.status == "failed" and "boom" in c.error
    md = probe.markdown(t[t.status == "ok"])
    assert "identical" in md and "0/20 [0.00, 0.16]" in md
    text = probe.finding(t.assign(d_cap=2.0), "A")
    assert text.endswith("A +0.46 [+0.38, +0.54]; B identical.")  # (no reference given to the table: no pairs)


def test_rows_are_compared_with_the_reference_on_the_same_instances():
    """Every row scores the same seeded instances: copy gain is compared pair by pair (an interval narrower than
    either row's own, as the instances' difficulty cancels), the pass key by McNemar's exact test on discordant
    pairs, with Holm over the rows."""
    probe = STREAM_PROBES["recall"]
    rng = np.random.default_rng(1)
    hard = rng.normal(0.0, 1.0, 20)  # each instance's own difficulty, shared by every row
    frame = pd.concat([_instances(hard, [False] * 20, "Ref"),
                       _instances(hard + 0.3 + rng.normal(0, 0.05, 20), [True] * 12 + [False] * 8, "Better"),
                       _instances(hard + rng.normal(0, 0.05, 20), [False] * 19 + [True], "Same")])
    t = probe.table(frame, cap=32, reference="Ref").set_index("name")
    better, same = t.loc["Better"], t.loc["Same"]
    assert better.vs_ref_gain_lo > 0.2 and better.vs_ref_gain_hi < 0.4  # paired: about +0.3 +- 0.03
    assert better.gain_hi - better.gain_lo > 5 * (better.vs_ref_gain_hi - better.vs_ref_gain_lo)
    assert (better.key_keeps, better.key_loses) == (12, 0) and better.key_p == pytest.approx(2 / 2 ** 12)
    assert (same.key_keeps, same.key_loses, same.key_p) == (1, 0, 1.0)
    assert np.isnan(t.loc["Ref"].get("key_p", np.nan))
    text = probe.finding(t.reset_index().assign(d_cap=2.0), "Ref")
    assert "Better keeps 12, loses 0 (p = 0.00049)" in text and "a difference shown for Better (Holm" in text
    assert "Same keeps 1, loses 0 (p = 1)" in text
    from streamkv.probes.recall import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(5, 0) == pytest.approx(1 / 16)


def _smoke():
    """config/smoke.yaml as the pipeline sees it: validated, the schema's defaults filled in."""
    from pathlib import Path

    from snakemake.utils import validate

    root = Path(__file__).resolve().parents[1]
    config = yaml.safe_load((root / "config/smoke.yaml").read_text())
    validate(config, str(root / "config/schema.yaml"))
    return config


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(rows=["Nope"]), "recall.rows[0]: 'Nope' is no row"),
    (lambda r: r.update(instances=5), "recall.instances: 5 instances give no interval"),
    (lambda r: r.update(model="other"), "recall.model: unknown 'other'"),
    (lambda r: r.update(distances=[1, 1.01]), "recall.distances"),
    (lambda r: r.update(prefix_tokens=2), "keeps 4 sinks, more than recall.prefix_tokens (2)"),
])
def test_bad_recall_keys_name_the_key(change, message):
    config = copy.deepcopy(_smoke())
    change(config["recall"])
    with pytest.raises(StreamkvError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        recall_jobs.jobs(config)


def test_every_recall_row_runs_at_the_probe_cap_with_its_own_parameters():
    jobs = recall_jobs.jobs(_smoke())
    names = {job["name"]: job["eval"] for job in jobs.values()}
    assert len(jobs) == len(_smoke()["recall"]["rows"])
    assert {p["cap"] for p in names.values()} == {16}
    assert names["Ours (lazy K=8)"]["compress_every"] == 8 and names["Ours (strict)"]["compress_every"] == 1
