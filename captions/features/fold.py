"""Folding eval-mode BatchNorms into the convolutions before them, for a faster inference forward."""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger("captions")


def _foldable_conv(m: torch.nn.Module) -> bool:
    """Convolutions whose forward is conv(x, self.weight, self.bias) (timm's Conv2dSame pads first)."""
    t = type(m)
    return t is torch.nn.Conv2d or (t.__name__ == "Conv2dSame" and t.__module__.startswith("timm."))


def _bn_remainder(m: torch.nn.Module) -> torch.nn.Module | None:
    """What is left of a BatchNorm once folded away (None: not a BatchNorm this knows how to fold)."""
    t = type(m)
    if not isinstance(m, torch.nn.BatchNorm2d) or m.training or m.running_mean is None:
        return None
    if t is torch.nn.BatchNorm2d:
        return torch.nn.Identity()
    if (t.__name__ == "BatchNormAct2d" and t.__module__.startswith("timm.")
            and set(dict(m.named_children())) == {"drop", "act"}):  # timm: batch_norm, then drop, then act
        return torch.nn.Sequential(m.drop, m.act)
    return None


class _FoldTracer(torch.fx.Tracer):
    """Traces down to convolutions and BatchNorms, treating timm's untraceable layers as leaves."""

    def __init__(self, leaves: tuple[type, ...], functions: tuple) -> None:
        super().__init__(autowrap_functions=functions)
        self.leaves = (torch.nn.Conv2d, torch.nn.BatchNorm2d, *leaves)

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _sequential_pairs(module: torch.nn.Module) -> list[tuple[str, str]]:
    """Adjacent (a, b) children of ``nn.Sequential`` containers, each used once in the model."""
    pairs = []
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Sequential):
            kids = list(m.named_children())
            pairs += [(f"{name}.{a}".lstrip("."), f"{name}.{b}".lstrip("."))
                      for (a, _), (b, _) in zip(kids, kids[1:], strict=False)]
    uses: dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    return [(c, b) for c, b in pairs if uses[id(module.get_submodule(c))] == 1
            and uses[id(module.get_submodule(b))] == 1]


def _graph_pairs(graph: torch.fx.Graph) -> list[tuple[str, str]]:
    """(producer, consumer) module calls where each module is called once and the consumer is the
    producer's only user, taking its output as its one argument."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if (node.op == "call_module" and len(node.args) == 1 and not node.kwargs
                and isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "call_module"
                and len(node.args[0].users) == 1 and calls[node.target] == 1 and calls[node.args[0].target] == 1):
            pairs.append((node.args[0].target, node.target))
    return pairs


def _conv_bn_pairs(module: torch.nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) qualified names where the BatchNorm is the only consumer of the conv's output.

    From the torch.fx graph where the model traces (timm's layers that do not trace are leaves);
    otherwise only adjacent pairs inside ``nn.Sequential`` containers, whose data flow is certain.
    """
    leaves, functions = (), ()
    if any(type(m).__module__.startswith("timm.") for m in module.modules()):
        from timm.layers import _fx

        leaves, functions = tuple(_fx.get_notrace_modules()), tuple(_fx.get_notrace_functions())
    try:
        graph = _FoldTracer(leaves, functions).trace(module)
    except Exception as e:  # data-dependent control flow
        log.debug("BatchNorm folding: model does not trace (%s); folding inside nn.Sequential only",
                  type(e).__name__)
        return _sequential_pairs(module)
    return _graph_pairs(graph)


def _fold(conv: torch.nn.Module, bn: torch.nn.BatchNorm2d) -> None:
    """Scale ``conv``'s weights and set its bias so that it computes bn(conv(x)) on its own."""
    inv_std = torch.rsqrt(bn.running_var.float() + bn.eps)
    gamma = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
    k = gamma * inv_std
    bias = conv.bias if conv.bias is not None else torch.zeros_like(inv_std)
    new_bias = (bias - bn.running_mean) * k + beta
    conv.weight.mul_(k.reshape(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype))
    conv.bias = torch.nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)


def fuse_for_inference(module: torch.nn.Module, inplace: bool = False) -> torch.nn.Module:
    """Fold eval-mode BatchNorms into the convolutions that feed them (exact up to float rounding).

    torchvision backbones 1.3-1.4x faster on CPU, timm EfficientNets too (their BatchNormAct2d
    keeps its activation). The folding is in place on the module's own convolutions (or on a
    deep copy unless ``inplace``): no new parameter memory, no torch.fx code generation, ~10 ms.
    Models or layers it does not know are left as they are. Returns the folded module.
    """
    if not inplace:
        module = copy.deepcopy(module)
    if not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules()):
        return module  # ViTs, Swin, ConvNeXt, CLIP towers: nothing to fold, no trace needed
    folded = 0
    with torch.no_grad():
        for conv_name, bn_name in _conv_bn_pairs(module):
            conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
            rest = _bn_remainder(bn)
            if rest is None or not _foldable_conv(conv) or conv.out_channels != bn.num_features:
                continue
            _fold(conv, bn)
            parent, _, leaf = bn_name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, leaf, rest)
            folded += 1
    log.debug("folded %d BatchNorm layers into convolutions", folded)
    return module
