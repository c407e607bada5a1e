"""Pruning: score every prunable weight by a saliency, then choose which to remove.

``prune(model, method, sparsity=... | threshold=...)`` scores the weights of every ``nn.Linear`` and
``nn.Conv2d`` and the in-projection of every ``nn.MultiheadAttention`` (biases and normalisation layers are never
pruned) with the fused saliency kernel, selects with the fused selection kernels, and (by default) zeroes the
removed weights in place. Everything is checked before
the model is touched: a bad argument leaves it as it was.
"""
from __future__ import annotations

import json
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from . import layer_inputs, ops
from .compensate import check_damp, compensate as _compensate
from .nn._sparse_weight import SparseWeight
from .nn.attention import ATTENTION_IN_PROJ, ATTENTION_QKV_PROJ, input_site, out_proj_owners, projection_inputs
from .ops import _check_fraction

METHODS = ("magnitude", "gradient", "taylor", "hessian", "snip", "wanda", "random")
DATA_METHODS = ("gradient", "taylor", "hessian", "snip", "wanda")
SCOPES = ("global", "layer")
HESSIAN_ESTIMATORS = ("fisher", "hutchinson")
PRUNABLE = (nn.Linear, nn.Conv2d)


@dataclass
class LayerReport:
    name: str            # parameter name, e.g. "features.0.weight"
    kind: str            # "Linear" or "Conv2d"
    params: int
    kept: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.kept / self.params if self.params else 0.0


