"""``captions extract-features``: run a CNN once over a prepared dataset and cache its features."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captions.errors import CaptionsError
from captions.features.backbones import DEFAULT_BACKBONE, Backbone, build_backbone
from captions.features.cache import FORMAT_NAME, FORMAT_VERSION, read_attrs
from captions.features.preprocess import normalize_batch, preprocess_image
from captions.fsutil import sha256_file
from captions.pipeline.prepared import MANIFEST, load_prepared
from captions.pipeline.resize import load_rgb

log = logging.getLogger("captions")

# Attributes that must match for an existing (partial or complete) cache to be reused.
IDENTITY_KEYS = ("backbone", "weights", "image_size", "dtype", "precision", "dataset_hash", "chunk_rows")


class ImageFiles(torch.utils.data.Dataset):
    """Decode + preprocess images in DataLoader workers. Item -> (row, uint8 (3,S,S) or None, reason)."""

    def __init__(self, paths: list[Path], rows: np.ndarray, prep) -> None:
        self.paths, self.rows, self.prep = paths, rows, prep

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            return row, preprocess_image(load_rgb(self.paths[row]), self.prep), None
        except Exception as e:  # any decode failure skips this one image
            return row, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def collate_images(batch):
    """-> (rows of good images (int64), uint8 batch (n,3,S,S) or None, [(row, reason)] failures)."""
    good = [(r, t) for r, t, _ in batch if t is not None]
    failed = [(r, why) for r, t, why in batch if t is None]
    rows = torch.tensor([r for r, _ in good], dtype=torch.int64)
    x = torch.stack([t for _, t in good]) if good else None
    return rows, x, failed


@dataclass
class ExtractOptions:
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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the forward pass, None for plain float32.

    ``auto``: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with native bf16
    (AVX512-BF16 / AMX, where it measured 2-3x faster than fp32), float32 elsewhere.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise CaptionsError(f"unknown precision '{precision}' (auto, fp32, bf16 or fp16)")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


def fuse_for_inference(module: torch.nn.Module) -> torch.nn.Module:
    """Fold BatchNorm into the preceding convolutions where torch.fx can trace the model
    (torchvision backbones: 1.25x faster on CPU); return the module unchanged otherwise."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module)
    except Exception as e:  # timm models with data-dependent control flow do not trace
        log.debug("BatchNorm folding skipped (%s)", type(e).__name__)
        return module


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CaptionsError("--device cuda asked for, but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise CaptionsError(f"unknown device '{device}' (auto, cpu or cuda)")
    return torch.device(device)


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def shard_path(out: Path, rank: int, world: int) -> Path:
    suffix = ".partial.h5" if world == 1 else f".partial-{rank}of{world}.h5"
    return out.with_name(out.name + suffix)


def _create_file(path: Path, attrs: dict[str, Any], n: int, positions: int, channels: int, names: list[str],
                 opts: ExtractOptions):
    import h5py

    f = h5py.File(path, "w")
    comp = None if opts.compression == "none" else opts.compression
    rows = min(opts.chunk_rows, max(n, 1))
    f.create_dataset("spatial", (n, positions, channels), dtype=opts.dtype, chunks=(rows, positions, channels),
                     compression=comp)
    f.create_dataset("pooled", (n, channels), dtype=opts.dtype, chunks=(rows, channels), compression=comp)
    f.create_dataset("image_ids", data=np.arange(n, dtype=np.int64))
    f.create_dataset("names", data=names, dtype=h5py.string_dtype("utf-8"))
    f.create_dataset("valid", data=np.zeros(n, dtype=bool))
    f.create_dataset("chunks_done", data=np.zeros(-(-n // opts.chunk_rows), dtype=bool))
    for k, v in attrs.items():
        f.attrs[k] = v
    f.attrs["skipped"] = "[]"
    f.attrs["complete"] = False
    f.flush()
    return f


def _open_shard(path: Path, attrs: dict[str, Any], n: int, positions: int, channels: int, names: list[str],
                opts: ExtractOptions):
    """Open a partial file to resume it, or start a new one when absent, unreadable or of another run."""
    import h5py

    if path.exists():
        try:
            f = h5py.File(path, "r+")
            old = read_attrs(f)
            if all(old.get(k) == attrs[k] for k in IDENTITY_KEYS) and f["spatial"].shape[0] == n:
                done = int(f["chunks_done"][:].sum())
                log.info("resuming %s: %d of %d chunks already done", path.name, done, len(f["chunks_done"]))
                return f
            f.close()
            log.warning("%s is a partial extraction with other settings; starting it again", path)
        except OSError as e:
            log.warning("%s is unreadable (%s), probably cut off mid-write; starting it again", path, e)
        path.unlink()
    return _create_file(path, attrs, n, positions, channels, names, opts)


class _Writer(threading.Thread):
    """Writes feature batches to HDF5 in the background so disk I/O overlaps the forward pass.

    A chunk's flag in /chunks_done is set only after all its rows are written and flushed.
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


def _merge_shards(out_partial: Path, shards: list[Path], world: int, chunk_rows: int) -> None:
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


def cache_attrs(bb: Backbone, opts: ExtractOptions, dataset_hash: str, manifest_sha: str,
                spatial_shape: tuple[int, int]) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "backbone": bb.name, "weights": bb.weights,
        "image_size": opts.image_size, "spatial_shape": list(spatial_shape), "channels": bb.channels,
        "stride": bb.stride, "preprocessing": json.dumps(bb.preprocessing.to_dict()), "dtype": opts.dtype,
        "dataset_hash": dataset_hash, "manifest_sha256": manifest_sha, "chunk_rows": opts.chunk_rows,
        "compression": opts.compression, "precision": opts.precision,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def default_cache_path(dataset_dir: Path, backbone: str, image_size: int) -> Path:
    return Path(dataset_dir) / f"features-{backbone.replace('/', '_')}-{image_size}.h5"


def extract_features(dataset_dir: str | os.PathLike, out: str | os.PathLike | None = None,
                     options: ExtractOptions | None = None, progress: bool = True) -> Path:
    """Extract spatial and pooled features of every image of a prepared dataset into an HDF5 cache.

    Returns the cache path. Resumes an interrupted run (finished chunks are kept); refuses to
    overwrite or append to an existing cache made with another backbone, size, dtype or dataset.
    Under torchrun each rank extracts its share of chunks and rank 0 merges them.
    """
    import h5py
    from tqdm import tqdm

    opts = options or ExtractOptions()
    if opts.dtype not in ("float16", "float32"):
        raise CaptionsError(f"unknown dtype '{opts.dtype}' (float16 or float32)")
    if opts.compression not in ("none", "lzf", "gzip"):
        raise CaptionsError(f"unknown compression '{opts.compression}' (none, lzf or gzip)")
    ds = load_prepared(dataset_dir)
    out = Path(out) if out is not None else default_cache_path(Path(dataset_dir), opts.backbone, opts.image_size)
    device = resolve_device(opts.device)
    rank, world = dist_info()
    bb = build_backbone(opts.backbone, opts.weights, opts.image_size)

    with torch.inference_mode():
        probe = bb.module(torch.zeros(1, 3, opts.image_size, opts.image_size))
    spatial_shape = (int(probe.shape[2]), int(probe.shape[3]))
    attrs = cache_attrs(bb, opts, ds.dataset_hash, sha256_file(Path(dataset_dir) / MANIFEST), spatial_shape)

    if out.exists():
        try:
            with h5py.File(out, "r") as f:
                old = read_attrs(f)
        except OSError as e:
            raise CaptionsError(f"exists but is not a readable HDF5 file ({e}); move it away first", out) from None
        diff = [k for k in IDENTITY_KEYS if k != "chunk_rows" and old.get(k) != attrs[k]]
        if old.get("format") != FORMAT_NAME or diff:
            what = ", ".join(f"{k}={old.get(k)!r} (asked {attrs[k]!r})" for k in diff) or "not a feature cache"
            raise CaptionsError(f"exists with other settings: {what}; choose another --out or delete it", out)
        if old.get("complete"):
            log.info("%s: already complete for these settings; nothing to do", out)
            return out

    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))

    n = len(ds.images)
    names = [im["name"] for im in ds.images]
    paths = [ds.image_path(i) for i in range(n)]
    part = shard_path(out, rank, world)
    f = _open_shard(part, attrs, n, spatial_shape[0] * spatial_shape[1], bb.channels, names, opts)
    done = f["chunks_done"][:]
    my_chunks = [c for c in range(len(done)) if c % world == rank and not done[c]]
    pending = np.concatenate([np.arange(c * opts.chunk_rows, min((c + 1) * opts.chunk_rows, n))
                              for c in my_chunks]) if my_chunks else np.zeros(0, dtype=np.int64)
    per_chunk = {c: min((c + 1) * opts.chunk_rows, n) - c * opts.chunk_rows for c in my_chunks}

    model = fuse_for_inference(bb.module).to(device)
    # channels_last measured faster on CPU too (regnet_x_400mf 1.5x, efficientnet_lite0 1.4x; benchmarks/README.md)
    channels_last = opts.channels_last in ("on", "auto")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    workers = opts.workers if opts.workers is not None else min(4 if device.type == "cuda" else 1,
                                                                os.cpu_count() or 1)
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths, pending, bb.preprocessing), batch_size=opts.batch_size, shuffle=False,
        num_workers=workers, collate_fn=collate_images, pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None, persistent_workers=False)
    amp_dtype = resolve_precision(opts.precision, device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    torch_dtype = torch.float16 if opts.dtype == "float16" else torch.float32
    writer = _Writer(f, opts.chunk_rows, per_chunk)
    writer.start()
    t0, seen = time.perf_counter(), 0
    bar = tqdm(total=len(pending), desc=f"features {bb.name}", unit="img", disable=not progress or rank != 0)
    try:
        with torch.inference_mode():
            for rows, x, failed in loader:
                for r, why in failed:
                    log.warning("skipped %s: unreadable image (%s)", paths[r], why)
                spatial = pooled = None
                if x is not None:
                    x = normalize_batch(x.to(device, non_blocking=True), bb.preprocessing)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with amp:
                        fmap = model(x)
                    # (N, C, h, w) -> (N, h*w, C): free for a channels_last map; casts happen in torch
                    # (vectorised) rather than numpy, whose float16 conversion is slow.
                    pooled = fmap.float().mean(dim=(2, 3)).to(torch_dtype).cpu().numpy()
                    spatial = fmap.flatten(2).transpose(1, 2).to(torch_dtype).contiguous().cpu().numpy()
                    if not np.isfinite(spatial).all():
                        raise CaptionsError(f"backbone produced non-finite {opts.dtype} features (overflow?); "
                                            f"try --dtype float32")
                writer.put((rows.numpy(), spatial, pooled, [(r, names[r], why) for r, why in failed]))
                seen += len(rows) + len(failed)
                bar.update(len(rows) + len(failed))
    finally:
        bar.close()
        writer.close()
        f.close()
    elapsed = time.perf_counter() - t0
    if seen:
        log.info("rank %d: %d images in %.1f s (%.1f images/s)", rank, seen, elapsed, seen / max(elapsed, 1e-9))

    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        final_partial = shard_path(out, 0, 1)
        if world > 1:
            _merge_shards(final_partial, [shard_path(out, r, world) for r in range(world)], world, opts.chunk_rows)
        with h5py.File(final_partial, "r+") as f:
            if not f["chunks_done"][:].all():
                raise CaptionsError("extraction finished with chunks missing; re-run to complete it", final_partial)
            skipped = json.loads(f.attrs["skipped"])
            f.attrs["complete"] = True  # last: vouches for everything above
        os.replace(final_partial, out)
        if skipped:
            log.warning("%d image(s) could not be read; they are marked invalid in the cache", len(skipped))
    if world > 1:
        torch.distributed.barrier()
    return out
