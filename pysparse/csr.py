"""Compressed sparse row (CSR) structures for pysparse's sparse layers.

A 2-D weight [rows, cols] with a keep-mask is stored as ``values`` (the kept weights, row-major order) and
``rowptr`` (int32, rows + 1) / ``col`` (int16 when cols <= 32768, else int32). The backward pass needs the
transposed structure too (CSC): ``t_rowptr`` over columns, ``t_col`` (row indices) and ``t_perm``, the
permutation that puts ``values`` in column-major order. It is computed once per mask, never per step.

On the CPU the sparse linear layers keep W^T blocked by W's rows (``row_block``): block b holds the CSC of W's rows
[b * row_block, (b + 1) * row_block), the blocks one after the other (``t_rowptr`` then has blocks * cols + 1
entries). The backward's sweep over W^T, and the passes that put the values into its order and the products back,
then walk a few hundred rows of W at a time instead of all of them (benchmarks/RESULTS.md: the blocked backward).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

INT16_MAX_DIM = 32768  # int16 indices address [0, 32767]


def index_dtype(dim: int) -> torch.dtype:
    """The narrowest index dtype for a dimension of size ``dim``."""
    return torch.int16 if dim <= INT16_MAX_DIM else torch.int32


@dataclass
class Structure:
    """CSR structure of a [rows, cols] matrix, with its transposed (CSC) form."""
    rowptr: torch.Tensor
    col: torch.Tensor
    t_rowptr: torch.Tensor
    t_col: torch.Tensor
    t_perm: torch.Tensor
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return self.col.numel()

    @property
    def row_blocks(self) -> int:
        """How many blocks of W's rows W^T is stored in (1: the plain CSC)."""
        return max(1, (self.t_rowptr.numel() - 1) // max(1, self.shape[1]))

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.t_rowptr, self.t_col, self.t_perm


# cpu_row_block's figures: blocks of this many rows, for matrices at least this dense (benchmarks/RESULTS.md: the
# blocked backward).
_BLOCK_ROWS = 256
_BLOCK_MIN_DENSITY = 0.125


def cpu_row_block(rows: int, cols: int, nnz: int) -> Optional[int]:
    """The row block of W^T's structure for the CPU's backward (:func:`structure`) of a [rows, cols] matrix with
    nnz stored values: 256 rows where that makes two blocks or more and the matrix keeps at least 1/8 of its
    entries (below 87.5% sparsity; sparser, the blocked backward measured no faster), else None (one block)."""
    for name, v in (("rows", rows), ("cols", cols), ("nnz", nnz)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"cpu_row_block: {name} must be an int >= 0, got {v!r}")
    if nnz > rows * cols:
        raise ValueError(f"cpu_row_block: nnz = {nnz} is more than rows x cols = {rows * cols}")
    if rows < 2 * _BLOCK_ROWS or nnz < _BLOCK_MIN_DENSITY * rows * cols:
        return None
    return _BLOCK_ROWS


def _rowptr(counts: torch.Tensor) -> torch.Tensor:
    rowptr = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=rowptr[1:])
    return rowptr.to(torch.int32)


def _check_mask(mask) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
        raise ValueError(f"mask must be a 2-D bool tensor, got {getattr(mask, 'dtype', type(mask))} "
                         f"of shape {tuple(getattr(mask, 'shape', ()))}")


