"""The whole pipeline, ``pysparse compress`` (``pysparse demo`` is it on digits with the defaults):

train the dense classifier -> prune it (taylor by default) -> train the sparse conditional GAN -> synthesize a
compact set (IPC images per class) -> retrain the pruned model data-free on that set with distillation from the
dense model -> evaluate everything, beside a random real subset of the same size and the full real data. Also
without any retraining: the pruned model's kept weights refitted to the dense model's layer outputs on the
synthetic images alone (``prune(compensate=True)``'s layer-wise OBS).

Writes into the output folder: report.md, report.json (every figure), samples.png (GAN samples, one row per
class), synthetic.png (the synthetic set), sparsity.png (per-layer sparsity), accuracy.png (accuracy vs
sparsity), losses.png (GAN losses), and the artefacts dense.safetensors, model.safetensors (the compressed,
data-free retrained classifier), generator.safetensors (the sparse EMA generator) and synthetic.safetensors.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _loader(x, y, batch_size, seed):
    """Shuffled batches of a (images, labels) pair of tensors."""
    from torch.utils.data import TensorDataset

    from .data import loader

    return loader(TensorDataset(x, y), batch_size, shuffle=True, seed=seed)


def _epochs_for(steps: int, n: int, batch_size: int) -> int:
    return max(1, round(steps / math.ceil(n / batch_size)))


def run(args) -> dict:
    import pysparse
    from pysparse import data as pdata, models, synth
    from pysparse.gan import Discriminator, GANTrainer, Generator, metrics
    from pysparse.gan.trainer import tensors_of
    from pysparse.compensate import check_damp, compensate
    from pysparse.retrain import accuracy
    from pysparse.shrink import model_sparsity

    from .cli import _prepare_out, publish

    if isinstance(args.ipc, bool) or args.ipc < 1:
        raise ValueError(f"--ipc must be >= 1, got {args.ipc}")
    synth.check_weight("--mmd", args.mmd)  # checked here, not minutes later when the synthesis starts
    check_damp(args.damp)
    t_start = time.perf_counter()
    timings = {}
    torch.manual_seed(args.seed)
    split = pdata.load(args.data, root=args.root, seed=args.seed)
    train, test = tensors_of(split.train, name="train"), tensors_of(split.test, name="test")
    k = split.num_classes
    smallest = int(torch.bincount(train[1], minlength=k).min())
    if args.ipc > smallest:
        raise ValueError(f"--ipc {args.ipc} is larger than the data allows (the smallest class has {smallest} "
                         "training images)")
    c, h, _ = split.image_shape
    out = Path(args.out)
    tmp = _prepare_out(out, args.overwrite)
    progress = not args.quiet
    try:
        train_loader = _loader(*train, 64, args.seed)
        test_loader = [(test[0][i:i + 512], test[1][i:i + 512]) for i in range(0, len(test[1]), 512)]

        # 1. the dense classifier
        t = time.perf_counter()
        dense = models.cnn(c, k, h)
        pysparse.train(dense, train_loader, epochs=args.epochs, lr=0.05, progress=progress)
        dense.eval()
        pysparse.save(dense, tmp / "dense.safetensors")
        acc = {"dense": accuracy(dense, test_loader)}
        timings["dense"] = time.perf_counter() - t

        # 2. prune (and an accuracy-vs-sparsity curve of one-shot pruning, no retraining)
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed)
        prune_kw = dict(data=train_loader, loss_fn=F.cross_entropy, num_batches=8)
        curve = []
        for s in sorted({0.5, 0.7, 0.8, 0.9, 0.95, 0.98, args.sparsity}):
            m = copy.deepcopy(dense)
            pysparse.prune(m, args.method, sparsity=s, generator=gen, **prune_kw)
            curve.append({"sparsity": s, "accuracy_oneshot": accuracy(m, test_loader)})
        pruned = copy.deepcopy(dense)
        result = pysparse.prune(pruned, args.method, sparsity=args.sparsity, generator=gen, **prune_kw)
        acc["pruned_no_retraining"] = accuracy(pruned, test_loader)
        pysparse.plot_report(result, tmp / "sparsity.png")
        timings["prune"] = time.perf_counter() - t

        # 3. the sparse conditional GAN
        t = time.perf_counter()
        torch.manual_seed(args.seed)
        G, D = Generator(h, c, num_classes=k), Discriminator(h, c, num_classes=k)
        trainer = GANTrainer(G, D, split.train, steps=args.gan_steps, g_sparsity=args.g_sparsity,
                             d_sparsity=args.d_sparsity, seed=args.seed, out=tmp, progress=progress)
        trainer.fit()
        (tmp / "checkpoint.pt").unlink()
        pysparse.save(trainer.ema, tmp / "generator.safetensors")
        ext = metrics.ClassifierFeatures(metrics.train_classifier(*train, num_classes=k, seed=args.seed))
        gan_metrics = metrics.evaluate(trainer.ema, train, test, num_classes=k, extractor=ext, seed=args.seed)
        timings["gan"] = time.perf_counter() - t

        # 4. the compact synthetic set
        t = time.perf_counter()
        syn = synth.synthesize(trainer.ema, args.ipc, method=args.synth, real=train, extractor=ext,
                               iterations=args.match_iterations, mmd=args.mmd, seed=args.seed, progress=progress)
        syn.save(tmp / "synthetic.safetensors")
        timings["synthesize"] = time.perf_counter() - t

        # 5. retrain the pruned model: data-free (synthetic + distillation) beside the real-data references,
        #    the same recipe and number of steps each (connectivity correction, KD from the dense model)
        t = time.perf_counter()
        rx, ry = synth.random_subset(train, syn.ipc, k, seed=args.seed + 1000)
        sources = {"synthetic": (syn.images, syn.labels), "random_real": (rx, ry), "full_real": train}
        retrained = {}
        for name, (x, y) in sources.items():
            m = copy.deepcopy(pruned)
            epochs = _epochs_for(args.retrain_steps, len(y), 64)
            pysparse.retrain(m, result.masks, "connectivity", _loader(x, y, 64, args.seed), epochs=epochs, lr=0.01,
                             teacher=dense, progress=False)
            acc[f"retrained_{name}"] = accuracy(m, test_loader)
            retrained[name] = m
        model = pysparse.sparsify(retrained["synthetic"], result.masks, min_sparsity=0.0)
        pysparse.save(model, tmp / "model.safetensors")
        # data-free *and* retraining-free: the same masks, kept weights refitted on the synthetic images
        refitted = copy.deepcopy(dense)
        compensate(refitted, result.masks, [(syn.images[i:i + 64], syn.labels[i:i + 64])
                                            for i in range(0, len(syn), 64)], damp=args.damp)
        acc["compensated_synthetic"] = accuracy(refitted, test_loader)
        timings["retrain"] = time.perf_counter() - t

        # 6. how good is the synthetic set as training data on its own (fresh ConvNets, DC / DM protocol)
        t = time.perf_counter()
        syn_eval = synth.evaluate(syn, split, seeds=args.eval_seeds, epochs=args.eval_epochs,
                                  width=args.eval_width, progress=progress)
        timings["evaluate"] = time.perf_counter() - t

        size = {"dense_bytes": os.path.getsize(tmp / "dense.safetensors"),
                "compressed_bytes": os.path.getsize(tmp / "model.safetensors"),
                "synthetic_images": len(syn), "real_training_images": len(train[1])}
        report = {
            "data": args.data, "seed": args.seed, "method": args.method, "sparsity": result.sparsity,
            "ipc": args.ipc, "synthesis": args.synth, "mmd": args.mmd, "damp": args.damp, "accuracy": acc,
            "accuracy_vs_sparsity": curve,
            "layers": result.to_dict()["layers"],
            "gan": {"steps": args.gan_steps, "g_sparsity": model_sparsity(G), "d_sparsity": model_sparsity(D),
                    **gan_metrics},
            "synthetic_set": syn_eval, "size": size, "seconds": timings,
        }
        report["seconds"]["total"] = time.perf_counter() - t_start
        _plot_curve(curve, acc, args.sparsity, tmp / "accuracy.png")
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.md").write_text(markdown(report))
        publish(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _plot_curve(curve, acc, sparsity, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .sensitivity import _save_figure

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["sparsity"] for p in curve], [p["accuracy_oneshot"] for p in curve], "o-", label="one-shot, no retraining")
    for key, marker in (("retrained_synthetic", "*"), ("retrained_random_real", "s"), ("retrained_full_real", "^")):
        ax.plot([sparsity], [acc[key]], marker, markersize=10, label=key.replace("_", " "))
    ax.axhline(acc["dense"], color="gray", linestyle="--", label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def markdown(r: dict) -> str:
    a, s, g = r["accuracy"], r["synthetic_set"], r["gan"]

    def ms(d):
        return f"{100 * d['mean']:.2f} ± {100 * d['std']:.2f}"

    lines = [f"# pysparse compress: {r['data']}, {r['method']} pruning to {r['sparsity']:.1%}, IPC {r['ipc']} "
             f"({r['synthesis']})", "",
             "| classifier (test accuracy) | % |", "|---|---:|",
             f"| dense | {100 * a['dense']:.2f} |",
             f"| pruned, no retraining | {100 * a['pruned_no_retraining']:.2f} |",
             f"| pruned, kept weights refitted on the {s['images']} synthetic images (no retraining) | "
             f"{100 * a['compensated_synthetic']:.2f} |",
             f"| pruned, retrained data-free on {s['images']} synthetic images + distillation | "
             f"{100 * a['retrained_synthetic']:.2f} |",
             f"| pruned, retrained on {s['images']} random real images + distillation | "
             f"{100 * a['retrained_random_real']:.2f} |",
             f"| pruned, retrained on all {r['size']['real_training_images']} real images + distillation | "
             f"{100 * a['retrained_full_real']:.2f} |", "",
             f"Compressed classifier file: {r['size']['compressed_bytes']:,} bytes (dense "
             f"{r['size']['dense_bytes']:,}).", "",
             f"| training set for a fresh ConvNet ({s['seeds']} seeds, {s['epochs']} epochs) | test accuracy % |",
             "|---|---:|",
             f"| synthetic, IPC {s['ipc']} | {ms(s['synthetic'])} |"]
    if "random_real" in s:
        lines.append(f"| random real subset, IPC {s['ipc']} | {ms(s['random_real'])} |")
    if "full" in s:
        lines.append(f"| full real training set | {ms(s['full'])} |")
    lines += ["", f"Sparse GAN ({g['steps']} steps; G {g['g_sparsity']:.0%} sparse, D {g['d_sparsity']:.0%}): "
              f"classifier-feature FID {g['fid']:.3f} (floor, real train vs test: {g['fid_floor']:.3f})"
              + (f", label accuracy {100 * g['class_accuracy']['mean']:.2f}%, CAS {100 * g['cas']:.2f}%"
                 if "cas" in g else "") + ".", "",
              "| layer | weights | kept | sparsity |", "|---|---:|---:|---:|"]
    for layer in r["layers"]:
        lines.append(f"| {layer['name']} | {layer['params']} | {layer['kept']} | {layer['sparsity']:.4f} |")
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()), ""]
    return "\n".join(lines)
