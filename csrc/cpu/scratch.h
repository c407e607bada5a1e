// Scratch memory that the CPU kernels reuse from one call to the next on the calling thread.
//
// A kernel that packs its input into a fresh multi-megabyte buffer on every call pays for it in page faults:
// blocks that large come from mmap, and the OS maps and zeroes every page again on first touch (about as long
// as a 99%-sparse product itself at batch 256, measured 2026-11-29). Kernels take their packed panels and
// accumulators from here instead. The memory is held per thread and slot until the thread ends or calls
// release_scratch(); requests above kScratchCacheBytes get fresh memory and are not kept.
#pragma once

#include <ATen/ATen.h>

namespace pysparse {
namespace cpu {

constexpr int64_t kScratchSlots = 5;
constexpr int64_t kScratchCacheBytes = int64_t{64} << 20;

// The calling thread's cached buffers, one per slot (bytes).
inline at::Tensor (&scratch_cache())[kScratchSlots] {
  thread_local at::Tensor cache[kScratchSlots];
  return cache;
}

// `numel` uninitialised elements of `dtype` (a 1-D CPU tensor) from slot `slot` of the calling thread's cache,
// valid until the next request for the same slot on this thread (the kernels use distinct slots for buffers
// alive at once).
inline at::Tensor scratch(int64_t slot, int64_t numel, at::ScalarType dtype = at::kFloat) {
  TORCH_CHECK(slot >= 0 && slot < kScratchSlots, "scratch: internal error, slot ", slot);
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > kScratchCacheBytes) return at::empty({numel}, at::TensorOptions().dtype(dtype).device(at::kCPU));
  at::Tensor& buf = scratch_cache()[slot];  // bytes; the c10 allocator aligns them to 64
  if (!buf.defined() || buf.numel() < bytes) {
    buf = at::Tensor();  // release the smaller block first
    buf = at::empty({std::max<int64_t>(bytes, 64)}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
  }
  return buf.narrow(0, 0, bytes).view(dtype);
}

// Drops the calling thread's cached buffers (views a caller still holds keep theirs alive until dropped) and
// returns the bytes released: pysparse.ops.release_scratch().
inline int64_t release_scratch() {
  int64_t released = 0;
  for (at::Tensor& buf : scratch_cache()) {
    if (buf.defined()) released += buf.numel();
    buf = at::Tensor();
  }
  return released;
}

}  // namespace cpu
}  // namespace pysparse
