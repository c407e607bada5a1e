import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pysparse
from pysparse import csr, reference
from pysparse.testing import devices_for

DEVICES = devices_for("spmm", "spmm_t", "sddmm", "spmm_grad")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as t [K, B] in another memory layout: "contiguous", "transposed" (the [K, B] view of a
    [B, K] tensor, what the layers pass) or "sliced" (every other column of a wider tensor)."""
    if layout == "transposed":
        return t.t().contiguous().t()
    if layout == "sliced":
        wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    return t


LAYOUTS = st.sampled_from(["contiguous", "transposed", "sliced"])


def _problem(rows, cols, batch, density, dtype, device, seed, *, empty_rows=False, row_block=None):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=gen) < density
    if empty_rows and rows:
        mask[::2] = False
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    values, s = csr.compress(w, mask, row_block)
    xt = torch.randn(cols, batch, generator=gen).to(dtype)
    bias = torch.randn(rows, generator=gen).to(dtype)
    move = lambda t: t.to(device)  # noqa: E731
    return move(values), csr.Structure(*(move(getattr(s, n)) for n in
                                         ("rowptr", "col", "t_rowptr", "t_col", "t_perm")), shape=s.shape), \
        move(xt), move(bias)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 40), cols=st.integers(0, 40), density=st.floats(0, 1),
       row_block=st.one_of(st.none(), st.integers(1, 45)), seed=st.integers(0, 2**31 - 1))
def test_structure_blocked_by_rows(rows, cols, density, row_block, seed):
    """csr.structure's transposed form, plain or blocked by W's rows: the stored positions in the order of (block
    of rows, column, row), t_rowptr over blocks x columns, t_perm mapping them to the CSR positions."""
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < density
    s = csr.structure(mask, row_block)
    r, c = mask.nonzero(as_tuple=True)
    rb = rows if row_block is None or row_block >= rows else row_block
    blocks = 1 if rb == rows else -(-rows // rb)
    assert s.row_blocks == (blocks if cols else 1) and s.t_rowptr.numel() == blocks * cols + 1
    order = sorted(range(len(r)), key=lambda j: (int(r[j]) // max(rb, 1), int(c[j]), int(r[j])))
    assert s.t_perm.tolist() == order
    assert s.t_col.long().tolist() == [int(r[j]) for j in order]
    counts = torch.zeros(blocks * cols + 1, dtype=torch.int64)
    for j in order:
        counts[(int(r[j]) // max(rb, 1)) * cols + int(c[j]) + 1] += 1
    assert s.t_rowptr.tolist() == counts.cumsum(0).tolist()
    with pytest.raises(ValueError, match="row_block must be a positive int"):
        csr.structure(mask, 0)


def test_cpu_row_block_rule():
    """Blocks of 256 rows for matrices of 512 rows or more that keep at least 1/8 of their entries, else none."""
    assert csr.cpu_row_block(4096, 4096, 8_388_608) == 256  # 50%
    assert csr.cpu_row_block(4096, 4096, 2_516_583) == 256  # 85%
    assert csr.cpu_row_block(4096, 4096, 2_097_152) == 256  # 87.5%: the edge
    assert csr.cpu_row_block(4096, 4096, 2_097_151) is None
    assert csr.cpu_row_block(4096, 4096, 1_677_722) is None  # 90%
    assert csr.cpu_row_block(512, 100, 51_200) == 256  # two blocks
    assert csr.cpu_row_block(511, 100, 51_100) is None  # fewer than 512 rows: one
    assert csr.cpu_row_block(0, 0, 0) is None
    for args, match in [((-1, 4, 0), "rows must be an int >= 0"), ((4, 4.0, 0), "cols must be an int >= 0"),
                        ((4, 4, True), "nnz must be an int >= 0"), ((4, 4, 17), "more than rows x cols")]:
        with pytest.raises(ValueError, match=match):
            csr.cpu_row_block(*args)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 70), cols=st.integers(0, 70), batch=st.sampled_from([0, 1, 2, 3, 8, 16, 31, 32, 33, 70]),
       density=st.floats(0, 1), dtype=st.sampled_from(list(TOL)), use_bias=st.booleans(),
       empty_rows=st.booleans(), seed=st.integers(0, 2**31 - 1), layout=LAYOUTS)
def test_spmm_matches_reference(device, rows, cols, batch, density, dtype, use_bias, empty_rows, seed, layout):
    values, s, xt, bias = _problem(rows, cols, batch, density, dtype, device, seed, empty_rows=empty_rows)
    bias = bias if use_bias else None
    got = pysparse.ops.spmm(s.rowptr, s.col, values, _strided(xt, layout), bias=bias)
    want = reference.spmm(s.rowptr, s.col, values, xt, bias=bias)
    assert got.shape == (rows, batch) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("cols", [100, 40000])  # int16 / int32 indices
def test_batch_one_every_row_length_and_dtype(dtype, cols):
    # Batch 1 sweeps each row in vector steps of 32 stored values (gathers of x, float16 / bfloat16 values converted
    # as they load, x converted to float32 first), the rest one by one: rows of every length from 0 to 99 (so
    # every split between the steps and the rest), with and without bias, against the reference in float64; a
    # bad index inside a vector step or in the rest still raises.
    gen = torch.Generator().manual_seed(11)
    lengths = torch.arange(100)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    col = torch.cat([torch.randperm(cols, generator=gen)[:n].sort().values for n in lengths.tolist()])
    col = col.to(torch.int16 if cols == 100 else torch.int32)
    values = torch.randn(int(rowptr[-1]), generator=gen).to(dtype)
    xt = torch.randn(cols, 1, generator=gen).to(dtype)
    bias = torch.randn(100, generator=gen).to(dtype)
    for b in (None, bias):
        got = pysparse.ops.spmm(rowptr, col, values, xt, bias=b)
        want = reference.spmm(rowptr, col, values.double(), xt.double(), bias=None if b is None else b.double())
        assert got.dtype == dtype and got.shape == (100, 1)
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
    row = 70  # 70 stored values: two vector steps and 6 more
    for pos in (int(rowptr[row]) + 3, int(rowptr[row]) + 40, int(rowptr[row + 1]) - 1):
        c = col.clone()
        c[pos] = cols
        with pytest.raises(ValueError, match="spmm: a column index is outside"):
            pysparse.ops.spmm(rowptr, c, values, xt)


@pytest.mark.parametrize("dtype", list(TOL))
def test_transposed_batch_packing_edges(dtype):
    """The layers' layout (xt = the [K, B] view of a contiguous [B, K] batch) is packed 16 x 16 blocks at a time
    on the CPU: every K and B remainder against the reference, sizes alternating so that each call reuses the
    scratch buffers of a larger or a smaller one."""
    for cols, batch in [(1, 2), (15, 17), (16, 16), (17, 33), (100, 64), (33, 100), (5, 3), (100, 200), (7, 31)]:
        values, s, xt, bias = _problem(23, cols, batch, 0.4, dtype, "cpu", cols * 1000 + batch)
        view = xt.t().contiguous().t()
        torch.testing.assert_close(pysparse.ops.spmm(s.rowptr, s.col, values, view, bias=bias),
                                   reference.spmm(s.rowptr, s.col, values, xt, bias=bias), **TOL[dtype])
        a = torch.randn(23, batch).to(dtype)
        torch.testing.assert_close(pysparse.ops.sddmm(s.rowptr, s.col, a.t().contiguous().t(), view),
                                   reference.sddmm(s.rowptr, s.col, a, xt), **TOL[dtype])
        yt = torch.randn(23, batch).to(dtype)
        for transposed in (s.transposed(), None):
            torch.testing.assert_close(
                pysparse.ops.spmm_t(s.rowptr, s.col, values, yt.t().contiguous().t(), cols, transposed=transposed),
                reference.spmm_t(s.rowptr, s.col, values, yt, cols), **TOL[dtype])
            got = pysparse.ops.spmm_grad(s.rowptr, s.col, values, yt.t().contiguous().t(), view, transposed=transposed,
                                         bias=True)  # the bias gradient: summed in the same 16 x 16 blocks
            want = reference.spmm_grad(s.rowptr, s.col, values, yt, xt, bias=True)
            assert len(got) == len(want) == 3
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 50), cols=st.integers(0, 50), batch=st.sampled_from([0, 1, 5, 8, 16, 64]),
       density=st.floats(0, 1), dtype=st.sampled_from(list(TOL)), seed=st.integers(0, 2**31 - 1), layout=LAYOUTS)
def test_sddmm_matches_reference(device, rows, cols, batch, density, dtype, seed, layout):
    values, s, xt, _ = _problem(rows, cols, batch, density, dtype, device, seed)
    a = torch.randn(rows, batch, generator=torch.Generator().manual_seed(seed + 1)).to(device, dtype)
    got = pysparse.ops.sddmm(s.rowptr, s.col, _strided(a, layout), _strided(xt, layout))
    torch.testing.assert_close(got, reference.sddmm(s.rowptr, s.col, a, xt), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("batch", [3, 20, 200, 260, 520, 1100])
def test_sddmm_batch_widths(device, dtype, batch):
    """sddmm at batch widths that take each of the CUDA kernel's lane layouts: lanes of a warp on different stored
    positions (narrow batches, a width that is not a multiple of the vector), one to four vectors of a's row kept
    per lane (200-520), and a's row re-read beyond that (1100); rows of 0 to ~30 stored values."""
    values, s, xt, _ = _problem(37, 31, batch, 0.5, dtype, device, batch, empty_rows=True)
    a = torch.randn(37, batch, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    tol = dict(rtol=1e-2, atol=5e-2) if dtype == torch.float16 else TOL[dtype]  # sums of 1100 float16 products
    torch.testing.assert_close(pysparse.ops.sddmm(s.rowptr, s.col, a, xt), reference.sddmm(s.rowptr, s.col, a, xt),
                               **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_of_one_aliasing_length_take_the_csr_sweep(dtype):
    """A matrix whose rows all hold the same number of values spanning a multiple of 1 KB (2:4 on 512 float32 /
    1024 bfloat16 columns) takes the backward (spmm_grad, and spmm_t alone) over W's CSR up to batch 128 even with
    W^T's structure (its permutation passes are slow there): the same bits as without the structure; above 128,
    and for ragged rows (at batch 80: above the batches where spmm_grad keeps W's CSR for a small matrix), W^T's.
    Both against the reference."""
    cols = 512 if dtype == torch.float32 else 1024
    mask = pysparse.nm_masks(torch.rand(64, cols, generator=torch.Generator().manual_seed(0)), 2, 4)
    ragged = mask.clone()
    ragged[0, 1::4] = True
    for m, batch, csr_sweep in ((mask, 40, True), (mask, 80, True), (mask, 128, True), (mask, 200, False),
                                  (ragged, 80, False)):
        w = torch.randn(64, cols, generator=torch.Generator().manual_seed(1)).to(dtype)
        values, s = csr.compress(w, m, csr.cpu_row_block(64, cols, int(m.sum())))
        gen = torch.Generator().manual_seed(2)
        xt, gyt = torch.randn(cols, batch, generator=gen).to(dtype), torch.randn(64, batch, generator=gen).to(dtype)
        _check_backward_route(values, s, gyt, xt, csr_sweep, TOL[dtype])


def _check_backward_route(values, s, gyt, xt, csr_sweep, tol, t_csr_sweep=None):
    """spmm_grad and spmm_t alone, given W^T's structure, against the reference (tolerance tol), and whether they
    swept W's CSR (csr_sweep; spmm_t: t_csr_sweep, when it differs) or W^T: the two sweeps sum dxt in different
    orders, so the bits of the result without the structure (always the CSR) tell them apart."""
    t_csr_sweep = csr_sweep if t_csr_sweep is None else t_csr_sweep
    cols = xt.shape[0]
    got = pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt, transposed=s.transposed())
    want = reference.spmm_grad(s.rowptr, s.col, values, gyt, xt)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, **tol)
    over_csr = pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt)
    assert torch.equal(got[1], over_csr[1]) == csr_sweep, (s.shape, s.row_blocks, xt.shape[1])
    alone = pysparse.ops.spmm_t(s.rowptr, s.col, values, gyt, cols, transposed=s.transposed())
    torch.testing.assert_close(alone, want[1], **tol)
    assert torch.equal(alone, pysparse.ops.spmm_t(s.rowptr, s.col, values, gyt, cols)) == t_csr_sweep


