"""Reduced-precision weights (streamkv.models.weights): the cache keeps its precision, the model is what the result
says, the parallel evaluator serves exactly the variants it reproduces, and a variant that fails is a failed row."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import ci_skips
from streamkv.bench.weights import weights_speed
from streamkv.cache.factory import make_stepper
from streamkv.cli import main
from streamkv.errors import StreamkvError
from streamkv.evaluation.loop import evaluate
from streamkv.evaluation.params import LOOP_ONLY_WEIGHTS, WEIGHTS, BenchConfig, EvalParams
from streamkv.models import weights as W
from streamkv.models.sources import load_model

pytestmark = pytest.mark.slow  # loads models (see tests/conftest.py)

CAP, N = 32, 200
QUANTISED = [w for w in WEIGHTS if w != W.DEFAULT]


@pytest.fixture(scope="module")
def tokens(hamlet_bytes):
    return hamlet_bytes[:N]


def _run(model_src, tokens, weights, evaluator="decode", **kw):
    loaded = load_model(model_src, weights=weights)
    p = EvalParams(model_src, "t", kw.pop("method", "start_recent"), cap=CAP, max_tokens=len(tokens),
                   weights=weights, evaluator=evaluator, **kw)
    return evaluate(loaded, tokens, p, progress=False)


def test_the_registry_is_the_parameter_list():
    assert W.NAMES == WEIGHTS
    assert set(LOOP_ONLY_WEIGHTS) <= set(WEIGHTS) and W.DEFAULT not in LOOP_ONLY_WEIGHTS


@pytest.mark.parametrize("weights", QUANTISED)
def test_every_variant_keeps_the_cache_precision_and_stays_near_float32(tokens, weights):
    if not W.runs_here(weights):  # (its refusal is tested on every CPU below)
        pytest.skip(f"{weights} needs a CPU with {W.get(weights).needs}")
    loaded = load_model("tiny:llama", weights=weights)
    assert W.weights_of(loaded.model) == weights
    linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
    assert not any(type(m.weight) is torch.nn.Parameter and m.weight.dtype == torch.float32 for m in linears), \
        "a linear layer kept plain float32 weights"
    stepper = make_stepper(loaded.model, EvalParams("tiny:llama", "t", "start_recent", cap=CAP).resolved())
    with torch.inference_mode():
        stepper.forward(torch.tensor([tokens[:CAP]]))
    layer = stepper.cache.layers[0]
    assert layer.keys.dtype == torch.float32 and layer.values.dtype == torch.float32
    record, trace = _run("tiny:llama", tokens, weights)
    _, reference = _run("tiny:llama", tokens, W.DEFAULT)
    assert record["status"] == "ok" and record["params"]["weights"] == weights
    got, want = trace.nll.to_numpy(), reference.nll.to_numpy()
    assert np.isfinite(got).all()
    # near float32 (int4 moves single tokens by up to a nat on random weights, not the mean), but not equal to it
    assert abs(got.mean() - want.mean()) < 0.05 * want.mean(), (weights, got.mean(), want.mean())
    assert np.abs(got - want).max() > 0, f"weights {weights} changed nothing"


def test_weight_bytes_shrink_with_the_variant():
    """Every variant this CPU runs; one it cannot run (int8-fbgemm without VNNI) is refused with its reason."""
    full = W.weight_bytes(load_model("tiny:llama").model)
    here = [w for w in QUANTISED if W.runs_here(w)]
    for w in set(QUANTISED) - set(here):
        with pytest.raises(StreamkvError, match=f"{W.get(w).needs} instructions"):
            load_model("tiny:llama", weights=w)
    got = {w: W.weight_bytes(load_model("tiny:llama", weights=w).model) / full for w in here}
    assert got["bfloat16"] == pytest.approx(0.5)
    for w in {"int8", "int8-intx", "int8-dynamic", "int8-fbgemm", "int8-pack"} & set(here):
        assert 0.25 <= got[w] < 0.3, (w, got[w])  # one byte a weight and a scale per row
    assert 0.125 <= got["int4"] < 0.2, got["int4"]  # half a byte, a scale and a zero per 32


def test_only_int8_fbgemm_depends_on_the_cpu():
    """The variants' CPU needs, as docs/testing.md lists them: a new one needs its entries there and in ci_skips."""
    assert {w: W.get(w).needs for w in WEIGHTS if W.get(w).needs} == {"int8-fbgemm": "VNNI"}


