"""Writing the HDF5 feature cache (the format is in ``captions.features.cache``, beside its reader).

A run writes ``<out>.partial.h5`` (one ``<out>.partial-<rank>of<world>.h5`` per rank under
torchrun, merged by rank 0), chunk by chunk with a flag per chunk, so that an interrupted run
resumes where it stopped; ``complete_cache`` marks the file complete and moves it to ``<out>``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from captions.errors import CaptionsError, output_error
from captions.features.cache import FORMAT_NAME, FORMAT_VERSION, read_attrs
from captions.features.spec import FeatureSpec
from captions.fsutil import fault_point

log = logging.getLogger("captions")

# Attributes that must match for a partial file to be resumed (chunk_rows: its chunk flags
# would mean other rows).
RESUME_KEYS = (*FeatureSpec.EXTRACTION_KEYS, "chunk_rows")


def shard_path(out: Path, rank: int, world: int) -> Path:
    """The partial file rank ``rank`` of ``world`` writes before ``out`` is complete."""
    suffix = ".partial.h5" if world == 1 else f".partial-{rank}of{world}.h5"
    return out.with_name(out.name + suffix)


def cache_attrs(spec: FeatureSpec, *, stride: int, manifest_sha256: str, chunk_rows: int,
                compression: str) -> dict[str, Any]:
    """The file attributes of a new cache: the spec's (``FeatureSpec.to_attrs``) and the file's own."""
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, **spec.to_attrs(), "stride": stride,
        "manifest_sha256": manifest_sha256, "chunk_rows": chunk_rows, "compression": compression,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


# what an error for a failed write of a partial file adds to the system's reason
_KEPT = "the chunks finished before it are kept: make room (or fix the folder) and re-run to resume"
LOCK_WAIT_S = 20.0  # how long a partial file held open by another process (an ended run's worker) is waited for


def _write_failure(e: BaseException) -> bool:
    """Whether ``e`` (raised by h5py) is the system refusing a write: a full disk, a read-only
    folder, an I/O error (h5py raises OSError, or RuntimeError quoting the errno)."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and re.search(r"errno = \d+", str(e)) is not None)


def _detach(f) -> None:
    """Point the descriptor of HDF5 file ``f`` at scratch memory, so that closing it writes nothing
    more to disk: after a failed write h5py crashes (a segmentation fault) when it closes the file
    normally, and what HDF5 still holds is not worth writing. The file on disk stays as last flushed."""
    import tempfile

    fd = f.id.get_vfd_handle()  # the sec2 driver's descriptor
    if hasattr(os, "memfd_create"):
        scratch = os.memfd_create("captions-detached-h5")
        os.dup2(scratch, fd)
        os.close(scratch)
    else:  # pragma: no cover - not Linux
        with tempfile.TemporaryFile() as t:
            os.dup2(t.fileno(), fd)


def release(f, failed: BaseException | None = None) -> BaseException | None:
    """Close HDF5 file ``f`` opened for writing; returns the write failure of its last flush (or
    ``failed``, one already seen), None when all it held reached the disk. After a failure the
    file is detached (``_detach``) before it is closed."""
    if failed is None:
        try:
            f.flush()
        except Exception as e:  # h5py: OSError or RuntimeError; raised as OutputError by the caller
            failed = e
    if failed is not None:
        _detach(f)
        try:
            f.close()
        except Exception:  # HDF5 may report the earlier failure again; detached, nothing reaches the disk
            pass
        return failed
    f.close()
    return None


@contextmanager
def writing(f, path: Path) -> Iterator[Any]:
    """Yield HDF5 file ``f`` (open for writing ``path``) and release it when the block ends. A
    failed write, in the block or at the final flush, becomes one ``OutputError`` naming ``path``
    and the system's reason (nothing more is written; finished chunks stay)."""
    try:
        yield f
    except BaseException as e:
        failure = e if _write_failure(e) else None
        late = release(f, failure)
        if late is not None:
            raise output_error(path, late, _KEPT) from None
        raise
    late = release(f)
    if late is not None:
        raise output_error(path, late, _KEPT)


def _datasets(f, attrs: dict[str, Any], n: int) -> None:
    """The empty /spatial and /pooled datasets of a new file. Uncompressed ones get all their
    chunks allocated now, never filled: later writes only fill them in place, so the file's
    metadata is final from here on and a write that fails later (a full disk) cannot damage the
    chunk index of rows already flagged done."""
    import h5py

    chunk_rows, dtype = attrs["chunk_rows"], attrs["dtype"]
    positions, channels = int(np.prod(attrs["spatial_shape"])), attrs["channels"]
    comp = None if attrs["compression"] == "none" else attrs["compression"]
    rows = min(chunk_rows, max(n, 1))
    for name, shape, chunks in (("spatial", (n, positions, channels), (rows, positions, channels)),
                                ("pooled", (n, channels), (rows, channels))):
        dcpl = None
        if comp is None:
            dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        f.create_dataset(name, shape, dtype=dtype, chunks=chunks, compression=comp, dcpl=dcpl,
                         fill_time="never" if comp is None else None)


