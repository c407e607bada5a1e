// Sparse matmul, CUDA twin of csrc/cpu/spmm.cpp: spmm (CSR x dense), spmm_t (W^T x dense through W's
// transposed structure), sddmm (the values gradient) and spmm_grad (both gradients, one kernel over W^T). Same
// layout as the CPU: activations transposed, [features, batch], batch contiguous; an operand given as the
// transposed view of a batch-major tensor (the layers' input and output gradient) is copied so by a tiled
// transpose (batch_contiguous).
//
// A warp owns one row (spmm_kernel below: lanes split the batch into vectors and, for small batches, the row's
// stored values), and reads of an xt row are coalesced vector loads where alignment allows. Accumulation is
// float32 (float64 for float64).
//
// Column-tiled kernels (a block of rows copying the dense operand into shared memory a chunk of K at a time, so
// that L2 serves it once per block rather than once per stored value) were built in two versions and measured on
// an H200 (2026-12-04): correct, and 1.3-4.2x slower than these at batch 256, 80-95% (benchmarks/RESULTS.md,
// "third lease"): walking each row's stored values chunk by chunk cost more than the L2 reads it saved. Removed.
//
// Safety without host syncs: row ranges are clamped to [0, nnz], and a column index (or t_perm entry) outside
// its range is skipped, never read. Structures are validated where they are built or loaded (pysparse.csr).
#include <ATen/OpMathType.h>
#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <torch/library.h>

#include "../common.h"
#include "launch.cuh"

namespace pysparse {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// values in W^T's order: out[j] = values[perm[j]] (perm entries outside [0, nnz) give 0). spmm_t gathers them
// once per call, so that its kernel is the forward's: a load of values[perm[j]] beside each gather of a dense
// row made the H200's batch-256 spmm_t 1.33x the forward (237 against 179 us at 90%, 4096 x 4096); gathered,
// 179 us plus 14 for this kernel.
template <typename scalar_t>
__global__ void permute_values_kernel(const scalar_t* __restrict__ values, const int32_t* __restrict__ perm,
                                      scalar_t* __restrict__ out, int64_t nnz) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < nnz; j += step) {
    const int64_t p = perm[j];
    out[j] = (p >= 0 && p < nnz) ? values[p] : scalar_t(0);
  }
}

// out [R, C] row-major = src^T, src the row-major [C, R] matrix with leading dimension ld (an element a T of the
// dtype's size: the copy moves bits). 32 x 32 tiles through shared memory, so that the reads run along src's rows
// and the writes along out's, both coalesced; one block a tile (a grid-stride loop past the grid), block (32, 8),
// each thread 4 elements of a tile.
constexpr int kTile = 32, kTileRows = 8;
template <typename T>
__global__ void transpose_kernel(const T* __restrict__ src, T* __restrict__ out, int64_t R, int64_t C, int64_t ld,
                                 int64_t tiles_r, int64_t tiles) {
  __shared__ T tile[kTile][kTile + 1];  // + 1: a tile's column reads fall in different banks
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t r0 = (t % tiles_r) * kTile, c0 = (t / tiles_r) * kTile;
    for (int i = threadIdx.y; i < kTile; i += kTileRows) {
      const int64_t c = c0 + i, r = r0 + threadIdx.x;
      if (c < C && r < R) tile[i][threadIdx.x] = src[c * ld + r];
    }
    __syncthreads();
    for (int i = threadIdx.y; i < kTile; i += kTileRows) {
      const int64_t r = r0 + i, c = c0 + threadIdx.x;
      if (r < R && c < C) out[r * C + c] = tile[threadIdx.x][i];
    }
    __syncthreads();  // the tile is rewritten by the block's next one
  }
}

