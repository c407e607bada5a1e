"""Command line: ``pysparse prune ...`` and ``pysparse gan ...`` (also ``python -m pysparse ...``)."""
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

from .data import check_seed
from .gan.losses import LOSSES
from .io import _umask
from .prune import METHODS
from .shrink import METHODS as GAN_SALIENCIES


# argparse types: a bad value stops the command before any data is loaded or model trained (exit status 2, the
# argument named), not after the minutes of training that precede the step that would use it. The bounds are the
# library's own (pysparse.train takes 0 epochs; GANTrainer, the loaders and the synthesis want counts >= 1).
def _fraction(text: str) -> float:
    """A sparsity: a real number in [0, 1)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= v < 1.0:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


def _at_least(lo: int):
    """An int >= lo (batch sizes, step and epoch counts)."""  # ops._check_int's rule, argparse's message
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {lo}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be an int >= {lo}, got {v}")
        return v
    parse.__name__ = f"int >= {lo}"
    return parse


def _seed(text: str) -> int:
    """A seed: an int in [0, 2**32) (what pysparse.data.load takes: scikit-learn's range)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**32), got {text!r}") from None
    try:
        return check_seed(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int in [0, 2**32), got {v}") from None


def _device(text: str) -> str:
    """cpu, or cuda[:N] where this machine has that GPU."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu or cuda[:N], got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is visible on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


def _data_args(p) -> None:
    p.add_argument("--data", default="digits", help="digits (bundled) | mnist | fashion-mnist | cifar10")
    p.add_argument("--root", default=None, help="folder holding the data set's files (not needed for digits)")


def _output_args(p, *, default: Optional[str] = None, unless: str = "--overwrite") -> None:
    """--out (required unless it has a default), --overwrite and --quiet, the same for every command."""
    p.add_argument("--out", required=default is None, default=default,
                   help=f"output folder (must not exist, unless {unless})")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing folder (replaces pysparse's files there, deletes nothing else)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="train (or load) a model, prune it, retrain it, write the report",
                       description="Train the dense model unless --checkpoint is given, prune it by saliency, "
                                   "retrain it, and write DIR/report.{txt,json,png}, DIR/masks.safetensors, "
                                   "DIR/dense.safetensors and the compressed DIR/model.safetensors.")
    _data_args(p)
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--method", default="taylor", choices=METHODS, help="pruning saliency")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--sparsity", type=_fraction, help="fraction of the weights to remove")
    amount.add_argument("--threshold", type=float, help="remove every weight whose saliency is below this")
    p.add_argument("--scope", choices=["global", "layer"], default="global")
    p.add_argument("--pattern", default="unstructured", help="unstructured | channel | n:m (e.g. 2:4)")
    p.add_argument("--compensate", action="store_true",
                   help="refit the kept weights of each layer to the dense outputs on the --num-batches batches "
                        "right after pruning (layer-wise OBS)")
    p.add_argument("--retrain", choices=["connectivity", "weight", "network", "none"], default="connectivity")
    p.add_argument("--epochs", type=_at_least(0), default=20,
                   help="training epochs of the dense model and of retraining")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=_at_least(1), default=64)
    p.add_argument("--num-batches", type=_at_least(1), default=8,
                   help="batches used to score data-driven saliencies (and to calibrate --compensate)")
    p.add_argument("--checkpoint", default=None, help="a dense.safetensors to start from instead of training")
    p.add_argument("--seed", type=_seed, default=0)
    _output_args(p)


def _gan_parser(sub) -> None:
    p = sub.add_parser("gan", help="train a sparse GAN, write checkpoints, sample grids, curves and metrics",
                       description="Train a DCGAN-style generator / discriminator made of sparse layers on a data "
                                   "set. Writes DIR/checkpoint.pt (every --checkpoint-every steps, at the end and "
                                   "on Ctrl-C), DIR/samples*.png, DIR/losses.png, DIR/generator.safetensors (the "
                                   "EMA generator) and DIR/metrics.json. Runs under torchrun for DDP.")
    _data_args(p)
    p.add_argument("--conditional", action="store_true", help="class-conditional G and projection D")
    p.add_argument("--g-sparsity", type=_fraction, default=0.0)
    p.add_argument("--d-sparsity", type=_fraction, default=0.0)
    p.add_argument("--schedule", choices=["gradual", "fixed"], default="gradual")
    p.add_argument("--saliency", default="magnitude", choices=GAN_SALIENCIES)
    p.add_argument("--prune-scope", choices=["layer", "global"], default="layer")
    p.add_argument("--loss", default="non_saturating", choices=LOSSES)
    p.add_argument("--order", choices=["gd", "dg"], default="gd", help="G step first (gd) or D step first")
    p.add_argument("--n-critic", type=_at_least(1), default=1, help="D steps per G step")
    p.add_argument("--steps", type=_at_least(1), default=3000)
    p.add_argument("--batch-size", type=_at_least(1), default=64, help="per process")
    p.add_argument("--width", type=_at_least(1), default=32, help="channels of G's last and D's first hidden layer")
    p.add_argument("--latent-dim", type=_at_least(1), default=64)
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of G and D")
    p.add_argument("--checkpoint-every", type=_at_least(1), default=500)
    p.add_argument("--sample-every", type=_at_least(1), default=500)
    p.add_argument("--eval-epochs", type=_at_least(0), default=30, help="epochs of the metric classifiers (0: no metrics)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", type=_device, default="cpu", help="cpu | cuda (under torchrun: cuda:LOCAL_RANK)")
    p.add_argument("--resume", default=None, help="a checkpoint.pt to continue from (same settings)")
    _output_args(p, unless="--overwrite or --resume")


def _compress_args(p, *, demo: bool) -> None:
    if not demo:
        _data_args(p)
        p.add_argument("--sparsity", type=_fraction, default=0.9,
                       help="fraction of the classifier's weights to remove")
        p.add_argument("--ipc", type=_at_least(1), default=10, help="synthetic images per class")
        p.add_argument("--method", default="taylor", choices=METHODS, help="pruning saliency")
        p.add_argument("--synth", choices=["sample", "select", "match"], default="match")
        p.add_argument("--epochs", type=_at_least(0), default=20, help="epochs of the dense classifier")
        p.add_argument("--gan-steps", type=_at_least(1), default=2000)
        p.add_argument("--g-sparsity", type=_fraction, default=0.8)
        p.add_argument("--d-sparsity", type=_fraction, default=0.5)
        p.add_argument("--match-iterations", type=_at_least(1), default=2000)
        p.add_argument("--mmd", type=float, default=100.0,
                       help="weight of the kernel-MMD term of --synth match (0: means and variances only)")
        p.add_argument("--damp", type=float, default=0.01,
                       help="ridge of the refit on the synthetic images (compensate), times the mean input energy")
        p.add_argument("--retrain-steps", type=_at_least(1), default=300, help="optimizer steps of every retraining")
        p.add_argument("--eval-seeds", type=_at_least(1), default=3, help="seeds of the synthetic-set evaluation")
        p.add_argument("--eval-epochs", type=_at_least(0), default=300)
        p.add_argument("--eval-width", type=_at_least(1), default=128, help="channels of the evaluation ConvNet")
        p.add_argument("--seed", type=_seed, default=0)
    _output_args(p, default="runs/demo" if demo else None)


def _compress_parser(sub) -> None:
    p = sub.add_parser("compress", help="the whole pipeline: prune, sparse GAN, synthetic set, data-free retraining",
                       description="Train the dense classifier, prune it, train the sparse conditional GAN, "
                                   "synthesize a compact set, retrain the pruned model on it with distillation, "
                                   "evaluate everything; writes DIR/report.{md,json} and PNGs.")
    _compress_args(p, demo=False)
    d = sub.add_parser("demo", help="`pysparse compress` on digits with the defaults (about 3 minutes on 2 cores)")
    _compress_args(d, demo=True)


def _init_distributed(device: str) -> tuple[int, int, torch.device]:
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK: join the group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world > 1 and not torch.distributed.is_initialized():
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), dev
    return 0, 1, dev


def run_gan(args) -> dict:
    import time

    import pysparse
    from pysparse import data as pdata
    from pysparse.gan import Discriminator, GANTrainer, Generator, metrics
    from pysparse.gan.trainer import tensors_of
    from pysparse.shrink import model_sparsity, sparse_layers

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise SystemExit(f"pysparse gan: {out} exists and is not empty; pass --overwrite (or --resume)")
    rank, world, device = _init_distributed(args.device)
    try:
        torch.manual_seed(args.seed)
        split = pdata.load(args.data, root=args.root, seed=args.seed)
        c, h, _ = split.image_shape
        k = split.num_classes if args.conditional else None
        G = Generator(h, c, latent_dim=args.latent_dim, num_classes=k, width=args.width).to(device)
        D = Discriminator(h, c, num_classes=k, width=args.width).to(device)
        trainer = GANTrainer(G, D, split.train, steps=args.steps, batch_size=args.batch_size, loss=args.loss,
                             order=args.order, n_critic=args.n_critic, lr_g=args.lr, lr_d=args.lr,
                             g_sparsity=args.g_sparsity, d_sparsity=args.d_sparsity, schedule=args.schedule,
                             saliency=args.saliency, prune_scope=args.prune_scope, seed=args.seed, out=out,
                             checkpoint_every=args.checkpoint_every,
                             sample_every=args.sample_every, progress=not args.quiet)
        if args.resume:
            trainer.load_checkpoint(args.resume)
        start, t0 = trainer.step_count, time.perf_counter()
        trainer.fit()
        seconds = time.perf_counter() - t0
        report = {"rank": rank, "data": args.data, "conditional": args.conditional, "steps": trainer.step_count,
                  "resumed_from_step": start if args.resume else None, "world_size": world,
                  "train_seconds": seconds,
                  "images_per_second": (trainer.step_count - start) * args.batch_size * world * (1 + args.n_critic)
                  / max(seconds, 1e-9),
                  "sparsity": {"generator": model_sparsity(G),
                               "discriminator": model_sparsity(D)},
                  "nnz": {"generator": sum(m.nnz for m in sparse_layers(G).values()),
                          "discriminator": sum(m.nnz for m in sparse_layers(D).values())},
                  "settings": trainer._config()}
        if rank == 0:
            pysparse.save(trainer.ema.cpu(), out / "generator.safetensors")
            trainer.ema.to(device)
            if args.eval_epochs > 0:
                tr, te = tensors_of(split.train), tensors_of(split.test)
                ext = metrics.ClassifierFeatures(metrics.train_classifier(*tr, num_classes=split.num_classes,
                                                                          epochs=args.eval_epochs, seed=args.seed))
                report["metrics"] = metrics.evaluate(trainer.ema.cpu(), tr, te, num_classes=split.num_classes,
                                                     extractor=ext, seed=args.seed, epochs=args.eval_epochs)
            _write_json(out / "metrics.json", report)
        return report
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 may still be writing; leave the group together
            torch.distributed.destroy_process_group()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def publish(tmp: Path, out: Path) -> None:
    """Move every file of ``tmp`` (from :func:`_prepare_out`) into ``out`` (created if needed), each by an
    atomic rename; files of ``out`` that pysparse did not write are left alone. Removes ``tmp``."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()


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
                                num_batches=args.num_batches, compensate=args.compensate,
                                generator=torch.Generator().manual_seed(args.seed), progress=not args.quiet)
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
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def build_parser() -> argparse.ArgumentParser:
    """The ``pysparse`` command's parser (its sub-commands prune, gan, compress, demo)."""
    parser = argparse.ArgumentParser(prog="pysparse", description="Model and dataset compression for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    _prune_parser(sub)
    _gan_parser(sub)
    _compress_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":  # compress's defaults (digits), with demo's --out / --overwrite / --quiet
        defaults = vars(parser.parse_args(["compress", "--out", args.out]))
        for k, v in defaults.items():
            if k not in ("command", "overwrite", "quiet"):
                setattr(args, k, v)
    if args.command in ("compress", "demo"):
        from .pipeline import run as runner
    else:
        runner = {"prune": run_prune, "gan": run_gan}[args.command]
    try:
        report = runner(args)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError) as exc:  # bad input: one line, status 2
        print(f"pysparse {args.command}: {exc}", file=sys.stderr)
        return 2
    if args.command == "prune":
        acc = report["accuracy"]
        print(f"{report['sparsity']:.2%} of {report['params']} weights removed; accuracy dense {acc['dense']:.4f}, "
              f"pruned {acc['pruned']:.4f}, retrained {acc['retrained']:.4f}; wrote {args.out}")
    elif args.command in ("compress", "demo"):
        print((Path(args.out) / "report.md").read_text())
        print(f"wrote {args.out}")
    elif args.command == "gan":
        if report["rank"] != 0:
            return 0
        m = report.get("metrics", {})
        line = f"trained {report['steps']} steps ({report['images_per_second']:.0f} images/s)"
        if m:
            line += f"; FID {m['fid']:.3f} (floor {m['fid_floor']:.3f})"
            if "class_accuracy" in m:
                line += f", label accuracy {m['class_accuracy']['mean']:.4f}, CAS {m['cas']:.4f}"
        print(line + f"; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
