"""csr_to_dense and csr_gather (csrc/cpu/densify.cpp, csrc/cuda/densify.cu): against the reference, their
gradients (each the other), torch.library's checks, torch.func, bad input; and the sparse layers' dense path,
which builds its weight with csr_to_dense."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.func import grad, jvp, vmap

import pysparse
from pysparse import csr, ops, reference
from pysparse.testing import autograd_nodes, devices_for

DEVICES = devices_for("csr_to_dense", "csr_gather")
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _structure(rows, cols, density, seed, device):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < density
    s = csr.structure(mask)
    return s.rowptr.to(device), s.col.to(device), mask.to(device)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 40), cols=st.integers(0, 40), density=st.floats(0, 1), dtype=st.sampled_from(DTYPES),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]), seed=st.integers(0, 2**31 - 1))
def test_match_reference(device, rows, cols, density, dtype, layout, seed):
    """Both ops on random structures (empty rows and matrices included), every dtype, and csr_gather on a
    contiguous, a transposed and a sliced dense matrix: exact (they only move values)."""
    rowptr, col, mask = _structure(rows, cols, density, seed, device)
    gen = torch.Generator().manual_seed(seed + 1)
    values = torch.randn(col.numel(), generator=gen).to(device, dtype)
    dense = ops.csr_to_dense(rowptr, col, values, cols)
    assert dense.shape == (rows, cols) and dense.dtype == dtype
    assert torch.equal(dense, reference.csr_to_dense(rowptr, col, values, cols))
    assert torch.equal(dense != 0, mask & (dense != 0)) and not dense[~mask].any()
    m = torch.randn(rows, cols, generator=gen).to(device, dtype)
    if layout == "transposed":
        m = m.t().contiguous().t()
    elif layout == "sliced":
        wide = torch.zeros(rows, 2 * cols, device=device, dtype=dtype)
        wide[:, ::2] = m
        m = wide[:, ::2]
    got = ops.csr_gather(rowptr, col, m)
    assert got.shape == (col.numel(),) and got.dtype == dtype
    assert torch.equal(got, reference.csr_gather(rowptr, col, m))
    assert torch.equal(ops.csr_gather(rowptr, col, dense), values)  # the inverse on the stored positions


@pytest.mark.parametrize("device", DEVICES)
def test_int32_indices_and_wide_rows(device):
    """More than 32767 columns (int32 column indices) and rows spanning several threads' tasks."""
    rowptr, col, _ = _structure(5, 40_000, 0.01, 0, device)
    assert col.dtype == torch.int32
    values = torch.randn(col.numel(), device=device)
    dense = ops.csr_to_dense(rowptr, col, values, 40_000)
    assert torch.equal(dense, reference.csr_to_dense(rowptr, col, values, 40_000))
    assert torch.equal(ops.csr_gather(rowptr, col, dense), values)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):  # the CPU splits rows between threads
            torch.set_num_threads(threads)
            rowptr, col, _ = _structure(300, 200, 0.3, threads, device)
            values = torch.randn(col.numel(), device=device)
            assert torch.equal(ops.csr_to_dense(rowptr, col, values, 200),
                               reference.csr_to_dense(rowptr, col, values, 200))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients(device):
    """Each op's gradient is the other (gradcheck and gradgradcheck in float64), through autograd."""
    rowptr, col, _ = _structure(7, 9, 0.4, 3, device)
    values = torch.randn(col.numel(), device=device, dtype=torch.float64, requires_grad=True)
    dense = torch.randn(7, 9, device=device, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: ops.csr_to_dense(rowptr, col, v, 9), (values,))
    assert torch.autograd.gradgradcheck(lambda v: ops.csr_to_dense(rowptr, col, v, 9), (values,))
    assert torch.autograd.gradcheck(lambda d: ops.csr_gather(rowptr, col, d), (dense,))
    assert torch.autograd.gradgradcheck(lambda d: ops.csr_gather(rowptr, col, d), (dense,))
    g = torch.randn(7, 9, device=device, dtype=torch.float64)
    ops.csr_to_dense(rowptr, col, values, 9).backward(g)
    torch.testing.assert_close(values.grad, reference.csr_gather(rowptr, col, g))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_torch_func(device):
    rowptr, col, _ = _structure(6, 8, 0.5, 4, device)
    values = torch.randn(col.numel(), device=device, dtype=torch.float64)
    dense = torch.randn(6, 8, device=device, dtype=torch.float64)
    torch.library.opcheck(torch.ops.pysparse.csr_to_dense.default, (rowptr, col, values, 8))
    torch.library.opcheck(torch.ops.pysparse.csr_to_dense.default, (rowptr, col, values.clone().requires_grad_(), 8))
    torch.library.opcheck(torch.ops.pysparse.csr_gather.default, (rowptr, col, dense))
    torch.library.opcheck(torch.ops.pysparse.csr_gather.default, (rowptr, col, dense.clone().requires_grad_()))
    f = lambda v: ops.csr_to_dense(rowptr, col, v, 8).pow(2).sum()  # noqa: E731
    torch.testing.assert_close(grad(f)(values), 2 * values)
    torch.testing.assert_close(grad(lambda d: ops.csr_gather(rowptr, col, d).pow(2).sum())(dense),
                               2 * reference.csr_to_dense(rowptr, col, reference.csr_gather(rowptr, col, dense), 8))
    vs = torch.randn(3, col.numel(), device=device, dtype=torch.float64)
    torch.testing.assert_close(vmap(lambda v: ops.csr_to_dense(rowptr, col, v, 8))(vs),
                               torch.stack([reference.csr_to_dense(rowptr, col, v, 8) for v in vs]))
    t = torch.randn_like(values)
    out, tangent = jvp(lambda v: ops.csr_to_dense(rowptr, col, v, 8), (values,), (t,))
    torch.testing.assert_close(tangent, reference.csr_to_dense(rowptr, col, t, 8))
    compiled = torch.compile(lambda v: ops.csr_to_dense(rowptr, col, v, 8) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(values), 2 * reference.csr_to_dense(rowptr, col, values, 8))
    torch._dynamo.reset()


