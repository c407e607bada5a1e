"""The sparse layers' dense path: below ``dense_below`` sparsity they compute with a dense copy of their weight
built from the stored values (torch's dense kernels), with the same results and gradients as the sparse kernels
and as the masked dense layer; storage stays sparse."""
import copy
import pickle

import pytest
import torch
from torch import nn

import pysparse
from pysparse.testing import DEVICES, assert_compiled_matches_eager, autograd_nodes

SPARSE_FNS = ("pysparse::LinearFunction", "pysparse::Conv2dFunction")  # the layers' C++ autograd nodes


VIEWS = ("TransposeBackward0", "ViewBackward0", "UnsafeViewBackward0", "SelectBackward0",
         "CloneBackward0",  # .contiguous() of im2col's transposed output
         "ReshapeAliasBackward0", "TBackward0")


def _sparse_path(y: torch.Tensor) -> bool:
    """Whether y came out of the sparse kernels (their autograd nodes, possibly behind views)."""
    return any(name in node for node in autograd_nodes(y, through=VIEWS) for name in SPARSE_FNS)


def _masked(dense: nn.Module, sparsity: float, seed: int = 0) -> torch.Tensor:
    mask = torch.rand(dense.weight.shape, generator=torch.Generator().manual_seed(seed)) >= sparsity
    with torch.no_grad():
        dense.weight.mul_(mask)
    return mask


