"""``captions extract-features``: run a CNN once over a prepared dataset and cache its features.

The steps: lock the output (``output_lock``), check an existing cache (``_existing_is_complete``),
join torchrun's group, extract this rank's chunks into its partial file (``_extract_shard``:
decode, forward, write in the background), then rank 0 merges the shards and marks the cache
complete (``_finish``). The forward is ``captions.features.forward``, the file writing
``captions.features.writer``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from captions.distributed import Distributed, barrier, join, launch_rank, leave
from captions.errors import CaptionsError, first_line
from captions.features.backbones import DEFAULT_BACKBONE, Backbone, build_backbone, spatial_shape_of
from captions.features.cache import FORMAT_NAME, read_attrs, structure_problem, unfinished_chunks
from captions.features.forward import FeatureForward, pooled_and_spatial
from captions.features.preprocess import crop_batch, decode_images
from captions.features.spec import FeatureSpec
from captions.features.writer import (
    ChunkWriter,
    cache_attrs,
    complete_cache,
    merge_shards,
    open_shard,
    shard_path,
    writing,
)
from captions.fsutil import output_lock, sha256_file
from captions.pipeline.prepared import MANIFEST, PreparedDataset, load_prepared
from captions.runtime import resolve_device, resolve_precision, retained_heap

log = logging.getLogger("captions")


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {first_line(e, '')}"


def load_crops(paths: list[Path], rows, prep) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    """Decode images ``rows`` and crop them as one batch.

    -> (rows of good images (int64), uint8 (n, 3, S, S) with channels-last memory (may be a view)
    or None, [(row, reason)] failures).
    """
    images, good, failed = [], [], []
    rows = [int(r) for r in rows]
    for r, x in zip(rows, decode_images([paths[r] for r in rows]), strict=True):
        if isinstance(x, Exception):  # any decode failure skips this one image
            failed.append((r, _failure(x)))
        else:
            images.append(x)
            good.append(r)
    x = crop_batch(images, prep) if images else None
    return torch.tensor(good, dtype=torch.int64), x, failed


def encode_images(paths: list[Path], image_ids: np.ndarray, prep, encode: Callable[[torch.Tensor], torch.Tensor],
                  batch_size: int, why_left_out: str) -> tuple[np.ndarray, torch.Tensor | None]:
    """Decode and crop images ``image_ids`` (B,) of ``paths`` as extraction does, ``batch_size`` at
    a time, and run ``encode`` (uint8 crops (n, 3, S, S) -> features (n, ...)) on them.

    An image that cannot be read is logged ("<path> cannot be read (<reason>); <why_left_out>")
    and left out. Returns (the ids that were read (B',) int64, their features (B', ...) on the
    CPU in that order, or None when none was read).
    """
    good, parts = [], []
    for i in range(0, len(image_ids), batch_size):
        rows, x, failed = load_crops(paths, image_ids[i : i + batch_size], prep)
        for r, why in failed:
            log.warning("%s cannot be read (%s); %s", paths[r], why, why_left_out)
        if x is not None:
            good.append(rows.numpy())
            parts.append(encode(x).cpu())
    if not parts:
        return np.zeros(0, dtype=np.int64), None
    return np.concatenate(good), torch.cat(parts)


def forget_descriptors(fds: tuple[int, ...], worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: close the worker's copies of the output file's descriptors.

    A forked worker inherits the HDF5 file's descriptor, and with it HDF5's lock on the file; a
    worker outliving a killed run (it notices within about 5 s) would keep the file locked
    against an immediate re-run. The worker never touches the file.
    """
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class ImageBatches(torch.utils.data.Dataset):
    """Batches of decoded crops for DataLoader workers: item i -> ``load_crops`` of batch i."""

    def __init__(self, paths: list[Path], batches: list[np.ndarray], prep) -> None:
        self.paths, self.batches, self.prep = paths, batches, prep

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int):
        rows, x, failed = load_crops(self.paths, self.batches[i], self.prep)
        return rows, None if x is None else x.contiguous(memory_format=torch.channels_last), failed


