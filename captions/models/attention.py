"""The attention LSTM over spatial features: scaled dot-product or additive (Show, Attend and Tell)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from captions.models.base import CaptionDecoder, State, caption_slots
from captions.models.registry import AttnConfig
from captions.pipeline.vocab import END_ID, NULL_ID


class AttentionDecoder(CaptionDecoder):
    """Attention LSTM over spatial features (N, P, C).

    ``dot``: A = W_a f (N, P, H); weights = softmax(A h_{t-1} / sqrt(H)); x_attn = weights A;
    gates = W_x x_t + W_h h_{t-1} + W_attn x_attn + b.
    ``additive`` (Show, Attend and Tell): scores = v . tanh(W_f A + W_h' h_{t-1}), a sigmoid gate
    beta(h_{t-1}) scales the context, dropout before the output layer, and the doubly stochastic
    regulariser (``auxiliary_loss``) is computed from the returned attention weights.
    h0 and c0 are affine projections of the mean feature in both.

    Per batch, everything that does not depend on h is computed once (A, W_x x_t for all t (per
    vocabulary word when that is cheaper, see ``input_gates``), and W_f A for additive); per step,
    W_h h and W_attn x_attn are one matrix product on [h, x_attn].
    (Folding W_attn into A, i.e. precomputing A W_attn^T, would cost P x 4H per image: more than
    it saves whenever there are more positions than words.)
    """

    image_keys = ("A", "A_att")

    def __init__(self, cfg: AttnConfig) -> None:
        super().__init__(cfg)
        H = cfg.hidden_dim
        self.proj = nn.Linear(cfg.feature_dim, H)
        self.init_h = nn.Linear(cfg.feature_dim, H)
        self.init_c = nn.Linear(cfg.feature_dim, H)
        self.W_x = nn.Linear(cfg.embed_dim, 4 * H)  # carries the bias b
        self.W_hattn = nn.Linear(2 * H, 4 * H, bias=False)  # [W_h W_attn] applied to [h, x_attn]
        if cfg.attention == "additive":
            self.att_f = nn.Linear(H, cfg.attention_dim)
            self.att_h = nn.Linear(H, cfg.attention_dim, bias=False)
            self.att_v = nn.Linear(cfg.attention_dim, 1, bias=False)
            self.gate = nn.Linear(H, H)
        elif cfg.attention != "dot":
            raise ValueError(f"attention must be dot or additive, got {cfg.attention}")
        self.scale = 1.0 / math.sqrt(H)

    def init_state(self, feats: torch.Tensor) -> State:
        """feats (N, P, C) -> state with h, c (N, H), A (N, P, H) and the per-batch precomputations."""
        mean = feats.mean(dim=1)
        A = self.proj(feats)
        # h and c stay float32 under autocast: c accumulates over the whole caption
        state = {"h": self.init_h(mean).float(), "c": self.init_c(mean).float(), "A": A}
        if self.cfg.attention == "additive":
            state["A_att"] = self.att_f(A)  # (N, P, att)
        return state

    def input_gates(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) -> W_x x_t + b (..., 4H), float32 when looked up.

        When there are more tokens than words in the vocabulary (training batches on small
        vocabularies) and no embedding dropout, W_x E + b is computed once for the whole vocabulary
        (V, 4H) and looked up: one (V, E) x (E, 4H) product instead of an (N * T, E) one, forward
        and backward (ucm: 583 words vs about 2,700 tokens per batch). The table is float32 so that
        the gradients of frequent words accumulate in float32. ``<NULL>`` positions pass no
        gradient back in that form; ``forward`` never runs a step on them.
        """
        if (self.training and self.embed_drop.p > 0) or tokens.numel() <= self.cfg.vocab_size:
            return self.W_x(self.words(tokens))
        return F.embedding(tokens, self.W_x(self.embed.weight).float(), padding_idx=NULL_ID)

    def _attend(self, h: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """h (N, H) -> (context x_attn (N, H), attention weights (N, P)).

        ``state["A"]`` holds M = N / S images: the S consecutive rows of h that share an image
        attend over its positions in one (S, H) x (H, P) product, so A is read once per image
        (S = 1 when decoding).
        """
        A = state["A"]
        M, N = A.shape[0], h.shape[0]
        if self.cfg.attention == "dot":
            # A (h^T), not h A^T: oneDNN runs the (P, H) x (H, S) form 2x faster here
            scores = torch.bmm(A, h.view(M, N // M, -1).transpose(1, 2)).transpose(1, 2) * self.scale  # (M, S, P)
        else:
            hh = self.att_h(h).view(M, N // M, 1, -1)
            scores = self.att_v(torch.tanh(state["A_att"].unsqueeze(1) + hh)).squeeze(3)
        alpha = torch.softmax(scores, dim=2)
        context = torch.bmm(alpha, A).view(N, -1)
        if self.cfg.attention == "additive":
            context = context * torch.sigmoid(self.gate(h))
        return context, alpha.view(N, -1)

    def _lstm(self, x_gates: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
              context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One LSTM step: x_gates (B, 4H) = W_x x_t + b, h, c, context (B, H) -> new h, c (B, H)."""
        gates = x_gates.float() + self.W_hattn(torch.cat([h, context], dim=1)).float()
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor,
                image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (N, P, C) (or (M, P, C) with ``image_index`` (N,)), tokens (N, T) -> logits (N, T, V),
        alphas (N, T, P). With ``image_index`` the projections run once per image, not per caption.

        Only the steps that predict a word or ``<END>`` run: a caption's state stops changing at its
        ``<END>`` (or first ``<NULL>``) input, and its logits from there on are zero (the loss
        ignores them: their targets are ``<NULL>``).
        """
        state = self.init_state(feats)
        x_gates = self.input_gates(tokens)  # (N, T, 4H)
        targets = (tokens != NULL_ID) & (tokens != END_ID)  # the steps that predict a word or <END>
        live = targets
        slots = None
        if image_index is not None:
            S, slots = caption_slots(image_index, feats.shape[0])
            state = self.expand_state(state, S)
            if slots is not None:  # padding slots: zero input, never live, outputs never read
                x_gates = x_gates.new_zeros(len(state["h"]), *x_gates.shape[1:]).index_copy(0, slots, x_gates)
                live = live.new_zeros(len(state["h"]), live.shape[1]).index_copy(0, slots, live)
        live = live.cpu()  # one device sync per batch, not one per step
        h, c = state["h"], state["c"]
        hs, alphas = [], []
        # unbind, not x_gates[:, t]: indexing would make backward write a full (N, T, 4H) zero tensor per step
        for t, x_t in enumerate(x_gates.unbind(1)):
            context, alpha = self._attend(h, state)
            if bool(live[:, t].all()):
                h, c = self._lstm(x_t, h, c, context)
            else:
                rows = live[:, t].nonzero().squeeze(1).to(x_t.device, non_blocking=True)
                h_r, c_r = self._lstm(*(v.index_select(0, rows) for v in (x_t, h, c, context)))
                h, c = h.index_copy(0, rows, h_r), c.index_copy(0, rows, c_r)
            hs.append(h)
            alphas.append(alpha)
        hs_t, alphas_t = torch.stack(hs, dim=1), torch.stack(alphas, dim=1)
        if slots is not None:
            hs_t, alphas_t = hs_t.index_select(0, slots), alphas_t.index_select(0, slots)
        # the output layer (and its dropout) only where there is a target
        N, T = tokens.shape
        where = targets.flatten().nonzero().squeeze(1)
        logits = self.out(self.drop(hs_t.reshape(N * T, -1).index_select(0, where)))
        return logits.new_zeros(N * T, logits.shape[1]).index_copy(0, where, logits).view(N, T, -1), alphas_t

    def auxiliary_loss(self, alphas: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor | None:
        """Additive attention: ``ds_lambda`` x the doubly stochastic penalty of ``alphas`` (N, T, P)
        (``doubly_stochastic_penalty``); dot attention has none."""
        if self.cfg.attention != "additive" or self.cfg.ds_lambda <= 0 or alphas is None:
            return None
        return self.cfg.ds_lambda * doubly_stochastic_penalty(alphas.float(), targets)

    def step(self, tokens: torch.Tensor, state: State):
        context, alpha = self._attend(state["h"], state)
        h, c = self._lstm(self.input_gates(tokens), state["h"], state["c"], context)
        new = dict(state)
        new["h"], new["c"] = h, c
        return self.out(h), new, alpha


def doubly_stochastic_penalty(alphas: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Show-Attend-Tell regulariser: sum over positions of (1 - sum_t alpha)^2, mean over the batch.

    alphas (N, T, P); only steps with a non-null target count.
    """
    mask = (targets != NULL_ID).unsqueeze(2).to(alphas.dtype)
    return ((1.0 - (alphas * mask).sum(dim=1)) ** 2).sum(dim=1).mean()
