"""streamkv: streaming LLM decoding with attention sinks, and honest measurement of it.

The public names are imported lazily, so that light modules (the pipeline's
config checks, `streamkv.evaluation.params`, `streamkv.cache.budget`) load without torch.
"""

import importlib

from streamkv.cpu import isolate_compile_cache

isolate_compile_cache()  # torch.compile's kernels in a folder per kernel level and CPU (see there), set before torch
__version__ = "0.1.0"
_EXPORTS = {
    "Budget": "cache.budget", "EvalParams": "evaluation.params", "METHODS": "evaluation.params",
    "RotaryAligner": "cache.rope", "StreamingCache": "cache.streaming", "StreamkvError": "errors",
    "evaluate": "evaluation.loop", "load_model": "models.sources", "load_text": "models.texts",
    "make_cache": "cache.factory", "apply_weights": "models.weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'streamkv' has no attribute {name!r}")