@dataclass
class ExtractOptions:
    """Settings of ``extract_features`` (the ``captions extract-features`` options of the same names).

    ``dtype``: stored float16|float32; ``workers``: decode processes (None: 4 on CUDA, in-process
    lanes on CPU; 0: in this thread); ``channels_last``: on|off|auto; ``precision``:
    auto|fp32|bf16|fp16 autocast of the forward; ``compression``: none|lzf|gzip.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str = "default"
    image_size: int = 224
    dtype: str = "float16"
    batch_size: int = 32
    workers: int | None = None
    device: str = "auto"
    compression: str = "none"
    chunk_rows: int = 256
    channels_last: str = "auto"
    precision: str = "auto"


def plan_batches(pending: np.ndarray, batch_size: int, lanes: int = 1) -> list[np.ndarray]:
    """Split rows into batches of ``batch_size``; with parallel lanes the last ``lanes`` batches share
    the remainder evenly, so the lanes finish together instead of one running a batch alone."""
    n = len(pending)
    full = max(-(-n // batch_size) - lanes, 0) if lanes > 1 else n // batch_size
    cuts = [i * batch_size for i in range(full + 1)]
    rest = n - cuts[-1]
    pieces = min(lanes, rest) if lanes > 1 else (1 if rest else 0)
    cuts += [cuts[-1] + rest * (i + 1) // pieces for i in range(pieces)]
    return [pending[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def plan_lanes(workers: int | None, device: torch.device) -> tuple[int, int]:
    """(lanes, intra-op threads per lane) for in-process decoding (``workers`` None or 0).

    On CPU by default one lane per torch thread (at most 8, sharing the threads out), each
    decoding a batch and running the CNN on it with its own thread(s): the lanes overlap decoding
    with the forward without idle or preempted OpenMP workers, and small convolutions scale
    better across batches than within one (benchmarks/README.md). ``workers=0`` (and CUDA):
    one lane, this thread, torch's threads as set.
    """
    threads = torch.get_num_threads()
    if workers == 0 or device.type != "cpu" or threads < 2:
        return 1, threads
    lanes = min(threads, 8)
    return lanes, threads // lanes


def run_lanes(batches: list[np.ndarray], lanes: int, lane_threads: int, work) -> None:
    """Run ``work(batch)`` over ``batches`` in ``lanes`` threads (this one included), each taking the
    next batch when it is free, with ``lane_threads`` intra-op threads each. The first error stops
    the others after their current batch and is raised here."""
    it = iter(batches)
    take = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def lane() -> None:
        try:
            while not stop.is_set():
                with take:
                    rows = next(it, None)
                if rows is None:
                    return
                work(rows)
        except BaseException as e:  # raised in the calling thread below
            errors.append(e)
            stop.set()

    if lanes == 1:
        for rows in batches:
            work(rows)
        return
    threads_before = torch.get_num_threads()
    torch.set_num_threads(lane_threads)  # new threads take this; OpenMP keeps it per thread
    others = [threading.Thread(target=torch.inference_mode()(lane), daemon=True, name=f"captions-lane-{i}")
              for i in range(1, lanes)]
    try:
        for t in others:
            t.start()
        lane()
    finally:
        stop.set()  # harmless when all is done: the batches are used up
        for t in others:
            t.join()
        torch.set_num_threads(threads_before)
    if errors:
        raise errors[0]


def default_cache_path(dataset_dir: Path, backbone: str, image_size: int) -> Path:
    """``<dataset_dir>/features-<backbone>-<image_size>.h5`` (a ``/`` in the backbone becomes ``_``)."""
    return Path(dataset_dir) / f"features-{backbone.replace('/', '_')}-{image_size}.h5"


def _check_options(opts: ExtractOptions) -> None:
    if opts.dtype not in ("float16", "float32"):
        raise CaptionsError(f"unknown dtype '{opts.dtype}' (float16 or float32)")
    if opts.compression not in ("none", "lzf", "gzip"):
        raise CaptionsError(f"unknown compression '{opts.compression}' (none, lzf or gzip)")


def _spec_of(bb: Backbone, opts: ExtractOptions, dataset_hash: str) -> FeatureSpec:
    return FeatureSpec(backbone=bb.name, weights=bb.weights, image_size=opts.image_size,
                       preprocessing=bb.preprocessing.to_dict(), dtype=opts.dtype, precision=opts.precision,
                       spatial_shape=spatial_shape_of(bb, opts.image_size), channels=bb.channels,
                       token_layout=bb.token_layout, dataset_hash=dataset_hash)


def _existing_is_complete(out: Path, attrs: dict) -> bool:
    """True when ``out`` is a complete cache of these settings, False when absent or partial.

    chunk_rows may differ (the file is complete: its chunks no longer matter). A file marked
    complete while some chunks were never written is moved back to the partial name, so that
    this run finishes it. Raises ``CaptionsError`` when ``out`` is unreadable, not a feature
    cache, or made with other settings.
    """
    import h5py

    if not out.exists():
        return False
    try:
        with h5py.File(out, "r") as f:
            old, missing = read_attrs(f), unfinished_chunks(f)
            problem = structure_problem(f) if old.get("complete") else None
    except OSError as e:
        raise CaptionsError(f"exists but is not a readable HDF5 file ({' '.join(str(e).split())}); move it away "
                            f"first", out) from None
    diff = [k for k in FeatureSpec.EXTRACTION_KEYS if old.get(k) != attrs.get(k)]
    if old.get("format") != FORMAT_NAME or diff:
        what = ", ".join(f"{k}={old.get(k)!r} (asked {attrs.get(k)!r})" for k in diff) or "not a feature cache"
        raise CaptionsError(f"exists with other settings: {what}; choose another --out or delete it", out)
    if problem:
        raise CaptionsError(f"is marked complete but damaged ({problem}); move it away and extract again", out)
    if old.get("complete") and not missing:
        log.info("%s: already complete for these settings; nothing to do", out)
        return True
    if old.get("complete"):
        log.warning("%s is marked complete, yet %d chunk(s) were never written; extracting them", out, missing)
        with h5py.File(out, "r+") as f:
            f.attrs["complete"] = False
        os.replace(out, shard_path(out, 0, 1))
    return False


def _rows_of_rank(done: np.ndarray, dist: Distributed, chunk_rows: int, n: int) -> tuple[np.ndarray, dict[int, int]]:
    """(rows still to extract by this rank, ascending; {chunk: its row count}) for the chunks not
    ``done`` that belong to this rank (chunk c to rank c % world)."""
    mine = [c for c in range(len(done)) if c % dist.world == dist.rank and not done[c]]
    pending = np.concatenate([np.arange(c * chunk_rows, min((c + 1) * chunk_rows, n))
                              for c in mine]) if mine else np.zeros(0, dtype=np.int64)
    return pending, {c: min((c + 1) * chunk_rows, n) - c * chunk_rows for c in mine}


def _features(fwd: FeatureForward, x: torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 crops (N, 3, S, S) -> (spatial (N, P, C), pooled (N, C)) numpy arrays of ``dtype``."""
    spatial, pooled = pooled_and_spatial(fwd(x), torch.float16 if dtype == "float16" else torch.float32)
    if not bool(torch.isfinite(spatial).all()):
        raise CaptionsError(f"backbone produced non-finite {dtype} features (overflow?); try --dtype float32")
    return spatial.cpu().numpy(), pooled.cpu().numpy()


