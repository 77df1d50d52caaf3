"""``captions download``: fetch the COCO / Flickr8k archives so that ``captions prepare`` runs on them.

Each archive is streamed to ``DEST/archives/NAME.part``. An interrupted download resumes with
an HTTP ``Range`` request (from a server that ignores it, the bytes already held are compared as
they come again); connection errors, early ends and 5xx answers are retried with exponential
backoff, ``--tries`` attempts in a row that get no further at most. The finished file is checked
against the size the server announced, the size in ``CHECKSUMS`` and its checksum where one is
known, else that it is a whole archive (``check_archive``); only then is it flushed to the disk
and renamed to ``NAME``. It is then extracted safely (``captions.pipeline.archive``) and a marker
``DEST/.captions-download/NAME.done`` records the completed step, so a re-run skips it. A run
holds ``DEST/.download.lock`` throughout.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shlex
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from captions import __version__
from captions.errors import CaptionsError, OutputError, output_error
from captions.fsutil import (
    fault_point,
    folder_lock,
    remove_stale_temporaries,
    sync_filesystem,
    write_all,
    write_bytes_atomic,
    writing,
)
from captions.pipeline.archive import CorruptArchive, archive_size, check_archive, extract_archive, free_space

log = logging.getLogger("captions")

# ------------------------------------------------------------------------------------ the one URL table
#: Every URL ``captions download`` fetches. ``--mirror`` / ``CAPTIONS_MIRROR`` replaces the scheme and
#: host (``http://images.cocodataset.org``) with a prefix of your choice and keeps the path.
URLS: dict[str, dict[str, str]] = {
    "coco2014": {
        "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2014.zip",
        "train": "http://images.cocodataset.org/zips/train2014.zip",
        "val": "http://images.cocodataset.org/zips/val2014.zip",
    },
    "coco2017": {
        "annotations": "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
        "train": "http://images.cocodataset.org/zips/train2017.zip",
        "val": "http://images.cocodataset.org/zips/val2017.zip",
    },
    "flickr8k": {
        "images": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip",
        "text": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip",
    },
}

#: File name -> (size in bytes, "sha256:HEX" or "md5:HEX"), ``None`` where nothing is known.
#: COCO publishes no checksums on cocodataset.org; the values below are the sizes and sha256 digests
#: recorded for these exact URLs in TensorFlow Datasets' checksum files
#: (tensorflow_datasets/url_checksums/coco.txt and coco_captions.txt), which agree with those in
#: torchvision's prototype COCO dataset (torchvision/prototype/datasets/_builtin/coco.py).
#: The Flickr8k mirror publishes neither: its size is verified against the server's Content-Length.
CHECKSUMS: dict[str, tuple[int | None, str | None]] = {
    "annotations_trainval2014.zip":
        (252872794, "sha256:031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009"),
    "train2014.zip": (13510573713, "sha256:ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"),
    "val2014.zip": (6645013297, "sha256:fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0"),
    "annotations_trainval2017.zip":
        (252907541, "sha256:113a836d90195ee1f884e704da6304dfaaecff1f023f49b6ca93c4aaae470268"),
    "train2017.zip": (19336861798, "sha256:69a8bb58ea5f8f99d24875f21416de2e9ded3178e903f1f7603e283b9e06d929"),
    "val2017.zip": (815585330, "sha256:4f7e2ccb2866ec5041993c9cf2a952bbed69647b115d0f74da7ce8f4bef82f05"),
    "Flickr8k_Dataset.zip": (None, None),
    "Flickr8k_text.zip": (None, None),
}

#: Where an archive is extracted, relative to DEST (default: DEST itself). The Flickr8k text zip
#: holds bare files, so it gets its own folder; the others already contain one.
EXTRACT_TO: dict[str, str] = {"Flickr8k_text.zip": "Flickr8k_text"}

COCO_YEARS = ("2014", "2017")
COCO_PARTS = ("annotations", "train", "val")
STATE_DIR = ".captions-download"  # completion markers
ARCHIVE_DIR = "archives"  # downloaded archives (and their .part files)
USER_AGENT = f"captions/{__version__} (python-urllib)"
RETRY_HTTP = {408, 425, 429}  # besides every 5xx
MAX_DELAY = 60.0
_CHUNK = 1 << 20
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@dataclass(frozen=True)
class Archive:
    """One file to fetch: where from, under which name, and what to check it against."""

    url: str
    filename: str = ""  # default: the last part of the URL path
    checksum: str | None = None  # "sha256:HEX", "md5:HEX" or a bare 64/32-digit hex digest
    size: int | None = None
    extract_to: str = "."  # relative to DEST

    def __post_init__(self) -> None:
        if not self.filename:
            object.__setattr__(self, "filename", urlsplit(self.url).path.rsplit("/", 1)[-1])
        if not self.filename or "/" in self.filename or self.filename in (".", ".."):
            raise CaptionsError(f"bad archive file name '{self.filename}'", self.url)


def as_archive(item: Archive | Sequence[Any]) -> Archive:
    """Accept an ``Archive`` or a ``(url, filename, checksum[, size[, extract_to]])`` tuple."""
    return item if isinstance(item, Archive) else Archive(*item)


def parse_checksum(checksum: str) -> tuple[str, str]:
    """Split ``"sha256:HEX"`` / ``"md5:HEX"`` (or a bare hex digest, told apart by length) into (algorithm, hex)."""
    algo, sep, digest = checksum.strip().partition(":")
    if not sep:
        algo, digest = {64: "sha256", 32: "md5"}.get(len(algo), ""), algo
    algo, digest = algo.lower(), digest.lower()
    if algo not in ("sha256", "md5") or not re.fullmatch(r"[0-9a-f]+", digest) \
            or len(digest) != hashlib.new(algo).digest_size * 2:
        raise CaptionsError(f"bad checksum '{checksum}' (expected sha256:HEX or md5:HEX)")
    return algo, digest


def apply_mirror(url: str, mirror: str | None) -> str:
    """Replace the scheme and host of ``url`` by the ``mirror`` prefix, keeping the path.

    ``apply_mirror("http://images.cocodataset.org/zips/val2014.zip", "https://m.example/coco")``
    gives ``https://m.example/coco/zips/val2014.zip``.
    """
    if not mirror:
        return url
    if urlsplit(mirror).scheme not in ("http", "https") or not urlsplit(mirror).netloc:
        raise CaptionsError(f"mirror must be an http(s)://HOST[/PREFIX] URL, got '{mirror}'")
    parts = urlsplit(url)
    return mirror.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def plan(dataset: str, year: str = "2014", what: Iterable[str] | None = None,
         mirror: str | None = None) -> list[Archive]:
    """The archives for ``dataset`` (``coco`` or ``flickr8k``), with checksums and extraction folders.

    ``year`` and ``what`` (a subset of annotations, train, val) apply to COCO only.
    """
    if dataset == "coco":
        if str(year) not in COCO_YEARS:
            raise CaptionsError(f"unknown COCO year '{year}' (choose one of: {', '.join(COCO_YEARS)})")
        table = URLS[f"coco{year}"]
        parts = list(what) if what is not None else list(COCO_PARTS)
        bad = [p for p in parts if p not in table]
        if not parts:
            raise CaptionsError(f"--what needs at least one of: {', '.join(table)}")
        if bad:
            raise CaptionsError(f"unknown --what part '{','.join(bad)}' (choose from: {', '.join(table)})")
        urls = [table[p] for p in table if p in parts]
    elif dataset == "flickr8k":
        urls = list(URLS["flickr8k"].values())
    else:
        raise CaptionsError(f"unknown dataset '{dataset}' (choose one of: coco, flickr8k)")
    out = []
    for url in urls:
        name = url.rsplit("/", 1)[-1]
        size, checksum = CHECKSUMS.get(name, (None, None))
        out.append(Archive(apply_mirror(url, mirror), name, checksum, size, EXTRACT_TO.get(name, ".")))
    return out


def prepare_command(dataset: str, dest: str | os.PathLike, year: str = "2014") -> str:
    """The ``captions prepare`` command that reads what ``download`` laid out in ``dest``."""
    d = Path(dest)
    if dataset == "coco":
        ann = d / "annotations"
        args = ["captions", "prepare", "coco", ann / f"captions_train{year}.json", ann / f"captions_val{year}.json",
                "--images", d, "--out", Path("prepared") / f"coco{year}"]
    else:
        text = d / "Flickr8k_text"
        found = sorted(text.rglob("Flickr8k.token.txt")) if text.is_dir() else []
        token = found[0] if found else text / "Flickr8k.token.txt"
        images = next((d / n for n in ("Flicker8k_Dataset", "Flickr8k_Dataset") if (d / n).is_dir()),
                      d / "Flicker8k_Dataset")  # the official zip spells it "Flicker8k"
        args = ["captions", "prepare", "flickr8k", token, "--images", images,
                "--out", Path("prepared") / "flickr8k"]
    return " ".join(shlex.quote(str(a)) for a in args)


# ------------------------------------------------------------------------------------------ one file
class _Transient(Exception):
    """A failure worth retrying, resuming from what the ``.part`` file holds; ``suspect``: those
    bytes are themselves in doubt (they do not make a whole archive), so they go when we give up."""

    def __init__(self, reason: str, suspect: bool = False) -> None:
        super().__init__(reason)
        self.suspect = suspect


def _reason(e: BaseException) -> str:
    """A short one-line reason for a network error."""
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else Exception(str(e.reason))
    if isinstance(e, TimeoutError):
        return "timed out"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(text).split())


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) into (START, TOTAL); None where absent."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _held(path: Path) -> int:
    """Bytes in ``path`` (0 when it does not exist)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _attempt(url: str, part: Path, size: int | None, timeout: float, bar: tqdm) -> int | None:
    """One request: continue (or restart) ``part``. Returns the total size when known.

    Raises ``_Transient`` for retryable failures (including a connection closed early) and
    ``CaptionsError`` for permanent ones.
    """
    offset = _held(part)
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and offset:  # nothing left to send: complete, or our part is not a prefix
                _, total = _content_range(e.headers.get("Content-Range"))
                if total == offset:
                    return total
                log.debug("%s: server refused resuming at byte %d; restarting", url, offset)
                part.unlink()
                return _attempt(url, part, size, timeout, bar)  # from byte 0: no Range, so no second 416
            if e.code >= 500 or e.code in RETRY_HTTP:
                raise _Transient(f"HTTP {e.code} {e.reason}") from None
            raise CaptionsError(f"cannot download {url}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):
            raise CaptionsError(f"cannot download {url}: {_reason(e)}") from None
        raise _Transient(_reason(e)) from None
    except (OSError, http.client.HTTPException) as e:
        raise _Transient(_reason(e)) from None

    with resp:
        start, total = _accepted_range(resp, url, part, offset, size)
        bar.reset(total=total)
        bar.update(start)
        end = _receive(resp, part, start, total, bar)
    if total is not None and end < total:
        raise _Transient(f"connection closed after {end} of {total} bytes")
    return total


def _accepted_range(resp: http.client.HTTPResponse, url: str, part: Path, offset: int,
                    size: int | None) -> tuple[int, int | None]:
    """Check the server's answer to a request from byte ``offset``: (the byte its body starts at,
    the total size or None). ``_Transient`` when the answer cannot be used as is,
    ``CaptionsError`` when the file is the wrong size, ``OutputError`` when it does not fit."""
    if resp.status == 206:
        start, total = _content_range(resp.headers.get("Content-Range"))
        if start != offset:  # not the range we asked for: start over without Range
            part.unlink(missing_ok=True)
            raise _Transient(f"server answered the resume request with bytes from {start}, not {offset}")
    elif resp.status == 200:
        if offset:
            log.debug("%s: server ignored the Range request; comparing the %d bytes held as they come again",
                      url, offset)
        start = 0
        length = resp.headers.get("Content-Length", "")
        total = int(length) if length.strip().isdigit() else None
    else:
        raise _Transient(f"unexpected HTTP {resp.status} {resp.reason}")
    if size is not None and total is not None and total != size:
        raise CaptionsError(f"the server offers {total} bytes but the file should have {size}; "
                            "wrong file or mirror?", url)
    free = free_space(part.parent)
    if total is not None and total - offset > free:
        raise OutputError(f"No space left for the download: {total - offset} more bytes needed, {free} free",
                          part.parent)
    return start, total


def _receive(resp: http.client.HTTPResponse, part: Path, start: int, total: int | None, bar: tqdm) -> int:
    """Copy the body, which holds the file from byte ``start``, into ``part`` (never through a
    link); returns the byte the body ended at. ``_Transient`` when the connection breaks,
    ``OutputError`` naming ``part`` when it cannot be written."""
    try:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o666)
    except OSError as e:
        raise output_error(part, e) from None
    try:
        pos, held = start, os.fstat(fd).st_size
        while True:
            try:
                block = resp.read1(_CHUNK)
            except (OSError, http.client.HTTPException) as e:
                raise _Transient(_reason(e)) from None
            if not block:
                break
            bar.update(len(block))
            pos, held = _store(fd, block, pos, held, part)
        if total is not None and held > total:  # a stale tail past the end of the file
            os.ftruncate(fd, total)
        return pos
    finally:
        os.close(fd)


