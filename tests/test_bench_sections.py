"""`streamkv bench` keeps every finished section: a failed one is recorded with its error, the others still run,
and the result file holds each section as soon as it finishes."""

import json

import numpy as np
import pytest

from streamkv.bench import run as bench
from streamkv.bench.goals import REFERENCE
from streamkv.bench.tables import bench_failures, bench_findings, bench_markdown
from streamkv.cli import main
from streamkv.errors import StreamkvError
from streamkv.evaluation.params import BenchConfig

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

FAST = dict(caps=(48,), compress_every=8, blocks=1, block=8, warmup=1, compile=False, stream_tokens=100,
            rss_from=60, stream_methods=("ring",), evaluator_tokens=120, weights=("bfloat16",), weights_compile=())


def compiled_fine(model, tokens, cap, cfg, progress=True, method="ring-static"):
    """A compile comparison that finished at once (the real one compiles for tens of seconds)."""
    return {"cap": cap, "mode": "default", "status": "ok", "error": None, "ratio": 0.5}


def test_a_failed_section_keeps_the_others_and_the_file_holds_each_as_it_finishes(tiny, hamlet_bytes, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "bench.json"
    seen = {}

    def memory_stream(*args, **kwargs):
        seen.update(json.loads(out.read_text()))  # the file as it stands when the second section starts
        raise RuntimeError("CUDA out of memory\nTried to allocate 2.00 GiB | 3 " + "x" * 9000)

    def evaluator_speed(model, tokens, cap, cfg, progress=True, source=None):  # the section after the failed one
        return [{"cap": cap, "method": "start_recent K=8", "tokens": 120, "parallel_tok_s": 900.0,
                 "decode_tok_s": 30.0, "speedup": 30.0, "nll_max_abs_diff": 1e-6}]

    monkeypatch.setattr(bench, "memory_stream", memory_stream)
    monkeypatch.setattr(bench, "evaluator_speed", evaluator_speed)
    result = bench.run(tiny("tiny:llama").model, hamlet_bytes, BenchConfig(**FAST), progress=False, out=out,
                       context={"model": "tiny:llama"})
    # the overhead section was on disk, marked ok, before the memory section began
    assert seen["sections"]["overhead"]["status"] == "ok" and seen["sections"]["memory"]["status"] == "running"
    assert REFERENCE in {row["method"] for row in seen["overhead"]} and seen["config"]["model"] == "tiny:llama"
    assert seen["status"] == "running" and seen["sections"]["evaluator"]["status"] == "pending"

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))  # the final file is the result
    sections = result["sections"]
    assert {name: s["status"] for name, s in sections.items()} == {
        "overhead": "ok", "compile": "skipped", "memory": "failed", "evaluator": "ok", "weights": "ok"}
    assert result["status"] == "failed" and result["failed"] == ["memory"]
    assert sections["memory"]["error"].startswith("RuntimeError: CUDA out of memory\nTried")
    assert len(sections["memory"]["error"]) == 4000  # bounded
    assert "memory_stream" in sections["memory"]["where"]
    assert sections["overhead"]["seconds"] > 0 and sections["compile"]["seconds"] is None
    assert len(result["overhead"]) == 10 and len(result["evaluator"]) == 1 and result["memory"] == []

    text = bench_markdown(result)
    failure = next(line for line in text.splitlines() if "memory" in line and "failed" in line)
    assert failure.startswith("**Section memory failed:** RuntimeError: CUDA out of memory Tried to allocate")
    assert "\\|" in failure and len(failure) < 600  # one line, a cell-safe pipe, shortened
    assert "| 48 | ring (fixed shapes) |" in text and "| 48 | start_recent K=8 | 120 |" in text
    assert "Memory over a long stream" not in text


