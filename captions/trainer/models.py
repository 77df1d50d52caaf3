"""Caption decoders. One registry (``DECODERS``); each decoder runs in two modes:

* teacher forcing: ``forward(feats, tokens) -> (logits (N, T, V), alphas (N, T, P) or None)``
* step by step (decoding): ``init_state(feats) -> state``; ``step(tokens (B,), state) ->
  (logits (B, V), state, alpha (B, P) or None)``. ``state`` is a dict of batch-first tensors, so a
  beam search reorders it with ``index_select(0, idx)``.

``feats`` is the pooled feature (N, C) for ``rnn``/``lstm`` and the spatial feature (N, P, C) for
``attn`` (``uses_spatial`` says which).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from captions.pipeline.vocab import NULL_ID

State = dict[str, torch.Tensor]


@dataclass
class DecoderConfig:
    """Hyper-parameters shared by every decoder."""

    vocab_size: int
    feature_dim: int
    embed_dim: int = 256
    hidden_dim: int = 512
    dropout: float = 0.5  # before the output layer
    embed_dropout: float = 0.0  # on the word embeddings fed to the recurrent cell
    attention: str = "dot"  # attn only: dot | additive
    attention_dim: int = 256  # attn additive only
    feature_as_input: bool = False  # lstm only: Show and Tell (feature fed as the first input)


class CaptionDecoder(nn.Module):
    """Shared parts: word embedding and the output layer (with dropout before it)."""

    uses_spatial = False

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=NULL_ID)
        self.embed_drop = nn.Dropout(cfg.embed_dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(cfg.hidden_dim, cfg.vocab_size)

    def words(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (...) -> embeddings (..., E), with dropout while training."""
        return self.embed_drop(self.embed(tokens))

    def step(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State, torch.Tensor | None]:
        raise NotImplementedError

    def init_state(self, feats: torch.Tensor) -> State:
        raise NotImplementedError


class RNNDecoder(CaptionDecoder):
    """Vanilla tanh RNN; h0 = affine projection of the pooled feature (N, C) -> (N, H)."""

    recurrent = nn.RNN

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg)
        self.init_h = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.rnn = self.recurrent(cfg.embed_dim, cfg.hidden_dim, batch_first=True)

    def _hidden0(self, feats: torch.Tensor):
        return self.init_h(feats).unsqueeze(0)  # (1, N, H)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, None]:
        """feats (N, C), tokens (N, T) -> logits (N, T, V). The whole sequence runs in one cuDNN/oneDNN call."""
        hs, _ = self.rnn(self.words(tokens), self._hidden0(feats))
        return self.out(self.drop(hs)), None

    def init_state(self, feats: torch.Tensor) -> State:
        return {"h": self._hidden0(feats).squeeze(0)}

    def _pack(self, state: State):
        return state["h"].unsqueeze(0).contiguous()

    def _unpack(self, hidden) -> State:
        return {"h": hidden.squeeze(0)}

    def step(self, tokens: torch.Tensor, state: State):
        hs, hidden = self.rnn(self.words(tokens).unsqueeze(1), self._pack(state))
        return self.out(hs.squeeze(1)), self._unpack(hidden), None


class LSTMDecoder(RNNDecoder):
    """LSTM; h0 and c0 are affine projections of the pooled feature, or (``feature_as_input``,
    Show and Tell) zero with the projected feature fed as the first input."""

    recurrent = nn.LSTM

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__(cfg)
        if cfg.feature_as_input:
            del self.init_h
            self.feat_in = nn.Linear(cfg.feature_dim, cfg.embed_dim)
        else:
            self.init_c = nn.Linear(cfg.feature_dim, cfg.hidden_dim)

    def _hidden0(self, feats: torch.Tensor):
        if self.cfg.feature_as_input:
            _, hidden = self.rnn(self.feat_in(feats).unsqueeze(1))  # zero state, feature as input -1
            return hidden
        return self.init_h(feats).unsqueeze(0), self.init_c(feats).unsqueeze(0)

    def init_state(self, feats: torch.Tensor) -> State:
        h, c = self._hidden0(feats)
        return {"h": h.squeeze(0), "c": c.squeeze(0)}

    def _pack(self, state: State):
        return state["h"].unsqueeze(0).contiguous(), state["c"].unsqueeze(0).contiguous()

    def _unpack(self, hidden) -> State:
        return {"h": hidden[0].squeeze(0), "c": hidden[1].squeeze(0)}


