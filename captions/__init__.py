"""captions: turn raw image-caption datasets into trained neural captioners.

Stages (each a ``captions`` sub-command and an importable function):
download -> prepare -> extract-features -> train -> evaluate / caption.

The public entry points, importable from here (loaded on first use, so ``import captions``
itself stays light and imports no torch):

* ``prepare(fmt, sources, out, ...)``: parse captions, build the vocabulary, resize images;
* ``extract_features(dataset_dir, out, ExtractOptions(...))``: run a CNN once into an HDF5 cache;
* ``FeatureCache(path)``: read such a cache (spatial (N, P, C) and pooled (N, C) features);
* ``train(data_dir, features, out_dir, TrainConfig(...))``: fit a decoder from the cache;
* ``evaluate(checkpoint, data_dir, features, split=...)``: caption a split and score it;
* ``Captioner.from_checkpoint(path)``: caption new images (with attention maps).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# module -> the names it exposes here ("evaluate" is evaluate_checkpoint)
_MODULES = {
    "captions.pipeline.prepare": ("prepare",),
    "captions.pipeline.settings": ("PrepareOptions",),
    "captions.features.extract": ("extract_features", "ExtractOptions"),
    "captions.features.cache": ("FeatureCache",),
    "captions.features.spec": ("FeatureSpec",),
    "captions.trainer.train": ("train",),
    "captions.trainer.config": ("TrainConfig",),
    "captions.evaluation": ("evaluate_checkpoint",),
    "captions.captioner": ("Captioner",),
    "captions.models.checkpoint": ("load_decoder",),
    "captions.errors": ("CaptionsError",),
}
_EXPORTS = {name: (module, name) for module, names in _MODULES.items() for name in names}
_EXPORTS["evaluate"] = ("captions.evaluation", "evaluate_checkpoint")

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'captions' has no attribute '{name}'")
    module, attr = _EXPORTS[name]
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(__all__)