@pytest.mark.parametrize("device", DEVICES)
def test_layer_op(device):
    """The layers' dense path builds its weight with layer_csr_to_dense, one C++ autograd node (its backward
    csr_gather): torch.library's checks (schema, autograd registration, fake tensors, AOT dispatch), gradcheck and
    gradgradcheck in float64 (the second derivative through the ops' formulas), a strided weight gradient,
    torch.func (the ops' formulas), and the layers record the node."""
    rowptr, col, _ = _structure(7, 9, 0.4, 6, device)
    values = torch.randn(col.numel(), device=device, dtype=torch.float64, requires_grad=True)
    op = torch.ops.pysparse.layer_csr_to_dense.default
    torch.library.opcheck(op, (rowptr, col, values, 9))
    assert torch.autograd.gradcheck(lambda v: op(rowptr, col, v, 9), (values,))
    assert torch.autograd.gradgradcheck(lambda v: op(rowptr, col, v, 9), (values,))
    w = op(rowptr, col, values, 9)
    torch.testing.assert_close(w, reference.csr_to_dense(rowptr, col, values.detach(), 9))
    assert any("DenseWeightFunction" in n for n in autograd_nodes(w))
    g = torch.randn(9, 7, device=device, dtype=torch.float64).t()  # the transposed view of a weight gradient
    w.backward(g)
    torch.testing.assert_close(values.grad, reference.csr_gather(rowptr, col, g))
    v = values.detach()
    torch.testing.assert_close(grad(lambda v: ops.layer_csr_to_dense(rowptr, col, v, 9).pow(2).sum())(v), 2 * v)
    with torch.no_grad():
        assert op(rowptr, col, values, 9).grad_fn is None
    for args, exc, match in [((rowptr, col, v, -1), ValueError, "n_cols must be >= 0"),
                             ((rowptr, col, v.int(), 9), TypeError, "values must be float32"),
                             ((rowptr, col, v[:-1], 9), ValueError, "one entry per column index")]:
        with pytest.raises(exc, match=match):  # the kernel's checks, named after the op it calls
            ops.layer_csr_to_dense(*args)
    for layer in (pysparse.SparseLinear(30, 20, sparsity=0.2), pysparse.SparseConv2d(4, 6, 3, sparsity=0.2)):
        layer.to(device).dense_below = 1.0
        assert any("DenseWeightFunction" in n for n in autograd_nodes(layer.dense_weight())), type(layer).__name__


