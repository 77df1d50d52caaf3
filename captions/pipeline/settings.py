"""``PrepareOptions``: the settings of ``captions prepare`` that change its output, with their help.

A module of its own, free of numpy and torch, so that the command line builds ``prepare``'s
options from these fields without loading the pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from captions.options import option_fields, setting

DEFAULT_MAX_PIXELS = 50_000_000  # an 8000 x 6000 PNG decodes to 144 MB of RGB; photos that large are JPEGs
MAX_ASPECT_RATIO = 20  # a 20000 x 1 strip is no photo: its centre square is a single pixel
WORD_MAX_LENGTH = 16  # --max-length 0 (the default) with a word tokenizer
SUBWORD_MAX_LENGTH = 20  # ... and with a subword one: see README (pieces per caption on ucm and viic)
SUBWORD_TOKENIZERS = ("wordpiece", "bpe")  # and hf:PATH (captions.pipeline.subword)


@dataclass
class PrepareOptions:
    """Everything that changes the prepared output (part of the run's fingerprint)."""

    tokenizer: str = setting("simple", "Words: simple (built-in, Unicode-aware), nltk (Treebank, offline) or spacy "
                                       "(blank pipeline). Subwords (simple's words split into pieces, so unseen "
                                       "words are spelled instead of <UNK>): wordpiece or bpe (trained on the train "
                                       "captions), or hf:PATH (an existing tokenizer.json, used as it is).")
    lang: str = setting("en", "Language for --tokenizer spacy.")
    min_count: int = setting(5, "Keep words seen at least this often in the train split; others become <UNK> "
                                "(word tokenizers).", min=1)
    vocab_size: int = setting(4000, "Subword vocabulary size to train (--tokenizer wordpiece or bpe; a small corpus "
                                    "may give fewer).", min=100)
    max_length: int = setting(0, "Clamp captions to this many tokens (words, or subword pieces), plus "
                                 f"<START>/<END>; 0: {WORD_MAX_LENGTH} words, or {SUBWORD_MAX_LENGTH} subword pieces.",
                              min=0)
    image_size: int = setting(256, "Side of the square resized images (shorter side scaled, then centre crop).",
                              min=16)
    val_fraction: float = setting(0.05, "For sources without splits (csv, Kaggle flickr8k): share of images "
                                        "hashed to val.", min=0, max=0.5)
    test_fraction: float = setting(0.05, "Likewise for test.", min=0, max=0.5)
    encoding: str = setting("utf-8", "Text encoding of the caption sources and split lists (e.g. cp1252, latin-1); "
                                     "a file that starts with a UTF-8 or UTF-16 byte-order mark is read as it says.")
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "Skip (and report) images that would decode to more pixels than "
                                                  "this (large JPEGs decode reduced first) or whose sides differ "
                                                  f"over {MAX_ASPECT_RATIO}:1.", min=1)

    def __post_init__(self) -> None:
        if not self.max_length:  # 0 or None (the command line's default), resolved here: manifest and fingerprint
            # record the length used
            self.max_length = SUBWORD_MAX_LENGTH if self.subword else WORD_MAX_LENGTH

    @property
    def subword(self) -> bool:
        """Whether ``tokenizer`` makes a subword vocabulary (``wordpiece``, ``bpe`` or ``hf:PATH``)."""
        return self.tokenizer in SUBWORD_TOKENIZERS or self.tokenizer.startswith("hf:")

    def identity(self) -> dict[str, Any]:
        """The settings as they identify the prepared output (the fingerprint): every field, less
        ``vocab_size`` for word tokenizers (where it changes nothing, so that datasets prepared
        before it existed stay up to date)."""
        out = asdict(self)
        if not self.subword:
            del out["vocab_size"]
        return out


def prepare_option_fields() -> list[tuple[Any, ...]]:
    """(field, note[, shown default]) of each ``captions prepare`` option, for ``click_options``:
    ``--max-length`` shows the length it stands for."""
    shown = f"{WORD_MAX_LENGTH} words, {SUBWORD_MAX_LENGTH} subword pieces"
    return [(f, "", shown) if f.name == "max_length" else (f, "") for f in option_fields(PrepareOptions)]
