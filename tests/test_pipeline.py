"""The Snakemake pipeline on config/smoke.yaml: end to end, invalidation, config validation."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("Snakefile", "rules", "scripts", "config", "profiles", "envs", "report/templates")


def copy_workflow(dest: Path) -> Path:
    for part in PARTS:
        src, dst = ROOT / part, dest / part
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return dest


def snakemake(workdir: Path, *args: str, config: str = "config/smoke.yaml") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", "1", "--configfile", config]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=900)


def planned(workdir: Path, config: str = "config/smoke.yaml") -> list[tuple[str, str]]:
    """(rule, first output) of every job a dry run would execute."""
    proc = snakemake(workdir, "--dry-run", config=config)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs, rule = [], None
    for line in proc.stdout.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif rule and (m := re.match(r"^\s+output: ([^,\s]+)", line)):
            jobs.append((rule, m.group(1)))
            rule = None
    return jobs


def edited(workdir: Path, change) -> str:
    config = yaml.safe_load((workdir / "config/smoke.yaml").read_text())
    change(config)
    (workdir / "config/edited.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return "config/edited.yaml"


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A workflow copy on which the smoke pipeline has run to completion."""
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    proc = snakemake(workdir, "report/paper_tables.md")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir


def test_end_to_end_produces_tables_figures_and_a_summary(done):
    report = (done / "report/paper_tables.md").read_text()
    for heading in ("## hamlet — tiny_llama", "## tempest — tiny_llama", "### Method comparison",
                    "### Ablation: compress_every", "## Failed configurations", "## Provenance"):
        assert heading in report
    assert "| Ours (lazy K=8) | S=4, W=28, K=8 |" in report
    for text in ("hamlet", "tempest"):
        for fig in ("pareto", "nll_trace"):
            assert (done / f"report/figures/tiny_llama/{text}/{fig}.png").stat().st_size > 10_000
    summary = pd.read_csv(done / "results/summary.csv")
    assert (summary.status == "ok").all()
    assert len(summary) == 2 * (1 + 6) + 4  # per text: baseline + 6 rows; 4 ablation rows on hamlet
    strict = summary[summary.name == "Ours (strict)"]
    mit = summary[summary.name == "MIT StreamingLLM"]
    assert (abs(strict.ppl.values - mit.ppl.values) / mit.ppl.values < 1e-4).all()
    assert (summary.loc[summary.group == "baseline", "delta_ppl_pct"] == 0).all()
    assert (done / "logs/evaluate").is_dir() and (done / "benchmarks/evaluate").is_dir()


def test_snakemake_html_report_bundles_the_figures(done):
    proc = snakemake(done, "--report", "report/report.html")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    html = (done / "report/report.html").read_text()
    assert "pareto.png" in html and "nll_trace.png" in html


def test_second_run_plans_nothing(done):
    assert planned(done) == []


def test_editing_one_config_reruns_only_that_config_and_the_report(done):
    def change(config):
        config["ablations"]["compress_every"]["values"][-1] = 12  # K=16 -> K=12, hamlet only

    jobs = planned(done, edited(done, change))
    rules = sorted(rule for rule, _ in jobs)
    assert rules == ["aggregate", "evaluate", "figures", "figures", "paper_tables"]
    assert [out for rule, out in jobs if rule == "evaluate"] == [
        "results/runs/tiny_llama/hamlet/cap32_n120_p1_float32_cpu_seed0/start_recent_s4_k12_sl0_md0_ov0_rf0.json"]


def test_renaming_a_row_reruns_only_the_report(done):
    def change(config):
        config["runs"][0]["name"] = "MIT (reference)"

    assert sorted(rule for rule, _ in planned(done, edited(done, change))) == [
        "aggregate", "figures", "figures", "paper_tables"]


def test_changing_the_baseline_reruns_it_and_every_config_compared_with_it(done):
    def change(config):
        config["baseline"]["sink"] = 2

    rules = [rule for rule, _ in planned(done, edited(done, change))]
    assert rules.count("baseline") == 2  # one per text
    assert rules.count("evaluate") == 2 * 6 + 2  # every configuration: 6 rows x 2 texts, K=4 and K=16 on hamlet
    assert "prepare_model" not in rules and "tokenize" not in rules


def test_a_failed_configuration_is_reported_as_failed(done):
    """A text too short for the protocol: its rows fail at run time, and the report shows them as failed."""
    (done / "short.txt").write_text("Who's there? Nay, answer me: stand, and unfold yourself.")

    def change(config):
        config["texts"]["short"] = f"file:{done / 'short.txt'}"
        config["ablations"]["compress_every"]["texts"] = ["hamlet"]

    proc = snakemake(done, "report/paper_tables.md", config=edited(done, change))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = pd.read_csv(done / "results/summary.csv")
    short = summary[summary.text_key == "short"]
    assert len(short) == 7 and (short.status == "failed").all()
    assert short.error.str.contains("has 56 tokens, fewer than protocol.max_tokens \\(120\\)").all()
    assert (summary[summary.text_key != "short"].status == "ok").all()
    report = (done / "report/paper_tables.md").read_text()
    assert "| Ours (strict) | S=4, W=28 | FAILED |" in report
    assert "| Ours (strict) | short | tiny_llama | StreamkvError: text 'file:" in report


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(colour="blue"), "'colour' was unexpected"),
    (lambda c: c["protocol"].update(cap="big"), "'big' is not of type 'integer'"),
    (lambda c: c["models"].update(bad="s3://bucket/model"), "'s3://bucket/model' does not match"),
    (lambda c: c["runs"].append({"name": "too big", "method": "start_recent", "cache_slack": 40}),
     "config key runs[6] ('too big'): budget leaves no window: cap (32) - sink (4) - cache_slack (40)"),
    (lambda c: c["runs"].append({"name": "lazy mit", "method": "mit", "compress_every": 4}),
     "config key runs[6] ('lazy mit'): compress-every applies to start_recent and window, not to 'mit'"),
    (lambda c: c["runs"][0].update(texts=["macbeth"]), "config key runs[0].texts: unknown text 'macbeth'"),
])
def test_bad_configs_fail_before_any_job_naming_the_key(tmp_path, change, needle):
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, "report/paper_tables.md", config=edited(workdir, change))
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr
    assert not (workdir / "results").exists()


def test_slurm_profile_is_valid_in_a_dry_run(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    workdir = copy_workflow(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "report/paper_tables.md", "--dry-run",
                           "--workflow-profile", "profiles/slurm", "--configfile", "config/smoke.yaml"],
                          cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "paper_tables" in proc.stdout
