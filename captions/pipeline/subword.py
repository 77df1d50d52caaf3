"""Subword vocabularies: WordPiece or BPE trained on the train captions, or an existing ``tokenizer.json``.

Both are Hugging Face ``tokenizers`` models (Rust, offline). A subword model splits the words of
the ``simple`` tokenizer (NFC-normalised, lowercased, punctuation dropped) into pieces, so that a
word never seen in training is spelled with pieces instead of becoming ``<UNK>``.

Every subword vocabulary is stored in one *canonical* form, whatever the tokenizer's own
convention: a piece that continues the word before it starts with ``##`` (WordPiece's mark), any
other piece starts a word. Decoding (``captions.pipeline.vocab.join_pieces``) therefore needs the
token list alone, which every checkpoint already carries; the tokenizer itself is needed only to
encode, in ``prepare``. SentencePiece-style tokenizers (``▁`` marks a word's first piece) are
turned into this form; byte-level ones (GPT-2, RoBERTa), whose pieces are bytes rather than
text, are refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captions.errors import CaptionsError, first_line
from captions.fsutil import atomic_path, read_text, sha256_file, writing
from captions.pipeline.settings import SUBWORD_TOKENIZERS as SUBWORD_KINDS
from captions.pipeline.settings import PrepareOptions
from captions.pipeline.vocab import CONTINUATION, SPECIALS, Vocabulary

HF_PREFIX = "hf:"
TOKENIZER_FILE = "tokenizer.json"

# names under which tokenizers ship the four tokens we need, in the order we look for them
ROLE_NAMES: dict[str, tuple[str, ...]] = {
    "<NULL>": ("<NULL>", "[PAD]", "<pad>", "<|pad|>", "<PAD>"),
    "<START>": ("<START>", "[CLS]", "<s>", "[BOS]", "<bos>", "<BOS>", "<|startoftext|>", "<|begin_of_text|>"),
    "<END>": ("<END>", "[SEP]", "</s>", "[EOS]", "<eos>", "<EOS>", "<|endoftext|>", "<|end_of_text|>"),
    "<UNK>": ("<UNK>", "[UNK]", "<unk>", "<|unk|>"),
}


def is_subword(name: str) -> bool:
    """Whether ``--tokenizer name`` makes a subword vocabulary (``wordpiece``, ``bpe``, ``hf:PATH``)."""
    return name in SUBWORD_KINDS or name.startswith(HF_PREFIX)


def hf_path(name: str) -> Path | None:
    """The file of ``--tokenizer hf:PATH``, None for any other tokenizer name."""
    return Path(name[len(HF_PREFIX):]) if name.startswith(HF_PREFIX) else None


@dataclass
class SubwordModel:
    """A loaded subword tokenizer and the vocabulary it gives.

    ``idx_to_token``: our ids -> canonical pieces (``<NULL> <START> <END> <UNK>`` at 0-3);
    ``to_ours``: the tokenizer's id -> our id (the identity for a tokenizer trained here; a
    permutation moving the special tokens to 0-3 for ``hf:PATH``); ``text``: the tokenizer.json
    saved with the prepared dataset; ``source``: the ``hf:`` file it came from.
    """

    kind: str
    text: str
    idx_to_token: list[str]
    to_ours: list[int]
    source: str | None = None
    tokenizer: Any = field(default=None, repr=False)

    def encode_words(self, words: Sequence[str]) -> list[list[int]]:
        """Words (from ``simple_tokenize``) -> our piece ids, one list per word (an empty list for
        a word the tokenizer's normaliser leaves empty)."""
        if not words:
            return []
        enc = self.tokenizer.encode(list(words), is_pretokenized=True, add_special_tokens=False)
        pieces: list[list[int]] = [[] for _ in words]
        for tid, w in zip(enc.ids, enc.word_ids, strict=True):
            if w is not None:
                pieces[w].append(self.to_ours[tid])
        return pieces

    def metadata(self) -> dict[str, Any]:
        """What ``vocab.json`` records of the tokenizer (its file's sha256 enters the vocabulary hash)."""
        meta: dict[str, Any] = {"kind": self.kind, "file": TOKENIZER_FILE,
                                "sha256": hashlib.sha256(self.text.encode("utf-8")).hexdigest()}
        if self.source is not None:
            meta["source"] = self.source
        return meta

    def vocabulary(self) -> Vocabulary:
        """The ``Vocabulary`` of this tokenizer; its ``encode`` splits words into pieces."""
        return Vocabulary(self.idx_to_token, tokenizer=self.metadata(), encoder=self.encode_words)

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/tokenizer.json`` atomically; returns its path. ``OutputError`` naming
        it when it cannot be written (a full disk, a read-only folder)."""
        path = Path(directory) / TOKENIZER_FILE
        with writing(path), atomic_path(path) as tmp:
            tmp.write_bytes(self.text.encode("utf-8"))
        return path


def build_vocabulary(train_words: Iterable[Sequence[str]], opts: PrepareOptions, out: str | Path) -> Vocabulary:
    """The vocabulary ``prepare`` builds from the train split's words (one list per caption): words
    seen at least ``opts.min_count`` times for a word tokenizer; for a subword one
    (``build_subword``), its tokenizer is saved as ``out/tokenizer.json`` and the vocabulary encodes
    words into pieces. Raises ``CaptionsError``."""
    if not opts.subword:
        return Vocabulary.build(train_words, opts.min_count)
    model = build_subword(opts.tokenizer, train_words, opts.vocab_size)
    model.save(out)
    return model.vocabulary()


def build_subword(name: str, train_words: Iterable[Sequence[str]], vocab_size: int) -> SubwordModel:
    """The subword model of ``--tokenizer name``: ``wordpiece`` / ``bpe`` trained on
    ``train_words`` (the train captions' words) to about ``vocab_size`` pieces, or the tokenizer
    of ``hf:PATH`` as it is (``train_words`` and ``vocab_size`` unused). Raises ``CaptionsError``."""
    path = hf_path(name)
    if path is not None:
        return load_hf(path)
    if name not in SUBWORD_KINDS:
        raise CaptionsError(f"unknown subword tokenizer '{name}' (choose one of: {', '.join(SUBWORD_KINDS)}, hf:PATH)")
    return train_subword(name, train_words, vocab_size)


def train_subword(kind: str, train_words: Iterable[Sequence[str]], vocab_size: int) -> SubwordModel:
    """Train a WordPiece (Schuster & Nakajima 2012; Devlin et al. 2019) or BPE (Sennrich et al.
    2016) model with ``tokenizers`` on the captions' words, ``##`` marking continuation pieces.

    The special tokens take ids 0-3. Every character of the training alphabet is then made
    available both as a word's first piece and as a continuation (``x`` and ``##x``), so that any
    word written in that alphabet can be spelled; only a character never seen in training is
    ``<UNK>``. ``vocab_size``: the trainer's target (the result may be smaller on a small corpus,
    and larger by the characters added).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="<UNK>", continuing_subword_prefix=CONTINUATION))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                            continuing_subword_prefix=CONTINUATION, show_progress=False)
    else:
        tok = Tokenizer(models.BPE(unk_token="<UNK>", continuing_subword_prefix=CONTINUATION))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                      continuing_subword_prefix=CONTINUATION, show_progress=False)
    # the words come from simple_tokenize (NFC, lowercased) already; the same normaliser makes the
    # saved tokenizer.json behave alike on raw text, and is a no-op on those words
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix=CONTINUATION)
    tok.train_from_iterator((" ".join(words) for words in train_words), trainer)
    tok = _with_full_alphabet(tok)
    vocab = tok.get_vocab(with_added_tokens=True)
    itos = _id_ordered(vocab, None)
    if tuple(itos[:4]) != SPECIALS:  # the trainer puts special tokens first; guard against a change
        raise CaptionsError(f"the {kind} trainer did not give the special tokens ids 0-3")
    return SubwordModel(kind, tok.to_str(), itos, list(range(len(itos))), tokenizer=tok)


