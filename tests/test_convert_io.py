import copy
import os
import pickle
import warnings

import pytest
import torch
import torchvision
from torch import nn

import pysparse
from pysparse import SparseConv2d, SparseLinear
from pysparse.testing import DEVICES, ops_called


def _pruned(model, sparsity, seed=0):
    torch.manual_seed(seed)
    masks = {n: torch.rand_like(p) >= sparsity for n, p in model.named_parameters() if p.dim() in (2, 4)}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return model.eval(), masks


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "mobilenet_v2"])
def test_sparsify_torchvision_matches_masked_dense(arch):
    torch.manual_seed(0)
    model, masks = _pruned(getattr(torchvision.models, arch)(num_classes=10), 0.9)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        pysparse.sparsify(model, masks, min_sparsity=0.0)
        out = model(x)
    n_sparse = sum(isinstance(m, (SparseLinear, SparseConv2d)) for m in model.modules())
    assert n_sparse == len(masks)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    pysparse.densify(model)
    assert not any(isinstance(m, (SparseLinear, SparseConv2d)) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)


def test_a_sparsified_model_loads_the_dense_checkpoint():
    """sparsify fixes the structure; a dense checkpoint (here the unpruned weights) then loads into the sparse
    model with load_state_dict, strict: the model computes the checkpoint masked by the sparse layers' masks."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    masks = {n: torch.rand_like(p) >= 0.9 for n, p in model.named_parameters() if p.dim() in (2, 4)}
    pysparse.sparsify(model, masks, min_sparsity=0.0)
    for p in model.parameters():  # (forget the weights: only the load may bring them back)
        torch.nn.init.normal_(p)
    model.load_state_dict(checkpoint)
    ref = torchvision.models.resnet18(num_classes=10).eval()
    ref.load_state_dict(checkpoint)
    with torch.no_grad():
        for n, m in masks.items():
            ref.get_parameter(n).mul_(m)
        x = torch.randn(2, 3, 32, 32)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_sparsified_mobilenet_v3_trains_like_the_masked_dense():
    """Its classifier is Linear -> Hardswish(inplace=True): a training step through the sparse layers gives the
    masked dense model's loss and gradients (BatchNorm in training mode, dropout off)."""
    torch.manual_seed(0)
    model, masks = _pruned(torchvision.models.mobilenet_v3_small(num_classes=10, dropout=0.0), 0.9)
    dense = copy.deepcopy(model).train()
    model.train()
    pysparse.sparsify(model, masks, min_sparsity=0.0)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss_s = nn.functional.cross_entropy(model(x), y)
    loss_d = nn.functional.cross_entropy(dense(x), y)
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-4, atol=1e-5)
    loss_s.backward()
    loss_d.backward()
    dense_params = dict(dense.named_parameters())
    for name, layer in model.named_modules():
        if isinstance(layer, (SparseLinear, SparseConv2d)):
            want = dense_params[name + ".weight"].grad[masks[name + ".weight"]]
            torch.testing.assert_close(layer.values.grad, want, rtol=1e-3, atol=1e-5)


def test_prune_then_sparsify_a_vision_transformer(tmp_path):
    """pysparse.prune scores every nn.Linear and each nn.MultiheadAttention's in_proj_weight and out_proj (an
    nn.Linear subclass that its parent reads directly); sparsify turns each attention into a
    SparseMultiheadAttention, converts the rest; the model computes the masked model, saves, loads and trains."""
    torch.manual_seed(0)
    vit = lambda: torchvision.models.VisionTransformer(  # noqa: E731
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128, num_classes=10).eval()
    model = vit()
    result = pysparse.prune(model, "magnitude", sparsity=0.9)
    attention = [k for k in result.masks if "self_attention" in k]
    assert len(attention) == 4 and sum("in_proj_weight" in k for k in attention) == 2
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pysparse.sparsify(model, result.masks, min_sparsity=0.0)
    assert sum(isinstance(m, pysparse.SparseMultiheadAttention) for m in model.modules()) == 2
    for key in attention:
        attn_name, _, local = key.partition("self_attention.")
        attn = model.get_submodule(attn_name + "self_attention")
        assert torch.equal(attn.masks()[local], result.masks[key])
    # every other mask a layer; each attention four
    assert sum(isinstance(m, (SparseLinear, SparseConv2d)) for m in model.modules()) == len(result.masks) - 4 + 8
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)
    pysparse.save(model, tmp_path / "vit.safetensors")
    loaded = pysparse.load(tmp_path / "vit.safetensors", vit())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=1e-4, atol=1e-4)
    loaded.train()
    loaded(x).sum().backward()
    assert all(p.grad is not None for p in loaded.parameters() if p.requires_grad)


