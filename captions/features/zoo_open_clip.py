"""CLIP image towers through open_clip: ``open_clip/<model>:<pretrained tag>`` (e.g. ``open_clip/ViT-B-32:openai``).

The tower runs with its ``output_tokens`` option: the pooled vector is the projected image
embedding (what CLIP compares with text, what ClipCap-style captioners start from) and the grid
is the patch tokens (class token dropped), mapped through the same output projection so that
both have the embedding's width and live in one space (as MaskCLIP reads dense CLIP features).
Vision-transformer towers only (ViT-*; not ResNet, timm-trunk or CoCa towers).

``--weights default`` builds the whole CLIP model with open_clip's own download and loader
(``create_model(model, pretrained=tag)``, position embeddings resized to ``--image-size``);
``none`` and ``PATH`` build the image tower beside a one-layer stand-in text tower, which is never
used (a PATH may hold a whole CLIP state_dict, whose ``visual.*`` keys are taken, or the image
tower's own). Preprocessing: the tag's mean, std and interpolation (OpenAI's by default), the
shorter side resized to the crop (open_clip's ``shortest`` mode; for the square crops ``prepare``
stores, ``squash`` gives the same pixels).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import torch
from torch import nn

from captions.errors import CaptionsError
from captions.features.backbones import (
    OPEN_CLIP_PREFIX,
    Backbone,
    Preprocessing,
    load_state_dict_strict,
    read_state_dict,
    seeded,
    unknown_backbone,
    weights_failed,
)
from captions.features.spec import TokenLayout

# the text tower open_clip builds beside the image tower when only the image tower is wanted
_STAND_IN_TEXT = {"width": 8, "heads": 1, "layers": 1, "context_length": 2, "vocab_size": 8}


@cache
def names() -> tuple[str, ...]:
    """``open_clip/<model>:<tag>`` for every pretrained (model, tag) open_clip lists whose image
    tower is a ViT (the only towers supported)."""
    import open_clip

    return tuple(f"{OPEN_CLIP_PREFIX}{m}:{t}" for m, t in open_clip.list_pretrained()
                 if _is_vit_config(open_clip.get_model_config(m) or {}))


def _is_vit_config(cfg: dict) -> bool:
    """Whether open_clip's model config ``cfg`` describes a plain ViT image tower (not a ResNet,
    a timm trunk, an attentional pooler or CoCa's multimodal model)."""
    vision = cfg.get("vision_cfg", {})
    return not ("timm_model_name" in vision or isinstance(vision.get("layers"), (list, tuple))
                or vision.get("attentional_pool") or "multimodal_cfg" in cfg)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """open_clip logs its progress on the root logger ("No pretrained weights loaded..."): our
    own warning says what matters, so its records below ERROR are dropped while it builds."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def parse(name: str) -> tuple[str, str]:
    """``open_clip/<model>[:<tag>]`` -> (model, tag or ''); ``CaptionsError`` with close matches
    for a model or tag open_clip does not know."""
    import open_clip

    model, _, tag = name[len(OPEN_CLIP_PREFIX):].partition(":")
    if model not in open_clip.list_models():
        from captions.features.catalog import all_names

        raise unknown_backbone(name, all_names(), what="open_clip model")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if tag and tag not in tags:
        raise unknown_backbone(name, [f"{OPEN_CLIP_PREFIX}{model}:{t}" for t in tags], what="open_clip pretrained tag")
    return model, tag


def _tag_cfg(model: str, tag: str) -> dict:
    import open_clip

    return dict(open_clip.get_pretrained_cfg(model, tag) or {}) if tag else {}


def _clip(model: str, tag: str, weights: str, image_size: int) -> tuple[nn.Module, str]:
    """(whole open_clip model, weights identity) with the image tower built for ``image_size``."""
    import open_clip

    kwargs = {"force_image_size": image_size, "force_quick_gelu": bool(_tag_cfg(model, tag).get("quick_gelu"))}
    if weights == "default":
        if not tag:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
            raise CaptionsError(f"{OPEN_CLIP_PREFIX}{model} names no pretrained tag: use "
                                f"{OPEN_CLIP_PREFIX}{model}:<tag> (tags: {tags}), or --weights none / PATH")
        try:
            with _quiet():
                clip = open_clip.create_model(model, pretrained=tag, **kwargs)
        except Exception as e:  # offline, hub errors, a bad download
            raise weights_failed(f"{OPEN_CLIP_PREFIX}{model}:{tag}", e) from None
        return clip, f"open_clip:{model}:{tag}"
    with seeded(), _quiet():
        clip = open_clip.create_model(model, pretrained=None, text_cfg=dict(_STAND_IN_TEXT), **kwargs)
    if weights == "none":
        return clip, "random"
    return clip, _load_file(clip, Path(weights), f"{OPEN_CLIP_PREFIX}{model}")


def _load_file(clip: nn.Module, path: Path, name: str) -> str:
    """Load the image tower's weights from a whole-CLIP or image-tower state_dict file, position
    embeddings resized to this tower's grid by open_clip's ``resize_pos_embed``."""
    from open_clip.model import resize_pos_embed

    state = read_state_dict(path)
    if any(k.startswith("visual.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("visual.")}
    else:
        state = {f"visual.{k}": v for k, v in state.items()}
    resize_pos_embed(state, clip)
    return load_state_dict_strict(clip.visual, path, name, {k[len("visual."):]: v for k, v in state.items()})


class _ClipTrunk(nn.Module):
    """An open_clip ViT tower: (patch tokens projected, on their grid channels-first, image embedding)."""

    def __init__(self, visual: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.visual, self.grid = visual, grid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.visual(x)
        if self.visual.proj is not None:
            tokens = tokens @ self.visual.proj
        return tokens.unflatten(1, self.grid).permute(0, 3, 1, 2), pooled


def _vit_tower(clip: nn.Module, name: str) -> nn.Module:
    """The image tower, if it is a ViT whose tokens are its patches; else ``CaptionsError``."""
    from open_clip.transformer import VisionTransformer

    visual = clip.visual
    if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
        kind = type(visual).__name__ + (" with attention pooling" if getattr(visual, "attn_pool", None) else "")
        raise CaptionsError(f"backbone {name}: its image tower is a {kind}, which gives no patch tokens; "
                            f"open_clip towers that are vision transformers (ViT-*) are supported")
    return visual


def preprocessing(model: str, tag: str, image_size: int) -> Preprocessing:
    """The tag's normalisation (open_clip's defaults: OpenAI's mean/std, bicubic), crop = resize."""
    import open_clip

    cfg = {**(open_clip.get_model_config(model) or {}).get("preprocess_cfg", {}), **_tag_cfg(model, tag)}
    interp = cfg.get("interpolation") or "bicubic"
    return Preprocessing(resize=image_size, crop=image_size,
                         mean=tuple(cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN),
                         std=tuple(cfg.get("std") or open_clip.OPENAI_DATASET_STD),
                         interpolation=interp if interp in ("bilinear", "bicubic") else "bicubic")


