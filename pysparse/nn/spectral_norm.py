"""Spectral normalisation that works on sparse layers.

``torch.nn.utils.parametrizations.spectral_norm`` parametrises a dense ``weight``; a sparse layer has no dense
weight Parameter (its Parameter is the 1-D ``values``), and in torch spectral_norm and ``torch.nn.utils.prune``
fail together on the same weight. Here the power iteration runs through the sparse kernels themselves
(``spmm_t`` then ``spmm``) on the stored matrix, and sigma = u^T W v is taken at the stored entries only, so
a pruned, spectrally normalised layer trains with its pruned weights absent.
"""
from __future__ import annotations

from torch import nn

from ._sparse_weight import SparseWeight


def spectral_norm(module: nn.Module, n_power_iterations: int = 1, eps: float = 1e-12) -> nn.Module:
    """Spectrally normalise ``module``'s weight and return ``module``. Sparse layers (SparseLinear,
    SparseConv2d) normalise through the sparse kernels; nn.Linear / nn.Conv2d / nn.Embedding (any module with
    a ``weight`` Parameter) use torch's parametrisation."""
    if isinstance(module, SparseWeight):
        module.enable_spectral_norm(n_power_iterations, eps)
        return module
    if isinstance(getattr(module, "weight", None), nn.Parameter):
        return nn.utils.parametrizations.spectral_norm(module, n_power_iterations=n_power_iterations, eps=eps)
    raise TypeError(f"spectral_norm needs a sparse layer or a module with a weight Parameter, got "
                    f"{type(module).__name__}")
