# streamkv: streaming LLM decoding with attention sinks, measured against a fixed baseline.
#
#   prepare_model -> tokenize -> baseline (recompute, once per model x text)
#                             -> evaluate (one job per configuration, needs its baseline)
#   -> aggregate (results/summary.csv + NLL spike diagnosis)
#   -> probes (one rule per probe of streamkv.probes.PROBES: verify_max_drop_effect, verify_slack_effect,
#      profile_prune_overhead, summarize_k_quality)
#   prepare_model -> recall (one job per row of the recall probe) -> recall_table
#   prepare_model -> bench (streamkv bench: overhead, speedup, compile, memory as ratios; one timed job)
#   -> report (report/paper_tables.md + figures: Pareto, NLL traces, spikes, ablations, probes)
#
# Run: snakemake --cores 1 report/paper_tables.md      (profiles/default is picked up automatically)

from snakemake.utils import min_version, validate

min_version("9.0")


# --configfile replaces the default config instead of being merged into it.
if not config:

    configfile: "config/config.yaml"


validate(config, "config/schema.yaml")


include: "rules/common.smk"
include: "rules/sources.smk"
include: "rules/baseline.smk"
include: "rules/evaluate.smk"
include: "rules/probes.smk"
include: "rules/bench.smk"
include: "rules/aggregate.smk"
include: "rules/report.smk"
include: "rules/long_stream.smk"
include: "rules/recall.smk"


# Cheap rules stay on the submitting machine when a cluster executor is used.
localrules:
    all,
    tokenize,
    aggregate,
    figures,
    ablation_figure,
    paper_tables,
    long_stream_report,


rule all:
    input:
        "report/paper_tables.md",
