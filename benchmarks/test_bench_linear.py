"""SparseLinear beside nn.Linear (dense MKL / cuBLAS) and torch.sparse.mm on CSR (MKL / cuSPARSE): 4096x4096,
batch 1, 4 (the CPU's 8-column panels), 16 and 256, across sparsities, forward and forward+backward, same inputs,
one run; then the linear layers of torchvision classification models (ResNet-50, VGG-16, MobileNetV3, ViT-B/16)
at 90%, batch 1, 16 and 256 ("model" in the test names). SparseLinear is pinned to its sparse kernels
(dense_below = 0): below its default crossover it would compute through F.linear."""
import functools

import pytest
import torch
from torch import nn

import pysparse
from pysparse.testing import devices_for

from _util import run, torchvision_linears

N = 4096
DEVICES = devices_for("spmm", "spmm_t", "sddmm", "spmm_grad")
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
BATCHES = [1, 4, 16, 256]


def _layers(device, sparsity, shape=(N, N)):
    """nn.Linear(in, out) with a random mask removing `sparsity` of its weights, and the SparseLinear of it."""
    torch.manual_seed(0)
    dense = nn.Linear(*shape).to(device)
    mask = torch.rand(shape[1], shape[0], device=device) >= sparsity
    with torch.no_grad():
        dense.weight.mul_(mask)
    sparse = pysparse.SparseLinear.from_dense(dense, mask)
    sparse.dense_below = 0.0
    return dense, sparse


def _time_forward(benchmark, device, dense, sparse, batch, impl, group):
    x = torch.randn(batch, dense.in_features, device=device)
    if impl == "torch_sparse":
        w, b = dense.weight.detach().to_sparse_csr(), dense.bias.detach()
        fn = lambda: torch.sparse.mm(w, x.t()).t() + b  # noqa: E731
    else:
        layer = sparse if impl == "pysparse" else dense
        fn = lambda: layer(x)  # noqa: E731
    benchmark.group = group
    with torch.no_grad():
        run(benchmark, fn, device, rounds=5 if batch == 256 else 20)


def _time_step(benchmark, device, dense, sparse, batch, impl, group):
    layer = sparse if impl == "pysparse" else dense
    x = torch.randn(batch, dense.in_features, device=device, requires_grad=True)
    g = torch.randn(batch, dense.out_features, device=device)
    params = [x, *layer.parameters()]

    def step():  # one training step's forward and backward: gradients start from None, as after zero_grad()
        for p in params:
            p.grad = None
        layer(x).backward(g)

    benchmark.group = group
    run(benchmark, step, device, rounds=5 if batch == 256 else 20)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("impl", ["pysparse", "dense", "torch_sparse"])
def test_linear_forward(benchmark, device, batch, sparsity, impl):
    _time_forward(benchmark, device, *_layers(device, sparsity), batch, impl,
                  f"linear-fwd-{N}-b{batch}-s{sparsity}-{device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
def test_linear_forward_backward(benchmark, device, batch, sparsity, impl):
    _time_step(benchmark, device, *_layers(device, sparsity), batch, impl,
               f"linear-fwdbwd-{N}-b{batch}-s{sparsity}-{device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [16, 256])
@pytest.mark.parametrize("sparsity", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("impl", ["pysparse", "two_ops", "dense"])
def test_linear_backward(benchmark, device, batch, sparsity, impl):
    """The layer's backward alone, its ops called on [features, batch] operands: spmm_grad (both gradients in one
    call; on CUDA one kernel that gathers each row of gyt once for both) against sddmm then spmm_t (each gathering
    its own rows), and the dense backward, two matmuls (the weight's gradient and the input's)."""
    dense, sparse = _layers(device, sparsity)
    s, values = sparse.structure, sparse.values.detach()
    gen = torch.Generator(device).manual_seed(1)
    xt = torch.randn(N, batch, device=device, generator=gen)
    gyt = torch.randn(N, batch, device=device, generator=gen)
    if impl == "pysparse":
        fn = lambda: pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt, transposed=s.transposed())  # noqa
    elif impl == "two_ops":
        fn = lambda: (pysparse.ops.sddmm(s.rowptr, s.col, gyt, xt),  # noqa: E731
                      pysparse.ops.spmm_t(s.rowptr, s.col, values, gyt, N, transposed=s.transposed()))
    else:
        w = dense.weight.detach()
        fn = lambda: (gyt @ xt.t(), w.t() @ gyt)  # noqa: E731
    benchmark.group = f"linear-bwd-{N}-b{batch}-s{sparsity}-{device}"
    run(benchmark, fn, device, rounds=5 if batch == 256 else 20)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
@pytest.mark.parametrize("impl", ["pysparse", "aten_copy", "no_copy"])
def test_linear_input_layout(benchmark, device, sparsity, impl):
    """spmm on a batch-major input, batch 256, as the layers call it: x.t(), the [features, batch] view, which the
    CUDA op copies batch-contiguous by its own tiled transpose (the CPU kernels pack it through its strides);
    against ATen's copy of the view first (x.t().contiguous(), what the layers did on CUDA before), and the op on
    an input already batch-contiguous (no copy at all: the floor)."""
    _, sparse = _layers(device, sparsity)
    s, values = sparse.structure, sparse.values.detach()
    x = torch.randn(256, N, device=device, generator=torch.Generator(device).manual_seed(2))
    xt = x.t().contiguous()
    if impl == "pysparse":
        fn = lambda: pysparse.ops.spmm(s.rowptr, s.col, values, x.t())  # noqa: E731
    elif impl == "aten_copy":
        fn = lambda: pysparse.ops.spmm(s.rowptr, s.col, values, x.t().contiguous())  # noqa: E731
    else:
        fn = lambda: pysparse.ops.spmm(s.rowptr, s.col, values, xt)  # noqa: E731
    benchmark.group = f"linear-input-layout-{N}-b256-s{sparsity}-{device}"
    run(benchmark, fn, device, rounds=5)


# ------------------------------------------------------------------------- torchvision models' linear layers
MODEL_LINEARS = {k: v for k, v in torchvision_linears().items() if v != (N, N)}  # 4096 x 4096: above
MODEL_SPARSITY = 0.9


@functools.lru_cache(maxsize=2)  # VGG-16's first layer is 411 MB dense: built once for its cases on a device
def _model_layers(device, name):
    return _layers(device, MODEL_SPARSITY, MODEL_LINEARS[name])


@pytest.fixture(scope="module", autouse=True)
def _free_model_layers():
    yield
    _model_layers.cache_clear()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 16, 256])
@pytest.mark.parametrize("impl", ["pysparse", "dense", "torch_sparse"])
@pytest.mark.parametrize("name", list(MODEL_LINEARS))  # the outermost loop: one layer built per name and device
def test_model_linear_forward(benchmark, device, name, batch, impl):
    _time_forward(benchmark, device, *_model_layers(device, name), batch, impl,
                  f"linear-model-fwd-{name}-b{batch}-s{MODEL_SPARSITY}-{device}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 16, 256])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
@pytest.mark.parametrize("name", list(MODEL_LINEARS))  # the outermost loop: one layer built per name and device
def test_model_linear_forward_backward(benchmark, device, name, batch, impl):
    _time_step(benchmark, device, *_model_layers(device, name), batch, impl,
               f"linear-model-fwdbwd-{name}-b{batch}-s{MODEL_SPARSITY}-{device}")
