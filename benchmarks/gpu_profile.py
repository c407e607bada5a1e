"""Where a training step's time goes, kernel by kernel: SparseLinear (pinned to its sparse kernels) against
nn.Linear, features x features, under torch.profiler. For each case it prints the step's wall time (the
median of --steps timed steps), the device time its kernels add up to per step, and the kernels (CUDA) or ops
(CPU) that take it, largest first: what tells a host-bound step (wall time far above the kernels' sum) from a
kernel-bound one, and which kernel to work on.

    python benchmarks/gpu_profile.py --batch 16 256 --sparsity 0.9 0.99       # CUDA when visible
    python benchmarks/gpu_profile.py --device cpu --features 1024 --batch 16  # the CPU ops instead
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

# the pysparse of this checkout, also where it is not installed (a lent GPU machine: built and carried, then run
# from the repository's root without PYTHONPATH), and benchmarks/_util
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
import pysparse  # noqa: E402
from _util import check_sizes  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(layer, x, g, steps: int, top: int) -> tuple[float, float, list[tuple[str, int, float]]]:
    """(median wall ms a step, device ms a step summed over kernels or CPU ops, [(name, calls a step, us a step)]
    for the `top` largest)."""
    device = x.device
    params = [x, *layer.parameters()]

    def step():
        for p in params:
            p.grad = None
        layer(x).backward(g)

    for _ in range(3):  # warm-up: caches, cuBLAS handles, the transposed structure
        step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    rows = []
    for ev in prof.key_averages():
        if cuda:  # kernels and copies: the device-side events
            if ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = ev.self_device_time_total
        else:  # CPU: ops' own time, the profiler's annotations aside
            if ev.key.startswith("autograd::engine") or ev.key.startswith("ProfilerStep"):
                continue
            t = ev.self_cpu_time_total
        if t > 0:
            rows.append((ev.key, round(ev.count / steps), t / steps))
    rows.sort(key=lambda r: -r[2])
    return statistics.median(times), sum(r[2] for r in rows) / 1e3, rows[:top]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--batch", type=int, nargs="+", default=[16, 256])
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    p.add_argument("--steps", type=int, default=20, help="timed and profiled steps per case")
    p.add_argument("--top", type=int, default=8, help="kernels (ops on CPU) listed per case")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        for s in args.sparsity:
            for b in args.batch:
                check_sizes(s, args.steps, None, features=args.features, batch=b, top=args.top)
    except ValueError as e:
        p.error(str(e))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible")
    torch.manual_seed(0)
    n = args.features
    print(f"{n} x {n}, float32, {args.steps} steps a case on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})")
    for batch in args.batch:
        x = torch.randn(batch, n, device=device, requires_grad=True)
        g = torch.randn(batch, n, device=device)
        dense = nn.Linear(n, n).to(device)
        cases = [("nn.Linear", dense)]
        for s in args.sparsity:
            layer = pysparse.SparseLinear(n, n, sparsity=s).to(device)
            layer.dense_below = 0.0  # its sparse kernels, whatever the crossover
            cases.append((f"SparseLinear {s:g}", layer))
        for name, layer in cases:
            wall, busy, rows = profile_step(layer, x, g, args.steps, args.top)
            print(f"\nbatch {batch}, {name}: step {wall:.3f} ms wall, {busy:.3f} ms of "
                  f"{'kernels' if device.type == 'cuda' else 'ops'}")
            for key, calls, us in rows:
                print(f"  {us:9.1f} us  x{calls:<3d} {key[:100]}")


if __name__ == "__main__":
    main()