def _check_step(layer: nn.Module, dense: nn.Module, mask: torch.Tensor, x: torch.Tensor, tol: float = 1e-5) -> None:
    """layer's output and gradients (input, bias, stored values) equal the masked dense layer's."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, want = layer(x1), dense(x2)
    torch.testing.assert_close(y, want, rtol=tol, atol=tol)
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(layer.values.grad, dense.weight.grad[mask], rtol=tol, atol=tol)
    if dense.bias is not None:
        torch.testing.assert_close(layer.bias.grad, dense.bias.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.24])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_below_the_crossover(sparsity, bias):
    torch.manual_seed(0)
    dense = nn.Linear(37, 23, bias=bias)
    mask = _masked(dense, sparsity)
    layer = pysparse.SparseLinear.from_dense(dense, mask)
    assert layer.dense_below == pysparse.SparseLinear.DENSE_BELOW == 0.25
    x = torch.randn(4, 9, 37)  # 36 rows: at least DENSE_MIN_BATCH
    assert not _sparse_path(layer(x.requires_grad_()))
    _check_step(layer, dense, mask, x.detach())
    assert layer.nnz == int(mask.sum())  # storage stays sparse


def test_linear_default_switch_needs_more_than_32_rows():
    """On the CPU the default switch takes the dense path only for inputs of at least DENSE_MIN_BATCH rows
    (leading dimensions flattened); a dense_below set on the layer is obeyed at every batch."""
    torch.manual_seed(0)
    dense = nn.Linear(40, 30)
    mask = _masked(dense, 0.1)
    layer = pysparse.SparseLinear.from_dense(dense, mask)
    assert pysparse.SparseLinear.DENSE_MIN_BATCH == 33
    for shape, sparse in (((32, 40), True), ((33, 40), False), ((3, 11, 40), False), ((2, 16, 40), True),
                          ((40,), True)):
        x = torch.randn(*shape)
        assert _sparse_path(layer(x)) == sparse, shape
        _check_step(layer, dense, mask, x)
        layer.values.grad = dense.weight.grad = dense.bias.grad = layer.bias.grad = None
    layer.dense_below = 0.25  # explicit: dense at every batch
    assert not _sparse_path(layer(torch.randn(2, 40)))
    conv = pysparse.SparseConv2d(3, 4, 3, sparsity=0.3)  # convolutions: no batch condition
    assert conv.DENSE_MIN_BATCH == 0 and not _sparse_path(conv(torch.randn(1, 3, 5, 5)))


def test_linear_at_and_above_the_crossover_uses_the_kernels():
    torch.manual_seed(0)
    layer = pysparse.SparseLinear(64, 64, sparsity=0.25)
    assert _sparse_path(layer(torch.randn(4, 64)))
    layer.dense_below = 0.3
    assert not _sparse_path(layer(torch.randn(4, 64)))
    layer.dense_below = 0.0
    assert _sparse_path(layer(torch.randn(4, 64)))


CONV_CASES = {
    "plain": dict(),
    "stride2": dict(stride=2, padding=1),
    "same-dilated": dict(padding="same", dilation=2),
    "grouped": dict(groups=2, padding=1),
    "depthwise": dict(groups=4, padding=1),
    "reflect": dict(padding=1, padding_mode="reflect"),
    "circular-asymmetric": dict(padding=(1, 2), padding_mode="circular"),
    "no-bias": dict(bias=False, padding=1),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_below_the_crossover(case):
    torch.manual_seed(0)
    kwargs = CONV_CASES[case]
    dense = nn.Conv2d(4, 8, 3, **kwargs)
    mask = _masked(dense, 0.4)
    layer = pysparse.SparseConv2d.from_dense(dense, mask)
    assert layer.dense_below == pysparse.SparseConv2d.DENSE_BELOW == 0.7
    x = torch.randn(2, 4, 9, 10)
    # grouped / depthwise layers keep the kernels (torch's CPU grouped convolution is slower than them)
    assert _sparse_path(layer(x)) == (dense.groups > 1)
    _check_step(layer, dense, mask, x)
    # the sparse kernels give the same
    kernels = copy.deepcopy(layer)
    kernels.dense_below = 0.0
    assert _sparse_path(kernels(x))
    torch.testing.assert_close(kernels(x), layer(x), rtol=1e-5, atol=1e-5)


def test_conv_unbatched_and_bad_input_on_the_dense_path():
    torch.manual_seed(0)
    layer = pysparse.SparseConv2d(3, 5, 3, padding=1, sparsity=0.2)
    x = torch.randn(3, 6, 6)
    torch.testing.assert_close(layer(x), layer(x[None])[0])
    with pytest.raises(ValueError, match=r"expects input \[N, 3, H, W\]"):
        layer(torch.randn(2, 4, 6, 6))
    with pytest.raises(ValueError, match="smaller than the kernel's reach"):
        pysparse.SparseConv2d(3, 5, 5, sparsity=0.2)(torch.randn(1, 3, 3, 3))
    with pytest.raises(TypeError, match="input dtype"):
        layer(torch.randn(1, 3, 6, 6, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_spectral_norm_on_the_dense_path(kind):
    """Spectral norm divides the values by the same sigma on both paths (one power iteration per training
    forward, from the same state)."""
    torch.manual_seed(0)
    layer = pysparse.SparseLinear(20, 12, sparsity=0.1) if kind == "linear" else \
        pysparse.SparseConv2d(4, 6, 3, padding=1, sparsity=0.3)
    pysparse.nn.spectral_norm(layer)
    kernels = copy.deepcopy(layer)
    kernels.dense_below = 0.0
    x = torch.randn(64, 20) if kind == "linear" else torch.randn(2, 4, 7, 7)
    y, want = layer(x), kernels(x)
    assert not _sparse_path(y) and _sparse_path(want)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(layer.values.grad, kernels.values.grad, rtol=1e-5, atol=1e-5)


def test_switches_as_the_layer_is_pruned():
    """Gradual pruning moves a layer across the crossover: the next forward takes the sparse kernels."""
    torch.manual_seed(0)
    layer = pysparse.SparseConv2d(8, 8, 3, padding=1, sparsity=0.5)
    x = torch.randn(2, 8, 6, 6)
    assert not _sparse_path(layer(x))
    keep = torch.rand(layer.nnz, generator=torch.Generator().manual_seed(1)) >= 0.7  # to ~85%
    layer.prune_values_(keep)
    assert layer.sparsity > layer.dense_below
    y = layer(x)
    assert _sparse_path(y)
    torch.testing.assert_close(y, layer.to_dense()(x), rtol=1e-5, atol=1e-5)


def test_dense_below_checks_and_travels():
    layer = pysparse.SparseLinear(8, 4, sparsity=0.1)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="dense_below"):
            layer.dense_below = bad
    with pytest.raises(TypeError, match="dense_below"):
        layer.dense_below = "0.5"
    layer.dense_below = 0.05  # set on the layer: copies keep it, the state dict does not carry it
    assert copy.deepcopy(layer).dense_below == 0.05
    assert pickle.loads(pickle.dumps(layer)).dense_below == 0.05
    assert "dense_below" not in " ".join(layer.state_dict())
    assert pysparse.SparseLinear(8, 4, sparsity=0.1).dense_below == 0.25


@pytest.mark.parametrize("device", DEVICES)
def test_default_crossover_follows_the_device(device, monkeypatch):
    """A layer without its own dense_below takes its type's default for the device its values are on
    (DENSE_BELOW on the CPU, DENSE_BELOW_CUDA on CUDA); one set on the layer holds on both."""
    monkeypatch.setattr(pysparse.SparseLinear, "DENSE_BELOW", 0.3)
    monkeypatch.setattr(pysparse.SparseLinear, "DENSE_BELOW_CUDA", 0.6)
    torch.manual_seed(0)
    layer = pysparse.SparseLinear(64, 32, sparsity=0.5, device=device)
    x = torch.randn(4, 64, device=device)
    on_cuda = device == "cuda"
    assert layer.dense_below == (0.6 if on_cuda else 0.3)
    assert _sparse_path(layer(x)) != on_cuda
    moved = copy.deepcopy(layer).to("cpu")
    assert moved.dense_below == 0.3 and _sparse_path(moved(x.cpu()))
    layer.dense_below = 0.55
    assert layer.dense_below == 0.55 and not _sparse_path(layer(x))
    conv = pysparse.SparseConv2d(4, 8, 3, sparsity=0.9, device=device)
    assert conv.dense_below == (pysparse.SparseConv2d.DENSE_BELOW_CUDA if on_cuda else 0.7)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_compiled_dense_path_matches_eager(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = pysparse.SparseLinear(16, 8, sparsity=0.1), torch.randn(64, 16, requires_grad=True)
        grad = torch.randn(64, 8)
    else:
        layer, x = pysparse.SparseConv2d(3, 4, 3, padding=1, sparsity=0.3), torch.randn(2, 3, 5, 5, requires_grad=True)
        grad = torch.randn(2, 4, 5, 5)
    fresh = copy.deepcopy(layer)  # compiled before any eager call
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fresh, fullgraph=True)(x), layer(x))
    assert not _sparse_path(layer(x))
    assert_compiled_matches_eager(layer, x, grad)


@pytest.mark.parametrize("case", ["rgb-3x3-s2", "rgb-4x4-s4", "rgb-7x7-s2", "pointwise", "grouped", "nchw",
                                  "set-dense-below"])
def test_few_channel_layers_on_channels_last_inputs_compute_dense(case):
    """On the CPU, an ungrouped layer (not 1 x 1) with fewer than SMALL_CL_COLUMNS weights per output channel
    (the 3 x 3 stems on RGB images, ConvNeXt's 4 x 4 patchify) computes dense on a channels-last input at any
    sparsity, where torch's kernels beat the sparse ones (moving a 3-channel channels-last input into their
    working layout costs more than the few products); wider stems (ResNet's 7 x 7), 1 x 1 and grouped layers, NCHW
    inputs and a dense_below set on the layer keep the kernels. Either way: nn.Conv2d's results, gradients and
    memory format."""
    torch.manual_seed(0)
    cin, cout, k, s, groups = {"rgb-3x3-s2": (3, 16, 3, 2, 1), "rgb-4x4-s4": (3, 8, 4, 4, 1),
                               "rgb-7x7-s2": (3, 8, 7, 2, 1), "pointwise": (16, 8, 1, 1, 1),
                               "grouped": (6, 6, 3, 1, 3)}.get(case, (3, 16, 3, 2, 1))
    dense = nn.Conv2d(cin, cout, k, stride=s, padding=k // 2, groups=groups)
    mask = _masked(dense, 0.9)
    layer = pysparse.SparseConv2d.from_dense(dense, mask)
    if case == "set-dense-below":
        layer.dense_below = 0.7  # the class default, but set: obeyed as set
    fmt = torch.contiguous_format if case == "nchw" else torch.channels_last
    x = torch.randn(2, cin, 16, 16).contiguous(memory_format=fmt)
    y = layer(x)
    assert _sparse_path(y) == (case not in ("rgb-3x3-s2", "rgb-4x4-s4"))  # 27 and 48 weights per output: dense
    assert y.is_contiguous(memory_format=fmt)
    dense = dense.to(memory_format=fmt)
    _check_step(layer, dense, mask, x)
    x1 = x.clone().requires_grad_()
    layer(x1).sum().backward()
    assert x1.grad.is_contiguous(memory_format=fmt)
