"""Safe, resumable extraction of zip and tar archives, and the check that an archive is whole.

Every member is checked before anything is written: absolute names, ``..`` components, links
(symbolic or hard) and special files (devices, fifos) are refused with a ``CaptionsError``
naming the archive and the member. Links are refused outright rather than judged by where they
point: the official COCO and Flickr8k archives hold none, and a chain of links that each look
inside the destination when checked can still lead a later member outside it. Writing never
follows a link either: each folder under the destination is opened one component at a time with
``O_NOFOLLOW`` (and the member written through that descriptor), so a link already there,
planted or left by another tool, is refused instead of followed.

Each file is written to a temporary name beside its final path and renamed into place, so an
interrupted extraction never leaves a truncated file under a real name; running the extraction
again skips the members already in place (same size) and redoes the rest.
"""

from __future__ import annotations

import errno
import logging
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from captions.errors import CaptionsError, first_line, output_error
from captions.fsutil import fault_point, write_all

log = logging.getLogger("captions")

#: Members under these top-level folders are junk (macOS resource forks) and are skipped.
SKIP_PREFIXES: tuple[str, ...] = ("__MACOSX/",)
#: Names that mark a tar archive (also with ``.part`` appended, as a download in progress is named).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_MAX_OPEN_FOLDERS = 64
# what reading a damaged archive raises (bz2 raises OSError, which is told apart where it matters)
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


class CorruptArchive(CaptionsError):
    """An archive that does not open, or whose data does not read back (truncated or damaged)."""


@dataclass
class Member:
    """One archive entry, reduced to what extraction needs."""

    name: str  # normalised relative POSIX path (no leading ./, no trailing /)
    raw_name: str  # the name as stored in the archive (used in error messages)
    kind: str  # "file" or "dir"
    size: int = 0


def _check_name(raw: str, archive: Path) -> str:
    """Return the normalised relative name of ``raw``, or raise if it is absolute or climbs with ``..``."""
    name = raw.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        raise CaptionsError(f"refusing to extract member '{raw}': absolute path", archive)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise CaptionsError(f"refusing to extract member '{raw}': '..' path traversal", archive)
    return "/".join(parts)


def _refuse_link(raw: str, kind: str, target: str, archive: Path) -> CaptionsError:
    return CaptionsError(f"refusing to extract member '{raw}': a {kind} (to '{target}'); links are not extracted "
                         "(the COCO and Flickr8k archives hold none)", archive)


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> list[tuple[Member, zipfile.ZipInfo]]:
    out = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            target = zf.read(info)[:200].decode("utf-8", "replace")
            raise _refuse_link(info.filename, "symbolic link", target, archive)
        if info.is_dir():
            out.append((Member("", info.filename, "dir"), info))
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise CaptionsError(f"refusing to extract member '{info.filename}': special file (device or fifo)",
                                archive)
        else:
            out.append((Member("", info.filename, "file", info.file_size), info))
    return out


def _tar_members(tf: tarfile.TarFile, archive: Path) -> list[tuple[Member, tarfile.TarInfo]]:
    out = []
    for info in tf.getmembers():
        if info.issym() or info.islnk():
            raise _refuse_link(info.name, "symbolic link" if info.issym() else "hard link", info.linkname, archive)
        if info.isdir():
            out.append((Member("", info.name, "dir"), info))
        elif info.isfile():
            out.append((Member("", info.name, "file", info.size), info))
        else:
            raise CaptionsError(f"refusing to extract member '{info.name}': special file (device or fifo)", archive)
    return out


_TEMPORARY = re.compile(r"\..+\.extracting")


