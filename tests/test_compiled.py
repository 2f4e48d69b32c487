"""The ring at fixed shapes: equal to the general ring, compiled once and never again, and the bench on it."""

import json

import pytest
import torch
import torch._dynamo.testing

from conftest import TINY
from optional_peers import EXPECT_KVPRESS, needs_llamacpp
from streamkv import StreamkvError, make_cache
from streamkv.bench.goals import REFERENCE
from streamkv.bench.run import run
from streamkv.cache.compiled import RingDecoder
from streamkv.cli import main
from streamkv.evaluation.params import BenchConfig

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)


def logprobs(step, tokens, first=20):
    """Log-probabilities of every position: one chunk of `first` tokens, then one token per call."""
    with torch.inference_mode():
        out = [step(torch.tensor([tokens[:first]]))[0].log_softmax(-1)]
        out += [step(torch.tensor([[t]]))[0, -1:].log_softmax(-1) for t in tokens[first:]]
    return torch.cat(out)


def plain(model, cache):
    return lambda ids: model(input_ids=ids, past_key_values=cache, use_cache=True).logits


@pytest.mark.parametrize("name", TINY)
def test_fixed_shape_steps_equal_the_general_ring_across_rebases(tiny, hamlet_bytes, name):
    model = tiny(name).model
    tokens = hamlet_bytes[:400]
    general = logprobs(plain(model, make_cache("ring", model, cap=32, sink=4, rebase_every=64)), tokens)
    cache = make_cache("ring", model, cap=32, sink=4, rebase_every=64)
    fixed = logprobs(RingDecoder(model, cache), tokens)
    mit = logprobs(plain(model, make_cache("mit", model, cap=32, sink=4)), tokens)
    assert cache.static and cache.base > 0  # the fixed-shape path ran, and re-based
    assert (general - fixed).abs().max() <= 1e-5
    assert (mit - fixed).abs().max() <= 1e-4
    assert cache.seen == len(tokens) and cache.n_prunes == cache.tokens_dropped == len(tokens) - 32


def test_fixed_shape_steps_need_a_full_ring_and_single_tokens(tiny, hamlet_bytes):
    model = tiny("tiny:llama").model
    cache = make_cache("ring", model, cap=32, sink=4)
    with torch.inference_mode():
        model(input_ids=torch.tensor([hamlet_bytes[:10]]), past_key_values=cache, use_cache=True)
        with pytest.raises(StreamkvError, match="10 of 32 tokens"):
            cache.make_static()
        model(input_ids=torch.tensor([hamlet_bytes[10:32]]), past_key_values=cache, use_cache=True)
        cache.make_static()
        with pytest.raises(StreamkvError, match="one token per forward"):
            model(input_ids=torch.tensor([hamlet_bytes[32:34]]), past_key_values=cache, use_cache=True)
    with pytest.raises(StreamkvError, match="needs a ring cache"):
        RingDecoder(model, make_cache("mit", model, cap=32, sink=4))


def test_a_chunk_after_fixed_shape_steps_goes_back_to_the_general_path(tiny, hamlet_bytes):
    model = tiny("tiny:llama").model
    tokens = hamlet_bytes[:200]
    decoder = RingDecoder(model, make_cache("ring", model, cap=32, sink=4))
    mixed = logprobs(decoder, tokens[:100]), logprobs(decoder, tokens[100:], first=7)  # a 7-token chunk mid-stream
    mit_cache = make_cache("mit", model, cap=32, sink=4)
    ref = logprobs(plain(model, mit_cache), tokens[:100]), logprobs(plain(model, mit_cache), tokens[100:], first=7)
    assert max((a - b).abs().max() for a, b in zip(mixed, ref)) <= 1e-4


def test_the_compiled_step_compiles_once_and_matches_eager(tiny, hamlet_bytes):
    """One graph (fullgraph: no breaks) for every step after warm-up, across re-bases; NLL as eager."""
    torch._dynamo.reset()
    model = tiny("tiny:llama").model
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    cache = make_cache("ring", model, cap=32, sink=4, rebase_every=64)
    decoder = RingDecoder(model, cache, compile=True, backend=counter)
    tokens = hamlet_bytes[:300]
    with torch.inference_mode():
        decoder(torch.tensor([tokens[:32]]))
        first = [decoder(torch.tensor([[t]]))[0, -1].log_softmax(-1) for t in tokens[32:35]]
        after_warmup = counter.frame_count
        rest = [decoder(torch.tensor([[t]]))[0, -1].log_softmax(-1) for t in tokens[35:]]
    assert after_warmup == 1
    assert counter.frame_count == 1  # 265 more steps, three re-bases: no recompilation
    assert cache.base > 0
    eager = logprobs(RingDecoder(model, make_cache("ring", model, cap=32, sink=4, rebase_every=64)), tokens, first=32)
    assert (torch.stack(first + rest) - eager[32:]).abs().max() <= 1e-4


