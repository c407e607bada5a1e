// Sparse matmul, CUDA twin of csrc/cpu/spmm.cpp: spmm (CSR x dense), spmm_t (W^T x dense through W's
// transposed structure) and sddmm (the values gradient). Same layout as the CPU: activations transposed,
// [features, batch], batch contiguous.
//
// A warp owns one row (spmm_kernel below: lanes split the batch into vectors and, for small batches, the row's
// stored values), and reads of an xt row are coalesced vector loads where alignment allows. Accumulation is
// float32 (float64 for float64). The column-tiled kernels further down (spmm_tiled_kernel, sddmm_tiled_kernel:
// blocks of rows read the dense operand from shared memory) run only where set_cuda_spmm_tiling asks for them.
//
// Safety without host syncs: row ranges are clamped to [0, nnz], and a column index (or t_perm entry) outside
// its range is skipped, never read. Structures are validated where they are built or loaded (pysparse.csr).
#include <ATen/OpMathType.h>
#include <climits>
#include <cstdint>
#include <cuda_pipeline.h>
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

// ---------------------------------------------------------------------------------------------------------
// Column-tiled kernels for the denser structures at wider batches (spmm_tiled_kernel, sddmm_tiled_kernel).
// spmm_kernel and sddmm_kernel read a 16-byte vector of the dense operand's row col[j] per stored value and
// lane, from L2 (L1 where warps on one SM happen to share rows): at 90% sparsity, 4096 x 4096, batch 256, 1.7 GB
// of reads per call, and the H200 ran the forward in 179-226 us and sddmm in 227, about L2's bandwidth. Here a
// block of kTiledWarps warps owns R = kTiledWarps * RPW consecutive rows of W (RPW per warp) and walks K in chunks
// of KC rows of the dense operand: each chunk is copied once into shared memory (asynchronous copies, S stages:
// the S - 1 chunks after the one in use are loading meanwhile), and every stored value of the block's rows in that
// chunk reads its vectors from there. Per R rows, L2 serves the operand once instead of one vector per stored
// value: R x density times fewer reads (3.2x at 90% sparsity, R = 32).
//
// Each warp walks its rows' stored positions through a window of 32 (ChunkWalk: lane l holds the column index,
// and for spmm the value, of the window's l-th position, read coalesced). Per chunk and row, one ballot finds the
// run of positions from the current one whose columns lie before the chunk's end, and the warp takes them up to
// kTake at a time (__shfl_sync hands each position to the whole warp), their loads independent of each other.
// Order within a row is not assumed: a position whose column lies before the chunk (an unsorted row) reads the
// operand from global memory; a negative column index is skipped; one at or past K (out of range) ends the row's
// runs, and the positions after it are taken by a last pass over the row that reads from global memory and skips
// every out-of-range index: each kernel's result equals its warp-per-row twin's for any structure. float32 /
// float16 / bfloat16 with the batch a multiple of V and 16-byte-aligned rows (the launchers check); accumulation
// in float32.
//
// The first version (2026-12-04, measured on an H200 the same day) walked the positions one at a time (each
// step's exit test waiting on the previous step's shuffle) and double-buffered 32-row chunks with two barriers a
// chunk: 1.8-3.7x slower than spmm_kernel at batch 256, 80-95%, with ~0.2 ms of fixed cost (the chunk copies' L2
// latency, waited for once a chunk) and 1.3-2.8x its time per stored value (RESULTS.md).
// ---------------------------------------------------------------------------------------------------------
constexpr int kTiledWarps = 8;
constexpr int kTake = 4;        // positions a warp takes at once (independent loads)
constexpr int kMaxStages = 6;   // chunk buffers at most: 5 chunks loading while one is used

// cp.async.wait_group takes an immediate: waits until at most n of this thread's committed batches of copies
// are still in flight (n < kMaxStages; warp-uniform).
__device__ __forceinline__ void wait_copies(int n) {
  switch (n) {
    case 0: __pipeline_wait_prior(0); break;
    case 1: __pipeline_wait_prior(1); break;
    case 2: __pipeline_wait_prior(2); break;
    case 3: __pipeline_wait_prior(3); break;
    case 4: __pipeline_wait_prior(4); break;
    default: __pipeline_wait_prior(5); break;
  }
}