def _run_rows(pending: np.ndarray, ds: PreparedDataset, bb: Backbone, opts: ExtractOptions, dist: Distributed,
              writer: ChunkWriter, progress: bool) -> int:
    """Decode, forward and hand ``pending`` rows to ``writer``; returns how many rows were done."""
    from tqdm import tqdm

    device = dist.device
    names = [im["name"] for im in ds.images]
    paths = ds.image_paths()
    channels_last = opts.channels_last in ("on", "auto")
    fwd = FeatureForward(bb, device, channels_last, resolve_precision(opts.precision, device), inplace=True)
    workers = opts.workers if opts.workers is not None or device.type != "cuda" else min(4, os.cpu_count() or 1)
    lanes, lane_threads = plan_lanes(workers, device)
    batches = plan_batches(pending, opts.batch_size, lanes)
    bar = tqdm(total=len(pending), desc=f"features {bb.name}", unit="img", disable=not progress or not dist.is_main)
    lock = threading.Lock()
    seen = 0

    def run_batch(rows: torch.Tensor, x: torch.Tensor | None, failed: list[tuple[int, str]]) -> None:
        nonlocal seen
        for r, why in failed:
            log.warning("skipped %s: unreadable image (%s)", paths[r], why)
        spatial, pooled = _features(fwd, x, opts.dtype) if x is not None else (None, None)
        writer.put((rows.numpy(), spatial, pooled, [(r, names[r], why) for r, why in failed]))
        with lock:
            seen += len(rows) + len(failed)
            bar.update(len(rows) + len(failed))

    try:
        with torch.inference_mode(), retained_heap() if device.type == "cpu" else contextlib.nullcontext():
            if workers:  # decode processes feed the forward in this thread
                loader = torch.utils.data.DataLoader(
                    ImageBatches(paths, batches, bb.preprocessing), batch_size=None, shuffle=False,
                    num_workers=workers, pin_memory=device.type == "cuda", prefetch_factor=2,
                    persistent_workers=False, worker_init_fn=functools.partial(forget_descriptors,
                                                                               writer.descriptors()))
                for item in loader:
                    run_batch(*item)
            else:
                run_lanes(batches, lanes, lane_threads,
                          lambda rows: run_batch(*load_crops(paths, rows, bb.preprocessing)))
    finally:
        bar.close()
    return seen


