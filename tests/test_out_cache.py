"""The CPU output cache (csrc/cpu/out_cache.h): the kernels' outputs of 256 KB and more take the blocks that
freed outputs left, up to a limit on the bytes held; the tensors stay ordinary CPU tensors."""
import io
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pysparse
from pysparse import csr, reference

ROWS = 512  # spmm's output [ROWS, batch] float32: 512 KB at batch 256, a multiple of the cache's 64 KB granule
LIMIT = 64 << 20


@pytest.fixture
def cache():
    previous = pysparse.ops.set_cpu_cache_limit(LIMIT)
    pysparse.ops.empty_cpu_cache()
    yield
    pysparse.ops.set_cpu_cache_limit(previous)
    pysparse.ops.empty_cpu_cache()


def _weights(rows=ROWS, cols=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    return csr.compress(w, torch.rand(rows, cols, generator=gen) < 0.3)


def _spmm(values, s, batch, seed=1):
    xt = torch.randn(s.shape[1], batch, generator=torch.Generator().manual_seed(seed))
    return pysparse.ops.spmm(s.rowptr, s.col, values, xt), reference.spmm(s.rowptr, s.col, values, xt)


def test_freed_output_block_serves_the_next_output(cache):
    values, s = _weights()
    y, _ = _spmm(values, s, 256)
    ptr, nbytes = y.data_ptr(), y.numel() * 4
    assert pysparse.ops.cpu_cache_bytes() == 0
    del y
    assert pysparse.ops.cpu_cache_bytes() == nbytes
    y, want = _spmm(values, s, 256, seed=2)  # other inputs: the reused block's old contents must not show
    assert y.data_ptr() == ptr and pysparse.ops.cpu_cache_bytes() == 0
    torch.testing.assert_close(y, want)


def test_small_outputs_bypass_and_blocks_serve_their_own_size(cache):
    values, s = _weights()
    y, _ = _spmm(values, s, 64)  # 128 KB: malloc's free lists serve it
    del y
    assert pysparse.ops.cpu_cache_bytes() == 0
    y, _ = _spmm(values, s, 256)
    ptr = y.data_ptr()
    del y
    y, want = _spmm(values, s, 384)  # 768 KB: a new block; the 512 KB one stays for its size
    assert y.data_ptr() != ptr and pysparse.ops.cpu_cache_bytes() == ROWS * 256 * 4
    torch.testing.assert_close(y, want)


def test_limit_eviction_and_empty(cache):
    values, s = _weights()
    ys = [_spmm(values, s, 256)[0] for _ in range(3)]
    nbytes = ys[0].numel() * 4
    assert pysparse.ops.set_cpu_cache_limit(2 * nbytes) == LIMIT
    del ys  # the third block to come back pushes the oldest out
    assert pysparse.ops.cpu_cache_bytes() == 2 * nbytes
    assert pysparse.ops.set_cpu_cache_limit(nbytes) == 2 * nbytes  # freed at once down to the new limit
    assert pysparse.ops.cpu_cache_bytes() == nbytes
    assert pysparse.ops.empty_cpu_cache() == nbytes
    assert pysparse.ops.empty_cpu_cache() == 0 and pysparse.ops.cpu_cache_bytes() == 0
    pysparse.ops.set_cpu_cache_limit(0)  # off: every output freed as it goes
    y, want = _spmm(values, s, 256)
    torch.testing.assert_close(y, want)
    del y
    assert pysparse.ops.cpu_cache_bytes() == 0


def test_outputs_are_ordinary_tensors(cache):
    values, s = _weights()
    y, want = _spmm(values, s, 256)
    buf = io.BytesIO()
    torch.save(y, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=True), want)
    y.resize_(2 * ROWS, 256)  # the storage grows through the same allocator, keeping its contents
    torch.testing.assert_close(y[:ROWS], want)
    torch.testing.assert_close(torch.from_numpy(y[:ROWS].numpy().copy()), want)
    y.share_memory_()
    torch.testing.assert_close(y[:ROWS], want)
    del y
    assert pysparse.ops.cpu_cache_bytes() <= LIMIT


def test_training_steps_through_reused_blocks(cache):
    """Layers' forward outputs and input gradients cycle through the cache step after step, each step's results
    equal to the dense layer's."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, ROWS)
    mask = torch.rand(ROWS, 256) < 0.2
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer = pysparse.SparseLinear.from_dense(dense, mask)
    conv_dense = torch.nn.Conv2d(16, 32, 3, padding=1)
    conv_mask = torch.rand_like(conv_dense.weight) < 0.3
    with torch.no_grad():
        conv_dense.weight.mul_(conv_mask)
    conv = pysparse.SparseConv2d.from_dense(conv_dense, conv_mask)
    for step in range(3):
        x = torch.randn(256, 256, requires_grad=True)
        g = torch.randn(256, ROWS)
        layer(x).backward(g)
        want = g @ dense.weight
        torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-4)
        xc = torch.randn(8, 16, 32, 32, requires_grad=True)  # output and input gradient 1 MB / 512 KB
        y = conv(xc)
        torch.testing.assert_close(y, F.conv2d(xc, conv_dense.weight, conv_dense.bias, padding=1), rtol=1e-4,
                                   atol=1e-4)
        gc = torch.randn_like(y)
        y.backward(gc)
        want = torch.nn.grad.conv2d_input(xc.shape, conv_dense.weight, gc, padding=1)
        torch.testing.assert_close(xc.grad, want, rtol=1e-4, atol=1e-4)
        del x, xc, y
        assert pysparse.ops.cpu_cache_bytes() > 0


def test_forked_child_allocates(cache):
    values, s = _weights()
    y, want = _spmm(values, s, 256)
    del y  # a block held across the fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            torch.set_num_threads(1)
            got, w = _spmm(values, s, 256)
            code = 0 if torch.allclose(got, w, rtol=1e-5, atol=1e-5) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_bad_limits():
    with pytest.raises(ValueError, match="nbytes"):
        pysparse.ops.set_cpu_cache_limit(-1)
    with pytest.raises(ValueError, match="nbytes"):
        pysparse.ops.set_cpu_cache_limit(1.5)
    with pytest.raises(RuntimeError, match="bytes must be >= 0"):
        torch.ops.pysparse.set_cpu_cache_limit.default(-5)


@pytest.mark.parametrize("value, ok", [("0", True), ("32", True), ("lots", False), ("-1", False)])
def test_environment_variable(value, ok):
    code = "import pysparse; print(pysparse.ops.set_cpu_cache_limit(0))"
    env = dict(os.environ, PYSPARSE_CPU_CACHE_MB=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if ok:
        assert out.returncode == 0, out.stderr
        assert int(out.stdout.strip()) == int(value) << 20
    else:
        assert out.returncode != 0 and "PYSPARSE_CPU_CACHE_MB must be a whole number" in out.stderr
