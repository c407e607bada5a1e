"""One small case of every CUDA kernel and code path, checked against the reference; run under
compute-sanitizer by benchmarks/gpu_check.sh, memcheck and racecheck (small, because the sanitizer slows kernels a
hundredfold)."""
import torch

import pysparse
from pysparse import reference

dev = "cuda"
gen = torch.Generator().manual_seed(0)


def rnd(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dev, dtype)


for dtype in (torch.float32, torch.float16, torch.bfloat16):
    w, g, h = rnd(37, 41, dtype=dtype), rnd(37, 41, dtype=dtype), rnd(37, 41, dtype=dtype)
    for method in pysparse.ops.SALIENCY_METHODS:
        torch.testing.assert_close(pysparse.saliency(w, method, grad=g, hessian=h),
                                   reference.saliency(w, method, grad=g, hessian=h), rtol=1e-6, atol=0)

levels = torch.tensor([-1.0, 0.0, 2.0])
scores = [levels[torch.randint(0, 3, (n,), generator=gen)].to(dev) for n in (5000, 1, 9000)]  # ties split
scores.append(rnd(3, 3, dtype=torch.float16)[:, ::2])                                         # non-contiguous
for sparsity in (0.0, 0.3, 0.5, 0.999, 1.0):
    for got, want in zip(pysparse.sparsity_masks(scores, sparsity), reference.sparsity_masks(scores, sparsity)):
        assert torch.equal(got.cpu(), want.cpu()), sparsity
unique = [rnd(10_000), rnd(123)]                                                             # no ties
for got, want in zip(pysparse.sparsity_masks(unique, 0.7), reference.sparsity_masks(unique, 0.7)):
    assert torch.equal(got.cpu(), want.cpu())
for got, want in zip(pysparse.threshold_masks(scores, 0.5), reference.threshold_masks(scores, 0.5)):
    assert torch.equal(got.cpu(), want.cpu())
for shape in ((16, 32), (8, 8, 3, 3)):
    s = rnd(*shape)
    assert torch.equal(pysparse.nm_masks(s, 2, 4).cpu(), reference.nm_masks(s, 2, 4).cpu())

mask = rnd(1000) > 0
tensors = [rnd(1000) for _ in range(10)] + [rnd(1000, 2)[:, 0], rnd(1000).half()]  # > 8: two launches
expected = [t.clone() for t in tensors]
assert pysparse.apply_mask_(mask, *tensors) == reference.apply_mask_(mask, *expected)
assert all(torch.equal(a, b) for a, b in zip(tensors, expected))
mask = (rnd(1004) > 0)[3:]  # the mask and the tensors off their 4-element alignment, a ragged length (1001)
tensors = [rnd(1002)[1:], rnd(1003, dtype=torch.float64)[2:], rnd(1001), rnd(1005).half()[4:]]
expected = [t.clone() for t in tensors]
assert pysparse.apply_mask_(mask, *tensors) == reference.apply_mask_(mask, *expected)
assert all(torch.equal(a, b) for a, b in zip(tensors, expected))
# sparse matmul family: spmm, spmm_t, sddmm, spmm_grad (one kernel over W^T; at batch 600 in float32 sddmm's and
# spmm_t's; its xt a transposed view, which the kernels' tiled transpose copies: 2-, 4- and 8-byte elements),
# int16 and int32 indices; csr_to_dense / csr_gather
from pysparse import csr  # noqa: E402

