"""The report's sentences follow the data: each one that states a number or a property is computed from the rows,
the results' records or the GGUF file, and changes with them."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from optional_peers import needs_llamacpp
from streamkv import methods
from streamkv.analysis.cross_checks import cross_check_notes, cross_checks
from streamkv.analysis.report import render, timing_notes
from streamkv.bench.goals import LAZY, REFERENCE
from streamkv.probes.prune_overhead import prune_overhead, prune_overhead_finding
from streamkv.probes.slack import slack_effect, slack_finding

TEMPLATE = Path(__file__).resolve().parents[1] / "report" / "templates" / "paper_tables.md.j2"
CAP = 256


def config(peers=()) -> dict:
    return {"models": {"m": "embedded:smollm2-135m"}, "texts": {"t": {"source": "embedded:shakespeare/hamlet"}},
            "protocol": {"cap": CAP, "max_tokens": 1024, "prefill": CAP, "dtype": "float32", "device": "cpu",
                         "seed": 0, "evaluator": "auto", "timing_steps": 64},
            "baseline": {"sink": 4, "stride": 1}, "stats": {"block": 64, "n_boot": 100, "seed": 0, "level": 0.95},
            "diagnostics": {"spike_horizon": 32, "spike_threshold": 0.1}, "peers": list(peers)}


def row(name, method, group="methods", **kw) -> dict:
    """One summary row, finished, with the columns the report reads."""
    base = {"model_key": "m", "text_key": "t", "group": group, "name": name, "order": 0, "method": method,
            "status": "ok", "error": None, "sink": 4, "window": CAP - 4, "compress_every": 1, "cache_slack": 0,
            "max_drop": 0, "softlite_mode": "naive", "positions": "cache", "overlap": 0, "refresh": 0, "cap": CAP,
            "prefill": CAP, "max_tokens": 1024, "ppl": 10.0, "delta_ppl_pct": 1.0, "delta_ppl_lo": 0.5,
            "delta_ppl_hi": 1.5, "n_scored": 1023, "tpot_ms": 5.0, "tpot_steady_ms": 5.0, "tpot_ratio": 1.01,
            "tpot_ref_ms": 4.95, "speedup": 9.0, "kv_len_min": CAP, "kv_len_mean": float(CAP), "kv_len_max": CAP,
            "kv_bytes_peak": 2**20, "n_prunes": 0, "tokens_dropped": 0, "n_emergency_prunes": 0,
            "n_forced_prunes": 0, "file": f"/nonexistent/{name}.json", "evaluator": "decode", "spike_events": 0,
            "spike_peak": np.nan, "spike_width": np.nan, "spike_area": np.nan, "meta_peer_versions": None}
    return {**base, **kw}


def frame(*rows) -> pd.DataFrame:
    return pd.DataFrame([row("Baseline", "recompute", group="baseline", tpot_ms=45.0), *rows])


COMPARED = pd.DataFrame(columns=["model_key", "text_key", "kind", "group", "claim", "a", "b", "text", "verdict", "n"])


def report(rows, peers=(), bench=None, cfg=None) -> str:
    return render(frame(*rows), TEMPLATE, cfg or config(peers), bench, COMPARED)


def write_trace(tmp_path, name, nll) -> str:
    """A result file name whose per-token trace holds `nll`; the report reads the trace beside it."""
    file = tmp_path / f"{name}.json"
    pd.DataFrame({"position": np.arange(len(nll)), "nll": nll}).to_parquet(tmp_path / f"{name}.parquet")
    return str(file)


# ----------------------------------------------------------------------------- the GGUF file's weight type


def write_gguf(path, file_type=None, tensors=(("w", np.float32, (64, 64)),)):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    if file_type is not None:
        writer.add_file_type(int(file_type))
    for name, dtype, shape in tensors:
        writer.add_tensor(name, np.zeros(shape, dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_gguf_file_type_is_read_from_the_file(tmp_path):
    import gguf

    from streamkv.peers.engines import gguf_file_type

    assert gguf_file_type(write_gguf(tmp_path / "a.gguf", gguf.LlamaFileType.MOSTLY_Q8_0)) == "Q8_0"
    assert gguf_file_type(write_gguf(tmp_path / "b.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M)) == "Q4_K_M"
    assert gguf_file_type(write_gguf(tmp_path / "c.gguf", gguf.LlamaFileType.ALL_F32)) == "F32"
    # without the key: the type that holds most of the weights' elements
    mixed = [("big", np.float16, (128, 64)), ("norm", np.float32, (64,)), ("bias", np.float32, (64,))]
    assert gguf_file_type(write_gguf(tmp_path / "d.gguf", None, mixed)) == "F16"
    assert gguf_file_type(tmp_path / "missing.gguf") is None


@needs_llamacpp
def test_the_llamacpp_peer_records_what_the_report_says_of_it():
    from streamkv.models.sources import gguf_path
    from streamkv.peers.engines import LlamaCppStepper, gguf_file_type

    path = gguf_path("embedded:smollm2-135m")
    stepper = LlamaCppStepper(path, "llamacpp:shift", cap=64, sink=4, compress_every=8, max_tokens=128)
    try:
        versions = stepper.versions
    finally:
        stepper.close()
    assert versions["gguf_type"] == gguf_file_type(path) is not None
    assert versions["kv_cache"] == "f16" and versions["kv_budget"] == 64 + 8 - 1
    assert versions["kv_cells"] >= versions["kv_budget"]


def llamacpp_rows(meta):
    return [row("llama.cpp context shift", "llamacpp:shift", group="peers", meta_peer_versions=meta),
            row("llama.cpp dense", "llamacpp:dense", group="peers", meta_peer_versions=meta)]


@pytest.mark.parametrize("weights", ["Q8_0", "Q4_K_M"])
def test_the_llamacpp_sentence_names_the_recorded_weight_type(weights):
    meta = {"gguf": "model.gguf", "gguf_type": weights, "kv_cache": "f16", "kv_cells": 263, "kv_budget": 263}
    text = report(llamacpp_rows(meta))
    assert f"with its own kernels, {weights} weights (the GGUF file's type) and a KV cache in F16" in text
    assert "4-bit" not in text and "quantised activations" not in text
    assert "llama.cpp context shift: 263 cells for a budget of 263" in text
    assert "against our float32 recompute" in text


def test_an_unknown_weight_type_is_not_guessed():
    text = report(llamacpp_rows(None))
    assert "with its own kernels and its own weight format" in text and "4-bit" not in text
    # the dtype is the protocol's, not a constant
    cfg = config()
    cfg["protocol"]["dtype"] = "bfloat16"
    assert "against our bfloat16 recompute" in report(llamacpp_rows(None), cfg=cfg)


# ----------------------------------------------------------------------------- cross-checks: prefill below the cap


def kvpress_check(tmp_path, prefill, dnll):
    nll = np.linspace(1.0, 3.0, 100)
    rows = [row("kvpress StreamingLLM", "kvpress:streaming_llm", group="peers", prefill=prefill,
                file=write_trace(tmp_path, "peer", nll + dnll)),
            row("Ours (original positions)", "start_recent", positions="original", prefill=prefill,
                file=write_trace(tmp_path, "ours", nll))]
    spec = [{"name": "kvpress StreamingLLM", "method": "kvpress:streaming_llm",
             "cross_check": "Ours (original positions)"}]
    return rows, spec


def test_a_cross_check_below_the_cap_states_its_measured_difference(tmp_path):
    dnll = np.zeros(100)
    dnll[40] = 3e-6
    rows, spec = kvpress_check(tmp_path, prefill=CAP // 2, dnll=dnll)
    text = report(rows, spec)
    assert ("With a prefill below the cap, kvpress and our row differ by at most 3.0e-06 in NLL (within the 1e-4 "
            "tolerance): kvpress StreamingLLM (prefill 128, cap 256).") in text
    assert "float rounding" not in text and "not measured here" not in text
    assert "| 0 of 100 | none |" in text


def test_without_such_a_cross_check_the_claim_is_the_test_suites(tmp_path):
    dnll = np.zeros(100)
    dnll[10:] = 2e-3
    rows, spec = kvpress_check(tmp_path, prefill=CAP, dnll=dnll)
    text = report(rows, spec)
    assert "no cross-check of this run has such a prefill, so it is not measured here" in text
    assert ("the states that step leaves in the cache differ from ours until the cross-check ends (max |ΔNLL| "
            "2.0e-03 over 1 such cross-check)") in text
    assert "float rounding" not in text
    assert "| 90 of 100 | 10 |" in text


def test_the_llamacpp_noise_floor_counts_the_differing_targets(tmp_path):
    nll = np.linspace(1.0, 3.0, 50)
    dnll = np.where(np.arange(50) % 2 == 0, 0.05, 0.0)
    rows = [row("llama.cpp dense", "llamacpp:dense", group="peers", file=write_trace(tmp_path, "ld", nll + dnll)),
            row("Dense (no eviction)", "dense", file=write_trace(tmp_path, "d", nll))]
    spec = [{"name": "llama.cpp dense", "method": "llamacpp:dense", "cross_check": "Dense (no eviction)"}]
    checks = cross_checks(frame(*rows), config(spec))
    (note,) = cross_check_notes(checks, "float32")
    assert note.startswith("llama.cpp's NLLs differ from our float32 forward's by more than 1e-4 at 25 of 50 targets")
    assert "every token" not in note


# ----------------------------------------------------------------------------- the timing reference's KV length


def test_lazy_rows_state_the_keys_they_attend_against_the_references_cap():
    lazy = row("Ours (lazy K=32)", "start_recent", compress_every=32, kv_len_min=CAP, kv_len_mean=271.5,
               kv_len_max=CAP + 31)
    text = report([row("Ours (strict)", "start_recent"), lazy])
    assert "at the same KV length" not in text
    assert "over a cache of exactly cap keys" in text
    assert ("The timing reference (× ref) attends to cap = 256 keys at every step; rows that attend to another "
            "number (KV len over their evaluation): Ours (lazy K=32) 256 to 287 keys, mean 271.5.") in text
    assert "Ours (strict) 256" not in text
    # strict rows only: nothing to list
    text = report([row("Ours (strict)", "start_recent")])
    assert "every timed row attends to cap keys as well" in text


# ----------------------------------------------------------------------------- drift of step times


def bench_result() -> dict:
    over = [{"cap": CAP, "method": REFERENCE, "tpot_ms": 5.0, "overhead": 1.0, "overhead_lo": 1.0, "overhead_hi": 1.0,
             "speedup": 9.0, "speedup_lo": 8.8, "speedup_hi": 9.2, "met": None, "goal": None},
            {"cap": CAP, "method": LAZY, "tpot_ms": 5.1, "overhead": 1.02, "overhead_lo": 1.0, "overhead_hi": 1.04,
             "speedup": 8.8, "speedup_lo": 8.6, "speedup_hi": 9.0, "met": None, "goal": None},
            {"cap": CAP, "method": "ring", "tpot_ms": 5.0, "overhead": 1.0, "overhead_lo": 0.99, "overhead_hi": 1.01,
             "speedup": 9.0, "speedup_lo": 8.8, "speedup_hi": 9.2, "met": None, "goal": None},
            {"cap": CAP, "method": "ring lazy", "tpot_ms": 5.0, "overhead": 1.0, "overhead_lo": 0.97,
             "overhead_hi": 1.03, "speedup": 9.0, "speedup_lo": 8.8, "speedup_hi": 9.2, "met": None, "goal": None}]
    return {"config": {"model_key": "m", "text_key": "t", "compress_every": 8}, "overhead": over, "compile": [],
            "memory": [], "evaluator": [{"cap": CAP, "method": "ring", "tokens": 512, "parallel_tok_s": 900.0,
                                         "decode_tok_s": 30.0, "speedup": 30.0, "nll_max_abs_diff": 2.5e-6}]}


def test_the_drift_is_cited_from_the_run():
    rows = [row("Ours (strict)", "start_recent", tpot_ref_ms=5.0), row("Ours (ring)", "ring", tpot_ref_ms=5.5,
                                                                        file="/nonexistent/ring.json")]
    text = report(rows, bench=[bench_result()])
    assert "drift far less" not in text and "about 10 %" not in text and "cancels" not in text
    assert ("the no-eviction reference's TPOT, timed again in each of 3 jobs on the same forward (m, cap 256), "
            "ranged from 4.95 to 5.50 ms (+11.1 %)") in text
    # the bench's intervals, half-widths relative to the ratio (the reference's own, 1 exactly, left out)
    assert "±2.0 % of the ratio at the median and ±3.0 % at the widest (3 ratios)" in text
    assert "the Performance section's check measures a max |ΔNLL| of 2.5e-06 against the decode loop" in text


def test_the_block_size_is_the_timing_parts(monkeypatch):
    monkeypatch.setattr("streamkv.analysis.report.TIMING_BLOCK", 16)
    assert "the median over blocks of 16 steps of the block mean" in report([row("Ours (strict)", "start_recent")])


def test_without_timings_nothing_is_claimed_about_the_drift():
    notes = timing_notes(frame().assign(tpot_ref_ms=float("nan")), [])
    assert notes["drift"] == notes["bench_width"] == notes["evaluator"] == ""
    assert "not re-measured in this run" in report([])


# ----------------------------------------------------------------------------- the slack probe compares positions


def slack_rows(staged_events):
    """A control (delta = 0) and a staged run (delta = 4) at sigma = 2, and their prune events."""
    part = pd.DataFrame([row("c", "start_recent", group="probe:verify_slack_effect", cache_slack=2, max_drop=0,
                             compress_every=8, n_prunes=3, tokens_dropped=24, file="c"),
                         row("s", "start_recent", group="probe:verify_slack_effect", cache_slack=2, max_drop=4,
                             compress_every=8, n_prunes=len(staged_events),
                             tokens_dropped=sum(d for _, d in staged_events), file="s")])
    control = [(264, 8), (272, 8), (280, 8)]
    events = pd.DataFrame([{"file": f, "position": p, "dropped": d}
                           for f, ev in (("c", control), ("s", staged_events)) for p, d in ev])
    return part, events


def finding_after_csv(tmp_path, part, events) -> str:
    """The finding as the report computes it: from the probe's table, read back from its CSV."""
    path = tmp_path / "slack.csv"
    slack_effect(part, events).to_csv(path, index=False)
    return slack_finding(pd.read_csv(path))


