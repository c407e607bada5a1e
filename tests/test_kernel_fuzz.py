"""Corrupted structures straight to the C++ ops (``torch.ops.pysparse.*``, past the Python wrappers' checks): every
call returns or raises a Python exception, and never crashes or hangs the process. Under
``benchmarks/asan_check.sh`` (the CPU kernels built with AddressSanitizer) a read or write outside a tensor's
memory stops the run, so there this also proves that no kernel reads through an index it has not checked.

Each example corrupts one entry (or the length) of one of rowptr, col, t_rowptr, t_col, t_perm, and calls every
sparse op on it at the batches that pick each CPU code path: 1 (vectors), 4 (8-column panels), 16 and 24 (W's CSR),
40 (one panel over W^T; two over W's CSR for spmm_t), 200 (several panels), in float32, bfloat16 and float64."""
import faulthandler
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pysparse
from pysparse import csr
from pysparse.testing import devices_for

DEVICES = devices_for("spmm", "spmm_t", "sddmm", "spmm_grad", "csr_to_dense", "csr_gather", "sparse_conv2d",
                      "sparse_conv2d_grad_input", "sparse_conv2d_grad_values")
OPS = torch.ops.pysparse
BATCHES = (1, 4, 16, 24, 40, 200)
# what a refused input may raise: c10's errors map to these
REFUSED = (RuntimeError, ValueError, IndexError, TypeError)
PARTS = ("rowptr", "col", "t_rowptr", "t_col", "t_perm")


def _structure(kind: str):
    """(mask, row_block) of the base problems: a random matrix with W^T plain or blocked by W's rows, rows of one
    length spanning 1 KB (2:4 on 512 columns: the route that keeps W's CSR up to batch 128), and a convolution's
    [out channels, in channels x 3 x 3], ungrouped or depthwise."""
    gen = torch.Generator().manual_seed(0)
    if kind == "aliased":
        return pysparse.nm_masks(torch.rand(64, 512, generator=gen), 2, 4), None
    if kind == "conv":
        return torch.rand(6, 27, generator=gen) < 0.5, None
    if kind == "depthwise":  # [6 channels, 6 x 3 x 3]: row o's taps in channel o only (the depthwise kernels)
        mask = torch.zeros(6, 54, dtype=torch.bool)
        for o in range(1, 6):  # channel 0 without a stored tap
            mask[o, o * 9:(o + 1) * 9] = torch.rand(9, generator=gen) < 0.5
        return mask, None
    # ~12 values a column: with 16 or more, spmm_grad (and spmm_t over blocks) would keep W's CSR at batch 40
    mask = torch.rand(40, 30, generator=gen) < 0.3
    mask[3] = False  # an empty row
    return mask, (8 if kind == "blocked" else None)


def _base(kind: str, device):
    """The base problem of this kind: its mask, structure, and the structure's five tensors on device (a dict)."""
    mask, row_block = _structure(kind)
    base = csr.structure(mask, row_block)
    return mask, base, {name: getattr(base, name).to(device) for name in PARTS}


def _corrupt(t: torch.Tensor, how: str, where: float, value: int) -> torch.Tensor:
    """t with one entry set to value ("set"; clamped to t's dtype), two entries swapped ("swap"), its last entry
    dropped ("short") or repeated ("long")."""
    t = t.clone()
    n = t.numel()
    if how == "short":
        return t[:-1] if n else t
    if how == "long":
        return torch.cat([t, t[-1:]]) if n else t.new_zeros(1)
    if n == 0:
        return t
    i = min(int(where * n), n - 1)
    if how == "swap":
        k = (i + 1 + int(where * 7919)) % n
        t[i], t[k] = t[k].clone(), t[i].clone()
        return t
    info = torch.iinfo(t.dtype)
    t[i] = max(info.min, min(info.max, value))
    return t


