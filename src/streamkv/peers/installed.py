"""The optional peers: whether this machine has them, and how to install them.

Kept free of torch: the pipeline asks it for every peer job while it builds
the DAG (the answer is a parameter of the job, so installing a peer re-runs
the rows that said "not installed").
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from streamkv.evaluation.params import KVPRESS_METHODS, LLAMACPP_METHODS, PEER_SETUP

ENV_VAR = "STREAMKV_KVPRESS_PYTHON"
INSTALL_HINT = (f"run `{PEER_SETUP['kvpress']}` (it builds .venv-kvpress), or point {ENV_VAR} at a python with "
                "kvpress")
LLAMACPP_VERSION = "0.3.36"
LLAMACPP_HINT = (f"run `{PEER_SETUP['llamacpp']}` (it builds llama-cpp-python {LLAMACPP_VERSION} from source into "
                 ".venv, about 3 minutes on 2 cores)")


def kvpress_python() -> str | None:
    """The peer environment's python; None if there is none.

    $STREAMKV_KVPRESS_PYTHON if set, else `.venv-kvpress/bin/python` in the working directory or in the
    checkout this package is installed from (editable installs, as the Makefile makes them).
    """
    if os.environ.get(ENV_VAR):
        return os.environ[ENV_VAR] if Path(os.environ[ENV_VAR]).exists() else None
    for root in (Path.cwd(), Path(__file__).absolute().parents[3]):
        candidate = root / ".venv-kvpress" / "bin" / "python"  # (a venv's python is a link: not resolved)
        if candidate.exists():
            return str(candidate)
    return None


def llamacpp_version() -> str | None:
    """The installed llama-cpp-python's version; None if it is not installed."""
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None


def installed(method: str) -> str:
    """What this machine has for the peer `method` ("" for our own methods)."""
    if method in KVPRESS_METHODS:
        python = kvpress_python()
        return f"kvpress at {python}" if python else "not installed"
    if method in LLAMACPP_METHODS:
        found = llamacpp_version()
        return f"llama-cpp-python {found}" if found else "not installed"
    return ""
