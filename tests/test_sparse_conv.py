import copy

import pytest
import torch
from torch import nn

from pysparse import SparseConv2d
from pysparse.testing import assert_compiled_matches_eager, devices_for

DEVICES = devices_for("spmm", "spmm_t", "sddmm", "spmm_grad")

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


def _check_against_dense(conv, mask, sparse, x):
    """sparse(x) equals conv(x) (contiguous, as nn.Conv2d's output), and so do the input, values and bias
    gradients of one backward."""
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = sparse(xs), conv(xd)
    assert ys.shape == yd.shape and ys.is_contiguous()
    torch.testing.assert_close(ys, yd, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yd)
    ys.backward(g)
    yd.backward(g)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.values.grad, conv.weight.grad[mask], rtol=1e-4, atol=1e-4)
    if conv.bias is not None:
        torch.testing.assert_close(sparse.bias.grad, conv.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
# 143 output pixels per channel: im2col at batch 1 (grouped ones direct), direct at 4 (stride 1)
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_matches_masked_dense(device, batch, cfg):
    conv, mask, sparse = _pair(cfg, device=device)
    _check_against_dense(conv, mask, sparse, torch.randn(batch, cfg["in_channels"], 13, 11, device=device))
    assert torch.equal(sparse.mask(), mask)
    assert torch.equal(sparse.weight, conv.weight)


@pytest.mark.parametrize("groups", [1, 4, 8])
def test_grouped_convolutions_take_the_direct_kernel_at_few_output_pixels(groups, monkeypatch):
    """im2col would unfold every input channel for every output channel (groups times the columns a group reads):
    grouped and depthwise convolutions take the direct kernel at any output size; ungrouped ones im2col + spmm
    below DIRECT_MIN_OUTPUTS."""
    import pysparse.nn.conv as conv_module
    calls = []
    for name in ("layer_sparse_conv2d", "layer_linear"):
        op = getattr(conv_module.ops, name)
        monkeypatch.setattr(conv_module.ops, name, lambda *a, _op=op, _name=name: calls.append(_name) or _op(*a))
    conv, mask, sparse = _pair(dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=groups),
                               density=0.5)
    sparse.dense_below = 0.0
    assert 25 < conv_module.DIRECT_MIN_OUTPUTS and 1 - sparse.sparsity > conv_module.DIRECT_MAX_DENSITY
    _check_against_dense(conv, mask, sparse, torch.randn(1, 8, 5, 5))  # 25 output pixels
    assert calls == ["layer_linear" if groups == 1 else "layer_sparse_conv2d"]


@pytest.mark.parametrize("size", [4, 12])  # 2 x 16 output pixels: im2col + spmm; 2 x 144: the direct kernel
def test_output_is_contiguous_as_nn_conv2d_s(size):
    """A CNN flattens a convolution's output with x.view(x.size(0), -1): im2col's output, written [out, batch,
    ...] by spmm, once came back as a transposed view, which that view refused."""
    import pysparse.nn.conv as conv_module
    conv, _, sparse = _pair(dict(in_channels=8, out_channels=16, kernel_size=3, padding=1))
    sparse.dense_below = 0.0
    x = torch.randn(2, 8, size, size)
    assert (2 * size * size < conv_module.DIRECT_MIN_OUTPUTS) == (size == 4)
    y = sparse(x)
    assert y.is_contiguous()
    torch.testing.assert_close(y.view(2, -1), conv(x).view(2, -1), rtol=1e-5, atol=1e-5)


CL = torch.channels_last


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 4])  # im2col (ungrouped) at batch 1, the direct kernel at 4
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_channels_last_input_gives_nn_conv2d_s_memory_format(device, batch, cfg):
    """A channels-last input (model.to(memory_format=torch.channels_last), the CPU's fast format for torch's
    pooling and BatchNorm) gives the output in nn.Conv2d's format, channels-last where nn.Conv2d's is; the same
    values and gradients; and a channels-last output gradient gives a channels-last input gradient."""
    conv, mask, sparse = _pair(cfg, device=device)
    sparse.dense_below = 0.0
    x = torch.randn(batch, cfg["in_channels"], 13, 11, device=device).contiguous(memory_format=CL)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = sparse(xs), conv(xd)
    assert ys.is_contiguous(memory_format=CL) == yd.is_contiguous(memory_format=CL)
    assert ys.is_contiguous() == yd.is_contiguous()
    torch.testing.assert_close(ys, yd, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(yd).contiguous(memory_format=CL)
    ys.backward(g)
    yd.backward(g)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.values.grad, conv.weight.grad[mask], rtol=1e-4, atol=1e-4)


def test_channels_last_model_keeps_channels_last_through_sparse_layers():
    """A small CNN in channels-last: every sparse layer's output stays channels-last (so torch's max-pool takes
    its channels-last kernel, ~13x faster than its NCHW one on the CPU here), equal to the dense model's; and
    under torch.compile."""
    import pysparse
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    masks = pysparse.prune(dense, "magnitude", sparsity=0.9, scope="layer").masks
    sparse = pysparse.sparsify(copy.deepcopy(dense), masks, min_sparsity=0.0).to(memory_format=CL)
    assert sum(isinstance(m, SparseConv2d) for m in sparse.modules()) == 3
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=CL)
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=CL)))
             for m in sparse.modules() if isinstance(m, SparseConv2d)]
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
    assert seen == [True, True, True]
    for h in hooks:
        h.remove()
    assert_compiled_matches_eager(sparse, x.clone().requires_grad_(), torch.randn(4, 10))


@pytest.mark.parametrize("hw", [1, 5])
def test_pointwise_convolution_at_few_pixels_reads_its_input_as_im2col(hw, monkeypatch):
    """A 1 x 1 convolution's im2col is its input: below DIRECT_MIN_OUTPUTS (an SE block's 1 x 1 pixels) the layer
    hands it to spmm without F.unfold; output and gradients as nn.Conv2d's."""
    import pysparse.nn.conv as conv_module
    monkeypatch.setattr(conv_module.F, "unfold", lambda *a, **k: pytest.fail("unfold called"))
    conv, mask, sparse = _pair(dict(in_channels=12, out_channels=10, kernel_size=1), density=0.3)
    sparse.dense_below = 0.0
    assert 3 * hw * hw < conv_module.DIRECT_MIN_OUTPUTS
    _check_against_dense(conv, mask, sparse, torch.randn(3, 12, hw, hw))


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


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4]])
def test_loads_a_dense_state_dict_at_its_stored_places(cfg):
    """An nn.Conv2d's state dict (grouped too: a block-diagonal matrix) loads at the stored places."""
    torch.manual_seed(1)
    conv = nn.Conv2d(**cfg)
    mask = torch.rand(conv.weight.shape) < 0.3
    sparse = SparseConv2d.from_dense(nn.Conv2d(**cfg), mask)
    sparse.load_state_dict(conv.state_dict())
    assert torch.equal(sparse.mask(), mask) and torch.equal(sparse.weight.detach(), conv.weight.detach() * mask)
    x = torch.randn(2, cfg["in_channels"], 9, 9)
    with torch.no_grad():
        conv.weight.mul_(mask)
    torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4]])
