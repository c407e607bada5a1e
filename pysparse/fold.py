"""BatchNorm folded into the convolution before it, for inference.

In eval mode a BatchNorm is a per-channel affine map, y = (x - mean) / sqrt(var + eps) * gamma + beta; after a
convolution it is the same convolution with each output channel's weights scaled by gamma / sqrt(var + eps) and a
bias. A sparse convolution keeps its structure (a scaled zero stays zero), so the folded model stores the same
weights and skips one pass over every activation (ResNet-18 at 90%, batch 8: ~3-9% of the forward here;
benchmarks/RESULTS.md). torch's ``fuse_conv_bn_eval`` does the arithmetic; this module finds the pairs.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .convert import module_places, replace_module
from .nn import SparseConv2d

# Convolutions whose weight and bias are all they compute with (a subclass of nn.Conv2d may read its weight in
# its own way, as weight standardisation does).
_FOLDABLE = (nn.Conv2d, SparseConv2d)
_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every eval-mode BatchNorm2d that is applied directly to the output of an ``nn.Conv2d`` or
    :class:`SparseConv2d` (and to nothing else, the convolution's output used by nothing else) into that
    convolution, and replace it with ``nn.Identity``; returns ``model`` (its class unchanged). The model must be
    in eval mode: a folded BatchNorm no longer normalises by the batch when trained. Pairs are found by tracing
    the model with ``torch.fx`` (a model it cannot trace raises ``ValueError``); a convolution or BatchNorm
    called more than once, a BatchNorm without running statistics, a module in training mode and a sparse layer
    under spectral norm are left as they are. A sparse convolution keeps its mask; a folded layer gets a bias.
    Fold before ``pysparse.save``, and fold the model given to ``pysparse.load`` too (its state dict has the
    folded layers' keys)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("fold_batchnorm is for inference: call model.eval() first (a folded BatchNorm no longer "
                         "normalises by the batch in training)")
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # (data-dependent control flow, an untraceable argument, ...)
        raise ValueError(f"fold_batchnorm finds each convolution's BatchNorm by tracing the model with torch.fx, "
                         f"which failed: {type(exc).__name__}: {exc}") from exc
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _NORMS):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules[src.target], modules[node.target]
        if (type(conv) not in _FOLDABLE or calls[src.target] != 1 or calls[node.target] != 1 or conv.training
                or bn.training or bn.running_mean is None or bn.running_var is None
                or bn.num_features != conv.out_channels or getattr(conv, "spectral_norm", False)):
            continue
        pairs.append((conv, bn))
    places = module_places(model)
    for conv, bn in pairs:
        replace_module(places, conv, fuse_conv_bn_eval(conv, bn))
        replace_module(places, bn, nn.Identity())
    return model
