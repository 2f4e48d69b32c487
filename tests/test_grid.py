"""The pipeline's grid without a model: which jobs a config plans (models, texts, ceilings, baselines), their run ids,
and the config errors that name the key."""

import copy
import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from streamkv.analysis import grid
from streamkv.errors import StreamkvError
from streamkv.evaluation.params import SINK_LAYERS, SINK_METHODS, EvalParams

ROOT = Path(__file__).resolve().parents[1]


def load(name: str) -> dict:
    """A shipped config as the pipeline sees it: validated, the schema's defaults filled in."""
    from snakemake.utils import validate

    config = yaml.safe_load((ROOT / "config" / name).read_text())
    validate(config, str(ROOT / "config/schema.yaml"))
    return config


@pytest.fixture
def smoke() -> dict:
    return copy.deepcopy(load("smoke.yaml"))


def planned(config: dict) -> dict:
    """(model, text) -> {group: the names of the rows it fills}, over the report's rows and baselines."""
    out = {}
    for job in grid.jobs(config):
        if job.kind == "quality":
            continue
        for group, name, _ in job.labels:
            out.setdefault((job.model, job.text), {}).setdefault(group, set()).add(name)
    return out


# ----------------------------------------------------------------------------- models, texts, ceilings


def test_a_model_entry_restricts_the_texts_and_caps_the_tokens_of_every_job(smoke):
    grid.check(smoke)
    jobs = grid.jobs(smoke)
    gemma = [job for job in jobs if job.model == "tiny_gemma3"]
    assert {job.text for job in gemma} == {"hamlet"}  # models.tiny_gemma3.texts
    assert {job.n for job in gemma} == {100} and all("_n100_" in job.setting for job in gemma)  # its ceiling
    assert {job.n for job in jobs if job.model == "tiny_llama"} == {120}  # the text's own length
    assert grid.max_tokens(smoke, "hamlet", "tiny_gemma3") == 100 and grid.max_tokens(smoke, "hamlet") == 120
    assert grid.model_source(smoke, "tiny_gemma3") == "tiny:gemma3"
    assert grid.eval_params(smoke, gemma[0]).model == "tiny:gemma3"
    # a ceiling above the text's length changes nothing
    smoke["models"]["tiny_gemma3"]["max_tokens"] = 500
    assert {job.n for job in grid.jobs(smoke) if job.model == "tiny_gemma3"} == {120}


def test_models_restrict_runs_peers_sweeps_and_probes(smoke):
    plan = planned(smoke)
    assert set(plan) == {("tiny_llama", "hamlet"), ("tiny_llama", "tempest"), ("tiny_gemma3", "hamlet")}
    gemma = plan["tiny_gemma3", "hamlet"]
    # the method table on both models; the peers, the other sweeps and the probes on tiny_llama only
    assert gemma["methods"] == {r["name"] for r in smoke["runs"]}
    assert set(gemma) == {"baseline", "methods", "ablation:sink_layers"}
    assert gemma["ablation:sink_layers"] == {"sink=0, sink_layers=global", "sink=0, sink_layers=all",
                                             "sink=4, sink_layers=global", "sink=4, sink_layers=all"}
    llama = plan["tiny_llama", "hamlet"]
    assert "ablation:sink_layers" not in llama and "peers" in llama and "probe:summarize_k_quality" in llama


def test_a_model_without_an_entry_of_its_own_keeps_every_job_path():
    """A second model and `models:` restrictions leave the first model's jobs (paths, rows, NLL sources) as they
    were: its results stay valid."""
    config = load("smoke.yaml")
    alone = copy.deepcopy(config)
    del alone["models"]["tiny_gemma3"]
    alone["ablations"].pop("sink_layers")
    alone["findings"] = [f for f in alone["findings"] if f.get("models") != ["tiny_gemma3"]]

    def seen(cfg):
        return {(j.path(), tuple(map(tuple, j.labels)), j.quality and j.quality.path())
                for j in grid.jobs(cfg) if j.model == "tiny_llama"}

    assert seen(config) == seen(alone)


