"""Prepare throughput: images resized per second, 1 worker vs all cores, plus the whole prepare.

Usage: .venv/bin/python benchmarks/prepare.py [--data ../shared/data/viic] [--image-size 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from captions.data import read_csv_table
from captions.pipeline.prepare import PrepareOptions, prepare
from captions.pipeline.resize import resize_all, store_name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/viic")
    ap.add_argument("--image-size", type=int, default=256)
    args = ap.parse_args()
    csv = args.data / "captions.csv"
    records = read_csv_table(csv, None)
    n = len(records)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {n} images from {csv}")
    for workers in (1, os.cpu_count() or 1):
        with tempfile.TemporaryDirectory() as tmp:
            pairs = [(r.path, Path(tmp) / store_name(r.name)) for r in records]
            t = time.perf_counter()
            resize_all(pairs, args.image_size, workers=workers, progress=False)
            dt = time.perf_counter() - t
        print(f"resize to {args.image_size}px, workers={workers}: {n / dt:7.1f} images/s ({dt:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        prepare("csv", [csv], Path(tmp) / "out", options=PrepareOptions(image_size=args.image_size), progress=False)
        dt = time.perf_counter() - t
        t = time.perf_counter()
        prepare("csv", [csv], Path(tmp) / "out", options=PrepareOptions(image_size=args.image_size), progress=False)
        dt2 = time.perf_counter() - t
    print(f"whole prepare (parse, tokenize, vocab, resize, write): {n / dt:7.1f} images/s ({dt:.1f} s); "
          f"re-run no-op {dt2:.2f} s")


if __name__ == "__main__":
    main()
