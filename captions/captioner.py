"""Captioning new images with a trained checkpoint: the recorded backbone, then the decoder.

``Captioner.from_checkpoint(path)`` rebuilds the CNN the checkpoint's features came from (same
backbone, weights, image size and preprocessing; refused when it cannot be the same) and the
decoder; ``.caption(images)`` returns one ``CaptionResult`` per image (caption, words, score,
per-word attention maps for attention models, or the reason the image could not be read).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image

from captions.errors import CaptionsError, first_line
from captions.features.backbones import Backbone, Preprocessing, build_backbone, mean_pooled, spatial_shape_of
from captions.features.forward import FeatureForward, pooled_and_spatial
from captions.features.preprocess import preprocess_image
from captions.features.spec import FeatureSpec, TokenLayout
from captions.features.tuning import tuned_backbone
from captions.fsutil import sha256_file
from captions.generation import Rules, decode
from captions.models.checkpoint import LoadedDecoder, load_decoder
from captions.pipeline.resize import ImageRefused, load_rgb, to_rgb
from captions.pipeline.settings import DEFAULT_MAX_PIXELS
from captions.pipeline.vocab import caption_word_pieces
from captions.runtime import resolve_device, resolve_precision

log = logging.getLogger("captions")

ImageInput = str | os.PathLike | Image.Image


@dataclass
class CaptionResult:
    """The caption of one image.

    ``words``: the generated words (without ``<END>``); ``caption``: them joined by spaces;
    ``score``: summed log-probability of the words and ``<END>``; ``attention``: (len(words), h, w)
    float32 attention weights over the backbone's feature grid (attention models only);
    ``crop``: the RGB centre crop the backbone saw; ``error``: why the image could not be captioned
    (then everything else is empty).
    """

    source: str
    caption: str = ""
    words: list[str] = field(default_factory=list)
    score: float = float("nan")
    attention: np.ndarray | None = None
    crop: Image.Image | None = None
    error: str | None = None


def backbone_weights_arg(identity: str, weights: str | os.PathLike | None) -> str:
    """Translate the checkpoint's recorded weight identity into ``build_backbone``'s argument.

    ``random`` -> ``none`` (reproducible random initialisation); ``torchvision:...`` / ``timm:...`` /
    ``open_clip:...`` -> ``default`` (the library's weights, downloaded or found in its cache); ``sha256:<hex>`` ->
    the state_dict file the user passes as ``weights`` (its sha256 must match).
    """
    if identity == "random":
        if weights is not None:
            raise CaptionsError("the checkpoint's backbone was randomly initialised (--weights none at extraction); "
                                "--weights does not apply")
        return "none"
    if identity.startswith(("torchvision:", "timm:", "open_clip:")):
        if weights is not None:
            raise CaptionsError(f"the checkpoint's features came from the library weights {identity}; they are "
                                f"loaded by name (put a downloaded copy in the torch/timm/open_clip cache), not "
                                f"with --weights")
        return "default"
    if identity.startswith("sha256:"):
        if weights is None:
            raise CaptionsError(f"the checkpoint's features came from a weights file with {identity[:19]}...; pass "
                                f"that state_dict file with --weights PATH")
        path = Path(weights)
        if not path.is_file():
            raise CaptionsError("weights file not found", path)
        actual = "sha256:" + sha256_file(path)
        if actual != identity:
            raise CaptionsError(f"is not the weights file the checkpoint's features were extracted with "
                                f"(its {actual[:19]}... != recorded {identity[:19]}...)", path)
        return str(path)
    raise CaptionsError(f"unknown backbone weights identity '{identity}' in the checkpoint")


def checkpoint_backbone(ckpt: dict, spec: FeatureSpec, weights: str | os.PathLike | None = None) -> Backbone:
    """The backbone a checkpoint's features come from: its fine-tuned encoder's weights when it
    carries them (``ckpt["encoder"]``), else the recorded library weights or ``weights`` file
    (``backbone_weights_arg``). Raises ``CaptionsError`` when they cannot be had."""
    enc = ckpt.get("encoder")
    if enc is not None:
        if weights is not None:
            raise CaptionsError("the checkpoint carries its fine-tuned encoder's weights; --weights does not apply")
        return tuned_backbone(spec.backbone, spec.image_size, enc["state_dict"], spec.weights)
    return build_backbone(spec.backbone, backbone_weights_arg(spec.weights, weights), spec.image_size)


class Captioner:
    """Backbone + decoder of a checkpoint, ready to caption images on CPU or GPU.

    Use ``Captioner.from_checkpoint(path, device=...)``; ``caption(images, beam_size=...)`` takes
    paths or PIL images (any size or mode; files are EXIF-rotated).
    """

    def __init__(self, decoder: LoadedDecoder, backbone: Backbone, preprocessing: Preprocessing,
                 spatial_shape: tuple[int, int], device: torch.device, amp_dtype: torch.dtype | None,
                 feature_dtype: torch.dtype) -> None:
        self.decoder = decoder
        self.model = decoder.model
        self.backbone = backbone
        self.preprocessing = preprocessing
        self.spatial_shape = spatial_shape
        self.device = device
        self.feature_dtype = feature_dtype
        # the extraction forward itself (folded BatchNorms, channels_last, autocast), normalising
        # with the checkpoint's recorded preprocessing
        self.forward = FeatureForward(backbone, device, channels_last=True, amp_dtype=amp_dtype)
        self.forward.preprocessing = preprocessing

    @property
    def has_attention(self) -> bool:
        return bool(self.model.uses_spatial)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "auto",
                        weights: str | os.PathLike | None = None, precision: str | None = None) -> Captioner:
        """Rebuild checkpoint ``path``'s backbone and decoder on ``device`` (auto, cpu, cuda).

        ``weights``: the state_dict file, for checkpoints whose features came from one (its sha256
        is checked); a checkpoint with a fine-tuned encoder (``--fine-tune-encoder``) carries its
        weights and needs none. ``precision``: the backbone's autocast (auto, fp32, bf16, fp16); default: the
        one recorded at extraction. Raises ``CaptionsError`` when the backbone cannot be the same
        as at extraction (other weights, output shape or channels).
        """
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        dec = load_decoder(path, dev)
        spec = FeatureSpec.from_dict(dec.checkpoint.get("features") or {}, path=path)
        bb = checkpoint_backbone(dec.checkpoint, spec, weights)
        if TokenLayout.parse(spec.token_layout).pooled == "mean":  # caches from before pooled=model existed
            bb = mean_pooled(bb)
        prep = Preprocessing.from_dict(spec.preprocessing)  # "none" above is seeded: the weights of extraction
        if prep != bb.preprocessing:
            log.warning("using the checkpoint's recorded preprocessing %s (the backbone's default now is %s)",
                        prep.to_dict(), bb.preprocessing.to_dict())
        shape = spatial_shape_of(bb, prep.crop)
        rebuilt = FeatureSpec(backbone=bb.name, weights=bb.weights, image_size=spec.image_size,
                              preprocessing=prep.to_dict(), dtype=spec.dtype, precision=spec.precision,
                              spatial_shape=shape, channels=bb.channels, token_layout=bb.token_layout)
        spec.require_compatible(rebuilt, FeatureSpec.DECODER_KEYS, path=path,
                                what=f"backbone {spec.backbone} as built now differs from the one the checkpoint's "
                                     f"features came from (checkpoint vs now); use the library version it was "
                                     f"trained with")
        amp = resolve_precision(precision or spec.precision or "auto", dev)
        fdtype = torch.float16 if spec.dtype == "float16" else torch.float32
        return cls(dec, bb, prep, shape, dev, amp, fdtype)

    @torch.inference_mode()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 crops (N, 3, S, S) -> float32 features as stored in a cache: spatial (N, P, C) for
        attention decoders, pooled (N, C) otherwise (rounded through the cache's dtype)."""
        spatial, pooled = pooled_and_spatial(self.forward(batch), self.feature_dtype)
        return (spatial if self.model.uses_spatial else pooled).float()

    def load(self, image: ImageInput) -> Image.Image:
        """Path or PIL image -> RGB PIL image (files EXIF-rotated). Raises ``CaptionsError``."""
        if isinstance(image, Image.Image):
            return to_rgb(image)
        path = Path(image)
        if not path.is_file():
            raise CaptionsError("a folder, not an image file" if path.is_dir() else "image file not found", path)
        if path.stat().st_size == 0:
            raise CaptionsError("an empty file (0 bytes), not an image", path)
        try:
            return self.load_file(path)
        except ImageRefused as e:
            raise CaptionsError(f"image refused ({e})", path) from None
        except Exception as e:  # PIL raises many types for non-images and corrupt data
            detail = first_line(e)
            raise CaptionsError(f"cannot read as an image ({type(e).__name__}: {detail})", path) from None

    def load_file(self, file: str | os.PathLike | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """A path or binary file object (an upload) -> RGB PIL image, decoded as ``caption`` decodes
        files: JPEGs reduced by the decoder (never below the backbone's resize), EXIF-rotated.

        Raises ``ImageRefused`` (over ``max_pixels`` decoded pixels, or too narrow), and PIL's
        ``OSError`` / ``ValueError`` for files that are not images or are truncated.
        """
        # JPEGs decode reduced (never below the backbone's resize); size and shape are bounded
        return load_rgb(file, draft_size=self.preprocessing.resize, max_pixels=max_pixels)

    def caption(self, images: Sequence[ImageInput], beam_size: int = 3, length_penalty: float = 0.0,
                batch_size: int = 16, min_length: int = 1, allow_unk: bool = False) -> list[CaptionResult]:
        """Caption ``images`` (paths or PIL images), ``batch_size`` at a time through CNN and decoder.

        Each caption has at least ``min_length`` words, and ``<UNK>`` only when ``allow_unk``
        (``captions.generation.Rules``). Returns one ``CaptionResult`` per input, in order; an
        unreadable file (or one refused: too many pixels, too narrow) gets its ``error`` set and
        does not stop the others. Results do not depend on ``batch_size``.
        """
        rules = Rules(min_length=min_length, allow_unk=allow_unk)
        if beam_size < 1:
            raise CaptionsError(f"beam size must be at least 1, got {beam_size}")
        results: list[CaptionResult] = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            good: list[tuple[CaptionResult, torch.Tensor]] = []
            for img in chunk:
                name = str(img) if not isinstance(img, Image.Image) else f"<image {len(results)}>"
                res = CaptionResult(source=name)
                results.append(res)
                try:
                    rgb = self.load(img)
                except CaptionsError as e:
                    res.error = str(e)
                    continue
                crop = self.crop(rgb)
                res.crop = crop_image(crop)
                good.append((res, crop))
            if good:
                self._decode_into(good, beam_size, length_penalty, rules)
        return results

    def crop(self, rgb: Image.Image) -> torch.Tensor:
        """RGB PIL image -> the uint8 centre crop (3, S, S) the backbone takes (the checkpoint's
        recorded resize, crop and interpolation), as ``caption`` makes it."""
        return preprocess_image(rgb, self.preprocessing)

    def decode_features(self, feats: torch.Tensor, beam_size: int = 3, length_penalty: float = 0.0,
                        rules: Rules | None = None) -> list[CaptionResult]:
        """Decode features from ``features`` (N, P, C) or (N, C) as one batch: one ``CaptionResult``
        per row (caption, words, score, attention (len(words), h, w) for attention models; no
        source or crop). A row's result does not depend on the other rows (no computation mixes
        them), so callers may group images from different requests. ``rules``: what may be
        generated (default: at least one word, no ``<UNK>``: users never want it in a caption)."""
        rules = rules or Rules(allow_unk=False)
        with torch.no_grad():
            tokens, scores, maps = decode(self.model, feats, self.decoder.max_length + 1, beam_size, length_penalty,
                                          rules)
        tokens_l = tokens.cpu().tolist()
        maps_np = maps.float().cpu().numpy() if maps is not None else None
        h, w = self.spatial_shape
        out = []
        for j, row in enumerate(tokens_l):
            words, steps = caption_word_pieces(row, self.decoder.idx_to_token)
            res = CaptionResult(source="", caption=" ".join(words), words=words, score=float(scores[j]))
            if maps_np is not None:  # a word of several subword pieces: the mean of their maps (sums to 1)
                per_word = [maps_np[j, s].mean(axis=0) for s in steps]
                res.attention = np.asarray(per_word, dtype=np.float32).reshape(len(steps), h, w)
            out.append(res)
        return out

    def _decode_into(self, good: list[tuple[CaptionResult, torch.Tensor]], beam_size: int,
                     length_penalty: float, rules: Rules | None = None) -> None:
        feats = self.features(torch.stack([c for _, c in good]))
        for (res, _), got in zip(good, self.decode_features(feats, beam_size, length_penalty, rules), strict=True):
            res.words, res.caption, res.score, res.attention = got.words, got.caption, got.score, got.attention


def crop_image(crop: torch.Tensor) -> Image.Image:
    """uint8 crop (3, S, S) from ``Captioner.crop`` -> RGB PIL image (what the backbone saw)."""
    return Image.fromarray(crop.permute(1, 2, 0).numpy(), "RGB")
