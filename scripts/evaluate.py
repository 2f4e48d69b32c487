"""Snakemake: one evaluation (a configuration or the baseline); a failure is written as a failed result."""

import json
import traceback
from pathlib import Path

from streamkv.cli import write_json, write_trace
from streamkv.errors import NotInstalled, StreamkvError
from streamkv.evaluation import EvalParams, TRACE_COLUMNS, evaluate, failed_record
from streamkv.pipeline import log_to
from streamkv.sources import load_model

with log_to(snakemake.log[0]):
    params = EvalParams(**snakemake.params.eval)
    try:
        loaded = load_model(f"path:{Path(snakemake.input.model).parent}", dtype=params.dtype, device=params.device)
        tokens = json.loads(Path(snakemake.input.tokens).read_text())
        if tokens["n_available"] < params.max_tokens:
            raise StreamkvError(f"text '{params.text}' has {tokens['n_available']} tokens, fewer than "
                                f"protocol.max_tokens ({params.max_tokens}); lower protocol.max_tokens")
        record, trace = evaluate(loaded, tokens["ids"], params)
        record["params"]["model"], record["params"]["text"] = params.model, params.text
    except NotInstalled as exc:  # an optional peer: its row says how to install it
        print(exc)
        record, trace = failed_record(params, str(exc), status="not_installed"), None
    except (StreamkvError, RuntimeError, MemoryError) as exc:
        traceback.print_exc()
        record, trace = failed_record(params, f"{type(exc).__name__}: {exc}"), None
    write_json(record, snakemake.output.result)
    if trace is None:  # keep the output contract: an empty trace for a failed run
        import pandas as pd

        trace = pd.DataFrame(columns=list(TRACE_COLUMNS))
    write_trace(trace, snakemake.output.trace)
    print(f"status {record['status']}: {record['error'] or record['metrics']['ppl']}")
