"""A kvpress press applied during decoding, served to streamkv's decode loop over a pipe.

kvpress 0.5.x pins `transformers<5.3`, so it cannot share streamkv's
environment: this file runs as a script in the peer environment
(`.venv-kvpress`, see the Makefile) and imports nothing from streamkv.
`streamkv.peers.engines.KvpressStepper` starts it and talks to it:

    request  (one JSON line on stdin):  {"ids": [[...]]}   or  {"quit": true}
    reply    (on stdout):  one JSON line {"ms", "kv_len", "dropped", "kv_bytes", "shape"}
                           then shape[0] * shape[1] float32 logits

`ms` is the forward alone, timed here, so the pipe costs nothing to the
method; `kv_len` is the number of keys the last query attended to; the press
compresses after the attention, in a forward hook, so `dropped` is what the
previous forward evicted: the eviction counts at the first query it affects,
as in streamkv's traces.

Positions are those kvpress's own generation pipeline uses: the query at its
absolute position and every kept key at the position it was rotated at.  With
`KeyRerotationPress` the kept keys are rotated to 0..n-1, so the query goes to
n, the cache's length (StreamingLLM's pos-shift).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import defaultdict

import torch

PRESSES = ("streaming_llm", "streaming_llm_unsorted", "streaming_llm+rerotate", "knorm")


def build_press(name: str, cap: int, sink: int, compress_every: int):
    """The DecodingPress of `name`: compress every `compress_every` steps to cap - 1 keys (the next query is the
    cap-th)."""
    from kvpress import DecodingPress, KeyRerotationPress, KnormPress, StreamingLLMPress
    from kvpress.utils import compute_n_kept

    class SortedStreamingLLMPress(StreamingLLMPress):
        """StreamingLLMPress with its kept indices in position order.

        Upstream returns `topk` indices unsorted (kvpress issue #173); the next
        compression then takes the slots after the sinks for the oldest tokens
        and evicts the wrong ones.  Sorting is the fix.
        """

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):
            if self.compression_ratio == 0:
                return keys, values
            scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
            kept = scores.topk(compute_n_kept(keys.shape[2], self.compression_ratio), dim=-1).indices
            kept = kept.sort(dim=-1).values.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])
            return keys.gather(2, kept).contiguous(), values.gather(2, kept).contiguous()

    class AnyDecodingPress(DecodingPress):
        """DecodingPress that also takes a KeyRerotationPress (upstream asserts a ScorerPress; compress delegates)."""

        def __post_init__(self):
            self.hidden_states_buffer = defaultdict(list)
            self.layer_step_counts = defaultdict(int)

    scorer = {
        "streaming_llm": lambda: SortedStreamingLLMPress(n_sink=sink),
        "streaming_llm_unsorted": lambda: StreamingLLMPress(n_sink=sink),
        "streaming_llm+rerotate": lambda: KeyRerotationPress(StreamingLLMPress(n_sink=sink)),
        "knorm": lambda: KnormPress(),
    }[name]()
    cls = AnyDecodingPress if name == "streaming_llm+rerotate" else DecodingPress
    # hidden_states_buffer_size=0: these scorers read keys only, no buffered hidden states needed
    return cls(base_press=scorer, compression_interval=compress_every, target_size=cap - 1, hidden_states_buffer_size=0)


def serve(args) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    # The protocol owns the real stdout; anything a library prints goes to stderr.
    channel = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation=args.attn).eval()
    press = build_press(args.press, args.cap, args.sink, args.compress_every)
    cache = DynamicCache(config=model.config)
    in_cache_positions = args.press.endswith("+rerotate")
    seen = evicted = 0
    with torch.inference_mode(), press(model):
        for line in sys.stdin.buffer:
            request = json.loads(line)
            if request.get("quit"):
                break
            ids = torch.tensor(request["ids"], dtype=torch.long)
            q = ids.shape[-1]
            before = cache.get_seq_length()
            first = before if in_cache_positions else seen
            positions = torch.arange(first, first + q).unsqueeze(0)
            t0 = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True).logits
            ms = (time.perf_counter() - t0) * 1e3
            seen += q
            after = cache.get_seq_length()
            stored = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
            out = logits[0].float().contiguous().numpy()
            # The press evicts after the attention; streamkv counts an eviction at the query it first affects.
            header = {"ms": ms, "kv_len": before + q, "dropped": evicted,
                      "kv_bytes": stored * (before + q) // max(after, 1), "shape": list(out.shape),
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # the worker's peak
            if seen == q:  # the first reply
                header["versions"] = versions()
            evicted = before + q - after
            channel.write((json.dumps(header) + "\n").encode())
            channel.write(out.tobytes())
            channel.flush()


def versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("kvpress", "transformers", "torch")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a transformers model directory")
    parser.add_argument("--press", choices=PRESSES)
    parser.add_argument("--cap", type=int)
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--compress-every", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    serve(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