def test_the_slack_finding_says_same_tokens_only_when_the_positions_agree(tmp_path):
    part, events = slack_rows([(264, 8), (272, 8), (280, 8)])
    text = finding_after_csv(tmp_path, part, events)
    assert text.startswith("In 1 of 1 pairs the staged run (δ > 0) dropped the same tokens at the same decode steps")


def test_the_same_drop_sizes_at_other_steps_are_not_the_same_tokens(tmp_path):
    # the same sizes in the same order, one step later each: other tokens are gone at each step
    part, events = slack_rows([(265, 8), (273, 8), (281, 8)])
    text = finding_after_csv(tmp_path, part, events)
    assert text.startswith("In 0 of 1 pairs") and "they first differ at position 264 (σ=2, naive)" in text


def test_a_different_split_of_the_same_drops_differs_where_it_splits(tmp_path):
    part, events = slack_rows([(264, 8), (272, 4), (276, 4), (280, 8)])
    assert "they first differ at position 272" in finding_after_csv(tmp_path, part, events)


def test_prune_events_that_miss_prunes_are_not_compared(tmp_path):
    part, events = slack_rows([(264, 8), (272, 8), (280, 8)])
    text = finding_after_csv(tmp_path, part, events[events.file == "c"])  # the staged run's events are missing
    assert text.startswith("Which tokens the runs dropped could not be compared")


