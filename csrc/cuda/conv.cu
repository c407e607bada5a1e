// Direct sparse convolution, CUDA twin of csrc/cpu/conv.cpp: one thread per output element (n, o, oh, ow);
// the threads of a warp share o (consecutive ow), so they walk the same stored weights in step and their reads
// of an input row are coalesced. Each stored weight's place in the input relative to the output's window
// (c * H * W + ki * dh * W + kj * dw) is computed once per call (conv_offsets_kernel), so that the per-thread
// loop is a load and a multiply-add, without the 64-bit divisions of a column index. Row ranges are clamped and
// out-of-range column indices skipped (offset -1), as in spmm.
//
// Backward, direct as on the CPU. Input gradient: one thread per input element (n, c, h, w) gathers
// value * gy[n, o, r, q] over the stored weights of c's kh * kw columns whose shift lands on (h, w), walking
// W's transposed structure (the threads of a warp share (n, c) and mostly the same weights). Values gradient:
// one warp per stored weight, the lanes split the batch's output pixels (coalesced reads of gy and x rows) and
// reduce with shuffles.
#include <ATen/OpMathType.h>
#include <tuple>
#include <torch/library.h>

#include "../common.h"
#include "launch.cuh"

namespace pysparse {
namespace {

// off[j]: stored weight j's offset in a padded [C, H, W] input from its output's window corner (n, r * sh,
// q * sw); -1 for a column index outside [0, C * kh * kw).
template <typename index_t>
__global__ void conv_offsets_kernel(const index_t* __restrict__ col, int64_t* __restrict__ off, int64_t nnz,
                                    int64_t C, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t dh,
                                    int64_t dw) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nnz; j += step) {
    const int64_t k = col[j];
    if (k < 0 || k >= C * kh * kw) {
      off[j] = -1;
      continue;
    }
    const int64_t c = k / (kh * kw), ki = (k / kw) % kh, kj = k % kw;
    off[j] = (c * H + ki * dh) * W + kj * dw;
  }
}

template <typename scalar_t>
__global__ void conv_kernel(const int32_t* __restrict__ rowptr, const int64_t* __restrict__ off,
                            const scalar_t* __restrict__ values, const scalar_t* __restrict__ x,
                            const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, int64_t N, int64_t C,
                            int64_t H, int64_t W, int64_t O, int64_t OH, int64_t OW, int64_t sh, int64_t sw,
                            int64_t nnz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = N * O * OH * OW;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t q = idx % OW, r = (idx / OW) % OH, o = (idx / (OW * OH)) % O, n = idx / (OW * OH * O);
    int64_t j0, j1;
    cuda::row_bounds(rowptr, o, nnz, j0, j1);
    const scalar_t* xw = x + (n * C * H + r * sh) * W + q * sw;  // the output's window corner
    acc_t acc = bias ? static_cast<acc_t>(bias[o]) : acc_t(0);
#pragma unroll 4
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t f = off[j];
      if (f < 0) continue;
      acc += static_cast<acc_t>(values[j]) * static_cast<acc_t>(xw[f]);
    }
    y[idx] = static_cast<scalar_t>(acc);
  }
}

// x [N, C, H, W] zero-padded by padding (rows, columns) on both sides, contiguous: the CUDA kernels index a
// padded input (the CPU kernel writes the zeros into its working layout instead).
at::Tensor padded(const at::Tensor& x, at::IntArrayRef padding) {
  if (padding[0] == 0 && padding[1] == 0) return x.contiguous();
  return at::constant_pad_nd(x, {padding[1], padding[1], padding[0], padding[0]}, 0).contiguous();
}