// Copies rows chunk * KC .. (at most KC, below K) of the dense operand d [K, B], vectors first_vec .. first_vec +
// NVEC - 1 of each (V elements each; those at or past B are left alone), into tile [KC][NVEC], asynchronously, and
// commits them as one batch of this thread's copies (an empty batch for a chunk past the last).
template <typename scalar_t, int V, int KC, int NVEC>
__device__ __forceinline__ void load_chunk(Vec<scalar_t, V>* tile, const scalar_t* __restrict__ d, int64_t chunk,
                                           int64_t first_vec, int64_t K, int64_t B, int tid) {
  for (int e = tid; e < KC * NVEC; e += kWarp * kTiledWarps) {
    const int kr = e / NVEC, vl = e % NVEC;
    const int64_t c = chunk * KC + kr, b = (first_vec + vl) * V;
    if (c < K && b < B) __pipeline_memcpy_async(tile + e, d + c * B + b, sizeof(Vec<scalar_t, V>));
  }
  __pipeline_commit();
}

// Up to kTake positions of one row, handed over together: their index j, column c (-1: skip it) and value v.
template <typename acc_t>
struct Take {
  int64_t j[kTake];
  int c[kTake];
  acc_t v[kTake];
};

// The stored positions of rows r0 .. r0 + RPW - 1 (rows at or past `rows` are empty), walked by one warp. The
// window after the current one is loaded as soon as the current one is taken up, so that moving on to it waits on
// no load (a row's windows come from DRAM, ~0.5 us away, once per 32 positions).
template <typename index_t, typename acc_t, int RPW, bool VALUES>
struct ChunkWalk {
  static constexpr int kEnd = 0x7fffffff;  // the window's column past a row's last position
  int64_t base[RPW] = {}, end[RPW] = {};  // per row: its window's first position and the row's end
  int pos[RPW] = {}, wc[RPW] = {};        // the next position within the window; this lane's window column
  acc_t wv[RPW] = {};                     // this lane's window value (VALUES)
  int pc[RPW] = {};                       // the same for the next window
  acc_t pv[RPW] = {};

  // this lane's column and value of row i's window at position j0 (kEnd / 0 past the row's end)
  template <typename scalar_t>
  __device__ __forceinline__ void load(int i, int64_t j0, const index_t* __restrict__ col,
                                       const scalar_t* __restrict__ values, int lane, int& c, acc_t& v) const {
    const int64_t j = j0 + lane;
    c = j < end[i] ? static_cast<int>(col[j]) : kEnd;
    if constexpr (VALUES) v = j < end[i] ? static_cast<acc_t>(values[j]) : acc_t(0);
  }

  template <typename scalar_t>
  __device__ __forceinline__ ChunkWalk(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                                       const scalar_t* __restrict__ values, int64_t r0, int64_t rows, int64_t nnz,
                                       int lane) {
#pragma unroll
    for (int i = 0; i < RPW; ++i) {
      if (r0 + i < rows) cuda::row_bounds(rowptr, r0 + i, nnz, base[i], end[i]);
      load(i, base[i], col, values, lane, wc[i], wv[i]);
      load(i, base[i] + kWarp, col, values, lane, pc[i], pv[i]);
    }
  }

  // Moves row i on to its next window, and starts loading the one after it.
  template <typename scalar_t>
  __device__ __forceinline__ void advance(int i, const index_t* __restrict__ col, const scalar_t* __restrict__ values,
                                          int lane) {
    base[i] += kWarp;
    pos[i] = 0;
    wc[i] = pc[i];
    wv[i] = pv[i];
    load(i, base[i] + kWarp, col, values, lane, pc[i], pv[i]);
  }

