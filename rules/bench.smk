# The performance benchmark (`streamkv bench`): eviction overhead, speedup, compile and memory as
# ratios from one run, for the Performance section of the report. Configured by the `bench` key.
# A section that fails is recorded in the JSON as failed, with its error, and the job still succeeds:
# the report shows the failure beside the sections that finished.

rule bench:
    input:
        model="results/models/{model}/streamkv_source.json",
    output:
        "results/bench/{model}/{text}.json",
    params:
        settings=lambda wc: pipeline.bench_settings(config, wc.model),
        text=lambda wc: pipeline.text_source(config, wc.text),
        dtype=config["protocol"]["dtype"],
        device=config["protocol"]["device"],
        library=LIBRARY,
    log:
        "logs/bench/{model}/{text}.log",
    benchmark:
        "benchmarks/bench/{model}/{text}.tsv"
    conda:
        "../envs/streamkv.yaml"
    threads: workflow.cores  # a timed job has the machine to itself
    resources:
        timing=1,
        mem_mb=6000,
    script:
        "../scripts/bench.py"
