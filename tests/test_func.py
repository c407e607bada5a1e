"""torch.func through the sparse layers: grad, vjp, jacrev (nested too), vmap over inputs and over the stored
values (ensembles), and per-sample gradients (vmap of grad), on every layer path, against autograd and the
masked dense model. The layers' C++ autograd nodes and torch.library's registered formulas cannot run under a
functorch transform; pysparse routes such calls through Functions with a separate setup_context and gives
every op a vmap rule (pysparse/ops.py)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vjp, vmap

import pysparse
from pysparse import SparseConv2d, SparseLinear
from pysparse.nn import conv as conv_module
from pysparse.testing import DEVICES

PATHS = ["kernels", "im2col", "dense"]


def _models(device, path, monkeypatch, seed=0):
    """A sparsified conv net (two convolutions, two linear layers) and its masked dense twin, float64."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Tanh(), nn.Conv2d(5, 4, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(4 * 2 * 2, 12), nn.Tanh(), nn.Linear(12, 3)).to(device, torch.float64)
    masks = {n: torch.rand_like(p) > 0.5 for n, p in model.named_parameters() if p.dim() > 1}
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    pysparse.sparsify(model, masks, min_sparsity=0)
    for m in model.modules():
        if isinstance(m, (SparseLinear, SparseConv2d)):
            m.dense_below = 1.0 if path == "dense" else 0.0
    if path == "im2col":
        monkeypatch.setattr(conv_module, "DIRECT_MIN_OUTPUTS", 1 << 30)
        monkeypatch.setattr(conv_module, "DIRECT_MAX_DENSITY", 0.0)
    return model, dense, masks


def _data(device, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64).to(device)
    return x, torch.randint(0, 3, (n,), generator=g).to(device)


def _assert_matches_dense(sparse_grads: dict, dense_grads: dict, masks: dict) -> None:
    """The sparse model's gradients (keyed "<layer>.values") equal the dense model's at the kept positions."""
    sparse_grads = {(n[:-len("values")] + "weight" if n.endswith(".values") else n): g for n, g in sparse_grads.items()}
    assert set(sparse_grads) == set(dense_grads)
    for n, g in dense_grads.items():
        torch.testing.assert_close(sparse_grads[n], g[..., masks[n]] if n in masks else g, msg=n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_grad_and_vjp_match_autograd_and_dense(device, path, monkeypatch):
    model, dense, masks = _models(device, path, monkeypatch)
    x, y = _data(device)

    def loss(params, module, x, y):
        return F.cross_entropy(functional_call(module, params, (x,)), y)

    params = {n: p.detach() for n, p in model.named_parameters()}
    g = grad(loss)(params, model, x, y)
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, msg=n)
    dense_params = {n: p.detach() for n, p in dense.named_parameters()}
    _assert_matches_dense(g, grad(loss)(dense_params, dense, x, y), masks)
    out, pullback = vjp(lambda xx: model(xx), x)
    gx, = pullback(torch.ones_like(out))
    _, dense_pullback = vjp(lambda xx: dense(xx), x)
    torch.testing.assert_close(gx, dense_pullback(torch.ones_like(out))[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_per_sample_gradients_match_dense(device, path, monkeypatch):
    """vmap(grad(...)) over the examples: the Opacus / DP-SGD computation."""
    model, dense, masks = _models(device, path, monkeypatch)
    x, y = _data(device)

    def sample_loss(params, module, xi, yi):
        return F.cross_entropy(functional_call(module, params, (xi[None],)), yi[None])

    per_sample = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))
    g = per_sample({n: p.detach() for n, p in model.named_parameters()}, model, x, y)
    gd = per_sample({n: p.detach() for n, p in dense.named_parameters()}, dense, x, y)
    _assert_matches_dense(g, gd, masks)
    for i in (0, len(x) - 1):  # and against autograd, example by example
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        torch.testing.assert_close(g["0.values"][i], model[0].values.grad)
        torch.testing.assert_close(g["7.values"][i], model[7].values.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS)