def _validate(pairs: list, archive: Path, reserved: Collection[str] = ()) -> list:
    """Check every member's name (see module docstring); drop junk and the root entry. Raises on the
    first bad one: also a member named like extraction's temporary files (``.NAME.extracting``:
    writing NAME would replace it) or, at the top level, one of ``reserved``."""
    kept = []
    for m, info in pairs:
        m.name = _check_name(m.raw_name, archive)
        if not m.name or any((m.name + "/").startswith(p) for p in SKIP_PREFIXES):
            continue
        if _TEMPORARY.fullmatch(m.name.rpartition("/")[2]):
            raise CaptionsError(f"refusing to extract member '{m.raw_name}': named like extraction's temporary "
                                "files", archive)
        if m.name.split("/")[0] in reserved:
            raise CaptionsError(f"refusing to extract member '{m.raw_name}': '{m.name.split('/')[0]}' is "
                                "reserved for the download's own files", archive)
        kept.append((m, info))
    return kept


class _Folders:
    """Descriptors of the folders under the destination, opened one component at a time without
    following a link: writing through them, nothing can lead a member outside, whatever is
    already there or is swapped in meanwhile."""

    def __init__(self, dest: Path, archive: Path) -> None:
        self.dest, self.archive = dest, archive
        self.root = os.open(dest, os.O_RDONLY | _DIRECTORY | _CLOEXEC)  # dest itself may be a link: the user's own
        self.fds: dict[str, int] = {}

    def fd(self, rel: str, member: Member) -> int:
        """The descriptor of folder ``rel`` ("" for the destination), created where missing.
        ``CaptionsError`` when a component of it is a link or a file."""
        if not rel:
            return self.root
        if rel in self.fds:
            return self.fds[rel]
        parent, _, name = rel.rpartition("/")
        pfd = self.fd(parent, member)
        try:
            os.mkdir(name, 0o777, dir_fd=pfd)
        except FileExistsError:
            pass
        try:
            fd = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=pfd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            what = "a link" if _is_link(name, pfd) else "a file"
            raise CaptionsError(f"refusing to extract member '{member.raw_name}': {self.dest / rel} is {what}, "
                                "not a folder (links are never followed)", self.archive) from None
        if len(self.fds) >= _MAX_OPEN_FOLDERS:
            self.close_folders()
        self.fds[rel] = fd
        return fd

    def close_folders(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def close(self) -> None:
        self.close_folders()
        os.close(self.root)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _unlink_at(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _copy(src: IO[bytes], fd: int, member: Member, archive: Path, bar: tqdm) -> None:
    """Copy a member's data into ``fd``: a read failure is the archive's (``CorruptArchive``), a
    write failure the destination's (``OSError``, left to the caller)."""
    while True:
        try:
            block = src.read(_CHUNK)
        except (*_READ_ERRORS, OSError) as e:
            raise CorruptArchive(f"member '{member.raw_name}' does not read back: {e}", archive) from None
        if not block:
            return
        write_all(fd, block)
        bar.update(len(block))


def _write_file(folders: _Folders, m: Member, open_member: Callable[[Any], IO[bytes]], info: Any,
                bar: tqdm) -> bool:
    """Write file member ``m`` unless it is in place (a regular file of its size); True when written.
    The temporary file is created exclusively and without following links, then renamed."""
    parent, _, name = m.name.rpartition("/")
    pfd = folders.fd(parent, m)
    final = folders.dest / m.name
    try:
        st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISLNK(st.st_mode):
        raise CaptionsError(f"refusing to extract member '{m.raw_name}': {final} is a link (links are never "
                            "followed)", folders.archive)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise CaptionsError(f"cannot extract member '{m.raw_name}': a folder of that name exists", final)
    if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == m.size:
        bar.update(m.size)
        return False
    tmp = f".{name}.extracting"  # a fixed name, so a re-run replaces what a killed run left
    try:
        _unlink_at(tmp, pfd)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666, dir_fd=pfd)
        try:
            with open_member(info) as src:
                _copy(src, fd, m, folders.archive, bar)
        finally:
            os.close(fd)
        fault_point("download", "member-tmp")
        os.replace(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
    except BaseException as e:
        _unlink_at(tmp, pfd)
        if isinstance(e, OSError):
            raise output_error(final, e) from None
        raise
    fault_point("download", "member")
    return True


def _extract(pairs: list, dest: Path, archive: Path, open_member, progress: bool, desc: str) -> int:
    """Write validated members under ``dest``; returns how many were (re)written."""
    written = 0
    total = sum(m.size for m, _ in pairs)
    folders = _Folders(dest, archive)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress,
                  leave=False) as bar:
            for m, info in pairs:
                try:
                    if m.kind == "dir":
                        folders.fd(m.name, m)
                    elif _write_file(folders, m, open_member, info, bar):
                        written += 1
                except OSError as e:  # creating a folder
                    raise output_error(dest / m.name, e) from None
    finally:
        folders.close()
    return written


def _is_zip(archive: Path) -> bool:
    """Whether ``archive`` is a zip: by its name (a download's ``.part`` by its final one), else its content."""
    name = archive.name.lower().removesuffix(".part")
    if name.endswith(".zip"):
        return True
    if name.endswith(TAR_SUFFIXES):
        return False
    return zipfile.is_zipfile(archive)


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike, progress: bool = True,
                    reserved: Collection[str] = ()) -> int:
    """Extract a zip or tar (optionally gzip/bz2/xz-compressed) ``archive`` safely into ``dest``.

    All members are validated before the first one is written. Returns the number of members
    written; 0 means everything was already in place (a re-run after a complete extraction).
    ``reserved``: top-level names no member may have (the caller's own files in ``dest``).
    Raises ``CaptionsError`` for unsafe members (naming the archive and the member) and unknown
    formats, ``CorruptArchive`` for an archive that does not open or read back, and ``OutputError``
    (naming the path and the system's reason) when ``dest`` cannot be written.
    """
    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise CaptionsError("archive not found", archive)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(dest, e) from None
    desc = f"extract {archive.name}"
    try:
        if _is_zip(archive):
            with zipfile.ZipFile(archive) as zf:
                pairs = _validate(_zip_members(zf, archive), archive, reserved)
                return _extract(pairs, dest, archive, zf.open, progress, desc)
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                pairs = _validate(_tar_members(tf, archive), archive, reserved)

                def open_tar(info: tarfile.TarInfo) -> IO[bytes]:
                    f = tf.extractfile(info)
                    if f is None:
                        raise CorruptArchive(f"cannot read member '{info.name}'", archive)
                    return f

                return _extract(pairs, dest, archive, open_tar, progress, desc)
    except _READ_ERRORS as e:
        reason = first_line(e).rstrip(":")
        raise CorruptArchive(f"corrupt archive: {reason}", archive) from None
    raise CorruptArchive("not a zip or tar archive", archive)