def test_compiled_decoders_of_different_models_keep_their_own_graphs(tiny, hamlet_bytes):
    """The compiled step drops the guards on the model's modules: two decoders in one process, over two models
    with different layers (float32 and int8-pack linears) and over two models that differ only in weights, must
    each still run their own model, step for step interleaved."""
    import copy

    from streamkv.models.weights import apply_weights

    torch._dynamo.reset()
    base = tiny("tiny:llama").model
    scaled = copy.deepcopy(base)
    with torch.no_grad():
        for p in scaled.parameters():
            p.mul_(1.1)
    models = {"float32": base, "int8-pack": apply_weights(copy.deepcopy(base), "int8-pack"), "scaled": scaled}
    tokens = hamlet_bytes[:80]
    ids = torch.tensor([tokens])
    decoders = {name: RingDecoder(m, make_cache("ring", m, cap=32, sink=4), compile=True, backend="eager")
                for name, m in models.items()}
    got = {name: [] for name in models}
    with torch.inference_mode():
        for decoder in decoders.values():
            decoder(ids[:, :32])
        for t in range(32, 80):
            for name, decoder in decoders.items():
                got[name].append(decoder(ids[:, t : t + 1])[0, -1].log_softmax(-1))
    for name, m in models.items():
        eager = logprobs(RingDecoder(m, make_cache("ring", m, cap=32, sink=4)), tokens, first=32)[32:]
        assert (torch.stack(got[name]) - eager).abs().max() <= 1e-4, name
    assert (torch.stack(got["scaled"]) - torch.stack(got["float32"])).abs().max() > 1e-2


