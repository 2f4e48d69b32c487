"""Spike metrics on synthetic NLL series with known bumps."""

import numpy as np
import pandas as pd
import pytest

from streamkv.analysis.spikes import diagnose, spike_events, steps_since_prune

BUMP = [0.0, 0.5, 1.0, 0.5]  # at the event, then a bump over the next three steps


def synthetic(n=100, events=(10, 40, 70), noise=0.0):
    """A baseline trace and a run trace whose NLL carries BUMP after each prune event."""
    rng = np.random.default_rng(0)
    base_nll = rng.uniform(1, 3, n)
    excess = rng.normal(0, noise, n) if noise else np.zeros(n)
    for e in events:
        excess[e : e + len(BUMP)] += BUMP
    pruned = np.zeros(n, dtype=bool)
    pruned[list(events)] = True
    common = {"step": np.arange(1, n + 1), "position": np.arange(n)}
    baseline = pd.DataFrame({**common, "nll": base_nll, "pruned": False, "dropped": 0})
    run = pd.DataFrame({**common, "nll": base_nll + excess, "pruned": pruned, "dropped": pruned * 8,
                        "prune_kind": np.where(pruned, "lazy", "")})
    return run, baseline


def test_known_bump_gives_known_peak_width_and_area():
    run, baseline = synthetic()
    summary, events, curve = diagnose(run, baseline, horizon=20, threshold=0.25)
    assert summary["spike_events"] == 3
    assert summary["spike_peak"] == pytest.approx(1.0)
    assert summary["spike_width"] == 3
    assert summary["spike_area"] == pytest.approx(2.0)
    assert events.position.tolist() == [10, 40, 70] and events.dropped.tolist() == [8, 8, 8]
    assert curve.set_index("since")["mean"].iloc[:4].tolist() == pytest.approx(BUMP)


def test_windows_stop_at_the_next_event_and_at_the_horizon():
    excess = np.zeros(50)
    excess[[3, 12]] = 1.0
    ev = spike_events(excess, [2, 5], horizon=10, threshold=0.5)
    assert ev.length.tolist() == [3, 10]  # [2, 5) then [5, 15)
    assert ev.area.tolist() == [1.0, 1.0] and ev.width.tolist() == [1, 1]


def test_negative_excess_does_not_count_as_area():
    ev = spike_events(np.array([-1.0, 0.2, -0.5, 0.3]), [0], horizon=4, threshold=0.25)
    assert ev.area.item() == pytest.approx(0.5) and ev.peak.item() == pytest.approx(0.3) and ev.width.item() == 1


def test_noise_leaves_the_bump_recoverable():
    run, baseline = synthetic(n=2000, events=range(10, 1990, 32), noise=0.05)
    summary, _, curve = diagnose(run, baseline, horizon=32, threshold=0.25)
    assert summary["spike_width"] == pytest.approx(3, abs=0.05)  # noise stays under the threshold
    assert summary["spike_area"] > 2.0  # the positive part of the noise adds to the area
    assert curve["mean"].iloc[:4].tolist() == pytest.approx(BUMP, abs=0.02)


def test_steps_since_prune():
    assert steps_since_prune(np.array([0, 1, 0, 0, 1, 0], dtype=bool)).tolist() == [-1, 0, 1, 2, 0, 1]


def test_no_events():
    run, baseline = synthetic(events=())
    summary, events, curve = diagnose(run, baseline)
    assert summary["spike_events"] == 0 and summary["spike_peak"] is None and len(curve) == 0
