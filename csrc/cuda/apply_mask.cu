// apply_mask_, CUDA twin of csrc/cpu/apply_mask.cpp: one pass over the mask, 4 elements per thread step; a
// tensor's elements are written only in groups of 4 with at least one False (those groups whole: the kept
// elements rewritten with their own bits). Tensors are handled by element size (zero is the all-zero bit
// pattern).
#include <cub/block/block_reduce.cuh>
#include <cstdint>
#include <torch/library.h>

#include "../common.h"
#include "launch.cuh"

namespace pysparse {
namespace {

constexpr int kMaxTargets = 8;  // tensors per launch; longer lists go in several launches

struct Targets {
  void* data[kMaxTargets];
  int element_size[kMaxTargets];
  bool quads[kMaxTargets];  // aligned to 4 elements: read and written 4 elements at a time
  int count;
};

// Four consecutive elements of T, accessed as one vector (4, 8, 16 or 32 bytes).
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// Elements 4q .. 4q+3 of a T tensor zeroed where bit k of `keep` is 0 (keep < 15: at least one is dropped). A
// quad dropped whole is one vector store; a mixed one a vector load, the dropped elements zeroed, a store (its
// kept elements written back unchanged: one full-width store instead of up to three partial ones).
template <typename T>
__device__ __forceinline__ void zero_quad(void* base, int64_t q, uint32_t keep) {
  Quad<T>* p = static_cast<Quad<T>*>(base) + q;
  Quad<T> out;
  if (keep == 0) {
#pragma unroll
    for (int k = 0; k < 4; ++k) out.v[k] = T(0);
  } else {
    out = *p;
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (!((keep >> k) & 1u)) out.v[k] = T(0);
  }
  *p = out;
}

__device__ __forceinline__ void zero_element(void* p, int element_size, int64_t i) {
  switch (element_size) {
    case 1: static_cast<uint8_t*>(p)[i] = 0; break;
    case 2: static_cast<uint16_t*>(p)[i] = 0; break;
    case 4: static_cast<uint32_t*>(p)[i] = 0; break;
    default: static_cast<uint64_t*>(p)[i] = 0; break;
  }
}

// A thread takes 4 mask bytes at a time (one 4-byte load where the mask is aligned, ALIGNED) and the same 4
// elements of every target: a warp reads 128 contiguous mask bytes and writes 128 * element-size contiguous bytes
// per target, in one vector access per thread (targets not aligned to 4 elements: element by element). The
// first n - n % 4 elements so, the rest one thread each. Kept elements are counted into *kept (if given).
template <bool ALIGNED>
__global__ void apply_mask_kernel(const bool* __restrict__ mask, int64_t n, Targets targets,
                                  unsigned long long* kept) {
  unsigned long long local = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x, quads = n / 4;
  for (int64_t q = tid; q < quads; q += stride) {
    uint32_t keep = 0;  // bit k: element 4q + k is kept (a non-zero mask byte)
    if constexpr (ALIGNED) {
      const uint32_t w = reinterpret_cast<const uint32_t*>(mask)[q];
#pragma unroll
      for (int k = 0; k < 4; ++k) keep |= ((w >> (8 * k)) & 0xFFu) != 0 ? (1u << k) : 0u;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) keep |= mask[4 * q + k] ? (1u << k) : 0u;
    }
    local += __popc(keep);
    if (keep == 0xFu) continue;
    for (int t = 0; t < targets.count; ++t) {
      void* d = targets.data[t];
      const int es = targets.element_size[t];
      if (targets.quads[t]) {
        switch (es) {
          case 1: zero_quad<uint8_t>(d, q, keep); break;
          case 2: zero_quad<uint16_t>(d, q, keep); break;
          case 4: zero_quad<uint32_t>(d, q, keep); break;
          default: zero_quad<uint64_t>(d, q, keep); break;
        }
      } else {
#pragma unroll
        for (int k = 0; k < 4; ++k)
          if (!((keep >> k) & 1u)) zero_element(d, es, 4 * q + k);
      }
    }
  }
  for (int64_t i = 4 * quads + tid; i < n; i += stride) {
    if (mask[i]) {
      ++local;
      continue;
    }
    for (int t = 0; t < targets.count; ++t) zero_element(targets.data[t], targets.element_size[t], i);
  }
  if (kept == nullptr) return;
  using BlockReduce = cub::BlockReduce<unsigned long long, cuda::kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  const unsigned long long block_total = BlockReduce(temp).Sum(local);
  if (threadIdx.x == 0 && block_total > 0) atomicAdd(kept, block_total);
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

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
      void* data = fused[next].mutable_data_ptr();
      const size_t es = fused[next].element_size();
      targets.data[targets.count] = data;
      targets.element_size[targets.count] = static_cast<int>(es);
      targets.quads[targets.count] = aligned_to(data, 4 * es);
    }
    unsigned long long* counter =
        first ? reinterpret_cast<unsigned long long*>(kept.mutable_data_ptr<int64_t>()) : nullptr;
    first = false;
    const bool* mp = mk.const_data_ptr<bool>();
    const unsigned int grid = cuda::grid_for(std::max<int64_t>(n / 4, n % 4));
    if (aligned_to(mp, 4))
      apply_mask_kernel<true><<<grid, cuda::kThreads, 0, stream>>>(mp, n, targets, counter);
    else
      apply_mask_kernel<false><<<grid, cuda::kThreads, 0, stream>>>(mp, n, targets, counter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } while (next < fused.size());
  return kept;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) { m.impl("apply_mask_", &apply_mask_cuda); }

}  // namespace pysparse