def test_torch_fuse_conv_bn_eval_keeps_the_layer_sparse(cfg):
    """torch's fuse_conv_bn_eval assigns the folded weight and bias: the result is still sparse, same mask."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv, mask, sparse = _pair(cfg, seed=4)
    bn = nn.BatchNorm2d(cfg["out_channels"]).eval()
    with torch.no_grad():
        for t in (bn.running_mean, bn.weight, bn.bias):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    fused = fuse_conv_bn_eval(sparse.eval(), bn)
    assert isinstance(fused, SparseConv2d) and torch.equal(fused.mask(), mask) and fused.bias is not None
    x = torch.randn(2, cfg["in_channels"], 9, 9)
    torch.testing.assert_close(fused(x), bn(sparse(x)), rtol=1e-5, atol=1e-5)


def test_constructor_sparsity():
    layer = SparseConv2d(16, 32, 3, padding=1, sparsity=0.75)
    assert layer.nnz == 16 * 32 * 9 // 4 and abs(layer.sparsity - 0.75) < 1e-12
    assert "sparsity=0.7500" in repr(layer)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: SparseConv2d(4, 4, 3), ValueError, "needs sparsity="),
    (lambda: SparseConv2d(4, 4, 3, sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    (lambda: SparseConv2d(-1, 4, 3, sparsity=0.5), ValueError, "in_channels must be an int >= 0, got -1"),
    (lambda: SparseConv2d(4, True, 3, sparsity=0.5), ValueError, "out_channels must be an int >= 0, got True"),
    (lambda: SparseConv2d(4, 4, 3, groups=0, sparsity=0.5), ValueError, "groups must be an int >= 1, got 0"),
    (lambda: SparseConv2d(4, 6, 3, groups=4, sparsity=0.5), ValueError, "divisible by groups"),
    (lambda: SparseConv2d(4, 4, 3, padding_mode="mirror", sparsity=0.5), ValueError, "padding_mode"),
    (lambda: SparseConv2d(4, 4, 3, mask=torch.ones(4, 4, 3, dtype=torch.bool)), ValueError, "mask has shape"),
    (lambda: SparseConv2d.from_dense(nn.Linear(2, 2)), TypeError, "expects an nn.Conv2d"),
    (lambda: SparseConv2d(4, 4, 3, stride=0, sparsity=0.5), ValueError,
     r"SparseConv2d: stride must be an int >= 1 or a pair of them, got \(0, 0\)"),
    (lambda: SparseConv2d(4, 4, 3, dilation=(1, 0), sparsity=0.5), ValueError, "dilation must be an int >= 1"),
    (lambda: SparseConv2d(4, 4, 3, padding=-1, sparsity=0.5), ValueError, "padding must be an int >= 0"),
    (lambda: SparseConv2d(4, 4, 0, sparsity=0.5), ValueError, "kernel_size must be an int >= 1"),
    (lambda: SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, stride=(2, 0))), ValueError, "stride must be an int >= 1"),
    (lambda: SparseConv2d(4, 4, 3, sparsity=0.5)(torch.randn(1, 5, 8, 8)), ValueError, r"expects input \[N, 4, H, W\]"),
    (lambda: SparseConv2d(4, 4, 5, sparsity=0.5)(torch.randn(1, 4, 3, 3)), ValueError, "smaller than the kernel"),
    (lambda: SparseConv2d(4, 4, 3, sparsity=0.5)(torch.randn(1, 4, 8, 8).double()), TypeError, "input dtype"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) through the layer's C++ autograd node (padding passed to the op): the same
    output and gradients as eager."""
    torch.manual_seed(0)
    conv = SparseConv2d(3, 8, 3, padding=1, sparsity=0.5)
    assert_compiled_matches_eager(conv, torch.randn(4, 3, 6, 6, requires_grad=True), torch.randn(4, 8, 6, 6))


# ------------------------------------------------------------------------------- the sparse_conv2d op itself
from hypothesis import given, settings, strategies as st  # noqa: E402

import pysparse  # noqa: E402
from pysparse import csr, reference  # noqa: E402

OP_DEVICES = devices_for("sparse_conv2d", "sparse_conv2d_grad_input", "sparse_conv2d_grad_values")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-9, atol=1e-9),
       torch.float16: dict(rtol=5e-3, atol=5e-3), torch.bfloat16: dict(rtol=3e-2, atol=5e-2)}


def _conv_problem(n, c, o, h, w, kh, kw, density, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(o, c * kh * kw, generator=g) < density
    values, s = csr.compress(torch.randn(o, c * kh * kw, generator=g).to(dtype), mask)
    move = lambda t: t.to(device)  # noqa: E731
    s = csr.Structure(*(move(getattr(s, k)) for k in ("rowptr", "col", "t_rowptr", "t_col", "t_perm")), shape=s.shape)
    return move(values), s, torch.randn(n, c, h, w, generator=g).to(device, dtype), torch.randn(o, generator=g).to(
        device, dtype)


@pytest.mark.parametrize("device", OP_DEVICES)
@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 5), o=st.integers(1, 6),
       hw=st.tuples(st.integers(3, 12), st.integers(3, 12)), k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)), density=st.floats(0, 1),
       dtype=st.sampled_from(list(TOL)), use_bias=st.booleans(), channels_last=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_op_matches_reference(device, n, c, o, hw, k, stride, dilation, padding, density, dtype, use_bias,
                              channels_last, seed):
    h, w = hw
    if h + 2 * padding[0] < dilation[0] * (k[0] - 1) + 1 or w + 2 * padding[1] < dilation[1] * (k[1] - 1) + 1:
        return
    values, s, x, bias = _conv_problem(n, c, o, h, w, *k, density, dtype, device, seed)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    kw = dict(bias=bias if use_bias else None, kernel_size=k, stride=stride, dilation=dilation, padding=padding)
    got = pysparse.ops.sparse_conv2d(s.rowptr, s.col, values, x, **kw)
    torch.testing.assert_close(got, reference.sparse_conv2d(s.rowptr, s.col, values, x, **kw), **TOL[dtype])
    assert got.is_contiguous(memory_format=pysparse.ops._conv_format(x))


