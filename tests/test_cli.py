"""The command line: results on disk, one-line errors with exit status 2."""

import copy
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from streamkv.cli import main
from streamkv.errors import StreamkvError

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

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
     "streamkv: error: unknown method 'h2o'; choose one of: dense, window, start_recent, mit, ring, tova, "
     "recompute, kvpress:streaming_llm, kvpress:streaming_llm_unsorted, kvpress:streaming_llm+rerotate, "
     "kvpress:knorm, kvpress:snapkv, kvpress:tova, kvpress:expected_attention, kvpress:keydiff, "
     "kvpress:observed_attention, llamacpp:shift, llamacpp:dense\n"),
    (["--method", "mit", "--cap", "-5"], "streamkv: error: cap must be a positive number of tokens, got -5\n"),
    (["--method", "mit", "--cap", "8", "--sink", "8"],
     "streamkv: error: sink (8) must be smaller than cap (8) so that a window remains\n"),
    (["--method", "mit", "--cap", "64", "--prefill", "65", "--max-tokens", "100"],
     "streamkv: error: prefill (65) must not exceed cap (64): the prefill forward would attend beyond the budget\n"),
    (["--method", "mit", "--compress-every", "4"],
     "streamkv: error: compress-every applies to window, start_recent, ring, tova, the kvpress methods and "
     "llamacpp:shift, not to 'mit'\n"),
    (["--method", "window", "--sink", "4"],
     "streamkv: error: method 'window' keeps no sink tokens; leave --sink out or use start_recent\n"),
    (["--method", "mit", "--seed", str(2**64)],
     "streamkv: error: seed (18446744073709551616) is out of range; use a value below 2**63\n"),
    (["--method", "window", "--sink-layers", "all"],
     "streamkv: error: sink-layers 'all' applies to the caches that keep sinks (start_recent, mit, ring, tova), "
     "not to 'window'; leave --sink-layers out\n"),
    (["--method", "kvpress:streaming_llm", "--sink-layers", "all"],
     "streamkv: error: sink-layers 'all' applies to the caches that keep sinks (start_recent, mit, ring, tova), "
     "not to 'kvpress:streaming_llm'; leave --sink-layers out\n"),
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


# ----------------------------------------------------------------------------- wrong commands: one line, exit 2


def one_line_error(code, err, *names):
    """Exit status 2, one line on stderr naming every value in `names`, no traceback."""
    assert code == 2, err
    assert err.startswith("streamkv") and err.count("\n") == 1 and "Traceback" not in err
    for name in names:
        assert str(name) in err, err


