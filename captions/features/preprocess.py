"""Turning an RGB image into backbone input, shared by extraction and ``captions caption``.

Three steps, each as cheap as it measured on CPU (benchmarks/README.md, "Feature extraction"):
``decode_rgb`` (JPEGs through torchvision's libjpeg-turbo: the same pixels as PIL, without PIL's
image object and copies), ``crop_tensor`` (shorter side to ``prep.resize``; bilinear with torch's
antialiased uint8 resize, ~5x faster than PIL's; then a centre-crop view) and ``normalize_batch``
(one fused multiply-add from uint8 to the forward's dtype).
"""

from __future__ import annotations

import os
import warnings

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
_JPEG_DECODER = None  # set on first use: torchvision's decoder, or False


def _resized_size(w: int, h: int, prep: Preprocessing) -> tuple[int, int]:
    scale = prep.resize / min(w, h)
    return max(prep.resize, round(w * scale)), max(prep.resize, round(h * scale))


def _torchvision_jpeg_decoder():
    """torchvision's decode_jpeg over a list of encoded images, or None where torchvision lacks it.

    torchvision 0.29 deprecates its image codecs in favour of TorchCodec (a warning per call);
    they made extraction 10-15 % faster than PIL here (same pixels), so they are used while they
    exist, with that one warning silenced; without them decoding falls back to PIL.
    """
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    return lambda data: decode_jpeg(data, mode=ImageReadMode.UNCHANGED, apply_exif_orientation=True)


def _rgb(x: torch.Tensor | None) -> torch.Tensor | None:
    """A decoded JPEG as RGB (3, H, W) with H x W x 3 memory; None for what PIL should handle (CMYK)."""
    if x is not None and x.shape[0] == 1:  # grayscale: as PIL's convert("RGB")
        return x.expand(3, -1, -1).permute(1, 2, 0).contiguous().permute(2, 0, 1)
    return x if x is not None and x.shape[0] == 3 else None


def decode_images(paths: list[str | os.PathLike]) -> list[torch.Tensor | Exception]:
    """Image files -> uint8 RGB tensors (3, H, W) (memory H x W x 3), EXIF-rotated, as ``load_rgb``
    reads them; for an unreadable file the exception (``OSError``/``ValueError``) in its place.

    Colour and grayscale JPEGs decode in one call with torchvision's libjpeg-turbo, which gives
    the same pixels as PIL; anything else (CMYK JPEGs, other formats, files torchvision refuses)
    goes through ``load_rgb``.
    """
    global _JPEG_DECODER
    from captions.pipeline.resize import load_rgb

    out: list[torch.Tensor | Exception | None] = [None] * len(paths)
    jpegs: dict[int, torch.Tensor] = {}
    for i, path in enumerate(paths):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            out[i] = e
            continue
        if data[:3] == _JPEG_MAGIC:
            jpegs[i] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    if jpegs:
        if _JPEG_DECODER is None:
            _JPEG_DECODER = _torchvision_jpeg_decoder() or False
        if _JPEG_DECODER:
            try:
                decoded = _JPEG_DECODER(list(jpegs.values()))
            except RuntimeError:  # a corrupt one spoils the call: one at a time
                decoded = []
                for data in jpegs.values():
                    try:
                        decoded.append(_JPEG_DECODER(data))
                    except RuntimeError:
                        decoded.append(None)
            for i, x in zip(jpegs, decoded, strict=True):
                out[i] = _rgb(x)
    for i, path in enumerate(paths):
        if out[i] is None:
            try:
                out[i] = pil_to_tensor(load_rgb(path))
            except Exception as e:  # PIL raises many types for corrupt data
                out[i] = e
    return out


