"""Filesystem helpers shared by every stage: atomic writes and content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    A reader therefore never sees a half-written ``final``: it is either absent, the old file,
    or the complete new one. The temporary file is removed when the block raises.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty JSON (UTF-8, keys in insertion order) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def text_codec(encoding: str = "utf-8") -> str:
    """The codec that reads text of ``encoding``: UTF-8 is read as ``utf-8-sig`` so that a byte-order
    mark (written by Notepad and spreadsheet exports) is skipped. Raises ``CaptionsError`` for a
    name Python does not know."""
    import codecs

    from captions.errors import CaptionsError

    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise CaptionsError(f"--encoding: unknown text encoding '{encoding}' (e.g. utf-8, cp1252, latin-1)") from None
    return "utf-8-sig" if name in ("utf-8", "utf-8-sig") else name


def read_text(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The text of file ``path``: decoded as its byte-order mark says (UTF-8 or UTF-16, the mark
    skipped), else as ``encoding``.

    Raises ``CaptionsError`` naming the file when it is missing or unreadable, and, for a byte that
    is not valid in ``encoding``, naming its line, column and value (so the user can find it or
    pass another encoding).
    """
    import codecs

    from captions.errors import CaptionsError

    path = Path(path)
    codec = text_codec(encoding)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CaptionsError("file not found", path) from None
    except OSError as e:
        raise CaptionsError(f"cannot read the file ({e.strerror})", path) from None
    if data.startswith(codecs.BOM_UTF8):  # a byte-order mark names the encoding better than any setting
        codec = "utf-8-sig"
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Notepad's "Unicode"
        codec = "utf-16"
    try:
        return data.decode(codec)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        shown = "UTF-8" if codec == "utf-8-sig" else codec
        raise CaptionsError(f"line {line}, column {column}: byte 0x{data[e.start]:02x} is not valid {shown} text "
                            f"(save the file as UTF-8, or pass its encoding, e.g. --encoding cp1252)", path) from None


def read_json(path: str | os.PathLike, encoding: str = "utf-8") -> Any:
    """Read a JSON file (``read_text``: a UTF-8 byte-order mark is skipped), raising
    ``CaptionsError`` naming the file when it is missing, not text of ``encoding`` or malformed."""
    from captions.errors import CaptionsError

    text = read_text(path, encoding)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CaptionsError(f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}", path) from None
    except RecursionError:
        raise CaptionsError("malformed JSON: nested too deeply", path) from None


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file's bytes, read in ``chunk_size`` blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Return the hex sha256 of ``obj`` serialised canonically (sorted keys, no whitespace)."""
    data = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(data).hexdigest()
