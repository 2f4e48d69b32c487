# Tables (jinja2) and figures (seaborn) from the summary; figures are registered for `snakemake --report`.

PAIRS = sorted({(job.model, job.text) for job in JOBS})
FIGURES = [f"report/figures/{m}/{t}/{kind}.png" for m, t in PAIRS for kind in ("pareto", "nll_trace")]


def traced_runs(wildcards):
    """Traces the NLL figure draws: the baseline and the run named by report.trace_run."""
    name = config["report"]["trace_run"]
    here = [job for job in JOBS if (job.model, job.text) == (wildcards.model, wildcards.text)]
    chosen = [job for job in here if job.kind == "baselines" or any(label[1] == name for label in job.labels)]
    return [job.path("parquet") for job in chosen]


rule figures:
    input:
        summary="results/summary.parquet",
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
    params:
        trace_run=config["report"]["trace_run"],
        smooth=config["report"]["smooth"],
    log:
        "logs/figures/{model}/{text}.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/figures.py"


rule paper_tables:
    input:
        summary="results/summary.parquet",
        template="report/templates/paper_tables.md.j2",
        figures=FIGURES,
    output:
        "report/paper_tables.md",
    params:
        config=config,
    log:
        "logs/paper_tables.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/report.py"
