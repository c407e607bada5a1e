"""Whole torchvision models, pruned and sparsified the way a user does it, against the same pruned model left
dense: `pysparse.prune(model, "magnitude", sparsity=s, scope="layer")` (every nn.Linear / nn.Conv2d at s), then
`pysparse.sparsify(model, masks)` with its default crossovers (layers it leaves dense get their masks applied), and
the dense twin is the same model with its pruned weights zeroed. Both are timed alternated round by round in one
process (the median of the per-round speed-ups is reported, with its range): the forward (eval, no_grad) and with
--step a training step (train mode, forward + backward from gradients of None). Also the saved file's size
(`pysparse.save`) against the dense model's float32 weights.

    python benchmarks/models.py                                   # ResNet-18, MobileNetV3-small at 90 / 95%, batch 1, 8
    python benchmarks/models.py --model resnet50 --batch 1 --sparsity 0.9 --step
    python benchmarks/models.py --channels-last                   # both models in torch.channels_last
    python benchmarks/models.py --formats                         # NCHW and channels-last, the four alternated
    python benchmarks/models.py --fold-bn --channels-last         # with and without BatchNorm folded, alternated
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import pysparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import alternated_times, check_sizes, speedup, steady_malloc  # noqa: E402

IMPLS = ("pysparse", "dense")


def pruned_pair(model: str, sparsity: float, seed: int = 0):
    """(dense, sparse): a torchvision classification model with random weights pruned layer by layer to
    ``sparsity`` by magnitude, left dense (pruned weights zero) and sparsified (default crossovers), and the
    number of sparse layers in the latter. A ValueError names a model torchvision does not have."""
    import torchvision

    if model not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"model: {model!r} is not a torchvision classification model")
    torch.manual_seed(seed)
    net = torchvision.models.get_model(model)
    with torch.no_grad():  # as after training: BatchNorm statistics that are not the identity, no all-zero layer
        for m in net.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and not m.weight.any():
                torch.nn.init.normal_(m.weight, std=m.weight[0].numel() ** -0.5)  # ViT's head starts at zero
    masks = pysparse.prune(net, "magnitude", sparsity=sparsity, scope="layer").masks
    dense = copy.deepcopy(net)
    sparse = pysparse.sparsify(net, masks)
    layers = sum(isinstance(m, (pysparse.SparseLinear, pysparse.SparseConv2d)) for m in sparse.modules())
    return dense, sparse, layers


def file_bytes(model) -> int:
    """The size of ``pysparse.save(model)``'s file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        pysparse.save(model, path)
        return os.path.getsize(path)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| in norm, in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def measure(model, batch, sparsity, rounds=7, calls=None, step=False, image=224, seed=0, channels_last=False,
            dtype="float32"):
    """Median time (ms) of the sparsified and the dense pruned model's forward (step=True: forward + backward in
    train mode, gradients from None) on a batch of ``image`` x ``image`` RGB images, and the median over rounds
    of dense / pysparse (the speed-up, > 1: pysparse faster) with its range; ``layers``: sparse layers; the saved
    file's bytes and the dense float32 weights' bytes. Outputs (with step, input gradients) are checked to agree
    before timing. ``channels_last``: both models and the input in torch.channels_last (the CPU's fast format
    for torch's pooling and BatchNorm). ``dtype``: "float32", "bfloat16" or "float16", both models' parameters and
    buffers and the input in it (the outputs then agree within that type's rounding)."""
    check_sizes(sparsity, rounds, calls, batch=batch, image=image)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    dense, sparse, layers = pruned_pair(model, sparsity, seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for net in (dense, sparse):
        net.train(step)
        net.to(dtype=DTYPES[dtype], memory_format=fmt)
    x = torch.randn(batch, 3, image, image, dtype=DTYPES[dtype]).contiguous(memory_format=fmt).requires_grad_(step)
    nets = {"pysparse": sparse, "dense": dense}
    params = {impl: [x, *net.parameters()] for impl, net in nets.items()}

    def call(impl):
        if not step:
            with torch.no_grad():
                return nets[impl](x)
        for p in params[impl]:
            p.grad = None
        torch.manual_seed(seed)  # the same dropout in both
        nets[impl](x).sum().backward()
        return x.grad

    # Checked without dropout: torch draws a dropout mask in the memory order of its input, and a sparse layer's
    # output is a transposed view (its kernels write [features, batch]), so the same seed drops other elements.
    # Train-mode BatchNorm updates its running statistics: both start from the same ones, see the same inputs.
    dropouts = [m for net in nets.values() for m in net.modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    for m in dropouts:
        m.eval()
    outs = {impl: call(impl) for impl in IMPLS}
    # In norm. Train-mode BatchNorm's backward cancels: ResNet-18's input gradient at batch 8 differs from its
    # float64 one by 1.6e-3 in norm (the dense model's as the sparse one's), and by 1.2% of its largest element.
    # In a half type each layer's output is rounded to 8 (bfloat16) or 11 (float16) bits, its sums in another
    # order: the two models' outputs differ by about 1e-2 in norm in bfloat16.
    error, against = _relative(outs["pysparse"], outs["dense"]), "dense one's"
    bound = (1e-2 if step else 1e-4) if dtype == "float32" else (2e-1 if step else 5e-2)
    if step and dtype == "float32" and error >= bound:
        # Deeper models cancel more: ResNet-50's float32 input gradient at batch 8 is 1.3e-2 (NCHW) and 5.4e-2
        # (channels-last) from its float64 one, the dense model's as the sparse one's, so the two float32 models
        # differ by about that much. Then the sparse model must be as close to the float64 gradient as the dense.
        exact = copy.deepcopy(dense).double()
        x64 = x.detach().double().contiguous(memory_format=fmt).requires_grad_(True)
        torch.manual_seed(seed)
        exact(x64).sum().backward()
        dense_error, error = _relative(outs["dense"], x64.grad), _relative(outs["pysparse"], x64.grad)
        bound, against = max(1e-2, 1.5 * dense_error), f"float64 dense one's (float32 dense: {dense_error:.2e})"
    for m in dropouts:
        m.train(step)
    assert error < bound, f"the sparsified model's {'input gradient' if step else 'output'} " \
                          f"differs from the {against} by {error:.2e} in norm"
    if calls is None:
        start = time.perf_counter()
        call("dense")
        calls = max(1, int(0.3 / (time.perf_counter() - start)))
    times = alternated_times(call, IMPLS, rounds, calls)
    result = {f"{impl}_ms": statistics.median(t) for impl, t in times.items()}
    result["speedup"], result["speedup_min"], result["speedup_max"] = speedup(times, "dense", "pysparse")
    return {**result, "layers": layers, "file_bytes": file_bytes(sparse),
            "dense_bytes": sum(p.numel() * 4 for p in dense.parameters())}


def _alternated_forwards(nets: dict, rounds: int, calls) -> dict:
    """Per-round times of the forwards ``nets`` (name -> (model, input); the first is the reference), alternated
    round by round in one process, after checking every output against the reference's."""
    def call(impl):
        net, inp = nets[impl]
        with torch.no_grad():
            return net(inp)

    first = next(iter(nets))
    want = call(first)
    for impl in nets:
        error = ((call(impl) - want).norm() / want.norm()).item()
        assert error < 1e-4, f"{impl}'s output differs from {first}'s by {error:.2e} in norm"
    if calls is None:
        start = time.perf_counter()
        call(first)
        calls = max(1, int(0.3 / (time.perf_counter() - start)))
    return alternated_times(call, tuple(nets), rounds, calls)


FORMATS = ("pysparse", "pysparse_cl", "dense", "dense_cl")


def formats(model, batch, sparsity, rounds=7, calls=None, image=224, seed=0):
    """The forward of the sparsified and the dense pruned model, each in NCHW and in channels-last (models and
    input in torch.channels_last), the four alternated round by round in one process: median ms of each, and the
    per-round speed-ups (median, min, max) of channels-last over NCHW for pysparse (``cl_gain``) and of pysparse
    channels-last over the dense model channels-last (``speedup_cl``). Outputs are checked to agree first."""
    check_sizes(sparsity, rounds, calls, batch=batch, image=image)
    dense, sparse, _ = pruned_pair(model, sparsity, seed)
    cl = torch.channels_last
    x = torch.randn(batch, 3, image, image)
    nets = {"dense": (dense.eval(), x), "pysparse": (sparse.eval(), x),
            "pysparse_cl": (copy.deepcopy(sparse).to(memory_format=cl), x.contiguous(memory_format=cl)),
            "dense_cl": (copy.deepcopy(dense).to(memory_format=cl), x.contiguous(memory_format=cl))}
    times = _alternated_forwards(nets, rounds, calls)
    return {**{f"{impl}_ms": statistics.median(t) for impl, t in times.items()},
            "cl_gain": speedup(times, "pysparse", "pysparse_cl"),
            "speedup_cl": speedup(times, "dense_cl", "pysparse_cl")}


def folds(model, batch, sparsity, rounds=7, calls=None, image=224, seed=0, channels_last=False):
    """The forward of the sparsified and the dense pruned model, each as it is and with its BatchNorms folded
    (``pysparse.fold_batchnorm``), the four alternated round by round in one process: median ms of each, the
    per-round speed-ups of folding for pysparse (``folded_gain``) and of pysparse folded over the dense model
    folded (``speedup_folded``). Outputs are checked to agree first."""
    check_sizes(sparsity, rounds, calls, batch=batch, image=image)
    dense, sparse, _ = pruned_pair(model, sparsity, seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, image, image).contiguous(memory_format=fmt)
    dense, sparse = dense.eval().to(memory_format=fmt), sparse.eval().to(memory_format=fmt)
    nets = {"dense": (dense, x), "pysparse": (sparse, x),
            "pysparse_folded": (pysparse.fold_batchnorm(copy.deepcopy(sparse)), x),
            "dense_folded": (pysparse.fold_batchnorm(copy.deepcopy(dense)), x)}
    times = _alternated_forwards(nets, rounds, calls)
    return {**{f"{impl}_ms": statistics.median(t) for impl, t in times.items()},
            "folded_gain": speedup(times, "pysparse", "pysparse_folded"),
            "speedup_folded": speedup(times, "dense_folded", "pysparse_folded")}


def _report_variants(args, what: str, suffix: str, name: str, base: str, run) -> None:
    """Prints ``run(model, batch, sparsity)`` (formats' / folds' results: each model as it is and as the variant
    ``suffix``) for every model, sparsity and batch of ``args``."""
    print(f"pruned torchvision models, forward {what}, {args.image} x {args.image}, {torch.get_num_threads()} "
          f"threads, {args.rounds} rounds, per-round speed-ups")
    for model in args.model:
        for sparsity in args.sparsity:
            for batch in args.batch:
                r = run(model, batch, sparsity)
                g, d = r[f"{suffix}_gain"], r[f"speedup_{suffix}"]
                print(f"{model:20s} batch {batch:3d} sparsity {sparsity:.2f}: ms pysparse {r['pysparse_ms']:.1f}, "
                      f"{name} {r[f'pysparse_{suffix}_ms']:.1f}; dense {r['dense_ms']:.1f}, {name} "
                      f"{r[f'dense_{suffix}_ms']:.1f}; pysparse {name} over {base} {g[0]:.2f}x ({g[1]:.2f}-"
                      f"{g[2]:.2f}), over dense {name} {d[0]:.2f}x ({d[1]:.2f}-{d[2]:.2f})", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["resnet18", "mobilenet_v3_small"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95])
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--step", action="store_true", help="time a training step instead of the forward")
    parser.add_argument("--channels-last", action="store_true",
                        help="both models and the input in torch.channels_last")
    parser.add_argument("--formats", action="store_true",
                        help="the forward of both models in NCHW and in channels-last, the four alternated")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="both models and the input in this dtype (the forward and --step)")
    parser.add_argument("--fold-bn", action="store_true",
                        help="the forward of both models as they are and with their BatchNorms folded, alternated")
    args = parser.parse_args(argv)
    if args.fold_bn:
        fmt = "channels-last" if args.channels_last else "NCHW"
        _report_variants(args, f"with and without BatchNorm folded (both models, {fmt})", "folded", "folded",
                         "as it is", lambda *a: folds(*a, args.rounds, image=args.image,
                                                      channels_last=args.channels_last))
        return
    if args.formats:
        _report_variants(args, "in NCHW and channels-last (both models)", "cl", "channels-last", "NCHW",
                         lambda *a: formats(*a, args.rounds, image=args.image))
        return
    what = ("training step" if args.step else "forward") + (", channels-last" if args.channels_last else "") + \
        (f", {args.dtype}" if args.dtype != "float32" else "")
    print(f"pruned torchvision models, sparsified against dense, {what}, {args.image} x {args.image}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds, per-round speed-up (dense / pysparse)")
    for model in args.model:
        for sparsity in args.sparsity:
            for batch in args.batch:
                r = measure(model, batch, sparsity, args.rounds, step=args.step, image=args.image,
                            channels_last=args.channels_last, dtype=args.dtype)
                print(f"{model:20s} batch {batch:3d} sparsity {sparsity:.2f}: {r['layers']} sparse layers, "
                      f"pysparse {r['pysparse_ms']:.1f} ms, dense {r['dense_ms']:.1f} ms, speed-up "
                      f"{r['speedup']:.2f}x (rounds {r['speedup_min']:.2f}-{r['speedup_max']:.2f}); file "
                      f"{r['file_bytes'] / 2**20:.1f} MB = {r['file_bytes'] / r['dense_bytes']:.3f} of the dense "
                      f"float32 weights", flush=True)


if __name__ == "__main__":
    steady_malloc()  # glibc's thresholds as in the pytest benchmarks (the process's own: not when a test calls main)
    main()
