"""Writing the HDF5 feature cache (the format is in ``captions.features.cache``, beside its reader).

A run writes ``<out>.partial.h5`` (one ``<out>.partial-<rank>of<world>.h5`` per rank under
torchrun, merged by rank 0), chunk by chunk with a flag per chunk, so that an interrupted run
resumes where it stopped; ``complete_cache`` marks the file complete and moves it to ``<out>``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from captions.errors import CaptionsError
from captions.features.cache import FORMAT_NAME, FORMAT_VERSION, read_attrs
from captions.features.spec import FeatureSpec

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


def _create_file(path: Path, attrs: dict[str, Any], names: list[str]):
    """A new partial file for ``names`` (one row each) with empty datasets shaped by ``attrs``."""
    import h5py

    f = h5py.File(path, "w")
    n, chunk_rows, dtype = len(names), attrs["chunk_rows"], attrs["dtype"]
    positions, channels = int(np.prod(attrs["spatial_shape"])), attrs["channels"]
    comp = None if attrs["compression"] == "none" else attrs["compression"]
    rows = min(chunk_rows, max(n, 1))
    f.create_dataset("spatial", (n, positions, channels), dtype=dtype, chunks=(rows, positions, channels),
                     compression=comp)
    f.create_dataset("pooled", (n, channels), dtype=dtype, chunks=(rows, channels), compression=comp)
    f.create_dataset("image_ids", data=np.arange(n, dtype=np.int64))
    f.create_dataset("names", data=names, dtype=h5py.string_dtype("utf-8"))
    f.create_dataset("valid", data=np.zeros(n, dtype=bool))
    f.create_dataset("chunks_done", data=np.zeros(-(-n // chunk_rows), dtype=bool))
    for k, v in attrs.items():
        f.attrs[k] = v
    f.attrs["skipped"] = "[]"
    f.attrs["complete"] = False
    f.flush()
    return f


def open_shard(path: Path, attrs: dict[str, Any], names: list[str]):
    """The h5py file (mode r+) to write rows of ``names`` into: ``path`` resumed when it holds a
    partial extraction with the same ``RESUME_KEYS`` and row count, otherwise a new file
    (replacing one that is unreadable or of another run)."""
    import h5py

    if path.exists():
        try:
            f = h5py.File(path, "r+")
            old = read_attrs(f)
            if all(old.get(k) == attrs.get(k) for k in RESUME_KEYS) and f["spatial"].shape[0] == len(names):
                done = int(f["chunks_done"][:].sum())
                log.info("resuming %s: %d of %d chunks already done", path.name, done, len(f["chunks_done"]))
                return f
            f.close()
            log.warning("%s is a partial extraction with other settings; starting it again", path)
        except OSError as e:
            log.warning("%s is unreadable (%s), probably cut off mid-write; starting it again", path, e)
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
        f = self.f
        if spatial is not None:
            # rows are ascending; write contiguous runs as slices (much faster than fancy indexing)
            breaks = np.nonzero(np.diff(rows) != 1)[0] + 1
            for run, sp, po in zip(np.split(rows, breaks), np.split(spatial, breaks), np.split(pooled, breaks),
                                   strict=True):
                a, b = int(run[0]), int(run[-1]) + 1
                f["spatial"][a:b] = sp
                f["pooled"][a:b] = po
                f["valid"][a:b] = True
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
            f.attrs["skipped"] = json.dumps(self.skipped, ensure_ascii=False)
            f.flush()  # data first, then the flags that vouch for it
            for c in finished:
                f["chunks_done"][c] = True
            f.flush()
            log.debug("chunks %s written", ", ".join(map(str, finished)))

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
    """Copy each rank's chunks (chunk c belongs to rank c % world) into one file (rank 0 only)."""
    import h5py

    skipped: list = []
    with h5py.File(shards[0], "r+") as dst:
        for rank, shard in enumerate(shards[1:], start=1):
            with h5py.File(shard, "r") as src:
                skipped += json.loads(src.attrs["skipped"])
                for c in range(rank, len(dst["chunks_done"]), world):
                    a, b = c * chunk_rows, min((c + 1) * chunk_rows, dst["spatial"].shape[0])
                    for name in ("spatial", "pooled", "valid"):
                        dst[name][a:b] = src[name][a:b]
                    dst["chunks_done"][c] = src["chunks_done"][c]
        dst.attrs["skipped"] = json.dumps(json.loads(dst.attrs["skipped"]) + skipped, ensure_ascii=False)
    os.replace(shards[0], out_partial)
    for s in shards[1:]:
        s.unlink()


def complete_cache(partial: Path, out: Path) -> list[dict[str, str]]:
    """Mark ``partial`` complete and move it to ``out``; returns its skipped images.

    Raises ``CaptionsError`` when a chunk is not done (``out`` is then left as it was).
    """
    import h5py

    with h5py.File(partial, "r+") as f:
        if not f["chunks_done"][:].all():
            raise CaptionsError("extraction finished with chunks missing; re-run to complete it", partial)
        skipped = json.loads(f.attrs["skipped"])
        f.attrs["complete"] = True  # last: vouches for everything above
    os.replace(partial, out)
    return skipped
