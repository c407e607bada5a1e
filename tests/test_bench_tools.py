"""The benchmark tooling that runs where a rerun is expensive (benchmarks/gpu_check.sh on a lent GPU): merging
the JSON of its benchmark parts and the ratio table; benchmarks/step_ratio.py (step / forward per round) and
benchmarks/per_round.py (SparseLinear against nn.Linear and torch.sparse.mm per round); benchmarks/models.py (pruned
torchvision models, sparsified against dense, per round); benchmarks/vit_digits.py (a small transformer pruned one-shot,
with and without compensation); benchmarks/gpu_profile.py (a step's time by kernel / op)."""
import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pysparse
from pysparse import SparseLinear

SUMMARIZE = Path(__file__).resolve().parent.parent / "benchmarks" / "summarize.py"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SUMMARIZE.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _summarize():
    return _load("summarize")


def _run(group, **medians):
    return {"machine_info": {"cpu": {"brand_raw": "test cpu", "count": 2}}, "datetime": "2026-11-29",
            "benchmarks": [{"group": group, "name": f"t[{impl}]", "params": {"impl": impl},
                            "stats": {"median": m}, "extra_info": {}} for impl, m in medians.items()]}


def test_merge_skips_parts_cut_short_or_empty(tmp_path):
    (tmp_path / "part1.json").write_text(json.dumps(_run("g1", pysparse=1e-3, dense=2e-3)))
    (tmp_path / "part2.json").write_text("")                       # a part that selected nothing
    (tmp_path / "part3.json").write_text('{"benchmarks": [')       # cut short while writing
    (tmp_path / "part4.json").write_text("[1, 2]")                 # not a pytest-benchmark result
    (tmp_path / "part6.json").write_text(json.dumps(_run("g2", pysparse=4e-3, dense=1e-3)))
    paths = [str(tmp_path / f"part{i}.json") for i in range(1, 7)]  # part5 does not exist
    merged = _summarize().merge(paths)
    assert [b["group"] for b in merged["benchmarks"]] == ["g1", "g1", "g2", "g2"]
    assert merged["machine_info"]["cpu"]["brand_raw"] == "test cpu"
    assert _summarize().merge(paths[1:5]) is None


def test_merge_command_writes_the_file_and_the_table_reads_it(tmp_path):
    part = tmp_path / "part1.json"
    part.write_text(json.dumps(_run("linear-fwd", pysparse=1e-3, dense=3e-3)))
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, str(SUMMARIZE), "--merge", str(out), str(part), str(tmp_path / "nope.json")],
                   check=True)
    table = subprocess.run([sys.executable, str(SUMMARIZE), str(out)], check=True, capture_output=True,
                           text=True).stdout
    assert "| linear-fwd | dense | 3.00 | 3.00x |" in table
    assert not list(tmp_path.glob("*.tmp"))
    failed = subprocess.run([sys.executable, str(SUMMARIZE), "--merge", str(out), str(tmp_path / "nope.json")],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "none of 1 files" in failed.stderr


@pytest.mark.skipif(not Path("/bin/bash").exists(), reason="needs bash")
@pytest.mark.parametrize("script", ["gpu_check.sh", "asan_check.sh"])
def test_check_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(SUMMARIZE.parent / script)]).returncode == 0


def test_gpu_profile_splits_the_step_by_kernel(capsys):
    module = _load("gpu_profile")
    layer = SparseLinear(128, 64, sparsity=0.9)
    layer.dense_below = 0.0
    x = torch.randn(8, 128, requires_grad=True)
    wall, busy, rows = module.profile_step(layer, x, torch.randn(8, 64), steps=2, top=50)
    names = [r[0] for r in rows]
    # the step's own ops, each once a step, their times adding up to the total reported
    assert "pysparse::spmm" in names and "pysparse::spmm_grad" in names
    assert all(calls == 1 for name, calls, _ in rows if name.startswith("pysparse::spmm"))
    assert wall > 0 and busy > 0 and all(us > 0 for *_, us in rows)
    assert [us for *_, us in rows] == sorted((us for *_, us in rows), reverse=True)
    module.main(["--device", "cpu", "--features", "64", "--batch", "4", "--sparsity", "0.5", "--steps", "2"])
    out = capsys.readouterr().out
    assert "batch 4, nn.Linear: step" in out and "batch 4, SparseLinear 0.5: step" in out and "pysparse::spmm" in out
    with pytest.raises(SystemExit):
        module.main(["--device", "cpu", "--sparsity", "1.0"])
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err


