# Tables (jinja2) and figures (seaborn) from the summary; figures are registered for `snakemake --report`.

PAIRS = sorted({(job.model, job.text) for job in JOBS})


def sweeps(kind):
    """(model, text, key) of every ablation or probe the grid holds."""
    return sorted({(job.model, job.text, group.split(":", 1)[1]) for job in JOBS for group, _, _ in job.labels
                   if group.startswith(kind + ":")})


FIGURES = [f"report/figures/{m}/{t}/{kind}.png" for m, t in PAIRS for kind in ("pareto", "nll_trace", "spikes")]
ABLATION_FIGURES = [f"report/figures/{m}/{t}/ablation_{a}.png" for m, t, a in sweeps("ablation")]
PROBE_TABLES = [f"results/probes/{p}/{m}/{t}.csv" for m, t, p in sweeps("probe")]
PROBE_FIGURES = [f"report/figures/{m}/{t}/{p}.png" for m, t, p in sweeps("probe")]


def traced_runs(wildcards):
    """Traces the NLL figure draws: the baseline and the run named by report.trace_run."""
    name = config["report"]["trace_run"]
    here = [job for job in JOBS if (job.model, job.text) == (wildcards.model, wildcards.text)]
    chosen = [job for job in here if job.kind == "baselines" or any(label[1] == name for label in job.labels)]
    return [job.path("parquet") for job in chosen]


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
        figures=FIGURES + ABLATION_FIGURES + PROBE_FIGURES,
        probes=PROBE_TABLES,
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
