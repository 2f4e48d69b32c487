# The long stream (config key `long_stream`): one cache configuration over a whole long text, by default
# strict Start+Recent over every embedded play end to end (about 1.7M tokens), scored by the exact
# parallel evaluator; PPL per segment against position. Not an input of `all` or of paper_tables:
# run it with `snakemake report/long_stream.md` (about 80 minutes on 2 CPU cores, see README.md).

from streamkv import long_stream

try:
    long_stream.check(config)
except StreamkvError as exc:
    sys.exit(f"Invalid config: {exc}")

# The evaluation depends on the decode loop's modules (LIBRARY, the parallel evaluator among them); the page
# on the analysis modules and on long_stream (which holds the segment table, the trend and the figure).
LONG_STREAM_ANALYSIS = (code_hash((*ANALYSIS_MODULES, "long_stream")) if config["rerun_on_library_change"]
                        else "not tracked")


def long_stream_result(wildcards):
    """The run's record and trace; an absent `long_stream` key stops here with a message that names it."""
    stem = long_stream.result_stem(config)
    return {"result": f"{stem}.json", "trace": f"{stem}.parquet"}


def long_stream_eval(wildcards):
    """All parameters of the run: passed through params:, so any change re-runs it."""
    stem = f"results/{long_stream.KEY}/{wildcards.model}/{wildcards.setting}/{wildcards.run}"
    if stem != long_stream.result_stem(config):
        raise ValueError(f"{stem} is not the configured long stream ({long_stream.result_stem(config)})")
    return long_stream.eval_params(config)


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
        library=LONG_STREAM_ANALYSIS,
    log:
        "logs/long_stream_report.log",
    # A few lines, run here rather than as a script: a script shared with the evaluation, or any edit of
    # it, would count as a change of the evaluation's code and re-run it.
    run:
        with pipeline.log_to(log[0]):
            table = long_stream.write_report(input.result, input.trace, input.template, params.segment,
                                             output.report, output.figure)
            print(f"wrote {output.report}: {len(table)} segments")