@dataclass
class PruneResult:
    """Masks (True = keep) and scores keyed by parameter name; ``kinds`` gives each layer's type. The per-layer
    report is derived from the masks, so it stays true when they are replaced (e.g. after weight correction)."""
    masks: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    kinds: dict[str, str]
    method: str
    settings: dict = field(default_factory=dict)
    reconstruction: dict = field(default_factory=dict)  # compensate=True: name -> {"masked", "compensated"}

    @property
    def layers(self) -> list[LayerReport]:
        return [LayerReport(n, self.kinds.get(n, ""), m.numel(), int(m.sum())) for n, m in self.masks.items()]

    @property
    def params(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    @property
    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def sparsity(self) -> float:
        """Fraction of the prunable weights removed."""
        return 1.0 - self.kept / self.params if self.params else 0.0

    def table(self) -> str:
        """One row per pruned weight and a total, in columns as wide as their longest entry."""
        layers = self.layers
        n = max([40] + [len(r.name) for r in layers])
        k = max([7] + [len(r.kind) for r in layers])
        rows = [f"{'parameter':<{n}} {'kind':<{k}} {'params':>10} {'kept':>10} {'sparsity':>9}"]
        for r in layers:
            rows.append(f"{r.name:<{n}} {r.kind:<{k}} {r.params:>10} {r.kept:>10} {r.sparsity:>9.4f}")
        rows.append(f"{'total':<{n}} {'':<{k}} {self.params:>10} {self.kept:>10} {self.sparsity:>9.4f}")
        return "\n".join(rows)

    def to_dict(self) -> dict:
        return {"method": self.method, "settings": self.settings, "params": self.params, "kept": self.kept,
                "sparsity": self.sparsity,
                "layers": [{"name": r.name, "kind": r.kind, "params": r.params, "kept": r.kept,
                            "sparsity": r.sparsity, **({"reconstruction": self.reconstruction[r.name]}
                                                          if r.name in self.reconstruction else {})}
                           for r in self.layers]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------------------------- arguments
def _parse_pattern(pattern: str) -> Union[str, tuple[int, int]]:
    if pattern in ("unstructured", "channel"):
        return pattern
    m = re.fullmatch(r"(\d+):(\d+)", str(pattern))
    if m and 1 <= int(m.group(1)) <= int(m.group(2)):
        return int(m.group(1)), int(m.group(2))
    raise ValueError(f"pattern must be 'unstructured', 'channel' or 'n:m' (e.g. '2:4'), got {pattern!r}")


def nothing_to_prune(model: nn.Module) -> ValueError:
    """The error for a model without a prunable weight, pointing a sparsified one to densify."""
    hint = ""
    if any(isinstance(m, SparseWeight) for m in model.modules()):
        hint = ("; its sparse layers store only their kept weights: pysparse.densify the model, prune it, then "
                "pysparse.sparsify it again")
    return ValueError(f"the model has nothing to prune: no nn.Linear / nn.Conv2d weight (after exclude){hint}")


def _exclude_entries(model: nn.Module, exclude) -> tuple[tuple[type, ...], list[str]]:
    """``exclude`` checked and split into module types and names: a lone type or string is one entry; a name
    that is no module's or parameter's name and that no such name fully matches as a regular expression is a
    typo that would silently exclude nothing, and raises."""
    if isinstance(exclude, (str, type)):
        exclude = [exclude]
    try:
        entries = list(exclude)
    except TypeError:
        raise TypeError(f"exclude must be a list of module types and names, got {type(exclude).__name__}") from None
    types, names = [], []
    for e in entries:
        if isinstance(e, type) and issubclass(e, nn.Module):
            types.append(e)
        elif isinstance(e, str):
            names.append(e)
        else:
            raise TypeError(f"exclude entries must be nn.Module subclasses or names, got {e!r}")
    if names:
        known = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
        for e in names:
            try:
                pattern = re.compile(e)
            except re.error as err:
                raise ValueError(f"exclude entry {e!r} is neither a name of the model nor a valid regular "
                                 f"expression ({err})") from None
            if e not in known and not any(pattern.fullmatch(n) for n in known):
                raise ValueError(f"exclude entry {e!r} matches no module or parameter name of the model "
                                 f"(names look like {sorted(known - {''})[:4]})")
    return tuple(types), names


def prunable_parameters(model: nn.Module, exclude: Iterable = ()) -> dict[str, tuple[nn.Module, nn.Parameter]]:
    """The weights pruning considers: of every nn.Linear / nn.Conv2d and the in-projection of every
    nn.MultiheadAttention (ATTENTION_IN_PROJ or ATTENTION_QKV_PROJ) not excluded (by module type, or by a
    name: a parameter or module name, or a regular expression matched against the parameter name). A weight
    tied between two layers is considered once, under the first layer's name."""
    types, names = _exclude_entries(model, exclude)
    out, seen = {}, set()
    for mod_name, module in model.named_modules():
        if types and isinstance(module, types):
            continue
        if isinstance(module, PRUNABLE):
            local = ("weight",)
        elif isinstance(module, nn.MultiheadAttention):  # its in-projection (its out_proj is an nn.Linear)
            local = ATTENTION_IN_PROJ if module._qkv_same_embed_dim else ATTENTION_QKV_PROJ
        else:
            continue
        for attr in local:
            weight = getattr(module, attr)
            pname = f"{mod_name}.{attr}" if mod_name else attr
            if id(weight) in seen or any(n in (pname, mod_name) or re.fullmatch(n, pname) for n in names):
                continue
            seen.add(id(weight))
            out[pname] = (module, weight)
    return out


def _batches(data, num_batches: int) -> list:
    out = []
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("data must yield (inputs, targets) batches")
        out.append(batch)
        if len(out) >= num_batches:
            break
    if not out:
        raise ValueError("data yielded no batch")
    return out


# ----------------------------------------------------------------------------------------------- scoring
def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} contains NaN or inf")


def _per_batch(model, params, batches, loss_fn, score: Callable):
    """Mean over batches of score(name, weight, per-batch gradient). Scoring each batch's gradient and then
    averaging (not averaging the gradients first) matters: at a trained model's minimum the mean gradient is
    close to zero and mostly noise, while per-batch |g| or |g*w| still rank the weights (Molchanov et al. 2019)."""
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, (_, p) in params.items()}
    was_training = model.training
    saved = {name: (None if p.grad is None else p.grad.detach().clone()) for name, (_, p) in params.items()}
    try:
        for inputs, targets in batches:
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs), targets)
            _check_finite(loss.detach(), "the loss")
            loss.backward()
            for name, (_, p) in params.items():
                if p.grad is None:
                    continue
                _check_finite(p.grad, f"the gradient of {name}")
                acc[name] += score(name, p.detach(), p.grad.detach())
    finally:
        for name, (_, p) in params.items():
            p.grad = saved[name]
        model.train(was_training)
    return {name: a / len(batches) for name, a in acc.items()}