def test_large_or_tall_matrices_take_the_csr_sweep_up_to_batch_64():
    """Over a plain (unblocked) W^T, spmm_grad and spmm_t keep W's CSR at batches 33-48 for a matrix of twice as
    many rows as columns or of float32 values filling 4x a core's L2, and at 49-64 where gyt's 32-column panel
    (rows x 128 bytes) exceeds L2, or the values fill 16x; a square matrix of few values, a batch above 64 and W^T
    blocked by W's rows keep W^T. The route is told by dxt's bits (the two sweeps sum in different orders); every
    result against the reference. (The cases hold for any L2 up to 3 MB a core. The tall and square matrices hold
    fewer than 16 values a column: more would keep spmm_grad on W's CSR by the rule for small matrices below.)"""
    gen = torch.Generator().manual_seed(0)
    tall = torch.rand(1024, 64, generator=gen) < 0.01
    taller = torch.rand(65536, 8, generator=gen) < 0.2  # gyt's panel: 8 MB
    square = torch.rand(256, 256, generator=gen) < 0.05
    large = torch.rand(1536, 4096, generator=gen) < 0.5  # ~3.1M stored values: 12.6 MB of float32
    cases = [(tall, None, 40, True), (tall, None, 64, False), (tall, 256, 40, False), (taller, None, 64, True),
             (taller, None, 100, False), (square, None, 40, False), (large, None, 40, True), (large, None, 100, False)]
    for mask, row_block, batch, csr_sweep in cases:
        rows, cols = mask.shape
        w = torch.randn(rows, cols, generator=gen)
        values, s = csr.compress(w, mask, row_block)
        xt, gyt = torch.randn(cols, batch, generator=gen), torch.randn(rows, batch, generator=gen)
        # (dxt's entries sum up to 13,000 products of about 1: float32's rounding)
        _check_backward_route(values, s, gyt, xt, csr_sweep, dict(rtol=1e-4, atol=5e-3))


def test_small_matrices_keep_the_csr_sweep_in_one_panel_up_to_batch_64():
    """spmm_grad keeps W's CSR at batches 33-64, W^T's structure given (plain or blocked), where its sweep takes the
    batch in one 64-column panel (max(rows, columns) x 64 floats within half of L2) and W's columns hold 16 or
    more values on average; spmm_t alone keeps a plain W^T there but takes its scatter over W's CSR where W^T is
    blocked by W's rows (below 87.5% sparsity). Fewer values, a batch above 64, or 9000 columns (a panel beyond
    half of any L2 up to 4 MB): W^T for both. Route told by dxt's bits, results against the reference (cases
    that hold for any L2 of 256 KB to 4 MB)."""
    gen = torch.Generator().manual_seed(3)
    square = torch.rand(256, 256, generator=gen) < 0.5  # ~128 values a column
    few = torch.rand(256, 256, generator=gen) < 0.05  # ~13 a column
    wide = torch.rand(256, 9000, generator=gen) < 0.1  # ~26 a column, but 9000 columns
    cases = [(square, None, 40, True, False), (square, None, 64, True, False), (square, 64, 48, True, True),
             (square, 64, 65, False, False), (few, None, 40, False, False), (few, 64, 40, False, False),
             (wide, None, 40, False, False), (wide, 64, 40, False, False)]
    for mask, row_block, batch, grad_csr, t_csr in cases:
        rows, cols = mask.shape
        values, s = csr.compress(torch.randn(rows, cols, generator=gen), mask, row_block)
        xt, gyt = torch.randn(cols, batch, generator=gen), torch.randn(rows, batch, generator=gen)
        _check_backward_route(values, s, gyt, xt, grad_csr, dict(rtol=1e-4, atol=1e-3), t_csr_sweep=t_csr)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_indices(device):
    """More than 32768 columns: int32 column indices (and int16 row indices in the transposed structure)."""
    values, s, xt, bias = _problem(3, 40_000, 5, 0.01, torch.float32, device, 0)
    assert s.col.dtype == torch.int32 and s.t_col.dtype == torch.int16
    torch.testing.assert_close(pysparse.ops.spmm(s.rowptr, s.col, values, xt, bias=bias),
                               reference.spmm(s.rowptr, s.col, values, xt, bias=bias), rtol=1e-5, atol=1e-5)
    gyt = torch.randn(3, 5, device=device)
    torch.testing.assert_close(pysparse.ops.spmm(s.t_rowptr, s.t_col, values[s.t_perm.long()], gyt),
                               reference.csr_to_dense(s.rowptr, s.col, values, 40_000).t() @ gyt,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    values, s, xt, bias = _problem(9, 13, 6, 0.4, torch.float64, device, 3, empty_rows=True)
    inputs = [t.clone().requires_grad_() for t in (values, xt, bias)]
    fn = lambda v, x, b: pysparse.ops.spmm(s.rowptr, s.col, v, x, bias=b, transposed=s.transposed())  # noqa
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 60), cols=st.integers(0, 60), batch=st.sampled_from([0, 1, 2, 8, 16, 17, 33, 64, 70]),
       density=st.floats(0, 1), dtype=st.sampled_from(list(TOL)), empty_rows=st.booleans(),
       seed=st.integers(0, 2**31 - 1), layout=LAYOUTS, row_block=st.one_of(st.none(), st.integers(1, 64)))
