"""Eviction policies: *when* to prune and *how many* tokens to drop.

A policy only counts; it never touches tensors.  Before each forward the cache
asks `plan(length, q, position)`: how many of the oldest non-sink tokens must
go before `q` new tokens (the first at absolute `position`) are appended to a
cache that holds `length`, and what kind of prune that is.  The answer is a
pure function of its inputs, because the attention mask is sized from the same
plan before the layers run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from streamkv.errors import StreamkvError

# Kinds of prune, as recorded in traces.
NONE = ""
LAZY = "lazy"  # on the rhythm (a multiple of K), the staged amount
FORCED = "forced"  # on the rhythm, but more than the staged amount, so the hard cap holds
EMERGENCY = "emergency"  # off the rhythm: the hard cap was reached between scheduled prunes

SOFTLITE_MODES = ("naive", "cooldown")


@dataclass(frozen=True)
class Prune:
    dropped: int = 0
    kind: str = NONE


class Policy(Protocol):
    """What a streaming cache asks its eviction policy; `KeepAll` and `StartRecent` are the built-in ones.

    A policy decides how many tokens go, and when; the cache's layers decide which: the oldest after the `sink`
    first, or, in a score-based cache (`streamkv.cache.scored`), the lowest-scored after them.
    """

    sink: int  # tokens at the start that are never evicted

    def plan(self, length: int, q: int, position: int) -> Prune:
        """The prune the forward of `q` tokens at stream position `position` makes, with `length` stored."""

    @property
    def max_kv(self) -> int | None:
        """The most keys a query may see (None: unbounded), to size the cache's buffers."""


@dataclass
class KeepAll:
    """No eviction: the dense reference."""

    sink: int = 0

    def plan(self, length: int, q: int, position: int) -> Prune:
        return Prune()

    @property
    def max_kv(self) -> int | None:
        return None


@dataclass
class StartRecent:
    """Keep `sink` first tokens and the recent `window`; prune lazily every `compress_every` (K) positions.

    Soft size C = sink + window: what a prune goes back to.  Hard cap H: the
    most keys a query may see, C + sigma with a `cache_slack` sigma > 0, else
    the lazy bound C + K - 1.  A scheduled prune fires when a multiple of K is
    among the incoming positions and the cache would exceed C; it drops what is
    over C, at most `max_drop` (delta > 0) tokens.  An emergency prune fires
    whenever the incoming tokens would exceed H off the rhythm.

    Strict (K = 1) prunes on every step.  With sigma = 0 and delta = 0 this is
    plain lazy pruning (the cache overshoots C by at most K - 1).  `sink = 0`
    is the plain sliding window.

    `mode` says how softlite (sigma, delta > 0) sizes a scheduled prune:

    * `naive` (the study's rule): drop min(over C, delta).  When delta < K the
      cache climbs to H and emergency prunes take over, every few steps: the
      "frequency trap" (more prunes, not fewer).
    * `cooldown`: keep the lazy rhythm.  A scheduled prune drops at least
      enough that the cache cannot reach H before the next multiple of K, so no
      emergency prune fires in between; when that needs more than delta the
      prune is marked `forced`.
    """

    sink: int
    window: int
    compress_every: int = 1
    cache_slack: int = 0
    max_drop: int = 0
    mode: str = "naive"

    def __post_init__(self):
        if self.mode not in SOFTLITE_MODES:
            raise StreamkvError(f"unknown softlite mode '{self.mode}'; choose one of: {', '.join(SOFTLITE_MODES)}")

    @property
    def soft(self) -> int:
        return self.sink + self.window

    @property
    def hard(self) -> int:
        return self.soft + (self.cache_slack if self.cache_slack else self.compress_every - 1)

    @property
    def max_kv(self) -> int:
        """Largest number of keys a decode step attends to (own key included)."""
        if self.max_drop:
            return self.hard
        return min(self.hard, self.soft + self.compress_every - 1)

    def due(self, q: int, position: int) -> bool:
        """Whether a multiple of K lies among the incoming positions."""
        k = self.compress_every
        return (position + q - 1) // k > (position - 1) // k

    def next_due(self, q: int, position: int) -> int:
        """The first multiple of K after the incoming positions."""
        k = self.compress_every
        return ((position + q - 1) // k + 1) * k

    def plan(self, length: int, q: int, position: int) -> Prune:
        over = length + q - self.soft  # above the soft size once the tokens are in
        need = length + q - self.hard  # above the hard cap once the tokens are in
        due = self.due(q, position)
        if not due and need <= 0:
            return Prune()
        staged = max(0, min(over, self.max_drop) if self.max_drop else over)
        drop = max(staged, need)
        if self.mode == "cooldown":
            # what keeps the cache under H until the next scheduled prune
            drop = max(drop, length + self.next_due(q, position) - position - self.hard)
        drop = min(drop, max(0, length - self.sink))  # only tokens already cached, never the sinks
        if drop <= 0:
            return Prune()
        if not due:
            return Prune(drop, EMERGENCY)
        return Prune(drop, LAZY if drop <= staged else FORCED)
