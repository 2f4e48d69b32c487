# Helpers shared by the rules: the job grid, paths and parameters, all from the validated config.

import sys

from streamkv.errors import StreamkvError
from streamkv.meta import ANALYSIS_MODULES, EVALUATION_MODULES, code_hash
from streamkv import pipeline
from streamkv.extras import installed

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


def peer_installed(kind):
    """For a peer's job, what this machine has of it: installing the peer re-runs its "not installed" rows."""
    return lambda wildcards: installed(job_of(kind, wildcards).params["method"])