def _store(fd: int, block: bytes, pos: int, held: int, part: Path) -> tuple[int, int]:
    """Put ``block`` at byte ``pos`` of ``part`` (``held`` bytes long); returns the new (pos, held).
    Bytes ``part`` already holds (sent again by a server that ignored ``Range``) are compared, not
    rewritten, so such a server still makes progress; ``part`` is cut where they first differ (a
    stale part of another file)."""
    if pos < held:
        n = min(len(block), held - pos)
        if os.pread(fd, n, pos) == block[:n]:
            pos, block = pos + n, block[n:]
        else:
            os.ftruncate(fd, pos)
            held = pos
    if block:
        try:
            write_all(fd, block, pos)
            fault_point("download", "part")
        except OSError as e:
            raise output_error(part, e) from None
        pos += len(block)
        held = max(held, pos)
    return pos, held


def hash_file(path: str | os.PathLike, algo: str, progress: bool = False) -> str:
    """Hex digest of ``path`` with ``algo`` (sha256, md5, ...), with an optional progress bar."""
    h = hashlib.new(algo)
    path = Path(path)
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"verify {path.name.removesuffix('.part')}", disable=not progress,
                                     leave=False) as bar:
        while block := f.read(_CHUNK):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _problem(path: Path, digest: tuple[str, str] | None, progress: bool) -> str | None:
    """What is wrong with the archive in ``path`` (None: nothing): its checksum where one is known,
    else whether it opens and its member list reads (``check_archive``)."""
    if digest is not None:
        algo, expected = digest
        got = hash_file(path, algo, progress)
        return None if got == expected else f"checksum mismatch: {algo} is {got}, expected {expected}"
    try:
        check_archive(path)
    except CorruptArchive as e:
        return str(e).removeprefix(f"{path}: ")
    return None


