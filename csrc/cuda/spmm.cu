// Sparse matmul, CUDA twin of csrc/cpu/spmm.cpp: spmm (CSR x dense), spmm_t (W^T x dense through W's
// transposed structure) and sddmm (the values gradient). Same layout as the CPU: activations transposed,
// [features, batch], batch contiguous.
//
// A warp owns one row. For batches above 8, each lane owns one batch column of a 32-column tile: the warp
// loads 32 (column, value) pairs at a time, broadcasts them with shuffles, and every lane reads xt[c, b], so a
// warp's reads of one xt row are coalesced. For batches up to 8, lanes split the row's stored values and the
// partial sums are reduced across the warp. Accumulation is float32 (float64 for float64).
//
// Safety without host syncs: row ranges are clamped to [0, nnz], and a column index (or t_perm entry) outside
// its range is skipped, never read. Structures are validated where they are built or loaded (pysparse.csr).
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common.h"
#include "launch.cuh"

namespace pysparse {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ void row_bounds(const int32_t* rowptr, int64_t r, int64_t nnz, int64_t& j0, int64_t& j1) {
  j0 = min(max(static_cast<int64_t>(rowptr[r]), int64_t{0}), nnz);
  j1 = min(max(static_cast<int64_t>(rowptr[r + 1]), j0), nnz);
}

// Value of stored position j: values[j], or values[perm[j]] (perm entries outside [0, nnz) read as 0).
template <typename scalar_t, typename acc_t, bool PERM>
__device__ __forceinline__ acc_t load_value(const scalar_t* values, const int32_t* perm, int64_t j, int64_t nnz) {
  if constexpr (PERM) {
    const int64_t p = perm[j];
    return (p >= 0 && p < nnz) ? static_cast<acc_t>(values[p]) : acc_t(0);
  } else {
    return static_cast<acc_t>(values[j]);
  }
}

// Batches above 8: grid (ceil(rows / 4), ceil(B / 32)), block (32, 4).
template <typename index_t, typename scalar_t, bool PERM>
__global__ void spmm_tile_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                                 const scalar_t* __restrict__ values, const int32_t* __restrict__ perm,
                                 const scalar_t* __restrict__ xt, const scalar_t* __restrict__ bias,
                                 scalar_t* __restrict__ yt, int64_t rows, int64_t K, int64_t B, int64_t nnz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (r >= rows) return;  // whole warp leaves together
  const int lane = threadIdx.x;
  const int64_t b = static_cast<int64_t>(blockIdx.y) * kWarp + lane;
  int64_t j0, j1;
  row_bounds(rowptr, r, nnz, j0, j1);
  acc_t acc = bias ? static_cast<acc_t>(bias[r]) : acc_t(0);
  for (int64_t base = j0; base < j1; base += kWarp) {
    const int64_t j = base + lane;
    int64_t c = -1;
    acc_t v = 0;
    if (j < j1) {
      c = col[j];
      v = load_value<scalar_t, acc_t, PERM>(values, perm, j, nnz);
    }
    const int64_t remaining = j1 - base;
    const int n = remaining < kWarp ? static_cast<int>(remaining) : kWarp;
    for (int i = 0; i < n; ++i) {
      const int64_t ci = __shfl_sync(0xffffffffu, c, i);
      const acc_t vi = __shfl_sync(0xffffffffu, v, i);
      if (b < B && ci >= 0 && ci < K) acc += vi * static_cast<acc_t>(xt[ci * B + b]);
    }
  }
  if (b < B) yt[r * B + b] = static_cast<scalar_t>(acc);
}

// Batches up to 8: grid ceil(rows / 4), block (32, 4); lanes split the row, then a warp reduction per column.
template <typename index_t, typename scalar_t, bool PERM>
__global__ void spmm_vector_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                                   const scalar_t* __restrict__ values, const int32_t* __restrict__ perm,
                                   const scalar_t* __restrict__ xt, const scalar_t* __restrict__ bias,
                                   scalar_t* __restrict__ yt, int64_t rows, int64_t K, int64_t B, int64_t nnz) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kMaxB = 8;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const int lane = threadIdx.x;
  int64_t j0, j1;
  row_bounds(rowptr, r, nnz, j0, j1);
  acc_t acc[kMaxB];
