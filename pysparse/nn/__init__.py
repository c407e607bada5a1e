"""Drop-in sparse layers: they store only the kept weights and compute only with them."""
from .linear import SparseLinear

__all__ = ["SparseLinear"]