def test_spmm_t_matches_reference(device, rows, cols, batch, density, dtype, empty_rows, seed, layout, row_block):
    """Through W^T's structure (plain, or on the CPU blocked by W's rows: row_block) and the scatter."""
    row_block = None if device == "cuda" else row_block  # the CUDA kernels take one block
    values, s, _, _ = _problem(rows, cols, batch, density, dtype, device, seed, empty_rows=empty_rows,
                               row_block=row_block)
    yt = torch.randn(rows, batch, generator=torch.Generator().manual_seed(seed + 2)).to(device, dtype)
    want = reference.spmm_t(s.rowptr, s.col, values, yt, cols)
    for transposed in (s.transposed(), None):  # both CPU ways: through W^T's structure and the scatter
        if transposed is None and device == "cuda":
            continue
        got = pysparse.ops.spmm_t(s.rowptr, s.col, values, _strided(yt, layout), cols, transposed=transposed)
        assert got.shape == (cols, batch)
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=50, deadline=None)
@given(rows=st.integers(0, 60), cols=st.integers(0, 60),
       batch=st.sampled_from([0, 1, 2, 8, 16, 17, 33, 64, 65, 100, 130, 200]), density=st.floats(0, 1),
       dtype=st.sampled_from(list(TOL)), empty_rows=st.booleans(), seed=st.integers(0, 2**31 - 1), layout=LAYOUTS,
       row_block=st.one_of(st.none(), st.integers(1, 64)))
def test_spmm_grad_matches_reference(device, rows, cols, batch, density, dtype, empty_rows, seed, layout, row_block):
    """Both gradients in one call, both CPU sweeps (W^T's structure above batch 32, plain or blocked by W's rows,
    W's CSR otherwise or without it), batches of one to four panels (the values are gathered through the
    permutation before the panels and the products scattered through it after them); with bias=True, the bias
    gradient (summed as gyt is packed) too."""
    row_block = None if device == "cuda" else row_block  # the CUDA kernels take one block
    values, s, xt, _ = _problem(rows, cols, batch, density, dtype, device, seed, empty_rows=empty_rows,
                                row_block=row_block)
    gyt = torch.randn(rows, batch, generator=torch.Generator().manual_seed(seed + 3)).to(device, dtype)
    want_values, want_x, want_bias = reference.spmm_grad(s.rowptr, s.col, values, gyt, xt, bias=True)
    for transposed in (s.transposed(), None):
        if transposed is None and device == "cuda":
            continue
        for bias in (False, True):
            got = pysparse.ops.spmm_grad(s.rowptr, s.col, values, _strided(gyt, layout), _strided(xt, layout),
                                         transposed=transposed, bias=bias)
            assert len(got) == (3 if bias else 2)
            dvalues, dxt = got[:2]
            assert dvalues.shape == values.shape and dxt.shape == (cols, batch)
            assert dvalues.dtype == dxt.dtype == dtype
            torch.testing.assert_close(dvalues, want_values, **TOL[dtype])
            torch.testing.assert_close(dxt, want_x, **TOL[dtype])
            if bias:
                assert got[2].shape == (rows,) and got[2].dtype == dtype
                torch.testing.assert_close(got[2], want_bias, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, cols, row_block", [(50, 70, None), (300, 9000, None), (300, 600, 64)])
def test_batches_in_runs_of_narrower_panels(dtype, rows, cols, row_block):
    """A batch that is not a multiple of the widest panel goes in runs (panel_runs): full panels, then the rest
    in one narrower panel (40 columns as one of 48, 65 as 64 + 16, 100 as 64 + 48; W^T's sweep, whose panels
    are at most 32 columns: 33 as 32 + 16), each run packed on its own, its outputs written into its columns
    and its products (and bias sums) added to the earlier runs'. Every op against the reference at the runs'
    edges, in both layouts, through W's CSR (one sweep or two: 9000 columns) and through W^T (plain or
    blocked)."""
    # sums of up to ~2700 products of about 1 (outputs up to ~150): the dtype's rounding of such sums
    tol = {torch.float32: dict(rtol=1e-4, atol=2e-3), torch.float16: dict(rtol=2e-3, atol=5e-2),
           torch.bfloat16: dict(rtol=2e-2, atol=3e-1)}[dtype]
    for batch in (17, 33, 40, 48, 49, 63, 65, 80, 97, 100, 113):
        values, s, xt, bias = _problem(rows, cols, batch, 0.3, dtype, "cpu", batch, row_block=row_block)
        gyt = torch.randn(rows, batch, generator=torch.Generator().manual_seed(batch + 1)).to(dtype)
        want_y = reference.spmm(s.rowptr, s.col, values, xt, bias=bias)
        want = reference.spmm_grad(s.rowptr, s.col, values, gyt, xt, bias=True)
        for layout in ("contiguous", "transposed"):
            x, g = _strided(xt, layout), _strided(gyt, layout)
            torch.testing.assert_close(pysparse.ops.spmm(s.rowptr, s.col, values, x, bias=bias), want_y, **tol)
            torch.testing.assert_close(pysparse.ops.sddmm(s.rowptr, s.col, g, x), want[0], **tol)
            for transposed in (s.transposed(), None):
                torch.testing.assert_close(pysparse.ops.spmm_t(s.rowptr, s.col, values, g, cols, transposed=transposed),
                                           want[1], **tol)
                got = pysparse.ops.spmm_grad(s.rowptr, s.col, values, g, x, transposed=transposed, bias=True)
                for name, a, b in zip(("dvalues", "dxt", "dbias"), got, want):
                    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}, batch {batch}, {layout}: {m}")


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spmm_grad_batch_split_between_threads(threads, dtype):
    """Above batch 32 the CPU backward sweeps W^T's structure; with as many panels as threads (or a multiple) and
    few stored values, each thread takes its own panels (packing them itself, its products and bias sums in rows
    of their own, added after), else each takes its own columns. Panels of 32 columns: 2 threads split batches 256
    and 128 (8 and 4 panels) and take batch 130's 5 panels by columns, 3 threads all three by columns; the
    layers' batch-major layout and a row-major one; W^T plain and blocked by W's rows; against the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for (rows, cols, batch), row_block in itertools.product([(70, 90, 256), (33, 17, 130), (64, 64, 128)],
                                                                [None, 16]):
            values, s, xt, _ = _problem(rows, cols, batch, 0.3, dtype, "cpu", rows + batch, row_block=row_block)
            gyt = torch.randn(rows, batch, generator=torch.Generator().manual_seed(batch)).to(dtype)
            want = reference.spmm_grad(s.rowptr, s.col, values, gyt, xt, bias=True)
            for g, x in ((gyt.t().contiguous().t(), xt.t().contiguous().t()), (gyt, xt)):
                got = pysparse.ops.spmm_grad(s.rowptr, s.col, values, g, x, transposed=s.transposed(), bias=True)
                for a, w in zip(got, want):
                    torch.testing.assert_close(a, w, **TOL[dtype])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cols", [60, 9000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spmm_grad_over_csr_in_one_or_two_sweeps(threads, cols, dtype):
    """Batches 9-32 on the CPU (and larger ones without W^T's structure) sweep W's CSR over 16- to 64-column
    panels: one sweep for both gradients while xt's panel and the accumulators are small (60 columns), sddmm's and
    spmm_t's sweeps over the same packed panels once the two take a quarter of L2 or more (9000 columns: 1.15 MB
    at 16 columns, above a quarter of the largest L2 the kernels assume, 4 MB). Either way the reference's
    gradients, for two layouts, one and two panels, and spmm_t's bits; on the two sweeps, sddmm's bits too."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, s, _, _ = _problem(40, cols, 1, 0.3 if cols < 100 else 0.05, dtype, "cpu", cols, empty_rows=True)
        gen = torch.Generator().manual_seed(threads)
        for batch, transposed in ((9, s.transposed()), (16, None), (17, s.transposed()), (32, None), (70, None)):
            x, g = torch.randn(batch, cols, generator=gen).to(dtype), torch.randn(batch, 40, generator=gen).to(dtype)
            want = reference.spmm_grad(s.rowptr, s.col, values, g.t(), x.t(), bias=True)
            for layout in ("transposed", "contiguous"):
                xt, gyt = _strided(x.t().contiguous(), layout), _strided(g.t().contiguous(), layout)
                got = pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt, transposed=transposed, bias=True)
                for a, w in zip(got, want):
                    assert a.dtype == dtype
                    torch.testing.assert_close(a, w, **TOL[dtype])
                assert torch.equal(pysparse.ops.spmm_t(s.rowptr, s.col, values, gyt, cols), got[1])
                alone = pysparse.ops.sddmm(s.rowptr, s.col, gyt, xt)
                if cols > 100:
                    assert torch.equal(alone, got[0])
                else:
                    torch.testing.assert_close(alone, got[0], **TOL[dtype])
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cols, batch", [(4096, 512), (4100, 300)])
def test_large_batch_major_input_gradients(threads, cols, batch):
    """An input gradient in the layers' batch-major layout larger than the threads' L2 caches together (4.9-8 MB
    here, against 2 MB on the 2-core machines) is written by streaming stores where a 16-row block is a whole
    aligned line (at 4100 columns, one batch entry's in four): over W^T (the batch split between threads or
    the columns), over W's CSR (the accumulators' sum) and by spmm_t alone. Each equals the row-major output's bits
    (written through the caches, the same sums) and the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, s, _, _ = _problem(64, cols, 1, 0.02, torch.float32, "cpu", batch)
        gen = torch.Generator().manual_seed(threads)
        x, g = torch.randn(batch, cols, generator=gen), torch.randn(batch, 64, generator=gen)
        want = reference.spmm_grad(s.rowptr, s.col, values, g.t(), x.t())
        for transposed in (s.transposed(), None):
            got = pysparse.ops.spmm_grad(s.rowptr, s.col, values, g.t(), x.t(), transposed=transposed)
            assert got[1].stride() == (1, cols)  # batch-major, as the layers' x.grad
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
            rows_major = pysparse.ops.spmm_grad(s.rowptr, s.col, values, g.t().contiguous(), x.t().contiguous(),
                                                transposed=transposed)
            assert rows_major[1].stride() == (batch, 1)
            assert torch.equal(got[1], rows_major[1])
            alone = pysparse.ops.spmm_t(s.rowptr, s.col, values, g.t(), cols, transposed=transposed)
            torch.testing.assert_close(alone, want[1], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", list(TOL))
def test_single_column_backward(threads, dtype):
    """Batch 1 on the CPU: the backward ops sweep W's CSR without panels (a vector, not a 16-column panel):
    spmm_grad, sddmm and spmm_t against the reference, with and without W^T's structure, a contiguous, transposed
    and sliced column, int16 and int32 (40000 columns) indices, empty rows; any thread count (the accumulators
    are per thread, summed after). A bad column index in any row raises on each op."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows, cols, density in [(70, 90, 0.3), (5, 40_000, 0.01), (33, 17, 1.0)]:
            values, s, xt, _ = _problem(rows, cols, 1, density, dtype, "cpu", rows, empty_rows=rows == 70)
            gyt = torch.randn(rows, 1, generator=torch.Generator().manual_seed(cols)).to(dtype)
            want = reference.spmm_grad(s.rowptr, s.col, values, gyt, xt, bias=True)
            for layout in ("contiguous", "transposed", "sliced"):
                g, x = _strided(gyt, layout), _strided(xt, layout)
                for transposed in (s.transposed(), None):
                    got = pysparse.ops.spmm_grad(s.rowptr, s.col, values, g, x, transposed=transposed, bias=True)
                    for a, w in zip(got, want):
                        assert a.dtype == dtype
                        torch.testing.assert_close(a, w, **TOL[dtype])
                    torch.testing.assert_close(pysparse.ops.spmm_t(s.rowptr, s.col, values, g, cols,
                                                                   transposed=transposed), want[1], **TOL[dtype])
                torch.testing.assert_close(pysparse.ops.sddmm(s.rowptr, s.col, g, x), want[0], **TOL[dtype])
            for bad in (cols, -1):
                col = s.col.clone()
                col[-1] = bad
                for call in (lambda: torch.ops.pysparse.spmm_grad.default(s.rowptr, col, values, gyt, xt, None, None,
                                                                          None),
                             lambda: torch.ops.pysparse.sddmm.default(s.rowptr, col, gyt, xt),
                             lambda: torch.ops.pysparse.spmm_t.default(s.rowptr, col, values, gyt, cols, None, None,
                                                                       None)):
                    with pytest.raises(ValueError, match="column index is outside"):
                        call()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("cols", [300, 40_000])
