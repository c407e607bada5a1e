"""Weight compensation after one-shot pruning (pysparse.compensate, prune(..., compensate=True))."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pysparse
from pysparse import data, models
from pysparse.compensate import compensate

LOSS = F.cross_entropy


def _batches(shape, n=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g, dtype=dtype), torch.zeros(shape[0], dtype=torch.long))
            for _ in range(n)]


def _prefix_masks(weight, seed=0):
    """Each row drops a prefix of its columns (a different length per row). The OBS sweep meets every removed
    weight before any kept one, so all kept weights stay free: the result is the exact constrained optimum."""
    rows, d = weight.shape[0], weight[0].numel()
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, d - 1, (rows,), generator=g)
    return (torch.arange(d)[None, :] >= k[:, None]).reshape(weight.shape)


def test_linear_matches_the_constrained_least_squares_optimum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 7, bias=False)).double()
    w = model[0].weight.detach().clone()
    batches = _batches((50, 20), n=3, dtype=torch.double)
    x = torch.cat([b[0] for b in batches])
    mask = _prefix_masks(w)
    report = compensate(model, {"0.weight": mask}, batches, damp=1e-10)
    got = model[0].weight.detach()
    for r in range(w.shape[0]):
        keep = mask[r]
        sol = torch.linalg.lstsq(x[:, keep], x @ w[r]).solution  # min ||X_K w'_K - X w||
        torch.testing.assert_close(got[r, keep], sol, rtol=1e-6, atol=1e-8)
        assert torch.all(got[r, ~keep] == 0)
    err = lambda a: float(((x @ a.T - x @ w.T) ** 2).sum() / ((x @ w.T) ** 2).sum())  # noqa: E731
    assert report["0.weight"]["masked"] == pytest.approx(err(w * mask), rel=1e-6)
    assert report["0.weight"]["compensated"] == pytest.approx(err(got), rel=1e-6)
    assert report["0.weight"]["compensated"] < report["0.weight"]["masked"]


def test_rows_the_sweep_makes_worse_are_solved_exactly_or_keep_the_masked_weights(monkeypatch):
    """The OBS sweep (columns fixed in turn) can end a row worse than plain masking; such a row is solved exactly
    on its kept columns (ridge included) while that is cheap (EXACT_FLOPS), else keeps the masked weights; the
    other rows keep the sweep's, and the report counts what was written."""
    from pysparse import compensate as module

    torch.manual_seed(0)
    mix = torch.randn(20, 20, dtype=torch.double)  # correlated inputs: kept weights can stand in for pruned ones
    batches = [(torch.randn(50, 20, dtype=torch.double) @ mix, None) for _ in range(3)]
    x = torch.cat([b[0] for b in batches])
    w = torch.randn(7, 20, dtype=torch.double)
    mask = torch.rand(w.shape) > 0.5
    sweep = module._sweep

    def spoiled(*args):  # the sweep's rows 0 and 3 pushed far off (kept weights only)
        out = sweep(*args)
        out[:, [0, 3]] += 10.0 * mask[[0, 3]]
        return out

    monkeypatch.setattr(module, "_sweep", spoiled)
    row_err = lambda a: ((x @ a.T - x @ w.T) ** 2).sum(0)  # noqa: E731
    energy = float(((x @ w.T) ** 2).sum())
    others = [1, 2, 4, 5, 6]
    damp = 1e-3
    lam = damp * float((x * x).sum(0).mean())
    for budget in (module.EXACT_FLOPS, 0):
        monkeypatch.setattr(module, "EXACT_FLOPS", budget)
        model = nn.Sequential(nn.Linear(20, 7, bias=False)).double()
        with torch.no_grad():
            model[0].weight.copy_(w)
        report = compensate(model, {"0.weight": mask}, batches, damp=damp)
        got = model[0].weight.detach()
        for r in (0, 3):
            k = mask[r]
            if budget:
                xk = x[:, k]
                want = torch.linalg.solve(xk.T @ xk + lam * torch.eye(int(k.sum()), dtype=x.dtype),
                                          xk.T @ (x @ w[r]) + lam * w[r, k])
                torch.testing.assert_close(got[r, k], want, rtol=1e-6, atol=1e-9)
                assert row_err(got)[r] < row_err(w * mask)[r]
            else:
                assert torch.equal(got[r], (w * mask)[r])
        assert torch.all(row_err(got)[others] <= row_err(w * mask)[others]) and torch.all(got[~mask] == 0)
        if budget:  # (without the exact solves, rows the sweep itself left worse are only masked)
            assert float(row_err(got)[others].sum()) < 0.8 * float(row_err(w * mask)[others].sum())
        assert report["0.weight"]["compensated"] == pytest.approx(float(row_err(got).sum()) / energy, rel=1e-6)


