"""Storage shared by the sparse layers: a weight kept as CSR values and structure, viewed as 2-D
[out, in_per_row]; the values are the trainable Parameter, the structure lives in plain tensor attributes."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import csr, ops
from .._extension import has_kernel
from ..ops import _below_autograd, _check_fraction
from ._weight_tensor import DenseWeightTensor

# The structure is held in plain tensor attributes, not buffers: DistributedDataParallel broadcasts every
# buffer, and neither gloo nor NCCL carries int16 (nor should the structure be re-sent every step: ranks agree
# on their masks by construction). _apply moves them with the module; rowptr and col go into the state dict,
# the transposed cache is rebuilt from them on load.
_STRUCTURE = ("rowptr", "col", "t_rowptr", "t_col", "t_perm")
_SAVED = ("rowptr", "col")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# What torch.autocast casts to its lower precision (it leaves float64 alone), on the device types the kernels run on.
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)
# One call tells whether autocast is on for any device type (0.2 us, where x.device.type alone takes 1 us).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def cast_to(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """``t`` in ``dtype`` (differentiably), or ``t`` itself when either is None: the layers' operands under autocast."""
    return t if dtype is None or t is None else t.to(dtype)


def reaches_sparsity(removed: int, total: int, fraction: float) -> bool:
    """Whether removing ``removed`` of ``total`` weights removes ``fraction`` of them, to the weight: a layer
    pruned to ``round`` or ``int(fraction * total)`` weights counts as ``fraction`` sparse, although 1 - kept /
    total falls a hair short of it whenever fraction * total is not whole (ResNet-18's 3 x 3 convolutions pruned
    to 90% measure 0.899997 and would stay dense below a 0.9 crossover)."""
    return removed >= math.floor(fraction * total + 1e-6)


