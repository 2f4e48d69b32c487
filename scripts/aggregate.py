"""Snakemake: every result into results/summary.csv and .parquet (failed runs stay, as failed rows)."""

from streamkv.pipeline import log_to
from streamkv.summary import pipeline_summary

with log_to(snakemake.log[0]):
    frame = pipeline_summary(snakemake.params.rows)
    frame.to_csv(snakemake.output.csv, index=False)
    frame.to_parquet(snakemake.output.parquet, index=False)
    print(f"{len(frame)} rows, {int((frame.status != 'ok').sum())} failed")