def _extract_shard(ds: PreparedDataset, out: Path, bb: Backbone, attrs: dict, opts: ExtractOptions,
                   dist: Distributed, progress: bool) -> None:
    """Extract this rank's unfinished chunks into its partial file (resumed when it has some)."""
    names = [im["name"] for im in ds.images]
    path = shard_path(out, dist.rank, dist.world)
    t0, seen = time.perf_counter(), 0
    with writing(open_shard(path, attrs, names), path) as f:
        pending, per_chunk = _rows_of_rank(f["chunks_done"][:], dist, opts.chunk_rows, len(names))
        writer = ChunkWriter(f, opts.chunk_rows, per_chunk)
        writer.start()
        try:
            seen = _run_rows(pending, ds, bb, opts, dist, writer, progress)
        finally:
            writer.close()
    elapsed = time.perf_counter() - t0
    if seen:
        log.info("rank %d: %d images in %.1f s (%.1f images/s)", dist.rank, seen, elapsed,
                 seen / max(elapsed, 1e-9))


def _finish(out: Path, dist: Distributed, chunk_rows: int) -> None:
    """Once every rank is done: rank 0 merges the shards and moves the complete cache to ``out``."""
    barrier(dist)
    if dist.is_main:
        final_partial = shard_path(out, 0, 1)
        if dist.world > 1:
            merge_shards(final_partial, [shard_path(out, r, dist.world) for r in range(dist.world)], dist.world,
                         chunk_rows)
        skipped = complete_cache(final_partial, out)
        if skipped:
            log.warning("%d image(s) could not be read; they are marked invalid in the cache", len(skipped))
    barrier(dist)


def extract_features(dataset_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                     options: ExtractOptions | None = None, progress: bool = True) -> Path:
    """Extract spatial and pooled features of every image of a prepared dataset into an HDF5 cache.

    Returns the cache path (``out``, default ``default_cache_path``); its format is in
    ``captions.features.cache``. Resumes an interrupted run (finished chunks are kept). Holds
    ``.<out name>.lock`` beside ``out`` while it runs. Raises ``CaptionsError`` for bad options, an
    unknown backbone or unusable weights, another run writing ``out`` now, and refuses to
    overwrite or append to an existing cache made with another backbone, weights, size, dtype,
    precision or dataset; ``OutputError`` (one line: the path and the system's reason) when the
    cache cannot be written (a full disk, a read-only folder). Under torchrun each rank extracts
    its share of chunks and rank 0 merges them; a process group created here is destroyed at the
    end of a successful run.
    """
    opts = options or ExtractOptions()
    _check_options(opts)
    ds = load_prepared(dataset_dir)
    out = Path(out) if out is not None else default_cache_path(Path(dataset_dir), opts.backbone, opts.image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    rank0 = launch_rank() == 0
    with output_lock(out.with_name(f".{out.name}.lock"), "extract-features") if rank0 else contextlib.nullcontext():
        device = resolve_device(opts.device)
        bb = build_backbone(opts.backbone, opts.weights, opts.image_size)
        attrs = cache_attrs(_spec_of(bb, opts, ds.dataset_hash), stride=bb.stride,
                            manifest_sha256=sha256_file(Path(dataset_dir) / MANIFEST), chunk_rows=opts.chunk_rows,
                            compression=opts.compression)
        if _existing_is_complete(out, attrs):
            return out
        dist = join(device)
        _extract_shard(ds, out, bb, attrs, opts, dist, progress)
        _finish(out, dist, opts.chunk_rows)
    leave(dist)
    return out
