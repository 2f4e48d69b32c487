"""Snakemake: one evaluation (a configuration, a shared quality job or the baseline).

A configuration whose attention schedule is another run's takes that run's NLLs (input `quality`) and only
times its own step.  A failure is written as a failed result, with the reason.
"""

import json
import shutil
import traceback
from pathlib import Path

import pandas as pd

from streamkv.cli import write_json, write_trace
from streamkv.errors import NotInstalled, StreamkvError
from streamkv.evaluation import EvalParams, TRACE_COLUMNS, evaluate, failed_record, timed_row
from streamkv.pipeline import log_to
from streamkv.sources import load_model

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
            loaded = load_model(f"path:{Path(snakemake.input.model).parent}", dtype=params.dtype, device=params.device)
        if shared is None:
            record, trace = evaluate(loaded, tokens["ids"], params)
        else:
            record = timed_row(loaded, tokens["ids"], params, shared)
        record["params"]["model"], record["params"]["text"] = params.model, params.text
    except NotInstalled as exc:  # an optional peer: its row says how to install it
        print(exc)
        record = failed_record(params, str(exc), status="not_installed")
    except (StreamkvError, RuntimeError, MemoryError) as exc:
        traceback.print_exc()
        record = failed_record(params, f"{type(exc).__name__}: {exc}")
    write_json(record, snakemake.output.result)
    if shared is not None and record["status"] == "ok":
        shutil.copyfile(snakemake.input.quality_trace, snakemake.output.trace)  # the shared per-token NLLs
    else:  # keep the output contract: an empty trace for a failed run
        write_trace(trace if trace is not None else pd.DataFrame(columns=list(TRACE_COLUMNS)), snakemake.output.trace)
    print(f"status {record['status']}: {record['error'] or record['metrics']['ppl']}")
