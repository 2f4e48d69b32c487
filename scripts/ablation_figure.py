"""Snakemake: the figure of one ablation for one model x text (a heatmap for sigma x delta grids)."""

import pandas as pd

from streamkv.analysis.figures import ablation_figure, softlite_heatmap
from streamkv.jobio import log_to

with log_to(snakemake.log[0]):
    model, text, key = snakemake.wildcards.model, snakemake.wildcards.text, snakemake.wildcards.ablation
    summary = pd.read_parquet(snakemake.input.summary)
    part = summary[(summary.group == f"ablation:{key}") & (summary.model_key == model) & (summary.text_key == text)]
    ok = part[part.status == "ok"]
    title = f"{model} · {text}: ablation {key}"
    if ok.cache_slack.nunique() > 1 and ok.max_drop.nunique() > 1:
        softlite_heatmap(part, snakemake.output[0], title)
    else:
        ablation_figure(part, key, snakemake.output[0], title)