def test_sparsify_leaves_subclassed_layers_dense_with_their_masks_applied():
    """A subclass of nn.Linear (its parent may read the weight directly) stays dense, masked, with a warning."""

    class Projection(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Projection(16, 4))
    masks = {n: torch.rand(p.shape) >= 0.9 for n, p in model.named_parameters() if n.endswith("weight")}
    with pytest.warns(UserWarning, match="subclasses dense .*'1.weight'"):
        pysparse.sparsify(model, masks)
    assert type(model[1]) is Projection and not model[1].weight[~masks["1.weight"]].any()
    assert isinstance(model[0], SparseLinear)


def test_sparsify_applies_the_masks_of_layers_it_leaves_dense():
    """A named layer below min_sparsity stays dense but computes the masked function, as a converted one does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    masks = {"0.weight": torch.rand(20, 10) >= 0.9, "2.weight": torch.rand(5, 20) >= 0.1}  # 90% / 10% removed
    x = torch.randn(3, 10)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for key, mask in masks.items():
            masked.get_parameter(key).mul_(mask)
        ref = masked(x)
        pysparse.sparsify(model, masks)
        assert isinstance(model[0], SparseLinear) and type(model[2]) is nn.Linear
        assert torch.equal(model[2].weight, masked[2].weight)
        torch.testing.assert_close(model(x), ref)


def test_sparsify_default_crossover_per_layer_type():
    model = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 4))
    masks = {"0.weight": torch.rand(4, 4, 3, 3) > 0.8, "2.weight": torch.rand(4, 4) > 0.8}  # ~80% removed
    pysparse.sparsify(model, masks)
    assert type(model[0]) is nn.Conv2d and isinstance(model[2], SparseLinear)  # conv crossover ~90%, linear 50%


def test_sparsify_uses_zeros_and_min_sparsity():
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    with torch.no_grad():
        model[0].weight[:, :16] = 0          # 80% zeros: converted
        model[2].weight[:, :3] = 0           # 10% zeros: below the default minimum, stays dense
    pysparse.sparsify(model)
    assert isinstance(model[0], SparseLinear) and model[0].nnz == 30 * 4
    assert type(model[2]) is nn.Linear
    pysparse.sparsify(model, min_sparsity=0.0)
    assert isinstance(model[2], SparseLinear)


def test_a_layer_pruned_to_the_crossover_counts_as_reaching_it():
    """round / int(0.9 * n) weights removed leaves 1 - kept / n a hair below 0.9 when 0.9 * n is not whole
    (ResNet-18's 128 x 64 x 3 x 3 convolution: 66355 of 73728, 0.899997): sparsify's min_sparsity and a layer's
    dense_below count such a layer as 0.9 sparse; one weight fewer removed is below."""
    conv = nn.Conv2d(64, 128, 3, bias=False)
    n = conv.weight.numel()
    assert 0.9 * n != round(0.9 * n) and 1 - (n - round(0.9 * n)) / n < 0.9
    for removed, converts in ((round(0.9 * n), True), (int(0.9 * n), True), (int(0.9 * n) - 1, False)):
        model = nn.Sequential(copy.deepcopy(conv))
        with torch.no_grad():
            model[0].weight.view(-1)[:removed] = 0
        pysparse.sparsify(model, min_sparsity=0.9)
        assert isinstance(model[0], SparseConv2d) == converts, removed
    layer = SparseLinear(7, 13, sparsity=0.3)  # 27 of 91 removed: 0.2967
    assert layer.nnz == 64
    layer.dense_below = 0.3
    assert not layer._computes_dense(batch=64)
    layer.dense_below = 28 / 91
    assert layer._computes_dense(batch=64)
    assert pysparse.sparsify(nn.Sequential(nn.Linear(7, 13)), {"0.weight": layer.mask()}, min_sparsity=0.3)[0].nnz == 64


@pytest.mark.parametrize("device", DEVICES)
def test_sparsify_default_follows_the_device(device):
    """Without min_sparsity, a layer's crossover on its own device decides: on the CPU a 95%-sparse conv and a
    60%-sparse linear layer convert; on CUDA the conv stays dense (its crossover there is 1.0) and so
    does the 60% linear layer (below its ~93% crossover there), while a 95% one converts."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 20), nn.Linear(20, 5)).to(device)
    with torch.no_grad():  # exact sparsities: 95%, 60%, 96%
        for layer, keep in ((model[0], 14), (model[2], 1024), (model[3], 4)):
            layer.weight.view(-1)[keep:] = 0
    pysparse.sparsify(model)
    on_cuda = device == "cuda"
    assert isinstance(model[0], SparseConv2d) != on_cuda
    assert isinstance(model[2], SparseLinear) != on_cuda
    assert isinstance(model[3], SparseLinear)
    assert pysparse.convert.DEFAULT_MIN_SPARSITY_CUDA[nn.Conv2d] == 1.0


def test_sparsified_model_trains_deepcopies_and_pickles():
    model, masks = _pruned(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)), 0.6)
    pysparse.sparsify(model, masks).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    loss0 = nn.functional.cross_entropy(model(x), y)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert nn.functional.cross_entropy(model(x), y) < loss0
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(x), model(x))


