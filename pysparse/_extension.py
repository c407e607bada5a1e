"""Loads pysparse._C, the compiled kernels, and tells which backends were built."""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "pysparse's compiled kernels (pysparse._C) are missing or failed to load: build them with "
        "`pip install --no-build-isolation -e .` (or `make build`) in the pysparse checkout. "
        f"Original error: {exc}"
    ) from exc


_OPS = ("saliency", "sparsity_masks", "threshold_masks", "nm_masks", "apply_mask_", "spmm", "spmm_t", "sddmm",
        "spmm_grad", "sparse_conv2d", "sparse_conv2d_grad_input", "sparse_conv2d_grad_values", "csr_to_dense",
        "csr_gather")
# Which (op, device type) pairs have a compiled kernel; fixed once the library is loaded, and a plain
# constant for torch.compile.
_KERNELS = frozenset(
    (op, device)
    for op in _OPS
    for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
    if torch._C._dispatch_has_kernel_for_dispatch_key(f"pysparse::{op}", key)
)


def has_kernel(op: str, device_type: str) -> bool:
    """True when pysparse::<op> has a compiled kernel for device_type ("cpu" or "cuda")."""
    return (op, device_type) in _KERNELS


def cuda_built() -> bool:
    """True when pysparse was built with its CUDA kernels."""
    return has_kernel("saliency", "cuda")


def cuda_usable() -> bool:
    """True when the CUDA kernels were built and a CUDA device is visible."""
    return cuda_built() and torch.cuda.is_available()
