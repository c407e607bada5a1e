"""Whole-model conversion: sparsify replaces Linear / Conv2d layers by sparse ones, densify undoes it."""
from __future__ import annotations

import math
import warnings
from typing import Mapping, Optional

import torch
from torch import nn

from .nn import SparseConv2d, SparseLinear, SparseMultiheadAttention
from .nn._sparse_weight import SparseWeight, check_mask, reaches_sparsity, refuse_meta
from .nn.attention import projection_weights

# Below these sparsities a sparse layer is not faster than the dense one, so sparsify leaves it dense. Measured
# on the 2-core CPU, fp32 (benchmarks/RESULTS.md): SparseLinear beats nn.Linear from 50% at batch 1, 16 and 256
# (4096 x 4096: 1.98x, 1.66x, 1.19x; below 50% not measured); SparseConv2d beats nn.Conv2d (mkldnn) on
# ResNet-18's 3x3 layers from about 90% (at 95% on every layer at batch 1 and 8).
DEFAULT_MIN_SPARSITY = {nn.Linear: 0.5, nn.Conv2d: 0.9}
# On a CUDA device, the layers' own CUDA crossovers (DENSE_BELOW_CUDA, measured on an NVIDIA H200): below them a
# sparse layer computes through torch's dense kernels anyway. SparseConv2d's is 1.0: convolutions stay dense.
DEFAULT_MIN_SPARSITY_CUDA = {nn.Linear: SparseLinear.DENSE_BELOW_CUDA, nn.Conv2d: SparseConv2d.DENSE_BELOW_CUDA}

_SPARSE_OF = {nn.Linear: SparseLinear, nn.Conv2d: SparseConv2d}


def _default_min_sparsity(module: nn.Module) -> float:
    table = DEFAULT_MIN_SPARSITY_CUDA if module.weight.is_cuda else DEFAULT_MIN_SPARSITY
    return table[type(module)]


def _apply_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Zero, in place, the weights of a layer that stays dense where its mask removes them."""
    with torch.no_grad():
        module.weight.masked_fill_(~mask, 0)


def module_places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Where each submodule of ``model`` sits: id(module) -> [(parent, attribute name), ...], every place of a
    module registered under several names (shared between two places, as in weight-shared blocks). One walk of
    the model, for any number of :func:`replace_module` calls on leaf modules."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules():
        for child, module in parent._modules.items():
            if module is not None:
                places.setdefault(id(module), []).append((parent, child))
    return places


def replace_module(places: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every place of ``old`` (``places`` from :func:`module_places`), so a sharing stays."""
    for parent, child in places.get(id(old), ()):
        parent._modules[child] = new


def _tied_weights(model: nn.Module) -> set[int]:
    """ids of the parameters held by more than one module (weights tied across layers, as an embedding and the
    output layer of a language model): a sparse copy of one would part them."""
    owners: dict[int, set[int]] = {}
    for _, module in model.named_modules(remove_duplicate=True):
        for p in module._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(module))
    return {pid for pid, mods in owners.items() if len(mods) > 1}