// out [R, C], contiguous, = t [R, C] with t.stride(0) == 1 (the transposed view of a row-major [C, R] matrix,
// leading dimension t.stride(1)), by transpose_kernel.
void copy_transposed(const at::Tensor& t, at::Tensor& out) {
  const int64_t R = t.size(0), C = t.size(1), ld = t.stride(1);
  TORCH_CHECK(t.stride(0) == 1 && out.is_contiguous() && out.sizes() == t.sizes() && out.dtype() == t.dtype(),
              "copy_transposed: needs t with stride 1 along dim 0 and a contiguous out of its size and dtype");
  if (t.numel() == 0) return;
  const int64_t tiles_r = (R + kTile - 1) / kTile, tiles = tiles_r * ((C + kTile - 1) / kTile);
  const unsigned int grid = static_cast<unsigned int>(std::min<int64_t>(tiles, cuda::sm_count() * 64));
  const dim3 block(kTile, kTileRows);
  const auto go = [&](auto bits) {
    using T = decltype(bits);
    transpose_kernel<T><<<grid, block, 0, cuda::stream()>>>(static_cast<const T*>(t.const_data_ptr()),
                                                            static_cast<T*>(out.mutable_data_ptr()), R, C, ld,
                                                            tiles_r, tiles);
  };
  switch (t.element_size()) {
    case 2: go(uint16_t{}); break;
    case 4: go(uint32_t{}); break;
    case 8: go(uint64_t{}); break;
    default: out.copy_(t); return;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A dense operand [R, C] of these kernels (activations transposed: [features, batch]) as a contiguous tensor: t
// itself where it is; where t is the transposed view of a row-major matrix (stride(0) == 1: a batch-major [B, K]
// activation, as the layers pass it, seen as [K, B]), transpose_kernel's copy; else ATen's. ATen's copy reads
// such a view element by element down its columns: the H200's batch-256 step (4096 x 256 float32, 4 MB a copy)
// spent 27 us in ATen's copies (benchmarks/RESULTS.md, "second lease"), where reading and writing 8 MB takes
// ~3 us.
at::Tensor batch_contiguous(const at::Tensor& t) {
  if (t.is_contiguous() || t.dim() != 2 || t.stride(0) != 1) return t.contiguous();
  at::Tensor out = at::empty(t.sizes(), t.options());
  copy_transposed(t, out);
  return out;
}

// V consecutive elements loaded (and stored) as one vector: V * sizeof(T) bytes, at most 16 per load.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Elements per vector load for T (16 bytes), and whether n-element rows starting at the given pointers allow it.
template <typename T>
constexpr int vec_width() {
  return sizeof(T) >= 16 ? 1 : static_cast<int>(16 / sizeof(T));
}
template <typename T>
bool vectorizable(int64_t n, std::initializer_list<const void*> ptrs) {
  constexpr int V = vec_width<T>();
  if (V == 1 || n % V != 0) return false;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * V) != 0) return false;
  return true;
}

// How these kernels lay a batch of B columns, in V-wide vectors, over a warp: LP lanes share one stored position
// (the power of two covering the batch's vectors, at most a warp), and each owns per_lane of the vectors
// (spmm_kernel: that many batch tiles of LP vectors instead, one a lane).
struct LaneLayout {
  int LP;
  int64_t per_lane;
};
inline LaneLayout lane_layout(int64_t B, int V) {
  const int64_t vectors = (B + V - 1) / V;
  int LP = 1;
  while (LP < kWarp && LP < vectors) LP *= 2;
  return {LP, (vectors + LP - 1) / LP};
}

// The most vectors of the batch a lane keeps in registers (sddmm_kernel's row of a; spmm_grad_t_kernel's row of
// xt and its dxt sums), and f(std::integral_constant<int, NT>{}) with NT the per_lane vectors (1 to
// kLaneVectors) rounded up to 1, 2 or 4, the kernels' instantiations.
constexpr int kLaneVectors = 4;
template <typename F>
void with_lane_vectors(int64_t per_lane, F&& f) {
  if (per_lane == 1)
    f(std::integral_constant<int, 1>{});
  else if (per_lane == 2)
    f(std::integral_constant<int, 2>{});
  else
    f(std::integral_constant<int, 4>{});
}

