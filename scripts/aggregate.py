"""Snakemake: every result into results/summary.csv and .parquet (failed runs stay, as failed rows),
every delta PPL against the baseline and against the full-coverage reference with its interval (paired on the
targets both runs scored), the NLL spike diagnosis of every run against the reference and the dense row, and the
intervals of every sweep point against its control and of the findings."""

from streamkv.analysis.summary import comparisons, pipeline_summary, spike_diagnosis, with_intervals
from streamkv.jobio import log_to, write_table

with log_to(snakemake.log[0]):
    frame = pipeline_summary(snakemake.params.rows)
    frame = with_intervals(frame, snakemake.params.stats, reference=snakemake.params.reference)
    frame, events, curves = spike_diagnosis(frame, snakemake.params.reference, **snakemake.params.diagnostics)
    compared = comparisons(frame, snakemake.params.controls, snakemake.params.findings, snakemake.params.stats)
    for table, path in ((frame, snakemake.output.csv), (frame, snakemake.output.parquet),
                        (events, snakemake.output.spike_events), (curves, snakemake.output.spike_curves),
                        (compared, snakemake.output.comparisons)):
        write_table(table, path)
    print(f"{len(frame)} rows, {int((frame.status != 'ok').sum())} failed, {len(events)} prune events diagnosed, "
          f"{len(compared)} comparisons")