def sparsify(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]] = None, *,
             min_sparsity: Optional[float] = None) -> nn.Module:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` of ``model`` by its sparse twin, in place; returns ``model``.

    ``masks`` maps parameter names (``"features.0.weight"``) to bool keep-masks of the weight's shape; layers it
    does not name stay dense. ``masks=None`` keeps each layer's non-zero weights. A layer whose mask removes
    less than ``min_sparsity`` of its weights (to the weight: one pruned to ``round(min_sparsity * n)`` of its n
    weights or ``int()`` of that counts as reaching it) stays dense (the sparse kernel would be slower); the default is
    the measured crossover of each layer type on the device its weight is on (``DEFAULT_MIN_SPARSITY`` on the
    CPU, ``DEFAULT_MIN_SPARSITY_CUDA`` on CUDA, where convolutions stay dense). Pass 0 to convert every layer
    named (storage then shrinks with the kept weights wherever the layer computes).

    Every ``nn.MultiheadAttention`` whose projection weights ``masks`` names (``"<attn>.in_proj_weight"`` or
    ``"<attn>.q_proj_weight"`` ..., and ``"<attn>.out_proj.weight"``; masks None: whose projections hold zeros)
    becomes a :class:`SparseMultiheadAttention` (its four projections sparse; one that masks does not name keeps
    its non-zero weights) when the four together reach ``min_sparsity`` (default: nn.Linear's crossover), else
    has its masks applied.

    Only layers of exactly these types are converted: subclasses (a custom layer's parent may read its weight
    directly) stay dense, with a warning naming those that ``masks`` names; so do layers whose weight is tied to
    another module's (an embedding and an output layer sharing one tensor), with a warning: a sparse copy would
    part them.
    Every layer named in ``masks`` that stays dense has its mask applied in place (pruned weights set to zero),
    so that the model computes the masked model. A layer registered under several names (one module used in
    two places) becomes one sparse layer at all of them; ``masks`` may name it by any of them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if min_sparsity is not None and (isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float))
                                     or not 0 <= min_sparsity <= 1):
        raise ValueError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    lone = {**_SPARSE_OF, nn.MultiheadAttention: SparseMultiheadAttention}.get(type(model))
    if lone is not None:
        raise ValueError("sparsify converts the layers inside a model; for a lone layer use "
                         f"{lone.__name__}.from_dense")
    if masks is not None and not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping from parameter names to bool tensors, got {type(masks).__name__}")
    masks, attention = _plan_attention(model, masks, min_sparsity)  # checked here, applied after every check
    every_name = list(model.named_modules(remove_duplicate=False))  # a shared module under each of its names
    candidates = {f"{name}.weight": module for name, module in every_name if type(module) in _SPARSE_OF}
    subclassed = {f"{name}.weight": module for name, module in every_name
                  if isinstance(module, tuple(_SPARSE_OF)) and type(module) not in _SPARSE_OF}
    named = {}  # id(layer) -> (key, mask) of the entry of masks that names it (by any of its names)
    if masks is not None:
        unknown = sorted(set(masks) - set(candidates) - set(subclassed))
        if unknown:
            raise ValueError(f"masks name parameters that are not the weight of an nn.Linear / nn.Conv2d / the "
                             f"projection of an nn.MultiheadAttention of the model: {unknown[:5]}")
        for key, mask in masks.items():
            layer = candidates.get(key, subclassed.get(key))
            check_mask(mask, layer.weight, name=f"masks[{key!r}]")
            first = named.setdefault(id(layer), (key, mask))
            if first[0] != key and not torch.equal(first[1], mask):
                raise ValueError(f"masks[{first[0]!r}] and masks[{key!r}] name one shared layer with different masks")
    if not candidates and not attention and not any(isinstance(m, SparseMultiheadAttention) for m in model.modules()):
        raise ValueError("the model has no nn.Linear, nn.Conv2d or nn.MultiheadAttention layer to sparsify")
    for key, module in candidates.items():  # before the masks are counted (no counting on meta)
        refuse_meta(module.weight, f"a sparse layer for {key!r}")
    _apply_attention(model, attention)
    layers = {}  # id(layer) -> (key, layer), a shared layer once
    for key, module in (candidates | subclassed).items():
        layers.setdefault(id(module), (key, module))
    tied, places = _tied_weights(model), module_places(model)
    subclasses, tied_layers = [], []  # named or candidate layers kept dense, by reason
    for mid, (key, module) in layers.items():
        key, mask = named.get(mid, (key, None))
        if masks is not None and mask is None:
            continue  # not named: left as it is
        subclass = type(module) not in _SPARSE_OF
        if subclass or id(module.weight) in tied:  # stays dense, its mask applied
            if mask is not None:
                _apply_mask(module, mask)
            if not subclass:
                tied_layers.append(key)
            elif mask is not None:  # (subclasses no mask names are not reported)
                subclasses.append(key)
            continue
        if mask is None:
            mask = module.weight.detach() != 0
        total = math.prod(mask.shape)
        if not reaches_sparsity(total - int(mask.sum()), total,
                                _default_min_sparsity(module) if min_sparsity is None else min_sparsity):
            if masks is not None:
                _apply_mask(module, mask)
            continue
        sparse = _SPARSE_OF[type(module)].from_dense(module, mask)
        sparse.train(module.training)
        replace_module(places, module, sparse)
    if subclasses:
        warnings.warn(f"sparsify leaves {len(subclasses)} layer(s) of nn.Linear / nn.Conv2d subclasses dense (their "
                      f"parents may read the weight directly), with their masks applied: {subclasses[:5]}",
                      stacklevel=2)
    if tied_layers:
        warnings.warn(f"sparsify leaves {len(tied_layers)} layer(s) dense whose weight is tied to another module's (a "
                      f"sparse copy would part them), with their masks (if given) applied: {tied_layers[:5]}",
                      stacklevel=2)
    return model


def _plan_attention(model: nn.Module, masks: Optional[Mapping[str, torch.Tensor]], min_sparsity: Optional[float]
                    ) -> tuple[Optional[dict], list[tuple[nn.MultiheadAttention, dict, bool]]]:
    """sparsify's plan for attention, every mask checked, the model untouched: every nn.MultiheadAttention (exactly
    that type) whose projection weights (:func:`projection_weights`: in_proj_weight or q/k/v_proj_weight, and
    out_proj.weight) masks name, or with masks None that hold zeros, becomes a SparseMultiheadAttention when its
    four projections together reach min_sparsity (default: nn.Linear's crossover), else has its masks applied.
    Returns masks less the entries it took (for the layer pass) and [(attention, masks, convert), ...]."""
    if masks is not None:
        masks = dict(masks)
    plan, seen = [], set()
    for name, module in model.named_modules(remove_duplicate=False):
        if type(module) is not nn.MultiheadAttention:
            continue
        prefix = f"{name}." if name else ""
        weights = projection_weights(module)
        given = {} if masks is None else {n: masks.pop(prefix + n) for n in weights if prefix + n in masks}
        if id(module) in seen or (masks is not None and not given):
            continue
        seen.add(id(module))
        for n, w in weights.items():
            refuse_meta(w, f"a sparse attention for {prefix}{n!r}")
            if n in given:
                check_mask(given[n], w, name=f"masks[{prefix + n!r}]")
        full = {n: given.get(n, w.detach() != 0) for n, w in weights.items()}
        total = sum(m.numel() for m in full.values())
        removed = total - sum(int(m.sum()) for m in full.values())
        table = DEFAULT_MIN_SPARSITY_CUDA if module.out_proj.weight.is_cuda else DEFAULT_MIN_SPARSITY
        convert = reaches_sparsity(removed, total, table[nn.Linear] if min_sparsity is None else min_sparsity)
        plan.append((module, full if convert else given, convert))
    return masks, plan


def _apply_attention(model: nn.Module, plan: list[tuple[nn.MultiheadAttention, dict, bool]]) -> None:
    """Carries out :func:`_plan_attention`'s plan: converts, or applies the given masks in place."""
    places = module_places(model)
    for module, masks, convert in plan:
        if convert:
            replace_module(places, module, SparseMultiheadAttention.from_dense(module, masks))
        else:
            weights = projection_weights(module)
            with torch.no_grad():
                for n, m in masks.items():
                    weights[n].masked_fill_(~m, 0)
    decline_nested_tensors(model)


def decline_nested_tensors(model: nn.Module) -> None:
    """Turns off the nested-tensor inference path of every nn.TransformerEncoder whose layers hold a
    SparseMultiheadAttention, as its constructor does for such layers (``use_nested_tensor``): that path reads
    ``self_attn.in_proj_weight`` and hands the layers nested tensors, which only torch's fused dense attention
    takes. (The same call runs as the plain one; padded positions then hold values, not nested's zeros.)"""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), SparseMultiheadAttention) for layer in module.layers):
            module.use_nested_tensor = False


def densify(model: nn.Module) -> nn.Module:
    """Replace every sparse layer of ``model`` by the equivalent dense one, in place; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    places = module_places(model)
    for name, module in list(model.named_modules()):  # attention first: its projections go with it
        if isinstance(module, SparseMultiheadAttention) and name:
            replace_module(places, module, module.to_dense())
    places = module_places(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseWeight) and name:
            dense = module.to_dense()
            dense.train(module.training)
            replace_module(places, module, dense)
    return model
