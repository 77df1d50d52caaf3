"""``FeatureSpec``: what a set of image features is, in one record shared by the cache, the
trainer's checkpoints and the captioner.

Kept free of torch, numpy and h5py so that reading or comparing a spec costs no heavy import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from captions.errors import CaptionsError

POOLED_KINDS = ("mean", "model")


@dataclass(frozen=True)
class TokenLayout:
    """How a backbone's output became the cache's rows: ``spatial`` (N, h*w, C) and ``pooled`` (N, C).

    The positions are always the h x w feature grid in row-major order, channels last.
    ``prefix_dropped``: how many prefix tokens (class, distillation, register tokens) the model put
    before its patch tokens and the cache leaves out. ``pooled``: ``mean`` (the mean over the
    positions, also when that is the model's own pooling) or ``model`` (the model's own pooled
    vector: timm's pre-logits, a ViT's class token, a CLIP image embedding). ``projected``: the
    positions went through the model's output projection too, into the pooled vector's space
    (CLIP towers).

    Written into ``FeatureSpec.token_layout`` as ``grid[;prefix=N:dropped][;pooled=model][;projected]``:
    plain ``grid`` is the layout of every cache made before this record existed.
    """

    prefix_dropped: int = 0
    pooled: str = "mean"
    projected: bool = False

    def __str__(self) -> str:
        parts = ["grid"]
        if self.prefix_dropped:
            parts.append(f"prefix={self.prefix_dropped}:dropped")
        if self.pooled != "mean":
            parts.append(f"pooled={self.pooled}")
        if self.projected:
            parts.append("projected")
        return ";".join(parts)

    @classmethod
    def parse(cls, text: str) -> TokenLayout:
        """The layout written by ``str(layout)``; raises ``CaptionsError`` for any other text
        (a cache or checkpoint from a newer version)."""
        parts = text.split(";")
        prefix, pooled, projected = 0, "mean", False
        ok = parts[0] == "grid"
        for part in parts[1:]:
            key, _, value = part.partition("=")
            if key == "prefix" and value.endswith(":dropped") and value[: -len(":dropped")].isdigit():
                prefix = int(value[: -len(":dropped")])
            elif key == "pooled" and value in POOLED_KINDS:
                pooled = value
            elif part == "projected":
                projected = True
            else:
                ok = False
        if not ok:
            raise CaptionsError(f"unknown token layout '{text}' (this version reads grid[;prefix=N:dropped]"
                                f"[;pooled=model][;projected]); use the version that wrote it")
        return cls(prefix, pooled, projected)

# Defaults for fields that older caches and checkpoints lack (caches of format version 1 made
# before token_layout existed; checkpoints of runs from before precision was recorded).
_DEFAULTS: dict[str, Any] = {"token_layout": "grid", "precision": "auto", "dataset_hash": None}


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively: HDF5 attributes and JSON give lists back for what was a tuple."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class FeatureSpec:
    """How a set of image features was made and how its tokens are laid out.

    ``weights``: identity of the backbone's weights (``random``, ``torchvision:...``, ``timm:...``
    or ``sha256:<hex>``). ``preprocessing``: ``Preprocessing.to_dict()`` (resize, crop, mean, std,
    interpolation). ``dtype``: the stored dtype, ``float16`` or ``float32``. ``precision``: the
    autocast asked for at extraction (auto, fp32, bf16, fp16). ``spatial_shape``: (h, w) of the
    feature map; ``channels``: C, of the positions and of the pooled vector. ``token_layout``:
    ``str(TokenLayout)``: ``grid`` = the h*w positions of a (C, h, w) map in row-major order with
    their mean as the pooled vector (the layout of every older cache), else which prefix tokens
    were dropped and where the pooled vector came from. ``dataset_hash``: the prepared dataset
    the features were extracted from (None where unknown).

    ``spatial_shape`` is kept as a tuple and ``preprocessing`` with lists, whatever was passed,
    so specs read back from HDF5 or JSON compare equal to the ones written.
    """

    backbone: str
    weights: str
    image_size: int
    preprocessing: dict
    dtype: str
    precision: str
    spatial_shape: tuple[int, int]
    channels: int
    token_layout: str = "grid"
    dataset_hash: str | None = None

    # what a decoder trained on features of one spec needs equal in another
    DECODER_KEYS: ClassVar[tuple[str, ...]] = ("backbone", "weights", "image_size", "spatial_shape", "channels",
                                               "token_layout")
    # what must be equal for an existing cache to be reused or resumed
    EXTRACTION_KEYS: ClassVar[tuple[str, ...]] = ("backbone", "weights", "image_size", "dtype", "precision",
                                                  "dataset_hash")

    def __post_init__(self) -> None:
        object.__setattr__(self, "spatial_shape", tuple(int(s) for s in self.spatial_shape))
        object.__setattr__(self, "preprocessing", _plain(dict(self.preprocessing)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-like values (lists, not tuples): what a checkpoint records under ``"features"``."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, path: object | None = None) -> FeatureSpec:
        """A spec from ``to_dict()`` output or an older checkpoint's ``"features"`` dict.

        Missing (or None) ``token_layout`` -> ``grid``, ``precision`` -> ``auto``, ``dataset_hash``
        -> None; keys it does not know are ignored. Raises ``CaptionsError`` (with ``path``)
        naming the required keys that are missing or None.
        """
        names = [f.name for f in fields(cls)]
        values = {k: d.get(k) if d.get(k) is not None else _DEFAULTS.get(k) for k in names}
        missing = [k for k in names if values[k] is None and k not in _DEFAULTS]
        if missing:
            raise CaptionsError(f"features record no {', '.join(missing)}", path)
        return cls(**values)

    def to_attrs(self) -> dict[str, Any]:
        """The spec as HDF5 attribute values: ``preprocessing`` a JSON string, ``spatial_shape`` a
        list; a None ``dataset_hash`` is left out (HDF5 has no null)."""
        attrs = self.to_dict()
        attrs["preprocessing"] = json.dumps(attrs["preprocessing"])
        return {k: v for k, v in attrs.items() if v is not None}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], *, path: object | None = None) -> FeatureSpec:
        """A spec from a cache's attributes as ``read_attrs`` returns them (``preprocessing``
        decoded; a JSON string is decoded here too). Defaults and errors as ``from_dict``."""
        prep = attrs.get("preprocessing")
        if isinstance(prep, str):
            attrs = {**attrs, "preprocessing": json.loads(prep)}
        return cls.from_dict(attrs, path=path)

    def mismatches(self, other: FeatureSpec, keys: tuple[str, ...] = DECODER_KEYS) -> list[str]:
        """``["<key> <self's value> vs <other's value>", ...]`` for the ``keys`` that differ, in
        ``keys`` order (tuples and lists with the same items are equal)."""
        out = []
        for k in keys:
            mine, theirs = _plain(getattr(self, k)), _plain(getattr(other, k))
            if mine != theirs:
                out.append(f"{k} {_shown(getattr(self, k))} vs {_shown(getattr(other, k))}")
        return out

    def require_compatible(self, other: FeatureSpec, keys: tuple[str, ...] = DECODER_KEYS, *, what: str,
                           path: object | None = None) -> None:
        """Raise ``CaptionsError("<what> (<mismatch>; <mismatch>)", path)`` when any of ``keys`` differ."""
        diff = self.mismatches(other, keys)
        if diff:
            raise CaptionsError(f"{what} ({'; '.join(diff)})", path)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)