@pytest.mark.skipif(not W.has_vnni(), reason=ci_skips.VNNI)
def test_int8_fbgemm_quantises_activations_to_all_8_bits():
    """Its linears ask fbgemm for 8-bit activations, not the 7 bits of PyTorch's stock module: half the error."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 256).requires_grad_(False)
    linear.qconfig = per_channel_dynamic_qconfig
    stock = DynamicLinear.from_float(linear)  # the same int8 weights, 7-bit activations
    model = torch.nn.Sequential(linear)
    x = torch.randn(1, 256)
    x[0, 7] = 20.0  # an outlier channel sets the activations' scale, as in a language model's hidden states
    with torch.inference_mode():
        exact = linear(x)
        W.get("int8-fbgemm").apply(model)  # (apply_weights takes a transformers model)
        assert type(model[0]).__name__ == "FullRangeDynamicLinear"
        full_error = (model(x) - exact).abs().mean().item()
        stock_error = (stock(x) - exact).abs().mean().item()
    assert full_error < 0.7 * stock_error, (full_error, stock_error)


def _ring_step_nlls_eager_and_compiled(model, tokens) -> tuple[dict, int]:
    """The fixed-shape ring step's NLLs over 87 tokens, eager and compiled; and the graphs the compiled one made."""
    import torch._dynamo.testing

    from streamkv import make_cache
    from streamkv.cache.compiled import RingDecoder

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    ids = torch.tensor([tokens[:120]])
    out = {}
    with torch.inference_mode():
        for name, kwargs in (("eager", {}), ("compiled", {"compile": True, "backend": counter})):
            decoder = RingDecoder(model, make_cache("ring", model, cap=CAP, sink=4), **kwargs)
            decoder(ids[:, :CAP])
            out[name] = torch.cat([decoder(ids[:, t : t + 1])[0, -1].log_softmax(-1)[ids[0, t + 1]].reshape(1)
                                   for t in range(CAP, 119)])
    return out, counter.frame_count


@pytest.mark.skipif(not W.has_vnni(), reason=ci_skips.VNNI)
def test_int8_fbgemm_compiles_into_one_graph_around_its_opaque_linears(tokens):
    """fbgemm's packed weights cannot be traced: each linear is one custom op inside the fixed-shape step's graph."""
    out, graphs = _ring_step_nlls_eager_and_compiled(load_model("tiny:llama", weights="int8-fbgemm").model, tokens)
    assert graphs == 1  # fullgraph: one graph, no break, no recompilation over 87 steps
    # (on SmolLM2 the compiled norms round differently, which flips some int8 roundings of the activations: the
    # NLLs then differ per token by up to a nat while their mean stays; this tiny model's activations flip none)
    assert (out["compiled"] - out["eager"]).abs().max().item() < 1e-3


def test_int8_pack_compiles_into_one_graph_and_keeps_its_eager_nlls(tokens):
    """ATen's int8 kernel traces: the fixed-shape step compiles into one graph, with no break and no recompilation,
    and gives eager's NLLs; the kernel multiplies exactly the int8 weights and bfloat16 scales it stores."""
    model = load_model("tiny:llama", weights="int8-pack").model
    layer = model.lm_head
    x = torch.randn(3, layer.in_features).bfloat16()
    dequantised = layer.weight.float() * layer.scale.float()[:, None]
    assert torch.allclose(layer(x.float()), (x.float() @ dequantised.T).bfloat16().float(), rtol=2e-2, atol=1e-2)
    out, graphs = _ring_step_nlls_eager_and_compiled(model, tokens)
    assert graphs == 1
    assert (out["compiled"] - out["eager"]).abs().max().item() < 1e-2  # (bfloat16 roundings of fused ops differ)


def test_int8_fbgemm_is_refused_without_vnni(cpu_without, tmp_path):
    """On every CPU: the probe made to answer no (as on a Zen 2 or Zen 3 server), the library refuses the variant
    and the command line writes a failed result naming the instruction set and what to use instead."""
    env = cpu_without("VNNI", "AMX")
    assert not W.has_vnni() and not W.runs_here("int8-fbgemm") and W.runs_here("int8")
    with pytest.raises(StreamkvError, match="VNNI instructions .* use bfloat16 or int8"):
        load_model("tiny:llama", weights="int8-fbgemm")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "streamkv", "eval", "--model", "tiny:llama", "--text",
                           "embedded:shakespeare/hamlet", "--method", "start_recent", "--cap", str(CAP),
                           "--max-tokens", "64", "--weights", "int8-fbgemm", "--evaluator", "decode",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "VNNI instructions" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_float32_is_the_model_as_loaded(tokens):
    model = load_model("tiny:llama").model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert W.apply_weights(model, W.DEFAULT) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_quantised_head_leaves_the_tied_input_embedding_alone():
    model = load_model("tiny:llama").model
    model.lm_head.weight = model.model.embed_tokens.weight  # tie them, as SmolLM2 is
    embedding = model.model.embed_tokens.weight.detach().clone()
    W.apply_weights(model, "int8")
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert type(model.model.embed_tokens.weight) is torch.nn.Parameter


