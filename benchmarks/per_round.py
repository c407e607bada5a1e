"""SparseLinear against nn.Linear (dense MKL) and torch.sparse.mm on CSR, alternated round by round in one process,
so that a noisy machine's swings cancel in the per-round speed-ups (the median over the rounds is reported):
issue 3's CPU targets (batch 256: >= 1.5x / 3x / 10x dense at 90 / 95 / 99%, >= 2x torch.sparse.mm; batch 1-16
at 90%: >= 3x dense) and the crossover sparsity below which the dense layer is faster (--sparsity 0.3 0.4 0.5 ...).

pytest-benchmark (`test_bench_linear.py`) times each case in its own stretch of a run; on the 2-vCPU machines here
speed swings by up to 2x between minutes, so a ratio of two of its medians can carry that swing.

    python benchmarks/per_round.py                                  # the targets: batch 256 at 90-99%, 1 and 16 at 90%
    python benchmarks/per_round.py --batch 1 16 256 --sparsity 0.3 0.4 0.5 0.6 --step   # crossovers, training step
"""
import argparse
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import pysparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import alternated_times, check_sizes, speedup, steady_malloc  # noqa: E402

IMPLS = ("pysparse", "dense", "torch_sparse")


def _layers(features, sparsity, seed):
    torch.manual_seed(seed)
    dense = nn.Linear(features, features)
    mask = torch.rand(features, features) >= sparsity
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = pysparse.SparseLinear.from_dense(dense, mask)
    sparse.dense_below = 0.0  # the sparse kernels at every sparsity
    return dense, sparse


def measure(batch, sparsity, features=4096, rounds=9, calls=None, step=False, seed=0):
    """Median time (ms) of each implementation's forward (with step=True: forward + backward, gradients from
    None, the input's included) and the median over rounds of each baseline's per-round time / pysparse's
    (speed-up, > 1: pysparse is faster), with its range. The three outputs (and with step the input gradients)
    are checked to agree before timing."""
    check_sizes(sparsity, rounds, calls, batch=batch, features=features)
    dense, sparse = _layers(features, sparsity, seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        w = dense.weight.detach().to_sparse_csr()
    x = torch.randn(batch, features, requires_grad=step)
    g = torch.randn(batch, features)

    def torch_sparse(inp):
        return torch.sparse.mm(w, inp.t()).t() + dense.bias

    if step:
        w.requires_grad_(True)  # the sparse weight's gradient too, as the layers compute their values'
    forwards = {"pysparse": sparse, "dense": dense, "torch_sparse": torch_sparse}
    params = [x, w, *dense.parameters(), *sparse.parameters()]

    def call(impl):
        if not step:
            with torch.no_grad():
                return forwards[impl](x)
        for p in params:
            p.grad = None
        forwards[impl](x).backward(g)
        return x.grad

    outs = {impl: call(impl) for impl in IMPLS}
    for impl in IMPLS[1:]:
        torch.testing.assert_close(outs[impl], outs["pysparse"], rtol=1e-3, atol=1e-3)
    if calls is None:  # about the same work per round at every size
        calls = max(2, int(3e7 / (batch * (1 - sparsity) * features * features)))
    n = {"pysparse": calls, "dense": max(1, calls // 10), "torch_sparse": max(1, calls // 3)}
    times = alternated_times(call, IMPLS, rounds, n)
    result = {f"{impl}_ms": statistics.median(t) for impl, t in times.items()}
    for impl in IMPLS[1:]:
        result[f"vs_{impl}"], result[f"vs_{impl}_min"], result[f"vs_{impl}_max"] = speedup(times, impl, "pysparse")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="default: batch 256 at 90 / 95 / 99%% and batches 1, 16 at 90%% (the targets)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=None)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--step", action="store_true", help="time forward + backward instead of the forward")
    args = parser.parse_args(argv)
    if args.batch is None and args.sparsity is None:
        cases = [(256, 0.9), (256, 0.95), (256, 0.99), (16, 0.9), (1, 0.9)]
    else:
        cases = [(b, s) for b in args.batch or [256] for s in args.sparsity or [0.9]]
    what = "forward + backward" if args.step else "forward"
    print(f"SparseLinear {args.features} x {args.features} {what}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds, per-round speed-up (baseline / pysparse)")
    for batch, sparsity in cases:
        r = measure(batch, sparsity, args.features, args.rounds, step=args.step)
        print(f"batch {batch:4d} sparsity {sparsity:.2f}: pysparse {r['pysparse_ms']:.3f} ms, "
              f"nn.Linear {r['dense_ms']:.3f} ms, torch.sparse.mm {r['torch_sparse_ms']:.3f} ms; "
              f"speed-up {r['vs_dense']:.2f}x nn.Linear (rounds {r['vs_dense_min']:.2f}-{r['vs_dense_max']:.2f}), "
              f"{r['vs_torch_sparse']:.2f}x torch.sparse.mm "
              f"({r['vs_torch_sparse_min']:.2f}-{r['vs_torch_sparse_max']:.2f})", flush=True)


if __name__ == "__main__":
    steady_malloc()  # glibc's thresholds as in the pytest benchmarks (the process's own: not when a test calls main)
    main()
