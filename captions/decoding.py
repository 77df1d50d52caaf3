"""Batched decoding for every decoder in ``captions.trainer.models``: greedy and beam search.

Both run all images of a batch (and, for beam search, all their beams as one ``N * K`` batch)
through ``model.step`` together on the features' device, and neither lets one image influence
another, so results do not depend on the batch size. Both return the same triple:
tokens (N, max_length) with ``<NULL>`` after ``<END>``, summed log-probabilities (N,), and
attention maps (N, steps, P) or None.
"""

from __future__ import annotations

import torch

from captions.pipeline.vocab import END_ID, NULL_ID, START_ID
from captions.trainer.models import CaptionDecoder, select_state


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


def _normalised(scores: torch.Tensor, lengths: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """Summed log-probabilities divided by ``length ** length_penalty`` (0: plain sums)."""
    if length_penalty == 0:
        return scores
    return scores / lengths.clamp_min(1).to(scores.dtype) ** length_penalty


@torch.no_grad()
def beam_search(model: CaptionDecoder, feats: torch.Tensor, max_length: int, beam_size: int = 3,
                length_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Beam search for a batch of N images, all N * K hypotheses stepped as one batch.

    feats: (N, C) or (N, P, C) as the model expects; ``max_length`` counts steps (words + ``<END>``).
    Each step takes the ``K`` best continuations of every beam, then the ``K`` best of those ``K * K``
    per image; the decoder state is reordered with ``index_select``. A hypothesis that emits
    ``<END>`` is finished: it stays in its beam slot (extended by ``<NULL>`` at no cost) and is also
    remembered, so it survives being pushed out by better live hypotheses. The answer per image is
    the best finished hypothesis by ``score / length ** length_penalty`` (length counts ``<END>``;
    0 ranks by the plain sum); an image whose beams never emit ``<END>`` gets its best unfinished
    hypothesis (``max_length`` words) instead. ``beam_size=1`` is exactly greedy decoding.

    Returns tokens (N, max_length) (``<NULL>`` after ``<END>``), the chosen hypotheses' summed
    log-probabilities (N,) (not length-normalised), and their attention maps (N, steps, P) (zero
    after ``<END>``), or None for decoders without attention.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    n, k, dev = feats.shape[0], beam_size, feats.device
    state = model.init_state(feats)
    expand = torch.arange(n, device=dev).repeat_interleave(k)
    state = select_state(state, expand)
    tokens = torch.full((n * k,), START_ID, dtype=torch.long, device=dev)
    seqs = torch.full((n, k, max_length), NULL_ID, dtype=torch.long, device=dev)
    beam_scores = torch.zeros(n, k, device=dev)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first one
    finished = torch.zeros(n, k, dtype=torch.bool, device=dev)
    lengths = torch.zeros(n, k, dtype=torch.long, device=dev)
    maps: torch.Tensor | None = None  # (n, k, max_length, P)
    rows = torch.arange(n, device=dev).unsqueeze(1)  # (n, 1)

    best_norm = torch.full((n,), float("-inf"), device=dev)
    best_score = torch.zeros(n, device=dev)
    best_tokens = torch.full((n, max_length), NULL_ID, dtype=torch.long, device=dev)
    best_maps: torch.Tensor | None = None
    has_best = torch.zeros(n, dtype=torch.bool, device=dev)

    steps = 0
    for t in range(max_length):
        steps = t + 1
        logits, state, alpha = model.step(tokens, state)
        logp = torch.log_softmax(logits.float(), dim=-1).view(n, k, -1)
        vocab = logp.shape[-1]
        if bool(finished.any()):
            frozen = torch.full_like(logp, float("-inf"))
            frozen[..., NULL_ID] = 0.0
            logp = torch.where(finished.unsqueeze(-1), frozen, logp)
        per_beam = min(k, vocab)
        top_lp, top_tok = logp.topk(per_beam, dim=-1)  # (n, k, per_beam)
        cand = beam_scores.unsqueeze(-1) + top_lp
        beam_scores, flat = cand.view(n, -1).topk(k, dim=-1)  # (n, k), sorted best first
        parent = torch.div(flat, per_beam, rounding_mode="floor")
        new_tok = top_tok.view(n, -1).gather(1, flat)

        seqs = seqs[rows, parent]
        seqs[:, :, t] = new_tok
        was_finished = finished.gather(1, parent)
        lengths = lengths.gather(1, parent) + (~was_finished).long()
        finished = was_finished | (new_tok == END_ID)
        just = finished & ~was_finished
        flat_parent = (parent + rows * k).view(-1)
        state = select_state(state, flat_parent)
        if alpha is not None:
            if maps is None:
                maps = torch.zeros(n, k, max_length, alpha.shape[-1], device=dev, dtype=torch.float32)
                best_maps = torch.zeros(n, max_length, alpha.shape[-1], device=dev, dtype=torch.float32)
            maps = maps[rows, parent]
            maps[:, :, t] = alpha.float().view(n, k, -1)[rows, parent]
        tokens = new_tok.view(-1)

        if bool(just.any()):
            norm = _normalised(beam_scores, lengths, length_penalty).masked_fill(~just, float("-inf"))
            cand_norm, idx = norm.max(dim=1)
            better = cand_norm > best_norm
            best_norm = torch.where(better, cand_norm, best_norm)
            best_score = torch.where(better, beam_scores.gather(1, idx[:, None]).squeeze(1), best_score)
            best_tokens = torch.where(better[:, None], seqs[torch.arange(n, device=dev), idx], best_tokens)
            if maps is not None and best_maps is not None:
                best_maps = torch.where(better[:, None, None], maps[torch.arange(n, device=dev), idx], best_maps)
            has_best |= better
        if bool(finished.all()):
            break
        if length_penalty == 0 and bool(has_best.all()):
            # live scores only fall: once every image's best finished sum beats all its live beams, stop
            live_best = beam_scores.masked_fill(finished, float("-inf")).max(dim=1).values
            if bool((best_score >= live_best).all()):
                break

    # images whose beams never finished: best unfinished hypothesis
    fallback = _normalised(beam_scores, lengths, length_penalty).argmax(dim=1)
    ar = torch.arange(n, device=dev)
    out_tokens = torch.where(has_best[:, None], best_tokens, seqs[ar, fallback])
    out_scores = torch.where(has_best, best_score, beam_scores[ar, fallback])
    out_maps = None
    if maps is not None and best_maps is not None:
        out_maps = torch.where(has_best[:, None, None], best_maps, maps[ar, fallback])[:, :steps]
    return out_tokens, out_scores, out_maps


def decode(model: CaptionDecoder, feats: torch.Tensor, max_length: int, beam_size: int = 1,
           length_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Greedy decoding for ``beam_size`` 1, beam search otherwise (same outputs as ``beam_search``).

    feats (N, C) or (N, P, C) -> tokens (N, max_length), scores (N,), maps (N, steps, P) or None.
    """
    if beam_size == 1:
        return greedy_decode(model, feats, max_length)
    return beam_search(model, feats, max_length, beam_size, length_penalty)
