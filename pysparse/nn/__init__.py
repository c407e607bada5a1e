"""Drop-in sparse layers: they store only the kept weights and compute only with them."""
from .conv import SparseConv2d
from .linear import SparseLinear

__all__ = ["SparseLinear", "SparseConv2d"]
