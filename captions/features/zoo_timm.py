"""timm backbones: every timm model as ``timm/<model>`` (or ``timm/<model>.<pretrained tag>``).

``forward_features`` gives the grid in one of three layouts, read from the model's output:
channels-first maps (N, C, H, W) as they are; channels-last maps (N, H, W, C) (Swin and others,
``output_fmt``) transposed; tokens (N, T, C) (ViT, DeiT, BEiT, EVA, DINOv2 with or without
registers, LeViT...) split into the model's ``num_prefix_tokens`` (class, distillation, register
tokens: dropped) and the patch grid. The pooled vector is the model's own pre-logits embedding,
``forward_head(features, pre_logits=True)`` (the class token for a ViT); where that is exactly the
mean over the grid (global average pooling) the layout says ``mean``, as caches always did, and
where its width differs from the grid's channels (MobileNetV3's head convolution) the mean is
taken instead. Models made for one input size (``pretrained_cfg["fixed_input_size"]``) are built
for ``--image-size`` through timm's ``img_size`` option, which resamples position embeddings
when it loads pretrained weights.
"""

from __future__ import annotations

import logging
import sys
from functools import cache
from pathlib import Path

import torch
from torch import nn

from captions.errors import CaptionsError, first_line
from captions.features.backbones import (
    TIMM_PREFIX,
    Backbone,
    load_state_dict_strict,
    power_of_two_stride,
    read_state_dict,
    scaled_preprocessing,
    seeded,
    square_grid,
    state_dict_misfit,
    unknown_backbone,
    weights_failed,
)
from captions.features.spec import TokenLayout

log = logging.getLogger("captions")
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@cache
def names() -> tuple[str, ...]:
    """``timm/<model>`` for every architecture timm knows, sorted."""
    import timm

    return tuple(TIMM_PREFIX + n for n in timm.list_models())


class _TimmTrunk(nn.Module):
    """A timm model's ``forward_features`` as the feature map (N, C, h, w), and with
    ``own_pooled`` its ``forward_head(..., pre_logits=True)`` as the pooled vector."""

    def __init__(self, model: nn.Module, kind: str, prefix: int = 0, grid: tuple[int, int] = (0, 0),
                 own_pooled: bool = False) -> None:
        super().__init__()
        self.model, self.kind, self.prefix, self.grid, self.own_pooled = model, kind, prefix, grid, own_pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.forward_features(x)
        if self.kind == "nhwc":
            fmap = feats.permute(0, 3, 1, 2)
        elif self.kind == "tokens":
            fmap = feats[:, self.prefix :].unflatten(1, self.grid).permute(0, 3, 1, 2)
        else:
            fmap = feats
        if not self.own_pooled:
            return fmap
        return fmap, self.model.forward_head(feats, pre_logits=True)


def output_layout(model: nn.Module, feats: torch.Tensor, name: str) -> tuple[str, int, tuple[int, int], int]:
    """(kind ``nchw``/``nhwc``/``tokens``, prefix tokens, grid (h, w), channels) of a
    ``forward_features`` output; ``CaptionsError`` for outputs with no grid."""
    if not isinstance(feats, torch.Tensor) or feats.ndim not in (3, 4):
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise CaptionsError(f"backbone {name}: forward_features gives {shape}, not a feature map or tokens; "
                            f"not supported")
    channels = int(getattr(model, "num_features", 0) or 0)
    if feats.ndim == 4:
        nhwc = "NHWC" in str(getattr(model, "output_fmt", "")) or (
            feats.shape[1] != channels and feats.shape[-1] == channels)
        if nhwc:
            return "nhwc", 0, (int(feats.shape[1]), int(feats.shape[2])), int(feats.shape[3])
        return "nchw", 0, (int(feats.shape[2]), int(feats.shape[3])), int(feats.shape[1])
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    return "tokens", prefix, square_grid(int(feats.shape[1]), prefix, name), int(feats.shape[2])


def _own_pooled(trunk: _TimmTrunk, x: torch.Tensor, name: str) -> bool:
    """Whether the model's pre-logits vector is something other than the mean over the grid.

    Decided on a probe batch: equal to the mean (global average pooling) -> False, so the
    layout stays the plain ``grid`` of older caches; another width -> False too (logged)."""
    with torch.inference_mode():
        feats = trunk.model.forward_features(x)
        fmap = _TimmTrunk(trunk.model, trunk.kind, trunk.prefix, trunk.grid)(x)
        pre = trunk.model.forward_head(feats, pre_logits=True)
    if pre.ndim != 2 or pre.shape[1] != fmap.shape[1]:
        log.info("%s: its pre-logits vector has %s values per image, its feature map %d channels; the pooled "
                 "feature is the mean over the grid", name, tuple(pre.shape[1:]), fmap.shape[1])
        return False
    mean = fmap.float().mean(dim=(2, 3))
    return not torch.allclose(pre.float(), mean, rtol=1e-4, atol=1e-5 * float(mean.abs().max()) + 1e-12)


def _load_file(model: nn.Module, path: Path, name: str, image_size: int, native: int) -> str:
    """Load a state_dict file strictly; when it does not fit as it is, once more through the
    model family's own ``checkpoint_filter_fn`` (timm's converter: position embeddings and
    relative position tables resampled to this size, older key names)."""
    state = read_state_dict(path)
    if state_dict_misfit(model, state):
        convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        try:
            converted = convert(dict(state), model) if convert else None
        except Exception:  # a converter for another checkpoint format
            converted = None
        if converted is not None and not state_dict_misfit(model, converted):
            state = converted
    hint = f" (it may be made for --image-size {native})" if image_size != native else ""
    return load_state_dict_strict(model, path, name, state, hint)


