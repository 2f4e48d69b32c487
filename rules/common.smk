# Helpers shared by the rules: the job grid, paths and parameters, all from the validated config, and the
# input functions and constants of every rule file (the rule files hold rules only).

import sys

from streamkv.errors import StreamkvError
from streamkv.provenance import ANALYSIS_MODULES, EVALUATION_MODULES, code_hash
from streamkv.analysis import long_stream
from streamkv.analysis import recall_jobs
from streamkv.analysis import grid as pipeline
from streamkv.peers.installed import installed

try:
    pipeline.check(config)
except StreamkvError as exc:
    sys.exit(f"Invalid config: {exc}")

ALL_JOBS = pipeline.jobs(config)
JOB_BY_PATH = {job.path(): job for job in ALL_JOBS}
JOBS = [job for job in ALL_JOBS if job.kind != "quality"]  # the report's rows and baselines
BASELINE_OF = {(job.model, job.text): job for job in JOBS if job.kind == "baselines"}
# Results depend on the library code as much as on the scripts: with rerun_on_library_change, an
# edit of the decode loop's modules re-runs every evaluation, and an edit of the analysis modules
# re-runs aggregation, probes and report (not the evaluations).
LIBRARY = code_hash(EVALUATION_MODULES) if config["rerun_on_library_change"] else "not tracked"
ANALYSIS = code_hash(ANALYSIS_MODULES) if config["rerun_on_library_change"] else "not tracked"


def job_of(kind, wildcards):
    path = f"results/{kind}/{wildcards.model}/{wildcards.text}/{wildcards.setting}/{wildcards.run}.json"
    if path not in JOB_BY_PATH:
        raise ValueError(f"{path} is not in the configured grid")
    return JOB_BY_PATH[path]


def eval_params(kind):
    """All parameters of the job as a dict: passed through params:, so any change re-runs the job."""
    return lambda wildcards: vars(pipeline.eval_params(config, job_of(kind, wildcards)))


def quality_files(wildcards):
    """A row that shares another run's attention schedule takes that run's NLLs (its result and trace)."""
    job = job_of("runs", wildcards).quality
    return {} if job is None else {"quality": job.path(), "quality_trace": job.path("parquet")}


def quality_threads(wildcards):
    """Untimed NLLs: one core for the decode loop, whose step a second thread does not speed up, else all."""
    return pipeline.job_threads(config, job_of("quality", wildcards), workflow.cores)


def peer_installed(kind):
    """For a peer's job, what this machine has of it: installing the peer re-runs its "not installed" rows."""
    return lambda wildcards: installed(job_of(kind, wildcards).params["method"])


# ----------------------------------------------------------------------------- probes (rules/probes.smk)

PROBE_INPUT = {"summary": "results/summary.parquet", "events": "results/spike_events.parquet"}


def probe_output(probe):
    return {
        "table": f"results/probes/{probe}/{{model}}/{{text}}.csv",
        "figure": report(
            f"report/figures/{{model}}/{{text}}/{probe}.png",
            category="Probes",
            subcategory="{model} / {text}",
            caption="../report/templates/probe.rst",
        ),
    }


# ----------------------------------------------------------------------------- bench (rules/bench.smk)


def bench_files():
    spec = config.get("bench")
    return [f"results/bench/{model}/{spec['text']}.json" for model in pipeline.bench_models(config)]


# ----------------------------------------------------------------------------- report (rules/report.smk)

PAIRS = sorted({(job.model, job.text) for job in JOBS})


def sweeps(kind):
    """(model, text, key) of every ablation or probe the grid holds."""
    return sorted({(job.model, job.text, group.split(":", 1)[1]) for job in JOBS for group, _, _ in job.labels
                   if group.startswith(f"{kind}:")})


FIGURES = [f"report/figures/{m}/{t}/{kind}.png" for m, t in PAIRS for kind in ("pareto", "nll_trace", "spikes")]
ABLATION_FIGURES = [f"report/figures/{m}/{t}/ablation_{a}.png" for m, t, a in sweeps("ablation")]
PROBE_TABLES = [f"results/probes/{p}/{m}/{t}.csv" for m, t, p in sweeps("probe")]
PROBE_FIGURES = [f"report/figures/{m}/{t}/{p}.png" for m, t, p in sweeps("probe")]


def traced_runs(wildcards):
    """Traces the NLL figure draws: the baseline and the run named by report.trace_run."""
    name = config["report"]["trace_run"]
    here = [job for job in JOBS if (job.model, job.text) == (wildcards.model, wildcards.text)]
    chosen = [job for job in here if job.kind == "baselines" or any(label[1] == name for label in job.labels)]
    return [job.path("parquet") for job in chosen]


# ----------------------------------------------------------------------------- the long stream (rules/long_stream.smk)
# The `long_stream` key is optional: long_stream.check passes without it, and the functions below, called
# only when report/long_stream.md is asked for, stop with a message that names the key.

try:
    long_stream.check(config)
except StreamkvError as exc:
    sys.exit(f"Invalid config: {exc}")

# The evaluation depends on the decode loop's modules (LIBRARY, the parallel evaluator among them); the page
# on the analysis modules and on long_stream (which holds the segment table, the trend and the figure).
LONG_STREAM_ANALYSIS = (code_hash((*ANALYSIS_MODULES, "analysis.long_stream")) if config["rerun_on_library_change"]
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


# ----------------------------------------------------------------------------- the recall probe (rules/recall.smk)
# Optional like the long stream: without the `recall` key the report has no recall section.

try:
    RECALL_JOBS = recall_jobs.jobs(config) if config.get(recall_jobs.KEY) else {}
except StreamkvError as exc:
    sys.exit(f"Invalid config: {exc}")
RECALL_TABLES = [f"results/probes/recall/{recall_jobs.spec(config)['model']}.csv"] if RECALL_JOBS else []
RECALL_FIGURES = [f"report/figures/{recall_jobs.spec(config)['model']}/recall.png"] if RECALL_JOBS else []


def recall_job(wildcards):
    if wildcards.run not in RECALL_JOBS or wildcards.setting != recall_jobs.setting(config):
        raise ValueError(f"results/recall/{wildcards.model}/{wildcards.setting}/{wildcards.run} is not a row of "
                         "the recall probe")
    return RECALL_JOBS[wildcards.run]


def recall_results(wildcards):
    setting = recall_jobs.setting(config)
    return [f"results/recall/{wildcards.model}/{setting}/{run}.json" for run in RECALL_JOBS]