def test_save_load_round_trip_size_and_atomicity(tmp_path):
    model, masks = _pruned(torchvision.models.resnet18(num_classes=10), 0.9)
    dense_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    pysparse.sparsify(model, masks, min_sparsity=0.0)
    path = tmp_path / "sub" / "model.safetensors"
    pysparse.save(model, path)
    assert sorted(os.listdir(path.parent)) == ["model.safetensors"]  # no temp file left behind
    # values (4 B) + int16 column indices (2 B) per kept weight: about 0.15 of the dense file at 90%
    assert os.path.getsize(path) < 0.2 * dense_bytes
    loaded = pysparse.load(path, torchvision.models.resnet18(num_classes=10).eval())
    assert isinstance(loaded.layer1[0].conv1, SparseConv2d) and isinstance(loaded.fc, SparseLinear)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    # loading into an already-sparse model of the same architecture works too
    pysparse.load(path, loaded)


def test_load_refuses_bad_files(tmp_path):
    model, masks = _pruned(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)), 0.5)
    pysparse.sparsify(model, masks, min_sparsity=0.0)
    good = tmp_path / "m.safetensors"
    pysparse.save(model, good)
    fresh = lambda: nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))  # noqa: E731

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"definitely not a safetensors file")
    with pytest.raises(ValueError, match="not a safetensors file written by pysparse.save"):
        pysparse.load(garbage, fresh())

    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a pysparse file"):
        pysparse.load(foreign, fresh())

    tampered = tmp_path / "tampered.safetensors"
    data = bytearray(good.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the last tensor's bytes
    tampered.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="modified or corrupted"):
        pysparse.load(tampered, fresh())

    with pytest.raises(ValueError, match="the model has Linear there|does not have"):
        pysparse.load(good, nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)))
    with pytest.raises(FileNotFoundError):
        pysparse.load(tmp_path / "missing.safetensors", fresh())
    with pytest.raises(IsADirectoryError, match="is a directory, not a file"):
        pysparse.load(tmp_path, fresh())
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got NoneType"):
        pysparse.load(None, fresh())


def test_save_refuses_bad_paths(tmp_path):
    model = pysparse.sparsify(nn.Sequential(nn.Linear(8, 6)), {"0.weight": torch.rand(6, 8) > 0.5},
                              min_sparsity=0.0)
    before = sorted(tmp_path.parent.iterdir())
    with pytest.raises(IsADirectoryError, match="is a directory: give a file name"):
        pysparse.save(model, tmp_path)  # was os.replace's error about a temp file made beside the folder
    assert sorted(tmp_path.parent.iterdir()) == before and not any(tmp_path.iterdir())
    with pytest.raises(TypeError, match="path must be a str or os.PathLike, got NoneType"):
        pysparse.save(model, None)
    pysparse.save(model, tmp_path / "new" / "folder" / "m.safetensors")  # missing parent folders are made
    assert (tmp_path / "new" / "folder" / "m.safetensors").is_file()