def _create(arch: str, pretrained: bool, kwargs: dict, name: str, image_size: int, native: int) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs).eval()
    except TypeError as e:  # no img_size option
        raise wrong_size(name, image_size, native, e) from None
    except RuntimeError as e:
        if "size mismatch" in str(e):
            raise CaptionsError(f"the pretrained weights of {name} do not fit --image-size {image_size} (size "
                                f"mismatch); use --image-size {native}") from None
        if pretrained:
            raise weights_failed(name, e) from None
        raise wrong_size(name, image_size, native, e) from None
    except (AssertionError, ValueError) as e:
        raise wrong_size(name, image_size, native, e) from None
    except Exception as e:  # offline, hub errors, ...
        if pretrained:
            raise weights_failed(name, e) from None
        raise


def wrong_size(name: str, image_size: int, native: int, err: BaseException) -> CaptionsError:
    reason = first_line(err)
    return CaptionsError(f"backbone {name} does not run at --image-size {image_size} ({reason}); it was made "
                         f"for --image-size {native}")


def _model(name: str, arch: str, weights: str, image_size: int) -> tuple[nn.Module, str, dict]:
    """(eval-mode model for ``image_size`` crops, weights identity, pretrained_cfg as a dict)."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    native = int(cfg.get("input_size", (3, 224, 224))[-1])
    kwargs = {"img_size": image_size} if cfg.get("fixed_input_size") and image_size != native else {}
    if weights == "default":
        model = _create(arch, True, kwargs, name, image_size, native)
        return model, f"timm:{model.pretrained_cfg.get('hf_hub_id') or arch}", model.pretrained_cfg
    with seeded():
        model = _create(arch, False, kwargs, name, image_size, native)
    if weights == "none":
        return model, "random", model.pretrained_cfg
    return model, _load_file(model, Path(weights), name, image_size, native), model.pretrained_cfg


def _preprocessing(cfg: dict, image_size: int):
    crop = int(cfg.get("input_size", (3, 224, 224))[-1])
    resize = round(crop / cfg.get("crop_pct", 0.875))
    interp = cfg.get("interpolation", "bicubic")
    return scaled_preprocessing(resize, crop, image_size, cfg.get("mean", (0.485, 0.456, 0.406)),
                                cfg.get("std", (0.229, 0.224, 0.225)),
                                interp if interp in _INTERPOLATIONS else "bicubic")


def _stride(model: nn.Module, kind: str, image_size: int, grid: tuple[int, int]) -> int:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if kind == "tokens" and patch is not None:
        return int(patch[0] if isinstance(patch, (tuple, list)) else patch)
    info = getattr(model, "feature_info", None)
    if info:
        return int(info[-1]["reduction"])
    return power_of_two_stride(image_size, grid[1])


def check_name(name: str) -> str:
    """The timm model name of ``timm/<model>``; ``CaptionsError`` with close matches when unknown."""
    import timm

    arch = name[len(TIMM_PREFIX):]
    if not arch or not timm.is_model(arch.split(".")[0]):
        from captions.features.catalog import all_names

        raise unknown_backbone(name, all_names(), what="timm model")
    return arch


def build(name: str, weights: str, image_size: int) -> Backbone:
    """Build ``timm/<model>`` as a ``Backbone`` (see the module docstring)."""
    arch = check_name(name)
    model, identity, cfg = _model(name, arch, weights, image_size)
    native = int(cfg.get("input_size", (3, 224, 224))[-1])
    x = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        with torch.inference_mode():
            feats = model.forward_features(x)
    except Exception as e:  # too small for its windows or attention biases
        raise wrong_size(name, image_size, native, e) from None
    kind, prefix, grid, channels = output_layout(model, feats, name)
    trunk = _TimmTrunk(model, kind, prefix, grid)
    trunk.own_pooled = _own_pooled(trunk, x, name)
    layout = TokenLayout(prefix_dropped=prefix, pooled="model" if trunk.own_pooled else "mean")
    return Backbone(name, trunk, channels, _stride(model, kind, image_size, grid), _preprocessing(cfg, image_size),
                    identity, grid=grid, image_size=image_size, token_layout=str(layout), model=model)


def weights_source(arch: str) -> str:
    """Where ``timm/<arch>``'s default weights come from: ``hf-hub:<id>``, a URL, or none."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None or not timm.models.is_model_pretrained(arch):
        return "none in timm (--weights none or PATH)"
    if cfg.hf_hub_id:
        return f"hf-hub:{cfg.hf_hub_id}"
    return cfg.url or cfg.file or "none in timm (--weights none or PATH)"


def describe(name: str) -> tuple[int, tuple[int, int], int, str]:
    """(channels, grid, image size, weights source) at the model's default input size, from a
    model built on the meta device (no memory, no weights)."""
    import timm

    arch = check_name(name)
    cfg = timm.get_pretrained_cfg(arch)
    size = int(cfg.input_size[-1]) if cfg is not None else 224
    with torch.device("meta"):
        model = timm.create_model(arch).eval()
        feats = model.forward_features(torch.zeros(1, 3, size, size))
    _, _, grid, channels = output_layout(model, feats, name)
    return channels, grid, size, weights_source(arch)
