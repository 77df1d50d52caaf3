"""Self-critical sequence training (Rennie et al. 2017): after cross-entropy training, sample
captions from the decoder and raise the probability of those that score a higher CIDEr-D than
the image's other samples (the mean of the others is the baseline, Luo 2020), so the model is
trained on the metric it is judged by, with its own outputs as inputs (no exposure bias).
"""

from __future__ import annotations

import numpy as np
import torch

from captions.cider import CiderD
from captions.generation import sample_captions
from captions.models.base import CaptionDecoder
from captions.pipeline.prepared import PreparedDataset
from captions.pipeline.vocab import END, NULL_ID, join_pieces


def train_references(ds: PreparedDataset, image_ids: np.ndarray) -> CiderD:
    """The CIDEr-D scorer of the rewards: each train image's reference captions, document
    frequencies over the train split.

    References and samples end with an ``<END>`` word, so n-grams that end a caption are scored
    as such: without it a caption cut off after "with some plants and" keeps most of the reward
    of a finished one, and self-critical training learns such bad endings.
    """
    return CiderD({int(i): [[*toks, END] for toks in ds.images[int(i)]["tokens"]] for i in image_ids})


def self_critical_loss(model: CaptionDecoder, feats: torch.Tensor, image_ids: np.ndarray, cider: CiderD,
                       idx_to_token: list[str], k: int, max_length: int) -> tuple[torch.Tensor, float]:
    """The policy-gradient loss of ``k`` sampled captions per image and their mean reward.

    feats (M, ...) of images ``image_ids`` (M,); ``cider`` scores word lists ending with ``<END>``
    when the sample has one (``train_references``). Each sample's advantage is its CIDEr-D minus the
    mean CIDEr-D of the image's other k - 1 samples; the loss is -advantage x log-probability,
    averaged over the sampled tokens (``<END>`` included).
    """
    tokens, logps = sample_captions(model, feats, k, max_length)
    rows = tokens.cpu().numpy()
    rewards = np.empty(len(rows))
    for r, (seq, image) in enumerate(zip(rows, np.repeat(image_ids, k), strict=True)):
        words = join_pieces([idx_to_token[t] for t in seq if t != NULL_ID])  # <END> included; subwords joined
        rewards[r] = cider.score(int(image), words)
    per_image = rewards.reshape(-1, k)
    baseline = (per_image.sum(1, keepdims=True) - per_image) / max(k - 1, 1)
    advantage = torch.from_numpy((per_image - baseline).reshape(-1)).to(logps)
    mask = (tokens != NULL_ID).to(logps)
    loss = -(advantage.unsqueeze(1) * logps * mask).sum() / mask.sum().clamp_min(1)
    return loss, float(rewards.mean())
