"""The library installs without the pipeline: `pip install .` gives caches, evaluators, the bench and the CLI;
the `pipeline` extra adds Snakemake, the report's and figures' packages and Hub texts."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_ONLY = ("snakemake", "pyyaml", "jinja2", "seaborn", "adjustText", "datasets")
# Import names of the pipeline-only packages (and what only they pull in; pyyaml comes with huggingface_hub).
BLOCKED = ("snakemake", "jinja2", "seaborn", "adjustText", "datasets", "matplotlib")


def _name(requirement: str) -> str:
    return Requirement(requirement).name


def test_pipeline_packages_are_an_extra_not_a_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extra = {_name(r) for r in project["optional-dependencies"]["pipeline"]}
    assert not core & set(PIPELINE_ONLY)
    assert set(PIPELINE_ONLY) <= extra


@pytest.mark.slow
def test_library_and_cli_run_without_the_pipeline_packages(tmp_path):
    """With the pipeline's packages unimportable, every module of the library side imports, and the CLI evaluates
    (both evaluators), summarises and benches a tiny model."""
    script = tmp_path / "no_pipeline.py"
    script.write_text(
        "import importlib, pkgutil, sys\n"
        f"BLOCKED = {BLOCKED!r}\n"
        "sys.modules.update(dict.fromkeys(BLOCKED))  # None: import fails and find_spec says absent, as uninstalled\n"
        "import streamkv\n"
        "for sub in ('cache', 'evaluation', 'models', 'peers', 'bench'):\n"
        "    pkg = importlib.import_module(f'streamkv.{sub}')\n"
        "    for m in pkgutil.iter_modules(pkg.__path__, f'streamkv.{sub}.'):\n"
        "        importlib.import_module(m.name)\n"
        "from streamkv.cli import main\n"
        "out = sys.argv[1]\n"
        "base = ['eval', '--model', 'tiny:llama', '--text', 'embedded:shakespeare/hamlet', '--method',\n"
        "        'start_recent', '--cap', '32', '--max-tokens', '200', '--quiet']\n"
        "for ev in ('parallel', 'decode'):\n"
        "    assert main(base + ['--evaluator', ev, '--out', f'{out}/{ev}.json']) in (0, None)\n"
        "assert main(['summarize', f'{out}/parallel.json', f'{out}/decode.json']) in (0, None)\n"
        "rc = main(['bench', '--model', 'tiny:llama', '--caps', '32', '--compress-every', '4', '--blocks', '2',\n"
        "           '--block', '4', '--no-compile', '--sections', 'overhead', '--out', f'{out}/bench.json'])\n"
        "assert rc in (0, None)\n"
        "print('blocked imports seen:', sorted(m for m, v in sys.modules.items() if v is not None\n"
        "                                    and m.split('.')[0] in BLOCKED))\n")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "blocked imports seen: []"
