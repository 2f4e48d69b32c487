"""User-facing errors.

A `StreamkvError` is a mistake in what the user asked for (a bad option, an
unknown source, a budget that does not fit).  The command line prints its
message on one line and exits with status 2; it never shows a traceback.
"""


class StreamkvError(ValueError):
    """An input the user can fix; the message says what and how."""


class NotInstalled(StreamkvError):
    """A peer whose optional package is absent; the message says how to install it.

    The pipeline records such a row as "not installed" and shows it in the report instead of dropping it.
    """


def error_text(exc: BaseException) -> str:
    """The exception's type and message, as kept in a result (bounded: some messages carry whole graphs)."""
    return f"{type(exc).__name__}: {exc}".strip()[:4000]


def first_line(exc: BaseException) -> str:
    """An exception's message on one line (its first), or its type where it has none: for a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def one_line(exc: BaseException | str) -> str:
    """The whole message on one line, whatever line breaks the values in it hold (its type where it has none)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip()) or type(exc).__name__
