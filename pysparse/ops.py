"""pysparse's fused kernels: checked wrappers over ``torch.ops.pysparse.*``.

Every op has a CPU and a CUDA kernel (``csrc/cpu``, ``csrc/cuda``), a fake kernel here so that
``torch.compile(fullgraph=True)`` traces it, and a plain-PyTorch twin in :mod:`pysparse.reference` that the
tests compare against. Arguments are checked here with clear Python exceptions; the C++ kernels check them
again so that a direct ``torch.ops.pysparse`` call can never crash the process.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Optional, Sequence

import torch
import torch.autograd.forward_ad as _forward_ad

from . import csr
from ._extension import cuda_built, has_kernel

__all__ = ["SALIENCY_METHODS", "saliency", "sparsity_masks", "threshold_masks", "nm_masks", "apply_mask_", "spmm",
           "spmm_t", "sddmm", "spmm_grad", "release_scratch", "empty_cpu_cache", "set_cpu_cache_limit",
           "cpu_cache_bytes", "sparse_conv2d", "sparse_conv2d_grad_input", "sparse_conv2d_grad_values", "csr_to_dense",
           "csr_gather"]

SALIENCY_METHODS = ("magnitude", "gradient", "taylor", "hessian")
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_MATMUL_FLOATS = _FLOATS + (torch.float64,)
_NEEDS = {"magnitude": None, "gradient": "grad", "taylor": "grad", "hessian": "hessian"}


# ---------------------------------------------------------------------------------------------------------
# Argument checks (shared by the wrappers and the fake kernels)
# ---------------------------------------------------------------------------------------------------------
def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_float(t, name: str) -> None:
    _check_tensor(t, name)
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def _check_kernel(op: str, device: torch.device, name: str) -> None:
    if device.type == "meta" or has_kernel(op, device.type):
        return
    if device.type == "cuda" and cuda_built():
        raise NotImplementedError(f"pysparse.{op}: {name} is on {device}, but {op} has no CUDA kernel yet")
    built = "without CUDA kernels (rebuild with FORCE_CUDA=1)" if device.type == "cuda" else "for this device"
    raise RuntimeError(f"pysparse.{op}: {name} is on {device}, but pysparse was built {built}")


def _check_input_kernel(op: str, x: torch.Tensor) -> None:
    """The layers' check that ``op`` has a kernel for their input's device (the CPU kernels are always built: no
    device object made on that path, ~1 us a call)."""
    if not x.is_cpu:
        _check_kernel(op, x.device, "input")


def _check_number(x, name: str, *, integer: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(x, bool) or not isinstance(x, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a real number'}, got {type(x).__name__}")


def _check_int(x, name: str, lo: int = 0, *, none_ok: bool = False):
    """An int >= ``lo`` (None passes through with ``none_ok``); ValueError otherwise."""
    if none_ok and x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, int) or x < lo:
        raise ValueError(f"{name} must be an int >= {lo}{' or None' if none_ok else ''}, got {x!r}")
    return x


def _check_positive(x, name: str) -> float:
    """A positive finite real number (learning rates, compensate's damp); ValueError naming ``name`` otherwise."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0 < x < math.inf:
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")
    return float(x)


def _check_fraction(x, name: str, *, upper_inclusive: bool = False) -> float:
    """A real number in [0, 1) (or [0, 1]): sparsities, densities."""
    _check_number(x, name)
    ok = 0.0 <= x <= 1.0 if upper_inclusive else 0.0 <= x < 1.0
    if not (math.isfinite(x) and ok):
        raise ValueError(f"{name} must be in [0, {'1]' if upper_inclusive else '1)'}, got {x}")
    return float(x)


def _check_saliency(weight, method, grad, hessian) -> Optional[str]:
    _check_float(weight, "weight")
    if method not in _NEEDS:
        raise ValueError(f"method must be one of {', '.join(map(repr, SALIENCY_METHODS))}, got {method!r}")
    needed = _NEEDS[method]
    if needed is not None:
        other = grad if needed == "grad" else hessian
        if other is None:
            raise ValueError(f"saliency method {method!r} needs {needed}=")
        _check_float(other, needed)
        if other.shape != weight.shape:
            raise ValueError(f"{needed} has shape {tuple(other.shape)} but weight has shape {tuple(weight.shape)}")
        if other.dtype != weight.dtype:
            raise TypeError(f"{needed} has dtype {other.dtype} but weight has dtype {weight.dtype}")
        if other.device != weight.device:
            raise ValueError(f"{needed} is on {other.device} but weight is on {weight.device}")
    return needed


def _check_scores(scores, op: str) -> list:
    if isinstance(scores, torch.Tensor):
        raise TypeError(f"{op}: scores must be a sequence of tensors; wrap a single tensor in a list")
    try:
        scores = list(scores)
    except TypeError:
        raise TypeError(f"{op}: scores must be a sequence of tensors, got {type(scores).__name__}") from None
    if not scores:
        raise ValueError(f"{op}: scores is empty; pass at least one tensor")
    for i, s in enumerate(scores):
        _check_float(s, f"scores[{i}]")
        if s.device != scores[0].device:
            raise ValueError(f"{op}: scores[{i}] is on {s.device} but scores[0] is on {scores[0].device}")
    return scores


def _check_nm(score, n, m) -> None:
    _check_float(score, "score")
    _check_number(n, "n", integer=True)
    _check_number(m, "m", integer=True)
    if score.dim() < 2:
        raise ValueError(f"nm_masks: score must have at least 2 dimensions (out, in, ...), got {score.dim()}")
    if not 1 <= m <= 128:
        raise ValueError(f"nm_masks: m must be in [1, 128], got {m}")
    if not 1 <= n <= m:
        raise ValueError(f"nm_masks: n must be in [1, m] = [1, {m}], got {n}")
    if score.shape[1] % m:
        raise ValueError(f"nm_masks: the input dimension (dim 1, size {score.shape[1]}) must be divisible by m = {m}")


def _check_apply_mask(mask, tensors) -> list:
    _check_tensor(mask, "mask")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    out = []
    for i, t in enumerate(tensors):
        if t is None:
            continue
        _check_tensor(t, f"tensors[{i}]")
        if t.is_complex():
            raise TypeError(f"tensors[{i}] is complex, which apply_mask_ does not support")
        if t.shape != mask.shape:
            raise ValueError(f"tensors[{i}] has shape {tuple(t.shape)} but mask has shape {tuple(mask.shape)}")
        if t.device != mask.device:
            raise ValueError(f"tensors[{i}] is on {t.device} but mask is on {mask.device}")
        out.append(t)
    return out


def _check_structure(rowptr, col, op: str) -> None:
    _check_tensor(rowptr, "rowptr")
    _check_tensor(col, "col")
    if rowptr.dtype != torch.int32:
        raise TypeError(f"{op}: rowptr must be int32, got {rowptr.dtype}")
    if col.dtype not in (torch.int16, torch.int32):
        raise TypeError(f"{op}: col must be int16 or int32, got {col.dtype}")
    if rowptr.dim() != 1 or rowptr.numel() < 1:
        raise ValueError(f"{op}: rowptr must be 1-D with rows + 1 entries")
    if col.dim() != 1:
        raise ValueError(f"{op}: col must be 1-D, got shape {tuple(col.shape)}")
    if rowptr.device != col.device:
        raise ValueError(f"{op}: rowptr is on {rowptr.device} but col is on {col.device}")


def _check_csr(rowptr, col, values, op: str) -> None:
    _check_structure(rowptr, col, op)
    _check_tensor(values, "values")
    if values.dtype not in _MATMUL_FLOATS:
        raise TypeError(f"{op}: values must be float32, float16, bfloat16 or float64, got {values.dtype}")
    if values.shape != col.shape:
        raise ValueError(f"{op}: values must be 1-D with one entry per column index, got {tuple(values.shape)} "
                         f"for {col.numel()} indices")
    if values.device != col.device:
        raise ValueError(f"{op}: values is on {values.device} but the structure is on {col.device}")


def _check_transposed(t_rowptr, t_col, t_perm, values, n_cols: int, op: str, blocked: bool = False) -> None:
    """With ``blocked`` (spmm, spmm_t, spmm_grad) W^T may be blocked by W's rows (:func:`pysparse.csr.structure`'s
    ``row_block``): t_rowptr then has a whole number of n_cols-row blocks (the CUDA kernels take one only)."""
    given = [t is not None for t in (t_rowptr, t_col, t_perm)]
    if any(given) and not all(given):
        raise ValueError(f"{op}: give all of t_rowptr, t_col and t_perm (the transposed structure), or none")
    if all(given):
        _check_csr(t_rowptr, t_col, values, f"{op} (transposed structure)")
        t_rows = t_rowptr.shape[0] - 1
        whole = n_cols > 0 and t_rows >= n_cols and t_rows % n_cols == 0
        if t_rows != n_cols and not (blocked and whole):
            hint = (" (a transposed structure blocked by W's rows is taken only by spmm, spmm_t and spmm_grad: build "
                    "it with row_block=None)") if whole else ""
            raise ValueError(f"{op}: t_rowptr has {t_rows} rows but W has {n_cols} columns{hint}")
        _check_tensor(t_perm, "t_perm")
        if t_perm.shape != values.shape or t_perm.dtype != torch.int32:
            raise ValueError(f"{op}: t_perm must be an int32 permutation of the stored values")


def _check_spmm(rowptr, col, values, xt, bias, t_rowptr, t_col, t_perm) -> None:
    _check_csr(rowptr, col, values, "spmm")
    _check_tensor(xt, "xt")
    if xt.dim() != 2:
        raise ValueError(f"spmm: xt must be 2-D [in_features, batch], got shape {tuple(xt.shape)}")
    if xt.dtype != values.dtype:
        raise TypeError(f"spmm: xt has dtype {xt.dtype} but values has dtype {values.dtype}")
    if xt.device != values.device:
        raise ValueError(f"spmm: xt is on {xt.device} but values is on {values.device}")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.shape != (rowptr.shape[0] - 1,):
            raise ValueError(f"spmm: bias must have shape ({rowptr.shape[0] - 1},), got {tuple(bias.shape)}")
        if bias.dtype != values.dtype or bias.device != values.device:
            raise TypeError(f"spmm: bias must have values' dtype and device ({values.dtype}, {values.device})")
    _check_transposed(t_rowptr, t_col, t_perm, values, xt.shape[0], "spmm", blocked=True)


def _check_spmm_t(rowptr, col, values, yt, n_cols, t_rowptr, t_col, t_perm) -> None:
    _check_csr(rowptr, col, values, "spmm_t")
    _check_tensor(yt, "yt")
    _check_number(n_cols, "n_cols", integer=True)
    if n_cols < 0:
        raise ValueError(f"spmm_t: n_cols must be >= 0, got {n_cols}")
    if yt.dim() != 2 or yt.shape[0] != rowptr.shape[0] - 1:
        raise ValueError(f"spmm_t: yt must be 2-D with {rowptr.shape[0] - 1} rows, got shape {tuple(yt.shape)}")
    if yt.dtype != values.dtype or yt.device != values.device:
        raise TypeError(f"spmm_t: yt must have values' dtype and device ({values.dtype}, {values.device})")
    _check_transposed(t_rowptr, t_col, t_perm, values, n_cols, "spmm_t", blocked=True)


def _check_spmm_grad(rowptr, col, values, gyt, xt, t_rowptr, t_col, t_perm) -> None:
    _check_csr(rowptr, col, values, "spmm_grad")
    for t, name in ((gyt, "gyt"), (xt, "xt")):
        _check_tensor(t, name)
        if t.dim() != 2:
            raise ValueError(f"spmm_grad: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype != values.dtype or t.device != values.device:
            raise TypeError(f"spmm_grad: {name} must have values' dtype and device ({values.dtype}, {values.device}), "
                            f"got {t.dtype} on {t.device}")
    if gyt.shape != (rowptr.shape[0] - 1, xt.shape[1]):
        raise ValueError(f"spmm_grad: gyt must be [{rowptr.shape[0] - 1}, {xt.shape[1]}] (W's rows by xt's columns), "
                         f"got {tuple(gyt.shape)}")
    _check_transposed(t_rowptr, t_col, t_perm, values, xt.shape[0], "spmm_grad", blocked=True)


def _pair2(v, name: str, op: str = "sparse_conv2d", least: int = 1) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) and i >= least for i in t):
        raise ValueError(f"{op}: {name} must be an int >= {least} or a pair of them, got {v!r}")
    return t


