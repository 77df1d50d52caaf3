"""Image features: backbones, the extraction forward, the HDF5 feature cache and its ``FeatureSpec``.

Modules: ``spec`` (what features are), ``backbones`` (building CNNs), ``preprocess`` (image ->
input), ``fold`` (BatchNorm folding), ``forward`` (crops -> feature rows), ``cache`` (format and
reader), ``writer`` (writing caches), ``extract`` (``captions extract-features``).
"""

from __future__ import annotations

import importlib
from typing import Any

# Exported lazily, so that importing captions.features.spec (a checkpoint's record of its
# features) does not load numpy and h5py through this package.
_EXPORTS = {"FeatureCache": "cache", "FeatureDataset": "cache", "FeatureSpec": "spec"}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