def _with_full_alphabet(tok: Any) -> Any:
    """``tok`` with ``x`` and ``##x`` in its vocabulary for every single character ``x`` it has
    in either form (appended after the trained ids)."""
    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    chars = {t[len(CONTINUATION):] if t.startswith(CONTINUATION) else t for t in vocab if t not in SPECIALS}
    chars = {c for c in chars if len(c) == 1}
    for c in sorted(chars):
        for piece in (c, CONTINUATION + c):
            if piece not in vocab:
                vocab[piece] = len(vocab)
    return Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))


def _id_ordered(vocab: dict[str, int], path: Path | None) -> list[str]:
    """token -> id as the list of tokens by id; ``CaptionsError`` when ids are missing or repeated."""
    itos: list[str | None] = [None] * len(vocab)
    for token, i in vocab.items():
        if not 0 <= i < len(itos) or itos[i] is not None:
            raise CaptionsError(f"the tokenizer's ids are not 0..{len(vocab) - 1}, each once", path)
        itos[i] = token
    return itos  # type: ignore[return-value]


def load_hf(path: str | Path) -> SubwordModel:
    """Load an existing ``tokenizer.json`` (e.g. saved from a BERT model) and use it as it is.

    Its ids become the vocabulary, except that its padding, start, end and unknown tokens
    (``[PAD] [CLS] [SEP] [UNK]``, ``<pad> <s> </s> <unk>``, ...) swap places with the tokens at
    ids 0-3, so that they sit where every later stage expects ``<NULL> <START> <END> <UNK>``.
    Pieces are stored in the canonical ``##`` form (see the module's docstring). Raises
    ``CaptionsError`` naming the file when it is missing, not a tokenizer, lacks one of the four
    tokens, or marks word boundaries in a way that cannot be told from its pieces (byte-level
    BPE, an end-of-word suffix).
    """
    from tokenizers import Tokenizer

    path = Path(path)
    text = read_text(path)
    try:
        tok = Tokenizer.from_str(text)
        spec = json.loads(text)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
        raise CaptionsError(f"not a Hugging Face tokenizer.json ({first_line(e)[:200]})", path) from None
    tok.no_padding()
    tok.no_truncation()
    itos = _id_ordered(tok.get_vocab(with_added_tokens=True), path)
    ours = _special_order(itos, spec, path)
    specials = {t["content"] for t in spec.get("added_tokens") or [] if t.get("special")}
    canon = _canonicaliser(spec, path)
    idx_to_token = [*SPECIALS, *(itos[t] if itos[t] in specials else canon(itos[t]) for t in ours[4:])]
    if len(set(idx_to_token)) != len(idx_to_token):
        raise CaptionsError("two of the tokenizer's pieces read alike once word starts are marked the "
                            "WordPiece way ('##' on continuations); this tokenizer cannot be used", path)
    to_ours = [0] * len(ours)
    for our_id, tok_id in enumerate(ours):
        to_ours[tok_id] = our_id
    return SubwordModel("hf", text, idx_to_token, to_ours, source=str(path.resolve()), tokenizer=tok)


