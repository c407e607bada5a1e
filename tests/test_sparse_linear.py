import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pysparse
from pysparse import SparseLinear
from pysparse.testing import assert_compiled_matches_eager, devices_for, ops_called

DEVICES = devices_for("spmm", "spmm_t", "sddmm", "spmm_grad")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=3e-2)}


def _pair(in_f, out_f, density, dtype=torch.float32, device="cpu", bias=True, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_f, out_f, bias=bias).to(device, dtype)
    mask = torch.rand(out_f, in_f, device=device) < density
    with torch.no_grad():
        dense.weight.mul_(mask)
    return dense, mask, SparseLinear.from_dense(dense, mask)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("lead", [(), (1,), (7,), (3, 5), (2, 0)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_masked_dense(device, dtype, lead, bias):
    dense, mask, sparse = _pair(37, 29, 0.3, dtype, device, bias)
    x = torch.randn(*lead, 37, device=device, dtype=dtype)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = sparse(xs), dense(xd)
    assert ys.shape == yd.shape == (*lead, 29)
    torch.testing.assert_close(ys, yd, **TOL[dtype])
    g = torch.randn_like(yd)
    ys.backward(g)
    yd.backward(g)
    torch.testing.assert_close(xs.grad, xd.grad, **TOL[dtype])
    torch.testing.assert_close(sparse.values.grad, dense.weight.grad[mask], **TOL[dtype])
    if bias:
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind, batch", [("linear", 5), ("linear", 40), ("conv", 4), ("im2col", 1)])
@pytest.mark.parametrize("wanted", ["values", "x", "bias", "values+x", "values+bias", "x+bias", "values+x+bias"])
def test_gradients_of_any_subset(device, kind, batch, wanted):
    """The layers' autograd nodes compute what is asked and only that: every subset of values / input / bias
    needing a gradient (each takes its own way through the backward ops: spmm_grad, sddmm or spmm_t alone, the
    bias's sum), against the masked dense layer; the others get none."""
    torch.manual_seed(0)
    if kind == "linear":
        dense, x = nn.Linear(24, 16).to(device), torch.randn(batch, 24, device=device)
    else:  # 9 x 9 output pixels: the direct kernel at batch 4, im2col (+ spmm) at batch 1
        dense, x = nn.Conv2d(3, 8, 3, padding=1).to(device), torch.randn(batch, 3, 9, 9, device=device)
    mask = torch.rand(dense.weight.shape, device=device) < 0.4
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = pysparse.sparsify(nn.Sequential(copy.deepcopy(dense)), min_sparsity=0)[0]
    sparse.dense_below = 0
    if kind == "im2col":
        assert x.shape[0] * 81 < pysparse.nn.conv.DIRECT_MIN_OUTPUTS
    wanted = wanted.split("+")
    grads = []
    for layer, weight in ((sparse, sparse.values), (dense, dense.weight)):
        weight.requires_grad_("values" in wanted)
        layer.bias.requires_grad_("bias" in wanted)
        xi = x.clone().requires_grad_("x" in wanted)
        layer(xi).pow(2).sum().backward()
        grads.append((weight.grad, xi.grad, layer.bias.grad))
    (gv, gx, gb), (dw, dx, db) = grads
    for name, mine, ref in (("values", gv, dw), ("x", gx, dx), ("bias", gb, db)):
        if name not in wanted:
            assert mine is None
            continue
        torch.testing.assert_close(mine, ref[mask] if name == "values" else ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_op_opcheck(device, bias):
    """The layer's op (its C++ autograd node) passes torch.library.opcheck: schema, autograd registration, fake
    tensors, AOT dispatch (torch.compile's path through the node)."""
    dense, _, sparse = _pair(24, 16, 0.4, device=device, bias=bias)
    x = torch.randn(5, 24, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.pysparse.layer_linear.default,
                          (sparse.rowptr, sparse.col, sparse.values, x, sparse.bias, sparse.t_rowptr, sparse.t_col,
                           sparse.t_perm))


def test_layer_ops_refuse_bad_arguments():
    """The layers' ops check what their C++ nodes rely on (the kernels they call check the rest)."""
    layer = SparseLinear(16, 8, sparsity=0.5)
    structure = (layer.t_rowptr, layer.t_col, layer.t_perm)
    for x in (torch.randn(16), torch.randn(2, 4, 16)):
        with pytest.raises(ValueError, match="layer_linear: x must be 2-D"):
            torch.ops.pysparse.layer_linear.default(layer.rowptr, layer.col, layer.values, x, None, *structure)
    conv = pysparse.SparseConv2d(3, 4, 3, sparsity=0.5)
    with pytest.raises(ValueError, match="layer_sparse_conv2d: kernel_size must have 2 entries, got 3"):
        torch.ops.pysparse.layer_sparse_conv2d.default(conv.rowptr, conv.col, conv.values, torch.randn(1, 3, 6, 6),
                                                       None, [3, 3, 3], [1, 1], [1, 1], [0, 0], None, None, None)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_backward_computes_only_what_is_asked(kind):
    """autograd.grad(y, x) (a gradient penalty's first step) runs the input-gradient op alone, grad w.r.t. the
    values their op alone, though both require gradients: the layers' nodes ask the running backward, not
    requires_grad."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = SparseLinear(24, 16, sparsity=0.6), torch.randn(5, 24, requires_grad=True)
        ops = {"x": "pysparse::spmm_t", "values": "pysparse::sddmm", "both": "pysparse::spmm_grad"}
    else:
        layer, x = pysparse.SparseConv2d(3, 8, 3, sparsity=0.6), torch.randn(4, 3, 9, 9, requires_grad=True)
        ops = {"x": "pysparse::sparse_conv2d_grad_input", "values": "pysparse::sparse_conv2d_grad_values"}
    layer.dense_below = 0
    for wrt, inputs in (("x", [x]), ("values", [layer.values]), ("both", [x, layer.values])):
        y = layer(x).sum()
        with ops_called() as called:
            torch.autograd.grad(y, inputs)
        expected = {ops[k] for k in (("x", "values") if wrt == "both" and kind == "conv" else (wrt,))}
        assert {name for name in called if name.startswith("pysparse::")} == expected


@pytest.mark.parametrize("device", DEVICES)
def test_chained_layers_and_noncontiguous_input(device):
    torch.manual_seed(1)
    a = SparseLinear(20, 30, sparsity=0.5).to(device)
    b = SparseLinear(30, 10, sparsity=0.7).to(device)
    strided = torch.randn(6, 40, device=device)[:, ::2]        # every other feature: a strided view
    transposed = torch.randn(20, 6, device=device).t()          # the layout the kernel reads without a copy
    for x in (strided, transposed):
        out = b(torch.relu(a(x)))
        ref = F.linear(torch.relu(F.linear(x, a.weight, a.bias)), b.weight, b.bias)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _copies_in_step(model, x, g):
    """The aten::copy_ calls (every contiguous(), clone() and copy_() ends in one) of one forward + backward, each
    named by its outermost caller, and on CUDA the launches of the kernels' own transposing copy (csrc/cuda/spmm.cu,
    transpose_kernel)."""
    from torch.profiler import ProfilerActivity, profile
    model(x).mul(g).sum().backward()  # warm: the layers build their transposed structures in the first step
    cuda = x.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        model(x).mul(g).sum().backward()
        if cuda:
            torch.cuda.synchronize()
    callers, transposes = [], 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            transposes += "transpose_kernel" in e.name
        elif e.name == "aten::copy_":
            while e.cpu_parent is not None:
                e = e.cpu_parent
            callers.append(e.name)
    return callers, transposes


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", [nn.ReLU, nn.Hardswish, nn.ReLU6, nn.SiLU])
def test_inplace_activation_after_the_layer_trains(device, act):
    """Linear -> ReLU(inplace=True), as in VGG's, AlexNet's and MobileNetV3's classifiers: the layer's output (a
    transposed view of the kernel's [features, batch] result) may be modified in place while autograd records (it
    raised: a view made inside a custom Function), and the gradients are the dense twin's."""
    torch.manual_seed(3)
    sparse = nn.Sequential(SparseLinear(24, 32, sparsity=0.8), act(inplace=True), SparseLinear(32, 6, sparsity=0.5),
                           act(inplace=True), nn.Linear(6, 3)).to(device)
    dense = copy.deepcopy(sparse)
    dense[0], dense[2] = sparse[0].to_dense(), sparse[2].to_dense()
    x = torch.randn(10, 24, device=device)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    ys, yd = sparse(xs), dense(xd)
    torch.testing.assert_close(ys, yd, rtol=1e-5, atol=1e-5)
    ys.square().sum().backward()
    yd.square().sum().backward()
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-5, atol=1e-5)
    for i in (0, 2):
        torch.testing.assert_close(sparse[i].values.grad, dense[i].weight.grad[sparse[i].mask()], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse[i].bias.grad, dense[i].bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_chained_training_step_copies_no_activation(device):
    # The kernels' layout is [features, batch]; a SparseLinear hands on transposed views of it (outputs and input
    # gradients), so that a chain reads them in place. The CPU kernels pack through any strides: no copy. CUDA's
    # read batch-contiguous rows, and copy the batch-major ends of the chain by their own tiled transpose, no
    # aten::copy_: the input in the first layer's forward and again in its backward (the node keeps x's view, as
    # nn.Linear keeps x), the loss's batch-major gradient in the last layer's backward, and the input's gradient
    # back into x's layout where x wants one; nothing between the layers.
    torch.manual_seed(2)
    model = nn.Sequential(SparseLinear(48, 40, sparsity=0.8), nn.ReLU(), SparseLinear(40, 24, sparsity=0.8),
                          nn.ReLU(), SparseLinear(24, 8, sparsity=0.8)).to(device)
    x = torch.randn(16, 48, device=device)
    g = torch.randn(16, 8, device=device)
    copies = _copies_in_step(model, x, g)
    assert (len(copies[0]), copies[1]) == (0, 0 if device == "cpu" else 3), copies
    xg = x.clone().requires_grad_()  # the input's gradient too: the first layer's spmm_grad, in x's layout
    copies = _copies_in_step(model, xg, g)
    assert (len(copies[0]), copies[1]) == (0, 0 if device == "cpu" else 4), copies
    ref = [nn.Linear(m.in_features, m.out_features).to(device) for m in model[::2]]
    for r, m in zip(ref, model[::2]):
        r.weight.data.copy_(m.weight)
        r.bias.data.copy_(m.bias)
    xr = x.clone().requires_grad_()
    out = ref[2](torch.relu(ref[1](torch.relu(ref[0](xr)))))
    (out * g).sum().backward()
    xg.grad = None
    (model(xg) * g).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_input_changed_in_place_after_the_forward_is_refused(device):
    """The layer keeps its input for the values gradient as nn.Linear does (a view of x, no copy, on every device):
    changing x in place between the forward and the backward is autograd's error for both, never a gradient of
    the wrong x."""
    torch.manual_seed(5)
    sparse = SparseLinear(12, 7, sparsity=0.6).to(device)
    sparse.dense_below = 0.0  # the kernels' path
    for layer in (sparse, nn.Linear(12, 7).to(device)):
        x = torch.randn(4, 12, device=device)
        y = layer(x)
        x.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_functional_call_swaps_the_values():
    # The forward reads ``values`` from _parameters (no nn.Module.__getattr__): torch.func.functional_call's
    # swapped tensor must be the one it computes with, on the kernels' path and the dense one.
    torch.manual_seed(4)
    layer = SparseLinear(16, 8, sparsity=0.5)
    x = torch.randn(4, 16)
    other = torch.randn_like(layer.values)
    for dense_below in (0.0, 1.0):
        layer.dense_below = dense_below
        got = torch.func.functional_call(layer, {"values": other}, (x,))
        torch.testing.assert_close(got, F.linear(x, layer._dense_from(other), layer.bias))
        assert not torch.allclose(got, layer(x))


def test_trains_and_keeps_structure():
    """Any optimizer trains the stored values; the pruned positions never come back."""
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(10, 64, sparsity=0.8), nn.ReLU(), SparseLinear(64, 2, sparsity=0.5))
    x = torch.randn(256, 10)
    y = (x[:, 0] * x[:, 1] > 0).long()
    masks = [m.mask().clone() for m in (model[0], model[2])]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    for layer, mask in zip((model[0], model[2]), masks):
        assert torch.equal(layer.mask(), mask)
        assert int(torch.count_nonzero(layer.weight[~mask])) == 0


def test_constructor_sparsity_and_properties():
    torch.manual_seed(0)
    layer = SparseLinear(100, 50, sparsity=0.9)
    assert layer.nnz == 500 and abs(layer.sparsity - 0.9) < 1e-12
    assert layer.values.shape == (500,) and layer.weight.shape == (50, 100)
    assert layer.col.dtype == torch.int16 and layer.rowptr.dtype == torch.int32
    mask = torch.zeros(50, 100, dtype=torch.bool)
    mask[:, :3] = True
    assert SparseLinear(100, 50, mask=mask).nnz == 150
    assert "sparsity=0.9000" in repr(layer)


@pytest.mark.parametrize("make, dense", [
    (lambda: SparseLinear(300, 100, sparsity=0.8), lambda: nn.Linear(300, 100)),
    (lambda: pysparse.SparseConv2d(32, 64, 3, groups=4, sparsity=0.8), lambda: nn.Conv2d(32, 64, 3, groups=4)),
])
def test_reset_parameters_draws_as_torch_does(make, dense):
    """reset_parameters (nn.Linear's / nn.Conv2d's, which model.apply(init) code calls) re-draws the stored values
    and the bias from torch's distribution for the dense layer, over the same structure."""
    torch.manual_seed(0)
    layer = make()
    mask = layer.mask()
    with torch.no_grad():
        layer.values.zero_()
        layer.bias.zero_()
    layer.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    assert torch.equal(layer.mask(), mask)
    ref = dense()
    bound = ref.weight[0].numel() ** -0.5  # 1 / sqrt(fan_in)
    for mine, theirs in ((layer.values, ref.weight), (layer.bias, ref.bias)):
        assert float(theirs.abs().max()) <= bound  # (the bound is torch's)
        assert 0.8 * bound <= float(mine.abs().max()) <= bound
        assert float(mine.std()) == pytest.approx(bound / 3 ** 0.5, rel=0.15)  # uniform's std
        assert abs(float(mine.mean())) < 0.15 * bound


@pytest.mark.parametrize("in_f, out_f", [(0, 5), (5, 0)])
def test_zero_features_as_nn_linear(in_f, out_f):
    """nn.Linear allows 0 inputs or outputs (the output is the bias, or empty); so does SparseLinear."""
    dense = nn.Linear(in_f, out_f)
    sparse = SparseLinear.from_dense(dense)
    sparse.dense_below = 0
    x = torch.randn(3, in_f, requires_grad=True)
    y = sparse(x)
    torch.testing.assert_close(y, dense(x))
    y.sum().backward()
    assert x.grad.shape == x.shape and not x.grad.any()
    assert sparse.nnz == 0 and torch.equal(sparse.to_dense().weight, dense.weight)


def test_from_dense_keeps_nonzeros_and_to_dense_round_trip():
    dense, mask, _ = _pair(16, 8, 0.25)
    sparse = SparseLinear.from_dense(dense)  # mask None: the non-zeros
    assert torch.equal(sparse.mask(), dense.weight != 0)
    back = sparse.to_dense()
    assert isinstance(back, nn.Linear)
    assert torch.equal(back.weight, dense.weight) and torch.equal(back.bias, dense.bias)


def test_set_mask_rebuilds_structure():
    dense, mask, sparse = _pair(12, 6, 0.5)
    new = torch.rand(6, 12) < 0.3
    sparse.set_mask(new)
    assert torch.equal(sparse.mask(), new)
    assert torch.equal(sparse.weight, dense.weight * new)  # kept values stay, newly kept start at zero
    x = torch.randn(4, 12)
    torch.testing.assert_close(sparse(x), F.linear(x, dense.weight * new, dense.bias))


def test_memory_grows_with_nnz():
    """Storage at 90%: values + indices <= 0.25x the dense weight; with the backward cache <= 0.45x."""
    layer = SparseLinear(1024, 1024, sparsity=0.9)
    dense_bytes = 1024 * 1024 * 4
    inference = sum(t.numel() * t.element_size() for t in (layer.values, layer.rowptr, layer.col))
    training = inference + sum(t.numel() * t.element_size() for t in (layer.t_rowptr, layer.t_col, layer.t_perm))
    assert inference <= 0.25 * dense_bytes, inference / dense_bytes
    assert training <= 0.45 * dense_bytes, training / dense_bytes


def test_cpu_layers_keep_w_transposed_blocked_by_rows():
    """On the CPU a SparseLinear keeps W^T blocked by W's rows (csr.cpu_row_block: 256 rows, below 87.5% sparsity)
    through construction, set_mask and load_state_dict; moving it to CUDA and back rebuilds the blocks the device
    takes (one on CUDA); its gradients equal the unblocked ones'."""
    torch.manual_seed(0)
    layer = SparseLinear(600, 1024, sparsity=0.7)
    rows, cols = layer.matrix_shape
    s = layer.structure
    assert s.row_blocks == 4 and pysparse.csr.cpu_row_block(rows, cols, layer.nnz) == 256
    # the block layout: block-major, then column, then row
    want = pysparse.csr.structure(layer.mask(), row_block=256)
    for name in ("t_rowptr", "t_col", "t_perm"):
        assert torch.equal(getattr(s, name), getattr(want, name))
    plain = pysparse.csr.structure(layer.mask())
    assert plain.row_blocks == 1 and plain.t_rowptr.numel() == cols + 1
    # gradients at a batch that sweeps W^T (above 32), against the plain structure's
    x, g = torch.randn(64, 600), torch.randn(64, 1024)
    grads = []
    for t in (s.transposed(), plain.transposed()):
        v, xi = layer.values.detach().clone().requires_grad_(), x.t().clone().requires_grad_()
        pysparse.ops.spmm(s.rowptr, s.col, v, xi, transposed=t).backward(g.t())
        grads.append((v.grad, xi.grad))
    assert torch.equal(grads[0][0], grads[1][0])  # the same products
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)  # summed in another order
    layer.set_mask(torch.rand(1024, 600) < 0.05)  # 95%: one block
    assert layer.structure.row_blocks == 1
    layer.set_mask(torch.rand(1024, 600) < 0.5)
    assert layer.structure.row_blocks == 4
    fresh = SparseLinear(600, 1024, sparsity=0.99)
    assert fresh.structure.row_blocks == 1
    fresh.load_state_dict(layer.state_dict())
    assert fresh.structure.row_blocks == 4 and torch.equal(fresh.t_perm, layer.t_perm)
    assert pysparse.SparseConv2d(64, 512, 3, sparsity=0.5).structure.row_blocks == 1  # the convolutions: one
    assert SparseLinear(1000, 300, sparsity=0.0).structure.row_blocks == 1  # fewer than 512 rows: one
    if "cuda" in DEVICES:
        layer.cuda()
        assert layer.structure.row_blocks == 1
        xc = torch.randn(64, 600, device="cuda", requires_grad=True)
        layer(xc).sum().backward()
        layer.cpu()
        assert layer.structure.row_blocks == 4 and torch.equal(layer.t_perm, fresh.t_perm)


