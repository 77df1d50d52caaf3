"""torchvision backbones: every classification model ``torchvision.models.list_models`` names.

The feature map is the last one before the model's global pooling, found in the model's own
graph (``torchvision.models.feature_extraction``: traced once, the input of the last global
average pooling, or for VGG/AlexNet, which pool to a fixed 7x7/6x6 map, of that pooling), and
the pooled vector is that pooling (the mean over the grid). Vision transformers give their patch
tokens as the grid and their class token as the pooled vector. Preprocessing comes from the
default weights' transforms; models built for one input size (ViT, MaxViT) are built for
``--image-size`` (ViT position embeddings interpolated by torchvision's ``interpolate_embeddings``).
"""

from __future__ import annotations

import inspect
import math
import warnings
from functools import cache
from pathlib import Path

import torch
from torch import nn

from captions.errors import CaptionsError, first_line
from captions.features.backbones import (
    Backbone,
    load_state_dict_strict,
    power_of_two_stride,
    read_state_dict,
    scaled_preprocessing,
    seeded,
    unknown_backbone,
    weights_failed,
)
from captions.features.spec import TokenLayout


@cache
def names() -> tuple[str, ...]:
    """Every torchvision classification model name, sorted."""
    import torchvision
    from torchvision.models import list_models

    return tuple(sorted(list_models(module=torchvision.models)))


def _tracer_kwargs() -> dict:
    """torchvision's own defaults for its feature extractor: its ops are leaves, math is wrapped."""
    import torchvision

    leaves = [obj for _, obj in inspect.getmembers(torchvision.ops)
              if inspect.isclass(obj) and issubclass(obj, nn.Module)]
    return {"autowrap_modules": (math, torchvision.ops), "leaf_modules": leaves}


