"""Snakemake: report/paper_tables.md from the summary and the tracked jinja2 template."""

import json
from pathlib import Path

import pandas as pd

from streamkv.analysis.report import render
from streamkv.jobio import log_to, write_text

with log_to(snakemake.log[0]):
    frame = pd.read_parquet(snakemake.input.summary)
    bench = [json.loads(Path(path).read_text()) for path in snakemake.input.bench]
    compared = pd.read_csv(snakemake.input.comparisons)
    recall = {Path(path).stem: pd.read_csv(path) for path in snakemake.input.recall}  # (one per model)
    write_text(render(frame, snakemake.input.template, snakemake.params.config, bench, compared, recall),
               snakemake.output[0])
    print(f"wrote {snakemake.output[0]}")
