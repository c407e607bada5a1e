"""pysparse.synth (synthetic sets: save / load, sample / select / match, evaluation), distillation in retrain,
and the `pysparse compress` pipeline."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse import data as pdata, models, synth
from pysparse.gan import Generator, metrics
from pysparse.gan.trainer import tensors_of
from pysparse.retrain import distillation_loss
from pysparse.synth import SyntheticSet


def _set(n_per=3, k=4):
    g = torch.Generator().manual_seed(0)
    return SyntheticSet(torch.rand(n_per * k, 1, 8, 8, generator=g), torch.arange(k).repeat_interleave(n_per), k)


def _real(n=200, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat(n // k)
    x = (torch.rand(n, 1, 8, 8, generator=g) * 0.2 + (y.float() / k)[:, None, None, None]).clamp(0, 1)
    return x, y


def test_synthetic_set_save_load_and_bad_files(tmp_path):
    s = _set()
    s.save(tmp_path / "set.safetensors")
    assert (tmp_path / "set.png").is_file()
    back = SyntheticSet.load(tmp_path / "set.safetensors", image_shape=(1, 8, 8))
    assert torch.equal(back.images, s.images) and torch.equal(back.labels, s.labels) and back.ipc == 3
    with pytest.raises(ValueError, match="expected"):
        SyntheticSet.load(tmp_path / "set.safetensors", image_shape=(1, 28, 28))
    raw = (tmp_path / "set.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        SyntheticSet.load(tmp_path / "cut.safetensors")
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # a pixel changed after writing
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="checksum"):
        SyntheticSet.load(tmp_path / "flip.safetensors")
    pysparse.save(torch.nn.Linear(2, 2), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a pysparse synthetic-set"):
        SyntheticSet.load(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError):
        SyntheticSet.load(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="labels must be in"):
        SyntheticSet(torch.rand(2, 1, 8, 8), torch.tensor([0, 5]), 4)
    with pytest.raises(ValueError, match="NaN"):
        SyntheticSet(torch.full((1, 1, 8, 8), float("nan")), torch.tensor([0]), 2)
    for bad in (-0.01, 1.5):
        with pytest.raises(ValueError, match=r"images must lie in \[0, 1\], got values in"):
            SyntheticSet(torch.full((1, 1, 8, 8), bad), torch.tensor([0]), 2)
    SyntheticSet(torch.tensor([0.0, 1.0]).repeat(32).view(1, 1, 8, 8), torch.tensor([0]), 2)  # the ends are in
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _generator():
    torch.manual_seed(0)
    return Generator(8, 1, num_classes=10, width=8, latent_dim=16, sparsity=0.5)


def test_sample_and_select():
    G = _generator()
    s = synth.synthesize(G, 3, method="sample")
    assert s.images.shape == (30, 1, 8, 8) and s.ipc == 3 and float(s.images.min()) >= 0
    assert torch.equal(s.labels, torch.arange(10).repeat_interleave(3))
    ext = torch.nn.Sequential(torch.nn.Flatten())  # pixels as features
    ext.predict = None
    sel = synth.synthesize(G, 2, method="select", extractor=ext, candidates=20)
    assert sel.images.shape == (20, 1, 8, 8)
    # herding: the picks' feature mean is closer to the pool's class mean than two random pool images
    pool = metrics.sample_like(G, torch.arange(10).repeat_interleave(20), seed=0).flatten(1).double()
    for c in range(10):
        mu = pool[c * 20:(c + 1) * 20].mean(0)
        picked = sel.images[sel.labels == c].flatten(1).double().mean(0)
        first = pool[c * 20:c * 20 + 2].mean(0)
        assert (picked - mu).norm() <= (first - mu).norm() + 1e-9


def test_match_moves_the_set_towards_the_real_statistics():
    G = _generator()
    real = _real()
    before = synth.synthesize(G, 2, method="sample", seed=0)
    after = synth.synthesize(G, 2, method="match", real=real, iterations=150, lr=0.05, seed=0)
    assert after.images.shape == (20, 1, 8, 8) and after.ipc == 2

    def gap(s):  # per-class mean-embedding distance under random ConvNets the optimisation never saw
        total = 0.0
        for seed in range(5):
            torch.manual_seed(100 + seed)
            net = models.convnet(1, 10, 8, width=32)[:-1]
            with torch.no_grad():
                for c in range(10):
                    total += float((net(s.images[s.labels == c]).mean(0) - net(real[0][real[1] == c]).mean(0))
                                   .pow(2).sum())
        return total

    assert gap(after) < 0.75 * gap(before)
    # the caller's generator is untouched (a dense copy is optimised through)
    assert isinstance(G.fc, pysparse.SparseLinear) and G.fc.values.requires_grad


def test_mmd2_is_the_biased_kernel_mmd():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, generator=g), torch.randn(7, 3, generator=g) + 0.5
    bws = (0.5, 2.0)

    def k(x, y):
        return sum(math.exp(-float(((x - y) ** 2).sum()) / (2 * s)) for s in bws)

    want = (sum(k(x, y) for x in a for y in a) / 25 + sum(k(x, y) for x in b for y in b) / 49
            - 2 * sum(k(x, y) for x in a for y in b) / 35)
    assert float(synth.mmd2(a, b, bws)) == pytest.approx(want, rel=1e-5)
    assert float(synth.mmd2(b, a, bws)) == pytest.approx(want, rel=1e-5) and want > 0
    assert float(synth.mmd2(a, a.clone(), bws)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="b must be a non-empty 2-D tensor"):
        synth.mmd2(a, torch.zeros(0, 3), bws)
    with pytest.raises(ValueError, match="a must be a non-empty 2-D tensor"):
        synth.mmd2(a[0], b, bws)
    with pytest.raises(ValueError, match="3 features per row but b has 4"):
        synth.mmd2(a, torch.randn(2, 4), bws)
    for bad in ((), (1.0, 0.0), (-2.0,)):
        with pytest.raises(ValueError, match="bandwidths must be positive"):
            synth.mmd2(a, b, bad)


def test_match_mmd_term_changes_the_set_and_is_checked():
    G, real = _generator(), _real()
    with_mmd = synth.synthesize(G, 2, method="match", real=real, iterations=8, seed=0)
    without = synth.synthesize(G, 2, method="match", real=real, iterations=8, seed=0, mmd=0.0)
    assert not torch.equal(with_mmd.images, without.images)
    for bad in (-1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="mmd must be a finite number"):
            synth.synthesize(G, 1, method="match", real=real, mmd=bad)


def test_match_augmentation_is_a_siamese_affine_transform():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=g)
    # no zoom, rotation or shift: the identity
    torch.testing.assert_close(synth._transform(x, synth._affine(6, g, scale=1.0, degrees=0.0, shift=0.0)), x)
    # a one-pixel shift moves the image by one pixel (zeros come in)
    theta = torch.tensor([[[1.0, 0.0, 2.0 / 8], [0.0, 1.0, 0.0]]]).repeat(6, 1, 1)
    torch.testing.assert_close(synth._transform(x, theta)[..., :-1], x[..., 1:])
    assert torch.all(synth._transform(x, theta)[..., -1] == 0)
    theta = synth._affine(1000, g)
    zoom = theta[:, :, :2].det().abs().rsqrt()    # the maps' scale, within [1/1.2, 1.2]
    assert zoom.min() >= 1 / 1.2 - 1e-5 and zoom.max() <= 1.2 + 1e-5 and theta[:, :, 2].abs().max() <= 0.25 + 1e-6
    # with and without augmentation: both valid sets, different optimisation paths
    G, real = _generator(), _real()
    a = synth.synthesize(G, 1, method="match", real=real, iterations=20, augment=True, seed=0)
    b = synth.synthesize(G, 1, method="match", real=real, iterations=20, augment=False, seed=0)
    assert a.images.shape == b.images.shape and not torch.equal(a.images, b.images)
    assert 0 <= float(a.images.min()) and float(a.images.max()) <= 1


def test_match_depends_on_its_seed_alone_and_leaves_the_global_stream():
    G, real = _generator(), _real()
    torch.manual_seed(1)
    a = synth.synthesize(G, 1, method="match", real=real, iterations=6, seed=3)
    after_a = torch.rand(3)
    torch.manual_seed(2)   # another global state before the call: same set
    b = synth.synthesize(G, 1, method="match", real=real, iterations=6, seed=3)
    assert torch.equal(a.images, b.images)
    torch.manual_seed(1)
    assert torch.equal(torch.rand(3), after_a)  # the call drew nothing from the caller's stream
    assert not torch.equal(synth.synthesize(G, 1, method="match", real=real, iterations=6, seed=4).images, a.images)


def test_synthesize_bad_input():
    G = _generator()
    with pytest.raises(ValueError, match="ipc"):
        synth.synthesize(G, 0)
    with pytest.raises(ValueError, match="method"):
        synth.synthesize(G, 1, method="dream")
    with pytest.raises(ValueError, match="class-conditional"):
        synth.synthesize(Generator(8, 1, width=8), 1, method="sample")
    with pytest.raises(ValueError, match="needs real"):
        synth.synthesize(G, 1, method="match")
    with pytest.raises(ValueError, match="candidates"):
        synth.synthesize(G, 5, method="select", candidates=3)
    with pytest.raises(ValueError, match="generator draws"):
        synth.synthesize(G, 1, method="match", real=(torch.rand(20, 1, 28, 28), torch.arange(10).repeat(2)))
    with pytest.raises(ValueError, match="variance"):
        synth.synthesize(G, 1, method="match", real=_real(), variance=-1.0)
    with pytest.raises(TypeError, match="augment"):
        synth.synthesize(G, 1, method="match", real=_real(), augment="yes")
    with pytest.raises(ValueError, match="pixel_share"):
        synth.synthesize(G, 1, method="match", real=_real(), pixel_share=1.0)
    with pytest.raises(ValueError, match="iterations"):
        synth.synthesize(G, 1, method="match", real=_real(), iterations=0)
    for kwargs, match in ((dict(real_batch=0), "real_batch must be an int >= 1"),  # was "images contain NaN"
                          (dict(width=0), "width must be an int >= 1"),  # was a ZeroDivisionError
                          (dict(lr=float("nan")), "lr must be a positive finite number"),
                          (dict(pixel_lr=-1.0), "pixel_lr must be a positive finite number")):
        with pytest.raises(ValueError, match=match):
            synth.synthesize(G, 1, method="match", real=_real(), **kwargs)
    x, y = _real()
    with pytest.raises(ValueError, match=r"real: images must be in \[0, 1\]"):
        synth.synthesize(G, 1, method="match", real=(x * 5, y))
    with pytest.raises(ValueError, match="larger than class"):
        synth.random_subset(_real(), 50, 10, seed=0)


def test_evaluate_runs_the_protocol_with_baselines():
    split = pdata.load("digits")
    train = tensors_of(split.train)
    x, y = synth.random_subset(train, 5, 10, seed=0)
    res = synth.evaluate(SyntheticSet(x, y, 10), split, seeds=2, epochs=30, full_epochs=20, width=16)
    assert set(res) >= {"synthetic", "random_real", "full", "ipc", "seeds"}
    assert len(res["synthetic"]["runs"]) == 2 and res["ipc"] == 5
    assert res["synthetic"]["mean"] > 0.5 and res["full"]["mean"] > 0.8  # real images: learns something
    with pytest.raises(ValueError, match="seeds"):
        synth.evaluate(SyntheticSet(x, y, 10), split, seeds=0)
    with pytest.raises(ValueError, match="synthetic images are"):
        synth.evaluate(SyntheticSet(torch.rand(10, 1, 4, 4), torch.arange(10), 10), split, seeds=1)


def test_distillation_loss_and_data_free_retrain():
    s, t, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    T = 3.0
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(s, t, y, temperature=T, alpha=0.7),
                               0.7 * T * T * kl + 0.3 * F.cross_entropy(s, y))
    split = pdata.load("digits")
    loader = pdata.loader(split.train, 64, shuffle=True)
    test = pdata.loader(split.test, 512)
    teacher = models.cnn()
    pysparse.train(teacher, loader, epochs=8, lr=0.05)
    x, yy = synth.random_subset(tensors_of(split.train), 10, 10, seed=0)
    after = {}
    for kd in (True, False):
        student = models.cnn()
        student.load_state_dict(teacher.state_dict())
        result = pysparse.prune(student, "magnitude", sparsity=0.95)
        out = pysparse.retrain(student, result.masks, "connectivity", SyntheticSet(x, yy, 10), epochs=30, lr=0.01,
                               teacher=teacher if kd else None, eval_data=test)
        after[kd] = out.accuracy_after
    assert after[True] > 0.5 and after[True] != after[False]  # the teacher's soft labels were used
    assert after[True] >= after[False] - 0.02
    params = dict(student.named_parameters())
    for n, m in result.masks.items():
        assert not bool(params[n][~m].any())  # still pruned
    with pytest.raises(ValueError, match="teacher must be another model"):
        pysparse.retrain(student, result.masks, "connectivity", loader, epochs=1, lr=0.01, teacher=student)
    with pytest.raises(ValueError, match="alpha"):
        pysparse.retrain(student, result.masks, "connectivity", loader, epochs=1, lr=0.01, teacher=teacher,
                         alpha=2.0)
    with pytest.raises(ValueError, match=r"the teacher's logits have shape \(6, 4\) but the model's \(6, 5\)"):
        distillation_loss(s, t[:, :4], y)  # was kl_div's size error, or a broadcast over [6, 1] logits
    with pytest.raises(ValueError, match="the teacher must score the same classes"):
        pysparse.retrain(student, result.masks, "connectivity", loader, epochs=1, lr=0.01,
                         teacher=models.mlp(num_classes=5))


TINY = ["--ipc", "2", "--gan-steps", "6", "--match-iterations", "4", "--retrain-steps", "4", "--eval-seeds", "1",
        "--eval-epochs", "2", "--eval-width", "8", "--epochs", "1", "--quiet"]


def test_compress_cli_writes_the_report_and_respects_the_out_folder(tmp_path):
    from pysparse.cli import main

    out = tmp_path / "run"
    assert main(["compress", "--sparsity", "0.9", "--out", str(out), *TINY]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"report.md", "report.json", "samples.png", "synthetic.png", "sparsity.png", "accuracy.png",
            "losses.png", "dense.safetensors", "model.safetensors", "generator.safetensors",
            "synthetic.safetensors"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert (report["mmd"], report["damp"]) == (100.0, 0.01)
    assert {"dense", "pruned_no_retraining", "retrained_synthetic", "retrained_random_real",
            "retrained_full_real", "compensated_synthetic"} <= set(report["accuracy"])
    assert "refitted on the 20 synthetic images" in (out / "report.md").read_text()
    assert {"synthetic", "random_real", "full"} <= set(report["synthetic_set"])
    assert "| dense |" in (out / "report.md").read_text()
    assert SyntheticSet.load(out / "synthetic.safetensors").ipc == 2
    with pytest.raises(SystemExit, match="--overwrite"):
        main(["compress", "--out", str(out), *TINY])
    (out / "notes.txt").write_text("mine")
    assert main(["compress", "--out", str(out), "--overwrite", *TINY]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite never deletes the user's files
    assert main(["compress", "--out", str(tmp_path / "big"), *TINY[2:], "--ipc", "500"]) == 2
    assert not (tmp_path / "big").exists()
    for bad in (["--mmd", "-1"], ["--mmd", "nan"], ["--damp", "0"], ["--damp", "inf"]):  # refused before any work
        assert main(["compress", "--out", str(tmp_path / "bad"), *TINY, *bad]) == 2
        assert not (tmp_path / "bad").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_compress_cli_passes_mmd_and_damp_on(tmp_path, monkeypatch):
    """--mmd reaches the synthesis and --damp the refit on the synthetic images (and the report)."""
    from pysparse import compensate as comp, synth as synth_mod
    from pysparse.cli import main

    seen = {}
    real_synthesize, real_compensate = synth_mod.synthesize, comp.compensate

    def synthesize(*args, **kw):
        seen["mmd"] = kw["mmd"]
        return real_synthesize(*args, **kw)

    def compensate(*args, **kw):
        seen["damp"] = kw["damp"]
        return real_compensate(*args, **kw)

    monkeypatch.setattr(synth_mod, "synthesize", synthesize)
    monkeypatch.setattr(comp, "compensate", compensate)
    assert main(["compress", "--out", str(tmp_path / "run"), *TINY, "--mmd", "0", "--damp", "0.5"]) == 0
    assert seen == {"mmd": 0.0, "damp": 0.5}
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (report["mmd"], report["damp"]) == (0.0, 0.5)
