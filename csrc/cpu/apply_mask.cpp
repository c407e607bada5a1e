// apply_mask_, CPU: zero every tensor where mask is False, in one pass over the mask. Zeroing writes the
// all-zero bit pattern, which is 0 for every float format (and for integers), so tensors are handled by
// element size alone: a weight, its grad and optimizer state of any dtype go through the same loop.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common.h"

namespace pysparse {
namespace {

constexpr int64_t kBlock = 4096;  // mask bytes kept in L1 while every tensor is zeroed over the same range

struct Target {
  void* data;
  int64_t element_size;
};

template <typename T>
inline void zero_where_false(T* p, const bool* m, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) p[i] = m[i] ? p[i] : T(0);
}

at::Tensor apply_mask_cpu(const at::Tensor& mask, at::TensorList tensors) {
  check_apply_mask_args(mask, tensors);
  TORCH_CHECK_VALUE(mask.device().is_cpu(), "apply_mask_: mask must be on the CPU for the CPU kernel");
  const at::Tensor mk = mask.contiguous();
  const bool* m = mk.const_data_ptr<bool>();
  std::vector<Target> targets;
  for (const at::Tensor& t : tensors) {
    if (t.is_contiguous()) {
      targets.push_back({t.mutable_data_ptr(), static_cast<int64_t>(t.element_size())});
    } else {
      // A strided view: zero it through ATen (correct for any layout) rather than the fused pass.
      at::Tensor view = t;
      view.masked_fill_(mk.logical_not(), 0);
    }
  }
  const int64_t kept = at::parallel_reduce(
      0, mk.numel(), at::internal::GRAIN_SIZE, int64_t{0},
      [&](int64_t begin, int64_t end, int64_t kept) {
        for (int64_t b = begin; b < end; b += kBlock) {
          const int64_t e = std::min(b + kBlock, end);
          for (const Target& t : targets) {
            switch (t.element_size) {
              case 1: zero_where_false(static_cast<uint8_t*>(t.data), m, b, e); break;
              case 2: zero_where_false(static_cast<uint16_t*>(t.data), m, b, e); break;
              case 4: zero_where_false(static_cast<uint32_t*>(t.data), m, b, e); break;
              case 8: zero_where_false(static_cast<uint64_t*>(t.data), m, b, e); break;
              default: TORCH_CHECK(false, "apply_mask_: unsupported element size ", t.element_size);
            }
          }
          for (int64_t i = b; i < e; ++i) kept += m[i];
        }
        return kept;
      },
      std::plus<int64_t>());
  return at::scalar_tensor(kept, mk.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) { m.impl("apply_mask_", &apply_mask_cpu); }

}  // namespace pysparse
