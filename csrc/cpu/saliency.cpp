// Fused saliency scoring, CPU. One pass: read weight (and grad or hessian), write float32 scores.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

namespace pysparse {
namespace {

template <typename scalar_t>
void saliency_kernel(Method method, const scalar_t* w, const scalar_t* g, const scalar_t* h, float* out,
                     int64_t n) {
  at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    switch (method) {
      case Method::Magnitude:
        for (int64_t i = begin; i < end; ++i) out[i] = std::abs(static_cast<float>(w[i]));
        break;
      case Method::Gradient:
        for (int64_t i = begin; i < end; ++i) out[i] = std::abs(static_cast<float>(g[i]));
        break;
      case Method::Taylor:
        for (int64_t i = begin; i < end; ++i) out[i] = std::abs(static_cast<float>(g[i]) * static_cast<float>(w[i]));
        break;
      case Method::Hessian:
        for (int64_t i = begin; i < end; ++i) {
          const float wi = static_cast<float>(w[i]);
          out[i] = 0.5f * static_cast<float>(h[i]) * wi * wi;
        }
        break;
    }
  });
}

at::Tensor saliency_cpu(const at::Tensor& weight, c10::string_view method_name,
                        const std::optional<at::Tensor>& grad, const std::optional<at::Tensor>& hessian) {
  const Method method = check_saliency_args(weight, std::string_view(method_name.data(), method_name.size()),
                                            grad, hessian);
  TORCH_CHECK_VALUE(weight.device().is_cpu(), "saliency: weight must be on the CPU for the CPU kernel");
  const at::Tensor w = weight.contiguous();
  const at::Tensor g = (method == Method::Gradient || method == Method::Taylor) ? grad->contiguous() : at::Tensor();
  const at::Tensor h = method == Method::Hessian ? hessian->contiguous() : at::Tensor();
  at::Tensor out = at::empty(w.sizes(), w.options().dtype(at::kFloat));
  if (w.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "saliency_cpu", [&] {
    saliency_kernel<scalar_t>(method, w.const_data_ptr<scalar_t>(),
                              g.defined() ? g.const_data_ptr<scalar_t>() : nullptr,
                              h.defined() ? h.const_data_ptr<scalar_t>() : nullptr,
                              out.mutable_data_ptr<float>(), w.numel());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("saliency", &saliency_cpu); }

}  // namespace pysparse
