"""What a sparse layer's ``weight`` returns: its dense weight, built from the stored values only when something
reads the numbers. Code written for nn.Linear / nn.Conv2d reads ``layer.weight`` for its metadata all the time
(``x.to(self.fc.weight.dtype)``, nn.TransformerEncoderLayer's fast-path checks on every inference call): building
a dense copy for each of those costs more than the sparse layer's own forward (4096 x 4096 at 90%: ~2-4 ms against
~0.8 at batch 1). Shape, dtype, device and the other metadata come from the tensor itself; any other use builds
the dense weight once (differentiable in the values) and runs on it; ``F.linear`` on a SparseLinear's weight runs
that layer's sparse kernels instead. Writes into it in place (initialisers, ``copy_``, item assignment, through
``.data`` too) reach the stored values at the kept places, as writes into an nn.Linear's weight reach it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_map_only

_T = torch.Tensor
# Answered by the tensor's own metadata, without the dense weight.
_METADATA = frozenset((
    _T.shape.__get__, _T.dtype.__get__, _T.device.__get__, _T.requires_grad.__get__, _T.ndim.__get__,
    _T.layout.__get__, _T.is_cuda.__get__, _T.is_cpu.__get__, _T.is_sparse.__get__, _T.is_meta.__get__,
    _T.is_quantized.__get__, _T.is_nested.__get__, _T.is_mkldnn.__get__,
    _T.size, _T.dim, _T.numel, _T.nelement, _T.stride, _T.is_contiguous, _T.element_size, _T.is_floating_point,
    _T.is_complex, _T.get_device, _T.__len__, _T.__hash__,
    torch.numel, torch.is_floating_point, torch.is_complex, torch.is_tensor,
))


# In-place methods that change flags, not the numbers (the rest ending in one "_" write into their first argument,
# given by position, or as nn.init's ``tensor=`` / torch's ``input=``).
_NOT_WRITES = frozenset(("requires_grad_", "share_memory_", "detach_", "retain_grad_"))
_IN_PLACE_OPERATORS = frozenset(("__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                                 "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                                 "__irshift__", "__imatmul__"))


def _writes(func) -> bool:
    """Whether ``func`` writes into its first argument (Tensor.normal_, nn.init.uniform_, __setitem__, ...)."""
    name = getattr(func, "__name__", "")
    return name in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("_") and
                                           name not in _NOT_WRITES)


def _state(values: torch.Tensor) -> tuple:
    """What a dense weight built from ``values`` depends on besides their identity: an in-place change bumps the
    version, a move or cast changes the storage, dtype or device."""
    return values._version, values.data_ptr(), values.dtype, values.device


class DenseWeightTensor(torch.Tensor):
    """A sparse layer's dense weight (zeros where pruned), built from its stored values when first read: shape,
    dtype, device, ``requires_grad`` and the like need no dense copy; every other torch function or method builds
    it (differentiable in the values, as taken: under ``no_grad`` without gradient) and runs on it, giving plain
    tensors. It shows the values as they are when used, as ``nn.Linear.weight`` does: built once, and again only
    after they changed (an optimizer step); ``.clone()`` it to keep them as they are now.

    Writes into it in place (``normal_``, ``copy_``, ``nn.init`` functions, ``w[i] = v``, ``w *= 2``, ``out=w``,
    and through ``w.data``) set the layer's stored values to the result at the kept places; pruned places stay
    zero. Where the values require grad that needs ``torch.no_grad()``, as for an nn.Parameter (``nn.init``'s
    functions, which write under no_grad themselves, need none, as on an nn.Parameter). Writes through
    other views (``w[0].zero_()``, ``w.detach().zero_()``) reach only that copy. ``w.grad`` is the values'
    gradient at the kept places (zeros elsewhere; a copy), as ``nn.Linear.weight.grad`` reads after a backward."""

    _pysparse_layer = None
    _pysparse_dense: Optional[torch.Tensor] = None  # built from these values, in this _state:
    _pysparse_values: Optional[torch.Tensor] = None
    _pysparse_key: tuple = ()
    _pysparse_grad = False
    _pysparse_parent: Optional["DenseWeightTensor"] = None  # of a ``.data`` view: the weight it shares with

    @staticmethod
    def __new__(cls, layer, values: torch.Tensor, grad: Optional[bool] = None):
        if grad is None:
            grad = torch.is_grad_enabled() and values.requires_grad
        w = torch.Tensor._make_wrapper_subclass(cls, layer.weight_shape, dtype=values.dtype, device=values.device,
                                                requires_grad=grad)
        w._pysparse_layer, w._pysparse_grad = layer, grad
        return w

    def _dense(self) -> torch.Tensor:
        """The dense weight (a plain tensor): built from the layer's values, and again only after they changed."""
        if self._pysparse_parent is not None:
            return self._pysparse_parent._dense().detach()
        values = self._pysparse_layer._parameters["values"]
        key = _state(values)
        dense = self._pysparse_dense
        if dense is None or self._pysparse_values is not values or self._pysparse_key != key:
            with torch.set_grad_enabled(self._pysparse_grad):
                dense = self._pysparse_layer.dense_weight()
            with torch._C.DisableTorchFunctionSubclass():
                meta = (self.shape, self.dtype, self.device)
            if (dense.shape, dense.dtype, dense.device) != meta:
                raise RuntimeError(
                    f"this weight was taken from a layer that changed since (it was {tuple(meta[0])}, {meta[1]} on "
                    f"{meta[2]}; the layer's is now {tuple(dense.shape)}, {dense.dtype} on {dense.device}): read "
                    "layer.weight again")
            self._pysparse_dense, self._pysparse_values, self._pysparse_key = dense, values, key
        return dense

    def _root(self) -> "DenseWeightTensor":
        """The weight whose dense tensor this one shares (itself, or the one that ``.data`` was taken from)."""
        root = self
        while root._pysparse_parent is not None:
            root = root._pysparse_parent
        return root

    def _data(self) -> "DenseWeightTensor":
        """``.data``: the same numbers without gradient; writes into it reach the layer too."""
        layer = self._pysparse_layer
        view = type(self)(layer, layer._parameters["values"], grad=False)
        view._pysparse_parent = self
        return view

    def _grad(self, *new) -> Optional[torch.Tensor]:
        """``.grad``: the values' gradient as a dense tensor of the weight's shape (zeros where pruned; a copy, as
        the weight is one: writes into it do not reach the values' gradient), or None before any backward. Setting
        it sets the values' gradient to its entries at the kept places (None: to None)."""
        layer = self._pysparse_layer
        values = layer._parameters["values"]
        with torch.no_grad():
            if not new:
                return None if values.grad is None else layer._dense_from(values.grad)
            grad = new[0]
            if grad is not None:
                if not isinstance(grad, torch.Tensor) or tuple(grad.shape) != tuple(layer.weight_shape):
                    raise RuntimeError(f"a sparse layer's weight.grad must be a tensor of the weight's shape "
                                       f"{tuple(layer.weight_shape)}, got "
                                       f"{tuple(grad.shape) if isinstance(grad, torch.Tensor) else type(grad).__name__}")
                grad = layer._values_from(grad.to(device=values.device, dtype=values.dtype)).clone()
            values.grad = grad

    def _before_write(self, func) -> None:
        if torch.is_grad_enabled() and self._pysparse_grad:
            raise RuntimeError(
                f"{getattr(func, '__name__', func)} writes into a sparse layer's weight, whose values require grad: "
                "write under torch.no_grad(), as into an nn.Parameter (or into layer.weight.data)")

    def _after_write(self, func) -> None:
        """Sets the layer's stored values to the written weight's at the kept places, and zeroes the rest."""
        dense, layer = self._dense(), self._pysparse_layer
        if tuple(dense.shape) != tuple(layer.weight_shape):
            raise RuntimeError(f"{getattr(func, '__name__', func)} changed the shape of a sparse layer's weight "
                               f"to {tuple(dense.shape)}; it must stay {tuple(layer.weight_shape)}")
        with torch.no_grad():
            values = layer._parameters["values"]
            values.copy_(layer._values_from(dense.detach()))
            dense.copy_(layer._dense_from(values))
        root = self._root()  # its dense weight is the values' now
        root._pysparse_key = _state(values)

    def __repr__(self, *, tensor_contents=None) -> str:
        return repr(self._dense())  # printed as the dense tensor it is

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            # (a weight's dense tensor once built answers: requires_grad_ may have run on it)
            args = tuple(a._pysparse_dense if isinstance(a, DenseWeightTensor) and a._pysparse_dense is not None
                         else a for a in args)
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func == _DATA and isinstance(args[0], DenseWeightTensor):
            return args[0]._data()
        if func in (_GRAD, _SET_GRAD) and isinstance(args[0], DenseWeightTensor):
            return args[0]._grad(*args[1:])
        target = (args[0] if args else kwargs.get("tensor", kwargs.get("input"))) if _writes(func) else None
        written = [t for t in (target, kwargs.get("out")) if isinstance(t, DenseWeightTensor)]
        if getattr(func, "__module__", None) != "torch.nn.init":  # (those write under no_grad themselves)
            for t in written:
                t._before_write(func)
        unwrapped, kwargs = tree_map_only(DenseWeightTensor, DenseWeightTensor._dense, (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*unwrapped, **kwargs)
        for t in written:
            t._after_write(func)
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only from C++ paths that skip __torch_function__; the values are right, without gradient.
        args, kwargs = tree_map_only(DenseWeightTensor, lambda w: w._dense().detach(), (args, kwargs or {}))
        return func(*args, **kwargs)


_DATA = torch.Tensor.data.__get__
_GRAD, _SET_GRAD = torch.Tensor.grad.__get__, torch.Tensor.grad.__set__


class SparseLinearWeight(DenseWeightTensor):
    """What :attr:`SparseLinear.weight` returns: a :class:`DenseWeightTensor` (the dense weight, built only when
    its numbers are read), except that ``F.linear(x, weight, bias)`` runs the layer's sparse kernels (its crossover,
    autocast rules and gradients; ``bias`` any tensor of the layer's output size, or None) without building it. So
    a module that computes with its child's weight instead of calling the child (torchvision's Swin Transformer
    attention) gets the sparse layer's speed too. Inputs the layer would not take as they are (another feature
    size, dtype or device, a tensor subclass), and a weight taken under no_grad used where gradients are on (it
    must give the values none), go to torch's dense F.linear, with its results or errors."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear:
            with torch._C.DisableTorchFunctionSubclass():
                out = _sparse_linear(*args, **(kwargs or {}))
            if out is not None:
                return out
        return super().__torch_function__(func, types, args, kwargs)


def _sparse_linear(input, weight, bias=None) -> Optional[torch.Tensor]:
    """F.linear(input, weight, bias) by the sparse layer that ``weight`` came from; None if it does not apply."""
    layer = weight._pysparse_layer if type(weight) is SparseLinearWeight else None
    plain = (torch.Tensor, torch.nn.Parameter)
    if layer is None or type(input) not in plain or input.dim() == 0 or input.shape[-1] != layer.in_features:
        return None
    if input.device != weight.device or (input.dtype != weight.dtype and not torch.is_autocast_enabled(
            input.device.type)):
        return None
    if bias is not None and (type(bias) not in plain or bias.shape != (layer.out_features,) or
                             bias.dtype != weight.dtype or bias.device != weight.device):
        return None
    if torch.is_grad_enabled() and layer.values.requires_grad and not weight.requires_grad:
        return None  # a weight taken under no_grad gives the values no gradient (the kernels would)
    if (layer.values.dtype, layer.values.device) != (weight.dtype, weight.device):
        return None  # the layer moved since (the dense fallback names it)
    return layer._linear(input, bias).contiguous()  # F.linear's layout (the layer's own is transposed)
