"""The Snakemake pipeline on config/smoke.yaml: end to end, invalidation, config validation."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from optional_peers import EXPECT_KVPRESS, needs_kvpress
from streamkv.analysis.grid import PROBES
from streamkv.evaluation.params import LOOP_ONLY_WEIGHTS
from streamkv.models import weights as W

# The tests share one end-to-end run (the fixture `done`): one xdist worker runs them all.
pytestmark = [pytest.mark.xdist_group("pipeline"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# what a changed summary re-runs: figures per model x text (tiny_llama on two texts, tiny_gemma3 on one), one figure
# per ablation (tiny_llama: compress_every, softlite, refresh, weights; tiny_gemma3: sink_layers), probes, tables
DOWNSTREAM = ["aggregate", *["figures"] * 3, *["ablation_figure"] * 5, *PROBES, "paper_tables"]
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


def snakemake(workdir: Path, *args: str, config: str = "config/smoke.yaml",
              env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", "1", "--configfile", config]
    # (under pytest-timeout's 1,200 s per test, which counts the smoke run of the first test that needs it)
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1150, env=env)


def planned(workdir: Path, config: str = "config/smoke.yaml", env: dict | None = None) -> list[tuple[str, str]]:
    """(rule, first output) of every job a dry run would execute."""
    proc = snakemake(workdir, "--dry-run", config=config, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs, rule = [], None
    for line in proc.stdout.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):", line):
            rule = m.group(1)
        elif rule and (m := re.match(r"^\s+output: ([^,\s]+)", line)):
            jobs.append((rule, m.group(1)))
            rule = None
    return jobs


def expected_ok(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows that must have run: all of them, but the kvpress rows where kvpress is not installed and the rows of
    weights this CPU cannot run (int8-fbgemm without VNNI: failed rows, checked by `cpu_dependent_rows_are_right`)."""
    runs_here = summary.weights.map(lambda w: not isinstance(w, str) or W.runs_here(w))
    return summary[runs_here] if EXPECT_KVPRESS else summary[(summary.group != "peers") & runs_here]


def cpu_dependent_rows_are_right(summary: pd.DataFrame) -> None:
    """A row of weights that need a CPU feature ran where the CPU has it, and failed with the refusal elsewhere."""
    needing = summary[summary.weights.map(lambda w: isinstance(w, str) and W.get(w).needs is not None)]
    assert len(needing) == 1  # the weights ablation's int8-fbgemm
    for row in needing.itertuples():
        if W.runs_here(row.weights):
            assert row.status == "ok", row.error
        else:
            assert row.status == "failed" and W.get(row.weights).refusal in row.error, row.error