def test_any_mask_lies_between_plain_masking_and_the_per_row_optimum():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(24, 9, bias=False)).double()
    w = model[0].weight.detach().clone()
    batches = _batches((40, 24), n=3, seed=1, dtype=torch.double)
    x = torch.cat([b[0] for b in batches])
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) > 0.6
    compensate(model, {"0.weight": mask}, batches, damp=1e-10)
    got = model[0].weight.detach()
    assert torch.all(got[~mask] == 0)
    for r in range(w.shape[0]):
        keep = mask[r]
        best = torch.linalg.lstsq(x[:, keep], x @ w[r]).solution
        e = lambda v: float(((x[:, keep] @ v - x @ w[r]) ** 2).sum())  # noqa: E731
        assert e(best) <= e(got[r, keep]) * (1 + 1e-9) + 1e-12
        assert e(got[r, keep]) <= e(w[r, keep]) * (1 + 1e-9) + 1e-12


@pytest.mark.parametrize("conv", [
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, groups=2, padding_mode="reflect"),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding="same", dilation=2, groups=4),
    dict(in_channels=3, out_channels=5, kernel_size=(2, 3), padding=(1, 0), padding_mode="circular"),
])
def test_conv_is_stationary_at_the_kept_weights(conv):
    """With a prefix mask the compensated conv weight minimises ||conv(x, W') - conv(x, W)||^2 over the kept
    weights: the gradient there, computed by F.conv2d's autograd (not by the unfolded columns), vanishes."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(bias=False, **conv)).double()
    w = model[0].weight.detach().clone()
    batches = _batches((6, conv["in_channels"], 9, 9), n=2, seed=2, dtype=torch.double)
    mask = _prefix_masks(w, seed=4)
    report = compensate(model, {"0.weight": mask}, batches, damp=1e-12)
    got = model[0].weight.detach()
    assert torch.all(got[~mask] == 0)
    x = torch.cat([b[0] for b in batches])
    ref = model[0]._conv_forward(x, w, None)

    def loss(weight):
        return ((model[0]._conv_forward(x, weight, None) - ref) ** 2).sum()

    a = (w * mask).clone().requires_grad_()
    g0 = torch.autograd.grad(loss(a), a)[0][mask].abs().max()
    b = got.clone().requires_grad_()
    g1 = torch.autograd.grad(loss(b), b)[0][mask].abs().max()
    assert g1 < 1e-6 * g0
    energy = float((ref ** 2).sum())
    assert report["0.weight"]["compensated"] == pytest.approx(float(loss(got)) / energy, rel=1e-6, abs=1e-12)
    assert report["0.weight"]["masked"] == pytest.approx(float(loss(w * mask)) / energy, rel=1e-6)


def test_calibration_columns_are_built_in_chunks(monkeypatch):
    """The same result when the unfolded columns are built a sample at a time (large images) as all at once."""
    from pysparse import compensate as module

    torch.manual_seed(5)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2)).double()
    batches = _batches((5, 3, 10, 10), n=2, seed=5, dtype=torch.double)
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) > 0.5
             for n, p in base.named_parameters() if n.endswith("weight")}
    whole, chunked = copy.deepcopy(base), copy.deepcopy(base)
    r1 = compensate(whole, masks, batches)
    monkeypatch.setattr(module, "CHUNK_BYTES", 1)  # one sample per chunk
    r2 = compensate(chunked, masks, batches)
    for a, b in zip(whole.parameters(), chunked.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert r1.keys() == r2.keys()


def test_nothing_pruned_leaves_the_weights_as_they_were():
    model = models.cnn()
    before = copy.deepcopy(model.state_dict())
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if n.endswith("weight")}
    report = compensate(model, masks, _batches((8, 1, 8, 8)))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=1e-5, atol=1e-6)
    assert all(r["masked"] == pytest.approx(0, abs=1e-9) for r in report.values())


def test_prune_with_compensation_restores_accuracy_on_digits():
    """The MLP of the quality benchmark, Taylor-pruned to 80% one-shot: compensation on 8 calibration batches
    recovers most of what the pruning lost (RESULTS.md: 95.1 -> 97.5 over three seeds)."""
    split = data.load("digits", test_size=0.3, seed=0)
    test = data.loader(split.test, 512)
    torch.manual_seed(0)
    dense = models.mlp()
    pysparse.train(dense, data.loader(split.train, 64, shuffle=True, seed=0), epochs=20, lr=0.05)
    acc = {}
    for comp in (False, True):
        m = copy.deepcopy(dense)
        r = pysparse.prune(m, "taylor", sparsity=0.8, data=data.loader(split.train, 64, shuffle=True, seed=1000),
                           loss_fn=LOSS, num_batches=8, min_density=0.0, compensate=comp)
        for name, p in m.named_parameters():
            if name in r.masks:
                assert torch.all(p.detach()[~r.masks[name]] == 0)
        acc[comp] = pysparse.accuracy(m, test)
        if comp:
            assert set(r.reconstruction) == set(r.masks) and r.settings["compensate"] is True
            assert all(v["compensated"] < v["masked"] for v in r.reconstruction.values())
            assert "reconstruction" in r.to_json()
    assert acc[True] > acc[False] + 0.01


def test_norm_layers_train_mode_and_unreached_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                      nn.Linear(8 * 64, 10))
            self.unused = nn.Linear(5, 5)  # never called by forward: masked, not refitted

        def forward(self, x):
            return self.body(x)

    torch.manual_seed(0)
    model = Net().train()
    bn = copy.deepcopy(model.body[1].state_dict())
    r = pysparse.prune(model, "magnitude", sparsity=0.7, data=_batches((16, 1, 8, 8)), num_batches=4,
                       min_density=0.0, compensate=True)
    assert model.training and torch.equal(model.body[1].running_mean, bn["running_mean"])  # ran in eval mode
    assert "unused.weight" not in r.reconstruction and torch.all(model.unused.weight[~r.masks["unused.weight"]] == 0)
    for name, p in model.named_parameters():
        if name in r.masks:
            assert torch.all(p.detach()[~r.masks[name]] == 0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(compensate=True), "compensate=True needs data="),
    (dict(compensate=True, data=[(torch.randn(4, 1, 8, 8), torch.zeros(4))], apply=False), "needs apply=True"),
    (dict(compensate=True, data=[(torch.randn(4, 1, 8, 8), torch.zeros(4))], damp=0.0), "damp must be"),
    (dict(compensate=True, data=[(torch.randn(4, 1, 8, 8), torch.zeros(4))], damp=float("inf")), "damp must be"),
    (dict(compensate="yes", data=[(torch.randn(4, 1, 8, 8), torch.zeros(4))]), "compensate must be a bool"),
    (dict(compensate=True, data=[(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4))]),
     "calibration inputs of 1.weight contain NaN"),
])
def test_bad_input_leaves_the_model_unchanged(kwargs, match):
    torch.manual_seed(0)
    model = models.mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        pysparse.prune(model, "magnitude", sparsity=0.5, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="not the weight of an nn.Linear"):
        compensate(model, {"1.bias": torch.ones(300, dtype=torch.bool)}, [(torch.randn(2, 1, 8, 8), None)])
    ok_mask = {"1.weight": torch.ones(300, 64, dtype=torch.bool)}
    for masks, batches, kw, exc, match in [
        (ok_mask, [], {}, ValueError, "batches yielded no batch"),
        ({"1.weight": torch.ones(300, 63, dtype=torch.bool)}, [(torch.randn(2, 1, 8, 8), None)], {}, ValueError,
         r"masks\['1.weight'\] has shape"),
        ({"1.weight": torch.ones(300, 64)}, [(torch.randn(2, 1, 8, 8), None)], {}, TypeError, "must be a bool tensor"),
        (ok_mask, [(torch.randn(2, 1, 8, 8), None)], dict(damp=-1.0), ValueError, "damp must be"),
    ]:
        with pytest.raises(exc, match=match):
            compensate(model, masks, batches, **kw)
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k])
