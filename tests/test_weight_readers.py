"""Modules that compute with a child nn.Linear's weight instead of calling the child: ``F.linear(x,
self.qkv.weight, bias)``, as torchvision's Swin Transformer attention does. pysparse prunes them with their own
inputs (wanda, compensate), and once sparsified such a call runs the sparse layer's kernels."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import pysparse
from pysparse import SparseLinear
from pysparse.nn import SparseLinearWeight
from pysparse.testing import ops_called


class _Reader(nn.Module):
    """Reads qkv's and proj's weights itself (qkv's bias changed first, as Swin V2 zeroes the key's part)."""

    def __init__(self):
        super().__init__()
        self.inp, self.qkv, self.proj, self.out = nn.Linear(8, 16), nn.Linear(16, 48), nn.Linear(16, 16), \
            nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        bias = self.qkv.bias.clone()
        bias[16:32].zero_()
        y = F.linear(x, self.qkv.weight, bias)
        y = F.linear(y[..., :16] * torch.tanh(y[..., 16:32]) + y[..., 32:], self.proj.weight, self.proj.bias)
        return self.out(y)


class _Caller(_Reader):
    """The same function, calling the layers (qkv's bias changed by an extra term)."""

    def forward(self, x):
        x = torch.relu(self.inp(x))
        y = self.qkv(x) - F.pad(self.qkv.bias[16:32], (16, 16))
        return self.out(self.proj(y[..., :16] * torch.tanh(y[..., 16:32]) + y[..., 32:]))


def _pair(cls=_Reader, sparsity=0.8, seed=0):
    torch.manual_seed(seed)
    model = cls()
    masks = pysparse.prune(model, "magnitude", sparsity=sparsity).masks
    dense = copy.deepcopy(model)
    pysparse.sparsify(model, masks, min_sparsity=0.0)
    return dense, model, masks


def test_f_linear_on_a_sparse_layers_weight_runs_its_kernels():
    dense, sparse, masks = _pair()
    assert all(isinstance(getattr(sparse, n), SparseLinear) for n in ("inp", "qkv", "proj", "out"))
    x = torch.randn(3, 5, 8)
    xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    with ops_called() as called:
        ys = sparse(xs)
    assert "pysparse::spmm" in called and not called & {"aten::addmm", "aten::mm", "aten::matmul", "aten::bmm"}
    yd = dense(xd)
    torch.testing.assert_close(ys, yd, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(yd)
    ys.backward(g)
    yd.backward(g)
    torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-5, atol=1e-6)
    for name in ("qkv", "proj"):
        layer, ref = getattr(sparse, name), getattr(dense, name)
        torch.testing.assert_close(layer.values.grad, ref.weight.grad[masks[f"{name}.weight"]], rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-6)


def test_a_sparse_layers_weight_is_a_plain_tensor_elsewhere():
    _, sparse, masks = _pair()
    w = sparse.qkv.weight
    assert type(w) is SparseLinearWeight and w.shape == (48, 16) and w.dtype == torch.float32
    assert torch.equal(w != 0, masks["qkv.weight"] & (w != 0)) and int((w != 0).sum()) <= sparse.qkv.nnz
    for out in (w * 2, w.t(), w.detach(), torch.mm(torch.ones(2, 16), w.t()), w.sum(), w[0], w.clone()):
        assert type(out) is torch.Tensor
    with torch.no_grad():  # printed as the dense tensor
        assert repr(sparse.qkv.weight) == repr(sparse.qkv.dense_weight())
    x = torch.randn(4, 16)
    with ops_called() as called:  # the other F.linear argument orders and keywords route too
        y = F.linear(input=x, weight=sparse.qkv.weight)
    assert "pysparse::spmm" in called
    torch.testing.assert_close(y, x @ sparse.qkv.dense_weight().t())
    # what the layer would not take as it is goes to torch's dense F.linear, with its results and errors
    with ops_called() as called:
        torch.testing.assert_close(F.linear(x.double(), sparse.qkv.weight.double()),
                                   x.double() @ sparse.qkv.dense_weight().double().t())
        torch.testing.assert_close(F.linear(x, sparse.qkv.weight, torch.ones(1)),
                                   x @ sparse.qkv.dense_weight().t() + 1)
    assert "pysparse::spmm" not in called
    with torch.no_grad():  # a weight taken without gradient gives the values none, as a dense one would
        frozen = sparse.qkv.weight
    xg = x.clone().requires_grad_()
    F.linear(xg, frozen).sum().backward()
    assert sparse.qkv.values.grad is None and xg.grad is not None
    with torch.no_grad(), ops_called() as called:  # (in inference it is still routed)
        F.linear(x, sparse.qkv.weight)
    assert "pysparse::spmm" in called
    with pytest.raises(RuntimeError):
        F.linear(x.double(), sparse.qkv.weight)
    with pytest.raises(RuntimeError):
        F.linear(torch.randn(4, 15), sparse.qkv.weight)


def test_weight_readers_under_autocast_compile_and_torch_func():
    dense, sparse, _ = _pair()
    x = torch.randn(6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys, yd = sparse(x), dense(x)
    assert ys.dtype == yd.dtype == torch.bfloat16
    torch.testing.assert_close(ys, yd, rtol=2e-2, atol=2e-2)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(sparse)(x), dense(x), rtol=1e-5, atol=1e-6)
    params = {k: v.detach() for k, v in sparse.named_parameters()}
    grads = torch.func.grad(lambda p: torch.func.functional_call(sparse, p, (x,)).square().sum())(params)
    sparse.zero_grad()
    sparse(x).square().sum().backward()
    for k, p in sparse.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["wanda", "magnitude+compensate"])
