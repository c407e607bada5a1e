// Mask selection, CUDA twin of csrc/cpu/masks.cpp. sparsity_masks is a three-pass radix select (11, 11 and
// 10 bits) over the float keys of every score tensor in place: one launch per pass covers the whole list
// through a chunk table, each block building a shared-memory histogram. Ties at the threshold are ranked in
// global order with a per-chunk count, an exclusive scan and a block scan.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <torch/library.h>

#include "../common.h"
#include "launch.cuh"

namespace pysparse {
namespace {

using cuda::kThreads;
constexpr int64_t kChunk = 4096;  // elements per block
constexpr int kMaxBins = 2048;

struct DevSource {
  const void* data;
  bool* mask;
  int64_t dtype;  // 0 float32, 1 float16, 2 bfloat16
};

__device__ __forceinline__ float load_value(const DevSource& s, int64_t i) {
  if (s.dtype == 0) return static_cast<const float*>(s.data)[i];
  if (s.dtype == 1) return static_cast<float>(static_cast<const c10::Half*>(s.data)[i]);
  return static_cast<float>(static_cast<const c10::BFloat16*>(s.data)[i]);
}

// The score list on the device: contiguous scores, bool masks, and the source and chunk tables.
struct Prepared {
  std::vector<at::Tensor> contig;
  std::vector<at::Tensor> masks;
  at::Tensor table;  // device bytes: DevSource[ntensors] then Chunk[nchunks]
  const DevSource* sources = nullptr;
  const Chunk* chunks = nullptr;
  int64_t ntensors = 0;
  int64_t nchunks = 0;
  int64_t total = 0;
};

Prepared prepare(at::TensorList scores, const char* op) {
  check_scores(scores, op);
  TORCH_CHECK_VALUE(scores[0].is_cuda(), op, ": scores must be on a CUDA device for the CUDA kernel");
  Prepared p;
  std::vector<DevSource> sources;
  std::vector<int64_t> numels;
  for (const at::Tensor& s : scores) {
    p.contig.push_back(s.contiguous());
    p.masks.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
    const int64_t code = s.scalar_type() == at::kFloat ? 0 : (s.scalar_type() == at::kHalf ? 1 : 2);
    sources.push_back({p.contig.back().const_data_ptr(), p.masks.back().mutable_data_ptr<bool>(), code});
    numels.push_back(s.numel());
    p.total += s.numel();
  }
  const std::vector<Chunk> chunks = make_chunks(numels, kChunk);
  p.ntensors = static_cast<int64_t>(sources.size());
  p.nchunks = static_cast<int64_t>(chunks.size());
  const size_t source_bytes = sources.size() * sizeof(DevSource);
  const size_t chunk_bytes = chunks.size() * sizeof(Chunk);
  at::Tensor host = at::empty({static_cast<int64_t>(source_bytes + chunk_bytes)}, at::kByte);
  std::memcpy(host.mutable_data_ptr<uint8_t>(), sources.data(), source_bytes);
  if (chunk_bytes) std::memcpy(host.mutable_data_ptr<uint8_t>() + source_bytes, chunks.data(), chunk_bytes);
  p.table = host.to(scores[0].device());
  p.sources = reinterpret_cast<const DevSource*>(p.table.const_data_ptr<uint8_t>());
  p.chunks = reinterpret_cast<const Chunk*>(p.table.const_data_ptr<uint8_t>() + source_bytes);
  return p;
}

// Histogram of the digit (key >> shift) & digit_mask over the keys matching prefix under prefix_mask. With
// nan_counts, also counts the NaNs of each tensor.
__global__ void histogram_kernel(const DevSource* __restrict__ sources, const Chunk* __restrict__ chunks, int shift,
                                 uint32_t digit_mask, uint32_t prefix_mask, uint32_t prefix,
                                 unsigned long long* hist, unsigned long long* nan_counts) {
  __shared__ unsigned int local[kMaxBins];
  for (int b = threadIdx.x; b < kMaxBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  const Chunk ch = chunks[blockIdx.x];
  const DevSource s = sources[ch.tensor];
  unsigned int nan = 0;
  for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) {
    const float v = load_value(s, i);
    if (v != v) {
      ++nan;
      continue;
    }
    const uint32_t k = float_key(v);
    if ((k & prefix_mask) == prefix) atomicAdd(&local[(k >> shift) & digit_mask], 1u);
  }
  if (nan && nan_counts) atomicAdd(&nan_counts[ch.tensor], static_cast<unsigned long long>(nan));
  __syncthreads();
  for (int b = threadIdx.x; b <= static_cast<int>(digit_mask); b += blockDim.x)
    if (local[b]) atomicAdd(&hist[b], static_cast<unsigned long long>(local[b]));
}

// keep = key >= keep_from (no ties to split).
__global__ void write_kernel(const DevSource* __restrict__ sources, const Chunk* __restrict__ chunks,
                             uint32_t keep_from) {
  const Chunk ch = chunks[blockIdx.x];
  const DevSource s = sources[ch.tensor];
  for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) s.mask[i] = float_key(load_value(s, i)) >= keep_from;
}

__global__ void count_equal_kernel(const DevSource* __restrict__ sources, const Chunk* __restrict__ chunks,
                                   uint32_t t, int64_t* counts) {
  const Chunk ch = chunks[blockIdx.x];
  const DevSource s = sources[ch.tensor];
  int count = 0;
  for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) count += float_key(load_value(s, i)) == t;
  using BlockReduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  const int total = BlockReduce(temp).Sum(count);
  if (threadIdx.x == 0) counts[blockIdx.x] = total;
}