def _file_bytes(tensors: dict) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("sparsify", ["never", "default crossover"])
def test_save_packs_weights_with_many_zeros(tmp_path, sparsify):
    """A pruned model saved as it is (or sparsified at the default crossover, which leaves some layers dense) is
    stored at the size of its kept weights; load gives back every tensor (the zeros as +0.0: masking by
    multiplication makes half of them -0.0)."""
    model, masks = _pruned(torchvision.models.resnet18(num_classes=10), 0.9)
    assert (model.conv1.weight.view(torch.int32) == torch.tensor(-0.0).view(torch.int32)).any()
    dense_bytes = _file_bytes(model.state_dict())
    if sparsify != "never":
        pysparse.sparsify(model, masks)
        kinds = {type(m) for m in model.modules()}
        assert nn.Conv2d in kinds and SparseConv2d in kinds  # per-layer sparsity falls on both sides of 0.9
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "model.safetensors"
    pysparse.save(model, path)
    assert os.path.getsize(path) < 0.2 * dense_bytes
    loaded = pysparse.load(path, torchvision.models.resnet18(num_classes=10).eval())
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert state[k].dtype == v.dtype and torch.equal(state[k], v), k
        if v.is_floating_point():  # non-zero values bit for bit, zeros as +0.0
            assert torch.equal(state[k].view(torch.uint8), (v + 0.0).view(torch.uint8)), k


def test_save_leaves_dense_weights_unpacked_and_reads_version_1(tmp_path):
    from pysparse import io

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[:, :24] = 0  # 37.5% zeros: packed (6 bytes a kept weight) would not save a quarter
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    assert io._pack(tensors) == {} and set(tensors) == set(model.state_dict())
    with torch.no_grad():
        model[0].weight[:, :56] = 0  # 87.5% zeros: packed
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    assert io._pack(tensors) == {"0.weight": [32, 64]}
    # a file of the first format (version 1: no packing) still loads
    old = tmp_path / "v1.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    io.write_safetensors(state, old, {"format": "pysparse", "version": "1", "sparse_layers": "{}",
                                      "sha256": io._digest(state)})
    fresh = pysparse.load(old, nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)))
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_load_refuses_bad_packed_tensors(tmp_path):
    from pysparse import io

    model = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight[:, 8:] = 0
    fresh = lambda: nn.Sequential(nn.Linear(64, 32))  # noqa: E731

    def write(edit, packed='{"0.weight": [32, 64]}'):
        tensors = {k: v.clone() for k, v in model.state_dict().items()}
        io._pack(tensors)
        edit(tensors)
        path = tmp_path / "bad.safetensors"
        meta = {"format": "pysparse", "version": "2", "sparse_layers": "{}", "packed": packed}
        io.write_safetensors(tensors, path, {**meta, "sha256": io._digest(tensors, io._extra(meta))})
        return path

    def set_(key, value):
        return lambda t: t.__setitem__(key, value)

    cases = [
        (set_("0.weight::col", torch.full((32 * 8,), 70, dtype=torch.int16)), "bad structure"),
        (set_("0.weight::rowptr", torch.arange(33, dtype=torch.int32)), "bad structure"),
        (set_("0.weight::values", torch.zeros(5)), "values for 256 stored positions"),
        (lambda t: t.pop("0.weight::values"), "incomplete"),
    ]
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            pysparse.load(write(edit), fresh())
    with pytest.raises(ValueError, match="bad shape"):
        pysparse.load(write(lambda t: None, packed='{"0.weight": [32, "64"]}'), fresh())
    with pytest.raises(ValueError, match="unreadable layer metadata"):
        pysparse.load(write(lambda t: None, packed='[1, 2]'), fresh())