def decode_rgb(path: str | os.PathLike) -> torch.Tensor:
    """One image file -> uint8 RGB tensor (3, H, W), as ``decode_images``; raises if unreadable."""
    x = decode_images([path])[0]
    if isinstance(x, Exception):
        raise x
    return x


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W) whose memory is H x W x 3 (no extra copy)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def crop_tensor(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 RGB (3, H, W) -> uint8 (3, crop, crop): shorter side to ``prep.resize``, centre crop (a view)."""
    return crop_batch([x], prep)[0]


def crop_batch(images: list[torch.Tensor], prep: Preprocessing) -> torch.Tensor:
    """uint8 RGB images (3, H, W) -> uint8 (n, 3, crop, crop), channels-last memory (maybe a view):
    shorter side to ``prep.resize``, centre crop.

    Images of one size are stacked and resized together (torch's uint8 resize is fastest on a
    channels-last batch; one image comes back in NCHW and costs 3x as much with the transposes).
    """
    size = images[0].shape[1:]
    if any(im.shape[1:] != size for im in images):  # mixed sizes: one at a time
        return torch.stack([crop_batch([im], prep)[0].permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)
    h, w = int(size[0]), int(size[1])
    nw, nh = _resized_size(w, h, prep)
    x = torch.stack([im.permute(1, 2, 0) for im in images]).permute(0, 3, 1, 2)  # (n, 3, h, w) channels_last
    if (nw, nh) != (w, h):
        if prep.interpolation in _TORCH_INTERP:
            x = torch.nn.functional.interpolate(x, size=(nh, nw), mode=prep.interpolation, antialias=True,
                                                align_corners=False)
            x = x.contiguous(memory_format=torch.channels_last)  # a no-op for a batch; one image comes back NCHW
        else:
            interp = _PIL_INTERP[prep.interpolation]
            x = torch.stack([torch.from_numpy(np.array(Image.fromarray(im.numpy()).resize((nw, nh), interp)))
                             for im in x.permute(0, 2, 3, 1)]).permute(0, 3, 1, 2)
    # torchvision's CenterCrop (the eval transform of every family's weights): the offset rounded
    # half to even, not floored (an odd margin of 3 starts at 2)
    left, top = round((nw - prep.crop) / 2), round((nh - prep.crop) / 2)
    return x[:, :, top : top + prep.crop, left : left + prep.crop]


def preprocess_image(img: Image.Image, prep: Preprocessing) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, crop, crop): shorter side to ``prep.resize``, centre crop.

    The image's centre square is cut out in source coordinates first (as ``prepare`` resizes), so
    a long thin image is never scaled up whole (20000 x 1 would become 5,120,000 x 256 pixels).
    Normalisation is left to ``normalize_batch`` so workers ship 4x fewer bytes and the GPU does it.
    """
    from captions.pipeline.resize import centre_square_box

    box = centre_square_box(*img.size)
    if box != (0, 0, *img.size):
        img = img.crop(box)
    return crop_tensor(pil_to_tensor(img), prep).contiguous()


def normalize_batch(x: torch.Tensor, prep: Preprocessing, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> ``dtype``, normalised with the backbone's mean/std, on ``x``'s device.

    One fused pass, ``x * 1/(255 std) - mean/std`` computed in float32 and written in ``dtype``.
    Channels-last input (even a cropped view) gives channels-last output: it is processed as rows
    of W x 3 values against a row-long pattern of the three channels' constants, which vectorises
    (broadcasting (1, 3, 1, 1) over channels-last memory runs 3 values at a time, 3x slower).
    """
    scale = [1.0 / (255.0 * s) for s in prep.std]
    shift = [-m / s for m, s in zip(prep.mean, prep.std, strict=True)]
    n, c, h, w = x.shape
    if c == 3 and x.stride(1) == 1 and x.stride(3) == 3:  # channels-last memory: rows of w x 3 values
        rows = x.permute(0, 2, 3, 1).flatten(2)
        scale_t = torch.tensor(scale * w, device=x.device).view(1, 1, 3 * w)
        shift_t = torch.tensor(shift * w, device=x.device).view(1, 1, 3 * w)
        out = torch.empty((n, h, w * 3), dtype=dtype, device=x.device)
        torch.addcmul(shift_t, rows, scale_t, out=out)
        return out.view(n, h, w, 3).permute(0, 3, 1, 2)
    scale_t = torch.tensor(scale, device=x.device).view(1, 3, 1, 1)
    shift_t = torch.tensor(shift, device=x.device).view(1, 3, 1, 1)
    out = torch.empty_like(x, dtype=dtype)
    return torch.addcmul(shift_t, x, scale_t, out=out)
