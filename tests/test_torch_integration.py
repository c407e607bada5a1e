"""The ops behave as first-class torch ops: schema, fake kernels, autograd registration, torch.compile."""
import pytest
import torch

import pysparse
from pysparse import reference
from pysparse.testing import DEVICES


def _samples(device):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    w, g, h = r(8, 12), r(8, 12), r(8, 12)
    ops = torch.ops.pysparse
    return [
        (ops.saliency.default, (w, "magnitude", None, None)),
        (ops.saliency.default, (w, "taylor", g, None)),
        (ops.saliency.default, (w.half(), "hessian", None, h.half())),
        (ops.saliency.default, (w.clone().requires_grad_(), "taylor", g.clone().requires_grad_(), None)),
        (ops.sparsity_masks.default, ([w, g[:3], h.bfloat16()], 57)),
        (ops.threshold_masks.default, ([w, g], 0.25)),
        (ops.nm_masks.default, (w, 2, 4)),
        (ops.nm_masks.default, (r(4, 8, 3, 3), 1, 4)),
        (ops.apply_mask_.default, (w > 0, [w.clone(), g.clone().half()])),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_fake_kernels_on_meta(device):
    w = torch.empty(5, 6, device="meta")
    assert pysparse.saliency(w, "magnitude").shape == (5, 6)
    masks = pysparse.sparsity_masks([w, torch.empty(3, device="meta")], 0.5)
    assert [m.shape for m in masks] == [(5, 6), (3,)] and masks[0].dtype == torch.bool
    with pytest.raises(ValueError, match="grad has shape"):
        pysparse.saliency(w, "taylor", grad=torch.empty(2, device="meta"))


def _prune_step(w, g, exp_avg):
    """One pruning step as a user writes it: score, select globally, mask weight and optimizer state."""
    scores = pysparse.saliency(w, "taylor", grad=g)
    (mask,) = pysparse.sparsity_masks([scores], 0.75)
    kept = pysparse.apply_mask_(mask, w, exp_avg)
    nm = pysparse.nm_masks(scores, 2, 4)
    (thr,) = pysparse.threshold_masks([scores], 0.1)
    return mask, nm, thr, kept


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    w, g, e = (torch.randn(16, 32, generator=gen).to(device) for _ in range(3))
    w2, e2 = w.clone(), e.clone()
    compiled = torch.compile(_prune_step, fullgraph=True)
    mask, nm, thr, kept = compiled(w, g, e)
    rmask, rnm, rthr, rkept = _prune_step(w2, g, e2)
    assert torch.equal(mask, rmask) and torch.equal(nm, rnm) and torch.equal(thr, rthr)
    assert int(kept) == rkept == 16 * 32 // 4
    assert torch.equal(w, w2) and torch.equal(e, e2)  # the in-place masking happened under compile too
    assert torch.equal(mask, reference.sparsity_masks([reference.saliency(w2, "taylor", grad=g)], 0.75)[0])


def test_compile_saliency_backward():
    torch._dynamo.reset()
    w = torch.randn(6, 7, requires_grad=True)
    h = torch.rand(6, 7)
    f = torch.compile(lambda w, h: pysparse.saliency(w, "hessian", hessian=h).sum(), fullgraph=True)
    f(w, h).backward()
    torch.testing.assert_close(w.grad, h * w.detach())


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("path", ["kernels", "dense"])
def test_export_sparse_model_with_dynamic_batch(tmp_path, path, strict):
    """torch.export of a sparsified model: one program for every batch size (the convolution takes its direct
    kernel under export rather than choosing by batch), saved and loaded with torch.export.save / load; the eager
    model is unchanged afterwards (export traces with fake tensors: none may stay in the layers' caches)."""
    import copy

    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 10))
    masks = {n: torch.rand_like(p) > 0.7 for n, p in model.named_parameters() if p.dim() > 1}
    pysparse.sparsify(model, masks, min_sparsity=0)
    for m in model.modules():
        if isinstance(m, (pysparse.SparseLinear, pysparse.SparseConv2d)):
            m.dense_below = 0.0 if path == "kernels" else 1.0
    model.eval()
    twin = copy.deepcopy(model)  # never exported
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.randn(2, 3, 8, 8),), dynamic_shapes={"input": {0: batch}},
                                  strict=strict)
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    with torch.no_grad():
        for n in (1, 2, 13, 64):  # the im2col / direct switch would sit at 128 / 9 images
            x = torch.randn(n, 3, 8, 8)
            expected = twin(x)
            torch.testing.assert_close(program.module()(x), expected)
            torch.testing.assert_close(loaded(x), expected)
            torch.testing.assert_close(model(x), expected)


def test_jit_trace_raises_a_clear_error():
    """TorchScript is deprecated and unsupported; torch.jit.trace names the alternatives."""
    from torch import nn

    model = nn.Sequential(pysparse.SparseLinear(8, 4, sparsity=0.5), nn.ReLU())
    with pytest.raises(RuntimeError, match="does not support torch.jit.trace .* use torch.export or torch.compile"):
        torch.jit.trace(model, torch.randn(2, 8))


def test_fx_symbolic_trace_records_each_sparse_layer_as_one_call():
    """torch.fx (and torchvision's create_feature_extractor, built on it) records the sparse layers as it records
    torch's own, one call_module node each (their forwards pick kernels by shape: control flow a symbolic trace
    refuses); the GraphModule calls the same layer objects and computes what the model does."""
    import copy

    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = F.relu(self.conv(x)).flatten(2).transpose(1, 2)  # [N, 16 positions, 8 channels]
            a, _ = self.attn(x, x, x, need_weights=False)
            return self.fc((x + a).mean(1))

    torch.manual_seed(0)
    model = Net().eval()
    masks = pysparse.prune(model, "magnitude", sparsity=0.8).masks
    dense = copy.deepcopy(model)
    pysparse.sparsify(model, masks, min_sparsity=0)
    assert isinstance(model.attn, pysparse.SparseMultiheadAttention) and isinstance(model.fc, pysparse.SparseLinear)
    graph = torch.fx.symbolic_trace(model)
    calls = [n.target for n in graph.graph.nodes if n.op == "call_module"]
    assert calls == ["conv", "attn", "fc"]
    for name in calls:
        assert graph.get_submodule(name) is model.get_submodule(name)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(graph(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(graph(x), dense(x), rtol=1e-5, atol=1e-5)


def test_torchvision_feature_extractor_on_a_sparsified_model():
    import copy

    torchvision = pytest.importorskip("torchvision")
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    masks = pysparse.prune(model, "magnitude", sparsity=0.9, scope="layer").masks
    dense = copy.deepcopy(model)
    pysparse.sparsify(model, masks)
    nodes = {"layer2": "mid", "fc": "out"}
    sparse_fe, dense_fe = create_feature_extractor(model, nodes), create_feature_extractor(dense, nodes)
    assert not sparse_fe.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = sparse_fe(x), dense_fe(x)
    for k in nodes.values():
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)
