# Tables (jinja2) and figures (seaborn) from the summary; figures are registered for `snakemake --report`.

rule figures:
    input:
        summary="results/summary.parquet",
        spike_curves="results/spike_curves.parquet",
        traces=traced_runs,
    output:
        pareto=report(
            "report/figures/{model}/{text}/pareto.png",
            category="Pareto",
            subcategory="{model} / {text}",
            caption="../report/templates/pareto.rst",
        ),
        nll_trace=report(
            "report/figures/{model}/{text}/nll_trace.png",
            category="NLL traces",
            subcategory="{model} / {text}",
            caption="../report/templates/nll_trace.rst",
        ),
        spikes=report(
            "report/figures/{model}/{text}/spikes.png",
            category="NLL spikes",
            subcategory="{model} / {text}",
            caption="../report/templates/spikes.rst",
        ),
    params:
        trace_run=config["report"]["trace_run"],
        reference=config.get("reference"),
        smooth=config["report"]["smooth"],
        library=ANALYSIS,
    log:
        "logs/figures/{model}/{text}.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/figures.py"


rule ablation_figure:
    input:
        summary="results/summary.parquet",
    output:
        report(
            "report/figures/{model}/{text}/ablation_{ablation}.png",
            category="Ablations",
            subcategory="{model} / {text}",
            caption="../report/templates/ablation.rst",
        ),
    params:
        library=ANALYSIS,
    log:
        "logs/figures/{model}/{text}/ablation_{ablation}.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/ablation_figure.py"


rule paper_tables:
    input:
        summary="results/summary.parquet",
        comparisons="results/comparisons.csv",
        template="report/templates/paper_tables.md.j2",
        figures=FIGURES + ABLATION_FIGURES + PROBE_FIGURES + RECALL_FIGURES,
        probes=PROBE_TABLES,
        recall=RECALL_TABLES,
        bench=bench_files(),
    output:
        "report/paper_tables.md",
    params:
        config=config,
        library=ANALYSIS,
    log:
        "logs/paper_tables.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/report.py"
