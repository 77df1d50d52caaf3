"""Is one run's val CIDEr really higher than another's? A paired bootstrap over the images.

Takes the ``predictions.json`` of two or more runs on the same split (from ``captions evaluate
--out``), scores each image with CIDEr (document frequencies of the whole split, so the mean is
the corpus CIDEr), and for each pair resamples the images with replacement: it prints the
corpus CIDEr of each run, the difference of each pair, its 95 % interval and how often the
first run came out ahead. A difference whose interval spans 0 is within the noise of the split.

Usage: .venv/bin/python benchmarks/paired_cider.py --data DATASET_DIR [--split val]
       NAME=PREDICTIONS.json NAME=PREDICTIONS.json ... [--resamples 10000] [--seed 0]
NAME=A.json,B.json compares runs of one setting (e.g. seeds) by each image's mean CIDEr over them.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

from captions.errors import CaptionsError
from captions.fsutil import read_json
from captions.metrics import per_image_cider
from captions.pipeline.prepared import load_prepared


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[float, float, float, float]:
    """Mean of a - b (per-image scores of the same images, shape (N,)), its 2.5 and 97.5
    percentiles over ``resamples`` resamplings of the images, and the share where a > b."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = (a - b)[idx].mean(axis=1)
    return float((a - b).mean()), float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5)), \
        float((diffs > 0).mean())


def read_predictions(path: str) -> dict[int, str]:
    return {int(d["image_id"]): d["caption"] for d in read_json(path)}


def parse_run(ap: argparse.ArgumentParser, spec: str) -> tuple[str, list[str]]:
    """``NAME=A.json[,B.json...]`` -> (NAME, paths); a malformed one ends the program via ``ap.error``."""
    name, _, paths = spec.partition("=")
    files = paths.split(",")
    if not name or not all(files):
        ap.error(f"{spec!r}: expected NAME=PREDICTIONS.json[,MORE.json]")
    return name, files


def seed_mean(runs: list[dict[int, float]]) -> dict[int, float]:
    """Per-image CIDEr averaged over runs of one setting (seeds), on the images all of them scored."""
    ids = set.intersection(*(set(r) for r in runs))
    return {i: float(np.mean([r[i] for r in runs])) for i in ids}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="NAME=PREDICTIONS.json[,MORE.json]")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", default="val")
    ap.add_argument("--resamples", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    runs = dict(parse_run(ap, spec) for spec in args.runs)
    if len(runs) < 2 or len(runs) < len(args.runs):
        ap.error("give two or more runs, each NAME once")
    refs = load_prepared(args.data).references(args.split)
    scores: dict[str, dict[int, float]] = {}
    for name, paths in runs.items():
        scores[name] = seed_mean([per_image_cider(refs, read_predictions(p)) for p in paths])
        if not scores[name]:
            raise CaptionsError(f"{name}: no image of the {args.split} split is captioned (in all of its runs)")
        print(f"{name}: CIDEr {np.mean(list(scores[name].values())):.3f} over {len(scores[name])} images"
              + (f" (mean of {len(paths)} runs)" if len(paths) > 1 else ""))
    print("\n| A − B | difference | 95 % interval | A ahead in |\n|---|---|---|---|")
    for a, b in itertools.combinations(scores, 2):
        ids = sorted(set(scores[a]) & set(scores[b]))
        if not ids:
            raise CaptionsError(f"{a} and {b} caption no image in common")
        mean, lo, hi, ahead = paired_bootstrap(np.array([scores[a][i] for i in ids]),
                                               np.array([scores[b][i] for i in ids]), args.resamples, args.seed)
        print(f"| {a} − {b} | {mean:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {ahead:.0%} |")


if __name__ == "__main__":
    try:
        main()
    except CaptionsError as e:  # a missing, unreadable or foreign predictions file: one line, not a traceback
        sys.exit(f"error: {e}")
