"""The one exception type the CLI turns into a one-line error and a non-zero exit."""

from __future__ import annotations

import os
import re


class CaptionsError(Exception):
    """A user-facing problem: bad input, a mismatch between stages, a missing file.

    The message is one line that names the file (when there is one) and the problem.
    """

    def __init__(self, message: str, path: object | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path is not None else message)


class OutputError(CaptionsError):
    """Writing an output failed (a full disk, a read-only folder, ...): the message names the path
    and the system's reason."""


def os_reason(e: BaseException) -> str:
    """The system's reason for a failed file operation ("No space left on device", "Read-only
    file system", ...): the text of its errno, also where HDF5 only quotes it in its message
    ("errno = 28"); else the first line of the message, else the exception's type."""
    code = getattr(e, "errno", None)
    if not code and (m := re.search(r"errno = (\d+)", str(e))):
        code = int(m.group(1))
    if code:
        return os.strerror(code)
    return first_line(e)


def first_line(e: BaseException, default: str | None = None) -> str:
    """The first non-blank line of an exception's message, stripped; else ``default``, else the
    exception's type name. Library errors often carry a multi-line message, or none at all."""
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    return default if default is not None else type(e).__name__


def torch_load_reason(e: BaseException, size: int) -> str:
    """Why ``torch.load(..., weights_only=True)`` of a ``size``-byte file raised ``e``, in a few
    words: an empty file; pickled Python objects the safe load refuses; not torch.save's format;
    else the library's first sentence (torch appends a paragraph of advice to a damaged zip's)."""
    if size == 0:
        return "an empty file"
    if "Unsupported global" in str(e):
        return "it holds Python objects that a safe load, weights_only=True, does not run"
    if type(e).__name__ in ("UnpicklingError", "KeyError", "EOFError"):
        return "not a file that torch.save wrote"
    if isinstance(e, OSError) or "enforce fail" in str(e):  # the zip reader's EINVAL or C++ check
        return "truncated or damaged, or a zip file that torch.save did not write"
    return f"truncated or damaged: {first_line(e).split('. ')[0].rstrip('.')}"


def error_text(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line (its lines joined; ``load_state_dict`` gives its reason
    only after the first), cut at ``limit`` characters; else the exception's type."""
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return (text[:limit] + "…" if len(text) > limit else text) or type(e).__name__


def output_error(path: object, e: BaseException, note: str = "") -> OutputError:
    """One line for a failed write of ``path``: ``<path>: <system reason>[; note]``."""
    return OutputError(f"{os_reason(e)}{'; ' + note if note else ''}", path)