def edited(workdir: Path, change) -> str:
    config = yaml.safe_load((workdir / "config/smoke.yaml").read_text())
    change(config)
    (workdir / "config/edited.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return "config/edited.yaml"


def test_the_pipeline_tests_share_one_worker(request):
    """xdist's loadgroup groups a test by appending "@group" to its node id; a pytest that keeps node ids elsewhere
    (9.2.0 does) makes that a silent no-op, and every worker then runs the five-minute pipeline of its own."""
    if not getattr(request.config.option, "loadgroup", False):  # set on the workers of `--dist loadgroup`
        pytest.skip("not run by a pytest-xdist worker under --dist loadgroup")
    assert request.node.nodeid.endswith("@pipeline"), (
        "pytest-xdist did not group the pipeline tests: this pytest is not one its loadgroup works with; "
        "install the pinned one (pip install -c envs/constraints.txt pytest)")


@pytest.fixture(scope="session")
def done(tmp_path_factory):
    """A workflow copy on which the smoke pipeline has run to completion (once per worker, in whatever order the
    worker runs its tests: a module fixture is torn down whenever the worker moves to another module)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("workflow"))
    proc = snakemake(workdir, "report/paper_tables.md")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return workdir


def test_end_to_end_produces_tables_figures_and_a_summary(done):
    report = (done / "report/paper_tables.md").read_text()
    for heading in ("## hamlet — tiny_llama", "## tempest — tiny_llama", "## hamlet — tiny_gemma3",
                    "## The study's conclusions, per model", "#### sink_layers", "### Method comparison",
                    "### Ablations",
                    "#### compress_every", "#### softlite", "### Probes", "### NLL spike diagnosis",
                    "### Negative results, re-measured", "## Performance", "### tiny_llama on hamlet",
                    "## Failed configurations", "## Provenance",
                    *(f"#### {probe}:" for probe in PROBES)):
        assert heading in report
    assert "| Ours (lazy K=8) | S=4, W=28, K=8 |" in report
    for text in ("hamlet", "tempest"):
        for fig in ("pareto", "nll_trace", "spikes"):
            assert (done / f"report/figures/tiny_llama/{text}/{fig}.png").stat().st_size > 10_000
    for fig in ("ablation_compress_every", "ablation_softlite", "ablation_refresh", "ablation_weights", *PROBES):
        assert (done / f"report/figures/tiny_llama/hamlet/{fig}.png").stat().st_size > 10_000
    summary = pd.read_csv(done / "results/summary.csv")
    assert (expected_ok(summary).status == "ok").all()
    cpu_dependent_rows_are_right(summary)
    # the recall probe: every row at every distance, its section and figure
    recall = pd.read_csv(done / "results/probes/recall/tiny_llama.csv")
    assert (recall.status == "ok").all() and len(recall) == 5 * 4
    assert "## What eviction forgets (recall) — tiny_llama" in report and "| Ours (lazy K=8) | " in report
    assert (done / "report/figures/tiny_llama/recall.png").stat().st_size > 10_000
    # tiny_llama per text: baseline + 8 rows + 2 peers; on hamlet: ablations 4 + 4 + 2 + 6 (weights), probes
    # 4 + 4 + 3 + 4; tiny_gemma3 on hamlet: baseline + 8 rows + the sink_layers sweep's 4 points
    assert len(summary) == 2 * (1 + 8 + 2) + 16 + 15 + (1 + 8 + 4)
    # the second model: its own sections, every job under its ceiling of 100 tokens, sinks in all layers as a row
    gemma = summary[summary.model_key == "tiny_gemma3"]
    assert set(gemma.text_key) == {"hamlet"} and (gemma.max_tokens == 100).all()
    assert "(N = 100 tokens, the ceiling `models.tiny_gemma3.max_tokens`:" in report
    assert "| S=4, W=28, sinks in all layers |" in report
    assert ("| sinks in the sliding layers change nothing (all vs global layers, S=4) | the same PPL within ±1 % "
            "(equivalence) | – | ") in report
    # the spike diagnosis against the full-coverage reference (every target): numbers for every streaming row
    pruned = summary[(summary.status == "ok") & (summary.group != "baseline") & (summary.spike_events > 0)]
    assert len(pruned) > 20 and pruned[["spike_peak", "spike_width", "spike_area"]].notna().all().all()
    lazy = summary[(summary.name == "Ours (lazy K=8)")]
    assert lazy[["spike_area", "dense_spike_area"]].notna().all().all()  # against the reference and against dense
    report_spikes = report.split("### NLL spike diagnosis", 1)[1].split("###", 1)[0]
    assert "| Ours (lazy K=8) | S=4, W=28, K=8 | " in report_spikes
    assert "| – | – |" not in report_spikes.split("| Ours (lazy K=8)", 1)[1].split("\n", 1)[0]
    # no interval is zero-width unless the two rows' NLLs are identical, and then it says so
    for prefix in ("delta_ppl", "delta_ref"):
        ok = summary[summary[f"{prefix}_status"] == "ok"]
        assert len(ok) > 20 and (ok[f"{prefix}_lo"] < ok[f"{prefix}_hi"]).all()
        same = summary[summary[f"{prefix}_status"] == "identical"]
        assert (same[f"{prefix}_lo"] == same[f"{prefix}_hi"]).all()
    assert not re.search(r"\[([+-]?\d+\.\d+), \1\]", report)  # no "[x, x]" cell
    assert (summary.loc[summary.name == "Ours (strict)", "delta_ref_status"] == "identical").all()
    assert (summary.loc[summary.name == "Ours (ring)", "delta_ref_status"] == "identical").all()  # one schedule
    assert "| Ours (strict) | S=4, W=28 | 119 |" in report and " | identical | " in report
    # the x axis of the Pareto figure: every timed row's ratio with its interval (32 paired steps)
    timed = summary[(summary.status == "ok") & (summary.group != "baseline")]
    assert (timed.tpot_ratio_lo <= timed.tpot_ratio_hi).all() and (timed.tpot_ratio_lo < timed.tpot_ratio_hi).any()
    strict = summary[summary.name == "Ours (strict)"]
    mit = summary[summary.name == "MIT StreamingLLM"]
    ring = summary[summary.name == "Ours (ring)"]
    assert (abs(strict.ppl.values - mit.ppl.values) / mit.ppl.values < 1e-4).all()
    assert (abs(ring.ppl.values - mit.ppl.values) / mit.ppl.values < 1e-4).all()
    assert (summary.loc[summary.group == "baseline", "delta_ppl_pct"] == 0).all()
    # the baseline scores every 3rd target (baseline.stride); every row is compared with it on those, with an interval
    baselines = summary[summary.group == "baseline"].set_index("model_key").n_scored
    assert baselines.tiny_llama.tolist() == [40, 40] and baselines.tiny_gemma3 == 33  # of 119 and 99 targets
    loop_only = summary.weights.isin(list(LOOP_ONLY_WEIGHTS))
    rows = summary[(summary.group != "baseline") & summary.method.isin(["start_recent", "mit", "ring", "window"])
                   & (summary.refresh == 0) & ~loop_only]
    assert (rows.n_paired == rows.model_key.map({"tiny_llama": 40, "tiny_gemma3": 33})).all()
    assert (rows.delta_ppl_lo <= rows.delta_ppl_pct).all()
    assert (rows.delta_ppl_pct <= rows.delta_ppl_hi).all() and (rows.evaluator == "parallel").all()
    assert (summary[summary.refresh > 0].evaluator == "decode").all()  # refresh: only the loop follows it
    assert loop_only.sum() == 3 and (summary[loop_only].evaluator == "decode").all()  # bfloat16, int8-fbgemm, -pack
    ran = expected_ok(summary)  # (a row this CPU refuses has no timing)
    assert (ran[ran.group != "baseline"].tpot_ratio > 0).all()  # every row timed against the reference
    compared = pd.read_csv(done / "results/comparisons.csv")
    assert set(compared.kind) == {"control", "finding"} and (compared.lo <= compared.hi).all()
    assert (compared[compared.status == "ok"].lo < compared[compared.status == "ok"].hi).all()
    assert "### Findings, re-tested" in report and "**lazy pruning costs PPL** (expected: a higher PPL)" in report
    named = compared[(compared.kind == "finding") & (compared.group == "rows")]  # two named rows, paired
    assert sorted(named.text_key) == (["hamlet"] * 2 + ["tempest"] * 2 if EXPECT_KVPRESS else [])  # two claims
    assert set(named.expect) <= {"lower", "noninferior"} and (named[named.expect == "noninferior"].margin == 5).all()
    assert "(expected: no worse than b by more than 5 % (non-inferiority))" in report
    assert {(r.a, r.b) for r in named.itertuples()} <= {("Ours (best)", "kvpress StreamingLLM")}
    assert "| K=8 | S=4, W=28, K=8 | 119 |" in report and " vs compress_every=1 |" in report
    assert (done / "logs/evaluate").is_dir() and (done / "benchmarks/evaluate").is_dir()
    assert "| 32 | ring | " in report and "x no-eviction" in report
    assert "ring over 200 tokens: KV bytes max/min 1.000" in report
    # the weights ablation: each variant's eager step against float32's from the bench, and its compiled step where
    # the bench compiled it (int8-pack here), both with intervals
    ratio = r"\d+\.\d{3,6} \[\d+\.\d{3,6}, \d+\.\d{3,6}\]"
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
             for line in report.splitlines() if line.startswith(("| weights=int8-pack |", "| weights=int8 |"))}
    assert re.fullmatch(ratio, cells["weights=int8-pack"][9]) and re.fullmatch(ratio, cells["weights=int8-pack"][10])
    assert re.fullmatch(ratio, cells["weights=int8"][9]) and cells["weights=int8"][10] == "–"
    assert (done / "logs/bench/tiny_llama/hamlet.log").read_text().count("| ring |") >= 1


@needs_kvpress
def test_peers_run_in_the_pipeline_and_agree_with_our_rows(done):
    """kvpress in its own environment, scored by our loop: its per-token NLL is that of our row of the same
    semantics."""
    report = (done / "report/paper_tables.md").read_text()
    assert report.count("### Peers") == 2
    for peer, ours in (("kvpress StreamingLLM", "Ours (original positions)"),
                       ("kvpress StreamingLLM + KeyRerotation", "Ours (strict)")):
        rows = [line for line in report.splitlines() if line.startswith(f"| {peer} | {ours} |")]
        assert len(rows) == 2 and all(row.rstrip().endswith("| none | – |") for row in rows), rows
    summary = pd.read_csv(done / "results/summary.csv")
    assert (summary[summary.group == "peers"].method.str.startswith("kvpress:")).all()


def test_probe_rules_write_their_tables(done):
    tables = {p: pd.read_csv(done / f"results/probes/{p}/tiny_llama/hamlet.csv") for p in PROBES}
    max_drop = tables["verify_max_drop_effect"]
    assert sorted(zip(max_drop["mode"], max_drop.max_drop)) == [("cooldown", 0), ("cooldown", 2), ("naive", 0),
                                                                ("naive", 2)]
    assert (max_drop.loc[max_drop["mode"] == "cooldown", "n_emergency"] == 0).all()
    assert len(tables["verify_slack_effect"]) == 2  # sigma 0 and 2, each control vs staged
    overhead = tables["profile_prune_overhead"]
    assert overhead.compress_every.tolist() == [1, 4, 8] and (overhead.update_ms > 0).all()
    assert (overhead.forward_ms + overhead.update_ms - overhead.tpot_ms).abs().max() < 1e-9
    assert tables["summarize_k_quality"].compress_every.tolist() == [1, 4, 8, 16]
    assert not (done / "results/probes/verify_slack_effect/tiny_llama/tempest.csv").exists()  # hamlet only


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
    assert rules == sorted(["evaluate", *DOWNSTREAM])
    assert [out for rule, out in jobs if rule == "evaluate"] == [
        "results/runs/tiny_llama/hamlet/cap32_n120_p1_float32_cpu_seed0/start_recent_s4_k12_sl0_md0_ov0_rf0.json"]


def test_editing_the_bench_reruns_only_it_and_the_tables(done):
    def change(config):
        config["bench"]["blocks"] = 4

    assert sorted(rule for rule, _ in planned(done, edited(done, change))) == ["bench", "paper_tables"]


def test_renaming_a_row_reruns_only_the_report(done):
    def change(config):
        config["runs"][0]["name"] = "MIT (reference)"

    assert sorted(rule for rule, _ in planned(done, edited(done, change))) == sorted(DOWNSTREAM)


def test_changing_the_baseline_reruns_it_and_every_comparison_with_it(done):
    """The comparisons with the baseline are made by the aggregation, so the evaluations stay."""
    def change(config):
        config["baseline"]["sink"] = 2

    rules = [rule for rule, _ in planned(done, edited(done, change))]
    assert sorted(rules) == sorted([*["baseline"] * 3, *DOWNSTREAM])  # one baseline per model x text


def test_rows_of_one_schedule_share_their_nlls_and_the_evaluator_reruns_them(done):
    """mit and the ring take strict start_recent's NLLs (they only time their own step); with evaluator: decode,
    every row runs its own decode loop."""
    proc = snakemake(done, "--dry-run", "--forceall",
                     "results/runs/tiny_llama/hamlet/cap32_n120_p1_float32_cpu_seed0/mit_s4.json")
    assert proc.returncode == 0 and "start_recent_s4_k1_sl0_md0_ov0_rf0.json" in proc.stdout

    def change(config):
        config["protocol"]["evaluator"] = "decode"

    jobs = planned(done, edited(done, change))
    # every configuration, each with its own loop: tiny_llama's on both texts (+ the weights ablation's five variants
    # on hamlet), tiny_gemma3's 8 rows and the 3 sink_layers points that are no row (S=4 in the global layers is
    # Ours (strict))
    assert sum(rule == "evaluate" for rule, _ in jobs) == 2 * 10 + 7 + 5 + 8 + 3
    assert sorted(out.replace("results/quality/", "") for rule, out in jobs if rule == "quality") == sorted(
        out.replace("results/runs/", "") for rule, out in jobs if rule == "evaluate")
    assert sum(rule == "baseline" for rule, _ in jobs) == 3


def test_a_failed_configuration_is_reported_as_failed(done):
    """A text too short for the protocol: its rows fail at run time, and the report shows them as failed."""
    (done / "short.txt").write_text("Who's there? Nay, answer me: stand, and unfold yourself.")

    def change(config):
        config["texts"]["short"] = f"file:{done / 'short.txt'}"
        config["ablations"]["compress_every"]["texts"] = ["hamlet"]
        config["recall"]["filler"] = "short"  # too short for the recall streams: every recall row fails

    proc = snakemake(done, "report/paper_tables.md", config=edited(done, change))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = pd.read_csv(done / "results/summary.csv")
    short = summary[summary.text_key == "short"]
    assert len(short) == 1 + 8 + 2 and (short.status == "failed").all()  # baseline, rows, peers
    assert short.error.str.contains("has 56 tokens, fewer than max_tokens \\(120\\)").all()
    assert (expected_ok(summary[summary.text_key != "short"]).status == "ok").all()
    cpu_dependent_rows_are_right(summary)
    report = (done / "report/paper_tables.md").read_text()
    assert "| Ours (strict) | S=4, W=28 | – | FAILED |" in report
    assert "| Ours (strict) | short | tiny_llama | StreamkvError: text 'file:" in report
    assert "- Ours (strict) failed: StreamkvError: config key recall.filler: the text has 56 tokens" in report
    assert "| Ours (strict) | " not in report.split("## What eviction forgets")[1].split("## Performance")[0]


@needs_kvpress
def test_a_peer_not_installed_says_so_and_installing_it_reruns_exactly_its_rows(done):
    """What the machine has of a peer is a parameter of the peer's jobs: without kvpress (the variable names no
    python) its rows re-run, and the report shows them as not installed, with the command, not as failures."""
    env = {**os.environ, "STREAMKV_KVPRESS_PYTHON": str(done / "no-such-python")}
    peer_files = sorted(["kvpress-streaming_llm_s4_k1.json", "kvpress-streaming_llm-rerotate_s4_k1.json"] * 2)
    jobs = planned(done, env=env)
    for rule in ("quality", "evaluate"):  # the peer's NLLs (the decode loop) and its timed row, one per text
        assert sorted(out.rsplit("/", 1)[1] for r, out in jobs if r == rule) == peer_files
    proc = snakemake(done, "report/paper_tables.md", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = pd.read_csv(done / "results/summary.csv")
    peers = summary[summary.group == "peers"]
    assert len(peers) == 4 and (peers.status == "not_installed").all()
    assert peers.error.str.contains("needs kvpress, which is not installed: run `make setup-kvpress`").all()
    report = (done / "report/paper_tables.md").read_text()
    assert "| kvpress StreamingLLM | S=4, W=28 | – | not installed (install with `make setup-kvpress`) |" in report
    assert "kvpress" not in report.split("## Failed configurations")[1].split("## Provenance")[0]
    # and back: with kvpress found again, exactly these rows run again
    jobs = planned(done)
    for rule in ("quality", "evaluate"):
        assert sorted(out.rsplit("/", 1)[1] for r, out in jobs if r == rule) == peer_files


@pytest.mark.parametrize("change,needle", [
    (lambda c: c.update(colour="blue"), "'colour' was unexpected"),
    (lambda c: c["protocol"].update(cap="big"), "'big' is not of type 'integer'"),
    (lambda c: c["models"].update(bad="s3://bucket/model"), "'s3://bucket/model' does not match"),
    (lambda c: c["peers"].append({"name": "p", "method": "kvpress:knorm", "cross_check": "nobody"}),
     "config key peers[2].cross_check: no row is named 'nobody'"),
    (lambda c: c["peers"].append({"name": "p", "method": "start_recent"}), "'start_recent' is not one of"),
    (lambda c: c["peers"].append({"name": "p", "method": "kvpress:knorm", "noise_floor": "kvpress StreamingLLM x"}),
     "config key peers[2].noise_floor: no peer row with a cross_check is named 'kvpress StreamingLLM x'"),
    (lambda c: c["runs"].append({"name": "too big", "method": "start_recent", "cache_slack": 40}),
     "config key runs[8] ('too big'): budget leaves no window: cap (32) - sink (4) - cache_slack (40)"),
    (lambda c: c["runs"].append({"name": "lazy mit", "method": "mit", "compress_every": 4}),
     "config key runs[8] ('lazy mit'): compress-every applies to window, start_recent, ring, tova, the kvpress methods "
     "and llamacpp:shift, not to 'mit'"),
    (lambda c: c["runs"][0].update(texts=["macbeth"]), "config key runs[0].texts: unknown text 'macbeth'"),
    (lambda c: c["ablations"]["softlite"].update(texts=["macbeth"]),
     "config key ablations.softlite.texts: unknown text 'macbeth'"),
    (lambda c: c["probes"]["verify_slack_effect"].update(grid={"cache_slack": [0, 2]}),
     "config key probes.verify_slack_effect.grid: the probe needs max_drop in its grid"),
    (lambda c: c["ablations"].update(speed={"base": {"method": "start_recent"}, "values": [1]}),
     "config key ablations.speed: 'speed' is not a run parameter"),
    (lambda c: c["probes"]["verify_max_drop_effect"]["grid"].update(softlite_mode=["eager"]),
     "config key probes.verify_max_drop_effect.grid ('softlite_mode=eager, max_drop=0'): "
     "unknown softlite-mode 'eager'"),
    (lambda c: c["probes"].update(verify_everything={"base": {"method": "mit"}, "grid": {"sink": [1]}}),
     "'verify_everything' is not one of"),
    (lambda c: c["bench"].update(model="pythia"),
     "config key bench.model: unknown model 'pythia' (known: tiny_llama, tiny_gemma3)"),
    (lambda c: c["bench"].update(block=4), "config key bench: block (4) must be at least compress_every (8)"),
    (lambda c: c["bench"].update(stream_methods=["ring", "h2o"]), "'h2o' is not one of"),
    (lambda c: c["ablations"]["softlite"]["grid"].update(refresh=[30]),
     "config key ablations.softlite.grid ('compress_every=4, cache_slack=0, max_drop=0, refresh=30'): budget"),
    (lambda c: c["runs"][0].update(max_tokens=500),
     "config key runs[0].max_tokens: 500 is more than text 'hamlet' is evaluated on (120)"),
    (lambda c: c["ablations"]["softlite"].update(control={"sink": 4}),
     "config key ablations.softlite.control: sink is not swept here (swept: cache_slack, compress_every, max_drop)"),
    (lambda c: c["findings"].append({"claim": "x", "group": "ablation:speed", "a": {"sink": 1}, "b": {"sink": 4},
                                     "expect": "higher"}),
     "config key findings[5].group: no sweep 'ablation:speed'"),
    (lambda c: c["findings"].append({"claim": "x", "group": "rows", "a": {"name": "Ours (best)"},
                                     "b": {"name": "SnapKV"}, "expect": "lower"}),
     "config key findings[5].b: a finding of group 'rows' takes {name: <a row of runs or peers>}, got "
     "{'name': 'SnapKV'}"),
    (lambda c: c.update(peers=[]) or c["protocol"].update(evaluator="parallel"),
     "config key ablations.refresh.values[1] ('refresh=4'): evaluator 'parallel' cannot serve this run: refresh "
     "re-inserts evicted tokens"),
    (lambda c: c["baseline"].update(stride=0), "0 is less than the minimum of 1"),
    (lambda c: c["ablations"]["softlite"].update(models=["gemma"]),
     "config key ablations.softlite.models: unknown model 'gemma' (known: tiny_llama, tiny_gemma3)"),
    (lambda c: c["runs"][0].update(sink_layers="sliding"), "'sliding' is not one of ['global', 'all']"),
    (lambda c: c["runs"][5].update(sink_layers="all"),
     "config key runs[5] ('Dense'): sink-layers 'all' applies to the caches that keep sinks"),
])
def test_bad_configs_fail_before_any_job_naming_the_key(tmp_path, change, needle):
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, "report/paper_tables.md", config=edited(workdir, change))
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr
    assert not (workdir / "results").exists()


def test_a_second_model_plans_its_own_jobs_in_a_dry_run(tmp_path):
    """tiny_gemma3 ({source, texts, max_tokens}): its texts only, every job under its ceiling, the entries that name
    `models: [tiny_llama]` left out, one baseline per model x text that a row runs on."""
    jobs = planned(copy_workflow(tmp_path))
    gemma = sorted(out for rule, out in jobs if "/tiny_gemma3/" in out and rule in ("evaluate", "quality", "baseline"))
    assert gemma and all(out.startswith(("results/runs/tiny_gemma3/hamlet/cap32_n100_p1_",
                                         "results/baselines/tiny_gemma3/hamlet/cap32_n100_p1_")) for out in gemma)
    assert sum(rule == "evaluate" and "/tiny_gemma3/" in out for rule, out in jobs) == 8 + 3
    assert {out.rsplit("/", 1)[1] for out in gemma if "sinklayers" in out} == {
        f"start_recent_s{s}_k1_sl0_md0_ov0_rf0_sinklayers-all.json" for s in (0, 4)}
    assert sorted(out.split("/")[2:4] for rule, out in jobs if rule == "baseline") == [
        ["tiny_gemma3", "hamlet"], ["tiny_llama", "hamlet"], ["tiny_llama", "tempest"]]
    assert ("tokenize", "results/tokens/tiny_gemma3/hamlet.json") in jobs
    assert not any("tiny_gemma3" in out and ("kvpress" in out or "probes" in out) for _, out in jobs)


@pytest.mark.parametrize("name, baseline", [
    ("paper.yaml", "pythia28b/pg19/cap2048_n20000_p1_float16_cuda_seed0/recompute_s4_stride8.json"),
    ("study.yaml", "smollm2/hamlet/cap256_n16384_p256_float32_cpu_seed0/recompute_s4_stride64.json"),
    ("config.yaml", "gemma3/hamlet/cap256_n2304_p256_float32_cpu_seed0/recompute_s4_stride64.json"),
])
def test_shipped_configs_are_valid_in_a_dry_run(tmp_path, name, baseline):
    """config/paper.yaml (GPU and Hub), config/study.yaml (make study) and the default pass the schema and the
    config checks, and plan their jobs."""
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, "report/paper_tables.md", "--dry-run", config=f"config/{name}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"results/baselines/{baseline}" in proc.stdout


def test_slurm_profile_is_valid_in_a_dry_run(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    workdir = copy_workflow(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "report/paper_tables.md", "--dry-run",
                           "--workflow-profile", "profiles/slurm", "--configfile", "config/smoke.yaml"],
                          cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "paper_tables" in proc.stdout


def test_snakemake_lint_is_clean(tmp_path):
    """`snakemake --lint` finds nothing: the rule files hold rules only (their helpers are in rules/common.smk)
    and every rule runs a script, not a long run: block."""
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, "--lint")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "Lints for" not in out, out[-5000:]
    assert "Congratulations, your workflow is in a good condition!" in out


# ---- faults: a killed job, a truncated result, two runs at once, a peer that dies ----
# Each test breaks a copy of the finished workflow (file times kept), so the others never see its damage.

RUNS = "results/runs/tiny_llama/hamlet/cap32_n120_p1_float32_cpu_seed0"
REFRESH = f"{RUNS}/start_recent_s4_k4_sl0_md0_ov0_rf4.json"  # the decode loop: the slowest evaluation
REFRESH_NLLS = REFRESH.replace("results/runs/", "results/quality/")  # its NLLs: the decode loop's own job
NO_KVPRESS = "no-such-python"  # what the peers' rows were last run with (see the test above), so they stay


def snapshot(done: Path, dest: Path) -> Path:
    shutil.copytree(done, dest, symlinks=True)
    shutil.rmtree(dest / ".snakemake" / "locks", ignore_errors=True)
    return dest


def without_kvpress(workdir: Path) -> dict:
    return {**os.environ, "STREAMKV_KVPRESS_PYTHON": str(workdir / NO_KVPRESS)}


def start_snakemake(workdir: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", "1", "--configfile", "config/smoke.yaml"]
    return subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def wait_for(condition, what: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def job_pid(workdir: Path, script: str) -> int | None:
    """The process of a running job of `script` (Snakemake runs a copy of it from .snakemake/scripts)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if any(arg.endswith(f".{script}".encode()) for arg in cmdline) and \
                    (proc / "cwd").resolve() == workdir.resolve():
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def quality(result: Path) -> tuple[dict, pd.DataFrame]:
    """What an evaluation computed (its NLLs and cache lengths), without its timings."""
    record = json.loads(result.read_text())
    keep = ("ppl", "nll_mean", "n_scored", "kv_len_min", "kv_len_mean", "kv_len_max", "n_prunes", "tokens_dropped")
    trace = pd.read_parquet(result.with_suffix(".parquet"))
    assert record["status"] == "ok"
    return {k: record["metrics"][k] for k in keep}, trace[["nll", "kv_len"]]


