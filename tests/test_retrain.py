import copy

import pytest
import torch
from torch import nn

import pysparse


def _setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 10, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    return model, data


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_connectivity_keeps_pruned_weights_grads_and_state_zero(optimizer):
    model, data = _setup()
    result = pysparse.prune(model, "magnitude", sparsity=0.7)
    masks = result.masks
    seen = []

    def spy_factory(params):
        opt = torch.optim.Adam(params, lr=1e-2, weight_decay=1e-3) if optimizer == "adam" else \
            torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-3)
        original = opt.step

        def step(*a, **k):
            out = original(*a, **k)
            seen.append(copy.deepcopy({n: p.detach() for n, p in model.named_parameters()}))
            return out
        opt.step = step
        return opt

    out = pysparse.retrain(model, masks, "connectivity", data, epochs=5, lr=0.05, optimizer=spy_factory,
                           eval_data=data)
    assert out.losses[-1] < out.losses[0]
    assert out.accuracy_after >= out.accuracy_before
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        assert int(torch.count_nonzero(params[name][~mask])) == 0
        assert params[name].grad is None or int(torch.count_nonzero(params[name].grad[~mask])) == 0
    # weights are re-masked after every step (the spy saw them before re-masking: the optimizer may not move
    # them, because their grads were zeroed before the step)
    for state in seen:
        for name, mask in masks.items():
            assert int(torch.count_nonzero(state[name][~mask])) == 0


