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

// Blocks for a grid-stride loop over n elements: enough to fill the device, no more than needed.
inline unsigned int grid_for(int64_t n) {
  const int64_t needed = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::max<int64_t>(1, std::min<int64_t>(needed, sm_count() * 16)));
}

}  // namespace cuda
}  // namespace pysparse
