"""The bench's compile section: the ring's fixed-shape step through `torch.compile` against the same step
eager (TPOT ratio, largest NLL difference, graphs and graph breaks), or the exact error if the stack refuses it."""

from __future__ import annotations

import traceback

import numpy as np
import torch
import torch.nn.functional as F

from streamkv import methods
from streamkv.bench.overhead import DecoderStepper
from streamkv.cache.compiled import RingDecoder
from streamkv.cache.factory import make_cache
from streamkv.errors import StreamkvError, error_text
from streamkv.evaluation.params import RING_STATIC, BenchConfig
from streamkv.evaluation.timing import interleave


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def target_nll(logits: torch.Tensor, target: torch.Tensor) -> float:
    return F.cross_entropy(logits[0, -1:].float(), target.reshape(1)).item()


def graph_breaks() -> int:
    """Graph breaks dynamo has met in this process so far."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def _compile_pair(model, cap: int, cfg: BenchConfig, method: str) -> tuple[tuple, tuple]:
    """(prefill, step) of the eager and of the compiled decoder of `method`; prefills run eagerly in both.

    RING_STATIC is the ring's fixed-shape step (`RingDecoder`, one graph for every step); any other method is the
    model's forward over its cache, compiled as it is (no full graph asked): what dynamo makes of the cache's
    Python (guards on its counters, graph breaks, recompiles) is what is measured.
    """
    kwargs = {"mode": cfg.compile_mode} if cfg.compile_mode else {}
    if method == RING_STATIC:
        eager = RingDecoder(model, make_cache("ring", model, cap=cap, sink=cfg.sink))
        compiled = RingDecoder(model, make_cache("ring", model, cap=cap, sink=cfg.sink), compile=True, **kwargs)
        return (eager, eager), (compiled, compiled)
    sink = 0 if methods.get(method).sinkless else cfg.sink

    def plain():
        cache = make_cache(method, model, cap=cap, sink=sink)
        return lambda ids: model(input_ids=ids, past_key_values=cache, use_cache=True).logits

    eager, compiled = plain(), plain()
    return (eager, eager), (compiled, torch.compile(compiled, **kwargs))


@torch.inference_mode()
def compile_ratio(model, tokens: list[int], cap: int, cfg: BenchConfig, progress: bool = True,
                  method: str = RING_STATIC) -> dict:
    """A method's decode step compiled vs eager, interleaved, with the graphs it took; the exact error if it fails."""
    import torch._dynamo

    device = next(model.parameters()).device
    warm = 2  # compiled steps before the graph count is taken
    n = warm + cfg.compile_steps
    if len(tokens) < cap + n + 1:
        raise StreamkvError(f"the compile comparison needs {cap + n + 1} tokens of text, the text has {len(tokens)}")
    ids = torch.tensor(tokens[: cap + n + 1], device=device).unsqueeze(0)
    record = {"cap": cap, "method": method, "mode": cfg.compile_mode or "default", "status": "ok", "error": None}
    torch._dynamo.reset()  # every method compiles from nothing, against a recompile limit of its own
    (eager_prefill, eager), (compiled_prefill, compiled) = _compile_pair(model, cap, cfg, method)
    eager_prefill(ids[:, :cap])
    compiled_prefill(ids[:, :cap])
    graphs0, breaks0 = compiled_graphs(), graph_breaks()
    nll = {"eager": np.full(n, np.nan), "compiled": np.full(n, np.nan)}
    graphs_warm = graphs0

    def after(i, name, stepper, logits):
        nonlocal graphs_warm
        nll[name][i] = target_nll(logits, ids[0, cap + i + 1])
        if i == warm - 1:  # (the second of these calls comes after both forwards: the count before step `warm`)
            graphs_warm = compiled_graphs()

    try:
        steppers = {"eager": DecoderStepper(eager), "compiled": DecoderStepper(compiled)}
        times = interleave(steppers, ids, cap, n, after=after,
                           desc=f"compile {method}", progress=progress)
    except Exception as exc:  # a measured negative: keep the stack's own words
        record.update(status="failed", error=error_text(exc), where=traceback.format_exc(limit=-3)[-2000:])
        return record
    eager_ms, compiled_ms = np.median(times["eager"][warm:]), np.median(times["compiled"][warm:])
    record.update(
        compile_sec=float(times["compiled"][0] / 1e3),  # the first compiled step compiles
        eager_ms=float(eager_ms), compiled_ms=float(compiled_ms), ratio=float(compiled_ms / eager_ms),
        nll_max_abs_diff=float(np.abs(nll["eager"] - nll["compiled"]).max()),
        graphs_first_steps=graphs_warm - graphs0,
        graphs_after_warmup=compiled_graphs() - graphs_warm, graph_breaks=graph_breaks() - breaks0,
        recompile_limit=int(torch._dynamo.config.recompile_limit), steps=cfg.compile_steps,
    )
    return record
