"""The one exception type the CLI turns into a one-line error and a non-zero exit."""

from __future__ import annotations


class CaptionsError(Exception):
    """A user-facing problem: bad input, a mismatch between stages, a missing file.

    The message is one line that names the file (when there is one) and the problem.
    """

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)
