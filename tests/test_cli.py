import json
import os
import stat

import pytest

from pysparse.cli import main

FAST = ["--epochs", "2", "--quiet", "--num-batches", "2"]


def test_prune_mlp_writes_everything(tmp_path):
    out = tmp_path / "run"
    assert main(["prune", "--data", "digits", "--model", "mlp", "--method", "taylor", "--sparsity", "0.9",
                 "--retrain", "connectivity", "--out", str(out), *FAST]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["dense.safetensors", "masks.safetensors", "model.safetensors", "report.json", "report.png",
                     "report.txt"]
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-4) and report["method"] == "taylor"
    assert set(report["accuracy"]) == {"dense", "pruned", "retrained"}
    assert report["accuracy"]["retrained"] > 0.5
    assert os.path.getsize(out / "model.safetensors") < 0.5 * os.path.getsize(out / "dense.safetensors")
    assert stat.S_IMODE(os.stat(out).st_mode) & 0o055  # an ordinary folder, not a private temp one
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary folder left behind


def test_prune_cnn_threshold_and_weight_mode(tmp_path):
    from safetensors.torch import load_file

    assert main(["prune", "--model", "cnn", "--method", "magnitude", "--threshold", "0.05", "--retrain", "weight",
                 "--out", str(tmp_path / "a"), "--epochs", "1", "--quiet"]) == 0
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["connections_changed"] is not None
    # weight correction chose the masks again: the report describes the saved (re-selected) masks
    masks = load_file(str(tmp_path / "a" / "masks.safetensors"))
    assert {layer["name"]: layer["kept"] for layer in report["layers"]} == {n: int(m.sum()) for n, m in masks.items()}


def test_prune_with_compensation(tmp_path):
    assert main(["prune", "--model", "cnn", "--method", "hessian", "--sparsity", "0.8", "--compensate",
                 "--retrain", "none", "--out", str(tmp_path / "c"), *FAST]) == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["settings"]["compensate"] is True
    assert all(layer["reconstruction"]["compensated"] <= layer["reconstruction"]["masked"]
               for layer in report["layers"])
    assert report["accuracy"]["retrained"] == report["accuracy"]["pruned"]


def test_refuses_existing_out_and_leaves_nothing_on_error(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["prune", "--sparsity", "0.5", "--out", str(out), *FAST])
    assert (out / "keep.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit) as stop:  # argparse refuses it before any training
        main(["prune", "--method", "obs", "--sparsity", "0.5", "--out", str(fresh), *FAST])
    assert stop.value.code == 2 and "invalid choice: 'obs'" in capsys.readouterr().err
    assert main(["prune", "--pattern", "3:2", "--out", str(fresh), *FAST]) == 2  # refused by pysparse.prune
    assert "pysparse prune:" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no half-written output
    with pytest.raises(SystemExit):
        main(["prune", "--sparsity", "0.5", "--threshold", "0.1", "--out", str(fresh)])  # argparse: not both


@pytest.mark.parametrize("argv, message", [
    (["prune", "--sparsity", "1.5"], "argument --sparsity: must be in [0, 1), got 1.5"),
    (["prune", "--sparsity", "nan"], "argument --sparsity: must be in [0, 1), got nan"),
    (["prune", "--sparsity", "-0.1"], "argument --sparsity: must be in [0, 1), got -0.1"),
    (["prune", "--sparsity", "half"], "argument --sparsity: must be a number in [0, 1), got 'half'"),
    (["prune", "--sparsity", "0.5", "--batch-size", "0"], "argument --batch-size: must be an int >= 1, got 0"),
    (["compress", "--sparsity", "1"], "argument --sparsity: must be in [0, 1), got 1"),
    (["compress", "--g-sparsity", "2"], "argument --g-sparsity: must be in [0, 1), got 2"),
    (["compress", "--method", "obs"], "argument --method: invalid choice: 'obs'"),
    (["compress", "--retrain-steps", "-3"], "argument --retrain-steps: must be an int >= 1, got -3"),
    (["gan", "--d-sparsity", "1.0"], "argument --d-sparsity: must be in [0, 1), got 1.0"),
    (["gan", "--loss", "wasserstein"], "argument --loss: invalid choice: 'wasserstein'"),
    (["gan", "--steps", "2.5"], "argument --steps: must be an int >= 1, got '2.5'"),
    (["gan", "--width", "0"], "argument --width: must be an int >= 1, got 0"),  # the models' own bounds
    (["gan", "--latent-dim", "-4"], "argument --latent-dim: must be an int >= 1, got -4"),
    (["prune", "--sparsity", "0.5", "--seed", "-1"], "argument --seed: must be an int in [0, 2**32), got -1"),
    (["compress", "--seed", "4294967296"], "argument --seed: must be an int in [0, 2**32), got 4294967296"),
    (["gan", "--seed", "x"], "argument --seed: must be an int in [0, 2**32), got 'x'"),
    (["gan", "--device", "tpu"], "argument --device: must be cpu or cuda[:N], got 'tpu'"),
    (["gan", "--device", "meta"], "argument --device: must be cpu or cuda[:N], got 'meta'"),
    (["gan", "--eval-epochs", "-1"], "argument --eval-epochs: must be an int >= 0, got -1"),
    (["gan", "--checkpoint-every", "0"], "argument --checkpoint-every: must be an int >= 1, got 0"),
    (["gan", "--sample-every", "-2"], "argument --sample-every: must be an int >= 1, got -2"),
])
def test_bad_arguments_stop_before_any_work(tmp_path, capsys, argv, message):
    # a bad value is refused by argparse (exit status 2, the argument named) before data is loaded or a model
    # trained: not after the minutes of training that come before the step that would use it
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--out", str(out)])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_argument_bounds_are_the_librarys():
    # 0 epochs is what pysparse.train accepts (the dense model kept as loaded or initialised): the CLI takes it too
    from pysparse.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["prune", "--epochs", "0", "--out", "x"]).epochs == 0
    args = parser.parse_args(["compress", "--epochs", "0", "--eval-epochs", "0", "--out", "x"])
    assert (args.epochs, args.eval_epochs) == (0, 0)
    for argv in (["prune", "--epochs", "-1"], ["compress", "--eval-epochs", "-1"], ["gan", "--n-critic", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--out", "x"])


def test_gan_device_must_exist(tmp_path, capsys):
    # a CUDA device the machine does not have is refused by argparse, before data or models are made
    import torch

    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["gan", "--device", missing, "--out", str(out)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device:" in err and repr(missing) in err
    assert not out.exists()