def test_blocked_layer_trains_as_the_masked_dense_and_survives_copies():
    """A layer whose W^T is blocked (512 outputs, 50%): its forward and backward through the layer's own autograd
    node at batches that sweep W^T (40, 100) equal nn.Linear's with the masked weight; deepcopy, pickling and
    torch.compile keep the blocks and the results."""
    dense, mask, sparse = _pair(96, 512, 0.5, seed=5)
    assert sparse.structure.row_blocks == 2
    for batch in (40, 100):
        x = torch.randn(batch, 96)
        xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(batch, 512)
        sparse(xs).backward(g)
        F.linear(xd, dense.weight, dense.bias).backward(g)
        torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse._dense_from(sparse.values.grad), dense.weight.grad * mask,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sparse.bias.grad, dense.bias.grad, rtol=1e-5, atol=1e-5)
        for p in (*sparse.parameters(), *dense.parameters()):
            p.grad = None
    for twin in (copy.deepcopy(sparse), pickle.loads(pickle.dumps(sparse))):
        assert twin.structure.row_blocks == 2 and torch.equal(twin.t_perm, sparse.t_perm)
    x = torch.randn(64, 96, requires_grad=True)
    assert_compiled_matches_eager(sparse, x, torch.randn(64, 512))


def test_state_dict_deepcopy_pickle():
    _, _, sparse = _pair(16, 8, 0.25, seed=3)
    fresh = SparseLinear(16, 8, sparsity=0.9)  # different nnz: loading takes the saved structure
    fresh.load_state_dict(sparse.state_dict())
    x = torch.randn(5, 16)
    torch.testing.assert_close(fresh(x), sparse(x))
    torch.testing.assert_close(copy.deepcopy(sparse)(x), sparse(x))
    torch.testing.assert_close(pickle.loads(pickle.dumps(sparse))(x), sparse(x))
    buf = io.BytesIO()
    torch.save(sparse.state_dict(), buf)
    buf.seek(0)
    again = SparseLinear(16, 8, sparsity=0.5)
    again.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(again(x), sparse(x))


