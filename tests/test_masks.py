import pytest
import torch
from hypothesis import given, settings, strategies as st

import pysparse
from pysparse import reference
from pysparse.testing import DEVICES, DTYPES, make

shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3)


def _assert_masks_equal(got, want, scores):
    assert len(got) == len(want) == len(scores)
    for g, w, s in zip(got, want, scores):
        assert g.dtype == torch.bool and g.shape == s.shape and g.device == s.device
        assert torch.equal(g.cpu(), w.cpu())


# ------------------------------------------------------------------------------------------ sparsity_masks
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(shape_list=st.lists(shapes, min_size=1, max_size=4), dtypes=st.lists(st.sampled_from(DTYPES), min_size=4,
       max_size=4), sparsity=st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0, 1)),
       ties=st.booleans(), noncontig=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_sparsity_matches_reference(device, shape_list, dtypes, sparsity, ties, noncontig, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = [make(s, d, device, noncontig=noncontig, gen=gen, ties=ties) for s, d in zip(shape_list, dtypes)]
    got = pysparse.sparsity_masks(scores, sparsity)
    _assert_masks_equal(got, reference.sparsity_masks(scores, sparsity), scores)
    total = sum(s.numel() for s in scores)
    assert sum(int((~m).sum()) for m in got) == round(sparsity * total)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(big=st.integers(32_769, 70_000), rest=st.lists(st.integers(0, 5_000), max_size=3), at=st.integers(0, 3),
       dtypes=st.lists(st.sampled_from(DTYPES), min_size=4, max_size=4), sparsity=st.floats(0, 1),
       ties=st.booleans(), extremes=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_sparsity_radix_path_matches_reference(device, big, rest, at, dtypes, sparsity, ties, extremes, seed):
    """Above 32768 scores the CPU kernel leaves its small-input path for the radix select: same rule."""
    gen = torch.Generator().manual_seed(seed)
    sizes = rest[:at] + [big] + rest[at:]
    scores = [make((n,), d, device, gen=gen, ties=ties) for n, d in zip(sizes, dtypes)]
    if extremes:
        scores[min(at, len(rest))][:7] = torch.tensor([float("inf"), -float("inf"), 6e4, -6e4, 1e-7, -0.0, 0.0])
    _assert_masks_equal(pysparse.sparsity_masks(scores, sparsity), reference.sparsity_masks(scores, sparsity), scores)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ties", [False, True])
def test_sparsity_large_lists(device, ties):
    """Many chunks and threads: tensors larger than a work item, ties split across chunk boundaries."""
    gen = torch.Generator().manual_seed(7)
    shapes = [(70_001,), (3, 5), (2, 65_536 + 17), (1,), (0, 4), (40_000,)]
    scores = [make(s, torch.float32, device, gen=gen, ties=ties) for s in shapes]
    scores[1] = scores[1].half()
    for sparsity in (1e-6, 0.1, 0.5, 0.77, 0.999999):
        _assert_masks_equal(pysparse.sparsity_masks(scores, sparsity), reference.sparsity_masks(scores, sparsity),
                            scores)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sparsity", [0.0, 1e-6, 0.5, 0.999999, 1.0])
def test_exact_counts(device, sparsity):
    gen = torch.Generator().manual_seed(3)
    scores = [torch.rand(1_000, 1_000, generator=gen).to(device), torch.rand(500_001, generator=gen).to(device)]
    total = 1_500_001
    masks = pysparse.sparsity_masks(scores, sparsity)
    assert sum(int((~m).sum()) for m in masks) == round(sparsity * total)
    _assert_masks_equal(masks, reference.sparsity_masks(scores, sparsity), scores)


@pytest.mark.parametrize("device", DEVICES)
def test_all_ties_prune_in_global_order(device):
    """All scores equal (with -0.0 and 0.0 mixed): the first k in global order are pruned."""
    a = torch.zeros(10, device=device)
    a[::3] = -0.0
    b = torch.zeros(2, 5, device=device)
    masks = pysparse.sparsity_masks([a, b], 0.6)  # 12 of 20
    flat = torch.cat([m.reshape(-1) for m in masks]).cpu()
    assert torch.equal(flat, torch.arange(20) >= 12)


@pytest.mark.parametrize("device", DEVICES)
def test_infinities_and_extremes(device):
    s = torch.tensor([float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, -1e-45, 0.0], device=device)
    for sparsity in (0.0, 0.15, 0.3, 0.5, 0.75, 1.0):
        _assert_masks_equal(pysparse.sparsity_masks([s], sparsity), reference.sparsity_masks([s], sparsity), [s])


# ----------------------------------------------------------------------------------------- threshold_masks
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(shape_list=st.lists(shapes, min_size=1, max_size=3), dtype=st.sampled_from(DTYPES),
       threshold=st.one_of(st.floats(-3, 3), st.sampled_from([0.0, -0.0, 0.5, float("inf"), -float("inf")])),
       ties=st.booleans(), noncontig=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_threshold_matches_reference(device, shape_list, dtype, threshold, ties, noncontig, seed):
    gen = torch.Generator().manual_seed(seed)
    scores = [make(s, dtype, device, noncontig=noncontig, gen=gen, ties=ties) for s in shape_list]
    _assert_masks_equal(pysparse.threshold_masks(scores, threshold), reference.threshold_masks(scores, threshold),
                        scores)


def test_threshold_rule_is_keep_at_or_above():
    s = torch.tensor([0.1, 0.2, 0.3, 0.2])
    (m,) = pysparse.threshold_masks([s], 0.2)
    assert m.tolist() == [False, True, True, True]


# ------------------------------------------------------------------------------------------------ nm_masks
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(nm=st.sampled_from([(2, 4), (1, 4), (4, 8), (2, 8), (1, 1), (3, 3), (16, 32), (5, 128)]),
       d0=st.integers(0, 5), groups=st.integers(0, 3), rest=st.lists(st.integers(1, 3), max_size=2),
       dtype=st.sampled_from(DTYPES), ties=st.booleans(), noncontig=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_nm_matches_reference(device, nm, d0, groups, rest, dtype, ties, noncontig, seed):
    n, m = nm
    shape = [d0, groups * m] + rest
    score = make(shape, dtype, device, noncontig=noncontig, gen=torch.Generator().manual_seed(seed), ties=ties)
    got = pysparse.nm_masks(score, n, m)
    assert got.shape == score.shape and got.dtype == torch.bool
    assert torch.equal(got.cpu(), reference.nm_masks(score, n, m).cpu())
    # exactly n kept in every group
    per_group = got.movedim(1, -1).reshape(-1, m).sum(-1) if got.numel() else torch.zeros(0)
    assert bool((per_group == n).all())


@pytest.mark.parametrize("device", DEVICES)
def test_nm_2_4_linear_and_conv(device):
    gen = torch.Generator().manual_seed(5)
    for shape in [(64, 128), (32, 16, 3, 3)]:
        s = torch.randn(shape, generator=gen).abs().to(device)
        assert torch.equal(pysparse.nm_masks(s, 2, 4).cpu(), reference.nm_masks(s, 2, 4).cpu())


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call, exc, match", [
    (lambda: pysparse.sparsity_masks(torch.randn(3), 0.5), TypeError, "wrap a single tensor in a list"),
    (lambda: pysparse.sparsity_masks([], 0.5), ValueError, "scores is empty"),
    (lambda: pysparse.sparsity_masks(5, 0.5), TypeError, "sequence of tensors"),
    (lambda: pysparse.sparsity_masks([torch.randn(3)], 1.5), ValueError, r"sparsity must be in \[0, 1\]"),
    (lambda: pysparse.sparsity_masks([torch.randn(3)], -0.1), ValueError, r"sparsity must be in \[0, 1\]"),
    (lambda: pysparse.sparsity_masks([torch.randn(3)], float("nan")), ValueError, "sparsity must be"),
    (lambda: pysparse.sparsity_masks([torch.randn(3)], "0.5"), TypeError, "sparsity must be a real number"),
    (lambda: pysparse.sparsity_masks([torch.randn(3)], True), TypeError, "sparsity must be a real number"),
    (lambda: pysparse.sparsity_masks([torch.randn(3), torch.arange(3)], 0.5), TypeError, r"scores\[1\] must be"),
    (lambda: pysparse.sparsity_masks([torch.randn(3), torch.randn(3, device="meta")], 0.5), ValueError,
     r"scores\[1\] is on meta"),
    (lambda: pysparse.sparsity_masks([torch.randn(3), torch.tensor([1.0, float("nan")])], 0.5), ValueError,
     r"scores\[1\] contains NaN"),
    (lambda: pysparse.sparsity_masks([torch.tensor([float("nan")])], 0.0), ValueError, "contains NaN"),
    (lambda: pysparse.threshold_masks([torch.tensor([float("nan")])], 0.0), ValueError, r"scores\[0\] contains NaN"),
    (lambda: pysparse.threshold_masks([torch.randn(3)], float("nan")), ValueError, "threshold is NaN"),
    (lambda: pysparse.threshold_masks([torch.randn(3)], None), TypeError, "threshold must be a real number"),
    (lambda: pysparse.nm_masks(torch.randn(4, 6), 2, 4), ValueError, "divisible by m"),
    (lambda: pysparse.nm_masks(torch.randn(8), 2, 4), ValueError, "at least 2 dimensions"),
    (lambda: pysparse.nm_masks(torch.randn(4, 8), 0, 4), ValueError, "n must be in"),
    (lambda: pysparse.nm_masks(torch.randn(4, 8), 5, 4), ValueError, "n must be in"),
    (lambda: pysparse.nm_masks(torch.randn(4, 256), 2, 256), ValueError, "m must be in"),
    (lambda: pysparse.nm_masks(torch.randn(4, 8), 2.0, 4), TypeError, "n must be an int"),
    (lambda: pysparse.nm_masks(torch.tensor([[1.0, float("nan")]]), 1, 2), ValueError, "score contains NaN"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_cpp_checks_without_wrapper():
    ops = torch.ops.pysparse
    with pytest.raises(ValueError, match="num_prune must be in"):
        ops.sparsity_masks.default([torch.randn(3)], 4)
    with pytest.raises(ValueError, match="num_prune must be in"):
        ops.sparsity_masks.default([torch.randn(3)], -1)
    # an empty list has no tensor to dispatch on: torch raises before the kernel (the wrapper says ValueError)
    with pytest.raises((ValueError, NotImplementedError)):
        ops.sparsity_masks.default([], 0)
    with pytest.raises(TypeError, match="must be float32"):
        ops.threshold_masks.default([torch.randn(3).double()], 0.0)
    with pytest.raises(ValueError, match="divisible"):
        ops.nm_masks.default(torch.randn(2, 3), 1, 2)
    with pytest.raises(ValueError, match="m must be in"):
        ops.nm_masks.default(torch.randn(2, 4), 1, 1000)
