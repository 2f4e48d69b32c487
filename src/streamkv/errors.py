"""User-facing errors.

A `StreamkvError` is a mistake in what the user asked for (a bad option, an
unknown source, a budget that does not fit).  The command line prints its
message on one line and exits with status 2; it never shows a traceback.
"""


class StreamkvError(ValueError):
    """An input the user can fix; the message says what and how."""
