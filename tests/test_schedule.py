import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import pysparse


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 40), nn.ReLU(), nn.Linear(40, 3))


def test_cubic_schedule_values():
    f = lambda t: pysparse.cubic_sparsity(t, final=0.9, begin=100, end=1100)  # noqa: E731
    assert f(0) == 0.0 and f(100) == 0.0 and f(1100) == pytest.approx(0.9) and f(5000) == pytest.approx(0.9)
    assert f(600) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert all(f(a) <= f(b) for a, b in zip(range(0, 1200, 50), range(50, 1250, 50)))
    with pytest.raises(ValueError, match="begin < end"):
        pysparse.cubic_sparsity(0, final=0.9, begin=10, end=10)
    with pytest.raises(ValueError, match=r"final must be in \[0, 1\)"):
        pysparse.cubic_sparsity(0, final=1.0, begin=0, end=10)
    with pytest.raises(ValueError, match="initial must be <= final"):  # the schedule only prunes
        pysparse.cubic_sparsity(0, final=0.5, initial=0.8, begin=0, end=10)
    with pytest.raises(ValueError, match="initial_sparsity must be <= final_sparsity"):
        pysparse.GradualPruner(_mlp(), "magnitude", final_sparsity=0.5, initial_sparsity=0.8, begin=0, end=10)
    for kwargs, name in ((dict(final_sparsity=1.5), "final_sparsity"),
                         (dict(final_sparsity=0.5, initial_sparsity=-0.1), "initial_sparsity")):
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\)"):  # the caller's argument names
            pysparse.GradualPruner(_mlp(), "magnitude", begin=0, end=10, frequency=1, **kwargs)


def test_iterative_sparsities_and_prune():
    s = pysparse.iterative_sparsities(0.9, 3)
    assert s[-1] == pytest.approx(0.9) and s[0] == pytest.approx(1 - 0.1 ** (1 / 3))
    model = _mlp()
    rounds = []
    results = pysparse.iterative_prune(model, "magnitude", 0.9, 3, lambda m, masks: rounds.append(dict(masks)),
                                       min_density=0.0)
    assert len(results) == len(rounds) == 3
    assert results[-1].sparsity == pytest.approx(0.9, abs=1e-3)
    for earlier, later in zip(rounds, rounds[1:]):
        for n in earlier:
            assert not bool((later[n] & ~earlier[n]).any())  # nothing pruned comes back


def test_gradual_pruner_in_a_training_loop():
    model = _mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = pysparse.GradualPruner(model, "magnitude", final_sparsity=0.8, begin=10, end=50, frequency=10,
                                    optimizer=opt, min_density=0.0)
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    for i in range(70):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        pruner.step(i)
        if pruner.masks is not None:
            for n, p in model.named_parameters():
                if n in pruner.masks:
                    assert int(torch.count_nonzero(p[~pruner.masks[n]])) == 0
    steps = [s for s, _ in pruner.history]
    reached = [r for _, r in pruner.history]
    assert steps == [10, 20, 30, 40, 50] and reached == sorted(reached)
    assert reached[-1] == pytest.approx(0.8, abs=1e-3)


def test_torch_prune_round_trip():
    model = _mlp()
    result = pysparse.prune(model, "magnitude", sparsity=0.6, apply=False)
    pysparse.to_torch_prune(model, result.masks)
    assert hasattr(model[0], "weight_orig") and hasattr(model[0], "weight_mask")
    assert torch.equal(model[0].weight, model[0].weight_orig * result.masks["0.weight"])
    masks = pysparse.from_torch_prune(model)
    assert set(masks) == set(result.masks)
    assert all(torch.equal(masks[n], result.masks[n]) for n in masks)
    assert not hasattr(model[0], "weight_orig") and isinstance(model[0].weight, nn.Parameter)
    # and masks made by torch.nn.utils.prune come back too
    torch_prune.l1_unstructured(model[2], "weight", amount=0.5)
    assert int((~pysparse.from_torch_prune(model, remove=False)["2.weight"]).sum()) == 60
    with pytest.raises(ValueError, match="names no parameter"):
        pysparse.to_torch_prune(_mlp(), {"7.weight": torch.ones(2, dtype=torch.bool)})
    sparse = pysparse.sparsify(_mlp(), result.masks, min_sparsity=0.0)  # its weights are views, not parameters
    with pytest.raises(ValueError, match=r"names no parameter of the model \(0 is a SparseLinear.*densify"):
        pysparse.to_torch_prune(sparse, {"0.weight": result.masks["0.weight"]})
