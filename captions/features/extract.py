"""``captions extract-features``: run a CNN once over a prepared dataset and cache its features."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from captions.errors import CaptionsError
from captions.features.backbones import DEFAULT_BACKBONE, Backbone, build_backbone
from captions.features.cache import FORMAT_NAME, FORMAT_VERSION, read_attrs
from captions.features.preprocess import crop_batch, decode_images, normalize_batch
from captions.fsutil import sha256_file
from captions.pipeline.prepared import MANIFEST, load_prepared
from captions.runtime import resolve_device, resolve_precision, retained_heap

log = logging.getLogger("captions")

# Attributes that must match for an existing (partial or complete) cache to be reused.
IDENTITY_KEYS = ("backbone", "weights", "image_size", "dtype", "precision", "dataset_hash", "chunk_rows")


def _failure(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


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


def _foldable_conv(m: torch.nn.Module) -> bool:
    """Convolutions whose forward is conv(x, self.weight, self.bias) (timm's Conv2dSame pads first)."""
    t = type(m)
    return t is torch.nn.Conv2d or (t.__name__ == "Conv2dSame" and t.__module__.startswith("timm."))


def _bn_remainder(m: torch.nn.Module) -> torch.nn.Module | None:
    """What is left of a BatchNorm once folded away (None: not a BatchNorm this knows how to fold)."""
    t = type(m)
    if not isinstance(m, torch.nn.BatchNorm2d) or m.training or m.running_mean is None:
        return None
    if t is torch.nn.BatchNorm2d:
        return torch.nn.Identity()
    if (t.__name__ == "BatchNormAct2d" and t.__module__.startswith("timm.")
            and set(dict(m.named_children())) == {"drop", "act"}):  # timm: batch_norm, then drop, then act
        return torch.nn.Sequential(m.drop, m.act)
    return None


class _FoldTracer(torch.fx.Tracer):
    """Traces down to convolutions and BatchNorms, treating timm's untraceable layers as leaves."""

    def __init__(self, leaves: tuple[type, ...], functions: tuple) -> None:
        super().__init__(autowrap_functions=functions)
        self.leaves = (torch.nn.Conv2d, torch.nn.BatchNorm2d, *leaves)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _conv_bn_pairs(module: torch.nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) qualified names where the BatchNorm is the only consumer of the conv's output.

    From the torch.fx graph where the model traces (timm's layers that do not trace are leaves);
    otherwise only adjacent pairs inside ``nn.Sequential`` containers, whose data flow is certain.
    """
    leaves, functions = (), ()
    if any(type(m).__module__.startswith("timm.") for m in module.modules()):
        from timm.layers import _fx

        leaves, functions = tuple(_fx.get_notrace_modules()), tuple(_fx.get_notrace_functions())
    try:
        graph = _FoldTracer(leaves, functions).trace(module)
    except Exception as e:  # data-dependent control flow
        log.debug("BatchNorm folding: model does not trace (%s); folding inside nn.Sequential only",
                  type(e).__name__)
        pairs = []
        for name, m in module.named_modules():
            if isinstance(m, torch.nn.Sequential):
                kids = list(m.named_children())
                pairs += [(f"{name}.{a}".lstrip("."), f"{name}.{b}".lstrip("."))
                          for (a, _), (b, _) in zip(kids, kids[1:], strict=False)]
        uses: dict[str, int] = {}
        for _, m in module.named_modules(remove_duplicate=False):
            uses[id(m)] = uses.get(id(m), 0) + 1
        return [(c, b) for c, b in pairs if uses[id(module.get_submodule(c))] == 1
                and uses[id(module.get_submodule(b))] == 1]
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if (node.op == "call_module" and len(node.args) == 1 and not node.kwargs
                and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "call_module"
                and len(node.args[0].users) == 1 and calls[node.target] == 1 and calls[node.args[0].target] == 1):
            pairs.append((node.args[0].target, node.target))
    return pairs


def fuse_for_inference(module: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Fold eval-mode BatchNorms into the convolutions that feed them (exact up to float rounding).

    torchvision backbones 1.3-1.4x faster on CPU, timm EfficientNets too (their BatchNormAct2d
    keeps its activation). The folding is in place on the module's own convolutions (or on a
    deep copy unless ``inplace``): no new parameter memory, no torch.fx code generation, ~10 ms.
    Models or layers it does not know are left as they are.
    """
    if not inplace:
        import copy

        module = copy.deepcopy(module)
    folded = 0
    with torch.no_grad():
        for conv_name, bn_name in _conv_bn_pairs(module):
            conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
            rest = _bn_remainder(bn)
            if rest is None or not _foldable_conv(conv) or conv.out_channels != bn.num_features:
                continue
            inv_std = torch.rsqrt(bn.running_var.float() + bn.eps)
            gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
            k = gamma * inv_std
            bias = conv.bias if conv.bias is not None else torch.zeros_like(inv_std)
            new_bias = (bias - bn.running_mean) * k + beta
            conv.weight.mul_(k.reshape(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
            conv.bias = torch.nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)
            parent, _, leaf = bn_name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, rest)
            folded += 1
    log.debug("folded %d BatchNorm layers into convolutions", folded)
    return module


class FeatureForward:
    """The extraction forward: uint8 crops (N, 3, S, S) -> feature map (N, C, h, w).

    BatchNorm folded (``fuse_for_inference``), channels_last, autocast to ``amp_dtype``. On CPU
    with bf16/fp16 the parameters are stored in that dtype too (autocast would otherwise cast
    every weight again at every call) and normalisation writes the input straight in it.
    ``benchmarks/extract.py`` times its raw forward with this same object.
    """

    def __init__(self, bb: Backbone, device: torch.device, channels_last: bool, amp_dtype: torch.dtype | None,
                 inplace: bool = False) -> None:
        self.device, self.channels_last, self.amp_dtype = device, channels_last, amp_dtype
        self.preprocessing = bb.preprocessing
        module = fuse_for_inference(bb.module, inplace=inplace).to(device)
        self.input_dtype = torch.float32
        if device.type == "cpu" and amp_dtype is not None:
            module = module.to(amp_dtype)
            self.input_dtype = amp_dtype
        # channels_last measured faster on CPU too (benchmarks/README.md)
        self.module = module.to(memory_format=torch.channels_last) if channels_last else module

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 crops -> the model's input (dtype, device, memory format)."""
        x = normalize_batch(x.to(self.device, non_blocking=True), self.preprocessing, self.input_dtype)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input (from ``normalize``) -> feature map; call under ``torch.inference_mode``."""
        if self.amp_dtype is None:
            return self.module(x)
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            return self.module(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(self.normalize(x))


def spatial_shape_of(bb: Backbone, image_size: int) -> tuple[int, int]:
    """Feature-map size for ``image_size`` crops.

    torchvision ResNets/RegNets halve the size five times with odd kernels padded by k // 2
    (ceil(S / 2) each time), so ceil(S / 32) without a forward; other models run a 1-image probe.
    """
    from captions.features.backbones import TORCHVISION_BACKBONES

    if bb.name in TORCHVISION_BACKBONES and bb.stride == 32:
        side = -(-image_size // 32)
        return side, side
    with torch.inference_mode():
        probe = bb.module(torch.zeros(1, 3, image_size, image_size))
    return int(probe.shape[2]), int(probe.shape[3])


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
    out.parent.mkdir(parents=True, exist_ok=True)
    device = resolve_device(opts.device)
    rank, world = dist_info()
    bb = build_backbone(opts.backbone, opts.weights, opts.image_size)

    spatial_shape = spatial_shape_of(bb, opts.image_size)
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

    channels_last = opts.channels_last in ("on", "auto")
    fwd = FeatureForward(bb, device, channels_last, resolve_precision(opts.precision, device), inplace=True)
    torch_dtype = torch.float16 if opts.dtype == "float16" else torch.float32
    workers = opts.workers if opts.workers is not None or device.type != "cuda" else min(4, os.cpu_count() or 1)
    lanes, lane_threads = plan_lanes(workers, device)
    batches = plan_batches(pending, opts.batch_size, lanes)
    writer = _Writer(f, opts.chunk_rows, per_chunk)
    writer.start()
    t0, seen = time.perf_counter(), 0
    bar = tqdm(total=len(pending), desc=f"features {bb.name}", unit="img", disable=not progress or rank != 0)
    lock = threading.Lock()

    def run_batch(rows: torch.Tensor, x: torch.Tensor | None, failed: list[tuple[int, str]]) -> None:
        nonlocal seen
        for r, why in failed:
            log.warning("skipped %s: unreadable image (%s)", paths[r], why)
        spatial = pooled = None
        if x is not None:
            fmap = fwd(x)
            # (N, C, h, w) -> (N, h*w, C): free for a channels_last map; casts happen in torch
            # (vectorised) rather than numpy, whose float16 conversion is slow.
            pooled_t = fmap.float().mean(dim=(2, 3)).to(torch_dtype)
            spatial_t = fmap.flatten(2).transpose(1, 2).to(torch_dtype).contiguous()
            if not bool(torch.isfinite(spatial_t).all()):
                raise CaptionsError(f"backbone produced non-finite {opts.dtype} features (overflow?); "
                                    f"try --dtype float32")
            pooled, spatial = pooled_t.cpu().numpy(), spatial_t.cpu().numpy()
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
                    persistent_workers=False)
                for item in loader:
                    run_batch(*item)
            else:
                run_lanes(batches, lanes, lane_threads,
                           lambda rows: run_batch(*load_crops(paths, rows, bb.preprocessing)))
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
