# One job per configuration: its per-token NLLs and its step time (a timing part interleaved with a no-eviction
# reference). A row with the attention schedule of another run (mit, ring and strict start_recent, say) takes
# that run's NLLs and only times its own step; so does a row scored by the decode loop, whose NLLs come from a
# one-core quality job of its own (two of them run side by side). Paths spell out the parameters.


rule quality:  # the NLLs of a shared schedule that no row of the grid has, or of a row of the decode loop
    input:
        model="results/models/{model}/streamkv_source.json",
        tokens="results/tokens/{model}/{text}.json",
    output:
        result="results/quality/{model}/{text}/{setting}/{run}.json",
        trace="results/quality/{model}/{text}/{setting}/{run}.parquet",
    params:
        eval=eval_params("quality"),
        library=LIBRARY,
        installed=peer_installed("quality"),
    log:
        "logs/quality/{model}/{text}/{setting}/{run}.log",
    benchmark:
        "benchmarks/quality/{model}/{text}/{setting}/{run}.tsv"
    conda:
        "../envs/streamkv.yaml"
    threads: quality_threads  # one core for the decode loop (two such jobs share a 2-core machine), else all
    priority: 1  # started first, in pairs: the timed jobs, which take every core, come after them
    resources:
        mem_mb=4000,
    script:
        "../scripts/evaluate.py"


rule evaluate:
    input:
        unpack(quality_files),
        model="results/models/{model}/streamkv_source.json",
        tokens="results/tokens/{model}/{text}.json",
    output:
        result="results/runs/{model}/{text}/{setting}/{run}.json",
        trace="results/runs/{model}/{text}/{setting}/{run}.parquet",
    params:
        eval=eval_params("runs"),
        library=LIBRARY,
        installed=peer_installed("runs"),
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
