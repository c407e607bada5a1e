"""Synthetic-set and data-free retraining quality on scikit-learn's digits (issue 6), in one run.

    .venv/bin/python benchmarks/quality_synth.py                  # 3 GAN seeds x 2 evaluation seeds (~15 min)
    .venv/bin/python benchmarks/quality_synth.py --seeds 0 --ipcs 10

Per seed: the sparse conditional GAN of `pysparse compress` (G 80%, D 50%, --gan-steps) on the fixed 80/20
stratified split; synthetic sets of IPC 1 / 10 / 50 by "match" (and "sample" / "select" at IPC 10); each
evaluated by the DC / DM protocol (fresh ConvNet width 128, SGD lr 0.01 momentum 0.9 wd 5e-4, batch 256, 300
epochs, lr x0.1 at half) with --eval-seeds seeds, beside random real subsets of the same size and the full
training set (50 epochs), all in this run. Data-free: the CNN of `pysparse compress`, trained dense, pruned to
90% (taylor), retrained (connectivity, distillation from the dense model, 300 steps) on the IPC-50 synthetic
set, on a random real subset of 500 images and on all 1437 real images. Writes benchmarks/out/quality_synth.*
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import pysparse
from pysparse import data, models, synth
from pysparse.gan import Discriminator, GANTrainer, Generator, metrics
from pysparse.gan.trainer import tensors_of
from pysparse.pipeline import _epochs_for, _loader
from pysparse.retrain import accuracy

from _util import write_results  # benchmarks/ is on the path when a script runs


def run(args) -> dict:
    split = data.load("digits", seed=0)
    train, test = tensors_of(split.train), tensors_of(split.test)
    test_loader = [(test[0], test[1])]
    rows, free = [], []
    for seed in args.seeds:
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        G, D = Generator(8, 1, num_classes=10), Discriminator(8, 1, num_classes=10)
        trainer = GANTrainer(G, D, split.train, steps=args.gan_steps, g_sparsity=0.8, d_sparsity=0.5, seed=seed,
                             progress=False)
        trainer.fit()
        gan_s = time.perf_counter() - t0
        ext = metrics.ClassifierFeatures(metrics.train_classifier(*train, num_classes=10, seed=seed))
        sets = {}
        for ipc in args.ipcs:
            for method in (["match", "sample", "select"] if ipc == 10 else ["match"]):
                t = time.perf_counter()
                extra = {} if args.match_iterations is None or method != "match" else \
                    dict(iterations=args.match_iterations)
                s = synth.synthesize(trainer.ema, ipc, method=method, real=train, extractor=ext, seed=seed, **extra)
                syn_s = time.perf_counter() - t
                sets[(ipc, method)] = s
                ev = synth.evaluate(s, split, seeds=args.eval_seeds, full=(ipc == 10 and method == "match"))
                row = dict(seed=seed, ipc=ipc, method=method, synth_seconds=syn_s, gan_seconds=gan_s,
                           synthetic=ev["synthetic"]["runs"], random_real=ev["random_real"]["runs"],
                           full=ev.get("full", {}).get("runs"))
                rows.append(row)
                print(json.dumps(row), flush=True)
        if 50 in args.ipcs:
            torch.manual_seed(seed)
            dense = models.cnn()
            pysparse.train(dense, _loader(*train, 64, seed), epochs=20, lr=0.05)
            dense.eval()
            pruned = copy.deepcopy(dense)
            result = pysparse.prune(pruned, "taylor", sparsity=0.9, data=_loader(*train, 64, seed),
                                    loss_fn=F.cross_entropy, num_batches=8)
            s = sets[(50, "match")]
            rx, ry = synth.random_subset(train, 50, 10, seed=seed + 1000)
            rec = dict(seed=seed, dense=accuracy(dense, test_loader), pruned=accuracy(pruned, test_loader))
            for name, (x, y) in {"synthetic": (s.images, s.labels), "random_real": (rx, ry),
                                 "full_real": train}.items():
                m = copy.deepcopy(pruned)
                pysparse.retrain(m, result.masks, "connectivity", _loader(x, y, 64, seed),
                                 epochs=_epochs_for(300, len(y), 64), lr=0.01, teacher=dense)
                rec[name] = accuracy(m, test_loader)
            free.append(rec)
            print(json.dumps(rec), flush=True)
    return {"gan_steps": args.gan_steps, "eval_seeds": args.eval_seeds, "rows": rows, "data_free": free}


def _ms(v):
    return f"{100 * statistics.mean(v):.2f} ± {100 * statistics.pstdev(v):.2f}" if v else "-"


def summarize(r: dict) -> str:
    lines = ["| IPC | method | synthetic set | random real subset | full data | runs |", "|---|---|---|---|---|---|"]
    keys = sorted({(row["ipc"], row["method"]) for row in r["rows"]})
    for ipc, method in keys:
        sel = [row for row in r["rows"] if row["ipc"] == ipc and row["method"] == method]
        syn = [a for row in sel for a in row["synthetic"]]
        rnd = [a for row in sel for a in row["random_real"]]
        full = [a for row in sel if row["full"] for a in row["full"]]
        lines.append(f"| {ipc} | {method} | {_ms(syn)} | {_ms(rnd)} | {_ms(full)} | {len(syn)} |")
    if r["data_free"]:
        lines += ["", "| 90% CNN (taylor) | test accuracy % |", "|---|---|"]
        for key in ("dense", "pruned", "synthetic", "random_real", "full_real"):
            lines.append(f"| {key} | {_ms([d[key] for d in r['data_free']])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ipcs", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--gan-steps", type=int, default=2000)
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--match-iterations", type=int, default=None, help="synthesize's default if not given")
    args = p.parse_args()
    result = run(args)
    write_results("quality_synth", result, summarize(result))


if __name__ == "__main__":
    main()
