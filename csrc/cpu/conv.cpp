// Direct sparse convolution, CPU (Park et al., "Faster CNNs with direct sparse convolutions"): no im2col. A
// thread owns output planes (n, o); each stored weight (o, c, ki, kj) adds value * a shifted window of input
// plane c to the plane, one output row at a time (a vectorised AXPY for stride 1). The plane accumulates in
// float32 in a thread-local buffer that stays in cache; the only large buffer is the output itself.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "../common.h"

namespace pysparse {
namespace {

// A task is (block of images, output channel o). Its float32 accumulator holds the block's output planes with
// the padded input's row stride W when stride_w == 1 ("extended rows": the W - OW extra columns per row are
// computed and dropped), so that for stride 1 each stored weight costs one contiguous AXPY per image over
// (OH - 1) * W + OW elements instead of OH short ones. Index decoding is shared by the block's images.
template <typename index_t, typename scalar_t>
void conv_kernel(const int32_t* rowptr, const index_t* col, const scalar_t* values, const scalar_t* x,
                 const scalar_t* bias, scalar_t* y, int64_t N, int64_t C, int64_t H, int64_t W, int64_t O,
                 int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw,
                 std::atomic<bool>& bad) {
  const int64_t K = C * kh * kw;
  const int64_t XW = sw == 1 ? W : OW;  // accumulator row stride
  const int64_t aplane = OH * XW;
  // Images per task: the block's accumulators within 256 KB and its input planes within ~512 KB, so that a
  // thread, which takes consecutive tasks (image-block major), sweeps every output channel over inputs in L2.
  const int64_t by_acc = (int64_t{1} << 16) / std::max<int64_t>(1, aplane);
  const int64_t by_input = (int64_t{1} << 17) / std::max<int64_t>(1, C * H * W);
  const int64_t nblock = std::max<int64_t>(1, std::min({N, by_acc, by_input}));
  const int64_t nblocks = (N + nblock - 1) / nblock;
  at::parallel_for(0, O * nblocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(static_cast<size_t>(nblock * aplane));
    bool local_bad = false;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t o = task % O, n0 = (task / O) * nblock, n1 = std::min(N, n0 + nblock);
      std::fill(acc.begin(), acc.end(), bias ? static_cast<float>(bias[o]) : 0.f);
      for (int64_t j = rowptr[o]; j < rowptr[o + 1]; ++j) {
        const int64_t k = col[j];
        if (static_cast<uint64_t>(k) >= static_cast<uint64_t>(K)) {
          local_bad = true;
          continue;
        }
        const int64_t c = k / (kh * kw), ki = (k / kw) % kh, kj = k % kw;
        const float v = static_cast<float>(values[j]);
        for (int64_t n = n0; n < n1; ++n) {
          float* out = acc.data() + (n - n0) * aplane;
          const scalar_t* in = x + ((n * C + c) * H + ki * dh) * W + kj * dw;
          if (sw == 1 && sh == 1) {
            const int64_t len = (OH - 1) * W + OW;  // stays inside the plane: ki*dh + OH - 1 <= H - 1
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) out[i] += v * static_cast<float>(in[i]);
          } else if (sw == 1) {
            for (int64_t r = 0; r < OH; ++r) {
              const scalar_t* row = in + r * sh * W;
#pragma omp simd
              for (int64_t q = 0; q < OW; ++q) out[r * XW + q] += v * static_cast<float>(row[q]);
            }
          } else {
            for (int64_t r = 0; r < OH; ++r) {
              const scalar_t* row = in + r * sh * W;
              for (int64_t q = 0; q < OW; ++q) out[r * XW + q] += v * static_cast<float>(row[q * sw]);
            }
          }
        }
      }
      for (int64_t n = n0; n < n1; ++n) {
        scalar_t* dst = y + (n * O + o) * OH * OW;
        const float* src = acc.data() + (n - n0) * aplane;
        for (int64_t r = 0; r < OH; ++r)
          for (int64_t q = 0; q < OW; ++q) dst[r * OW + q] = static_cast<scalar_t>(src[r * XW + q]);
      }
    }
    if (local_bad) bad = true;
  });
}