def test_a_job_killed_mid_run_leaves_nothing_and_the_next_run_equals_an_uninterrupted_one(done, tmp_path):
    workdir = snapshot(done, tmp_path / "wf")
    result = workdir / REFRESH_NLLS
    expected, expected_trace = quality(result)
    result.unlink()
    log = workdir / "logs" / REFRESH_NLLS.replace("results/", "").replace(".json", ".log")
    run = start_snakemake(workdir, REFRESH_NLLS)
    pid = wait_for(lambda: job_pid(workdir, "evaluate.py"), "the evaluation job to start")
    # The job runs in slices of 10 ms until the decode loop's progress bar is in its log, then it is killed as the
    # kernel's OOM killer would kill it: mid-run, however fast this machine is.
    while True:
        os.kill(pid, signal.SIGSTOP)
        if log.exists() and "start_recent:" in log.read_text():
            break
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    out = run.communicate(timeout=300)[0]
    assert run.returncode != 0 and "Error in rule quality" in out, out[-3000:]
    assert not result.exists()  # no half-written result: the next run cannot mistake it for a finished one
    again = snakemake(workdir, REFRESH_NLLS)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    got, got_trace = quality(result)
    assert got == pytest.approx(expected, rel=1e-9)
    pd.testing.assert_frame_equal(got_trace, expected_trace, rtol=1e-9)


