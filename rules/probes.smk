# The probes: controlled comparisons over runs the grid already made (no extra evaluation here).
# Each reads the summary and the per-event spike table and writes its table and figure per model x text.

# One rule per probe of the registry (streamkv.probes.PROBES): a new probe needs no rule of its own.
for probe in pipeline.PROBES:

    rule:
        name:
            probe
        input:
            **PROBE_INPUT,
        output:
            **probe_output(probe),
        params:
            probe=probe,
            library=ANALYSIS,
        log:
            f"logs/probes/{probe}/{{model}}/{{text}}.log",
        localrule: True
        conda:
            "../envs/streamkv.yaml"
        script:
            "../scripts/probe.py"
