"""The command line: results on disk, one-line errors with exit status 2."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from streamkv.cli import main

BASE = ["eval", "--model", "tiny:llama", "--text", "embedded:shakespeare/hamlet"]


def err_of(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_eval_writes_result_and_trace(tmp_path, capsys):
    out, trace = tmp_path / "r.json", tmp_path / "t.parquet"
    code = main(BASE + ["--method", "start_recent", "--cap", "32", "--compress-every", "4", "--max-tokens", "120",
                        "--prefill", "8", "--out", str(out), "--trace", str(trace), "--quiet"])
    assert code == 0
    record = json.loads(out.read_text())
    assert record["status"] == "ok" and record["params"]["compress_every"] == 4
    assert record["metrics"]["kv_len_max"] == 32 + 4 - 1
    frame = pd.read_parquet(trace)
    assert list(frame.columns) == ["step", "position", "target", "nll", "step_ms", "kv_len", "pruned", "dropped",
                                   "prune_kind", "update_ms"]
    assert len(frame) == 119


@pytest.mark.parametrize("extra,message", [
    (["--method", "h2o"],
     "streamkv: error: unknown method 'h2o'; choose one of: dense, window, start_recent, mit, ring, recompute, "
     "kvpress:streaming_llm, kvpress:streaming_llm_unsorted, kvpress:streaming_llm+rerotate, kvpress:knorm, "
     "llamacpp:shift, llamacpp:dense\n"),
    (["--method", "mit", "--cap", "-5"], "streamkv: error: cap must be a positive number of tokens, got -5\n"),
    (["--method", "mit", "--cap", "8", "--sink", "8"],
     "streamkv: error: sink (8) must be smaller than cap (8) so that a window remains\n"),
    (["--method", "mit", "--cap", "64", "--prefill", "65", "--max-tokens", "100"],
     "streamkv: error: prefill (65) must not exceed cap (64): the prefill forward would attend beyond the budget\n"),
    (["--method", "mit", "--compress-every", "4"],
     "streamkv: error: compress-every applies to window, start_recent, ring, the kvpress methods and "
     "llamacpp:shift, not to 'mit'\n"),
    (["--method", "window", "--sink", "4"],
     "streamkv: error: method 'window' keeps no sink tokens; leave --sink out or use start_recent\n"),
])
def test_bad_options_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    code, err = err_of(capsys, BASE + extra + ["--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, message)
    assert not (tmp_path / "r.json").exists()


def test_text_shorter_than_requested(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be")
    code, err = err_of(capsys, ["eval", "--model", "tiny:llama", "--text", f"file:{short}", "--method", "dense",
                                "--max-tokens", "100", "--prefill", "50", "--out", str(tmp_path / "r.json")])
    assert code == 2
    assert err == (f"streamkv: error: text 'file:{short}' has 19 tokens, fewer than max-tokens (100); "
                   "lower --max-tokens\n")


def test_prefill_must_leave_targets(tmp_path, capsys):
    code, err = err_of(capsys, BASE + ["--method", "dense", "--max-tokens", "50", "--prefill", "50",
                                       "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, "streamkv: error: prefill (50) must be smaller than max-tokens (50)\n")


def test_offline_hub_sources_fail_at_once_naming_the_embedded_alternative(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = err_of(capsys, ["eval", "--model", "hf:EleutherAI/pythia-70m", "--text", "embedded:shakespeare/hamlet",
                                "--method", "mit", "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, "streamkv: error: model source 'hf:EleutherAI/pythia-70m' needs the Hugging Face Hub, "
                              "which cannot be reached from here (HF_HUB_OFFLINE is set); use the embedded model "
                              "instead: embedded:smollm2-135m\n")
    code, err = err_of(capsys, ["eval", "--model", "tiny:llama", "--text", "hf:wikitext/wikitext-103-v1",
                                "--method", "mit", "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, "streamkv: error: text source 'hf:wikitext/wikitext-103-v1' needs the Hugging Face Hub, "
                              "which cannot be reached from here (HF_HUB_OFFLINE is set); use the embedded text "
                              "instead: embedded:shakespeare/hamlet\n")


def test_unknown_sources(tmp_path, capsys):
    code, err = err_of(capsys, ["eval", "--model", "tiny:llama", "--text", "embedded:shakespeare/hamlett",
                                "--method", "mit", "--out", str(tmp_path / "r.json")])
    assert code == 2 and err.startswith("streamkv: error: unknown play 'hamlett' in 'embedded:shakespeare/hamlett'; "
                                        "available: ")
    code, err = err_of(capsys, ["eval", "--model", "s3://bucket/m", "--text", "embedded:shakespeare/hamlet",
                                "--method", "mit", "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, "streamkv: error: unknown model source 's3://bucket/m'; use one of the schemes "
                              "embedded:, tiny:, hf:, path: (e.g. embedded:smollm2-135m)\n")


def test_console_entry_point_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "streamkv", *BASE, "--method", "start_recent", "--cap", "0",
                           "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "streamkv: error: cap must be a positive number of tokens, got 0\n"
    missing = subprocess.run([sys.executable, "-m", "streamkv", "eval", "--model", "tiny:llama"],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.count("\n") == 1 and "required" in missing.stderr
