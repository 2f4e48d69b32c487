# The recall probe (config key `recall`): what eviction forgets. Each row it names runs at the probe's cap over
# seeded streams (a passage copied, a pass key asked for, D tokens after their first occurrence), batched: the
# exact parallel evaluator for position-only caches, the decode loop's stepper for the others. Then one table,
# figure and finding per model for the report.


rule recall:
    input:
        model="results/models/{model}/streamkv_source.json",
    output:
        result="results/recall/{model}/{setting}/{run}.json",
        instances="results/recall/{model}/{setting}/{run}.parquet",
    params:
        eval=lambda wc: recall_job(wc)["eval"],
        recall=lambda wc: recall_jobs.spec(config),
        library=LIBRARY,
        installed=lambda wc: installed(recall_job(wc)["eval"]["method"]),
    log:
        "logs/recall/{model}/{setting}/{run}.log",
    benchmark:
        "benchmarks/recall/{model}/{setting}/{run}.tsv"
    conda:
        "../envs/streamkv.yaml"
    threads: workflow.cores  # a batch of streams per forward: every core helps
    resources:
        mem_mb=8000,
    script:
        "../scripts/recall.py"


rule recall_table:
    input:
        results=recall_results,
    output:
        table="results/probes/recall/{model}.csv",
        figure=report(
            "report/figures/{model}/recall.png",
            category="Probes",
            subcategory="{model} / recall",
            caption="../report/templates/probe.rst",
        ),
    params:
        names=lambda wc: {run: job["name"] for run, job in RECALL_JOBS.items()},
        cap=lambda wc: recall_jobs.spec(config)["cap"],
        reference=lambda wc: recall_jobs.spec(config)["reference"],
        library=ANALYSIS,
    log:
        "logs/probes/recall/{model}.log",
    localrule: True
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/recall_table.py"