def test_baselines_only_for_the_pairs_some_row_runs_on(smoke):
    smoke["models"]["tiny_gemma3"] = "tiny:gemma3"  # every text now ...
    for entry in smoke["runs"]:
        entry["models"] = ["tiny_llama"]  # ... but only the sink_layers sweep runs on it, on hamlet
    smoke["ablations"]["sink_layers"]["texts"] = ["hamlet"]
    baselines = {(j.model, j.text) for j in grid.jobs(smoke) if j.kind == "baselines"}
    assert baselines == {("tiny_llama", "hamlet"), ("tiny_llama", "tempest"), ("tiny_gemma3", "hamlet")}
    smoke["ablations"].pop("sink_layers")
    smoke["findings"] = [f for f in smoke["findings"] if f.get("models") != ["tiny_gemma3"]]
    grid.check(smoke)
    assert {j.model for j in grid.jobs(smoke)} == {"tiny_llama"}  # a model no row runs on has no job


MAIN_ROWS = {"MIT StreamingLLM", "Ours (strict)", "Ours (lazy K=32)", "Ours (best)", "Dense (no eviction)",
             "Window (no sinks)"}


@pytest.mark.parametrize("name, methods, peers, sweeps, benches", [
    ("config.yaml", MAIN_ROWS, {"llama.cpp context shift", "llama.cpp dense"}, {"ablation:sink_layers"}, ["smollm2"]),
    ("study.yaml", MAIN_ROWS | {"Ours (ring)", "Ours (original positions)", "Ours (lazy K=32, original positions)"},
     {"kvpress StreamingLLM", "kvpress StreamingLLM + KeyRerotation", "llama.cpp context shift", "llama.cpp dense"},
     {"ablation:compress_every", "ablation:sink", "ablation:softlite", "ablation:sink_cap1024",
      "ablation:sink_layers"}, ["smollm2", "gemma3"]),
])
def test_the_shipped_configs_run_gemma_on_hamlet_under_its_ceiling(name, methods, peers, sweeps, benches):
    config = load(name)
    grid.check(config)
    plan = planned(config)
    assert {t for m, t in plan if m == "gemma3"} == {"hamlet"}
    gemma = plan["gemma3", "hamlet"]
    assert gemma["methods"] == methods
    assert gemma["peers"] == peers
    assert {g for g in gemma if g.startswith(("ablation:", "probe:"))} == sweeps
    assert "ablation:sink_layers" not in plan["smollm2", "hamlet"]
    assert {j.n for j in grid.jobs(config) if j.model == "gemma3"} == {2304}
    assert config["bench"]["model"] == config["recall"]["model"] == config["long_stream"]["model"] == "smollm2"
    assert grid.bench_models(config) == benches


def points(key: str, sweep: dict) -> set:
    """A sweep's rows by run id (defaults filled in): its base with each point of its grid (or of its values)."""
    swept = sweep.get("grid") or {key: sweep["values"]}
    return {grid.run_id({**sweep["base"], **dict(zip(swept, combo))}) for combo in itertools.product(*swept.values())}


def test_the_default_config_is_the_study_cut_down():
    """config.yaml (make run) runs a subset of config/study.yaml's rows, sweeps, findings and recall rows, each
    defined as there: the hour-long default shows the study's sections, on fewer tokens and points."""
    default, study = load("config.yaml"), load("study.yaml")
    scale = {"name", "models", "texts", "max_tokens"}
    for section in ("runs", "peers"):
        theirs = {e["name"]: e for e in study[section]}
        for entry in default[section]:
            assert entry["name"] in theirs, entry["name"]
            assert ({k: v for k, v in entry.items() if k not in scale}
                    == {k: v for k, v in theirs[entry["name"]].items() if k not in scale}), entry["name"]
    for section in ("ablations", "probes"):
        for key, sweep in default[section].items():
            assert points(key, sweep) <= points(key, study[section][key]), key
    assert [f["claim"] for f in default["findings"]] == [
        f["claim"] for f in study["findings"] if f["claim"] in {g["claim"] for g in default["findings"]}]
    assert set(default["recall"]["rows"]) <= set(study["recall"]["rows"])
    assert {"kvpress:snapkv", "kvpress:tova", "tova"} <= {e["method"] for e in default["runs"] + default["peers"]}
    assert default["reference"] == study["reference"] and default["protocol"]["cap"] == study["protocol"]["cap"]
    assert len(grid.jobs(default)) < len(grid.jobs(study)) / 2


# ----------------------------------------------------------------------------- sink_layers