@pytest.mark.parametrize("device", OP_DEVICES)
def test_op_gradcheck_fp64(device):
    values, s, x, bias = _conv_problem(2, 3, 4, 7, 6, 3, 2, 0.5, torch.float64, device, 0)
    inputs = [t.clone().requires_grad_() for t in (values, x, bias)]
    fn = lambda v, xx, b: pysparse.ops.sparse_conv2d(s.rowptr, s.col, v, xx, bias=b, kernel_size=(3, 2),  # noqa
                                                     stride=(2, 1), dilation=(1, 2), padding=(1, 2),
                                                     transposed=s.transposed())
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", OP_DEVICES)
def test_op_opcheck(device):
    values, s, x, bias = _conv_problem(2, 3, 4, 9, 9, 3, 3, 0.5, torch.float32, device, 1)
    torch.library.opcheck(torch.ops.pysparse.sparse_conv2d.default,
                          (s.rowptr, s.col, values, x, bias, [3, 3], [1, 1], [1, 1], [0, 0], *s.transposed()))
    torch.library.opcheck(torch.ops.pysparse.sparse_conv2d.default,
                          (s.rowptr, s.col, values.clone().requires_grad_(), x.clone().requires_grad_(), None,
                           [3, 3], [2, 2], [1, 1], [1, 2], *s.transposed()))
    # channels-last x: the output's strides (channels-last) as the fake's
    torch.library.opcheck(torch.ops.pysparse.sparse_conv2d.default,
                          (s.rowptr, s.col, values.clone().requires_grad_(),
                           x.contiguous(memory_format=CL).requires_grad_(), bias, [3, 3], [2, 2], [1, 1], [1, 2],
                           *s.transposed()))
    # the layer's op: its C++ autograd node (CompositeImplicitAutograd over the op above)
    torch.library.opcheck(torch.ops.pysparse.layer_sparse_conv2d.default,
                          (s.rowptr, s.col, values.clone().requires_grad_(), x.clone().requires_grad_(),
                           bias.clone().requires_grad_(), [3, 3], [2, 2], [1, 1], [1, 2], *s.transposed()))


def test_op_bad_input():
    values, s, x, bias = _conv_problem(1, 2, 3, 6, 6, 3, 3, 0.5, torch.float32, "cpu", 2)
    bad = s.col.clone()
    bad[0] = 18
    with pytest.raises(ValueError, match="column index is outside"):
        pysparse.ops.sparse_conv2d(s.rowptr, bad, values, x, kernel_size=3)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        pysparse.ops.sparse_conv2d(s.rowptr, s.col, values, x[..., :2], kernel_size=3)
    with pytest.raises(ValueError, match="kernel_size must be"):
        pysparse.ops.sparse_conv2d(s.rowptr, s.col, values, x, kernel_size=0)
    with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\]"):
        pysparse.ops.sparse_conv2d(s.rowptr, s.col, values, x[0], kernel_size=3)
    with pytest.raises(TypeError, match="dtype"):
        pysparse.ops.sparse_conv2d(s.rowptr, s.col, values, x.double(), kernel_size=3)
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        pysparse.ops.sparse_conv2d(s.rowptr, s.col, values, x, kernel_size=3, padding=-1)
    with pytest.raises(ValueError, match="padding must be >= 0"):  # the kernel's own check
        torch.ops.pysparse.sparse_conv2d.default(s.rowptr, s.col, values, x, None, [3, 3], [1, 1], [1, 1], [0, -1])
    with pytest.raises(ValueError, match="below 2"):  # sizes whose products would overflow the index arithmetic
        torch.ops.pysparse.sparse_conv2d.default(s.rowptr, s.col, values, x, None, [3, 3], [1, 1], [1, 1],
                                                 [2 ** 40, 0])
    with pytest.raises(ValueError, match="below 2"):
        torch.ops.pysparse.sparse_conv2d.default(s.rowptr, s.col, values, x, None, [3, 3], [1, 1], [2 ** 33, 1],
                                                 [0, 0])
    with pytest.raises(ValueError, match="below 2"):  # the Python wrapper's own check
        pysparse.ops.sparse_conv2d(s.rowptr, s.col, values, x, kernel_size=3, padding=2 ** 40)
    # padding lets a plane smaller than the kernel through
    assert pysparse.ops.sparse_conv2d(s.rowptr, s.col, values, x[..., :2], kernel_size=3, padding=1).shape == (
        1, 3, 6, 2)


# ------------------------------------------------------------------ the direct backward: grad_input, grad_values
def _check_grads(device, n, c, o, h, w, k, stride, dilation, density, dtype, seed, padding=(0, 0), x_cl=False,
                 gy_cl=False):
    """x_cl / gy_cl: x / gy channels-last (the input gradient then follows gy's format)."""
    values, s, x, _ = _conv_problem(n, c, o, h, w, *k, density, dtype, device, seed)
    geo = dict(kernel_size=k, stride=stride, dilation=dilation, padding=padding)
    y = reference.sparse_conv2d(s.rowptr, s.col, values, x, **geo)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    x = x.contiguous(memory_format=CL) if x_cl else x.contiguous()
    gy = gy.contiguous(memory_format=CL) if gy_cl else gy.contiguous()
    want = reference.sparse_conv2d_grad_input(s.rowptr, s.col, values, gy, x.shape, **geo)
    dx = pysparse.ops.sparse_conv2d_grad_input(s.rowptr, s.col, values, gy, x.shape, transposed=s.transposed(), **geo)
    torch.testing.assert_close(dx, want, **TOL[dtype])
    assert dx.is_contiguous(memory_format=pysparse.ops._conv_format(gy))
    if device == "cpu":  # the CPU kernel also works from the CSR alone (it regroups the weights itself)
        dx = pysparse.ops.sparse_conv2d_grad_input(s.rowptr, s.col, values, gy, x.shape, **geo)
        torch.testing.assert_close(dx, want, **TOL[dtype])
    dv = pysparse.ops.sparse_conv2d_grad_values(s.rowptr, s.col, x, gy, **geo)
    tol = dict(TOL[dtype])
    if dtype in (torch.float16, torch.bfloat16):  # a sum over the batch and every output pixel, rounded once
        tol = dict(rtol=tol["rtol"] * 2, atol=tol["atol"] * 4)
    # float32: against the float64 reference; mkldnn's float32 weight gradient is itself off by up to ~2e-4 on
    # sums of ~5000 products (136 images of 6 x 6), which the kernel's float32 sums are not (3.5e-5)
    ref_dtype = torch.float64 if dtype == torch.float32 else dtype
    want = reference.sparse_conv2d_grad_values(s.rowptr, s.col, x.to(ref_dtype), gy.to(ref_dtype), **geo).to(dtype)
    torch.testing.assert_close(dv, want, **tol)


