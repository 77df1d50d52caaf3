"""Tokenizers: ``simple`` (built-in, fast, Unicode-aware), ``nltk`` (Treebank) and ``spacy`` (blank)
split captions into words; ``wordpiece``, ``bpe`` and ``hf:PATH`` split ``simple``'s words further
into subword pieces (``captions.pipeline.subword``)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from captions.errors import CaptionsError, first_line

TOKENIZERS = ("simple", "nltk", "spacy", "wordpiece", "bpe", "hf:PATH")
Tokenizer = Callable[[str], list[str]]

# Letters, digits and combining marks; apostrophes inside words are kept ("don't").
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def simple_tokenize(text: str) -> list[str]:
    """Lowercase, NFC-normalise and split into words; punctuation is dropped.

    ``"Một người đàn ông đang đứng."`` -> ``["một", "người", "đàn", "ông", "đang", "đứng"]``.
    NFC matters: decomposed Vietnamese (``e`` + combining accent) would otherwise split words.
    """
    return _WORD.findall(unicodedata.normalize("NFC", text).lower())


def _nltk_tokenizer() -> Tokenizer:
    # TreebankWordTokenizer needs no downloaded data (nltk.word_tokenize needs 'punkt' and fails offline).
    from nltk.tokenize import TreebankWordTokenizer

    tb = TreebankWordTokenizer()

    def tokenize(text: str) -> list[str]:
        toks = tb.tokenize(unicodedata.normalize("NFC", text).lower())
        return [t for t in toks if any(ch.isalnum() for ch in t)]

    return tokenize


def _spacy_tokenizer(lang: str) -> Tokenizer:
    import spacy

    try:
        nlp = spacy.blank(lang)
    except Exception as e:  # spacy raises ImportError / ValueError subclasses for unknown languages
        raise CaptionsError(f"spacy cannot make a blank '{lang}' pipeline: {first_line(e)}") from None

    def tokenize(text: str) -> list[str]:
        doc = nlp.make_doc(unicodedata.normalize("NFC", text).lower())
        return [t.text for t in doc if not t.is_punct and not t.is_space]

    return tokenize


def get_tokenizer(name: str, lang: str = "en") -> Tokenizer:
    """Return the function ``str -> list[str]`` that splits captions into words for tokenizer
    ``name`` (one of ``TOKENIZERS``): subword tokenizers split ``simple_tokenize``'s words. The
    file of ``hf:PATH`` is loaded and checked here, so that a bad one is refused before any work.
    Raises ``CaptionsError`` for an unknown name or an unusable ``hf:`` file."""
    from captions.pipeline.subword import hf_path, is_subword, load_hf

    if is_subword(name):
        path = hf_path(name)
        if path is not None:
            load_hf(path)
        return simple_tokenize
    if name == "simple":
        return simple_tokenize
    if name == "nltk":
        return _nltk_tokenizer()
    if name == "spacy":
        return _spacy_tokenizer(lang)
    raise CaptionsError(f"unknown tokenizer '{name}' (choose one of: {', '.join(TOKENIZERS)})")