def test_the_compiled_step_attends_without_a_mask_under_sdpa(hamlet_bytes):
    """Its one query sees every slot: under SDPA the compiled step passes no mask, so SDPA takes the grouped keys and
    values as they are instead of a copy per query head; the log-probabilities stay the general ring's, and the
    model is left on its own attention implementation."""
    from streamkv.models.sources import load_model

    torch._dynamo.reset()
    model = load_model("tiny:llama", attn_implementation="sdpa").model
    kv_heads = model.config.num_key_value_heads
    assert kv_heads < model.config.num_attention_heads  # (grouped-query attention)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    tokens = hamlet_bytes[:100]
    cache = make_cache("ring", model, cap=32, sink=4)
    fixed = logprobs(RingDecoder(model, cache, compile=True, backend=backend), tokens)
    general = logprobs(plain(model, make_cache("ring", model, cap=32, sink=4)), tokens)
    assert cache.static and model.config._attn_implementation == "sdpa"
    assert (general - fixed).abs().max() <= 1e-4
    calls = [n for gm in graphs for n in gm.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert len(calls) == model.config.num_hidden_layers
    for call in calls:
        assert call.kwargs.get("attn_mask") is None
        assert call.args[1].meta["example_value"].shape[1] == kv_heads  # the keys as the cache holds them


def test_every_cache_tensor_the_compiled_step_sees_has_a_static_address(tiny, hamlet_bytes):
    """CUDA graphs replay fixed addresses and skip a graph whose mutated inputs are not marked static: every input
    of the step's graph that lives in the cache's storage (buffers, their per-layer views, position, slot) is."""
    torch._dynamo.reset()
    model = tiny("tiny:llama").model
    seen = []

    def backend(gm, example_inputs):
        seen.extend(example_inputs)
        return gm.forward

    cache = make_cache("ring", model, cap=32, sink=4)
    decoder = RingDecoder(model, cache, compile=True, backend=backend)
    with torch.inference_mode():
        decoder(torch.tensor([hamlet_bytes[:32]]))
        for t in hamlet_bytes[32:36]:
            decoder(torch.tensor([[t]]))
    storages = {t.untyped_storage().data_ptr() for t in cache.static_tensors()}
    inputs = [t for t in seen if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in storages]
    assert len(inputs) >= 3 * len(cache.layers)  # every layer's key and value views and its sinks, at least
    unmarked = [tuple(t.shape) for t in inputs if getattr(t, "_dynamo_static_input_type", None) is None]
    assert not unmarked, f"cache tensors without a static address: {unmarked}"


def test_bench_sections_on_a_tiny_model(tiny, hamlet_bytes):
    model = tiny("tiny:llama").model
    cfg = BenchConfig(caps=(48,), compress_every=8, blocks=2, block=8, warmup=2, compile=False, stream_tokens=400,
                      dense_tokens=300, rss_from=100, stream_methods=("ring", "start_recent", "dense"),
                      evaluator_tokens=300, weights=("bfloat16", "int8"), weights_compile=())
    out = run(model, hamlet_bytes[:1000], cfg, progress=False)
    # the weights section: each variant against float32 eager on copies of the model (which stays float32)
    weights = {row["variant"]: row for row in out["weights"]}
    assert set(weights) == {"float32 eager", "bfloat16 eager", "int8 eager"}
    assert weights["float32 eager"]["vs_float32"] == pytest.approx(1.0)
    assert all(row["status"] == "ok" and row["tpot_ms"] > 0 for row in weights.values())
    assert sum(bool(row.get("best")) for row in weights.values()) == 1
    assert next(model.parameters()).dtype == torch.float32 and type(model.lm_head) is torch.nn.Linear
    table = {row["method"]: row for row in out["overhead"]}
    assert table[REFERENCE]["overhead"] == pytest.approx(1.0)
    assert table["recompute"]["speedup"] == pytest.approx(1.0)
    assert all(row["tpot_ms"] > 0 for row in out["overhead"])
    assert table["recompute"]["timed_steps"] == 4  # every 4th of 16 steps
    assert table["ring"]["cache_work"] > 0 and table[REFERENCE]["cache_work"] is None
    assert table["ring lazy"]["cache_work"] > 0 and table["ring lazy"]["goal"] == "overhead <= 1.01"
    memory = {row["method"]: row for row in out["memory"]}
    assert memory["ring"]["kv_max_over_min"] == 1.0
    assert memory["dense"]["kv_bytes_max"] > memory["dense"]["kv_bytes_min"] * 5  # dense grows: 49 -> 300 tokens
    assert out["compile"] == []
    # the parallel evaluator against the decode loop: the same NLLs on the same tokens, both timed
    assert [row["method"] for row in out["evaluator"]] == ["start_recent K=1", "start_recent K=8"]
    for row in out["evaluator"]:
        assert row["nll_max_abs_diff"] <= 1e-4 and row["ppl_parallel"] == pytest.approx(row["ppl_decode"], rel=1e-5)
        assert row["parallel_tok_s"] > 0 and row["decode_tok_s"] > 0
    json.dumps(out, allow_nan=False)  # the record is plain JSON


def test_bench_names_a_bad_option(capsys):
    assert main(["bench", "--compress-every", "32", "--block", "16"]) == 2
    assert "block (16) must be at least compress_every (32)" in capsys.readouterr().err
    assert main(["bench", "--sections", "speed"]) == 2
    assert "unknown bench section(s) speed" in capsys.readouterr().err


def test_bench_command_prints_the_tables_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny:llama", "--caps", "48", "--compress-every", "8", "--block", "8",
                 "--blocks", "1", "--warmup", "1", "--no-compile", "--peers", "--stream-tokens", "100",
                 "--rss-from", "60", "--stream-methods", "ring", "--evaluator-tokens", "120", "--quiet",
                 "--kvpress-methods", "kvpress:streaming_llm", "kvpress:tova", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 48 | ring (fixed shapes) |" in printed and "| ring | 48 | 100 |" in printed
    assert "| 48 | start_recent K=8 | 120 |" in printed  # the evaluator section
    record = json.loads(out.read_text())
    assert "| 48 | tova lazy |" in printed
    peers = 3 if EXPECT_KVPRESS else 0  # kvpress StreamingLLM at K = 1 and compress_every, TOVA at K (CI: always)
    assert record["config"]["model"] == "tiny:llama" and len(record["overhead"]) == 10 + peers
    if peers:
        assert "| 48 | kvpress streaming_llm K=8 |" in printed and "| 48 | kvpress tova K=8 |" in printed


@needs_llamacpp
def test_bench_puts_llamacpp_shift_against_its_own_decode(tiny, hamlet_bytes):
    """llama.cpp's rows: overhead against llama.cpp's decode without a shift (1 for that reference), no speedup."""
    from streamkv.bench import overhead as bench

    cfg = BenchConfig(caps=(48,), compress_every=8, block=8, blocks=2, warmup=1, compile=False, peers=True).check()
    # byte tokens are valid ids of the embedded model too; the torch rows run the tiny model, llama.cpp the GGUF
    table = bench.overhead(tiny("tiny:llama").model, hamlet_bytes, 48, cfg, progress=False,
                           source="embedded:smollm2-135m").set_index("method")
    engine = table.loc[[bench.LLAMACPP_REFERENCE, bench.llamacpp_shift(1), bench.llamacpp_shift(8)]]
    assert engine.loc[bench.LLAMACPP_REFERENCE, "overhead"] == 1.0
    assert engine.overhead.gt(0).all() and engine.speedup.isna().all() and (engine.goal == "").all()
    assert table.loc[bench.REFERENCE, "overhead"] == 1.0  # our rows keep our reference
