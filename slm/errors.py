"""The one exception type users see: a mistake they can fix, with a message saying how.

The CLI prints `SlmError` messages as a single line on stderr and exits non-zero; any other
exception is a bug in slm and keeps its traceback.
"""


class SlmError(Exception):
    """A user-facing error: what went wrong and what to do about it."""
