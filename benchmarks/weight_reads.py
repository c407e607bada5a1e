"""Models that read a sparse layer's ``weight`` for its metadata on every call: nn.TransformerEncoderLayer in
inference (its fast-path checks read ``linear1.weight`` / ``linear2.weight``), and a module that casts its input to
its child's weight dtype (``x.to(self.fc.weight.dtype)``, common in model code). Times, per round in one process:
pysparse (the weight a DenseWeightTensor: metadata without a dense copy), the same model with a dense copy built at
each ``weight`` read (what pysparse's ``weight`` did before 2026-12-02), and the pruned model left dense. The
outputs are checked against the dense model's first.

    python benchmarks/weight_reads.py                  # the cases below, 9 rounds (about 2 minutes on 2 cores)
    python benchmarks/weight_reads.py --rounds 15 --calls 20
"""
import argparse
import copy
import statistics
import time

import torch
from torch import nn

import pysparse
from pysparse.nn._sparse_weight import SparseWeight


class _CopyPerRead(torch.Tensor):
    """The dense weight built at each read, as a tensor subclass (so that torch's fast paths decline it, as
    they decline pysparse's weight)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


_LAZY = SparseWeight.weight
_COPY_PER_READ = property(lambda self: self.dense_weight().as_subclass(_CopyPerRead))


class Casting(nn.Module):
    """Casts its input to its child's weight dtype on every call."""

    def __init__(self, n: int):
        super().__init__()
        self.fc = nn.Linear(n, n)

    def forward(self, x):
        return self.fc(x.to(self.fc.weight.dtype))


def _pair(model: nn.Module, names, sparsity: float):
    masks = {f"{n}.weight": torch.rand_like(getattr(model, n).weight) >= sparsity for n in names}
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in masks.items():
            getattr(dense, n.split(".")[0]).weight.mul_(m)
    return pysparse.sparsify(model, masks, min_sparsity=0.0), dense


def cases(sparsity: float, small: bool = False):
    """(name, sparse model, dense model, input) for each case."""
    out = []
    shapes = [(32, 64, 1, 8)] if small else [(512, 2048, 1, 32), (512, 2048, 1, 128), (768, 3072, 1, 197)]
    for d, ff, b, s in shapes:
        layer = nn.TransformerEncoderLayer(d, 8, ff, dropout=0.0, batch_first=True).eval()
        sparse, dense = _pair(layer, ("linear1", "linear2"), sparsity)
        out.append((f"TransformerEncoderLayer({d}, 8, {ff}), FFN sparse, x [{b}, {s}, {d}]", sparse, dense,
                    torch.randn(b, s, d)))
    for n, b in [(64, 1)] if small else [(4096, 1), (4096, 16), (1024, 1)]:
        sparse, dense = _pair(Casting(n).eval(), ("fc",), sparsity)
        out.append((f"x.to(fc.weight.dtype) then fc, {n} x {n}, batch {b}", sparse, dense, torch.randn(b, n)))
    return out


def _time(f, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        f()
    return (time.perf_counter() - t0) / calls * 1e3


def measure(sparse: nn.Module, dense: nn.Module, x: torch.Tensor, rounds: int, calls: int) -> dict:
    """Medians over rounds (ms) and per-round ratios: copy_per_read / pysparse and dense / pysparse."""
    if rounds < 1 or calls < 1:
        raise ValueError(f"rounds and calls must be >= 1, got {rounds} and {calls}")
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)
        runs = {"pysparse": [], "copy_per_read": [], "dense": []}
        try:
            for _ in range(rounds + 1):  # the first round warms up
                for kind in runs:
                    SparseWeight.weight = _COPY_PER_READ if kind == "copy_per_read" else _LAZY
                    runs[kind].append(_time(lambda: (dense if kind == "dense" else sparse)(x), calls))
        finally:
            SparseWeight.weight = _LAZY
    runs = {k: v[1:] for k, v in runs.items()}
    r = {f"{k}_ms": statistics.median(v) for k, v in runs.items()}
    for k in ("copy_per_read", "dense"):
        r[f"{k}_over_pysparse"] = statistics.median(a / b for a, b in zip(runs[k], runs["pysparse"]))
    return r


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--small", action="store_true", help="tiny shapes (a check of the script, not a benchmark)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    for name, sparse, dense, x in cases(args.sparsity, args.small):
        r = measure(sparse, dense, x, args.rounds, args.calls)
        print(f"{name}: pysparse {r['pysparse_ms']:.3f} ms, copy per read {r['copy_per_read_ms']:.3f} ms, dense "
              f"{r['dense_ms']:.3f} ms; per round copy per read / pysparse {r['copy_per_read_over_pysparse']:.2f}, "
              f"dense / pysparse {r['dense_over_pysparse']:.2f}", flush=True)


if __name__ == "__main__":
    main()
