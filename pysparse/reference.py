"""Plain-PyTorch twins of every pysparse kernel. They define what the kernels compute; the tests compare
against them. Simple and slow on purpose: they concatenate, sort and allocate freely."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def saliency(weight: torch.Tensor, method: str, *, grad: Optional[torch.Tensor] = None,
             hessian: Optional[torch.Tensor] = None) -> torch.Tensor:
    w = weight.float()
    if method == "magnitude":
        return w.abs()
    if method == "gradient":
        return grad.float().abs()
    if method == "taylor":
        return (grad.float() * w).abs()
    if method == "hessian":
        return 0.5 * hessian.float() * w * w
    raise ValueError(f"unknown method {method!r}")


def sparsity_masks(scores: Sequence[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """Stable ascending sort of all scores; the first round(sparsity * total) are pruned."""
    flat = torch.cat([s.detach().reshape(-1).float().cpu() for s in scores])
    num_prune = int(round(sparsity * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:num_prune]] = False
    parts = keep.split([s.numel() for s in scores])
    return [p.reshape(s.shape).to(s.device) for p, s in zip(parts, scores)]


def threshold_masks(scores: Sequence[torch.Tensor], threshold: float) -> list[torch.Tensor]:
    return [s.float() >= threshold for s in scores]


def nm_masks(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per group of m along dim 1, stable descending sort; the first n are kept."""
    s = score.float().movedim(1, -1)
    groups = s.reshape(-1, m)
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[:, :n]
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(s.shape).movedim(-1, 1).contiguous()


def apply_mask_(mask: torch.Tensor, *tensors: Optional[torch.Tensor]) -> int:
    with torch.no_grad():
        for t in tensors:
            if t is not None:
                t.masked_fill_(~mask, 0)
    return int(mask.sum())


def _rows(rowptr: torch.Tensor) -> torch.Tensor:
    """The row of every stored position of a CSR structure."""
    return torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=rowptr.device), rowptr.diff().long())


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: float64 stays float64, every other dtype sums in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def csr_to_dense(rowptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    rows = _rows(rowptr).to(values.device)
    dense = values.new_zeros((rowptr.numel() - 1, n_cols))
    dense[rows, col.long()] = values
    return dense


def csr_gather(rowptr: torch.Tensor, col: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    return dense[_rows(rowptr).to(dense.device), col.long()]


def spmm(rowptr, col, values, xt, *, bias=None, transposed=None) -> torch.Tensor:
    """Dense W @ xt (+ bias), W rebuilt from CSR; float32 arithmetic for half types, like the kernels."""
    acc = _acc(values.dtype)
    dense = csr_to_dense(rowptr, col, values.to(acc), xt.shape[0])
    out = dense @ xt.to(acc)
    if bias is not None:
        out = out + bias.to(acc)[:, None]
    return out.to(values.dtype)


def spmm_t(rowptr, col, values, yt, n_cols, *, transposed=None) -> torch.Tensor:
    acc = _acc(values.dtype)
    return (csr_to_dense(rowptr, col, values.to(acc), n_cols).t() @ yt.to(acc)).to(values.dtype)


def sddmm(rowptr, col, a, b) -> torch.Tensor:
    acc = _acc(a.dtype)
    rows = _rows(rowptr).to(a.device)
    return (a.to(acc)[rows] * b.to(acc)[col.long()]).sum(-1).to(a.dtype)


def spmm_grad(rowptr, col, values, gyt, xt, *, transposed=None, bias=False) -> tuple[torch.Tensor, ...]:
    """spmm's backward: the values' gradient (sddmm) and the input's (W.T @ gyt); with bias, the bias's too."""
    grads = sddmm(rowptr, col, gyt, xt), spmm_t(rowptr, col, values, gyt, xt.shape[0])
    return grads + (gyt.to(_acc(gyt.dtype)).sum(1).to(gyt.dtype),) if bias else grads


def _dense_conv_weight(rowptr, col, values, channels, kernel_size):
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    return csr_to_dense(rowptr, col, values, channels * kh * kw).reshape(-1, channels, kh, kw)


def sparse_conv2d(rowptr, col, values, x, *, bias=None, kernel_size=3, stride=1, dilation=1, padding=0,
                  transposed=None):
    """F.conv2d with the dense weight [O, C, kh, kw] rebuilt from the CSR (a grouped weight is block-diagonal
    over all C channels, so groups=1 is exact)."""
    acc = _acc(values.dtype)
    weight = _dense_conv_weight(rowptr, col, values.to(acc), x.shape[1], kernel_size)
    out = torch.nn.functional.conv2d(x.to(acc), weight, None if bias is None else bias.to(acc), stride=stride,
                                     dilation=dilation, padding=padding)
    return out.to(values.dtype)


def sparse_conv2d_grad_input(rowptr, col, values, gy, x_size, *, kernel_size=3, stride=1, dilation=1, padding=0,
                             transposed=None):
    """torch.nn.grad.conv2d_input with the dense weight rebuilt from the CSR."""
    acc = _acc(values.dtype)
    weight = _dense_conv_weight(rowptr, col, values.to(acc), x_size[1], kernel_size)
    return torch.nn.grad.conv2d_input(list(x_size), weight, gy.to(acc), stride=stride, dilation=dilation,
                                      padding=padding).to(values.dtype)


def sparse_conv2d_grad_values(rowptr, col, x, gy, *, kernel_size=3, stride=1, dilation=1, padding=0):
    """torch.nn.grad.conv2d_weight (the dense weight gradient), read at the stored positions."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    acc = _acc(x.dtype)
    rows = rowptr.numel() - 1
    dense = torch.nn.grad.conv2d_weight(x.to(acc), (rows, x.shape[1], kh, kw), gy.to(acc), stride=stride,
                                        dilation=dilation, padding=padding).reshape(rows, -1)
    return dense[_rows(rowptr).to(x.device), col.long()].to(x.dtype)
