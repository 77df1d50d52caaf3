"""``PrepareOptions``: the settings of ``captions prepare`` that change its output, with their help.

A module of its own, free of numpy and torch, so that the command line builds ``prepare``'s
options from these fields without loading the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from captions.options import setting


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