// A lane's NT vectors of a row of the batch in registers (sddmm_kernel's row of a, spmm_grad_t_kernel's row of
// xt): vectors li, li + LP, ... of V columns, as acc_t, with on[t] whether vector t lies in the batch (B % V == 0
// when V > 1: a vector is all in or all out; one outside reads as zeros). N >= NT, the arrays' extent.
template <int NT, typename scalar_t, typename acc_t, int N, int V>
__device__ __forceinline__ void load_lane_vectors(const scalar_t* row, int64_t B, int LP, int li, acc_t (&vals)[N][V],
                                                  bool (&on)[N]) {
  using vec_t = Vec<scalar_t, V>;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t c0 = (static_cast<int64_t>(t) * LP + li) * V;
    on[t] = c0 < B;
    vec_t v{};
    if (on[t]) v = *reinterpret_cast<const vec_t*>(row + c0);
#pragma unroll
    for (int k = 0; k < V; ++k) vals[t][k] = static_cast<acc_t>(v.v[k]);
  }
}

// A warp owns one row and a tile of batch columns. Its 32 lanes form G = 32 / LP groups of LP lanes: lane l of
// a group owns V consecutive batch columns (one vector load of xt per stored value), and the groups split the
// row's stored values (group g takes every G-th), then their partial sums are added across the warp with xor
// shuffles. LP is the power of two covering the batch in V-wide vectors, at most 32: batch 256 in float32 is
// two tiles of 32 lanes x 4 columns (G = 1); batch 16 is one tile of 4 lanes x 4 columns and 8 groups; batch 1,
// 32 groups of one lane. Grid (ceil(rows / 4), tiles), block (32, 4).
template <typename index_t, typename scalar_t, int V>
__global__ void spmm_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                            const scalar_t* __restrict__ values, const scalar_t* __restrict__ xt,
                            const scalar_t* __restrict__ bias,
                            scalar_t* __restrict__ yt, int64_t rows, int64_t K, int64_t B, int64_t nnz, int LP) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, V>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (r >= rows) return;  // whole warp leaves together
  const int lane = threadIdx.x, G = kWarp / LP, g = lane / LP;
  const int64_t b0 = (static_cast<int64_t>(blockIdx.y) * LP + lane % LP) * V;
  const bool active = b0 < B;  // B % V == 0 when V > 1: a lane's columns are all inside or all outside
  int64_t j0, j1;
  cuda::row_bounds(rowptr, r, nnz, j0, j1);
  acc_t acc[V];
#pragma unroll
  for (int k = 0; k < V; ++k) acc[k] = 0;
  if (active) {
    const scalar_t* xb = xt + b0;
#pragma unroll 4
    for (int64_t j = j0 + g; j < j1; j += G) {
      const int64_t c = col[j];
      if (c < 0 || c >= K) continue;
      const acc_t v = static_cast<acc_t>(values[j]);
      const vec_t xv = *reinterpret_cast<const vec_t*>(xb + c * B);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += v * static_cast<acc_t>(xv.v[k]);
    }
  }
  for (int offset = kWarp / 2; offset >= LP; offset /= 2) {
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], offset);
  }
  if (g != 0 || !active) return;
  const acc_t add = bias ? static_cast<acc_t>(bias[r]) : acc_t(0);
  vec_t out;
#pragma unroll
  for (int k = 0; k < V; ++k) out.v[k] = static_cast<scalar_t>(acc[k] + add);
  *reinterpret_cast<vec_t*>(yt + r * B + b0) = out;
}

void launch_spmm(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& x,
                 const at::Tensor& bias, at::Tensor& yt) {
  const int64_t rows = rowptr.numel() - 1, K = x.size(0), B = x.size(1), nnz = values.numel();
  const dim3 block(kWarp, kWarpsPerBlock);
  const unsigned int row_blocks = static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "spmm_cuda", [&] {
      const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* yp = yt.mutable_data_ptr<scalar_t>();
      const auto go = [&](auto width) {
        constexpr int V = decltype(width)::value;
        const LaneLayout lanes = lane_layout(B, V);
        const int LP = lanes.LP;
        const int64_t tiles = lanes.per_lane;
        TORCH_CHECK_VALUE(tiles <= 65535, "spmm: batch ", B, " is larger than the CUDA kernel supports");
        const dim3 grid(row_blocks, static_cast<unsigned int>(tiles));
        spmm_kernel<index_t, scalar_t, V><<<grid, block, 0, cuda::stream()>>>(
            rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), values.const_data_ptr<scalar_t>(), xp,
            bp, yp, rows, K, B, nnz, LP);
      };
      if (vectorizable<scalar_t>(B, {xp, yp}))
        go(std::integral_constant<int, vec_width<scalar_t>()>{});
      else
        go(std::integral_constant<int, 1>{});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void check_dense_cuda(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined() && t.dim() == 2, op, ": ", name, " must be a 2-D tensor");
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but values has dtype ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but values is on ",
                    like.device());
}

