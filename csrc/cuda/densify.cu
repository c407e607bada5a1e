// csr_to_dense and csr_gather, CUDA twins of csrc/cpu/densify.cpp: one warp per row, its lanes over the row's
// stored positions (coalesced reads of col and values; the writes or reads of the dense row are as scattered as
// the row's columns). Row ranges are clamped to [0, nnz] and a column index outside [0, n_cols) is skipped (its
// gathered value reads as 0), as in spmm: no host sync.
#include <torch/library.h>

#include "../common.h"
#include "launch.cuh"

namespace pysparse {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <typename index_t, typename scalar_t>
__global__ void csr_to_dense_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                                    const scalar_t* __restrict__ values, scalar_t* __restrict__ out, int64_t rows,
                                    int64_t n_cols, int64_t nnz) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (r >= rows) return;
  int64_t j0, j1;
  cuda::row_bounds(rowptr, r, nnz, j0, j1);
  for (int64_t j = j0 + threadIdx.x; j < j1; j += kWarp) {
    const int64_t c = col[j];
    if (c >= 0 && c < n_cols) out[r * n_cols + c] = values[j];
  }
}

template <typename index_t, typename scalar_t>
__global__ void csr_gather_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                                  const scalar_t* __restrict__ dense, scalar_t* __restrict__ out, int64_t rows,
                                  int64_t n_cols, int64_t s0, int64_t s1, int64_t nnz) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (r >= rows) return;
  int64_t j0, j1;
  cuda::row_bounds(rowptr, r, nnz, j0, j1);
  for (int64_t j = j0 + threadIdx.x; j < j1; j += kWarp) {
    const int64_t c = col[j];
    out[j] = (c >= 0 && c < n_cols) ? dense[r * s0 + c * s1] : scalar_t(0);
  }
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
}

at::Tensor csr_to_dense_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                             int64_t n_cols) {
  check_csr_to_dense(rowptr, col, values, n_cols);
  TORCH_CHECK_VALUE(values.is_cuda(), "csr_to_dense: tensors must be on a CUDA device for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t rows = rowptr.numel() - 1, nnz = values.numel();
  at::Tensor out = at::zeros({rows, n_cols}, values.options());
  if (out.numel() == 0 || nnz == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "csr_to_dense_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "csr_to_dense_cuda", [&] {
      csr_to_dense_kernel<index_t, scalar_t><<<row_blocks(rows), dim3(kWarp, kWarpsPerBlock), 0, cuda::stream()>>>(
          rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), values.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), rows, n_cols, nnz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor csr_gather_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& dense) {
  check_csr_gather(rowptr, col, dense);
  TORCH_CHECK_VALUE(dense.is_cuda(), "csr_gather: tensors must be on a CUDA device for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(dense.device());
  const int64_t rows = rowptr.numel() - 1, nnz = col.numel();
  at::Tensor out = at::zeros({nnz}, dense.options());  // positions outside every row's range stay 0
  if (nnz == 0 || rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "csr_gather_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "csr_gather_cuda", [&] {
      csr_gather_kernel<index_t, scalar_t><<<row_blocks(rows), dim3(kWarp, kWarpsPerBlock), 0, cuda::stream()>>>(
          rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), dense.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), rows, dense.size(1), dense.stride(0), dense.stride(1), nnz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("csr_to_dense", &csr_to_dense_cuda);
  m.impl("csr_gather", &csr_gather_cuda);
}

}  // namespace pysparse
