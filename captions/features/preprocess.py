"""Turning an RGB image into backbone input, shared by extraction and ``captions caption``."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from captions.features.backbones import Preprocessing

_PIL_INTERP = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def preprocess_image(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, crop, crop): shorter side to ``prep.resize``, centre crop.

    Normalisation is left to ``normalize_batch`` so workers ship 4x fewer bytes and the GPU does it.
    """
    w, h = img.size
    scale = prep.resize / min(w, h)
    nw, nh = max(prep.resize, round(w * scale)), max(prep.resize, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), _PIL_INTERP[prep.interpolation])
    left, top = (nw - prep.crop) // 2, (nh - prep.crop) // 2
    img = img.crop((left, top, left + prep.crop, top + prep.crop))
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def normalize_batch(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised with the backbone's mean/std, on ``x``'s device."""
    mean = torch.tensor(prep.mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.float().div_(255.0) - mean) / std