def test_prune_sees_the_inputs_of_weights_read_by_their_parent(method):
    """wanda's norms and compensate's refits of qkv and proj come from the F.linear calls that take their
    weights: the same masks, weights and reconstruction report as for the twin that calls the layers."""
    torch.manual_seed(0)
    data = [(torch.randn(64, 8), torch.randint(0, 4, (64,))) for _ in range(2)]
    reader = _Reader()
    caller = _Caller()
    caller.load_state_dict(reader.state_dict())
    x = data[0][0]
    torch.testing.assert_close(reader(x), caller(x))
    kwargs = dict(method="wanda") if method == "wanda" else dict(method="magnitude", compensate=True)
    results = [pysparse.prune(m, sparsity=0.6, scope="layer", data=data, num_batches=2, **kwargs)
               for m in (reader, caller)]
    assert set(results[0].masks) == {"inp.weight", "qkv.weight", "proj.weight", "out.weight"}
    for name, mask in results[1].masks.items():
        assert torch.equal(results[0].masks[name], mask), name
    for (name, a), b in zip(reader.state_dict().items(), caller.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    if method != "wanda":
        assert results[0].reconstruction.keys() == results[1].reconstruction.keys() == results[0].masks.keys()
        for name, errors in results[1].reconstruction.items():
            assert results[0].reconstruction[name] == pytest.approx(errors, rel=1e-6)
            assert errors["compensated"] < errors["masked"]


@pytest.mark.parametrize("v2", [False, True])
def test_swin_transformer_prunes_with_wanda_and_its_attention_runs_sparse(v2):
    """torchvision's Swin Transformer (V1 and V2): its attention passes qkv.weight / proj.weight to F.linear."""
    from torchvision.models.swin_transformer import (PatchMergingV2, SwinTransformer, SwinTransformerBlockV2)

    torch.manual_seed(0)
    extra = dict(block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2) if v2 else {}
    model = SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10, **extra).eval()
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    result = pysparse.prune(model, "wanda", sparsity=0.8, scope="layer", data=data)
    assert "features.1.0.attn.qkv.weight" in result.masks and "features.3.1.attn.proj.weight" in result.masks
    ref = copy.deepcopy(model)
    pysparse.sparsify(model, result.masks, min_sparsity=0.0)
    attn = model.features[1][0].attn
    assert isinstance(attn.qkv, SparseLinear) and isinstance(attn.proj, SparseLinear)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), ops_called() as called:
        y = model(x)
    assert not called & {"aten::addmm", "aten::mm"}  # every linear layer by the sparse kernels
    with torch.no_grad():
        torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)


def test_models_that_skip_a_layer_still_say_so():
    """An nn.Linear neither called nor read still fails wanda clearly (test_prune has the message's text)."""
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False).eval()
    with pytest.raises(ValueError, match="aux1.conv.conv.weight saw no input"):
        pysparse.prune(model, "wanda", sparsity=0.5, data=[(torch.randn(1, 3, 64, 64), torch.tensor([0]))])


