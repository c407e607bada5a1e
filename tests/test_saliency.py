import pytest
import torch
from hypothesis import given, settings, strategies as st

import pysparse
from pysparse import reference
from pysparse.testing import DEVICES, DTYPES, make

METHODS = pysparse.ops.SALIENCY_METHODS
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4)


def _inputs(shape, dtype, device, noncontig, seed):
    gen = torch.Generator().manual_seed(seed)
    return [make(shape, dtype, device, noncontig=noncontig, gen=gen) for _ in range(3)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
@settings(max_examples=40, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES), noncontig=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_reference(device, method, shape, dtype, noncontig, seed):
    w, g, h = _inputs(shape, dtype, device, noncontig, seed)
    got = pysparse.saliency(w, method, grad=g, hessian=h)
    want = reference.saliency(w, method, grad=g, hessian=h)
    assert got.dtype == torch.float32 and got.shape == w.shape and got.device == w.device
    assert got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_large_multithreaded(device):
    gen = torch.Generator().manual_seed(0)
    w, g, h = (torch.randn(1000, 1031, generator=gen).to(device) for _ in range(3))
    for method in METHODS:
        torch.testing.assert_close(pysparse.saliency(w, method, grad=g, hessian=h),
                                   reference.saliency(w, method, grad=g, hessian=h), rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_autograd_matches_reference(device, method):
    gen = torch.Generator().manual_seed(1)
    base = [torch.randn(6, 5, generator=gen).to(device) for _ in range(3)]
    ours = [t.clone().requires_grad_() for t in base]
    ref = [t.clone().requires_grad_() for t in base]
    upstream = torch.randn(6, 5, generator=gen).to(device)
    (pysparse.saliency(ours[0], method, grad=ours[1], hessian=ours[2]) * upstream).sum().backward()
    (reference.saliency(ref[0], method, grad=ref[1], hessian=ref[2]) * upstream).sum().backward()
    for a, b in zip(ours, ref):
        if b.grad is None:
            assert a.grad is None or torch.count_nonzero(a.grad) == 0
        else:
            torch.testing.assert_close(a.grad, b.grad)


def test_unused_companion_is_ignored():
    w = torch.randn(3, 4)
    # magnitude needs neither grad nor hessian: a mis-shaped one that is not used is not an error
    torch.testing.assert_close(pysparse.saliency(w, "magnitude", grad=torch.randn(2)), w.abs())


@pytest.mark.parametrize("bad, exc, match", [
    (dict(method="nope"), ValueError, "method must be one of"),
    (dict(method="taylor", grad=None), ValueError, "needs grad"),
    (dict(method="hessian", hessian=None), ValueError, "needs hessian"),
    (dict(method="taylor", grad=torch.randn(4, 3)), ValueError, "grad has shape"),
    (dict(method="taylor", grad=torch.randn(3, 4, dtype=torch.float16)), TypeError, "grad has dtype"),
    (dict(method="hessian", hessian=torch.randn(3, 4, device="meta")), ValueError, "hessian is on meta"),
    (dict(method="taylor", grad=[1.0]), TypeError, "grad must be a torch.Tensor"),
])
def test_bad_input(bad, exc, match):
    kwargs = dict(bad)
    method = kwargs.pop("method")
    with pytest.raises(exc, match=match):
        pysparse.saliency(torch.randn(3, 4), method, **kwargs)


@pytest.mark.parametrize("weight, exc, match", [
    (torch.randn(3, dtype=torch.float64), TypeError, "weight must be float32, float16 or bfloat16"),
    (torch.arange(3), TypeError, "weight must be float32"),
    (None, TypeError, "weight must be a torch.Tensor"),
])
def test_bad_weight(weight, exc, match):
    with pytest.raises(exc, match=match):
        pysparse.saliency(weight, "magnitude")


def test_cpp_checks_without_wrapper():
    """The C++ kernel checks its arguments itself: a direct torch.ops call raises, never crashes."""
    op = torch.ops.pysparse.saliency.default
    w = torch.randn(3, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        op(w, "nope", None, None)
    with pytest.raises(ValueError, match="needs grad"):
        op(w, "taylor", None, None)
    with pytest.raises(ValueError, match="grad has shape"):
        op(w, "taylor", torch.randn(5), None)
    with pytest.raises(TypeError, match="hessian has dtype"):
        op(w, "hessian", None, torch.randn(3, 4, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        op(w.double(), "magnitude", None, None)