def _hutchinson(model, params, batches, loss_fn, samples: int, generator):
    """Diagonal Hessian estimate E[z * (H z)] with Rademacher z, via Hessian-vector products."""
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, (_, p) in params.items()}
    weights = [p for _, p in params.values()]
    for inputs, targets in batches:
        loss = loss_fn(model(inputs), targets)
        _check_finite(loss.detach(), "the loss")
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        for s in range(samples):
            zs = [(torch.randint(0, 2, w.shape, generator=generator).to(w.device, w.dtype) * 2 - 1) for w in weights]
            hz = torch.autograd.grad(grads, weights, grad_outputs=zs, retain_graph=s < samples - 1)
            for (name, _), z, h in zip(params.items(), zs, hz):
                acc[name] += (z * h).detach().float()
    return {name: a / (len(batches) * samples) for name, a in acc.items()}


def _feature_sums(x: torch.Tensor, conv: bool) -> torch.Tensor:
    """sum of x^2 per input feature (the last dim), or per channel (dim 1) for a convolution's input."""
    x = x.detach().float()
    return x.pow(2).transpose(0, 1).reshape(x.shape[1], -1).sum(1) if conv else x.pow(2).reshape(-1, x.shape[-1]).sum(0)


def _input_norms(model, params, batches):
    """Wanda's ||x_j||_2 per input feature of each layer (per input channel for a convolution). An
    nn.MultiheadAttention's in_proj_weight gets [3, embed_dim]: the query's, key's and value's norms, each for its
    block of rows; q/k/v_proj_weight the norms of their own input. An nn.Linear whose weight its parent passes
    to F.linear itself (layer_inputs) is seen there."""
    sums = {name: None for name in params}
    owners = out_proj_owners(model)
    busy = set()  # attentions being re-run for their out_proj's input (their hooks skip those calls)
    sites = {}
    for name, (module, weight) in params.items():
        site, kind = input_site(module, name.rpartition(".")[2], owners)
        sites[name] = (site, kind, weight)

    def seen(name, mod, args, kwargs):
        kind = sites[name][1]
        if id(mod) in busy:
            return
        if kind == "layer":
            per_feature = _feature_sums(args[0], isinstance(mod, nn.Conv2d))
        else:  # one of an attention's projections
            busy.add(id(mod))
            try:
                xs = projection_inputs(mod, kind, args, kwargs)
            finally:
                busy.discard(id(mod))
            per_feature = torch.stack([_feature_sums(t, False) for t in xs]) if kind in ATTENTION_IN_PROJ \
                else _feature_sums(xs[0], False)
        sums[name] = per_feature if sums[name] is None else sums[name] + per_feature

    with torch.no_grad(), layer_inputs.watch(sites, seen):
        for inputs, _ in batches:
            model(inputs)
    return sums