def test_the_prune_overhead_finding_keeps_the_sign():
    part = pd.DataFrame([row("k1", "start_recent", compress_every=1, update_ms_mean=0.2, update_ms_prune=0.15,
                             update_ms_noprune=0.25),
                         row("k8", "start_recent", compress_every=8, update_ms_mean=0.1, update_ms_prune=0.3,
                             update_ms_noprune=0.05)])
    text = prune_overhead_finding(prune_overhead(part))
    assert "minus that of a step without one: -0.10 to +0.25 ms" in text and "more" not in text


# ----------------------------------------------------------------------------- KV bytes: measured or computed


def test_the_registry_says_how_kv_bytes_are_known():
    computed = {m.name for m in methods.REGISTRY.values() if m.kv_bytes == "computed"}
    assert computed == {"recompute", *methods.names(family="kvpress"), *methods.names(family="llamacpp")}
    assert {m.kv_bytes for m in methods.REGISTRY.values()} == {"measured", "computed"}


def test_computed_kv_bytes_are_marked_and_explained():
    text = report([row("Ours (strict)", "start_recent", kv_bytes_peak=3 * 2**20)])
    assert "| 256 / 256.0 / 256 | 1.00† |" in text  # the baseline (recompute): computed
    assert "| 256 / 256.0 / 256 | 3.00 |" in text  # ours: measured
    assert "† KV MiB computed, not measured: recompute keeps no cache" in text
    assert "Unmarked KV MiB values are measured" in text
    assert "kvpress cache lives in its worker" not in text  # no kvpress row here


