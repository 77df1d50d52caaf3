"""Vocabulary with the four special tokens, caption encoding, and decoding (``caption_words``, ``decode_captions``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captions.errors import CaptionsError
from captions.fsutil import read_json, sha256_json, write_json_atomic

NULL, START, END, UNK = "<NULL>", "<START>", "<END>", "<UNK>"
SPECIALS = (NULL, START, END, UNK)
NULL_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3


class Vocabulary:
    """Token <-> id maps. Ids 0..3 are ``<NULL>``, ``<START>``, ``<END>``, ``<UNK>``."""

    def __init__(self, idx_to_token: Sequence[str]) -> None:
        if tuple(idx_to_token[:4]) != SPECIALS:
            raise CaptionsError(f"vocabulary must start with {SPECIALS}, got {tuple(idx_to_token[:4])}")
        self.idx_to_token: list[str] = list(idx_to_token)
        self.token_to_idx: dict[str, int] = {t: i for i, t in enumerate(self.idx_to_token)}
        if len(self.token_to_idx) != len(self.idx_to_token):
            raise CaptionsError("vocabulary has duplicate tokens")

    def __len__(self) -> int:
        return len(self.idx_to_token)

    @classmethod
    def build(cls, tokenized: Iterable[Sequence[str]], min_count: int = 5) -> Vocabulary:
        """Keep tokens seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = Counter(t for toks in tokenized for t in toks)
        words = sorted((w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *words])

    @property
    def hash(self) -> str:
        """sha256 of the token list: equal hashes mean identical id assignments."""
        return sha256_json(self.idx_to_token)

    def encode(self, tokens: Sequence[str], max_length: int) -> np.ndarray:
        """``tokens`` clamped to ``max_length`` words -> int64 array of length ``max_length + 2``:
        ``<START> w1 .. wn <END>`` followed by ``<NULL>`` padding; unknown words become ``<UNK>``."""
        ids = np.full(max_length + 2, NULL_ID, dtype=np.int64)
        words = tokens[:max_length]
        ids[0] = START_ID
        ids[1 : len(words) + 1] = [self.token_to_idx.get(w, UNK_ID) for w in words]
        ids[len(words) + 1] = END_ID
        return ids

    def to_json(self) -> dict[str, Any]:
        return {"idx_to_token": self.idx_to_token, "token_to_idx": self.token_to_idx, "hash": self.hash}

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        data = read_json(path)
        if not isinstance(data, dict) or "idx_to_token" not in data:
            raise CaptionsError("not a vocabulary file (no idx_to_token)", path)
        return cls(data["idx_to_token"])


def caption_words(tokens: Sequence[int], idx_to_token: Sequence[str]) -> tuple[list[str], list[int]]:
    """Generated words of one token row (stops at <END>, drops <NULL>/<START>) and the decoding step
    of each word (its attention map's index).

    ``tokens``: a sequence of int ids (one row, e.g. ``ndarray.tolist()``); ``idx_to_token``: the
    vocabulary's id -> word list. Returns (words, steps), two lists of equal length, ``steps[k]``
    the index in ``tokens`` of ``words[k]``. ``IndexError`` for an id outside the vocabulary.
    """
    words, steps = [], []
    for t, tok in enumerate(tokens):
        if tok == END_ID:
            break
        if tok in (NULL_ID, START_ID):
            continue
        words.append(idx_to_token[tok])
        steps.append(t)
    return words, steps


def decode_captions(ids: Any, vocab: Vocabulary | Sequence[str]) -> list[str] | str:
    """Turn caption ids back into strings.

    ``ids``: a tensor/array/list of int ids of shape (T,) or (N, T). Each row is decoded by
    ``caption_words`` (stops at ``<END>``, drops ``<NULL>`` and ``<START>``) and its words joined
    by spaces. Returns one string for a 1-D input, else a list of N.
    """
    itos = vocab.idx_to_token if isinstance(vocab, Vocabulary) else list(vocab)
    arr = np.asarray(ids.detach().cpu() if hasattr(ids, "detach") else ids)
    single = arr.ndim == 1
    rows = arr[None] if single else arr
    out = [" ".join(caption_words(row.tolist(), itos)[0]) for row in rows]
    return out[0] if single else out
