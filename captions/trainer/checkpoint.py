"""Checkpoints: plain dicts of tensors and JSON-like values, loadable with ``weights_only=True``.

Keys: format, format_version, model, decoder_config, train_config, state_dict, vocab
(idx_to_token, hash), dataset_hash, max_length, features (the cache's backbone, weights,
image_size, preprocessing, dtype, spatial_shape, channels, dataset_hash), optimizer, scheduler,
epoch, step_in_epoch, global_step, rng, best, bad_epochs; with ``--ema``, state_dict holds the
averaged weights (the ones evaluated and used for captioning) and train_state_dict /
ema_n_averaged the raw weights and average count that resuming needs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from captions.errors import CaptionsError
from captions.fsutil import atomic_path

FORMAT_NAME = "captions-checkpoint"
FORMAT_VERSION = 1
FEATURE_KEYS = ("backbone", "weights", "image_size", "preprocessing", "dtype", "spatial_shape", "channels",
                "dataset_hash", "precision")


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old checkpoint or the new one, never half of one."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **ckpt}, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True`` (no arbitrary unpickling) and check the format."""
    path = Path(path)
    if not path.is_file():
        raise CaptionsError("checkpoint not found", path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CaptionsError(f"cannot load as a checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})",
                            path) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_NAME:
        raise CaptionsError("not a captions checkpoint", path)
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CaptionsError(f"checkpoint format version {ckpt.get('format_version')}, this captions reads "
                            f"{FORMAT_VERSION}", path)
    return ckpt


def feature_meta(metadata: dict[str, Any]) -> dict[str, Any]:
    """The part of a feature cache's metadata that a checkpoint records (JSON-like values only)."""
    return {k: metadata.get(k) for k in FEATURE_KEYS}
