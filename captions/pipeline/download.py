"""``captions download``: fetch the COCO / Flickr8k archives so that ``captions prepare`` runs on them.

Each archive is streamed to ``DEST/archives/NAME.part``. An interrupted download resumes with
an HTTP ``Range`` request (and restarts cleanly when the server ignores it); connection errors
and 5xx answers are retried with exponential backoff. The finished file is checked against the
size the server announced, the size in ``CHECKSUMS`` and, where one is known, its checksum; only
then is it renamed to ``NAME``. It is then extracted safely (``captions.pipeline.archive``) and a
marker ``DEST/.captions-download/NAME.done`` records the completed step, so a re-run skips it.
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
from captions.errors import CaptionsError
from captions.fsutil import write_json_atomic
from captions.pipeline.archive import archive_size, extract_archive, free_space

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
    """A failure worth retrying; ``received`` is how many bytes the attempt still got."""

    def __init__(self, reason: str, received: int = 0) -> None:
        super().__init__(reason)
        self.received = received


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


def _attempt(url: str, part: Path, size: int | None, timeout: float, bar: tqdm) -> int | None:
    """One request: append to (or restart) ``part``. Returns the total size when known.

    Raises ``_Transient`` for retryable failures (including a connection closed early) and
    ``CaptionsError`` for permanent ones.
    """
    offset = part.stat().st_size if part.exists() else 0
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
                return _attempt(url, part, size, timeout, bar)
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
        offset, total, mode = _accepted_range(resp, url, part, offset, size)
        bar.reset(total=total)
        bar.update(offset)
        received = _receive(resp, part, mode, bar)
    got = offset + received
    if total is not None and got < total:
        raise _Transient(f"connection closed after {got} of {total} bytes", received)
    return total


def _accepted_range(resp: http.client.HTTPResponse, url: str, part: Path, offset: int,
                    size: int | None) -> tuple[int, int | None, str]:
    """Check the server's answer to a request from byte ``offset``: (offset the body starts at,
    total size or None, file mode for ``part``). ``_Transient`` when the answer cannot be used as
    is, ``CaptionsError`` when the file is the wrong size or does not fit on the disk."""
    if resp.status == 206:
        start, total = _content_range(resp.headers.get("Content-Range"))
        if start != offset:  # not the range we asked for: start over without Range
            part.unlink(missing_ok=True)
            raise _Transient(f"server answered the resume request with bytes from {start}, not {offset}")
        mode = "ab"
    elif resp.status == 200:
        if offset:
            log.debug("%s: server ignored the Range request; restarting from byte 0", url)
        offset, mode = 0, "wb"  # "wb" truncates the stale part
        length = resp.headers.get("Content-Length", "")
        total = int(length) if length.strip().isdigit() else None
    else:
        raise _Transient(f"unexpected HTTP {resp.status} {resp.reason}")
    if size is not None and total is not None and total != size:
        raise CaptionsError(f"the server offers {total} bytes but the file should have {size}; "
                            "wrong file or mirror?", url)
    free = free_space(part.parent)
    if total is not None and total - offset > free:
        raise CaptionsError(f"not enough free disk space: {total - offset} more bytes needed, {free} free",
                            part.parent)
    return offset, total, mode


def _receive(resp: http.client.HTTPResponse, part: Path, mode: str, bar: tqdm) -> int:
    """Copy the body into ``part`` (opened with ``mode``); return the bytes received.
    ``_Transient`` (carrying the bytes received) when the connection breaks."""
    received = 0
    with open(part, mode) as f:
        try:
            while block := resp.read1(_CHUNK):
                f.write(block)
                received += len(block)
                bar.update(len(block))
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(_reason(e), received) from None
    return received


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


def fetch(url: str, target: str | os.PathLike, checksum: str | None = None, size: int | None = None, *,
          tries: int = 6, retry_delay: float = 1.0, timeout: float = 30.0, progress: bool = True) -> Path:
    """Download ``url`` to ``target`` via ``target.part``, resuming, retrying and verifying.

    An existing ``target`` is returned as is (only verified files get that name). Connection
    errors, timeouts, early disconnects and 5xx answers are retried up to ``tries`` attempts in a
    row that bring no data, waiting ``retry_delay`` seconds, doubled each time (at most 60 s).
    The result must match the announced size, ``size`` and ``checksum`` where given; otherwise
    the download is deleted and ``CaptionsError`` raised.
    """
    target = Path(target)
    if target.is_file():
        return target
    algo_digest = parse_checksum(checksum) if checksum else None
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    failures, total = 0, None
    with tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name,
              disable=not progress) as bar:
        while True:
            try:
                total = _attempt(url, part, size, timeout, bar)
                break
            except _Transient as e:
                failures = 1 if e.received else failures + 1  # an attempt that got data starts a new count
                if failures >= tries:
                    raise CaptionsError(f"cannot download {url}: {e} (gave up after {failures} "
                                        f"{'try' if failures == 1 else 'tries'})") from None
                delay = min(retry_delay * 2 ** (failures - 1), MAX_DELAY)
                log.debug("%s: %s; retry %d/%d in %.1f s", url, e, failures, tries - 1, delay)
                bar.set_postfix_str(f"{e}; retry {failures}/{tries - 1} in {delay:.0f} s", refresh=True)
                time.sleep(delay)
        bar.set_postfix_str("")

    actual = part.stat().st_size if part.exists() else 0
    for expected in (total, size):
        if expected is not None and actual != expected:
            part.unlink(missing_ok=True)
            raise CaptionsError(f"size mismatch: got {actual} bytes, expected {expected}; the download was "
                                "deleted, run again to fetch it afresh", target)
    if algo_digest is not None:
        algo, digest = algo_digest
        got = hash_file(part, algo, progress)
        if got != digest:
            part.unlink()
            raise CaptionsError(f"checksum mismatch: {algo} is {got}, expected {digest}; the corrupt download "
                                "was deleted, run again to fetch it afresh", target)
    else:
        log.debug("%s: no published checksum; size verified against Content-Length", target)
    os.replace(part, target)
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
    ``keep_archives``); markers in ``dest/.captions-download``.
    """
    dest = Path(dest)
    items = [as_archive(a) for a in archives]
    if not items:
        raise CaptionsError("nothing to download")
    report = DownloadReport(dest)
    for a in items:
        if is_done(dest, a):
            report.skipped.append(a.filename)
            continue
        path = dest / ARCHIVE_DIR / a.filename
        log.debug("%s: fetching %s", path, a.url)
        fetch(a.url, path, a.checksum, a.size, tries=tries, retry_delay=retry_delay, timeout=timeout,
              progress=progress)
        need, free = archive_size(path), free_space(dest)
        if need > free:
            log.warning("%s: extracting needs up to %d bytes but only %d are free", path, need, free)
        try:
            extract_archive(path, dest / a.extract_to, progress=progress)
        except OSError as e:
            raise CaptionsError(f"extraction failed: {_reason(e)}", path) from None
        write_json_atomic(marker_path(dest, a), {
            "file": a.filename, "url": a.url, "size": path.stat().st_size,
            "checksum": a.checksum or "none published; size verified against Content-Length",
            "extracted_to": a.extract_to,
        })
        if not keep_archives:
            path.unlink()
        report.done.append(a.filename)
    if not keep_archives and (dest / ARCHIVE_DIR).is_dir() and not any((dest / ARCHIVE_DIR).iterdir()):
        (dest / ARCHIVE_DIR).rmdir()
    return report