def test_loads_a_dense_state_dict_at_its_stored_places():
    """An nn.Linear's state dict (a pretrained dense checkpoint) loads into a SparseLinear: the kept entries of
    its weight become the values (the same Parameter, so an optimizer built before still holds it), the bias
    loads, the mask stays; the layer computes the masked dense layer. assign=True takes the checkpoint's dtype."""
    torch.manual_seed(0)
    dense = nn.Linear(16, 8)
    mask = torch.rand(8, 16) < 0.3
    sparse = SparseLinear(16, 8, mask=mask)
    before = sparse.values
    assert not sparse.load_state_dict(dense.state_dict()).missing_keys
    assert sparse.values is before and torch.equal(sparse.mask(), mask)
    assert torch.equal(sparse.values.detach(), dense.weight.detach()[mask]) and torch.equal(sparse.bias, dense.bias)
    x = torch.randn(5, 16)
    torch.testing.assert_close(sparse(x), F.linear(x, dense.weight * mask, dense.bias))
    assert torch.equal(sparse.weight.detach(), dense.weight.detach() * mask)  # the weight view follows the load
    sparse.load_state_dict(dense.double().state_dict(), assign=True)
    assert sparse.values.dtype == torch.float64 and isinstance(sparse.values, nn.Parameter)
    assert sparse.values.requires_grad and torch.equal(sparse.mask(), mask)
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"bias\""):
        sparse.load_state_dict({"weight": dense.weight.detach()})
    sparse.load_state_dict({"weight": torch.zeros(8, 16)}, strict=False)
    assert not sparse.values.detach().any()