  // f(Take) for row i's positions up to the first whose column is c1 or more (c1 <= K), kTake at a time, negative
  // column indices handed over as skipped (-1). Warp-uniform.
  template <typename scalar_t, typename F>
  __device__ __forceinline__ void chunk(int i, int64_t c1, const index_t* __restrict__ col,
                                        const scalar_t* __restrict__ values, int lane, F&& f) {
    while (true) {
      if (pos[i] == kWarp) advance(i, col, values, lane);
      // the run: window positions pos, pos + 1, ... whose columns lie before c1 (past the row's end, kEnd does not)
      const unsigned run = __ballot_sync(0xffffffffu, lane >= pos[i] && wc[i] < c1) >> pos[i];
      const int n = run == 0xffffffffu ? kWarp : __ffs(~run) - 1;
      for (int t = 0; t < n; t += kTake) {
        Take<acc_t> tk;
#pragma unroll
        for (int u = 0; u < kTake; ++u) {
          const int p = pos[i] + t + u, src = p < kWarp ? p : kWarp - 1;
          tk.j[u] = base[i] + p;
          tk.c[u] = __shfl_sync(0xffffffffu, wc[i], src);
          if constexpr (VALUES) tk.v[u] = __shfl_sync(0xffffffffu, wv[i], src);
          if (t + u >= n || tk.c[u] < 0) tk.c[u] = -1;
        }
        f(tk);
      }
      pos[i] += n;
      if (pos[i] < kWarp) return;  // the position at pos lies past the chunk (or the row has ended)
    }
  }

  // f(Take) for row i's remaining positions with c in [0, K), one at a time: those after an out-of-range index.
  template <typename scalar_t, typename F>
  __device__ __forceinline__ void rest(int i, int64_t K, const index_t* __restrict__ col,
                                       const scalar_t* __restrict__ values, int lane, F&& f) {
    while (base[i] + pos[i] < end[i]) {
      if (pos[i] == kWarp) advance(i, col, values, lane);
      Take<acc_t> tk;
#pragma unroll
      for (int u = 0; u < kTake; ++u) tk.c[u] = -1;
      tk.j[0] = base[i] + pos[i];
      tk.c[0] = __shfl_sync(0xffffffffu, wc[i], pos[i]);
      if constexpr (VALUES) tk.v[0] = __shfl_sync(0xffffffffu, wv[i], pos[i]);
      if (tk.c[0] >= K) tk.c[0] = -1;
      ++pos[i];
      f(tk);
    }
  }

  // Every position of the warp's rows with a column in [0, K): the block copies the rows of d [K, B] KC at a time
  // (vectors first_vec .. first_vec + NVEC - 1 of each) into `stages` buffers of tiles [stages][KC][NVEC], and
  // take(i, tk, chunk, c0) gets each run of row i's positions, chunk pointing at the copy of d's row c0 (a column c
  // in [c0, c0 + KC) reads chunk[(c - c0) * NVEC ...]; a column below c0, from an unsorted row, reads d itself); the
  // last pass's positions come with chunk = nullptr, each reading d. Every thread of the block calls it (it
  // synchronises).
  template <int KC, int NVEC, typename scalar_t, int V, typename Takes>
  __device__ __forceinline__ void all(Vec<scalar_t, V>* tiles, int stages, const scalar_t* __restrict__ d,
                                      int64_t first_vec, int64_t K, int64_t B, const index_t* __restrict__ col,
                                      const scalar_t* __restrict__ values, int lane, int tid, Takes&& take) {
    constexpr int kStage = KC * NVEC;
    const int64_t chunks = (K + KC - 1) / KC;
    for (int s = 0; s + 1 < stages; ++s)
      load_chunk<scalar_t, V, KC, NVEC>(tiles + s * kStage, d, s, first_vec, K, B, tid);
    int use = 0, fill = stages - 1;  // the buffer of chunk n, and of chunk n + stages - 1
    for (int64_t n = 0; n < chunks; ++n) {
      wait_copies(stages - 2);  // this thread's copies of chunk n are in
      __syncthreads();          // everyone's are, and everyone is done with chunk n - 1's buffer (fill)
      load_chunk<scalar_t, V, KC, NVEC>(tiles + fill * kStage, d, n + stages - 1, first_vec, K, B, tid);
      const Vec<scalar_t, V>* chunk_rows = tiles + use * kStage;
      const int64_t c0 = n * KC, c1 = c0 + KC < K ? c0 + KC : K;
#pragma unroll
      for (int i = 0; i < RPW; ++i)
        chunk(i, c1, col, values, lane, [&](const Take<acc_t>& tk) { take(i, tk, chunk_rows, c0); });
      use = use + 1 == stages ? 0 : use + 1;
      fill = fill + 1 == stages ? 0 : fill + 1;
    }
    wait_copies(0);  // the (empty) batches past the last chunk
#pragma unroll
    for (int i = 0; i < RPW; ++i)
      rest(i, K, col, values, lane, [&](const Take<acc_t>& tk) { take(i, tk, nullptr, K); });
  }
};

