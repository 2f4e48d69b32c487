"""Claims by kind (superiority, non-inferiority, equivalence), judged over a claim's pairs with Holm's procedure:
every verdict branch on constructed inputs, and the p-values against the intervals they come from."""

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from streamkv.analysis.report import findings
from streamkv.analysis.stats import DEFAULT_MARGIN, Difference, block_bootstrap, claim_p_values, holm
from streamkv.analysis.summary import _difference_row, claim_margin


def pair(expect: str, lo_pct: float, hi_pct: float, margin: float | None = None, a: str = "a",
         claim: str = "c", status: str = "ok") -> dict:
    """A finding's row whose 95 % interval of the PPL change is [lo_pct, hi_pct]: resamples at the quantiles of a
    normal distribution with that interval."""
    sd = (hi_pct - lo_pct) / (2 * NormalDist().inv_cdf(0.975))
    quantiles = NormalDist((lo_pct + hi_pct) / 2, sd or 1e-12).inv_cdf
    boot = np.log1p(np.array([quantiles((i + 0.5) / 4000) for i in range(4000)]) / 100)
    mean = float(np.median(boot))
    d = (Difference(5000, 0.0, 0.0, 0.0, status="identical") if status == "identical" else
         Difference(5000, mean, float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5)), blocks=80,
                    boot=boot))
    if margin is None and expect in DEFAULT_MARGIN:
        margin = DEFAULT_MARGIN[expect]
    return _difference_row(d, expect, math.nan if margin is None else margin, model_key="m", text_key="t",
                           kind="finding", group="rows", a=a, b="b", claim=claim)


def verdict(*rows: dict) -> str:
    (f,) = findings(pd.DataFrame(list(rows)))
    return f["verdict"]


def test_one_sided_p_values_agree_with_the_interval():
    boot = np.random.default_rng(0).normal(0.01, 0.004, 20000)  # about +1.0 % [+0.2, +1.8]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    p, opposite = claim_p_values(boot, "higher")
    assert lo > 0 and p < 0.025 and opposite > 0.975
    p, _ = claim_p_values(boot, "noninferior", margin=2.0)  # the upper end (about +1.8 %) below 2 %
    assert (math.expm1(hi) * 100 < 2.0) == (p <= 0.025)
    p, _ = claim_p_values(boot, "noninferior", margin=1.5)
    assert math.expm1(hi) * 100 > 1.5 and p > 0.025
    p, opposite = claim_p_values(boot, "equivalent", margin=0.5)
    assert p > 0.5 and opposite > 0.025  # centred outside +-0.5 % but not wholly beyond it
    with pytest.raises(ValueError, match="unknown claim kind 'zero'"):
        claim_p_values(boot, "zero")


def test_holm_steps_down_and_stops_at_the_first_failure():
    assert holm([0.01, 0.04, 0.03], 0.05).tolist() == [True, False, False]  # 0.01 <= .05/3; 0.03 > .05/2
    assert holm([0.01, 0.02, 0.04], 0.05).tolist() == [True, True, True]  # .01 <= .0167, .02 <= .025, .04 <= .05
    assert holm([0.2, np.nan, 0.001], 0.05).tolist() == [False, False, True]
    assert holm([], 0.05).tolist() == []


@pytest.mark.parametrize("rows, head", [
    ([("lower", -3.0, -1.0), ("lower", -2.5, -0.5)], "holds"),
    ([("lower", -1.0, +1.0), ("lower", -2.0, +0.5)], "not shown"),
    ([("lower", +0.5, +2.0), ("lower", -1.0, +1.0)], "reversed"),
    ([("lower", -3.0, -1.0), ("lower", +0.5, +2.0)], "mixed"),
    ([("noninferior", -1.0, +1.5)], "non-inferior"),
    ([("noninferior", +2.5, +4.0)], "does not hold"),
    ([("noninferior", -1.0, +3.0)], "not shown"),
    ([("equivalent", -0.5, +0.6)], "equivalent"),
    ([("equivalent", +1.5, +3.0)], "does not hold"),
    ([("equivalent", -2.0, +2.0)], "not shown"),
])
def test_every_verdict_branch(rows, head):
    got = verdict(*(pair(*r, a=f"a{i}") for i, r in enumerate(rows)))
    assert got.split(":", 1)[0] == head, got
    assert f"{len(rows)} pair" in got and "Holm at 2.5 % one-sided" in got