def _geometry(op: str, kernel_size, stride, dilation, padding) -> tuple[list[int], ...]:
    """kernel_size, stride, dilation and padding as the [a, b] lists the conv ops' schemas take."""
    return (list(_pair2(kernel_size, "kernel_size", op)), list(_pair2(stride, "stride", op)),
            list(_pair2(dilation, "dilation", op)), list(_pair2(padding, "padding", op, least=0)))


def _conv_output_size(op: str, h: int, w: int, kernel_size, stride, dilation, padding) -> tuple[int, int]:
    """Checks the geometry and returns the output size of an input of spatial size h x w, zero-padded by
    padding on both sides."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = _geometry(op, kernel_size, stride, dilation, padding)
    if max(kh, kw, sh, sw, dh, dw) > 2**31 - 1:
        raise ValueError(f"{op}: kernel_size, stride and dilation must be below 2^31")
    if max(h + 2 * ph, w + 2 * pw) > 2**31 - 1:
        raise ValueError(f"{op}: the padded input must be below 2^31 in each spatial dim, got {h}x{w} padded by "
                         f"{[ph, pw]}")
    h, w = h + 2 * ph, w + 2 * pw
    if h - dh * (kh - 1) - 1 < 0 or w - dw * (kw - 1) - 1 < 0:
        raise ValueError(f"{op}: input of spatial size {(h - 2 * ph, w - 2 * pw)} (padded {(h, w)}) is smaller than "
                         "the kernel's reach")
    return (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1


def _check_sparse_conv2d(rowptr, col, values, x, bias, kernel_size, stride, dilation, padding, t_rowptr, t_col,
                         t_perm):
    _check_csr(rowptr, col, values, "sparse_conv2d")
    _check_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"sparse_conv2d: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype != values.dtype or x.device != values.device:
        raise TypeError(f"sparse_conv2d: x must have values' dtype and device ({values.dtype}, {values.device})")
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.shape != (rowptr.shape[0] - 1,) or bias.dtype != values.dtype or bias.device != values.device:
            raise ValueError(f"sparse_conv2d: bias must be [{rowptr.shape[0] - 1}] of values' dtype and device")
    oh, ow = _conv_output_size("sparse_conv2d", x.shape[2], x.shape[3], kernel_size, stride, dilation, padding)
    kh, kw = _pair2(kernel_size, "kernel_size")
    _check_transposed(t_rowptr, t_col, t_perm, values, x.shape[1] * kh * kw, "sparse_conv2d")
    return oh, ow


def _check_conv_grad(op, gy, like, like_name, rows, x_size, kernel_size, stride, dilation, padding) -> None:
    """gy must be the output gradient [N, rows, OH, OW] of a convolution of an input of size x_size."""
    x_size = tuple(x_size) if isinstance(x_size, (list, tuple, torch.Size)) else x_size
    if (not isinstance(x_size, tuple) or len(x_size) != 4
            or not all(isinstance(i, (int, torch.SymInt)) and not isinstance(i, bool) and i >= 0 for i in x_size)):
        raise ValueError(f"{op}: x_size must be 4 ints >= 0 [N, C, H, W], got {x_size!r}")
    oh, ow = _conv_output_size(op, x_size[2], x_size[3], kernel_size, stride, dilation, padding)
    _check_tensor(gy, "gy")
    if gy.dtype != like.dtype or gy.device != like.device:
        raise TypeError(f"{op}: gy must have the dtype and device of {like_name} ({like.dtype}, {like.device}), got "
                        f"{gy.dtype} on {gy.device}")
    if tuple(gy.shape) != (x_size[0], rows, oh, ow):
        raise ValueError(f"{op}: gy must be the convolution's output shape {(x_size[0], rows, oh, ow)}, got "
                         f"{tuple(gy.shape)}")


def _check_conv_grad_input(rowptr, col, values, gy, x_size, kernel_size, stride, dilation, padding, t_rowptr, t_col,
                           t_perm):
    op = "sparse_conv2d_grad_input"
    _check_csr(rowptr, col, values, op)
    _check_conv_grad(op, gy, values, "values", rowptr.shape[0] - 1, x_size, kernel_size, stride, dilation, padding)
    kh, kw = _pair2(kernel_size, "kernel_size", op)
    _check_transposed(t_rowptr, t_col, t_perm, values, x_size[1] * kh * kw, op)


def _check_conv_grad_values(rowptr, col, x, gy, kernel_size, stride, dilation, padding):
    op = "sparse_conv2d_grad_values"
    _check_structure(rowptr, col, op)
    _check_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in _MATMUL_FLOATS:
        raise TypeError(f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.device != col.device:
        raise ValueError(f"{op}: x is on {x.device} but the structure is on {col.device}")
    _check_conv_grad(op, gy, x, "x", rowptr.shape[0] - 1, tuple(x.shape), kernel_size, stride, dilation, padding)


def _check_sddmm(rowptr, col, a, b) -> None:
    _check_structure(rowptr, col, "sddmm")
    _check_tensor(a, "a")
    _check_tensor(b, "b")
    if a.dtype not in _MATMUL_FLOATS:
        raise TypeError(f"sddmm: a must be float32, float16, bfloat16 or float64, got {a.dtype}")
    if a.device != col.device:
        raise ValueError(f"sddmm: a is on {a.device} but the structure is on {col.device}")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"sddmm: a and b must be 2-D, got {a.dim()}-D and {b.dim()}-D")
    if a.shape[0] != rowptr.shape[0] - 1:
        raise ValueError(f"sddmm: a has {a.shape[0]} rows but the structure has {rowptr.shape[0] - 1}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sddmm: a and b must have the same number of columns, got {a.shape[1]} and {b.shape[1]}")
    if b.dtype != a.dtype or b.device != a.device:
        raise TypeError(f"sddmm: b must have a's dtype and device ({a.dtype}, {a.device})")


def _check_csr_to_dense(rowptr, col, values, n_cols) -> None:
    _check_csr(rowptr, col, values, "csr_to_dense")
    _check_int(n_cols, "n_cols")


def _check_csr_gather(rowptr, col, dense) -> None:
    _check_structure(rowptr, col, "csr_gather")
    _check_tensor(dense, "dense")
    if dense.dtype not in _MATMUL_FLOATS:
        raise TypeError(f"csr_gather: dense must be float32, float16, bfloat16 or float64, got {dense.dtype}")
    if dense.dim() != 2:
        raise ValueError(f"csr_gather: dense must be 2-D, got shape {tuple(dense.shape)}")
    if dense.shape[0] != rowptr.shape[0] - 1:
        raise ValueError(f"csr_gather: dense has {dense.shape[0]} rows but the structure has {rowptr.shape[0] - 1}")
    if dense.device != col.device:
        raise ValueError(f"csr_gather: dense is on {dense.device} but the structure is on {col.device}")


# ---------------------------------------------------------------------------------------------------------
# Public wrappers
# ---------------------------------------------------------------------------------------------------------
def saliency(weight: torch.Tensor, method: str, *, grad: Optional[torch.Tensor] = None,
             hessian: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Saliency scores of ``weight`` in one fused pass, as float32 of weight's shape.

    ``"magnitude"`` |w|; ``"gradient"`` |g| (needs ``grad``); ``"taylor"`` |g*w| (needs ``grad``);
    ``"hessian"`` 0.5*h*w^2, the OBD saliency with ``hessian`` a diagonal Hessian estimate. Inputs are float32,
    float16 or bfloat16 (grad/hessian of weight's dtype); the arithmetic is float32. Differentiable.
    """
    needed = _check_saliency(weight, method, grad, hessian)
    _check_kernel("saliency", weight.device, "weight")
    return torch.ops.pysparse.saliency.default(
        weight, method, grad if needed == "grad" else None, hessian if needed == "hessian" else None)


