"""The fixed baseline: recompute attention over sinks + recent tokens for every token.

For each scored token the model runs one fresh forward, with no cache, over the
first `sink` tokens and the last `window` tokens (the current one included),
at fresh contiguous positions 0..L-1.  It sees exactly what a strict
Start+Recent cache holds, but every key is computed in that context, so it is
the quality reference streaming methods are measured against; its cost is a
full forward of up to `sink + window` tokens per output token.
"""

from __future__ import annotations

import torch

from streamkv.evaluation.stepper import Stepper


class RecomputeStepper(Stepper):
    """Feeds a growing token history; each forward re-reads sinks + window from scratch."""

    def __init__(self, model: torch.nn.Module, sink: int, window: int):
        self.model = model
        self.sink = sink
        self.window = window
        self.history: torch.Tensor | None = None
        self.kv_len = 0

    def context(self) -> torch.Tensor:
        h = self.history
        if h.shape[-1] <= self.sink + self.window:
            return h
        return torch.cat((h[:, : self.sink], h[:, -self.window :]), dim=-1)

    def skip(self, ids: torch.Tensor) -> None:
        """Append tokens to the history without a forward (a benchmark times every n-th step only)."""
        self.history = ids if self.history is None else torch.cat((self.history, ids), dim=-1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.history = ids if self.history is None else torch.cat((self.history, ids), dim=-1)
        ctx = self.context()
        self.kv_len = ctx.shape[-1]
        q = ids.shape[-1]
        return self.model(input_ids=ctx, use_cache=False, logits_to_keep=q).logits

    # (nothing persists between steps, so nothing is evicted, and there is no cache to time: the defaults)

    def kv_bytes(self) -> int:
        """Bytes of the keys and values the last forward computed (held only during it)."""
        cfg = self.model.config.get_text_config()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        itemsize = next(self.model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * kv_heads * head_dim * itemsize * self.kv_len
