"""Under CI=true a skip is allowed only from tests/ci_skips.py's list, for its reason; any other skip fails the run."""

from pathlib import Path

import pytest

import ci_skips

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
SKIPS = '''
import pytest

def test_listed():
    pytest.skip("the reason it is listed for")

def test_listed_for_another_reason():
    pytest.skip("a reason nobody listed")

@pytest.mark.skipif(True, reason="a condition that became true")
def test_unlisted():
    pass

@pytest.mark.xfail(reason="known to fail")
def test_expected_failure():
    assert False

def test_passes():
    pass
'''
CONFTEST = '''
import ci_skips
from ci_skips import pytest_runtest_makereport

ci_skips.ALLOWED = {"test_skips.py::test_listed": "the reason it is listed for",
                    "test_skips.py::test_listed_for_another_reason": "the reason it is listed for"}
'''


@pytest.fixture
def suite(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_skips=SKIPS)
    return pytester


def test_an_unlisted_skip_fails_under_ci(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest_subprocess("-p", "no:xdist", "-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=1, skipped=1, xfailed=1, failed=1, errors=1)
    out = result.stdout.str()
    assert result.ret != 0
    assert "no entry of tests/ci_skips.py's ALLOWED names this test for this reason: a reason nobody listed" in out
    assert "for this reason: a condition that became true" in out
    assert "SKIPPED [1] test_skips.py:4: the reason it is listed for" in out


def test_outside_ci_a_skip_is_a_skip(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest_subprocess("-p", "no:xdist", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert result.ret == 0


def test_every_listed_skip_names_a_test_that_exists():
    """An entry whose test was renamed would allow nothing, but would still be listed as allowed in the docs."""
    for key in ci_skips.ALLOWED:
        path, func = key.split("[")[0].split("::")
        assert f"def {func}(" in (TESTS.parent / path).read_text(), key
