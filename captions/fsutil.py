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


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    """Write every byte of ``data`` to descriptor ``fd`` (at ``offset`` when given, else at its
    position). A short write is continued, so a disk that fills up raises ``OSError(ENOSPC)``
    instead of leaving a silently truncated file (PIL's own encoder does not check for them)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        if n <= 0:
            import errno

            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
        offset = None if offset is None else offset + n


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = True,
                       fault: tuple[str, str] | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all, even across a kill, a crash or a full disk.

    The bytes go to a temporary file beside ``path`` (created exclusively, never through a
    link), every one of them (``write_all``), are flushed to the disk (``fsync``) and only then
    renamed onto ``path``. ``fault`` = (stage, boundary) names the two test hooks
    (``fault_point``): ``boundary-tmp`` before the rename, ``boundary`` after it.
    Raises ``OutputError`` naming ``path`` with the system's reason (``No space left on device``,
    ``Read-only file system``); the temporary file is then gone.
    """
    from captions.errors import output_error

    final = Path(path)
    try:
        with atomic_path(final) as tmp:
            tmp.unlink(missing_ok=True)  # a leftover of a killed process that had our pid
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
            try:
                write_all(fd, data)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if fault:
                fault_point(fault[0], fault[1] + "-tmp")
    except OSError as e:
        raise output_error(final, e) from None
    if fault:
        fault_point(*fault)


def sync_filesystem(path: str | os.PathLike) -> None:
    """Flush to the disk everything written to the file system that holds ``path`` (Linux
    ``syncfs``; ``sync`` elsewhere), before a completion marker is written: one flush for a whole
    folder of outputs costs far less than an ``fsync`` per file (a resize of 1000 images: 5.5 s
    unsynced, 7.4 s with one flush at the end, 11.1 s with an fsync per image), and it orders them
    all before the marker. Raises ``OSError`` for a write the file system failed to carry out."""
    import ctypes
    import errno

    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        try:
            syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        except (AttributeError, OSError, TypeError):  # not Linux
            syncfs = None
        if syncfs is not None and syncfs(fd) == 0:
            return
        code = ctypes.get_errno() if syncfs is not None else 0
        if code and code != errno.ENOSYS:
            raise OSError(code, os.strerror(code), str(path))
        if hasattr(os, "sync"):
            os.sync()
    finally:
        os.close(fd)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block (a full disk, a read-only folder) into one
    ``OutputError`` line naming ``path``, the file or folder being written."""
    try:
        yield
    except OSError as e:
        from captions.errors import output_error

        raise output_error(path, e) from None


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, stage: str, option: str = "--out") -> Iterator[Path]:
    """Create the output folder ``folder`` of ``captions STAGE`` and hold its lock,
    ``folder/.STAGE.lock`` (``output_lock``: the holder's pid and host beside it), while the block
    runs; yields the lock's path. One run at a time writes into a folder.

    Raises ``CaptionsError`` when ``folder`` is a file (naming ``option``) or another process
    holds the lock (naming the lock and its holder), ``OutputError`` naming ``folder`` when it
    cannot be created or written (a read-only or full file system).
    """
    from captions.errors import CaptionsError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CaptionsError(f"{option} is a file, not a folder", folder)
    lock = folder / f".{stage}.lock"
    with contextlib.ExitStack() as held:
        with writing(folder):
            folder.mkdir(parents=True, exist_ok=True)
            held.enter_context(output_lock(lock, stage))
        yield lock


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files ``atomic_path`` leaves in ``folder`` when its process is killed
    (``.NAME.tmp-PID``); returns how many. Only for a folder whose writer holds its lock: another
    process's temporaries there would be in use."""
    import re

    pattern = re.compile(r"\..+\.tmp-\d+")
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if pattern.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
            removed += 1
    return removed


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


# ------------------------------------------------------------------- output locks and fault injection

def _lock_holder(holder: Path) -> tuple[str, str]:
    """(pid, host) written by the holder of a lock, ("?", "?") when unreadable."""
    try:
        pid, host = holder.read_text(encoding="utf-8").split()[:2]
    except (OSError, ValueError):
        return "?", "?"
    return pid, host


def _running_here(pid: str, host: str) -> bool | None:
    """Whether process ``pid`` of ``host`` runs (a zombie does not); None when it cannot be told."""
    import socket

    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


@contextlib.contextmanager
def output_lock(lock: str | os.PathLike, stage: str, timeout: float = 0.0) -> Iterator[None]:
    """Hold the file lock ``lock`` while ``stage`` (e.g. "train") writes the output it guards.

    An OS lock through the ``filelock`` library: the system releases it when its holder ends, even
    by a kill, and ``filelock`` closes it in forked children (DataLoader workers never hold it).
    The holder writes "<pid> <host>" to ``<lock>.pid`` beside it. When another process holds it
    (``timeout`` seconds waited), raises ``CaptionsError``: one line naming the lock and its holder;
    when the lock cannot be created (a read-only folder, a full disk), ``OutputError``.
    """
    import socket

    from filelock import FileLock, Timeout

    from captions.errors import CaptionsError, output_error

    lock = Path(lock)
    holder = lock.with_name(lock.name + ".pid")
    fl = FileLock(lock)
    try:
        fl.acquire(timeout=timeout)
    except Timeout:
        pid, host = _lock_holder(holder)
        gone = " (no longer running: a process it started may still hold the lock)" \
            if _running_here(pid, host) is False else ""
        raise CaptionsError(f"another 'captions {stage}' (pid {pid} on {host}{gone}) holds {lock}: wait for it "
                            f"to finish or write elsewhere") from None
    except OSError as e:
        raise output_error(lock, e) from None
    try:
        try:
            holder.write_text(f"{os.getpid()} {socket.gethostname()}\n", encoding="utf-8")
        except OSError as e:
            raise output_error(holder, e) from None
        yield
    finally:
        holder.unlink(missing_ok=True)
        fl.release()


FAULT_ENV, FAULT_TRACE_ENV = "CAPTIONS_FAULT", "CAPTIONS_FAULT_TRACE"
FAULT_EXIT = 86  # the exit status of a process ended by CAPTIONS_FAULT, so a test tells it from a crash
_fault_counts: dict[str, int] = {}


def fault_point(stage: str, boundary: str) -> None:
    """Test hook at a write boundary of ``stage`` (e.g. ``fault_point("train", "commit")``).

    With ``CAPTIONS_FAULT=stage:boundary:N`` the N-th arrival here ends the process at once
    (``os._exit(FAULT_EXIT)``: no clean-up, as a kill would); with ``stage:boundary:N:enospc`` it
    raises ``OSError(ENOSPC)`` instead, as a full disk would. With ``CAPTIONS_FAULT_TRACE=FILE``
    every arrival is appended to FILE as ``stage:boundary:N``, so a test can list the boundaries of
    an uninterrupted run. Without either variable it does nothing.
    """
    spec, trace = os.environ.get(FAULT_ENV), os.environ.get(FAULT_TRACE_ENV)
    if not spec and not trace:
        return
    key = f"{stage}:{boundary}"
    _fault_counts[key] = n = _fault_counts.get(key, 0) + 1
    point = f"{key}:{n}"
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(point + "\n")
    if spec == point:
        os._exit(FAULT_EXIT)
    if spec == point + ":enospc":
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
