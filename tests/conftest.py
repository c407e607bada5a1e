import pytest
import torch

from pysparse import SparseConv2d, SparseLinear

# Device and dtype lists and tensor builders live in pysparse.testing (shared with benchmarks/).
torch.manual_seed(0)

# The dense references compute in float32: by default cuDNN's convolutions round their inputs to TF32 on Ampere
# and later GPUs (~1e-3 relative; three conv tests failed by that on an H200 on 2026-11-29), above the
# tolerances the kernels are held to. cuBLAS matmuls the same, should a user's default have turned it on.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

# The sparse layers compute with a dense copy of their weight below a crossover sparsity (dense_below). The
# tests of the layers themselves check the sparse kernels at every sparsity, so there the switch is off (the
# dense path has its own tests, tests/test_dense_path.py); the end-to-end tests (GAN, pipeline, retraining,
# pruning) run with the defaults, as users do.
_SPARSE_KERNELS_ONLY = {"test_sparse_linear", "test_sparse_conv", "test_sparse_training", "test_convert_io",
                        "test_torch_integration", "test_distributed", "test_attention"}


@pytest.fixture(autouse=True)
def _sparse_kernels_only(request, monkeypatch):
    if request.module.__name__.rpartition(".")[2] in _SPARSE_KERNELS_ONLY:
        for layer in (SparseLinear, SparseConv2d):
            monkeypatch.setattr(layer, "DENSE_BELOW", 0.0)
            monkeypatch.setattr(layer, "DENSE_BELOW_CUDA", 0.0)
