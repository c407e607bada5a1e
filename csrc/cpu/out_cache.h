// Memory for the CPU kernels' outputs (the forward's result, the input and values gradients), reused from one
// call to the next.
//
// PyTorch's CPU allocator is malloc. In a training loop the multi-megabyte tensors a step allocates (a layer's
// output, its input gradient) are freed at the end of the step, glibc hands the top of its heap back to the OS
// (or unmaps blocks it mapped), and the next step's tensors fault every page in again, zeroed by the kernel:
// 11% of a 4096 x 4096, 99%-sparse training step at batch 256 (perf, 2026-11-29), ~0.27 ms of 2.3. The ops
// here allocate their outputs from a cache instead: a block that a freed output leaves is kept (up to a limit
// on the bytes held, 256 MB unless PYSPARSE_CPU_CACHE_MB says otherwise) and handed to the next output of the
// same rounded size. The tensors are ordinary CPU tensors (resizable; their storage frees through the cache).
// pysparse.ops.empty_cpu_cache() hands the held blocks back; set_cpu_cache_limit() changes the limit.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace pysparse {
namespace cpu {

// Uninitialised CPU tensor (contiguous, or in `options`' memory format) whose memory comes from the cache.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every block the cache holds; returns the bytes freed.
int64_t empty_cpu_cache();

// Sets the most bytes the cache holds (0: none, every output freed as before) and returns the previous
// limit; blocks above the new limit are freed at once.
int64_t set_cpu_cache_limit(int64_t bytes);

// The bytes the cache holds now.
int64_t cpu_cache_bytes();

}  // namespace cpu
}  // namespace pysparse
