# The fixed baseline (recompute over sinks + window for every token), once per model x text x protocol.


rule baseline:
    input:
        model="results/models/{model}/streamkv_source.json",
        tokens="results/tokens/{model}/{text}.json",
    output:
        result="results/baselines/{model}/{text}/{setting}/{run}.json",
        trace="results/baselines/{model}/{text}/{setting}/{run}.parquet",
    params:
        eval=eval_params("baselines"),
        library=LIBRARY,
    log:
        "logs/baseline/{model}/{text}/{setting}/{run}.log",
    benchmark:
        "benchmarks/baseline/{model}/{text}/{setting}/{run}.tsv"
    conda:
        "../envs/streamkv.yaml"
    threads: workflow.cores  # a timed job has the machine to itself
    resources:
        timing=1,
        mem_mb=4000,
    script:
        "../scripts/evaluate.py"
