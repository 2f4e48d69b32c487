"""A job's outputs and log: every file written atomically, everything printed sent to the log.

Used by the command line, the library's writers and every pipeline script.  A file is written to a temporary
name in its own directory and renamed into place, so a job killed mid-write leaves either the old file or none,
never a truncated one; a result that names a trace is written after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """A temporary file name beside `path`, renamed onto it when the block ends without an error.

    The name keeps `path`'s suffix, so writers that pick a format by suffix (matplotlib) pick the same one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private; the output gets the mode a plain open would give
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_table(frame, path: str | Path) -> None:
    """A table (a DataFrame: a per-token trace, a summary): parquet or CSV by the file's suffix."""
    with atomic_path(path) as tmp:
        if str(path).endswith(".parquet"):
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)


def write_text(text: str, path: str | Path) -> None:
    """A text file (a report page, a token list)."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def write_json(record: dict, path: str | Path) -> None:
    """A result record as JSON (strict: a NaN is an error, not a non-standard token)."""
    write_text(json.dumps(record, indent=2, allow_nan=False) + "\n", path)


@contextlib.contextmanager
def log_to(path: str | Path):
    """Send everything this job prints to its log file: progress bars, warnings, C-level output, tracebacks.

    The redirection is done on the file descriptors, so output from handlers
    created before the job started (transformers' logging) lands there too.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "w", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield log
        except BaseException:
            traceback.print_exc()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
