"""Command line: `streamkv eval ...` (also `python -m streamkv`).

A mistake in the input (an option, a source, an output path, a result file)
is one line on stderr and exit status 2, never a traceback; all of it is
checked before the model load.  A run that starts but cannot finish (a
non-finite NLL or perplexity, out of memory, a peer that dies) still writes
its result file, with status "failed" and the reason, and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from streamkv import methods
from streamkv.cache.policy import SOFTLITE_MODES
from streamkv.errors import NotInstalled, StreamkvError, one_line
from streamkv.evaluation.params import (
    CACHE_METHODS,
    EVALUATORS,
    PARALLEL_METHODS,
    RING_STATIC,
    SINK_LAYERS,
    SINK_METHODS,
    WEIGHTS,
    EvalParams,
)
from streamkv.jobio import write_json, write_table


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def _add_eval(sub) -> None:
    e = sub.add_parser("eval", help="evaluate one method on one text (the decode loop's per-token NLL, timed)")
    e.add_argument("--model", required=True,
                   help="model source, e.g. embedded:smollm2-135m, tiny:llama, hf:ORG/NAME, path:DIR")
    e.add_argument("--text", required=True, help="text source, e.g. embedded:shakespeare/hamlet, file:PATH, hf:pg19")
    e.add_argument("--method", required=True, help=f"one of: {methods.help_text()}")
    e.add_argument("--cap", type=int, default=256, help="KV budget in tokens, the current token included (default 256)")
    e.add_argument("--sink", type=int, default=None,
                   help="sink tokens kept at the start (default 4; window keeps none)")
    e.add_argument("--compress-every", type=int, default=1,
                   help=f"lazy prune period K ({methods.accepting('compress_every')}; the compression interval of "
                        "kvpress methods, n_discard of llama.cpp's shift)")
    e.add_argument("--cache-slack", type=int, default=0, help="softlite slack sigma: hard cap = sink + window + sigma")
    e.add_argument("--max-drop", type=int, default=0,
                   help="softlite max drop delta: most tokens one scheduled prune drops")
    e.add_argument("--softlite-mode", default="naive", choices=list(SOFTLITE_MODES),
                   help="naive (the study's rule) or cooldown (keep the lazy rhythm; default naive)")
    e.add_argument("--overlap", type=int, default=0, help="extra recent tokens kept, charged to the cap (start_recent)")
    e.add_argument("--refresh", type=int, default=0, help="evicted tokens re-inserted at the tail (start_recent)")
    e.add_argument("--positions", default="cache", choices=["cache", "original"],
                   help="start_recent: kept keys at cache positions (default) or where they were rotated (as kvpress)")
    e.add_argument("--sink-layers", default=SINK_LAYERS[0], choices=list(SINK_LAYERS),
                   help="which layers of a hybrid model (sliding-window layers beside global ones, e.g. Gemma 3) keep "
                        "the sinks: global (default: a sliding layer keeps a plain recent window) or all (the sliding "
                        f"layers keep them too); for {', '.join(SINK_METHODS)}; the two are the same on a model "
                        "without sliding layers")
    e.add_argument("--profile", action="store_true",
                   help="synchronise the device around cache updates (exact update times on GPU)")
    e.add_argument("--max-tokens", type=int, default=1024, help="tokens of the text to use (default 1024)")
    e.add_argument("--prefill", type=int, default=1, help="tokens in the first forward (default 1)")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="the model's and the KV cache's precision (default float32)")
    e.add_argument("--weights", default="float32", choices=list(WEIGHTS),
                   help="the linear layers' weights: float32 (as loaded in --dtype), bfloat16, int8 (torchao weight-"
                        "only), int8-intx (torchao IntxWeightOnlyConfig), int8-dynamic (torchao, int8 activations "
                        "too), int8-fbgemm (PyTorch's quantize_dynamic, CPU), int8-pack (ATen's int8 kernel, bfloat16 "
                        "activations; the fastest compiled), int4 (torchao, groups of 32); the cache "
                        "stays in --dtype (default float32)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--evaluator", default="auto", choices=list(EVALUATORS),
                   help="who scores the NLLs: parallel (exact, the loop's per-token NLL at a fraction of the cost; for "
                        f"{', '.join(PARALLEL_METHODS)} without refresh), decode (the loop, timed), or auto (parallel "
                        "where it applies; default). The result's params.evaluator says which ran")
    e.add_argument("--timing-steps", type=int, default=0,
                   help="time the decode step over this many steps after a prefill of cap, interleaved with a "
                        "no-eviction reference (tpot_ratio); default 0: the decode loop's own step times, if it ran")
    e.add_argument("--timing-batch", type=int, default=1,
                   help="the timing part decodes this many independent streams at once (one token of each per "
                        "step; tokens_per_s counts them all, tokens_per_s_stream one stream); default 1")
    e.add_argument("--stride", type=int, default=1, help="recompute: score every stride-th target only (default 1)")
    e.add_argument("--attn", default=None, help="attention implementation (eager, sdpa); default: the model's")
    e.add_argument("--out", required=True, help="result JSON file")
    e.add_argument("--trace", default=None, help="per-token trace file (.parquet or .csv)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_summarize(sub) -> None:
    s = sub.add_parser("summarize",
                       help="print a markdown table of result files, with delta PPL and speedup vs recompute")
    s.add_argument("results", nargs="+", help="result JSON files")


def _positive(value: str) -> int:
    """An argparse type: a whole number >= 1 (argparse prints the message on one line, exit status 2)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _add_bench(sub) -> None:
    from streamkv.evaluation.params import BENCH_SECTIONS, BenchConfig

    d = BenchConfig()
    b = sub.add_parser("bench", help="eviction overhead, speedup, compile and memory as ratios from one run")
    b.add_argument("--model", default="embedded:smollm2-135m", help="model source (default embedded:smollm2-135m)")
    b.add_argument("--text", default="embedded:shakespeare/hamlet",
                   help="text source (default embedded:shakespeare/hamlet)")
    b.add_argument("--caps", type=int, nargs="+", default=list(d.caps),
                   help="KV budgets of the overhead table (default 256)")
    b.add_argument("--sink", type=int, default=d.sink)
    b.add_argument("--compress-every", type=int, default=d.compress_every,
                   help=f"K of the lazy rows (default {d.compress_every})")
    b.add_argument("--blocks", type=int, default=d.blocks, help=f"timed blocks per method (default {d.blocks})")
    b.add_argument("--block", type=int, default=d.block,
                   help=f"steps per block, at least --compress-every (default {d.block})")
    b.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed steps first (default {d.warmup})")
    b.add_argument("--recompute-every", type=int, default=d.recompute_every,
                   help=f"time recompute on every n-th step only (default {d.recompute_every})")
    b.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile comparison")
    b.add_argument("--peers", action="store_true",
                   help="add the peers to the overhead table: the kvpress presses of --kvpress-methods (needs "
                        ".venv-kvpress) and llama.cpp's context shift (K = 1 and --compress-every, against its "
                        "own decode; needs llama-cpp-python and a GGUF model)")
    b.add_argument("--kvpress-methods", nargs="+", default=list(d.kvpress_methods),
                   help="the kvpress presses timed with --peers: StreamingLLM at K = 1 and --compress-every, the "
                        "others at --compress-every; each adds a worker and a row of timed steps (default "
                        f"{' '.join(d.kvpress_methods)})")
    b.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    b.add_argument("--compile-steps", type=int, default=d.compile_steps)
    b.add_argument("--compile-methods", nargs="+", default=list(d.compile_methods),
                   help=f"decode steps compiled, one row each: {RING_STATIC} (the ring's fixed-shape step) or a "
                        f"cache's general step ({', '.join(CACHE_METHODS)}; graphs, graph breaks and recompiles "
                        f"counted); default {' '.join(d.compile_methods)}")
    b.add_argument("--stream-tokens", type=int, default=d.stream_tokens,
                   help=f"memory stream length (default {d.stream_tokens})")
    b.add_argument("--stream-methods", nargs="+", default=list(d.stream_methods),
                   help=f"methods of the memory stream (default {' '.join(d.stream_methods)})")
    b.add_argument("--dense-tokens", type=int, default=None,
                   help="a shorter stream for dense (default: --stream-tokens)")
    b.add_argument("--rss-from", type=int, default=d.rss_from,
                   help=f"RSS growth is measured from this decode step, at least the first cap (default {d.rss_from})")
    b.add_argument("--evaluator-tokens", type=int, default=d.evaluator_tokens,
                   help=f"tokens the parallel evaluator and the decode loop both score (default {d.evaluator_tokens})")
    b.add_argument("--weights", nargs="+", default=list(d.weights),
                   help="weights variants of the weights section, each against float32 eager and llama.cpp "
                        f"(default {' '.join(d.weights)})")
    b.add_argument("--weights-compile", nargs="*", default=list(d.weights_compile),
                   help=f"of those, the ones also timed through torch.compile (default {' '.join(d.weights_compile)})")
    b.add_argument("--sections", nargs="+", default=list(BENCH_SECTIONS), help=f"any of: {' '.join(BENCH_SECTIONS)}")
    b.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's choice)")
    b.add_argument("--out", default=None, help="result JSON file (the tables are printed either way)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")


