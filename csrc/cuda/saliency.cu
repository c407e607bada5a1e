// Fused saliency scoring, CUDA twin of csrc/cpu/saliency.cpp.
#include <torch/library.h>

#include "../common.h"
#include "launch.cuh"

namespace pysparse {
namespace {

template <typename scalar_t, Method M>
__global__ void saliency_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ g,
                                const scalar_t* __restrict__ h, float* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    float v;
    if constexpr (M == Method::Magnitude) {
      v = fabsf(static_cast<float>(w[i]));
    } else if constexpr (M == Method::Gradient) {
      v = fabsf(static_cast<float>(g[i]));
    } else if constexpr (M == Method::Taylor) {
      v = fabsf(static_cast<float>(g[i]) * static_cast<float>(w[i]));
    } else {
      const float wi = static_cast<float>(w[i]);
      v = 0.5f * static_cast<float>(h[i]) * wi * wi;
    }
    out[i] = v;
  }
}

template <typename scalar_t, Method M>
void launch(const scalar_t* w, const scalar_t* g, const scalar_t* h, float* out, int64_t n) {
  saliency_kernel<scalar_t, M><<<cuda::grid_for(n), cuda::kThreads, 0, cuda::stream()>>>(
      w, g, h, out, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor saliency_cuda(const at::Tensor& weight, c10::string_view method_name,
                         const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& hessian) {
  const Method method = check_saliency_args(weight, std::string_view(method_name.data(), method_name.size()),
                                            grad, hessian);
  TORCH_CHECK_VALUE(weight.is_cuda(), "saliency: weight must be on a CUDA device for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const at::Tensor g = (method == Method::Gradient || method == Method::Taylor) ? grad->contiguous() : at::Tensor();
  const at::Tensor h = method == Method::Hessian ? hessian->contiguous() : at::Tensor();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kFloat));
  const int64_t n = w.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "saliency_cuda", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* hp = h.defined() ? h.const_data_ptr<scalar_t>() : nullptr;
    float* op = out.mutable_data_ptr<float>();
    switch (method) {
      case Method::Magnitude: launch<scalar_t, Method::Magnitude>(wp, gp, hp, op, n); break;
      case Method::Gradient: launch<scalar_t, Method::Gradient>(wp, gp, hp, op, n); break;
      case Method::Taylor: launch<scalar_t, Method::Taylor>(wp, gp, hp, op, n); break;
      case Method::Hessian: launch<scalar_t, Method::Hessian>(wp, gp, hp, op, n); break;
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) { m.impl("saliency", &saliency_cuda); }

}  // namespace pysparse