def test_single_column_backward_blocks(cols):
    """Batch 1, float32: with AVX2 a row's full blocks of 8 stored positions take a vectorised loop when xt is
    contiguous (the products gathered 8 at a time), the rest the scalar loop, which a strided xt takes for the
    products throughout. Both give the same bits; a bad column index inside a block (first, middle or last lane,
    int16 and int32 indices, at either end of the index type) raises on each op."""
    rows = 6
    gen = torch.Generator().manual_seed(cols)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r, n in enumerate((0, 7, 8, 9, 40, 133)):  # empty, scalar only, one block, a block and a tail, ...
        mask[r, torch.randperm(cols, generator=gen)[:n]] = True
    values, s = csr.compress(torch.randn(rows, cols, generator=gen), mask)
    xt, gyt = torch.randn(cols, 1, generator=gen), torch.randn(rows, 1, generator=gen)
    want = reference.spmm_grad(s.rowptr, s.col, values, gyt, xt, bias=True)
    fast = pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt, bias=True)
    scalar = pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, _strided(xt, "sliced"), bias=True)
    for f, sc, w in zip(fast, scalar, want):
        assert torch.equal(f, sc)
        torch.testing.assert_close(f, w, rtol=1e-5, atol=1e-5)
    assert torch.equal(pysparse.ops.sddmm(s.rowptr, s.col, gyt, xt), fast[0])
    assert torch.equal(pysparse.ops.spmm_t(s.rowptr, s.col, values, gyt, cols), fast[1])
    big = torch.iinfo(s.col.dtype)
    start = int(s.rowptr[5])  # the 133-entry row: blocks at [start, start + 128)
    for pos in (start, start + 3, start + 7, start + 64):
        for bad in (cols, -1, big.max, big.min):
            col = s.col.clone()
            col[pos] = bad
            for call in (lambda: torch.ops.pysparse.spmm_grad.default(s.rowptr, col, values, gyt, xt, None, None, None,
                                                                      True),
                         lambda: torch.ops.pysparse.sddmm.default(s.rowptr, col, gyt, xt),
                         lambda: torch.ops.pysparse.spmm_t.default(s.rowptr, col, values, gyt, cols, None, None, None)):
                with pytest.raises(ValueError, match="column index is outside"):
                    call()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("rows, cols", [(37, 45), (300, 40_000)])
def test_narrow_batches_match_the_padded_panel(threads, rows, cols):
    """Batches of 2-8 on the CPU take panels of 8 columns instead of 16 (with AVX2). Each output equals that of
    the same batch zero-padded to 16 columns (the 16-column panel path): the forward, the input gradient and the
    bias gradient bit for bit (the same per-lane sums in the same order), the values' gradient to rounding (its
    horizontal sums are added in another order on AVX-512 builds); for every layout of xt and gyt, int16 and int32
    indices (40000 columns), rows of 0 to many stored values, row counts not a multiple of 8; and spmm_t / sddmm
    alone equal spmm_grad's parts."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, s, _, bias = _problem(rows, cols, 1, 0.02 if cols > 1000 else 0.4, torch.float32, "cpu", rows,
                                      empty_rows=True)
        t = s.transposed()
        gen = torch.Generator().manual_seed(cols)
        for batch in range(2, 9):
            x, g = torch.randn(batch, cols, generator=gen), torch.randn(batch, rows, generator=gen)
            x16 = torch.cat([x, torch.zeros(16 - batch, cols)]).t().contiguous()
            g16 = torch.cat([g, torch.zeros(16 - batch, rows)]).t().contiguous()
            for layout in ("transposed", "contiguous", "sliced"):  # (the bias gradient's order follows the layout)
                xt, gyt = _strided(x.t().contiguous(), layout), _strided(g.t().contiguous(), layout)
                y16 = pysparse.ops.spmm(s.rowptr, s.col, values, _strided(x16, layout), bias=bias, transposed=t)
                dv16, dx16, db16 = pysparse.ops.spmm_grad(s.rowptr, s.col, values, _strided(g16, layout),
                                                          _strided(x16, layout), transposed=t, bias=True)
                assert torch.equal(pysparse.ops.spmm(s.rowptr, s.col, values, xt, bias=bias, transposed=t),
                                   y16[:, :batch])
                dv, dx, db = pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt, transposed=t, bias=True)
                assert torch.equal(dx, dx16[:, :batch]) and torch.equal(db, db16)
                torch.testing.assert_close(dv, dv16, rtol=1e-6, atol=1e-6)
                assert torch.equal(pysparse.ops.spmm_t(s.rowptr, s.col, values, gyt, cols, transposed=t), dx)
                assert torch.equal(pysparse.ops.sddmm(s.rowptr, s.col, gyt, xt), dv)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [16, 100])
@pytest.mark.parametrize("transposed", [True, False])
def test_backward_matches_reference(device, batch, transposed):
    """spmm's autograd (one spmm_grad call when the values and the input both need gradients, else one of
    sddmm / spmm_t) against the reference's autograd, in float32."""
    if device == "cuda" and not transposed:
        pytest.skip("the CUDA backward needs the transposed structure")
    values, s, xt, bias = _problem(70, 90, batch, 0.3, torch.float32, device, 4)
    gyt = torch.randn(70, batch, device=device)
    t = s.transposed() if transposed else None
    for needs in [(True, True, True), (True, False, False), (False, True, True)]:
        got = [u.clone().requires_grad_(n) for u, n in zip((values, xt, bias), needs)]
        want = [u.clone().requires_grad_(n) for u, n in zip((values, xt, bias), needs)]
        pysparse.ops.spmm(s.rowptr, s.col, got[0], got[1].t().contiguous().t(), bias=got[2],
                          transposed=t).backward(gyt)
        reference.spmm(s.rowptr, s.col, want[0], want[1], bias=want[2]).backward(gyt)
        for g, w, n in zip(got, want, needs):
            if n:
                torch.testing.assert_close(g.grad, w.grad, rtol=1e-5, atol=1e-5)
            else:
                assert g.grad is None