at::Tensor spmm_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& xt,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  check_csr(rowptr, col, values, "spmm");
  check_dense_cuda(xt, values, "spmm", "xt");
  TORCH_CHECK_VALUE(values.is_cuda(), "spmm: tensors must be on a CUDA device for the CUDA kernel");
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t rows = rowptr.numel() - 1;
  at::Tensor bs;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == rows, "spmm: bias must have ", rows, " entries");
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "spmm: bias dtype differs from values dtype");
    TORCH_CHECK_VALUE(bias->device() == values.device(), "spmm: bias is on another device than values");
    bs = bias->contiguous();
  }
  const at::Tensor x = batch_contiguous(xt);
  at::Tensor yt = at::empty({rows, x.size(1)}, x.options());
  if (rows == 0 || x.size(1) == 0) return yt;
  launch_spmm(rowptr, col, values, x, bs, yt);
  return yt;
}

at::Tensor spmm_t_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& yt,
                       int64_t n_cols, const std::optional<at::Tensor>& t_rowptr,
                       const std::optional<at::Tensor>& t_col, const std::optional<at::Tensor>& t_perm) {
  check_csr(rowptr, col, values, "spmm_t");
  check_dense_cuda(yt, values, "spmm_t", "yt");
  TORCH_CHECK_VALUE(values.is_cuda(), "spmm_t: tensors must be on a CUDA device for the CUDA kernel");
  TORCH_CHECK_VALUE(has_transposed(t_rowptr, t_col, t_perm),
                    "spmm_t: the CUDA kernel needs W's transposed structure (t_rowptr, t_col, t_perm)");
  check_transposed(values, *t_rowptr, *t_col, *t_perm, n_cols, "spmm_t");
  TORCH_CHECK_VALUE(yt.size(0) == rowptr.numel() - 1, "spmm_t: yt has ", yt.size(0), " rows but W has ",
                    rowptr.numel() - 1);
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor y = batch_contiguous(yt);
  at::Tensor out = at::empty({n_cols, y.size(1)}, y.options());
  if (n_cols == 0 || y.size(1) == 0) return out;
  const int64_t nnz = values.numel();
  at::Tensor t_values = at::empty_like(values);
  if (nnz > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_t_cuda", [&] {
      permute_values_kernel<scalar_t><<<cuda::grid_for(nnz), cuda::kThreads, 0, cuda::stream()>>>(
          values.const_data_ptr<scalar_t>(), t_perm->const_data_ptr<int32_t>(), t_values.mutable_data_ptr<scalar_t>(),
          nnz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  launch_spmm(*t_rowptr, *t_col, t_values, y, at::Tensor(), out);
  return out;
}

// One warp per row r, its lanes in groups as in spmm_kernel: LP lanes (the power of two covering the batch in
// V-wide vectors, at most 32) share one stored position, each owning every LP-th vector of the batch, and the
// G = 32 / LP groups take different positions (batch 16 in float32: 8 groups of 4 lanes; batch 1: 32 lanes on 32
// positions; batch 256: one group of 32 lanes, 2 vectors each). With NT > 0 a lane keeps its NT vectors of
// a's row r in registers (read once per row) and reads one vector of b's row per vector per position; NT = 0
// (batches beyond 4 vectors a lane) reads both. Each group takes U positions at a time (U * NT loads in flight
// per lane) and sums their lane partials with log2(LP) xor shuffles. Grid ceil(rows / 4), block (32, 4).
template <typename index_t, typename scalar_t, int V, int NT, int U>
__global__ void sddmm_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                             const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                             scalar_t* __restrict__ out, int64_t rows, int64_t K, int64_t B, int64_t nnz, int LP) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, V>;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (r >= rows) return;  // whole warp leaves together
  const int lane = threadIdx.x, G = kWarp / LP, g = lane / LP, li = lane % LP;
  int64_t j0, j1;
  cuda::row_bounds(rowptr, r, nnz, j0, j1);
  const scalar_t* ar = a + r * B;
  acc_t av[NT > 0 ? NT : 1][V];  // this lane's batch columns of a's row (none kept with NT = 0)
  bool on[NT > 0 ? NT : 1];
  load_lane_vectors<NT>(ar, B, LP, li, av, on);
  for (int64_t jb = j0; jb < j1; jb += static_cast<int64_t>(G) * U) {  // the same trip count on every lane
    int64_t c[U];
    acc_t s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t j = jb + g + static_cast<int64_t>(u) * G;
      c[u] = j < j1 ? static_cast<int64_t>(col[j]) : -1;
      if (c[u] >= K) c[u] = -1;  // out-of-range column indices are skipped (their product reads as 0)
      s[u] = 0;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c[u] < 0) continue;
      const scalar_t* bc = b + c[u] * B;
      if constexpr (NT > 0) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          if (!on[t]) continue;
          const vec_t bv = *reinterpret_cast<const vec_t*>(bc + (static_cast<int64_t>(t) * LP + li) * V);
#pragma unroll
          for (int k = 0; k < V; ++k) s[u] += av[t][k] * static_cast<acc_t>(bv.v[k]);
        }
      } else {
        for (int64_t c0 = static_cast<int64_t>(li) * V; c0 < B; c0 += static_cast<int64_t>(LP) * V) {
          const vec_t x = *reinterpret_cast<const vec_t*>(ar + c0), y = *reinterpret_cast<const vec_t*>(bc + c0);
#pragma unroll
          for (int k = 0; k < V; ++k) s[u] += static_cast<acc_t>(x.v[k]) * static_cast<acc_t>(y.v[k]);
        }
      }
    }
    for (int offset = LP / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int u = 0; u < U; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], offset);
    }
    if (li == 0) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t j = jb + g + static_cast<int64_t>(u) * G;
        if (j < j1) out[j] = static_cast<scalar_t>(s[u]);
      }
    }
  }
}