def test_bad_input():
    rowptr, col, _ = _structure(4, 5, 0.5, 5, "cpu")
    values = torch.randn(col.numel())
    for call, exc, match in [
        (lambda: ops.csr_to_dense(rowptr, col, values, -1), ValueError, "n_cols"),
        (lambda: ops.csr_to_dense(rowptr, col, values, 2.5), ValueError, "n_cols must be an int"),
        (lambda: ops.csr_to_dense(rowptr, col, values.int(), 5), TypeError, "values"),
        (lambda: ops.csr_to_dense(rowptr, col, values[:-1], 5), ValueError, "one entry per column index"),
        (lambda: ops.csr_to_dense(rowptr.long(), col, values, 5), TypeError, "rowptr"),
        (lambda: ops.csr_gather(rowptr, col, torch.randn(3, 5)), ValueError, "3 rows"),
        (lambda: ops.csr_gather(rowptr, col, torch.randn(4, 5, 1)), ValueError, "2-D"),
        (lambda: ops.csr_gather(rowptr, col, torch.ones(4, 5, dtype=torch.int64)), TypeError, "dense"),
        (lambda: ops.csr_gather(rowptr, col, torch.randn(4, 5, device="meta")), ValueError, "dense is on meta"),
    ]:
        with pytest.raises(exc, match=match):
            call()
    if col.numel():  # column indices beyond n_cols: the kernels raise (after their pass), never write or read them
        with pytest.raises(ValueError, match="column index is outside"):
            ops.csr_to_dense(rowptr, col, values, int(col.max()))
        with pytest.raises(ValueError, match="column index is outside"):
            torch.ops.pysparse.csr_gather.default(rowptr, col, torch.randn(4, int(col.max())))
        bad = col.clone()
        bad[0] = -3
        with pytest.raises(ValueError, match="column index is outside"):
            torch.ops.pysparse.csr_to_dense.default(rowptr, bad, values, 5)
    broken = rowptr.clone()
    broken[-1] += 1
    with pytest.raises(ValueError, match="rowptr"):
        torch.ops.pysparse.csr_to_dense.default(broken, col, values, 5)
    with pytest.raises(ValueError, match="rowptr"):
        torch.ops.pysparse.csr_gather.default(broken, col, torch.randn(4, 5))


@pytest.mark.parametrize("kind", ["linear", "conv", "grouped"])
def test_layers_dense_path_builds_the_weight_with_the_kernel(kind):
    """Below dense_below the layers build their weight with csr_to_dense (its gradient csr_gather's); a grouped
    convolution's block-diagonal matrix is not its weight, so dense_weight scatters there. The weight equals the
    masked dense one either way, and the dense path's output and gradients equal the sparse kernels'."""
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = pysparse.SparseLinear(30, 20, sparsity=0.2), torch.randn(5, 30)
    else:
        groups = 2 if kind == "grouped" else 1
        layer, x = pysparse.SparseConv2d(4, 6, 3, padding=1, groups=groups, sparsity=0.2), torch.randn(2, 4, 6, 6)
    layer.dense_below = 1.0
    with torch.profiler.profile() as prof:
        w = layer.dense_weight()
    used = {e.name for e in prof.events()}
    assert ("pysparse::csr_to_dense" in used) == (kind != "grouped")
    torch.testing.assert_close(w, layer.to_dense().weight, rtol=0, atol=0)
    if kind != "grouped":
        y = layer(x)
        y.square().sum().backward()
        ref = layer.to_dense()
        ref.weight.requires_grad_(True)
        ref(x).square().sum().backward()
        torch.testing.assert_close(layer.values.grad, ref.weight.grad[layer.mask()], rtol=1e-5, atol=1e-5)
