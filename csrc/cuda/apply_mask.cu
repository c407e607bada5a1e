// apply_mask_, CUDA twin of csrc/cpu/apply_mask.cpp: one pass over the mask; a tensor element is written
// only where the mask is False. Tensors are handled by element size (zero is the all-zero bit pattern).
#include <cub/block/block_reduce.cuh>
#include <torch/library.h>

#include "../common.h"
#include "launch.cuh"

namespace pysparse {
namespace {

constexpr int kMaxTargets = 8;  // tensors per launch; longer lists go in several launches

struct Targets {
  void* data[kMaxTargets];
  int element_size[kMaxTargets];
  int count;
};

template <typename T>
__device__ __forceinline__ void zero_at(void* p, int64_t i) {
  static_cast<T*>(p)[i] = T(0);
}

__global__ void apply_mask_kernel(const bool* __restrict__ mask, int64_t n, Targets targets,
                                  unsigned long long* kept) {
  unsigned long long local = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    if (mask[i]) {
      ++local;
      continue;
    }
    for (int t = 0; t < targets.count; ++t) {
      switch (targets.element_size[t]) {
        case 1: zero_at<uint8_t>(targets.data[t], i); break;
        case 2: zero_at<uint16_t>(targets.data[t], i); break;
        case 4: zero_at<uint32_t>(targets.data[t], i); break;
        default: zero_at<uint64_t>(targets.data[t], i); break;
      }
    }
  }
  if (kept == nullptr) return;
  using BlockReduce = cub::BlockReduce<unsigned long long, cuda::kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  const unsigned long long block_total = BlockReduce(temp).Sum(local);
  if (threadIdx.x == 0 && block_total > 0) atomicAdd(kept, block_total);
}

at::Tensor apply_mask_cuda(const at::Tensor& mask, at::TensorList tensors) {
  check_apply_mask_args(mask, tensors);
  TORCH_CHECK_VALUE(mask.is_cuda(), "apply_mask_: mask must be on a CUDA device for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor mk = mask.contiguous();
  const int64_t n = mk.numel();
  at::Tensor kept = at::zeros({}, mk.options().dtype(at::kLong));
  if (n == 0) return kept;
  std::vector<at::Tensor> fused;
  for (const at::Tensor& t : tensors) {
    if (t.is_contiguous()) {
      fused.push_back(t);
    } else {
      at::Tensor view = t;
      view.masked_fill_(mk.logical_not(), 0);
    }
  }
  const auto stream = cuda::stream();
  // The first launch counts the kept elements; a launch is made even when no tensor is fused.
  size_t next = 0;
  bool first = true;
  do {
    Targets targets{};
    targets.count = 0;
    for (; next < fused.size() && targets.count < kMaxTargets; ++next, ++targets.count) {
      targets.data[targets.count] = fused[next].mutable_data_ptr();
      targets.element_size[targets.count] = static_cast<int>(fused[next].element_size());
    }
    unsigned long long* counter =
        first ? reinterpret_cast<unsigned long long*>(kept.mutable_data_ptr<int64_t>()) : nullptr;
    first = false;
    apply_mask_kernel<<<cuda::grid_for(n), cuda::kThreads, 0, stream>>>(mk.const_data_ptr<bool>(), n, targets,
                                                                         counter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } while (next < fused.size());
  return kept;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) { m.impl("apply_mask_", &apply_mask_cuda); }

}  // namespace pysparse
