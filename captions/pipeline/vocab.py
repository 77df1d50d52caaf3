"""Vocabulary with the four special tokens, caption encoding, and decoding (``caption_words``, ``decode_captions``).

A vocabulary holds words, or subword pieces (``captions.pipeline.subword``) in WordPiece's form:
a piece starting with ``##`` continues the word before it. Decoding joins pieces into words
(``join_pieces``), so no caption ever shows a ``##``; a word vocabulary has no such token (every
word tokenizer drops ``#``), so the same decoding serves both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from captions.errors import CaptionsError
from captions.fsutil import read_json, sha256_file, sha256_json, write_json_atomic

NULL, START, END, UNK = "<NULL>", "<START>", "<END>", "<UNK>"
SPECIALS = (NULL, START, END, UNK)
NULL_ID, START_ID, END_ID, UNK_ID = 0, 1, 2, 3
CONTINUATION = "##"  # a subword piece that continues the word before it starts with this

WordEncoder = Callable[[Sequence[str]], list[list[int]]]


class Vocabulary:
    """Token <-> id maps. Ids 0..3 are ``<NULL>``, ``<START>``, ``<END>``, ``<UNK>``.

    ``tokenizer``: for a subword vocabulary, what ``vocab.json`` records of its tokenizer (kind,
    file, sha256 of the file: part of ``hash``); ``encoder``: words -> piece ids per word (from
    ``SubwordModel``; only ``prepare`` encodes, so a loaded vocabulary has none).
    """

    def __init__(self, idx_to_token: Sequence[str], tokenizer: dict[str, Any] | None = None,
                 encoder: WordEncoder | None = None) -> None:
        if tuple(idx_to_token[:4]) != SPECIALS:
            raise CaptionsError(f"vocabulary must start with {SPECIALS}, got {tuple(idx_to_token[:4])}")
        self.idx_to_token: list[str] = list(idx_to_token)
        self.token_to_idx: dict[str, int] = {t: i for i, t in enumerate(self.idx_to_token)}
        if len(self.token_to_idx) != len(self.idx_to_token):
            raise CaptionsError("vocabulary has duplicate tokens")
        self.tokenizer = tokenizer
        self._encoder = encoder

    @property
    def is_subword(self) -> bool:
        """Whether the tokens are subword pieces (a tokenizer.json comes with the vocabulary)."""
        return self.tokenizer is not None

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
        """sha256 of the token list, and for subwords of the tokenizer file too: equal hashes mean
        identical id assignments (and the same splitting of words into pieces). A word
        vocabulary's hash is that of its token list alone, as before subwords existed."""
        if self.tokenizer is None:
            return sha256_json(self.idx_to_token)
        return sha256_json({"idx_to_token": self.idx_to_token,
                            "tokenizer": {"kind": self.tokenizer["kind"], "sha256": self.tokenizer["sha256"]}})

    def encode(self, tokens: Sequence[str], max_length: int) -> np.ndarray:
        """Words ``tokens`` -> int64 array of length ``max_length + 2``: ``<START> t1 .. tn <END>``
        followed by ``<NULL>`` padding, at most ``max_length`` tokens. Unknown words become
        ``<UNK>``; a subword vocabulary splits each word into pieces and counts pieces, cutting
        the caption after its last whole word that fits (a first word longer than
        ``max_length`` pieces is cut itself)."""
        ids = np.full(max_length + 2, NULL_ID, dtype=np.int64)
        if self._encoder is not None:
            body: list[int] = []
            for pieces in self._encoder(tokens):
                if len(body) + len(pieces) > max_length:
                    body = body or pieces[:max_length]
                    break
                body.extend(pieces)
        elif self.is_subword:
            raise CaptionsError("a subword vocabulary read from vocab.json decodes but does not encode: only "
                                "'captions prepare' splits words into pieces")
        else:
            body = [self.token_to_idx.get(w, UNK_ID) for w in tokens[:max_length]]
        ids[0] = START_ID
        ids[1 : len(body) + 1] = body
        ids[len(body) + 1] = END_ID
        return ids

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"idx_to_token": self.idx_to_token, "token_to_idx": self.token_to_idx,
                                "hash": self.hash}
        if self.tokenizer is not None:
            data["tokenizer"] = self.tokenizer
        return data

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read ``vocab.json``. For a subword vocabulary its tokenizer file (beside it) must be
        there, with the sha256 recorded; ``CaptionsError`` naming the file otherwise."""
        data = read_json(path)
        if not isinstance(data, dict) or "idx_to_token" not in data:
            raise CaptionsError("not a vocabulary file (no idx_to_token)", path)
        tokenizer = data.get("tokenizer")
        if tokenizer is not None:
            if not isinstance(tokenizer, dict) or "sha256" not in tokenizer or "kind" not in tokenizer:
                raise CaptionsError("'tokenizer' must record the subword tokenizer's kind, file and sha256", path)
            file = Path(path).parent / str(tokenizer.get("file", ""))
            if not file.is_file():
                raise CaptionsError("the subword tokenizer of this vocabulary is missing", file)
            if sha256_file(file) != tokenizer.get("sha256"):
                raise CaptionsError("the tokenizer does not match the sha256 recorded in vocab.json (edited by hand?)",
                                    file)
        return cls(data["idx_to_token"], tokenizer=tokenizer)


def join_pieces(pieces: Sequence[str]) -> list[str]:
    """Pieces -> words: a piece starting with ``##`` is glued to the word before it (on its own
    at the start); an empty piece (SentencePiece's bare word mark) starts a word of what follows.
    A word with an ``<UNK>`` piece is ``<UNK>``. Words are returned unchanged."""
    return [w for w, _ in _join(pieces)]


def _join(pieces: Sequence[str]) -> list[tuple[str, list[int]]]:
    """(word, indices of its pieces in ``pieces``) for the words ``join_pieces`` returns."""
    words: list[tuple[list[str], list[int]]] = []
    for i, p in enumerate(pieces):
        if p.startswith(CONTINUATION) and len(p) > len(CONTINUATION) and words:
            words[-1][0].append(p[len(CONTINUATION):])
            words[-1][1].append(i)
        else:
            words.append(([p[len(CONTINUATION):] if p.startswith(CONTINUATION) and len(p) > 2 else p], [i]))
    out = []
    for parts, where in words:
        word = UNK if UNK in parts else "".join(parts)
        if word:
            out.append((word, where))
    return out


def caption_word_pieces(tokens: Sequence[int], idx_to_token: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """Generated words of one token row and the decoding steps of each word's pieces.

    ``tokens``: a sequence of int ids (one row, e.g. ``ndarray.tolist()``); ``idx_to_token``: the
    vocabulary's id -> token list. Stops at ``<END>``, drops ``<NULL>``/``<START>`` and joins
    subword pieces (``join_pieces``). Returns (words, steps), ``steps[k]`` the indices in
    ``tokens`` of the pieces of ``words[k]`` (one for a word vocabulary). ``IndexError`` for an
    id outside the vocabulary.
    """
    pieces, at = [], []
    for t, tok in enumerate(tokens):
        if tok == END_ID:
            break
        if tok in (NULL_ID, START_ID):
            continue
        pieces.append(idx_to_token[tok])
        at.append(t)
    joined = _join(pieces)
    return [w for w, _ in joined], [[at[i] for i in where] for _, where in joined]


def caption_words(tokens: Sequence[int], idx_to_token: Sequence[str]) -> tuple[list[str], list[int]]:
    """Generated words of one token row (stops at <END>, drops <NULL>/<START>, joins subword
    pieces) and the decoding step of each word's first piece.

    ``tokens``: a sequence of int ids (one row, e.g. ``ndarray.tolist()``); ``idx_to_token``: the
    vocabulary's id -> token list. Returns (words, steps), two lists of equal length, ``steps[k]``
    the index in ``tokens`` of ``words[k]`` (of its first piece). ``IndexError`` for an id outside
    the vocabulary.
    """
    words, steps = caption_word_pieces(tokens, idx_to_token)
    return words, [s[0] for s in steps]


def decode_captions(ids: Any, vocab: Vocabulary | Sequence[str]) -> list[str] | str:
    """Turn caption ids back into strings.

    ``ids``: a tensor/array/list of int ids of shape (T,) or (N, T). Each row is decoded by
    ``caption_words`` (stops at ``<END>``, drops ``<NULL>`` and ``<START>``, joins subword pieces
    into words) and its words joined by spaces. Returns one string for a 1-D input, else a list of N.
    """
    itos = vocab.idx_to_token if isinstance(vocab, Vocabulary) else list(vocab)
    arr = np.asarray(ids.detach().cpu() if hasattr(ids, "detach") else ids)
    single = arr.ndim == 1
    rows = arr[None] if single else arr
    out = [" ".join(caption_words(row.tolist(), itos)[0]) for row in rows]
    return out[0] if single else out