def _verify(part: Path, target: Path, total: int | None, size: int | None, digest: tuple[str, str] | None,
            progress: bool) -> None:
    """Check a finished transfer before it may take its final name. Short of the known size, or
    not a whole archive when no size is known (a server that sends no length and hangs up early):
    ``_Transient``, to resume. Wrong in any other way: ``part`` is deleted and ``CaptionsError``
    raised."""
    held = _held(part)
    expected = total if total is not None else size
    if expected is not None and held < expected:
        raise _Transient(f"the transfer ended after {held} of {expected} bytes")
    for want in (total, size):
        if want is not None and held != want:
            part.unlink(missing_ok=True)
            raise CaptionsError(f"size mismatch: got {held} bytes, expected {want}; the download was "
                                "deleted, run again to fetch it afresh", target)
    problem = _problem(part, digest, progress)
    if problem is None:
        return
    if expected is None:
        raise _Transient(f"{problem}: the server sent no length, so the transfer may have ended early",
                         suspect=True)
    part.unlink(missing_ok=True)
    raise CaptionsError(f"{problem}; the corrupt download was deleted, run again to fetch it afresh", target)


def _transfer(url: str, part: Path, target: Path, size: int | None, digest: tuple[str, str] | None, *,
              tries: int, retry_delay: float, timeout: float, progress: bool) -> None:
    """Request ``url`` into ``part`` until it verifies (``_verify``). Every retry path counts
    toward ``tries`` attempts in a row that leave ``part`` no longer than before; a server that
    ignores ``Range`` and hangs up early therefore ends in ``CaptionsError`` after ``tries``
    requests (a suspect ``part`` deleted), not in a loop."""
    failures, best = 0, _held(part)
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
              disable=not progress) as bar:
        while True:
            try:
                total = _attempt(url, part, size, timeout, bar)
                _verify(part, target, total, size, digest, progress)
                return
            except _Transient as e:
                held = _held(part)
                failures = 1 if held > best else failures + 1  # an attempt that got further starts a new count
                best = max(best, held)
                if failures >= tries:
                    if e.suspect:
                        part.unlink(missing_ok=True)
                    raise CaptionsError(f"cannot download {url}: {e} (gave up after {failures} "
                                        f"{'try' if failures == 1 else 'tries'} without progress)") from None
                delay = min(retry_delay * 2 ** (failures - 1), MAX_DELAY)
                log.debug("%s: %s; retry %d/%d in %.1f s", url, e, failures, tries - 1, delay)
                bar.set_postfix_str(f"{e}; retry {failures}/{tries - 1} in {delay:.0f} s", refresh=True)
                time.sleep(delay)


