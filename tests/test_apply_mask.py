import pytest
import torch
from hypothesis import given, settings, strategies as st

import pysparse
from pysparse import reference
from pysparse.testing import DEVICES, make

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8, torch.bool]


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(0, 9), max_size=4), dtypes=st.lists(st.sampled_from(ALL_DTYPES), max_size=5),
       noncontig=st.lists(st.booleans(), min_size=5, max_size=5), density=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_matches_reference(device, shape, dtypes, noncontig, density, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(shape, generator=gen) < density).to(device)
    tensors = [make(shape, torch.float32, device, noncontig=nc, gen=gen).mul(10).to(d)
               for d, nc in zip(dtypes, noncontig)]
    expected = [t.clone() for t in tensors]
    kept = pysparse.apply_mask_(mask, *tensors)
    assert kept == reference.apply_mask_(mask, *expected) == int(mask.sum())
    for got, want in zip(tensors, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_grad_and_adam_state(device):
    """The use it exists for: weight, grad and Adam buffers zeroed together; NaN/inf pruned entries become 0."""
    model = torch.nn.Linear(300, 200).to(device)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(8, 300, device=device)).sum().backward()
    opt.step()
    w = model.weight
    with torch.no_grad():
        w[0, 0], w[0, 1] = float("nan"), float("inf")
    mask = torch.rand(w.shape, device=device) > 0.9
    mask[0, :2] = False
    state = opt.state[w]
    kept = pysparse.apply_mask_(mask, w, w.grad, state["exp_avg"], state["exp_avg_sq"])
    assert kept == int(mask.sum())
    for t in (w, w.grad, state["exp_avg"], state["exp_avg_sq"]):
        assert int(torch.count_nonzero(t[~mask])) == 0
        assert bool(torch.isfinite(t[~mask]).all())
    assert not w.requires_grad or w.is_leaf  # still a usable parameter


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_and_large(device):
    mask = torch.rand(1_000_003, device=device) > 0.5
    tensors = [torch.randn(1_000_003, device=device) for _ in range(11)]  # more than one CUDA launch holds
    before = [t.clone() for t in tensors]
    assert pysparse.apply_mask_(mask, *tensors) == int(mask.sum())
    for t, b in zip(tensors, before):
        assert torch.equal(t, b * mask)


@pytest.mark.parametrize("device", DEVICES)
def test_offset_views_and_ragged_lengths(device):
    """Mask and tensors starting 0-4 elements into their storage (the CUDA kernel reads and writes groups of 4
    elements where the pointers allow, element by element where not) and lengths around multiples of 4."""
    gen = torch.Generator().manual_seed(5)
    dtypes = [torch.float32, torch.float64, torch.float16, torch.int8, torch.bool]
    for n in (1, 3, 4, 5, 8, 1027):
        for off in range(5):
            mask = (torch.rand(n + off, generator=gen) < 0.4).to(device)[off:]
            tensors = [(torch.randn(n + off + i, generator=gen) * 10).to(device, d)[off + i:]
                       for i, d in enumerate(dtypes)]
            expected = [t.clone() for t in tensors]
            assert pysparse.apply_mask_(mask, *tensors) == reference.apply_mask_(mask, *expected) == int(mask.sum())
            for got, want in zip(tensors, expected):
                assert torch.equal(got, want), (n, off, got.dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_overlapping_memory(device):
    """Elements sharing one address would each be masked by a different mask element (an expanded view), and two
    tensors (or a tensor and the mask) partly over one storage would be zeroed by different threads: refused,
    naming the tensors, before anything is written (torch's in-place ops refuse the first too). One tensor given
    twice, a tensor as its own mask, and disjoint views of one storage go through."""
    mask = torch.tensor([True, False] * 4, device=device)
    with pytest.raises(ValueError, match=r"tensors\[0\] has elements that share memory"):
        pysparse.apply_mask_(mask, torch.ones(1, device=device).expand(8))
    flat = torch.arange(1.0, 13.0, device=device)
    with pytest.raises(ValueError, match=r"tensors\[0\] and tensors\[1\] partly share memory"):
        pysparse.apply_mask_(mask, flat[:8], flat[4:])
    assert torch.equal(flat, torch.arange(1.0, 13.0, device=device))  # nothing written
    bits = torch.ones(12, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match=r"tensors\[0\] partly overlaps the mask's memory"):
        pysparse.apply_mask_(bits[:8], bits[2:10])
    t = torch.arange(1.0, 9.0, device=device)
    assert pysparse.apply_mask_(mask, t, t) == 4 and torch.equal(t, torch.arange(1.0, 9.0, device=device) * mask)
    m = mask.clone()
    assert pysparse.apply_mask_(m, m) == 4 and torch.equal(m, mask)
    flat = torch.arange(1.0, 17.0, device=device)
    assert pysparse.apply_mask_(mask, flat[:8], flat[8:]) == 4
    assert torch.equal(flat, torch.arange(1.0, 17.0, device=device) * mask.repeat(2))


def test_none_entries_skipped_and_no_tensors():
    mask = torch.tensor([True, False, True])
    t = torch.ones(3)
    assert pysparse.apply_mask_(mask, None, t, None) == 2
    assert t.tolist() == [1.0, 0.0, 1.0]
    assert pysparse.apply_mask_(mask) == 2


@pytest.mark.parametrize("call, exc, match", [
    (lambda: pysparse.apply_mask_(torch.ones(3), torch.ones(3)), TypeError, "mask must be a bool tensor"),
    (lambda: pysparse.apply_mask_([True], torch.ones(1)), TypeError, "mask must be a torch.Tensor"),
    (lambda: pysparse.apply_mask_(torch.ones(3, dtype=torch.bool), torch.ones(4)), ValueError,
     r"tensors\[0\] has shape \(4,\)"),
    (lambda: pysparse.apply_mask_(torch.ones(3, dtype=torch.bool), torch.ones(3), torch.ones(3, device="meta")),
     ValueError, r"tensors\[1\] is on meta"),
    (lambda: pysparse.apply_mask_(torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.complex64)),
     TypeError, "complex"),
    (lambda: pysparse.apply_mask_(torch.ones(3, dtype=torch.bool), "w"), TypeError, r"tensors\[0\] must be"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cpp_checks_without_wrapper():
    op = torch.ops.pysparse.apply_mask_.default
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        op(torch.ones(3), [torch.ones(3)])
    with pytest.raises(ValueError, match="has shape"):
        op(torch.ones(3, dtype=torch.bool), [torch.ones(2)])
