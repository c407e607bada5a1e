"""Helpers for the benchmarks: glibc's heap held steady, synchronised timing on CUDA, peak extra memory of a
callable, and the files the quality scripts write."""
from __future__ import annotations

import ctypes
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch


# ResNet-18's 3 x 3 convolution shapes at a 224 x 224 input, name: (in, out, kernel, stride, input size)
RESNET18_CONV = {
    "layer1": (64, 64, 3, 1, 56),
    "layer2.0.down": (64, 128, 3, 2, 56),
    "layer2": (128, 128, 3, 1, 28),
    "layer3": (256, 256, 3, 1, 14),
    "layer4": (512, 512, 3, 1, 7),
}


def steady_malloc() -> None:
    """Time kernels, not glibc's history. PyTorch's CPU tensors come from malloc, and whether a call's multi-MB
    buffers fault their pages in again depends on what the process freed before: glibc raises its mmap threshold
    when it frees a mapped block and trims the heap's top past a threshold. Measured 2026-11-29 (ResNet-18
    layer1 shape, batch 8): nn.Conv2d's training step took 20.3 ms in a fresh process (6240 page faults a step)
    and 13.8 ms after another layer's frees had raised the threshold (none). The benchmarks fix both thresholds
    (mmap 32 MB, glibc's most; trim 256 MB) so that no side pays for faults below 32 MB: the dense baselines
    at their best. pysparse's kernels take their outputs from their own cache (csrc/cpu/out_cache.h) either way.
    PYSPARSE_BENCH_MALLOC=default leaves glibc as it is."""
    if os.environ.get("PYSPARSE_BENCH_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


def check_sizes(sparsity, rounds, calls, **sizes):
    """The timing scripts' arguments: sparsity in [0, 1), every size and rounds >= 1, calls None or >= 1; a
    ValueError naming the argument otherwise."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    for name, value in (*sizes.items(), ("rounds", rounds)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if calls is not None and calls < 1:
        raise ValueError(f"calls must be >= 1, got {calls}")


def torchvision_linears(models=("resnet50", "vgg16", "mobilenet_v3_large", "vit_b_16")) -> dict:
    """The nn.Linear shapes of torchvision classification models, {name: (in, out)}, each shape once under the
    first module that has it (e.g. "vgg16.classifier.0": (25088, 4096), "vit_b_16.mlp.0": (768, 3072)). Read
    from the models' definitions built on the meta device: nothing is allocated or downloaded."""
    import torchvision

    available = set(torchvision.models.list_models(module=torchvision.models))
    shapes = {}
    for model in models:
        if model not in available:
            raise ValueError(f"models: {model!r} is not a torchvision classification model")
        with torch.device("meta"):
            net = torchvision.models.get_model(model)
        for name, mod in net.named_modules():
            if isinstance(mod, torch.nn.Linear) and (mod.in_features, mod.out_features) not in shapes.values():
                key = f"{model}." + ".".join(name.split(".")[-2:])  # encoder.layers.encoder_layer_0.mlp.0 -> mlp.0
                shapes[key if key not in shapes else f"{model}.{name}"] = (mod.in_features, mod.out_features)
    return shapes


def alternated_times(call, impls, rounds: int, calls) -> dict:
    """Per-round times (ms a call) of ``call(impl)`` for each of ``impls``, timed in one process: in order in even
    rounds and reversed in odd ones (each side first in every other round), so that a noisy machine's swings
    cancel in per-round ratios. ``calls``: calls a round, one count for all or a dict per impl."""
    counts = calls if isinstance(calls, dict) else dict.fromkeys(impls, calls)
    times = {impl: [] for impl in impls}
    for r in range(rounds):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            start = time.perf_counter()
            for _ in range(counts[impl]):
                call(impl)
            times[impl].append((time.perf_counter() - start) / counts[impl] * 1e3)
    return times


def speedup(times: dict, base: str, impl: str) -> tuple[float, float, float]:
    """The median, min and max over rounds of times[base] / times[impl] (alternated_times' rounds)."""
    ratios = [b / a for a, b in zip(times[impl], times[base])]
    return statistics.median(ratios), min(ratios), max(ratios)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn, device: str, *, rounds: int = 10, budget_s: float = 0.4, **extra):
    """Time fn with pytest-benchmark, synchronising CUDA after each call; store extra figures. At least
    ``rounds`` rounds, more for fast calls (as many as fit in about ``budget_s``, at most 500): a millisecond
    call timed five times is at the mercy of this machine's noise."""
    def call():
        out = fn()
        sync(device)
        return out

    call()  # warm-up (and torch.compile) outside the timing
    start = time.perf_counter()
    call()
    once = time.perf_counter() - start
    rounds = max(rounds, min(500, int(budget_s / max(once, 1e-6))))
    benchmark.extra_info.update(extra)
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


def peak_extra_mb_cpu(scores_fn: str, select_fn: str) -> float:
    """Peak memory (MB) that _baselines.<select_fn>(scores) allocates on top of what the process holds, in a
    fresh process: the resident-set high-water mark (VmHWM) is reset to the current size just before the
    call (Linux /proc/self/clear_refs), then read after it."""
    code = textwrap.dedent(f"""
        import re, sys
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import torch, _baselines as b

        def status(key):
            return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))

        scores = b.{scores_fn}()
        b.select_pysparse([torch.rand(1000)]), b.select_topk_on_cat([torch.rand(1000)])  # thread pools up
        open("/proc/self/clear_refs", "w").write("5")
        before = status("VmRSS")
        b.{select_fn}(scores)
        print((status("VmHWM") - before) / 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return round(float(out.strip().splitlines()[-1]), 1)


def peak_extra_mb_cuda(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def write_results(name: str, result: dict, table: str) -> None:
    """benchmarks/out/<name>.json (every figure) and <name>.md (the table) for a quality script; prints the table."""
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(table + "\n")
    print(table)
