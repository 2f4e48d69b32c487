"""Auto-cap: every term that occupies KV slots is charged to one budget.

    sink + window + cache_slack + overlap + refresh <= cap

The current token counts toward the cap (as in MIT StreamingLLM and
llama.cpp): a query attends to at most `cap` keys, its own included.  Given a
cap, the window is what is left after the other terms, so two configurations
with the same cap always see the same number of keys at their hard limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamkv.errors import StreamkvError

_TERMS = ("sink", "window", "cache_slack", "overlap", "refresh")


@dataclass(frozen=True)
class Budget:
    cap: int
    sink: int
    window: int
    cache_slack: int = 0
    overlap: int = 0
    refresh: int = 0

    @classmethod
    def derive(
        cls,
        cap: int,
        sink: int = 4,
        window: int | None = None,
        cache_slack: int = 0,
        overlap: int = 0,
        refresh: int = 0,
    ) -> "Budget":
        """Build a budget; with `window=None` the window takes what is left of `cap`."""
        if cap is None or cap < 1:
            raise StreamkvError(f"cap must be a positive number of tokens, got {cap}")
        for name, value in (("sink", sink), ("cache_slack", cache_slack), ("overlap", overlap), ("refresh", refresh)):
            if value < 0:
                raise StreamkvError(f"{name} must be >= 0, got {value}")
        if sink >= cap:
            raise StreamkvError(f"sink ({sink}) must be smaller than cap ({cap}) so that a window remains")
        others = sink + cache_slack + overlap + refresh
        if window is None:
            window = cap - others
            if window < 1:
                raise StreamkvError(
                    f"budget leaves no window: cap ({cap}) - sink ({sink}) - cache_slack ({cache_slack}) "
                    f"- overlap ({overlap}) - refresh ({refresh}) = {window}; raise cap or lower the other terms"
                )
        elif window < 1:
            raise StreamkvError(f"window must be >= 1, got {window}")
        total = others + window
        if total > cap:
            raise StreamkvError(
                f"budget overflow: sink ({sink}) + window ({window}) + cache_slack ({cache_slack}) "
                f"+ overlap ({overlap}) + refresh ({refresh}) = {total} > cap ({cap})"
            )
        return cls(cap, sink, window, cache_slack, overlap, refresh)

    @property
    def soft(self) -> int:
        """Keys kept right after a prune: sinks plus the recent window."""
        return self.sink + self.window
