"""Weight compensation after one-shot pruning: refit the kept weights of every layer so that it reproduces the
dense model's outputs on a few calibration batches (layer-wise OBS, as in Optimal Brain Compression and
SparseGPT, Frantar & Alistarh 2022 / 2023).

Layers are taken in the order the forward pass reaches them. For a layer with dense weight W (rows = outputs,
columns = the d inputs of one group: in_features, or in_channels/groups * kh * kw of a convolution), let X be
its inputs in the pruned model (earlier layers already compensated) and Xd its inputs in the dense model. The
kept weights W' minimise

    ||X W'^T - Xd W^T||^2 + lam * ||W' - W||^2,      W' zero where the mask is False,

a quadratic with Hessian Hd = X^T X + lam I (``lam`` = ``damp`` x the mean of diag(X^T X)). The unconstrained
minimum is W* = (W Xd^T X + lam W) Hd^-1; from there the OBS sweep (SparseGPT's, with the mask given) removes
the pruned weights column by column and moves each one's error onto the columns not yet fixed, through the
Cholesky factor of Hd^-1. When nothing is pruned and the inputs are unchanged, W' = W. Refitting to the dense
inputs' outputs, not the pruned ones', also corrects what earlier layers lost.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import layer_inputs, ops
from .nn._sparse_weight import check_mask
from .nn.attention import ATTENTION_IN_PROJ, ATTENTION_QKV_PROJ, input_site, out_proj_owners, projection_inputs

BLOCK = 128  # columns per lazy block of the OBS sweep
EXACT_FLOPS = 2e10  # at most this much work (rows x d^3) solving rows the sweep left worse than masked
CHUNK_BYTES = 64 << 20  # bytes of unfolded float64 calibration columns built at once, per input (about)


def check_damp(damp) -> float:
    """The ridge weight of compensate / prune(compensate=True): a positive finite number, else ValueError."""
    return ops._check_positive(damp, "damp")


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass once the layer's input is seen."""


def _targets(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, tuple[nn.Module, str, torch.Tensor]]:
    """Per mask name, the site layer_inputs.watch takes: (the module whose call shows the weight's input, its
    kind, the weight). The kind is "layer" for an nn.Linear / nn.Conv2d; for an nn.MultiheadAttention's
    projections the module is the attention itself, with kind "in_proj_weight" (three row blocks: query's,
    key's, value's), "q_proj_weight" / "k_proj_weight" / "v_proj_weight", or "out_proj" (its input is the heads'
    output: the out_proj layer itself is never called)."""
    modules, owners = dict(model.named_modules()), out_proj_owners(model)
    out = {}
    for name in masks:
        prefix, _, attr = name.rpartition(".")
        mod = modules.get(prefix)
        if not ((attr == "weight" and isinstance(mod, (nn.Linear, nn.Conv2d))) or (
                isinstance(mod, nn.MultiheadAttention) and attr in ATTENTION_IN_PROJ + ATTENTION_QKV_PROJ
                and getattr(mod, attr) is not None)):
            raise ValueError(f"compensate: {name!r} is not the weight of an nn.Linear / nn.Conv2d or a projection of "
                             "an nn.MultiheadAttention")
        weight = getattr(mod, attr)
        check_mask(masks[name], weight, name=f"masks[{name!r}]")
        site, kind = input_site(mod, attr, owners)
        out[name] = (site, kind, weight)
    return out


def _forward_order(model: nn.Module, sites: Mapping[str, tuple[nn.Module, str, torch.Tensor]], inputs) -> list[str]:
    """The names in ``sites`` (layer_inputs.watch's) in the order the forward pass first sees their inputs."""
    order: list[str] = []

    def seen(name, mod, args, kwargs):
        if name not in order:
            order.append(name)

    with torch.no_grad(), layer_inputs.watch(sites, seen):
        model(inputs)
    return order


def _layer_input(model: nn.Module, site: tuple[nn.Module, str, torch.Tensor], inputs, params: Optional[dict] = None):
    """The input that ``site`` = (module, kind, weight) sees when ``model`` runs on ``inputs`` (with ``params``
    swapped in, if given: then ``weight`` is the swapped-in tensor); the forward pass stops there. For an
    attention's projection (``kind``, see :func:`_targets`) a list, one input per row block of the weight."""
    seen_inputs: list = []
    busy: list = []  # attention_values calls the attention again: that call passes
    kind = site[1]

    def seen(name, mod, args, kwargs):
        if busy:
            return
        if kind == "layer":
            seen_inputs.append(args[0].detach())
        else:
            busy.append(True)
            seen_inputs.append(projection_inputs(mod, kind, args, kwargs))
        raise _Stop

    try:
        with torch.no_grad(), layer_inputs.watch({None: site}, seen):
            if params is None:
                model(inputs)
            else:
                torch.func.functional_call(model, params, (inputs,), strict=False)
    except _Stop:
        pass
    return seen_inputs[0]


