"""``PrepareOptions``: the settings of ``captions prepare`` that change its output, with their help.

A module of its own, free of numpy and torch, so that the command line builds ``prepare``'s
options from these fields without loading the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from captions.options import setting

DEFAULT_MAX_PIXELS = 50_000_000  # an 8000 x 6000 PNG decodes to 144 MB of RGB; photos that large are JPEGs
MAX_ASPECT_RATIO = 20  # a 20000 x 1 strip is no photo: its centre square is a single pixel


@dataclass
class PrepareOptions:
    """Everything that changes the prepared output (part of the run's fingerprint)."""

    tokenizer: str = setting("simple", "simple (built-in, Unicode-aware), nltk (Treebank, offline) or spacy "
                                       "(blank pipeline).")
    lang: str = setting("en", "Language for --tokenizer spacy.")
    min_count: int = setting(5, "Keep words seen at least this often in the train split; others become <UNK>.",
                             min=1)
    max_length: int = setting(16, "Clamp captions to this many words (plus <START>/<END>).", min=1)
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
