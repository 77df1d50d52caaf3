"""Turning an RGB image into backbone input, shared by extraction and ``captions caption``.

Three steps, each as cheap as it measured on CPU (benchmarks/README.md, "Feature extraction"):
``decode_rgb`` (JPEGs through torchvision's libjpeg-turbo: the same pixels as PIL, without PIL's
image object and copies), ``crop_tensor`` (shorter side to ``prep.resize``; bilinear with torch's
antialiased uint8 resize, ~5x faster than PIL's; then a centre-crop view) and ``normalize_batch``
(one fused multiply-add from uint8 to the forward's dtype).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from captions.features.backbones import Preprocessing

_PIL_INTERP = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
# torch's antialiased uint8 bilinear resize follows PIL's filter: pixels differ by 1-2 levels in
# < 1 % of places, and features from it stay within half the float16 tolerance of a PIL reference
# (tests/test_features.py). Its bicubic differs more (the exactness test failed), so bicubic and
# the other modes go through PIL.
_TORCH_INTERP = ("bilinear",)
_JPEG_MAGIC = b"\xff\xd8\xff"


def _resized_size(w: int, h: int, prep: Preprocessing) -> tuple[int, int]:
    scale = prep.resize / min(w, h)
    return max(prep.resize, round(w * scale)), max(prep.resize, round(h * scale))


def decode_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Image file -> uint8 RGB tensor (3, H, W) (its memory is H x W x 3), EXIF-rotated.

    Colour (YCbCr) and grayscale JPEGs decode with torchvision's libjpeg-turbo, which gives the
    same pixels as PIL; anything else (CMYK JPEGs, other formats, files torchvision refuses) goes
    through ``load_rgb``, whose errors (``OSError``/``ValueError``) mark an unreadable image.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:3] == _JPEG_MAGIC:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.UNCHANGED,
                            apply_exif_orientation=True)
        except RuntimeError:  # corrupt or unsupported: let PIL decide and explain
            x = None
        if x is not None and x.shape[0] == 3:
            return x
        if x is not None and x.shape[0] == 1:
            return x.expand(3, -1, -1).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    from captions.pipeline.resize import load_rgb

    return pil_to_tensor(load_rgb(path))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W) whose memory is H x W x 3 (no extra copy)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def crop_tensor(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 RGB (3, H, W) -> uint8 (3, crop, crop): shorter side to ``prep.resize``, centre crop.

    The crop is a view; resizing runs on channels-last memory (torch's vectorised uint8 path).
    """
    h, w = int(x.shape[1]), int(x.shape[2])
    nw, nh = _resized_size(w, h, prep)
    if (nw, nh) != (w, h):
        if prep.interpolation in _TORCH_INTERP:
            x = torch.nn.functional.interpolate(x[None].contiguous(memory_format=torch.channels_last),
                                                size=(nh, nw), mode=prep.interpolation, antialias=True,
                                                align_corners=False)[0]
        else:
            img = Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB").resize((nw, nh), _PIL_INTERP[prep.interpolation])
            x = pil_to_tensor(img)
    left, top = (nw - prep.crop) // 2, (nh - prep.crop) // 2
    return x[:, top : top + prep.crop, left : left + prep.crop]


def preprocess_image(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, crop, crop): shorter side to ``prep.resize``, centre crop.

    Normalisation is left to ``normalize_batch`` so workers ship 4x fewer bytes and the GPU does it.
    """
    return crop_tensor(pil_to_tensor(img), prep).contiguous()


def normalize_batch(x: torch.Tensor, prep: Preprocessing, dtype: torch.dtype = torch.float32,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> ``dtype``, normalised with the backbone's mean/std, on ``x``'s device.

    One fused pass, ``x * 1/(255 std) - mean/std`` computed in float32, written in ``dtype``
    (into ``out`` when given); the result keeps ``x``'s memory format.
    """
    scale = torch.tensor([1.0 / (255.0 * s) for s in prep.std], device=x.device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(prep.mean, prep.std, strict=True)], device=x.device).view(1, 3, 1, 1)
    if out is None:
        if dtype == torch.float32:
            return torch.addcmul(shift, x, scale)
        out = torch.empty_like(x, dtype=dtype)
    return torch.addcmul(shift, x, scale, out=out)
