"""Many short independent streams of one length, scored at once: per-token NLL and top-1 hits of every stream.

A probe (`streamkv.probes.recall`) asks one question of many seeded streams.
A method whose cache depends on positions only is scored by the exact parallel
evaluator over the whole batch: its schedule comes from the cache's own policy
and serves every stream alike.  Any other method is scored by the decode
loop's stepper, fed one token of every stream per step (the same cache and
policy objects as `evaluation.loop`); kvpress's worker takes the batch too (a
press scores and evicts per stream); llama.cpp's context holds one stream, so
it gets the streams one after another.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from streamkv import methods
from streamkv.cache.factory import make_stepper
from streamkv.evaluation.params import EvalParams

PARALLEL_CHUNK = 128  # queries per forward and stream: a batch of 20 streams holds 20 x 128 rows of logits


@torch.inference_mode()
def score_streams(loaded, ids: np.ndarray, params: EvalParams, progress: bool = False,
                  desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NLL of every target ids[:, 1:] and whether the model's top guess was it: two [B, L - 1] arrays.

    `params`: the run's method and cache, and its evaluator ("auto": the parallel one where it serves the method);
    its `max_tokens` and `prefill` are set here: the streams' length, and one token per step from the first, so
    every stream is streamed from its start.
    """
    from streamkv.evaluation.parallel import _ParallelAttention, nll_parallel, schedules_of

    batch, length = ids.shape
    p = replace(params, max_tokens=length, prefill=1).resolved()
    model = loaded.model
    device = next(model.parameters()).device
    torch.manual_seed(p.seed)
    x = torch.as_tensor(ids, dtype=torch.long, device=device)
    if p.evaluator == "parallel":
        cache = make_stepper(model, p, loaded.source).cache
        sched = schedules_of(cache, length - 1, p.prefill)
        with _ParallelAttention(model):
            nll, hit = nll_parallel(model, x, sched, p.positions, PARALLEL_CHUNK, progress, desc or p.method, hits=True)
        return np.atleast_2d(nll), np.atleast_2d(hit)
    if methods.get(p.method).family == "llamacpp":  # its context holds one stream
        parts = [_decode(loaded, x[b : b + 1], p, progress, desc) for b in range(batch)]
        return np.concatenate([n for n, _ in parts]), np.concatenate([h for _, h in parts])
    return _decode(loaded, x, p, progress, desc)


@torch.inference_mode()
def _decode(loaded, x: torch.Tensor, p: EvalParams, progress: bool, desc: str | None) -> tuple[np.ndarray, np.ndarray]:
    """The decode loop's stepper over a batch: a prefill of one token, then one token of every stream per step."""
    batch, length = x.shape
    stepper = make_stepper(loaded.model, p, loaded.source)
    nll = np.empty((batch, length - 1))
    hit = np.empty((batch, length - 1), dtype=bool)
    try:
        for t in tqdm(range(length - 1), desc=desc or p.method, disable=not progress, mininterval=2.0, leave=False):
            logits = stepper.forward(x[:, t : t + 1])[:, -1].float()
            target = x[:, t + 1]
            nll[:, t] = F.cross_entropy(logits, target, reduction="none").cpu().numpy()
            hit[:, t] = (logits.argmax(-1) == target).cpu().numpy()
    finally:
        stepper.close()
    return nll, hit
