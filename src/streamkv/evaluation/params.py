"""Parameters of one evaluation, checked against the method before anything heavy runs.

Kept free of torch so that the pipeline can validate a whole grid quickly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from streamkv import methods
from streamkv.cache.budget import Budget
from streamkv.cache.policy import SOFTLITE_MODES
from streamkv.errors import StreamkvError

# The method sets, read from the registry (streamkv.methods): one record per method.
CACHE_METHODS = methods.names(family="cache")
KVPRESS_METHODS = methods.names(family="kvpress")
LLAMACPP_METHODS = methods.names(family="llamacpp")
PEER_METHODS = methods.names(peer=True)
METHODS = methods.NAMES
LAZY_METHODS = methods.names(lazy=True)  # they take a prune period K (compress_every); llama.cpp's: n_discard
PEER_SETUP = {m.family: m.setup for m in methods.REGISTRY.values() if m.setup}  # how to install a peer's package
DENSE_METHODS = methods.names(dense=True)  # they evict nothing
SINKLESS_METHODS = methods.names(sinkless=True)  # they keep no sink tokens
TIMING_BLOCK = 32  # steps per block of a timing part: TPOT is the median of the blocks' mean step times
# Where start_recent's kept keys sit: "cache" (contiguous, ending at the query: StreamingLLM's pos-shift) or
# "original" (where they were rotated, the query at its absolute position: what kvpress does).
POSITIONS = ("cache", "original")
# Which layers of a hybrid model (sliding-window layers beside global ones, e.g. Gemma 3) keep the sinks: "global"
# (only the global layers; a sliding layer keeps a plain recent window) or "all" (the sliding layers keep them too).
# A model without sliding layers has global layers only, where the two are the same.
SINK_LAYERS = ("global", "all")
# The methods "all" applies to: streamkv's caches that keep sinks (not dense, window, recompute or the peers).
SINK_METHODS = tuple(m for m in CACHE_METHODS if m not in DENSE_METHODS and m not in SINKLESS_METHODS)
# Who produces a run's NLLs: the decode loop (the reference, timed), or the exact parallel evaluator
# (streamkv.evaluation.parallel) for the methods whose cache contents depend on positions only; auto picks parallel
# there.
EVALUATORS = ("auto", "parallel", "decode")
PARALLEL_METHODS = methods.names(parallel=True)
DTYPES = ("float32", "float16", "bfloat16")  # (the torch dtypes are streamkv.models.sources.DTYPES)
# How the linear layers store their weights (streamkv.models.weights, one record each); "float32": as loaded (--dtype).
WEIGHTS = ("float32", "bfloat16", "int8", "int8-intx", "int8-dynamic", "int8-fbgemm", "int8-pack", "int4")
# Why the parallel evaluator cannot serve a variant: a chunk of queries is not the decode step for it.  bfloat16
# products round by the kernel chosen for the batch's shape; activations quantised at run time (one scale per
# token) turn the float32 rounding differences between a chunk and a single token into flipped int8 roundings.
# Measured on tiny Llama: per-token |dNLL| against the loop 3e-2 (bfloat16), 0.11 (int8-dynamic), 6.9e-3
# (int8-fbgemm, 2 of 399 tokens above 1e-4), 2e-2 (int8-pack, 21 of 199 above 1e-4); int8, int8-intx and int4
# dequantise to the activations' dtype and stay within 1.2e-5.
LOOP_ONLY_WEIGHTS = {
    "bfloat16": "its bfloat16 products round differently for one token than for a chunk of tokens",
    "int8-dynamic": "it quantises the activations at run time: a chunk's float32 rounding flips some int8 roundings",
    "int8-fbgemm": "it quantises the activations at run time: a chunk's float32 rounding flips some int8 roundings",
    "int8-pack": "it rounds the activations to bfloat16: a chunk's float32 rounding flips some of those roundings",
}


@dataclass
class EvalParams:
    model: str
    text: str
    method: str
    cap: int = 256
    sink: int | None = None  # None: the method's default (4; 0 for window; unused by dense)
    compress_every: int = 1
    cache_slack: int = 0
    max_drop: int = 0
    softlite_mode: str = "naive"  # or "cooldown": see policy.StartRecent
    positions: str = "cache"  # or "original" (start_recent): see POSITIONS
    sink_layers: str = "global"  # or "all": see SINK_LAYERS
    overlap: int = 0
    refresh: int = 0
    max_tokens: int = 1024
    prefill: int = 1
    dtype: str = "float32"
    weights: str = "float32"  # see WEIGHTS: the linear layers' variant; the cache stays in dtype
    device: str = "cpu"
    seed: int = 0
    profile: bool = False  # synchronise the device around cache updates, so update times are exact on GPU
    evaluator: str = "decode"  # see EVALUATORS; resolved() turns "auto" into the one that runs
    timing_steps: int = 0  # > 0: step times from that many steps interleaved with a no-eviction reference
    timing_batch: int = 1  # streams the timing part decodes at once (a batch of B independent streams)
    stride: int = 1  # recompute: score every stride-th target only (the baseline at scale)

    def parallel_reason(self) -> str | None:
        """Why the parallel evaluator cannot serve this configuration (None: it can)."""
        if not methods.get(self.method).parallel:
            return (f"method '{self.method}' runs only in the decode loop (the parallel evaluator serves "
                    f"{', '.join(PARALLEL_METHODS)})")
        if self.refresh:
            return "refresh re-inserts evicted tokens at the tail, which only the decode loop follows"
        if self.weights in LOOP_ONLY_WEIGHTS:
            return f"weights '{self.weights}' run only in the decode loop: {LOOP_ONLY_WEIGHTS[self.weights]}"
        return None

    def resolved(self) -> "EvalParams":
        """Check every option against the method and fill method defaults; raise `StreamkvError` if impossible."""
        p = EvalParams(**asdict(self))
        method = methods.get(p.method)
        for name, value in asdict(p).items():  # torch and numpy take 64-bit integers only
            if isinstance(value, int) and value >= 2**63:
                raise StreamkvError(f"{name.replace('_', '-')} ({value}) is out of range; use a value below 2**63")
        for name in ("cache_slack", "max_drop", "overlap", "refresh"):
            if getattr(p, name) < 0:
                raise StreamkvError(f"{name.replace('_', '-')} must be >= 0, got {getattr(p, name)}")
        if p.compress_every < 1:
            raise StreamkvError(f"compress-every must be >= 1, got {p.compress_every}")
        if p.stride < 1:
            raise StreamkvError(f"stride must be >= 1, got {p.stride}")
        if p.softlite_mode not in SOFTLITE_MODES:
            raise StreamkvError(f"unknown softlite-mode '{p.softlite_mode}'; "
                                f"choose one of: {', '.join(SOFTLITE_MODES)}")
        if p.positions not in POSITIONS:
            raise StreamkvError(f"unknown positions '{p.positions}'; choose one of: {', '.join(POSITIONS)}")
        if p.sink_layers not in SINK_LAYERS:
            raise StreamkvError(f"unknown sink-layers '{p.sink_layers}'; choose one of: {', '.join(SINK_LAYERS)}")
        if p.sink_layers != SINK_LAYERS[0] and p.method not in SINK_METHODS:
            raise StreamkvError(f"sink-layers '{p.sink_layers}' applies to the caches that keep sinks "
                                f"({', '.join(SINK_METHODS)}), not to '{p.method}'; leave --sink-layers out")
        methods.check_options(p.method, **{k: getattr(p, k) for k in methods.OPTIONS})
        if p.positions != "cache" and p.refresh:
            raise StreamkvError("positions 'original' and refresh do not combine: refresh moves keys to the tail")
        if method.sinkless:
            if p.sink not in (None, 0):
                raise StreamkvError(f"method '{p.method}' keeps no sink tokens; leave --sink out or use start_recent")
            p.sink = 0
        elif method.dense:
            p.sink = None  # nothing is evicted, so nothing is kept as a sink
        elif p.sink is None:
            p.sink = method.default_sink
        # cap >= 1, sink < cap, and a window remains after every other term
        Budget.derive(p.cap, sink=p.sink or 0, cache_slack=p.cache_slack, overlap=p.overlap, refresh=p.refresh)
        if p.method == "ring" and p.compress_every > 1 and p.cap - p.sink < 2:
            raise StreamkvError(f"the lazy ring (compress-every {p.compress_every}) needs a window of at least 2 "
                                f"tokens, cap ({p.cap}) - sink ({p.sink}) leaves {p.cap - p.sink}; raise cap or "
                                "use compress-every 1")
        if p.max_tokens < 2:
            raise StreamkvError(f"max-tokens must be >= 2 (one context token and one target), got {p.max_tokens}")
        if p.prefill < 1:
            raise StreamkvError(f"prefill must be >= 1, got {p.prefill}")
        if p.prefill >= p.max_tokens:
            raise StreamkvError(f"prefill ({p.prefill}) must be smaller than max-tokens ({p.max_tokens})")
        if p.method not in DENSE_METHODS and p.prefill > p.cap:
            raise StreamkvError(f"prefill ({p.prefill}) must not exceed cap ({p.cap}): "
                                "the prefill forward would attend beyond the budget")
        if p.seed < 0:
            raise StreamkvError(f"seed must be >= 0, got {p.seed}")
        if p.timing_steps < 0:
            raise StreamkvError(f"timing-steps must be >= 0, got {p.timing_steps}")
        if p.timing_batch < 1:
            raise StreamkvError(f"timing-batch must be >= 1, got {p.timing_batch}")
        if p.timing_batch > 1 and not p.timing_steps:
            raise StreamkvError(f"timing-batch {p.timing_batch} sets the streams of the timing part; add "
                                "--timing-steps T to run one")
        if p.timing_batch > 1 and method.peer:
            raise StreamkvError(f"method '{p.method}' decodes one stream per worker; timing-batch {p.timing_batch} "
                                "applies to streamkv's methods and recompute: leave --timing-batch out")
        if p.evaluator not in EVALUATORS:
            raise StreamkvError(f"unknown evaluator '{p.evaluator}'; choose one of: {', '.join(EVALUATORS)}")
        if p.dtype not in DTYPES:
            raise StreamkvError(f"unknown dtype '{p.dtype}'; choose one of: {', '.join(DTYPES)}")
        if p.weights not in WEIGHTS:
            raise StreamkvError(f"unknown weights '{p.weights}'; choose one of: {', '.join(WEIGHTS)}")
        if p.weights != WEIGHTS[0] and method.peer:
            raise StreamkvError(f"method '{p.method}' runs its own copy of the model's weights; weights "
                                f"'{p.weights}' applies to streamkv's methods only: leave --weights out")
        reason = p.parallel_reason()
        if p.evaluator == "parallel" and reason:
            raise StreamkvError(f"evaluator 'parallel' cannot serve this run: {reason}; use --evaluator decode or auto")
        if p.evaluator == "auto":
            p.evaluator = "decode" if reason else "parallel"
        return p

    def record(self) -> dict:
        """Every parameter, with the derived window."""
        rec = asdict(self)
        rec["window"] = None if methods.get(self.method).dense else (
            self.cap - (self.sink or 0) - self.cache_slack - self.overlap - self.refresh)
        return rec


BENCH_SECTIONS = ("overhead", "compile", "memory", "evaluator", "weights")
MAX_BENCH_TOKENS = 10_000_000  # tokens of text a bench may decode: more is a mistyped setting (days of decoding)
STREAM_METHODS = ("ring", "start_recent", "mit", "dense", "window")
BENCH_KVPRESS = ("kvpress:streaming_llm", "kvpress:snapkv", "kvpress:tova", "kvpress:expected_attention",
                 "kvpress:keydiff", "kvpress:knorm", "kvpress:observed_attention")
# The decode steps the compile section compiles: the ring's fixed-shape step, and every cache's general step.
RING_STATIC = "ring-static"
COMPILE_METHODS = (RING_STATIC, *CACHE_METHODS)


@dataclass
class BenchConfig:
    """The settings of `streamkv bench` (see `streamkv.bench.run`)."""

    caps: tuple[int, ...] = (256,)
    sink: int = 4
    compress_every: int = 32
    blocks: int = 8  # timed blocks per method (after the warm-up)
    block: int = 32  # steps per block (at least compress_every, so a block holds a lazy prune)
    warmup: int = 16
    recompute_every: int = 4  # recompute is timed on every n-th step (its history gets every token)
    compile: bool = True
    peers: bool = False  # kvpress rows in the overhead table (they need the peer environment)
    # With peers, the kvpress presses timed: StreamingLLM at K = 1 and compress_every, every other one at
    # compress_every only (SnapKV needs K > 1, ExpectedAttention K > sink).  Each press is a worker with its own copy
    # of the model and a row of timed steps: shorten the list to shorten the bench.
    kvpress_methods: tuple[str, ...] = BENCH_KVPRESS
    compile_mode: str | None = None  # torch.compile mode ("reduce-overhead": CUDA graphs)
    compile_steps: int = 128
    compile_methods: tuple[str, ...] = (RING_STATIC,)  # see COMPILE_METHODS: the steps compiled, one row each
    stream_tokens: int = 20000
    stream_methods: tuple[str, ...] = ("ring", "start_recent", "dense")
    dense_tokens: int | None = None  # dense grows: a shorter stream shows it (None: stream_tokens)
    rss_from: int = 2000
    evaluator_tokens: int = 1024  # the parallel evaluator against the decode loop on these many tokens
    weights: tuple[str, ...] = WEIGHTS  # the weights variants timed against float32 (and llama.cpp, if installed)
    weights_compile: tuple[str, ...] = ("bfloat16", "int8-pack")  # of those, the ones also timed compiled
    sections: tuple[str, ...] = BENCH_SECTIONS

    def check(self) -> "BenchConfig":
        """Raise `StreamkvError` unless every section can run with these settings."""
        for name in ("blocks", "block", "recompute_every", "compile_steps", "stream_tokens", "compress_every",
                     "evaluator_tokens"):
            if getattr(self, name) < 1:
                raise StreamkvError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("sink", "warmup", "rss_from"):
            if getattr(self, name) < 0:
                raise StreamkvError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.block < self.compress_every:
            raise StreamkvError(f"block ({self.block}) must be at least compress_every ({self.compress_every}): "
                                "a block holds a whole lazy period")
        if self.recompute_every > self.block:
            raise StreamkvError(f"recompute_every ({self.recompute_every}) must be at most block ({self.block}): "
                                "every block times recompute at least once")
        if not self.caps:
            raise StreamkvError("caps must name at least one KV budget")
        for cap in self.caps:
            if cap <= self.sink + self.compress_every:
                raise StreamkvError(f"cap {cap} leaves no window for sink {self.sink} and compress_every "
                                    f"{self.compress_every}")
        if self.compile_mode not in COMPILE_MODES:
            raise StreamkvError(f"unknown compile mode '{self.compile_mode}'; "
                                f"choose one of: {', '.join(m for m in COMPILE_MODES if m)}")
        bad = [s for s in self.sections if s not in BENCH_SECTIONS]
        if bad:
            raise StreamkvError(f"unknown bench section(s) {', '.join(bad)}; choose from: {', '.join(BENCH_SECTIONS)}")
        bad = [m for m in self.compile_methods if m not in COMPILE_METHODS]
        if bad:
            raise StreamkvError(f"unknown compile method(s) {', '.join(bad)}; choose from: "
                                f"{', '.join(COMPILE_METHODS)}")
        bad = [m for m in self.kvpress_methods if m not in KVPRESS_METHODS]
        if bad:
            raise StreamkvError(f"unknown kvpress method(s) {', '.join(bad)}; "
                                f"choose from: {', '.join(KVPRESS_METHODS)}")
        bad = [m for m in self.stream_methods if m not in STREAM_METHODS]
        if bad:
            raise StreamkvError(f"unknown stream method(s) {', '.join(bad)}; choose from: {', '.join(STREAM_METHODS)}")
        for name in ("weights", "weights_compile"):
            bad = [w for w in getattr(self, name) if w not in WEIGHTS]
            if bad:
                raise StreamkvError(f"unknown {name} variant(s) {', '.join(bad)}; choose from: {', '.join(WEIGHTS)}")
        cap = self.caps[0]  # the compile, memory, evaluator and weights sections run at the first cap
        if "memory" in self.sections:
            # Each stream starts with a prefill of the cap, then decodes one token per step.
            if self.stream_tokens <= cap:
                raise StreamkvError(f"stream_tokens ({self.stream_tokens}) must exceed the first cap ({cap}): "
                                    "the memory stream decodes after a prefill of the cap")
            if self.dense_tokens is not None and "dense" in self.stream_methods and self.dense_tokens <= cap:
                raise StreamkvError(f"dense_tokens ({self.dense_tokens}) must exceed the first cap ({cap}): "
                                    "the memory stream decodes after a prefill of the cap")
            if not cap <= self.rss_from < self.stream_tokens:
                raise StreamkvError(f"rss_from ({self.rss_from}) must be a decode step of the memory stream, from "
                                    f"the first cap ({cap}) to below stream_tokens ({self.stream_tokens}); "
                                    f"set rss_from in [{cap}, {self.stream_tokens})")
        if self.dense_tokens is not None and self.dense_tokens < 1:
            raise StreamkvError(f"dense_tokens must be >= 1, got {self.dense_tokens}")
        if "evaluator" in self.sections and self.evaluator_tokens <= cap + 1:
            raise StreamkvError(f"evaluator_tokens ({self.evaluator_tokens}) must exceed the first cap "
                                f"({cap}) + 1: the prefill fills the cap, then the loop decodes")
        if (needed := self.tokens_needed()) > MAX_BENCH_TOKENS:
            raise StreamkvError(f"the bench would need {needed:,} tokens of text, more than "
                                f"{MAX_BENCH_TOKENS:,} (days of decoding); lower blocks x block, stream_tokens, "
                                "dense_tokens, compile_steps or evaluator_tokens")
        return self

    def tokens_needed(self) -> int:
        """The tokens of text the sections decode (the text is repeated end to end when it is shorter)."""
        return max(max(self.caps) + self.warmup + self.blocks * self.block, self.caps[0] + self.compile_steps + 3,
                   self.stream_tokens, self.dense_tokens or 0,
                   self.evaluator_tokens if "evaluator" in self.sections else 0)


# torch.compile's modes (None: its default)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
