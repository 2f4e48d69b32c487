"""A new eviction policy added from outside the package, as docs/extending.md says: a policy
class, a registry record and a builder.  The decode loop, the parallel evaluator and the parameter checks
take it with no other change."""

from dataclasses import dataclass

import numpy as np
import pytest

from streamkv import methods
from streamkv.cache import factory
from streamkv.cache.budget import Budget
from streamkv.cache.policy import LAZY, Prune
from streamkv.cache.rope import RotaryAligner
from streamkv.cache.streaming import RealignedLayer, StreamingCache
from streamkv.errors import StreamkvError
from streamkv.evaluation.loop import evaluate
from streamkv.evaluation.params import EvalParams

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)


@dataclass
class HalfWindow:
    """Keep `sink` first tokens and a recent `window`; when the window overflows, evict its older half at once."""

    sink: int
    window: int

    def plan(self, length: int, q: int, position: int) -> Prune:
        over = length + q - (self.sink + self.window)
        if over <= 0:
            return Prune()
        return Prune(min(length - self.sink, max(over, self.window // 2)), LAZY)

    @property
    def max_kv(self) -> int:
        return self.sink + self.window


def build(model, o: factory.Options) -> StreamingCache:
    budget = Budget.derive(o.cap, sink=o.sink)
    return StreamingCache(RealignedLayer, o.num_layers, HalfWindow(budget.sink, budget.window), RotaryAligner(model))


@pytest.fixture
def half_window():
    record = methods.Method("half_window", "cache", "evicts the older half of the window at once", parallel=True)
    factory.register(record, build)
    yield record
    del methods.REGISTRY[record.name], factory.BUILDERS[record.name]


def test_a_registered_policy_runs_in_both_evaluators(tiny, hamlet_bytes, half_window):
    loaded, cap, n = tiny("tiny:llama"), 32, 300
    p = EvalParams("m", "t", "half_window", cap=cap, max_tokens=n, prefill=cap)
    resolved = p.resolved()
    assert resolved.sink == 4 and resolved.evaluator == "decode"  # the record's defaults
    loop, a = evaluate(loaded, hamlet_bytes[:n], p, progress=False)
    par, b = evaluate(loaded, hamlet_bytes[:n], EvalParams(**{**vars(p), "evaluator": "parallel"}), progress=False)
    assert par["params"]["evaluator"] == "parallel"
    assert np.abs(a.nll.to_numpy() - b.nll.to_numpy()).max() <= 1e-4
    assert (a.kv_len.to_numpy() == b.kv_len.to_numpy()).all() and a.kv_len.max() <= cap
    drops = set(a.dropped[a.dropped > 0])
    assert drops == {(cap - 4) // 2}  # the older half of the window, every time
    with pytest.raises(StreamkvError, match="compress-every applies to .*, not to 'half_window'"):
        EvalParams("m", "t", "half_window", compress_every=4).resolved()


def test_only_a_cache_method_gets_a_builder():
    with pytest.raises(StreamkvError, match="only cache methods have a builder"):
        factory.register(methods.Method("peer:x", "kvpress", "a peer"), build)
