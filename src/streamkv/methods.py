"""The method registry: every method, ours and the peers', as one record.

Kept free of torch: the pipeline validates a whole grid with it, the CLI
prints its help from it, and a test holds `config/schema.yaml`'s method enums
equal to it.  Parameter resolution (`params.EvalParams.resolved`), the cache
factory, run ids, report labels and the peers' install hints all read these
records, so adding a method means one record here plus its own code.

On a hybrid model (sliding-window and global layers, e.g. Gemma 3) every "cache" method keeps one cache per layer
type (`streamkv.cache.hybrid`): the global layers as the record says; the sliding layers the same method within the
model's window W (the most recent min(cap, W) tokens, no sinks unless `sink_layers` is "all"); each type
re-rotates with its own RoPE base.  Peers run the model as they run it; recompute runs it on the kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamkv.errors import StreamkvError

# The options a method may accept beyond cap, sink and the protocol (the others must stay at their defaults).
# compress_every is the prune period K (a lazy method prunes K tokens at once); the softlite and Auto-cap
# terms are start_recent's; stride subsamples the recompute baseline's targets.
OPTION_DEFAULTS = {"compress_every": 1, "cache_slack": 0, "max_drop": 0, "softlite_mode": "naive",
                   "positions": "cache", "overlap": 0, "refresh": 0, "stride": 1}
OPTIONS = tuple(OPTION_DEFAULTS)
START_RECENT_OPTIONS = frozenset({"compress_every", "cache_slack", "max_drop", "softlite_mode", "positions",
                                  "overlap", "refresh"})


@dataclass(frozen=True)
class Method:
    """What the rest of the code needs to know about one method."""

    name: str
    family: str  # "cache" (streamkv's caches), "baseline" (recompute), "kvpress" or "llamacpp" (peers)
    summary: str  # one line for the CLI help and config/README
    options: frozenset = frozenset()  # the OPTIONS it accepts
    default_sink: int | None = 4  # None: evicts nothing, keeps no sinks; 0: keeps none by design
    parallel: bool = False  # the exact parallel evaluator (streamkv.evaluation.parallel) can produce its NLLs
    setup: str | None = None  # the command that installs a peer's optional package
    # How its KV bytes are known: "measured" from the cache tensors it holds (streamkv's caches), or "computed"
    # from shapes and counts where there are no tensors of ours to read: recompute keeps no cache (the bytes its
    # forward computes), a kvpress cache lives in the worker (its bytes scaled to the keys a step attends), and
    # llama.cpp's is its allocation (cells x bytes per cell from the model's dimensions).
    kv_bytes: str = "measured"

    @property
    def lazy(self) -> bool:
        """It takes a prune period K (compress_every)."""
        return "compress_every" in self.options

    @property
    def dense(self) -> bool:
        return self.default_sink is None

    @property
    def sinkless(self) -> bool:
        return self.default_sink == 0

    @property
    def peer(self) -> bool:
        return self.family in ("kvpress", "llamacpp")

    def run_id(self, run: dict) -> str:
        """A readable file name holding every parameter that changes the run (`run`: normalised)."""
        stem = self.name.replace(":", "-").replace("+", "-")
        if self.dense:
            return stem
        if self.family == "baseline":
            return f"{stem}_s{run['sink']}" + (f"_stride{run['stride']}" if run.get("stride", 1) > 1 else "")
        if self.sinkless and self.family == "cache":
            return f"{stem}_k{run['compress_every']}"
        if self.options == START_RECENT_OPTIONS:
            mode = "_cooldown" if run["softlite_mode"] == "cooldown" else ""
            mode += "_orig" if run["positions"] == "original" else ""
            return (f"{stem}_s{run['sink']}_k{run['compress_every']}_sl{run['cache_slack']}_md{run['max_drop']}"
                    f"_ov{run['overlap']}_rf{run['refresh']}{mode}")
        if self.lazy and (self.peer or run["compress_every"] != 1):
            return f"{stem}_s{run['sink']}_k{run['compress_every']}"
        return f"{stem}_s{run['sink']}"


def _kvpress(name: str, summary: str, default_sink: int | None = 4) -> Method:
    return Method(name, "kvpress", summary, frozenset({"compress_every"}), default_sink, setup="make setup-kvpress",
                  kv_bytes="computed")


REGISTRY: dict[str, Method] = {m.name: m for m in (
    Method("dense", "cache", "keeps every token (the quality ceiling; memory grows)", default_sink=None,
           parallel=True),
    Method("window", "cache", "the last cap tokens, no sinks", frozenset({"compress_every"}), default_sink=0,
           parallel=True),
    Method("start_recent", "cache", "S sinks plus the most recent tokens, strict or lazy (K), with softlite, "
           "Auto-cap overlap, refresh and both position modes", START_RECENT_OPTIONS, parallel=True),
    Method("mit", "cache", "strict Start+Recent as MIT StreamingLLM does it (re-rotates every kept key)",
           parallel=True),
    Method("ring", "cache", "Start+Recent in preallocated buffers (strict or lazy K): nothing is moved on eviction",
           frozenset({"compress_every"}), parallel=True),
    Method("tova", "cache", "TOVA: sinks plus the keys the newest query attends to most (head mean, per layer), "
           "pruned every K; original positions; decode loop only (what it keeps depends on the attention)",
           frozenset({"compress_every"})),
    Method("recompute", "baseline", "the baseline: a fresh forward over sinks + window for every token",
           frozenset({"stride"}), kv_bytes="computed"),
    _kvpress("kvpress:streaming_llm", "kvpress's StreamingLLMPress (original positions), in its own environment"),
    _kvpress("kvpress:streaming_llm_unsorted", "kvpress's StreamingLLMPress with its unsorted kept indices"),
    _kvpress("kvpress:streaming_llm+rerotate", "kvpress's StreamingLLMPress with keys re-rotated (pos-shift)"),
    _kvpress("kvpress:knorm", "kvpress's KnormPress (keeps the keys of smallest norm, no sinks)", default_sink=0),
    _kvpress("kvpress:snapkv", "kvpress's SnapKVPress: pooled attention of the last min(64, K - 1) queries, whose keys "
             "it keeps (no sinks; needs K > 1)", default_sink=0),
    _kvpress("kvpress:tova", "kvpress's TOVAPress: the current query's attention averaged over heads, the newest key "
             "kept (no sinks)", default_sink=0),
    _kvpress("kvpress:expected_attention", "kvpress's ExpectedAttentionPress: attention expected from the statistics "
             "of the queries since the last compression (keeps sink first tokens; needs K > sink)"),
    _kvpress("kvpress:keydiff", "kvpress's KeyDiffPress (keeps the keys least similar to their mean, no sinks)",
             default_sink=0),
    _kvpress("kvpress:observed_attention", "kvpress's ObservedAttentionPress (H2O-style; while decoding: the "
             "current query's attention over n - i per slot i; eager attention; no sinks)", default_sink=0),
    Method("llamacpp:shift", "llamacpp", "llama.cpp's context shift (K = n_discard) on the GGUF file",
           frozenset({"compress_every"}), setup="make setup-llamacpp", kv_bytes="computed"),
    Method("llamacpp:dense", "llamacpp", "llama.cpp without eviction (its own reference)", default_sink=None,
           setup="make setup-llamacpp", kv_bytes="computed"),
)}

NAMES = tuple(REGISTRY)


def get(name: str) -> Method:
    """The record of method `name`, or an error that lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise StreamkvError(f"unknown method '{name}'; choose one of: {', '.join(NAMES)}") from None