def test_cpu_backward_needs_no_transposed_structure():
    values, s, xt, _ = _problem(40, 50, 20, 0.3, torch.float32, "cpu", 0)
    x = xt.clone().requires_grad_()
    gyt = torch.randn(40, 20)
    pysparse.ops.spmm(s.rowptr, s.col, values, x).backward(gyt)
    torch.testing.assert_close(x.grad, reference.spmm_t(s.rowptr, s.col, values, gyt, 50), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_compile(device):
    values, s, xt, bias = _problem(12, 20, 8, 0.3, torch.float32, device, 1)
    torch.library.opcheck(torch.ops.pysparse.spmm.default, (s.rowptr, s.col, values, xt, bias, *s.transposed()))
    torch.library.opcheck(torch.ops.pysparse.spmm.default,
                          (s.rowptr, s.col, values.clone().requires_grad_(), xt.clone().requires_grad_(),
                           bias.clone().requires_grad_(), *s.transposed()))
    torch.library.opcheck(torch.ops.pysparse.sddmm.default, (s.rowptr, s.col, torch.randn(12, 8, device=device), xt))
    torch.library.opcheck(torch.ops.pysparse.spmm_t.default,
                          (s.rowptr, s.col, values, torch.randn(12, 8, device=device), 20, *s.transposed()))
    batch_major = torch.randn(8, 20, device=device).t()  # the layers' view of a [B, K] batch
    for bias_grad in (False, True):
        for x in (xt, batch_major):  # the input gradient's layout follows xt's on every device (fake = real)
            torch.library.opcheck(torch.ops.pysparse.spmm_grad.default,
                                  (s.rowptr, s.col, values, torch.randn(12, 8, device=device), x, *s.transposed(),
                                   bias_grad))
    torch.library.opcheck(torch.ops.pysparse.spmm.default, (s.rowptr, s.col, values, batch_major, bias))
    torch._dynamo.reset()
    f = torch.compile(lambda v, x: pysparse.ops.spmm(s.rowptr, s.col, v, x, transposed=s.transposed()).relu().sum(),
                      fullgraph=True)
    v = values.clone().requires_grad_()
    f(v, xt).backward()
    v2 = values.clone().requires_grad_()
    pysparse.ops.spmm(s.rowptr, s.col, v2, xt, transposed=s.transposed()).relu().sum().backward()
    torch.testing.assert_close(v.grad, v2.grad)


# batch 1 (no panels), the narrow panel, one 16-column panel (the three check per row), several
@pytest.mark.parametrize("batch", [1, 4, 16, 200])
@pytest.mark.parametrize("cols", [100, 40000])  # int16 / int32 indices
def test_row_checks_catch_every_bad_index(batch, cols):
    # The sweeps over W's CSR (spmm's forward; spmm_t's, sddmm's and spmm_grad's without W^T's structure) check a
    # row's indices a vector at a time before sweeping it without per-read checks, a row that fails being swept
    # with them (the forward at batch 1 checks each gather's lanes as it sweeps): a bad index anywhere in a long row
    # (block lanes, the tail) must raise.
    values, s, xt, bias = _problem(3, cols, batch, 1.0 if cols == 100 else 0.01, torch.float32, "cpu", 5)
    dense = torch.zeros(3, cols).index_put_((torch.repeat_interleave(torch.arange(3), s.rowptr.diff()),
                                            s.col.long()), values)
    gyt = torch.randn(3, batch)
    torch.testing.assert_close(pysparse.ops.spmm(s.rowptr, s.col, values, xt, bias=bias), dense @ xt + bias[:, None],
                               rtol=1e-4, atol=1e-4)
    dv, dxt = pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt)
    torch.testing.assert_close(dxt, dense.t() @ gyt, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pysparse.ops.spmm_t(s.rowptr, s.col, values, gyt, cols), dxt, rtol=1e-4, atol=1e-4)
    want_dv = (dense.ne(0) * (gyt @ xt.t()))[dense.ne(0)]  # the stored positions in row-major (CSR) order
    torch.testing.assert_close(dv, want_dv, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pysparse.ops.sddmm(s.rowptr, s.col, gyt, xt), want_dv, rtol=1e-4, atol=1e-4)
    first = int(s.rowptr[1])
    assert first >= 24
    calls = {"spmm": lambda col: pysparse.ops.spmm(s.rowptr, col, values, xt),
             "spmm_t": lambda col: pysparse.ops.spmm_t(s.rowptr, col, values, gyt, cols),
             "sddmm": lambda col: pysparse.ops.sddmm(s.rowptr, col, gyt, xt),
             "spmm_grad": lambda col: pysparse.ops.spmm_grad(s.rowptr, col, values, gyt, xt)}
    for pos in (0, 7, 8, 15, first - 1, first + 3):
        for bad in (cols, -1, 32767 if cols == 100 else 2**31 - 1):
            col = s.col.clone()
            col[pos] = bad
            for name, call in calls.items():
                with pytest.raises(ValueError, match=f"{name}: a column index is outside"):
                    call(col)
    # spmm_t at batch 40 reads W's values in place through t_perm (one panel of W^T's rows, 100 long here): a bad
    # entry anywhere in a row is caught the same way
    vt, st, _, _ = _problem(100, 60, 40, 1.0, torch.float32, "cpu", 6)
    for pos in (0, 9, 99, 150):
        perm = st.t_perm.clone()
        perm[pos] = 10_000
        with pytest.raises(ValueError, match="t_perm entry of the transposed structure is out of range"):
            pysparse.ops.spmm_t(st.rowptr, st.col, vt, torch.randn(100, 40), 60,
                                transposed=(st.t_rowptr, st.t_col, perm))


