"""SparseLinear beside nn.Linear (dense MKL / cuBLAS) and torch.sparse.mm on CSR (MKL / cuSPARSE): 4096x4096,
batch 1, 4 (the CPU's 8-column panels), 16 and 256, across sparsities, forward and forward+backward, same inputs,
one run. SparseLinear is pinned to its sparse kernels (dense_below = 0): below its default crossover it would
compute through F.linear."""
import pytest
import torch
from torch import nn

import pysparse
from pysparse.testing import devices_for

from _util import run

N = 4096
DEVICES = devices_for("spmm", "spmm_t", "sddmm", "spmm_grad")
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
BATCHES = [1, 4, 16, 256]


def _layers(device, sparsity):
    torch.manual_seed(0)
    dense = nn.Linear(N, N).to(device)
    mask = torch.rand(N, N, device=device) >= sparsity
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = pysparse.SparseLinear.from_dense(dense, mask)
    sparse.dense_below = 0.0
    return dense, sparse


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("impl", ["pysparse", "dense", "torch_sparse"])
def test_linear_forward(benchmark, device, batch, sparsity, impl):
    dense, sparse = _layers(device, sparsity)
    x = torch.randn(batch, N, device=device)
    if impl == "torch_sparse":
        w, b = dense.weight.detach().to_sparse_csr(), dense.bias.detach()
        fn = lambda: torch.sparse.mm(w, x.t()).t() + b  # noqa: E731
    else:
        layer = sparse if impl == "pysparse" else dense
        fn = lambda: layer(x)  # noqa: E731
    benchmark.group = f"linear-fwd-{N}-b{batch}-s{sparsity}-{device}"
    with torch.no_grad():
        run(benchmark, fn, device, rounds=5 if batch == 256 else 20)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
def test_linear_forward_backward(benchmark, device, batch, sparsity, impl):
    dense, sparse = _layers(device, sparsity)
    layer = sparse if impl == "pysparse" else dense
    x = torch.randn(batch, N, device=device, requires_grad=True)
    g = torch.randn(batch, N, device=device)
    params = [x, *layer.parameters()]

    def step():  # one training step's forward and backward: gradients start from None, as after zero_grad()
        for p in params:
            p.grad = None
        layer(x).backward(g)

    benchmark.group = f"linear-fwdbwd-{N}-b{batch}-s{sparsity}-{device}"
    run(benchmark, step, device, rounds=5 if batch == 256 else 20)