def test_sink_layers_adds_to_the_run_id_only_away_from_its_default():
    base = {"method": "start_recent", "compress_every": 32}
    assert grid.run_id(base) == grid.run_id({**base, "sink_layers": "global"}) == "start_recent_s4_k32_sl0_md0_ov0_rf0"
    assert grid.run_id({**base, "sink_layers": "all"}) == "start_recent_s4_k32_sl0_md0_ov0_rf0_sinklayers-all"
    assert grid.run_id({"method": "ring", "sink_layers": "all"}) == "ring_s4_sinklayers-all"
    assert grid.normalise_run({"method": "mit"})["sink_layers"] == SINK_LAYERS[0]


def test_sink_layers_is_checked_against_its_choices_and_the_method():
    for method in SINK_METHODS:
        assert EvalParams("m", "t", method, sink_layers="all").resolved().sink_layers == "all"
    with pytest.raises(StreamkvError, match="unknown sink-layers 'sliding'; choose one of: global, all"):
        EvalParams("m", "t", "start_recent", sink_layers="sliding").resolved()
    for method in ("dense", "window", "recompute", "kvpress:streaming_llm", "llamacpp:shift"):
        with pytest.raises(StreamkvError, match=re.escape(f"sink-layers 'all' applies to the caches that keep sinks "
                                                          f"({', '.join(SINK_METHODS)}), not to '{method}'")):
            EvalParams("m", "t", method, sink_layers="all").resolved()
        assert EvalParams("m", "t", method, sink_layers="global").resolved()


def test_the_pipeline_passes_sink_layers_to_the_job(smoke):
    jobs = [j for j in grid.jobs(smoke) if j.run.endswith("_sinklayers-all")]
    assert len(jobs) == 2 and {grid.eval_params(smoke, j).sink_layers for j in jobs} == {"all"}
    assert {grid.eval_params(smoke, j).sink_layers for j in grid.jobs(smoke)} == {"global", "all"}


# ----------------------------------------------------------------------------- errors that name the key


def hamlet_only(config: dict) -> None:
    """Both models on Hamlet only (the recall probe, whose filler is another text, left out)."""
    config.pop("recall")
    config["models"]["tiny_llama"] = {"source": "tiny:llama", "texts": ["hamlet"]}


@pytest.mark.parametrize("change, message", [
    (lambda c: c["runs"][0].update(models=["gemma"]),
     "config key runs[0].models: unknown model 'gemma' (known: tiny_llama, tiny_gemma3)"),
    (lambda c: c["peers"][1].update(models=["tiny_llama", "llama"]),
     "config key peers[1].models: unknown model 'llama' (known: tiny_llama, tiny_gemma3)"),
    (lambda c: c["ablations"]["softlite"].update(models=["gemma"]),
     "config key ablations.softlite.models: unknown model 'gemma' (known: tiny_llama, tiny_gemma3)"),
    (lambda c: c["probes"]["verify_slack_effect"].update(models=["gemma"]),
     "config key probes.verify_slack_effect.models: unknown model 'gemma'"),
    (lambda c: c["findings"][0].update(models=["gemma"]), "config key findings[0].models: unknown model 'gemma'"),
    (lambda c: c["findings"][0].update(texts=["macbeth"]), "config key findings[0].texts: unknown text 'macbeth'"),
    (lambda c: c["models"]["tiny_gemma3"].update(texts=["macbeth"]),
     "config key models.tiny_gemma3.texts: unknown text 'macbeth' (known: hamlet, tempest)"),
    (lambda c: c["runs"][0].update(models=["tiny_gemma3"], texts=["tempest"]),
     "config key runs[0].models: model 'tiny_gemma3' runs on hamlet only (models.tiny_gemma3.texts), none of this "
     "entry's texts (tempest)"),
    (lambda c: hamlet_only(c) or c["runs"][0].update(texts=["tempest"]),
     "config key runs[0]: no model runs on its texts (tempest); models run on: tiny_llama: hamlet; tiny_gemma3: "
     "hamlet; name a text one of them runs on"),
    (lambda c: c["runs"].append({"name": "dense, sinks everywhere", "method": "dense", "sink_layers": "all"}),
     "config key runs[8] ('dense, sinks everywhere'): sink-layers 'all' applies to the caches that keep sinks"),
    (lambda c: c["ablations"]["sink_layers"]["base"].update(method="window"),
     "config key ablations.sink_layers.grid ('sink=0, sink_layers=all'): sink-layers 'all' applies to the caches that "
     "keep sinks (start_recent, mit, ring, tova), not to 'window'; leave --sink-layers out"),
    (lambda c: c["ablations"]["sink_layers"]["grid"].update(sink_layers=["global", "sliding"]),
     "config key ablations.sink_layers.grid ('sink=0, sink_layers=sliding'): unknown sink-layers 'sliding'; choose "
     "one of: global, all"),
    (lambda c: c["findings"][-1].update(models=["tiny_llama"]),
     "config key findings[4].models: the sweep 'ablation:sink_layers' runs on tiny_gemma3 only, none of tiny_llama"),
    (lambda c: c["findings"][0].update(margin=2.0),
     "config key findings[0].margin: a margin belongs to a noninferior or equivalent claim, not to expect 'higher'"),
    (lambda c: c["bench"].update(also={"gemma": {}}),
     "config key bench.also: unknown model 'gemma' (known: tiny_llama, tiny_gemma3)"),
    (lambda c: c["bench"].update(also={"tiny_gemma3": {"blocks": 0}}),
     "config key bench.also.tiny_gemma3: blocks must be >= 1, got 0"),
])
def test_bad_model_keys_name_the_key_and_the_choices(smoke, change, message):
    change(smoke)
    with pytest.raises(StreamkvError, match=re.escape(message)):
        grid.check(smoke)