def _whole_final(target: Path, size: int | None, digest: tuple[str, str] | None, progress: bool) -> bool:
    """Whether the archive already under its final name is whole (its size, checksum or member
    list). One that is not is reported in one line and deleted, to be fetched again."""
    held = target.stat().st_size
    problem = f"{held} bytes, expected {size}" if size is not None and held != size else \
        _problem(target, digest, progress)
    if problem is None:
        return True
    log.warning("%s: %s; fetching it again", target, problem)
    target.unlink()
    return False


def fetch(url: str, target: str | os.PathLike, checksum: str | None = None, size: int | None = None, *,
          tries: int = 6, retry_delay: float = 1.0, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download ``url`` to ``target`` via ``target.part``, resuming, retrying and verifying.

    An existing ``target`` is verified (size, checksum or member list) and kept when whole, else
    reported and fetched again. Connection errors, timeouts, early disconnects and 5xx answers are
    retried up to ``tries`` attempts in a row that bring no new data, waiting ``retry_delay``
    seconds, doubled each time (at most 60 s). The download must match the announced size,
    ``size`` and ``checksum`` where given, and otherwise be a whole zip or tar archive
    (``check_archive``) before it is flushed to the disk and renamed to ``target``; a bad one is
    deleted and ``CaptionsError`` raised. ``OutputError`` names the path when the disk is full
    or read-only.
    """
    target = Path(target)
    digest = parse_checksum(checksum) if checksum else None
    if target.exists() and _whole_final(target, size, digest, progress):
        return target
    part = target.with_name(target.name + ".part")
    with writing(target.parent):
        target.parent.mkdir(parents=True, exist_ok=True)
    _transfer(url, part, target, size, digest, tries=tries, retry_delay=retry_delay, timeout=timeout,
              progress=progress)
    with writing(target):
        fd = os.open(part, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fault_point("download", "archive-tmp")
        os.replace(part, target)
    fault_point("download", "archive")
    return target


# ------------------------------------------------------------------------------------------ a dataset
@dataclass
class DownloadReport:
    """What ``download_dataset`` did: archives fetched+extracted now, ones already done before."""

    dest: Path
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def already_complete(self) -> bool:
        """True when the run found every archive done and did nothing."""
        return not self.done


def marker_path(dest: str | os.PathLike, archive: Archive) -> Path:
    """Where the completion marker of ``archive`` lives under ``dest``."""
    return Path(dest) / STATE_DIR / f"{archive.filename}.done"


def is_done(dest: str | os.PathLike, archive: Archive) -> bool:
    """True when ``archive`` was downloaded, verified and extracted into ``dest`` by an earlier run."""
    try:
        info = json.loads(marker_path(dest, archive).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("file") == archive.filename


def download_dataset(archives: Iterable[Archive | Sequence[Any]], dest: str | os.PathLike, *,
                     keep_archives: bool = True, progress: bool = True, tries: int = 6,
                     retry_delay: float = 1.0, timeout: float = 30.0) -> DownloadReport:
    """Fetch, verify and extract each archive into ``dest``; skip those a marker says are done.

    ``archives`` are ``Archive`` objects or ``(url, filename, checksum[, size[, extract_to]])``
    tuples. Archives are stored in ``dest/archives`` (deleted after extraction unless
    ``keep_archives``); markers in ``dest/.captions-download``. The run holds ``dest/.download.lock``
    throughout: a second download into ``dest`` is refused (``CaptionsError`` naming the lock and
    its holder). An archive found corrupt while it is extracted (a member's CRC) is deleted and
    fetched once more. ``OutputError`` names the path when ``dest`` is full or read-only.
    """
    dest = Path(dest)
    items = [as_archive(a) for a in archives]
    if not items:
        raise CaptionsError("nothing to download")
    net = {"tries": tries, "retry_delay": retry_delay, "timeout": timeout, "progress": progress}
    with folder_lock(dest, "download", "--dest"):
        _refuse_links(dest, items)
        remove_stale_temporaries(dest / STATE_DIR)  # a marker a killed run was writing (we hold the lock)
        report = DownloadReport(dest)
        for a in items:
            if is_done(dest, a):
                report.skipped.append(a.filename)
                continue
            path = _fetch_and_extract(a, dest, net)
            _mark_done(dest, a, path.stat().st_size)
            if not keep_archives:
                path.unlink()
            report.done.append(a.filename)
        if not keep_archives and (dest / ARCHIVE_DIR).is_dir() and not any((dest / ARCHIVE_DIR).iterdir()):
            (dest / ARCHIVE_DIR).rmdir()
    return report


#: Names in DEST that only ``download`` itself writes: an archive extracted into DEST may not hold
#: them (a member could otherwise replace the lock, forge a marker or plant an archive).
CONTROL_NAMES = (ARCHIVE_DIR, STATE_DIR, ".download.lock", ".download.lock.pid")


def _refuse_links(dest: Path, items: list[Archive]) -> None:
    """Refuse (``CaptionsError``) a link where ``download`` writes in DEST: its archives and
    markers folders and each extraction folder. DEST itself may be the user's own link."""
    for name in {ARCHIVE_DIR, STATE_DIR, *(a.extract_to for a in items if a.extract_to not in ("", "."))}:
        if (dest / name).is_symlink():
            raise CaptionsError("is a link; download never writes through links (remove it or choose another "
                                "--dest)", dest / name)


def _reserved(a: Archive) -> tuple[str, ...]:
    """The member names ``a`` may not hold: DEST's control names when it extracts into DEST."""
    return CONTROL_NAMES if Path(a.extract_to) == Path(".") else ()


def _fetch_and_extract(a: Archive, dest: Path, net: dict[str, Any]) -> Path:
    """Fetch ``a`` into ``dest/archives`` and extract it; returns the archive's path. An archive
    that extraction finds corrupt is deleted and fetched once more."""
    path = dest / ARCHIVE_DIR / a.filename
    try:
        _fetch_extract_once(a, path, dest, net)
    except CorruptArchive as e:
        path.unlink(missing_ok=True)
        log.warning("%s; deleted it, fetching it again", e)
        try:
            _fetch_extract_once(a, path, dest, net)
        except CorruptArchive as again:
            path.unlink(missing_ok=True)
            raise CaptionsError(f"{again}; corrupt again when fetched a second time, deleted") from None
    return path


def _fetch_extract_once(a: Archive, path: Path, dest: Path, net: dict[str, Any]) -> None:
    log.debug("%s: fetching %s", path, a.url)
    fetch(a.url, path, a.checksum, a.size, **net)
    need, free = archive_size(path), free_space(dest)
    if need > free:
        log.warning("%s: extracting needs up to %d bytes but only %d are free", path, need, free)
    extract_archive(path, dest / a.extract_to, progress=net["progress"], reserved=_reserved(a))


def _mark_done(dest: Path, a: Archive, size: int) -> None:
    """Write the completion marker of ``a``, after everything extracted is on the disk: it is what a
    re-run trusts."""
    with writing(dest):
        sync_filesystem(dest)
    marker = {"file": a.filename, "url": a.url, "size": size,
              "checksum": a.checksum or "none published; size verified against Content-Length",
              "extracted_to": a.extract_to}
    write_bytes_atomic(marker_path(dest, a), (json.dumps(marker, indent=2) + "\n").encode(),
                       fault=("download", "marker"))
