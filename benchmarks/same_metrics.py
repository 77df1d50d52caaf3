"""Behaviour check for refactors: train rnn, lstm, attn (dot) and attn (additive) on a small real
set with a fixed seed and print each run's ``metrics.jsonl`` without its timing columns, so two
versions of captions can be compared line by line.

The set is a ucm subset from ../shared (the first TRAIN train and VAL val images of
``dataset_ucm.json``), features from timm/tf_efficientnet_lite0 with the ImageNet weights in
../shared/weights. Each model trains ``--epochs`` cross-entropy and ``--scst-epochs``
self-critical epochs on one intra-op thread.

Usage (compare two checkouts on the same machine)::

    .venv/bin/python benchmarks/same_metrics.py --work /tmp/same-new > new.jsonl
    PYTHONPATH=/path/to/old/checkout .venv/bin/python benchmarks/same_metrics.py --work /tmp/same-old > old.jsonl
    diff old.jsonl new.jsonl && echo identical
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from captions.features.extract import ExtractOptions, extract_features
from captions.pipeline.prepare import prepare
from captions.trainer.train import TrainConfig, train

SHARED_DEFAULT = Path(__file__).resolve().parents[2] / "shared"
MODELS = {"rnn": {"model": "rnn"}, "lstm": {"model": "lstm"}, "attn": {"model": "attn"},
          "attn-additive": {"model": "attn", "attention": "additive"}}
TIMING = ("time_s", "captions_per_s")


def subset(shared: Path, work: Path, n_train: int, n_val: int) -> Path:
    """A Karpathy json of the first ``n_train`` train and ``n_val`` val images of ucm."""
    data = json.loads((shared / "data/ucm/dataset_ucm.json").read_text())
    keep, left = [], {"train": n_train, "val": n_val}
    for img in data["images"]:
        if left.get(img["split"], 0) > 0:
            left[img["split"]] -= 1
            keep.append(img)
    path = work / "dataset_ucm_subset.json"
    path.write_text(json.dumps({"dataset": "ucm", "images": keep}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--shared", type=Path, default=SHARED_DEFAULT, help="the team's shared/ folder")
    ap.add_argument("--train-images", type=int, default=300)
    ap.add_argument("--val-images", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--scst-epochs", type=int, default=2)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    shared = args.shared
    src = subset(shared, args.work, args.train_images, args.val_images)
    data = args.work / "prepared"
    prepare("karpathy", [src], data, images=shared / "data/ucm", progress=False)
    cache = extract_features(data, None, ExtractOptions(backbone="timm/tf_efficientnet_lite0", workers=0,
                                                        weights=str(shared / "weights/tf_efficientnet_lite0.pth")),
                             progress=False)
    for name in args.models.split(","):
        run = args.work / f"run-{name}"
        cfg = TrainConfig.from_dict({**MODELS[name], "epochs": args.epochs, "scst_epochs": args.scst_epochs,
                                     "batch_size": 64})
        if not (run / "last.pt").exists():
            train(data, cache, run, cfg, progress=False)
        for line in (run / "metrics.jsonl").read_text().splitlines():
            row = {k: v for k, v in json.loads(line).items() if k not in TIMING}
            print(json.dumps({"model": name, **row}, sort_keys=True))


if __name__ == "__main__":
    main()
