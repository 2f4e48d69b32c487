"""The probes: controlled comparisons read off the pipeline summary, one table (and one finding) each.

Every function takes the summary rows of one (model, text) and probe group,
plus the per-event spike table, and returns a frame with one row per point of
the probe's grid.  Nothing is re-run here: a probe is a view of runs the
pipeline already made under its own parameters.

One probe is one record of PROBES here and one module beside it (its table, its finding, its figure).  A probe
that needs streams of its own (recall: what eviction forgets) is a record of STREAM_PROBES: its config key names
the rows it runs, its jobs score its streams, and its table is read from their results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from streamkv.probes import recall
from streamkv.probes.k_quality import k_quality, k_quality_figure, k_quality_finding
from streamkv.probes.max_drop import max_drop_effect, max_drop_figure, max_drop_finding
from streamkv.probes.prune_overhead import prune_overhead, prune_overhead_figure, prune_overhead_finding
from streamkv.probes.slack import slack_effect, slack_figure, slack_finding


@dataclass(frozen=True)
class Probe:
    """One probe: the parameters its grid must sweep, its table, its one-line finding and its figure."""

    name: str
    sweeps: tuple[str, ...]  # it compares rows that differ in these parameters
    title: str
    table: Callable[[pd.DataFrame, pd.DataFrame], pd.DataFrame]  # (its summary rows, spike events) -> table
    finding: Callable[[pd.DataFrame], str]  # table -> numbers in a sentence or two
    figure: Callable  # (table, two axes, seaborn) -> None


PROBES: dict[str, Probe] = {p.name: p for p in (
    Probe("verify_max_drop_effect", ("max_drop",),
          "verify_max_drop_effect: delta on/off, naive and cooldown, at fixed K and sigma",
          max_drop_effect, max_drop_finding, max_drop_figure),
    Probe("verify_slack_effect", ("cache_slack", "max_drop"),
          "verify_slack_effect: sigma swept (window derived), control delta = 0 vs staged delta > 0",
          slack_effect, slack_finding, slack_figure),
    Probe("profile_prune_overhead", ("compress_every",),
          "profile_prune_overhead: forward vs cache update per decode step, against K",
          lambda part, events: prune_overhead(part), prune_overhead_finding, prune_overhead_figure),
    Probe("summarize_k_quality", ("compress_every",), "summarize_k_quality: quality and speed against K",
          lambda part, events: k_quality(part), k_quality_finding, k_quality_figure),
)}


@dataclass(frozen=True)
class StreamProbe:
    """A probe that scores streams of its own: its table from the rows' per-instance results, its markdown, its
    finding against a reference row, its figure."""

    name: str
    title: str
    table: Callable[..., pd.DataFrame]  # (every row's instances, cap, reference row) -> table
    markdown: Callable[[pd.DataFrame], str]
    finding: Callable[[pd.DataFrame, str], str]  # (table, reference row) -> numbers in sentences
    figure: Callable  # (table, two axes, seaborn) -> None


STREAM_PROBES: dict[str, StreamProbe] = {p.name: p for p in (
    StreamProbe("recall", "recall: what eviction forgets (a passage copied, a pass key asked for, D tokens later)",
                recall.table, recall.markdown, recall.finding, recall.figure),
)}


def finding(probe: str, table: pd.DataFrame) -> str:
    """The probe's result in one or two sentences, numbers only (no verdict the numbers do not carry)."""
    return PROBES[probe].finding(table) if len(table) else "No finished runs."


def probe_table(probe: str, summary: pd.DataFrame, events: pd.DataFrame, model: str, text: str) -> pd.DataFrame:
    part = summary[(summary.group == f"probe:{probe}") & (summary.model_key == model) & (summary.text_key == text)]
    part = part.drop_duplicates("file")
    if "against" in events:  # every run's prune events, once: those of its diagnosis against the reference
        events = events[events.against == "reference"]
    return PROBES[probe].table(part, events)