def _is_one(size) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def _pooling(node: torch.fx.Node, model: nn.Module) -> str | None:
    """``global`` for a global average pooling node, ``fixed`` for an adaptive pooling to a fixed
    grid larger than 1x1 (VGG, AlexNet), else None."""
    F = torch.nn.functional
    if node.op == "call_module":
        m = model.get_submodule(str(node.target))
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return "global" if _is_one(m.output_size) else "fixed"
        return None
    if node.op == "call_function" and node.target in (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return "global" if _is_one(size) else "fixed"
    if (node.op == "call_method" and node.target == "mean") or (node.op == "call_function"
                                                                 and node.target is torch.mean):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        dims = set(dims) if isinstance(dims, (tuple, list)) else {dims}
        return "global" if dims in ({2, 3}, {-2, -1}) else None
    return None


def _traced(model: nn.Module):
    """(graph, node -> feature-extraction name) of ``model`` traced in eval mode with torchvision's
    ``NodePathTracer``, the tracer behind ``get_graph_node_names`` and ``create_feature_extractor``."""
    from torchvision.models.feature_extraction import NodePathTracer

    tracer = NodePathTracer(**_tracer_kwargs())
    graph = tracer.trace(model.eval())
    return graph, tracer.node_to_qualname


def grid_node(model: nn.Module, graph: torch.fx.Graph, qualnames: dict, name: str) -> torch.fx.Node:
    """The node of ``model``'s last feature map before its pooling.

    The input of the last global average pooling, else of the last adaptive pooling, and in
    either case the input of the classifier when that pooling is part of it (SqueezeNet).
    Raises ``CaptionsError`` when the graph has neither."""
    found = {"global": None, "fixed": None}
    for node in graph.nodes:
        kind = _pooling(node, model)
        if kind and node.args and isinstance(node.args[0], torch.fx.Node):
            found[kind] = node.args[0]
    node = found["global"] or found["fixed"]
    head = _head_input(graph, qualnames, node)
    node = head if head is not None else node
    if node is None:
        raise CaptionsError(f"backbone {name}: no pooling of a feature map found in its graph; not supported")
    return node


def _cut(model: nn.Module, graph: torch.fx.Graph, node: torch.fx.Node, name: str) -> torch.fx.GraphModule:
    """The model's graph ending at ``node`` (what ``create_feature_extractor`` makes, from the one
    eval-mode trace: its output replaced, the rest dropped as dead code)."""
    gm = torch.fx.GraphModule(model, graph, name)
    for n in [n for n in graph.nodes if n.op == "output"]:
        graph.erase_node(n)
    with graph.inserting_after(list(graph.nodes)[-1]):
        graph.output(node)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _head_input(graph: torch.fx.Graph, qualnames: dict, node: torch.fx.Node | None) -> torch.fx.Node | None:
    """When ``node`` lies inside the classifier (SqueezeNet classifies with a convolution and
    pools the class scores), the feature map that enters the classifier; else None."""
    if node is None or not qualnames.get(node, "").startswith("classifier."):
        return None
    first = next(n for n in graph.nodes if qualnames.get(n, "").startswith("classifier."))
    arg = first.args[0] if first.args else None
    return arg if isinstance(arg, torch.fx.Node) else None


class _ViTTrunk(nn.Module):
    """A torchvision ViT up to its encoder (final LayerNorm included): patch tokens on their
    (h, w) grid channels-first, and the class token (what its head classifies) as pooled."""

    def __init__(self, body: nn.Module, grid: tuple[int, int]) -> None:
        super().__init__()
        self.body, self.grid = body, grid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.body(x)
        fmap = tokens[:, 1:].unflatten(1, self.grid).permute(0, 3, 1, 2)
        return fmap, tokens[:, 0]


def _size_kwargs(name: str, image_size: int) -> dict:
    """The constructor argument that sets the input size of models built for one (ViT:
    ``image_size``, MaxViT: ``input_size``); {} for the others. Read from the model class's
    signature, on a model built on the meta device (no memory, no init cost), for the models
    whose weights name a minimum input size above 32 (ViT, MaxViT, Swin, Inception)."""
    from torchvision.models import get_model, get_model_weights

    if get_model_weights(name).DEFAULT.meta["min_size"][0] <= 32:  # convolutional: any size
        return {}
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = get_model(name, weights=None)
    except Exception:  # some constructors copy data, which meta tensors have not: not a sized model
        return {}
    params = inspect.signature(type(probe).__init__).parameters
    if "image_size" in params:
        return {"image_size": image_size}
    if "input_size" in params:
        return {"input_size": (image_size, image_size)}
    return {}


def _pretrained(name: str, wenum, size_kw: dict, image_size: int) -> nn.Module:
    """The model with torchvision's default weights for ``image_size`` crops."""
    from torchvision.models import VisionTransformer, get_model
    from torchvision.models.vision_transformer import interpolate_embeddings

    if not size_kw or image_size == wenum.meta["min_size"][0]:
        return get_model(name, weights=wenum)  # the builder also sets what goes with them (transform_input)
    model = get_model(name, weights=None, **size_kw)
    state = wenum.get_state_dict(progress=True, check_hash=True)
    if isinstance(model, VisionTransformer):
        state = interpolate_embeddings(image_size, model.patch_size, state)
    model.load_state_dict(state)
    return model


def _model(name: str, weights: str, image_size: int, wenum) -> tuple[nn.Module, str]:
    """(model in eval mode, weights identity) for ``weights`` default|none|PATH."""
    from torchvision.models import VisionTransformer, get_model
    from torchvision.models.vision_transformer import interpolate_embeddings

    size_kw = _size_kwargs(name, image_size)
    try:
        if weights == "default":
            try:
                return _pretrained(name, wenum, size_kw, image_size).eval(), f"torchvision:{wenum}"
            except (AssertionError, ValueError, TypeError):
                raise
            except Exception as e:  # URLError, HTTPError, hash mismatch, ...
                raise weights_failed(name, e) from None
        with seeded(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception: init_weights default
            model = get_model(name, weights=None, **size_kw)
    except (AssertionError, ValueError, TypeError) as e:
        raise _wrong_size(name, image_size, wenum, e) from None
    if weights == "none":
        return model.eval(), "random"
    path = Path(weights)
    state = read_state_dict(path)
    if isinstance(model, VisionTransformer) and "encoder.pos_embedding" in state:
        state = interpolate_embeddings(image_size, model.patch_size, state)
    if hasattr(model, "transform_input"):  # as torchvision's builder sets it with its own weights
        model.transform_input = True
    return model.eval(), load_state_dict_strict(model, path, name, state)


def _wrong_size(name: str, image_size: int, wenum, err: BaseException) -> CaptionsError:
    reason = first_line(err)
    native = wenum.transforms().crop_size[0]
    return CaptionsError(f"backbone {name} does not run at --image-size {image_size} ({reason}); it was made "
                         f"for --image-size {native}")


def trunk(model: nn.Module, name: str, image_size: int) -> tuple[nn.Module, TokenLayout, int]:
    """(module -> feature map or (map, pooled), token layout, stride) of an eval-mode model: its
    graph up to the feature map (a ``torch.fx.GraphModule`` sharing the model's layers)."""
    from torchvision.models import VisionTransformer

    graph, qualnames = _traced(model)
    if isinstance(model, VisionTransformer):  # the last node of its encoder: the final LayerNorm
        encoder = [n for n in graph.nodes if qualnames.get(n, "").split(".")[0] == "encoder"][-1]
        side = image_size // model.patch_size
        return (_ViTTrunk(_cut(model, graph, encoder, name), (side, side)),
                TokenLayout(prefix_dropped=1, pooled="model"), model.patch_size)
    return _cut(model, graph, grid_node(model, graph, qualnames, name), name), TokenLayout(), 0


def probe(module: nn.Module, name: str, image_size: int, err) -> torch.Tensor:
    """The feature map of one zero image on the module's device; ``err(exception)`` -> the
    ``CaptionsError`` raised when the model does not run at ``image_size``."""
    device = next(module.parameters()).device
    try:
        with torch.inference_mode():
            out = module(torch.zeros(1, 3, image_size, image_size, device=device))
    except Exception as e:  # too small for its pooling, windows or attention biases
        raise err(e) from None
    return out[0] if isinstance(out, tuple) else out


def build(name: str, weights: str, image_size: int) -> Backbone:
    """Build torchvision model ``name`` as a ``Backbone`` (see the module docstring)."""
    from torchvision.models import get_model_weights

    if name not in names():
        from captions.features.catalog import all_names

        raise unknown_backbone(name, all_names())
    wenum = get_model_weights(name).DEFAULT
    model, identity = _model(name, weights, image_size, wenum)
    module, layout, stride = trunk(model, name, image_size)
    fmap = probe(module, name, image_size, lambda e: _wrong_size(name, image_size, wenum, e))
    grid = (int(fmap.shape[2]), int(fmap.shape[3]))
    t = wenum.transforms()
    prep = scaled_preprocessing(t.resize_size[0], t.crop_size[0], image_size, t.mean, t.std, t.interpolation.value)
    return Backbone(name, module, int(fmap.shape[1]), stride or power_of_two_stride(image_size, grid[1]), prep,
                    identity, grid=grid, image_size=image_size, token_layout=str(layout), model=model)


def describe(name: str) -> tuple[int, tuple[int, int], int, str]:
    """(channels, grid, image size, weights source) at the default weights' crop size, from a
    model built on the meta device (random-weight CPU build for models that cannot be)."""
    from torchvision.models import get_model, get_model_weights

    wenum = get_model_weights(name).DEFAULT
    size = wenum.transforms().crop_size[0]
    size_kw = _size_kwargs(name, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = get_model(name, weights=None, **size_kw).eval()
        except Exception:
            model = get_model(name, weights=None, **size_kw).eval()
    module, _, _ = trunk(model, name, size)
    fmap = probe(module, name, size, lambda e: CaptionsError(f"backbone {name}: probe failed ({e})"))
    return int(fmap.shape[1]), (int(fmap.shape[2]), int(fmap.shape[3])), size, f"torchvision:{wenum}"
