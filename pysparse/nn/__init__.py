"""Drop-in sparse layers: they store only the kept weights and compute only with them."""
from .attention import SparseMultiheadAttention
from .conv import SparseConv2d
from .linear import SparseLinear, SparseLinearWeight
from .spectral_norm import spectral_norm
from ._weight_tensor import DenseWeightTensor

__all__ = ["SparseLinear", "SparseLinearWeight", "SparseConv2d", "SparseMultiheadAttention", "spectral_norm",
           "DenseWeightTensor"]