// yt = W @ xt (+ bias): a block owns R rows and one batch tile of 32 vectors (a lane owns V columns). Chunks of
// 32 rows of xt, 16 KiB each (32 x 32 vectors of 16 bytes), `stages` of them in dynamic shared memory. Grid
// (ceil(rows / R), ceil(B / 32V)), block (32, kTiledWarps).
template <typename index_t, typename scalar_t, int V, int RPW>
__global__ void __launch_bounds__(kWarp * kTiledWarps)
    spmm_tiled_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                      const scalar_t* __restrict__ values, const scalar_t* __restrict__ xt,
                      const scalar_t* __restrict__ bias, scalar_t* __restrict__ yt, int64_t rows, int64_t K,
                      int64_t B, int64_t nnz, int stages) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, V>;
  constexpr int KC = 32;
  extern __shared__ __align__(16) unsigned char smem[];
  vec_t* const tiles = reinterpret_cast<vec_t*>(smem);
  const int lane = threadIdx.x, tid = threadIdx.y * kWarp + lane;
  const int64_t first_vec = static_cast<int64_t>(blockIdx.y) * kWarp, b0 = (first_vec + lane) * V;
  const bool active = b0 < B;  // B % V == 0: a lane's columns are all inside or all outside
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * kTiledWarps + threadIdx.y) * RPW;
  ChunkWalk<index_t, acc_t, RPW, true> walk(rowptr, col, values, r0, rows, nnz, lane);
  acc_t acc[RPW][V] = {};
  walk.template all<KC, kWarp>(
      tiles, stages, xt, first_vec, K, B, col, values, lane, tid,
      [&](int i, const Take<acc_t>& tk, const vec_t* chunk_rows, int64_t c0) {
        if (!active) return;
        vec_t x[kTake];
#pragma unroll
        for (int u = 0; u < kTake; ++u) {  // the loads first, then the sums: kTake loads in flight
          if (tk.c[u] < 0) continue;
          if (tk.c[u] >= c0)
            x[u] = chunk_rows[(tk.c[u] - c0) * kWarp + lane];
          else
            x[u] = *reinterpret_cast<const vec_t*>(xt + tk.c[u] * B + b0);
        }
#pragma unroll
        for (int u = 0; u < kTake; ++u) {
          if (tk.c[u] < 0) continue;
#pragma unroll
          for (int k = 0; k < V; ++k) acc[i][k] += tk.v[u] * static_cast<acc_t>(x[u].v[k]);
        }
      });
  if (!active) return;
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int64_t r = r0 + i;
    if (r < rows) {
      const acc_t b = bias ? static_cast<acc_t>(bias[r]) : acc_t(0);
      vec_t out;
#pragma unroll
      for (int k = 0; k < V; ++k) out.v[k] = static_cast<scalar_t>(acc[i][k] + b);
      *reinterpret_cast<vec_t*>(yt + r * B + b0) = out;  // V scalar stores in the PTX: once a row, not a value
    }
  }
}