@pytest.mark.parametrize("change, needle", [
    (lambda c: c["runs"][0].update(sink_layers="none"), "'none' is not one of ['global', 'all']"),
    (lambda c: c["runs"][0].update(models=[]), "[] should be non-empty"),
    (lambda c: c["models"].update(bad={"source": "tiny:llama", "colour": "red"}), "'colour' was unexpected"),
    (lambda c: c["models"].update(bad="s3://bucket/model"), "'s3://bucket/model' does not match"),
    # "no difference" is an equivalence claim with a margin, never an interval that contains zero
    (lambda c: c["findings"][1].update(expect="zero"), "'zero' is not one of ['higher', 'lower', 'noninferior', "
     "'equivalent']"),
    (lambda c: c["findings"][1].update(margin=0), "0 is less than or equal to the minimum of 0"),
])
def test_the_schema_refuses_bad_values(smoke, change, needle):
    from snakemake.utils import validate

    change(smoke)
    with pytest.raises(Exception) as caught:
        validate(smoke, str(ROOT / "config/schema.yaml"))
    assert needle in str(caught.value)


# ----------------------------------------------------------------------------- findings per model


def test_a_finding_is_tested_only_on_its_models(tmp_path):
    from streamkv.analysis.summary import comparisons

    rng = np.random.default_rng(0)
    rows = []
    for model in ("a", "b"):
        for sink in (0, 4):
            file = tmp_path / f"{model}_{sink}.json"
            pd.DataFrame({"position": np.arange(400), "nll": rng.normal(3.0, 0.5, 400)}).to_parquet(
                file.with_suffix(".parquet"))
            rows.append({"model_key": model, "text_key": "t", "group": "ablation:sink", "name": f"sink={sink}",
                         "status": "ok", "file": str(file), **grid.RUN_DEFAULTS, "method": "start_recent",
                         "sink": sink})
    frame = pd.DataFrame(rows)
    finding = {"claim": "sinks matter", "group": "ablation:sink", "a": {"sink": 0}, "b": {"sink": 4},
               "expect": "higher"}
    everywhere = comparisons(frame, {}, [finding], {"block": 4, "n_boot": 100})
    assert sorted(everywhere.model_key) == ["a", "b"]
    only_b = comparisons(frame, {}, [{**finding, "models": ["b"]}], {"block": 4, "n_boot": 100})
    assert list(only_b.model_key) == ["b"]


def test_bench_on_more_models_and_a_mapping_model_everywhere(smoke):
    """`bench.also` adds a bench job per model with its own settings; recall and the long stream read a model in
    the mapping form by its source."""
    smoke["models"]["tiny_llama"] = {"source": "tiny:llama"}
    smoke["bench"]["also"] = {"tiny_gemma3": {"sections": ["overhead"]}}
    grid.check(smoke)
    assert grid.bench_models(smoke) == [smoke["bench"]["model"], "tiny_gemma3"]
    assert grid.bench_settings(smoke, "tiny_gemma3")["sections"] == ["overhead"]
    assert "sections" not in grid.bench_settings(smoke, smoke["bench"]["model"])
    assert "also" not in grid.bench_settings(smoke, "tiny_gemma3")