def test_step_ratio_measures_the_step_against_its_own_forward(capsys, monkeypatch):
    module = _load("step_ratio")
    timed = []
    ratio = module._ratio
    monkeypatch.setattr(module, "_ratio", lambda *args: timed.append(args) or ratio(*args))
    r = module.measure(16, 0.9, features=256, rounds=3, calls=3)
    # what is timed, not how long (times of ~0.1 ms swap order under load): the step is a forward and a backward
    # from the given output gradient, leaving the gradients one such step gives
    layer, x, g = timed[0][:3]
    got = [layer.values.grad.clone(), x.grad.clone()]
    layer.values.grad = x.grad = None
    layer(x).backward(g)
    assert torch.equal(got[0], layer.values.grad) and torch.equal(got[1], x.grad) and got[1].abs().sum() > 0
    assert r["forward_ms"] > 0 and r["step_ms"] > 0 and 0 < r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    # backward()'s fixed cost, timed on a graph with nothing to compute, comes off every round's step
    assert r["call_ms"] > 0 and r["net_ratio"] < r["ratio"]
    module.main(["--batch", "4", "--sparsity", "0.5", "--features", "64", "--rounds", "2"])
    out = capsys.readouterr().out
    assert "batch    4 sparsity 0.50" in out and "net of backward()'s fixed" in out


def test_step_ratio_measures_a_stack_of_layers(capsys, monkeypatch):
    module = _load("step_ratio")
    timed = []
    ratio = module._ratio
    monkeypatch.setattr(module, "_ratio", lambda net, *args: timed.append(net) or ratio(net, *args))
    one = module.measure(8, 0.9, features=128, rounds=3, calls=3)
    three = module.measure(8, 0.9, features=128, rounds=3, calls=3, depth=3)
    # (what is timed, not how long: two separate timings of ~0.1 ms swap under load)
    assert isinstance(timed[0], SparseLinear) and [type(m) for m in timed[1]] == [SparseLinear] * 3
    assert one["forward_ms"] > 0 and three["step_ms"] > 0
    assert all(m.values.grad is not None and m.values.grad.abs().sum() > 0 for m in timed[1])  # one backward() each
    module.main(["--batch", "4", "--sparsity", "0.5", "--features", "64", "--rounds", "1", "--depth", "2"])
    assert capsys.readouterr().out.startswith("SparseLinear 64 x 64, 2 in sequence")


def test_step_ratio_measures_sparse_conv2d(capsys):
    module = _load("step_ratio")
    r = module.measure_conv("layer4", 0.9, batch=1, rounds=3, calls=1)  # (3: a median one slow round cannot move)
    # no order between the two times is asserted: a ~0.1 ms layer's step can time below its forward under load
    assert r["forward_ms"] > 0 and r["step_ms"] > 0 and 0 < r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    module.main(["--conv", "layer4", "--batch", "1", "--sparsity", "0.95", "--rounds", "1"])
    out = capsys.readouterr().out
    assert out.startswith("SparseConv2d layer4") and "layer4         batch    1 sparsity 0.95" in out
    with pytest.raises(ValueError, match="shape must be one of"):
        module.measure_conv("layer5", 0.9)
    with pytest.raises(ValueError, match="sparsity"):
        module.measure_conv("layer4", 1.0)
    with pytest.raises(ValueError, match="batch"):
        module.measure_conv("layer4", 0.9, batch=0)


