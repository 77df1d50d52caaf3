"""Batched decoding for every decoder in ``captions.trainer.models`` (greedy here; beam search in issue 5)."""

from __future__ import annotations

import torch

from captions.pipeline.vocab import END_ID, NULL_ID, START_ID
from captions.trainer.models import CaptionDecoder


@torch.no_grad()
def greedy_decode(model: CaptionDecoder, feats: torch.Tensor, max_length: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Greedy captions for a batch.

    feats: (N, C) or (N, P, C) as the model expects. Returns tokens (N, max_length) (``<NULL>``
    after ``<END>``), summed log-probabilities (N,), and attention maps (N, max_length, P) or None.
    """
    state = model.init_state(feats)
    n = feats.shape[0]
    tokens = torch.full((n,), START_ID, dtype=torch.long, device=feats.device)
    out = torch.full((n, max_length), NULL_ID, dtype=torch.long, device=feats.device)
    scores = torch.zeros(n, device=feats.device)
    done = torch.zeros(n, dtype=torch.bool, device=feats.device)
    alphas = []
    for t in range(max_length):
        logits, state, alpha = model.step(tokens, state)
        logp = torch.log_softmax(logits.float(), dim=-1)
        best, tokens = logp.max(dim=-1)
        scores += torch.where(done, torch.zeros_like(best), best)
        out[:, t] = torch.where(done, torch.full_like(tokens, NULL_ID), tokens)
        if alpha is not None:
            alphas.append(alpha)
        done |= tokens == END_ID
        if bool(done.all()):
            break
    maps = torch.stack(alphas, dim=1) if alphas else None
    return out, scores, maps