def _columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs as rows of its weight's columns, per group: [groups, samples, d], float64."""
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1]).double()
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
    else:
        x = F.pad(x, module._reversed_padding_repeated_twice)
    cols = F.unfold(x.double(), module.kernel_size, dilation=module.dilation, stride=module.stride)  # [N, C*kk, L]
    g = module.groups
    cols = cols.transpose(1, 2).reshape(-1, g, cols.shape[1] // g)  # column order of weight.reshape(out, -1)
    return cols.transpose(0, 1)


def _column_chunks(module: nn.Module, x: torch.Tensor, xd: torch.Tensor):
    """_columns of both inputs, a few samples at a time: a convolution's unfolded float64 columns are
    kh * kw times its input, so a whole calibration batch of large images could take gigabytes at once."""
    per_sample = max(1, x[:1].numel()) * 8 * (1 if isinstance(module, nn.Linear) else
                                               module.kernel_size[0] * module.kernel_size[1])
    step = max(1, CHUNK_BYTES // per_sample)
    for i in range(0, x.shape[0], step):
        yield _columns(module, x[i:i + step]), _columns(module, xd[i:i + step])


def _products(module: nn.Module, kind: str, x_in, xd_in):
    """X^T X, X^T Xd and Xd^T Xd ([groups, d, d], float64) of a calibration batch, in parts. An attention's row
    blocks each see their own input (query and key may differ in length): one product per block, stacked."""
    if kind == "layer":
        for x, xd in _column_chunks(module, x_in, xd_in):
            yield x.transpose(1, 2) @ x, x.transpose(1, 2) @ xd, xd.transpose(1, 2) @ xd
        return
    pairs = [(a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()) for a, b in zip(x_in, xd_in)]
    yield tuple(torch.stack(t) for t in zip(*((x.t() @ x, x.t() @ xd, xd.t() @ xd) for x, xd in pairs)))


def _row_objectives(a, b, h, g, hdd):
    """||X a_r^T - Xd b_r^T||^2 of each row r ([groups, rows]) from the accumulated X^T X, X^T Xd and Xd^T Xd."""
    return ((a @ h) * a).sum(-1) - 2 * ((a @ g) * b).sum(-1) + ((b @ hdd) * b).sum(-1)


def _sweep(w: torch.Tensor, mask: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """OBS with a given mask (SparseGPT's loop): w [g, r, d] float64, u the upper Cholesky factor of Hd^-1."""
    w = w.clone()
    d = w.shape[-1]
    for i1 in range(0, d, BLOCK):
        i2 = min(i1 + BLOCK, d)
        w1 = w[..., i1:i2].clone()
        u1 = u[:, i1:i2, i1:i2]
        errs = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[..., i]
            err = col * (~mask[..., i1 + i]) / u1[:, i, i].unsqueeze(-1)  # only the removed weights move
            w1[..., i:] -= err.unsqueeze(-1) * u1[:, i, i:].unsqueeze(1)
            w1[..., i] = col.masked_fill(~mask[..., i1 + i], 0)
            errs[..., i] = err
        w[..., i1:i2] = w1
        if i2 < d:
            w[..., i2:] -= errs @ u[:, i1:i2, i2:]
    return w


def _repair_rows(fitted, fits, masked, w, mask, h, g, hdd, lam):
    """The sweep fixes the columns in turn (SparseGPT's approximation): on a row whose unconstrained optimum
    lies far from every masked solution it can end worse than plain masking (seen on a 16-input layer: 3x the
    masked error). Such rows are solved exactly on their kept columns, (H + lam I)_KK a_K = (G w + lam w)_K,
    while that costs under EXACT_FLOPS, and otherwise keep their masked weights: no row ends worse than masked.
    ``fits`` / ``masked``: the rows' objectives (_row_objectives) of ``fitted`` and of ``w * mask``; returns
    ``fitted`` and ``fits`` repaired."""
    worse = fits > masked  # [groups, rows]
    if not bool(worse.any()):
        return fitted, fits
    fitted = torch.where(worse.unsqueeze(-1), w * mask, fitted)
    fits = torch.where(worse, masked, fits)
    d = w.shape[-1]
    if int(worse.sum()) * d ** 3 > EXACT_FLOPS:
        return fitted, fits
    eye = torch.eye(d, dtype=h.dtype, device=h.device)
    for gi, r in worse.nonzero().tolist():
        keep = mask[gi, r].to(h.dtype)
        system = (h[gi] + lam[gi] * eye) * keep[:, None] * keep[None, :] + torch.diag(1 - keep)
        exact = torch.linalg.solve(system, (g[gi] @ w[gi, r] + lam[gi] * w[gi, r]) * keep)
        objective = _row_objectives(exact, w[gi, r], h[gi], g[gi], hdd[gi])
        if float(objective) < float(masked[gi, r]):
            fitted[gi, r], fits[gi, r] = exact, objective
    return fitted, fits


def compensate(model: nn.Module, masks: Mapping[str, torch.Tensor], batches: Iterable, *,
               damp: float = 0.01, progress: bool = False) -> dict[str, dict[str, float]]:
    """Apply ``masks`` (parameter name -> bool, True = keep) to the nn.Linear / nn.Conv2d weights and the
    nn.MultiheadAttention projections (``in_proj_weight``, ``out_proj.weight``, ...) of the *dense* ``model`` and
    refit the kept weights layer by layer (see the module docstring). ``batches``: the calibration data, a list of
    (inputs, targets); the targets are not used. Returns, per parameter, the calibration reconstruction error
    relative to the dense layer's output energy, "masked" (plain masking) and "compensated". ``progress``: a tqdm
    bar over the layers."""
    damp = check_damp(damp)
    sites = _targets(model, masks)  # where each weight's input shows
    batches = list(batches)
    if not batches:
        raise ValueError("compensate: batches yielded no batch")
    dense = {n: weight.detach().clone() for n, (_, _, weight) in sites.items()}
    was_training = model.training
    model.eval()
    report: dict[str, dict[str, float]] = {}
    done = False
    try:
        order = _forward_order(model, sites, batches[0][0])
        names = order + [n for n in sites if n not in order]
        if progress:
            from tqdm.auto import tqdm
            names = tqdm(names, desc="compensate")
        for name in names:  # layers the forward never reaches: masked only
            mod, kind, weight = sites[name]
            if name not in order:
                ops.apply_mask_(masks[name], weight.data)
                continue
            h = g = hdd = None
            for inputs, _ in batches:
                x_in = _layer_input(model, sites[name], inputs)
                xd_in = _layer_input(model, (mod, kind, dense[name]), inputs, dense)
                for xx, xxd, xdxd in _products(mod, kind, x_in, xd_in):
                    h, g, hdd = (p if acc is None else acc + p for acc, p in ((h, xx), (g, xxd), (hdd, xdxd)))
            if not bool(torch.isfinite(h).all() and torch.isfinite(g).all()):
                raise ValueError(f"compensate: the calibration inputs of {name} contain NaN or inf")
            groups = h.shape[0]
            w = dense[name].reshape(groups, weight.shape[0] // groups, -1).double()
            mask = masks[name].reshape(w.shape)
            mean_diag = h.diagonal(dim1=1, dim2=2).mean(-1)
            lam = torch.where(mean_diag > 0, damp * mean_diag, torch.ones_like(mean_diag))
            eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
            chol = torch.linalg.cholesky(h + lam[:, None, None] * eye)
            best = torch.cholesky_solve(g @ w.transpose(1, 2) + lam[:, None, None] * w.transpose(1, 2), chol)
            u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
            fitted = _sweep(best.transpose(1, 2), mask, u)
            masked = _row_objectives(w * mask, w, h, g, hdd)
            fitted, fits = _repair_rows(fitted, _row_objectives(fitted, w, h, g, hdd), masked, w, mask, h, g, hdd,
                                        lam)
            energy = max(float(((w @ hdd) * w).sum()), 1e-30)  # ||Xd W^T||^2
            report[name] = {"masked": float(masked.sum()) / energy, "compensated": float(fits.sum()) / energy}
            with torch.no_grad():
                weight.copy_(fitted.reshape(weight.shape).to(weight.dtype))
            ops.apply_mask_(masks[name], weight.data)
        done = True
    finally:
        if not done:  # a failure part-way (e.g. non-finite calibration inputs) leaves the model as it was
            with torch.no_grad():
                for n, (_, _, weight) in sites.items():
                    weight.copy_(dense[n])
        model.train(was_training)
    return report