@pytest.mark.parametrize("device", OP_DEVICES)
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 4), c=st.integers(1, 5), o=st.integers(1, 6),
       hw=st.tuples(st.integers(3, 12), st.integers(3, 12)), k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.tuples(st.integers(0, 2), st.integers(0, 2)), density=st.floats(0, 1),
       dtype=st.sampled_from(list(TOL)), x_cl=st.booleans(), gy_cl=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_grad_ops_match_reference(device, n, c, o, hw, k, stride, dilation, padding, density, dtype, x_cl, gy_cl,
                                  seed):
    """Both gradients against torch.nn.grad.conv2d_input / conv2d_weight on the dense weight (x and gy in either
    memory format)."""
    h, w = hw
    if h + 2 * padding[0] < dilation[0] * (k[0] - 1) + 1 or w + 2 * padding[1] < dilation[1] * (k[1] - 1) + 1:
        return
    _check_grads(device, n, c, o, h, w, k, stride, dilation, density, dtype, seed, padding, x_cl, gy_cl)


# The CPU kernels interleave several images per run when planes are small and weights many (GAN shapes);
# these cases take that path with a partial last block of images, and the plain path beside it, with and
# without zero padding (written into the layouts by the kernels).
@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("case", [
    (10, 8, 6, 8, 8, (3, 3), (1, 1), (1, 1), 0.8, (1, 1)),   # 8x8 output: 7 images per run, the last block holds 3
    (40, 6, 5, 10, 10, (4, 4), (2, 2), (1, 1), 0.6, (0, 0)),  # stride 2 (phases) and 27 images per run: 27 + 13
    (40, 6, 5, 8, 8, (4, 4), (2, 2), (1, 1), 0.6, (1, 1)),    # the same, padded (a GAN discriminator's layer)
    (5, 3, 4, 11, 9, (3, 2), (2, 3), (2, 1), 0.7, (2, 1)),    # odd sizes, uneven phases, dilation, padding
    (3, 16, 4, 12, 12, (3, 3), (1, 1), (1, 1), 0.01, (0, 0)),  # few weights per input element: no interleaving
    (2, 4, 3, 40, 40, (3, 3), (2, 2), (1, 1), 0.5, (1, 1)),   # large planes: no interleaving, stride 2
    (2, 4, 3, 38, 37, (3, 3), (1, 1), (1, 1), 0.5, (1, 2)),   # large planes, stride 1: row copies around padding
    (2, 4, 3, 39, 37, (3, 3), (2, 2), (1, 1), 0.5, (2, 1)),   # stride 2, odd width, odd column padding
    (2, 4, 3, 37, 36, (5, 5), (3, 2), (1, 2), 0.5, (2, 2)),   # stride 3 x 2, dilation, even column padding
    (64, 8, 6, 6, 6, (3, 3), (1, 1), (1, 1), 0.8, (1, 1)),    # 12 images per run rounded up to 16 (aligned windows)
    (136, 4, 3, 8, 8, (3, 3), (1, 1), (1, 1), 0.8, (0, 0)),   # 16 per run again, the last block holds 8
    (136, 4, 3, 6, 6, (3, 3), (1, 1), (1, 1), 0.8, (1, 1)),   # the same, padded
    (64, 6, 5, 10, 10, (4, 4), (2, 2), (1, 1), 0.6, (0, 0)),  # stride 2: 27 per run rounded up to 32
    (3, 4, 16, 64, 64, (3, 3), (1, 1), (1, 1), 0.5, (1, 1)),   # gy of one image > 256 KB: unit blocks of one
    (3, 4, 128, 64, 64, (3, 3), (2, 2), (1, 1), 0.5, (1, 1)),  # the same with stride 2 (four phases)
    (40, 40, 24, 10, 10, (3, 3), (2, 2), (1, 1), 0.3, (1, 1)),  # 18 images per run: channels-last moves of 16
    # channels x 16 images, three channel blocks (the last partial), 16 + 2 images a run
], ids=["interleaved-padded", "interleaved-stride2", "interleaved-stride2-padded", "odd-padded", "sparse",
        "large-stride2-padded", "large-padded", "large-stride2-odd", "large-stride32-dilated", "aligned-padded",
        "aligned-partial", "aligned-partial-padded", "aligned-stride2", "unit-blocks", "unit-blocks-stride2",
        "channel-blocks-stride2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_grad_ops_layouts(device, case, dtype, channels_last):
    *geometry, padding = case
    _check_grads(device, *geometry, dtype, seed=3, padding=padding, x_cl=channels_last, gy_cl=channels_last)
    # and the forward on the same layouts
    values, s, x, bias = _conv_problem(*geometry[:5], *geometry[5], geometry[8], dtype, device, 4)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    kw = dict(bias=bias, kernel_size=geometry[5], stride=geometry[6], dilation=geometry[7], padding=padding)
    got = pysparse.ops.sparse_conv2d(s.rowptr, s.col, values, x, **kw)
    torch.testing.assert_close(got, reference.sparse_conv2d(s.rowptr, s.col, values, x, **kw), **TOL[dtype])
    assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)


def _check_pointwise_channels_last(n, c, o, h, w, stride, dtype, device, seed):
    """A 1 x 1 convolution (no padding) of a channels-last input: forward, input gradient (with and without W's
    transposed structure) and values gradient against the references, outputs channels-last. Returns (values,
    structure, x, gy)."""
    values, s, x, bias = _conv_problem(n, c, o, h, w, 1, 1, 0.4, dtype, device, seed)
    x = x.contiguous(memory_format=CL)
    geo = dict(kernel_size=1, stride=stride)
    y = pysparse.ops.sparse_conv2d(s.rowptr, s.col, values, x, bias=bias, **geo)
    assert y.is_contiguous(memory_format=CL) or y.is_contiguous()  # (both: one pixel)
    torch.testing.assert_close(y, reference.sparse_conv2d(s.rowptr, s.col, values, x, bias=bias, **geo), **TOL[dtype])
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    gy = gy.contiguous(memory_format=CL)
    want = reference.sparse_conv2d_grad_input(s.rowptr, s.col, values, gy, x.shape, **geo)
    for transposed in ([s.transposed()] + ([None] if device == "cpu" else [])):
        dx = pysparse.ops.sparse_conv2d_grad_input(s.rowptr, s.col, values, gy, x.shape, transposed=transposed, **geo)
        torch.testing.assert_close(dx, want, **TOL[dtype])
        assert dx.is_contiguous(memory_format=CL) or dx.is_contiguous()
    ref_dtype = torch.float64 if dtype == torch.float32 else dtype
    tol = TOL[dtype] if dtype not in (torch.float16, torch.bfloat16) else dict(rtol=TOL[dtype]["rtol"] * 2,
                                                                                atol=TOL[dtype]["atol"] * 4)
    torch.testing.assert_close(pysparse.ops.sparse_conv2d_grad_values(s.rowptr, s.col, x, gy, **geo),
                               reference.sparse_conv2d_grad_values(s.rowptr, s.col, x.to(ref_dtype),
                                                                   gy.to(ref_dtype), **geo).to(dtype), **tol)
    return values, s, x, gy


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("n,c,o,h,w", [(3, 37, 21, 5, 7), (1, 16, 16, 4, 4), (2, 5, 40, 3, 11), (1, 70, 3, 1, 1),
                                       (4, 16, 16, 12, 12), (2, 300, 200, 6, 5), (2, 20, 36, 9, 17),
                                       (3, 24, 20, 13, 17), (2, 400, 300, 9, 11)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_pointwise_channels_last(device, n, c, o, h, w, dtype):
    """A 1 x 1 convolution (stride 1, no padding) of a channels-last tensor: the CPU computes it on the pixels'
    [P, C] rows directly (16 pixels and up to 16 channels a block: partial blocks of pixels, input and output
    channels here; tiles of 16, 32 and 64 pixels by P and the thread count: 306 and 663 pixels end in partial
    tiles of 32 / 64 on two threads). Forward, input gradient (with and without W's transposed structure) and
    values gradient (a tile of pixels' panels: one partial tile, 576 pixels in tiles of 256, 60 in tiles of 32 (a
    thread's share), 198 of 700 channels in tiles of 64, the floor, the last one partial)
    against the references, outputs channels-last; a column index out of range raises."""
    values, s, x, gy = _check_pointwise_channels_last(n, c, o, h, w, (1, 1), dtype, device, 7)
    if device == "cpu" and s.col.numel():
        bad = s.col.clone()
        bad[-1] = c
        with pytest.raises(ValueError, match="column index is outside"):
            torch.ops.pysparse.sparse_conv2d.default(s.rowptr, bad, values, x, None, [1, 1], [1, 1], [1, 1], [0, 0])
        with pytest.raises(ValueError, match="column index is outside"):
            torch.ops.pysparse.sparse_conv2d_grad_input.default(s.rowptr, bad, values, gy, list(x.shape), [1, 1],
                                                                [1, 1], [1, 1], [0, 0])
        with pytest.raises(ValueError, match="column index is outside"):
            torch.ops.pysparse.sparse_conv2d_grad_values.default(s.rowptr, bad, x, gy, [1, 1], [1, 1], [1, 1], [0, 0])


@pytest.mark.parametrize("device", OP_DEVICES)
@pytest.mark.parametrize("n,c,o,h,w,stride", [(2, 37, 21, 9, 11, (2, 2)), (1, 16, 40, 7, 7, (2, 2)),
                                              (3, 24, 20, 13, 17, (1, 2)), (2, 20, 36, 10, 9, (3, 2)),
                                              (2, 400, 300, 14, 14, (2, 2)), (4, 8, 16, 40, 40, (2, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_strided_channels_last(device, n, c, o, h, w, stride, dtype):
    """A strided 1 x 1 convolution of a channels-last tensor (ResNet's downsampling shortcuts): the CPU computes it
    on the pixels it reads (odd sizes, whose last rows and columns it skips, one and two strides, tiles of 16, 32
    and 64 output pixels ending partial). Forward, input gradient (zero at the pixels not read) and values
    gradient against the references, outputs channels-last."""
    values, s, x, gy = _check_pointwise_channels_last(n, c, o, h, w, stride, dtype, device, 9)
    read = torch.zeros(h, w, dtype=torch.bool)
    read[::stride[0], ::stride[1]] = True
    for transposed in ([s.transposed()] + ([None] if device == "cpu" else [])):
        dx = pysparse.ops.sparse_conv2d_grad_input(s.rowptr, s.col, values, gy, x.shape, transposed=transposed,
                                                   kernel_size=1, stride=stride)
        assert not dx[:, :, ~read].any()


@pytest.mark.parametrize("device", OP_DEVICES)
def test_grad_ops_opcheck(device):
    values, s, x, _ = _conv_problem(3, 4, 5, 9, 8, 3, 3, 0.5, torch.float32, device, 4)
    gy = torch.randn(3, 5, 4, 3, device=device)
    torch.library.opcheck(torch.ops.pysparse.sparse_conv2d_grad_input.default,
                          (s.rowptr, s.col, values, gy, list(x.shape), [3, 3], [2, 2], [1, 1], [0, 0],
                           *s.transposed()))
    torch.library.opcheck(torch.ops.pysparse.sparse_conv2d_grad_values.default,
                          (s.rowptr, s.col, x, gy, [3, 3], [2, 2], [1, 1], [0, 0]))
    gy = torch.randn(3, 5, 5, 4, device=device)  # padding (1, 1)
    torch.library.opcheck(torch.ops.pysparse.sparse_conv2d_grad_input.default,
                          (s.rowptr, s.col, values, gy, list(x.shape), [3, 3], [2, 2], [1, 1], [1, 1],
                           *s.transposed()))
    torch.library.opcheck(torch.ops.pysparse.sparse_conv2d_grad_values.default,
                          (s.rowptr, s.col, x, gy, [3, 3], [2, 2], [1, 1], [1, 1]))
    # channels-last gy: a channels-last input gradient, as the fake says
    gy, x = gy.contiguous(memory_format=CL), x.contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.pysparse.sparse_conv2d_grad_input.default,
                          (s.rowptr, s.col, values, gy, list(x.shape), [3, 3], [2, 2], [1, 1], [1, 1],
                           *s.transposed()))
    torch.library.opcheck(torch.ops.pysparse.sparse_conv2d_grad_values.default,
                          (s.rowptr, s.col, x, gy, [3, 3], [2, 2], [1, 1], [1, 1]))


def test_grad_ops_bad_input():
    values, s, x, _ = _conv_problem(2, 2, 3, 6, 6, 3, 3, 0.5, torch.float32, "cpu", 5)
    gy = torch.randn(2, 3, 4, 4)
    gi = pysparse.ops.sparse_conv2d_grad_input
    gv = pysparse.ops.sparse_conv2d_grad_values
    with pytest.raises(ValueError, match="gy must be the convolution's output shape"):
        gi(s.rowptr, s.col, values, gy[:, :2], x.shape, kernel_size=3)
    with pytest.raises(ValueError, match="gy must be the convolution's output shape"):
        gv(s.rowptr, s.col, x, gy[..., :3], kernel_size=3)
    with pytest.raises(ValueError, match="x_size must be 4 ints"):
        gi(s.rowptr, s.col, values, gy, (2, 2, 6), kernel_size=3)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        gi(s.rowptr, s.col, values, gy, (2, 2, 2, 6), kernel_size=3)
    with pytest.raises(TypeError, match="gy must have the dtype and device of values"):
        gi(s.rowptr, s.col, values, gy.double(), x.shape, kernel_size=3)
    with pytest.raises(TypeError, match="gy must have the dtype and device of x"):
        gv(s.rowptr, s.col, x, gy.half(), kernel_size=3)
    with pytest.raises(ValueError, match="stride must be"):
        gv(s.rowptr, s.col, x, gy, kernel_size=3, stride=0)
    bad = s.col.clone()
    bad[0] = 18
    # The kernels themselves (called directly, past the Python checks) reject a bad index with an error.
    for b in (18, -1):
        bad[0] = b
        with pytest.raises(ValueError, match="column index is outside"):
            torch.ops.pysparse.sparse_conv2d.default(s.rowptr, bad, values, x, None, [3, 3], [1, 1], [1, 1], [0, 0])
    bad[0] = 18
    with pytest.raises(ValueError, match="column index is outside"):
        torch.ops.pysparse.sparse_conv2d_grad_input.default(s.rowptr, bad, values, gy, list(x.shape), [3, 3], [1, 1],
                                                            [1, 1], [0, 0])
    with pytest.raises(ValueError, match="column index is outside"):
        torch.ops.pysparse.sparse_conv2d_grad_values.default(s.rowptr, bad, x, gy, [3, 3], [1, 1], [1, 1], [0, 0])
    perm = s.t_perm.clone()
    perm[0] = 10 ** 6
    with pytest.raises(ValueError, match="t_perm entry of the transposed structure is out of range"):
        torch.ops.pysparse.sparse_conv2d_grad_input.default(s.rowptr, s.col, values, gy, list(x.shape), [3, 3], [1, 1],
                                                            [1, 1], [0, 0], s.t_rowptr, s.t_col, perm)
    with pytest.raises(ValueError, match="gy has shape"):
        torch.ops.pysparse.sparse_conv2d_grad_values.default(s.rowptr, s.col, x, gy[:1], [3, 3], [1, 1], [1, 1],
                                                             [0, 0])
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        gv(s.rowptr, s.col, x, gy, kernel_size=3, padding=(0, -2))
    with pytest.raises(ValueError, match="gy has shape"):  # padding changes the output shape gy must have
        torch.ops.pysparse.sparse_conv2d_grad_input.default(s.rowptr, s.col, values, gy, list(x.shape), [3, 3], [1, 1],
                                                            [1, 1], [1, 1], s.t_rowptr, s.t_col, s.t_perm)


@pytest.mark.parametrize("c,kernel,stride,dilation,padding,hw,density", [
    (16, 3, 1, 1, 1, (9, 11), 0.9), (48, 3, 2, 1, 1, (12, 13), 0.9), (37, 3, 2, 1, 0, (8, 9), 0.5),
    (24, 3, 1, 1, 1, (9, 11), 0.9),   # a pair of channel blocks, the second partial
    (16, 5, 1, 1, 2, (7, 7), 0.9), (32, (3, 5), (2, 1), (1, 2), (1, 3), (10, 9), 0.9),
    (16, 3, 1, 2, 3, (2, 3), 0.9),   # padding beyond the image: no column reads every tap
    (5, 3, 1, 1, 1, (6, 6), 0.4), (240, 5, 1, 1, 2, (6, 6), 0.1),   # small / sparse: the working layout
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, bias", [(1, True), (3, False)])
def test_depthwise_channels_last(c, kernel, stride, dilation, padding, hw, density, dtype, batch, bias):
    """A depthwise layer on a channels-last input: the CPU computes 16 channels of a pixel as one vector, reading
    x in place (or, where its blocks hold too many taps for the stored weights, through the working layout):
    partial channel blocks, strides, dilations, padding wider than the image, every dtype, against nn.Conv2d
    with the masked weight. Its input and values gradients too."""
    torch.manual_seed(11)
    conv = nn.Conv2d(c, c, kernel, stride, padding, dilation, groups=c, bias=bias)
    mask = torch.rand(conv.weight.shape) < density
    with torch.no_grad():
        conv.weight.mul_(mask)
    sparse = SparseConv2d.from_dense(conv, mask).to(dtype)
    conv = conv.to(dtype)
    x = torch.randn(batch, c, *hw).to(dtype).contiguous(memory_format=CL)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = sparse(xs), conv(xd)
    assert ys.is_contiguous(memory_format=CL)
    torch.testing.assert_close(ys, yd, **TOL[dtype])
    g = torch.randn_like(yd)
    ys.backward(g)
    yd.backward(g)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=TOL[dtype]["rtol"] * 2, atol=TOL[dtype]["atol"] * 4)
    torch.testing.assert_close(xs.grad, xd.grad, **tol)
    torch.testing.assert_close(sparse._dense_from(sparse.values.grad), conv.weight.grad * mask, **tol)


@pytest.mark.parametrize("c,kernel,stride,dilation,padding,hw,density", [
    (16, 3, 1, 1, 1, (9, 11), 0.1), (48, 5, 2, 1, 2, (14, 14), 0.1), (37, 3, 2, 1, 0, (8, 9), 0.5),
    (16, 5, 1, 1, 2, (7, 7), 0.9), (8, (3, 5), (2, 1), (1, 2), (1, 3), (10, 9), 0.5),
    (6, 3, 3, 1, 1, (20, 19), 0.5), (5, 3, 1, 2, 2, (40, 33), 1.0),   # stride 3 (any stride); 3 chunks a row
    (6, 3, 2, 1, 1, (20, 37), 0.5),   # stride 2, 19 output columns: a full chunk (both halves of 32 inputs) and 3
    (4, 3, 1, 1, 3, (9, 9), 0.5), (4, 3, 1, 2, 3, (2, 3), 0.9),   # padding beyond the kernel's reach / the image
    (4, (3, 5), 1, (2, 1), (1, 0), (9, 11), 0.5), (7, 3, 1, 1, 1, (1, 1), 0.5), (3, 5, 2, 1, 4, (4, 4), 0.5),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, bias", [(1, True), (3, False)])
def test_depthwise_nchw(c, kernel, stride, dilation, padding, hw, density, dtype, batch, bias):
    """A depthwise layer on an NCHW input: the CPU computes each (image, channel) plane from a zero-padded copy,
    16 output columns at a time, one multiply-add per stored tap (stride 2 through a permute, other strides lane by
    lane); the input gradient as the flipped stencil over gy at stride 1 (padding within the kernel's reach),
    else scattered (few taps a channel) or phase by phase; the values gradient per channel over every image. Partial and several 16-column chunks a
    row, strides 1-3, dilations, padding beyond the kernel's reach and beyond the image, channels without a
    stored tap, every dtype, against nn.Conv2d with the masked weight."""
    torch.manual_seed(14)
    conv = nn.Conv2d(c, c, kernel, stride, padding, dilation, groups=c, bias=bias)
    mask = torch.rand(conv.weight.shape) < density
    mask[0] = False  # a channel without a stored tap
    mask[-1].view(-1)[0] = True  # and one with
    _check_nchw(conv, mask, torch.randn(batch, c, *hw), dtype)


def _check_nchw(conv, mask, x, dtype):
    """conv's weight masked, as a SparseConv2d in dtype computing with its kernels at any sparsity, against conv on
    the NCHW input x: the output, the input gradient (both contiguous) and the values gradient."""
    with torch.no_grad():
        conv.weight.mul_(mask)
    sparse = SparseConv2d.from_dense(conv, mask).to(dtype)
    sparse.dense_below = 0.0
    conv = conv.to(dtype)
    x = x.to(dtype)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = sparse(xs), conv(xd)
    assert ys.is_contiguous()
    torch.testing.assert_close(ys, yd, **TOL[dtype])
    g = torch.randn_like(yd)
    ys.backward(g)
    yd.backward(g)
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=TOL[dtype]["rtol"] * 2, atol=TOL[dtype]["atol"] * 4)
    assert xs.grad.is_contiguous()
    torch.testing.assert_close(xs.grad, xd.grad, **tol)
    torch.testing.assert_close(sparse._dense_from(sparse.values.grad), conv.weight.grad * mask, **tol)


@pytest.mark.parametrize("cin,cout,groups,kernel,stride,dilation,padding,hw,density", [
    (8, 8, 2, 3, 1, 1, 1, (9, 11), 0.3), (12, 24, 3, 3, 2, 1, 1, (13, 12), 0.5),   # several channels a group
    (16, 8, 4, 5, 1, 1, 2, (7, 7), 0.5), (6, 12, 6, 3, 2, 1, 1, (10, 9), 0.7),       # depthwise with multiplier 2
    (8, 8, 4, (3, 5), (2, 1), (1, 2), (1, 3), (10, 9), 0.5), (6, 9, 3, 3, 3, 1, 1, (20, 19), 0.5),  # any stride
    (8, 4, 2, 3, 1, 2, 4, (5, 6), 0.5),   # padding beyond the kernel's reach (the input gradient scatters)
    (32, 32, 8, 3, 1, 1, 1, (14, 14), 0.1), (8, 8, 2, 3, 2, 1, 1, (40, 40), 0.3),   # several units a task / range
    (16, 16, 4, 3, 2, 1, 1, (12, 12), 0.02),  # under one weight an input channel: the strided input gradient scatters
    (64, 64, 2, 3, 1, 1, 1, (7, 7), 0.5),     # many weights a small plane: the working layout
    (8, 8, 2, 3, 2, 1, 1, (21, 45), 0.9), (6, 6, 6, 3, 2, 1, 2, (9, 70), 0.9),   # stride 2 by phase, several chunks a row
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, bias", [(1, True), (3, False)])
def test_grouped_nchw(cin, cout, groups, kernel, stride, dilation, padding, hw, density, dtype, batch, bias):
    """A grouped layer on an NCHW input: the CPU computes each image's group from its input planes, zero-padded
    side by side (a stored weight's offset names plane and tap), 16 output columns at a time; the input gradient
    as the flipped stencil over the group's gy planes at stride 1, else phase by phase (or scattered, with few
    weights an input channel); the values gradient group by group over the images, in ranges of whole groups or
    summed at the end; many weights on a small plane through the working layout. Output channels and whole groups
    without a stored weight, input channels none reads, depthwise multipliers, strides 1-3, dilations, against
    nn.Conv2d with the masked weight."""
    torch.manual_seed(15)
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups=groups, bias=bias)
    mask = torch.rand(conv.weight.shape) < density
    mask[0] = False  # an output channel without a stored weight
    mask[-(cout // groups):] = False  # a whole group without one
    mask[-(cout // groups) - 1].view(-1)[0] = True
    mask[:, -1] = False  # the last input channel of every group unread
    _check_nchw(conv, mask, torch.randn(batch, cin, *hw), dtype)


@pytest.mark.parametrize("blocks", [1, 2, 4, 5])
def test_ungrouped_layer_masked_block_diagonal(blocks):
    """An ungrouped layer whose mask keeps only the blocks of G groups computes as a grouped one on NCHW inputs
    (the kernels find the largest such G from the stored columns; 1 block: none); a single weight outside the
    blocks makes it ungrouped again. Both against nn.Conv2d, gradients too."""
    torch.manual_seed(16)
    conv = nn.Conv2d(20, 20, 3, padding=1)
    mask = torch.zeros(conv.weight.shape, dtype=torch.bool)
    for b in range(blocks):
        o, c = slice(b * 20 // blocks, (b + 1) * 20 // blocks), slice(b * 20 // blocks, (b + 1) * 20 // blocks)
        mask[o, c] = torch.rand(mask[o, c].shape) < 0.5
    for outside in (False, True):
        if outside:
            mask[3, 19, 1, 1] = True
        _check_nchw(copy.deepcopy(conv), mask, torch.randn(2, 20, 6, 7), torch.float32)


@pytest.mark.parametrize("cin,cout,kernel,stride,groups,density", [
    (64, 64, 1, 1, 1, 0.3),    # pointwise: output and input gradient 16 MB
    (64, 64, 1, 2, 1, 0.3),    # strided pointwise: the input gradient's rows by output pixel, the others zero
    (64, 64, 3, 1, 64, 0.1),   # depthwise, 16 channels of a pixel as one vector (forward and input gradient)
    (64, 64, 3, 2, 64, 0.1),   # the same at stride 2 (two new input rows a row, read ahead)
    (32, 64, 3, 1, 1, 0.1),    # through the working layout, back into channels-last
    (64, 48, 3, 2, 1, 0.1),    # the same at stride 2, 48 output channels
])
def test_channels_last_large_outputs(cin, cout, kernel, stride, groups, density):
    """Channels-last float32 outputs and input gradients larger than the threads' L2 caches together are written
    by streaming (non-temporal) stores, in 16-channel blocks (here 8-16 MB tensors: above that size on this
    project's machines), and the depthwise kernels prefetch the rows they read next. Forward and both gradients
    against nn.Conv2d with the masked weight."""
    torch.manual_seed(21)
    conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups)
    mask = torch.rand(conv.weight.shape) < density
    with torch.no_grad():
        conv.weight.mul_(mask)
    sparse = SparseConv2d.from_dense(conv, mask)
    sparse.dense_below = 0.0  # (the kernels at any sparsity)
    x = torch.randn(4, cin, 128, 128).contiguous(memory_format=CL)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = sparse(xs), conv(xd)
    assert ys.is_contiguous(memory_format=CL)
    torch.testing.assert_close(ys, yd, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(yd)
    ys.backward(g)
    yd.backward(g)
    assert xs.grad.is_contiguous(memory_format=CL)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse._dense_from(sparse.values.grad), conv.weight.grad * mask, rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pointwise", [False, True], ids=["depthwise", "pointwise"])
def test_half_channels_last_kernels_round_as_torch(dtype, pointwise):
    """The channels-last kernels load and store float16 / bfloat16 a vector at a time (16 channels, and a partial
    block of 4): a layer whose only stored weights are 1 at the centre tap of channel o's own input computes
    y = x + bias in float32 and rounds it once, to the same bits as torch's conversion of x.float() + bias.float()
    (round to nearest even; ties, values that overflow to inf, inf, NaN and subnormals among the inputs; with
    AVX512-BF16 a bfloat16 block without NaN or subnormals takes one conversion instruction, the others the
    integer rounding)."""
    c = 20
    if pointwise:
        conv = nn.Conv2d(c, c, 1)
        mask = torch.eye(c, dtype=torch.bool)[:, :, None, None]
    else:
        conv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        mask = torch.zeros(c, 1, 3, 3, dtype=torch.bool)
        mask[:, 0, 1, 1] = True
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():
        conv.weight.copy_(mask.float())
        conv.bias.copy_(torch.randn(c, generator=gen))
        conv.bias[[2, 17]] = 0.0  # subnormal outputs in a full and in a partial block of channels
    sparse = SparseConv2d.from_dense(conv, mask).to(dtype)
    sparse.dense_below = 0.0
    x = torch.randn(2, c, 12, 12, generator=gen).to(dtype)
    big = torch.finfo(dtype).max
    x[0, :, 0, 0] = torch.tensor([float("nan"), float("inf"), -float("inf"), big, -big] * 4, dtype=dtype)
    x = x.contiguous(memory_format=CL)
    bias = sparse.bias.detach()
    # ties: bias + x exactly halfway between two representable values (x = one ulp of the bias / 2, both signs)
    ulp = bias.float().abs() * torch.finfo(dtype).eps
    x[1, :, 2, 3] = (ulp / 2 * torch.tensor([1.0, -1.0] * 10)).to(dtype)
    x[1, :, 2, 4] = (ulp * 1.5).to(dtype)
    tiny = torch.finfo(dtype).tiny
    x[1, [2, 17], 7, 7] = torch.tensor([tiny / 4, -tiny * 3 / 8], dtype=dtype)
    assert (x[1, [2, 17], 7, 7] != 0).all()
    with torch.no_grad():
        y = sparse(x)
    want = (x.float() + bias.float()[:, None, None]).to(dtype)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int16), want[~nan].view(torch.int16))


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("diagonal", [True, False])
def test_ungrouped_layer_whose_rows_read_their_own_channel(diagonal, layout):
    """An ungrouped C -> C layer whose row o keeps only taps of input channel o is a depthwise one: the kernels
    (channels-last and NCHW) may take it as one (and must not when a row reads another channel)."""
    torch.manual_seed(12)
    conv = nn.Conv2d(20, 20, 3, padding=1)
    mask = torch.zeros(conv.weight.shape, dtype=torch.bool)
    for o in range(20):
        mask[o, o] = torch.rand(3, 3) < 0.7
    if not diagonal:
        mask[3, 7, 1, 1] = True
    with torch.no_grad():
        conv.weight.mul_(mask)
    sparse = SparseConv2d.from_dense(conv, mask)
    sparse.dense_below = 0.0
    x = torch.randn(2, 20, 6, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    torch.testing.assert_close(sparse(x), conv(x), rtol=1e-5, atol=1e-5)
    bad = sparse.col.clone()
    bad[-1] = 20 * 9
    with pytest.raises(ValueError, match="column index is outside"):
        torch.ops.pysparse.sparse_conv2d.default(sparse.rowptr, bad, sparse.values, x, None, [3, 3], [1, 1], [1, 1],
                                                 [1, 1])
