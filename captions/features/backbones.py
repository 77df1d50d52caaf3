"""One registry of CNN backbones (torchvision and timm) that return spatial feature maps.

Each entry knows its output channels, stride and preprocessing (mean/std, interpolation, resize
ratio), so the cache records exactly how its features were made and ``captions caption`` can
redo it for new images.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from captions.errors import CaptionsError
from captions.fsutil import sha256_file

log = logging.getLogger("captions")

TORCHVISION_BACKBONES = ("regnet_x_400mf", "regnet_x_800mf", "resnet18", "resnet34", "resnet50", "resnet101",
                         "resnet152")
DEFAULT_BACKBONE = "regnet_x_400mf"
RANDOM_INIT_SEED = 0  # --weights none is reproducible: `captions caption` rebuilds the same random backbone
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes the backbone's input: scale the shorter side to ``resize``
    (``interpolation``), centre-crop ``crop`` x ``crop``, scale to [0, 1], normalise."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bilinear" or "bicubic"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Backbone:
    """A ready-to-run feature extractor.

    ``module(x)``: x (N, 3, crop, crop) normalised float -> (N, channels, crop/stride, crop/stride).
    ``weights``: identity recorded in caches: a library weight name, ``sha256:<hex>`` or ``random``.
    """

    name: str
    module: nn.Module
    channels: int
    stride: int
    preprocessing: Preprocessing
    weights: str


def valid_backbone_names() -> str:
    return ", ".join([*TORCHVISION_BACKBONES, "timm/<model name> (e.g. timm/tf_efficientnet_lite0)"])


def scaled_preprocessing(resize: int, crop: int, image_size: int, mean, std, interpolation: str) -> Preprocessing:
    """Keep the library's resize/crop ratio while changing the crop to ``image_size``."""
    return Preprocessing(resize=round(image_size * resize / crop), crop=image_size, mean=tuple(mean),
                         std=tuple(std), interpolation=interpolation)


def load_state_dict_strict(model: nn.Module, path: Path, name: str) -> str:
    """Load a state_dict file into ``model`` strictly; returns ``sha256:<hex>`` of the file.

    Refuses a file that does not fit, naming the missing, unexpected and mis-shaped keys.
    """
    if not path.is_file():
        raise CaptionsError("weights file not found", path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CaptionsError(f"cannot read as a torch state_dict ({type(e).__name__})", path) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CaptionsError("not a state_dict (expected a mapping of parameter names to tensors)", path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label} keys: {', '.join(keys[:3])}{more}")
        raise CaptionsError(f"does not fit backbone {name}: {'; '.join(parts)}", path)
    model.load_state_dict(state, strict=True)
    return "sha256:" + sha256_file(path)


class WeightsUnavailable(CaptionsError):
    """The library's default pretrained weights could not be had (offline, hub error, bad hash)."""


def weights_failed(name: str, err: Exception) -> WeightsUnavailable:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return WeightsUnavailable(
        f"could not get the default pretrained weights for {name} ({reason}). Download them where you have "
        f"internet and pass '--weights PATH' (a state_dict file), or use '--weights none' for random "
        f"initialisation"
    )


def apply_weights(model: nn.Module, name: str, weights: str, pretrained) -> str:
    """Load ``weights`` (``default`` via the ``pretrained()`` callback, ``none``, or a state_dict
    path) into ``model``; returns the identity recorded in caches and checkpoints.

    Raises ``WeightsUnavailable`` when ``pretrained()`` fails, ``CaptionsError`` for a state_dict
    file that is missing, unreadable or does not fit."""
    if weights == "none":
        return "random"
    if weights != "default":
        return load_state_dict_strict(model, Path(weights), name)
    try:
        return pretrained()
    except Exception as e:  # URLError, HTTPError, hash mismatch, hub errors, ...
        raise weights_failed(name, e) from None


class _TorchvisionTrunk(nn.Module):
    """Everything before global pooling of a torchvision ResNet / RegNet."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if hasattr(model, "trunk_output"):  # RegNet
            self.body = nn.Sequential(model.stem, model.trunk_output)
        else:  # ResNet
            self.body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                                      model.layer1, model.layer2, model.layer3, model.layer4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _TimmTrunk(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _build_torchvision(name: str, weights: str, image_size: int) -> Backbone:
    from torchvision.models import get_model, get_model_weights

    wenum = get_model_weights(name).DEFAULT
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = get_model(name, weights=None)
    def pretrained() -> str:
        model.load_state_dict(wenum.get_state_dict(progress=True, check_hash=True))
        return f"torchvision:{wenum}"

    identity = apply_weights(model, name, weights, pretrained)
    t = wenum.transforms()
    prep = scaled_preprocessing(t.resize_size[0], t.crop_size[0], image_size, t.mean, t.std,
                                t.interpolation.value)
    channels = model.fc.in_features
    return Backbone(name, _TorchvisionTrunk(model), channels, 32, prep, identity)


def _build_timm(name: str, weights: str, image_size: int) -> Backbone:
    import timm

    arch = name.split("/", 1)[1]
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = timm.create_model(arch, pretrained=False)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise CaptionsError(f"unknown timm model '{arch}' ({e}); valid backbones: {valid_backbone_names()}") from None
    def pretrained() -> str:
        model.load_state_dict(timm.create_model(arch, pretrained=True).state_dict())
        return f"timm:{model.pretrained_cfg.get('hf_hub_id') or arch}"

    identity = apply_weights(model, name, weights, pretrained)
    cfg = model.pretrained_cfg
    crop = cfg["input_size"][-1]
    resize = round(crop / cfg.get("crop_pct", 0.875))
    prep = scaled_preprocessing(resize, crop, image_size, cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"))
    reduction = model.feature_info[-1]["reduction"] if getattr(model, "feature_info", None) else 32
    return Backbone(name, _TimmTrunk(model), model.num_features, reduction, prep, identity)


def build_backbone(name: str = DEFAULT_BACKBONE, weights: str = "default", image_size: int = 224) -> Backbone:
    """Build backbone ``name`` in eval mode.

    ``weights``: ``default`` (the library's pretrained weights, downloaded as usual), ``none``
    (random initialisation, a warning is logged; always the same weights: seeded with
    ``RANDOM_INIT_SEED`` without touching the caller's RNG) or a path to a state_dict loaded strictly.
    """
    if name in TORCHVISION_BACKBONES:
        bb = _build_torchvision(name, weights, image_size)
    elif name.startswith("timm/") and len(name) > 5:
        bb = _build_timm(name, weights, image_size)
    else:
        raise CaptionsError(f"unknown backbone '{name}'; valid backbones: {valid_backbone_names()}")
    if weights == "none":
        log.warning("backbone %s uses RANDOM initialisation (--weights none): features will not carry "
                    "ImageNet knowledge; this is recorded in the cache metadata", name)
    bb.module.eval().requires_grad_(False)
    return bb


def spatial_shape_of(bb: Backbone, image_size: int) -> tuple[int, int]:
    """Feature-map size (h, w) of ``bb`` for ``image_size`` crops.

    torchvision ResNets/RegNets halve the size five times with odd kernels padded by k // 2
    (ceil(S / 2) each time), so ceil(S / 32) without a forward; other models run a 1-image probe.
    """
    if bb.name in TORCHVISION_BACKBONES and bb.stride == 32:
        side = -(-image_size // 32)
        return side, side
    with torch.inference_mode():
        probe = bb.module(torch.zeros(1, 3, image_size, image_size))
    return int(probe.shape[2]), int(probe.shape[3])