@pytest.mark.parametrize("attention", [False, True])
def test_sparsify_a_transformer_encoder(attention):
    """nn.TransformerEncoderLayer: its linear layers become sparse, and with its attention pruned too the attention
    a SparseMultiheadAttention; the model computes the masked model in training and in inference, by the sparse
    kernels: torch's inference fast path would read linear1 / linear2.weight, but a SparseLinear's weight (a
    SparseLinearWeight, with __torch_function__) makes it decline, as a sparse attention does, without building
    the dense weights."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    result = pysparse.prune(model, "magnitude", sparsity=0.9, exclude=[] if attention else [r".*self_attn\..*"])
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pysparse.sparsify(model, result.masks, min_sparsity=0)
    assert isinstance(model.layers[1].linear2, SparseLinear)
    assert isinstance(model.layers[1].self_attn, pysparse.SparseMultiheadAttention) == attention
    x = torch.randn(3, 7, 32)
    for fast in (True, False):
        torch.backends.mha.set_fastpath_enabled(fast)
        try:
            with torch.no_grad(), ops_called() as called:
                y = model(x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        with torch.no_grad():
            torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        assert "pysparse::spmm" in called and "aten::_transformer_encoder_layer_fwd" not in called
        assert "pysparse::csr_to_dense" not in called  # (its checks read the weights' metadata only)
    model.train()
    ref.train()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)


class _Tied(nn.Module):
    """An embedding and a classifier sharing one weight (as language models tie them), and a sparse layer."""

    def __init__(self):
        super().__init__()
        self.emb, self.body, self.head = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.relu(self.body(self.emb(idx))))


@pytest.mark.parametrize("device", DEVICES)
def test_save_load_tied_weights(tmp_path, device):
    torch.manual_seed(0)
    model = _Tied()
    pysparse.sparsify(model, {"body.weight": torch.rand(16, 16) > 0.5}, min_sparsity=0)
    model.to(device)  # (on CUDA the tie must be found before the copy to the CPU)
    path = tmp_path / "tied.safetensors"
    pysparse.save(model, path)  # safetensors refuses shared tensors; pysparse stores the tied weight once
    assert os.path.getsize(path) < 2 * 50 * 16 * 4  # (the tied weight stored twice would reach it)
    loaded = pysparse.load(path, _Tied())
    idx = torch.randint(0, 50, (7,))
    torch.testing.assert_close(loaded(idx), model(idx.to(device)).cpu())
    assert loaded.head.weight is loaded.emb.weight and isinstance(loaded.body, SparseLinear)


def test_sparsify_keeps_tied_layers_dense():
    """A layer whose weight another module holds too stays dense (a sparse copy would part the tie), with a warning
    naming it and its mask applied to the shared tensor; the layers around it are converted."""
    torch.manual_seed(0)
    model = _Tied()
    masks = {"body.weight": torch.rand(16, 16) > 0.8, "head.weight": torch.rand(50, 16) > 0.8}
    with pytest.warns(UserWarning, match=r"tied to another module.s.*'head.weight'"):
        pysparse.sparsify(model, masks, min_sparsity=0)
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    assert isinstance(model.body, SparseLinear)
    assert torch.equal(model.emb.weight != 0, masks["head.weight"] & (model.emb.weight != 0))
    assert not model.emb.weight[~masks["head.weight"]].any()
    with pytest.warns(UserWarning, match="'head.weight'"):  # masks=None: the non-zeros, the same rule
        pysparse.sparsify(_Tied(), min_sparsity=0)


class _Shared(nn.Module):
    """One nn.Linear used in two places (registered under two names), as weight-shared blocks do."""

    def __init__(self):
        super().__init__()
        self.first, self.mid = nn.Linear(24, 24), nn.Linear(24, 24)
        self.second = self.first

    def forward(self, x):
        return self.second(torch.relu(self.mid(torch.relu(self.first(x)))))


@pytest.mark.parametrize("masks_by", ["first", "second", "both", "none"])
def test_sparsify_shared_layer_under_every_name(tmp_path, masks_by):
    """A module registered under two names becomes one sparse layer at both (before, the second name kept the
    dense, unmasked layer: a silently wrong model), densify restores one shared dense layer, and a saved file
    loads into a fresh model of the class."""
    torch.manual_seed(0)
    model = _Shared()
    keep = torch.rand(24, 24) > 0.7
    names = {"first": ["first"], "second": ["second"], "both": ["first", "second"], "none": []}[masks_by]
    masks = {f"{n}.weight": keep for n in names} | {"mid.weight": torch.rand(24, 24) > 0.7}
    if masks_by == "none":
        masks = None
        with torch.no_grad():
            model.first.weight.mul_(keep)
            model.mid.weight.mul_(torch.rand(24, 24) > 0.7)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in (masks or {}).items():
            ref.get_parameter(name).mul_(mask)
    pysparse.sparsify(model, masks, min_sparsity=0)
    assert isinstance(model.first, SparseLinear) and model.second is model.first
    assert torch.equal(model.first.mask(), keep)
    x = torch.randn(5, 24)
    torch.testing.assert_close(model(x), ref(x))
    path = tmp_path / "shared.safetensors"
    pysparse.save(model, path)
    loaded = pysparse.load(path, _Shared())
    assert loaded.second is loaded.first and isinstance(loaded.first, SparseLinear)
    torch.testing.assert_close(loaded(x), ref(x))
    pysparse.densify(model)
    assert type(model.first) is nn.Linear and model.second is model.first
    torch.testing.assert_close(model(x), ref(x))


def test_sparsify_shared_layer_named_with_two_masks():
    model = _Shared()
    with pytest.raises(ValueError, match=r"masks\['first.weight'\] and masks\['second.weight'\] name one shared"):
        pysparse.sparsify(model, {"first.weight": torch.rand(24, 24) > 0.5, "second.weight": torch.rand(24, 24) > 0.5})


def test_load_refuses_edited_metadata(tmp_path):
    """The checksum covers the metadata that says how to read the tensors (layers, packing, aliases)."""
    from safetensors import safe_open

    from pysparse import io

    model = _Tied()
    good = tmp_path / "good.safetensors"
    pysparse.save(model, good)
    tensors, meta = io.read_safetensors(good, "x")
    with safe_open(str(good), framework="pt") as f:
        assert f.metadata()["aliases"] == '{"head.weight": "emb.weight"}'
    for key, value in (("aliases", '{"head.weight": "body.weight"}'), ("packed", '{"emb.weight": [50, 16]}'),
                       ("sparse_layers", '{"body": {"type": "SparseLinear", "weight_shape": [16, 16]}}'),
                       ("state_metadata", '{"": {"version": 7}}')):
        assert meta[key] != value
        edited = tmp_path / f"edited_{key}.safetensors"
        io.write_safetensors(tensors, edited, {**meta, key: value})
        with pytest.raises(ValueError, match="modified or corrupted"):
            pysparse.load(edited, _Tied())
    broken = tmp_path / "broken.safetensors"
    bad = {**meta, "aliases": '{"head.weight": "nothing"}'}
    io.write_safetensors(tensors, broken, {**bad, "sha256": io._digest(tensors, io._extra(bad))})
    with pytest.raises(ValueError, match="alias of 'nothing'"):
        pysparse.load(broken, _Tied())


def test_load_refuses_files_that_do_not_fit(tmp_path):
    """A file whose checksum matches (written by other code, or edited and re-summed) but whose tensors do not fit
    the model: a ValueError naming the file and every problem, as for the other bad files (load_state_dict's own
    error was a RuntimeError). Sparse structures are checked as they load (rowptr, column indices, their order)."""
    from pysparse import io

    model, masks = _pruned(nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2)), 0.5)
    pysparse.sparsify(model, {"0.weight": masks["0.weight"]}, min_sparsity=0.0)  # layer 2 stays nn.Linear
    good = tmp_path / "good.safetensors"
    pysparse.save(model, good)
    tensors, meta = io.read_safetensors(good, "x")

    def write(edit):
        t = {k: v.clone() for k, v in tensors.items()}
        edit(t)
        path = tmp_path / "edited.safetensors"
        io.write_safetensors(t, path, {**meta, "sha256": io._digest(t, io._extra(meta))})
        return path

    fresh = lambda: nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))  # noqa: E731
    col, rowptr = tensors["0.col"], tensors["0.rowptr"]
    cases = [
        (lambda t: t["0.col"].__setitem__(0, 8), "invalid sparse structure: a column index is outside"),
        (lambda t: t["0.col"].__setitem__(0, -1), "invalid sparse structure: a column index is outside"),
        (lambda t: t["0.rowptr"].__setitem__(-1, int(rowptr[-1]) + 5), "not a valid row pointer"),
        (lambda t: t.__setitem__("0.values", t["0.values"][:-1].clone()), "values for"),
        (lambda t: t.__setitem__("0.col", col.flip(0).clone()), "canonical order"),
        (lambda t: t.__setitem__("2.weight", torch.zeros(3, 6)), "size mismatch for 2.weight"),
        (lambda t: t.pop("2.bias"), 'Missing key\\(s\\) in state_dict: "2.bias"'),
        (lambda t: t.__setitem__("3.weight", torch.zeros(1)), "Unexpected key"),
    ]
    for edit, match in cases:
        with pytest.raises(ValueError, match=f"edited.safetensors does not fit the model: (.|\\n)*{match}"):
            pysparse.load(write(edit), fresh())
    loaded = pysparse.load(good, fresh())
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: pysparse.sparsify("model"), TypeError, "model must be an nn.Module"),
    (lambda: pysparse.sparsify(nn.Sequential(nn.ReLU())), ValueError, "no nn.Linear, nn.Conv2d or nn.MultiheadAttention"),
    (lambda: pysparse.sparsify(nn.Sequential(nn.Linear(2, 2)), {"1.weight": torch.ones(2, 2, dtype=torch.bool)}),
     ValueError, "not the weight of"),
    (lambda: pysparse.sparsify(nn.Sequential(nn.Linear(2, 2)), {"0.weight": torch.ones(3, 2, dtype=torch.bool)}),
     ValueError, r"masks\['0.weight'\] has shape"),
    (lambda: pysparse.sparsify(nn.Sequential(nn.Linear(2, 2)), {"0.weight": torch.ones(2, 2)}), TypeError,
     "must be a bool tensor"),
    (lambda: pysparse.sparsify(nn.Sequential(nn.Linear(2, 2)), min_sparsity=2), ValueError, "min_sparsity"),
    (lambda: pysparse.save("model", "x.safetensors"), TypeError, "model must be an nn.Module"),
    (lambda: pysparse.densify(None), TypeError, "model must be an nn.Module"),
    (lambda: pysparse.load("x.safetensors", "model"), TypeError, "model must be an nn.Module"),
    (lambda: pysparse.sparsify(nn.Linear(2, 2)), ValueError, "for a lone layer use SparseLinear.from_dense"),
    (lambda: pysparse.csr.structure(torch.ones(2, 2)), ValueError, "2-D bool tensor"),
    (lambda: pysparse.csr.structure(torch.ones(2, dtype=torch.bool)), ValueError, "2-D bool tensor"),
    (lambda: pysparse.csr.compress_rows(torch.ones(2, 2)), ValueError, "2-D bool tensor"),
    (lambda: pysparse.csr.compress_rows(torch.ones(2, dtype=torch.bool)), ValueError, "2-D bool tensor"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


class _Versioned(nn.Module):
    """A module whose loading reads its saved ``_version`` from the state dict's metadata (as torchvision's
    MNASNet does): it records what it was given."""
    _version = 3

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 8)
        self.seen = "nothing"

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        self.seen = local_metadata.get("version")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x):
        return self.fc(x)


def test_load_gives_modules_their_saved_versions(tmp_path, monkeypatch):
    """The state dict's metadata (each module's ``_version``) travels in the file, as with torch.save of a state
    dict: a module that changed its format since reads the version it was saved with; a file of format 2 (no
    versions stored) loads with the model's own."""
    from pysparse import io

    torch.manual_seed(0)
    model = nn.Sequential(_Versioned())
    pysparse.sparsify(model, {"0.fc.weight": torch.rand(8, 32) > 0.9}, min_sparsity=0.0)
    path = tmp_path / "m.safetensors"
    pysparse.save(model, path)
    monkeypatch.setattr(_Versioned, "_version", 4)  # the code moved on after the file was written
    loaded = pysparse.load(path, nn.Sequential(_Versioned()))
    assert loaded[0].seen == 3 and isinstance(loaded[0].fc, SparseLinear)
    x = torch.randn(5, 32)
    torch.testing.assert_close(loaded(x), model(x))
    tensors, meta = io.read_safetensors(path, "x")
    old = {k: v for k, v in meta.items() if k not in ("state_metadata", "sha256")}
    old["version"] = "2"
    io.write_safetensors(tensors, tmp_path / "v2.safetensors", {**old, "sha256": io._digest(tensors, io._extra(old))})
    loaded = pysparse.load(tmp_path / "v2.safetensors", nn.Sequential(_Versioned()))
    assert loaded[0].seen == 4
    torch.testing.assert_close(loaded(x), model(x))
    bad = {**meta, "state_metadata": '{"": 3}'}
    io.write_safetensors(tensors, tmp_path / "bad.safetensors", {**bad, "sha256": io._digest(tensors, io._extra(bad))})
    with pytest.raises(ValueError, match="unreadable layer metadata"):
        pysparse.load(tmp_path / "bad.safetensors", nn.Sequential(_Versioned()))


def test_mnasnet_sparsified_saves_and_loads(tmp_path):
    """torchvision's MNASNet refuses a state dict without its version (its _load_from_state_dict raises)."""
    torch.manual_seed(0)
    model, masks = _pruned(torchvision.models.mnasnet0_5(num_classes=10), 0.9)
    pysparse.sparsify(model, masks, min_sparsity=0.0)
    pysparse.save(model, tmp_path / "mnasnet.safetensors")
    loaded = pysparse.load(tmp_path / "mnasnet.safetensors", torchvision.models.mnasnet0_5(num_classes=10).eval())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