template <typename index_t, typename scalar_t, int V>
void launch_sddmm(const int32_t* rowptr, const index_t* col, const scalar_t* a, const scalar_t* b, scalar_t* out,
                  int64_t rows, int64_t K, int64_t B, int64_t nnz) {
  constexpr int U = 4;
  const LaneLayout lanes = lane_layout(B, V);
  const int LP = lanes.LP;
  const int64_t per_lane = lanes.per_lane;
  const dim3 block(kWarp, kWarpsPerBlock);
  const unsigned int grid = static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const auto go = [&](auto nt) {
    sddmm_kernel<index_t, scalar_t, V, decltype(nt)::value, U><<<grid, block, 0, cuda::stream()>>>(
        rowptr, col, a, b, out, rows, K, B, nnz, LP);
  };
  if (per_lane > kLaneVectors)
    go(std::integral_constant<int, 0>{});  // a's row re-read from memory
  else
    with_lane_vectors(per_lane, go);
}

at::Tensor sddmm_cuda(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& a, const at::Tensor& b) {
  check_csr_structure(rowptr, col, "sddmm");
  TORCH_CHECK_VALUE(a.defined() && a.is_cuda(), "sddmm: a must be on a CUDA device for the CUDA kernel");
  TORCH_CHECK_TYPE(is_matmul_float(a.scalar_type()), "sddmm: a must be float32, float16, bfloat16 or float64");
  TORCH_CHECK_VALUE(a.device() == col.device(), "sddmm: a and the structure must be on one device");
  check_dense_cuda(a, a, "sddmm", "a");
  check_dense_cuda(b, a, "sddmm", "b");
  const int64_t rows = rowptr.numel() - 1, K = b.size(0), B = a.size(1), nnz = col.numel();
  TORCH_CHECK_VALUE(a.size(0) == rows, "sddmm: a has ", a.size(0), " rows but the structure has ", rows);
  TORCH_CHECK_VALUE(b.size(1) == B, "sddmm: a and b must have the same number of columns");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = batch_contiguous(a), bc = batch_contiguous(b);
  at::Tensor out = at::zeros({nnz}, a.options());  // positions outside every row's range stay 0
  if (nnz == 0 || rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sddmm_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "sddmm_cuda", [&] {
      const scalar_t* ap = ac.const_data_ptr<scalar_t>();
      const scalar_t* bp = bc.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const int32_t* rp = rowptr.const_data_ptr<int32_t>();
      const index_t* cp = col.const_data_ptr<index_t>();
      if (vectorizable<scalar_t>(B, {ap, bp}))
        launch_sddmm<index_t, scalar_t, vec_width<scalar_t>()>(rp, cp, ap, bp, op, rows, K, B, nnz);
      else
        launch_sddmm<index_t, scalar_t, 1>(rp, cp, ap, bp, op, rows, K, B, nnz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// Blocks of 4 warps an SM that spmm_grad_t_kernel asks registers for: 8 (at most 64 registers a thread) where a
// lane's xt vectors and dxt sums take at most 16 registers, so that ptxas spills nothing (sm_90: float32 at
// batch 256 59 registers, against 80 unbounded, which left room for 6 blocks of the 8 a wave of 4096 columns
// needs on the H200's 132 SMs); no bound where they take more (it would spill).
template <typename scalar_t, int V, int NT>
constexpr int grad_t_min_blocks() {
  return NT * V * sizeof(at::opmath_type<scalar_t>) <= 32 ? 8 : 1;
}

// The backward of spmm in one kernel, over W^T's structure: a warp owns column c of W (row c of W^T) and keeps
// xt's row c in registers; for each stored (i, c) it gathers gyt's row i once and uses it twice, for the input
// gradient (dxt[c] += W[i, c] gyt[i], spmm_t's product) and for the values gradient (dvalues[t_perm[p]] =
// dot(gyt[i], xt[c]), sddmm's). So one gather of a dense row per stored value instead of two (sddmm over W's
// rows, then spmm_t over W^T): the H200's batch-256 step at 90% spent 179 + 14 + 223 us in those kernels, each
// bound by L2's bandwidth for its gathers (benchmarks/RESULTS.md, "second lease").
// Lanes as in sddmm_kernel: LP lanes share a position, lane li owning the NT vectors li, li + LP, ... of V batch
// columns (those spmm_kernel's tiles give it), and the G = 32 / LP groups take every G-th position, U at a time;
// the dot products are summed over a group's lanes as sddmm_kernel sums them, and the groups' dxt partials as
// spmm_kernel sums them. The same products added in the same order: the same bits as sddmm and spmm_t.
// Safety as elsewhere: a row index (t_col) outside [0, rows) is skipped, and a t_perm entry outside [0, nnz)
// makes the position's value 0 and its product unwritten (dvalues starts at zero). The values are read through
// t_perm, which the store needs anyway, loaded beside t_col so that the read waits no longer than the gathers
// (spmm_t gathers them into W^T's order first, a 14 us kernel at 90%: its kernel has no t_perm to read).
template <typename index_t, typename scalar_t, int V, int NT, int U>
__global__ void __launch_bounds__(kWarp * kWarpsPerBlock, (grad_t_min_blocks<scalar_t, V, NT>()))
    spmm_grad_t_kernel(const int32_t* __restrict__ t_rowptr, const index_t* __restrict__ t_col,
                       const int32_t* __restrict__ t_perm, const scalar_t* __restrict__ values,
                       const scalar_t* __restrict__ gyt, const scalar_t* __restrict__ xt, scalar_t* __restrict__ dvalues,
                       scalar_t* __restrict__ dxt, int64_t n_cols, int64_t rows, int64_t B, int64_t nnz, int LP) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, V>;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.y;
  if (c >= n_cols) return;  // whole warp leaves together
  const int lane = threadIdx.x, G = kWarp / LP, g = lane / LP, li = lane % LP;
  int64_t p0, p1;
  cuda::row_bounds(t_rowptr, c, nnz, p0, p1);
  const scalar_t* xr = xt + c * B;
  acc_t xv[NT][V], acc[NT][V] = {};  // this lane's batch columns of xt's row; its dxt sums
  bool on[NT];
  load_lane_vectors<NT>(xr, B, LP, li, xv, on);
  for (int64_t pb = p0; pb < p1; pb += static_cast<int64_t>(G) * U) {  // the same trip count on every lane
    int32_t i[U], q[U];  // W's row and the stored value's position (int32 structures), -1 where skipped
    acc_t v[U], s[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t p = pb + g + static_cast<int64_t>(u) * G;
      i[u] = p < p1 ? static_cast<int32_t>(t_col[p]) : -1;
      if (i[u] >= rows) i[u] = -1;
      q[u] = p < p1 ? t_perm[p] : -1;
      if (q[u] >= nnz) q[u] = -1;
      s[u] = 0;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = (i[u] >= 0 && q[u] >= 0) ? static_cast<acc_t>(values[q[u]]) : acc_t(0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i[u] < 0) continue;
      const scalar_t* gr = gyt + static_cast<int64_t>(i[u]) * B;
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        if (!on[t]) continue;
        const vec_t gv = *reinterpret_cast<const vec_t*>(gr + (static_cast<int64_t>(t) * LP + li) * V);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const acc_t gk = static_cast<acc_t>(gv.v[k]);
          acc[t][k] += v[u] * gk;
          s[u] += gk * xv[t][k];
        }
      }
    }
    for (int offset = LP / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int u = 0; u < U; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], offset);
    }
    if (li == 0) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (i[u] >= 0 && q[u] >= 0) dvalues[q[u]] = static_cast<scalar_t>(s[u]);
    }
  }
  for (int offset = kWarp / 2; offset >= LP; offset /= 2) {
#pragma unroll
    for (int t = 0; t < NT; ++t) {
#pragma unroll
      for (int k = 0; k < V; ++k) acc[t][k] += __shfl_xor_sync(0xffffffffu, acc[t][k], offset);
    }
  }
  if (g != 0) return;
  scalar_t* dr = dxt + c * B;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    if (!on[t]) continue;
    vec_t out;