@pytest.mark.parametrize("cols", [100, 40000])  # int16 / int32 indices
def test_row_checks_catch_a_bad_index_in_rows_of_every_short_length(cols):
    # The per-row check reads a row in vector steps (16 int16 / 8 int32), its remainder as a step overlapping the
    # one before, and a row shorter than a step but of half a step or more as its first and last half steps: a bad
    # index at the first, a middle or the last position of a row of any length from 1 to 40 must raise, in the
    # sweeps that check per row (batch 1: no panel; batch 4: the narrow panel; batch 16: one 16-column panel).
    gen = torch.Generator().manual_seed(7)
    for length in range(1, 41):
        col = torch.randperm(cols, generator=gen)[:length].sort().values
        other = torch.arange(5) * 3  # a second row, good
        rowptr = torch.tensor([0, length, length + 5], dtype=torch.int32)
        col = torch.cat([col, other]).to(torch.int16 if cols == 100 else torch.int32)
        values = torch.randn(length + 5, generator=gen)
        for batch in (1, 4, 16):
            xt, gyt = torch.randn(cols, batch, generator=gen), torch.randn(2, batch, generator=gen)
            calls = {"spmm": lambda c: pysparse.ops.spmm(rowptr, c, values, xt),
                     "spmm_grad": lambda c: pysparse.ops.spmm_grad(rowptr, c, values, gyt, xt),
                     "sddmm": lambda c: pysparse.ops.sddmm(rowptr, c, gyt, xt)}
            dense = torch.zeros(2, cols).index_put_((torch.repeat_interleave(torch.arange(2), rowptr.diff()),
                                                     col.long()), values)
            torch.testing.assert_close(calls["spmm"](col), dense @ xt, rtol=1e-4, atol=1e-4)
            for pos in sorted({0, length // 2, length - 1}):
                for bad in (cols, -1):
                    c = col.clone()
                    c[pos] = bad
                    for name, call in calls.items():
                        with pytest.raises(ValueError, match=f"{name}: a column index is outside"):
                            call(c)


def test_tampered_structure_raises_not_crashes():
    values, s, xt, _ = _problem(6, 8, 4, 0.6, torch.float32, "cpu", 2)
    bad_col = s.col.clone()
    bad_col[0] = 500
    with pytest.raises(ValueError, match="column index is outside"):
        pysparse.ops.spmm(s.rowptr, bad_col, values, xt)
    with pytest.raises(ValueError, match="column index is outside"):  # several panels: checked before the sweep
        pysparse.ops.spmm(s.rowptr, bad_col, values, torch.randn(8, 200))
    bad_row = s.t_col.clone()
    bad_row[0] = 6
    with pytest.raises(ValueError, match="row index or t_perm entry of the transposed structure is out of range"):
        pysparse.ops.spmm_t(s.rowptr, s.col, values, torch.randn(6, 200), 8,
                            transposed=(s.t_rowptr, bad_row, s.t_perm))
    bad_col[0] = -3
    with pytest.raises(ValueError, match="column index is outside"):
        pysparse.ops.sddmm(s.rowptr, bad_col, torch.randn(6, 4), xt)
    # batch 1 with long rows: the vectorised (gather) matrix-vector path checks its indices too
    v1, s1, x1, _ = _problem(3, 100, 1, 1.0, torch.float32, "cpu", 2)
    for bad in (100, -1, 32767):
        col1 = s1.col.clone()
        col1[40] = bad
        with pytest.raises(ValueError, match="column index is outside"):
            pysparse.ops.spmm(s1.rowptr, col1, v1, x1)
    # the same with int32 indices (more than 32768 columns): right results, and every bad index caught
    v2, s2, x2, b2 = _problem(3, 40000, 1, 0.01, torch.float32, "cpu", 3)
    assert s2.col.dtype == torch.int32 and int((s2.rowptr[1:] - s2.rowptr[:-1]).min()) >= 32
    rows2 = torch.repeat_interleave(torch.arange(3), s2.rowptr.diff())
    dense = torch.zeros(3, 40000).index_put_((rows2, s2.col.long()), v2)
    torch.testing.assert_close(pysparse.ops.spmm(s2.rowptr, s2.col, v2, x2, bias=b2), dense @ x2 + b2[:, None])
    for bad in (40000, -1, 2**31 - 1, -2**31):
        col2 = s2.col.clone()
        col2[20] = bad
        with pytest.raises(ValueError, match="column index is outside"):
            pysparse.ops.spmm(s2.rowptr, col2, v2, x2)
    bad_ptr = s.rowptr.clone()
    bad_ptr[2] = bad_ptr[3] + 1
    with pytest.raises(ValueError, match="non-decreasing"):
        pysparse.ops.spmm(bad_ptr, s.col, values, xt)
    bad_ptr = s.rowptr.clone()
    bad_ptr[-1] += 5
    with pytest.raises(ValueError, match="end at nnz"):
        torch.ops.pysparse.spmm.default(bad_ptr, s.col, values, xt, None, None, None, None)
    with pytest.raises(ValueError, match="column index is outside"):
        pysparse.ops.spmm_t(s.rowptr, bad_col, values, torch.randn(6, 4), 8)
    bad_perm = s.t_perm.clone()
    bad_perm[0] = 10_000
    for batch in (40, 200):  # one panel: read in place; several: gathered into order first
        with pytest.raises(ValueError, match="t_perm entry of the transposed structure is out of range"):
            torch.ops.pysparse.spmm_t.default(s.rowptr, s.col, values, torch.randn(6, batch), 8, s.t_rowptr, s.t_col,
                                              bad_perm)
    # spmm_grad, both sweeps and one to several panels: out-of-range entries are neither read nor written through
    # (the CPU sweeps W^T's structure only above batch 32)
    for batch in (4, 33, 65, 200):
        gyt, x = torch.randn(6, batch), torch.randn(8, batch)
        with pytest.raises(ValueError, match="column index is outside"):
            torch.ops.pysparse.spmm_grad.default(s.rowptr, bad_col, values, gyt, x, None, None, None)
        if batch <= 32:
            continue
        for perm in (bad_perm, bad_perm.neg()):
            with pytest.raises(ValueError, match="t_perm entry of the transposed structure is out of range"):
                torch.ops.pysparse.spmm_grad.default(s.rowptr, s.col, values, gyt, x, s.t_rowptr, s.t_col, perm)
        bad_row = s.t_col.clone()
        bad_row[1] = 6
        with pytest.raises(ValueError, match="row index or t_perm entry"):
            torch.ops.pysparse.spmm_grad.default(s.rowptr, s.col, values, gyt, x, s.t_rowptr, bad_row, s.t_perm)


@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_structure_with_int32_row_indices(threads):
    """More than 32768 rows: W^T's row indices are int32; blocked by 256 rows (157 blocks, most columns stored in
    many of them) spmm_grad and spmm_t above batch 32 match the reference, and the plain structure's products
    bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        values, s, xt, _ = _problem(40_000, 6, 40, 0.3, torch.float32, "cpu", 7, row_block=256)
        assert s.t_col.dtype == torch.int32 and s.row_blocks == 157
        plain = csr.structure(csr.keep_mask(s.rowptr, s.col, (40_000, 6)))
        gyt = torch.randn(40_000, 40, generator=torch.Generator().manual_seed(8))
        want = reference.spmm_grad(s.rowptr, s.col, values, gyt, xt, bias=True)
        got = pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt, transposed=s.transposed(), bias=True)
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-4)
        assert torch.equal(got[0], pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt,
                                                          transposed=plain.transposed())[0])
        torch.testing.assert_close(pysparse.ops.spmm_t(s.rowptr, s.col, values, gyt, 6, transposed=s.transposed()),
                                   want[1], rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_tampered_blocked_structure_raises_not_crashes():
    """W^T blocked by W's rows: bad row indices, permutation entries and block pointers are refused by spmm_t and
    spmm_grad (every batch that takes the blocks, float32 and float64), never read through. (~12 values a column:
    with 16 or more, spmm_grad would keep W's CSR up to batch 64, and W^T's entries would not be read.)"""
    values, s, _, _ = _problem(40, 30, 4, 0.3, torch.float32, "cpu", 5, row_block=8)
    assert s.row_blocks == 5 and s.t_rowptr.numel() == 5 * 30 + 1
    bad_row, bad_perm, bad_ptr = s.t_col.clone(), s.t_perm.clone(), s.t_rowptr.clone()
    bad_row[3], bad_perm[7] = 40, -1
    bad_ptr[40] = bad_ptr[41] + 1
    for batch, dtype in [(33, torch.float32), (64, torch.float32), (200, torch.bfloat16), (70, torch.float64)]:
        v, gyt, x = values.to(dtype), torch.randn(40, batch, dtype=dtype), torch.randn(30, batch, dtype=dtype)
        for t, match in [((s.t_rowptr, bad_row, s.t_perm), "row index or t_perm entry"),
                         ((s.t_rowptr, s.t_col, bad_perm), "row index or t_perm entry"),
                         ((bad_ptr, s.t_col, s.t_perm), "non-decreasing")]:
            if dtype == torch.float64 and match != "non-decreasing":
                continue  # float64 scatters from W's CSR: W^T's entries are not read
            with pytest.raises(ValueError, match=match):
                torch.ops.pysparse.spmm_grad.default(s.rowptr, s.col, v, gyt, x, *t)
            with pytest.raises(ValueError, match=match):
                torch.ops.pysparse.spmm_t.default(s.rowptr, s.col, v, gyt, 30, *t)


@pytest.mark.parametrize("call, exc, match", [
    (lambda v, s, x: pysparse.ops.spmm(s.rowptr.long(), s.col, v, x), TypeError, "rowptr must be int32"),
    (lambda v, s, x: pysparse.ops.spmm_t(s.rowptr, s.col, v, torch.randn(6, 40), 8,
                                         transposed=(s.t_rowptr[:-2], s.t_col, s.t_perm)), ValueError,
     "t_rowptr has 6 rows but W has 8 columns"),
    (lambda v, s, x: torch.ops.pysparse.spmm_grad.default(s.rowptr, s.col, v, torch.randn(6, 40), torch.randn(8, 40),
                                                          torch.cat([s.t_rowptr, s.t_rowptr[-1:]]), s.t_col, s.t_perm),
     ValueError, "t_rowptr has 9 rows but W has 8 columns"),
    (lambda v, s, x: pysparse.ops.sparse_conv2d(s.rowptr, s.col, v, torch.randn(1, 2, 5, 5), kernel_size=2,
                                                transposed=csr.structure(csr.keep_mask(s.rowptr, s.col, (6, 8)),
                                                                         2).transposed()),
     ValueError, "blocked by W's rows is taken only by spmm, spmm_t and spmm_grad"),
    (lambda v, s, x: torch.ops.pysparse.sparse_conv2d_grad_input.default(
        s.rowptr, s.col, v, torch.randn(1, 6, 4, 4), [1, 2, 5, 5], [2, 2], [1, 1], [1, 1], [0, 0],
        *csr.structure(csr.keep_mask(s.rowptr, s.col, (6, 8)), 2).transposed()),
     ValueError, "blocked by W's rows is taken only by the CPU's spmm_t and spmm_grad"),
    (lambda v, s, x: pysparse.ops.spmm(s.rowptr, s.col.long(), v, x), TypeError, "col must be int16 or int32"),
    (lambda v, s, x: pysparse.ops.spmm(s.rowptr, s.col, v[:-1], x), ValueError, "one entry per column index"),
    (lambda v, s, x: pysparse.ops.spmm(s.rowptr, s.col, v, x.double()), TypeError, "xt has dtype"),
    (lambda v, s, x: pysparse.ops.spmm(s.rowptr, s.col, v, x[0]), ValueError, "xt must be 2-D"),
    (lambda v, s, x: pysparse.ops.spmm(s.rowptr, s.col, v, x, bias=torch.randn(2)), ValueError, "bias must have"),
    (lambda v, s, x: pysparse.ops.spmm(s.rowptr, s.col, v, x, transposed=(s.t_rowptr, None, None)), ValueError,
     "give all of"),
    (lambda v, s, x: pysparse.ops.spmm(s.rowptr, s.col, v.int(), x.int()), TypeError, "values must be float"),
    (lambda v, s, x: pysparse.ops.sddmm(s.rowptr, s.col, torch.randn(5, 4), x), ValueError, "a has 5 rows"),
    (lambda v, s, x: pysparse.ops.spmm_t(s.rowptr, s.col, v, torch.randn(5, 4), 8), ValueError, "with 6 rows"),
    (lambda v, s, x: pysparse.ops.spmm_t(s.rowptr, s.col, v, torch.randn(6, 4), -1), ValueError, "n_cols must be"),
    (lambda v, s, x: pysparse.ops.spmm_t(s.rowptr, s.col, v, torch.randn(6, 4), 8.0), TypeError, "n_cols must be"),
    (lambda v, s, x: pysparse.ops.sddmm(s.rowptr, s.col, torch.randn(6, 3), x), ValueError, "same number of columns"),
    (lambda v, s, x: pysparse.ops.spmm_grad(s.rowptr, s.col, v, torch.randn(6, 3), x), ValueError,
     r"gyt must be \[6, 4\]"),
    (lambda v, s, x: pysparse.ops.spmm_grad(s.rowptr, s.col, v, torch.randn(6, 4).double(), x), TypeError,
     "gyt must have values' dtype"),
    (lambda v, s, x: pysparse.ops.spmm_grad(s.rowptr, s.col, v, torch.randn(6, 4), x[0]), ValueError, "xt must be 2-D"),
    (lambda v, s, x: pysparse.ops.spmm_grad(s.rowptr, s.col, v, torch.randn(6, 4), x, bias=1), TypeError,
     "bias must be a bool"),
    (lambda v, s, x: torch.ops.pysparse.spmm_grad.default(s.rowptr, s.col, v, torch.randn(5, 4), x, None, None, None),
     ValueError, r"gyt must be \[6, 4\]"),
])
def test_bad_input(call, exc, match):
    values, s, xt, _ = _problem(6, 8, 4, 0.6, torch.float32, "cpu", 2)
    with pytest.raises(exc, match=match):
        call(values, s, xt)


def test_release_scratch():
    """The CPU kernels' per-thread scratch (packed batches, accumulators) is released on request, and the kernels
    allocate it again on their next call."""
    values, s, xt, bias = _problem(300, 200, 100, 0.2, torch.float32, "cpu", 5)
    want = reference.spmm(s.rowptr, s.col, values, xt, bias=bias)
    pysparse.ops.spmm(s.rowptr, s.col, values, xt, bias=bias)
    assert pysparse.ops.release_scratch() >= 200 * 100 * 4  # at least the packed batch
    assert pysparse.ops.release_scratch() == 0
    torch.testing.assert_close(pysparse.ops.spmm(s.rowptr, s.col, values, xt, bias=bias), want, rtol=1e-5, atol=1e-5)
    gyt = torch.randn(300, 100)
    for got, w in zip(pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt, transposed=s.transposed()),
                      reference.spmm_grad(s.rowptr, s.col, values, gyt, xt)):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    assert pysparse.ops.release_scratch() > 0


def test_row_indices_and_bad_rowptr():
    """csr.row_indices: the row of every stored position (what keep_mask and the layers' dense path use)."""
    values, s, _, _ = _problem(7, 5, 1, 0.5, torch.float32, "cpu", 3, empty_rows=True)
    want = torch.repeat_interleave(torch.arange(7), s.rowptr.diff().long())
    assert torch.equal(csr.row_indices(s.rowptr, values.numel()), want)
    with pytest.raises(ValueError, match="rowptr must be a non-empty 1-D int32"):
        csr.row_indices(s.rowptr.float(), values.numel())



@pytest.mark.parametrize("device", DEVICES[1:])  # CUDA alone: the CPU kernels refuse bad indices (tests above)
@pytest.mark.parametrize("index_dtype", [torch.int16, torch.int32])
def test_cuda_kernels_skip_bad_indices(device, index_dtype):
    """Rows in any column order, and negative or out-of-range column indices anywhere in a row, window edges among
    them (CUDA checks nothing on the host, so as not to sync: such entries are skipped, never read): spmm is the
    product over the in-range entries, sddmm 0 at the out-of-range ones."""
    gen = torch.Generator().manual_seed(3)
    rows, cols, batch = 70, 300, 256
    lengths = torch.randint(0, 120, (rows,), generator=gen)
    lengths[:4] = torch.tensor([0, 31, 32, 33])
    rowptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)
    col = torch.cat([torch.randperm(cols, generator=gen)[:n] for n in lengths.tolist()])  # unsorted rows
    for j in torch.randint(0, len(col), (40,), generator=gen).tolist():
        col[j] = [-1, cols, cols + 7, 32767, -32768][j % 5]
    col[int(rowptr[2]) + 31] = cols
    col[int(rowptr[3]) + 32] = -1
    values = torch.randn(len(col), generator=gen)
    xt = torch.randn(cols, batch, generator=gen)
    ok = (col >= 0) & (col < cols)
    r = torch.repeat_interleave(torch.arange(rows), lengths)
    want = torch.zeros(rows, cols).index_put_((r[ok], col[ok].long()), values[ok], accumulate=True) @ xt
    rowptr, col_d, xt_d = rowptr.to(device), col.to(device, index_dtype), xt.to(device)
    got = pysparse.ops.spmm(rowptr, col_d, values.to(device), xt_d)
    torch.cuda.synchronize()  # an illegal address raises here
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)
    a = torch.randn(rows, batch, generator=gen)
    want = torch.where(ok, (a[r] * xt[col.clamp(0, cols - 1)]).sum(1), torch.zeros(()))
    got = pysparse.ops.sddmm(rowptr, col_d, a.to(device), xt_d)
    torch.cuda.synchronize()
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES[1:])  # CUDA alone: its spmm_grad is one kernel over W^T
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("batch, layout", [(1, "contiguous"), (5, "contiguous"), (16, "contiguous"),
                                           (33, "sliced"), (64, "contiguous"), (128, "transposed"),
                                           (256, "contiguous"), (260, "contiguous"), (512, "contiguous"),
                                           (600, "contiguous"), (100, "offset"), (200, "offset")])