@pytest.mark.parametrize("state, match", [
    ({"weight": torch.zeros(16, 8), "bias": torch.zeros(8)}, r"size mismatch for weight: .*\(16, 8\).*\(8, 16\)"),
    ({"weight": torch.zeros(8, 16, dtype=torch.int32), "bias": torch.zeros(8)}, "must be floating point"),
    ({"weight": [0.0] * 128, "bias": torch.zeros(8)}, "expected torch.Tensor"),
])
def test_a_bad_dense_state_dict_is_refused(state, match):
    sparse = SparseLinear(16, 8, sparsity=0.5)
    values = sparse.values.detach().clone()
    with pytest.raises(RuntimeError, match=match):
        sparse.load_state_dict(state)
    assert torch.equal(sparse.values.detach(), values)
    with pytest.raises(RuntimeError, match="meta device .*has no structure"):
        SparseLinear(16, 8, sparsity=0.5).to("meta").load_state_dict(nn.Linear(16, 8).state_dict(), assign=True)
    emptied = SparseLinear(16, 8, sparsity=0.5).to("meta").to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="moved off it by to_empty.*load its own state dict"):
        emptied.load_state_dict(nn.Linear(16, 8).state_dict())
    emptied.load_state_dict(sparse.state_dict())  # its own: the structure is set, a dense one loads again after
    emptied.load_state_dict(nn.Linear(16, 8).state_dict())
    assert torch.equal(emptied.mask(), sparse.mask())


