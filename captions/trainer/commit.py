"""An epoch's outputs as one commit, and the repair of a run directory that a killed run left.

The end of an epoch writes, in this order: its row of ``metrics.jsonl`` (appended), ``best.pt``
and ``scst_start.pt`` when the epoch is theirs (staged in ``.epoch-<N>/``), then ``last.pt``, the
commit point, which records how long ``metrics.jsonl`` then is; then the staged files are moved
into place. ``repair`` (before a run starts or resumes) brings the directory back to its last
commit: it finishes the moves of the epoch ``last.pt`` committed and drops what an uncommitted
epoch wrote (staged files, rows past the recorded length, temporary files of a killed save), so
the resumed run redoes that epoch exactly as an uninterrupted run does it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from captions.errors import output_error
from captions.fsutil import fault_point, remove_stale_temporaries

log = logging.getLogger("captions")

METRICS = "metrics.jsonl"
# what a failed write in a run adds to the system's reason
RESUME_HINT = "the unfinished epoch is redone on resume: make room (or fix the folder) and continue with --resume"


def staging_dir(out: Path, epoch: int) -> Path:
    """Where the files of the commit that ends with ``last.pt`` at ``epoch`` (the next epoch's
    0-based index, as ``last.pt`` records it) wait for it."""
    return out / f".epoch-{epoch}"


def append_row(out: Path, row: dict[str, Any]) -> int:
    """Append ``row`` to ``out/metrics.jsonl`` as one JSON line; returns the file's new length in
    bytes. Raises ``OutputError`` naming the file when it cannot be written."""
    path = out / METRICS
    try:
        with open(path, "ab") as f:
            f.write((json.dumps(row) + "\n").encode("utf-8"))
            return f.tell()
    except OSError as e:
        raise output_error(path, e) from None


def apply_staged(out: Path, staged: Path) -> None:
    """Move the files of committed ``staged`` into ``out`` (best.pt before scst_start.pt), then
    remove it. Renames only: nothing to fail for want of room."""
    if not staged.is_dir():
        return
    for p in sorted(staged.iterdir()):
        if not p.name.startswith("."):  # a temporary file of a save that was killed
            os.replace(p, out / p.name)
            fault_point("train", "applied")
    shutil.rmtree(staged, ignore_errors=True)


def repair(out: Path, ckpt: dict[str, Any] | None) -> None:
    """Bring run directory ``out`` back to the commit of ``ckpt`` (its ``last.pt``; None: no
    commit yet, a new run): finish moving the files staged by that commit, drop those staged by
    a later epoch, the rows of ``metrics.jsonl`` that epoch appended, and temporary files of
    killed saves. Each change is logged."""
    if not out.is_dir():
        return
    committed = None if ckpt is None else int(ckpt["epoch"])
    for d in sorted(out.glob(".epoch-*")):
        if committed is not None and d == staging_dir(out, committed):
            log.info("finishing the commit of %s that an interrupted run left half done", out / "last.pt")
            apply_staged(out, d)
        else:
            log.info("dropping %s: files of an epoch that was never committed", d)
            shutil.rmtree(d, ignore_errors=True)
    remove_stale_temporaries(out)  # the lock is ours: no other process writes here
    _truncate_metrics(out / METRICS, ckpt)


def _committed_length(path: Path, ckpt: dict[str, Any] | None) -> int:
    """The length of ``metrics.jsonl`` at the commit of ``ckpt``: recorded in it, or, for a
    checkpoint from before that, the whole lines of epochs up to its own."""
    if ckpt is None:
        return 0
    if ckpt.get("metrics_bytes") is not None:
        return int(ckpt["metrics_bytes"])
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                whole = line.endswith(b"\n") and int(json.loads(line)["epoch"]) <= int(ckpt["epoch"])
            except (ValueError, KeyError, TypeError):
                whole = False
            if not whole:
                break
            keep += len(line)
    return keep


def _truncate_metrics(path: Path, ckpt: dict[str, Any] | None) -> None:
    """Cut ``metrics.jsonl`` back to its committed length (``_committed_length``)."""
    if not path.exists():
        return
    keep, size = _committed_length(path, ckpt), path.stat().st_size
    if size > keep:
        log.info("%s: dropping the %d byte(s) an uncommitted epoch appended", path, size - keep)
        os.truncate(path, keep)
    elif size < keep:
        log.warning("%s is shorter than %s recorded (edited?); left as it is", path, "last.pt")
