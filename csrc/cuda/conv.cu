// Direct sparse convolution, CUDA twin of csrc/cpu/conv.cpp: one thread per output element (n, o, oh, ow);
// the threads of a warp share o (consecutive ow), so they walk the same stored weights in step and their reads
// of an input row are coalesced. Row ranges are clamped and out-of-range column indices skipped, as in spmm.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common.h"
#include "launch.cuh"

namespace pysparse {
namespace {

template <typename index_t, typename scalar_t>
__global__ void conv_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                            const scalar_t* __restrict__ values, const scalar_t* __restrict__ x,
                            const scalar_t* __restrict__ bias, scalar_t* __restrict__ y, int64_t N, int64_t C,
                            int64_t H, int64_t W, int64_t O, int64_t OH, int64_t OW, int64_t kh, int64_t kw,
                            int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t nnz) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = N * O * OH * OW, K = C * kh * kw;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t q = idx % OW, r = (idx / OW) % OH, o = (idx / (OW * OH)) % O, n = idx / (OW * OH * O);
    const int64_t j0 = min(max(static_cast<int64_t>(rowptr[o]), int64_t{0}), nnz);
    const int64_t j1 = min(max(static_cast<int64_t>(rowptr[o + 1]), j0), nnz);
    acc_t acc = bias ? static_cast<acc_t>(bias[o]) : acc_t(0);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k = col[j];
      if (k < 0 || k >= K) continue;
      const int64_t c = k / (kh * kw), ki = (k / kw) % kh, kj = k % kw;
      acc += static_cast<acc_t>(values[j]) *
             static_cast<acc_t>(x[((n * C + c) * H + r * sh + ki * dh) * W + q * sw + kj * dw]);
    }
    y[idx] = static_cast<scalar_t>(acc);
  }
}

at::Tensor sparse_conv2d_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                              const at::Tensor& x, const std::optional<at::Tensor>& bias, at::IntArrayRef kernel,
                              at::IntArrayRef stride, at::IntArrayRef dilation, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  const auto [OH, OW] = check_sparse_conv2d(rowptr, col, values, x, bias, kernel, stride, dilation);
  TORCH_CHECK_VALUE(values.is_cuda(), "sparse_conv2d: tensors must be on a CUDA device for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor xc = x.contiguous();
  const at::Tensor bs = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3), O = rowptr.numel() - 1;
  at::Tensor y = at::empty({N, O, OH, OW}, xc.options());
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_conv2d_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "sparse_conv2d_cuda", [&] {
      conv_kernel<index_t, scalar_t><<<cuda::grid_for(y.numel()), cuda::kThreads, 0, cuda::stream()>>>(
          rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), values.const_data_ptr<scalar_t>(),
          xc.const_data_ptr<scalar_t>(), bs.defined() ? bs.const_data_ptr<scalar_t>() : nullptr,
          y.mutable_data_ptr<scalar_t>(), N, C, H, W, O, OH, OW, kernel[0], kernel[1], stride[0], stride[1],
          dilation[0], dilation[1], values.numel());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) { m.impl("sparse_conv2d", &sparse_conv2d_cuda); }

}  // namespace pysparse
