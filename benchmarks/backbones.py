"""Extraction speed across backbone families (issue 19): a ViT and a Swin beside regnet_x_400mf.

For each backbone (random weights: the speed does not depend on them):
(a) the pipeline: ``extract_features`` end to end (decode, resize, forward, layout, HDF5 write),
    its fixed start-up (building the model, creating the file) cancelled by running it on two
    subsets of viic (``--images`` and 8 images) and dividing the extra images by the extra time;
(b) the raw forward: the same ``FeatureForward`` (BatchNorm folded where there is any,
    channels_last) on pre-decoded, pre-normalised batches, with the pooled vector, under the
    same ``retained_heap`` as the pipeline.
Both are counted in CPU seconds of this process (``time.process_time``, best of ``--repeats``)
with one thread and decoding in the same thread (``--workers 0``), so other processes on the
machine do not change the figures; (a)/(b) is what the pipeline costs beyond the model itself.
``--variants`` also times (b) with channels_last off.

Usage (from the repository root; ../shared/data/viic is needed):
  OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.backbones
  OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.backbones --backbones swin_t timm/vit_small_patch14_reg4_dinov2
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.extract import SHARED, cpu_name, load_crops, make_subset, plan_batches, pooled_of
from captions.features.backbones import build_backbone
from captions.features.extract import ExtractOptions, extract_features
from captions.features.forward import FeatureForward
from captions.pipeline.prepared import load_prepared
from captions.runtime import retained_heap

BACKBONES = ("regnet_x_400mf", "swin_t", "vit_b_16", "timm/vit_small_patch14_reg4_dinov2",
             "open_clip/ViT-B-32:openai")
SMALL = 8  # images of the subset whose run gives the fixed start-up


def best_cpu_seconds(run, repeats: int) -> float:
    """The least CPU seconds of this process that ``run()`` took in ``repeats`` runs."""
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        run()
        best = min(best, time.process_time() - t)
    return best


def pipeline_rate(small: Path, large: Path, opts: ExtractOptions, tmp: Path, repeats: int) -> float:
    """(a): images per CPU second of extract_features beyond its start-up."""
    def run(prepared: Path):
        def once() -> None:
            out = tmp / "bench.h5"
            extract_features(prepared, out, opts, progress=False)
            out.unlink()
        return once

    n_large, n_small = len(load_prepared(large).images), len(load_prepared(small).images)
    extra = best_cpu_seconds(run(large), repeats) - best_cpu_seconds(run(small), repeats)
    return (n_large - n_small) / extra


def raw_rate(bb, prepared: Path, batch_size: int, channels_last: bool, repeats: int) -> float:
    """(b): images per CPU second of the forward alone (normalised batches made beforehand), on
    the images (a) counts: all but the first ``SMALL``, in full batches."""
    ds = load_prepared(prepared)
    paths = [ds.image_path(i) for i in range(len(ds.images))]
    fwd = FeatureForward(bb, torch.device("cpu"), channels_last, None)
    xs = [fwd.normalize(load_crops(paths, rows, bb.preprocessing)[1])
          for rows in plan_batches(torch.arange(SMALL, len(paths)).numpy(), batch_size)]

    def run() -> None:
        for x in xs:
            pooled_of(fwd.forward(x))

    with torch.inference_mode(), retained_heap():  # as extract_features runs it
        pooled_of(fwd.forward(xs[0]))  # warm-up: oneDNN primitives for these shapes
        return sum(len(x) for x in xs) / best_cpu_seconds(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--images", type=int, default=72, help="first N images of viic for the large run (N - 8: "
                    "a multiple of the batch size)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", action="store_true", help="also the raw forward with channels_last off")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "large").mkdir()
        (tmp / "small").mkdir()
        large = make_subset(SHARED / "data/viic", args.images, tmp / "large")
        small = make_subset(SHARED / "data/viic", SMALL, tmp / "small")
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread, fp32 "
              f"(no native bf16 here); {args.images} viic images, {args.image_size} px, batch {args.batch_size}, "
              f"CPU seconds of this process, best of {args.repeats}")
        print("| backbone | grid x channels | token layout | (a) pipeline, images/CPU-s | (b) raw forward, "
              "images/CPU-s | (a)/(b) |" + (" (b) channels_last off |" if args.variants else ""))
        print("|---|---|---|---|---|---|" + ("---|" if args.variants else ""))
        for name in args.backbones:
            bb = build_backbone(name, "none", args.image_size)
            opts = ExtractOptions(backbone=name, weights="none", image_size=args.image_size,
                                  batch_size=args.batch_size, workers=0, device="cpu")
            raw = raw_rate(bb, large, args.batch_size, True, args.repeats)
            pipe = pipeline_rate(small, large, opts, tmp, args.repeats)
            row = (f"| {name} | {bb.grid[0]}x{bb.grid[1]} x {bb.channels} | `{bb.token_layout}` | {pipe:.2f} | "
                   f"{raw:.2f} | {pipe / raw:.2f} |")
            if args.variants:
                row += f" {raw_rate(bb, large, args.batch_size, False, args.repeats):.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