# ----------------------------------------------------------------------------- intervals that say what they are


def test_cells_say_identical_or_too_few_targets_instead_of_a_point_interval():
    text = report([row("Ours (strict)", "start_recent", delta_ppl_pct=0.0, delta_ppl_lo=0.0, delta_ppl_hi=0.0,
                       delta_ppl_status="identical", n_paired=1023),
                   row("Ours (original positions)", "start_recent", positions="original", delta_ppl_pct=-0.26,
                       delta_ppl_lo=np.nan, delta_ppl_hi=np.nan, delta_ppl_status="too few", n_paired=64)])
    assert "| identical |" in text
    assert "| -0.26 (too few targets for an interval, n = 64) |" in text
    assert "[-0.26, -0.26]" not in text and "[+0.00, +0.00]" not in text


def test_the_reference_column_and_the_ratio_interval_are_shown():
    cfg = {**config(), "reference": "Ours (strict)"}
    text = report([row("Ours (strict)", "start_recent", delta_ref_pct=0.0, delta_ref_lo=0.0, delta_ref_hi=0.0,
                       delta_ref_status="identical", n_ref=1023),
                   row("Ours (lazy K=32)", "start_recent", compress_every=32, delta_ref_pct=-0.8, delta_ref_lo=-1.1,
                       delta_ref_hi=-0.5, delta_ref_status="ok", n_ref=1023, tpot_ratio=0.95, tpot_ratio_lo=0.93,
                       tpot_ratio_hi=0.97)], cfg=cfg)
    assert "vs Ours (strict): PPL % [95 % CI]" in text
    assert "| -0.80 [-1.10, -0.50] |" in text and "| 0.950 [0.930, 0.970] |" in text


