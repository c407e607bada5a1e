"""The sparse layers under torch.autocast behave as nn.Linear / nn.Conv2d do there: they take the lower-precision
activations autocast produces, compute in autocast's dtype and return it, and their float32 values get float32
gradients; with autocast off, or on a float64 layer, nothing changes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pysparse
from pysparse import SparseConv2d, SparseLinear
from pysparse.nn import conv as conv_module
from pysparse.testing import DEVICES, assert_compiled_matches_eager

# Both sides round products and outputs to the autocast dtype, in different orders.
TOL = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=4e-3, atol=4e-3)}
# SparseLinear / SparseConv2d forward paths: the sparse kernels (and for convolutions im2col + spmm, taken for
# few output pixels), and the dense path below the crossover (dense_below).
PATHS = ["sparse", "dense"]


def _masked(dense: nn.Module, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(dense.weight.shape, generator=gen) < density).to(dense.weight.device)
    with torch.no_grad():
        dense.weight.mul_(mask)
    return mask


def _check_pair(device, dtype, sparse, dense, mask, x):
    """sparse and dense (the masked twin) under autocast(dtype): same output dtype and values, and gradients of
    the input, the kept weights and the bias, in the parameters' float32."""
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast(device, dtype=dtype):
        ys, yd = sparse(xs), dense(xd)
    assert ys.dtype == yd.dtype == dtype
    torch.testing.assert_close(ys.float(), yd.float(), **TOL[dtype])
    g = torch.randn(yd.shape, generator=torch.Generator().manual_seed(9)).to(device)
    (ys.float() * g).sum().backward()
    (yd.float() * g).sum().backward()
    assert sparse.values.grad.dtype == torch.float32 and xs.grad.dtype == x.dtype
    torch.testing.assert_close(xs.grad, xd.grad, **TOL[dtype])
    torch.testing.assert_close(sparse.values.grad, dense.weight.grad[mask], **TOL[dtype])
    torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("input_dtype", ["float32", "autocast"])  # a float32 input, or what an autocast layer gave
def test_linear_matches_nn_linear(device, dtype, path, input_dtype):
    torch.manual_seed(0)
    dense = nn.Linear(48, 24).to(device)
    mask = _masked(dense, 0.2, seed=1)
    sparse = SparseLinear.from_dense(dense, mask)
    sparse.dense_below = 1.0 if path == "dense" else 0.0
    x = torch.randn(6, 48, device=device)
    _check_pair(device, dtype, sparse, dense, mask, x if input_dtype == "float32" else x.to(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL), ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", PATHS + ["im2col"])
def test_conv_matches_nn_conv2d(device, dtype, path, monkeypatch):
    torch.manual_seed(0)
    dense = nn.Conv2d(6, 8, 3, padding=1, stride=1).to(device)
    mask = _masked(dense, 0.3, seed=2)
    sparse = SparseConv2d.from_dense(dense, mask)
    sparse.dense_below = 1.0 if path == "dense" else 0.0
    if path == "im2col":  # the direct kernel otherwise takes these 2 x 7 x 7 output pixels
        monkeypatch.setattr(conv_module, "DIRECT_MIN_OUTPUTS", 1 << 30)
        monkeypatch.setattr(conv_module, "DIRECT_MAX_DENSITY", 0.0)
    _check_pair(device, dtype, sparse, dense, mask, torch.randn(2, 6, 7, 7, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_model_trains_under_autocast(device):
    """Dense layers give bfloat16 / float16 activations to sparse ones (the error this once raised); an optimizer
    step keeps the values float32 and the pruned weights absent; the loss goes down."""
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), SparseLinear(64, 64, sparsity=0.8), nn.ReLU(),
                          nn.Linear(64, 4)).to(device)
    model[2].dense_below = 0.0
    nnz = model[2].nnz
    x, y = torch.randn(64, 16, device=device), torch.randint(0, 4, (64,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert model[2].values.dtype == torch.float32 and model[2].nnz == nnz
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_off_or_float64_changes_nothing(device):
    torch.manual_seed(0)
    layer = SparseLinear(12, 5, sparsity=0.5).to(device)
    layer.dense_below = 0.0
    x = torch.randn(3, 12, device=device)
    with torch.autocast(device, enabled=False):
        assert torch.equal(layer(x), layer(x.clone()))
    for other in ("cuda", "cpu"):  # autocast on the other device type does not apply
        if other != device and (other == "cpu" or torch.cuda.is_available()):
            with torch.autocast(other, dtype=torch.bfloat16 if other == "cpu" else torch.float16):
                assert layer(x).dtype == torch.float32
    layer64 = SparseLinear(12, 5, sparsity=0.5).to(device, torch.float64)
    layer64.dense_below = 0.0
    x64 = x.double()
    want = layer64(x64)
    with torch.autocast(device, dtype=torch.bfloat16 if device == "cpu" else torch.float16):
        got = layer64(x64)  # autocast leaves float64 alone, as it does for nn.Linear
        with pytest.raises(TypeError, match="input dtype torch.float32 differs from the layer's torch.float64"):
            layer64(x)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_compiled_under_autocast_matches_eager():
    torch.manual_seed(0)
    layer = SparseLinear(16, 8, sparsity=0.7)
    layer.dense_below = 0.0
    model = _Autocast(layer)
    assert_compiled_matches_eager(model, torch.randn(4, 16, requires_grad=True), torch.randn(4, 8))


class _Autocast(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.inner(x).float()


def test_sparsified_torchvision_model_matches_dense_under_autocast():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    masks = {n: _masked(m, 0.2, seed=i) for i, (n, m) in enumerate(
        (n + ".weight", m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x)
        pysparse.sparsify(model, masks, min_sparsity=0)
        got = model(x)
    assert got.dtype == want.dtype == torch.bfloat16
    # bfloat16 rounding through 18 layers: compare the logits' scale-relative error
    assert (got.float() - want.float()).abs().max() <= 0.05 * want.float().abs().max()
