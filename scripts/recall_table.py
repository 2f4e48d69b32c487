"""Snakemake: the recall probe's table (CSV) and figure for one model, from every row's instances."""

import json
from pathlib import Path

import pandas as pd

from streamkv.analysis.figures import stream_probe_figure
from streamkv.jobio import log_to, write_table
from streamkv.probes import STREAM_PROBES

with log_to(snakemake.log[0]):
    probe = STREAM_PROBES["recall"]
    parts = []
    for path in snakemake.input.results:
        record = json.loads(Path(path).read_text())
        name = snakemake.params.names[Path(path).stem]
        instances = pd.read_parquet(Path(path).with_suffix(".parquet"))
        if record["status"] != "ok" or instances.empty:  # one line: the row, failed, with its reason
            instances = pd.DataFrame({"distance": [None], "task": [None]})
        parts.append(instances.assign(name=name, status=record["status"], error=record["error"]))
    table = probe.table(pd.concat(parts, ignore_index=True), snakemake.params.cap, snakemake.params.reference)
    write_table(table, snakemake.output.table)
    stream_probe_figure("recall", table, snakemake.output.figure, f"{snakemake.wildcards.model}: {probe.title}")
    print(f"recall: {len(table)} rows")
