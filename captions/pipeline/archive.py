"""Safe, resumable extraction of zip and tar archives.

Every member is checked before anything is written: absolute names, ``..`` components, links
whose target leaves the destination and special files (devices, fifos) are refused with a
``CaptionsError`` that names the member. Each file is written to a temporary name beside its
final path and renamed into place, so an interrupted extraction never leaves a truncated file
under a real name; running the extraction again skips the members already in place (same
size) and redoes the rest.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from tqdm import tqdm

from captions.errors import CaptionsError

log = logging.getLogger("captions")

#: Members under these top-level folders are junk (macOS resource forks) and are skipped.
SKIP_PREFIXES: tuple[str, ...] = ("__MACOSX/",)

_DRIVE = re.compile(r"^[A-Za-z]:")
_CHUNK = 1 << 20


@dataclass
class Member:
    """One archive entry, reduced to what extraction needs."""

    name: str  # normalised relative POSIX path (no leading ./, no trailing /)
    raw_name: str  # the name as stored in the archive (used in error messages)
    kind: str  # "file", "dir", "symlink" or "hardlink"
    size: int = 0
    link: str = ""  # symlink target as stored, or the hardlink's archive path


def _check_name(raw: str, archive: Path) -> str:
    """Return the normalised relative name of ``raw``, or raise if it is absolute or climbs with ``..``."""
    name = raw.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        raise CaptionsError(f"refusing to extract member '{raw}': absolute path", archive)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise CaptionsError(f"refusing to extract member '{raw}': '..' path traversal", archive)
    return "/".join(parts)


def _check_link(member: Member, archive: Path) -> None:
    """Raise unless ``member``'s link target stays inside the destination."""
    target = member.link.replace("\\", "/")
    if member.kind == "hardlink":  # the target is an archive path: same rules as member names
        try:
            member.link = _check_name(target, archive)
        except CaptionsError:
            member.link = ""
        if not member.link:
            raise CaptionsError(f"refusing to extract member '{member.raw_name}': hard link to '{target}' "
                                "escapes the destination", archive) from None
        return
    if target.startswith("/") or _DRIVE.match(target):
        raise CaptionsError(f"refusing to extract member '{member.raw_name}': symlink to absolute path "
                            f"'{member.link}' escapes the destination", archive)
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(member.name), target))
    if resolved == ".." or resolved.startswith("../"):
        raise CaptionsError(f"refusing to extract member '{member.raw_name}': symlink to '{member.link}' "
                            "escapes the destination", archive)


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> list[tuple[Member, zipfile.ZipInfo]]:
    out = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            m = Member("", info.filename, "symlink", 0, zf.read(info).decode("utf-8", "replace"))
        elif info.is_dir():
            m = Member("", info.filename, "dir")
        else:
            m = Member("", info.filename, "file", info.file_size)
        out.append((m, info))
    return out


def _tar_members(tf: tarfile.TarFile, archive: Path) -> list[tuple[Member, tarfile.TarInfo]]:
    out = []
    for info in tf.getmembers():
        if info.issym():
            m = Member("", info.name, "symlink", 0, info.linkname)
        elif info.islnk():
            m = Member("", info.name, "hardlink", info.size, info.linkname)
        elif info.isdir():
            m = Member("", info.name, "dir")
        elif info.isfile():
            m = Member("", info.name, "file", info.size)
        else:
            raise CaptionsError(f"refusing to extract member '{info.name}': special file (device or fifo)", archive)
        out.append((m, info))
    return out


def _validate(pairs: list, archive: Path) -> list:
    """Check every member (see module docstring); drop junk and the root entry. Raises on the first bad one."""
    kept = []
    for m, info in pairs:
        m.name = _check_name(m.raw_name, archive)
        if not m.name or any((m.name + "/").startswith(p) for p in SKIP_PREFIXES):
            continue
        if m.kind in ("symlink", "hardlink"):
            _check_link(m, archive)
        kept.append((m, info))
    return kept


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _target(root: Path, member: Member, archive: Path) -> Path:
    """The final path of ``member`` under ``root``; raises if an existing symlink would lead it outside."""
    final = root.joinpath(*member.name.split("/"))
    real_root = os.path.realpath(root)
    if not _inside(os.path.realpath(final.parent), real_root):
        raise CaptionsError(f"refusing to extract member '{member.raw_name}': its folder leads outside "
                            "the destination through a link", archive)
    if member.kind == "symlink" and not _inside(os.path.realpath(final.parent / member.link), real_root):
        raise CaptionsError(f"refusing to extract member '{member.raw_name}': symlink to '{member.link}' "
                            "escapes the destination", archive)
    return final


@contextmanager
def _atomic_member(final: Path) -> Iterator[Path]:
    """A fixed temporary name beside ``final`` (so a re-run overwrites a leftover), renamed on success."""
    tmp = final.with_name(f".{final.name}.extracting")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _is_done(final: Path, member: Member) -> bool:
    if member.kind == "symlink":
        return final.is_symlink() and os.readlink(final) == member.link
    return final.is_file() and not final.is_symlink() and final.stat().st_size == member.size


def _write_file(final: Path, src: IO[bytes], bar: tqdm) -> None:
    with _atomic_member(final) as tmp, open(tmp, "wb") as out:
        while block := src.read(_CHUNK):
            out.write(block)
            bar.update(len(block))


def _extract(pairs: list, dest: Path, archive: Path, open_member, progress: bool, desc: str) -> int:
    """Write validated members under ``dest``; returns how many were (re)written."""
    written = 0
    total = sum(m.size for m, _ in pairs)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress,
              leave=False) as bar:
        for m, info in pairs:
            final = _target(dest, m, archive)
            if m.kind == "dir":
                if final.is_symlink() or (final.exists() and not final.is_dir()):
                    final.unlink()
                final.mkdir(parents=True, exist_ok=True)
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_dir() and not final.is_symlink():
                raise CaptionsError(f"cannot extract member '{m.raw_name}': a folder of that name exists", final)
            if _is_done(final, m):
                bar.update(m.size)
                continue
            if m.kind == "symlink":
                with _atomic_member(final) as tmp:
                    os.symlink(m.link, tmp)
            else:
                with open_member(info) as src:
                    _write_file(final, src, bar)
            written += 1
    return written


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike, progress: bool = True) -> int:
    """Extract a zip or tar (optionally gzip/bz2/xz-compressed) ``archive`` safely into ``dest``.

    All members are validated before the first one is written. Returns the number of members
    written; 0 means everything was already in place (a re-run after a complete extraction).
    Raises ``CaptionsError`` for unsafe members (naming them), corrupt archives and unknown formats.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    desc = f"extract {archive.name}"
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                pairs = _validate(_zip_members(zf, archive), archive)
                return _extract(pairs, dest, archive, zf.open, progress, desc)
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                pairs = _validate(_tar_members(tf, archive), archive)

                def open_tar(info: tarfile.TarInfo) -> IO[bytes]:
                    f = tf.extractfile(info)  # hardlinks: the linked file's data
                    if f is None:
                        raise CaptionsError(f"cannot read member '{info.name}'", archive)
                    return f

                return _extract(pairs, dest, archive, open_tar, progress, desc)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise CaptionsError(f"corrupt archive: {e}", archive) from None
    except FileNotFoundError as e:
        if not archive.exists():
            raise CaptionsError("archive not found", archive) from None
        raise CaptionsError(f"cannot extract: {e}", archive) from None
    raise CaptionsError("not a zip or tar archive", archive)


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