def test_a_refused_compile_is_a_failed_section_that_keeps_its_record(tiny, hamlet_bytes, monkeypatch):
    def compile_ratio(model, tokens, cap, cfg, progress=True, method="ring-static"):
        return {"cap": cap, "mode": "default", "status": "failed", "error": "BackendCompilerFailed: no",
                "where": "inductor"}

    monkeypatch.setattr(bench, "compile_ratio", compile_ratio)
    cfg = BenchConfig(**{**FAST, "compile": True, "sections": ("compile",)})
    result = bench.run(tiny("tiny:llama").model, hamlet_bytes, cfg, progress=False)
    assert result["sections"]["compile"]["status"] == "failed" and result["failed"] == ["compile"]
    assert result["sections"]["compile"]["error"] == "BackendCompilerFailed: no"
    assert result["compile"][0]["where"] == "inductor"  # the record as the comparison wrote it
    assert result["sections"]["overhead"]["status"] == "skipped"
    assert bench_failures(result) == {"compile": "BackendCompilerFailed: no"}
    assert "| 48 | ring-static | default | failed |" in bench_markdown(result)


def test_a_general_step_that_does_not_compile_is_a_failed_row_of_a_section_that_holds(tiny, hamlet_bytes):
    """A cache's general step compiled as it is: dynamo's refusal is the row's measured result."""
    cfg = BenchConfig(**{**FAST, "compile": True, "compile_steps": 2, "compile_methods": ("start_recent",),
                         "sections": ("compile",)})
    result = bench.run(tiny("tiny:llama").model, hamlet_bytes, cfg, progress=False)
    (row,) = result["compile"]
    assert row["method"] == "start_recent"
    if row["status"] == "ok":  # (a torch that compiles it: the row says what it took)
        assert row["graphs_first_steps"] >= 1 and np.isfinite(row["ratio"])
    else:
        assert row["error"]
    assert result["sections"]["compile"]["status"] == "ok" and result["failed"] == []
    assert "start_recent's general step" in "\n".join(bench_findings(result))


def test_unknown_compile_methods_are_refused_with_the_choices():
    with pytest.raises(StreamkvError, match="unknown compile method.*ring-static"):
        BenchConfig(compile_methods=("ring-static", "lazy")).check()


def test_a_run_that_dies_leaves_the_sections_it_finished(tiny, hamlet_bytes, tmp_path, monkeypatch):
    def memory_stream(*args, **kwargs):
        raise KeyboardInterrupt  # not a section's failure: the run stops

    monkeypatch.setattr(bench, "compile_ratio", compiled_fine)
    monkeypatch.setattr(bench, "memory_stream", memory_stream)
    out = tmp_path / "bench.json"
    cfg = BenchConfig(**{**FAST, "compile": True, "sections": ("compile", "memory")})
    with pytest.raises(KeyboardInterrupt):
        bench.run(tiny("tiny:llama").model, hamlet_bytes, cfg, progress=False, out=out)
    left = json.loads(out.read_text())
    assert left["status"] == "running" and left["sections"]["memory"]["status"] == "running"
    assert left["sections"]["compile"]["status"] == "ok" and left["compile"][0]["ratio"] == 0.5
    text = bench_markdown(left)
    assert "**Section memory did not finish** (the run stopped during it)." in text
    assert "| 48 | ring-static | default | ok |" in text


def test_bench_command_exits_1_after_the_tables_of_the_sections_that_finished(tmp_path, capsys, monkeypatch):
    def memory_stream(*args, **kwargs):
        raise MemoryError("no room for the stream")

    monkeypatch.setattr(bench, "compile_ratio", compiled_fine)
    monkeypatch.setattr(bench, "memory_stream", memory_stream)
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny:llama", "--caps", "48", "--compress-every", "8", "--block", "8",
                 "--stream-tokens", "100", "--rss-from", "60", "--stream-methods", "ring",
                 "--sections", "compile", "memory", "--quiet", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "| 48 | ring-static | default | ok |" in captured.out
    assert "**Section memory failed:** MemoryError: no room for the stream" in captured.out
    last = captured.err.strip().splitlines()[-1]
    assert last == "streamkv: bench section memory failed: MemoryError: no room for the stream"
    record = json.loads(out.read_text())
    assert record["failed"] == ["memory"] and record["config"]["model"] == "tiny:llama"
    assert record["sections"]["compile"]["status"] == "ok" and record["compile"][0]["ratio"] == 0.5
