"""Gradients of gradients through the sparse kernels: every backward op is differentiable (gradgradcheck in
float64), and a gradient penalty / Hessian-vector product through SparseLinear and SparseConv2d (every path)
equals the masked dense model's. Before, the backward ops had no autograd formula: a second derivative came out
zero, silently but for a torch warning."""
import copy

import pytest
import torch
from torch import nn

import pysparse
from pysparse import SparseConv2d, SparseLinear, csr
from pysparse.nn import conv as conv_module
from pysparse.testing import DEVICES

F64 = torch.float64


def _structure(rows, cols, density, device, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < density
    mask[0] = False  # an empty row
    return csr.structure(mask.to(device))


def _r(*shape, device, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(device).requires_grad_()


def _linear_cases(device) -> dict:
    """name -> (function of the differentiable inputs, those inputs) for each linear op."""
    s = _structure(7, 9, 0.4, device, 0)
    nnz, t = s.nnz, s.transposed()
    values, xt, yt = _r(nnz, device=device, seed=1), _r(9, 5, device=device, seed=2), _r(7, 5, device=device, seed=3)
    bias = _r(7, device=device, seed=4)
    ops = torch.ops.pysparse
    return {
        "spmm": (lambda v, x, b: ops.spmm.default(s.rowptr, s.col, v, x, b, *t), (values, xt, bias)),
        "spmm_t": (lambda v, y: ops.spmm_t.default(s.rowptr, s.col, v, y, 9, *t), (values, yt)),
        "sddmm": (lambda a, b: ops.sddmm.default(s.rowptr, s.col, a, b), (yt, xt)),
        "spmm_grad": (lambda v, g, x: ops.spmm_grad.default(s.rowptr, s.col, v, g, x, *t, True), (values, yt, xt)),
        "spmm_grad no bias": (lambda v, g, x: ops.spmm_grad.default(s.rowptr, s.col, v, g, x, *t)[:2],
                              (values, yt, xt)),
    }


CONV_GEOMETRIES = [(1, 1, 1), (2, 0, 1), (1, 2, 2)]  # stride, padding, dilation


def _conv_cases(device, stride, padding, dilation) -> dict:
    c, o, k = 3, 4, 3
    s = _structure(o, c * k * k, 0.4, device, 5)
    geometry = ([k, k], [stride] * 2, [dilation] * 2, [padding] * 2)
    values, x = _r(s.nnz, device=device, seed=6), _r(2, c, 7, 6, device=device, seed=7)
    ops = torch.ops.pysparse
    gy = ops.sparse_conv2d.default(s.rowptr, s.col, values.detach(), x.detach(), None, *geometry)
    gy = _r(*gy.shape, device=device, seed=8)
    return {
        "sparse_conv2d": (lambda v, x: ops.sparse_conv2d.default(s.rowptr, s.col, v, x, None, *geometry,
                                                                 *s.transposed()), (values, x)),
        "grad_input": (lambda v, g: ops.sparse_conv2d_grad_input.default(s.rowptr, s.col, v, g, list(x.shape),
                                                                         *geometry, *s.transposed()), (values, gy)),
        "grad_values": (lambda x, g: ops.sparse_conv2d_grad_values.default(s.rowptr, s.col, x, g, *geometry),
                        (x, gy)),
    }


def _check_cases(cases: dict) -> None:
    for name, (fn, inputs) in cases.items():
        assert torch.autograd.gradcheck(fn, inputs), name
        assert torch.autograd.gradgradcheck(fn, inputs), name


@pytest.mark.parametrize("device", DEVICES)
def test_linear_ops_gradgradcheck(device):
    _check_cases(_linear_cases(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride, padding, dilation", CONV_GEOMETRIES)
def test_conv_ops_gradgradcheck(device, stride, padding, dilation):
    _check_cases(_conv_cases(device, stride, padding, dilation))


# the ops whose CUDA kernels need W's transposed structure (t_rowptr, t_col, t_perm): the index of t_rowptr
NEEDS_TRANSPOSED = {"spmm_t": 5, "spmm_grad": 5, "sparse_conv2d_grad_input": 9}


@pytest.mark.parametrize("geometry", [None] + CONV_GEOMETRIES)
def test_backward_formulas_pass_the_transposed_structure(geometry, monkeypatch):
    """The CUDA kernels of spmm_t, spmm_grad and sparse_conv2d_grad_input need W's transposed structure; the CPU
    kernels do without, so on CPU a formula that drops it (an op recorded without it in a backward, whose own
    backward then calls one of these) passes unseen. Here, on CPU, every call a formula makes must carry it, as
    on CUDA (where the CSR alone is at hand, _transposed_for builds it on CPU too)."""
    def transposed_for(rowptr, col, n_cols):
        return csr.from_compressed(rowptr, col, (rowptr.numel() - 1, n_cols)).transposed()

    def strict_call(name, *args):
        at = NEEDS_TRANSPOSED.get(name)
        if at is not None and (len(args) <= at or args[at] is None):
            raise AssertionError(f"{name} called without W's transposed structure")
        return call(name, *args)

    call = pysparse.ops._call
    monkeypatch.setattr(pysparse.ops, "_call", strict_call)
    monkeypatch.setattr(pysparse.ops, "_transposed_for", transposed_for)
    _check_cases(_linear_cases("cpu") if geometry is None else _conv_cases("cpu", *geometry))


def _pair(sparse_model: nn.Module, masks: dict) -> nn.Module:
    """The masked dense twin of a model before it is sparsified."""
    dense = copy.deepcopy(sparse_model)
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return dense


def _penalty_grads(model, x):
    """Parameter gradients of a gradient penalty (|d sum(f(x)^2) / dx|^2, as WGAN-GP / R1) and the penalty."""
    x = x.clone().requires_grad_()
    g, = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    penalty = g.pow(2).sum()
    model.zero_grad()
    penalty.backward()
    return penalty.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["kernels", "im2col", "dense"])
def test_gradient_penalty_matches_masked_dense(device, path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 4, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 16), nn.Tanh(), nn.Linear(16, 1)).to(device, F64)
    masks = {n: torch.rand_like(p) > 0.6 for n, p in model.named_parameters() if p.dim() > 1}
    dense = _pair(model, masks)
    pysparse.sparsify(model, masks, min_sparsity=0)
    layers = [m for m in model.modules() if isinstance(m, (SparseLinear, SparseConv2d))]
    assert len(layers) == 4
    for m in layers:
        m.dense_below = 1.0 if path == "dense" else 0.0
    if path == "im2col":
        monkeypatch.setattr(conv_module, "DIRECT_MIN_OUTPUTS", 1 << 30)
        monkeypatch.setattr(conv_module, "DIRECT_MAX_DENSITY", 0.0)
    x = torch.randn(5, 3, 7, 7, device=device, dtype=F64)
    p_sparse, g_sparse = _penalty_grads(model, x)
    p_dense, g_dense = _penalty_grads(dense, x)
    torch.testing.assert_close(p_sparse, p_dense)
    for n, mask in masks.items():
        layer = n.rsplit(".", 1)[0]
        torch.testing.assert_close(g_sparse[f"{layer}.values"], g_dense[n][mask], msg=n)
        torch.testing.assert_close(g_sparse[f"{layer}.bias"], g_dense[f"{layer}.bias"], msg=n)
        assert g_sparse[f"{layer}.values"].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_hessian_vector_product_matches_masked_dense(device):
    """d/dvalues (grad(loss) . v), the product the "hessian" saliency's Hutchinson estimate takes, in float32."""
    torch.manual_seed(1)
    dense = nn.Linear(48, 32).to(device)
    mask = torch.rand_like(dense.weight) > 0.8
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = SparseLinear.from_dense(dense, mask)
    sparse.dense_below = 0.0
    x, target = torch.randn(12, 48, device=device), torch.randn(12, 32, device=device)
    v = torch.randn(int(mask.sum()), device=device)

    def hvp(layer, weight, vec):
        loss = (torch.tanh(layer(x)) - target).pow(2).mean()
        g, = torch.autograd.grad(loss, weight, create_graph=True)
        h, = torch.autograd.grad((g * vec).sum(), weight)
        return h

    v_dense = torch.zeros_like(dense.weight)
    v_dense[mask] = v
    torch.testing.assert_close(hvp(sparse, sparse.values, v), hvp(dense, dense.weight, v_dense)[mask],
                               rtol=1e-4, atol=1e-6)


def test_first_order_backward_records_nothing_extra():
    """Without create_graph the backward ops run below autograd: the gradients carry no graph."""
    layer = SparseLinear(32, 16, sparsity=0.8)
    layer.dense_below = 0.0
    x = torch.randn(4, 32, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad.grad_fn is None and layer.values.grad.grad_fn is None
