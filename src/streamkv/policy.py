"""Eviction policies: *when* to prune and *how many* tokens to drop.

A policy only counts; it never touches tensors.  Before each forward the cache
asks `plan(length, q, position)`: how many of the oldest non-sink tokens must
go before `q` new tokens (the first at absolute `position`) are appended to a
cache that holds `length`.  The answer must be a pure function of its inputs
and of state changed only in `commit`, because the attention mask is sized
from the same plan before the layers run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class KeepAll:
    """No eviction: the dense reference."""

    sink: int = 0

    def plan(self, length: int, q: int, position: int) -> int:
        return 0

    def commit(self, length: int, q: int, position: int, dropped: int) -> None:
        pass

    @property
    def max_kv(self) -> int | None:
        return None


@dataclass
class StartRecent:
    """Keep `sink` first tokens and the recent `window`; prune lazily every `compress_every` positions.

    Strict (K = 1) prunes on every step, so a query sees at most `sink + window`
    keys, its own included.  Lazy (K > 1) prunes only when the incoming
    position is a multiple of K and the cache is over `sink + window`; between
    prunes the cache overshoots by at most K - 1 tokens.  `sink = 0` is the
    plain sliding window.

    Softlite (the seeds' staged eviction): `max_drop` (delta > 0) caps what one
    lazy prune drops, so eviction is spread over several prunes; `cache_slack`
    (sigma > 0) sets a hard cap H = sink + window + sigma, and an emergency
    prune fires whenever the incoming tokens would exceed it.  With sigma = 0
    and delta = 0 this is plain lazy pruning.
    """

    sink: int
    window: int
    compress_every: int = 1
    cache_slack: int = 0
    max_drop: int = 0

    @property
    def soft(self) -> int:
        return self.sink + self.window

    @property
    def hard(self) -> int | None:
        return self.soft + self.cache_slack if self.cache_slack else None

    @property
    def max_kv(self) -> int | None:
        """Largest number of keys a query attends to (own key included), where the policy promises one."""
        lazy = self.soft + self.compress_every - 1
        if self.cache_slack:
            return min(lazy, self.hard) if not self.max_drop else self.hard
        return None if self.max_drop else lazy

    def due(self, q: int, position: int) -> bool:
        """Whether a multiple of K lies among the incoming positions."""
        k = self.compress_every
        return (position + q - 1) // k > (position - 1) // k

    def plan(self, length: int, q: int, position: int) -> int:
        over = length + q - self.soft
        if over <= 0:
            return 0
        evictable = length - min(length, self.sink)
        staged = min(over, self.max_drop) if self.max_drop else over
        if self.hard is not None and length + q > self.hard:  # emergency: the hard cap is at stake
            return min(evictable, max(length + q - self.hard, staged))
        if self.due(q, position):
            return min(evictable, staged)
        # A chunk of several tokens may skip past a multiple of K and would
        # then break the lazy bound: prune whenever that bound is at stake.
        if not (self.cache_slack or self.max_drop) and length + q > self.soft + self.compress_every - 1:
            return min(evictable, over)
        return 0

    def commit(self, length: int, q: int, position: int, dropped: int) -> None:
        pass
