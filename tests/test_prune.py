import copy
import math

import pytest
import torch
from torch import nn

import pysparse
from pysparse.prune import METHODS, prunable_parameters


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 64, 10))


def _data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


LOSS = nn.functional.cross_entropy


@pytest.mark.parametrize("make", [_mlp, _cnn])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_exactly_and_applies(make, method):
    model = make()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = pysparse.prune(model, method, sparsity=0.8, data=_data(), loss_fn=LOSS, num_batches=3, min_density=0.0,
                            generator=torch.Generator().manual_seed(0))
    total = sum(m.numel() for m in result.masks.values())
    assert result.params == total and total - result.kept == round(0.8 * total)
    for name, p in model.named_parameters():
        if name in result.masks:
            mask = result.masks[name]
            assert torch.equal(p.detach(), before[name] * mask)
            assert result.scores[name].shape == p.shape and result.scores[name].dtype == torch.float32
        else:  # biases and norms are never pruned
            assert torch.equal(p.detach(), before[name])
    assert "total" in result.table() and '"sparsity"' in result.to_json()


def test_scores_are_the_saliencies():
    model, data = _mlp(), _data()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    abs_grads = {n: torch.zeros_like(w) for n, w in weights.items()}   # mean over batches of |g_b|
    abs_taylor = {n: torch.zeros_like(w) for n, w in weights.items()}  # mean over batches of |g_b * w|
    squares = {n: torch.zeros_like(w) for n, w in weights.items()}     # mean over batches of g_b^2 (Fisher)
    for x, y in data:
        model.zero_grad()
        LOSS(model(x), y).backward()
        for n, p in model.named_parameters():
            if n in weights:
                abs_grads[n] += p.grad.abs() / len(data)
                abs_taylor[n] += (p.grad * weights[n]).abs() / len(data)
                squares[n] += p.grad ** 2 / len(data)
    kw = dict(sparsity=0.5, data=data, loss_fn=LOSS, num_batches=3, apply=False)
    checks = {
        "magnitude": lambda n: weights[n].abs(),
        "gradient": lambda n: abs_grads[n],
        "taylor": lambda n: abs_taylor[n],
        "hessian": lambda n: 0.5 * squares[n] * weights[n] ** 2,
    }
    for method, want in checks.items():
        result = pysparse.prune(copy.deepcopy(model), method, **kw)
        for n in weights:
            torch.testing.assert_close(result.scores[n], want(n), rtol=1e-4, atol=1e-7)


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    """Loss 0.5 * sum((W x)^2) over one-hot inputs x: the Hessian is diagonal, h[o, i] = mean(x_i^2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, bias=False))
    xs = torch.eye(6)[torch.tensor([0, 2, 2, 5])] * torch.tensor([[1.0], [2.0], [3.0], [1.5]])
    data = [(xs, torch.zeros(4))]
    loss_fn = lambda out, _: 0.5 * out.pow(2).sum() / out.shape[0]  # noqa: E731
    result = pysparse.prune(model, "hessian", sparsity=0.5, data=data, loss_fn=loss_fn, hessian_estimator="hutchinson",
                            hutchinson_samples=3, apply=False, generator=torch.Generator().manual_seed(0))
    h = (xs ** 2).mean(0).expand(4, 6)
    torch.testing.assert_close(result.scores["0.weight"], 0.5 * h * model[0].weight.detach() ** 2)


def test_wanda_scales_by_input_norms():
    model, data = _mlp(), _data(1)
    result = pysparse.prune(model, "wanda", sparsity=0.5, data=data, apply=False)
    x = data[0][0].flatten(1)
    torch.testing.assert_close(result.scores["1.weight"], model[1].weight.detach().abs() * x.norm(dim=0)[None, :])


def test_layer_scope_overrides_and_min_density():
    model = _mlp()
    result = pysparse.prune(model, "magnitude", sparsity=0.5, scope="layer", layer_sparsity={"3.weight": 0.9})
    got = {r.name: r.sparsity for r in result.layers}
    assert got["1.weight"] == 0.5 and abs(got["3.weight"] - 0.9) < 1e-3 and got["5.weight"] == 0.5
    # a layer whose weights are all tiny keeps at least min_density of them under global ranking
    model = _mlp()
    with torch.no_grad():
        model[5].weight.mul_(1e-6)
    result = pysparse.prune(model, "magnitude", sparsity=0.7, min_density=0.05)
    kept = {r.name: r.kept for r in result.layers}
    assert kept["5.weight"] == math.ceil(0.05 * 320)
    assert result.params - result.kept == round(0.7 * result.params)


def test_report_follows_replaced_masks():
    result = pysparse.prune(_mlp(), "magnitude", sparsity=0.5)
    result.masks = {n: torch.zeros_like(m) for n, m in result.masks.items()}
    assert result.kept == 0 and result.sparsity == 1.0 and all(r.kept == 0 for r in result.layers)
    assert result.layers[0].kind == "Linear"


def test_threshold_rule():
    model = _mlp()
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if n.endswith("weight")}
    result = pysparse.prune(model, "magnitude", threshold=0.05, min_density=0.0)
    for n, s in scores.items():
        assert torch.equal(result.masks[n], s >= 0.05)


def test_nm_and_channel_patterns():
    model = _mlp()
    result = pysparse.prune(model, "magnitude", pattern="2:4")
    for n, m in result.masks.items():
        assert bool((m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all())
    model = _cnn()
    result = pysparse.prune(model, "magnitude", sparsity=0.5, pattern="channel", exclude=["6"], min_density=0.0)
    for n, m in result.masks.items():
        rows = m.reshape(m.shape[0], -1)
        assert bool((rows.all(1) | ~rows.any(1)).all())  # whole output channels
    assert "6.weight" not in result.masks


def test_channels_are_ranked_by_summed_saliency():
    """A row of 8 weights of 0.3 (sum 2.4, mean 0.3) outranks a row of 2 weights of 0.5 (sum 1.0)."""
    model = nn.Sequential(nn.Linear(8, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(0.3)
        model[1].weight.fill_(-0.5)
    result = pysparse.prune(model, "magnitude", sparsity=0.5, pattern="channel", min_density=0.0)
    assert bool(result.masks["0.weight"].all()) and not bool(result.masks["1.weight"].any())
    result = pysparse.prune(_mlp(), "magnitude", threshold=3.5, pattern="channel", min_density=0.0, apply=False)
    kept = []
    for n, (_, p) in prunable_parameters(_mlp()).items():
        assert torch.equal(result.masks[n][:, 0], p.detach().abs().sum(1) >= 3.5)
        kept.append(result.masks[n][:, 0].float().mean())
    assert min(kept) < 0.9 and max(kept) > 0.1  # the threshold falls inside the range of row sums


def test_progress_bars(capsys):
    model = _mlp()
    pysparse.prune(model, "taylor", sparsity=0.5, data=_data(), loss_fn=LOSS, num_batches=3, compensate=True,
                   progress=True)
    err = capsys.readouterr().err
    assert "score (taylor)" in err and "compensate" in err


def test_exclude_by_type_name_and_pattern():
    model = _cnn()
    assert set(pysparse.prune(copy.deepcopy(model), "magnitude", sparsity=0.5, exclude=[nn.Conv2d]).masks) == {"6.weight"}
    assert set(pysparse.prune(copy.deepcopy(model), "magnitude", sparsity=0.5, exclude=["0", "3.weight"]).masks) == \
        {"6.weight"}
    assert set(pysparse.prune(copy.deepcopy(model), "magnitude", sparsity=0.5, exclude=[r"[03]\.weight"]).masks) == \
        {"6.weight"}
    # a lone name or type is one entry (a string was once iterated as its characters, excluding nothing)
    assert set(pysparse.prune(copy.deepcopy(model), "magnitude", sparsity=0.5, exclude="6").masks) == \
        {"0.weight", "3.weight"}
    assert set(pysparse.prune(copy.deepcopy(model), "magnitude", sparsity=0.5, exclude=nn.Conv2d).masks) == {"6.weight"}


@pytest.mark.parametrize("method, compensate", [("magnitude", False), ("taylor", False), ("hessian", True)])
def test_tied_weight_is_pruned_once(method, compensate):
    """A weight tied between two layers is one tensor: one mask, counted once in the report (it was counted twice,
    and compensate's functional_call refused the two names)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model[3].weight = model[1].weight
    result = pysparse.prune(model, method, sparsity=0.75, data=_data(), loss_fn=LOSS, compensate=compensate)
    assert set(result.masks) == {"1.weight", "5.weight"}
    assert result.params == 64 * 64 + 10 * 64 and result.params - result.kept == round(0.75 * result.params)
    assert model[3].weight is model[1].weight
    assert torch.equal(model[1].weight != 0, result.masks["1.weight"])
    x = torch.randn(4, 1, 8, 8)
    ref = model(x)
    with pytest.warns(UserWarning, match="tied"):  # sparsify keeps the tied layer dense, the mask applied
        pysparse.sparsify(model, result.masks, min_sparsity=0.0)
    assert model[3].weight is model[1].weight and isinstance(model[5], pysparse.SparseLinear)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_masks_feed_sparsify():
    model = _mlp()
    result = pysparse.prune(model, "taylor", sparsity=0.9, data=_data(), loss_fn=LOSS)
    x = torch.randn(4, 1, 8, 8)
    ref = model(x)
    pysparse.sparsify(model, result.masks, min_sparsity=0.0)
    assert isinstance(model[1], pysparse.SparseLinear)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(method="magnitude"), ValueError, "exactly one of sparsity= or threshold="),
    (dict(method="magnitude", sparsity=0.5, threshold=0.1), ValueError, "exactly one of"),
    (dict(method="magnitude", sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    (dict(method="magnitude", sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\)"),
    (dict(method="magnitude", sparsity="half"), TypeError, "sparsity must be a real number"),
    (dict(method="obs", sparsity=0.5), ValueError, "method must be one of"),
    (dict(method="magnitude", sparsity=0.5, pattern="blocks"), ValueError, "pattern must be"),
    (dict(method="magnitude", sparsity=0.5, pattern="2:4"), ValueError, "fixes the sparsity itself"),
    (dict(method="magnitude", pattern="2:7"), ValueError, "not divisible by 7"),
    (dict(method="magnitude", sparsity=0.5, scope="model"), ValueError, "scope must be"),
    (dict(method="taylor", sparsity=0.5), ValueError, "needs data="),
    (dict(method="taylor", sparsity=0.5, data=[]), ValueError, "needs loss_fn=|yielded no batch"),
    (dict(method="taylor", sparsity=0.5, data=[], loss_fn=LOSS), ValueError, "data yielded no batch"),
    (dict(method="taylor", sparsity=0.5, data=[torch.zeros(2)], loss_fn=LOSS), ValueError, r"\(inputs, targets\)"),
    (dict(method="hessian", sparsity=0.5, hessian_estimator="exact"), ValueError, "hessian_estimator"),
    (dict(method="magnitude", sparsity=0.5, layer_sparsity={"9.weight": 0.5}), ValueError, "not prunable"),
    (dict(method="magnitude", sparsity=0.5, exclude=[nn.Linear]), ValueError, "nothing to prune"),
    (dict(method="magnitude", sparsity=0.5, exclude=["fc"]), ValueError, "exclude entry 'fc' matches no module"),
    (dict(method="magnitude", sparsity=0.5, exclude=["0.weigth"]), ValueError, "matches no module or parameter"),
    (dict(method="magnitude", sparsity=0.5, exclude=["0["]), ValueError, "nor a valid regular expression"),
    (dict(method="magnitude", sparsity=0.5, exclude=[int]), TypeError, "nn.Module subclasses or names"),
    (dict(method="magnitude", sparsity=0.5, exclude=3), TypeError, "exclude must be a list"),
    (dict(method="magnitude", threshold=0.1, scope="layer"), ValueError, "no scope='layer'"),
    (dict(method="magnitude", sparsity=0.99, min_density=0.5), ValueError, "more weights than min_density"),
    (dict(method="magnitude", sparsity=0.5, num_batches=0), ValueError, "num_batches"),
])
def test_bad_input_leaves_model_unchanged(kwargs, exc, match):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        pysparse.prune(model, **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_errors_name_every_layer_they_concern():
    """2:4 on a model with depthwise convolutions names the layers and how many more; wanda on a model whose
    forward skips a layer (an auxiliary head in eval mode) names it and says why."""
    torch.manual_seed(0)
    convs = nn.Sequential(*[nn.Conv2d(8, 8, 3, groups=8) for _ in range(5)], nn.Conv2d(8, 8, 1))
    with pytest.raises(ValueError, match=r"\['0.weight', '1.weight', '2.weight'\] and 2 more .*depthwise"):
        pysparse.prune(convs, "magnitude", pattern="2:4")
    result = pysparse.prune(convs, "magnitude", pattern="2:4", exclude=[r"[0-4]\.weight"])
    assert list(result.masks) == ["5.weight"]

    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.aux = _mlp(), nn.Linear(48, 10)

        def forward(self, x):
            return self.body(x)  # (aux: only in training, as GoogLeNet's)

    model = WithAux()
    with pytest.raises(ValueError, match="layer of aux.weight saw no input .* exclude it"):
        pysparse.prune(model, "wanda", sparsity=0.5, data=_data())
    result = pysparse.prune(model, "wanda", sparsity=0.5, data=_data(), exclude=["aux"])
    assert "aux.weight" not in result.masks and len(result.masks) == 3


def test_nan_weights_and_gradients_are_refused():
    model = _mlp()
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="the weight 1.weight contains NaN or inf"):
        pysparse.prune(model, "magnitude", sparsity=0.5)
    model = _mlp()
    bad = [(torch.full((4, 1, 8, 8), float("inf")), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(ValueError, match="contains NaN or inf"):
        pysparse.prune(model, "taylor", sparsity=0.5, data=bad, loss_fn=LOSS)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pysparse.prune("model", "magnitude", sparsity=0.5)
