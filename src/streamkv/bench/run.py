"""`streamkv bench`: what eviction costs, as ratios measured side by side in one run.

Step times on a shared machine drift by +-10 % between runs, so every figure
here is a ratio of two things timed in the same run with their steps
interleaved (step t of every method, in a new seeded random order, then step t+1).  A
method's step time is the median, over blocks of `block` consecutive steps, of
the block's mean: a block holds a whole lazy period, so a lazy prune is
charged to the method instead of being hidden by a median of single steps.

* overhead: TPOT(method) / TPOT(reference).  The reference is the same forward
  over exactly `cap` keys with no eviction work (`SameLengthCache`: `cap`
  slots, each new token written into the last one; its logits are meaningless,
  its cost is the floor every cache pays; a lazy method attends to up to
  cap + K - 1 keys, so its ratio includes those extra keys);
  llama.cpp's rows (with peers) are another engine: their overhead is against
  llama.cpp's own decode over cap keys with no shift, and they have no speedup;
* speedup: TPOT(recompute) / TPOT(method); the ideal is TPOT(recompute) /
  TPOT(reference), a forward over the whole budget against one token;
* time split: the forward (everything but the cache), the cache update and
  its planning (policy, layout, counters), from the cache's own timers;
* compile: the ring's fixed-shape step through `torch.compile` against the
  same step eager (TPOT ratio, largest NLL difference, graphs compiled after
  warm-up), or the exact error if the stack refuses it;
* memory: over a long stream, the cache's bytes (min and max once it is
  full) and the process RSS from step `rss_from` to the end, per method;
* weights: the ring's fixed-shape step with each weights variant
  (`streamkv.models.weights`), eager and, for `weights_compile`, through
  `torch.compile`, against the float32 eager step and llama.cpp's own
  decode over cap keys (when installed), in one interleaved run; the
  fastest variant's TPOT against the goal of at most 2x llama.cpp's.

A peer whose worker dies, hangs or does not start (kvpress, llama.cpp) is a
failed row of its section, with its error, and the section's other rows are
measured; a section that raises is recorded as failed, with its error, and
the others still run; given a file, `run` rewrites it as each part of a section finishes,
so a run that dies later keeps what it had measured.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from streamkv import provenance
from streamkv.bench.compile import compile_ratio
from streamkv.bench.memory import evaluator_speed, memory_stream
from streamkv.bench.overhead import overhead
from streamkv.bench.weights import weights_speed
from streamkv.errors import StreamkvError, error_text
from streamkv.evaluation.params import BENCH_SECTIONS, RING_STATIC, BenchConfig
from streamkv.jobio import write_json


def stream_tokens(loaded, text_src: str, n: int) -> list[int]:
    """`n` tokens of the text, the text repeated end to end if it is shorter (costs do not depend on the words)."""
    from streamkv.models.sources import encode
    from streamkv.models.texts import load_text

    ids = encode(loaded.tokenizer, load_text(text_src, min_chars=16 * n))
    if not ids:
        raise StreamkvError(f"text '{text_src}' has no tokens")
    return (ids * (n // len(ids) + 1))[:n]


def _plain(record: dict) -> dict:
    """JSON-ready values: Python numbers and bools, None for NaN (no measurement)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, (np.bool_, bool)):
            value = bool(value)
        elif isinstance(value, (np.integer,)):
            value = int(value)
        elif isinstance(value, (np.floating, float)):
            value = float(value) if np.isfinite(value) else None
        out[key] = value
    return out


def _section_parts(model, tokens: list[int], cfg: BenchConfig, progress: bool,
                   source: str | None) -> dict[str, Callable[[], Iterator[list[dict]]]]:
    """Each section as its parts (a cap, a stream method), each part's rows computed when it is reached."""
    cap = cfg.caps[0]
    return {
        "overhead": lambda: ([_plain(r) for r in overhead(model, tokens, c, cfg, progress, source).to_dict("records")]
                             for c in cfg.caps),
        "compile": lambda: ([_plain(compile_ratio(model, tokens, cap, cfg, progress, m))] for m in cfg.compile_methods),
        "memory": lambda: ([_plain(memory_stream(model, tokens, m, cap, cfg, progress))] for m in cfg.stream_methods),
        "evaluator": lambda: iter([[_plain(r) for r in evaluator_speed(model, tokens, cap, cfg, progress, source)]]),
        "weights": lambda: iter([[_plain(r) for r in weights_speed(model, tokens, cap, cfg, progress, source)]]),
    }


def run(model, tokens: list[int], cfg: BenchConfig, progress: bool = True, source: str | None = None,
        out: str | Path | None = None, context: dict | None = None) -> dict:
    """Every section of the benchmark on one model; a dict ready for JSON (`source`: the model's, for llama.cpp).

    `out`: the result file, rewritten (atomically) as each section starts and each of its parts finishes;
    `context`: what the caller adds to the result's config (model, text, ...), in every version of the file.
    The result's `sections` holds each section's status ("pending", "running", "ok", "failed" or "skipped"),
    error and seconds; `failed` names the failed ones and `status` is "failed" if there are any.
    """
    cfg.check()
    device = next(model.parameters()).device
    chosen = [s for s in BENCH_SECTIONS if s in cfg.sections and (s != "compile" or cfg.compile)]
    result = {"config": {**asdict(cfg), **(context or {})}, "status": "running", "failed": [],
              "sections": {s: {"status": "pending" if s in chosen else "skipped", "error": None, "seconds": None}
                           for s in BENCH_SECTIONS},
              "overhead": [], "compile": [], "memory": [], "evaluator": [], "weights": [],
              "meta": provenance.collect(device, next(model.parameters()).dtype, 0)}

    def save():
        if out is not None:
            write_json(result, out)

    parts = _section_parts(model, tokens, cfg, progress, source)
    for name in chosen:
        section = result["sections"][name]
        section["status"] = "running"
        save()
        t0 = time.perf_counter()
        try:
            for rows in parts[name]():
                result[name] += rows
                save()
        except Exception as exc:  # the other sections still run; the rows of the parts done so far stay
            where = "".join(traceback.format_tb(exc.__traceback__, limit=-3))[-2000:]  # the message is in error
            section.update(status="failed", error=error_text(exc), where=where)
        else:
            # torch.compile refusing the ring's fixed-shape step is measured, not raised: its row carries the error,
            # and the section fails (that step is made to compile).  A weights variant or a cache's general step that
            # fails is a row of its own, a measured negative: the section still compares the others.
            refused = [r["error"] for r in result[name] if r.get("status") == "failed" and name != "weights"
                       and r.get("method", RING_STATIC) == RING_STATIC]
            section.update(status="failed" if refused else "ok", error=refused[0] if refused else None)
        section["seconds"] = time.perf_counter() - t0
        if section["status"] == "failed":
            result["failed"].append(name)
        save()
    result["status"] = "failed" if result["failed"] else "ok"
    save()
    return result