class AttentionDecoder(CaptionDecoder):
    """Attention LSTM over spatial features (N, P, C).

    ``dot``: A = W_a f (N, P, H); weights = softmax(A h_{t-1} / sqrt(H)); x_attn = weights A;
    gates = W_x x_t + W_h h_{t-1} + W_attn x_attn + b.
    ``additive`` (Show, Attend and Tell): scores = v . tanh(W_f A + W_h' h_{t-1}), a sigmoid gate
    beta(h_{t-1}) scales the context, dropout before the output layer, and the doubly stochastic
    regulariser is computed by the trainer from the returned attention weights.
    h0 and c0 are affine projections of the mean feature in both.

    Per batch, everything that does not depend on h is computed once (A, W_x x_t for all t, and
    W_f A for additive); per step, W_h h and W_attn x_attn are one matrix product on [h, x_attn].
    (Folding W_attn into A, i.e. precomputing A W_attn^T, would cost P x 4H per image: more than
    it saves whenever there are more positions than words.)
    """

    uses_spatial = True

    def __init__(self, cfg: DecoderConfig) -> None:
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

    def _attend(self, h: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (context x_attn (N, H), attention weights (N, P))."""
        A = state["A"]
        if self.cfg.attention == "dot":
            scores = torch.bmm(A, h.unsqueeze(2)).squeeze(2) * self.scale
            alpha = torch.softmax(scores, dim=1)
            return torch.bmm(alpha.unsqueeze(1), A).squeeze(1), alpha
        scores = self.att_v(torch.tanh(state["A_att"] + self.att_h(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(scores, dim=1)
        return torch.bmm(alpha.unsqueeze(1), A).squeeze(1) * torch.sigmoid(self.gate(h)), alpha

    def _cell(self, x_gates: torch.Tensor, state: State) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h, c = state["h"], state["c"]
        context, alpha = self._attend(h, state)
        gates = x_gates.float() + self.W_hattn(torch.cat([h, context], dim=1)).float()
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c, alpha

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (N, P, C), tokens (N, T) -> logits (N, T, V), alphas (N, T, P)."""
        state = self.init_state(feats)
        x_gates = self.W_x(self.words(tokens))  # (N, T, 4H) in one matmul
        hs, alphas = [], []
        # unbind, not x_gates[:, t]: indexing would make backward write a full (N, T, 4H) zero tensor per step
        for x_t in x_gates.unbind(1):
            h, c, alpha = self._cell(x_t, state)
            state["h"], state["c"] = h, c
            hs.append(h)
            alphas.append(alpha)
        hs_t = torch.stack(hs, dim=1)
        return self.out(self.drop(hs_t)), torch.stack(alphas, dim=1)

    def step(self, tokens: torch.Tensor, state: State):
        h, c, alpha = self._cell(self.W_x(self.words(tokens)), state)
        new = dict(state)
        new["h"], new["c"] = h, c
        return self.out(h), new, alpha


DECODERS: dict[str, type[CaptionDecoder]] = {"rnn": RNNDecoder, "lstm": LSTMDecoder, "attn": AttentionDecoder}


def build_decoder(model: str, cfg: DecoderConfig) -> CaptionDecoder:
    """Instantiate decoder ``model`` (``rnn``, ``lstm`` or ``attn``)."""
    if model not in DECODERS:
        raise ValueError(f"unknown model '{model}' (choose one of: {', '.join(DECODERS)})")
    return DECODERS[model](cfg)


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "sum",
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Temporal softmax cross-entropy ignoring ``<NULL>`` targets.

    logits (N, T, V), targets (N, T). ``sum``: summed over time, averaged over the batch (the
    classic formulation); ``mean``: averaged over the non-null tokens.
    """
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                           ignore_index=NULL_ID, reduction="sum", label_smoothing=label_smoothing)
    if reduction == "sum":
        return flat / targets.shape[0]
    if reduction == "mean":
        return flat / (targets != NULL_ID).sum().clamp_min(1)
    raise ValueError(f"reduction must be sum or mean, got {reduction}")


def doubly_stochastic_penalty(alphas: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Show-Attend-Tell regulariser: sum over positions of (1 - sum_t alpha)^2, mean over the batch.

    alphas (N, T, P); only steps with a non-null target count.
    """
    mask = (targets != NULL_ID).unsqueeze(2).to(alphas.dtype)
    return ((1.0 - (alphas * mask).sum(dim=1)) ** 2).sum(dim=1).mean()
