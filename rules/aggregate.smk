# All results into one table: one row per report row, with delta PPL and speedup against its baseline
# and the NLL spike diagnosis of every run (per event and per config).


rule aggregate:
    input:
        results=[job.path() for job in JOBS],
        traces=[job.path("parquet") for job in JOBS],
    output:
        csv="results/summary.csv",
        parquet="results/summary.parquet",
        spike_events="results/spike_events.parquet",
        spike_curves="results/spike_curves.parquet",
        comparisons="results/comparisons.csv",
    params:
        # which report rows each result fills: renaming a row re-runs only this and the report
        rows=[[job.path(), job.model, job.text, job.labels] for job in JOBS],
        diagnostics={
            "horizon": config["diagnostics"]["spike_horizon"],
            "threshold": config["diagnostics"]["spike_threshold"],
        },
        stats=config["stats"],
        reference=config.get("reference"),
        controls=pipeline.controls(config),
        findings=config["findings"],
        library=ANALYSIS,
    log:
        "logs/aggregate.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/aggregate.py"
