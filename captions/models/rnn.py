"""Decoders on the pooled feature: vanilla RNN and LSTM (one cuDNN/oneDNN call per sequence)."""

from __future__ import annotations

import torch
from torch import nn

from captions.models.base import CaptionDecoder, State
from captions.models.registry import LSTMConfig, RNNConfig


class RNNDecoder(CaptionDecoder):
    """Vanilla tanh RNN; h0 = affine projection of the pooled feature (N, C) -> (N, H)."""

    recurrent = nn.RNN

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__(cfg)
        self.init_h = nn.Linear(cfg.feature_dim, cfg.hidden_dim)
        self.rnn = self.recurrent(cfg.embed_dim, cfg.hidden_dim, batch_first=True)

    def _hidden0(self, feats: torch.Tensor):
        return self.init_h(feats).unsqueeze(0)  # (1, N, H)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor,
                image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """feats (N, C) (or (M, C) with ``image_index`` (N,)), tokens (N, T) -> logits (N, T, V).
        The whole sequence runs in one cuDNN/oneDNN call."""
        if image_index is not None:
            feats = feats.index_select(0, image_index)
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

    def __init__(self, cfg: LSTMConfig) -> None:
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
