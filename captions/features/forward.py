"""The extraction forward: uint8 crops -> feature map (and pooled vector) -> the cache's (spatial, pooled) rows.

Shared by ``extract-features`` and ``captions caption``, so that new images get the same
features as the cache the decoder was trained on.
"""

from __future__ import annotations

import torch

from captions.features.backbones import Backbone
from captions.features.fold import fuse_for_inference
from captions.features.preprocess import normalize_batch


class FeatureForward:
    """The extraction forward: uint8 crops (N, 3, S, S) -> the backbone module's output: the
    feature map (N, C, h, w), or (feature map, pooled (N, C)) for backbones with their own pooled
    vector (``Backbone.module``).

    BatchNorm folded (``fuse_for_inference``; models without foldable pairs run as they are),
    channels_last, autocast to ``amp_dtype``. On CPU with bf16/fp16 the parameters are stored in
    that dtype too (autocast would otherwise cast every weight again at every call) and
    normalisation writes the input straight in it.
    ``benchmarks/extract.py`` times its raw forward with this same object.
    """

    def __init__(self, bb: Backbone, device: torch.device, channels_last: bool, amp_dtype: torch.dtype | None,
                 inplace: bool = False) -> None:
        self.device, self.channels_last, self.amp_dtype = device, channels_last, amp_dtype
        self.preprocessing = bb.preprocessing
        module = fuse_for_inference(bb.module, inplace=inplace).to(device)
        self.input_dtype = torch.float32
        if device.type == "cpu" and amp_dtype is not None:
            module = module.to(amp_dtype)
            self.input_dtype = amp_dtype
        # channels_last measured faster on CPU too (benchmarks/README.md)
        self.module = module.to(memory_format=torch.channels_last) if channels_last else module

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 crops -> the model's input (dtype, device, memory format)."""
        x = normalize_batch(x.to(self.device, non_blocking=True), self.preprocessing, self.input_dtype)
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Normalised input (from ``normalize``) -> feature map, or (feature map, pooled); call under
        ``torch.inference_mode``."""
        if self.amp_dtype is None:
            return self.module(x)
        with torch.autocast(self.device.type, dtype=self.amp_dtype):
            return self.module(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """uint8 crops (N, 3, S, S), any device -> feature map (N, C, h, w), or (feature map,
        pooled (N, C)), on ``device``."""
        return self.forward(self.normalize(x))


def pooled_and_spatial(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A backbone's output -> (spatial (N, h*w, C), pooled (N, C)), both ``dtype``, on its device.

    ``out``: a feature map (N, C, h, w), whose pooled vector is the mean over positions (taken in
    float32 before the cast), or a pair (feature map, the model's own pooled vector (N, C)).
    ``spatial`` is contiguous, positions row-major over (h, w) (the cache's ``grid`` layout).
    """
    # (N, C, h, w) -> (N, h*w, C): free for a channels_last map (and for tokens laid out on their
    # grid); casts happen in torch (vectorised) rather than numpy, whose float16 conversion is slow.
    if isinstance(out, tuple):
        fmap, own = out
        pooled = own.float().to(dtype)
    else:
        fmap = out
        pooled = fmap.float().mean(dim=(2, 3)).to(dtype)
    spatial = fmap.flatten(2).transpose(1, 2).to(dtype).contiguous()
    return spatial, pooled
