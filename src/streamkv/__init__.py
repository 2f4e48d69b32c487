"""streamkv: streaming LLM decoding with attention sinks, and honest measurement of it."""

from .budget import Budget
from .cache import StreamingCache, make_cache
from .errors import StreamkvError
from .evaluate import METHODS, EvalParams, evaluate
from .rope import RotaryAligner
from .sources import load_model, load_text

__all__ = ["Budget", "EvalParams", "METHODS", "RotaryAligner", "StreamingCache", "StreamkvError", "evaluate",
           "load_model", "load_text", "make_cache"]
__version__ = "0.1.0"
