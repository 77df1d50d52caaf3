"""Speed of the Transformer decoder beside attn on real cached features: training captions/s
(cross-entropy steps on real batches) and decoding images/s (greedy and beam 3), with and without
the key/value cache, for captions of exactly ``--words`` words (``<END>`` is banned while timing).

Usage: .venv/bin/python benchmarks/transformer.py --data PREPARED_DIR --features CACHE
       [--steps 20] [--images 256] [--words 16] [--threads 1]
Prints a markdown table; ratios are within this one run (the VM's speed drifts between runs).
Times are this process's CPU seconds (``time.process_time``, one thread), so other processes
sharing the cores do not count; each decoding figure is the best of three passes.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from captions.features.cache import FeatureCache
from captions.generation import decode
from captions.models.base import caption_loss
from captions.models.checkpoint import build_decoder
from captions.models.registry import decoder_config
from captions.pipeline.prepared import load_prepared
from captions.pipeline.vocab import END_ID
from captions.trainer.data import FeatureStore, caption_tokens, epoch_batches, images_of_batch


def train_rate(model, ds, store, rows, steps: int) -> float:
    """Captions per second of ``steps`` cross-entropy steps (after 3 untimed ones)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    batches = epoch_batches(rows, ds.image_ids, 128, 0, 0)
    model.train()
    seen, t0 = 0, 0.0
    for k, r in enumerate(batches[: steps + 3]):
        if k == 3:
            seen, t0 = 0, time.process_time()
        images, index = images_of_batch(ds.image_ids[r])
        caps = caption_tokens(ds, r)
        logits, _ = model(store.gather(images), caps[:, :-1], image_index=torch.from_numpy(index))
        loss = caption_loss(logits, caps[:, 1:], "sum", 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(r)
    return seen / (time.process_time() - t0)


@torch.no_grad()
def decode_rate(model, store, ids: np.ndarray, words: int, beam: int, repeats: int = 3) -> float:
    """Images per second decoding ``ids`` 64 at a time, every caption ``words`` words long; the
    best of ``repeats`` passes (other processes on the VM only ever slow a pass down)."""
    model.eval()
    model.out.bias[END_ID] = -1e9
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for i in range(0, len(ids), 64):
            tokens, _, _ = decode(model, store.gather_sorted(ids[i : i + 64]), words, beam)
            assert tokens.shape[1] == words
        best = min(best, time.process_time() - t0)
    return len(ids) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--words", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds, cache = load_prepared(args.data), FeatureCache(args.features)
    store = FeatureStore(cache, True, 8 * 2**30, torch.device("cpu"))
    rows = ds.split_caption_rows("train")
    ids = ds.split_image_ids("val")[: args.images]
    print(f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
          f"{cache.metadata['backbone']} {cache.num_positions} positions x {cache.channels}")
    print("| decoder | train captions/s | greedy images/s | beam 3 images/s |")
    print("|---|---|---|---|")
    # the transformer's defaults, and without the encoder layer and whole-image input it had by default before
    decoders = [("attn", "attn", {}), ("transformer (defaults)", "transformer", {}),
                ("transformer, --encoder-layers 0 --no-global-feature", "transformer",
                 {"encoder_layers": 0, "global_feature": False})]
    for title, name, settings in decoders:
        torch.manual_seed(0)
        model = build_decoder(name, decoder_config(name, settings, vocab_size=len(ds.vocab),
                                                   feature_dim=cache.channels))
        train = train_rate(model, ds, store, rows, args.steps)
        runs = [(title, True)] if name == "attn" else [(title, True), (f"{title}, without the cache", False)]
        for label, cached in runs:
            model.use_kv_cache = cached
            greedy = decode_rate(model, store, ids, args.words, 1)
            beam = decode_rate(model, store, ids, args.words, 3)
            print(f"| {label} | {train:.0f} | {greedy:.1f} | {beam:.1f} |")


if __name__ == "__main__":
    main()
