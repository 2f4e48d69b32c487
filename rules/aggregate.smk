# All results into one table: one row per report row, with delta PPL and speedup against its baseline.


rule aggregate:
    input:
        results=[job.path() for job in JOBS],
    output:
        csv="results/summary.csv",
        parquet="results/summary.parquet",
    params:
        # which report rows each result fills: renaming a row re-runs only this and the report
        rows=[[job.path(), job.model, job.text, job.labels] for job in JOBS],
    log:
        "logs/aggregate.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/aggregate.py"
