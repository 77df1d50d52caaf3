"""Generation: one step loop for every decoder, with three strategies.

``generate(model, feats, max_length, strategy)`` runs ``model.step`` from ``<START>`` until every
caption has ended or ``max_length`` steps have run; the strategy picks each next token:

* ``Greedy()``: the most probable word (evaluation, the val CIDEr of training, ``beam_size=1``);
* ``Sample(k)``: k captions per image drawn from the model's distribution, keeping the graph of
  their log-probabilities (self-critical training, Rennie et al. 2017);
* ``Beam(k, length_penalty)``: beam search over all N * K hypotheses as one batch.

``Rules`` say what any strategy may choose, by masking each step's log-probabilities: never
``<NULL>`` or ``<START>``, ``<END>`` not before ``min_length`` words (default 1: no empty
caption), ``<UNK>`` only when allowed. All images of a batch step together on the features'
device and no image influences another, so greedy and beam results do not depend on the batch
size. ``decode`` and ``caption_images`` are the entry points of evaluation and captioning.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from captions.errors import CaptionsError
from captions.models.base import CaptionDecoder, State, select_state
from captions.pipeline.vocab import END_ID, NULL_ID, START_ID, UNK_ID, decode_captions

Decoded = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass
class Generated:
    """What a strategy returns. tokens (N, L) long with ``<NULL>`` after ``<END>``; scores (N,)
    summed log-probabilities; token_logp (N, L) per-token log-probabilities (zero after ``<END>``;
    with their graph for ``Sample``) or None; maps (N, steps, P) attention weights or None."""

    tokens: torch.Tensor
    scores: torch.Tensor
    token_logp: torch.Tensor | None = None
    maps: torch.Tensor | None = None


class Strategy:
    """How the next token is chosen. ``start`` gives the first state and input tokens;
    ``advance`` takes the step's log-probabilities (B, V) and returns the next input tokens, the
    (possibly reordered) state and whether generation is over; ``result`` returns ``Generated``."""

    def start(self, model: CaptionDecoder, feats: torch.Tensor, max_length: int) -> tuple[State, torch.Tensor]:
        raise NotImplementedError

    def advance(self, t: int, logp: torch.Tensor, state: State,
                alpha: torch.Tensor | None) -> tuple[torch.Tensor, State, bool]:
        raise NotImplementedError

    def result(self) -> Generated:
        raise NotImplementedError


@dataclass(frozen=True)
class Rules:
    """What every strategy may generate: never ``<NULL>`` or ``<START>``; ``<END>`` only after
    ``min_length`` words (label smoothing can leave ``<END>`` right after ``<START>`` more probable
    than any caption, and a wide beam then finds the empty caption); ``<UNK>`` only when
    ``allow_unk``. Applied by masking the step's log-probabilities (the kept ones are not
    renormalised, so scores stay the model's own log-probabilities)."""

    min_length: int = 1
    allow_unk: bool = True

    def banned(self, t: int, vocab_size: int) -> list[int]:
        """Token ids forbidden at step ``t`` (0-based: ``t`` words so far) of a ``vocab_size`` vocabulary."""
        banned = {NULL_ID, START_ID}
        if not self.allow_unk:
            banned.add(UNK_ID)
        if t < self.min_length:
            banned.add(END_ID)
        banned = {i for i in banned if i < vocab_size}
        if len(banned) >= vocab_size:  # a vocabulary without words: ending is the only way out
            banned.discard(END_ID)
        return sorted(banned)

    def mask(self, t: int, logp: torch.Tensor) -> torch.Tensor:
        """logp (B, V) of step ``t`` with the forbidden tokens at -inf (a new tensor; the graph is kept)."""
        idx = _index(tuple(self.banned(t, logp.shape[-1])), logp.device)
        return logp.index_fill(-1, idx, float("-inf"))


