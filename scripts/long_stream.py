"""Snakemake: the long stream, the whole text through one cache configuration with the exact parallel evaluator.

Writes the result record and the per-token trace; rule long_stream_report makes the page from them.
"""

import time
from pathlib import Path

from streamkv.analysis import long_stream
from streamkv.evaluation.loop import EvalParams, evaluate
from streamkv.jobio import log_to, write_json, write_table
from streamkv.models.sources import encode, load_model, start_tokens
from streamkv.models.texts import load_text

with log_to(snakemake.log[0]):
    started = time.perf_counter()
    spec = dict(snakemake.params.eval)
    loaded = load_model(f"path:{Path(snakemake.input.model).parent}", dtype=spec["dtype"], device=spec["device"])
    limit = spec["max_tokens"]
    text = load_text(spec["text"], min_chars=16 * limit if limit else 0)
    ids = start_tokens(loaded.tokenizer) + encode(loaded.tokenizer, text)
    n = long_stream.stream_length(len(ids), limit, spec["text"])
    print(f"{spec['text']}: {len(text):,} characters, {len(ids):,} tokens, evaluating {n:,}", flush=True)
    record, trace = evaluate(loaded, ids[:n], EvalParams(**{**spec, "max_tokens": n}))
    # the evaluator's own time (the forwards) and the job's (loading, tokenising and the schedule included)
    sec = record["metrics"]["total_sec"]
    info = {"n_available": len(ids), "n_tokens": n, "tokens_per_s": record["metrics"]["n_scored"] / sec,
            "job_sec": time.perf_counter() - started}
    record[long_stream.KEY] = info
    write_table(trace, snakemake.output.trace)  # the trace first, then the result that names it
    write_json(record, snakemake.output.result)
    print(f"status {record['status']}: PPL {record['metrics']['ppl']}, {info['tokens_per_s']:.1f} tokens/s "
          f"({sec:.1f} s in the evaluator, {info['job_sec']:.1f} s in all)")