def test_a_cross_check_compares_the_ppls_on_the_common_targets_only(tmp_path):
    """A peer over the first 767 targets against our row over 2,047 whose NLLs agree on those 767: identical, not
    the PPL difference of two different stretches of text."""
    nll = np.linspace(1.0, 5.0, 2047)
    rows = [row("kvpress StreamingLLM", "kvpress:streaming_llm", group="peers", ppl=float(np.exp(nll[:767].mean())),
                file=write_trace(tmp_path, "peer", nll[:767])),
            row("Ours (original positions)", "start_recent", positions="original", ppl=float(np.exp(nll.mean())),
                file=write_trace(tmp_path, "ours", nll))]
    spec = [{"name": "kvpress StreamingLLM", "method": "kvpress:streaming_llm",
             "cross_check": "Ours (original positions)"}]
    (check,) = cross_checks(frame(*rows), config(spec))
    assert check["dppl"] == "identical" and check["n"] == 767
    shifted = nll[:767] + np.where(np.arange(767) % 3 == 0, 0.01, 0.0)
    rows[0]["file"] = write_trace(tmp_path, "peer2", shifted)
    (check,) = cross_checks(frame(*rows), config(spec))
    assert check["dppl"].startswith("+0.33 % (too few targets for an interval, n = 767)")  # 12 blocks of 64


# ----------------------------------------------------------------------------- a second model


def two_models() -> dict:
    cfg = config()
    cfg["models"] = {"m": "embedded:smollm2-135m",
                     "g": {"source": "embedded:gemma3-270m", "texts": ["t"], "max_tokens": 512}}
    cfg["findings"] = [
        {"claim": "sinks matter", "group": "ablation:sink", "a": {"sink": 0}, "b": {"sink": 4}, "expect": "higher"},
        {"claim": "sinks in the sliding layers change nothing", "group": "ablation:sink_layers",
         "a": {"sink_layers": "all"}, "b": {"sink_layers": "global"}, "expect": "equivalent", "margin": 1.0,
         "models": ["g"]}]
    return cfg


