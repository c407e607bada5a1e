import pytest
import torch
from torch import nn

import pysparse


def _trained():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, :2] > 0).long() @ torch.tensor([1, 2])
    data = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        for xb, yb in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return model, data


def test_sensitivity_table_json_plot(tmp_path):
    model, data = _trained()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = pysparse.sensitivity(model, data, sparsities=(0.0, 0.5, 0.99))
    assert set(result.curves) == {"0.weight", "2.weight"}
    assert all(v[0] == pytest.approx(result.baseline) for v in result.curves.values())  # 0% changes nothing
    assert result.baseline > 0.9
    assert min(v[-1] for v in result.curves.values()) < result.baseline - 0.2  # 99% of one layer hurts
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched
    assert "(unpruned)" in result.table() and '"curves"' in result.to_json()
    png = tmp_path / "sens.png"
    result.plot(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sens.png"]


def test_report_plot_and_data_driven_sensitivity(tmp_path):
    model, data = _trained()
    report = pysparse.prune(model, "taylor", sparsity=0.7, data=data, loss_fn=nn.functional.cross_entropy)
    pysparse.plot_report(report, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    model, data = _trained()
    result = pysparse.sensitivity(model, data, method="taylor", sparsities=(0.5,), loss_fn=nn.functional.cross_entropy)
    assert len(result.curves["0.weight"]) == 1


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(sparsities=()), ValueError, "sparsities is empty"),
    (dict(sparsities=(1.5,)), ValueError, r"must be in \[0, 1\)"),
    (dict(data=[]), ValueError, "no batch"),
    (dict(exclude=[nn.Linear]), ValueError, "nothing to prune"),
    (dict(metric=lambda m, d: float("nan")), ValueError, "metric must return a finite real number, got nan"),
    (dict(metric=lambda m, d: "good"), ValueError, "metric must return a finite real number, got 'good'"),
])
def test_bad_input(kwargs, exc, match):
    model, data = _trained()
    args = dict(data=data)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        pysparse.sensitivity(model, args.pop("data"), **args)


def test_metric_may_return_a_one_element_tensor():
    model, data = _trained()
    result = pysparse.sensitivity(model, data, sparsities=(0.5,),
                                  metric=lambda m, d: torch.tensor(pysparse.accuracy(m, d)))
    assert isinstance(result.baseline, float) and result.baseline == pysparse.accuracy(model, data)
