"""Snakemake: one row of the recall probe over every batch of its streams (per-instance results and a record).

A failure is written as a failed record with the reason, and an empty instance table: the probe's table shows
the row as failed.
"""

import traceback
from pathlib import Path

import pandas as pd
import torch

from streamkv.errors import NotInstalled
from streamkv.evaluation.loop import RUN_FAILURES, EvalParams, failure
from streamkv.evaluation.recall import COLUMNS, KEY, evaluate_recall
from streamkv.jobio import log_to, write_json, write_table
from streamkv.models.sources import load_model

torch.set_num_threads(snakemake.threads)

with log_to(snakemake.log[0]):
    params = EvalParams(**snakemake.params.eval)
    frame = pd.DataFrame(columns=list(COLUMNS))
    try:
        loaded = load_model(f"path:{Path(snakemake.input.model).parent}", dtype=params.dtype, device=params.device,
                            weights=params.weights)
        record, frame = evaluate_recall(loaded, params, dict(snakemake.params.recall), params.text, progress=True)
    except RUN_FAILURES as exc:
        if isinstance(exc, NotInstalled):
            print(exc)
        else:
            traceback.print_exc()
        record = failure(params, exc)
        record[KEY] = dict(snakemake.params.recall)
    write_table(frame, snakemake.output.instances)  # the instances first, then the record that names them
    write_json(record, snakemake.output.result)
    print(f"status {record['status']}: {record['error'] or 'done'}")