def test_assigning_a_weight_parameter_sets_the_kept_values():
    """``layer.weight = nn.Parameter(w)`` (what torch's fuse_linear_bn_eval does) stores w at the kept places in a
    new values Parameter of w's dtype and requires_grad; anything else is refused naming the weight."""
    torch.manual_seed(0)
    mask = torch.rand(8, 16) < 0.3
    sparse = SparseLinear(16, 8, mask=mask)
    w = torch.randn(8, 16, dtype=torch.float64)
    sparse.weight = nn.Parameter(w, requires_grad=False)
    assert isinstance(sparse.values, nn.Parameter) and not sparse.values.requires_grad
    assert sparse.values.dtype == torch.float64 and torch.equal(sparse.values, w[mask])
    assert torch.equal(sparse.mask(), mask) and set(dict(sparse.named_parameters())) == {"values", "bias"}
    for value, exc, match in [(nn.Parameter(torch.zeros(16, 8)), ValueError, r"weight: .*\(16, 8\).*\(8, 16\)"),
                              (nn.Parameter(torch.zeros(8, 16, dtype=torch.int32), requires_grad=False), TypeError,
                               "weight: assigned a torch.int32"),
                              (nn.Parameter(torch.zeros(8, 16, device="meta")), ValueError, "on meta"),
                              (torch.zeros(8, 16), TypeError, "cannot assign Tensor as SparseLinear.weight"),
                              (None, TypeError, "cannot assign NoneType")]:
        with pytest.raises(exc, match=match):
            sparse.weight = value
    assert torch.equal(sparse.values, w[mask])


