# The probes: controlled comparisons over runs the grid already made (no extra evaluation here).
# Each reads the summary and the per-event spike table and writes its table and figure per model x text.

PROBE_INPUT = {"summary": "results/summary.parquet", "events": "results/spike_events.parquet"}


def probe_output(probe):
    return {
        "table": f"results/probes/{probe}/{{model}}/{{text}}.csv",
        "figure": report(
            f"report/figures/{{model}}/{{text}}/{probe}.png",
            category="Probes",
            subcategory="{model} / {text}",
            caption="../report/templates/probe.rst",
        ),
    }


rule verify_max_drop_effect:
    input:
        **PROBE_INPUT,
    output:
        **probe_output("verify_max_drop_effect"),
    params:
        probe="verify_max_drop_effect",
        library=ANALYSIS,
    log:
        "logs/probes/verify_max_drop_effect/{model}/{text}.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/probe.py"


rule verify_slack_effect:
    input:
        **PROBE_INPUT,
    output:
        **probe_output("verify_slack_effect"),
    params:
        probe="verify_slack_effect",
        library=ANALYSIS,
    log:
        "logs/probes/verify_slack_effect/{model}/{text}.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/probe.py"


rule profile_prune_overhead:
    input:
        **PROBE_INPUT,
    output:
        **probe_output("profile_prune_overhead"),
    params:
        probe="profile_prune_overhead",
        library=ANALYSIS,
    log:
        "logs/probes/profile_prune_overhead/{model}/{text}.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/probe.py"


rule summarize_k_quality:
    input:
        **PROBE_INPUT,
    output:
        **probe_output("summarize_k_quality"),
    params:
        probe="summarize_k_quality",
        library=ANALYSIS,
    log:
        "logs/probes/summarize_k_quality/{model}/{text}.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/probe.py"
