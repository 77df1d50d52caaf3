"""What fine-tuning a backbone needs from the features layer: its blocks, which parameters train,
the identity of tuned weights, and a backbone rebuilt from a checkpoint's tuned weights.

A backbone's *blocks* are the stages its trunk is built of, in forward order: ``blocks`` (timm
EfficientNets, MobileNets, ViTs), ``stages`` (timm ConvNeXt, RegNet), ``layers`` (Swin),
``features`` (torchvision MobileNet / EfficientNet / VGG), ``layer1..layer4`` (torchvision
ResNets), ``trunk_output`` (torchvision RegNet) or ``encoder.layers`` (torchvision ViT). Training
"from block K" trains every parameter the forward reaches at or after block K's first module
(so a head convolution and norm after the last block train too); everything before stays frozen.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace

import torch
from torch import nn

from captions.errors import CaptionsError, first_line
from captions.features.backbones import Backbone, build_backbone

TUNED_PREFIX = "finetuned:"  # weights identity of a backbone whose weights a training run changed


def encoder_blocks(model: nn.Module, name: str = "backbone") -> list[nn.Module]:
    """The blocks of a library model (see the module docstring), in forward order.

    Raises ``CaptionsError`` naming the backbone when no block list is found."""
    for attr in ("blocks", "stages", "layers", "features"):
        seq = getattr(model, attr, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq) > 1:
            return list(seq)
    layers = [m for n, m in model.named_children() if re.fullmatch(r"layer\d+", n)]
    if layers:
        return layers
    for path in ("trunk_output", "encoder.layers"):
        seq = model.get_submodule(path) if _has(model, path) else None
        if seq is not None and len(list(seq.children())) > 1:
            return list(seq.children())
    raise CaptionsError(f"backbone {name}: no list of blocks found (blocks, stages, layers, features, layerN); "
                        f"it cannot be fine-tuned")


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def forward_order(bb: Backbone) -> list[nn.Module]:
    """The modules holding parameters of their own, in the order one forward of ``bb.module``
    first calls them (from a 1-image probe at ``bb.image_size``)."""
    order: list[nn.Module] = []
    seen: set[int] = set()

    def hook(m: nn.Module, *_: object) -> None:
        if id(m) not in seen:
            seen.add(id(m))
            order.append(m)

    handles = [m.register_forward_pre_hook(hook) for m in bb.module.modules()
               if any(True for _ in m.parameters(recurse=False))]
    try:
        with torch.no_grad():
            bb.module(torch.zeros(1, 3, bb.image_size, bb.image_size))
    finally:
        for h in handles:
            h.remove()
    return order


def trainable_parameters(bb: Backbone, from_block: int) -> list[nn.Parameter]:
    """Set ``requires_grad`` on the parameters the forward reaches at or after block
    ``from_block`` (0-based; negative counts from the last block) and clear it on all others;
    returns the trainable ones. The module stays in eval mode (BatchNorm running statistics and
    dropout frozen). Raises ``CaptionsError`` for a block index out of range."""
    model = bb.model if bb.model is not None else bb.module
    blocks = encoder_blocks(model, bb.name)
    if not -len(blocks) <= from_block < len(blocks):
        raise CaptionsError(f"--fine-tune-from-block {from_block} is out of range: backbone {bb.name} has "
                            f"{len(blocks)} blocks (0..{len(blocks) - 1}, or -1..-{len(blocks)} from the last)")
    first = blocks[from_block]
    order = forward_order(bb)
    inside = {id(m) for m in first.modules()}
    start = next(i for i, m in enumerate(order) if id(m) in inside)
    bb.module.eval().requires_grad_(False)
    params: list[nn.Parameter] = []
    for m in order[start:]:
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
            params.append(p)
    return params


def weights_identity(state: dict[str, torch.Tensor]) -> str:
    """``finetuned:<sha256 hex>`` of a state_dict: names and fp32 values in name order, so equal
    weights give equal identities whatever their memory format or device."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return TUNED_PREFIX + h.hexdigest()


def tuned_backbone(name: str, image_size: int, state: dict[str, torch.Tensor], identity: str) -> Backbone:
    """Backbone ``name`` for ``image_size`` crops with the fine-tuned library-model ``state``
    (a checkpoint's ``encoder.state_dict``) loaded strictly, recorded as ``identity``, in eval
    mode without gradients. Raises ``CaptionsError`` when the state does not fit."""
    bb = build_backbone(name, "none", image_size, warn_random=False)  # the tuned weights replace them
    model = bb.model if bb.model is not None else bb.module
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CaptionsError(f"the checkpoint's fine-tuned encoder does not fit backbone {name} "
                            f"({first_line(e)})") from None
    bb.module.eval().requires_grad_(False)
    return replace(bb, weights=identity)