#pragma unroll
  for (int b = 0; b < kMaxB; ++b) acc[b] = 0;
  for (int64_t j = j0 + lane; j < j1; j += kWarp) {
    const int64_t c = col[j];
    if (c < 0 || c >= K) continue;
    const acc_t v = load_value<scalar_t, acc_t, PERM>(values, perm, j, nnz);
#pragma unroll
    for (int b = 0; b < kMaxB; ++b)
      if (b < B) acc[b] += v * static_cast<acc_t>(xt[c * B + b]);
  }
#pragma unroll
  for (int b = 0; b < kMaxB; ++b) {
    const acc_t total = warp_sum(acc[b]);
    if (lane == 0 && b < B) yt[r * B + b] = static_cast<scalar_t>(total + (bias ? static_cast<acc_t>(bias[r]) : acc_t(0)));
  }
}

template <bool PERM>
void launch_spmm(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor* perm,
                 const at::Tensor& x, const at::Tensor& bias, at::Tensor& yt) {
  const int64_t rows = rowptr.numel() - 1, K = x.size(0), B = x.size(1), nnz = values.numel();
  const dim3 block(kWarp, kWarpsPerBlock);
  const unsigned int row_blocks = static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "spmm_cuda", [&] {
      const int32_t* pp = perm ? perm->const_data_ptr<int32_t>() : nullptr;
      const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      if (B <= 8) {
        spmm_vector_kernel<index_t, scalar_t, PERM><<<row_blocks, block, 0, cuda::stream()>>>(
            rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), values.const_data_ptr<scalar_t>(), pp,
            x.const_data_ptr<scalar_t>(), bp, yt.mutable_data_ptr<scalar_t>(), rows, K, B, nnz);
      } else {
        const dim3 grid(row_blocks, static_cast<unsigned int>((B + kWarp - 1) / kWarp));
        TORCH_CHECK_VALUE(grid.y <= 65535, "spmm: batch ", B, " is larger than the CUDA kernel supports");
        spmm_tile_kernel<index_t, scalar_t, PERM><<<grid, block, 0, cuda::stream()>>>(
            rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), values.const_data_ptr<scalar_t>(), pp,
            x.const_data_ptr<scalar_t>(), bp, yt.mutable_data_ptr<scalar_t>(), rows, K, B, nnz);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void check_dense_cuda(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined() && t.dim() == 2, op, ": ", name, " must be a 2-D tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but values has dtype ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but values is on ",
                    like.device());
}

at::Tensor spmm_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& xt,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  check_csr(rowptr, col, values, "spmm");
  check_dense_cuda(xt, values, "spmm", "xt");
  TORCH_CHECK_VALUE(values.is_cuda(), "spmm: tensors must be on a CUDA device for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t rows = rowptr.numel() - 1;
  at::Tensor bs;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == rows, "spmm: bias must have ", rows, " entries");
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "spmm: bias dtype differs from values dtype");
    TORCH_CHECK_VALUE(bias->device() == values.device(), "spmm: bias is on another device than values");
    bs = bias->contiguous();
  }
  const at::Tensor x = xt.contiguous();
  at::Tensor yt = at::empty({rows, x.size(1)}, x.options());
  if (rows == 0 || x.size(1) == 0) return yt;
  launch_spmm<false>(rowptr, col, values, nullptr, x, bs, yt);
  return yt;
}

at::Tensor spmm_t_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& yt,
                       int64_t n_cols, const std::optional<at::Tensor>& t_rowptr,
                       const std::optional<at::Tensor>& t_col, const std::optional<at::Tensor>& t_perm) {
  check_csr(rowptr, col, values, "spmm_t");
  check_dense_cuda(yt, values, "spmm_t", "yt");
  TORCH_CHECK_VALUE(values.is_cuda(), "spmm_t: tensors must be on a CUDA device for the CUDA kernel");
  TORCH_CHECK_VALUE(has_transposed(t_rowptr, t_col, t_perm),
                    "spmm_t: the CUDA kernel needs W's transposed structure (t_rowptr, t_col, t_perm)");
  check_transposed(values, *t_rowptr, *t_col, *t_perm, n_cols, "spmm_t");
  TORCH_CHECK_VALUE(yt.size(0) == rowptr.numel() - 1, "spmm_t: yt has ", yt.size(0), " rows but W has ",
                    rowptr.numel() - 1);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor y = yt.contiguous();
  at::Tensor out = at::empty({n_cols, y.size(1)}, y.options());
  if (n_cols == 0 || y.size(1) == 0) return out;
  const at::Tensor perm = *t_perm;
  launch_spmm<true>(*t_rowptr, *t_col, values, &perm, y, at::Tensor(), out);
  return out;
}