def _conv_layer():
    torch.manual_seed(1)
    return pysparse.SparseConv2d(4, 6, 3, padding=1, sparsity=0.7)


@pytest.mark.parametrize("make", [lambda: _pair()[1].qkv, _conv_layer], ids=["linear", "conv"])
def test_reading_a_sparse_layers_weight_metadata_builds_nothing(make):
    """Code written for dense layers reads ``layer.weight`` for its metadata on every call (``x.to(fc.weight.dtype)``,
    nn.TransformerEncoderLayer's fast-path checks): the weight answers from its own metadata; the dense copy is
    built once, at the first read of its numbers."""
    layer = make()
    with ops_called() as called:
        w = layer.weight
        meta = (w.shape, w.dtype, w.device, w.requires_grad, w.ndim, w.size(), w.size(0), w.dim(), w.numel(),
                w.nelement(), w.stride(), w.is_contiguous(), w.element_size(), w.is_floating_point(), w.is_cuda,
                w.layout, len(w), hash(w), torch.is_tensor(w), torch.numel(w), w.get_device(),
                torch.overrides.has_torch_function((w,)))
    assert not called
    dense = layer.dense_weight()
    assert meta[:4] == (dense.shape, dense.dtype, dense.device, True)
    assert meta[5:] == (dense.size(), dense.size(0), dense.dim(), dense.numel(), dense.nelement(), dense.stride(),
                        True, 4, True, False, torch.strided, dense.shape[0], id(w), True, dense.numel(), -1, True)
    with ops_called() as called:
        a, b = w * 1, w.sum()
    assert "pysparse::csr_to_dense" in called
    with ops_called() as called:  # built once
        c = w.abs()
    assert "pysparse::csr_to_dense" not in called
    torch.testing.assert_close(a, dense)
    torch.testing.assert_close(c, dense.abs())
    assert type(a) is type(b) is torch.Tensor


@pytest.mark.parametrize("make", [lambda: _pair()[1].qkv, _conv_layer], ids=["linear", "conv"])
def test_a_sparse_layers_weight_gradients_copies_and_files(make, tmp_path):
    layer = make()
    w = layer.weight
    with torch.no_grad():
        layer.values.mul_(2)  # read when first used: the values as they are then, as nn.Linear's weight would
    dense = layer.dense_weight().detach()
    (w.square().sum() + w.sum()).backward()  # differentiable in the values
    torch.testing.assert_close(layer.values.grad, 2 * layer.values.detach() + 1)
    assert w.grad_fn is not None and not w.is_leaf  # the dense tensor's autograd node
    snap = layer.weight.clone()
    with torch.no_grad():
        layer.values.mul_(2)
    torch.testing.assert_close(snap.detach(), dense)  # .clone() keeps them as they were
    with torch.no_grad():
        frozen = layer.weight
    assert not frozen.requires_grad and not (frozen * 1).requires_grad
    # copies, pickles and files get the plain dense tensor
    for out in (copy.deepcopy(frozen), torch.tensor(frozen.numpy()), torch.tensor(frozen.tolist()), frozen.detach()):
        assert type(out) is torch.Tensor
        torch.testing.assert_close(out, 2 * dense)
    torch.save({"w": layer.weight}, tmp_path / "w.pt")
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)["w"]
    assert type(loaded) is torch.Tensor
    torch.testing.assert_close(loaded, 2 * dense)
    w = layer.weight
    layer.double()
    with pytest.raises(RuntimeError, match="layer that changed since.*read layer.weight again"):
        w.sum()
    assert layer.weight.sum().dtype == torch.float64


def test_weight_dtype_read_in_every_forward_costs_no_dense_copy():
    """A module that casts its input to its child's weight dtype on every call, as many models do."""

    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 32)

        def forward(self, x):
            return self.fc(x.to(self.fc.weight.dtype))

    torch.manual_seed(0)
    model = Casting()
    ref = copy.deepcopy(model)
    pysparse.sparsify(model, {"fc.weight": torch.rand(32, 64) > 0.9}, min_sparsity=0)
    ref.fc.weight.data = model.fc.dense_weight().detach()
    x = torch.randn(5, 64, dtype=torch.float64)
    with ops_called() as called:
        y = model(x)
    assert "pysparse::spmm" in called and "pysparse::csr_to_dense" not in called
    torch.testing.assert_close(y, ref(x))