def _special_order(itos: list[str], spec: dict[str, Any], path: Path) -> list[int]:
    """The tokenizer's ids in our order: its four special tokens first (as ``ROLE_NAMES`` and the
    model's own ``unk_token`` find them), each swapped with the token that held its place."""
    index = {t: i for i, t in enumerate(itos)}
    model = spec.get("model") or {}
    unk = model.get("unk_token") or (itos[model["unk_id"]] if isinstance(model.get("unk_id"), int) else None)
    found, missing = [], []
    for role, names in ROLE_NAMES.items():
        candidates = ((unk,) if role == "<UNK>" and unk else ()) + names
        hit = next((index[n] for n in candidates if n in index), None)
        (found.append(hit) if hit is not None else missing.append(f"{role} (e.g. {' or '.join(names[1:3])})"))
    if missing:
        raise CaptionsError(f"the tokenizer has no token for {', '.join(missing)}: captions need a padding, a start, "
                            f"an end and an unknown token", path)
    if len(set(found)) < 4:
        raise CaptionsError("the tokenizer uses one token for two of padding, start, end and unknown", path)
    order = list(range(len(itos)))
    for role_id, tok_id in enumerate(found):
        j = order.index(tok_id)
        order[role_id], order[j] = order[j], order[role_id]
    return order


def _canonicaliser(spec: dict[str, Any], path: Path) -> Any:
    """A function from the tokenizer's piece to its canonical form (``##`` on continuations)."""
    model = spec.get("model") or {}
    parts = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer"), spec.get("decoder")])
    if '"ByteLevel"' in parts:
        raise CaptionsError("byte-level tokenizers (GPT-2, RoBERTa) are not supported: their pieces are bytes, "
                            "not text; use a WordPiece or SentencePiece tokenizer.json, or --tokenizer wordpiece", path)
    prefix = model.get("continuing_subword_prefix")
    if prefix:
        return lambda t: CONTINUATION + t[len(prefix):] if t.startswith(prefix) and len(t) > len(prefix) else t
    if '"Metaspace"' in parts or '"▁"' in parts:
        metaspace = [p for p in _walk(spec.get("pre_tokenizer")) if p.get("type") == "Metaspace"]
        if any(p.get("prepend_scheme") == "never" or p.get("add_prefix_space") is False for p in metaspace):
            raise CaptionsError("its Metaspace pre-tokenizer never marks a word's start ('prepend_scheme': 'never'), "
                                "so the words of a caption could not be told apart", path)
        mark = next((p.get("replacement") for p in metaspace if p.get("replacement")), "▁")
        return lambda t: t[len(mark):] if t.startswith(mark) else CONTINUATION + t
    if model.get("type") == "WordLevel":
        return lambda t: t
    raise CaptionsError("cannot tell where words start from this tokenizer's pieces (it needs a continuation "
                        "prefix such as '##', or SentencePiece's '▁' word marks)", path)


def _walk(node: Any) -> Iterable[dict[str, Any]]:
    """Every JSON object inside ``node`` (a tokenizer.json component), ``node`` included."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def tokenizer_identity(name: str) -> dict[str, str]:
    """What identifies the tokenizer file of ``--tokenizer hf:PATH`` beside its name (its sha256,
    for ``prepare``'s fingerprint: an edited file prepares again); empty for other tokenizers."""
    path = hf_path(name)
    return {"tokenizer_file": sha256_file(path)} if path is not None and path.is_file() else {}