def test_a_truncated_result_is_named_with_the_fix(done, tmp_path):
    workdir = snapshot(done, tmp_path / "wf")
    broken = workdir / RUNS / "window_k1.json"
    broken.write_text(broken.read_text()[:200])  # as a full disk or a copy cut short would leave it
    proc = snakemake(workdir, "results/summary.csv", env=without_kvpress(workdir))
    assert proc.returncode != 0
    log = (workdir / "logs/aggregate.log").read_text()
    assert f"{RUNS}/window_k1.json" in log and "--forcerun" in log, log[-3000:]
    # the fix the message gives works: the file's job runs again, and so does everything after it
    proc = snakemake(workdir, "results/summary.csv", "--forcerun", f"{RUNS}/window_k1.json",
                     env=without_kvpress(workdir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(broken.read_text())["status"] == "ok"


def test_a_second_snakemake_on_the_same_directory_is_refused(done, tmp_path):
    workdir = snapshot(done, tmp_path / "wf")
    first = start_snakemake(workdir, REFRESH, "--forcerun", REFRESH)
    wait_for(lambda: any((workdir / ".snakemake" / "locks").glob("*")), "the first run to lock the directory")
    second = snakemake(workdir, REFRESH, "--forcerun", REFRESH)
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out[-3000:]
    assert second.returncode != 0
    assert "Directory cannot be locked" in second.stdout + second.stderr


DYING_WORKER = """\
import os, runpy, signal, sys

class Requests:  # the worker's stdin: the process dies at its 21st request, mid-run, as a segfault would end it
    def __init__(self, raw):
        self.raw = raw

    def __iter__(self):
        for n, line in enumerate(self.raw, 1):
            if n > 20:
                os.kill(os.getpid(), signal.SIGKILL)
            yield line

class Stdin:
    buffer = Requests(sys.stdin.buffer)

sys.stdin = Stdin()
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@needs_kvpress
def test_a_peer_worker_that_dies_mid_run_is_a_failed_row_not_a_failed_pipeline(done, tmp_path):
    from streamkv.peers.installed import kvpress_python

    workdir = snapshot(done, tmp_path / "wf")
    (tmp_path / "dying_worker.py").write_text(DYING_WORKER)
    python = tmp_path / "dying-python"
    python.write_text(f'#!/bin/sh\nexec {kvpress_python()} {tmp_path / "dying_worker.py"} "$@"\n')
    python.chmod(0o755)
    peers = [f"{RUNS}/kvpress-streaming_llm_s4_k1.json", f"{RUNS}/kvpress-streaming_llm-rerotate_s4_k1.json"]
    nlls = [peer.replace("results/runs/", "results/quality/") for peer in peers]  # the peers' decode loops
    proc = snakemake(workdir, "report/paper_tables.md", "--forcerun", *nlls,
                     env={**os.environ, "STREAMKV_KVPRESS_PYTHON": str(python)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for peer in peers:
        record = json.loads((workdir / peer).read_text())
        assert record["status"] == "failed" and "kvpress worker" in record["error"] and "stopped" in record["error"]
    failed = (workdir / "report/paper_tables.md").read_text().split("## Failed configurations")[1]
    assert failed.count("kvpress worker") >= 2


def test_a_cpu_without_vnni_gets_a_failed_int8_fbgemm_row_with_its_reason(done, tmp_path, cpu_without):
    """On every CPU: the CPU probe made to answer no reaches Snakemake's jobs; the int8-fbgemm row (its decode loop
    and its timed job, re-run) fails with the refusal, shown in the report, and every other row stays ok."""
    workdir = snapshot(done, tmp_path / "wf")
    env = {**cpu_without("VNNI"), "STREAMKV_KVPRESS_PYTHON": without_kvpress(workdir)["STREAMKV_KVPRESS_PYTHON"]}
    jobs = sorted(str(p.relative_to(workdir)) for part in ("runs", "quality")
                  for p in (workdir / "results" / part).rglob("*.json") if "int8-fbgemm" in str(p))
    assert len(jobs) == 2, jobs
    proc = snakemake(workdir, "report/paper_tables.md", "--forcerun", *jobs, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = pd.read_csv(workdir / "results/summary.csv")
    row = summary[summary.weights == "int8-fbgemm"].iloc[0]
    assert row.status == "failed" and W.get("int8-fbgemm").refusal in row.error, row.error
    others = summary[(summary.weights != "int8-fbgemm") & (summary.group != "peers")]
    assert (others[others.text_key != "short"].status == "ok").all()
    report = (workdir / "report/paper_tables.md").read_text()
    failed = report.split("## Failed configurations")[1].split("## Provenance")[0]
    assert "VNNI instructions (avx512_vnni or avx_vnni); this CPU has neither: use bfloat16 or int8" in failed
