// The cache sizes the CPU kernels size their work by (csrc/cpu/spmm.cpp, csrc/cpu/conv.cpp), and their rule for
// writing an output by streaming stores.
#pragma once

#include <ATen/Parallel.h>
#if __has_include(<unistd.h>)
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>

namespace pysparse {
namespace cpu {

// One core's L2 cache in bytes, as the system reports it (512 KB where it does not), read once.
inline int64_t l2_bytes() {
  static const int64_t bytes = [] {
    long reported = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return reported > 0 ? std::clamp<int64_t>(reported, int64_t{256} << 10, int64_t{4} << 20) : int64_t{512} << 10;
  }();
  return bytes;
}

// The threads' L2 caches together. An output larger than that is written by streaming stores (vec.h's
// stream_lanes, where its 16-lane blocks are 64-byte aligned), so that the next kernel would not find it there
// anyway: written through the caches, each line of such an output is first read from memory, then written back
// when evicted, and it pushes the kernel's inputs out of L3. Figures where each kernel takes it (conv.cpp:
// channels-last outputs and input gradients; spmm.cpp: RowWriter, batch-major input gradients).
inline int64_t stream_bytes() { return l2_bytes() * at::get_num_threads(); }

// Whether a tensor of `elements` elements is larger than the threads' L2 caches together.
template <typename scalar_t>
inline bool beyond_caches(int64_t elements) {
  return elements * static_cast<int64_t>(sizeof(scalar_t)) > stream_bytes();
}

}  // namespace cpu
}  // namespace pysparse