@pytest.mark.parametrize("make", [lambda: _pair()[1].qkv, _conv_layer,
                                  lambda: pysparse.SparseConv2d(4, 6, 3, groups=2, sparsity=0.5)],
                         ids=["linear", "conv", "grouped-conv"])
def test_writes_into_a_sparse_layers_weight_set_its_kept_values(make):
    """In place, as into an nn.Parameter: initialisers, copy_, item assignment, operators, out=, and .data."""
    layer = make()
    mask = layer.mask()
    n = int(mask.sum())
    source = torch.randn(layer.weight.shape)
    writes = [
        lambda w: nn.init.constant_(w, 3.0), lambda w: w.copy_(source), lambda w: w.__setitem__(mask, 7.0),
        lambda w: w.mul_(2), lambda w: w.__imul__(-1), lambda w: torch.mul(source, 2, out=w),
        lambda w: nn.init.kaiming_uniform_(w), lambda w: nn.init.orthogonal_(w),
    ]
    for write in writes:
        before = layer.values.detach().clone()
        with torch.no_grad():
            w = layer.weight
            write(w)
        expect = w.detach().clone()  # what the write left, zeros where pruned
        assert torch.equal(expect, layer.dense_weight().detach()) and (expect[~mask] == 0).all()
        assert layer.values.shape == (n,) and not torch.equal(layer.values.detach(), before)
    torch.testing.assert_close(layer.dense_weight().detach(), layer.weight.detach())
    with torch.no_grad():
        nn.init.constant_(layer.weight, 3.0)
    assert (layer.values == 3).all() and layer.mask().equal(mask)
    layer.weight.data.normal_()  # .data: no gradient, no no_grad needed; pruned places stay zero
    assert layer.values.std() > 0.5 and (layer.weight[~mask] == 0).all()
    assert type(layer.weight.data) is type(layer.weight) and not layer.weight.data.requires_grad
    w = layer.weight
    w.data.data.fill_(5.0)  # shares w's dense tensor: w shows it
    assert (layer.values == 5).all() and torch.equal(w.detach(), 5 * mask.to(w.dtype))
    with torch.no_grad():  # writes through other views reach only that copy
        layer.weight.detach().zero_()
        layer.weight[0].zero_()
    assert layer.values.abs().min() > 0
    with pytest.raises(RuntimeError, match="normal_ writes into a sparse layer's weight, whose values require grad"):
        layer.weight.normal_()
    with pytest.raises(RuntimeError, match="changed the shape of a sparse layer's weight"), torch.no_grad():
        layer.weight.resize_(2)
    frozen = make().requires_grad_(False)
    frozen.weight.fill_(1.0)  # values without gradient: as a frozen nn.Parameter, no no_grad needed
    assert (frozen.values == 1).all()


_INITS = {
    "normal_": lambda w: nn.init.normal_(w, 0.5, 2.0), "uniform_": lambda w: nn.init.uniform_(w, -3.0, 1.0),
    "constant_": lambda w: nn.init.constant_(w, 0.25), "ones_": nn.init.ones_, "zeros_": nn.init.zeros_,
    "xavier_uniform_": nn.init.xavier_uniform_, "xavier_normal_": lambda w: nn.init.xavier_normal_(w, gain=2.0),
    "kaiming_uniform_": lambda w: nn.init.kaiming_uniform_(w, a=5 ** 0.5),
    "kaiming_normal_": lambda w: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"),
    "trunc_normal_": lambda w: nn.init.trunc_normal_(w, std=0.02), "orthogonal_": nn.init.orthogonal_,
    "sparse_": lambda w: nn.init.sparse_(w.view(w.shape[0], -1) if w.dim() > 2 else w, 0.3),
    "eye_": nn.init.eye_, "dirac_": nn.init.dirac_,
}


