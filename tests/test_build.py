"""The build is what it claims to be."""
import os

import torch

import pysparse


def test_cpu_kernels_registered():
    for op in ("saliency", "sparsity_masks", "threshold_masks", "nm_masks", "apply_mask_"):
        assert pysparse._extension.has_kernel(op, "cpu"), op
        assert hasattr(torch.ops.pysparse, op)


def test_forced_cuda_build_has_cuda_kernels():
    """Under FORCE_CUDA=1 (as in CI) the CUDA kernels must really be compiled and linked in, GPU or not."""
    if os.environ.get("FORCE_CUDA") == "1":
        for op in ("saliency", "sparsity_masks", "threshold_masks", "nm_masks", "apply_mask_"):
            assert pysparse._extension.has_kernel(op, "cuda"), op
    assert pysparse.cuda_usable() == (pysparse.cuda_built() and torch.cuda.is_available())


def test_cuda_tensor_without_cuda_kernels_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(pysparse._extension, "_KERNELS", frozenset({("saliency", "cpu")}))
    import pytest
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        pysparse.ops._check_kernel("saliency", torch.device("cuda"), "weight")


def test_cuda_built_but_op_without_cuda_kernel_says_so(monkeypatch):
    monkeypatch.setattr(pysparse._extension, "_KERNELS", frozenset({("saliency", "cuda"), ("spmm", "cpu")}))
    import pytest
    with pytest.raises(NotImplementedError, match="spmm has no CUDA kernel yet"):
        pysparse.ops._check_kernel("spmm", torch.device("cuda"), "values")
