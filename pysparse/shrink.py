"""Pruning a model's sparse layers in place: the stored weights with the lowest saliency stop being stored.

``prune`` chooses masks over dense weights; ``shrink`` works on a model already built from SparseLinear /
SparseConv2d (a sparse GAN pruned gradually while it trains, say): each layer's ``values`` is cut to the kept
entries, the structure rebuilt, and the optimizers' state cut the same way, so training goes on at once.
Sparsity is always measured against the dense size; a layer never regrows.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from . import ops
from .nn._sparse_weight import SparseWeight
from .ops import _check_fraction

METHODS = ("magnitude", "gradient", "taylor", "random")
SCOPES = ("layer", "global")


def sparse_layers(model: nn.Module) -> dict[str, SparseWeight]:
    """The sparse layers of ``model`` by module name."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseWeight)}


def model_sparsity(model: nn.Module) -> float:
    """The fraction of the sparse layers' dense weights that is not stored."""
    layers = sparse_layers(model).values()
    total = sum(math.prod(m.weight_shape) for m in layers)
    return 1.0 - sum(m.nnz for m in layers) / total if total else 0.0


def _score(layer: SparseWeight, method: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    v = layer.values.detach()
    if method == "random":
        return torch.rand(v.shape, generator=generator).to(v.device)
    grad = layer.values.grad
    if method != "magnitude" and grad is None:
        raise ValueError(f"method {method!r} needs the layers' gradients: call shrink after a backward pass")
    return ops.saliency(v, method, grad=None if method == "magnitude" else grad.detach())


def shrink(model: nn.Module, sparsity: float, method: str = "magnitude", *, scope: str = "layer",
           optimizers: Iterable[torch.optim.Optimizer] = (), followers: Iterable[nn.Module] = (),
           generator: Optional[torch.Generator] = None) -> dict[str, int]:
    """Remove stored weights of ``model``'s sparse layers, lowest saliency first, until ``sparsity`` of their
    dense weights is gone (each layer alone with ``scope="layer"``, all ranked together with ``"global"``).
    ``method``: magnitude |w|, gradient |g|, taylor |g*w| (g: the gradients left by the last backward) or
    random. ``optimizers`` are kept pointing at the new values; ``followers`` (e.g. an EMA copy with the same
    structure) are cut the same way. Under torch.distributed, rank 0's choice is broadcast so every rank keeps
    the same weights. Returns the weights removed per layer."""
    sparsity = _check_fraction(sparsity, "sparsity")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    layers = sparse_layers(model)
    if not layers:
        raise ValueError(f"the model ({type(model).__name__}) has no sparse layer to shrink")
    optimizers, followers = list(optimizers), [sparse_layers(f) for f in followers]
    for f in followers:
        for name, m in layers.items():
            if name not in f or f[name].nnz != m.nnz:
                raise ValueError(f"a follower does not have the model's structure at layer {name!r}")
    scores = {n: _score(m, method, generator) for n, m in layers.items()}
    keeps: dict[str, torch.Tensor] = {}
    if scope == "layer":
        for n, m in layers.items():
            target = round((1.0 - sparsity) * math.prod(m.weight_shape))
            if m.nnz > target:
                keeps[n] = ops.sparsity_masks([scores[n]], (m.nnz - target) / m.nnz)[0]
    else:
        total = sum(math.prod(m.weight_shape) for m in layers.values())
        nnz = sum(m.nnz for m in layers.values())
        target = round((1.0 - sparsity) * total)
        if nnz > target:
            names = list(layers)
            for n, k in zip(names, ops.sparsity_masks([scores[n] for n in names], (nnz - target) / nnz)):
                keeps[n] = k
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for n in sorted(keeps):
            buf = keeps[n].to(torch.uint8)
            torch.distributed.broadcast(buf, 0)
            keeps[n] = buf.bool()
    removed = {}
    for n, keep in keeps.items():
        if bool(keep.all()):
            continue
        before = layers[n].nnz
        layers[n].prune_values_(keep, optimizers)
        for f in followers:
            f[n].prune_values_(keep)
        removed[n] = before - layers[n].nnz
    return removed