// One warp per row; per stored position, the lanes split the batch and reduce.
template <typename index_t, typename scalar_t>
__global__ void sddmm_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                             const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                             scalar_t* __restrict__ out, int64_t rows, int64_t K, int64_t B, int64_t nnz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (r >= rows) return;
  const int lane = threadIdx.x;
  int64_t j0, j1;
  row_bounds(rowptr, r, nnz, j0, j1);
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t c = col[j];
    acc_t acc = 0;
    if (c >= 0 && c < K)
      for (int64_t i = lane; i < B; i += kWarp) acc += static_cast<acc_t>(a[r * B + i]) * static_cast<acc_t>(b[c * B + i]);
    acc = warp_sum(acc);
    if (lane == 0) out[j] = static_cast<scalar_t>(acc);
  }
}

at::Tensor sddmm_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& a, const at::Tensor& b) {
  check_csr_structure(rowptr, col, "sddmm");
  TORCH_CHECK_VALUE(a.defined() && a.is_cuda(), "sddmm: a must be on a CUDA device for the CUDA kernel");
  TORCH_CHECK_TYPE(is_matmul_float(a.scalar_type()), "sddmm: a must be float32, float16, bfloat16 or float64");
  TORCH_CHECK_VALUE(a.device() == col.device(), "sddmm: a and the structure must be on one device");
  check_dense_cuda(a, a, "sddmm", "a");
  check_dense_cuda(b, a, "sddmm", "b");
  const int64_t rows = rowptr.numel() - 1, K = b.size(0), B = a.size(1), nnz = col.numel();
  TORCH_CHECK_VALUE(a.size(0) == rows, "sddmm: a has ", a.size(0), " rows but the structure has ", rows);
  TORCH_CHECK_VALUE(b.size(1) == B, "sddmm: a and b must have the same number of columns");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::zeros({nnz}, a.options());  // positions outside every row's range stay 0
  if (nnz == 0 || rows == 0) return out;
  const dim3 block(kWarp, kWarpsPerBlock);
  const unsigned int grid = static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sddmm_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "sddmm_cuda", [&] {
      sddmm_kernel<index_t, scalar_t><<<grid, block, 0, cuda::stream()>>>(
          rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), ac.const_data_ptr<scalar_t>(),
          bc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), rows, K, B, nnz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// The backward of spmm in one call. On the GPU the two kernels stay separate launches: each is bound by its own
// gathers, and the fusion the CPU kernel does (one read of gyt's row for both products) would need every
// block to hold both a dxt tile and the dot products; the op exists so that the autograd formula is one call.
// The bias gradient is ATen's row sum here (the CPU kernel's comes from its pack of gyt, which CUDA does not do).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spmm_grad_cuda(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& gyt,
    const at::Tensor& xt, const std::optional<at::Tensor>& t_rowptr, const std::optional<at::Tensor>& t_col,
    const std::optional<at::Tensor>& t_perm, bool bias_grad) {
  check_csr(rowptr, col, values, "spmm_grad");
  check_dense_cuda(gyt, values, "spmm_grad", "gyt");
  check_dense_cuda(xt, values, "spmm_grad", "xt");
  TORCH_CHECK_VALUE(gyt.size(0) == rowptr.numel() - 1 && gyt.size(1) == xt.size(1), "spmm_grad: gyt must be [",
                    rowptr.numel() - 1, ", ", xt.size(1), "] (W's rows by xt's columns), got ", gyt.sizes());
  at::Tensor dxt = empty_input_grad(xt);  // the CPU kernel's layout, which the fake kernel declares
  dxt.copy_(spmm_t_cuda(rowptr, col, values, gyt, xt.size(0), t_rowptr, t_col, t_perm));
  return {sddmm_cuda(rowptr, col, gyt, xt), dxt, bias_grad ? gyt.sum(1) : at::empty({0}, values.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("spmm_t", &spmm_t_cuda);
  m.impl("sddmm", &sddmm_cuda);
  m.impl("spmm_grad", &spmm_grad_cuda);
}

}  // namespace pysparse
