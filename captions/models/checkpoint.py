"""Checkpoints: their schema, saving and loading (``weights_only=True``), and rebuilding a decoder.

A checkpoint is a plain dict of tensors and JSON-like values. Keys: format, format_version, model
(a registered decoder name), decoder_config (its settings, ``DecoderConfig`` fields), train_config
(``TrainConfig``), state_dict, vocab (idx_to_token, hash), dataset_hash, max_length, features (the
cache's ``FeatureSpec.to_dict()``), optimizer, scheduler, the ``TrainState`` keys (epoch,
step_in_epoch, global_step, best, bad_epochs, lowest_val_loss, scst_from, early_stopped) and rng.
With ``--ema``, state_dict holds the averaged weights (the ones evaluated and used for captioning)
and train_state_dict / ema_n_averaged the raw weights and average count that resuming needs.
Version 1 is the only format so far; checkpoints of every earlier release load.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from captions.errors import CaptionsError, error_text, output_error, torch_load_reason
from captions.fsutil import atomic_path, fault_point
from captions.models.base import CaptionDecoder
from captions.models.registry import DecoderConfig, decoder_config, decoder_entry, stored_decoder_config

FORMAT_NAME = "captions-checkpoint"
FORMAT_VERSION = 1


def build_decoder(model: str, cfg: DecoderConfig | None = None, **settings: Any) -> CaptionDecoder:
    """Instantiate registered decoder ``model`` from its config (or from keyword settings, e.g.
    ``build_decoder("attn", vocab_size=9, feature_dim=6, attention="additive")``).
    Raises ``CaptionsError`` for an unknown name."""
    entry = decoder_entry(model)
    return entry.load_class()(cfg if cfg is not None else decoder_config(model, settings))


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old checkpoint or the new one, never half of one (the
    bytes reach the disk before the rename, so not after a power cut either).

    Raises ``OutputError`` naming ``path`` and the system's reason (a full disk, a read-only
    folder) when it cannot be written; ``path`` is then left as it was.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            # serialised in memory first: on a full disk torch's zip writer turns the OSError into a
            # RuntimeError ("unexpected pos") on its way out; a plain file write keeps the errno
            buf = io.BytesIO()
            torch.save({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **ckpt}, buf)
            with open(tmp, "wb") as f:
                f.write(buf.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            fault_point("checkpoint", "written")
    except OSError as e:
        raise output_error(path, e) from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True`` (no arbitrary unpickling) and check the format.

    Raises ``CaptionsError`` naming the file when it is missing, not a checkpoint, or of another
    format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CaptionsError("checkpoint not found", path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch's own advice (turn the safe load off) is wrong for a user's file
        raise CaptionsError(f"not a captions checkpoint ({torch_load_reason(e, path.stat().st_size)})",
                            path) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_NAME:
        what = "a state_dict or other mapping" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}"
        raise CaptionsError(f"not a captions checkpoint (a torch file holding {what}, not one that "
                            f"'captions train' wrote)", path)
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CaptionsError(f"checkpoint format version {ckpt.get('format_version')}, this captions reads "
                            f"{FORMAT_VERSION}", path)
    return ckpt


@dataclass
class LoadedDecoder:
    """A checkpoint's decoder in eval mode with what decoding needs."""

    model: CaptionDecoder
    idx_to_token: list[str]
    max_length: int  # words; decoding runs max_length + 1 steps (the last one for <END>)
    checkpoint: dict[str, Any]


def load_decoder(path: str | os.PathLike, device: torch.device | str = "cpu") -> LoadedDecoder:
    """Load a checkpoint (``weights_only``) and rebuild its decoder on ``device`` in eval mode.

    Raises ``CaptionsError`` naming the file when it does not describe a usable decoder.
    """
    ckpt = load_checkpoint(path)
    try:
        model = build_decoder(ckpt["model"], stored_decoder_config(ckpt["model"], ckpt["decoder_config"]))
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError, CaptionsError) as e:
        raise CaptionsError(f"checkpoint does not describe a usable decoder ({type(e).__name__}: "
                            f"{error_text(e)})", path) from None
    model.to(device).eval()
    return LoadedDecoder(model, list(ckpt["vocab"]["idx_to_token"]), int(ckpt["max_length"]), ckpt)