// out[j] = dot(a[row(j), :], b[col[j], :]) over the whole batch (B <= 32 * NV * V): a lane keeps its NV vectors of
// each of its warp's rows of a in registers (vectors lane, lane + 32, ...), reads the same vectors of b's row from
// the chunk, and the warp's partial sums of a take's positions are added by shuffles, kTake sums at once. Chunks
// of 32 / NV rows of b, 16 KiB each, `stages` of them in dynamic shared memory. Positions no row covers keep what
// out holds (zeros). Grid ceil(rows / R), block (32, kTiledWarps).
template <typename index_t, typename scalar_t, int V, int NV, int RPW>
__global__ void __launch_bounds__(kWarp * kTiledWarps)
    sddmm_tiled_kernel(const int32_t* __restrict__ rowptr, const index_t* __restrict__ col,
                       const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, scalar_t* __restrict__ out,
                       int64_t rows, int64_t K, int64_t B, int64_t nnz, int stages) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec_t = Vec<scalar_t, V>;
  constexpr int KC = 32 / NV, NVEC = kWarp * NV;
  extern __shared__ __align__(16) unsigned char smem[];
  vec_t* const tiles = reinterpret_cast<vec_t*>(smem);
  const int lane = threadIdx.x, tid = threadIdx.y * kWarp + lane;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * kTiledWarps + threadIdx.y) * RPW;
  const scalar_t* const no_values = nullptr;
  ChunkWalk<index_t, acc_t, RPW, false> walk(rowptr, col, no_values, r0, rows, nnz, lane);
  bool on[NV];
  acc_t ar[RPW][NV][V];
#pragma unroll
  for (int t = 0; t < NV; ++t) on[t] = static_cast<int64_t>(t * kWarp + lane) * V < B;
#pragma unroll
  for (int i = 0; i < RPW; ++i)
#pragma unroll
    for (int t = 0; t < NV; ++t) {
      vec_t v{};
      if (r0 + i < rows && on[t]) v = *reinterpret_cast<const vec_t*>(a + (r0 + i) * B + (t * kWarp + lane) * V);
#pragma unroll
      for (int k = 0; k < V; ++k) ar[i][t][k] = static_cast<acc_t>(v.v[k]);
    }
  // this lane's share of row i's dot product with a row of b, as vectors: the chunk's copy or b's own (B % V == 0
  // and b 16-byte aligned, so b's rows are vector arrays too)
  const auto dot = [&](int i, const vec_t* row) -> acc_t {
    acc_t s = 0;
#pragma unroll
    for (int t = 0; t < NV; ++t) {
      if (!on[t]) continue;
      const vec_t x = row[t * kWarp + lane];
#pragma unroll
      for (int k = 0; k < V; ++k) s += ar[i][t][k] * static_cast<acc_t>(x.v[k]);
    }
    return s;
  };
  walk.template all<KC, NVEC>(
      tiles, stages, b, 0, K, B, col, no_values, lane, tid,
      [&](int i, const Take<acc_t>& tk, const vec_t* chunk_rows, int64_t c0) {
        acc_t s[kTake];
#pragma unroll
        for (int u = 0; u < kTake; ++u) {
          s[u] = 0;
          if (tk.c[u] < 0) continue;
          if (tk.c[u] >= c0)
            s[u] = dot(i, chunk_rows + (tk.c[u] - c0) * NVEC);
          else
            s[u] = dot(i, reinterpret_cast<const vec_t*>(b + tk.c[u] * B));
        }
#pragma unroll
        for (int offset = kWarp / 2; offset > 0; offset /= 2)
#pragma unroll
          for (int u = 0; u < kTake; ++u) s[u] += __shfl_xor_sync(0xffffffffu, s[u], offset);
#pragma unroll
        for (int u = 0; u < kTake; ++u)  // lane u stores the take's u-th sum
          if (lane == u && tk.c[u] >= 0) out[tk.j[u]] = static_cast<scalar_t>(s[u]);
      });
}

