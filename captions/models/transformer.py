"""A pre-norm Transformer decoder over the spatial features (Vaswani et al. 2017; as a captioner,
the "Transformer" of ruotianluo/self-critical.pytorch), with a key/value cache for generation.

Features (N, P, C) are projected to ``d_model`` (optionally refined by a small pre-norm
Transformer encoder, ``encoder_layers``) and form the memory. Each of ``layers`` blocks runs masked
self-attention over the caption, cross-attention over the memory and a feed-forward network, each
as x + dropout(sublayer(LayerNorm(x))) (dropout on the residual branches, inside the feed-forward
network and on the words; not on the attention weights, whose CPU dropout costs more than it
helps here); a final LayerNorm precedes the output layer (tied to the
word embedding with ``tie_embeddings``). Attention is ``torch.nn.functional.scaled_dot_product_attention``;
the last block's cross-attention weights, averaged over heads, are the attention map of each
generated word. With ``global_feature`` a projection of the mean feature (the whole image) is
added to every word's input, as attn's LSTM state starts from that mean.

Generation keeps, per block, the keys and values of the words so far (``k{l}``/``v{l}``) and of
the memory (``mk{l}``/``mv{l}``, one row per image: ``image_keys``), so a step costs one word, not
a re-run of the prefix. ``use_kv_cache = False`` (set before ``init_state``) keeps neither: each
step projects the memory's keys and values again and re-runs the whole prefix, as a decoder without
a cache does (``use_cache=False`` in Hugging Face's); the cache is tested and timed against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from captions.models.base import CaptionDecoder, MaskDropout, State, caption_slots
from captions.models.registry import TransformerConfig
from captions.pipeline.vocab import NULL_ID


def sinusoid_table(positions: int, dim: int) -> torch.Tensor:
    """The fixed sinusoidal position encodings of Vaswani et al. (2017): (positions, dim) float32."""
    pos = torch.arange(positions, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(positions, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, d) -> (B, heads, T, d / heads)."""
    B, T, d = x.shape
    return x.view(B, T, heads, d // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, T, dh) -> (B, T, heads * dh)."""
    B, h, T, dh = x.shape
    return x.transpose(1, 2).reshape(B, T, h * dh)


class DecoderBlock(nn.Module):
    """One pre-norm block: masked self-attention, cross-attention over the memory, feed-forward."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_self, self.qkv, self.self_out = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln_cross, self.q, self.kv, self.cross_out = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, 2 * d), \
            nn.Linear(d, d)
        self.ln_ffn = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn), nn.GELU(), MaskDropout(dropout), nn.Linear(ffn, d))
        self.drop = MaskDropout(dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (M, P, d) -> this block's cross-attention keys and values, each (M, heads, P, dh)."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        # contiguous once here: attention would otherwise copy them at every generation step
        return _heads(k, self.heads).contiguous(), _heads(v, self.heads).contiguous()

    def forward(self, x: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None, need_weights: bool = False
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]:
        """x (B, T, d) words; mem_k, mem_v (M, heads, P, dh) with B = M * S (the S consecutive rows of
        x that share an image attend over its memory together); ``past``: the keys and values of the
        words before x, (B, heads, t, dh) each, or None (then x is the whole prefix, causally masked).

        Returns x (B, T, d), the words' keys and values so far, and the cross-attention weights
        averaged over heads (B, T, P) when ``need_weights``.
        """
        q, k, v = (_heads(t, self.heads) for t in self.qkv(self.ln_self(x)).chunk(3, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=past is None and x.shape[1] > 1)
        x = x + self.drop(self.self_out(_merge(a)))
        weights, a = self._cross(x, mem_k, mem_v, need_weights)
        x = x + self.drop(self.cross_out(a))
        x = x + self.drop(self.ffn(self.ln_ffn(x)))
        return x, (k, v), weights

    def _cross(self, x: torch.Tensor, mem_k: torch.Tensor, mem_v: torch.Tensor,
               need_weights: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Cross-attention of x (M * S, T, d) over the memory of its M images -> (weights (B, T, P)
        or None, context (B, T, d))."""
        B, T, d = x.shape
        M = mem_k.shape[0]
        S = B // M
        q = self.q(self.ln_cross(x)).view(M, S * T, self.heads, d // self.heads).transpose(1, 2)
        if not need_weights:
            a = F.scaled_dot_product_attention(q, mem_k, mem_v)
            return None, a.transpose(1, 2).reshape(B, T, d)
        # the attention map is wanted: the same product, with its weights kept
        w = torch.softmax(q @ mem_k.transpose(-2, -1) * (q.shape[-1] ** -0.5), dim=-1)  # (M, h, S*T, P)
        a = (w @ mem_v).transpose(1, 2).reshape(B, T, d)
        return w.mean(dim=1).reshape(B, T, -1), a


class TransformerDecoder(CaptionDecoder):
    """``captions train transformer``: see the module docstring. feats are spatial (N, P, C)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg)
        cfg.check()  # ValueError when the heads do not divide d_model
        d = cfg.d_model
        nn.init.normal_(self.embed.weight, std=d ** -0.5)  # scaled by sqrt(d) on the way in
        with torch.no_grad():
            self.embed.weight[NULL_ID].zero_()
        if cfg.tie_embeddings:
            self.out.weight = self.embed.weight
        self.proj = nn.Linear(cfg.feature_dim, d)
        self.memory_drop = MaskDropout(cfg.memory_dropout)
        layer = nn.TransformerEncoderLayer(d, cfg.heads, cfg.ffn_dim, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False) \
            if cfg.encoder_layers else None
        self.ln_memory = nn.LayerNorm(d)
        self.global_proj = nn.Linear(cfg.feature_dim, d) if cfg.global_feature else None
        self.blocks = nn.ModuleList(DecoderBlock(d, cfg.heads, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.layers))
        self.ln_out = nn.LayerNorm(d)
        self.word_drop = MaskDropout(cfg.dropout)
        if cfg.positions == "learned":
            self.positions = nn.Embedding(cfg.max_positions, d)
        else:
            self.register_buffer("position_table", sinusoid_table(cfg.max_positions, d), persistent=False)
        self.use_kv_cache = True
        self.image_keys = (*(f"m{kv}{i}" for i in range(cfg.layers) for kv in "kv"), "memory", "global")

    @property
    def warmup_steps(self) -> int:
        return self.cfg.warmup_steps

    def encode(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (M, P, C) -> memory (M, P, d)."""
        memory = self.memory_drop(self.proj(feats))
        if self.encoder is not None:
            memory = self.encoder(memory)
        return self.ln_memory(memory)

    def global_input(self, feats: torch.Tensor) -> torch.Tensor | None:
        """feats (M, P, C) -> the projected mean feature (M, d) added to every word's input, or None
        without ``global_feature``."""
        return None if self.global_proj is None else self.global_proj(feats.mean(dim=1))

    def embed_words(self, tokens: torch.Tensor, start: int | torch.Tensor = 0,
                    image: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) at positions start.. start + T - 1 -> (B, T, d), scaled, positioned, plus
        ``image`` (B, d) (``global_input`` per row) when given, dropped out."""
        positions = torch.arange(tokens.shape[1], device=tokens.device) + start
        if self.cfg.positions == "learned":
            pos = self.positions(positions)
        else:
            pos = self.position_table[positions].to(self.embed.weight.dtype)
        x = self.embed_drop(self.embed(tokens)) * math.sqrt(self.cfg.d_model) + pos
        if image is not None:
            x = x + image.unsqueeze(1)
        return self.word_drop(x)

    def _decode(self, x: torch.Tensor, memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
                past: list | None = None, need_weights: bool = False):
        """Run the blocks: -> (hidden (B, T, d) after the final LayerNorm, keys/values per block,
        the last block's cross-attention weights or None)."""
        kvs, weights = [], None
        for i, (block, (mk, mv)) in enumerate(zip(self.blocks, memory_kv, strict=True)):
            last = i == len(self.blocks) - 1
            x, kv, w = block(x, mk, mv, None if past is None else past[i], need_weights and last)
            kvs.append(kv)
            weights = w if last else weights
        return self.ln_out(x), kvs, weights

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor,
                image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Teacher forcing: feats (N, P, C) (or (M, P, C) with ``image_index`` (N,)), tokens (N, T)
        -> logits (N, T, V), None. With ``image_index`` the memory and its keys and values are
        computed once per image and each image's captions attend over it together."""
        memory_kv = [b.memory_kv(self.encode(feats)) for b in self.blocks]
        image = self.global_input(feats)
        if image is not None and image_index is not None:
            image = image.index_select(0, image_index)
        x = self.embed_words(tokens, image=image)
        slots = None
        if image_index is not None:
            S, slots = caption_slots(image_index, feats.shape[0])
            if slots is not None:  # padding slots: <NULL> words, their outputs never read
                x = x.new_zeros(feats.shape[0] * S, *x.shape[1:]).index_copy(0, slots, x)
        h, _, _ = self._decode(x, memory_kv)
        if slots is not None:
            h = h.index_select(0, slots)
        return self.out(h), None

    def init_state(self, feats: torch.Tensor) -> State:
        """feats (N, P, C) -> with the cache, the memory's keys and values per block (N, heads, P, dh)
        and empty word caches (N, heads, 0, dh), whose length is the position of the next word;
        without it, the memory (N, P, d) and the words so far (N, 0); with ``global_feature`` also
        ``global`` (N, d), one row per image like the memory."""
        memory = self.encode(feats)
        state: State = {}
        image = self.global_input(feats)
        if image is not None:
            state["global"] = image
        if not self.use_kv_cache:
            return {**state, "memory": memory,
                    "prefix": torch.zeros(feats.shape[0], 0, dtype=torch.long, device=feats.device)}
        empty = memory.new_zeros(feats.shape[0], self.cfg.heads, 0, self.cfg.d_model // self.cfg.heads)
        for i, block in enumerate(self.blocks):
            state[f"mk{i}"], state[f"mv{i}"] = block.memory_kv(memory)
            state[f"k{i}"] = state[f"v{i}"] = empty
        return state

    def step(self, tokens: torch.Tensor, state: State):
        """tokens (B,) -> logits (B, V), the new state, the word's attention map (B, P)."""
        new = dict(state)
        image = state.get("global")
        if image is not None:  # one row per image: each of its captions adds it
            image = image.repeat_interleave(tokens.shape[0] // image.shape[0], dim=0)
        if self.use_kv_cache:
            memory_kv = [(state[f"mk{i}"], state[f"mv{i}"]) for i in range(len(self.blocks))]
            past = [(state[f"k{i}"], state[f"v{i}"]) for i in range(len(self.blocks))]
            x = self.embed_words(tokens.unsqueeze(1), start=past[0][0].shape[2], image=image)
            h, kvs, w = self._decode(x, memory_kv, past, need_weights=True)
            for i, (k, v) in enumerate(kvs):
                new[f"k{i}"], new[f"v{i}"] = k, v
        else:  # the memory's keys and values and the whole prefix again: the reference for the cache
            memory_kv = [b.memory_kv(state["memory"]) for b in self.blocks]
            new["prefix"] = torch.cat([state["prefix"], tokens.unsqueeze(1)], dim=1)
            h, _, w = self._decode(self.embed_words(new["prefix"], image=image), memory_kv, need_weights=True)
        return self.out(h[:, -1]), new, w[:, -1]
