"""A sparse layer's training step (forward + backward) against its own forward, measured so that a noisy
machine's swings cancel: in one process, each round times the forward and then the step back to back, and the
ratio is taken per round; the median over the rounds is reported (issue 3's target: the step <= 3x the forward).
SparseLinear (features x features) by default, a stack of --depth of them, the linear layers of torchvision
models with --model, or SparseConv2d on ResNet-18's layer shapes with --conv.

Every step pays torch's fixed cost of one backward() call (the engine's set-up, 60-110 us on the 2-vCPU machines
here, as much as a batch-16 forward at 99%), which a model pays once for all its layers. Each round also times
backward() on a two-node graph, and the ratio net of that cost is reported beside the plain one.

pytest-benchmark runs the forward and the step cases of one size about a minute apart, and on the 2-vCPU
machines here speed swings by up to 2x over minutes, so the ratio of its medians carries that swing.

    python benchmarks/step_ratio.py --batch 16 256 --sparsity 0.9 0.95 0.99
    python benchmarks/step_ratio.py --batch 16 --depth 4        # four layers, one backward() call
    python benchmarks/step_ratio.py --model all --batch 1 16 256 --sparsity 0.9   # ResNet-50, VGG-16, ... shapes
    python benchmarks/step_ratio.py --conv layer1 layer2.0.down layer4 --sparsity 0.9 0.95   # batch 8
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import pysparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import RESNET18_CONV, check_sizes, torchvision_linears  # noqa: E402


def _ratio(layer, x, g, rounds, calls):
    """Median forward and step times (ms) of layer on x (the step's output gradient g), the median of the
    per-round step / forward ratios with their range, the median time of backward() on a two-node graph
    (call_ms: torch's fixed cost of a backward() call) and of the per-round (step - call) / forward ratios.
    The layer's sparse modules are pinned to their sparse kernels."""
    for m in layer.modules():
        if hasattr(m, "dense_below"):
            m.dense_below = 0.0
    params = [x, *layer.parameters()]
    w = torch.zeros(1, requires_grad=True)
    tiny = (w * 2).sum()

    def forward():
        with torch.no_grad():
            layer(x)

    def step():  # gradients start from None, as after zero_grad()
        for p in params:
            p.grad = None
        layer(x).backward(g)

    def call():  # the same engine path on a graph with nothing to compute
        w.grad = None
        tiny.backward(retain_graph=True)

    def timed(fn, n):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - start) / n

    forward(), step(), call()
    fwd, stp, cal, ratios, nets = [], [], [], [], []
    for _ in range(rounds):
        f = timed(forward, calls)
        s = timed(step, calls)
        c = timed(call, max(calls, 20))
        fwd.append(f * 1e3)
        stp.append(s * 1e3)
        cal.append(c * 1e3)
        ratios.append(s / f)
        nets.append((s - c) / f)
    return {"forward_ms": statistics.median(fwd), "step_ms": statistics.median(stp),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "call_ms": statistics.median(cal), "net_ratio": statistics.median(nets)}


def measure(batch, sparsity, features=4096, rounds=15, calls=None, seed=0, depth=1, shape=None):
    """_ratio for a features x features SparseLinear at this batch (depth > 1: that many in sequence), or one of
    shape (in, out)."""
    n_in, n_out = shape or (features, features)
    check_sizes(sparsity, rounds, calls, batch=batch, features=features, depth=depth, in_features=n_in,
           out_features=n_out)
    if depth > 1 and n_in != n_out:
        raise ValueError(f"depth > 1 needs a square layer, got {n_in} -> {n_out}")
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        dense = nn.Linear(n_in, n_out)
        mask = torch.rand(n_out, n_in) >= sparsity
        with torch.no_grad():
            dense.weight.mul_(mask)
        layers.append(pysparse.SparseLinear.from_dense(dense, mask))
    if calls is None:  # about the same work per round at every size
        calls = max(2, int(3e7 / (depth * batch * (1 - sparsity) * n_in * n_out)))
    return _ratio(layers[0] if depth == 1 else nn.Sequential(*layers), torch.randn(batch, n_in, requires_grad=True),
                  torch.randn(batch, n_out), rounds, calls)


def measure_conv(shape, sparsity, batch=8, rounds=15, calls=3, seed=0):
    """_ratio for a SparseConv2d of one of ResNet-18's layer shapes (RESNET18_CONV: padding 1, no bias), the
    input's gradient included."""
    if shape not in RESNET18_CONV:
        raise ValueError(f"shape must be one of {sorted(RESNET18_CONV)}, got {shape!r}")
    check_sizes(sparsity, rounds, calls, batch=batch)
    cin, cout, k, stride, size = RESNET18_CONV[shape]
    torch.manual_seed(seed)
    dense = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
    mask = torch.rand(dense.weight.shape) >= sparsity
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer = pysparse.SparseConv2d.from_dense(dense, mask)
    x = torch.randn(batch, cin, size, size, requires_grad=True)
    with torch.no_grad():
        g = torch.randn_like(layer(x))
    return _ratio(layer, x, g, rounds, calls)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default 16 256 (Linear), 8 (--conv)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=1, help="SparseLinear layers in sequence (one backward())")
    parser.add_argument("--conv", nargs="+", choices=sorted(RESNET18_CONV), default=None,
                        help="SparseConv2d on these ResNet-18 layer shapes instead of SparseLinear")
    models = torchvision_linears()
    parser.add_argument("--model", nargs="+", choices=["all", *models], default=None,
                        help="SparseLinear of these torchvision models' linear layer shapes (all: each of them)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    if args.conv and args.model:
        parser.error("--conv and --model exclude each other")
    if args.model:
        names = list(models) if "all" in args.model else args.model
        print(f"SparseLinear of torchvision models' linear layers, {torch.get_num_threads()} threads, "
              f"{args.rounds} rounds")
        for name in names:
            for batch in args.batch or [16, 256]:
                for sparsity in args.sparsity:
                    _report(f"{name} {models[name][0]} -> {models[name][1]} ", batch, sparsity,
                            measure(batch, sparsity, rounds=args.rounds, shape=models[name]))
        return
    batches = args.batch or ([8] if args.conv else [16, 256])
    what = f"SparseConv2d {' '.join(args.conv)}" if args.conv else f"SparseLinear {args.features} x {args.features}"
    if not args.conv and args.depth > 1:
        what += f", {args.depth} in sequence"
    print(f"{what}, {torch.get_num_threads()} threads, {args.rounds} rounds")
    for batch in batches:
        for name in args.conv or [None]:
            for sparsity in args.sparsity:
                if name is None:
                    r, label = measure(batch, sparsity, args.features, args.rounds, depth=args.depth), ""
                else:
                    r, label = measure_conv(name, sparsity, batch, args.rounds), f"{name:14s} "
                _report(label, batch, sparsity, r)


def _report(label, batch, sparsity, r):
    print(f"{label}batch {batch:4d} sparsity {sparsity:.2f}: forward {r['forward_ms']:.3f} ms, step "
          f"{r['step_ms']:.3f} ms, step / forward {r['ratio']:.2f}x (rounds {r['ratio_min']:.2f}-"
          f"{r['ratio_max']:.2f}); net of backward()'s fixed {r['call_ms']:.3f} ms: {r['net_ratio']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