// Chunk buffers for the tiled kernels on the current device (stage_bytes each): as many as fit two blocks an SM,
// 2 to kMaxStages (the H200's 228 KiB an SM: 6 of 16 KiB; 100 KiB: 3). Dynamic shared memory past 48 KiB needs the
// kernel's opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize), which the launchers set.
inline int tiled_stages(int64_t stage_bytes) {
  const int dev = c10::cuda::current_device();
  int optin = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
  const int64_t budget = std::min<int64_t>(optin, per_sm / 2 - 1024);
  return static_cast<int>(std::clamp<int64_t>(budget / stage_bytes, 2, kMaxStages));
}

// Launches kernel with `bytes` of dynamic shared memory, opting in past the default 48 KiB.
template <typename Kernel, typename... Args>
void launch_with_smem(Kernel kernel, dim3 grid, dim3 block, int64_t bytes, Args... args) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  kernel<<<grid, block, static_cast<size_t>(bytes), cuda::stream()>>>(args...);
}

// Rows per warp of the tiled kernels (spmm_tiled_kernel, sddmm_tiled_kernel) for this call, or 0 for the
// warp-per-row ones. `eligible`: float32 / float16 / bfloat16 with vector-aligned rows (and for sddmm a batch of
// at most 64 vectors); V: elements per 16-byte vector. cuda_spmm_tiling() (csrc/ops.cpp,
// pysparse.ops.set_cuda_spmm_tiling): 0 (the default) never; 1 where they should pay: batches of 16 vectors and
// more (half a warp's lanes or more at work: 64 float32 columns, 128 float16 / bfloat16) and at least one stored
// value in 32 (each chunk's copy then serves R x density >= 1 reads per element at R = 32); 2 / 4 / 8 wherever
// eligible, with that many rows per warp (tests, and the benchmarks that compare them). Fewer rows a warp, more
// warps to hide latency, each block's chunk copies serving fewer rows: ptxas (sm_90, CUDA 13.0) gives float32 spmm
// 80 / 128 / 170-172 registers at 2 / 4 / 8 rows (sddmm 64-80 / 80-116 / 128-170), so three / two / one 256-thread
// blocks an SM by registers (two at most by the H200's shared memory, 96 KiB a block: tiled_stages), and 4096 rows at
// batch 256 make 512 / 256 / 128 blocks for the H200's 132 SMs.
inline int tiled_rows_per_warp(int64_t rows, int64_t K, int64_t B, int64_t nnz, int V, bool eligible) {
  const int mode = cuda_spmm_tiling();
  if (mode == 0 || !eligible || rows == 0 || K >= INT_MAX) return 0;
  if (mode > 1) return mode;
  return B >= kWarp / 2 * V && nnz * 32 >= rows * K ? 4 : 0;
}

// f(std::integral_constant<int, rpw>{}) for the tiled kernels' rows per warp (2, 4 or 8: tiled_rows_per_warp).
template <typename F>
void with_rows_per_warp(int rpw, F&& f) {
  if (rpw == 2)
    f(std::integral_constant<int, 2>{});
  else if (rpw == 8)
    f(std::integral_constant<int, 8>{});
  else
    f(std::integral_constant<int, 4>{});
}

