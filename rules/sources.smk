# Model preparation and tokenisation: done once, reused by every evaluation.


rule prepare_model:
    output:
        "results/models/{model}/streamkv_source.json",
    params:
        source=lambda wc: pipeline.model_source(config, wc.model),
        dtype=config["protocol"]["dtype"],
    log:
        "logs/prepare_model/{model}.log",
    benchmark:
        "benchmarks/prepare_model/{model}.tsv"
    conda:
        "../envs/streamkv.yaml"
    resources:
        mem_mb=4000,
    script:
        "../scripts/prepare_model.py"


rule tokenize:
    input:
        model="results/models/{model}/streamkv_source.json",
    output:
        "results/tokens/{model}/{text}.json",
    params:
        source=lambda wc: pipeline.text_source(config, wc.text),
        max_tokens=lambda wc: pipeline.max_tokens(config, wc.text, wc.model),  # (the model's ceiling, if lower)
    log:
        "logs/tokenize/{model}/{text}.log",
    conda:
        "../envs/streamkv.yaml"
    script:
        "../scripts/tokenize.py"