// keep = key > t, and of key == t those whose global rank among the equal keys is >= need.
__global__ void write_ties_kernel(const DevSource* __restrict__ sources, const Chunk* __restrict__ chunks,
                                  uint32_t t, const int64_t* __restrict__ equal_before, int64_t need) {
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  const Chunk ch = chunks[blockIdx.x];
  const DevSource s = sources[ch.tensor];
  int64_t running = equal_before[blockIdx.x];
  for (int64_t base = ch.begin; base < ch.end; base += kThreads) {  // uniform across the block
    const int64_t i = base + threadIdx.x;
    const bool valid = i < ch.end;
    const uint32_t k = valid ? float_key(load_value(s, i)) : 0u;
    const int equal = valid && k == t;
    int rank = 0;
    int aggregate = 0;
    BlockScan(temp).ExclusiveSum(equal, rank, aggregate);
    __syncthreads();  // temp is reused by the next iteration
    if (valid) s.mask[i] = equal ? (running + rank >= need) : (k > t);
    running += aggregate;
  }
}

__global__ void threshold_kernel(const DevSource* __restrict__ sources, const Chunk* __restrict__ chunks,
                                 float threshold, unsigned long long* nan_counts) {
  const Chunk ch = chunks[blockIdx.x];
  const DevSource s = sources[ch.tensor];
  unsigned int nan = 0;
  for (int64_t i = ch.begin + threadIdx.x; i < ch.end; i += blockDim.x) {
    const float v = load_value(s, i);
    nan += v != v;
    s.mask[i] = v >= threshold;
  }
  if (nan) atomicAdd(&nan_counts[ch.tensor], static_cast<unsigned long long>(nan));
}

void raise_if_nan(const int64_t* nan_counts, int64_t ntensors, const char* op) {
  for (int64_t t = 0; t < ntensors; ++t) TORCH_CHECK_VALUE(nan_counts[t] == 0, op, ": scores[", t, "] contains NaN");
}

