# One evaluation job per configuration; the output path spells out its parameters.


rule evaluate:
    input:
        model="results/models/{model}/streamkv_source.json",
        tokens="results/tokens/{model}/{text}.json",
        baseline=baseline_file,
    output:
        result="results/runs/{model}/{text}/{setting}/{run}.json",
        trace="results/runs/{model}/{text}/{setting}/{run}.parquet",
    params:
        eval=eval_params("runs"),
        library=LIBRARY,
        installed=peer_installed,
    log:
        "logs/evaluate/{model}/{text}/{setting}/{run}.log",
    benchmark:
        "benchmarks/evaluate/{model}/{text}/{setting}/{run}.tsv"
    conda:
        "../envs/streamkv.yaml"
    threads: workflow.cores  # a timed job has the machine to itself
    resources:
        timing=1,
        mem_mb=4000,
    script:
        "../scripts/evaluate.py"