at::Tensor sparse_conv2d_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                              const at::Tensor& x, const std::optional<at::Tensor>& bias, at::IntArrayRef kernel,
                              at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&) {
  int64_t OH, OW;
  std::tie(OH, OW) = check_sparse_conv2d(rowptr, col, values, x, bias, kernel, stride, dilation, padding);
  TORCH_CHECK_VALUE(values.is_cuda(), "sparse_conv2d: tensors must be on a CUDA device for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor xc = padded(x, padding);
  const at::Tensor bs = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3), O = rowptr.numel() - 1;
  // The kernels index NCHW; a channels-last x gives a channels-last y (as the CPU kernel, and nn.Conv2d).
  const at::MemoryFormat format = channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor y = at::empty({N, O, OH, OW}, xc.options());
  if (y.numel() == 0) return y.contiguous(format);
  const int64_t nnz = values.numel();
  at::Tensor off = at::empty({nnz}, xc.options().dtype(at::kLong));
  if (nnz > 0) {
    PYSPARSE_DISPATCH_INDEX(col, "sparse_conv2d_cuda", [&] {
      conv_offsets_kernel<index_t><<<cuda::grid_for(nnz), cuda::kThreads, 0, cuda::stream()>>>(
          col.const_data_ptr<index_t>(), off.mutable_data_ptr<int64_t>(), nnz, C, H, W, kernel[0], kernel[1],
          dilation[0], dilation[1]);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_conv2d_cuda", [&] {
    conv_kernel<scalar_t><<<cuda::grid_for(y.numel()), cuda::kThreads, 0, cuda::stream()>>>(
        rowptr.const_data_ptr<int32_t>(), off.const_data_ptr<int64_t>(), values.const_data_ptr<scalar_t>(),
        xc.const_data_ptr<scalar_t>(), bs.defined() ? bs.const_data_ptr<scalar_t>() : nullptr,
        y.mutable_data_ptr<scalar_t>(), N, C, H, W, O, OH, OW, stride[0], stride[1], nnz);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y.contiguous(format);
}


constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 8;

template <typename tindex_t, typename scalar_t>
__global__ void conv_grad_input_kernel(const int32_t* __restrict__ t_rowptr, const tindex_t* __restrict__ t_row,
                                       const int32_t* __restrict__ t_perm, const scalar_t* __restrict__ values,
                                       const scalar_t* __restrict__ gy, scalar_t* __restrict__ dx, int64_t N,
                                       int64_t C, int64_t H, int64_t W, int64_t O, int64_t OH, int64_t OW,
                                       int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                                       int64_t nnz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = N * C * H * W;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += step) {
    const int64_t w = idx % W, h = (idx / W) % H, c = (idx / (W * H)) % C, n = idx / (W * H * C);
    acc_t acc = 0;
    for (int64_t ki = 0; ki < kh; ++ki) {
      const int64_t hh = h - ki * dh;
      if (hh < 0 || hh % sh != 0 || hh / sh >= OH) continue;
      const int64_t r = hh / sh;
      for (int64_t kj = 0; kj < kw; ++kj) {
        const int64_t ww = w - kj * dw;
        if (ww < 0 || ww % sw != 0 || ww / sw >= OW) continue;
        const int64_t q = ww / sw, k = (c * kh + ki) * kw + kj;
        int64_t e0, e1;
        cuda::row_bounds(t_rowptr, k, nnz, e0, e1);
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t o = t_row[e], p = t_perm[e];
          if (o < 0 || o >= O || p < 0 || p >= nnz) continue;
          acc += static_cast<acc_t>(values[p]) * static_cast<acc_t>(gy[((n * O + o) * OH + r) * OW + q]);
        }
      }
    }
    dx[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename index_t, typename scalar_t>
__global__ void conv_grad_values_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                                        const scalar_t* __restrict__ x, const scalar_t* __restrict__ gy,
                                        scalar_t* __restrict__ dv, int64_t N, int64_t C, int64_t H, int64_t W,
                                        int64_t O, int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh,
                                        int64_t sw, int64_t dh, int64_t dw, int64_t nnz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (j >= nnz) return;  // whole warp leaves together
  const int lane = threadIdx.x;
  // The row holding j: the last o with rowptr[o] <= j (binary search; a malformed rowptr only yields a row
  // whose range does not hold j, which is skipped).
  int64_t lo = 0, hi = O;  // invariant: rowptr[lo] <= j < rowptr[hi] when the structure is valid
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (rowptr[mid] <= j) lo = mid; else hi = mid;
  }
  const int64_t o = lo, k = col[j];
  acc_t acc = 0;
  if (O > 0 && rowptr[o] <= j && j < rowptr[o + 1] && k >= 0 && k < C * kh * kw) {
    const int64_t c = k / (kh * kw), ki = (k / kw) % kh, kj = k % kw;
    const int64_t L = N * OH * OW;
    const scalar_t* gk = gy + o * OH * OW;
    const scalar_t* xk = x + (c * H + ki * dh) * W + kj * dw;
    if (L < (int64_t{1} << 31)) {  // the pixel index (n, r, q) decomposed in 32 bits: no 64-bit divisions
      const uint32_t P = static_cast<uint32_t>(OH * OW), ow = static_cast<uint32_t>(OW);
      for (uint32_t i = lane; i < static_cast<uint32_t>(L); i += kWarp) {
        const uint32_t n = i / P, p = i - n * P, r = p / ow, q = p - r * ow;
        acc += static_cast<acc_t>(gk[static_cast<int64_t>(n) * O * P + p]) *
               static_cast<acc_t>(xk[static_cast<int64_t>(n) * C * H * W + static_cast<int64_t>(r) * sh * W +
                                     static_cast<int64_t>(q) * sw]);
      }
    } else {
      for (int64_t i = lane; i < L; i += kWarp) {
        const int64_t q = i % OW, r = (i / OW) % OH, n = i / (OW * OH);
        acc += static_cast<acc_t>(gk[(n * O * OH + r) * OW + q]) *
               static_cast<acc_t>(xk[(n * C * H + r * sh) * W + q * sw]);
      }
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_down_sync(0xffffffffu, acc, offset);
  if (lane == 0) dv[j] = static_cast<scalar_t>(acc);
}

at::Tensor sparse_conv2d_grad_input_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                                         const at::Tensor& gy, at::IntArrayRef x_size, at::IntArrayRef kernel,
                                         at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding,
                                         const std::optional<at::Tensor>& t_rowptr,
                                         const std::optional<at::Tensor>& t_col,
                                         const std::optional<at::Tensor>& t_perm) {
  const char* op = "sparse_conv2d_grad_input";
  check_csr(rowptr, col, values, op);
  const int64_t O = rowptr.numel() - 1;
  int64_t OH, OW;
  std::tie(OH, OW) = check_conv_grad(gy, values, "values", O, x_size, kernel, stride, dilation, padding, op);
  TORCH_CHECK_VALUE(values.is_cuda(), op, ": tensors must be on a CUDA device for the CUDA kernel");
  TORCH_CHECK_VALUE(has_transposed(t_rowptr, t_col, t_perm), op,
                    ": the CUDA kernel needs W's transposed structure (t_rowptr, t_col, t_perm)");
  // the gradient of the padded input, whose interior is returned
  const int64_t N = x_size[0], C = x_size[1], H = x_size[2] + 2 * padding[0], W = x_size[3] + 2 * padding[1];
  check_transposed(values, *t_rowptr, *t_col, *t_perm, C * kernel[0] * kernel[1], op);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor g = gy.contiguous();
  // a channels-last gy gives a channels-last dx (as the CPU kernel)
  const bool cl = channels_last(gy);
  const at::MemoryFormat format = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  if (N * C * x_size[2] * x_size[3] == 0 || g.numel() == 0 || values.numel() == 0)  // (at::zeros would drop the
    return empty_output_4d({N, C, x_size[2], x_size[3]}, g.options(), cl).zero_();   // memory format)
  at::Tensor dx = at::empty({N, C, H, W}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_conv2d_grad_input_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(*t_col, "sparse_conv2d_grad_input_cuda", [&] {
      conv_grad_input_kernel<index_t, scalar_t><<<cuda::grid_for(dx.numel()), cuda::kThreads, 0, cuda::stream()>>>(
          t_rowptr->const_data_ptr<int32_t>(), t_col->const_data_ptr<index_t>(), t_perm->const_data_ptr<int32_t>(),
          values.const_data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), N, C, H,
          W, O, OH, OW, kernel[0], kernel[1], stride[0], stride[1], dilation[0], dilation[1], values.numel());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (padding[0] == 0 && padding[1] == 0) return dx.contiguous(format);
  return dx.narrow(2, padding[0], x_size[2]).narrow(3, padding[1], x_size[3]).contiguous(format);
}

at::Tensor sparse_conv2d_grad_values_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& x,
                                          const at::Tensor& gy, at::IntArrayRef kernel, at::IntArrayRef stride,
                                          at::IntArrayRef dilation, at::IntArrayRef padding) {
  int64_t OH, OW;
  std::tie(OH, OW) = check_sparse_conv2d_grad_values(rowptr, col, x, gy, kernel, stride, dilation, padding);
  TORCH_CHECK_VALUE(x.is_cuda(), "sparse_conv2d_grad_values: tensors must be on a CUDA device for the CUDA kernel");
  const int64_t O = rowptr.numel() - 1, nnz = col.numel();
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = padded(x, padding), g = gy.contiguous();
  at::Tensor dv = at::zeros({nnz}, x.options());
  if (nnz == 0 || g.numel() == 0) return dv;
  const dim3 block(kWarp, kWarpsPerBlock);
  const unsigned int grid = static_cast<unsigned int>((nnz + kWarpsPerBlock - 1) / kWarpsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_conv2d_grad_values_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "sparse_conv2d_grad_values_cuda", [&] {
      conv_grad_values_kernel<index_t, scalar_t><<<grid, block, 0, cuda::stream()>>>(
          rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), xc.const_data_ptr<scalar_t>(),
          g.const_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), xc.size(0), xc.size(1), xc.size(2),
          xc.size(3), O, OH, OW, kernel[0], kernel[1], stride[0], stride[1], dilation[0], dilation[1], nnz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_conv2d_grad_input", &sparse_conv2d_grad_input_cuda);
  m.impl("sparse_conv2d_grad_values", &sparse_conv2d_grad_values_cuda);
}

}  // namespace pysparse