std::vector<at::Tensor> sparsity_masks_cuda(at::TensorList scores, int64_t num_prune) {
  const c10::cuda::CUDAGuard guard(scores.empty() ? at::Device(at::kCUDA) : scores[0].device());
  Prepared p = prepare(scores, "sparsity_masks");
  TORCH_CHECK_VALUE(num_prune >= 0 && num_prune <= p.total, "sparsity_masks: num_prune must be in [0, ", p.total,
                    "] (the number of scores), got ", num_prune);
  if (p.nchunks == 0) return p.masks;
  const auto stream = cuda::stream();
  // One buffer per pass: kMaxBins histogram counts, then a NaN count per tensor.
  struct Pass {
    int shift;
    uint32_t digit_mask;
  };
  const Pass passes[3] = {{21, 0x7FFu}, {10, 0x7FFu}, {0, 0x3FFu}};
  uint32_t prefix = 0, prefix_mask = 0;
  int64_t rank = num_prune - 1, below = 0, count_equal = 0;
  for (int pass = 0; pass < 3; ++pass) {
    at::Tensor buffer = at::zeros({kMaxBins + p.ntensors}, p.table.options().dtype(at::kLong));
    auto* hist = reinterpret_cast<unsigned long long*>(buffer.mutable_data_ptr<int64_t>());
    histogram_kernel<<<p.nchunks, kThreads, 0, stream>>>(p.sources, p.chunks, passes[pass].shift,
                                                         passes[pass].digit_mask, prefix_mask, prefix, hist,
                                                         pass == 0 ? hist + kMaxBins : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor host = buffer.cpu();
    const int64_t* h = host.const_data_ptr<int64_t>();
    if (pass == 0) {
      raise_if_nan(h + kMaxBins, p.ntensors, "sparsity_masks");
      if (num_prune == 0 || num_prune == p.total) {
        for (at::Tensor& m : p.masks) m.fill_(num_prune == 0);
        return p.masks;
      }
    }
    const BinRank br = find_rank_bin(h, static_cast<int64_t>(passes[pass].digit_mask) + 1, rank);
    rank -= br.below;
    below += br.below;
    prefix |= static_cast<uint32_t>(br.bin) << passes[pass].shift;
    prefix_mask |= passes[pass].digit_mask << passes[pass].shift;
    count_equal = h[br.bin];
  }
  const uint32_t t = prefix;
  const int64_t need = num_prune - below;
  if (need == count_equal) {
    write_kernel<<<p.nchunks, kThreads, 0, stream>>>(p.sources, p.chunks, t + 1u);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return p.masks;
  }
  at::Tensor counts = at::empty({p.nchunks}, p.table.options().dtype(at::kLong));
  count_equal_kernel<<<p.nchunks, kThreads, 0, stream>>>(p.sources, p.chunks, t, counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor equal_before = (at::cumsum(counts, 0) - counts).contiguous();
  write_ties_kernel<<<p.nchunks, kThreads, 0, stream>>>(p.sources, p.chunks, t,
                                                        equal_before.const_data_ptr<int64_t>(), need);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return p.masks;
}

std::vector<at::Tensor> threshold_masks_cuda(at::TensorList scores, double threshold) {
  const c10::cuda::CUDAGuard guard(scores.empty() ? at::Device(at::kCUDA) : scores[0].device());
  Prepared p = prepare(scores, "threshold_masks");
  TORCH_CHECK_VALUE(threshold == threshold, "threshold_masks: threshold is NaN");
  if (p.nchunks == 0) return p.masks;
  at::Tensor nan_counts = at::zeros({p.ntensors}, p.table.options().dtype(at::kLong));
  threshold_kernel<<<p.nchunks, kThreads, 0, cuda::stream()>>>(
      p.sources, p.chunks, static_cast<float>(threshold),
      reinterpret_cast<unsigned long long*>(nan_counts.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor host = nan_counts.cpu();
  raise_if_nan(host.const_data_ptr<int64_t>(), p.ntensors, "threshold_masks");
  return p.masks;
}

// One thread per group of m elements along dim 1; a group's elements are `inner` apart.
template <typename scalar_t>
__global__ void nm_kernel(const scalar_t* __restrict__ s, bool* __restrict__ keep, int64_t ngroups, int64_t d1,
                          int64_t inner, int n, int m, int* nan_flag) {
  const int64_t groups_per_row = d1 / m;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t gi = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; gi < ngroups; gi += stride) {
    const int64_t r = gi % inner;
    const int64_t g = (gi / inner) % groups_per_row;
    const int64_t o = gi / (inner * groups_per_row);
    const int64_t base = (o * d1 + g * m) * inner + r;
    bool nan = false;
    for (int j = 0; j < m; ++j) {
      const float v = static_cast<float>(s[base + j * inner]);
      nan |= v != v;
    }
    if (nan) atomicExch(nan_flag, 1);
    for (int j = 0; j < m; ++j) {
      const uint32_t kj = float_key(static_cast<float>(s[base + j * inner]));
      int rank = 0;  // elements that beat j: larger, or equal and earlier
      for (int q = 0; q < m; ++q) {
        const uint32_t kq = float_key(static_cast<float>(s[base + q * inner]));
        rank += (kq > kj) || (kq == kj && q < j);
      }
      keep[base + j * inner] = rank < n;
    }
  }
}

at::Tensor nm_masks_cuda(const at::Tensor& score, int64_t n, int64_t m) {
  const int64_t inner = check_nm_args(score, n, m);
  TORCH_CHECK_VALUE(score.is_cuda(), "nm_masks: score must be on a CUDA device for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(score.device());
  const at::Tensor s = score.contiguous();
  at::Tensor keep = at::empty(s.sizes(), s.options().dtype(at::kBool));
  if (s.numel() == 0) return keep;
  const int64_t ngroups = s.numel() / m;
  at::Tensor nan_flag = at::zeros({1}, s.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "nm_masks_cuda", [&] {
    nm_kernel<scalar_t><<<cuda::grid_for(ngroups), kThreads, 0, cuda::stream()>>>(
        s.const_data_ptr<scalar_t>(), keep.mutable_data_ptr<bool>(), ngroups, s.size(1), inner,
        static_cast<int>(n), static_cast<int>(m), nan_flag.mutable_data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  TORCH_CHECK_VALUE(nan_flag.item<int>() == 0, "nm_masks: score contains NaN");
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("sparsity_masks", &sparsity_masks_cuda);
  m.impl("threshold_masks", &threshold_masks_cuda);
  m.impl("nm_masks", &nm_masks_cuda);
}

}  // namespace pysparse