def _prune_count(sparsity, total: int) -> int:
    return int(round(_check_fraction(sparsity, "sparsity", upper_inclusive=True) * total))


def sparsity_masks(scores: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks (bool, True = keep) that prune exactly ``round(sparsity * total)`` of all scores.

    Scores are ranked globally across the list, lowest pruned first; among equal scores the earlier one
    (earlier tensor in the list, then lower flat index) is pruned first. No concatenated copy is made: the
    kernel is a radix select over the float bits. NaN scores raise ``ValueError``.
    """
    scores = _check_scores(scores, "sparsity_masks")
    num_prune = _prune_count(sparsity, sum(s.numel() for s in scores))
    _check_kernel("sparsity_masks", scores[0].device, "scores")
    return list(torch.ops.pysparse.sparsity_masks.default(scores, num_prune))


def threshold_masks(scores: Sequence[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    """Keep-masks: keep where score >= threshold, remove where score < threshold (compared in float32)."""
    scores = _check_scores(scores, "threshold_masks")
    _check_number(threshold, "threshold")
    if math.isnan(threshold):
        raise ValueError("threshold is NaN")
    _check_kernel("threshold_masks", scores[0].device, "scores")
    return list(torch.ops.pysparse.threshold_masks.default(scores, float(threshold)))


def nm_masks(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask: of every m consecutive weights along the input dimension (dim 1), keep the n largest.

    For a Linear weight [out, in] the groups run along ``in``; for a conv weight [out, in, kh, kw] along the
    input channels at each kernel position (NVIDIA's 2:4 layout). Ties keep the lower index.
    """
    _check_nm(score, n, m)
    _check_kernel("nm_masks", score.device, "score")
    return torch.ops.pysparse.nm_masks.default(score, int(n), int(m))


def apply_mask_(mask: torch.Tensor, *tensors: Optional[torch.Tensor]) -> int:
    """Zero every tensor where ``mask`` is False, in place and in one pass; return the number of kept elements.

    Pass a weight with its grad and optimizer state (e.g. Adam's exp_avg, exp_avg_sq); ``None`` entries
    (a grad not yet computed) are skipped. Pruned entries become exactly 0 even where they held NaN or inf.
    A tensor whose elements share memory (an expanded view), or two that partly overlap each other or the mask,
    raise ValueError (the same tensor twice is fine).
    Returns an int; under ``torch.compile`` the count stays a 0-dim int64 tensor so that the graph does not
    break (``torch.ops.pysparse.apply_mask_`` always returns that tensor, and never syncs a CUDA stream).
    """
    tensors = _check_apply_mask(mask, tensors)
    _check_kernel("apply_mask_", mask.device, "mask")
    with torch.no_grad():
        kept = torch.ops.pysparse.apply_mask_.default(mask, tensors)
    return kept if torch.compiler.is_compiling() else int(kept)


def spmm(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, xt: torch.Tensor, *,
         bias: Optional[torch.Tensor] = None, transposed: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """``W @ xt (+ bias[:, None])`` with W in CSR (``rowptr`` int32, ``col`` int16/int32, ``values``) and ``xt``
    the activations transposed, ``[in_features, batch]``. Returns ``[rows, batch]``, accumulated in float32.

    Differentiable in ``values``, ``xt`` and ``bias``. ``transposed``, W's transposed structure
    ``(t_rowptr, t_col, t_perm)`` (:func:`pysparse.csr.structure`), is what the CUDA backward needs for the
    gradient of ``xt``; the CPU backward does without.
    """
    t_rowptr, t_col, t_perm = transposed if transposed is not None else (None, None, None)
    _check_spmm(rowptr, col, values, xt, bias, t_rowptr, t_col, t_perm)
    _check_kernel("spmm", values.device, "values")
    return _call("spmm", rowptr, col, values, xt, bias, t_rowptr, t_col, t_perm)


def spmm_t(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, yt: torch.Tensor, n_cols: int, *,
           transposed: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """``W.T @ yt`` with W in CSR of ``n_cols`` columns: ``[n_cols, batch]`` (the input gradient of spmm).
    ``transposed`` is W's transposed structure: CUDA needs it; the CPU uses it for batches above 32 (below,
    it scatters from W's CSR, which is faster there)."""
    t_rowptr, t_col, t_perm = transposed if transposed is not None else (None, None, None)
    _check_spmm_t(rowptr, col, values, yt, n_cols, t_rowptr, t_col, t_perm)
    _check_kernel("spmm_t", values.device, "values")
    return _call("spmm_t", rowptr, col, values, yt, int(n_cols), t_rowptr, t_col, t_perm)


def sparse_conv2d(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, x: torch.Tensor, *,
                  bias: Optional[torch.Tensor] = None, kernel_size=3, stride=1, dilation=1, padding=0,
                  transposed: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Direct sparse convolution of ``x`` [N, C, H, W], zero-padded by ``padding`` (an int or (rows, columns), on
    both sides), with W stored as CSR over [out_channels, C * kh * kw] (column (c * kh + ki) * kw + kj); no
    im2col buffer, no padded copy on the CPU. Differentiable in ``values``, ``x`` and ``bias`` (``transposed`` as
    in :func:`spmm`)."""
    t_rowptr, t_col, t_perm = transposed if transposed is not None else (None, None, None)
    _check_sparse_conv2d(rowptr, col, values, x, bias, kernel_size, stride, dilation, padding, t_rowptr, t_col,
                         t_perm)
    _check_kernel("sparse_conv2d", values.device, "values")
    return _call("sparse_conv2d", rowptr, col, values, x, bias,
                 *_geometry("sparse_conv2d", kernel_size, stride, dilation, padding), t_rowptr, t_col, t_perm)


def sparse_conv2d_grad_input(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, gy: torch.Tensor,
                             x_size: Sequence[int], *, kernel_size=3, stride=1, dilation=1, padding=0,
                             transposed: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Gradient of :func:`sparse_conv2d` with respect to its input of size ``x_size`` [N, C, H, W] (unpadded:
    the padding's terms are dropped), from the output gradient ``gy``; direct, no fold. ``transposed`` (W's
    transposed structure) is needed on CUDA; on the CPU it is used when given (the layers cache it), else the
    kernel regroups the CSR itself."""
    t_rowptr, t_col, t_perm = transposed if transposed is not None else (None, None, None)
    _check_conv_grad_input(rowptr, col, values, gy, x_size, kernel_size, stride, dilation, padding, t_rowptr, t_col,
                           t_perm)
    op = "sparse_conv2d_grad_input"
    _check_kernel(op, values.device, "values")
    return _call(op, rowptr, col, values, gy, [int(i) for i in x_size],
                 *_geometry(op, kernel_size, stride, dilation, padding), t_rowptr, t_col, t_perm)


def sparse_conv2d_grad_values(rowptr: torch.Tensor, col: torch.Tensor, x: torch.Tensor, gy: torch.Tensor, *,
                              kernel_size=3, stride=1, dilation=1, padding=0) -> torch.Tensor:
    """Gradient of :func:`sparse_conv2d` with respect to the stored values: for each stored (o, k), the sum over
    the batch and the output pixels of ``gy[n, o]`` times the window of the padded ``x[n, c]`` the weight sees;
    no im2col."""
    _check_conv_grad_values(rowptr, col, x, gy, kernel_size, stride, dilation, padding)
    op = "sparse_conv2d_grad_values"
    _check_kernel(op, x.device, "x")
    return _call(op, rowptr, col, x, gy, *_geometry(op, kernel_size, stride, dilation, padding))


def sddmm(rowptr: torch.Tensor, col: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``out[j] = dot(a[row(j)], b[col(j)])`` at every stored position j of a CSR structure."""
    _check_sddmm(rowptr, col, a, b)
    _check_kernel("sddmm", a.device, "a")
    return _call("sddmm", rowptr, col, a, b)


def csr_to_dense(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The CSR matrix (``rowptr`` int32, ``col`` int16/int32, ``values``) of ``n_cols`` columns written out dense:
    ``[rows, n_cols]``, zeros where nothing is stored; differentiable in ``values`` (the gradient is
    :func:`csr_gather` of the output's). A column index outside ``[0, n_cols)`` raises on the CPU (CUDA skips
    it)."""
    _check_csr_to_dense(rowptr, col, values, n_cols)
    _check_kernel("csr_to_dense", values.device, "values")
    return _call("csr_to_dense", rowptr, col, values, n_cols)


def csr_gather(rowptr: torch.Tensor, col: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``dense`` [rows, n_cols] read at the stored positions of a CSR structure: ``out[j] = dense[row(j), col[j]]``
    ([nnz]); differentiable in ``dense`` (the gradient is :func:`csr_to_dense` of the output's)."""
    _check_csr_gather(rowptr, col, dense)
    _check_kernel("csr_gather", dense.device, "dense")
    return _call("csr_gather", rowptr, col, dense)


def spmm_grad(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, gyt: torch.Tensor, xt: torch.Tensor, *,
              transposed: Optional[Sequence[torch.Tensor]] = None, bias: bool = False) -> tuple[torch.Tensor, ...]:
    """The backward of :func:`spmm` in one call: ``(dvalues, dxt)`` = ``(sddmm(rowptr, col, gyt, xt), W.T @ gyt)``
    for the output gradient ``gyt`` [rows, batch], and with ``bias=True`` also the bias's, ``gyt.sum(1)``:
    ``(dvalues, dxt, dbias)``. The CPU kernel computes the first two in one sweep over the stored positions,
    reading each row of ``gyt`` once for both (over W's CSR, where the panels it reads at random rows take a
    quarter of L2 or more, in sddmm's and spmm_t's sweeps over the same packed panels instead, which then cost
    less), and sums the bias gradient as it packs ``gyt`` (what spmm's autograd calls). On CUDA one kernel over
    W's transposed structure does the same, a warp per column of W gathering each of its rows of ``gyt`` once for
    both, where the batch fits a lane's registers (up to 512 columns in float32, 256 in float64, 1024 in float16 /
    bfloat16; 128 where a batch row or an operand is not 16-byte aligned), else sddmm's and spmm_t's kernels in
    turn: the same bits either way. ``transposed`` is W's transposed structure: CUDA needs it; the CPU sweeps
    through it for batches above 32, else W's CSR."""
    t_rowptr, t_col, t_perm = transposed if transposed is not None else (None, None, None)
    _check_spmm_grad(rowptr, col, values, gyt, xt, t_rowptr, t_col, t_perm)
    _check_kernel("spmm_grad", values.device, "values")
    if not isinstance(bias, bool):
        raise TypeError(f"spmm_grad: bias must be a bool, got {type(bias).__name__}")
    dvalues, dxt, dbias = _call("spmm_grad", rowptr, col, values, gyt, xt, t_rowptr, t_col, t_perm, bias)
    return (dvalues, dxt, dbias) if bias else (dvalues, dxt)


def release_scratch() -> int:
    """Free the scratch memory the CPU kernels keep on the calling thread between calls (packed batches and
    accumulators: up to four buffers of at most 64 MB, sized by the largest call so far) and return the bytes
    released. The next call allocates again. Other threads' buffers are theirs to release."""
    return int(torch.ops.pysparse.release_scratch.default())


# The CPU output cache (csrc/cpu/out_cache.h). PyTorch's CPU tensors come from malloc, and in a training loop
# the multi-MB tensors of one step (a layer's output, its input gradient) are freed at its end; depending on
# glibc's state the next step's then fault their pages in again (measured: 0 to 410 page faults per 4096 x 4096
# training step at batch 256, bimodal between runs of one script). The CPU kernels take outputs of 256 KB and
# more from a cache of the blocks freed outputs left, up to a limit on the bytes held.
CPU_CACHE_ENV = "PYSPARSE_CPU_CACHE_MB"


def empty_cpu_cache() -> int:
    """Free the blocks the CPU output cache holds (outputs still alive keep theirs) and return the bytes freed."""
    return int(torch.ops.pysparse.empty_cpu_cache.default())


def set_cpu_cache_limit(nbytes: int) -> int:
    """Set the most bytes the CPU output cache may hold (0: keep nothing; 256 MB unless the environment variable
    ``PYSPARSE_CPU_CACHE_MB`` said otherwise at import) and return the previous limit. Blocks above the new
    limit are freed at once."""
    return int(torch.ops.pysparse.set_cpu_cache_limit.default(_check_int(nbytes, "nbytes")))


def cpu_cache_bytes() -> int:
    """The bytes the CPU output cache holds now (freed outputs' blocks waiting for the next call)."""
    return int(torch.ops.pysparse.cpu_cache_bytes.default())


def _cpu_cache_limit_from_env() -> None:
    value = os.environ.get(CPU_CACHE_ENV, "").strip()
    if not value:
        return
    if not value.isdigit() or int(value) > 1 << 30:
        raise ValueError(f"{CPU_CACHE_ENV} must be a whole number of megabytes (0 turns the CPU output cache "
                         f"off), got {value!r}")
    set_cpu_cache_limit(int(value) << 20)


_cpu_cache_limit_from_env()


# ---------------------------------------------------------------------------------------------------------
# Fake kernels (shapes only), for torch.compile and meta tensors
# ---------------------------------------------------------------------------------------------------------
@torch.library.register_fake("pysparse::saliency")
def _saliency_fake(weight, method, grad=None, hessian=None):
    _check_saliency(weight, method, grad, hessian)
    return weight.new_empty(weight.shape, dtype=torch.float32)


def _masks_fake(scores, op):
    scores = _check_scores(scores, op)
    return [s.new_empty(s.shape, dtype=torch.bool) for s in scores]


@torch.library.register_fake("pysparse::sparsity_masks")
def _sparsity_masks_fake(scores, num_prune):
    return _masks_fake(scores, "sparsity_masks")


@torch.library.register_fake("pysparse::threshold_masks")
def _threshold_masks_fake(scores, threshold):
    return _masks_fake(scores, "threshold_masks")


@torch.library.register_fake("pysparse::nm_masks")
def _nm_masks_fake(score, n, m):
    _check_nm(score, n, m)
    return score.new_empty(score.shape, dtype=torch.bool)


@torch.library.register_fake("pysparse::apply_mask_")
def _apply_mask_fake(mask, tensors):
    _check_apply_mask(mask, tensors)
    return mask.new_empty((), dtype=torch.long)


@torch.library.register_fake("pysparse::spmm")
def _spmm_fake(rowptr, col, values, xt, bias=None, t_rowptr=None, t_col=None, t_perm=None):
    _check_spmm(rowptr, col, values, xt, bias, t_rowptr, t_col, t_perm)
    return xt.new_empty((rowptr.shape[0] - 1, xt.shape[1]))


@torch.library.register_fake("pysparse::spmm_t")
def _spmm_t_fake(rowptr, col, values, yt, n_cols, t_rowptr=None, t_col=None, t_perm=None):
    _check_spmm_t(rowptr, col, values, yt, n_cols, t_rowptr, t_col, t_perm)
    return yt.new_empty((n_cols, yt.shape[1]))


def _conv_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format of the convolution ops' output from ``t`` (x for sparse_conv2d, gy for its input
    gradient): channels-last when ``t`` is channels-last and not also contiguous (csrc/common.h's channels_last),
    as nn.Conv2d's output follows its input's."""
    cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


@torch.library.register_fake("pysparse::sparse_conv2d")
def _sparse_conv2d_fake(rowptr, col, values, x, bias, kernel_size, stride, dilation, padding, t_rowptr=None,
                        t_col=None, t_perm=None):
    oh, ow = _check_sparse_conv2d(rowptr, col, values, x, bias, kernel_size, stride, dilation, padding, t_rowptr, t_col,
                                  t_perm)
    return torch.empty((x.shape[0], rowptr.shape[0] - 1, oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=_conv_format(x))


@torch.library.register_fake("pysparse::sparse_conv2d_grad_input")
def _sparse_conv2d_grad_input_fake(rowptr, col, values, gy, x_size, kernel_size, stride, dilation, padding,
                                   t_rowptr=None, t_col=None, t_perm=None):
    _check_conv_grad_input(rowptr, col, values, gy, x_size, kernel_size, stride, dilation, padding, t_rowptr, t_col,
                           t_perm)
    return torch.empty(tuple(x_size), dtype=gy.dtype, device=gy.device, memory_format=_conv_format(gy))


@torch.library.register_fake("pysparse::sparse_conv2d_grad_values")
def _sparse_conv2d_grad_values_fake(rowptr, col, x, gy, kernel_size, stride, dilation, padding):
    _check_conv_grad_values(rowptr, col, x, gy, kernel_size, stride, dilation, padding)
    return x.new_empty(col.shape)


@torch.library.register_fake("pysparse::sddmm")
def _sddmm_fake(rowptr, col, a, b):
    _check_sddmm(rowptr, col, a, b)
    return a.new_empty(col.shape)


@torch.library.register_fake("pysparse::csr_to_dense")
def _csr_to_dense_fake(rowptr, col, values, n_cols):
    _check_csr_to_dense(rowptr, col, values, n_cols)
    return values.new_empty((rowptr.shape[0] - 1, n_cols))


@torch.library.register_fake("pysparse::csr_gather")
def _csr_gather_fake(rowptr, col, dense):
    _check_csr_gather(rowptr, col, dense)
    return dense.new_empty(col.shape)


def _empty_input_grad(xt: torch.Tensor) -> torch.Tensor:
    """spmm_grad's layout for the gradient of xt [K, B], on every device (csrc/common.h, empty_input_grad): xt's own
    when it is batch-major (the [K, B] view of a [B, K] batch), so that autograd hands the [B, K] gradient on
    without a transposing copy; else contiguous (what a preceding SparseLinear's backward reads without a copy)."""
    if xt.stride(0) == 1 and xt.stride(1) != 1:
        return xt.new_empty((xt.shape[1], xt.shape[0])).t()
    return xt.new_empty(xt.shape)


@torch.library.register_fake("pysparse::spmm_grad")
def _spmm_grad_fake(rowptr, col, values, gyt, xt, t_rowptr=None, t_col=None, t_perm=None, bias_grad=False):
    _check_spmm_grad(rowptr, col, values, gyt, xt, t_rowptr, t_col, t_perm)
    return values.new_empty(col.shape), _empty_input_grad(xt), values.new_empty(gyt.shape[0] if bias_grad else 0)


# ---------------------------------------------------------------------------------------------------------
# Autograd: saliency is differentiable in weight, grad and hessian
# ---------------------------------------------------------------------------------------------------------
def _needs_input_grad(ctx, n_inputs: int) -> tuple:
    """ctx.needs_input_grad padded to the schema's n_inputs: torch leaves out trailing arguments that were None."""
    needs = tuple(ctx.needs_input_grad)
    return needs + (False,) * (n_inputs - len(needs))


def _saliency_setup_context(ctx, inputs, output):
    weight, method, grad, hessian = inputs
    ctx.method = method
    ctx.save_for_backward(weight, grad, hessian)


def _saliency_backward(ctx, dout):
    weight, grad, hessian = ctx.saved_tensors
    w = weight.float()
    dw = dg = dh = None
    if ctx.method == "magnitude":
        dw = dout * torch.sign(w)
    elif ctx.method == "gradient":
        dg = dout * torch.sign(grad.float())
    elif ctx.method == "taylor":
        g = grad.float()
        sign = torch.sign(g * w)
        dw, dg = dout * sign * g, dout * sign * w
    else:
        dw, dh = dout * hessian.float() * w, 0.5 * dout * w * w
    needs = _needs_input_grad(ctx, 4)
    return (dw.to(weight.dtype) if dw is not None and needs[0] else None, None,
            dg.to(grad.dtype) if dg is not None and needs[2] else None,
            dh.to(hessian.dtype) if dh is not None and needs[3] else None)


torch.library.register_autograd("pysparse::saliency", _saliency_backward, setup_context=_saliency_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Autograd: spmm is differentiable in values (sddmm), xt (spmm_t) and bias
# ---------------------------------------------------------------------------------------------------------
def _spmm_setup_context(ctx, inputs, output):
    rowptr, col, values, xt, bias, t_rowptr, t_col, t_perm = inputs
    ctx.save_for_backward(rowptr, col, values, xt, t_rowptr, t_col, t_perm)


def _backward_ops():
    """Where a backward calls the ops: below autograd unless it builds a graph itself (create_graph=True: the
    backward ops' own formulas, registered below, then record it for a second derivative) or runs under a
    torch.func transform (whose levels need the ops' formulas, through _call)."""
    if torch.is_grad_enabled() or _func_mode():
        return contextlib.nullcontext()
    return _below_autograd()


def _spmm_grads(needs, rowptr, col, values, gyt, xt, t_rowptr, t_col, t_perm):
    """(dvalues, dxt, dbias) of spmm for the inputs `needs` marks (None for the others)."""
    dvalues = dxt = dbias = None  # gyt may be a transposed view: the kernels pack it through its strides
    with _backward_ops():
        if needs[2] and needs[3]:  # both in one sweep, and the bias gradient summed as gyt is packed for it
            dvalues, dxt, dbias = _call("spmm_grad", rowptr, col, values, gyt, xt, t_rowptr, t_col, t_perm, needs[4])
            return dvalues, dxt, (dbias if needs[4] else None)
        if needs[2]:
            dvalues = _call("sddmm", rowptr, col, gyt, xt)
        if needs[3]:
            dxt = _call("spmm_t", rowptr, col, values, gyt, xt.shape[0], t_rowptr, t_col, t_perm)
    if needs[4]:
        dbias = gyt.sum(1)
    return dvalues, dxt, dbias


def _spmm_backward(ctx, gyt):
    rowptr, col, values, xt, t_rowptr, t_col, t_perm = ctx.saved_tensors
    dvalues, dxt, dbias = _spmm_grads(_needs_input_grad(ctx, 8), rowptr, col, values, gyt, xt, t_rowptr, t_col, t_perm)
    return None, None, dvalues, dxt, dbias, None, None, None


torch.library.register_autograd("pysparse::spmm", _spmm_backward, setup_context=_spmm_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Autograd: sparse_conv2d. The backward is direct as well: sparse_conv2d_grad_values for the stored values,
# sparse_conv2d_grad_input for the input (no im2col buffer, no fold).
# ---------------------------------------------------------------------------------------------------------
def _conv_setup_context(ctx, inputs, output):
    rowptr, col, values, x, bias, kernel_size, stride, dilation, padding = inputs[:9]
    t_rowptr, t_col, t_perm = (tuple(inputs[9:]) + (None, None, None))[:3]
    ctx.geometry = (list(kernel_size), list(stride), list(dilation), list(padding))
    ctx.save_for_backward(rowptr, col, values, x, t_rowptr, t_col, t_perm)


def _conv_backward(ctx, gy):
    rowptr, col, values, x, t_rowptr, t_col, t_perm = ctx.saved_tensors
    geometry = ctx.geometry  # kernel_size, stride, dilation, padding
    needs = _needs_input_grad(ctx, 12)
    gy = gy.contiguous(memory_format=_conv_format(x))  # x's format, as torch's convolutions (csrc/autograd.cpp)
    dvalues = dx = dbias = None
    with _backward_ops():
        if needs[2]:
            dvalues = _call("sparse_conv2d_grad_values", rowptr, col, x, gy, *geometry)
        if needs[3]:
            dx = _call("sparse_conv2d_grad_input", rowptr, col, values, gy, list(x.shape), *geometry, t_rowptr,
                       t_col, t_perm)
    if needs[4]:
        dbias = gy.sum((0, 2, 3))
    return (None, None, dvalues, dx, dbias) + (None,) * 7


torch.library.register_autograd("pysparse::sparse_conv2d", _conv_backward, setup_context=_conv_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Autograd: csr_to_dense and csr_gather are linear, each the other's adjoint: each one's gradient is the other
# ---------------------------------------------------------------------------------------------------------
def _csr_to_dense_setup_context(ctx, inputs, output):
    rowptr, col, values, n_cols = inputs
    ctx.save_for_backward(rowptr, col)


def _csr_to_dense_backward(ctx, g):
    rowptr, col = ctx.saved_tensors
    dvalues = _call("csr_gather", rowptr, col, g) if _needs_input_grad(ctx, 4)[2] else None
    return None, None, dvalues, None


def _csr_gather_setup_context(ctx, inputs, output):
    rowptr, col, dense = inputs
    ctx.n_cols = dense.shape[1]
    ctx.save_for_backward(rowptr, col)


def _csr_gather_backward(ctx, g):
    rowptr, col = ctx.saved_tensors
    needs = _needs_input_grad(ctx, 3)[2]  # (g may be a broadcast view: the kernels take contiguous values)
    ddense = _call("csr_to_dense", rowptr, col, g.contiguous(), ctx.n_cols) if needs else None
    return None, None, ddense


torch.library.register_autograd("pysparse::csr_to_dense", _csr_to_dense_backward,
                                setup_context=_csr_to_dense_setup_context)
torch.library.register_autograd("pysparse::csr_gather", _csr_gather_backward, setup_context=_csr_gather_setup_context)


# ---------------------------------------------------------------------------------------------------------
# Higher derivatives: the backward ops are differentiable too, so a gradient of a gradient through the sparse
# layers (a gradient penalty, a Hessian-vector product; backward(create_graph=True)) is exact. Each op is
# bilinear: its gradients are the other ops of the family. Where a CUDA kernel needs W's transposed structure
# and the op's arguments do not carry it, it is rebuilt from the CSR (CPU kernels do without). A formula passes
# it to every op it calls, the forward ops too: their own backward (a third derivative, or the second of a
# backward op) needs it on CUDA (tests/test_higher_order.py holds the formulas to that on CPU).
# ---------------------------------------------------------------------------------------------------------
def _transposed_for(rowptr, col, n_cols: int) -> tuple:
    if not rowptr.is_cuda:
        return None, None, None
    return csr.from_compressed(rowptr, col, (rowptr.numel() - 1, n_cols)).transposed()


def _spmm_t_setup_context(ctx, inputs, output):
    rowptr, col, values, yt, n_cols, t_rowptr, t_col, t_perm = inputs
    ctx.save_for_backward(rowptr, col, values, yt, t_rowptr, t_col, t_perm)


def _spmm_t_backward(ctx, g):  # dxt = W^T yt
    rowptr, col, values, yt, *t = ctx.saved_tensors
    needs = _needs_input_grad(ctx, 8)
    dvalues = _call("sddmm", rowptr, col, yt, g) if needs[2] else None
    dyt = _call("spmm", rowptr, col, values, g, None, *t) if needs[3] else None
    return None, None, dvalues, dyt, None, None, None, None


def _sddmm_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sddmm_backward(ctx, g):  # out[j] = a[row(j)] . b[col(j)]
    rowptr, col, a, b = ctx.saved_tensors
    needs = _needs_input_grad(ctx, 4)
    t = _transposed_for(rowptr, col, b.shape[0]) if needs[2] or needs[3] else ()
    da = _call("spmm", rowptr, col, g, b, None, *t) if needs[2] else None
    db = _call("spmm_t", rowptr, col, g, a, b.shape[0], *t) if needs[3] else None
    return None, None, da, db


def _spmm_grad_setup_context(ctx, inputs, output):
    rowptr, col, values, gyt, xt, t_rowptr, t_col, t_perm, bias_grad = inputs
    ctx.set_materialize_grads(False)  # gradients of unused outputs arrive as None: no product with zeros
    ctx.save_for_backward(rowptr, col, values, gyt, xt, t_rowptr, t_col, t_perm)


def _spmm_grad_backward(ctx, g_values, g_xt, g_bias):  # (sddmm(gyt, xt), W^T gyt, gyt.sum(1))
    rowptr, col, values, gyt, xt, t_rowptr, t_col, t_perm = ctx.saved_tensors
    needs = _needs_input_grad(ctx, 9)
    dvalues = dgyt = dxt = None
    if needs[2] and g_xt is not None:
        dvalues = _call("sddmm", rowptr, col, gyt, g_xt)
    if needs[3]:
        tr = (t_rowptr, t_col, t_perm)
        terms = [_call("spmm", rowptr, col, g_values, xt, None, *tr) if g_values is not None else None,
                 _call("spmm", rowptr, col, values, g_xt, None, *tr) if g_xt is not None else None,
                 g_bias[:, None].expand_as(gyt) if g_bias is not None and g_bias.numel() else None]
        terms = [t for t in terms if t is not None]
        dgyt = sum(terms[1:], terms[0]) if terms else None
    if needs[4] and g_values is not None:
        dxt = _call("spmm_t", rowptr, col, g_values, gyt, xt.shape[0], t_rowptr, t_col, t_perm)
    return None, None, dvalues, dgyt, dxt, None, None, None, None


def _conv_grad_input_setup_context(ctx, inputs, output):
    rowptr, col, values, gy, x_size, kernel_size, stride, dilation, padding, t_rowptr, t_col, t_perm = inputs
    ctx.geometry = (list(kernel_size), list(stride), list(dilation), list(padding))
    ctx.save_for_backward(rowptr, col, values, gy, t_rowptr, t_col, t_perm)


def _conv_grad_input_backward(ctx, g):  # dx = A_W^T gy, A_W the convolution by W
    rowptr, col, values, gy, t_rowptr, t_col, t_perm = ctx.saved_tensors
    needs = _needs_input_grad(ctx, 12)
    dvalues = _call("sparse_conv2d_grad_values", rowptr, col, g, gy, *ctx.geometry) if needs[2] else None
    dgy = _call("sparse_conv2d", rowptr, col, values, g, None, *ctx.geometry, t_rowptr, t_col, t_perm) \
        if needs[3] else None
    return (None, None, dvalues, dgy) + (None,) * 8


def _conv_grad_values_setup_context(ctx, inputs, output):
    rowptr, col, x, gy, kernel_size, stride, dilation, padding = inputs
    ctx.geometry = (list(kernel_size), list(stride), list(dilation), list(padding))
    ctx.save_for_backward(rowptr, col, x, gy)


def _conv_grad_values_backward(ctx, g):  # out[j] = <gy, A_{e_j} x>
    rowptr, col, x, gy = ctx.saved_tensors
    needs = _needs_input_grad(ctx, 8)
    dx = dgy = None
    k = x.shape[1] * ctx.geometry[0][0] * ctx.geometry[0][1]
    t = _transposed_for(rowptr, col, k) if needs[2] or needs[3] else ()
    if needs[2]:
        dx = _call("sparse_conv2d_grad_input", rowptr, col, g, gy, list(x.shape), *ctx.geometry, *t)
    if needs[3]:
        dgy = _call("sparse_conv2d", rowptr, col, g, x, None, *ctx.geometry, *t)
    return None, None, dx, dgy, None, None, None, None


for _op, _backward, _setup in (("spmm_t", _spmm_t_backward, _spmm_t_setup_context),
                               ("sddmm", _sddmm_backward, _sddmm_setup_context),
                               ("spmm_grad", _spmm_grad_backward, _spmm_grad_setup_context),
                               ("sparse_conv2d_grad_input", _conv_grad_input_backward,
                                _conv_grad_input_setup_context),
                               ("sparse_conv2d_grad_values", _conv_grad_values_backward,
                                _conv_grad_values_setup_context)):
    torch.library.register_autograd(f"pysparse::{_op}", _backward, setup_context=_setup)


# ---------------------------------------------------------------------------------------------------------
# torch.func (grad, vjp, jacrev, jvp, jacfwd, hessian, vmap, functional_call) and forward_ad's dual tensors:
# torch.library's registered formulas, and the C++ autograd nodes the layers use for speed, cannot run
# there. Under them (_func_mode) every differentiable op goes through a Function with a separate setup_context
# (the same backward formulas, a jvp from bilinearity), nested transforms included, and each op has a vmap rule:
# the vmapped dimension folded into the batch where the op maps batch columns / images independently (spmm,
# spmm_t, sparse_conv2d and its input gradient: one kernel call), else one call per entry (the values'
# gradients, which sum over the batch, or batched weights: per-sample gradients loop over the examples).
# ---------------------------------------------------------------------------------------------------------
_FORMULAS = {
    "spmm": (_spmm_setup_context, _spmm_backward),
    "spmm_t": (_spmm_t_setup_context, _spmm_t_backward),
    "sddmm": (_sddmm_setup_context, _sddmm_backward),
    "spmm_grad": (_spmm_grad_setup_context, _spmm_grad_backward),
    "sparse_conv2d": (_conv_setup_context, _conv_backward),
    "sparse_conv2d_grad_input": (_conv_grad_input_setup_context, _conv_grad_input_backward),
    "sparse_conv2d_grad_values": (_conv_grad_values_setup_context, _conv_grad_values_backward),
    "csr_to_dense": (_csr_to_dense_setup_context, _csr_to_dense_backward),
    "csr_gather": (_csr_gather_setup_context, _csr_gather_backward),
}
# The arguments each op is linear in (the others bilinear in 2 and 3: W's values or a, and the dense operand).
_LINEAR_IN = {"csr_to_dense": (2,), "csr_gather": (2,)}


# The differentiable ops by name, looked up once (_call runs in every backward).
_OPS = {name: getattr(torch.ops.pysparse, name).default for name in _FORMULAS}
_SAVED = object()
_FUNCTORCH_ACTIVE = torch._C._are_functorch_transforms_active


def _func_mode() -> bool:
    """A torch.func transform, or torch.autograd.forward_ad's dual tensors, is active: differentiable ops go
    through the Functions below (0.1 us to tell)."""
    return _FUNCTORCH_ACTIVE() or _forward_ad._current_level >= 0


def _tangent(name: str, inputs, tangents, slots=(2, 3)):
    """Forward-mode derivative of a single-output op, bilinear in its arguments `slots` (spmm and sparse_conv2d
    also affine in their bias, argument 4): the sum over the slots with a tangent of the op with that argument
    replaced by its tangent."""
    out = None
    for i in slots:
        if tangents[i] is not None:
            args = list(inputs)
            args[i] = tangents[i]
            if name in ("spmm", "sparse_conv2d"):
                args[4] = None
            term = _call(name, *args)
            out = term if out is None else out + term
    if name in ("spmm", "sparse_conv2d") and tangents[4] is not None:
        db = tangents[4][:, None] if name == "spmm" else tangents[4][None, :, None, None]
        out = db if out is None else out + db
    return out


def _jvp(name: str):
    def jvp(ctx, *tangents):
        saved = iter(ctx.saved_tensors)  # (save_for_forward: what vmap of a jvp needs to see batched)
        inputs = [next(saved) if a is _SAVED else a for a in ctx.jvp_inputs]
        if name != "spmm_grad":
            out = _tangent(name, inputs, tangents, _LINEAR_IN.get(name, (2, 3)))
            return out.expand(ctx.shapes[0]) if out is not None else inputs[2].new_zeros(ctx.shapes[0])
        rowptr, col, values, gyt, xt = inputs[:5]  # (sddmm(gyt, xt), spmm_t(values, gyt), gyt.sum(1))
        t_v = _tangent("sddmm", (rowptr, col, gyt, xt), (None, None, tangents[3], tangents[4]))
        t_x = _tangent("spmm_t", (rowptr, col, values, gyt, xt.shape[0], *inputs[5:8]),
                       (None, None, tangents[2], tangents[3]) + (None,) * 4)
        t_b = tangents[3].sum(1) if tangents[3] is not None and inputs[8] else None
        return tuple(t if t is not None else values.new_zeros(shape) for t, shape in zip((t_v, t_x, t_b), ctx.shapes))

    return staticmethod(jvp)


def _func_function(name: str) -> type:
    op = _OPS[name]
    setup, backward = _FORMULAS[name]

    def forward(*inputs):  # functorch calls it with plain tensors, grad mode off
        return op(*inputs)

    def setup_context(ctx, inputs, output):
        # vmap of a Function keeps one record of which saved tensors are batched, so the backward and the jvp
        # must save the same tensors: every tensor input, for both; the formula's backward then reads its own
        # selection of them (_FormulaCtx), the jvp all of them.
        formula = _FormulaSetup()
        setup(formula, inputs, output)
        tensors = [a for a in inputs if isinstance(a, torch.Tensor)]
        ctx.save_for_backward(*tensors)
        ctx.save_for_forward(*tensors)
        ctx.set_materialize_grads(formula.materialize)
        ctx.formula_saved = [None if t is None else next(i for i, a in enumerate(tensors) if a is t)
                             for t in formula.saved]
        ctx.formula_attrs = formula.attrs
        ctx.jvp_inputs = [_SAVED if isinstance(a, torch.Tensor) else a for a in inputs]
        ctx.shapes = [o.shape for o in output] if isinstance(output, tuple) else [output.shape]

    def backward_(ctx, *grads):
        return backward(_FormulaCtx(ctx), *grads)

    return type(f"_Func_{name}", (torch.autograd.Function,), {
        "generate_vmap_rule": True, "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward_), "jvp": _jvp(name)})


class _FormulaSetup:
    """What a formula's setup_context records: the tensors it saves, whether gradients are materialized, and
    its other attributes (geometry)."""

    def __init__(self):
        self.__dict__.update(saved=(), materialize=True, attrs={})

    def save_for_backward(self, *tensors):
        self.__dict__["saved"] = tensors

    def set_materialize_grads(self, value: bool):
        self.__dict__["materialize"] = value

    def __setattr__(self, key, value):
        self.attrs[key] = value


class _FormulaCtx:
    """A formula's view of a torch.func Function's ctx: its own saved tensors, needs_input_grad, attributes."""

    def __init__(self, ctx):
        saved = ctx.saved_tensors
        self.saved_tensors = tuple(None if i is None else saved[i] for i in ctx.formula_saved)
        self.needs_input_grad = ctx.needs_input_grad
        self.__dict__.update(ctx.formula_attrs)


_FUNC_FUNCTIONS = {name: _func_function(name) for name in _FORMULAS}
_DEFAULTS = {name: tuple(a.default_value for a in op._schema.arguments) for name, op in _OPS.items()}


def _call(name: str, *args):
    """The op `name` in an autograd formula: the op itself, or under a torch.func transform its Function (given
    every argument: the formulas unpack the schema's full list)."""
    if _func_mode():
        return _FUNC_FUNCTIONS[name].apply(*args, *_DEFAULTS[name][len(args):])
    return _OPS[name](*args)


def _in_dims(in_dims) -> list:
    """vmap's in_dims with the entries of list arguments (kernel_size, ...: lists of None) as None."""
    return [None if isinstance(d, (list, tuple)) else d for d in in_dims]


def _vmap_loop(op, n: int, in_dims, args):
    outs = [op(*[a if d is None else a.select(d, i) for a, d in zip(args, in_dims)]) for i in range(n)]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def _vmap_rule(name: str, fold_arg: Optional[int]):
    """A vmap rule for op `name`: when only argument `fold_arg` (the batch-carrying operand) is batched, the
    vmapped dimension joins the batch (columns of a [K, B] operand, images of an [N, C, H, W] one) and one call
    computes every entry; otherwise one call per entry."""
    op = _OPS[name]

    def rule(info, in_dims, *args):
        n, in_dims = info.batch_size, _in_dims(in_dims)
        if fold_arg is None or any(d is not None for i, d in enumerate(in_dims) if i != fold_arg):
            return _vmap_loop(op, n, in_dims, args)
        args = list(args)
        t = args[fold_arg].movedim(in_dims[fold_arg], 0)
        if t.dim() == 3:  # [n, K, B] -> [K, n * B]; out [R, n * B] -> [R, n, B]
            k, b = t.shape[1:]
            args[fold_arg] = t.movedim(0, 1).reshape(k, n * b)
            return op(*args).unflatten(1, (n, b)), 1
        args[fold_arg] = t.flatten(0, 1)  # [n, N, C, H, W] -> [n * N, ...]; out [n * N, ...] -> [n, N, ...]
        if name == "sparse_conv2d_grad_input":
            args[4] = [n * args[4][0]] + list(args[4][1:])
        return op(*args).unflatten(0, (n, t.shape[1])), 0

    torch.library.register_vmap(f"pysparse::{name}", rule)


for _name, _fold in (("spmm", 3), ("spmm_t", 3), ("sddmm", None), ("spmm_grad", None), ("sparse_conv2d", 3),
                     ("sparse_conv2d_grad_input", 3), ("sparse_conv2d_grad_values", None), ("csr_to_dense", None),
                     ("csr_gather", None)):
    _vmap_rule(_name, _fold)


def _below_autograd():
    """Where nothing needs recording (no grad mode, or inside an autograd.Function, which records the step
    itself), pysparse calls its ops below the Autograd dispatch key: torch.library's Python wrapper of a
    registered autograd formula otherwise runs on every call (autograd_impl -> redispatch_no_grad). A/B, one
    process, alternating order, 11 rounds (2026-11-30, Zen 3): a 256 x 256 SparseLinear's no-grad forward at batch
    8, 90%, 65 -> 51 us; 4096 x 4096 at batch 16, 99%, 298 -> 281 us; training steps within the noise. Not while
    torch.compile traces (it sees the plain call)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch._C._AutoDispatchBelowAutograd()


def _kernel_input(x: torch.Tensor) -> torch.Tensor:
    """A batch-major x [B, K] as the kernels' xt [K, B]: the transposed view, on every device (csrc/autograd.cpp's
    kernel_input). The CPU kernels pack the batch through its strides; the CUDA ones copy it batch-contiguous by a
    tiled transpose, none where x already is the transposed view of such a tensor (a preceding SparseLinear's
    output, or a ReLU of it)."""
    return x.t()


# What the layers call, with the op's arguments in schema order: layer_linear (SparseLinear, batch-major x; also
# SparseConv2d's im2col path), layer_sparse_conv2d and layer_csr_to_dense (the dense path's weight). Each records one
# C++ autograd node (csrc/autograd.cpp), also under torch.compile (it traces through the node into the ops) and
# torch.no_grad (the same call, nothing recorded; cheaper than calling the op from Python). A/B per round, 7
# rounds, one process (2026-11-30, Zen 3) against the Python autograd.Functions these replaced: training steps
# 64 x 64 batch 1 0.83, 256 x 256 batch 8 0.89, 300 -> 100 batch 64 0.82, 1024 x 1024 batch 16 0.91, 4096 x 4096
# batch 16 at 99% 1.05 and batch 256 0.98 (noise: kernel-bound); the digits GAN's convolutions 0.85-0.90; a
# no-grad forward 0.75-0.78 (layer_csr_to_dense: benchmarks/RESULTS.md, forty-sixth session). Under torch.func or
# forward-mode AD (which a C++ autograd node does not support) the Functions of _FUNC_FUNCTIONS.
def layer_linear(rowptr, col, values, x, bias, t_rowptr, t_col, t_perm):
    """W @ x^T + bias as [B, N] for a batch-major x [B, K]: the transposed view of spmm's result."""
    if _func_mode():
        return _call("spmm", rowptr, col, values, _kernel_input(x), bias, t_rowptr, t_col, t_perm).t()
    return torch.ops.pysparse.layer_linear.default(rowptr, col, values, x, bias, t_rowptr, t_col, t_perm)


def layer_sparse_conv2d(*args):
    if _func_mode():
        return _call("sparse_conv2d", *args)
    return torch.ops.pysparse.layer_sparse_conv2d.default(*args)


def layer_csr_to_dense(rowptr, col, values, n_cols: int):
    """The dense path's weight [rows, n_cols] from its stored values, recorded as one C++ node (its backward
    csr_gather) instead of csr_to_dense's Python formula."""
    if _func_mode():
        return _call("csr_to_dense", rowptr, col, values, n_cols)
    return torch.ops.pysparse.layer_csr_to_dense.default(rowptr, col, values, n_cols)
