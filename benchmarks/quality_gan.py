"""Sparse conditional GAN quality on scikit-learn's digits (issue 5), in one run: the same GAN with its
generator dense (nn.Linear / nn.Conv2d) and pruned to 80% / 90% (gradual cubic schedule over the first half of training,
magnitude saliency), the discriminator at --d-sparsity in every run, per seed.

    .venv/bin/python benchmarks/quality_gan.py                               # 3 seeds x 3 G sparsities
    .venv/bin/python benchmarks/quality_gan.py --seeds 0 --g-sparsities 0 0.8 --steps 1000

Protocol: 80/20 stratified split (random_state=0); --steps steps of batch 64, non-saturating loss, Adam 2e-4
(0.5, 0.999), EMA 0.999; the EMA generator is evaluated. Metrics from a CNN classifier trained on the real
train split (per seed): FID on its penultimate features (generated, one image per real test label, vs the real
test split; floor: real train vs real test), label accuracy of 100 samples per class, CAS (a CNN trained only
on one generated image per real training label, tested on the real test split). Train time is wall-clock on
this machine. Writes benchmarks/out/quality_gan.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pysparse import data
from pysparse.gan import Discriminator, GANTrainer, Generator, metrics
from pysparse.gan.trainer import tensors_of
from pysparse.shrink import model_sparsity

from _util import write_results  # benchmarks/ is on the path when a script runs


def run(args) -> dict:
    split = data.load("digits", seed=0)
    tr, te = tensors_of(split.train), tensors_of(split.test)
    rows = []
    for seed in args.seeds:
        ext = metrics.ClassifierFeatures(metrics.train_classifier(*tr, num_classes=10, seed=seed))
        for gs in args.g_sparsities:
            torch.manual_seed(seed)
            # the dense G is built from nn.Linear / nn.Conv2d (sparse=False): the baseline as users would run it
            G = Generator(8, 1, num_classes=10, width=args.width, sparse=gs > 0)
            D = Discriminator(8, 1, num_classes=10, width=args.width)
            t = GANTrainer(G, D, split.train, steps=args.steps, g_sparsity=gs, d_sparsity=args.d_sparsity,
                           seed=seed, progress=False)
            t0 = time.perf_counter()
            t.fit()
            seconds = time.perf_counter() - t0
            m = metrics.evaluate(t.ema, tr, te, num_classes=10, extractor=ext, seed=seed)
            row = dict(seed=seed, g_sparsity=gs, reached=model_sparsity(G), d_sparsity=model_sparsity(D),
                       train_seconds=seconds, fid=m["fid"], fid_floor=m["fid_floor"],
                       label_accuracy=m["class_accuracy"]["mean"], cas=m["cas"])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"steps": args.steps, "width": args.width, "rows": rows}


def summarize(result: dict) -> str:
    rows = result["rows"]
    dense = {r["seed"]: r["fid"] for r in rows if r["g_sparsity"] == 0.0}
    lines = ["| G sparsity | train s | label accuracy | FID | FID / dense G's FID | CAS | FID floor |",
             "|---|---|---|---|---|---|---|"]

    def ms(v):
        return f"{statistics.mean(v):.4f} ± {statistics.pstdev(v):.4f}" if len(v) > 1 else f"{v[0]:.4f}"

    for gs in sorted({r["g_sparsity"] for r in rows}):
        sel = [r for r in rows if r["g_sparsity"] == gs]
        ratio = [r["fid"] / dense[r["seed"]] for r in sel if r["seed"] in dense]
        lines.append(f"| {gs:.2f} | {statistics.mean(r['train_seconds'] for r in sel):.0f} | "
                     f"{ms([r['label_accuracy'] for r in sel])} | {ms([r['fid'] for r in sel])} | "
                     f"{ms(ratio) if ratio else '-'} | {ms([r['cas'] for r in sel])} | "
                     f"{ms([r['fid_floor'] for r in sel])} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--g-sparsities", type=float, nargs="+", default=[0.0, 0.8, 0.9])
    p.add_argument("--d-sparsity", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--width", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    result = run(args)
    write_results("quality_gan", result, summarize(result))


if __name__ == "__main__":
    main()
