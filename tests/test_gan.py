"""pysparse.gan: models made of sparse layers, losses, the trainer (alternation, sparsity, EMA, checkpoints that
resume exactly), metrics and the CLI."""
import json
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import pysparse.synth
from pysparse.gan import Discriminator, GANTrainer, Generator, d_loss, g_loss, metrics, models_from_checkpoint
from pysparse.gan.models import plan
from pysparse.shrink import model_sparsity, sparse_layers
from pysparse.testing import DEVICES


def _data(n=96, size=8, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def _pair(conditional=True, size=8, **kw):
    torch.manual_seed(0)
    k = 10 if conditional else None
    return (Generator(size, 1, num_classes=k, width=8, latent_dim=16, **kw),
            Discriminator(size, 1, num_classes=k, width=8))


# ---- models ----
@pytest.mark.parametrize("size,channels,conditional", [(8, 1, True), (8, 1, False), (28, 1, True), (32, 3, False),
                                                       (16, 1, True)])
def test_models_shapes_layers_and_init(size, channels, conditional):
    torch.manual_seed(0)
    k = 10 if conditional else None
    G = Generator(size, channels, num_classes=k, width=8, latent_dim=16)
    D = Discriminator(size, channels, num_classes=k, width=8)
    y = torch.randint(0, 10, (5,)) if conditional else None
    x = G(torch.randn(5, 16), y)
    assert x.shape == (5, channels, size, size) and float(x.detach().abs().max()) <= 1.0
    assert D(x, y).shape == (5,)
    for model in (G, D):  # every matmul layer is a sparse layer
        assert not any(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in model.modules())
        assert len(sparse_layers(model)) >= 3
    values = torch.cat([m.values.detach() for m in sparse_layers(G).values()])
    assert float(values.std()) == pytest.approx(0.02, rel=0.1)  # DCGAN init
    assert any(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.2 for m in D.modules())
    assert all(m.spectral_norm for m in sparse_layers(D).values())
    assert 0 < plan(size)[0] <= 8


def test_models_bad_input():
    for size in (3, 7, 9, 31, 5 * 64):
        with pytest.raises(ValueError, match="image_size"):
            Generator(size)
    with pytest.raises(ValueError, match="sparsity"):
        Generator(8, sparsity=1.0)
    with pytest.raises(ValueError, match="sparsity"):
        Discriminator(8, sparsity=-0.1)
    with pytest.raises(ValueError, match="num_classes"):
        Generator(8, num_classes=1)
    G, D = _pair()
    with pytest.raises(ValueError, match="labels"):
        G(torch.randn(2, 16))
    with pytest.raises(ValueError, match="labels must be in"):
        G(torch.randn(2, 16), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="images must be"):
        D(torch.randn(2, 1, 7, 7), torch.tensor([0, 1]))
    G2, _ = _pair(conditional=False)
    with pytest.raises(ValueError, match="unconditional"):
        G2(torch.randn(2, 16), torch.tensor([0, 1]))


def test_losses_match_their_definitions():
    real, fake = torch.randn(7), torch.randn(7)
    s = torch.sigmoid
    torch.testing.assert_close(d_loss("minimax", real, fake), -(s(real).log() + (1 - s(fake)).log()).mean())
    torch.testing.assert_close(g_loss("minimax", fake), (1 - s(fake)).log().mean())
    torch.testing.assert_close(d_loss("non_saturating", real, fake), d_loss("minimax", real, fake))
    torch.testing.assert_close(g_loss("non_saturating", fake), -s(fake).log().mean())
    torch.testing.assert_close(d_loss("hinge", real, fake), F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    torch.testing.assert_close(g_loss("hinge", fake), -fake.mean())
    with pytest.raises(ValueError, match="loss must be one of"):
        g_loss("wasserstein", fake)


# ---- trainer ----
def _trainer(tmp_path=None, conditional=True, **kw):
    G, D = _pair(conditional)
    kw.setdefault("steps", 6)
    kw.setdefault("batch_size", 16)
    return GANTrainer(G, D, _data(), out=tmp_path, progress=False, **kw)


@pytest.mark.parametrize("order,n_critic", [("gd", 1), ("dg", 2)])
def test_alternating_updates_each_with_the_other_model_fixed(order, n_critic):
    t = _trainer(order=order, n_critic=n_critic)
    calls = []

    def spy(kind, fn):
        def wrapped(*a):
            before = {m: [p.detach().clone() for p in getattr(t, m).parameters()] for m in ("G", "D")}
            r = fn(*a)
            after = {m: list(getattr(t, m).parameters()) for m in ("G", "D")}
            changed = {m: any(not torch.equal(b, p) for b, p in zip(before[m], after[m])) for m in ("G", "D")}
            calls.append((kind, changed["G"], changed["D"]))
            return r
        return wrapped

    t._g_step, t._d_step = spy("G", t._g_step), spy("D", t._d_step)
    t.train_step()
    expected = ["G"] + ["D"] * n_critic if order == "gd" else ["D"] * n_critic + ["G"]
    assert [c[0] for c in calls] == expected
    for kind, g_changed, d_changed in calls:  # each step moves its own model only
        assert (g_changed, d_changed) == ((True, False) if kind == "G" else (False, True))


def test_gradual_sparsity_reaches_targets_and_ema_follows():
    t = _trainer(steps=12, g_sparsity=0.8, d_sparsity=0.5, prune_end=8, prune_every=2, saliency="taylor")
    seen = []
    for _ in range(12):
        t.train_step()
        seen.append(model_sparsity(t.G))
    assert seen == sorted(seen) and seen[0] == 0.0 and 0 < seen[3] < 0.8  # a cubic ramp, not one cut
    for model, target in ((t.G, 0.8), (t.D, 0.5)):
        for m in sparse_layers(model).values():  # every layer at the target (layer scope)
            assert m.nnz == round((1 - target) * math.prod(m.weight_shape))
    for a, b in zip(sparse_layers(t.G).values(), sparse_layers(t.ema).values()):
        assert torch.equal(a.mask(), b.mask())
    # the EMA is a lerp of G: after one more step it moved towards G by (1 - decay)
    t.steps = 13
    before = [e.detach().clone() for e in t.ema.parameters()]
    t.train_step()
    decay = min(t.ema_decay, 13 / 22)
    for b, e, p in zip(before, t.ema.parameters(), t.G.parameters()):
        torch.testing.assert_close(e, b * decay + p.detach() * (1 - decay), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("saliency", ["taylor", "random"])
def test_fixed_sparsity_from_the_start(saliency):
    t = _trainer(g_sparsity=0.9, d_sparsity=0.6, schedule="fixed", saliency=saliency)
    t.train_step()
    masks = {n: m.mask() for n, m in sparse_layers(t.G).items()}
    assert model_sparsity(t.G) == pytest.approx(0.9, abs=2e-3)
    assert model_sparsity(t.D) == pytest.approx(0.6, abs=2e-3)
    t.fit()
    assert all(torch.equal(m.mask(), masks[n]) for n, m in sparse_layers(t.G).items())  # stays fixed


def _weights(t):
    return {f"{k}.{n}": v.detach().clone() for k, m in (("G", t.G), ("D", t.D), ("E", t.ema))
            for n, v in m.state_dict().items()}


@pytest.mark.parametrize("conditional", [True, False])
def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, conditional):
    kw = dict(steps=10, g_sparsity=0.7, d_sparsity=0.4, prune_end=7, prune_every=2, loss="hinge",
              conditional=conditional)
    full = _trainer(**kw)
    full.fit()
    first = _trainer(tmp_path / "a", checkpoint_every=4, **kw)
    first.fit(5)  # stops at step 5 after a checkpoint at step 4 ...
    first.save_checkpoint(tmp_path / "a" / "checkpoint.pt")  # ... and one at 5
    resumed = _trainer(**kw).load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert resumed.step_count == 5 and model_sparsity(resumed.G) > 0
    resumed.fit()
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full.history == resumed.history


def test_ctrl_c_writes_a_checkpoint_and_outputs(tmp_path, monkeypatch):
    t = _trainer(tmp_path, steps=8, sample_every=2)
    real_step = t.train_step

    def interrupt():
        if t.step_count == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(t, "train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    resumed = _trainer(steps=8).load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.step_count == 3
    assert (tmp_path / "samples_000002.png").is_file()
    monkeypatch.undo()
    t.fit()
    assert {"checkpoint.pt", "samples.png", "losses.png"} <= {p.name for p in tmp_path.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_interrupted_checkpoint_write_leaves_the_old_one(tmp_path, monkeypatch):
    t = _trainer(tmp_path, steps=2)
    t.fit()
    good = (tmp_path / "checkpoint.pt").read_bytes()

    def broken_save(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint(tmp_path / "checkpoint.pt")
    assert (tmp_path / "checkpoint.pt").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "losses.png", "samples.png"]


def test_checkpoint_bad_files(tmp_path):
    t = _trainer(tmp_path, steps=2)
    t.fit()
    ckpt = tmp_path / "checkpoint.pt"
    G, D, ema = models_from_checkpoint(ckpt)
    assert torch.equal(ema.fc.values, t.ema.fc.values)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable"):
        _trainer(steps=2).load_checkpoint(bad)
    bad.write_bytes(b"hi\n")  # not a torch file: torch.load's KeyError, named
    with pytest.raises(ValueError, match="not a readable.*KeyError"):
        _trainer(steps=2).load_checkpoint(bad)
    import argparse
    torch.save({"format": "something else", "args": argparse.Namespace(a=1)}, bad)  # pickled objects: refused,
    with pytest.raises(ValueError, match="without running pickled code refused it") as err:  # never run
        _trainer(steps=2).load_checkpoint(bad)
    assert "weights_only" not in str(err.value)  # torch's advice to load again running the pickled code: left out
    torch.save({"format": "something else"}, bad)
    with pytest.raises(ValueError, match="not a pysparse GAN checkpoint"):
        _trainer(steps=2).load_checkpoint(bad)
    torch.manual_seed(0)
    other = GANTrainer(Generator(8, 1, num_classes=10, width=16, latent_dim=16),
                       Discriminator(8, 1, num_classes=10, width=8), _data(), steps=2, batch_size=16, progress=False)
    with pytest.raises(ValueError, match="another architecture"):
        other.load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="other settings"):
        _trainer(steps=2, loss="hinge").load_checkpoint(ckpt)
    with pytest.raises(FileNotFoundError):
        _trainer(steps=2).load_checkpoint(tmp_path / "missing.pt")


def test_trainer_bad_input():
    G, D = _pair()
    with pytest.raises(ValueError, match="empty"):
        GANTrainer(G, D, (torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), steps=1)
    with pytest.raises(ValueError, match=r"\(1, 28, 28\)"):
        GANTrainer(G, D, _data(size=28), steps=1)
    with pytest.raises(ValueError, match="loss must be one of"):
        GANTrainer(G, D, _data(), steps=1, loss="wgan")
    with pytest.raises(ValueError, match="g_sparsity"):
        GANTrainer(G, D, _data(), steps=1, g_sparsity=1.5)
    with pytest.raises(ValueError, match="d_sparsity"):
        GANTrainer(G, D, _data(), steps=1, d_sparsity=float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        GANTrainer(G, D, (torch.full((20, 1, 8, 8), float("nan")), torch.zeros(20, dtype=torch.long)), steps=1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        GANTrainer(G, D, _data(n=10), steps=1, batch_size=16)
    with pytest.raises(ValueError, match="both be unconditional"):
        GANTrainer(G, _pair(conditional=False)[1], _data(), steps=1)
    with pytest.raises(ValueError, match="saliency"):
        GANTrainer(G, D, _data(), steps=1, saliency="hessian")
    with pytest.raises(TypeError, match="Generator"):
        GANTrainer(torch.nn.Linear(2, 2), D, _data(), steps=1)
    x, y = _data()
    with pytest.raises(ValueError, match=r"images must be in \[0, 1\] \(the generator's range\)"):
        GANTrainer(G, D, ((x - 0.5) / 0.25, y), steps=1)  # normalised data: the generator draws in [0, 1]
    with pytest.raises(TypeError, match=r"must be a Dataset of \(image, label\) pairs"):
        GANTrainer(G, D, [1, 2, 3], steps=1)  # was torch.cat's RuntimeError
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        G.sample(0, torch.zeros(0, dtype=torch.long))


# ---- metrics ----
def test_frechet_distance_matches_the_scipy_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 6, generator=g, dtype=torch.float64)
    b = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g,
                                                                            dtype=torch.float64) + 0.5
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * covmean).trace()
    assert metrics.frechet_distance(a, b) == pytest.approx(float(expected), rel=1e-6)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        metrics.frechet_distance(a, b[:, :3])
    with pytest.raises(ValueError, match="feature set b holds NaN or inf"):  # was linalg.eigh's convergence error
        metrics.frechet_distance(a, torch.where(b > 2, float("nan"), b))


def _G8():
    return Generator(8, 1, num_classes=10, width=8, latent_dim=8)


@pytest.mark.parametrize("call, match", [
    (lambda x, y: metrics.train_classifier(x, y + 10, num_classes=10, epochs=1),
     r"y must be in \[0, 10\) \(num_classes = 10\), got labels in \[10, 19\]"),  # was cross_entropy's IndexError
    (lambda x, y: metrics.train_classifier(x * float("nan"), y, num_classes=10, epochs=1), "x holds NaN or inf"),
    (lambda x, y: metrics.train_classifier(x, y.float(), num_classes=10, epochs=1), "y must be int64 labels"),
    (lambda x, y: metrics.train_classifier(x, y[:5], num_classes=10, epochs=1), "one per image of x"),
    (lambda x, y: metrics.train_classifier(x, y, num_classes=10, epochs=1, lr=float("nan")), "lr must be"),
    (lambda x, y: pysparse.synth.train_convnet(x, y, num_classes=5, epochs=1, seed=0), r"y must be in \[0, 5\)"),
    (lambda x, y: pysparse.synth.random_subset((x, y), 0, 10, 0), "ipc .* must be an int >= 1, got 0"),
    (lambda x, y: metrics.class_accuracy(None, Generator(8, 1, num_classes=10, width=8, latent_dim=8), per_class=0),
     "per_class must be an int >= 1, got 0"),
    # evaluate's real splits: checked, named, against each other and the generator, before any training (the
    # mismatches reached a convolution's RuntimeError after the classifier had trained)
    (lambda x, y: metrics.evaluate(_G8(), (torch.rand(40, 3, 8, 8), y), (x, y), num_classes=10),
     r"train images are \(3, 8, 8\) but test images are \(1, 8, 8\)"),
    (lambda x, y: metrics.evaluate(_G8(), (x, y), (torch.rand(40, 1, 16, 16), y), num_classes=10),
     r"test images are \(1, 16, 16\)"),
    (lambda x, y: metrics.evaluate(_G8(), (x.repeat(1, 3, 1, 1), y), (x.repeat(1, 3, 1, 1), y), num_classes=10),
     r"the generator makes \(1, 8, 8\) images but the real ones are \(3, 8, 8\)"),
    (lambda x, y: metrics.evaluate(_G8(), (x, y), (x, y + 10), num_classes=10), r"test: y must be in \[0, 10\)"),
    (lambda x, y: metrics.evaluate(_G8(), (x, y), (x[:, 0], y), num_classes=10),
     r"test: images must be \[N, C, H, W\]"),
    (lambda x, y: metrics.evaluate(_G8(), (x * float("nan"), y), (x, y), num_classes=10), "train: x holds NaN"),
])
def test_metric_inputs_are_checked(call, match):
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    with pytest.raises(ValueError, match=match):
        call(x, y)


def test_evaluate_wants_image_label_pairs():
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    with pytest.raises(TypeError, match="train must be a pair"):
        metrics.evaluate(_G8(), x, (x, y), num_classes=10)


class _RealImages(torch.nn.Module):
    """A 'generator' that returns real images of the requested class (or random noise): metrics must tell."""

    def __init__(self, x, y, noise=False):
        super().__init__()
        self.x, self.y, self.noise, self.num_classes = x, y, noise, 10

    def sample(self, n, y, generator=None):
        if self.noise:
            return torch.rand(n, *self.x.shape[1:], generator=generator)
        out = torch.empty(n, *self.x.shape[1:])
        for c in range(10):
            pool = self.x[self.y == c]
            sel = y == c
            out[sel] = pool[torch.randint(0, len(pool), (int(sel.sum()),), generator=generator)]
        return out


def test_metrics_tell_real_images_from_noise():
    from pysparse import data as pdata
    from pysparse.gan.trainer import tensors_of

    split = pdata.load("digits")
    tr, te = tensors_of(split.train), tensors_of(split.test)
    ext = metrics.ClassifierFeatures(metrics.train_classifier(*tr, num_classes=10, epochs=8))
    good = metrics.evaluate(_RealImages(*tr), tr, te, num_classes=10, extractor=ext, epochs=8)
    bad = metrics.evaluate(_RealImages(*tr, noise=True), tr, te, num_classes=10, extractor=ext, epochs=8)
    assert good["classifier_test_accuracy"] > 0.9
    assert good["class_accuracy"]["mean"] > 0.95 and bad["class_accuracy"]["mean"] < 0.5
    assert good["fid"] < 2 * good["fid_floor"] + 1e-3 and bad["fid"] > 10 * good["fid"]
    assert good["cas"] > 0.9 and bad["cas"] < 0.5
    with pytest.raises(ValueError, match="conditional"):
        metrics.class_accuracy(ext, Generator(8, 1))


# ---- CLI ----
def test_cli_gan_writes_everything_and_resumes(tmp_path):
    from pysparse.cli import main

    out = tmp_path / "gan"
    args = ["gan", "--data", "digits", "--conditional", "--g-sparsity", "0.8", "--d-sparsity", "0.5", "--steps",
            "6", "--batch-size", "16", "--width", "8", "--checkpoint-every", "3", "--sample-every", "3",
            "--eval-epochs", "1", "--seed", "0", "--quiet", "--out", str(out)]
    assert main(args) == 0
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint.pt", "samples.png", "samples_000003.png", "losses.png", "generator.safetensors",
            "metrics.json"} <= names
    report = json.loads((out / "metrics.json").read_text())
    assert report["steps"] == 6 and report["sparsity"]["generator"] == pytest.approx(0.8, abs=1e-3)
    assert {"fid", "fid_floor", "class_accuracy", "cas"} <= set(report["metrics"])
    with pytest.raises(SystemExit, match="--overwrite"):
        main(args)
    longer = [a if a != "6" else "9" for a in args]
    assert main(longer + ["--resume", str(out / "checkpoint.pt")]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["steps"] == 9 and report["resumed_from_step"] == 6
    with pytest.raises(SystemExit) as stop:  # argparse refuses it before any training
        main(args[:-2] + ["--loss", "nope", "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and not (tmp_path / "x").exists()


# ---- DDP ----
def _worker(rank, world, out_dir):
    # a file store in the test's own folder: no port to pick (a free port found first can be taken by another
    # process before the group binds it)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "store"), rank=rank,
                            world_size=world)
    try:
        t = _trainer(out_dir if rank == 0 else os.path.join(out_dir, "never"), steps=6, g_sparsity=0.7,
                     d_sparsity=0.5, prune_end=4, prune_every=2, saliency="random", checkpoint_every=3)
        t.fit()
        torch.save({k: v.clone() for k, v in _weights(t).items()}, os.path.join(out_dir, f"w{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # done: leave without the interpreter's teardown, where gloo's worker thread can abort the process (see
    # pysparse/__main__.py)
    os._exit(0)


def test_ddp_two_cpu_processes_agree_and_only_rank0_writes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    w0, w1 = (torch.load(tmp_path / f"w{r}.pt", weights_only=True) for r in range(2))
    assert w0.keys() == w1.keys()
    for k in w0:  # same masks, same weights on both ranks
        assert torch.equal(w0[k], w1[k]), k
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "never").exists()
    sparse = [v for k, v in w0.items() if k.startswith("G.") and k.endswith(".col")]
    assert sparse and sum(v.numel() for v in sparse) < 0.5 * sum(
        math.prod(m.weight_shape) for m in sparse_layers(_pair()[0]).values())


def test_torchrun_cli_two_cpu_processes(tmp_path):
    """`torchrun --nproc_per_node=2 -m pysparse gan ...`: the CLI joins the gloo group itself."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    # --standalone: torchrun's own rendezvous on a port it binds itself (no free port picked beforehand)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pysparse",
           "gan", "--data", "digits", "--conditional", "--g-sparsity", "0.5", "--steps", "4", "--batch-size", "16",
           "--width", "8", "--eval-epochs", "0", "--checkpoint-every", "2", "--sample-every", "2", "--quiet",
           "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 4
    assert report["sparsity"]["generator"] == pytest.approx(0.5, abs=1e-3)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4


@pytest.mark.parametrize("device", DEVICES)
def test_trainer_on_each_device_matches_the_sparse_definition(device):
    """A few steps on the device (gradual pruning, spectral norm, EMA); the spectral-norm sigma equals the
    largest singular value of the stored matrix there too."""
    torch.manual_seed(0)
    G = Generator(8, 1, num_classes=10, width=8, latent_dim=16).to(device)
    D = Discriminator(8, 1, num_classes=10, width=8).to(device)
    t = GANTrainer(G, D, _data(), steps=6, batch_size=16, g_sparsity=0.7, d_sparsity=0.5, prune_end=4,
                   prune_every=2, progress=False)
    t.fit()
    assert model_sparsity(t.G) == pytest.approx(0.7, abs=2e-3) and t.G.fc.values.device.type == device
    layer = t.D.features[2]  # the second SparseConv2d: a [16, 8 * 4 * 4] matrix
    with torch.no_grad():
        layer._power_iteration(500)
        expected = torch.linalg.matrix_norm(layer._to_matrix(layer.dense_weight()).double().cpu(), 2)
        assert float(layer.sigma()) == pytest.approx(float(expected), rel=1e-3)
    images = t.ema.sample(20, torch.arange(10, device=device).repeat(2))
    assert images.shape == (20, 1, 8, 8) and bool(torch.isfinite(images).all())