def finding(model, claim, expect, verdict, a="x", b="y") -> dict:
    """A finding's row as `summary.comparisons` writes it: p-values of a clear difference the claimed way
    (verdict "higher"), of none ("not distinguishable from zero"), or of identical NLLs."""
    p = {"higher": (0.001, 0.999), "not distinguishable from zero": (0.3, 0.7)}.get(verdict, (0.0, 1.0))
    return {"model_key": model, "text_key": "t", "kind": "finding", "group": "g", "claim": claim, "expect": expect,
            "margin": 1.0 if expect == "equivalent" else float("nan"), "a": a, "b": b, "status": "ok",
            "pct_lo": 0.5, "pct_hi": 1.5, "level": 0.95, "p": p[0], "p_opposite": p[1],
            "text": "+1.00 [+0.50, +1.50]", "verdict": verdict, "n": 500}


def test_with_two_models_the_report_says_per_model_which_findings_hold():
    compared = pd.DataFrame([finding("m", "sinks matter", "higher", "higher"),
                             finding("m", "sinks matter", "higher", "higher", a="z"),
                             finding("g", "sinks matter", "higher", "not distinguishable from zero"),
                             finding("g", "sinks in the sliding layers change nothing", "equivalent", "identical")])
    rows = [row("Ours (strict)", "start_recent"),
            row("Baseline", "recompute", group="baseline", model_key="g", max_tokens=512),
            row("Ours (strict)", "start_recent", model_key="g", max_tokens=512),
            row("Ours (sinks in all layers)", "start_recent", model_key="g", max_tokens=512, sink_layers="all")]
    text = render(frame(*rows), TEMPLATE, two_models(), None, compared)
    table = text.split("## The study's conclusions, per model", 1)[1].split("\n## ", 1)[0]
    assert "| Claim | Expected | m | g |" in table
    assert "| sinks matter | a higher PPL | holds (2 pairs; t) | not shown (1 pair; t) |" in table
    assert ("| sinks in the sliding layers change nothing | the same PPL within ±1 % (equivalence) | – | "
            "equivalent (1 pair; t) |") in table
    # the sections in the config's order of the models; the second one's tokens under its ceiling, said so
    assert text.index("## t — m") < text.index("## t — g")
    assert "(N = 1024 tokens), model `embedded:smollm2-135m`." in text
    assert "(N = 512 tokens, the ceiling `models.g.max_tokens`:\nno row here uses more), model `embedded:gemma3-270m`" \
        in text
    assert "| Ours (sinks in all layers) | S=4, W=252, sinks in all layers |" in text


def test_with_one_model_there_is_no_table_of_models():
    compared = pd.DataFrame([finding("m", "sinks matter", "higher", "higher")])
    text = render(frame(row("Ours (strict)", "start_recent")), TEMPLATE, {**config(), "findings": two_models()[
        "findings"][:1]}, None, compared)
    assert "per model" not in text and "**sinks matter** (expected: a higher PPL) — holds" in text


def test_a_row_that_takes_another_rows_nlls_says_so():
    """Strict mit and ring share strict start_recent's evaluation (one schedule): their NLLs column names it, so a
    reader does not take "identical" for an agreement measured on the model."""
    from streamkv.analysis.rows import table_rows

    own = {"method": "start_recent", "overlap": 0, "evaluator": "parallel"}
    rows = table_rows(pd.DataFrame([
        row("Ours (strict)", "start_recent", evaluator="parallel", meta_nll_params=own),
        row("MIT StreamingLLM", "mit", evaluator="parallel", meta_nll_params=own),
        row("Ours (overlap O=8)", "start_recent", overlap=8, evaluator="parallel", meta_nll_params=own),
        row("Ours (refresh)", "start_recent", evaluator="decode", meta_nll_params=None)]))
    cells = {r["name"]: r["evaluator"] for r in rows}
    assert cells == {"Ours (strict)": "parallel", "MIT StreamingLLM": "parallel, start_recent's NLLs",
                     "Ours (overlap O=8)": "parallel, start_recent O=0's NLLs", "Ours (refresh)": "decode"}
