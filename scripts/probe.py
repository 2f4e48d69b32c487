"""Snakemake: one probe's table (CSV) and figure for one model x text."""

import pandas as pd

from streamkv.analysis.figures import probe_figure
from streamkv.jobio import log_to, write_table
from streamkv.probes import probe_table

with log_to(snakemake.log[0]):
    probe, model, text = snakemake.params.probe, snakemake.wildcards.model, snakemake.wildcards.text
    table = probe_table(probe, pd.read_parquet(snakemake.input.summary), pd.read_parquet(snakemake.input.events),
                        model, text)
    write_table(table, snakemake.output.table)
    probe_figure(probe, table, snakemake.output.figure, f"{model} · {text}: {probe}")
    print(f"{probe}: {len(table)} rows")
