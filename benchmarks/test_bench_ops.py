"""Speed of the fused kernels beside the PyTorch code they replace, on the same inputs, in one run.

Run with `make bench` (or `pytest benchmarks`); `benchmarks/summarize.py` turns the JSON into the ratio table
of benchmarks/RESULTS.md. Groups hold one `pysparse` entry and its baselines.
"""
import pytest
import torch

import pysparse
from pysparse.testing import DEVICES

import _baselines as b
from _util import peak_extra_mb_cpu, peak_extra_mb_cuda, run

N_SALIENCY = 16 * 2**20    # 16M fp32 weights
N_MASK = 16 * 2**20


def _rand(n, device, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(device)


# --------------------------------------------------------------------------------------------------- saliency
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["taylor", "hessian"])
@pytest.mark.parametrize("impl", ["pysparse", "eager", "compile", "clone"])
def test_saliency(benchmark, device, method, impl):
    w, other = _rand(N_SALIENCY, device, 0), _rand(N_SALIENCY, device, 1)
    eager = b.eager_taylor if method == "taylor" else b.eager_hessian
    kw = {"grad": other} if method == "taylor" else {"hessian": other}
    fn = {
        "pysparse": lambda: pysparse.saliency(w, method, **kw),
        "eager": lambda: eager(w, other),
        "compile": (lambda f: lambda: f(w, other))(torch.compile(eager)),
        # the same 12 bytes per element as the fused kernel (read 8, write 4): a clone of 1.5 tensors
        "clone": (lambda src: lambda: src.clone())(torch.randn(N_SALIENCY * 3 // 2, device=device)),
    }[impl]
    benchmark.group = f"saliency-{method}-16M-{device}"
    run(benchmark, fn, device, bytes=12 * N_SALIENCY)


# ------------------------------------------------------------------------------------------- sparsity_masks
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["pysparse", "kthvalue_on_cat", "topk_on_cat"])
def test_sparsity_masks(benchmark, device, impl):
    scores = b.select_scores(device)
    select = getattr(b, f"select_{impl}")
    fn = lambda: select(scores)  # noqa: E731
    peak = peak_extra_mb_cpu("select_scores", f"select_{impl}") if device == "cpu" else peak_extra_mb_cuda(fn)
    benchmark.group = f"sparsity_masks-25Mx50-{device}"
    run(benchmark, fn, device, rounds=5, peak_extra_mb=peak)


# ---------------------------------------------------------------------------------------------- apply_mask_
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["pysparse", "eager_mul", "eager_masked_fill"])
def test_apply_mask(benchmark, device, impl):
    tensors = [_rand(N_MASK, device, s) for s in range(4)]  # weight, grad, exp_avg, exp_avg_sq
    mask = torch.rand(N_MASK, generator=torch.Generator().manual_seed(9)).to(device) > b.SPARSITY
    inverse = ~mask

    def eager_mul():
        for t in tensors:
            t.mul_(mask)
        return int(mask.sum())

    def eager_masked_fill():
        for t in tensors:
            t.masked_fill_(inverse, 0)
        return int(mask.sum())

    fn = {
        "pysparse": lambda: pysparse.apply_mask_(mask, *tensors),
        "eager_mul": eager_mul,
        "eager_masked_fill": eager_masked_fill,
    }[impl]
    benchmark.group = f"apply_mask-4x16M-{device}"
    run(benchmark, fn, device, bytes=N_MASK * (1 + 4 * 8))