def test_an_interval_that_contains_zero_is_never_a_no_difference_verdict():
    """The old reading ("every interval contains zero: holds") called a wide interval a proof of no effect; an
    equivalence claim needs the interval inside its margin, however much the interval straddles zero."""
    wide = verdict(pair("equivalent", -4.0, +4.0))
    assert wide.startswith("not shown") and "too wide to show equivalence" in wide
    assert verdict(pair("equivalent", -0.4, +0.3)).startswith("equivalent")
    assert verdict(pair("noninferior", -6.0, +1.0, margin=2.0)).startswith("non-inferior")


def test_identical_nlls_are_equivalent_and_non_inferior_but_never_lower():
    assert verdict(pair("equivalent", 0, 0, status="identical")).startswith("equivalent")
    assert verdict(pair("noninferior", 0, 0, status="identical")).startswith("non-inferior")
    assert verdict(pair("lower", 0, 0, status="identical")).startswith("not shown")


def test_holm_keeps_the_family_wise_level_of_a_claim():
    """Three pairs that each clear 2.5 % alone do not all clear it together: the upper ends of two intervals lie
    just below the margin (p about 0.023 each), so Holm shows non-inferiority on the first pair only."""
    rows = [pair("noninferior", -1.0, 2.0 + x, margin=2.0, a=f"a{i}") for i, x in enumerate((-1.5, -0.02, -0.03))]
    assert [r["p"] <= 0.025 for r in rows] == [True] * 3
    alone = [findings(pd.DataFrame([r]))[0]["verdict"].split(":")[0] for r in rows]
    assert alone == ["non-inferior"] * 3
    together = verdict(*rows)
    assert together.startswith("not shown: 1 of 3 pairs non-inferior at the claim's level"), together


def test_a_finding_prints_its_margin_interval_and_half_width():
    (f,) = findings(pd.DataFrame([pair("noninferior", -0.4, +1.6, margin=2.0)]))
    assert f["expect"] == "no worse than b by more than 2 % (non-inferiority)"
    assert "below the +2 % margin" in f["verdict"]
    assert f["pairs"][0].startswith("a vs b: PPL +0.6") and "half-width 1.00 %" in f["pairs"][0]
    (g,) = findings(pd.DataFrame([pair("equivalent", -0.4, +0.6)]))
    assert g["expect"] == "the same PPL within ±1 % (equivalence)" and "within ±1 %" in g["verdict"]


def test_pairs_without_an_interval_are_left_out_and_said_so():
    few = _difference_row(Difference(100, 0.01, math.nan, math.nan, blocks=5, status="too few"), "equivalent", 1.0,
                          model_key="m", text_key="t", kind="finding", group="g", a="z", b="b", claim="c")
    got = verdict(pair("equivalent", -0.5, 0.5), few)
    assert got.startswith("equivalent") and "1 pair(s) with too few targets for an interval left out" in got
    assert verdict(few).startswith("not tested")


def test_margins_come_from_the_claim_else_its_kind():
    assert claim_margin({"expect": "noninferior", "margin": 1.5}) == 1.5
    assert claim_margin({"expect": "noninferior"}) == DEFAULT_MARGIN["noninferior"]
    assert claim_margin({"expect": "equivalent"}) == DEFAULT_MARGIN["equivalent"]
    assert math.isnan(claim_margin({"expect": "lower"}))


def test_a_block_bootstrap_difference_gives_the_p_values_of_its_interval():
    rng = np.random.default_rng(3)
    d = block_bootstrap(0.02 + rng.normal(0, 0.2, 4096), block=64)
    p, opposite = d.p_values("higher")
    assert d.lo > 0 and p <= 0.025 and opposite > 0.975
    p, _ = d.p_values("noninferior", margin=d.pct_hi + 0.5)
    assert p <= 0.025
    p, _ = d.p_values("noninferior", margin=d.pct_hi - 0.5)
    assert p > 0.025