def check_archive(archive: str | os.PathLike) -> None:
    """Raise ``CorruptArchive`` unless ``archive`` opens and its whole member list reads.

    A zip's central directory sits at its end, so reading it catches any truncation; a tar is
    walked header by header to its end-of-archive block and, compressed, to the end of its
    stream (whose checksum is then verified). Damaged member data inside a whole zip shows only
    on extraction (each member's CRC), which raises ``CorruptArchive`` too.
    """
    archive = Path(archive)
    try:
        if _is_zip(archive):
            with zipfile.ZipFile(archive) as zf:
                zf.infolist()
            return
        with tarfile.open(archive) as tf:
            for _ in tf:
                pass
            # the walk ends quietly at a cut between members; only a whole archive has the zero block there
            if tf.fileobj.tell() != tf.offset + tarfile.BLOCKSIZE:
                raise CorruptArchive("not a whole zip or tar archive (truncated tar: no end-of-archive block)",
                                     archive)
            while tf.fileobj.read(_CHUNK):
                pass
    except (*_READ_ERRORS, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise CaptionsError("archive not found", archive) from None
        reason = first_line(e).rstrip(":")
        raise CorruptArchive(f"not a whole zip or tar archive ({reason})", archive) from None


def archive_size(archive: str | os.PathLike) -> int:
    """Uncompressed size of a zip's members (used to check free disk space); 0 for other formats."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError):
        return 0


def free_space(path: str | os.PathLike) -> int:
    """Free bytes on the file system holding ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free
