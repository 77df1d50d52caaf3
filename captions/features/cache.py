"""The HDF5 feature cache: its format, and ``FeatureCache`` to read it (also from DataLoader workers).

Format (version 1), readable with h5py alone::

    /spatial      (N, P, C) float16|float32   P = h*w positions, row-major over (h, w); chunked along N
    /pooled       (N, C)    same dtype        mean of spatial over positions
    /image_ids    (N,)      int64             prepared-dataset image id of each row (row i == id i)
    /names        (N,)      utf-8 str         image name of each row
    /valid        (N,)      bool              False for images that could not be read (rows are zeros)
    /chunks_done  (K,)      bool              extraction progress, one flag per chunk of rows
    attrs: format, format_version, backbone, weights, image_size, spatial_shape (h, w), channels,
           preprocessing (JSON), dtype, precision, token_layout ("grid"; absent in older files),
           dataset_hash, stride, manifest_sha256, chunk_rows, compression,
           skipped (JSON list of {image, reason}), created, complete (written last)

The attributes that describe the features themselves are a ``FeatureSpec`` (``FeatureCache.spec``);
``captions.features.writer`` writes the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from captions.errors import CaptionsError
from captions.features.spec import FeatureSpec

FORMAT_NAME = "captions-features"
FORMAT_VERSION = 1


def read_attrs(f) -> dict[str, Any]:
    """The file's attributes as plain Python values (JSON attributes decoded)."""
    out: dict[str, Any] = {}
    for k, v in f.attrs.items():
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, np.ndarray):
            v = v.tolist()
        if k in ("preprocessing", "skipped") and isinstance(v, str):
            v = json.loads(v)
        out[k] = v
    return out


def unfinished_chunks(f) -> int:
    """How many of the file's /chunks_done flags are False (0 for a file without them): a file
    whose ``complete`` attribute is set while some are False holds rows that were never written."""
    return int((~f["chunks_done"][:].astype(bool)).sum()) if "chunks_done" in f else 0


def structure_problem(f) -> str | None:
    """What is wrong with the arrays of a cache file ``f`` (an open ``h5py.File``), or None: every
    dataset present, one row per image in each, ``spatial`` (N, P, C) and ``pooled`` (N, C) with
    the recorded channels, and the ``chunks_done`` flags. A file edited by hand or
    written by another tool can be marked complete and still break any of these."""
    needed = ("image_ids", "names", "valid", "spatial", "pooled", "chunks_done")
    absent = [k for k in needed if k not in f]
    if absent:
        return f"dataset(s) {', '.join(absent)} missing"
    n = len(f["image_ids"])
    rows = {k: f[k].shape[0] if f[k].shape else 0 for k in ("names", "valid", "spatial", "pooled")}
    off = {k: r for k, r in rows.items() if r != n}
    if off:
        return f"{n} image ids but " + ", ".join(f"{r} {k} rows" for k, r in off.items())
    channels = f.attrs.get("channels")
    if len(f["spatial"].shape) != 3 or len(f["pooled"].shape) != 2 or \
            (channels is not None and (f["spatial"].shape[2], f["pooled"].shape[1]) != (channels, channels)):
        return f"spatial {f['spatial'].shape} / pooled {f['pooled'].shape} do not match {channels} channels"
    return None