def test_connectivity_optimizer_state_is_masked():
    model, data = _setup(1)
    masks = pysparse.prune(model, "magnitude", sparsity=0.8).masks
    holder = {}

    def factory(params):
        holder["opt"] = torch.optim.Adam(params, lr=1e-2)
        return holder["opt"]

    pysparse.retrain(model, masks, "connectivity", data, epochs=2, lr=1e-2, optimizer=factory)
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        state = holder["opt"].state[params[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert int(torch.count_nonzero(state[key][~mask])) == 0


def test_weight_mode_regrows_and_reselects():
    model, data = _setup(2)
    masks = pysparse.prune(model, "magnitude", sparsity=0.7).masks
    out = pysparse.retrain(model, masks, "weight", data, epochs=3, lr=0.05, method="magnitude", sparsity=0.7)
    flips = sum(int((out.masks[n] != masks[n]).sum()) for n in masks)
    assert out.changed == flips and flips > 0
    params = dict(model.named_parameters())
    for name, mask in out.masks.items():
        assert int(torch.count_nonzero(params[name][~mask])) == 0
    total = sum(m.numel() for m in out.masks.values())
    assert total - sum(int(m.sum()) for m in out.masks.values()) == round(0.7 * total)  # the same global sparsity


def test_network_mode_rewinds_to_init():
    model, data = _setup(3)
    init = pysparse.remember_init(model)
    pysparse.retrain(model, {"0.weight": torch.ones(32, 10, dtype=torch.bool)}, "connectivity", data, epochs=3,
                     lr=0.05)  # "train"
    masks = pysparse.prune(model, "magnitude", sparsity=0.8).masks
    out = pysparse.retrain(model, masks, "network", data, epochs=0, lr=0.05)  # rewind only
    params = dict(model.named_parameters())
    for name, p in params.items():
        want = init[name] * masks[name] if name in masks else init[name]
        assert torch.equal(p.detach(), want)
    out = pysparse.retrain(model, masks, "network", data, epochs=4, lr=0.05)
    assert out.losses[-1] < out.losses[0]
    for name, mask in masks.items():
        assert int(torch.count_nonzero(params[name][~mask])) == 0


def test_network_mode_rewinds_a_module_that_reads_its_version():
    """torchvision's MNASNet raises on a state dict without its modules' versions: the rewind passes them."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mnasnet0_5(num_classes=3)
    init = pysparse.remember_init(model)
    masks = pysparse.prune(model, "magnitude", sparsity=0.5).masks
    data = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 2]))]
    pysparse.retrain(model, masks, "network", data, epochs=0, lr=0.05)
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), init[name] * masks[name] if name in masks else init[name])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(mode="magic"), ValueError, "mode must be one of"),
    (dict(mode="connectivity", epochs=-1), ValueError, "epochs must be"),
    (dict(mode="connectivity", lr=0), ValueError, "lr must be"),
    (dict(mode="connectivity", lr=float("inf")), ValueError, "lr must be a positive finite number"),  # was taken
    (dict(mode="connectivity", teacher=torch.nn.Linear(10, 32), temperature=float("inf")), ValueError,
     "temperature must be a positive finite number"),
    (dict(mode="connectivity", masks={"9.weight": torch.ones(1, dtype=torch.bool)}), ValueError, "names no parameter"),
    (dict(mode="connectivity", masks={"0.weight": torch.ones(10, 32, dtype=torch.bool)}), ValueError, "has shape"),
    (dict(mode="connectivity", masks={}), ValueError, "non-empty mapping"),
    (dict(mode="connectivity", data=[]), ValueError, "data yielded no batch"),
    (dict(mode="connectivity", optimizer="lbfgs"), ValueError, "optimizer must be"),
    (dict(mode="weight"), ValueError, "give method= and sparsity="),
    (dict(mode="network"), ValueError, "remember_init"),
])
def test_bad_input(kwargs, exc, match):
    model, data = _setup()
    args = dict(masks={"0.weight": torch.ones(32, 10, dtype=torch.bool)}, data=data, epochs=1, lr=0.1)
    args.update(kwargs)
    mode = args.pop("mode")
    with pytest.raises(exc, match=match):
        pysparse.retrain(model, args.pop("masks"), mode, args.pop("data"), **args)


def test_fit_tensors_recipes():
    from pysparse.retrain import fit_tensors

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)
    nets = {}
    for schedule in ("step", "cosine"):
        torch.manual_seed(0)
        nets[schedule] = fit_tensors(torch.nn.Linear(6, 3), x, y, epochs=4, batch_size=16, lr=0.1, seed=1,
                                     schedule=schedule)
        assert not nets[schedule].training
    assert not torch.equal(nets["step"].weight, nets["cosine"].weight)  # the schedules differ
    with pytest.raises(ValueError, match="schedule must be"):
        fit_tensors(torch.nn.Linear(6, 3), x, y, epochs=1, batch_size=16, lr=0.1, seed=1, schedule="linear")
    for kw, match in [(dict(epochs=-1), "epochs must be an int >= 0"), (dict(batch_size=0), "batch_size must be"),
                      (dict(epochs=1.5), "epochs must be an int")]:
        args = {**dict(epochs=1, batch_size=16, lr=0.1, seed=1), **kw}
        with pytest.raises(ValueError, match=match):
            fit_tensors(torch.nn.Linear(6, 3), x, y, **args)
    with pytest.raises(ValueError, match="x has 40 samples but y has 39"):
        fit_tensors(torch.nn.Linear(6, 3), x, y[:-1], epochs=1, batch_size=16, lr=0.1, seed=1)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_connectivity_retrains_a_sparsified_model_as_the_masked_dense_one(optimizer):
    """After pysparse.sparsify the masks name sparse layers (no weight parameter): connectivity retraining takes
    them, and trains what the masked dense model trains; a mask that removes more than the layer stores becomes its
    structure (it raised 'names no parameter' before)."""
    model, data = _setup(4)
    result = pysparse.prune(model, "magnitude", sparsity=0.5)
    tighter = pysparse.prune(copy.deepcopy(model), "magnitude", sparsity=0.8).masks  # a subset of the kept weights
    for masks in (result.masks, tighter):
        dense, sparse = copy.deepcopy(model), copy.deepcopy(model)
        pysparse.sparsify(sparse, result.masks, min_sparsity=0.0)
        for m in sparse.modules():
            if isinstance(m, pysparse.SparseLinear):
                m.dense_below = 0.0
        torch.manual_seed(0)
        out_d = pysparse.retrain(dense, masks, "connectivity", data, epochs=3, lr=0.05, optimizer=optimizer)
        torch.manual_seed(0)
        out_s = pysparse.retrain(sparse, masks, "connectivity", data, epochs=3, lr=0.05, optimizer=optimizer)
        assert out_s.losses == pytest.approx(out_d.losses, rel=1e-5)
        for i in (0, 2):
            assert torch.equal(sparse[i].mask(), masks[f"{i}.weight"])
            assert sparse[i].nnz == int(masks[f"{i}.weight"].sum())
            torch.testing.assert_close(sparse[i].weight, dense[i].weight.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["weight", "network"])
def test_other_modes_refuse_sparse_layers(mode):
    model, data = _setup(5)
    pysparse.remember_init(model)
    result = pysparse.prune(model, "magnitude", sparsity=0.5)
    pysparse.sparsify(model, result.masks, min_sparsity=0.0)
    with pytest.raises(ValueError, match=f"mode='{mode}' needs the pruned weights, which the sparse layers"):
        pysparse.retrain(model, result.masks, mode, data, epochs=1, lr=0.05, method="magnitude", sparsity=0.5)
    with pytest.raises(ValueError, match="nothing to prune.*sparse layers store only their kept weights"):
        pysparse.prune(model, "magnitude", sparsity=0.5)
