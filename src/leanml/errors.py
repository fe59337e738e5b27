"""One exception type for every problem the user can fix.

Its message is a single line that names the bad value and what is accepted; the CLI prints it and
exits with code 2 instead of showing a traceback.
"""

from __future__ import annotations


class LeanmlError(ValueError):
    """A user-facing error with a one-line message."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def check(condition: bool, message: str) -> None:
    """Raise :class:`LeanmlError` with ``message`` when ``condition`` is false."""
    if not condition:
        raise LeanmlError(message)