def random_mask(shape, sparsity: float, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A keep-mask of `shape` with exactly round((1 - sparsity) * numel) True entries, uniformly placed."""
    numel = math.prod(shape)
    keep = round((1.0 - _check_fraction(sparsity, "sparsity")) * numel)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:keep]] = True
    return mask.reshape(shape).to(device)


def check_mask(mask, weight: torch.Tensor, name: str = "mask") -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = keep), got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but the weight has shape {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{name} is on {mask.device} but the weight is on {weight.device}")
    return mask


def refuse_meta(weight: torch.Tensor, what: str) -> None:
    """A sparse layer cannot be built from a weight on the meta device (constructors, from_dense, sparsify)."""
    if weight.device.type == "meta":
        raise ValueError(f"{what} cannot be built on the meta device: which weights are kept is data. Build it on "
                         "a real device (then .to('meta') / to_empty() and load_state_dict work), or build the "
                         "dense model on meta and sparsify it once its weights are loaded")


def initial_mask(layer: str, weight: torch.Tensor, sparsity, mask) -> torch.Tensor:
    """The constructors' rule: exactly one of sparsity= (a uniformly random mask) or mask=."""
    if mask is None and sparsity is None:
        raise ValueError(f"{layer} needs sparsity= (a random mask) or mask= (True = keep)")
    if mask is not None and sparsity is not None:
        raise ValueError(f"give {layer} either sparsity= or mask=, not both")
    if mask is None:
        return random_mask(weight.shape, _check_fraction(sparsity, "sparsity"), device=weight.device)
    return mask


class SparseWeight(nn.Module):
    """Base of the sparse layers. The weight (first dim: outputs) is stored as a CSR matrix [rows, cols];
    ``_to_matrix`` / ``_from_matrix`` map between the weight's shape and that matrix (a reshape by default;
    a grouped convolution overrides them with a block-diagonal embedding). Subclasses call
    ``_store(weight, mask)`` and read ``values`` and the structure tensors (rowptr, col, t_rowptr, ...)."""

    weight_shape: tuple[int, ...]
    # Below this sparsity the forward computes with a dense copy of the weight (the layer type's defaults on the
    # CPU and on CUDA; see `dense_below`).
    DENSE_BELOW: float = 0.0
    DENSE_BELOW_CUDA: float = 0.0
    # On the CPU the default switch also needs a batch of at least this many rows (see _computes_dense).
    DENSE_MIN_BATCH: int = 0
    # Spectral norm's power iterations per training forward; 0 = off until enable_spectral_norm. A class default,
    # so that every forward's check is a plain read (a missing attribute goes through nn.Module.__getattr__ and
    # an AttributeError). The per-call paths read ``values`` from _parameters for the same reason (~1.4 us a read
    # through __getattr__ on the 2-vCPU machines; assigning ``values`` anything but a Parameter raises anyway).
    sn_iterations: int = 0
    # Whether the layer keeps W^T blocked by W's rows while on the CPU (csr.cpu_row_block): the linear layers,
    # whose CPU spmm_t / spmm_grad take it; the convolutions' kernels (and every CUDA kernel) take one block.
    BLOCKED_TRANSPOSE: bool = False

    @property
    def dense_below(self) -> float:
        """Below this sparsity the layer computes with a dense copy of its weight, built from the stored values at
        each forward (differentiable in them: their gradient is the dense one at the stored places), through
        torch's dense kernels: there the sparse kernels are slower. The default is the layer type's measured
        crossover on the device its values are on (``DENSE_BELOW`` on the CPU, where a layer type may also ask
        for a batch of at least ``DENSE_MIN_BATCH`` rows, ``DENSE_BELOW_CUDA`` on CUDA; benchmarks/RESULTS.md).
        Storage stays sparse. Set it on a layer to move the switch on every device and batch; 0 always uses the
        sparse kernels."""
        if "_dense_below" in self.__dict__:
            return self.__dict__["_dense_below"]
        cls = type(self)
        return cls.DENSE_BELOW_CUDA if self._parameters["values"].is_cuda else cls.DENSE_BELOW

    @dense_below.setter
    def dense_below(self, value: float) -> None:
        self.__dict__["_dense_below"] = _check_fraction(value, "dense_below", upper_inclusive=True)

    def _layer_input(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.dtype]]:
        """What both layers' forwards do first with their input. Under ``torch.autocast`` on x's device (CPU or
        CUDA), a float32 / float16 / bfloat16 layer computes as nn.Linear and nn.Conv2d do there, in autocast's
        dtype: returns x cast to it and that dtype, to which the forward casts its values and bias too
        (``cast_to``: differentiable, so the stored values get their gradient in their own dtype). Otherwise x
        itself and None, and x must have the layer's dtype. Refuses torch.jit.trace, whose own check would
        otherwise fail with "Graphs differed across invocations"."""
        values, cast = self._parameters["values"], None
        if torch.jit.is_tracing():
            raise RuntimeError(f"{type(self).__name__} does not support torch.jit.trace (deprecated in torch): use "
                               f"torch.export or torch.compile")
        if _any_autocast() and (x.is_cpu or x.is_cuda) and values.dtype in _AUTOCAST_CASTS:
            dev = "cuda" if x.is_cuda else "cpu"
            if torch.is_autocast_enabled(dev):
                cast = torch.get_autocast_dtype(dev)
                if x.dtype in _AUTOCAST_CASTS:
                    x = x.to(cast)
        if x.dtype != (cast or values.dtype):
            raise TypeError(f"input dtype {x.dtype} differs from the layer's {cast or values.dtype}"
                            + (" (autocast's)" if cast else ""))
        return x, cast

    def _computes_dense(self, batch: Optional[int] = None) -> bool:
        """Whether this forward takes the dense path: below dense_below; with the default switch on the CPU also
        only for ``batch`` (rows of the input) >= DENSE_MIN_BATCH, below which building the weight costs more
        than the dense kernels save. A dense_below set on the layer is obeyed at every batch."""
        total = math.prod(self.weight_shape)
        if reaches_sparsity(total - self.nnz, total, self.dense_below) if total else self.dense_below == 0:
            return False
        return not self._default_cpu_switch() or batch is None or batch >= type(self).DENSE_MIN_BATCH

    def _default_cpu_switch(self) -> bool:
        """Whether the layer's route follows the measured CPU defaults: no dense_below set on it, values not on
        CUDA (the layer types' own rules then also apply: a minimum batch, SparseConv2d's few-channel layers)."""
        return "_dense_below" not in self.__dict__ and not self._parameters["values"].is_cuda

    def _compute_weight(self) -> torch.Tensor:
        """The dense weight of the dense path: the effective values (spectral norm included) in place."""
        return self._dense_from(self.effective_values())

    def _weight_is_matrix(self) -> bool:
        """Whether the weight is its CSR matrix reshaped (not a grouped convolution's block-diagonal one)."""
        return True

    def _dense_from(self, vals: torch.Tensor) -> torch.Tensor:
        """``vals`` (one per stored weight) written into a zero weight of the layer's shape; differentiable in
        them. The csr_to_dense kernel where the weight is its matrix (its gradient: csr_gather of the weight's);
        else, or on a device without pysparse kernels, torch's scatter to the stored values' flat positions (the
        dense path once used that for every layer: ~50 ms for a 4096 x 4096 weight at 20% on 2 cores, against
        ~10 for the kernel; benchmarks/RESULTS.md)."""
        if self._weight_is_matrix() and has_kernel("csr_to_dense", vals.device.type):
            return ops.layer_csr_to_dense(self.rowptr, self.col, vals, self.matrix_shape[1]).view(self.weight_shape)
        flat = self._flat_positions()
        return vals.new_zeros(math.prod(self.weight_shape)).scatter(0, flat, vals).view(self.weight_shape)

    def _values_from(self, dense: torch.Tensor) -> torch.Tensor:
        """The stored positions of a dense tensor of the weight's shape, one per stored weight (the inverse of
        :meth:`_dense_from`, and its gradient)."""
        if self._weight_is_matrix() and has_kernel("csr_gather", dense.device.type):
            return ops._call("csr_gather", self.rowptr, self.col, dense.reshape(self.matrix_shape))
        flat = self._flat_positions()
        return dense.reshape(-1)[flat]

    def _flat_positions(self) -> torch.Tensor:
        """The stored weights' flat positions in the dense weight (int64)."""
        return self._weight_positions(csr.row_indices(self.rowptr, self.nnz, self.col.device), self.col.long())

    def _weight_positions(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """Flat positions in the weight tensor of the matrix entries (row, col) (the inverse of _to_matrix's
        layout; a reshape by default)."""
        return row * self.matrix_shape[1] + col

    def _to_matrix(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], math.prod(t.shape[1:]))  # (not -1: 0 rows is a shape too)

    def _from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m.reshape(self.weight_shape)

    def _row_block(self, device: torch.device, nnz: int) -> Optional[int]:
        """csr.structure's row_block for this layer's matrix on ``device`` with ``nnz`` stored values."""
        if not self.BLOCKED_TRANSPOSE or device.type != "cpu":
            return None
        rows, cols = self.matrix_shape
        return csr.cpu_row_block(rows, cols, nnz)

    def _retranspose(self) -> None:
        """Rebuilds the transposed cache when its blocks are not what the layer's device takes (after a move
        between the CPU and CUDA); rowptr and col stay."""
        device = self.col.device
        row_block = self._row_block(device, self.nnz)
        rows = self.matrix_shape[0]
        want = 1 if row_block is None else math.ceil(rows / row_block)
        if want == self.structure.row_blocks:
            return
        s = csr.structure(csr.keep_mask(self.rowptr, self.col, self.matrix_shape), row_block)
        for name in ("t_rowptr", "t_col", "t_perm"):
            object.__setattr__(self, name, getattr(s, name))

    def _store(self, weight: torch.Tensor, mask: torch.Tensor) -> None:
        if weight.dtype not in _FLOATS:
            raise TypeError(f"weight must be float32, float16, bfloat16 or float64, got {weight.dtype}")
        refuse_meta(weight, type(self).__name__)
        check_mask(mask, weight)
        self.weight_shape = tuple(weight.shape)
        w2, m2 = self._to_matrix(weight.detach()), self._to_matrix(mask)
        self.matrix_shape = tuple(m2.shape)
        values, s = csr.compress(w2, m2, self._row_block(m2.device, int(m2.sum())))
        self.values = nn.Parameter(values.clone(), requires_grad=weight.requires_grad)
        self._set_structure(s)

    def _set_structure(self, s: csr.Structure) -> None:
        for name in _STRUCTURE:
            object.__setattr__(self, name, getattr(s, name))
        self.__dict__.pop("_structure_unset", None)

    def _apply(self, fn, recurse=True):
        before = self.col.device
        super()._apply(fn, recurse)
        for name in _STRUCTURE:  # integer tensors: device moves apply, dtype casts leave them as they are
            object.__setattr__(self, name, fn(getattr(self, name)))
        after = self.col.device
        # between the CPU and CUDA the transposed cache's blocks change (not from or to meta: no data there, and
        # to_empty's structure is garbage until a state dict is loaded, which rebuilds it)
        if before.type != after.type and "meta" not in (before.type, after.type):
            self._retranspose()
        if before.type == "meta" and after.type != "meta":  # (to_empty: uninitialised until a state dict loads)
            self.__dict__["_structure_unset"] = True
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in _SAVED:
            destination[prefix + name] = getattr(self, name)

    @property
    def structure(self) -> csr.Structure:
        return csr.Structure(*(getattr(self, n) for n in _STRUCTURE), shape=self.matrix_shape)

    @property
    def nnz(self) -> int:
        """The number of stored (kept) weights."""
        return self._parameters["values"].numel()

    @property
    def sparsity(self) -> float:
        """The fraction of the dense weight that is not stored."""
        total = math.prod(self.weight_shape)
        return 1.0 - self.nnz / total if total else 0.0

    def _matrix_mask(self) -> torch.Tensor:
        return csr.keep_mask(self.rowptr, self.col, self.matrix_shape)

    def mask(self) -> torch.Tensor:
        """The keep-mask, as a dense bool tensor of the weight's shape."""
        return self._from_matrix(self._matrix_mask())

    def dense_weight(self) -> torch.Tensor:
        """The weight as a dense tensor (zeros where pruned); differentiable in ``values``."""
        return self._dense_from(self.values)

    # What ``weight`` returns (SparseLinear's also routes F.linear to its kernels).
    WEIGHT_TENSOR = DenseWeightTensor

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (zeros where pruned), differentiable in the stored values. A
        :class:`DenseWeightTensor`: its shape, dtype, device and the like cost nothing; it is built from the values
        when first read. Writes into it in place (``nn.init.*_(layer.weight)``; under ``torch.no_grad()`` where the
        values require grad, as for an nn.Parameter: ``layer.weight.copy_(w)``, ``layer.weight[i] = v``;
        ``layer.weight.data.normal_()``) set the stored values at the kept places; the mask stays.
        ``layer.weight.grad`` is the values' gradient at the kept places (a dense copy; None before a backward). Under
        torch.compile / export, torch.func's transforms and tracing it is the plain dense tensor, built at once
        (a copy there)."""
        values = self._parameters["values"]
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or type(values) not in (torch.Tensor, nn.Parameter) \
                or torch._C._functorch.is_functorch_wrapped_tensor(values):
            return self.dense_weight()
        return self.WEIGHT_TENSOR(self, values)

    @weight.setter
    def weight(self, value) -> None:  # (an nn.Parameter goes to register_parameter, as in any nn.Module)
        raise TypeError(f"cannot assign {type(value).__name__} as {type(self).__name__}.weight: assign an "
                        "nn.Parameter of the weight's shape (its entries at the kept places become the stored "
                        "values), or write into layer.weight in place under torch.no_grad()")

    def reset_parameters(self) -> None:
        """Re-initialises the stored values and the bias as ``nn.Linear`` / ``nn.Conv2d.reset_parameters`` do
        (uniform in +-1/sqrt(fan_in), fan_in of the dense weight: in_features, or in_channels / groups * kh * kw);
        the structure stays. Draws nnz values, not the dense size: the same distribution at the kept places."""
        fan_in = math.prod(self.weight_shape[1:])
        if fan_in == 0:
            return
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            self._parameters["values"].uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    # ---- spectral normalisation (pysparse.nn.spectral_norm turns it on) ----
    def enable_spectral_norm(self, n_power_iterations: int = 1, eps: float = 1e-12) -> None:
        """Divide the weight by its largest singular value (of the [out, in * kh * kw] matrix, as
        ``torch.nn.utils.parametrizations.spectral_norm``), estimated by power iteration through the sparse
        kernels: one ``spmm_t`` and one ``spmm`` per iteration, in training mode only. The pruned weights stay
        pruned (they are not stored)."""
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be an int >= 1, got {n_power_iterations!r}")
        if not (isinstance(eps, float) and eps > 0):
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        rows, cols = self.matrix_shape
        dev, dt = self.values.device, self.values.dtype
        if not hasattr(self, "sn_u"):
            g = torch.Generator().manual_seed(0)  # like torch: a fixed random start, normalised
            u = torch.randn(rows, generator=g).to(device=dev, dtype=dt)
            v = torch.randn(cols, generator=g).to(device=dev, dtype=dt)
            self.register_buffer("sn_u", u / u.norm().clamp_min(eps))
            self.register_buffer("sn_v", v / v.norm().clamp_min(eps))
        self.sn_iterations, self.sn_eps = n_power_iterations, eps
        if self.nnz:
            with torch.no_grad():  # converge once at the start, as torch does (15 iterations)
                self._power_iteration(15)

    def _power_iteration(self, n: int) -> None:
        s, eps = self.structure, self.sn_eps
        u, v = self.sn_u, self.sn_v
        vals = self.values.detach()
        for _ in range(n):
            v = torch.ops.pysparse.spmm_t.default(s.rowptr, s.col, vals, u[:, None].contiguous(), s.shape[1],
                                                  s.t_rowptr, s.t_col, s.t_perm)[:, 0]
            v = v / v.norm().clamp_min(eps)
            with _below_autograd():  # (under no_grad: torch.library's wrapper of spmm's autograd, skipped)
                u = torch.ops.pysparse.spmm.default(s.rowptr, s.col, vals, v[:, None].contiguous(), None,
                                                    s.t_rowptr, s.t_col, s.t_perm)[:, 0]
            u = u / u.norm().clamp_min(eps)
        self.sn_u.copy_(u)
        self.sn_v.copy_(v)

    @property
    def spectral_norm(self) -> bool:
        return self.sn_iterations > 0

    def sigma(self) -> torch.Tensor:
        """The current spectral-norm estimate u^T W v (differentiable in ``values``); needs spectral norm on."""
        # u^T W v = sum over stored (r, c) of values * u[r] * v[c]; sddmm gives u[r] * v[c] at the stored places.
        uv = torch.ops.pysparse.sddmm.default(self.rowptr, self.col, self.sn_u[:, None].contiguous(),
                                              self.sn_v[:, None].contiguous())
        return (self.values * uv).sum()

    def effective_values(self) -> torch.Tensor:
        """The stored values the forward uses: ``values``, divided by sigma when spectral norm is on."""
        values = self._parameters["values"]
        if self.sn_iterations <= 0 or not values.numel():
            return values
        if self.training:
            with torch.no_grad():
                self._power_iteration(self.sn_iterations)
        return self.values / self.sigma().clamp_min(self.sn_eps)

    # ---- removing stored weights in place (gradual pruning while training) ----
    def prune_values_(self, keep: torch.Tensor, optimizers=()) -> int:
        """Stop storing the weights where ``keep`` (bool, one per stored value) is False. ``values`` becomes a
        new Parameter holding the kept entries (with their gradient); each optimizer in ``optimizers`` is
        pointed at it, its state tensors of the old shape (momentum, Adam's moments) cut the same way.
        Returns the new nnz. (A DistributedDataParallel wrapper must be rebuilt after.)"""
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != self.values.shape:
            raise ValueError(f"keep must be a bool tensor of shape {tuple(self.values.shape)} (one per stored "
                             f"value), got {getattr(keep, 'dtype', type(keep))} {tuple(getattr(keep, 'shape', ()))}")
        keep = keep.to(self.values.device)
        matrix = self._matrix_mask()
        matrix[matrix.clone()] = keep  # stored values are in row-major order of the mask
        old = self.values
        new = nn.Parameter(old.detach()[keep].clone(), requires_grad=old.requires_grad)
        if old.grad is not None:
            new.grad = old.grad[keep].clone()
        for opt in optimizers:
            for group in opt.param_groups:
                group["params"] = [new if q is old else q for q in group["params"]]
            if old in opt.state:
                state = opt.state.pop(old)
                opt.state[new] = {k: t[keep].clone() if isinstance(t, torch.Tensor) and t.shape == old.shape else t
                                  for k, t in state.items()}
        self.values = new
        self._set_structure(csr.structure(matrix, self._row_block(matrix.device, int(matrix.sum()))))
        return self.nnz

    def _copy_bias(self, bias) -> None:
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def _fill_dense(self, module: nn.Module) -> nn.Module:
        """Copies the dense weight (divided by sigma under spectral norm, as the forward uses it) and the bias
        into a dense twin built by a subclass's to_dense."""
        with torch.no_grad():
            w = self.dense_weight()
            module.weight.copy_(w / self.sigma().clamp_min(self.sn_eps) if self.spectral_norm and self.nnz else w)
            if self.bias is not None:
                module.bias.copy_(self.bias)
        return module

    def set_mask(self, mask: torch.Tensor) -> None:
        """Changes which weights are stored: kept ones keep their values, newly kept ones start at 0. Rebuilds
        the structure (and the transposed cache). Optimizer state for ``values`` must be rebuilt after."""
        with torch.no_grad():
            self._store(self.dense_weight().detach().requires_grad_(self.values.requires_grad), mask)

    def register_parameter(self, name: str, param: Optional[nn.Parameter]) -> None:
        # ``layer.weight = nn.Parameter(w)`` comes here (nn.Module.__setattr__ registers a Parameter under any
        # name, past the ``weight`` property): the stored values become w's entries at the kept places, as torch's
        # fuse_conv_bn_eval / fuse_linear_bn_eval set a folded weight.
        if name == "weight" and isinstance(param, nn.Parameter):
            self._assign_weight(param)
            return
        # torch.nn.utils.prune moves ``weight`` to ``weight_orig`` through this call (and would fail with "cannot
        # assign 'torch.FloatTensor' object to parameter 'weight_orig'"): say why and what to do instead.
        if isinstance(param, DenseWeightTensor):
            raise TypeError(f"{type(self).__name__}'s weight is built from its stored values, not an nn.Parameter: "
                            f"torch.nn.utils.prune cannot re-parametrise it (registering it as {name!r}). Change "
                            "which weights are stored with layer.set_mask(mask), or pysparse.densify the model, "
                            "prune it, then pysparse.sparsify it again")
        super().register_parameter(name, param)

    def _assign_weight(self, w: nn.Parameter) -> None:
        """``layer.weight = w``: a new ``values`` Parameter holding w's entries at the kept places (w's dtype and
        requires_grad, as assigning an nn.Linear's weight replaces its Parameter); the structure stays."""
        if tuple(w.shape) != self.weight_shape:
            raise ValueError(f"weight: assigned a tensor of shape {tuple(w.shape)}, the dense weight of this "
                             f"{type(self).__name__} has shape {self.weight_shape}")
        if w.dtype not in _FLOATS:
            raise TypeError(f"weight: assigned a {w.dtype} tensor; the stored values must be float32, float16, "
                            "bfloat16 or float64")
        if w.device != self.col.device:
            raise ValueError(f"weight: assigned a tensor on {w.device}, the layer's structure is on {self.col.device}")
        self._take_values_of(w, w.requires_grad)

    def _take_values_of(self, w: torch.Tensor, requires_grad: bool) -> None:
        """``values`` becomes a new Parameter holding the dense ``w``'s entries at the kept places, in w's dtype."""
        with torch.no_grad():
            values = self._values_from(w.detach()).clone()
        self.values = nn.Parameter(values, requires_grad=requires_grad)

    def _load_dense_weight(self, state_dict, prefix, local_metadata, error_msgs) -> bool:
        """A dense state dict's ``weight`` (an nn.Linear's / nn.Conv2d's, no ``values``): its entries at the
        stored places become the values, as ``layer.weight.copy_(w)`` sets them (the mask stays; entries at
        pruned places are dropped). Returns whether the state dict holds such a weight."""
        key = prefix + "weight"
        if key not in state_dict or prefix + "values" in state_dict:
            return False
        w = state_dict[key]
        if not isinstance(w, torch.Tensor):
            error_msgs.append(f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like '
                              f"object from checkpoint but received {type(w)}")
        elif tuple(w.shape) != self.weight_shape:
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)} from checkpoint, "
                              f"the dense weight of this {type(self).__name__} has shape {self.weight_shape}.")
        elif self.col.device.type == "meta" or "_structure_unset" in self.__dict__:
            error_msgs.append(f"{key}: a {type(self).__name__} on the meta device (or moved off it by to_empty) has "
                              "no structure to take a dense weight's kept entries from: load its own state dict "
                              "(values, rowptr, col) instead")
        elif not w.is_floating_point():
            error_msgs.append(f"{key}: a dense weight must be floating point, got {w.dtype}")
        else:
            old = self._parameters["values"]
            if local_metadata.get("assign_to_params_buffers", False):
                self._take_values_of(w.to(old.device), old.requires_grad)
            else:
                with torch.no_grad():
                    old.copy_(self._values_from(w.to(device=old.device, dtype=old.dtype)))
        return True

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A dense layer's state dict (``weight``, no ``values``): load the kept entries, the structure stays.
        if self._load_dense_weight(state_dict, prefix, local_metadata, error_msgs):
            # the bias (and any other entries) as nn.Module loads them; values, rowptr and col are not expected
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            for name in ("weight", "values"):
                for keys in (missing_keys, unexpected_keys):
                    if prefix + name in keys:
                        keys.remove(prefix + name)
            return
        # A stored layer has the saved nnz, not this module's: take the saved values' shape, load, then rebuild
        # the structure (and its transposed cache) from the saved rowptr / col, which also checks them: a
        # tampered structure raises, never reaches a kernel.
        key = prefix + "values"
        if (key in state_dict and isinstance(state_dict[key], torch.Tensor)
                and state_dict[key].shape != self.values.shape):
            incoming = state_dict[key]
            self.values = nn.Parameter(torch.empty(incoming.shape, dtype=self.values.dtype, device=self.values.device),
                                       requires_grad=self.values.requires_grad)
        n_errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        saved = {}
        for name in _SAVED:
            if prefix + name in unexpected_keys:
                unexpected_keys.remove(prefix + name)
            if prefix + name in state_dict:
                saved[name] = state_dict[prefix + name]
            elif strict:
                missing_keys.append(prefix + name)
        if len(error_msgs) > n_errors or len(saved) < len(_SAVED) or prefix + "values" in missing_keys:
            return
        try:
            device = self.values.device
            rowptr, col = (saved[n].to(device) if isinstance(saved[n], torch.Tensor) else saved[n] for n in _SAVED)
            if not isinstance(col, torch.Tensor) or self.values.numel() != col.numel():
                raise ValueError(f"{self.values.numel()} values for {getattr(col, 'numel', lambda: '?')()} column "
                                 "indices")
            self._set_structure(csr.from_compressed(rowptr, col, self.matrix_shape,
                                                    self._row_block(device, col.numel())))
        except ValueError as exc:
            error_msgs.append(f"{prefix or type(self).__name__}: invalid sparse structure: {exc}")
