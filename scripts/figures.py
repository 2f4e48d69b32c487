"""Snakemake: the Pareto, NLL trace and spike figures of one (model, text)."""

import pandas as pd

from streamkv.analysis.figures import nll_trace_figure, pareto_figure, spike_curve_figure, spike_runs
from streamkv.analysis.summary import trace_path
from streamkv.jobio import log_to

with log_to(snakemake.log[0]):
    model, text = snakemake.wildcards.model, snakemake.wildcards.text
    summary = pd.read_parquet(snakemake.input.summary)
    part = summary[(summary.model_key == model) & (summary.text_key == text)]
    pareto_figure(part, snakemake.output.pareto, f"{model} · {text}: speed vs quality")
    name = snakemake.params.trace_run
    files = dict(zip(part.name, part.file))
    # the run against the full-coverage reference where the config names one (every target), else the baseline
    reference = snakemake.params.reference
    anchor = reference if reference in files and part.loc[part.name == reference, "status"].iloc[0] == "ok" else None
    anchor_file = files[anchor] if anchor else part.loc[part.group == "baseline", "file"].iloc[0]
    anchor_trace = pd.read_parquet(trace_path(anchor_file))
    run = pd.read_parquet(trace_path(files[name])) if name in files else None
    nll_trace_figure(anchor_trace, run, name, snakemake.output.nll_trace,
                     f"{model} · {text}: {name} vs {anchor or 'baseline'}", smooth=snakemake.params.smooth,
                     anchor=f"{anchor} (reference)" if anchor else "baseline (recompute)")
    spike_curve_figure(pd.read_parquet(snakemake.input.spike_curves), spike_runs(part), snakemake.output.spikes,
                       f"{model} · {text}: excess NLL after a prune", reference=snakemake.params.reference)
