"""Shared by the benchmarks: glibc's heap held steady (_util.steady_malloc), torch.compile's caches reset per
test."""
import pytest
import torch

from _util import steady_malloc

steady_malloc()


@pytest.fixture(autouse=True)
def _quiet_compile():
    torch._dynamo.reset()
    yield
