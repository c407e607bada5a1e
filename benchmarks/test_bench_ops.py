"""Speed of the fused kernels beside the PyTorch code they replace, on the same inputs, in one run.

Run with `make bench` (or `pytest benchmarks`); `benchmarks/summarize.py` turns the JSON into the ratio table
of benchmarks/RESULTS.md. Groups hold one `pysparse` entry and its baselines.
"""
import warnings

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


# ------------------------------------------------------------------------------------ csr_to_dense / csr_gather
# The sparse layers' dense path (below dense_below): a 4096 x 4096 weight at 20% sparsity built from its stored
# values on every forward, and the values' gradient read from the dense weight's in the backward. Baselines:
# what the layers did before the kernels (torch's scatter / indexing at flat int64 positions, cached), and
# torch's own sparse CSR tensor's to_dense().
def _densify_problem(device):
    mask = torch.rand(4096, 4096, generator=torch.Generator().manual_seed(3)) > 0.2
    s = pysparse.csr.structure(mask)
    values = torch.randn(s.nnz, generator=torch.Generator().manual_seed(4))
    flat = mask.reshape(-1).nonzero().squeeze(1)
    return s.rowptr.to(device), s.col.to(device), values.to(device), flat.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["pysparse", "scatter", "torch_sparse_csr"])
def test_csr_to_dense(benchmark, device, impl):
    rowptr, col, values, flat = _densify_problem(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr_t = torch.sparse_csr_tensor(rowptr.long(), col.long(), values, (4096, 4096))
    fn = {
        "pysparse": lambda: pysparse.ops.csr_to_dense(rowptr, col, values, 4096),
        "scatter": lambda: values.new_zeros(4096 * 4096).scatter(0, flat, values).view(4096, 4096),
        "torch_sparse_csr": lambda: csr_t.to_dense(),
    }[impl]
    benchmark.group = f"csr_to_dense-4096x4096-20%-{device}"
    run(benchmark, fn, device, bytes=4 * 4096 * 4096 + 6 * values.numel())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["pysparse", "index"])
def test_csr_gather(benchmark, device, impl):
    rowptr, col, values, flat = _densify_problem(device)
    dense = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(5)).to(device)
    fn = {
        "pysparse": lambda: pysparse.ops.csr_gather(rowptr, col, dense),
        "index": lambda: dense.view(-1)[flat],
    }[impl]
    benchmark.group = f"csr_gather-4096x4096-20%-{device}"
    run(benchmark, fn, device, bytes=10 * values.numel())