#pragma unroll
    for (int k = 0; k < V; ++k) out.v[k] = static_cast<scalar_t>(acc[t][k]);
    *reinterpret_cast<vec_t*>(dr + (static_cast<int64_t>(t) * LP + li) * V) = out;
  }
}

// Whether spmm_grad_t_kernel takes a batch of B at vector width V: a lane's share of the batch in its registers
// (at most 4 vectors: batch 512 in float32, 256 in float64, 1024 in float16 / bfloat16 at full width).
inline bool grad_t_fits(int64_t B, int V) { return lane_layout(B, V).per_lane <= kLaneVectors; }

template <typename index_t, typename scalar_t, int V>
void launch_spmm_grad_t(const int32_t* t_rowptr, const index_t* t_col, const int32_t* t_perm, const scalar_t* values,
                        const scalar_t* gyt, const scalar_t* xt, scalar_t* dvalues, scalar_t* dxt, int64_t n_cols,
                        int64_t rows, int64_t B, int64_t nnz) {
  constexpr int U = 4;
  TORCH_CHECK(grad_t_fits(B, V), "spmm_grad: batch ", B, " does not fit the one-kernel backward");
  const LaneLayout lanes = lane_layout(B, V);
  const dim3 block(kWarp, kWarpsPerBlock);
  const unsigned int grid = static_cast<unsigned int>((n_cols + kWarpsPerBlock - 1) / kWarpsPerBlock);
  with_lane_vectors(lanes.per_lane, [&](auto nt) {
    spmm_grad_t_kernel<index_t, scalar_t, V, decltype(nt)::value, U><<<grid, block, 0, cuda::stream()>>>(
        t_rowptr, t_col, t_perm, values, gyt, xt, dvalues, dxt, n_cols, rows, B, nnz, lanes.LP);
  });
}

