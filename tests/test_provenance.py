"""The code hashes follow the subpackages: a result depends on the modules of the measuring side (cache, models,
evaluation, peers, bench and what they import); editing one that only reads results re-runs no evaluation."""

from streamkv.provenance import ANALYSIS_MODULES, EVALUATION_MODULES, PACKAGE_DIR, code_hash, module_path

MEASURING = ("cache", "models", "evaluation", "peers", "bench")
READING = ("analysis", "probes")
TABLES = {"bench.tables"}  # the bench's printed tables read its results: editing them re-runs no bench


def _modules(package: str) -> set[str]:
    return {".".join(p.relative_to(PACKAGE_DIR).with_suffix("").parts).removesuffix(".__init__")
            for p in (PACKAGE_DIR / package).rglob("*.py")}


def test_every_module_of_the_measuring_side_is_in_the_evaluation_hash():
    for package in MEASURING:
        missing = _modules(package) - set(EVALUATION_MODULES) - TABLES
        assert not missing, f"{package}: {sorted(missing)}"


def test_the_reading_side_is_hashed_apart_unless_the_measuring_side_imports_it():
    assert not set(EVALUATION_MODULES) & set(ANALYSIS_MODULES)
    reading = set().union(*(_modules(p) for p in READING), TABLES) - {"analysis.long_stream"}  # (its own hash)
    for module in reading - set(EVALUATION_MODULES):
        assert module in ANALYSIS_MODULES, module
    assert "analysis.report" in ANALYSIS_MODULES and "probes.slack" in ANALYSIS_MODULES


def test_every_hashed_module_has_a_source_file_and_the_hashes_differ():
    for module in (*EVALUATION_MODULES, *ANALYSIS_MODULES):
        assert module_path(module) is not None, module
    assert code_hash(EVALUATION_MODULES) != code_hash(ANALYSIS_MODULES)