@pytest.mark.parametrize("index_dtype", [None, torch.int32])
def test_cuda_spmm_grad_is_sddmm_and_spmm_t(device, dtype, batch, layout, index_dtype):
    """CUDA's spmm_grad gathers each gyt row once for both gradients (a warp per column of W), where the batch fits
    a lane's registers (up to 4 vectors a lane: 512 float32 columns, 256 float64, 1024 float16; a batch that is not
    a multiple of 16 bytes, or operands off that alignment, one element a vector, up to 128), else calls sddmm and
    spmm_t. Either way the same products in the same order as sddmm's and spmm_t's kernels: the same bits, with
    empty rows and columns of W, both index types and every lane layout (batch 5, and "offset" operands one element
    off their 16-byte alignment: one element a vector; 260: a lane's last vector out of the batch)."""

    def laid_out(t):
        if layout != "offset":
            return _strided(t, layout)
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view

    values, s, xt, _ = _problem(70, 90, batch, 0.3, dtype, device, batch, empty_rows=True)
    t_rowptr, t_col, t_perm = s.transposed()
    col = s.col
    if index_dtype is not None:
        t_col, col = t_col.to(index_dtype), col.to(index_dtype)
    xt[7] = 0  # column 7 of W meets a zero row of xt: its values gradients are zeros
    gen = torch.Generator().manual_seed(batch + 1)
    gyt = laid_out(torch.randn(70, batch, generator=gen).to(device, dtype))
    x = laid_out(xt)
    dvalues, dxt, dbias = pysparse.ops.spmm_grad(s.rowptr, col, values, gyt, x, transposed=(t_rowptr, t_col, t_perm),
                                                 bias=True)
    assert torch.equal(dvalues, pysparse.ops.sddmm(s.rowptr, col, gyt, x))
    assert torch.equal(dxt, pysparse.ops.spmm_t(s.rowptr, col, values, gyt, 90, transposed=(t_rowptr, t_col, t_perm)))
    # xt's layout where xt is batch-major ("transposed": the layers' x.t(), then one more transpose), else contiguous
    assert (dxt.stride() == (1, 90)) if layout == "transposed" else dxt.is_contiguous()
    torch.testing.assert_close(dbias, gyt.sum(1), **TOL[dtype])
    want_values, want_x = reference.spmm_grad(s.rowptr, s.col, values, gyt, x)
    torch.testing.assert_close(dvalues, want_values, **TOL[dtype])
    torch.testing.assert_close(dxt, want_x, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES[1:])  # CUDA alone: the CPU kernels refuse a tampered structure
