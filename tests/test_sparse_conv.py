import copy

import pytest
import torch
from torch import nn

from pysparse import SparseConv2d
from pysparse.testing import devices_for

DEVICES = devices_for("spmm", "spmm_t", "sddmm")

CONFIGS = [
    dict(in_channels=8, out_channels=16, kernel_size=3),
    dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1),
    dict(in_channels=8, out_channels=16, kernel_size=3, padding="same", dilation=2),
    dict(in_channels=8, out_channels=16, kernel_size=(2, 4), padding="same", padding_mode="replicate"),
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=1, groups=4),
    dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8, padding_mode="reflect"),  # depthwise
    dict(in_channels=8, out_channels=16, kernel_size=3, padding=(1, 2), padding_mode="circular", bias=False),
    dict(in_channels=8, out_channels=16, kernel_size=1),
    dict(in_channels=3, out_channels=16, kernel_size=7, stride=2, padding=3, bias=False),  # ResNet stem
]


def _pair(cfg, density=0.4, dtype=torch.float32, device="cpu", seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**cfg).to(device, dtype)
    mask = torch.rand(conv.weight.shape, device=device) < density
    with torch.no_grad():
        conv.weight.mul_(mask)
    return conv, mask, SparseConv2d.from_dense(conv, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_masked_dense(device, cfg):
    conv, mask, sparse = _pair(cfg, device=device)
    x = torch.randn(2, cfg["in_channels"], 13, 11, device=device)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = sparse(xs), conv(xd)
    assert ys.shape == yd.shape
    torch.testing.assert_close(ys, yd, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yd)
    ys.backward(g)
    yd.backward(g)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.values.grad, conv.weight.grad[mask], rtol=1e-4, atol=1e-4)
    if conv.bias is not None:
        torch.testing.assert_close(sparse.bias.grad, conv.bias.grad, rtol=1e-4, atol=1e-4)
    assert torch.equal(sparse.mask(), mask)
    assert torch.equal(sparse.weight, conv.weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    conv, _, sparse = _pair(CONFIGS[1], dtype=dtype)
    x = torch.randn(2, 8, 9, 9, dtype=dtype)
    tol = {torch.float16: 3e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(sparse(x), conv(x), rtol=tol, atol=tol)


def test_unbatched_input_and_round_trip():
    conv, mask, sparse = _pair(CONFIGS[0])
    x = torch.randn(8, 10, 10)
    torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)
    back = sparse.to_dense()
    assert isinstance(back, nn.Conv2d) and torch.equal(back.weight, conv.weight)
    torch.testing.assert_close(copy.deepcopy(sparse)(x), sparse(x))


def test_grouped_state_dict_round_trip_and_set_mask():
    conv, mask, sparse = _pair(CONFIGS[4], seed=2)
    fresh = SparseConv2d(8, 16, 3, padding=1, groups=4, sparsity=0.9)
    fresh.load_state_dict(sparse.state_dict())
    x = torch.randn(1, 8, 7, 7)
    torch.testing.assert_close(fresh(x), sparse(x))
    new = torch.rand(conv.weight.shape) < 0.2
    sparse.set_mask(new)
    assert torch.equal(sparse.mask(), new)
    torch.testing.assert_close(sparse(x), nn.functional.conv2d(x, conv.weight * new, conv.bias, padding=1, groups=4),
                               rtol=1e-5, atol=1e-5)


def test_constructor_sparsity():
    layer = SparseConv2d(16, 32, 3, padding=1, sparsity=0.75)
    assert layer.nnz == 16 * 32 * 9 // 4 and abs(layer.sparsity - 0.75) < 1e-12
    assert "sparsity=0.7500" in repr(layer)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: SparseConv2d(4, 4, 3), ValueError, "needs sparsity="),
    (lambda: SparseConv2d(4, 4, 3, sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    (lambda: SparseConv2d(4, 6, 3, groups=4, sparsity=0.5), ValueError, "divisible by groups"),
    (lambda: SparseConv2d(4, 4, 3, padding_mode="mirror", sparsity=0.5), ValueError, "padding_mode"),
    (lambda: SparseConv2d(4, 4, 3, mask=torch.ones(4, 4, 3, dtype=torch.bool)), ValueError, "mask has shape"),
    (lambda: SparseConv2d.from_dense(nn.Linear(2, 2)), TypeError, "expects an nn.Conv2d"),
    (lambda: SparseConv2d(4, 4, 3, sparsity=0.5)(torch.randn(1, 5, 8, 8)), ValueError, r"expects input \[N, 4, H, W\]"),
    (lambda: SparseConv2d(4, 4, 5, sparsity=0.5)(torch.randn(1, 4, 3, 3)), ValueError, "smaller than the kernel"),
    (lambda: SparseConv2d(4, 4, 3, sparsity=0.5)(torch.randn(1, 4, 8, 8).double()), TypeError, "input dtype"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
