"""Sparse layers while training: spectral normalisation through the sparse kernels, removing stored weights in
place (prune_values_) and shrinking a model's sparse layers by saliency (pysparse.shrink)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pysparse
from pysparse.nn import SparseConv2d, SparseLinear, spectral_norm
from pysparse.shrink import model_sparsity, shrink, sparse_layers


def _converge(layer, shape):
    for _ in range(5):  # the forward runs the power iteration in training mode ...
        layer(torch.randn(*shape))
    with torch.no_grad():  # ... converge it fully (two groups can have close singular values)
        layer._power_iteration(500)


@pytest.mark.parametrize("make,shape", [
    (lambda: SparseLinear(40, 30, sparsity=0.7), (4, 40)),
    (lambda: SparseConv2d(6, 8, 3, padding=1, sparsity=0.6), (2, 6, 5, 5)),
    (lambda: SparseConv2d(8, 16, 3, padding=1, groups=2, sparsity=0.5), (2, 8, 5, 5)),
])
def test_spectral_norm_sigma_is_the_largest_singular_value(make, shape):
    torch.manual_seed(0)
    layer = spectral_norm(make())
    _converge(layer, shape)
    # the stored matrix (block-diagonal for groups): the operator the kernels apply
    expected = torch.linalg.matrix_norm(layer._to_matrix(layer.dense_weight().detach()), 2)
    assert float(layer.sigma().detach()) == pytest.approx(float(expected), rel=1e-3)


def test_spectral_norm_forward_and_gradient_match_the_dense_definition():
    torch.manual_seed(1)
    layer = spectral_norm(SparseLinear(20, 12, sparsity=0.5))
    _converge(layer, (3, 20))
    layer.eval()  # no power iteration: u, v fixed, sigma = u^T W v exactly
    x = torch.randn(5, 20)
    w = layer.dense_weight()
    sigma = layer.sn_u @ w @ layer.sn_v
    torch.testing.assert_close(layer(x), F.linear(x, w / sigma, layer.bias), rtol=1e-5, atol=1e-6)
    # gradient of the stored values: the dense gradient at the kept places
    layer(x).pow(2).sum().backward()
    dense = layer.dense_weight().detach().requires_grad_(True)
    F.linear(x, dense / (layer.sn_u @ dense @ layer.sn_v), layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(layer.values.grad, dense.grad[layer.mask()], rtol=1e-4, atol=1e-6)
    # the densified layer has the same function
    torch.testing.assert_close(layer.to_dense()(x), layer(x), rtol=1e-5, atol=1e-6)


def test_spectral_norm_and_pruning_together():
    """torch.nn.utils.prune and spectral_norm cannot share a weight in torch; a pruned sparse layer with
    spectral norm trains, its pruned weights stay absent, and it can be pruned further while normalised."""
    torch.manual_seed(2)
    layer = spectral_norm(SparseConv2d(4, 8, 3, sparsity=0.8))
    mask0 = layer.mask()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    for _ in range(5):
        opt.zero_grad()
        layer(torch.randn(2, 4, 6, 6)).square().mean().backward()
        opt.step()
    assert torch.equal(layer.mask(), mask0) and not bool((layer.dense_weight()[~mask0] != 0).any())
    shrink(layer, 0.9, "magnitude", optimizers=[opt])
    assert layer.sparsity == pytest.approx(0.9, abs=1 / 288)
    layer(torch.randn(2, 4, 6, 6)).square().mean().backward()
    opt.step()
    _converge(layer, (2, 4, 6, 6))
    expected = torch.linalg.matrix_norm(layer._to_matrix(layer.dense_weight().detach()), 2)
    assert float(layer.sigma().detach()) == pytest.approx(float(expected), rel=1e-3)


def test_spectral_norm_state_dict_deepcopy_and_dense_modules(tmp_path):
    torch.manual_seed(3)
    layer = spectral_norm(SparseLinear(10, 6, sparsity=0.5))
    twin = copy.deepcopy(layer)
    assert torch.equal(twin.sn_u, layer.sn_u) and twin.spectral_norm
    model = nn.Sequential(spectral_norm(SparseLinear(10, 6, sparsity=0.5)))
    pysparse.save(model, tmp_path / "m.safetensors")
    other = nn.Sequential(spectral_norm(SparseLinear(10, 6, sparsity=0.5)))
    pysparse.load(tmp_path / "m.safetensors", other)
    assert torch.equal(other[0].sn_u, model[0].sn_u)
    dense = spectral_norm(nn.Linear(5, 3))  # torch's parametrisation for dense modules
    assert hasattr(dense, "parametrizations")
    with pytest.raises(TypeError, match="spectral_norm"):
        spectral_norm(nn.ReLU())
    with pytest.raises(ValueError, match="n_power_iterations"):
        spectral_norm(SparseLinear(4, 4, sparsity=0.5), n_power_iterations=0)


def test_prune_values_cuts_values_grads_and_optimizer_state():
    torch.manual_seed(4)
    layer = SparseConv2d(4, 6, 3, groups=2, sparsity=0.3)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(2, 4, 5, 5)
    layer(x).sum().backward()
    opt.step()
    old_values, old_mask = layer.values.detach().clone(), layer.mask()
    m_old = opt.state[layer.values]["exp_avg"].clone()
    keep = torch.rand(layer.nnz) > 0.4
    layer.prune_values_(keep, [opt])
    assert layer.nnz == int(keep.sum())
    torch.testing.assert_close(layer.values.detach(), old_values[keep])
    torch.testing.assert_close(opt.state[layer.values]["exp_avg"], m_old[keep])
    assert layer.values.grad.shape == layer.values.shape
    assert opt.param_groups[0]["params"][0] is layer.values
    # the new mask is the old one with the dropped stored entries removed
    expected = old_mask.clone()
    expected[old_mask] = keep  # the conv's stored order is the block-diagonal matrix's row-major order
    assert int(layer.mask().sum()) == int(keep.sum()) and not bool((layer.mask() & ~old_mask).any())
    dense = layer.to_dense()
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()  # trains on
    opt.step()
    with pytest.raises(ValueError, match="keep"):
        layer.prune_values_(torch.ones(3, dtype=torch.bool))


def _model():
    torch.manual_seed(5)
    return nn.Sequential(SparseConv2d(3, 8, 3, sparsity=0.0), nn.ReLU(), nn.Flatten(),
                         SparseLinear(8 * 4 * 4, 10, sparsity=0.0))


@pytest.mark.parametrize("method", ["magnitude", "gradient", "taylor", "random"])
def test_shrink_layer_scope_reaches_each_layer_exactly(method):
    model = _model()
    model(torch.randn(4, 3, 6, 6)).square().mean().backward()
    removed = shrink(model, 0.75, method, generator=torch.Generator().manual_seed(0))
    for m in sparse_layers(model).values():
        assert m.nnz == round(0.25 * math.prod(m.weight_shape))
    assert sum(removed.values()) == round(0.75 * 216) + round(0.75 * 1280)
    # never regrows: a lower target is a no-op
    assert shrink(model, 0.5, method) == {}


def test_shrink_global_scope_and_followers():
    model = _model()
    with torch.no_grad():
        model[0].values.mul_(100)  # the conv's weights are the large ones: global magnitude keeps them
    follower = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9)
    model(torch.randn(4, 3, 6, 6)).sum().backward()
    opt.step()
    shrink(model, 0.8, "magnitude", scope="global", optimizers=[opt], followers=[follower])
    total = 216 + 1280
    assert sum(m.nnz for m in sparse_layers(model).values()) == round(0.2 * total)
    assert model_sparsity(model) == pytest.approx(0.8, abs=1 / total)
    assert model[0].nnz == 216  # all of the large conv weights survive
    for a, b in zip(sparse_layers(model).values(), sparse_layers(follower).values()):
        assert torch.equal(a.mask(), b.mask())
    assert opt.state[model[3].values]["momentum_buffer"].shape == model[3].values.shape


def test_shrink_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="sparsity"):
        shrink(model, 1.0)
    with pytest.raises(ValueError, match="method"):
        shrink(model, 0.5, "hessian")
    with pytest.raises(ValueError, match="scope"):
        shrink(model, 0.5, scope="row")
    with pytest.raises(ValueError, match="gradients"):
        shrink(model, 0.5, "taylor")
    with pytest.raises(ValueError, match="no sparse layer"):
        shrink(nn.Linear(3, 3), 0.5)
    other = _model()
    shrink(other, 0.5)
    with pytest.raises(ValueError, match="follower"):
        shrink(model, 0.5, followers=[other])
