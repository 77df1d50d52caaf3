"""Fine-tuning speed: images/s of a fine-tune-phase step (the backbone's upper blocks trained with
the decoder, from decoded crops) against the cached-feature step (the decoder alone, features
from the cache), and the decode rate one DataLoader worker gives.

The same real batches of a prepared dataset (whole images, ``--batch-size`` captions), the
default ``attn`` decoder, the trainer's own step code paths (``TunedEncoder.features``,
``FeatureStore.gather``, ``caption_loss``); each figure is the best of ``--repeats`` runs of
``--steps`` steps, timed with ``time.process_time`` (CPU time of this process: robust to other
jobs on a shared machine; with one thread it equals the wall time of an idle one).

Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/finetune_speed.py --data /tmp/q/ucm/ucm \
          --features /tmp/q/ucm/ucm/features-timm_tf_efficientnet_lite0-224.h5 \
          --weights ../shared/weights/tf_efficientnet_lite0.pth
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time

import numpy as np
import torch

from captions.features.cache import FeatureCache
from captions.features.extract import load_crops
from captions.models.base import caption_loss
from captions.models.checkpoint import build_decoder
from captions.models.registry import decoder_config
from captions.pipeline.prepared import load_prepared
from captions.trainer.data import FeatureStore, caption_tokens, epoch_batches, images_of_batch
from captions.trainer.encoder import TunedEncoder


def best_rate(work, batches: list[tuple[np.ndarray, np.ndarray]], repeats: int) -> float:
    """Images per CPU second of ``work(rows, images)`` over ``batches``, best of ``repeats``."""
    work(*batches[0])  # warm-up: allocator, lazy inits
    best = 0.0
    for _ in range(repeats):
        t0 = time.process_time()
        n = 0
        for rows, images in batches:
            work(rows, images)
            n += len(images)
        best = max(best, n / (time.process_time() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--weights", default="", help="the backbone's state_dict file, when the cache came from one")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blocks", default="-3,0", help="--fine-tune-from-block values to time")
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = load_prepared(args.data)
    cache = FeatureCache(args.features)
    device = torch.device("cpu")
    dec = build_decoder("attn", decoder_config("attn", {}, vocab_size=len(ds.vocab), feature_dim=cache.channels))
    opt = torch.optim.Adam(dec.parameters(), lr=1e-4)
    store = FeatureStore(cache, True, 8 * 2**30, device)
    rows = ds.split_caption_rows("train")
    batches = [(b, images_of_batch(ds.image_ids[b])[0])
               for b in epoch_batches(rows, ds.image_ids, args.batch_size, 0, 0)[: args.steps]]
    paths = [ds.image_path(i) for i in range(len(ds.images))]

    def decoder_step(rows: np.ndarray, feats: torch.Tensor, images: np.ndarray) -> torch.Tensor:
        caps = caption_tokens(ds, rows)
        _, index = images_of_batch(ds.image_ids[rows])
        logits, _ = dec(feats, caps[:, :-1], image_index=torch.from_numpy(index))
        return caption_loss(logits, caps[:, 1:], "sum", 0.1)

    def cached(rows, images):
        loss = decoder_step(rows, store.gather(images), images)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {len(batches)} batches of {args.batch_size} captions "
          f"({np.mean([len(i) for _, i in batches]):.1f} images each)")
    rates = {"cached-feature step": best_rate(cached, batches, args.repeats)}
    enc = None
    for k in [int(x) for x in args.blocks.split(",")]:
        enc = TunedEncoder(cache.spec, device, k, 1e-4, 1000, weights=args.weights or None)
        crops = {int(b[0]): load_crops(paths, images, enc.prep)[1] for b, images in batches}

        def tuned(rows, images, enc=enc, crops=crops):
            feats = enc.features(crops[int(rows[0])], True, contextlib.nullcontext())
            loss = decoder_step(rows, feats, images)
            opt.zero_grad(set_to_none=True)
            enc.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            enc.optimizer.step()

        rates[f"fine-tune step, from block {k}"] = best_rate(tuned, batches, args.repeats)
    rates["decode + crop (one worker)"] = best_rate(lambda rows, images: load_crops(paths, images, enc.prep),
                                                    batches, args.repeats)
    base = rates["cached-feature step"]
    print("| step | images/s | vs cached |\n|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {r:.1f} | {r / base:.3f}x |")


if __name__ == "__main__":
    main()