@pytest.mark.parametrize("weights", [w for w in WEIGHTS if w not in LOOP_ONLY_WEIGHTS and w != W.DEFAULT])
def test_parallel_evaluator_equals_the_loop_for_the_variants_it_serves(tokens, weights):
    for kw in (dict(method="start_recent"), dict(method="start_recent", compress_every=8)):
        loop, a = _run("tiny:llama", tokens, weights, "decode", **kw)
        par, b = _run("tiny:llama", tokens, weights, "parallel", **kw)
        assert par["params"]["evaluator"] == "parallel"
        assert np.abs(a.nll.to_numpy() - b.nll.to_numpy()).max() <= 1e-4, (weights, kw)


@pytest.mark.parametrize("weights", sorted(LOOP_ONLY_WEIGHTS))
def test_loop_only_variants_are_refused_by_the_parallel_evaluator(weights):
    p = EvalParams("m", "t", "start_recent", weights=weights)
    with pytest.raises(StreamkvError, match=f"weights '{weights}' run only in the decode loop"):
        EvalParams(**{**vars(p), "evaluator": "parallel"}).resolved()
    assert EvalParams(**{**vars(p), "evaluator": "auto"}).resolved().evaluator == "decode"


def test_the_result_says_which_weights_ran(tokens):
    loaded = load_model("tiny:llama", weights="int8")
    with pytest.raises(StreamkvError, match="runs weights 'int8' but the parameters say 'float32'"):
        evaluate(loaded, tokens, EvalParams("tiny:llama", "t", "start_recent", cap=CAP, max_tokens=N), progress=False)


def test_bad_weights_are_one_line_errors(capsys, tmp_path):
    with pytest.raises(StreamkvError, match="unknown weights 'int9'"):
        EvalParams("m", "t", "start_recent", weights="int9").resolved()
    with pytest.raises(StreamkvError, match="runs its own copy of the model's weights"):
        EvalParams("m", "t", "kvpress:streaming_llm", weights="int8").resolved()
    with pytest.raises(StreamkvError, match="unknown weights_compile"):
        BenchConfig(weights_compile=("int3",)).check()
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", "tiny:llama", "--text", "embedded:shakespeare/hamlet", "--method", "start_recent",
              "--weights", "int9", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "int9" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_recompute_and_generate_run_the_variant(tokens):
    record, trace = _run("tiny:llama", tokens[:80], "int8", method="recompute")
    _, reference = _run("tiny:llama", tokens[:80], W.DEFAULT, method="recompute")
    assert record["status"] == "ok" and 0 < np.abs(trace.nll.to_numpy() - reference.nll.to_numpy()).max() < 0.5
    from streamkv.cache.factory import make_cache

    for weights in ("bfloat16", "int8"):
        model = load_model("tiny:llama", weights=weights).model
        cache = make_cache("start_recent", model, cap=CAP, sink=4)
        ids = torch.tensor([tokens[:20]])
        out = model.generate(ids, past_key_values=cache, max_new_tokens=40, do_sample=False)
        assert out.shape[1] == 60 and cache.kv_length <= CAP
        assert cache.layers[0].keys.dtype == torch.float32


def test_bench_weights_section_keeps_a_failed_variant_as_a_row(tokens, monkeypatch):
    def broken(model):
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setitem(W.REGISTRY, "int4", W.Variant("int4", "broken on purpose", broken))
    model = load_model("tiny:llama").model
    cfg = BenchConfig(caps=(CAP,), compress_every=4, blocks=2, block=4, warmup=2, weights=("bfloat16", "int4"),
                      weights_compile=())
    rows = {r["variant"]: r for r in weights_speed(model, tokens, CAP, cfg, progress=False)}
    assert rows["int4 eager"]["status"] == "failed" and "no kernel for this shape" in rows["int4 eager"]["error"]
    assert rows["float32 eager"]["vs_float32"] == 1.0 and rows["bfloat16 eager"]["status"] == "ok"
    assert np.isfinite(rows["bfloat16 eager"]["nll_mean"])
    assert sum(bool(r.get("best")) for r in rows.values()) == 1