# (batches 260 and 600: sddmm's lanes keeping four vectors of a's row, and re-reading it)
for rows, cols, batch, dtype in ((37, 53, 3, torch.float32), (37, 53, 45, torch.float16), (5, 40_000, 9, torch.float32),
                                 (20, 30, 33, torch.float64), (37, 53, 260, torch.float32), (9, 20, 600, torch.float32)):
    mask = torch.rand(rows, cols, generator=gen) < 0.3
    mask[::4] = False  # empty rows
    values, st = csr.compress(torch.randn(rows, cols, generator=gen).to(dtype), mask)
    values, xt, yt = values.to(dev), rnd(cols, batch, dtype=dtype), rnd(rows, batch, dtype=dtype)
    s = csr.Structure(*(getattr(st, n).to(dev) for n in ("rowptr", "col", "t_rowptr", "t_col", "t_perm")), shape=st.shape)
    # float32 sums over up to ~12000 stored products (the 40000-column case) differ from the dense reference's
    # order by ~1e-4 absolute; this script looks for memory errors, the tests for exactness
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.float16 else dict(rtol=1e-5, atol=2e-3)
    torch.testing.assert_close(pysparse.ops.spmm(s.rowptr, s.col, values, xt),
                               reference.spmm(s.rowptr, s.col, values, xt), **tol)
    torch.testing.assert_close(pysparse.ops.spmm_t(s.rowptr, s.col, values, yt, cols, transposed=s.transposed()),
                               reference.spmm_t(s.rowptr, s.col, values, yt, cols), **tol)
    torch.testing.assert_close(pysparse.ops.sddmm(s.rowptr, s.col, yt, xt), reference.sddmm(s.rowptr, s.col, yt, xt),
                               **tol)
    assert torch.equal(pysparse.ops.csr_to_dense(s.rowptr, s.col, values, cols),
                       reference.csr_to_dense(s.rowptr, s.col, values, cols))
    m = rnd(rows, 2 * cols, dtype=dtype)[:, ::2]  # a strided dense matrix
    assert torch.equal(pysparse.ops.csr_gather(s.rowptr, s.col, m), reference.csr_gather(s.rowptr, s.col, m))
    for got, want in zip(pysparse.ops.spmm_grad(s.rowptr, s.col, values, yt, xt.t().contiguous().t(),
                                                transposed=s.transposed()),
                         reference.spmm_grad(s.rowptr, s.col, values, yt, xt)):
        torch.testing.assert_close(got, want, **tol)

linear = torch.nn.Linear(40, 24).to(dev)
sparse_linear = pysparse.SparseLinear.from_dense(linear, torch.rand(24, 40, device=dev) < 0.3)
x = rnd(6, 40).requires_grad_()
sparse_linear(x).sum().backward()
conv = pysparse.SparseConv2d(8, 16, 3, padding=1, groups=2, sparsity=0.7).to(dev)
conv(rnd(4, 8, 12, 12)).sum().backward()   # direct kernels (4 * 144 >= 128 output pixels per channel)
conv(rnd(2, 8, 3, 3)).sum().backward()      # im2col + spmm (18 output pixels per channel)
dense_conv = torch.nn.Conv2d(4, 6, 3, stride=(2, 1), dilation=(1, 2), padding=(1, 2)).to(dev)  # padding: the op's
with torch.no_grad():
    dense_conv.weight.mul_(torch.rand_like(dense_conv.weight) < 0.5)
sparse_conv = pysparse.SparseConv2d.from_dense(dense_conv)
xc = rnd(3, 4, 21, 23)
torch.testing.assert_close(sparse_conv(xc), dense_conv(xc), rtol=1e-4, atol=1e-4)
# the direct backward kernels (sparse_conv2d_grad_input / _grad_values) against cuDNN's gradients
xs, xd = xc.clone().requires_grad_(), xc.clone().requires_grad_()
gy = rnd(*dense_conv(xc).shape)
sparse_conv(xs).backward(gy)
dense_conv(xd).backward(gy)
torch.testing.assert_close(xs.grad, xd.grad, rtol=1e-4, atol=1e-4)
torch.testing.assert_close(sparse_conv.values.grad, dense_conv.weight.grad[dense_conv.weight != 0], rtol=1e-4,
                           atol=1e-4)

torch.cuda.synchronize()
print("sanitizer cases: all kernels ran and matched the reference")
