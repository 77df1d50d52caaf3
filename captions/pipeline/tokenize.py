"""Tokenizers: ``simple`` (built-in, fast, Unicode-aware), ``nltk`` (Treebank) and ``spacy`` (blank)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from captions.errors import CaptionsError

TOKENIZERS = ("simple", "nltk", "spacy")
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
        raise CaptionsError(f"spacy cannot make a blank '{lang}' pipeline: {str(e).splitlines()[0]}") from None

    def tokenize(text: str) -> list[str]:
        doc = nlp.make_doc(unicodedata.normalize("NFC", text).lower())
        return [t.text for t in doc if not t.is_punct and not t.is_space]

    return tokenize


def get_tokenizer(name: str, lang: str = "en") -> Tokenizer:
    """Return a function ``str -> list[str]`` for tokenizer ``name`` (one of ``TOKENIZERS``)."""
    if name == "simple":
        return simple_tokenize
    if name == "nltk":
        return _nltk_tokenizer()
    if name == "spacy":
        return _spacy_tokenizer(lang)
    raise CaptionsError(f"unknown tokenizer '{name}' (choose one of: {', '.join(TOKENIZERS)})")