def test_unknown_device(tmp_path, capsys, monkeypatch):
    code, err = err_of(capsys, BASE + ["--method", "mit", "--device", "bogus", "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, "streamkv: error: unknown device 'bogus'; use cpu, cuda or cuda:N\n")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = err_of(capsys, BASE + ["--method", "mit", "--device", "cuda", "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, "streamkv: error: device 'cuda' needs CUDA, which is not available here; "
                              "use --device cpu\n")
    assert not (tmp_path / "r.json").exists()


def test_unknown_attention_implementation(tmp_path, capsys):
    code, err = err_of(capsys, BASE + ["--method", "mit", "--attn", "bogus", "--out", str(tmp_path / "r.json")])
    one_line_error(code, err, "unknown attention implementation 'bogus'; choose one of: eager, ", "sdpa")


def test_attention_implementation_whose_package_is_missing(tmp_path, capsys):
    from transformers.utils import is_flash_attn_2_available, is_kernels_available

    if is_flash_attn_2_available() or is_kernels_available():
        pytest.skip("FlashAttention 2 can run here")
    code, err = err_of(capsys, BASE + ["--method", "mit", "--attn", "flash_attention_2",
                                       "--out", str(tmp_path / "r.json")])
    one_line_error(code, err, "attention implementation 'flash_attention_2' cannot be used for 'tiny:llama' here: ",
                   "FlashAttention2", "; use eager or sdpa")


def test_model_folder_without_a_model(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = err_of(capsys, ["eval", "--model", f"path:{empty}", "--text", "embedded:shakespeare/hamlet",
                                "--method", "mit", "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, f"streamkv: error: model source 'path:{empty}' holds no model: {empty} has no "
                              "config.json and no .gguf file; name a folder written by save_pretrained, or one "
                              "with a .gguf file\n")


def test_text_file_that_is_not_utf8(tmp_path, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait ".encode("latin-1") * 100)
    code, err = err_of(capsys, ["eval", "--model", "tiny:llama", "--text", f"file:{latin1}", "--method", "mit",
                                "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, f"streamkv: error: text source 'file:{latin1}' is not UTF-8 text (byte 0xe9 at "
                              "offset 3); convert it, e.g. iconv -f latin1 -t utf-8\n")


@pytest.mark.parametrize("option", ["--out", "--trace"])
def test_output_that_cannot_be_written(tmp_path, capsys, option):
    plain = tmp_path / "plain"
    plain.write_text("a file, not a folder")
    for bad, says in ((f"{plain}/sub/r.json", f"'{plain}' is a file, not a directory"),
                      ("/proc/streamkv-test/x/r.json", "No such file or directory ('/proc/streamkv-test')"),
                      (str(tmp_path), "is a directory; name a file in it")):
        outputs = ["--out", bad] if option == "--out" else ["--out", str(tmp_path / "r.json"), "--trace", bad]
        code, err = err_of(capsys, BASE + ["--method", "mit", "--max-tokens", "64", *outputs])
        one_line_error(code, err, f"{option} '{bad}'", says)
    assert not (tmp_path / "r.json").exists()


def test_timing_steps_beyond_the_tokens(tmp_path, capsys):
    code, err = err_of(capsys, BASE + ["--method", "mit", "--cap", "64", "--max-tokens", "100", "--timing-steps",
                                       "64", "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, "streamkv: error: timing-steps 64 needs 144 tokens (a prefill of cap 64, 80 steps), "
                              "more than max-tokens (100); raise --max-tokens or lower --timing-steps\n")


def test_a_timing_batch_without_a_timing_part_is_an_input_error(tmp_path, capsys):
    code, err = err_of(capsys, BASE + ["--method", "mit", "--timing-batch", "4", "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, "streamkv: error: timing-batch 4 sets the streams of the timing part; add "
                              "--timing-steps T to run one\n")


def test_lazy_ring_without_a_window_is_an_input_error(tmp_path, capsys):
    code, err = err_of(capsys, BASE + ["--method", "ring", "--cap", "5", "--compress-every", "2",
                                       "--out", str(tmp_path / "r.json")])
    assert (code, err) == (2, "streamkv: error: the lazy ring (compress-every 2) needs a window of at least 2 "
                              "tokens, cap (5) - sink (4) leaves 1; raise cap or use compress-every 1\n")


def test_summarize_names_the_file_it_cannot_read(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    code, err = err_of(capsys, ["summarize", str(missing)])
    assert (code, err) == (2, f"streamkv: error: cannot read result file '{missing}': No such file or directory\n")
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"status": "ok", "error": null, "params": {"method": "mit", "cap"')
    code, err = err_of(capsys, ["summarize", str(truncated)])
    assert (code, err) == (2, f"streamkv: error: result file '{truncated}' is not valid JSON (Expecting ':' "
                              "delimiter at line 1, column 66); it may have been cut short: run it again or leave "
                              "it out\n")
    for other, lacks in (({"overhead": [], "config": {}}, "status, error, params, metrics"), ([1, 2], "status"),
                         ({"status": "ok", "error": None, "params": {}, "metrics": {}}, "params.method")):
        path = tmp_path / "other.json"
        path.write_text(json.dumps(other))
        code, err = err_of(capsys, ["summarize", str(path)])
        one_line_error(code, err, f"'{path}' is not a streamkv result (it has no ", lacks,
                       "pass the files `streamkv eval --out` writes")


@pytest.mark.parametrize("extra,message", [
    (["--stream-tokens", "10", "--sections", "memory"],
     "stream_tokens (10) must exceed the first cap (256): the memory stream decodes after a prefill of the cap"),
    (["--warmup", "-1"], "warmup must be >= 0, got -1"),
    (["--blocks", "0"], "blocks must be >= 1, got 0"),
    (["--sink", "-2"], "sink must be >= 0, got -2"),
    (["--caps", "256", "30"], "cap 30 leaves no window for sink 4 and compress_every 32"),
    (["--recompute-every", "64"], "recompute_every (64) must be at most block (32): every block times recompute"),
    (["--compile-steps", "0"], "compile_steps must be >= 1, got 0"),
    (["--dense-tokens", "100"], "dense_tokens (100) must exceed the first cap (256)"),
    (["--stream-tokens", "1000"], "rss_from (2000) must be a decode step of the memory stream, from the first cap "
                                  "(256) to below stream_tokens (1000); set rss_from in [256, 1000)"),
    (["--rss-from", "100"], "rss_from (100) must be a decode step of the memory stream, from the first cap (256)"),
    (["--evaluator-tokens", "200"], "evaluator_tokens (200) must exceed the first cap (256) + 1"),
    (["--block", "99999999999999999999"], "the bench would need 800,000,000,000,000,000,264 tokens of text, more "
                                          "than 10,000,000 (days of decoding); lower blocks x block, stream_tokens"),
    (["--stream-methods", "h2o"], "unknown stream method(s) h2o; choose from: ring, start_recent, mit, dense, window"),
    (["--compile-mode", "fast"], "unknown compile mode 'fast'; choose one of: default, reduce-overhead, "),
    (["--device", "bogus"], "unknown device 'bogus'; use cpu, cuda or cuda:N"),
    (["--threads", "-1"], "argument --threads: must be >= 1, got -1"),
    (["--out", "/proc/streamkv-test/b.json"], "cannot write --out '/proc/streamkv-test/b.json'"),
])
def test_bench_checks_every_setting_before_the_model_load(capsys, monkeypatch, extra, message):
    import streamkv.models.sources

    def no_load():  # a bad setting must stop the bench before the (embedded) model is read
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(streamkv.models.sources, "embedded_model_dir", no_load)
    try:
        code = main(["bench"] + extra)
    except SystemExit as exc:  # (argparse's own errors)
        code = exc.code
    one_line_error(code, capsys.readouterr().err, message)


# ----------------------------------------------------------------------------- runs that fail: a file and exit 1


class _FailingStepper:
    """Wraps a stepper; its `fail_at`-th forward raises `exc` (a worker that dies, a refusal mid-stream)."""

    def __init__(self, stepper, exc, fail_at=10):
        self.stepper, self.exc, self.left = stepper, exc, fail_at

    def __getattr__(self, name):
        return getattr(self.stepper, name)

    def forward(self, ids):
        self.left -= 1
        if not self.left:
            raise self.exc
        return self.stepper.forward(ids)


@pytest.mark.parametrize("exc", [StreamkvError("the kvpress worker of 'x' stopped (exit status 9)"),
                                 OSError(28, "No space left on device"), RuntimeError("CUDA error: device lost")])
def test_error_after_the_run_started_writes_a_failed_result(tmp_path, capsys, monkeypatch, exc):
    import streamkv.evaluation.loop

    make = streamkv.evaluation.loop.make_stepper
    monkeypatch.setattr(streamkv.evaluation.loop, "make_stepper", lambda *a, **k: _FailingStepper(make(*a, **k), exc))
    out = tmp_path / "r.json"
    code, err = err_of(capsys, BASE + ["--method", "mit", "--evaluator", "decode", "--cap", "32", "--max-tokens",
                                       "64", "--out", str(out), "--quiet"])
    reason = f"{type(exc).__name__}: {exc}"
    assert (code, err) == (1, f"streamkv: run failed: {reason}\n")
    record = json.loads(out.read_text())
    assert record["status"] == "failed" and record["error"] == reason and record["metrics"]["ppl"] is None


def test_perplexity_past_the_float_range_is_a_failed_run(tmp_path, capsys, tiny):
    from streamkv.models.sources import PREPARED_MARKER, save_checkpoint

    model = copy.deepcopy(tiny("tiny:llama").model)
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # logits ~1e4 apart: the mean NLL is far past exp's range (~709.8)
    folder = tmp_path / "collapsed"
    save_checkpoint(model, folder)
    (folder / PREPARED_MARKER).write_text(json.dumps({"tokenizer": "bytes", "attn_implementation": "eager"}))
    for evaluator in ("parallel", "decode"):
        out = tmp_path / f"{evaluator}.json"
        code, err = err_of(capsys, ["eval", "--model", f"path:{folder}", "--text", "embedded:shakespeare/hamlet",
                                    "--method", "start_recent", "--cap", "32", "--max-tokens", "64",
                                    "--evaluator", evaluator, "--out", str(out), "--quiet"])
        record = json.loads(out.read_text())
        assert code == 1 and record["status"] == "failed" and record["metrics"]["ppl"] is None
        assert record["metrics"]["nll_mean"] > 710
        assert record["error"].startswith(f"the mean NLL ({record['metrics']['nll_mean']:.1f} nats) overflowed exp")
        assert err.endswith(f"\nstreamkv: run failed: {record['error']}\n")  # (after the weights' progress bar)
        assert "Traceback" not in err


def test_evaluate_names_a_token_list_shorter_than_max_tokens(tiny):
    from streamkv.evaluation.loop import evaluate
    from streamkv.evaluation.params import EvalParams

    p = EvalParams("tiny:llama", "hamlet", "mit", cap=32, max_tokens=100)
    with pytest.raises(StreamkvError, match=r"^evaluate\(\) got 60 tokens, fewer than max_tokens \(100\); pass at "
                                            r"least max_tokens tokens \(load_tokens gives them\) or lower max_tokens$"):
        evaluate(tiny("tiny:llama"), list(range(60)), p, progress=False)


# ----------------------------------------------------------------------------- summarize: each run, its baseline


def _result(folder, name, method, cap=64, sink=4, ppl=10.0, tpot=1.0, status="ok", **params):
    record = {"status": status, "error": None,
              "params": {"model": "m", "text": "t", "method": method, "cap": cap, "sink": sink, "max_tokens": 512,
                         "prefill": 1, "dtype": "float32", "device": "cpu", "compress_every": 1, "window": cap - 4,
                         **params},
              "metrics": {"ppl": ppl, "tpot_ms": tpot, "tpot_steady_ms": tpot, "kv_len_min": 1, "kv_len_mean": 1.0,
                          "kv_len_max": 1, "n_prunes": 0, "tokens_dropped": 0}}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record))
    return str(path)


def test_summarize_compares_each_run_with_the_baseline_of_its_sink_and_budget(tmp_path):
    from streamkv.analysis.summary import load_results, method_table

    files = [_result(tmp_path, "rec_s4", "recompute", ppl=10.0, tpot=8.0),
             _result(tmp_path, "rec_s1", "recompute", sink=1, ppl=20.0, tpot=8.0),
             _result(tmp_path, "rec_s4_cap128", "recompute", cap=128, ppl=5.0, tpot=16.0),
             _result(tmp_path, "sr_s4", "start_recent", ppl=11.0, tpot=2.0),
             _result(tmp_path, "sr_s1", "start_recent", sink=1, ppl=22.0, tpot=2.0),
             _result(tmp_path, "sr_s2", "start_recent", sink=2, ppl=12.0, tpot=2.0),
             _result(tmp_path, "window", "window", sink=0, ppl=30.0, tpot=2.0),
             _result(tmp_path, "dense", "dense", sink=None, ppl=9.0, tpot=4.0)]
    table = method_table(load_results(files)).set_index(pd.Index([f.rsplit("/", 1)[1] for f in files]))
    assert table.baseline.to_dict() == {
        "rec_s4.json": files[0], "rec_s1.json": files[1], "rec_s4_cap128.json": files[2], "sr_s4.json": files[0],
        "sr_s1.json": files[1], "sr_s2.json": "none", "window.json": files[0], "dense.json": files[0]}
    assert table.delta_ppl_pct["sr_s4.json"] == pytest.approx(10.0)
    assert table.delta_ppl_pct["sr_s1.json"] == pytest.approx(10.0)  # against sink 1's baseline (20), not sink 4's
    assert table.speedup["sr_s1.json"] == pytest.approx(4.0)
    assert pd.isna(table.delta_ppl_pct["sr_s2.json"])
    assert table.delta_ppl_pct["window.json"] == pytest.approx(200.0)


def test_summarize_refuses_two_baselines_that_both_fit(tmp_path, capsys):
    first = _result(tmp_path, "rec_a", "recompute", ppl=10.0)
    second = _result(tmp_path, "rec_b", "recompute", ppl=10.5)
    run = _result(tmp_path, "sr", "start_recent", ppl=11.0)
    code, err = err_of(capsys, ["summarize", first, second, run])
    assert (code, err) == (2, f"streamkv: error: 2 recompute baselines fit '{first}' (cap 64, sink 4, max_tokens 512, "
                              f"prefill 1): {first}, {second}; summarize only one of them\n")
    code = main(["summarize", first, run, first])  # a file named twice is one run
    assert code == 0 and "| start_recent | ok |" in capsys.readouterr().out


def test_wrong_commands_print_no_traceback_from_the_console_entry(tmp_path):
    truncated = tmp_path / "truncated.json"
    truncated.write_text('{"status": "ok", "par')
    for argv in (["summarize", str(truncated)], [*BASE, "--method", "mit", "--device", "bogus", "--out", "r.json"]):
        proc = subprocess.run([sys.executable, "-m", "streamkv", *argv], capture_output=True, text=True, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
