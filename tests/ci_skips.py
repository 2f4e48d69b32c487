"""Skips under CI: only those named here, each for its stated reason; any other skip fails the run.

`.ci/run` sets CI=true.  A test skipped there is a check that CI did not make; a skip nobody listed (a missing
package, a fixture that gave up, a condition that became true by accident) would turn the run green while testing
less.  So under CI a skipped test fails, unless its node id starts with a key of ALLOWED and its skip reason contains
the key's text.  Outside CI, skips are reported as usual (`-ra` lists them).

The CPU-dependent tests (docs/testing.md, "CPU features"): each tests a feature where the CPU has it and is skipped
elsewhere; the refusal on a CPU without it is tested on every machine (`tests/conftest.py`'s `cpu_without`).
"""

from __future__ import annotations

import os

import pytest

IN_CI = bool(os.environ.get("CI"))

VNNI = "int8-fbgemm needs a CPU with VNNI"
ALLOWED: dict[str, str] = {
    # int8-fbgemm runs only on CPUs with VNNI (AVX512-VNNI or AVX-VNNI); elsewhere streamkv refuses it, which
    # test_weights.py::test_int8_fbgemm_is_refused_without_vnni and the pipeline's failed-row test check everywhere.
    "tests/test_weights.py::test_every_variant_keeps_the_cache_precision_and_stays_near_float32[int8-fbgemm]": VNNI,
    "tests/test_weights.py::test_int8_fbgemm_quantises_activations_to_all_8_bits": VNNI,
    "tests/test_weights.py::test_int8_fbgemm_compiles_into_one_graph_around_its_opaque_linears": VNNI,
    "tests/test_batch.py::test_streams_stay_independent_under_quantised_weights[int8-fbgemm]": VNNI,
    # where FlashAttention 2 can run (CUDA with flash-attn, or the kernels package), its absence cannot be tested.
    "tests/test_cli.py::test_attention_implementation_whose_package_is_missing": "FlashAttention 2 can run here",
    # the grouping check runs only on pytest-xdist's workers; a plain `pytest` (no -n) has none.
    "tests/test_pipeline.py::test_the_pipeline_tests_share_one_worker": "not run by a pytest-xdist worker",
}


def allowed(nodeid: str, reason: str) -> bool:
    return any(nodeid.startswith(key) and text in reason for key, text in ALLOWED.items())


def skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (IN_CI and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = skip_reason(report)
    if not allowed(item.nodeid, reason):
        report.outcome = "failed"
        report.longrepr = (f"skipped under CI=true, and no entry of tests/ci_skips.py's ALLOWED names this test for "
                           f"this reason: {reason}")