def _create_file(path: Path, attrs: dict[str, Any], names: list[str]):
    """A new partial file for ``names`` (one row each) with empty datasets shaped by ``attrs``.
    Raises ``OutputError`` (and leaves no file) when it cannot be written."""
    import h5py

    try:
        f = h5py.File(path, "w")
    except OSError as e:
        raise output_error(path, e) from None
    n = len(names)
    try:
        _datasets(f, attrs, n)
        f.create_dataset("image_ids", data=np.arange(n, dtype=np.int64))
        f.create_dataset("names", data=names, dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("valid", data=np.zeros(n, dtype=bool))
        f.create_dataset("chunks_done", data=np.zeros(-(-n // attrs["chunk_rows"]), dtype=bool))
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs["skipped"] = "[]"
        f.attrs["complete"] = False
        f.flush()
    except Exception as e:
        if not _write_failure(e):
            raise
        release(f, e)
        path.unlink(missing_ok=True)
        raise output_error(path, e) from None
    fault_point("extract", "created")
    return f


def _open_existing(path: Path):
    """``path`` opened r+, waiting up to ``LOCK_WAIT_S`` while another process holds it open (a
    killed run's DataLoader worker lives on for a few seconds); None when it is not a readable
    HDF5 file. Raises ``CaptionsError`` when it stays locked or cannot be opened for another
    reason (permissions, a read-only folder)."""
    import h5py

    deadline = time.monotonic() + LOCK_WAIT_S
    said = False
    while True:
        try:
            return h5py.File(path, "r+")
        except OSError as e:
            locked = isinstance(e, BlockingIOError) or "unable to lock file" in str(e)
            if locked and time.monotonic() < deadline:
                if not said:
                    log.info("%s is open in another process (an interrupted run's worker?); waiting for it", path)
                    said = True
                time.sleep(0.2)
                continue
            if locked:
                raise CaptionsError(f"is open in another process (HDF5 file lock) after {LOCK_WAIT_S:.0f} s; "
                                    f"its finished chunks are kept: end that process and re-run", path) from None
            if getattr(e, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise output_error(path, e, "its finished chunks are kept") from None
            log.warning("%s is unreadable (%s), probably cut off mid-write; starting it again", path, e)
            return None


def open_shard(path: Path, attrs: dict[str, Any], names: list[str]):
    """The h5py file (mode r+) to write rows of ``names`` into: ``path`` resumed when it holds a
    partial extraction with the same ``RESUME_KEYS`` and row count, otherwise a new file
    (replacing one that is not an HDF5 file or is of other settings). A file another process
    holds open is waited for, never taken for a damaged one (``_open_existing``)."""
    if path.exists():
        f = _open_existing(path)
        if f is not None:
            old = read_attrs(f)
            if all(old.get(k) == attrs.get(k) for k in RESUME_KEYS) and f["spatial"].shape[0] == len(names):
                done = int(f["chunks_done"][:].sum())
                log.info("resuming %s: %d of %d chunks already done", path.name, done, len(f["chunks_done"]))
                return f
            f.close()
            log.warning("%s is a partial extraction with other settings; starting it again", path)
        path.unlink()
    return _create_file(path, attrs, names)


class ChunkWriter(threading.Thread):
    """Writes feature batches to HDF5 in the background so disk I/O overlaps the forward pass.

    A chunk's flag in /chunks_done is set only after all its rows are written and flushed.
    ``put((rows (n,) int64 ascending, spatial (n, P, C) | None, pooled (n, C) | None,
    [(row, name, reason)] failures))``; ``pending_per_chunk``: chunk -> rows this run will put.
    ``put`` and ``close`` re-raise an error of the writing thread.
    """

    def __init__(self, f, chunk_rows: int, pending_per_chunk: dict[int, int]) -> None:
        super().__init__(daemon=True)
        self.f, self.chunk_rows, self.left = f, chunk_rows, dict(pending_per_chunk)
        # held open for the whole run: a dataset object dropped after each write would flush its
        # chunk cache when collected, where h5py only prints a failed write (a full disk) and goes on
        self.sets = {name: f[name] for name in ("spatial", "pooled", "valid", "chunks_done")}
        self.q: queue.Queue = queue.Queue(maxsize=4)
        self.skipped = json.loads(f.attrs["skipped"])
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while (item := self.q.get()) is not None:
                self._write(*item)
        except BaseException as e:  # surfaced in the main thread by close()
            self.error = e
            while self.q.get() is not None:  # drain so the producer never blocks forever
                pass

    def _write(self, rows: np.ndarray, spatial: np.ndarray | None, pooled: np.ndarray | None,
               failed: list[tuple[int, str, str]]) -> None:
        f, sets = self.f, self.sets
        if spatial is not None:
            # rows are ascending; write contiguous runs as slices (much faster than fancy indexing)
            breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
            for run, sp, po in zip(np.split(rows, breaks), np.split(spatial, breaks), np.split(pooled, breaks),
                                   strict=True):
                a, b = int(run[0]), int(run[-1]) + 1
                sets["spatial"][a:b] = sp
                sets["pooled"][a:b] = po
                sets["valid"][a:b] = True
        for _, name, why in failed:
            self.skipped.append({"image": name, "reason": why})
        touched = [int(r) for r in rows] + [r for r, _, _ in failed]
        finished = []
        for r in touched:
            c = r // self.chunk_rows
            self.left[c] -= 1
            if self.left[c] == 0:
                finished.append(c)
        if finished:
            if failed:  # rewritten only when it changed: each rewrite takes new room in the file
                f.attrs["skipped"] = json.dumps(self.skipped, ensure_ascii=False)
            f.flush()  # data first, then the flags that vouch for it
            fault_point("extract", "data")
            for c in finished:
                sets["chunks_done"][c] = True
            f.flush()
            fault_point("extract", "chunk")
            log.debug("chunks %s written", ", ".join(map(str, finished)))

    def descriptors(self) -> tuple[int, ...]:
        """The OS descriptors of the file, for forked processes to close (``forget_descriptors``)."""
        try:
            return (int(self.f.id.get_vfd_handle()),)
        except Exception:  # another HDF5 driver: nothing to close
            return ()

    def put(self, item) -> None:
        if self.error is not None:
            raise self.error
        self.q.put(item)

    def close(self) -> None:
        self.q.put(None)
        self.join()
        if self.error is not None:
            raise self.error


def merge_shards(out_partial: Path, shards: list[Path], world: int, chunk_rows: int) -> None:
    """Copy each rank's chunks (chunk c belongs to rank c % world) into one file (rank 0 only).
    Raises ``OutputError`` when the merged file cannot be written."""
    import h5py

    skipped: list = []
    with writing(h5py.File(shards[0], "r+"), shards[0]) as dst:
        sets = {name: dst[name] for name in ("spatial", "pooled", "valid", "chunks_done")}
        for rank, shard in enumerate(shards[1:], start=1):
            with h5py.File(shard, "r") as src:
                skipped += json.loads(src.attrs["skipped"])
                mine = range(rank, len(sets["chunks_done"]), world)
                for c in mine:
                    a, b = c * chunk_rows, min((c + 1) * chunk_rows, sets["spatial"].shape[0])
                    for name in ("spatial", "pooled", "valid"):
                        sets[name][a:b] = src[name][a:b]
                dst.flush()  # the rows before the flags that vouch for them
                for c in mine:
                    sets["chunks_done"][c] = src["chunks_done"][c]
        dst.attrs["skipped"] = json.dumps(json.loads(dst.attrs["skipped"]) + skipped, ensure_ascii=False)
    os.replace(shards[0], out_partial)
    for s in shards[1:]:
        s.unlink()


def complete_cache(partial: Path, out: Path) -> list[dict[str, str]]:
    """Mark ``partial`` complete, sync it to disk and move it to ``out``; returns its skipped images.

    Raises ``CaptionsError`` when a chunk is not done, ``OutputError`` when it cannot be written
    (``out`` is then left as it was).
    """
    import h5py

    with writing(h5py.File(partial, "r+"), partial) as f:
        done = f["chunks_done"][:]
        if not done.all():
            raise CaptionsError(f"extraction finished with {int((~done).sum())} of {len(done)} chunks missing; "
                                f"re-run to complete it", partial)
        skipped = json.loads(f.attrs["skipped"])
        f.attrs["complete"] = True  # last: vouches for everything above
    try:
        fd = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(fd)  # on disk before its final name says it is whole
        finally:
            os.close(fd)
    except OSError as e:
        raise output_error(partial, e, _KEPT) from None
    fault_point("extract", "complete")
    os.replace(partial, out)
    fault_point("extract", "renamed")
    return skipped