def _scores(model, params, method, batches, loss_fn, hessian_estimator, hutchinson_samples, generator):
    weights = {name: p.detach() for name, (_, p) in params.items()}
    if method == "magnitude":
        return {n: ops.saliency(w, "magnitude") for n, w in weights.items()}
    if method == "random":
        return {n: torch.rand(w.shape, generator=generator).to(w.device) for n, w in weights.items()}
    if method in ("gradient", "taylor", "snip"):
        kind = "gradient" if method == "gradient" else "taylor"
        return _per_batch(model, params, batches, loss_fn, lambda n, w, g: ops.saliency(w, kind, grad=g))
    if method == "hessian":
        if hessian_estimator == "fisher":
            h = _per_batch(model, params, batches, loss_fn, lambda n, w, g: g.float() * g.float())
        else:
            h = _hutchinson(model, params, batches, loss_fn, hutchinson_samples, generator)
        return {n: ops.saliency(w, "hessian", hessian=h[n].to(w.dtype)) for n, w in weights.items()}
    if method == "wanda":
        norms = _input_norms(model, params, batches)
        out = {}
        for n, w in weights.items():
            if norms[n] is None:
                raise ValueError(f"wanda: the layer of {n} saw no input in the data (the model's forward in its "
                                 "current mode never ran it, e.g. an auxiliary classifier in eval mode: exclude it)")
            norm = norms[n].sqrt().to(w.device)
            groups = params[n][0].groups if isinstance(params[n][0], nn.Conv2d) else 1
            shape = (1, -1) + (1,) * (w.dim() - 2)
            if norm.dim() == 2:  # an attention's in_proj_weight: q, k, v rows, each block its input's norms
                scale = norm.repeat_interleave(w.shape[0] // norm.shape[0], dim=0)
            elif groups > 1:  # each group of output channels sees its own input channels
                scale = norm.reshape(groups, -1).repeat_interleave(w.shape[0] // groups, dim=0).reshape(
                    w.shape[0], *shape[1:])
            else:
                scale = norm.reshape(shape)
            out[n] = ops.saliency(w, "magnitude") * scale
        return out
    raise AssertionError(method)


# --------------------------------------------------------------------------------------------- selection
def _protect(scores: dict, min_density: float) -> dict:
    """Scores with each layer's top ceil(min_density * n) set to +inf, so that no selection removes them."""
    if min_density <= 0:
        return scores
    out = {}
    for n, s in scores.items():
        k = min(s.numel(), math.ceil(min_density * s.numel()))
        flat = s.reshape(-1).clone()
        if k:
            flat[torch.topk(flat, k).indices] = float("inf")
        out[n] = flat.reshape(s.shape)
    return out


def _select(scores, pattern, scope, sparsity, threshold, layer_sparsity, min_density):
    names = list(scores)
    if isinstance(pattern, tuple):
        n, m = pattern
        return {k: ops.nm_masks(scores[k], n, m) for k in names}
    if pattern == "channel":  # whole output channels (rows), scored by the summed saliency of their weights
        channel = {k: s.reshape(s.shape[0], -1).sum(1) for k, s in scores.items()}
        picked = _select(channel, "unstructured", scope, sparsity, threshold, layer_sparsity, min_density)
        return {k: picked[k].reshape((-1,) + (1,) * (scores[k].dim() - 1)).expand(scores[k].shape).clone()
                for k in names}
    protected = _protect(scores, min_density)
    if threshold is not None:
        masks = ops.threshold_masks([protected[k] for k in names], threshold)
        return dict(zip(names, masks))
    if scope == "global":
        free = sum(s.numel() - math.ceil(min_density * s.numel()) for s in scores.values())
        total = sum(s.numel() for s in scores.values())
        if round(sparsity * total) > free:
            raise ValueError(f"sparsity {sparsity} removes more weights than min_density={min_density} leaves "
                             f"removable ({free} of {total})")
        masks = ops.sparsity_masks([protected[k] for k in names], sparsity)
        return dict(zip(names, masks))
    out = {}
    for k in names:
        s_k = layer_sparsity.get(k, sparsity)
        n = scores[k].numel()
        if round(s_k * n) > n - math.ceil(min_density * n):
            s_k = (n - math.ceil(min_density * n)) / n if n else 0.0
        out[k] = ops.sparsity_masks([protected[k]], s_k)[0]
    return out


# -------------------------------------------------------------------------------------------------- prune
def prune(model: nn.Module, method: str, *, sparsity: Optional[float] = None, threshold: Optional[float] = None,
          scope: str = "global", pattern: str = "unstructured", data: Optional[Iterable] = None,
          loss_fn: Optional[Callable] = None, num_batches: int = 1, exclude: Iterable = (),
          layer_sparsity: Optional[Mapping[str, float]] = None, min_density: float = 0.01,
          hessian_estimator: str = "fisher", hutchinson_samples: int = 1,
          generator: Optional[torch.Generator] = None, apply: bool = True, compensate: bool = False,
          damp: float = 0.01, progress: bool = False) -> PruneResult:
    """Score the weights of every nn.Linear / nn.Conv2d of ``model`` (and every nn.MultiheadAttention's
    ``in_proj_weight``, or ``q/k/v_proj_weight``; its out_proj is an nn.Linear) and choose which to remove.

    ``method``: "magnitude" |w|; "gradient" |dL/dw|; "taylor" |g*w|; "hessian" 0.5*h*w^2 (OBD) with h from
    ``hessian_estimator`` "fisher" (mean squared per-batch gradients) or "hutchinson" (E[z*Hz]); "snip" |g*w|
    (meant for a model at initialisation); "wanda" |w| * ||x|| per input feature; "random". Gradient-based
    scores are computed per batch and averaged over ``num_batches`` batches of ``data`` (an iterable of
    (inputs, targets), e.g. a DataLoader) under ``loss_fn``, which the data-driven methods need.

    Exactly one of ``sparsity`` (remove that fraction, exactly) or ``threshold`` (remove every weight whose
    saliency is below it) for the unstructured and channel patterns; an "n:m" pattern (e.g. "2:4": keep the n
    largest of every m along the input dimension) takes neither. ``scope`` "global" ranks all layers together,
    "layer" each alone (``layer_sparsity`` overrides per parameter name). ``exclude``: module types, names or
    regular expressions of parameters to leave alone. ``min_density``: no layer keeps fewer than this fraction.
    With ``apply`` (default) the removed weights are zeroed in place.

    ``compensate``: after zeroing, refit the kept weights of each layer, in forward order, to reproduce the
    dense model's layer outputs on the ``num_batches`` batches of ``data`` (layer-wise OBS / SparseGPT with the
    chosen mask, ridge ``damp`` x mean diag(X^T X) towards the dense weights; :mod:`pysparse.compensate`). It
    works with every method and pattern, needs ``data`` (the targets are not used) and ``apply``; give it a few
    times as many calibration examples as the widest layer has inputs. ``result.reconstruction`` holds each
    layer's relative calibration error, masked and compensated.
    """
    # --- every check first: a bad argument leaves the model as it was
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if hessian_estimator not in HESSIAN_ESTIMATORS:
        raise ValueError(f"hessian_estimator must be 'fisher' or 'hutchinson', got {hessian_estimator!r}")
    pat = _parse_pattern(pattern)
    if isinstance(pat, tuple):
        if sparsity is not None or threshold is not None:
            raise ValueError(f"pattern {pattern!r} fixes the sparsity itself: give neither sparsity nor threshold")
    elif (sparsity is None) == (threshold is None):
        raise ValueError("give exactly one of sparsity= or threshold=")
    if sparsity is not None:
        sparsity = _check_fraction(sparsity, "sparsity")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
            raise ValueError(f"threshold must be a real number, got {threshold!r}")
        if scope == "layer" or layer_sparsity:
            raise ValueError("threshold= applies one saliency threshold to all layers: no scope='layer' or "
                             "layer_sparsity with it")
    min_density = _check_fraction(min_density, "min_density", upper_inclusive=True)
    layer_sparsity = dict(layer_sparsity or {})
    for k, v in layer_sparsity.items():
        _check_fraction(v, f"layer_sparsity[{k!r}]")
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    if isinstance(hutchinson_samples, bool) or not isinstance(hutchinson_samples, int) or hutchinson_samples < 1:
        raise ValueError(f"hutchinson_samples must be an int >= 1, got {hutchinson_samples!r}")
    if not isinstance(compensate, bool):
        raise ValueError(f"compensate must be a bool, got {compensate!r}")
    if compensate:
        if not apply:
            raise ValueError("compensate=True changes the kept weights: it needs apply=True")
        if data is None:
            raise ValueError("compensate=True needs data= (calibration batches of (inputs, targets))")
        check_damp(damp)
    params = prunable_parameters(model, exclude)
    if not params:
        raise nothing_to_prune(model)
    unknown = sorted(set(layer_sparsity) - set(params))
    if unknown:
        raise ValueError(f"layer_sparsity names parameters that are not prunable: {unknown[:5]}")
    if isinstance(pat, tuple):
        bad = [n for n, (_, p) in params.items() if p.shape[1] % pat[1]]
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise ValueError(f"pattern {pattern!r}: the input dimension of {bad[:3]}{more} is not divisible by "
                             f"{pat[1]} (exclude those layers: exclude=[names or regular expressions], depthwise "
                             "convolutions have one input per group)")
    for name, (_, p) in params.items():
        _check_finite(p.detach(), f"the weight {name}")
    batches = None
    if method in DATA_METHODS:
        if data is None:
            raise ValueError(f"method {method!r} needs data= (an iterable of (inputs, targets) batches)")
        if loss_fn is None and method != "wanda":
            raise ValueError(f"method {method!r} needs loss_fn=")
    if method in DATA_METHODS or compensate:
        batches = _batches(data, num_batches)

    # --- score and select (the model's weights are untouched until here)
    scoring = batches
    if progress and method in DATA_METHODS:
        from tqdm.auto import tqdm
        scoring = tqdm(batches, desc=f"score ({method})")
    scores = _scores(model, params, method, scoring, loss_fn, hessian_estimator, hutchinson_samples, generator)
    masks = _select(scores, pat, scope, sparsity, threshold, layer_sparsity, min_density)
    reconstruction = {}
    if compensate:
        reconstruction = _compensate(model, masks, batches, damp=damp, progress=progress)
    elif apply:
        for name, (_, p) in params.items():
            ops.apply_mask_(masks[name], p.data)
    settings = {"sparsity": sparsity, "threshold": threshold, "scope": scope, "pattern": pattern,
                "min_density": min_density, "num_batches": num_batches,
                **({"hessian_estimator": hessian_estimator} if method == "hessian" else {}),
                **({"compensate": True, "damp": damp} if compensate else {})}
    kinds = {n: type(module).__name__ for n, (module, _) in params.items()}
    return PruneResult(masks=masks, scores=scores, kinds=kinds, method=method, settings=settings,
                       reconstruction=reconstruction)


# ------------------------------------------------------------------------ torch.nn.utils.prune conversions
def to_torch_prune(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Attach masks in ``torch.nn.utils.prune``'s form (``weight_orig`` + ``weight_mask``, re-applied on every
    forward) to the named parameters; returns ``model``."""
    from torch.nn.utils import prune as torch_prune

    from .nn._sparse_weight import check_mask

    for name, mask in masks.items():
        module_name, _, pname = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        param = getattr(module, "_parameters", {}).get(pname)
        if param is None:
            hint = (f" ({module_name} is a {type(module).__name__}, which stores only its kept weights: "
                    "pysparse.densify the model first)" if isinstance(module, SparseWeight) else "")
            raise ValueError(f"masks[{name!r}] names no parameter of the model{hint}")
        check_mask(mask, param, name=f"masks[{name!r}]")
        torch_prune.custom_from_mask(module, pname, mask)
    return model


def from_torch_prune(model: nn.Module, *, remove: bool = True) -> dict[str, torch.Tensor]:
    """The masks of every parameter pruned with ``torch.nn.utils.prune`` (bool, keyed by parameter name);
    with ``remove`` the pruning is made permanent (``prune.remove``: plain masked weights, no hooks)."""
    from torch.nn.utils import prune as torch_prune

    masks = {}
    for module_name, module in list(model.named_modules()):
        for buffer_name, buf in list(module.named_buffers(recurse=False)):
            if buffer_name.endswith("_mask") and hasattr(module, buffer_name[:-5] + "_orig"):
                pname = buffer_name[:-5]
                masks[f"{module_name}.{pname}" if module_name else pname] = buf.detach() != 0
                if remove:
                    torch_prune.remove(module, pname)
    return masks