def names(**where) -> tuple[str, ...]:
    """The names of the methods whose attributes equal `where` (e.g. names(family="kvpress"), names(lazy=True))."""
    return tuple(m.name for m in REGISTRY.values() if all(getattr(m, k) == v for k, v in where.items()))


def accepting(option: str) -> str:
    """The methods that accept `option`, in words: a whole family of peers as "the kvpress methods"."""
    parts = []
    for m in REGISTRY.values():
        if option not in m.options:
            continue
        family = names(family=m.family)
        whole = m.peer and len(family) > 1 and all(option in REGISTRY[f].options for f in family)
        part = f"the {m.family} methods" if whole else m.name
        if part not in parts:
            parts.append(part)
    return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)


def check_options(name: str, **options) -> Method:
    """The method's record, after checking that every option set away from its default applies to it."""
    method = get(name)
    for option, value in options.items():
        if option not in OPTION_DEFAULTS:
            raise StreamkvError(f"unknown option '{option}'")
        if value != OPTION_DEFAULTS[option] and option not in method.options:
            raise StreamkvError(f"{option.replace('_', '-')} applies to {accepting(option)}, not to '{name}'")
    return method


def help_text() -> str:
    """One line per method, for the CLI help."""
    return "; ".join(f"{m.name}: {m.summary}" for m in REGISTRY.values())
