"""Snakemake: every result into results/summary.csv and .parquet (failed runs stay, as failed rows),
with the NLL spike diagnosis of every run against its baseline."""

from streamkv.pipeline import log_to
from streamkv.summary import pipeline_summary, spike_diagnosis

with log_to(snakemake.log[0]):
    frame = pipeline_summary(snakemake.params.rows)
    frame, events, curves = spike_diagnosis(frame, **snakemake.params.diagnostics)
    frame.to_csv(snakemake.output.csv, index=False)
    frame.to_parquet(snakemake.output.parquet, index=False)
    events.to_parquet(snakemake.output.spike_events, index=False)
    curves.to_parquet(snakemake.output.spike_curves, index=False)
    print(f"{len(frame)} rows, {int((frame.status != 'ok').sum())} failed, {len(events)} prune events diagnosed")
