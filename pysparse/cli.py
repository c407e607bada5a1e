"""Command line: ``pysparse prune ...`` (``python -m pysparse prune ...``)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .io import _umask


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="train (or load) a model, prune it, retrain it, write the report",
                       description="Train the dense model unless --checkpoint is given, prune it by saliency, "
                                   "retrain it, and write DIR/report.{txt,json,png}, DIR/masks.safetensors, "
                                   "DIR/dense.safetensors and the compressed DIR/model.safetensors.")
    p.add_argument("--data", default="digits", help="digits (bundled) | mnist | fashion-mnist | cifar10")
    p.add_argument("--root", default=None, help="folder holding the data set's files (not needed for digits)")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--method", default="taylor",
                   help="magnitude | gradient | taylor | hessian | snip | wanda | random")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--sparsity", type=float, help="fraction of the weights to remove")
    amount.add_argument("--threshold", type=float, help="remove every weight whose saliency is below this")
    p.add_argument("--scope", choices=["global", "layer"], default="global")
    p.add_argument("--pattern", default="unstructured", help="unstructured | channel | n:m (e.g. 2:4)")
    p.add_argument("--retrain", choices=["connectivity", "weight", "network", "none"], default="connectivity")
    p.add_argument("--epochs", type=int, default=20, help="training epochs of the dense model and of retraining")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-batches", type=int, default=8, help="batches used to score data-driven saliencies")
    p.add_argument("--checkpoint", default=None, help="a dense.safetensors to start from instead of training")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder (must not exist, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _prepare_out(out: Path, overwrite: bool) -> Path:
    """A fresh temporary folder beside ``out``; moved into place only when everything is written."""
    if out.exists() and not overwrite:
        raise SystemExit(f"pysparse: {out} exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it private; the result is an ordinary folder
    return tmp


def run_prune(args) -> dict:
    import pysparse
    from pysparse import data as pdata, models
    from pysparse.retrain import accuracy
    from safetensors.torch import save_file

    if args.sparsity is None and args.threshold is None and ":" not in args.pattern:
        raise SystemExit("pysparse prune: give --sparsity or --threshold")
    torch.manual_seed(args.seed)
    split = pdata.load(args.data, root=args.root, seed=args.seed)
    train_loader = pdata.loader(split.train, args.batch_size, shuffle=True, seed=args.seed)
    test_loader = pdata.loader(split.test, 512)
    c, h, _ = split.image_shape
    model = models.mlp(c * h * h, num_classes=split.num_classes) if args.model == "mlp" else \
        models.cnn(c, split.num_classes, h)
    pysparse.remember_init(model)
    out = Path(args.out)
    tmp = _prepare_out(out, args.overwrite)
    try:
        if args.checkpoint:
            pysparse.load(args.checkpoint, model)
        else:
            pysparse.train(model, train_loader, epochs=args.epochs, lr=args.lr, progress=not args.quiet)
        pysparse.save(model, tmp / "dense.safetensors")
        dense_acc = accuracy(model, test_loader)
        result = pysparse.prune(model, args.method, sparsity=args.sparsity, threshold=args.threshold,
                                scope=args.scope, pattern=args.pattern, data=train_loader, loss_fn=F.cross_entropy,
                                num_batches=args.num_batches, generator=torch.Generator().manual_seed(args.seed))
        pruned_acc = accuracy(model, test_loader)
        retrained_acc, changed = pruned_acc, None
        if args.retrain != "none":
            r = pysparse.retrain(model, result.masks, args.retrain, train_loader, epochs=args.epochs, lr=args.lr,
                                 method=args.method, sparsity=result.sparsity if args.retrain == "weight" else None,
                                 progress=not args.quiet)
            result.masks, changed = r.masks, r.changed
            retrained_acc = accuracy(model, test_loader)
        report = result.to_dict()
        report.update(data=args.data, model=args.model, retrain=args.retrain, epochs=args.epochs, seed=args.seed,
                      accuracy={"dense": dense_acc, "pruned": pruned_acc, "retrained": retrained_acc},
                      connections_changed=changed)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        (tmp / "report.txt").write_text(
            result.table() + f"\n\naccuracy: dense {dense_acc:.4f}, pruned {pruned_acc:.4f}, "
                             f"after {args.retrain} retraining {retrained_acc:.4f}\n")
        pysparse.plot_report(result, tmp / "report.png")
        save_file({k: v.to(torch.uint8).contiguous() for k, v in result.masks.items()}, str(tmp / "masks.safetensors"))
        pysparse.sparsify(model, result.masks)
        pysparse.save(model, tmp / "model.safetensors")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="pysparse", description="Model and dataset compression for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "prune":
        try:
            report = run_prune(args)
        except (ValueError, TypeError, FileNotFoundError) as exc:
            print(f"pysparse prune: {exc}", file=sys.stderr)
            return 2
        acc = report["accuracy"]
        print(f"{report['sparsity']:.2%} of {report['params']} weights removed; accuracy dense {acc['dense']:.4f}, "
              f"pruned {acc['pruned']:.4f}, retrained {acc['retrained']:.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
