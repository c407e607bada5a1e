"""SparseLinear: a drop-in nn.Linear that stores and computes only its kept weights."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._sparse_weight import SparseWeight, cast_to, initial_mask
from ._fx import traced_call
from ._weight_tensor import SparseLinearWeight


class SparseLinear(SparseWeight):
    """``y = x @ W.T + b`` with W stored in CSR: memory and time grow with the kept weights, not the dense size.

    Give ``sparsity`` (a uniformly random mask with exactly that fraction removed) or ``mask`` (bool,
    [out_features, in_features], True = keep). The kept values are the Parameter ``values``; any torch
    optimizer trains them. Use :meth:`from_dense` to convert a trained ``nn.Linear``.

    Below ``dense_below`` sparsity (default: the measured crossover, ``DENSE_BELOW`` = 0.25 on the CPU with
    inputs of at least ``DENSE_MIN_BATCH`` = 33 rows, ``DENSE_BELOW_CUDA`` = 0.93 on CUDA) the forward computes
    with a dense copy of the weight built from the stored values (see ``SparseWeight.dense_below``).

    On the sparse kernels' path the output is a transposed view of the kernel's [out_features, batch] result: a
    following SparseLinear reads it without a copy, and dense layers accept it as it is.
    """

    # fwd + bwd over nn.Linear at 0 / 30% sparsity (2026-11-29, 2-core CPU): 128 -> 2048 batch 64 0.52x / 1.11x,
    # 4096 x 4096 batch 256 0.48x / 1.10x, 300 -> 100 batch 64 0.88x / 0.99x; forward alone 0.68-1.17x / 0.75-1.55x.
    DENSE_BELOW = 0.25
    # ... and with batches of more than 32 rows: up to 32 the sparse kernels were faster than the dense path (its
    # weight built by csr_to_dense) at every shape and sparsity measured, 0-30%, training step and forward; above
    # 32, where their backward turns to W^T's structure, the dense path leads at batches 40-48 at 0-20% on all but
    # the smallest layer, at 64 at 0% (within ~15% either way at 10-30%), at 256 below ~25% (Zen 4, 2026-12-01,
    # step over nn.Linear, kernels / dense path: 1024 x 1024 at 0%, batch 32 0.73 / 0.55, batch 40 0.26 / 0.56;
    # at batch 16, 128 -> 2048 to 4096^2, 0.78-1.7x against 0.44-0.84x; benchmarks/RESULTS.md).
    DENSE_MIN_BATCH = 33
    # Over nn.Linear (cuBLAS, float32) on an H200, 4096 x 4096 (2026-11-29, benchmarks/RESULTS.md): the training
    # step at batch 256 0.75x at 90% and 1.42x at 95% (crossing ~0.93); the forward alone breaks even at ~0.86
    # (batch 256) and ~0.6 (batch 16); batch-16 training steps are bound by host overhead on both sides.
    DENSE_BELOW_CUDA = 0.93
    # On the CPU, W^T blocked by W's rows for the backward (csr.cpu_row_block; benchmarks/RESULTS.md).
    BLOCKED_TRANSPOSE = True
    # What ``weight`` returns: F.linear on it runs this layer's kernels (see SparseLinearWeight).
    WEIGHT_TENSOR = SparseLinearWeight

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, sparsity: Optional[float] = None,
                 mask: Optional[torch.Tensor] = None, device=None, dtype=None) -> None:
        super().__init__()
        ops._check_int(in_features, "in_features")
        ops._check_int(out_features, "out_features")
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.in_features, self.out_features = in_features, out_features
        self._store(dense.weight, initial_mask("SparseLinear", dense.weight, sparsity, mask))
        self.bias = dense.bias

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[torch.Tensor] = None) -> "SparseLinear":
        """A SparseLinear holding ``linear``'s weights where ``mask`` is True (None: where the weight is non-zero)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        SparseWeight.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._store(linear.weight, linear.weight.detach() != 0 if mask is None else mask)
        self._copy_bias(linear.bias)
        return self

    def to_dense(self) -> nn.Linear:
        """An nn.Linear with the same function (pruned weights are zeros)."""
        return self._fill_dense(nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                                          device=self.values.device, dtype=self.values.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return traced_call(self, (x,))
        return self._linear(x, self.bias)

    def _linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """``x @ W.T + bias`` by this layer's kernels (``bias``: the layer's own, or another of its shape)."""
        if x.shape[-1:] != (self.in_features,):
            raise ValueError(f"SparseLinear expects inputs with {self.in_features} features in the last dim, "
                             f"got shape {tuple(x.shape)}")
        x, cast = self._layer_input(x)  # cast: autocast's dtype, or None (x has the layer's dtype)
        # below the crossover: torch's dense kernels (see dense_below and _computes_dense)
        if self._computes_dense(x.numel() // self.in_features if self.in_features else 0):
            return F.linear(x, cast_to(self._compute_weight(), cast), cast_to(bias, cast))
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)  # a view for contiguous inputs
        # The layer built (or, on load, checked) its own structure, and the kernel checks its arguments again:
        # the op is called directly, without the wrapper's Python checks (~10 us a call on small layers).
        ops._check_input_kernel("spmm", x)
        y = ops.layer_linear(self.rowptr, self.col, cast_to(self.effective_values(), cast), x2,
                             cast_to(bias, cast), self.t_rowptr, self.t_col,
                             self.t_perm)  # the kernel packs the batch through the transposed view's strides
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, sparsity={self.sparsity:.4f}")
