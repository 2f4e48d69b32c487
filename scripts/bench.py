"""Snakemake: one `streamkv bench` run on the prepared model; the tables go to the log as well."""

from pathlib import Path

from streamkv.bench import run as bench
from streamkv.bench.tables import bench_markdown
from streamkv.evaluation.params import BenchConfig
from streamkv.jobio import log_to
from streamkv.models.sources import load_model

with log_to(snakemake.log[0]):
    settings = dict(snakemake.params.settings)
    for key in ("caps", "compile_methods", "stream_methods", "sections", "weights", "weights_compile",
                "kvpress_methods"):
        if key in settings:
            settings[key] = tuple(settings[key])
    cfg = BenchConfig(**settings).check()
    p = snakemake.params
    loaded = load_model(f"path:{Path(snakemake.input.model).parent}", dtype=p.dtype, device=p.device)
    tokens = bench.stream_tokens(loaded, p.text, cfg.tokens_needed())
    # A failed section is recorded in the result (the job still succeeds, so the report shows the failure
    # beside the sections that finished); the file is rewritten as each section finishes.
    result = bench.run(loaded.model, tokens, cfg, source=loaded.source, out=snakemake.output[0],
                       context=dict(model=snakemake.wildcards.model, text=snakemake.wildcards.text,
                                    text_source=p.text, dtype=p.dtype, device=p.device))
    print(bench_markdown(result))