def test_torch_fuse_linear_bn_eval_keeps_the_layer_sparse():
    from torch.nn.utils.fusion import fuse_linear_bn_eval

    torch.manual_seed(0)
    _, mask, sparse = _pair(16, 8, 0.3)
    bn = nn.BatchNorm1d(8).eval()
    with torch.no_grad():
        for t in (bn.running_mean, bn.weight, bn.bias):
            t.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    fused = fuse_linear_bn_eval(sparse.eval(), bn)
    assert isinstance(fused, SparseLinear) and torch.equal(fused.mask(), mask)
    x = torch.randn(5, 16)
    torch.testing.assert_close(fused(x), bn(sparse(x)))


def test_torch_nn_utils_prune_is_refused_with_what_to_do():
    """torch.nn.utils.prune re-parametrises a weight Parameter; a sparse layer has none: a clear error, and the
    layer is left as it was."""
    from torch.nn.utils import prune as torch_prune

    sparse = SparseLinear(16, 8, sparsity=0.5)
    for call in (lambda: torch_prune.l1_unstructured(sparse, "weight", amount=0.3),
                 lambda: torch_prune.global_unstructured([(sparse, "weight")], pruning_method=torch_prune.L1Unstructured,
                                                         amount=0.3)):
        with pytest.raises(TypeError, match=r"SparseLinear's weight is built from its stored values.*set_mask.*"
                                            r"pysparse.densify"):
            call()
    assert set(dict(sparse.named_parameters())) == {"values", "bias"} and not sparse._forward_pre_hooks
    assert sparse.nnz == 64