class FeatureCache:
    """Read a complete feature cache.

    ``ids`` (N,) int64, ``names`` list of N str, ``valid`` (N,) bool, ``metadata`` dict;
    ``spatial`` (N, P, C) and ``pooled`` (N, C): h5py datasets, or numpy arrays when ``in_memory``.
    Refuses incomplete files (also one marked complete with chunks never written) and other
    format versions, in one line naming the file (``CaptionsError``).
    """

    def __init__(self, path: str | os.PathLike, in_memory: bool = False) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise CaptionsError("feature cache not found; run 'captions extract-features' first", self.path)
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            if isinstance(e, BlockingIOError) or "unable to lock file" in str(e):
                raise CaptionsError("feature cache is open for writing in another process; wait for it to finish",
                                    self.path) from None
            raise CaptionsError(f"not a readable HDF5 file ({' '.join(str(e).split())})", self.path) from None
        self.metadata = read_attrs(self._file)
        if self.metadata.get("format") != FORMAT_NAME:
            raise CaptionsError("not a captions feature cache", self.path)
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise CaptionsError(f"feature cache format version {self.metadata.get('format_version')}, this "
                                f"captions reads {FORMAT_VERSION}; extract the features again", self.path)
        if not self.metadata.get("complete"):
            raise CaptionsError("feature cache is incomplete (extraction was interrupted); re-run "
                                "'captions extract-features' to finish it", self.path)
        f = self._file
        missing = unfinished_chunks(f)
        if missing:
            raise CaptionsError(f"feature cache is marked complete, yet {missing} of {len(f['chunks_done'])} chunks "
                                f"were never written; re-run 'captions extract-features' to finish it", self.path)
        problem = structure_problem(f)
        if problem:
            raise CaptionsError(f"damaged feature cache ({problem}); extract the features again", self.path)
        self.ids = f["image_ids"][:]
        self.names = [n.decode("utf-8") if isinstance(n, bytes) else n for n in f["names"][:]]
        self.valid = f["valid"][:].astype(bool)
        self.in_memory = in_memory
        self.spatial = f["spatial"][:] if in_memory else f["spatial"]
        self.pooled = f["pooled"][:] if in_memory else f["pooled"]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def channels(self) -> int:
        return int(self.metadata["channels"])

    @property
    def num_positions(self) -> int:
        h, w = self.metadata["spatial_shape"]
        return int(h) * int(w)

    @property
    def spec(self) -> FeatureSpec:
        """What the features are (backbone, weights, shapes, ...); raises ``CaptionsError`` when
        the file lacks a required attribute."""
        return FeatureSpec.from_attrs(self.metadata, path=self.path)

    @property
    def chunk_rows(self) -> int:
        """Rows per HDF5 chunk along N (256 for files that do not record it): reads aligned to it
        touch whole chunks only."""
        return int(self.metadata.get("chunk_rows", 256))

    def array(self, kind: str):
        """``spatial`` -> (N, P, C), ``pooled`` -> (N, C), stored dtype (float16 or float32): the
        h5py dataset, or the numpy array when ``in_memory``. Raises ``ValueError`` for another kind."""
        if kind == "spatial":
            return self.spatial
        if kind == "pooled":
            return self.pooled
        raise ValueError(f"kind must be spatial or pooled, got {kind}")

    @property
    def skipped(self) -> list[dict[str, str]]:
        return self.metadata.get("skipped", [])

    def check_dataset(self, dataset_hash: str, what: str = "the prepared dataset") -> None:
        """Refuse a cache made from another prepared dataset (compared by ``dataset_hash``)."""
        if self.metadata.get("dataset_hash") != dataset_hash:
            raise CaptionsError(f"feature cache was extracted from a different prepared dataset than {what} "
                                f"(dataset_hash {self.metadata.get('dataset_hash', '?')[:12]} != "
                                f"{dataset_hash[:12]}); extract features for this dataset", self.path)

    def torch_dataset(self, rows: np.ndarray | None = None, kind: str = "both") -> FeatureDataset:
        """A torch ``Dataset`` over ``rows`` (default: all valid rows) yielding ``(row, features)``."""
        rows = np.nonzero(self.valid)[0] if rows is None else np.asarray(rows)
        arrays = (self.spatial, self.pooled) if self.in_memory else None
        return FeatureDataset(self.path, rows, kind, arrays)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FeatureDataset:
    """Torch ``Dataset`` over cache rows; safe in DataLoader workers under fork and spawn.

    The HDF5 file is opened lazily in each process (an h5py handle must not cross a fork), so the
    object pickles cheaply. Item ``i`` -> ``(row, spatial (P, C) float32, pooled (C,) float32)``
    for ``kind="both"``, or ``(row, tensor)`` for ``"spatial"`` / ``"pooled"``.
    """

    def __init__(self, path: Path, rows: np.ndarray, kind: str = "both", arrays=None) -> None:
        if kind not in ("both", "spatial", "pooled"):
            raise ValueError(f"kind must be both, spatial or pooled, got {kind}")
        self.path, self.rows, self.kind, self.arrays = Path(path), rows, kind, arrays
        self._file = None
        self._pid = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"], state["_pid"] = None, None
        return state

    def _arrays(self):
        if self.arrays is not None:
            return self.arrays
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file["spatial"], self._file["pooled"]

    def __getitem__(self, i: int):
        import torch

        row = int(self.rows[i])
        spatial, pooled = self._arrays()
        if self.kind == "pooled":
            return row, torch.from_numpy(np.asarray(pooled[row], dtype=np.float32))
        sp = torch.from_numpy(np.asarray(spatial[row], dtype=np.float32))
        if self.kind == "spatial":
            return row, sp
        return row, sp, torch.from_numpy(np.asarray(pooled[row], dtype=np.float32))