@functools.lru_cache(maxsize=32)
def _index(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # made once per device: a copy to the GPU at every step would wait for it
    return torch.tensor(ids, dtype=torch.long, device=device)


def generate(model: CaptionDecoder, feats: torch.Tensor, max_length: int, strategy: Strategy,
             rules: Rules | None = None) -> Generated:
    """The step loop: feats (N, C) or (N, P, C) as the model expects; ``max_length`` counts steps
    (words + ``<END>``). Every step's log-probabilities are masked by ``rules`` (default
    ``Rules()``) before the strategy chooses. Gradients flow only where the caller enables them."""
    rules = rules or Rules()
    state, tokens = strategy.start(model, feats, max_length)
    for t in range(max_length):
        logits, state, alpha = model.step(tokens, state)
        logp = rules.mask(t, torch.log_softmax(logits.float(), dim=-1))
        tokens, state, over = strategy.advance(t, logp, state, alpha)
        if over:
            break
    return strategy.result()


class _OnePerRow(Strategy):
    """Greedy and sampling: one caption per row, each row's token chosen by ``pick(logp)``."""

    def __init__(self, pick: Callable[[torch.Tensor], torch.Tensor], per_image: int = 1) -> None:
        self.pick, self.k = pick, per_image

    def start(self, model, feats, max_length):
        state = model.init_state(feats)
        if self.k > 1:
            state = model.expand_state(state, self.k)
        n = feats.shape[0] * self.k
        self.done = torch.zeros(n, dtype=torch.bool, device=feats.device)
        self.scores = torch.zeros(n, device=feats.device)
        self.seqs: list[torch.Tensor] = []
        self.logps: list[torch.Tensor] = []
        self.alphas: list[torch.Tensor] = []
        return state, torch.full((n,), START_ID, dtype=torch.long, device=feats.device)

    def advance(self, t, logp, state, alpha):
        tokens = self.pick(logp).masked_fill(self.done, NULL_ID)
        token_logp = logp.gather(1, tokens.unsqueeze(1)).squeeze(1).masked_fill(self.done, 0.0)
        self.scores = self.scores + token_logp.detach()
        self.seqs.append(tokens)
        self.logps.append(token_logp)
        if alpha is not None:
            self.alphas.append(alpha)
        self.done = self.done | (tokens == END_ID)
        return tokens, state, bool(self.done.all())

    def result(self) -> Generated:
        maps = torch.stack(self.alphas, dim=1) if self.alphas else None
        return Generated(torch.stack(self.seqs, dim=1), self.scores, torch.stack(self.logps, dim=1), maps)


def Greedy() -> Strategy:  # noqa: N802 - reads as a strategy's name
    """The most probable next word at every step."""
    return _OnePerRow(lambda logp: logp.max(dim=-1).indices)


def Sample(per_image: int = 1) -> Strategy:  # noqa: N802
    """``per_image`` captions per image (each image's consecutive), every word drawn from the
    model's distribution; the token log-probabilities keep their graph."""
    return _OnePerRow(lambda logp: torch.multinomial(logp.detach().exp(), 1).squeeze(1), per_image)


@torch.no_grad()
def greedy_decode(model: CaptionDecoder, feats: torch.Tensor, max_length: int, rules: Rules | None = None) -> Decoded:
    """Greedy captions for a batch: feats (N, C) or (N, P, C) -> tokens (N, max_length) (``<NULL>``
    after ``<END>``), summed log-probabilities (N,), attention maps (N, steps, P) or None.
    ``rules``: what may be generated (default ``Rules()``)."""
    out = generate(model, feats, max_length, Greedy(), rules)
    tokens = torch.full((out.tokens.shape[0], max_length), NULL_ID, dtype=torch.long, device=feats.device)
    tokens[:, : out.tokens.shape[1]] = out.tokens
    return tokens, out.scores, out.maps


def sample_captions(model: CaptionDecoder, feats: torch.Tensor, k: int, max_length: int,
                    rules: Rules | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``k`` captions per image, keeping the graph of their log-probabilities.

    feats (M, C) or (M, P, C). Returns tokens (M * k, L) (each image's k samples consecutive,
    ``<NULL>`` after ``<END>``, L <= max_length) and the log-probability of each sampled token
    (M * k, L), zero after ``<END>``. Words are drawn among those ``rules`` allow (default ``Rules()``).
    """
    out = generate(model, feats, max_length, Sample(k), rules)
    assert out.token_logp is not None
    return out.tokens, out.token_logp


def _normalised(scores: torch.Tensor, lengths: torch.Tensor, length_penalty: float) -> torch.Tensor:
    """Summed log-probabilities divided by ``length ** length_penalty`` (0: plain sums)."""
    if length_penalty == 0:
        return scores
    return scores / lengths.clamp_min(1).to(scores.dtype) ** length_penalty


class Beam(Strategy):
    """Beam search, all N * K hypotheses stepped as one batch.

    Each step takes the ``K`` best continuations of every beam, then the ``K`` best of those
    ``K * K`` per image; the decoder state is reordered with ``index_select``. A hypothesis that
    emits ``<END>`` is finished: it stays in its beam slot (extended by ``<NULL>`` at no cost) and
    is also remembered, so it survives being pushed out by better live hypotheses. The answer per
    image is the best finished hypothesis by ``score / length ** length_penalty`` (length counts
    ``<END>``; 0 ranks by the plain sum); an image whose beams never emit ``<END>`` gets its best
    unfinished hypothesis instead. ``beam_size=1`` gives exactly the greedy captions.
    """

    def __init__(self, beam_size: int = 3, length_penalty: float = 0.0) -> None:
        if beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {beam_size}")
        self.k, self.length_penalty = beam_size, length_penalty

    def start(self, model, feats, max_length):
        n, k, dev = feats.shape[0], self.k, feats.device
        self.n, self.dev, self.steps = n, dev, 0
        state = select_state(model.init_state(feats), torch.arange(n, device=dev).repeat_interleave(k))
        self.seqs = torch.full((n, k, max_length), NULL_ID, dtype=torch.long, device=dev)
        self.beam_scores = torch.zeros(n, k, device=dev)
        self.beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first one
        self.finished = torch.zeros(n, k, dtype=torch.bool, device=dev)
        self.lengths = torch.zeros(n, k, dtype=torch.long, device=dev)
        self.maps: torch.Tensor | None = None  # (n, k, max_length, P)
        self.rows = torch.arange(n, device=dev).unsqueeze(1)  # (n, 1)
        self.best_norm = torch.full((n,), float("-inf"), device=dev)
        self.best_score = torch.zeros(n, device=dev)
        self.best_tokens = torch.full((n, max_length), NULL_ID, dtype=torch.long, device=dev)
        self.best_maps: torch.Tensor | None = None
        self.has_best = torch.zeros(n, dtype=torch.bool, device=dev)
        return state, torch.full((n * k,), START_ID, dtype=torch.long, device=dev)

    def advance(self, t, logp, state, alpha):
        n, k, rows = self.n, self.k, self.rows
        self.steps = t + 1
        logp = logp.view(n, k, -1)
        if bool(self.finished.any()):
            frozen = torch.full_like(logp, float("-inf"))
            frozen[..., NULL_ID] = 0.0
            logp = torch.where(self.finished.unsqueeze(-1), frozen, logp)
        per_beam = min(k, logp.shape[-1])
        top_lp, top_tok = logp.topk(per_beam, dim=-1)  # (n, k, per_beam)
        cand = self.beam_scores.unsqueeze(-1) + top_lp
        self.beam_scores, flat = cand.view(n, -1).topk(k, dim=-1)  # (n, k), sorted best first
        parent = torch.div(flat, per_beam, rounding_mode="floor")
        new_tok = top_tok.view(n, -1).gather(1, flat)
        self.seqs = self.seqs[rows, parent]
        self.seqs[:, :, t] = new_tok
        was_finished = self.finished.gather(1, parent)
        self.lengths = self.lengths.gather(1, parent) + (~was_finished).long()
        self.finished = was_finished | (new_tok == END_ID)
        state = select_state(state, (parent + rows * k).view(-1))
        if alpha is not None:
            self._follow_maps(t, parent, alpha)
        just = self.finished & ~was_finished
        if bool(just.any()):
            self._remember(just)
        return new_tok.view(-1), state, self._over()

    def _follow_maps(self, t: int, parent: torch.Tensor, alpha: torch.Tensor) -> None:
        n, k, rows = self.n, self.k, self.rows
        if self.maps is None:
            self.maps = torch.zeros(n, k, self.seqs.shape[2], alpha.shape[-1], device=self.dev, dtype=torch.float32)
            self.best_maps = torch.zeros(n, self.seqs.shape[2], alpha.shape[-1], device=self.dev,
                                         dtype=torch.float32)
        self.maps = self.maps[rows, parent]
        self.maps[:, :, t] = alpha.float().view(n, k, -1)[rows, parent]

    def _remember(self, just: torch.Tensor) -> None:
        """Keep each image's best hypothesis among those that finished at this step."""
        ar = torch.arange(self.n, device=self.dev)
        norm = _normalised(self.beam_scores, self.lengths, self.length_penalty).masked_fill(~just, float("-inf"))
        cand_norm, idx = norm.max(dim=1)
        better = cand_norm > self.best_norm
        self.best_norm = torch.where(better, cand_norm, self.best_norm)
        self.best_score = torch.where(better, self.beam_scores.gather(1, idx[:, None]).squeeze(1), self.best_score)
        self.best_tokens = torch.where(better[:, None], self.seqs[ar, idx], self.best_tokens)
        if self.maps is not None and self.best_maps is not None:
            self.best_maps = torch.where(better[:, None, None], self.maps[ar, idx], self.best_maps)
        self.has_best |= better

    def _over(self) -> bool:
        if bool(self.finished.all()):
            return True
        if self.length_penalty == 0 and bool(self.has_best.all()):
            # live scores only fall: once every image's best finished sum beats all its live beams, stop
            live_best = self.beam_scores.masked_fill(self.finished, float("-inf")).max(dim=1).values
            return bool((self.best_score >= live_best).all())
        return False

    def result(self) -> Generated:
        ar = torch.arange(self.n, device=self.dev)
        fallback = _normalised(self.beam_scores, self.lengths, self.length_penalty).argmax(dim=1)
        tokens = torch.where(self.has_best[:, None], self.best_tokens, self.seqs[ar, fallback])
        scores = torch.where(self.has_best, self.best_score, self.beam_scores[ar, fallback])
        maps = None
        if self.maps is not None and self.best_maps is not None:
            maps = torch.where(self.has_best[:, None, None], self.best_maps, self.maps[ar, fallback])[:, : self.steps]
        return Generated(tokens, scores, None, maps)


@torch.no_grad()
def beam_search(model: CaptionDecoder, feats: torch.Tensor, max_length: int, beam_size: int = 3,
                length_penalty: float = 0.0, rules: Rules | None = None) -> Decoded:
    """Beam search for a batch of N images (``Beam``): feats (N, C) or (N, P, C) -> tokens
    (N, max_length) (``<NULL>`` after ``<END>``), the chosen hypotheses' summed log-probabilities
    (N,) (not length-normalised), attention maps (N, steps, P) (zero after ``<END>``) or None.
    ``rules``: what may be generated (default ``Rules()``). Raises ``ValueError`` for ``beam_size`` < 1."""
    out = generate(model, feats, max_length, Beam(beam_size, length_penalty), rules)
    return out.tokens, out.scores, out.maps


def decode(model: CaptionDecoder, feats: torch.Tensor, max_length: int, beam_size: int = 1,
           length_penalty: float = 0.0, rules: Rules | None = None) -> Decoded:
    """Greedy decoding for ``beam_size`` 1, beam search otherwise (same outputs as ``beam_search``).

    feats (N, C) or (N, P, C) -> tokens (N, max_length), scores (N,), maps (N, steps, P) or None;
    ``rules``: what may be generated (default ``Rules()``). Raises ``CaptionsError`` for a minimum
    length no caption can have within ``max_length`` steps, or a length penalty that is not a
    finite number.
    """
    if rules is not None and rules.min_length >= max_length:
        raise CaptionsError(f"--min-length {rules.min_length} leaves no room for <END>: captions of this "
                            f"checkpoint have at most {max_length - 1} words")
    if not math.isfinite(length_penalty):
        raise CaptionsError(f"--length-penalty must be a finite number, got {length_penalty}")
    if beam_size == 1:
        return greedy_decode(model, feats, max_length, rules)
    return beam_search(model, feats, max_length, beam_size, length_penalty, rules)


def caption_images(model: CaptionDecoder, image_ids: np.ndarray, features: Callable[[np.ndarray], torch.Tensor],
                   max_length: int, idx_to_token: Sequence[str], batch_size: int = 64, beam_size: int = 1,
                   length_penalty: float = 0.0, on_batch: Callable[[int], None] | None = None,
                   rules: Rules | None = None) -> dict[int, str]:
    """Caption images ``image_ids`` (B,) ``batch_size`` at a time: ``features(ids)`` gives their
    features as the model expects; returns image id -> caption (space-joined words).
    ``on_batch(n)`` is called after each batch of n images (progress bars); ``rules``: what may be
    generated (default ``Rules()``)."""
    preds: dict[int, str] = {}
    for i in range(0, len(image_ids), batch_size):
        batch = image_ids[i : i + batch_size]
        tokens, _, _ = decode(model, features(batch), max_length, beam_size, length_penalty, rules)
        for img, text in zip(batch.tolist(), decode_captions(tokens.cpu(), idx_to_token), strict=True):
            preds[img] = text
        if on_batch is not None:
            on_batch(len(batch))
    return preds