@pytest.mark.parametrize("init", list(_INITS))
@pytest.mark.parametrize("make", [lambda: _pair()[1].qkv, _conv_layer], ids=["linear", "conv"])
def test_nn_init_on_a_sparse_layers_weight_needs_no_no_grad(make, init):
    """torch.nn.init's functions write under no_grad themselves: on an nn.Parameter they need no torch.no_grad(),
    and on a sparse layer's weight neither. The kept values are those the function gives a dense weight of the same
    shape from the same random state; pruned places stay zero and the layer still trains."""
    layer = make()
    if (init == "eye_") != (layer.weight.dim() == 2) and init in ("eye_", "dirac_"):
        pytest.skip(f"{init} takes a {'2' if init == 'eye_' else '3-5'}-d tensor")
    if init == "sparse_" and layer.weight.dim() > 2:
        pytest.skip("sparse_ takes a 2-d tensor (a view of the weight reaches only that copy)")
    mask = layer.mask()
    dense = torch.zeros(layer.weight.shape)
    torch.manual_seed(3)
    _INITS[init](dense)
    torch.manual_seed(3)
    assert torch.is_grad_enabled() and layer.values.requires_grad
    out = _INITS[init](layer.weight)
    assert out is not None
    torch.testing.assert_close(layer.dense_weight().detach(), dense * mask)
    assert layer.mask().equal(mask) and layer.values.requires_grad and layer.values.grad_fn is None
    x = torch.randn(2, layer.weight.shape[1], *((5, 5) if layer.weight.dim() == 4 else ()))
    layer(x).sum().backward()
    assert layer.values.grad is not None and layer.values.grad.shape == layer.values.shape


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_sparse_layers_weight_grad_is_the_masked_dense_gradient(kind):
    """Code written for nn.Linear reads ``layer.weight.grad`` after a backward (logging, gradient saliency): it is
    the values' gradient at the kept places, equal to the masked dense layer's; assigning it sets the values'."""
    torch.manual_seed(0)
    dense = nn.Linear(12, 5) if kind == "linear" else nn.Conv2d(4, 6, 3, padding=1)
    mask = torch.rand(dense.weight.shape) > 0.6
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer = (pysparse.SparseLinear if kind == "linear" else pysparse.SparseConv2d).from_dense(dense, mask)
    layer.dense_below = 0.0
    assert layer.weight.grad is None  # before any backward, as nn.Linear's
    x = torch.randn(3, 12) if kind == "linear" else torch.randn(2, 4, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "non-leaf tensor's .grad" warning)
        layer(x).square().sum().backward()
        dense(x).square().sum().backward()
        g = layer.weight.grad
    assert type(g) is torch.Tensor and g.shape == dense.weight.shape
    torch.testing.assert_close(g, dense.weight.grad * mask)
    g.zero_()  # a copy: the values' gradient stays
    assert layer.values.grad.abs().sum() > 0
    new = torch.randn(dense.weight.shape, dtype=torch.float64)
    layer.weight.grad = new  # its kept entries, in the values' dtype
    assert layer.values.grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.grad, (new * mask).float())
    before = layer.values.detach().clone()
    torch.optim.SGD(layer.parameters(), lr=1.0).step()
    torch.testing.assert_close(layer.values.detach(), before - layer.values.grad)
    layer.weight.grad = None
    assert layer.values.grad is None and layer.weight.grad is None
    with pytest.raises(RuntimeError, match="weight.grad must be a tensor of the weight's shape"):
        layer.weight.grad = torch.zeros(3)


def test_a_kept_weight_follows_the_values_and_is_built_once_per_change():
    """As an nn.Linear's weight, one taken before an optimizer step (or captured by torch.fx as a constant) shows
    the values as they are when used; it is rebuilt only after they change."""
    layer = _pair()[1].qkv
    w = layer.weight
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    for step in range(2):
        with ops_called() as called:
            before = w * 1
            w.sum()
        assert "pysparse::csr_to_dense" in called  # built (after the step: again)
        with ops_called() as called:  # unchanged values: the same dense tensor
            again = w.abs()
        assert not called & {"pysparse::csr_to_dense"}
        torch.testing.assert_close(again, before.abs())
        opt.zero_grad()
        layer(torch.randn(3, 16)).square().sum().backward()
        opt.step()
    assert not torch.equal(w.detach(), before.detach())
    torch.testing.assert_close(w.detach(), layer.dense_weight().detach())
    keep = torch.ones(layer.nnz, dtype=torch.bool)
    keep[::2] = False
    layer.prune_values_(keep)  # new values, fewer: the weight shows the layer's new structure
    torch.testing.assert_close(w.detach(), layer.dense_weight().detach())
    assert int((w != 0).sum()) <= layer.nnz
