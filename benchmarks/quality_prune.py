"""Pruning quality on scikit-learn's digits (issue 4): every method x mode x sparsity, mean over seeds, next to
torch.nn.utils.prune.global_unstructured (L1) with the same fine-tuning, in one run.

    .venv/bin/python benchmarks/quality_prune.py                       # the full grid (about 20-30 min, 2 cores)
    .venv/bin/python benchmarks/quality_prune.py --models mlp --methods magnitude taylor --sparsities 0.9 --seeds 0

Protocol: 70/30 stratified split (random_state=0); per seed the dense model trains with SGD (lr 0.05, momentum
0.9, batch 64) for --epochs; data-driven saliencies use 8 training batches. Modes: "oneshot" (no retraining),
"compensated" (the one-shot masks, kept weights refitted on the same 8 batches as prune(compensate=True)
does), "connectivity", "weight" (accuracy after the mask is chosen again, as retrain() returns it) and
"network" (rewound to the initial weights, retrained for --epochs). The baseline prunes with global_unstructured L1 and
fine-tunes for --epochs through torch's mask hooks. Writes benchmarks/out/quality_prune.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import prune as torch_prune

import pysparse
from pysparse import data, models
from pysparse.compensate import compensate
from pysparse.prune import METHODS

from _util import write_results  # benchmarks/ is on the path when a script runs

MODES = ("oneshot", "compensated", "connectivity", "weight", "network")


def run(args) -> dict:
    split = data.load("digits", test_size=0.3, seed=0)
    test = data.loader(split.test, 512)
    rows = []
    for model_name in args.models:
        for seed in args.seeds:
            torch.manual_seed(seed)
            dense = models.mlp() if model_name == "mlp" else models.cnn()
            pysparse.remember_init(dense)
            # every training run gets its own freshly seeded loader, so each figure is independent of the grid
            fresh = lambda offset=0: data.loader(split.train, 64, shuffle=True, seed=seed + offset)  # noqa: E731
            pysparse.train(dense, fresh(), epochs=args.epochs, lr=args.lr)
            dense_acc = pysparse.accuracy(dense, test)
            rows.append(dict(model=model_name, seed=seed, method="dense", mode="-", sparsity=0.0, accuracy=dense_acc))
            for sparsity in args.sparsities:
                # baseline: torch.nn.utils.prune global L1 + the same fine-tuning
                base = copy.deepcopy(dense)
                targets = [(m, "weight") for m in base.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
                torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=sparsity)
                rows.append(dict(model=model_name, seed=seed, method="torch_l1", mode="oneshot", sparsity=sparsity,
                                 accuracy=pysparse.accuracy(base, test)))
                pysparse.train(base, fresh(1), epochs=args.epochs, lr=args.lr)
                rows.append(dict(model=model_name, seed=seed, method="torch_l1", mode="connectivity",
                                 sparsity=sparsity, accuracy=pysparse.accuracy(base, test)))
                for method in args.methods:
                    pruned = copy.deepcopy(dense)
                    result = pysparse.prune(pruned, method, sparsity=sparsity, data=fresh(1000), loss_fn=F.cross_entropy,
                                            num_batches=8, min_density=0.0,
                                            generator=torch.Generator().manual_seed(seed))
                    rows.append(dict(model=model_name, seed=seed, method=method, mode="oneshot", sparsity=sparsity,
                                     accuracy=pysparse.accuracy(pruned, test)))
                    if "compensated" in args.modes:  # the same one-shot masks, kept weights refitted (layer-wise OBS)
                        m = copy.deepcopy(dense)
                        compensate(m, result.masks, list(itertools.islice(fresh(1000), 8)))
                        rows.append(dict(model=model_name, seed=seed, method=method, mode="compensated",
                                         sparsity=sparsity, accuracy=pysparse.accuracy(m, test)))
                    for mode in [m for m in args.modes if m not in ("oneshot", "compensated")]:
                        m = copy.deepcopy(pruned)
                        kw = dict(method=method, sparsity=sparsity, prune_kwargs=dict(min_density=0.0, num_batches=8)) \
                            if mode == "weight" else {}  # re-selection scores on the retraining batches
                        if mode == "network":
                            kw["init_state"] = dense._pysparse_init_state
                        pysparse.retrain(m, result.masks, mode, fresh(1), epochs=args.epochs, lr=args.lr, **kw)
                        rows.append(dict(model=model_name, seed=seed, method=method, mode=mode, sparsity=sparsity,
                                         accuracy=pysparse.accuracy(m, test)))
                print(f"{model_name} seed {seed} sparsity {sparsity}: done", flush=True)
    return {"args": vars(args), "rows": rows}


def summarize(results: dict) -> str:
    """One wide table per model: method x mode rows, sparsity columns, mean ± std of test accuracy (%)."""
    groups: dict[tuple, list[float]] = {}
    for r in results["rows"]:
        groups.setdefault((r["model"], r["method"], r["mode"], r["sparsity"]), []).append(r["accuracy"])
    cell = lambda accs: (f"{100 * statistics.mean(accs):.2f} ± {100 * statistics.stdev(accs):.2f}"  # noqa: E731
                         if len(accs) > 1 else f"{100 * accs[0]:.2f}")
    out = []
    for model in dict.fromkeys(k[0] for k in groups):
        sparsities = sorted({k[3] for k in groups if k[0] == model and k[1] != "dense"})
        seeds = len(groups[(model, "dense", "-", 0.0)])
        out.append(f"**{model}**: dense {cell(groups[(model, 'dense', '-', 0.0)])} ({seeds} seeds)\n")
        out.append("| method | mode | " + " | ".join(f"{100 * s:g}%" for s in sparsities) + " |")
        out.append("|---|---|" + "---:|" * len(sparsities))
        rows = dict.fromkeys((k[1], k[2]) for k in groups if k[0] == model and k[1] != "dense")
        order = {m: i for i, m in enumerate(METHODS + ("torch_l1",))}
        for method, mode in sorted(rows, key=lambda mm: (order.get(mm[0], 99), MODES.index(mm[1]))):
            out.append(f"| {method} | {mode} | " + " | ".join(
                cell(groups[(model, method, mode, s)]) if (model, method, mode, s) in groups else "" for s in sparsities)
                + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.8, 0.9, 0.95, 0.98])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--summarize", metavar="JSON", help="only rebuild the tables from a saved results file")
    args = p.parse_args()
    if args.summarize:
        print(summarize(json.loads(Path(args.summarize).read_text())))
        return
    start = time.time()
    results = run(args)
    results["seconds"] = round(time.time() - start, 1)
    write_results("quality_prune", results, summarize(results))
    print(f"({results['seconds']} s)")


if __name__ == "__main__":
    main()
