import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One torch thread per worker (two workers share two cores; more threads than cores slow torch many-fold),
    # and the same for what a test starts: Snakemake's jobs, the CLI, a peer's worker.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

from ci_skips import pytest_runtest_makereport  # noqa: F401  (under CI, a skip not listed there fails)
from streamkv import cpu, load_model
from streamkv.evaluation.loop import load_tokens

TINY = ("tiny:llama", "tiny:gpt_neox", "tiny:llama-llama3", "tiny:llama-linear")
# A test that asks for a model is `slow`; so is every test of a module that loads models, runs a peer, the CLI or
# the pipeline another way (`pytestmark = pytest.mark.slow` there).  `pytest -m "not slow"`: the model-free tests.
MODEL_FIXTURES = {"tiny", "smollm2", "hamlet_bytes"}


def pytest_collection_modifyitems(items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def cpu_without(monkeypatch):
    """`cpu_without("VNNI")`: from here on this test's process, and what it starts (the CLI, Snakemake's jobs),
    see this CPU without the feature's flags (streamkv.cpu's override), so the refusal paths run on every CPU."""

    def hide(*features: str) -> dict:
        gone = {flag for feature in features for flag in cpu.FEATURES[feature]}
        monkeypatch.setenv(cpu.OVERRIDE, " ".join(sorted(cpu.flags() - gone)))
        assert not any(cpu.has(feature) for feature in features)
        return dict(os.environ)

    return hide


@pytest.fixture(scope="session")
def tiny():
    """Tiny seeded models (eager attention, so mask-size bugs surface), loaded once."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M, loaded once per worker (about 20 s) and shared by the modules that use it."""
    return load_model("embedded:smollm2-135m")


@pytest.fixture(scope="session")
def hamlet_bytes(tiny):
    return load_tokens(tiny("tiny:llama"), "embedded:shakespeare/hamlet", 2048)


def full_forward_nll(model, tokens):
    ids = torch.tensor(tokens).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="none")