def test_vmap_over_inputs_and_over_values(device, path, monkeypatch):
    model, dense, masks = _models(device, path, monkeypatch)
    xs = torch.stack([_data(device, n=3, seed=s)[0] for s in range(4)])  # [4, 3, 2, 5, 5]
    with torch.no_grad():
        torch.testing.assert_close(vmap(model)(xs), torch.stack([dense(x) for x in xs]))
        # an ensemble: 3 sets of values for the first convolution and the classifier (batched weights)
        v0 = torch.randn(3, model[0].nnz, device=device, dtype=torch.float64)
        v7 = torch.randn(3, model[7].nnz, device=device, dtype=torch.float64)
        x = xs[0]
        out = vmap(lambda a, b: functional_call(model, {"0.values": a, "7.values": b}, (x,)))(v0, v7)
        for i in range(3):
            member = copy.deepcopy(model)
            member[0].values.copy_(v0[i])
            member[7].values.copy_(v7[i])
            torch.testing.assert_close(out[i], member(x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["kernels", "im2col"])
def test_jacrev_and_nested_jacrev_match_dense(device, path, monkeypatch):
    model, dense, masks = _models(device, path, monkeypatch)
    x, _ = _data(device, n=2)
    torch.testing.assert_close(jacrev(model)(x), jacrev(dense)(x))
    small = x[:1]  # the input Hessian of one output: jacrev of jacrev (two grad levels)
    f = lambda module: (lambda xx: module(xx)[0, 1])  # noqa: E731
    torch.testing.assert_close(jacrev(jacrev(f(model)))(small), jacrev(jacrev(f(dense)))(small))


def test_func_calls_fold_the_vmapped_dimension_into_one_kernel_call(monkeypatch):
    """vmap over the inputs of SparseLinear / SparseConv2d: one spmm / sparse_conv2d call, not one per entry."""
    calls = []
    monkeypatch.setattr(pysparse.ops, "_vmap_loop", lambda op, *a: calls.append(op))
    layer, conv = SparseLinear(16, 8, sparsity=0.7), SparseConv2d(3, 4, 3, sparsity=0.7)
    layer.dense_below = conv.dense_below = 0.0
    with torch.no_grad():
        xs = torch.randn(5, 2, 16)
        torch.testing.assert_close(vmap(layer)(xs), torch.stack([layer(x) for x in xs]))
        images = torch.randn(5, 2, 3, 6, 6)
        torch.testing.assert_close(vmap(conv)(images), torch.stack([conv(x) for x in images]))
    assert calls == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["kernels", "im2col"])
def test_forward_mode_jvp_jacfwd_and_hessian_match_dense(device, path, monkeypatch):
    model, dense, masks = _models(device, path, monkeypatch)
    x, y = _data(device, n=2)
    tangent = torch.randn_like(x)
    out, t = torch.func.jvp(model, (x,), (tangent,))
    out_d, t_d = torch.func.jvp(dense, (x,), (tangent,))
    torch.testing.assert_close(out, out_d)
    torch.testing.assert_close(t, t_d)
    torch.testing.assert_close(torch.func.jacfwd(model)(x), torch.func.jacfwd(dense)(x))
    f = lambda module: (lambda xx: F.cross_entropy(module(xx), y[:1]))  # noqa: E731
    torch.testing.assert_close(torch.func.hessian(f(model))(x[:1]), torch.func.hessian(f(dense))(x[:1]))
    # forward mode in the weights: the tangent of the loss along a direction in the stored values
    params = {n: p.detach() for n, p in model.named_parameters()}
    direction = {n: torch.randn_like(p) for n, p in params.items()}
    _, t_loss = torch.func.jvp(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y), (params,), (direction,))
    g = grad(lambda p: F.cross_entropy(functional_call(model, p, (x,)), y))(params)
    torch.testing.assert_close(t_loss, sum((g[n] * direction[n]).sum() for n in params))


def test_spmm_grad_forward_mode_matches_reference():
    """The one multi-output op's jvp (also reached by jacfwd of a gradient) against the reference's, through the
    public wrapper (a raw torch.ops.pysparse call under torch.func follows torch.library's rules: no jvp)."""
    s = pysparse.csr.structure(torch.rand(6, 7) > 0.5)
    values, gyt, xt = torch.randn(s.nnz, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64), \
        torch.randn(7, 3, dtype=torch.float64)
    tangents = tuple(torch.randn_like(t) for t in (values, gyt, xt))
    fn = lambda v, g, x: pysparse.ops.spmm_grad(s.rowptr, s.col, v, g, x, transposed=s.transposed(), bias=True)  # noqa
    ref = lambda v, g, x: pysparse.reference.spmm_grad(s.rowptr, s.col, v, g, x, bias=True)  # noqa: E731
    out, t = torch.func.jvp(fn, (values, gyt, xt), tangents)
    out_r, t_r = torch.func.jvp(ref, (values, gyt, xt), tangents)
    for a, b in zip(out + t, out_r + t_r):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_ad_dual_tensors_through_the_layers(device, monkeypatch):
    """torch.autograd.forward_ad (dual tensors, no torch.func): the layers' jvp equals the dense model's."""
    import torch.autograd.forward_ad as fwAD

    model, dense, _ = _models(device, "kernels", monkeypatch)
    x, _ = _data(device, n=3)
    tangent = torch.randn_like(x)
    tangents = []
    for m in (model, dense):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, tangent))).tangent)
    torch.testing.assert_close(tangents[0], tangents[1])


def test_public_ops_under_torch_func():
    """pysparse.ops' wrappers under grad / vmap give the reference's results."""
    s = pysparse.csr.structure(torch.rand(6, 7) > 0.5)
    values, xt = torch.randn(s.nnz, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    f = lambda v, x: pysparse.ops.spmm(s.rowptr, s.col, v, x, transposed=s.transposed()).pow(2).sum()  # noqa
    f_ref = lambda v, x: pysparse.reference.spmm(s.rowptr, s.col, v, x).pow(2).sum()  # noqa: E731
    for a, b in zip(grad(f, argnums=(0, 1))(values, xt), grad(f_ref, argnums=(0, 1))(values, xt)):
        torch.testing.assert_close(a, b)
    xs = torch.randn(4, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(vmap(lambda x: pysparse.ops.sddmm(s.rowptr, s.col, x[:6], x))(xs),
                               torch.stack([pysparse.reference.sddmm(s.rowptr, s.col, x[:6], x) for x in xs]))
