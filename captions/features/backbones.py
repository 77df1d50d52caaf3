"""One entry point for every image backbone: ``build_backbone(name, weights, image_size)``.

Three families, each in its own module: every torchvision classification model by its name
(``zoo_torchvision``), every timm model as ``timm/<model>`` (``zoo_timm``) and CLIP image towers
as ``open_clip/<model>:<pretrained tag>`` (``zoo_open_clip``). Whatever the family, a ``Backbone``
gives the feature grid channels-first, its pooled vector, its preprocessing and the identity of
its weights, so the cache records exactly how its features were made and ``captions caption``
can redo it for new images.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from captions.errors import CaptionsError, first_line, torch_load_reason
from captions.features.spec import TokenLayout
from captions.fsutil import sha256_file

log = logging.getLogger("captions")

# the backbones of the first releases, still the ones named in --help; every torchvision
# classification model is accepted (zoo_torchvision.names())
TORCHVISION_BACKBONES = ("regnet_x_400mf", "regnet_x_800mf", "resnet18", "resnet34", "resnet50", "resnet101",
                         "resnet152")
DEFAULT_BACKBONE = "regnet_x_400mf"
RANDOM_INIT_SEED = 0  # --weights none is reproducible: `captions caption` rebuilds the same random backbone
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_PREFIX, OPEN_CLIP_PREFIX = "timm/", "open_clip/"


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

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """The preprocessing ``to_dict`` (or a feature spec's ``preprocessing``) recorded."""
        return cls(resize=int(d["resize"]), crop=int(d["crop"]), mean=tuple(d["mean"]), std=tuple(d["std"]),
                   interpolation=str(d["interpolation"]))


@dataclass
class Backbone:
    """A ready-to-run feature extractor.

    ``module(x)``: x (N, 3, crop, crop) normalised float -> the feature map (N, channels, h, w)
    (channels-first, prefix tokens dropped, tokens laid out on their grid) when ``token_layout``
    says ``pooled=mean``; otherwise the pair (feature map, pooled (N, channels)), the pooled
    vector being the model's own (``captions.features.forward.pooled_and_spatial`` takes both).
    ``weights``: identity recorded in caches: a library weight name, ``sha256:<hex>`` or ``random``.
    ``grid``: (h, w) at ``image_size``; ``stride``: input pixels per grid cell (the patch size of
    a ViT); ``model``: the library's own model object, whose layers the module shares (for direct
    calls; no longer valid once the module was BatchNorm-folded in place, as extraction does).
    """

    name: str
    module: nn.Module
    channels: int
    stride: int
    preprocessing: Preprocessing
    weights: str
    grid: tuple[int, int] = (0, 0)
    image_size: int = 0
    token_layout: str = "grid"
    model: nn.Module | None = None

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout.parse(self.token_layout)


def valid_backbone_names() -> str:
    """The accepted names in one line (for help and error texts)."""
    return (f"{DEFAULT_BACKBONE} (default), {', '.join(TORCHVISION_BACKBONES[1:])} or any other torchvision "
            f"classification model by its name, {TIMM_PREFIX}<model> (e.g. timm/vit_small_patch14_dinov2), "
            f"{OPEN_CLIP_PREFIX}<model>:<pretrained tag> (e.g. open_clip/ViT-B-32:openai); "
            f"'captions backbones [PATTERN]' lists them")


def unknown_backbone(name: str, candidates: list[str], what: str = "backbone") -> CaptionsError:
    """One line for a name no family knows: the valid kinds of names and the closest candidates."""
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    if not close:  # "vit_b16" is far from "vit_b_16" by ratio but shares its start
        stem = name.split("/")[-1][:4].lower()
        close = [c for c in candidates if c.split("/")[-1].lower().startswith(stem)][:5]
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return CaptionsError(f"unknown {what} '{name}'; valid backbones: {valid_backbone_names()}{hint}")


def scaled_preprocessing(resize: int, crop: int, image_size: int, mean, std, interpolation: str) -> Preprocessing:
    """Keep the library's resize/crop ratio while changing the crop to ``image_size``."""
    return Preprocessing(resize=round(image_size * resize / crop), crop=image_size, mean=tuple(mean),
                         std=tuple(std), interpolation=interpolation)


def read_state_dict(path: Path) -> dict:
    """A state_dict file (torch ``.pt``/``.pth``/``.bin`` read with ``weights_only=True``, or
    ``.safetensors``) -> {name: tensor}; a ``{"state_dict": ...}`` wrapper is unwrapped.

    Raises ``CaptionsError`` naming the file when it is missing or is not a state_dict."""
    if not path.is_file():
        raise CaptionsError("weights file not found", path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CaptionsError(f"cannot read as a torch state_dict ({torch_load_reason(e, path.stat().st_size)})",
                            path) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CaptionsError("not a state_dict (expected a mapping of parameter names to tensors)", path)
    return state


def state_dict_misfit(model: nn.Module, state: dict) -> str:
    """'' when ``state`` fits ``model`` exactly, else the missing / unexpected / mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            parts.append(f"{label} keys: {', '.join(keys[:3])}{more}")
    return "; ".join(parts)


def load_state_dict_strict(model: nn.Module, path: Path, name: str, state: dict | None = None,
                           hint: str = "") -> str:
    """Load a state_dict file (or ``state`` read from it) into ``model`` strictly; returns
    ``sha256:<hex>`` of the file.

    Refuses a file that does not fit, naming the missing, unexpected and mis-shaped keys (and
    ``hint``, e.g. the image size the file was made for)."""
    state = read_state_dict(path) if state is None else state
    misfit = state_dict_misfit(model, state)
    if misfit:
        raise CaptionsError(f"does not fit backbone {name}: {misfit}{hint}", path)
    model.load_state_dict(state, strict=True)
    return "sha256:" + sha256_file(path)


class WeightsUnavailable(CaptionsError):
    """The library's default pretrained weights could not be had (offline, hub error, bad hash)."""


def weights_failed(name: str, err: Exception) -> WeightsUnavailable:
    reason = first_line(err)
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
    except CaptionsError:
        raise
    except Exception as e:  # URLError, HTTPError, hash mismatch, hub errors, ...
        raise weights_failed(name, e) from None


@contextlib.contextmanager
def seeded() -> Iterator[None]:
    """Context for building a model with random weights: seeded with ``RANDOM_INIT_SEED``, the
    caller's RNG left as it was (so ``--weights none`` gives the same weights every time)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield


def square_grid(tokens: int, prefix: int, name: str) -> tuple[int, int]:
    """(h, w) of the ``tokens - prefix`` patch tokens of a square input; ``CaptionsError`` when
    they do not fill a square grid."""
    n = tokens - prefix
    side = math.isqrt(max(n, 0))
    if n < 1 or side * side != n:
        raise CaptionsError(f"backbone {name}: its {tokens} output tokens ({prefix} prefix) do not form a "
                            f"square grid; this model is not supported")
    return side, side


def power_of_two_stride(image_size: int, side: int) -> int:
    """The CNN stride that makes ``side`` grid cells of an ``image_size`` crop (a power of two:
    ceil(S / stride) cells, as padded convolutions give)."""
    return 2 ** max(0, round(math.log2(image_size / max(side, 1))))


def family_of(name: str) -> str:
    """``timm``, ``open_clip`` or ``torchvision``, from the name's prefix."""
    if name.startswith(TIMM_PREFIX):
        return "timm"
    if name.startswith(OPEN_CLIP_PREFIX):
        return "open_clip"
    return "torchvision"


def build_backbone(name: str = DEFAULT_BACKBONE, weights: str = "default", image_size: int = 224, *,
                   warn_random: bool = True) -> Backbone:
    """Build backbone ``name`` in eval mode for ``image_size`` crops.

    ``weights``: ``default`` (the library's pretrained weights, downloaded as usual), ``none``
    (random initialisation, a warning is logged; always the same weights: seeded with
    ``RANDOM_INIT_SEED`` without touching the caller's RNG; ``warn_random=False`` for a caller that
    loads its own weights next) or a path to a state_dict loaded strictly. Raises
    ``CaptionsError`` for an unknown name (with close matches), a model that cannot run at
    ``image_size`` (naming the size it needs) or weights that do not fit, and
    ``WeightsUnavailable`` when default weights cannot be had.
    """
    family = family_of(name)
    try:
        if family == "timm":
            from captions.features.zoo_timm import build
        elif family == "open_clip":
            from captions.features.zoo_open_clip import build
        else:
            from captions.features.zoo_torchvision import build
    except ModuleNotFoundError as e:  # open-clip-torch is a dependency, but an older venv may lack it
        raise CaptionsError(f"backbone {name} needs the Python package '{e.name}', which is not installed "
                            f"(scripts/setup.sh installs it)") from None
    bb = build(name, weights, image_size)
    if weights == "none" and warn_random:
        log.warning("backbone %s uses RANDOM initialisation (--weights none): features will not carry "
                    "ImageNet knowledge; this is recorded in the cache metadata", name)
    bb.module.eval().requires_grad_(False)
    return bb


def mean_pooled(bb: Backbone) -> Backbone:
    """``bb`` with the mean over the grid as its pooled vector (the layout of older caches)."""
    if bb.layout.pooled == "mean":
        return bb
    return replace(bb, module=_MapOnly(bb.module), token_layout=str(replace(bb.layout, pooled="mean")))


class _MapOnly(nn.Module):
    """A (feature map, pooled) module reduced to its feature map."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0]


def feature_map_of(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A backbone module's output -> its feature map (N, C, h, w)."""
    return out[0] if isinstance(out, tuple) else out


def spatial_shape_of(bb: Backbone, image_size: int) -> tuple[int, int]:
    """Feature-map size (h, w) of ``bb`` for ``image_size`` crops: the grid found when it was
    built for that size, otherwise from a 1-image probe."""
    if image_size == bb.image_size and bb.grid != (0, 0):
        return bb.grid
    with torch.inference_mode():
        probe = feature_map_of(bb.module(torch.zeros(1, 3, image_size, image_size)))
    return int(probe.shape[2]), int(probe.shape[3])