def check_output(path: str, option: str) -> None:
    """An error unless `path` can be written: its folder exists or can be made, and takes new files.

    Checked before the model load, so that a typo costs no run; the folder is made here, as the write would.
    """
    target = Path(path)
    try:
        if target.is_dir():
            raise StreamkvError(f"{option} '{path}' is a directory; name a file in it, e.g. {target / 'result.json'}")
        folder = existing = target.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.exists() and not existing.is_dir():
            raise StreamkvError(f"cannot write {option} '{path}': '{existing}' is a file, not a directory; "
                                "choose another path")
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".streamkv-probe-")  # root passes os.access, not a write
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = f" ('{exc.filename}')" if exc.filename else ""
        raise StreamkvError(f"cannot write {option} '{path}': {exc.strerror or exc}{where}; "
                            "choose another path") from None


def run_eval(args) -> int:
    from streamkv.evaluation.loop import RUN_FAILURES, evaluate, failure, load_tokens
    from streamkv.evaluation.params import LLAMACPP_METHODS
    from streamkv.models.sources import check_attn, check_device, gguf_path, load_model
    from streamkv.models.texts import load_text
    from streamkv.models.weights import check_runs_here

    params = EvalParams(**{f.name: getattr(args, f.name) for f in fields(EvalParams)})  # one option per field
    # Every mistake in the input is found before the (slow) model load: options, device, text, output paths.
    params.resolved()
    if args.timing_steps:  # the timing part runs on the tokens loaded here, max-tokens of them
        from streamkv.evaluation.timing import WARMUP, timing_steps

        need = args.cap + WARMUP + timing_steps(args.timing_steps, args.compress_every)
        if need > args.max_tokens:
            raise StreamkvError(f"timing-steps {args.timing_steps} needs {need} tokens (a prefill of cap {args.cap}, "
                                f"{need - args.cap} steps), more than max-tokens ({args.max_tokens}); raise "
                                "--max-tokens or lower --timing-steps")
    check_device(args.device)
    check_attn(args.attn)
    check_runs_here(args.weights)
    if args.method in LLAMACPP_METHODS:
        gguf_path(args.model)  # llama.cpp runs the model's GGUF file
    text = load_text(args.text, min_chars=16 * args.max_tokens)
    check_output(args.out, "--out")
    if args.trace:
        check_output(args.trace, "--trace")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation=args.attn,
                        weights=args.weights)
    tokens = load_tokens(loaded, args.text, args.max_tokens, text)
    try:
        record, trace = evaluate(loaded, tokens, params, progress=not args.quiet)
    except NotInstalled:  # a peer's package is missing: nothing ran, and the message says how to install it
        raise
    except RUN_FAILURES as exc:  # the run broke: keep a failed record
        write_json(failure(params, exc), args.out)
        print(f"streamkv: run failed: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr)
        return 1
    if args.trace:  # the trace first: a result never names a trace that is not there
        write_table(trace, args.trace)
    write_json(record, args.out)
    m = record["metrics"]
    if record["status"] != "ok":
        print(f"streamkv: run failed: {record['error']}", file=sys.stderr)
        return 1
    tpot = "untimed" if m["tpot_ms"] is None else f"tpot {m['tpot_ms']:.2f} ms"
    print(f"{params.method} ({record['params']['evaluator']}): ppl {m['ppl']:.4f}  {tpot}  "
          f"kv_len {m['kv_len_min']}/{m['kv_len_mean']:.1f}/{m['kv_len_max']}  -> {args.out}")
    return 0


def run_bench(args) -> int:
    import torch

    from streamkv.bench import run as bench
    from streamkv.bench.tables import bench_failures, bench_markdown
    from streamkv.evaluation.params import BenchConfig
    from streamkv.models.sources import load_model

    cfg = BenchConfig(
        caps=tuple(args.caps), sink=args.sink, compress_every=args.compress_every, blocks=args.blocks, block=args.block,
        warmup=args.warmup, recompute_every=args.recompute_every, compile=args.compile, peers=args.peers,
        kvpress_methods=tuple(args.kvpress_methods),
        compile_mode=args.compile_mode,
        compile_steps=args.compile_steps, compile_methods=tuple(args.compile_methods),
        stream_tokens=args.stream_tokens, stream_methods=tuple(args.stream_methods),
        dense_tokens=args.dense_tokens, rss_from=args.rss_from, sections=tuple(args.sections),
        evaluator_tokens=args.evaluator_tokens, weights=tuple(args.weights),
        weights_compile=tuple(args.weights_compile),
    ).check()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    tokens = bench.stream_tokens(loaded, args.text, cfg.tokens_needed())
    # the file is rewritten as each section finishes: a section that dies later loses none before it
    result = bench.run(loaded.model, tokens, cfg, progress=not args.quiet, source=loaded.source, out=args.out,
                       context=dict(model=args.model, text=args.text, dtype=args.dtype, device=args.device))
    print(bench_markdown(result))
    for name, error in bench_failures(result).items():
        print(f"streamkv: bench section {name} failed: {error}", file=sys.stderr)
    return 1 if result["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="streamkv", description="Streaming LLM decoding with attention sinks, measured honestly.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_eval(sub)
    _add_summarize(sub)
    _add_bench(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "summarize":
            from streamkv.analysis.summary import markdown

            print(markdown(args.results))
            return 0
        if args.command == "bench":
            if args.out:  # (the bench writes its file as each section finishes, the first after the model load)
                check_output(args.out, "--out")
            return run_bench(args)
        return run_eval(args)
    except StreamkvError as exc:
        print(f"streamkv: error: {one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