def test_state_dict_holds_no_derived_cache():
    _, _, sparse = _pair(16, 8, 0.25, seed=3)
    assert set(sparse.state_dict()) == {"values", "bias", "rowptr", "col"}


@pytest.mark.parametrize("tamper, match", [
    (lambda st: st["col"].__setitem__(0, 99), "column index is outside"),
    (lambda st: st["col"].__setitem__(slice(0, 2), st["col"][:2].flip(0).clone()), "canonical order"),
    (lambda st: st["rowptr"].__setitem__(1, st["rowptr"][2] + 1), "valid row pointer"),
    (lambda st: st.__setitem__("values", st["values"][:-1].clone()), "values for"),
])
def test_tampered_state_dict_is_refused(tamper, match):
    _, _, sparse = _pair(16, 8, 0.25, seed=3)
    state = {k: v.clone() for k, v in sparse.state_dict().items()}
    tamper(state)
    with pytest.raises(RuntimeError, match=match):
        SparseLinear(16, 8, sparsity=0.5).load_state_dict(state)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) through the layer's C++ autograd node: the same output and gradients."""
    _, _, sparse = _pair(16, 8, 0.3)
    assert_compiled_matches_eager(sparse, torch.randn(4, 16, requires_grad=True), torch.randn(4, 8))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: SparseLinear(4, 3), ValueError, "needs sparsity= .* or mask="),
    (lambda: SparseLinear(4, 3, sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    (lambda: SparseLinear(-1, 3, sparsity=0.5), ValueError, "in_features must be an int >= 0, got -1"),
    (lambda: SparseLinear(4, 2.5, sparsity=0.5), ValueError, "out_features must be an int >= 0, got 2.5"),
    (lambda: SparseLinear(4, 3, sparsity=-0.5), ValueError, r"sparsity must be in \[0, 1\)"),
    (lambda: SparseLinear(4, 3, sparsity="a lot"), TypeError, "sparsity must be a real number"),
    (lambda: SparseLinear(4, 3, sparsity=0.5, mask=torch.ones(3, 4, dtype=torch.bool)), ValueError, "not both"),
    (lambda: SparseLinear(4, 3, mask=torch.ones(4, 3, dtype=torch.bool)), ValueError, r"mask has shape \(4, 3\)"),
    (lambda: SparseLinear(4, 3, mask=torch.ones(3, 4)), TypeError, "mask must be a bool tensor"),
    (lambda: SparseLinear(4, 3, mask=torch.ones(3, 4, dtype=torch.bool, device="meta")), ValueError,
     "mask is on meta"),
    (lambda: SparseLinear.from_dense(nn.Conv2d(1, 1, 1)), TypeError, "expects an nn.Linear"),
    (lambda: SparseLinear(4, 3, sparsity=0.5)(torch.randn(2, 5)), ValueError, "expects inputs with 4 features"),
    (lambda: SparseLinear(4, 3, sparsity=0.5)(torch.randn(2, 4).double()), TypeError, "input dtype"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_module_casts_move_values_not_structure():
    _, _, sparse = _pair(16, 8, 0.3)
    sparse.double()
    assert sparse.values.dtype == torch.float64 and sparse.rowptr.dtype == torch.int32
    assert sparse.col.dtype == torch.int16 and sparse.t_perm.dtype == torch.int32
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(sparse(x), F.linear(x, sparse.weight, sparse.bias))
    assert "rowptr" not in dict(sparse.named_buffers())  # not a buffer: DDP does not broadcast the structure


def test_meta_device():
    """Built on meta: a clear error (the kept positions are data). A built model moved to meta, then
    materialised with to_empty() or load_state_dict(assign=True), computes what it did."""
    for build in (lambda: SparseLinear(8, 4, sparsity=0.5),
                  lambda: SparseLinear.from_dense(nn.Linear(8, 4)),
                  lambda: pysparse.sparsify(nn.Sequential(nn.Linear(8, 4)), min_sparsity=0),
                  lambda: pysparse.SparseConv2d(2, 3, 3, sparsity=0.5)):
        with torch.device("meta"), \
                pytest.raises(ValueError, match="cannot be built on the meta device: which weights are kept is data"):
            build()
    torch.manual_seed(0)
    model = pysparse.sparsify(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)),
                              {"0.weight": torch.rand(6, 8) > 0.5, "2.weight": torch.rand(3, 6) > 0.5},
                              min_sparsity=0)
    x, state = torch.randn(4, 8), model.state_dict()
    assigned = copy.deepcopy(model).to("meta")
    assigned.load_state_dict(state, assign=True)
    emptied = copy.deepcopy(model).to("meta").to_empty(device="cpu")
    emptied.load_state_dict(state)
    for m in (assigned, emptied):
        torch.testing.assert_close(m(x), model(x))
