"""Training throughput: our decoders vs (a) a straightforward per-step implementation of the same
model and (b) an end-to-end loop that runs the frozen CNN on every batch (as classic tutorials do),
with our decoder (the cost of not caching, alone) and with (a) in fp32 (a tutorial's whole loop).

All on the same prepared dataset, cache and batch size; captions/s and tokens/s over a fixed
number of training steps (best of a few repeats: this VM shows CPU steal), and the epoch time
that implies.

Usage: .venv/bin/python benchmarks/train.py --data /tmp/captions-quality/ucm \
          --features /tmp/captions-quality/ucm/features-timm_tf_efficientnet_lite0-224.h5 \
          --weights ../shared/weights/tf_efficientnet_lite0.pth
(benchmarks/quality.py creates that dataset and cache.)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from captions.features.backbones import build_backbone
from captions.features.cache import FeatureCache
from captions.features.preprocess import normalize_batch, preprocess_image
from captions.models.base import caption_loss
from captions.models.checkpoint import build_decoder
from captions.models.registry import DecoderConfig, decoder_config
from captions.pipeline.prepared import load_prepared
from captions.pipeline.resize import load_rgb
from captions.pipeline.vocab import NULL_ID
from captions.runtime import retained_heap
from captions.trainer.control import train_precision
from captions.trainer.data import FeatureStore, caption_tokens, epoch_batches, images_of_batch

REPEATS = 3


class NaiveDecoder(nn.Module):
    """The same model written the straightforward way: a cell per step, features projected and the
    output layer applied inside the loop (like most tutorials)."""

    def __init__(self, kind: str, cfg: DecoderConfig) -> None:
        super().__init__()
        H = cfg.hidden_dim
        self.kind = kind
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.init_h = nn.Linear(cfg.feature_dim, H)
        self.init_c = nn.Linear(cfg.feature_dim, H)
        self.out = nn.Linear(H, cfg.vocab_size)
        if kind == "attn":
            self.proj = nn.Linear(cfg.feature_dim, H)
            self.cell = nn.LSTMCell(cfg.embed_dim + H, H)
        elif kind == "lstm":
            self.cell = nn.LSTMCell(cfg.embed_dim, H)
        else:
            self.cell = nn.RNNCell(cfg.embed_dim, H)

    def forward(self, feats, tokens, image_index=None):  # fed one feature row per caption: image_index is None
        mean = feats.mean(1) if self.kind == "attn" else feats
        h, c = self.init_h(mean), self.init_c(mean)
        logits = []
        for t in range(tokens.shape[1]):
            x = self.embed(tokens[:, t])
            if self.kind == "attn":
                A = self.proj(feats)  # re-projected every step
                alpha = torch.softmax((A @ h.unsqueeze(2)).squeeze(2) / A.shape[-1] ** 0.5, dim=1)
                ctx = (alpha.unsqueeze(2) * A).sum(1)
                h, c = self.cell(torch.cat([x, ctx], 1), (h, c))
            elif self.kind == "lstm":
                h, c = self.cell(x, (h, c))
            else:
                h = self.cell(x, h)
            logits.append(self.out(h))
        return torch.stack(logits, 1), None


def time_steps(model, get_batch, batches, steps: int, amp_dtype: torch.dtype | None) -> tuple[float, float]:
    """Best captions/s and tokens/s over REPEATS runs of ``steps`` training steps (under
    ``amp_dtype`` autocast when given, as ``captions train --precision`` runs them)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    best = (0.0, 0.0)
    amp = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    for _ in range(REPEATS):
        n_caps = n_tok = 0
        t = time.perf_counter()
        for rows in batches[:steps]:
            feats, caps, image_index = get_batch(rows)
            with amp:
                logits, _ = model(feats, caps[:, :-1], image_index=image_index)
            loss = caption_loss(logits, caps[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            n_caps += len(rows)
            n_tok += int((caps[:, 1:] != NULL_ID).sum())
        dt = time.perf_counter() - t
        if n_caps / dt > best[0]:
            best = (n_caps / dt, n_tok / dt)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--weights", default="none", help="backbone weights for the end-to-end baseline")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--e2e-steps", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = load_prepared(args.data)
    cache = FeatureCache(args.features)
    rows = ds.split_caption_rows("train")
    batches = epoch_batches(rows, ds.image_ids, args.batch_size, 0, 0)
    n_epoch = len(rows)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; {args.data.name}: "
          f"{n_epoch} train captions/epoch, batch {args.batch_size}, features {cache.metadata['backbone']} "
          f"{cache.num_positions}x{cache.channels}")
    amp_dtype = train_precision("auto", torch.device("cpu"))
    prec = "fp32" if amp_dtype is None else "bf16"
    print(f"ours and (a) under {prec} autocast (captions train --precision auto); (a) also in fp32, and (b) runs "
          f"the CNN in fp32 NCHW as the tutorials do")
    print(f"| model | ours captions/s | ours tokens/s | epoch | (a) per-step, {prec} | ours/(a) | (a) per-step, fp32 "
          "| ours/(a fp32) | (b) CNN every batch | ours/(b) | (b) with (a fp32) | ours/that |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    bb = build_backbone(cache.metadata["backbone"], args.weights, int(cache.metadata["image_size"]))
    cnn = bb.module.eval()
    for kind in ("rnn", "lstm", "attn"):
        cfg = decoder_config(kind, vocab_size=len(ds.vocab), feature_dim=cache.channels)
        ours = build_decoder(kind, cfg).train()
        store = FeatureStore(cache, ours.uses_spatial, 8 * 2**30, torch.device("cpu"))

        def from_cache(r, store=store):  # as captions train batches: each image once
            images, image_index = images_of_batch(ds.image_ids[r])
            return store.gather(images), caption_tokens(ds, r), torch.from_numpy(image_index)

        def per_caption(r, store=store):  # as the tutorials: an image's features once per caption
            return store.gather(ds.image_ids[r]), caption_tokens(ds, r), None

        def end_to_end(r, spatial=ours.uses_spatial):
            x = torch.stack([preprocess_image(load_rgb(ds.image_path(int(i))), bb.preprocessing)
                             for i in ds.image_ids[r]])
            with torch.no_grad():
                fmap = cnn(normalize_batch(x, bb.preprocessing))
            feats = fmap.flatten(2).transpose(1, 2) if spatial else fmap.mean(dim=(2, 3))
            return feats, caption_tokens(ds, r), None

        with retained_heap():  # as captions train runs
            fast = time_steps(ours, from_cache, batches, args.steps, amp_dtype)
            naive = time_steps(NaiveDecoder(kind, cfg).train(), per_caption, batches, max(3, args.steps // 4),
                               amp_dtype)
            naive32 = time_steps(NaiveDecoder(kind, cfg).train(), per_caption, batches, max(3, args.steps // 4),
                                 None)
            e2e = time_steps(ours, end_to_end, batches, args.e2e_steps, amp_dtype)
            tutorial = time_steps(NaiveDecoder(kind, cfg).train(), end_to_end, batches, args.e2e_steps, None)
        print(f"| {kind} | {fast[0]:.0f} | {fast[1]:.0f} | {n_epoch / fast[0]:.0f} s | {naive[0]:.0f} | "
              f"{fast[0] / naive[0]:.1f}x | {naive32[0]:.0f} | {fast[0] / naive32[0]:.1f}x | {e2e[0]:.1f} | "
              f"{fast[0] / e2e[0]:.0f}x | {tutorial[0]:.1f} | {fast[0] / tutorial[0]:.0f}x |", flush=True)

if __name__ == "__main__":
    main()
