"""Snakemake: one evaluation (a configuration, a shared quality job or the baseline).

A configuration whose attention schedule is another run's takes that run's NLLs (input `quality`) and only
times its own step.  A failure is written as a failed result, with the reason.
"""

import json
import traceback
from pathlib import Path

import pandas as pd
import torch

from streamkv.errors import NotInstalled, StreamkvError
from streamkv.evaluation.loop import RUN_FAILURES, EvalParams, evaluate, failure, timed_row
from streamkv.evaluation.results import TRACE_COLUMNS
from streamkv.jobio import log_to, write_json, write_table
from streamkv.models.sources import load_model

# torch's threads follow the job's cores: a one-core job beside another must not spread over both (torch's threads
# slow down many-fold on shared cores); the peers' workers take the same count.
torch.set_num_threads(snakemake.threads)

with log_to(snakemake.log[0]):
    params = EvalParams(**snakemake.params.eval)
    shared = json.loads(Path(snakemake.input.quality).read_text()) if "quality" in snakemake.input.keys() else None
    trace = None
    try:
        tokens = json.loads(Path(snakemake.input.tokens).read_text())
        if tokens["n_available"] < params.max_tokens:
            raise StreamkvError(f"text '{params.text}' has {tokens['n_available']} tokens, fewer than "
                                f"max_tokens ({params.max_tokens}); lower protocol.max_tokens or the row's max_tokens")
        loaded = None
        if shared is None or (shared["status"] == "ok" and params.timing_steps):
            loaded = load_model(f"path:{Path(snakemake.input.model).parent}", dtype=params.dtype, device=params.device,
                                weights=params.weights)
        if shared is None:
            record, trace = evaluate(loaded, tokens["ids"], params)
        else:
            record = timed_row(loaded, tokens["ids"], params, shared)
        record["params"]["model"], record["params"]["text"] = params.model, params.text
    except RUN_FAILURES as exc:  # a failed row, with the reason (an absent optional peer: how to install it)
        if isinstance(exc, NotInstalled):
            print(exc)
        else:
            traceback.print_exc()
        record = failure(params, exc)
    # the trace first, then the result that names it (each written atomically)
    if shared is not None and record["status"] == "ok":  # the shared per-token NLLs
        write_table(pd.read_parquet(snakemake.input.quality_trace), snakemake.output.trace)
    else:  # keep the output contract: an empty trace for a failed run
        write_table(trace if trace is not None else pd.DataFrame(columns=list(TRACE_COLUMNS)), snakemake.output.trace)
    write_json(record, snakemake.output.result)
    print(f"status {record['status']}: {record['error'] or record['metrics']['ppl']}")