template <typename index_t, typename scalar_t>
void launch_spmm_tiled(const int32_t* rowptr, const index_t* col, const scalar_t* values, const scalar_t* xt,
                       const scalar_t* bias, scalar_t* yt, int64_t rows, int64_t K, int64_t B, int64_t nnz, int rpw) {
  constexpr int V = vec_width<scalar_t>();
  const int64_t tiles = (B + kWarp * V - 1) / (kWarp * V);
  TORCH_CHECK_VALUE(tiles <= 65535, "spmm: batch ", B, " is larger than the CUDA kernel supports");
  const int64_t per_block = static_cast<int64_t>(kTiledWarps) * rpw;
  const dim3 grid(static_cast<unsigned int>((rows + per_block - 1) / per_block), static_cast<unsigned int>(tiles));
  const dim3 block(kWarp, kTiledWarps);
  constexpr int64_t stage_bytes = 32 * kWarp * sizeof(Vec<scalar_t, V>);
  const int stages = tiled_stages(stage_bytes);
  with_rows_per_warp(rpw, [&](auto r) {
    launch_with_smem(spmm_tiled_kernel<index_t, scalar_t, V, decltype(r)::value>, grid, block, stages * stage_bytes,
                     rowptr, col, values, xt, bias, yt, rows, K, B, nnz, stages);
  });
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
        const int64_t vectors = (B + V - 1) / V;
        int LP = 1;
        while (LP < kWarp && LP < vectors) LP *= 2;
        const int64_t tiles = (vectors + LP - 1) / LP;
        TORCH_CHECK_VALUE(tiles <= 65535, "spmm: batch ", B, " is larger than the CUDA kernel supports");
        const dim3 grid(row_blocks, static_cast<unsigned int>(tiles));
        spmm_kernel<index_t, scalar_t, V><<<grid, block, 0, cuda::stream()>>>(
            rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), values.const_data_ptr<scalar_t>(), xp,
            bp, yp, rows, K, B, nnz, LP);
      };
      const bool vec = vectorizable<scalar_t>(B, {xp, yp});
      if constexpr (!std::is_same_v<scalar_t, double>) {
        const int rpw = tiled_rows_per_warp(rows, K, B, nnz, vec_width<scalar_t>(), vec);
        if (rpw > 0) {
          launch_spmm_tiled<index_t, scalar_t>(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                               values.const_data_ptr<scalar_t>(), xp, bp, yp, rows, K, B, nnz, rpw);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      if (vec)
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
  const at::Tensor x = xt.contiguous();
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
  const at::Tensor y = yt.contiguous();
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
  // this lane's batch columns: vectors li, li + LP, ... (B % V == 0 when V > 1: a vector is all in or all out)
  acc_t av[NT > 0 ? NT : 1][V];
  bool on[NT > 0 ? NT : 1];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int64_t c0 = (static_cast<int64_t>(t) * LP + li) * V;
    on[t] = c0 < B;
    vec_t v{};
    if (on[t]) v = *reinterpret_cast<const vec_t*>(ar + c0);
#pragma unroll
    for (int k = 0; k < V; ++k) av[t][k] = static_cast<acc_t>(v.v[k]);
  }
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
  const int64_t vectors = (B + V - 1) / V;
  int LP = 1;
  while (LP < kWarp && LP < vectors) LP *= 2;
  const int64_t per_lane = (vectors + LP - 1) / LP;
  const dim3 block(kWarp, kWarpsPerBlock);
  const unsigned int grid = static_cast<unsigned int>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const auto go = [&](auto nt) {
    sddmm_kernel<index_t, scalar_t, V, decltype(nt)::value, U><<<grid, block, 0, cuda::stream()>>>(
        rowptr, col, a, b, out, rows, K, B, nnz, LP);
  };
  if (per_lane == 1)
    go(std::integral_constant<int, 1>{});
  else if (per_lane == 2)
    go(std::integral_constant<int, 2>{});
  else if (per_lane <= 4)
    go(std::integral_constant<int, 4>{});
  else
    go(std::integral_constant<int, 0>{});
}