// The backward of spmm in one call: spmm_grad_t_kernel where the batch fits it, else sddmm's and spmm_t's kernels
// one after the other. The bias gradient is ATen's row sum here (the CPU kernel's comes from its pack of gyt,
// which CUDA does not do).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spmm_grad_cuda(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& gyt,
    const at::Tensor& xt, const std::optional<at::Tensor>& t_rowptr, const std::optional<at::Tensor>& t_col,
    const std::optional<at::Tensor>& t_perm, bool bias_grad) {
  check_csr(rowptr, col, values, "spmm_grad");
  check_dense_cuda(gyt, values, "spmm_grad", "gyt");
  check_dense_cuda(xt, values, "spmm_grad", "xt");
  TORCH_CHECK_VALUE(values.is_cuda(), "spmm_grad: tensors must be on a CUDA device for the CUDA kernel");
  const int64_t rows = rowptr.numel() - 1, K = xt.size(0), B = xt.size(1), nnz = values.numel();
  TORCH_CHECK_VALUE(gyt.size(0) == rows && gyt.size(1) == B, "spmm_grad: gyt must be [", rows, ", ", B,
                    "] (W's rows by xt's columns), got ", gyt.sizes());
  TORCH_CHECK_VALUE(has_transposed(t_rowptr, t_col, t_perm),
                    "spmm_grad: the CUDA kernel needs W's transposed structure (t_rowptr, t_col, t_perm)");
  check_transposed(values, *t_rowptr, *t_col, *t_perm, K, "spmm_grad");
  const c10::cuda::CUDAGuard guard(values.device());
  const at::Tensor g = batch_contiguous(gyt);  // a no-op where a following SparseLinear's backward made gyt
  const at::Tensor x = batch_contiguous(xt);
  at::Tensor bias = bias_grad ? g.sum(1) : at::empty({0}, values.options());
  if (K == 0 || B == 0) return {at::zeros({nnz}, values.options()), empty_input_grad(xt), bias};
  if (nnz == 0 || rows == 0) return {at::zeros({nnz}, values.options()), empty_input_grad(xt).zero_(), bias};
  at::Tensor dvalues, dxt;  // allocated where the one kernel takes the batch, else by sddmm_cuda and spmm_t_cuda
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_grad_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(*t_col, "spmm_grad_cuda", [&] {
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      // dxt is a new allocation (the caching allocator's blocks are aligned far past a vector): g's and x's
      // pointers and B choose the width.
      const bool vec = vectorizable<scalar_t>(B, {gp, xp});
      if (!grad_t_fits(B, vec ? vec_width<scalar_t>() : 1)) return;
      dvalues = at::zeros({nnz}, values.options());  // positions a t_perm entry out of range skips stay 0
      dxt = at::empty({K, B}, x.options());
      scalar_t* dxp = dxt.mutable_data_ptr<scalar_t>();
      const auto go = [&](auto width) {
        constexpr int V = decltype(width)::value;
        launch_spmm_grad_t<index_t, scalar_t, V>(
            t_rowptr->const_data_ptr<int32_t>(), t_col->const_data_ptr<index_t>(), t_perm->const_data_ptr<int32_t>(),
            values.const_data_ptr<scalar_t>(), gp, xp, dvalues.mutable_data_ptr<scalar_t>(), dxp, K, rows, B, nnz);
      };
      if (vec) {
        TORCH_CHECK(vectorizable<scalar_t>(B, {dxp}), "spmm_grad: the input gradient's allocation is misaligned");
        go(std::integral_constant<int, vec_width<scalar_t>()>{});
      } else {
        go(std::integral_constant<int, 1>{});
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  if (!dvalues.defined()) {  // the batch is past a lane's registers: the two kernels, one after the other
    dvalues = sddmm_cuda(rowptr, col, g, x);
    dxt = spmm_t_cuda(rowptr, col, values, g, K, t_rowptr, t_col, t_perm);
  }
  // The kernels write dxt contiguous, [K, B]: where xt is (a preceding SparseLinear's output), SparseLinear hands
  // on dxt's transposed view, which that layer's backward reads as its contiguous gyt, without a copy. Where xt is
  // batch-major (the transposed view of a [B, K] batch: a network's input, a Flatten's or a dense layer's output),
  // dxt is transposed once more into xt's layout, the CPU kernels' rule (csrc/common.h, empty_input_grad), so that
  // autograd hands x's [B, K] gradient on as it is: a leaf's gradient or a Flatten's reshape would otherwise be
  // ATen's copy of the transposed view (a column at a time).
  if (batch_major(xt)) {
    at::Tensor x_layout = at::empty({B, K}, dxt.options());
    copy_transposed(dxt.t(), x_layout);
    dxt = x_layout.t();
  }
  return {dvalues, dxt, bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("spmm_t", &spmm_t_cuda);
  m.impl("sddmm", &sddmm_cuda);
  m.impl("spmm_grad", &spmm_grad_cuda);
}

}  // namespace pysparse
