"""One small case of every CUDA kernel and code path, checked against the reference; run under
compute-sanitizer by benchmarks/gpu_check.sh (small, because memcheck slows kernels a hundredfold)."""
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
torch.cuda.synchronize()
print("sanitizer cases: all kernels ran and matched the reference")
