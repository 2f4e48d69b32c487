"""Snakemake: save the model as a plain checkpoint that loads fast."""

from pathlib import Path

from streamkv.jobio import log_to
from streamkv.models.sources import prepare_model

with log_to(snakemake.log[0]):
    marker = prepare_model(snakemake.params.source, Path(snakemake.output[0]).parent, dtype=snakemake.params.dtype)
    print(f"prepared {marker['source']} in {Path(snakemake.output[0]).parent}")