def build(name: str, weights: str, image_size: int) -> Backbone:
    """Build ``open_clip/<model>:<tag>``'s image tower as a ``Backbone`` (see the module docstring)."""
    model, tag = parse(name)
    try:
        clip, identity = _clip(model, tag, weights, image_size)
    except (AssertionError, ValueError) as e:
        raise CaptionsError(f"backbone {name} cannot be built for --image-size {image_size} ({e})") from None
    visual = _vit_tower(clip, name).eval()
    del clip  # the text tower is not needed
    visual.output_tokens = True
    patch = int(visual.patch_size[0])
    grid = (image_size // patch, image_size // patch)
    width = int(visual.output_dim if visual.proj is not None else visual.transformer.width)
    layout = TokenLayout(prefix_dropped=1, pooled="model", projected=visual.proj is not None)
    return Backbone(name, _ClipTrunk(visual, grid), width, patch, preprocessing(model, tag, image_size), identity,
                    grid=grid, image_size=image_size, token_layout=str(layout), model=visual)


def describe(name: str) -> tuple[int, tuple[int, int], int, str]:
    """(channels, grid, image size, weights source) from open_clip's model config and tag."""
    import open_clip

    model, tag = parse(name)
    cfg = open_clip.get_model_config(model) or {}
    vision = cfg.get("vision_cfg", {})
    if not _is_vit_config(cfg):
        raise CaptionsError(f"backbone {name}: not a ViT image tower; not supported")
    size = vision.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    patch = vision.get("patch_size", 16)
    side = size // int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    pcfg = _tag_cfg(model, tag)
    source = f"hf-hub:{pcfg['hf_hub'].rstrip('/')}" if pcfg.get("hf_hub") else pcfg.get("url") or "none"
    return int(cfg.get("embed_dim", 0)), (side, side), size, source
