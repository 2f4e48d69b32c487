"""Snakemake: the long stream's page (report/long_stream.md) and figure from the run's record and trace."""

from streamkv.analysis import long_stream
from streamkv.jobio import log_to

with log_to(snakemake.log[0]):
    table = long_stream.write_report(snakemake.input.result, snakemake.input.trace, snakemake.input.template,
                                     snakemake.params.segment, snakemake.output.report, snakemake.output.figure,
                                     snakemake.params.margin)
    print(f"wrote {snakemake.output.report}: {len(table)} segments")
