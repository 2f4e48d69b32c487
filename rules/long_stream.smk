# The long stream (config key `long_stream`): one cache configuration over a whole long text, by default
# strict Start+Recent over every embedded play end to end (about 1.7M tokens), scored by the exact
# parallel evaluator; PPL per segment against position. Not an input of `all` or of paper_tables:
# run it with `snakemake report/long_stream.md` (86 minutes measured on 2 CPU cores, see docs/pipeline.md).

rule long_stream:
    input:
        model="results/models/{model}/streamkv_source.json",
    output:
        result="results/long_stream/{model}/{setting}/{run}.json",
        trace="results/long_stream/{model}/{setting}/{run}.parquet",
    params:
        eval=long_stream_eval,
        library=LIBRARY,
    log:
        "logs/long_stream/{model}/{setting}/{run}.log",
    benchmark:
        "benchmarks/long_stream/{model}/{setting}/{run}.tsv"
    conda:
        "../envs/streamkv.yaml"
    # Not timed, but all cores: nothing runs beside it, and torch's threads slow down many-fold when
    # another job shares their cores.
    threads: workflow.cores
    resources:
        mem_mb=8000,
    script:
        "../scripts/long_stream.py"


rule long_stream_report:
    input:
        unpack(long_stream_result),
        template="report/templates/long_stream.md.j2",
    output:
        report="report/long_stream.md",
        figure=report("report/figures/long_stream.png", category="Long stream"),
    params:
        segment=lambda wc: long_stream.spec(config)["segment"],
        margin=lambda wc: long_stream.spec(config)["margin"],
        library=LONG_STREAM_ANALYSIS,
    log:
        "logs/long_stream_report.log",
    conda:
        "../envs/streamkv.yaml"
    # A script of its own, not scripts/long_stream.py: an edit of the page's code must not count as a
    # change of the evaluation's code, which would re-run the evaluation.
    script:
        "../scripts/long_stream_report.py"
