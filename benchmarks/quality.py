"""Val quality of each decoder and of the retrieval baseline on real photos with real features.

Prepares ../shared/data/ucm (Karpathy json) and ../shared/data/viic (Vietnamese CSV) with the
default options (simple tokens, min count 5), extracts timm/tf_efficientnet_lite0 features with
the ImageNet weights in ../shared/weights, trains each model with default hyper-parameters
(``captions train MODEL`` with no options; runs that exist are resumed or reused), evaluates the
best checkpoint (by val CIDEr) on val greedy and with beam 3 and 5 (``captions evaluate``), runs
``captions baseline nn``, and prints markdown tables of BLEU-1..4, METEOR (with Java), ROUGE-L
and CIDEr. Everything is also written to WORK/quality.json.

Usage: .venv/bin/python benchmarks/quality.py [--work /tmp/captions-quality]
       [--models rnn,lstm,attn,attn-additive] [--sets ucm,viic] [--epochs N] [--scst-epochs N]
       [--beams 1,3,5] [--nn-k 5,10]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from captions.baseline import evaluate_nn
from captions.evaluation import METRIC_ORDER, evaluate_checkpoint
from captions.features.extract import ExtractOptions, extract_features
from captions.pipeline.prepare import prepare
from captions.trainer.train import TrainConfig, train

SHARED = Path(__file__).resolve().parents[2] / "shared"
SETS = {"ucm": ("karpathy", "data/ucm/dataset_ucm.json"), "viic": ("csv", "data/viic/captions.csv")}
MODELS = {"rnn": {}, "lstm": {}, "attn": {}, "attn-additive": {"attention": "additive"}, "transformer": {}}


def train_minutes(run: Path) -> float:
    """Training time of a run (sum of its epochs' time_s, evaluation excluded), in minutes."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r["time_s"] for r in rows) / 60


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/captions-quality"))
    ap.add_argument("--epochs", type=int, default=None, help="default: captions train's default")
    ap.add_argument("--scst-epochs", type=int, default=None, help="default: captions train's default")
    ap.add_argument("--models", default="rnn,lstm,attn,attn-additive")
    ap.add_argument("--sets", default="ucm,viic")
    ap.add_argument("--beams", default="1,3,5")
    ap.add_argument("--nn-k", default="5,10")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    weights = SHARED / "weights/tf_efficientnet_lite0.pth"
    results = []
    for name in args.sets.split(","):
        fmt, src = SETS[name]
        data = args.work / name
        prepare(fmt, [SHARED / src], data, progress=False)
        cache = extract_features(data, None, ExtractOptions(backbone="timm/tf_efficientnet_lite0",
                                                            weights=str(weights)), progress=False)
        for model in args.models.split(","):
            cfg = TrainConfig.from_dict({"model": model.split("-")[0], **MODELS[model]})
            if args.epochs:
                cfg.epochs = args.epochs
            if args.scst_epochs is not None:
                cfg.scst_epochs = args.scst_epochs
            run = args.work / "runs" / f"{name}-{model}-e{cfg.epochs}-scst{cfg.scst_epochs}"
            t = time.perf_counter()
            result = train(data, cache, run, cfg, resume=True, progress=False)
            best = result["best"]
            base = {"set": name, "model": model, "best_epoch": best["epoch"], "epochs_run": result["epochs_run"],
                    "train_minutes": round(train_minutes(run), 1),
                    "wall_minutes_this_call": round((time.perf_counter() - t) / 60, 1)}
            for beam in [int(b) for b in args.beams.split(",")]:
                rec = evaluate_checkpoint(run / "best.pt", data, cache, split="val", beam_size=beam,
                                          out=run / f"eval-val-beam{beam}")
                results.append({**base, "decoding": "greedy" if beam == 1 else f"beam {beam}", **rec["metrics"]})
                print(json.dumps(results[-1]), flush=True)
        for k in [int(k) for k in args.nn_k.split(",")]:
            rec = evaluate_nn(data, cache, split="val", k=k, out=args.work / "runs" / f"{name}-nn-k{k}")
            results.append({"set": name, "model": f"nn (k={k})", "decoding": "retrieval", **rec["metrics"]})
            print(json.dumps(results[-1]), flush=True)
    (args.work / "quality.json").write_text(json.dumps(results, indent=1))
    keys = [k for k in METRIC_ORDER if any(k in r for r in results)]
    for name in args.sets.split(","):
        print(f"\n{name} (val)\n\n| model | decoding | best epoch | train min | " + " | ".join(keys) + " |")
        print("|---" * (4 + len(keys)) + "|")
        for r in results:
            if r["set"] == name:
                head = (f"| {r['model']} | {r['decoding']} | {r.get('best_epoch', '–')} "
                        f"| {r.get('train_minutes', '–')} | ")
                print(head + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