def _calls(s: dict, shape, values: torch.Tensor, batch: int, conv: bool):
    """Every op on the structure s (a dict of its five tensors), at this batch, as thunks."""
    rows, cols = shape
    dev, dt = values.device, values.dtype
    gen = torch.Generator().manual_seed(batch)
    rnd = lambda *size: torch.randn(*size, generator=gen).to(dev, dt)  # noqa: E731
    tr = (s["t_rowptr"], s["t_col"], s["t_perm"])
    xt, gyt = rnd(cols, batch), rnd(rows, batch)
    calls = [
        lambda: OPS.spmm(s["rowptr"], s["col"], values, xt, rnd(rows), *tr),
        lambda: OPS.spmm(s["rowptr"], s["col"], values, xt, None, None, None, None),
        lambda: OPS.spmm_t(s["rowptr"], s["col"], values, gyt, cols, *tr),
        lambda: OPS.spmm_t(s["rowptr"], s["col"], values, gyt, cols, None, None, None),
        lambda: OPS.spmm_grad(s["rowptr"], s["col"], values, gyt, xt, *tr, True),
        lambda: OPS.spmm_grad(s["rowptr"], s["col"], values, gyt, xt, None, None, None, False),
        lambda: OPS.sddmm(s["rowptr"], s["col"], gyt, xt),
        lambda: OPS.csr_to_dense(s["rowptr"], s["col"], values, cols),
        lambda: OPS.csr_gather(s["rowptr"], s["col"], rnd(rows, cols)),
        # the spmm of spmm_t's route over W^T: W^T's structure as a CSR, W's values through t_perm
        lambda: OPS.spmm(s["t_rowptr"], s["t_col"], values, gyt, None, None, None, None),
    ]
    if conv and batch <= 4:  # images: batch x C x 5 x 5 -> 6 channels, 3 x 3 kernel, padding 1, stride 1 / 2
        x = rnd(batch, cols // 9, 5, 5)
        for stride in (1, 2):
            geo = ([3, 3], [stride, stride], [1, 1], [1, 1])
            out = (5 - 1) // stride + 1
            gy = rnd(batch, rows, out, out)
            calls += [
                lambda geo=geo: OPS.sparse_conv2d(s["rowptr"], s["col"], values, x, rnd(rows), *geo, *tr),
                lambda geo=geo, gy=gy: OPS.sparse_conv2d_grad_input(s["rowptr"], s["col"], values, gy,
                                                                    list(x.shape), *geo, *tr),
                lambda geo=geo, gy=gy: OPS.sparse_conv2d_grad_values(s["rowptr"], s["col"], x, gy, *geo),
            ]
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["plain", "blocked", "aliased", "conv", "depthwise"])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(part=st.sampled_from(PARTS), how=st.sampled_from(["set", "set", "set", "swap", "short", "long"]),
       where=st.floats(0, 1, exclude_max=True),
       value=st.sampled_from([-1, 0, 1, 6, 27, 29, 30, 39, 40, 41, 63, 64, 511, 512, 4095, 32767, -32768,
                              2**31 - 1, -2**31]))
def test_corrupted_structure_never_crashes(device, kind, part, how, where, value):
    mask, base, s = _base(kind, device)
    s[part] = _corrupt(s[part], how, where, value)
    gen = torch.Generator().manual_seed(1)
    values32 = torch.randn(base.col.numel(), generator=gen)
    # a hang (a loop that never ends on a bad pointer) ends the process with a traceback instead of the run
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        for dtype, batch in itertools.product((torch.float32, torch.bfloat16, torch.float64), BATCHES):
            values = values32.to(device, dtype)
            for call in _calls(s, tuple(mask.shape), values, batch, kind in ("conv", "depthwise")):
                try:
                    call()
                except REFUSED as e:
                    assert str(e), "a refusal must say why"
        if device == "cuda":
            torch.cuda.synchronize()  # an illegal address raises here, and the test fails
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.parametrize("kind", ["plain", "blocked", "aliased", "conv", "depthwise"])
def test_uncorrupted_structure_is_accepted(kind):
    """On the CPU the base problems themselves go through every call without an error: the refusals above are the
    corruptions' doing, and every route the fuzzing aims at runs. (CUDA refuses some by design: W^T blocked by
    rows, spmm_t / spmm_grad without W^T.)"""
    mask, base, s = _base(kind, "cpu")
    values = torch.randn(base.col.numel(), generator=torch.Generator().manual_seed(1))
    for batch in BATCHES:
        for call in _calls(s, tuple(mask.shape), values, batch, kind in ("conv", "depthwise")):
            call()
