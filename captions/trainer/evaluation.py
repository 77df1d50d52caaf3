"""The val evaluation after each epoch: teacher-forced loss and greedy BLEU-4 / CIDEr."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from captions.generation import caption_images
from captions.metrics import score_captions
from captions.models.base import CaptionDecoder, caption_loss
from captions.pipeline.prepared import PreparedDataset
from captions.trainer.data import FeatureStore, caption_tokens


def evaluate_split(model: CaptionDecoder, ds: PreparedDataset, store: FeatureStore, split: str, loss: str,
                   batch_size: int, device: torch.device, image_ids: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    """Teacher-forced ``loss`` ("sum" or "mean", without label smoothing) over caption ``rows``
    and greedy BLEU-4 / CIDEr of images ``image_ids`` of ``split``.

    Returns {"val_loss", "BLEU-4", "CIDEr", "samples": the first three predicted captions}; CIDEr
    is None when it is undefined (fewer than two images: ``captions.metrics.cider_defined``).
    Leaves the model in training mode.
    """
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            r = rows[i : i + batch_size]
            caps = caption_tokens(ds, r)
            logits, _ = model(store.gather_sorted(ds.image_ids[r]), caps[:, :-1].to(device))
            total += float(caption_loss(logits, caps[:, 1:].to(device), loss)) * len(r)
            count += len(r)
        preds = caption_images(model, image_ids, store.gather_sorted, ds.max_words + 1, ds.vocab.idx_to_token,
                               batch_size)
    # undefined CIDEr is not warned about each epoch: the end-of-epoch decision says once what it uses
    scores = score_captions(ds.references(split), preds, metrics=("bleu", "cider"), warn=False)
    model.train()
    return {"val_loss": total / max(count, 1), "BLEU-4": scores.get("BLEU-4", 0.0),
            "CIDEr": scores.get("CIDEr"), "samples": [preds[i] for i in list(preds)[:3]]}
