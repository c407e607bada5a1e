// Small helpers shared by the CUDA kernels. Only c10's CUDA headers: ATen/cuda/CUDAContext.h would pull in
// the cuBLAS/cuSPARSE headers, which a bare CUDA toolkit may not have.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace pysparse {
namespace cuda {

constexpr int kThreads = 256;

inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline int64_t sm_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

// Row r's stored positions [j0, j1) in a CSR rowptr, clamped to [0, nnz]: a malformed rowptr yields a shorter or
// empty range, never a read outside the arrays (no host sync to check it first).
__device__ __forceinline__ void row_bounds(const int32_t* rowptr, int64_t r, int64_t nnz, int64_t& j0, int64_t& j1) {
  j0 = min(max(static_cast<int64_t>(rowptr[r]), int64_t{0}), nnz);
  j1 = min(max(static_cast<int64_t>(rowptr[r + 1]), j0), nnz);
}

// Blocks for a grid-stride loop over n elements: enough to fill the device, no more than needed.
inline unsigned int grid_for(int64_t n) {
  const int64_t needed = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(needed, sm_count() * 16)));
}

}  // namespace cuda
}  // namespace pysparse