// float64 (gradcheck): a plain loop accumulating in the output (double).
template <typename index_t, typename scalar_t>
void conv_kernel_plain(const int32_t* rowptr, const index_t* col, const scalar_t* values, const scalar_t* x,
                       const scalar_t* bias, scalar_t* y, int64_t N, int64_t C, int64_t H, int64_t W, int64_t O,
                       int64_t OH, int64_t OW, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh,
                       int64_t dw, std::atomic<bool>& bad) {
  const int64_t K = C * kh * kw, plane = OH * OW;
  at::parallel_for(0, N * O, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t n = task / O, o = task % O;
      scalar_t* out = y + task * plane;
      std::fill(out, out + plane, bias ? bias[o] : scalar_t(0));
      for (int64_t j = rowptr[o]; j < rowptr[o + 1]; ++j) {
        const int64_t k = col[j];
        if (static_cast<uint64_t>(k) >= static_cast<uint64_t>(K)) {
          bad = true;
          continue;
        }
        const int64_t c = k / (kh * kw), ki = (k / kw) % kh, kj = k % kw;
        for (int64_t r = 0; r < OH; ++r)
          for (int64_t q = 0; q < OW; ++q)
            out[r * OW + q] += values[j] * x[((n * C + c) * H + r * sh + ki * dh) * W + q * sw + kj * dw];
      }
    }
  });
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                             const at::Tensor& x, const std::optional<at::Tensor>& bias, at::IntArrayRef kernel,
                             at::IntArrayRef stride, at::IntArrayRef dilation, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  const auto [OH, OW] = check_sparse_conv2d(rowptr, col, values, x, bias, kernel, stride, dilation);
  TORCH_CHECK_VALUE(values.device().is_cpu(), "sparse_conv2d: tensors must be on the CPU for the CPU kernel");
  const int32_t* rp = rowptr.const_data_ptr<int32_t>();
  const int64_t O = rowptr.numel() - 1;
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[O] == values.numel(), "sparse_conv2d: rowptr must start at 0 and end at nnz");
  for (int64_t r = 0; r < O; ++r) TORCH_CHECK_VALUE(rp[r] <= rp[r + 1], "sparse_conv2d: rowptr must be non-decreasing");
  const at::Tensor xc = x.contiguous();
  const at::Tensor bs = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3);
  at::Tensor y = at::empty({N, O, OH, OW}, xc.options());
  if (y.numel() == 0) return y;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_conv2d_cpu", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "sparse_conv2d_cpu", [&] {
      const scalar_t* bp = bs.defined() ? bs.const_data_ptr<scalar_t>() : nullptr;
      if (std::is_same_v<scalar_t, double>) {
        conv_kernel_plain<index_t, scalar_t>(rp, col.const_data_ptr<index_t>(), values.const_data_ptr<scalar_t>(),
                                             xc.const_data_ptr<scalar_t>(), bp, y.mutable_data_ptr<scalar_t>(), N, C,
                                             H, W, O, OH, OW, kernel[0], kernel[1], stride[0], stride[1],
                                             dilation[0], dilation[1], bad);
      } else {
        conv_kernel<index_t, scalar_t>(rp, col.const_data_ptr<index_t>(), values.const_data_ptr<scalar_t>(),
                                       xc.const_data_ptr<scalar_t>(), bp, y.mutable_data_ptr<scalar_t>(), N, C, H, W,
                                       O, OH, OW, kernel[0], kernel[1], stride[0], stride[1], dilation[0],
                                       dilation[1], bad);
      }
    });
  });
  TORCH_CHECK_VALUE(!bad, "sparse_conv2d: a column index is outside [0, C * kh * kw)");
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("sparse_conv2d", &sparse_conv2d_cpu); }

}  // namespace pysparse