def test_step_ratio_measures_torchvision_linear_shapes(capsys):
    module = _load("step_ratio")
    shapes = _load("_util").torchvision_linears()
    # read from the models' definitions: ResNet-50's fc, VGG-16's classifier, ViT-B/16's MLP, each shape once
    assert shapes["resnet50.fc"] == (2048, 1000) and shapes["vgg16.classifier.0"] == (25088, 4096)
    assert shapes["vit_b_16.mlp.0"] == (768, 3072) and len(set(shapes.values())) == len(shapes)
    r = module.measure(4, 0.9, rounds=3, calls=2, shape=(96, 40))
    assert r["forward_ms"] > 0 and r["step_ms"] > 0 and 0 < r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    module.main(["--model", "resnet50.fc", "--batch", "2", "--sparsity", "0.99", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "resnet50.fc 2048 -> 1000 batch    2 sparsity 0.99" in out
    with pytest.raises(ValueError, match="square"):
        module.measure(4, 0.9, rounds=1, calls=1, shape=(96, 40), depth=2)
    with pytest.raises(SystemExit):
        module.main(["--model", "resnet51.fc"])
    with pytest.raises(ValueError, match="out_features"):
        module.measure(4, 0.9, rounds=1, calls=1, shape=(96, 0))
    with pytest.raises(ValueError, match="'resnet51' is not a torchvision classification model"):
        _load("_util").torchvision_linears(("resnet51",))


@pytest.mark.parametrize("kwargs, name", [({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"),
                                          ({"batch": 0}, "batch"), ({"features": 0}, "features"),
                                          ({"rounds": 0}, "rounds"), ({"calls": 0}, "calls"),
                                          ({"depth": 0}, "depth")])
def test_step_ratio_rejects_bad_input(kwargs, name):
    args = {"batch": 4, "sparsity": 0.5, "features": 64, "rounds": 1, **kwargs}
    with pytest.raises(ValueError, match=name):
        _load("step_ratio").measure(**args)


def test_per_round_times_sparselinear_against_both_baselines(capsys):
    module = _load("per_round")
    for step in (False, True):
        r = module.measure(8, 0.9, features=128, rounds=3, calls=2, step=step)
        assert all(r[f"{impl}_ms"] > 0 for impl in module.IMPLS)
        for base in ("dense", "torch_sparse"):
            assert r[f"vs_{base}_min"] <= r[f"vs_{base}"] <= r[f"vs_{base}_max"]
            assert r[f"vs_{base}"] > 0
    module.main(["--batch", "4", "--sparsity", "0.5", "0.9", "--features", "64", "--rounds", "1", "--step"])
    out = capsys.readouterr().out
    assert out.startswith("SparseLinear 64 x 64 forward + backward")
    assert "batch    4 sparsity 0.50" in out and "batch    4 sparsity 0.90" in out and "torch.sparse.mm" in out


def test_per_round_refuses_to_time_layers_that_disagree(monkeypatch):
    """The three implementations' outputs (and with step the input gradients) are compared before any timing: a
    sparse layer that computes something else stops the measurement."""
    module = _load("per_round")
    layers = module._layers

    def wrong(features, sparsity, seed):
        dense, sparse = layers(features, sparsity, seed)
        with torch.no_grad():
            sparse.values.mul_(2)
        return dense, sparse

    monkeypatch.setattr(module, "_layers", wrong)
    for step in (False, True):
        with pytest.raises(AssertionError):
            module.measure(4, 0.5, features=32, rounds=1, calls=1, step=step)


@pytest.mark.parametrize("kwargs, name", [({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"),
                                          ({"batch": 0}, "batch"), ({"features": 0}, "features"),
                                          ({"rounds": 0}, "rounds"), ({"calls": 0}, "calls")])
def test_per_round_rejects_bad_input(kwargs, name):
    args = {"batch": 4, "sparsity": 0.5, "features": 64, "rounds": 1, **kwargs}
    with pytest.raises(ValueError, match=name):
        _load("per_round").measure(**args)


def test_models_times_a_pruned_model_sparsified_against_its_dense_twin(capsys):
    module = _load("models")
    r = module.measure("resnet18", 1, 0.9, rounds=2, calls=1, image=32)
    assert r["layers"] == 21  # every convolution and the classifier: none left below its crossover
    assert r["pysparse_ms"] > 0 and r["dense_ms"] > 0 and r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
    assert r["file_bytes"] < 0.2 * r["dense_bytes"]  # 10% of the weights, their indices, BatchNorm, the hash
    step = module.measure("mobilenet_v3_small", 2, 0.95, rounds=1, calls=1, step=True, image=32)
    assert step["layers"] > 0 and step["speedup_min"] <= step["speedup"] <= step["speedup_max"]
    module.main(["--model", "resnet18", "--batch", "1", "--sparsity", "0.95", "--image", "32", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "resnet18             batch   1 sparsity 0.95: 21 sparse layers" in out and "of the dense" in out
    # channels-last: both models in that format (their outputs and input gradients checked to agree inside)
    cl = module.measure("resnet18", 2, 0.9, rounds=1, calls=1, step=True, image=32, channels_last=True)
    assert cl["layers"] == 21 and cl["speedup_min"] <= cl["speedup"] <= cl["speedup_max"]
    module.main(["--model", "resnet18", "--batch", "1", "--sparsity", "0.9", "--image", "32", "--rounds", "1",
                 "--channels-last"])
    assert "forward, channels-last" in capsys.readouterr().out
    f = module.formats("resnet18", 1, 0.9, rounds=2, calls=1, image=32)
    assert all(f[f"{impl}_ms"] > 0 for impl in module.FORMATS)
    assert f["cl_gain"][1] <= f["cl_gain"][0] <= f["cl_gain"][2]
    module.main(["--model", "resnet18", "--batch", "1", "--sparsity", "0.9", "--image", "32", "--rounds", "1",
                 "--formats"])
    assert "pysparse channels-last over NCHW" in capsys.readouterr().out
    b = module.folds("resnet18", 1, 0.9, rounds=2, calls=1, image=32, channels_last=True)
    assert all(b[f"{impl}_ms"] > 0 for impl in ("pysparse", "pysparse_folded", "dense", "dense_folded"))
    assert b["folded_gain"][1] <= b["folded_gain"][0] <= b["folded_gain"][2]
    module.main(["--model", "resnet18", "--batch", "1", "--sparsity", "0.9", "--image", "32", "--rounds", "1",
                 "--fold-bn"])
    assert "pysparse folded over as it is" in capsys.readouterr().out
    # bfloat16: both models and the input in it (outputs and input gradients checked within its rounding)
    for step in (False, True):
        h = module.measure("resnet18", 2, 0.9, rounds=1, calls=1, step=step, image=32, channels_last=True,
                           dtype="bfloat16")
        assert h["layers"] == 21 and h["speedup_min"] <= h["speedup"] <= h["speedup_max"]
        assert h["file_bytes"] < 0.12 * h["dense_bytes"]  # values stored in bfloat16
    module.main(["--model", "resnet18", "--batch", "1", "--sparsity", "0.9", "--image", "32", "--rounds", "1",
                 "--dtype", "bfloat16"])
    assert "forward, bfloat16" in capsys.readouterr().out


def test_models_refuses_to_time_models_that_disagree(monkeypatch):
    module = _load("models")
    pair = module.pruned_pair

    def wrong(*args, **kwargs):
        dense, sparse, layers = pair(*args, **kwargs)
        with torch.no_grad():
            sparse.fc.values.mul_(2)
        return dense, sparse, layers

    monkeypatch.setattr(module, "pruned_pair", wrong)
    for step, dtype in itertools.product((False, True), ("float32", "bfloat16")):
        with pytest.raises(AssertionError):
            module.measure("resnet18", 2, 0.9, rounds=1, calls=1, step=step, image=32, dtype=dtype)
    for compare in (module.formats, module.folds):
        with pytest.raises(AssertionError, match="differs from dense's"):
            compare("resnet18", 2, 0.9, rounds=1, calls=1, image=32)


@pytest.mark.parametrize("kwargs, name", [({"sparsity": 1.0}, "sparsity"), ({"batch": 0}, "batch"),
                                          ({"image": 0}, "image"), ({"rounds": 0}, "rounds"),
                                          ({"model": "resnet19"}, "model")])
def test_models_rejects_bad_input(kwargs, name):
    args = {"model": "resnet18", "batch": 1, "sparsity": 0.9, "rounds": 1, "calls": 1, "image": 32, **kwargs}
    module = _load("models")
    for compare in (module.measure, module.formats, module.folds):
        with pytest.raises(ValueError, match=name):
            compare(**args)
    if name == "model":
        with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
            module.measure("resnet18", 1, 0.9, rounds=1, calls=1, image=32, dtype="int8")


def test_vit_digits_prunes_a_trained_transformer_with_and_without_compensation(capsys):
    module = _load("vit_digits")
    module.main(["--sparsity", "0.5", "--epochs", "2", "--calibration", "2"])
    out = capsys.readouterr().out
    assert out.startswith("dense: test accuracy") and out.count("compensate=") == 4
    assert "(4 attention weights pruned)" in out and "sparsified (2 SparseMultiheadAttention)" in out


def test_models_times_a_vision_transformer_whose_head_starts_at_zero(monkeypatch):
    """torchvision's ViT heads start at zero (the output would be all zeros, and the agreement check 0 / 0): the
    pair draws such a layer at random; the attention is sparsified with the rest."""
    import torchvision

    import pysparse

    module = _load("models")
    small = lambda **kw: torchvision.models.VisionTransformer(  # noqa: E731
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    assert not small().heads.head.weight.any()
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kw: small())
    dense, sparse, layers = module.pruned_pair("vit_b_16", 0.9)
    assert dense.heads.head.weight.any()
    assert any(isinstance(m, pysparse.SparseMultiheadAttention) for m in sparse.modules())
    r = module.measure("vit_b_16", 2, 0.9, rounds=1, calls=1, image=32)
    # 10% of the weights at 6 bytes each; the position embedding, norms and biases of a model this small stay whole
    assert r["pysparse_ms"] > 0 and r["file_bytes"] < 0.35 * r["dense_bytes"]


def test_zoo_checks_each_model_and_reports_a_failure(monkeypatch, capsys):
    """zoo.py on a small Swin (its attention reads its layers' weights) and a model that fails to build: one line
    each, the errors below the tolerance for the first, the failure named for the second, exit status 1."""
    import torchvision
    from torchvision.models.swin_transformer import SwinTransformer

    module = _load("zoo")

    def get_model(name, **kw):
        if name == "broken":
            raise ValueError("not this one")
        return SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10)

    monkeypatch.setattr(torchvision.models, "get_model", get_model)
    monkeypatch.setattr(torchvision.models, "list_models", lambda **kw: ["swin_t", "broken"])
    monkeypatch.setitem(module.FAMILIES, "swin_t", 32)
    r = module.check("swin_t", 0.9, image=32)
    assert set(module.CHECKS) <= set(r) and all(r[c] < module.TOLERANCE for c in module.CHECKS)
    assert r["layers"] > 0 and 0 < r["file"] < 0.5
    assert module.main(["--model", "swin_t", "broken"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("swin_t") and "  ok (" in out[1] and "MISMATCH" not in out[1]
    assert out[2].startswith("broken") and "FAILED: ValueError: not this one" in out[2]
    assert out[-1] == "1 of 2 models ok"


def test_weight_reads_times_models_that_read_weight_metadata(capsys, monkeypatch):
    module = _load("weight_reads")
    module.main(["--small", "--rounds", "1", "--calls", "1"])
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2 and "TransformerEncoderLayer" in out and "fc.weight.dtype" in out
    from pysparse.nn._sparse_weight import SparseWeight
    assert SparseWeight.weight is module._LAZY  # put back
    name, sparse, dense, x = module.cases(0.9, small=True)[1]
    with torch.no_grad():
        sparse.fc.values.mul_(2)
    with pytest.raises(AssertionError):  # outputs that disagree are not timed
        module.measure(sparse, dense, x, rounds=1, calls=1)
    with pytest.raises(ValueError, match="rounds"):
        module.measure(sparse, dense, x, rounds=0, calls=1)
