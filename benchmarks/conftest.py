"""Shared by the benchmarks: glibc's heap held steady (below), torch.compile's caches reset per test."""
import ctypes
import os
import sys

import pytest
import torch


def _steady_malloc() -> None:
    """Time kernels, not glibc's history. PyTorch's CPU tensors come from malloc, and whether a call's multi-MB
    buffers fault their pages in again depends on what the process freed before: glibc raises its mmap threshold
    when it frees a mapped block and trims the heap's top past a threshold. Measured 2026-11-29 (ResNet-18
    layer1 shape, batch 8): nn.Conv2d's training step took 20.3 ms in a fresh process (6240 page faults a step)
    and 13.8 ms after another layer's frees had raised the threshold (none). The benchmarks fix both thresholds
    (mmap 32 MB, glibc's most; trim 256 MB) so that no side pays for faults below 32 MB: the dense baselines
    at their best. pysparse's kernels take their outputs from their own cache (csrc/cpu/out_cache.h) either way.
    PYSPARSE_BENCH_MALLOC=default leaves glibc as it is."""
    if os.environ.get("PYSPARSE_BENCH_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


_steady_malloc()


@pytest.fixture(autouse=True)
def _quiet_compile():
    torch._dynamo.reset()
    yield