def compress_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rowptr int32, col int16 / int32) of the True entries of a 2-D bool mask: the CSR structure without its
    transposed cache."""
    _check_mask(mask)
    return _rowptr(mask.sum(1)), mask.nonzero(as_tuple=True)[1].to(index_dtype(mask.shape[1]))


def structure(mask: torch.Tensor, row_block: Optional[int] = None) -> Structure:
    """The CSR structure (and its transpose) of the True entries of a 2-D bool mask. With ``row_block`` (below
    the row count), W^T is blocked by W's rows: block b is the CSC of rows [b * row_block, (b + 1) * row_block),
    the blocks one after the other, rows ascending within each column (what the CPU's spmm_t / spmm_grad take;
    the CUDA kernels and the convolutions take one block, row_block=None)."""
    _check_mask(mask)
    rows, cols = mask.shape
    if row_block is not None and (isinstance(row_block, bool) or not isinstance(row_block, int) or row_block < 1):
        raise ValueError(f"row_block must be a positive int or None, got {row_block!r}")
    if mask.numel() and int(mask.sum()) >= 2**31:
        raise ValueError("more than 2^31 - 1 kept entries")
    r, c = mask.nonzero(as_tuple=True)                      # row-major order: the CSR order
    if row_block is None or row_block >= rows:
        t_rowptr = _rowptr(mask.sum(0))
        t_perm = torch.argsort(c * rows + r)                  # CSR position -> CSC order
    else:
        block_col = torch.div(r, row_block, rounding_mode="floor") * cols + c
        t_rowptr = _rowptr(torch.bincount(block_col, minlength=math.ceil(rows / row_block) * cols))
        t_perm = torch.argsort(block_col * rows + r)          # block-major, then column, then row
    return Structure(
        rowptr=_rowptr(mask.sum(1)),
        col=c.to(index_dtype(cols)),
        t_rowptr=t_rowptr,
        t_col=r[t_perm].to(index_dtype(rows)),
        t_perm=t_perm.to(torch.int32),
        shape=(rows, cols),
    )


def compress(weight: torch.Tensor, mask: torch.Tensor, row_block: Optional[int] = None
             ) -> tuple[torch.Tensor, Structure]:
    """The kept values of a 2-D ``weight`` under ``mask`` (True = keep), and their structure (``row_block``:
    :func:`structure`'s)."""
    s = structure(mask, row_block)
    return weight[mask], s


def row_indices(rowptr: torch.Tensor, nnz: int, device=None) -> torch.Tensor:
    """The row of every stored position of a CSR structure with ``nnz`` stored values (int64, on ``device``,
    rowptr's by default). rowptr is assumed valid and to end at nnz, as for keep_mask (from_compressed checks
    both first): reading its last entry here would stop torch.compile's graph on the layers' dense path."""
    if not isinstance(rowptr, torch.Tensor) or rowptr.dim() != 1 or rowptr.numel() < 1 or \
            rowptr.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"rowptr must be a non-empty 1-D int32 / int64 tensor, got "
                         f"{getattr(rowptr, 'dtype', type(rowptr).__name__)} {tuple(getattr(rowptr, 'shape', ()))}")
    device = rowptr.device if device is None else device
    return torch.repeat_interleave(torch.arange(rowptr.numel() - 1, device=device), rowptr.diff().to(device),
                                   output_size=nnz)


def keep_mask(rowptr: torch.Tensor, col: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The dense [rows, cols] bool mask of a CSR structure's stored positions (indices assumed in range)."""
    mask = torch.zeros(shape, dtype=torch.bool, device=col.device)
    mask[row_indices(rowptr, col.numel(), col.device), col.long()] = True
    return mask


def from_compressed(rowptr: torch.Tensor, col: torch.Tensor, shape: tuple[int, int],
                    row_block: Optional[int] = None) -> Structure:
    """The full structure (with the transposed cache) of a CSR read from outside (a file, a state dict).
    Raises ValueError unless rowptr / col describe a [rows, cols] matrix in canonical order (columns
    ascending within a row, no duplicates), so a tampered structure never reaches a kernel."""
    rows, cols = shape
    if not isinstance(rowptr, torch.Tensor) or rowptr.dtype != torch.int32 or rowptr.shape != (rows + 1,):
        raise ValueError(f"rowptr must be int32 of shape ({rows + 1},), got {getattr(rowptr, 'dtype', None)} "
                         f"{tuple(getattr(rowptr, 'shape', ()))}")
    if not isinstance(col, torch.Tensor) or col.dtype not in (torch.int16, torch.int32) or col.dim() != 1:
        raise ValueError("col must be a 1-D int16 / int32 tensor")
    nnz = col.numel()
    if int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz or bool((rowptr.diff() < 0).any()):
        raise ValueError(f"rowptr is not a valid row pointer for {nnz} stored values")
    if nnz and (int(col.min()) < 0 or int(col.max()) >= cols):
        raise ValueError(f"a column index is outside [0, {cols})")
    s = structure(keep_mask(rowptr, col, shape), row_block)
    if not (torch.equal(s.rowptr, rowptr) and torch.equal(s.col.to(col.dtype), col)):
        raise ValueError("the column indices are not in canonical order (ascending within a row, no duplicates)")
    return s