template <typename index_t, typename scalar_t>
void launch_sddmm_tiled(const int32_t* rowptr, const index_t* col, const scalar_t* a, const scalar_t* b, scalar_t* out,
                        int64_t rows, int64_t K, int64_t B, int64_t nnz, int rpw) {
  constexpr int V = vec_width<scalar_t>();
  const int64_t per_block = static_cast<int64_t>(kTiledWarps) * rpw;
  const dim3 grid(static_cast<unsigned int>((rows + per_block - 1) / per_block));
  const dim3 block(kWarp, kTiledWarps);
  constexpr int64_t stage_bytes = 32 * kWarp * sizeof(Vec<scalar_t, V>);  // KC x NVEC = 32 x 32 vectors at any NV
  const int stages = tiled_stages(stage_bytes);
  const auto go = [&](auto nv) {  // vectors a lane: one, or two past 32 vectors
    with_rows_per_warp(rpw, [&](auto r) {
      launch_with_smem(sddmm_tiled_kernel<index_t, scalar_t, V, decltype(nv)::value, decltype(r)::value>, grid, block,
                       stages * stage_bytes, rowptr, col, a, b, out, rows, K, B, nnz, stages);
    });
  };
  if (B <= kWarp * V)
    go(std::integral_constant<int, 1>{});
  else
    go(std::integral_constant<int, 2>{});
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
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::zeros({nnz}, a.options());  // positions outside every row's range stay 0
  if (nnz == 0 || rows == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sddmm_cuda", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "sddmm_cuda", [&] {
      const scalar_t* ap = ac.const_data_ptr<scalar_t>();
      const scalar_t* bp = bc.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      const int32_t* rp = rowptr.const_data_ptr<int32_t>();
      const index_t* cp = col.const_data_ptr<index_t>();
      constexpr int V = vec_width<scalar_t>();
      const bool vec = vectorizable<scalar_t>(B, {ap, bp});
      if constexpr (!std::is_same_v<scalar_t, double>) {
        const int rpw = tiled_rows_per_warp(rows, K, B, nnz, V, vec && B <= 2 * kWarp * V);
        if (rpw > 0) {
          launch_sddmm_tiled<index_t, scalar_t>(rp, cp, ap, bp, op, rows, K, B, nnz, rpw);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
      }
      if (vec)
        launch_sddmm<index_t, scalar_t, V>(rp, cp, ap, bp, op, rows, K, B, nnz);
      else
        launch_sddmm<index_t, scalar_t, 1>(rp, cp, ap, bp, op, rows, K, B, nnz);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// The backward of spmm in one call. On the GPU the two kernels stay separate launches: each is bound by its own
// gathers, and the fusion the CPU kernel does (one read of gyt's row for both products) would need every
// block to hold both a dxt tile and the dot products; the op exists so that the autograd formula is one call.
// The bias gradient is ATen's row sum here (the CPU kernel's comes from its pack of gyt, which CUDA does not do).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spmm_grad_cuda(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& gyt,
    const at::Tensor& xt, const std::optional<at::Tensor>& t_rowptr, const std::optional<at::Tensor>& t_col,
    const std::optional<at::Tensor>& t_perm, bool bias_grad) {
  check_csr(rowptr, col, values, "spmm_grad");
  check_dense_cuda(gyt, values, "spmm_grad", "gyt");
  check_dense_cuda(xt, values, "spmm_grad", "xt");
  TORCH_CHECK_VALUE(gyt.size(0) == rowptr.numel() - 1 && gyt.size(1) == xt.size(1), "spmm_grad: gyt must be [",
                    rowptr.numel() - 1, ", ", xt.size(1), "] (W's rows by xt's columns), got ", gyt.sizes());
  const at::Tensor g = gyt.contiguous();  // once for both kernels (each would make its own copy of a view)
  const at::Tensor x = xt.contiguous();  // a no-op for the layers, which pass xt batch-contiguous on CUDA
  // dxt in spmm_t's layout, contiguous [K, B] (the fake kernel declares it so on CUDA): SparseLinear hands on
  // its transposed view, which a preceding SparseLinear's backward reads as a contiguous gyt, without a copy.
  at::Tensor dxt = spmm_t_cuda(rowptr, col, values, g, x.size(0), t_rowptr, t_col, t_perm);
  return {sddmm_cuda(rowptr, col, g, x), dxt, bias_grad ? g.sum(1) : at::empty({0}, values.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CUDA, m) {
  m.impl("spmm", &spmm_cuda);
  m.impl("spmm_t", &spmm_t_cuda);
  m.impl("sddmm", &sddmm_cuda);
  m.impl("spmm_grad", &spmm_grad_cuda);
}

}  // namespace pysparse
