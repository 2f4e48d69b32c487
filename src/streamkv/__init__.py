"""streamkv: streaming LLM decoding with attention sinks, and honest measurement of it.

The public names are imported lazily, so that light modules (the pipeline's
config checks, `streamkv.params`, `streamkv.budget`) load without torch.
"""

import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "Budget": "budget", "EvalParams": "params", "METHODS": "params", "RotaryAligner": "rope",
    "StreamingCache": "cache", "StreamkvError": "errors", "evaluate": "evaluation", "load_model": "sources",
    "load_text": "sources", "make_cache": "factory", "apply_weights": "weights",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'streamkv' has no attribute {name!r}")
