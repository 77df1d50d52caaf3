"""Val BLEU-4 / CIDEr of each decoder on real photos with real pretrained features.

Prepares ../shared/data/ucm (Karpathy json) and ../shared/data/viic (Vietnamese CSV) with the
default options (simple tokens, min count 5), extracts timm/tf_efficientnet_lite0 features with
the ImageNet weights in ../shared/weights, trains each model with default hyper-parameters and
prints a markdown table (best epoch by val CIDEr, greedy decoding).

Usage: .venv/bin/python benchmarks/quality.py [--work /tmp/captions-quality] [--epochs 10]
       [--models rnn,lstm,attn] [--sets ucm,viic]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from captions.features.extract import ExtractOptions, extract_features
from captions.pipeline.prepare import prepare
from captions.trainer.train import TrainConfig, train

SHARED = Path(__file__).resolve().parents[2] / "shared"
SETS = {"ucm": ("karpathy", "data/ucm/dataset_ucm.json"), "viic": ("csv", "data/viic/captions.csv")}
MODELS = {"rnn": {}, "lstm": {}, "attn": {}, "attn-additive": {"attention": "additive"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/captions-quality"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--models", default="rnn,lstm,attn")
    ap.add_argument("--sets", default="ucm,viic")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    weights = SHARED / "weights/tf_efficientnet_lite0.pth"
    rows = []
    for name in args.sets.split(","):
        fmt, src = SETS[name]
        data = args.work / name
        prepare(fmt, [SHARED / src], data, progress=False)
        cache = extract_features(data, None, ExtractOptions(backbone="timm/tf_efficientnet_lite0",
                                                            weights=str(weights)), progress=False)
        for model in args.models.split(","):
            run = args.work / "runs" / f"{name}-{model}-e{args.epochs}"
            cfg = TrainConfig(model=model.split("-")[0], epochs=args.epochs, **MODELS[model])
            t = time.perf_counter()
            result = train(data, cache, run, cfg, resume=True, progress=False)
            minutes = (time.perf_counter() - t) / 60
            best = result["best"]
            rows.append((name, model, best["epoch"], best["BLEU-4"], best["CIDEr"], minutes))
            print(json.dumps({"set": name, "model": model, **best, "minutes": round(minutes, 1)}), flush=True)
    print("\n| set | model | best epoch | val BLEU-4 | val CIDEr | train minutes |\n|---|---|---|---|---|---|")
    for name, model, ep, b4, cider, minutes in rows:
        print(f"| {name} | {model} | {ep} | {b4:.3f} | {cider:.3f} | {minutes:.1f} |")


if __name__ == "__main__":
    main()