@pytest.mark.parametrize("batch", [16, 256, 600])
def test_cuda_spmm_grad_skips_bad_transposed_entries(device, batch):
    """W^T's row indices (t_col) outside [0, rows) and t_perm entries outside [0, nnz) are skipped, never read or
    written (CUDA checks nothing on the host, so as not to sync): the input gradient sums the positions with an
    in-range row index, a bad t_perm entry giving its value 0; the values gradient is the dot product at the
    positions both entries name, 0 elsewhere. Both the one-kernel route (16, 256) and the two kernels (600)."""
    rows, cols = 60, 80
    values, s, xt, _ = _problem(rows, cols, batch, 0.3, torch.float32, "cpu", 5)
    t_rowptr, t_col, t_perm = (t.clone() for t in s.transposed())
    gen = torch.Generator().manual_seed(batch)
    bad_rows = torch.randperm(len(t_col), generator=gen)[:30]
    t_col[bad_rows] = torch.tensor([-1, rows, rows + 9, 32767, -32768], dtype=t_col.dtype).repeat(6)
    bad_perm = torch.randperm(len(t_perm), generator=gen)[:20]
    t_perm[bad_perm] = torch.tensor([-1, len(values), 2**31 - 1, -(2**31)], dtype=torch.int32).repeat(5)
    gyt = torch.randn(rows, batch, generator=gen)
    c = torch.repeat_interleave(torch.arange(cols), t_rowptr.diff().long())  # W's column of each W^T position
    ok_row = (t_col >= 0) & (t_col < rows)
    ok_perm = (t_perm >= 0) & (t_perm < len(values))
    i = t_col.long().clamp(0, rows - 1)
    v = torch.where(ok_perm, values[t_perm.long().clamp(0, len(values) - 1)], torch.zeros(()))
    want_x = torch.zeros(cols, batch).index_add_(0, c[ok_row], v[ok_row, None] * gyt[i[ok_row]])
    both = ok_row & ok_perm
    want_values = torch.zeros(len(values))
    want_values[t_perm[both].long()] = (gyt[i[both]] * xt[c[both]]).sum(1)
    got = pysparse.ops.spmm_grad(*(t.to(device) for t in (s.rowptr, s.col, values, gyt, xt)),
                                 transposed=tuple(t.to(device) for t in (t_rowptr, t_col, t_perm)))
    torch.cuda.synchronize()  # an illegal address raises here
    if batch <= 512:  # the one kernel: what is described above
        torch.testing.assert_close(got[0].cpu(), want_values, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1].cpu(), want_x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES[1:])  # CUDA alone: the CPU kernels do without W's transposed structure
def test_cuda_backward_ops_need_the_transposed_structure(device):
    """spmm_t and spmm_grad on CUDA run over W^T's structure: called without it, a ValueError that names the op
    and what it needs, not a crash."""
    values, s, xt, _ = _problem(12, 20, 8, 0.3, torch.float32, device, 2)
    gyt = torch.randn(12, 8, device=device)
    with pytest.raises(ValueError, match=r"spmm_grad: the CUDA kernel needs W's transposed structure"):
        pysparse.ops.spmm_grad(s.rowptr, s.col, values, gyt, xt)
    with pytest.raises(ValueError, match=r"spmm_t: the CUDA kernel needs W's transposed structure"):
        pysparse.ops.spmm_t(s.rowptr, s.col, values, gyt, 20)


@pytest.mark.parametrize("device", DEVICES[1:])  # CUDA alone: the CPU kernels pack any strides themselves
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 31, 33, 256, 300])
@pytest.mark.parametrize("source", ["transposed", "wide", "offset"])
def test_cuda_kernels_copy_transposed_views_exactly(device, dtype, batch, source):
    """The CUDA kernels take their dense operands batch-contiguous, [features, batch]; given the transposed view of
    a row-major [batch, features] tensor (what the layers pass: their input x.t(), their output gradient) they copy
    it by a tiled transpose (csrc/cuda/spmm.cu, batch_contiguous), whose tiles' edges fall inside these shapes
    (features 45 and 70, batches that are not multiples of 32). A copy moves bits: every op gives exactly what it
    gives on the contiguous operands, whether the view's source is its own tensor ("transposed"), the first
    columns of a wider one ("wide": a leading dimension past the features) or starts one element into its storage
    ("offset")."""

    def view(t):  # t [features, batch] -> the same values as the [features, batch] view of a [batch, features] one
        if source == "transposed":
            return t.t().contiguous().t()
        if source == "wide":
            wide = torch.zeros(t.shape[1], t.shape[0] + 5, dtype=t.dtype, device=t.device)
            wide[:, :t.shape[0]] = t.t()
            return wide[:, :t.shape[0]].t()
        flat = torch.zeros(t.numel() + 1, dtype=t.dtype, device=t.device)
        flat[1:].view(t.shape[1], t.shape[0]).copy_(t.t())
        return flat[1:].view(t.shape[1], t.shape[0]).t()

    values, s, xt, bias = _problem(45, 70, batch, 0.3, dtype, device, batch, empty_rows=True)
    transposed = s.transposed()
    gen = torch.Generator().manual_seed(batch)
    gyt = torch.randn(45, batch, generator=gen).to(device, dtype)
    xv, gv = view(xt), view(gyt)
    assert xv.stride(0) == 1 and (batch == 1 or not xv.is_contiguous()) and torch.equal(xv, xt)
    ops = pysparse.ops
    assert torch.equal(ops.spmm(s.rowptr, s.col, values, xv, bias=bias),
                       ops.spmm(s.rowptr, s.col, values, xt, bias=bias))
    assert torch.equal(ops.spmm_t(s.rowptr, s.col, values, gv, 70, transposed=transposed),
                       ops.spmm_t(s.rowptr, s.col, values, gyt, 70, transposed=transposed))
    assert torch.equal(ops.sddmm(s.rowptr, s.col, gv, xv), ops.sddmm(s.rowptr, s.col, gyt, xt))
    for got, want in zip(ops.spmm_grad(s.rowptr, s.col, values, gv, xv, transposed=transposed, bias=True),
                         ops.spmm_grad(s.rowptr, s.col, values, gyt, xt, transposed=transposed, bias=True)):
        assert torch.equal(got, want)
    assert torch.equal(xv, xt) and torch.equal(gv, gyt)  # the operands themselves untouched
