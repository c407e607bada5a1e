// Sparse matmul, CPU: spmm (CSR x dense) and sddmm (its gradient with respect to the stored values).
//
// Layout: activations are transposed, [features, batch], so that every stored weight multiplies a contiguous
// run of the batch (a vectorised AXPY) and every sampled dot product reads two contiguous rows. For float32,
// float16 and bfloat16 the batch is repacked once into float32 panels of T columns (tile-major, zero-padded):
// a panel is contiguous, sized to stay in L2 while a thread sweeps its rows, and its rows are whole vectors,
// so the accumulators live in registers (16-64 columns; with AVX2, 8 for batches of 2-8: "Narrow batches"
// below; batch 1 reads its vectors in place, AVX2 gathers). Rows are split between threads by stored count, not
// by row count. float64 (used for gradcheck) takes a plain loop.
#include <ATen/OpMathType.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <atomic>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "caches.h"
#include "rows.h"
#include "scratch.h"
#include "vec.h"

namespace pysparse {
namespace {

using cpu::beyond_caches;
using cpu::check_rowptr_cpu;
using cpu::for_row_parts;
using cpu::is_half_v;
using cpu::kLanes;
using cpu::l2_bytes;
using cpu::load_lanes;
using cpu::row_parts;
using cpu::transpose16;
using cpu::vfloat;
using cpu::vload;
using cpu::vstore;

// Rows [k0, k1) of tile t (batch entries t * T ..) of xt [K, B] (strides sk, sb) into dst, that tile's panel
// [K, T] (zero past B); with rowsum, adds each row's sum over the tile to rowsum[k] (sets it when `first`).
// Batch-major xt (sk == 1): k0 a multiple of 16, rows moved 16 x 16 at a time (see pack_panels).
template <typename scalar_t>
void pack_tile(const scalar_t* src, int64_t sk, int64_t sb, int64_t K, int64_t B, int64_t T, int64_t t, int64_t k0,
               int64_t k1, float* dst, float* rowsum, bool first) {
  const int64_t b0 = t * T, bt = std::min(T, B - b0);
  if (sk == 1 && sb != 1) {
    for (int64_t g = 0; g < T; g += kLanes) {
      const int64_t nb = std::clamp<int64_t>(bt - g, 0, kLanes);
      for (int64_t k = k0; k < k1; k += kLanes) {
        const int64_t kn = std::min(kLanes, K - k);
        vfloat r[kLanes];
        for (int64_t i = 0; i < kLanes; ++i) r[i] = i < nb ? load_lanes(src + (b0 + g + i) * sb + k, kn) : vfloat{};
        if (rowsum != nullptr) {  // before the transpose: lane i of row b is xt[k + i, b]
          vfloat sum[8];
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) sum[i] = r[i] + r[i + 8];
          const vfloat total = ((sum[0] + sum[4]) + (sum[1] + sum[5])) + ((sum[2] + sum[6]) + (sum[3] + sum[7]));
          const vfloat before = first && g == 0 ? vfloat{} : vload(rowsum + k);
          vstore(rowsum + k, before + total);
        }
        transpose16(r);
        for (int64_t i = 0; i < kn; ++i) vstore(dst + (k + i) * T + g, r[i]);
      }
    }
    return;
  }
  for (int64_t k = k0; k < k1; ++k) {
    float* d = dst + k * T;
    const scalar_t* s = src + k * sk + b0 * sb;
    if (sb == 1)  // a contiguous run, vectorised
      for (int64_t b = 0; b < bt; ++b) d[b] = static_cast<float>(s[b]);
    else  // another layout: a plain gather
      for (int64_t b = 0; b < bt; ++b) d[b] = static_cast<float>(s[b * sb]);
    for (int64_t b = bt; b < T; ++b) d[b] = 0.f;
    if (rowsum != nullptr) {
      float sum = 0.f;
      for (int64_t b = 0; b < bt; ++b) sum += d[b];
      rowsum[k] = first ? sum : rowsum[k] + sum;
    }
  }
}

// xt [K, B] -> float32 panels [ntiles, K, T], zero-padded past B, in scratch slot `slot` (scratch.h). xt may be
// strided. The common case is the [K, B] transposed view of a contiguous [B, K] batch (what the layers pass):
// it is transposed 16 x 16 blocks at a time in registers, reading each batch row contiguously (a per-element
// gather down the columns would hit one cache set with all its rows, 16 KB apart, and run 3-4x slower), 16 rows
// at a time across the thread's columns: 16 sequential streams, which the prefetchers follow (the 16-column
// blocks of all T rows of a panel first, T streams: 4 MB at 99% in a training step 160-250 -> 110-125 us).
// With `rowsum` (round_up(K, 16) floats), the same pass also sums each row: rowsum[k] = sum over b of xt[k, b]
// in float32 (spmm_grad's bias gradient, without a pass of its own over gyt); with `accumulate`, adds to it (a
// later run of the batch: panel_runs).
template <typename scalar_t>
at::Tensor pack_panels(const at::Tensor& xt, int64_t T, int64_t slot, float* rowsum = nullptr,
                       bool accumulate = false) {
  const int64_t K = xt.size(0), B = xt.size(1), ntiles = (B + T - 1) / T;
  const int64_t sk = xt.stride(0), sb = xt.stride(1);
  at::Tensor packed = cpu::scratch(slot, ntiles * K * T);
  const scalar_t* src = xt.const_data_ptr<scalar_t>();
  float* dst = packed.mutable_data_ptr<float>();
  // batch-major: rows in 16-row blocks (a transpose's worth), all tiles of a block by one thread
  const int64_t grain = sk == 1 && sb != 1 ? kLanes : 1;
  const int64_t blocks = (K + grain - 1) / grain;
  at::parallel_for(0, blocks, grain == 1 ? 256 : 16, [&](int64_t q0, int64_t q1) {
    for (int64_t t = 0; t < ntiles; ++t)
      pack_tile(src, sk, sb, K, B, T, t, q0 * grain, std::min(K, q1 * grain), dst + t * K * T, rowsum,
                t == 0 && !accumulate);
  });
  return packed;
}

// Panel width, 16, 32 or 64 columns (a batch's last panel may also be 48: panel_runs): as wide as the batch needs (more
// work per stored weight and fewer passes over the structure), narrowed while a panel of K rows would take more
// than `budget` bytes (the kernels size it from l2_bytes(): the panels they read at random rows stay in L2).
inline int64_t panel_width(int64_t K, int64_t B, int64_t budget) {
  int64_t T = B <= 16 ? 16 : (B <= 32 ? 32 : 64);
  while (T > kLanes && K * T * 4 > budget) T /= 2;
  return T;
}

// The batch's panels as runs: full panels of T columns over [0, full), then the rest in one panel of the fewest
// 16-column groups that hold it (16, 32 or 48 columns) rather than in one more panel of T, mostly zero-padded.
// Each run is one call of a panel kernel over the batch entries [b0, b0 + bt) (its own packed panels, its own
// columns of the outputs, its products added to the earlier runs'). The kernels' cost goes with the padded
// width, about the same per column at 16, 32, 48 and 64: 4096 x 4096 at 90%, spmm at batch 33 had taken as long
// as at 64, and 65 as long as 128. One process alternating the runs and one padded panel, 9 rounds, per-round
// ratio (Zen 4, 2026-12-04): spmm at 90% batch 33 / 40 / 48 0.73-0.78 (one panel of 48), 65 / 80 0.65 / 0.70
// (64 + 16), 100 0.88 (64 + 48), 128 0.98 (unchanged); at 99% 0.74-0.86; the training step at 90% 0.78-0.87 at
// batches 33-48, 0.81 / 0.84 / 0.92 at 65 / 80 / 100 (95%: 0.83-0.92).
struct PanelRun {
  int64_t b0, bt, T;
};
struct PanelRuns {
  PanelRun run[2];
  int n = 0;
  int64_t panels = 0;  // panels in all the runs: more than one and the structure is swept more than once
  void add(int64_t b0, int64_t bt, int64_t T) {
    run[n++] = {b0, bt, T};
    panels += (bt + T - 1) / T;
  }
};
inline PanelRuns panel_runs(int64_t B, int64_t T) {
  PanelRuns runs;
  const int64_t full = B / T * T;
  if (full > 0) runs.add(0, full, T);
  int64_t b0 = full, rest = B - full;
  if (rest > 0) runs.add(b0, rest, std::min(T, (rest + kLanes - 1) / kLanes * kLanes));
  return runs;
}

// Calls f(std::integral_constant<int, V>{}) for the panel width T = 16 V that panel_width or panel_runs chose (16,
// 32, 48 or 64): the kernels take V as a template argument. A caller whose widths stop below 64 says so in MaxT,
// and the wider kernels are not instantiated.
template <int64_t MaxT = 64, typename F>
inline void with_panel_width(int64_t T, const char* op, F&& f) {
  switch (T) {
    case 16:
      return f(std::integral_constant<int, 1>{});
    case 32:
      if constexpr (MaxT >= 32) return f(std::integral_constant<int, 2>{});
      break;
    case 48:
      if constexpr (MaxT >= 64) return f(std::integral_constant<int, 3>{});
      break;
    case 64:
      if constexpr (MaxT >= 64) return f(std::integral_constant<int, 4>{});
      break;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": internal error, panel width ", T);
}

// f(run, i, std::integral_constant<int, V>{}) for each run of `runs` in turn (its index i; V its panel width / 16,
// dispatched as with_panel_width does, MaxT as there).
template <int64_t MaxT = 64, typename F>
inline void for_each_run(const PanelRuns& runs, const char* op, F&& f) {
  for (int i = 0; i < runs.n; ++i)
    with_panel_width<MaxT>(runs.run[i].T, op, [&](auto v_tag) { f(runs.run[i], i, v_tag); });
}

#ifdef __AVX2__
// 8 column indices as int32 lanes (also on AVX-512 builds).
inline __m256i load_index8(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i load_index8(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// in_range8's bound for K columns (K beyond int32 admits every int32 index).
inline __m256i index_bound8(int64_t K) {
  return _mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(K, INT32_MAX)));
}
// All-ones lanes where 0 <= i < K (bound = index_bound8(K)).
inline __m256i in_range8(__m256i i, __m256i bound) {
  return _mm256_and_si256(_mm256_cmpgt_epi32(i, _mm256_set1_epi32(-1)), _mm256_cmpgt_epi32(bound, i));
}
#endif

// Whether idx[j0, j1) all lie in [0, bound): the running minimum and maximum of 32 bytes of indices a step (16
// int16 or 8 int32 lanes), the remainder as one more step that overlaps the last (indices seen twice do no harm),
// folded to 16 bytes and compared once at the end. A span shorter than a step but of half a step or more: its first
// and last 16 bytes. Shorter ones one by one. The overlapping and half steps against the remainder one by one (Zen 3, one process
// alternating, 11 rounds, per-round ratio, 2026-11-30), the forward at 4096 x 4096: batch 4 at 99% 0.93, batch 8 /
// 16 at 99.7% (~12 per row) 0.81 / 0.93, batch 16 at 90 / 99% 0.99 / 0.99; spmm_grad batch 8 at 99.7% 0.97.
template <typename index_t>
inline bool span_in_range(const index_t* idx, int64_t j0, int64_t j1, int64_t bound) {
#ifdef __AVX2__
  constexpr int64_t L = 32 / sizeof(index_t);
  constexpr bool I16 = sizeof(index_t) == 2;
  const int64_t top = std::min<int64_t>(bound - 1, std::numeric_limits<index_t>::max());  // the largest good one
  auto min4 = [](__m128i a, __m128i b) { return I16 ? _mm_min_epi16(a, b) : _mm_min_epi32(a, b); };
  auto max4 = [](__m128i a, __m128i b) { return I16 ? _mm_max_epi16(a, b) : _mm_max_epi32(a, b); };
  __m128i lo, hi;  // the lanes' minimum and maximum over the span, 16 bytes wide
  if (j0 + L <= j1) {
    auto load = [&](int64_t j) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + j)); };
    __m256i lo8 = load(j0), hi8 = lo8;
    auto step = [&](__m256i v) {
      lo8 = I16 ? _mm256_min_epi16(lo8, v) : _mm256_min_epi32(lo8, v);
      hi8 = I16 ? _mm256_max_epi16(hi8, v) : _mm256_max_epi32(hi8, v);
    };
    for (j0 += L; j0 + L <= j1; j0 += L) step(load(j0));
    if (j0 < j1) step(load(j1 - L));
    lo = min4(_mm256_castsi256_si128(lo8), _mm256_extracti128_si256(lo8, 1));
    hi = max4(_mm256_castsi256_si128(hi8), _mm256_extracti128_si256(hi8, 1));
  } else if (j0 + L / 2 <= j1) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + j0));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(idx + j1 - L / 2));
    lo = min4(a, b);
    hi = max4(a, b);
  } else {
    return cpu::chunk_in_range(idx, j0, j1, bound);
  }
  const __m128i bad = I16 ? _mm_or_si128(_mm_cmplt_epi16(lo, _mm_setzero_si128()),
                                         _mm_cmpgt_epi16(hi, _mm_set1_epi16(static_cast<int16_t>(top))))
                          : _mm_or_si128(_mm_cmplt_epi32(lo, _mm_setzero_si128()),
                                         _mm_cmpgt_epi32(hi, _mm_set1_epi32(static_cast<int32_t>(top))));
  return _mm_testz_si128(bad, bad);
#else
  return cpu::chunk_in_range(idx, j0, j1, bound);
#endif
}

// Whether the row's stored positions [j0, j1) all have a column index in [0, K) and, with perm, a position in [0,
// nnz): checked a vector at a time before a sweep over the row, which then reads them (now in L1) without a check
// per read; a row that fails is swept with the checks (its bad positions count and contribute nothing). The sweeps
// over W's CSR take it: the forward's single-panel and narrow ones, and the backward's (scatter_panels,
// sddmm_panels, sweep_narrow). Zen 3, one process alternating with the per-read checks, 11 rounds, per-round ratio:
// the forward (2026-11-30), 4096 x 4096 at 90%, batch 4 / 8 / 16 / 32 0.74 / 0.82 / 0.76 / 0.86; at 99%, batch 4
// / 16 0.80 / 0.92; 768 x 768 batch 4 0.78; 1024 x 1024 batch 16 at 50% 0.92. The backward, the ops alone (same
// day), 4096 x 4096 at 90%: spmm_grad batch 4 / 8 / 16 / 32 0.87 / 0.85 / 0.80 / 0.82 (at 99%, batch 4 / 16 0.89 /
// 0.86), spmm_t batch 4 / 16 0.83 / 0.96, sddmm 0.73 / 0.69. (In the 16-column sweeps the unchecked dot products
// round differently, the compiler fusing a multiply and an add that the checked code keeps apart: equal to the
// float32 rounding, not to the bit.) Without perm, the row's indices are checked through their minimum and maximum,
// 16 (int16) or 8 (int32) lanes a step, instead of each lane's two compares after widening int16 to int32: one
// process alternating the two, 11 rounds, per-round ratio (same day), the forward at 4096 x 4096: batch 4 / 8 / 16
// / 32 at 90% 0.93 / 0.90 / 0.93 / 0.97, batch 8 at 95% 0.92, batch 4 / 16 at 99% 0.93 / 1.01; 768 x 768 batch 4
// 0.94; 1024 x 1024 batch 16 at 50% 0.91; spmm_grad 0.99-1.01 (the check is a smaller share of its sweep).
template <typename index_t>
inline bool row_in_range(const index_t* col, const int32_t* perm, int64_t j0, int64_t j1, int64_t K, int64_t nnz) {
  if (perm == nullptr) return span_in_range(col, j0, j1, K);
#ifdef __AVX2__
  // with perm: both checked 8 lanes a step (int16 widened), which measured 7% faster than two span_in_range passes
  // on W^T's short rows (spmm_t at 1024 x 4096, 99%, batch 64, reading the values in place; 2026-11-30)
  const __m256i kb = index_bound8(K), pb = index_bound8(nnz);
  __m256i ok = _mm256_set1_epi32(-1);
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8)
    ok = _mm256_and_si256(ok, _mm256_and_si256(in_range8(load_index8(col + j), kb),
                                               in_range8(load_index8(perm + j), pb)));
  if (_mm256_movemask_epi8(ok) != -1) return false;
  j0 = j;
#endif
  return cpu::chunk_in_range(col, j0, j1, K) && cpu::chunk_in_range(perm, j0, j1, nnz);
}

// Sweeps one row: through row(std::false_type{}), reading its indices without a check, when they pass
// row_in_range, else through row(std::true_type{}), each index checked as it is read.
template <typename index_t, typename Row>
__attribute__((always_inline)) inline void sweep_row(const index_t* col, const int32_t* perm, int64_t j0, int64_t j1,
                                                     int64_t K, int64_t nnz, Row&& row) {
  if (row_in_range(col, perm, j0, j1, K, nnz))
    row(std::false_type{});
  else
    row(std::true_type{});
}

// With CHECK, column indices outside [0, K) count as bad and contribute nothing; without, col must have been
// checked (indices_in_range): with several panels each stored position is read once per panel, and one check
// pass costs less than a check at every read (a single panel checks each row before its sweep: row_in_range, and
// a failing row as it reads). With PERM, the value of stored position j is values[perm[j]] (W^T's structure
// reading W's values in place: spmm_t); perm entries outside [0, nnz) count as bad and contribute nothing. The
// output's row r is yt + r * ldy (B entries: a run of a wider batch writes its own columns of the output).
template <int V, bool PERM, bool CHECK, typename index_t, typename scalar_t>
void spmm_panels(const int32_t* rowptr, const index_t* col, const scalar_t* values, const int32_t* perm,
                 const float* packed, const scalar_t* bias, scalar_t* yt, int64_t ldy, int64_t rows, int64_t K,
                 int64_t B, std::atomic<bool>& bad) {
  const int64_t nnz = rowptr[rows];
  constexpr int64_t T = V * kLanes;
  const int64_t ntiles = (B + T - 1) / T;
  for_row_parts(rowptr, rows, bad, [&](int64_t, int64_t r0, int64_t r1) {
    bool local_bad = false;
    for (int64_t t = 0; t < ntiles; ++t) {
      const float* panel = packed + t * K * T;
      const int64_t b0 = t * T, bt = std::min(T, B - b0);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t j0 = rowptr[r], j1 = rowptr[r + 1];
        // With RC, every column index (and permuted position) is checked as it is read. A row whose indices all
        // lie in range goes without (see row_in_range).
        auto row = [&](auto rc) {
          constexpr bool RC = decltype(rc)::value;
          auto value_at = [&](int64_t j, bool& ok) -> float {
            if constexpr (PERM) {
              const int64_t p = perm[j];
              if constexpr (RC) ok = ok && static_cast<uint64_t>(p) < static_cast<uint64_t>(nnz);
              return ok ? static_cast<float>(values[p]) : 0.f;  // (ok is true without RC)
            } else {
              return ok ? static_cast<float>(values[j]) : 0.f;
            }
          };
          // U independent accumulator sets (U * V = 4 chains): with one vector per set (T = 16) a single chain
          // would wait out the FMA latency at every stored value.
          constexpr int U = V >= 4 ? 1 : 4 / V;
          vfloat acc[U][V];
          const float init = bias ? static_cast<float>(bias[r]) : 0.f;
#pragma GCC unroll 4
          for (int u = 0; u < U; ++u)
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) acc[u][v] = vfloat{} + (u == 0 ? init : 0.f);
          int64_t j = j0;
          for (; j + U <= j1; j += U) {
#pragma GCC unroll 4
            for (int u = 0; u < U; ++u) {
              const int64_t c = col[j + u];
              bool ok = !RC || static_cast<uint64_t>(c) < static_cast<uint64_t>(K);
              const float w = value_at(j + u, ok);
              if constexpr (RC) local_bad |= !ok;
              const float* x = panel + (RC ? (ok ? c : 0) : c) * T;
#pragma GCC unroll 4
              for (int v = 0; v < V; ++v) acc[u][v] += w * vload(x + v * kLanes);
            }
          }
          for (; j < j1; ++j) {
            const int64_t c = col[j];
            bool ok = !RC || static_cast<uint64_t>(c) < static_cast<uint64_t>(K);
            const float w = value_at(j, ok);
            if (!ok) {
              local_bad = true;
              continue;
            }
            const float* x = panel + c * T;
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) acc[0][v] += w * vload(x + v * kLanes);
          }
#pragma GCC unroll 4
          for (int u = 1; u < U; ++u)
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) acc[0][v] += acc[u][v];
          float out[T];
          __builtin_memcpy(out, acc[0], sizeof(out));
          scalar_t* y = yt + r * ldy + b0;
          for (int64_t b = 0; b < bt; ++b) y[b] = static_cast<scalar_t>(out[b]);
        };
        if constexpr (CHECK)
          sweep_row(col, PERM ? perm : nullptr, j0, j1, K, nnz, row);
        else
          row(std::false_type{});
      }
    }
    return local_bad;
  });
}

// A plain loop, for float64 (gradcheck's dtype; speed is not its point).
template <typename index_t, typename scalar_t>
void spmm_plain(const int32_t* rowptr, const index_t* col, const scalar_t* values, const scalar_t* xt,
                const scalar_t* bias, scalar_t* yt, int64_t rows, int64_t K, int64_t B, std::atomic<bool>& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    bool local_bad = false;
    std::vector<acc_t> acc(B);
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(acc.begin(), acc.end(), bias ? static_cast<acc_t>(bias[r]) : acc_t(0));
      for (int64_t j = rowptr[r]; j < rowptr[r + 1]; ++j) {
        const int64_t c = col[j];
        if (static_cast<uint64_t>(c) >= static_cast<uint64_t>(K)) {
          local_bad = true;
          continue;
        }
        const acc_t w = static_cast<acc_t>(values[j]);
        for (int64_t b = 0; b < B; ++b) acc[b] += w * static_cast<acc_t>(xt[c * B + b]);
      }
      for (int64_t b = 0; b < B; ++b) yt[r * B + b] = static_cast<scalar_t>(acc[b]);
    }
    if (local_bad) bad = true;
  });
}

#ifdef __AVX512F__
// 16 column indices as int32 lanes.
inline __m512i load_index16(const int16_t* p) {
  return _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512i load_index16(const int32_t* p) { return _mm512_loadu_si512(p); }

// sum_j values[j] * x[col[j]] over [j0, j1) for a float32 x (the values float32, or float16 / bfloat16 converted as
// they load), 16 lanes at a time with masked gathers: indices outside [0, K) are not loaded, and counted in `outside`.
// Returns the partial sum of the full blocks and advances j0 past them. Against rows checked first and x's lanes loaded
// one by one into the same vectors (the same bits; Zen 4, 2026-12-01, one process alternating, 11 rounds, per-round
// ratio, two runs): 4096 x 4096 at 90 / 95 / 99% 0.82-0.87 / 0.85-0.87 / 0.91-0.98, but at 50% 1.09-1.19 and 16384
// columns at 90% 1.12-1.23 (x beyond L1): the gathers stay.
template <typename index_t, typename value_t>
inline float spmv_row_avx512(const index_t* col, const value_t* values, const float* x, int64_t& j0, int64_t j1,
                             int64_t K, int64_t& outside) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i bound = _mm512_set1_epi32(static_cast<int32_t>(std::min<int64_t>(K, INT32_MAX)));
  int64_t j = j0;
  for (; j + 32 <= j1; j += 32) {
    const __m512i i0 = load_index16(col + j), i1 = load_index16(col + j + 16);
    const __mmask16 ok0 = _mm512_cmplt_epu32_mask(i0, bound), ok1 = _mm512_cmplt_epu32_mask(i1, bound);
    outside += 32 - __builtin_popcount(ok0) - __builtin_popcount(ok1);
    const __m512 x0 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok0, i0, x, 4);
    const __m512 x1 = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok1, i1, x, 4);
    acc0 = _mm512_fmadd_ps(load_lanes(values + j, kLanes), x0, acc0);  // (float16 / bfloat16 widened: vec.h)
    acc1 = _mm512_fmadd_ps(load_lanes(values + j + 16, kLanes), x1, acc1);
  }
  j0 = j;
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#elif defined(__AVX2__)
// spmv_row_avx512's AVX2 twin, 8 lanes per gather, two gathers per step: indices outside [0, K) are masked out
// of the gather (not loaded) and counted in `outside`. Zen 3, batch 1, against the scalar loop (one process
// alternating the two, ten rounds, median): 4096 x 4096 at 50 / 90 / 99% 5.8 / 1.18 / 0.20 -> 3.3 / 0.61 /
// 0.15 ms on two threads, 10.3 / 2.08 / 0.29 -> 5.2 / 1.07 / 0.20 ms on one (2026-11-29).
template <typename index_t, typename value_t>
inline float spmv_row_avx2(const index_t* col, const value_t* values, const float* x, int64_t& j0, int64_t j1,
                           int64_t K, int64_t& outside) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const __m256i bound = index_bound8(K);
  int64_t j = j0;
  for (; j + 16 <= j1; j += 16) {
    const __m256i i0 = load_index8(col + j), i1 = load_index8(col + j + 8);
    const __m256i ok0 = in_range8(i0, bound), ok1 = in_range8(i1, bound);
    const int m0 = _mm256_movemask_ps(_mm256_castsi256_ps(ok0)), m1 = _mm256_movemask_ps(_mm256_castsi256_ps(ok1));
    outside += 16 - __builtin_popcount(m0) - __builtin_popcount(m1);
    const __m256 x0 = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, i0, _mm256_castsi256_ps(ok0), 4);
    const __m256 x1 = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, i1, _mm256_castsi256_ps(ok1), 4);
    const vfloat v = load_lanes(values + j, kLanes);  // 16 values, float16 / bfloat16 widened (vec.h)
    acc0 = _mm256_fmadd_ps(v.p[0], x0, acc0);
    acc1 = _mm256_fmadd_ps(v.p[1], x1, acc1);
  }
  j0 = j;
  const __m256 sum8 = _mm256_add_ps(acc0, acc1);
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
  return _mm_cvtss_f32(sum4);
}
#endif

// B == 1, a sparse matrix-vector product: per row, a vectorised gather-multiply-reduce. float16 / bfloat16: x
// converted to float32 first (K floats), the stored values converted as they load. (Scalar, those types took
// 1.6-2x float32's time at batch 1 while reading less: 4096 x 4096 at 90%, Zen 4, 2026-12-02.)
template <typename index_t, typename scalar_t>
void spmv_kernel(const int32_t* rowptr, const index_t* col, const scalar_t* values, const scalar_t* x,
                 const scalar_t* bias, scalar_t* y, int64_t rows, int64_t K, std::atomic<bool>& bad) {
  using acc_t = at::opmath_type<scalar_t>;
#if defined(__AVX512F__) || defined(__AVX2__)
  constexpr bool vector = std::is_same_v<scalar_t, float> || is_half_v<scalar_t>;  // the gather steps below
#else
  constexpr bool vector = false;
#endif
  std::vector<float> x32;
  const float* xf = nullptr;
  if constexpr (std::is_same_v<scalar_t, float>) {
    xf = x;
  } else if constexpr (vector) {
    x32.resize(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) x32[k] = static_cast<float>(x[k]);
    xf = x32.data();
  }
  for_row_parts(rowptr, rows, bad, [&](int64_t, int64_t r0, int64_t r1) {
    int64_t outside = 0;
    for (int64_t r = r0; r < r1; ++r) {
      // Four independent chains: one chain would wait on each add's latency.
      acc_t acc[4] = {bias ? static_cast<acc_t>(bias[r]) : acc_t(0), 0, 0, 0};
      int64_t j = rowptr[r];
      const int64_t j1 = rowptr[r + 1];
#ifdef __AVX512F__
      if constexpr (vector) acc[1] = spmv_row_avx512(col, values, xf, j, j1, K, outside);
#elif defined(__AVX2__)
      if constexpr (vector) acc[1] = spmv_row_avx2(col, values, xf, j, j1, K, outside);
#endif
      for (; j + 4 <= j1; j += 4) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const uint32_t c = static_cast<uint32_t>(static_cast<int32_t>(col[j + u]));
          const bool ok = c < static_cast<uint32_t>(K);
          outside += !ok;
          if (ok) acc[u] += static_cast<acc_t>(values[j + u]) * static_cast<acc_t>(x[c]);
        }
      }
      for (; j < j1; ++j) {
        const uint32_t c = static_cast<uint32_t>(static_cast<int32_t>(col[j]));
        const bool ok = c < static_cast<uint32_t>(K);
        outside += !ok;
        if (ok) acc[0] += static_cast<acc_t>(values[j]) * static_cast<acc_t>(x[c]);
      }
      y[r] = static_cast<scalar_t>((acc[0] + acc[1]) + (acc[2] + acc[3]));
    }
    return outside != 0;
  });
}

#ifdef __AVX__
// The sums of the 8 lanes of each of v[0 .. 3], in that order: horizontal adds within 128-bit lanes (pairs, then
// quads), then the two halves added.
inline __m128 hadd4(const __m256 (&v)[4]) {
  const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}

// The same for v[0 .. 7]: the two halves added across.
inline __m256 hadd8(const __m256 (&v)[8]) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

#ifdef __AVX2__
// ---------------------------------------------------------------------------------------------------------
// Narrow batches, 2 <= B <= 8 (float32 / float16 / bfloat16 with AVX2, AVX-512 builds too): the operands packed
// into panels of 8 columns (one AVX register per row, zero past B) instead of the 16-column panels above, which
// would pad such a batch to 16: half the bytes per random panel row (half a cache line), half the
// multiply-adds, and spmm_grad's two randomly addressed panels (xt's and the accumulators, [K, 8] each) in half
// the L2. Per lane the sums are those of the 16-column kernels, in the same order: the forward's outputs and
// the input gradient equal theirs bit for bit, the values' gradient too on AVX2-only builds (the same
// horizontal sums, hadd8). Zen 3, 4096 x 4096 at 90 / 99%, one process alternating batch 2-8 with batch 16 (the
// 16-column panel's cost at any batch up to 16), 11 rounds, medians (2026-11-30): spmm 1.44-1.57 / 0.25 ms
// against 1.91 / 0.29, spmm_grad 4.0-4.1 / 0.51 against 5.2 / 0.67, a SparseLinear training step 5.7-5.9 /
// 0.98-1.07 against 7.1 / 1.32 ms. Again in a fast phase, 21 rounds alternating the order, per-round ratio
// medians: spmm 0.72-0.74 (batch 2, 8) at 90%, 0.83 (batch 4) at 99%; spmm_grad 0.83 / 0.87 / 0.92 (batch 2 / 4 /
// 8, rounds 0.63-1.35) at 90%, 0.80 at 99%. Panels of 4 columns (SSE) for batches up to 4 measured slower.
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kNarrow = 8;

inline bool narrow_batch(int64_t B, at::ScalarType dtype) { return B >= 2 && B <= kNarrow && dtype != at::kDouble; }

// r[0 .. 7] transposed in place: r[i] lane j <- r[j] lane i.
inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {  // h = 0: rows 0-3, h = 1: rows 4-7
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h + 0], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// t [n, B] (any strides, B <= 8) -> a float32 panel [n, 8] (zero past B) in scratch slot `slot`; with rowsum (n
// floats), rowsum[i] = the sum of row i over b in float32 (spmm_grad's bias gradient), added in pack_tile's order
// for the layout. A batch-major float32 t (stride(0) == 1: the layers' transposed views) moves 8 x 8 blocks
// through registers.
template <typename scalar_t>
at::Tensor pack8(const at::Tensor& t, int64_t slot, float* rowsum = nullptr) {
  const int64_t n = t.size(0), B = t.size(1), s0 = t.stride(0), s1 = t.stride(1);
  at::Tensor packed = cpu::scratch(slot, n * kNarrow);
  const scalar_t* src = t.const_data_ptr<scalar_t>();
  float* dst = packed.mutable_data_ptr<float>();
  const bool t_batch_major = batch_major(t);
  auto fill = [&](int64_t i0, int64_t m) {  // element by element: other layouts, dtypes and the last rows
    for (int64_t i = i0; i < i0 + m; ++i)
      for (int64_t b = 0; b < kNarrow; ++b)
        dst[i * kNarrow + b] = b < B ? static_cast<float>(src[i * s0 + b * s1]) : 0.f;
  };
  auto transposed_block = [&](int64_t i0) {  // a full block of 8 rows of a batch-major float32 t, if it is one
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (t_batch_major && i0 + kNarrow <= n) {
        __m256 r[8];
#pragma GCC unroll 8
        for (int b = 0; b < 8; ++b) r[b] = b < B ? _mm256_loadu_ps(src + b * s1 + i0) : _mm256_setzero_ps();
        transpose8(r);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + (i0 + i) * kNarrow, r[i]);
        return true;
      }
    }
    return false;
  };
  at::parallel_for(0, (n + kNarrow - 1) / kNarrow, 64, [&](int64_t q0, int64_t q1) {
    for (int64_t i0 = q0 * kNarrow; i0 < std::min(n, q1 * kNarrow); i0 += kNarrow) {
      const int64_t m = std::min(kNarrow, n - i0);
      if (!transposed_block(i0)) fill(i0, m);
      if (rowsum == nullptr) continue;
      for (int64_t i = i0; i < i0 + m; ++i) {  // in pack_tile's order for the layout
        const float* l = dst + i * kNarrow;
        float sum = 0.f;
        for (int64_t b = 0; b < kNarrow; ++b) sum += l[b];
        rowsum[i] = t_batch_major ? ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7])) : sum;
      }
    }
  });
  return packed;
}

// out [n, B] (strides so0, so1) = the sum over parts of acc [parts, n, 8] (lanes < B), in part order; a
// batch-major float32 out (so0 == 1) written 8 x 8 blocks at a time, contiguous along n.
template <typename scalar_t>
void sum_parts8(const float* acc, int64_t parts, scalar_t* out, int64_t so0, int64_t so1, int64_t n, int64_t B) {
  at::parallel_for(0, (n + kNarrow - 1) / kNarrow, 64, [&](int64_t q0, int64_t q1) {
    for (int64_t i0 = q0 * kNarrow; i0 < std::min(n, q1 * kNarrow); i0 += kNarrow) {
      const int64_t m = std::min(kNarrow, n - i0);
      __m256 r[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) {
        if (i >= m) {
          r[i] = _mm256_setzero_ps();
          continue;
        }
        r[i] = _mm256_loadu_ps(acc + (i0 + i) * kNarrow);
        for (int64_t p = 1; p < parts; ++p)
          r[i] = _mm256_add_ps(r[i], _mm256_loadu_ps(acc + (p * n + i0 + i) * kNarrow));
      }
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (so0 == 1 && m == kNarrow) {
          transpose8(r);  // r[b] = rows i0 .. i0 + 7 of batch entry b
          for (int64_t b = 0; b < B; ++b) _mm256_storeu_ps(out + b * so1 + i0, r[b]);
          continue;
        }
      }
      for (int64_t i = 0; i < m; ++i) {
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, r[i]);
        for (int64_t b = 0; b < B; ++b) out[(i0 + i) * so0 + b * so1] = static_cast<scalar_t>(lanes[b]);
      }
    }
  });
}

// spmm for a narrow batch: yt [rows, B] (contiguous) = W @ the panel (pack8 of xt) + bias. Four chains of
// multiply-adds per row over its stored positions in turn, added as ((0 + 1) + 2) + 3 (spmm_panels' order).
template <typename index_t, typename scalar_t>
void spmm_narrow(const int32_t* rowptr, const index_t* col, const scalar_t* values, const float* panel,
                 const scalar_t* bias, scalar_t* yt, int64_t rows, int64_t K, int64_t B, std::atomic<bool>& bad) {
  for_row_parts(rowptr, rows, bad, [&](int64_t, int64_t r0, int64_t r1) {
    bool local_bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      __m256 acc[4] = {_mm256_set1_ps(bias ? static_cast<float>(bias[r]) : 0.f), _mm256_setzero_ps(),
                       _mm256_setzero_ps(), _mm256_setzero_ps()};
      const int64_t j1 = rowptr[r + 1];
      int64_t j = rowptr[r];
      if (row_in_range(col, nullptr, j, j1, K, 0)) {  // the row's indices in range: no check per read
        for (; j + 4 <= j1; j += 4) {
#pragma GCC unroll 4
          for (int u = 0; u < 4; ++u)
            acc[u] = _mm256_fmadd_ps(_mm256_set1_ps(static_cast<float>(values[j + u])),
                                     _mm256_loadu_ps(panel + static_cast<int64_t>(col[j + u]) * kNarrow), acc[u]);
        }
        for (; j < j1; ++j)
          acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(static_cast<float>(values[j])),
                                   _mm256_loadu_ps(panel + static_cast<int64_t>(col[j]) * kNarrow), acc[0]);
      }
      for (; j + 4 <= j1; j += 4) {  // (else) each index checked as it is read
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const int64_t c = col[j + u];
          const bool ok = static_cast<uint64_t>(c) < static_cast<uint64_t>(K);
          local_bad |= !ok;
          const __m256 w = _mm256_set1_ps(ok ? static_cast<float>(values[j + u]) : 0.f);
          acc[u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(panel + (ok ? c : 0) * kNarrow), acc[u]);
        }
      }
      for (; j < j1; ++j) {
        const int64_t c = col[j];
        const bool ok = static_cast<uint64_t>(c) < static_cast<uint64_t>(K);
        local_bad |= !ok;
        const __m256 w = _mm256_set1_ps(ok ? static_cast<float>(values[j]) : 0.f);
        acc[0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(panel + (ok ? c : 0) * kNarrow), acc[0]);
      }
      const __m256 sum = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), acc[2]), acc[3]);
      scalar_t* y = yt + r * B;
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (B == kNarrow) {
          _mm256_storeu_ps(y, sum);
          continue;
        }
      }
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, sum);
      for (int64_t b = 0; b < B; ++b) y[b] = static_cast<scalar_t>(lanes[b]);
    }
    return local_bad;
  });
}

// The backward sweep over W's CSR for a narrow batch (scatter_panels' twin): pg = pack8 of gyt [rows, 8], its row
// r in a register for the row. With SCATTER, each stored (r, c) adds values * gyt's row into the part's float32
// accumulators (acc_buf [parts, K, 8]; sum_parts8 adds them up); with DOTS, its dot product with xt's panel row c
// (px = pack8 of xt) goes to dv[j] (float32, CSR order), 8 positions' sums reduced together (hadd8). A column
// index outside [0, K) sets `bad` (the caller raises) and is read and written as column 0 with weight 0.
template <bool DOTS, bool SCATTER, typename index_t, typename scalar_t>
void sweep_narrow(const int32_t* rowptr, const index_t* col_in, const scalar_t* values_in, const float* pg,
                  const float* px_in, float* acc_buf, float* dv_in, int64_t rows, int64_t K, std::atomic<bool>& bad) {
  for_row_parts(rowptr, rows, bad, [&](int64_t part, int64_t r0, int64_t r1) {
    // The pointers as locals: read through the closure, they were loaded again after every vector store (an
    // intrinsic store may alias any object, the closure's too). One process alternating the two, 11 rounds, per-round
    // ratio (Zen 3, 2026-11-30), 4096 x 4096 at 90%: spmm_grad batch 2 / 4 / 8 0.76 / 0.75 / 0.75 (at 99%, batch 4 /
    // 8 0.79 / 0.78), spmm_t batch 4 / 8 0.67 / 0.66, sddmm batch 4 0.94; 1024 x 1024 at 50%, spmm_grad batch 8 0.75.
    const index_t* const col = col_in;
    const scalar_t* const values = values_in;
    const float* const px = px_in;
    float* const dv = dv_in;
    const int64_t nk = K;
    float* const acc = SCATTER ? acc_buf + part * nk * kNarrow : nullptr;
    if constexpr (SCATTER) std::fill(acc, acc + nk * kNarrow, 0.f);
    bool local_bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      const __m256 g = _mm256_loadu_ps(pg + r * kNarrow);
      const int64_t j0 = rowptr[r], j1 = rowptr[r + 1];
      // With RC, each column index is checked as it is read; a row whose indices all lie in range goes without.
      auto row = [&](auto rc) {
        constexpr bool RC = decltype(rc)::value;
        auto step = [&](int64_t j) -> __m256 {
          const int64_t c = col[j];
          const bool ok = !RC || static_cast<uint64_t>(c) < static_cast<uint64_t>(nk);
          if constexpr (RC) local_bad |= !ok;
          const int64_t cc = RC ? (ok ? c : 0) : c;
          if constexpr (SCATTER) {
            float* dst = acc + cc * kNarrow;
            const __m256 w = _mm256_set1_ps(ok ? static_cast<float>(values[j]) : 0.f);
            _mm256_storeu_ps(dst, _mm256_fmadd_ps(w, g, _mm256_loadu_ps(dst)));
          }
          if constexpr (DOTS)
            return _mm256_mul_ps(g, _mm256_loadu_ps(px + cc * kNarrow));
          else
            return _mm256_setzero_ps();
        };
        int64_t j = j0;
        if constexpr (!DOTS) {
          for (; j < j1; ++j) step(j);
          return;
        }
        for (; j + 8 <= j1; j += 8) {  // whole blocks of 8 positions, their 8 sums stored together
          __m256 d[8];
#pragma GCC unroll 8
          for (int u = 0; u < 8; ++u) d[u] = step(j + u);
          _mm256_storeu_ps(dv + j, hadd8(d));
        }
        if (j < j1) {  // the row's tail
          const int64_t m = j1 - j;
          __m256 d[8];
          for (int u = 0; u < 8; ++u) d[u] = u < m ? step(j + u) : _mm256_setzero_ps();
          alignas(32) float lanes[8];
          _mm256_store_ps(lanes, hadd8(d));
          for (int64_t u = 0; u < m; ++u) dv[j + u] = lanes[u];
        }
      };
      sweep_row(col, nullptr, j0, j1, nk, 0, row);
    }
    return local_bad;
  });
}
#else
inline bool narrow_batch(int64_t, at::ScalarType) { return false; }
#endif  // __AVX2__

// Software prefetch distance, in elements, of the loops through a permutation: its random reads (or writes)
// mostly miss every cache, and a plain loop keeps too few misses in flight (4096 x 4096 at 90%, cold caches:
// gather 2.4 -> 1.0 ms, scatter 1.4 -> 1.1 ms on two threads, 2026-11-29).
constexpr int64_t kPermPrefetch = 256;

// values[perm[j]] for every j, as out_t, in scratch slot 2: W's values in W^T's order. perm entries outside
// [0, nnz) set `bad` and give 0. Given `idx` (W^T's row indices, which a caller will read unchecked), the same
// pass also sets `bad` for any idx[j] outside [0, idx_bound).
template <typename scalar_t, typename out_t = scalar_t, typename index_t = int32_t>
at::Tensor gather_values(const at::Tensor& values, const at::Tensor& perm, std::atomic<bool>& bad,
                         const index_t* idx = nullptr, int64_t idx_bound = 0) {
  at::Tensor out = cpu::scratch(2, values.numel(), c10::CppTypeToScalarType<out_t>::value);
  const scalar_t* v = values.const_data_ptr<scalar_t>();
  const int32_t* p = perm.const_data_ptr<int32_t>();
  out_t* o = out.mutable_data_ptr<out_t>();
  const int64_t n = values.numel();
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    int64_t outside = 0;
    for (int64_t j = b; j < e; ++j) {
      if (j + kPermPrefetch < e) {
        const uint32_t ahead = static_cast<uint32_t>(p[j + kPermPrefetch]);
        if (ahead < static_cast<uint64_t>(n)) __builtin_prefetch(v + ahead);
      }
      const uint32_t pj = static_cast<uint32_t>(p[j]);
      const bool ok = pj < static_cast<uint64_t>(n);
      outside += !ok;
      o[j] = ok ? static_cast<out_t>(v[pj]) : out_t(0);
    }
    if (outside || (idx != nullptr && !cpu::chunk_in_range(idx, b, e, idx_bound))) bad = true;
  });
  return out;
}

// The inverse: out[perm[j]] = src[j] (float32 -> scalar_t), for a perm that gather_values has checked; with
// parts > 1, src is [parts, n] and out[perm[j]] the sum of its column j, in part order.
template <typename scalar_t>
void scatter_values(const float* src, const int32_t* perm, scalar_t* out, int64_t n, int64_t parts = 1) {
  at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      if (j + kPermPrefetch < e) __builtin_prefetch(out + perm[j + kPermPrefetch], 1);
      float v = src[j];
      for (int64_t p = 1; p < parts; ++p) v += src[p * n + j];
      out[perm[j]] = static_cast<scalar_t>(v);
    }
  });
}

void check_dense(const at::Tensor& t, const at::Tensor& values, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK_TYPE(t.scalar_type() == values.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but values has dtype ", values.scalar_type());
  TORCH_CHECK_VALUE(t.device() == values.device(), op, ": ", name, " is on ", t.device(), " but values is on ",
                    values.device());
}

// W @ xt (+ bias) with W in CSR; with perm (W^T's permutation, for spmm_t), W's values are read as
// values[perm[j]]. rowptr must have been checked (check_rowptr_cpu).
at::Tensor spmm_impl(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor* perm,
                     const at::Tensor& xt, const at::Tensor& bs) {
  const int64_t rows = rowptr.numel() - 1, K = xt.size(0), B = xt.size(1);
  // The panel path packs xt through its strides (and, with a single panel, reads permuted values in place);
  // the others read xt contiguous and the values in order.
  // (A single column goes through the panels too when values are permuted: a padded panel beats gathering
  // the values into order first.)
  const bool panels = (B > 1 || perm != nullptr) && values.scalar_type() != at::kDouble;
  const at::Tensor x = panels ? xt : xt.contiguous();
  at::Tensor yt = empty_output({rows, B}, x.options());
  if (rows == 0 || B == 0) return yt;
  std::atomic<bool> bad{false};
  at::Tensor vals = values;
  // Permuted values are read in place by a single panel pass; with several panels (runs.panels > 1) every pass
  // would repeat the random reads, so they are gathered into order once first (batch 256 at 90%: 24 -> 13 ms).
  const int64_t T = panels ? panel_width(K, B, l2_bytes()) : 0;  // the one panel read at random rows: all of L2
  const PanelRuns runs = panels ? panel_runs(B, T) : PanelRuns{};
  const bool gather_first = perm != nullptr && (!panels || runs.panels > 1);
  // several panels read col unchecked: the gather's pass checks it (else a pass of its own below)
  const bool check_in_gather = gather_first && panels;
  if (gather_first) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_gather", [&] {
      if (check_in_gather)
        PYSPARSE_DISPATCH_INDEX(col, "spmm_gather", [&] {
          vals = gather_values<scalar_t, scalar_t, index_t>(values, *perm, bad, col.const_data_ptr<index_t>(), K);
        });
      else
        vals = gather_values<scalar_t>(values, *perm, bad);
    });
    TORCH_CHECK_VALUE(!bad, "spmm_t: a row index or t_perm entry of the transposed structure is out of range");
  }
  const int32_t* pm = perm != nullptr && !gather_first ? perm->const_data_ptr<int32_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_cpu", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "spmm_cpu", [&] {
      const scalar_t* bp = bs.defined() ? bs.const_data_ptr<scalar_t>() : nullptr;
      const int32_t* rp = rowptr.const_data_ptr<int32_t>();
      const index_t* cp = col.const_data_ptr<index_t>();
      const scalar_t* vp = vals.const_data_ptr<scalar_t>();
      scalar_t* yp = yt.mutable_data_ptr<scalar_t>();
      if (B == 1 && !panels) {
        spmv_kernel<index_t, scalar_t>(rp, cp, vp, x.const_data_ptr<scalar_t>(), bp, yp, rows, K, bad);
      } else if (narrow_batch(B, values.scalar_type()) && perm == nullptr) {
#ifdef __AVX2__
        const at::Tensor packed = pack8<scalar_t>(x, 0);
        spmm_narrow<index_t, scalar_t>(rp, cp, vp, packed.const_data_ptr<float>(), bp, yp, rows, K, B, bad);
#endif
      } else if (std::is_same_v<scalar_t, double>) {
        spmm_plain<index_t, scalar_t>(rp, cp, vp, x.const_data_ptr<scalar_t>(), bp, yp, rows, K, B, bad);
      } else {
        const bool one_panel = runs.panels == 1;  // several: col checked once (here or in the gather), read unchecked
        if (!one_panel && !check_in_gather)  // W's own CSR (spmm): permuted values always take the gather here
          TORCH_CHECK_VALUE(cpu::indices_in_range(cp, col.numel(), K), "spmm: a column index is outside [0, ", K, ")");
        for_each_run(runs, "spmm", [&](const PanelRun& s, int, auto v_tag) {
          constexpr int V = decltype(v_tag)::value;
          const at::Tensor packed = pack_panels<scalar_t>(x.narrow(1, s.b0, s.bt), s.T, 0);
          const float* pp = packed.const_data_ptr<float>();
          scalar_t* y = yp + s.b0;
          if (pm != nullptr)  // in place: a single panel
            spmm_panels<V, true, true, index_t, scalar_t>(rp, cp, vp, pm, pp, bp, y, B, rows, K, s.bt, bad);
          else if (one_panel)
            spmm_panels<V, false, true, index_t, scalar_t>(rp, cp, vp, nullptr, pp, bp, y, B, rows, K, s.bt, bad);
          else
            spmm_panels<V, false, false, index_t, scalar_t>(rp, cp, vp, nullptr, pp, bp, y, B, rows, K, s.bt, bad);
        });
      }
    });
  });
  if (perm != nullptr)
    TORCH_CHECK_VALUE(!bad, "spmm_t: a row index or t_perm entry of the transposed structure is out of range");
  TORCH_CHECK_VALUE(!bad, "spmm: a column index is outside [0, ", K, ")");
  return yt;
}

at::Tensor spmm_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& xt,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  check_csr(rowptr, col, values, "spmm");
  check_dense(xt, values, "spmm", "xt");
  TORCH_CHECK_VALUE(values.device().is_cpu(), "spmm: tensors must be on the CPU for the CPU kernel");
  const int64_t rows = rowptr.numel() - 1;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == rows, "spmm: bias must have ", rows, " entries, got ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "spmm: bias dtype ", bias->scalar_type(),
                     " differs from values dtype ", values.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == values.device(), "spmm: bias is on another device than values");
  }
  check_rowptr_cpu(rowptr, values.numel(), "spmm");
  const at::Tensor bs = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  return spmm_impl(rowptr, col, values, nullptr, xt, bs);
}

// Writes the kernels' result rows (row k: batch entries b0 .. b0 + bt of out[k, :], one panel's worth, float32)
// into out [K, B] of strides (sk, sb). Row-major outputs (sb == 1) take each row as it comes. Batch-major ones
// (sk == 1: the transposed view of a [B, K] tensor, the layout of the layers' inputs, so that their gradient
// needs no transposing copy) collect up to 16 rows of consecutive k, from a multiple of 16 on, and write them with
// a 16 x 16 in-register transpose: 16 consecutive k per batch entry, one 64-byte store each, B entries apart
// (16 KB at 4096 features); with `stream` (stream_rows), by streaming stores where that store is a whole aligned
// line. Other strides: element by element. finish() before the end.
// Streaming: in spmm_grad over W^T, 4096 x 4096 at batch 256 and 99%, these stores of the input gradient (4 MB)
// took 14% of the sweep's samples (each line read from memory before it is written). One process alternating
// streamed and cached stores, 11-21 rounds, medians of the per-round ratios (Zen 4, 2026-12-04): at 99% the op
// 0.86 / 0.95 and the training step 0.93 / 0.93 (two runs; batch 128, streamed for the test: 0.96 / 0.91); at 95%
// / 90% the op 0.97 / 0.97, the step 1.00 / 1.01.
template <int V, typename scalar_t>
struct RowWriter {
  scalar_t* out;
  int64_t sk, sb, b0, bt;
  bool stream, streamed = false;
  vfloat rows[kLanes][V];
  int64_t first = 0, n = 0;

  RowWriter(scalar_t* out_, int64_t sk_, int64_t sb_, int64_t b0_, int64_t bt_, bool stream_)
      : out(out_), sk(sk_), sb(sb_), b0(b0_), bt(bt_), stream(stream_) {}

  void put(int64_t k, const vfloat (&r)[V]) {
    if (sk != 1 || sb == 1) {
      float vals[V * kLanes];
      __builtin_memcpy(vals, r, sizeof(vals));
      scalar_t* o = out + k * sk + b0 * sb;
      for (int64_t b = 0; b < bt; ++b) o[b * sb] = static_cast<scalar_t>(vals[b]);
      return;
    }
    if (n == kLanes || (n > 0 && (k != first + n || k % kLanes == 0))) flush();
    if (n == 0) first = k;
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) rows[n][v] = r[v];
    ++n;
  }

  void flush() {
    if (n == 0) return;
    for (int v = 0; v < V; ++v) {
      vfloat block[kLanes];
      for (int64_t i = 0; i < kLanes; ++i) block[i] = i < n ? rows[i][v] : vfloat{};
      transpose16(block);  // block[b] = rows first .. first + 15 at batch entry v * 16 + b
      const int64_t nb = std::min<int64_t>(kLanes, bt - v * kLanes);
      for (int64_t b = 0; b < nb; ++b) {
        scalar_t* o = out + first + (b0 + v * kLanes + b) * sb;
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (n == kLanes) {
            if (stream && reinterpret_cast<uintptr_t>(o) % 64 == 0) {
              cpu::stream_lanes(o, block[b], kLanes);
              streamed = true;
            } else {
              __builtin_memcpy(o, &block[b], sizeof(vfloat));
            }
            continue;
          }
        }
        float lanes[kLanes];
        __builtin_memcpy(lanes, &block[b], sizeof(lanes));
        for (int64_t i = 0; i < n; ++i) o[i] = static_cast<scalar_t>(lanes[i]);
      }
    }
    n = 0;
  }

  void finish() {
    flush();
    if (streamed) cpu::stream_fence();
  }
};

// Whether RowWriter writes an output [K, B] of strides (sk, _) and K * B elements by streaming stores: float32,
// batch-major (sk == 1), larger than the threads' L2 caches together (caches.h).
template <typename scalar_t>
inline bool stream_rows(int64_t sk, int64_t elements) {
  return std::is_same_v<scalar_t, float> && sk == 1 && beyond_caches<float>(elements);
}

// Reads rows of xt [K, B] of strides (sk, sb), batch entries b0 .. b0 + bt as float32 lanes (zero past bt), for a
// sweep that asks for rows in increasing k: RowWriter's counterpart, so that such a sweep needs no packed copy
// of xt. Row-major xt (sb == 1) is read row by row as asked; batch-major xt (sk == 1, the layers' layout) 16
// consecutive rows at a time, a 16 x 16 in-register transpose per 16 batch entries; other strides element by
// element.
template <int V, typename scalar_t>
struct RowReader {
  const scalar_t* src;
  int64_t K, sk, sb, b0, bt;
  vfloat rows[kLanes][V];
  int64_t first = 0, n = 0;

  RowReader(const scalar_t* src_, int64_t K_, int64_t sk_, int64_t sb_, int64_t b0_, int64_t bt_)
      : src(src_), K(K_), sk(sk_), sb(sb_), b0(b0_), bt(bt_) {}

  void get(int64_t k, vfloat (&r)[V]) {
    if (sk != 1 || sb == 1) {
      for (int v = 0; v < V; ++v) {
        const int64_t nb = std::clamp<int64_t>(bt - v * kLanes, 0, kLanes);
        const scalar_t* p = src + k * sk + (b0 + v * kLanes) * sb;
        if (sb == 1) {
          r[v] = nb > 0 ? load_lanes(p, nb) : vfloat{};
        } else {
          float lanes[kLanes] = {};
          for (int64_t i = 0; i < nb; ++i) lanes[i] = static_cast<float>(p[i * sb]);
          r[v] = vload(lanes);
        }
      }
      return;
    }
    if (k < first || k >= first + n) fill(k);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) r[v] = rows[k - first][v];
  }

  void fill(int64_t k) {
    first = k;
    n = std::min<int64_t>(kLanes, K - k);
    for (int v = 0; v < V; ++v) {
      const int64_t nb = std::clamp<int64_t>(bt - v * kLanes, 0, kLanes);
      vfloat block[kLanes];
      for (int64_t i = 0; i < kLanes; ++i)
        block[i] = i < nb ? load_lanes(src + (b0 + v * kLanes + i) * sb + first, n) : vfloat{};
      transpose16(block);  // block[c] = row first + c at batch entries v * 16 ..
      for (int64_t c = 0; c < n; ++c) rows[c][v] = block[c];
    }
  }
};

// out[k, b0 : b0 + bt] = the sum over parts of acc[part, k, :bt], for the per-thread accumulators [parts, K, T]
// of the scatter kernels, out of strides (sk, sb); parallel over k.
template <int V, typename scalar_t>
void sum_parts(const float* acc, int64_t parts, scalar_t* out, int64_t sk, int64_t sb, int64_t K, int64_t b0,
               int64_t bt, bool stream) {
  constexpr int64_t T = V * kLanes;
  at::parallel_for(0, K, 64, [&](int64_t k0, int64_t k1) {
    RowWriter<V, scalar_t> writer(out, sk, sb, b0, bt, stream);
    for (int64_t k = k0; k < k1; ++k) {
      vfloat total[V];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) total[v] = vload(acc + k * T + v * kLanes);
      for (int64_t part = 1; part < parts; ++part)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) total[v] += vload(acc + (part * K + k) * T + v * kLanes);
      writer.put(k, total);
    }
    writer.finish();
  });
}


// The sums over lanes of the products dot(u) returns for u = 0 .. 15 (16 stored positions' dot products, in
// lanes), as the 16 lanes of one vector. With AVX-512, three rounds of pairwise shuffles and adds over the 16
// registers (about 3 instructions per sum instead of ~8 for a horizontal sum each). With AVX (16 registers of 8
// lanes), G = 8 or 4 positions at a time, each folded to 8 lanes as it comes, so that they stay in registers: 8
// where the caller keeps few registers of its own (sddmm: 4 at a time was 3-10% slower on a Zen 3), 4 where it
// keeps many (csc_sweep: figures there). Elsewhere a horizontal sum each.
template <int G = 8, typename Dot>
__attribute__((always_inline)) inline vfloat dots16(Dot&& dot) {
  static_assert(G == 4 || G == 8, "dots16 sums 4 or 8 positions at a time");
#ifdef __AVX512F__
  __m512 a[16], b[8], c[4];
#pragma GCC unroll 16
  for (int u = 0; u < 16; ++u) a[u] = dot(u);
#pragma GCC unroll 8
  for (int k = 0; k < 8; ++k)  // per 128-bit lane: (a[2k] 0+2, a[2k+1] 0+2, a[2k] 1+3, a[2k+1] 1+3)
    b[k] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * k], a[2 * k + 1]), _mm512_unpackhi_ps(a[2 * k], a[2 * k + 1]));
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)  // per 128-bit lane: the lane's sums of a[4k], a[4k+1], a[4k+2], a[4k+3]
    c[k] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0x44),
                         _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0xEE));
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x88), _mm512_shuffle_f32x4(c[2], c[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
#elif defined(__AVX__)
  vfloat out;
  __m128 q[4];  // G = 4: each group's 4 sums
#pragma GCC unroll 4
  for (int h = 0; h < 16 / G; ++h) {
    __m256 v[G];
#pragma GCC unroll 8
    for (int i = 0; i < G; ++i) {
      const vfloat d = dot(G * h + i);
      v[i] = _mm256_add_ps(d.p[0], d.p[1]);
    }
    if constexpr (G == 8)
      out.p[h] = hadd8(v);
    else
      q[h] = hadd4(v);
  }
  if constexpr (G == 4) {
    out.p[0] = _mm256_insertf128_ps(_mm256_castps128_ps256(q[0]), q[1], 1);
    out.p[1] = _mm256_insertf128_ps(_mm256_castps128_ps256(q[2]), q[3], 1);
  }
  return out;
#else
  float sums[kLanes];
  for (int u = 0; u < kLanes; ++u) {
    const vfloat d = dot(u);
    float lanes[kLanes];
    __builtin_memcpy(lanes, &d, sizeof(lanes));
    sums[u] = 0.f;
    for (int i = 0; i < kLanes; ++i) sums[u] += lanes[i];
  }
  return vload(sums);
#endif
}

// out[u] (+)= the sum over lanes of dot(u), for the m <= 16 stored positions u < m (a full block of 16, or a
// row's tail: its lanes are neither read nor written past m); added to what out holds when `add`. G: dots16's.
template <int G = 8, typename Dot>
__attribute__((always_inline)) inline void store_dots(float* out, int64_t m, bool add, Dot&& dot) {
  if (m == kLanes) {
    vfloat sums = dots16<G>(dot);
    if (add) sums += vload(out);
    vstore(out, sums);
  } else {
    vfloat sums = dots16<G>([&](int u) { return u < m ? dot(u) : vfloat{}; });
    if (add) sums += load_lanes(out, m);
    cpu::store_lanes(out, sums, m);
  }
}

// float32 / float16 / bfloat16: a and b packed into the same panels as spmm; per panel, the row's panel of a
// stays in registers and each stored position costs V multiply-adds and its share of a horizontal sum (16 stored
// positions' sums are reduced together, dots16). Partial sums over panels accumulate in float32 (with `add`, onto
// what out holds: a later run of the batch).
template <int V, typename index_t>
void sddmm_panels(const int32_t* rowptr, const index_t* col, const float* pa, const float* pb, float* out, int64_t rows,
                  int64_t K, int64_t B, std::atomic<bool>& bad, bool add = false) {
  constexpr int64_t T = V * kLanes;
  const int64_t ntiles = (B + T - 1) / T;
  for_row_parts(rowptr, rows, bad, [&](int64_t, int64_t r0, int64_t r1) {
    bool local_bad = false;
    for (int64_t t = 0; t < ntiles; ++t) {
      const float* panel_a = pa + t * rows * T;
      const float* panel_b = pb + t * K * T;
      for (int64_t r = r0; r < r1; ++r) {
        vfloat ar[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) ar[v] = vload(panel_a + r * T + v * kLanes);
        const int64_t j0 = rowptr[r], j1 = rowptr[r + 1];
        // With RC, each column index is checked as it is read; a row whose indices all lie in range goes without.
        auto row = [&](auto rc) {
          constexpr bool RC = decltype(rc)::value;
          // one stored position's products, in lanes (zero for a column index outside [0, K))
          auto dot = [&](int64_t j) -> vfloat {
            const int64_t c = col[j];
            const bool ok = !RC || static_cast<uint64_t>(c) < static_cast<uint64_t>(K);
            if constexpr (RC) local_bad |= !ok;
            const float* x = panel_b + (RC ? (ok ? c : 0) : c) * T;
            vfloat sum = ar[0] * vload(x);
#pragma GCC unroll 4
            for (int v = 1; v < V; ++v) sum += ar[v] * vload(x + v * kLanes);
            return ok ? sum : vfloat{};
          };
          for (int64_t j = j0; j < j1; j += 16)
            store_dots(out + j, std::min<int64_t>(16, j1 - j), add || t > 0, [&](int u) { return dot(j + u); });
        };
        sweep_row(col, nullptr, j0, j1, K, 0, row);
      }
    }
    return local_bad;
  });
}

// float64: a plain dot product per stored position.
template <typename index_t, typename scalar_t>
void sddmm_plain(const int32_t* rowptr, const index_t* col, const scalar_t* a, const scalar_t* b, scalar_t* out,
                 int64_t rows, int64_t K, int64_t B, std::atomic<bool>& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    bool local_bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j = rowptr[r]; j < rowptr[r + 1]; ++j) {
        const int64_t c = col[j];
        if (static_cast<uint64_t>(c) >= static_cast<uint64_t>(K)) {
          local_bad = true;
          out[j] = scalar_t(0);
          continue;
        }
        acc_t acc = 0;
        for (int64_t i = 0; i < B; ++i) acc += static_cast<acc_t>(a[r * B + i]) * static_cast<acc_t>(b[c * B + i]);
        out[j] = static_cast<scalar_t>(acc);
      }
    }
    if (local_bad) bad = true;
  });
}

// spmm_grad takes W^T's structure above this batch (see spmm_grad_cpu).
constexpr int64_t kGradCscMinBatch = 32;
// ... and, for a matrix whose rows all hold the same number of values spanning a multiple of 1 KB, only above
// this one (see row_stride_aliases).
constexpr int64_t kAliasedCscMinBatch = 128;

// Whether every row of W stores the same number of values, spanning a multiple of 1 KB of `element_size`-byte
// values (N:M masks such as 2:4 on power-of-two widths, or full rows): the permutation passes through W^T then
// read and write W's values at that exact stride down a column, a few hundred rows' lines that share a handful of
// L1 sets (and few L2 sets), and miss. 4096 x 4096 in 2:4 at batch 64, spmm_grad over W^T 58-60 ms against 29-35
// ms for a random 50% mask, while the sweep over W's CSR takes 34-36 ms for both (Zen 4, 2026-12-01; the
// scatter of the products back took 27% of the samples against 8%).
inline bool row_stride_aliases(const int32_t* rowptr, int64_t rows, int64_t element_size) {
  if (rows < 64) return false;
  const int64_t len = rowptr[1] - rowptr[0];
  if (len <= 0 || (len * element_size) % 1024 != 0) return false;
  for (int64_t r = 1; r < rows; ++r)
    if (rowptr[r + 1] - rowptr[r] != len) return false;
  return true;
}

// The widest panel of spmm_grad's sweep over W^T, in columns (figures in spmm_grad_cpu).
constexpr int64_t kCscMaxPanel = 32;

// The panel width of the sweeps over W's CSR above the narrow batches: spmm_grad's (`grad`: xt's panel and the
// accumulators, max(rows, K) rows each) or spmm_t's (its accumulators, K rows), within half of L2.
inline int64_t csr_panel_width(int64_t rows, int64_t K, int64_t B, bool grad) {
  return panel_width(grad ? std::max(rows, K) : K, B, l2_bytes() / 2);
}

// Whether spmm_grad (`grad`) and spmm_t, given W^T's structure (nb blocks) at a batch B above their threshold for it
// (32), still take W's CSR: rows that alias (row_stride_aliases) up to kAliasedCscMinBatch; small matrices up to
// batch 64 (below); and, over a plain (unblocked) W^T, large or tall matrices at batches up to 64. There the passes
// through the permutation (W's values gathered into W^T's order before the sweep, the products scattered back
// after it, random accesses over all of nnz) and gyt's panel read at random rows (rows x 32 columns, beyond L2
// from 8192 rows on a 1 MB L2) cost more than the CSR sweep's scatter into per-thread accumulators. Large or tall:
// spmm_grad, the op alone, one process alternating the two routes, 9 rounds, per-round ratio CSR / W^T (Zen 4, 1 MB
// L2, 2026-12-01), rows x columns at 90 / 95 / 98%:
//   batch 33-48: 8192 x 8192 0.56 / 0.71-0.75 / 0.82-0.85; 16384 x 4096 0.50 / 0.60-0.63 / 0.75-0.77; 4096 x 16384
//   0.71 / 0.84 / 0.93-0.95; 8192 x 2048 0.78 / 0.82-0.85 / 0.95; 2048 x 8192 0.86-0.88 / 0.95-0.97 / 0.98-1.04;
//   4096 x 4096 0.95-0.98 / 1.06-1.07 / 1.11-1.12; 32768 x 1024 at 95% 0.72-0.75; 8192 x 512 at 90% 0.88-0.90,
//   512 x 8192 1.46; 1024 x 1024 0.95-1.00. So W's CSR from 2^20 stored values (4 MB of float32, 4x L2) or
//   from twice as many rows as columns.
//   batch 64: 16384 x 4096 0.61 / 0.72 / 0.84, 32768 x 1024 at 95% 0.91, 8192 x 8192 0.81 / 0.95 / 1.06, 4096 x
//   16384 0.95 / 1.08 / 1.16, 8192 x 2048 1.02 / 1.10 / 1.21, 2048 x 8192 1.15-1.32, 4096 x 4096 0.95 / 1.03 /
//   1.08: W's CSR where gyt's 32-column panel exceeds L2 or from 2^22 stored values (16x L2).
//   batch 96-128: W^T (16384 x 4096 0.76-0.92 is the exception, 32768 x 1024 1.03-1.18 is not).
// Re-checked one process a route and shape (the machine's speed comes in phases of seconds; RESULTS), three each,
// ms, CSR / W^T: 8192 x 8192 at 90%, batch 33, 26.8-36.4 / 45.9-52.0; 16384 x 4096 at 90%, 48, 24.8-29.0 /
// 53.2-65.0; 16384 x 4096 at 95%, 64, 15.1-18.0 / 23.8-25.9.
// spmm_t alone (scatter / W^T, same day), batch 33 / 64: 4096 x 4096 at 90% 0.75 / 0.68, 8192 x 8192 at 90 / 95 /
// 98% 0.52 / 0.71, 0.77 / 1.02, 0.83 / 1.00, 16384 x 4096 at 90% (batch 64) 0.45, 4096 x 16384 0.61; 4096 x 1024
// at 90% 1.02 / 1.08, 1024 x 4096 1.25, 4096 x 4096 at 99% 1.21-1.23: the same rule. W^T blocked by W's rows
// keeps W^T (spmm_grad, CSR / W^T, batch 33-64: 4096 x 4096 at 50 / 80% 1.13-1.18 / 1.06-1.20, 8192 x 8192 at
// 80% 1.02-1.37; 1024 x 1024 at 50% 0.83-0.96), but for small matrices:
// spmm_grad, over a plain or blocked W^T, where the CSR sweep takes a batch of 33-64 in one 64-column panel (xt's
// panel and the accumulators, max(rows, K) x 64 floats each, within half of L2: up to 2048 x 2048 on a 1 MB L2)
// and W's columns hold 16 or more stored values on average: one sweep over the structure, against W^T's two 32-column
// sweeps and the two passes through the permutation. With fewer values the CSR sweep's fixed cost (its
// per-thread accumulators, threads x K x 64 floats zeroed and summed) is the larger. spmm_grad, the op alone,
// one process a shape and sparsity alternating W's CSR and the default route, 9 rounds, two processes, per-round
// ratio CSR / W^T (Zen 4, 1 MB L2, 2026-12-01), batch 40 / 64, rows x columns at 80 / 90 / 95 / 98 / 99%
// (80%: W^T blocked by 256 rows): 512 x 512 0.85-0.88 / 0.82-0.92 / 0.82-0.93 / 1.01-1.11 / 1.20-1.35; 768 x
// 768 0.78-0.85 / 0.83-0.91 / 0.84-0.91 / 0.97-1.06 / 0.88-1.17; 1024 x 1024 0.82-0.92 / 0.89-0.95 / 0.88-0.92 /
// 0.89-0.92 / 0.93-1.07; 1536 x 1536 0.79-0.89 / 0.88-0.89 / 0.87-1.03 / 0.89-0.94 / 0.90-0.97; 2048 x 2048
// 0.86-0.94 / 0.89-0.94 / 0.88-0.97 / 0.91-1.00 / 0.97-1.13; 768 x 2048 0.83-0.93 / 0.92-1.08 / 0.95-1.05 /
// 0.89-0.96 / 0.85-1.01; W^T blocked by 256 rows, new rule / old, at 50 / 70%: 768 x 768 0.91-0.97 / 0.79-0.87,
// 1024 x 1024 0.76-0.89 / 0.81-0.93, 2048 x 2048 0.88-0.92 / 0.86-0.97, 1024 x 2048 0.93-0.96 / 0.96-1.08, 2048 x
// 1024 0.81-0.89 / 0.82-1.04. SparseLinear's training step (one process alternating, 11 rounds, two processes) at 90
// / 95%, batches 40 and 64: 768 x 768 0.91-0.99 / 0.85-0.95, 1024 x 1024 0.88-0.92 / 0.92-0.95, 1280 x 960
// 0.91-0.98 / 0.90-0.92, 1000 x 1280 0.89-1.09 / 0.92-1.01, 2048 x 2048 0.91-1.08 / 0.89-1.01 (3072 x 768 and
// 768 x 3072, whose route does not change, measured alongside: 0.92-1.06). spmm_t keeps a plain W^T there
// (scatter / W^T 0.94-1.54 at 90-99% on the same square and wide shapes), not a blocked one:
// spmm_t alone, over W^T blocked by W's rows (below 87.5% sparsity: csr.cpu_row_block), up to batch 64 where the
// scatter takes the batch in one 64-column panel (the accumulators, K x 64 floats, within half of L2) and W's columns
// hold 16 or more values on average: the scatter's one sweep costs less than the gather into W^T's order and
// spmm_t_blocked's sweeps. The op alone, one process a shape and sparsity alternating the scatter and W^T, 9
// rounds, two processes, per-round ratio scatter / blocked W^T at batches 40 and 64 (Zen 4, 1 MB L2,
// 2026-12-01), rows x columns at 50 / 70 / 80%: 512 x 512 - / - / 0.69-0.96, 768 x 768 0.82-0.96 / 0.88-1.08 /
// 0.90-1.02, 1024 x 1024 0.80-0.88 / 0.81-0.96 / 0.86-0.93, 1536 x 1536 - / - / 0.90-0.97, 2048 x 2048
// 0.85-0.93 / 0.93-0.98 / 0.89-0.93, 1024 x 2048 0.88-0.93 / 0.91-1.01 / 0.86-0.96, 2048 x 1024 0.86-0.88 /
// 0.63-0.91 / 0.65-0.92, 768 x 2048 at 80% 0.95-0.97, 2048 x 768 0.65-0.82. Over a plain W^T (90% and up) W^T
// stays: 0.9-1.5 on the same shapes, mostly above 1.
// rowptr must have been checked.
inline bool csr_over_transposed(const at::Tensor& rowptr, const at::Tensor& values, int64_t K, int64_t nb, int64_t B,
                                bool grad) {
  const int64_t rows = rowptr.numel() - 1, nnz = values.numel(), l2 = l2_bytes();
  const int64_t fbytes = static_cast<int64_t>(sizeof(float));
  if (nb == 1 && B <= 48 && (nnz * fbytes >= 4 * l2 || rows >= 2 * K)) return true;
  if (nb == 1 && B <= 64 && (rows * kCscMaxPanel * fbytes > l2 || nnz * fbytes >= 16 * l2)) return true;
  if ((grad || nb > 1) && B <= 64 && csr_panel_width(rows, K, B, grad) == 64 && nnz >= 16 * K) return true;
  return B <= kAliasedCscMinBatch &&
         row_stride_aliases(rowptr.const_data_ptr<int32_t>(), rows, values.element_size());
}

// grad_csc_panels prefetches the panel row of the stored position this many positions ahead. 4096 x 4096, batch
// 256, the op alone (A/B runs alternating builds, 2026-11-29): 99.9% 0.9-1.9 -> 0.8-1.0 ms, 99% 2.1-2.8 ->
// 2.0-2.5 ms, 90% 12.7-13.4 -> 12.2-12.5 ms (16 and 64 positions: less gain, or a loss at 90%).
constexpr int64_t kRowPrefetch = 32;

// The whole backward of spmm in one sweep (spmm_grad): dvalues[j] = dot(gyt[row(j), :], xt[col(j), :]) and
// dxt = W^T @ gyt. Both read the same rows at the same stored positions, so done together each stored position
// costs one random row read instead of two (sddmm, then spmm_t); figures in spmm_grad_cpu.
//
// Walking W^T's structure (column k of W at a time): xt's row k (read in place, RowReader) and the row's dxt
// accumulators stay in registers, and each stored (n, k) reads gyt's panel row n once for both its
// multiply-add into dxt and its dot product with xt's row. W's values come in W^T's order (`vals`, float32,
// gathered before the sweep); the products are summed over the panels in that order in `dv` (scattered into
// W's order after it). The row indices must have been checked (gather_values does, in the same pass).
//
// csc_sweep is one panel's part of that sweep: W^T's columns [k0, k1) against panel_g (gyt's batch entries
// b0 .. b0 + bt, [rows, T]), the products into dv (added to what it holds when `add`), dxt's rows [k0, k1) at
// those entries. Without DOTS, dxt alone (spmm_t): no products, xt unread.
//
// W^T blocked by W's rows (nb > 1; see csr.structure): trowptr has nb * K + 1 entries, block b's stored positions
// of column k lie at trowptr[b * K + k] .. trowptr[b * K + k + 1] (rows ascending), the blocks one after the
// other in memory. The sweep then takes the blocks in turn, each over columns [k0, k1): the gather of W's values
// into this order before the sweep and the scatter of the products after it then walk one block's rows at a time
// (a line of each of a few hundred rows, within L1) instead of one line of every row of W (L2), and each block's
// panel rows are a few hundred rows of gyt's panel. xt's rows come from px (xt's panel packed, [K, T]) and dxt's
// partial sums go through dacc ([K, T]) between blocks, written into dxt after the last. Figures in
// spmm_grad_cpu.
template <int V, bool DOTS, typename index_t, typename scalar_t>
void csc_sweep(const int32_t* trowptr, int64_t nb, const index_t* trow, const float* vals, float* dv, bool add,
               const float* panel_g, const scalar_t* xt, int64_t xsk, int64_t xsb, const float* px, float* dacc,
               scalar_t* dxt, int64_t dsk, int64_t dsb, bool stream, int64_t K, int64_t b0, int64_t bt, int64_t k0,
               int64_t k1) {
  constexpr int64_t T = V * kLanes;
  static_assert(T <= kCscMaxPanel || !DOTS, "spmm_grad's panels are at most kCscMaxPanel columns");
  // accumulator sets: S * V independent chains into dxt. With 16 AVX registers, one set from V = 2 on: xt's row,
  // the accumulators and dots16's sums then stay in registers (Zen 3, batch 256 at 90 / 95 / 99%, with dots16's
  // 4-at-a-time sums, against two sets and 8 at a time, one process alternating them, 10 rounds, median: 47.3 /
  // 26.0 / 8.8 -> 43.6 / 22.4 / 7.9 ms, 2026-11-29). AVX-512's 32 registers keep two at V = 2.
#if defined(__AVX__) && !defined(__AVX512F__)
  constexpr int S = V >= 2 ? 1 : 4 / V;
#else
  constexpr int S = V >= 4 ? 1 : 4 / V;
#endif
  const int64_t nnz = trowptr[nb * K];
  const bool blocked = nb > 1;
  RowReader<V, scalar_t> reader(xt, K, xsk, xsb, b0, bt);
  RowWriter<V, scalar_t> writer(dxt, dsk, dsb, b0, bt, stream);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int32_t* bptr = trowptr + blk * K;
    for (int64_t k = k0; k < k1; ++k) {
      vfloat xk[V], acc[S][V];
      if constexpr (DOTS) {
        if (blocked) {
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) xk[v] = vload(px + k * T + v * kLanes);
        } else {
          reader.get(k, xk);
        }
      }
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[0][v] = blk > 0 ? vload(dacc + k * T + v * kLanes) : vfloat{};
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[s][v] = vfloat{};
      // one stored position: its dot product (returned, in lanes) and its multiply-add into acc[s]
      auto step = [&](int64_t j, int s) -> vfloat {
        // the row kRowPrefetch positions ahead: at high sparsity a panel row is read by few stored positions,
        // so its first read misses L2 (when the panels were packed 4 MB ago) and too few misses are in flight
        const int64_t ahead = j + kRowPrefetch < nnz ? j + kRowPrefetch : j;
        const char* q = reinterpret_cast<const char*>(panel_g + static_cast<int64_t>(trow[ahead]) * T);
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) __builtin_prefetch(q + v * 64);
        const float w = vals[j];
        const float* g = panel_g + static_cast<int64_t>(trow[j]) * T;
        vfloat d{};
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) {
          const vfloat gv = vload(g + v * kLanes);
          if constexpr (DOTS) d = v == 0 ? xk[0] * gv : d + xk[v] * gv;
          acc[s][v] += w * gv;
        }
        return d;
      };
      const int64_t j1 = bptr[k + 1];
      for (int64_t j = bptr[k]; j < j1; j += 16) {
        const int64_t m = std::min<int64_t>(16, j1 - j);  // a tail's positions all go into acc[0]
        if constexpr (DOTS) {
          store_dots<4>(dv + j, m, add, [&](int u) { return step(j + u, m == 16 ? u % S : 0); });
        } else {
          for (int64_t u = 0; u < m; ++u) step(j + u, m == 16 ? u % S : 0);
        }
      }
#pragma GCC unroll 4
      for (int s = 1; s < S; ++s)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) acc[0][v] += acc[s][v];
      if (blk + 1 < nb) {
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) vstore(dacc + k * T + v * kLanes, acc[0][v]);
      } else {
        writer.put(k, acc[0]);
      }
    }
  }
  writer.finish();
}

// The sweep with W^T's columns split between threads by stored count, each thread over every panel of gyt
// (packed before, pg [ntiles, rows, T]; xt's too when blocked, px [ntiles, K, T]; dacc [K, T]); the products
// added to what dv holds with `add` (a later run of the batch: panel_runs).
template <int V, bool DOTS, typename index_t, typename scalar_t>
void grad_csc_panels(const int32_t* trowptr, int64_t nb, const index_t* trow, const float* vals, float* dv,
                     const float* pg, const scalar_t* xt, int64_t xsk, int64_t xsb, const float* px, float* dacc,
                     scalar_t* dxt, int64_t dsk, int64_t dsb, int64_t rows, int64_t K, int64_t B,
                     std::atomic<bool>& bad, bool add = false) {
  constexpr int64_t T = V * kLanes;
  const int64_t ntiles = (B + T - 1) / T;
  // the threads' column ranges by stored count over all blocks: column k's count is the sum of its blocks'
  std::vector<int32_t> counts;
  const int32_t* split = trowptr;
  if (nb > 1) {
    counts.assign(K + 1, 0);
    for (int64_t blk = 0; blk < nb; ++blk)
      for (int64_t k = 0; k < K; ++k) counts[k + 1] += trowptr[blk * K + k + 1] - trowptr[blk * K + k];
    for (int64_t k = 0; k < K; ++k) counts[k + 1] += counts[k];
    split = counts.data();
  }
  for_row_parts(split, K, bad, [&](int64_t, int64_t k0, int64_t k1) {
    for (int64_t t = 0; t < ntiles; ++t)
      csc_sweep<V, DOTS, index_t, scalar_t>(trowptr, nb, trow, vals, dv, add || t > 0, pg + t * rows * T, xt, xsk, xsb,
                                            px != nullptr ? px + t * K * T : nullptr, dacc, dxt, dsk, dsb,
                                            stream_rows<scalar_t>(dsk, K * B), K, t * T, std::min(T, B - t * T), k0,
                                            k1);
    return false;
  });
}

// The sweep with the batch split between threads instead (`parts` of them, ntiles a multiple of parts): each
// takes its ntiles / parts panels in turn, packs each from gyt (strides gsr, gsb) into its own [rows, T] buffer
// in `panels` just before sweeping every column of W^T over it (the panel is written into, and read from, the
// thread's own L2), its products summed in its own row of dv_parts [parts, nnz], its bias sums in its own row of
// rowsum_parts [parts, rowsum_stride] (when given). Blocked (nb > 1), each also packs xt's panel into its own
// [K, T] of xpanels and keeps its partial sums in its own [K, T] of dacc.
template <int V, typename index_t, typename scalar_t>
void grad_csc_tiles(const int32_t* trowptr, int64_t nb, const index_t* trow, const float* vals, float* dv_parts,
                    float* panels, float* xpanels, float* dacc, float* rowsum_parts, int64_t rowsum_stride,
                    const scalar_t* gyt, int64_t gsr, int64_t gsb, const scalar_t* xt, int64_t xsk, int64_t xsb,
                    scalar_t* dxt, int64_t dsk, int64_t dsb, int64_t rows, int64_t K, int64_t B, int64_t parts) {
  constexpr int64_t T = V * kLanes;
  const int64_t per = (B + T - 1) / T / parts, nnz = trowptr[nb * K];
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) {
      float* panel = panels + part * rows * T;
      float* xpanel = nb > 1 ? xpanels + part * K * T : nullptr;
      float* rowsum = rowsum_parts != nullptr ? rowsum_parts + part * rowsum_stride : nullptr;
      for (int64_t t = part * per; t < (part + 1) * per; ++t) {
        const bool first = t == part * per;
        pack_tile(gyt, gsr, gsb, rows, B, T, t, 0, rows, panel, rowsum, first);
        if (nb > 1) pack_tile(xt, xsk, xsb, K, B, T, t, 0, K, xpanel, nullptr, false);
        csc_sweep<V, true, index_t, scalar_t>(trowptr, nb, trow, vals, dv_parts + part * nnz, !first, panel, xt, xsk,
                                              xsb, xpanel, nb > 1 ? dacc + part * K * T : nullptr, dxt, dsk, dsb,
                                              stream_rows<scalar_t>(dsk, K * B), K, t * T, std::min(T, B - t * T), 0,
                                              K);
      }
    }
  });
}

// W^T @ gyt from W's CSR, by scatter: each stored w[r, c] adds w * gyt[r, :] to row c of the calling thread's
// private float32 accumulators [K, T] (acc_buf, [parts, K, T]), which are then summed over threads per panel
// into dxt (strides dsk, dsb); gyt's panel row r stays in registers for the row. spmm_t below batch 33 (or
// without W^T's structure). With DOTS, the same sweep is spmm_grad's over W's CSR (batches 9-32, or without
// W^T's structure, where xt's panel and the accumulators are small: see spmm_grad_cpu): each stored (r, c) also
// reads xt's panel row c for its dot product with gyt's row, the values' gradient (dv, CSR order, float32, summed
// over panels).
template <int V, bool DOTS, typename index_t, typename scalar_t>
void scatter_panels(const int32_t* rowptr, const index_t* col, const scalar_t* values, const float* pg,
                    const float* px, float* acc_buf, float* dv, scalar_t* dxt, int64_t dsk, int64_t dsb,
                    int64_t rows, int64_t K, int64_t B, std::atomic<bool>& bad, bool add = false) {
  constexpr int64_t T = V * kLanes;
  const int64_t ntiles = (B + T - 1) / T;
  const int64_t parts = std::max<int64_t>(1, row_parts(rows));
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* panel_g = pg + t * rows * T;
    const float* panel_x = DOTS ? px + t * K * T : nullptr;
    const int64_t b0 = t * T, bt = std::min(T, B - b0);
    for_row_parts(rowptr, rows, bad, [&](int64_t part, int64_t r0, int64_t r1) {
      float* acc = acc_buf + part * K * T;
      std::fill(acc, acc + K * T, 0.f);
      bool local_bad = false;
      for (int64_t r = r0; r < r1; ++r) {
        vfloat gr[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) gr[v] = vload(panel_g + r * T + v * kLanes);
        const int64_t j0 = rowptr[r], j1 = rowptr[r + 1];
        // With RC, each column index is checked as it is read; a row whose indices all lie in range goes without.
        auto row = [&](auto rc) {
          constexpr bool RC = decltype(rc)::value;
          // one stored position: its scatter into acc, and with DOTS its dot product (in lanes)
          auto step = [&](int64_t j) -> vfloat {
            const int64_t c = col[j];
            const bool ok = !RC || static_cast<uint64_t>(c) < static_cast<uint64_t>(K);
            if constexpr (RC) local_bad |= !ok;
            const int64_t cc = RC ? (ok ? c : 0) : c;
            const float w = ok ? static_cast<float>(values[j]) : 0.f;
            float* dst = acc + cc * T;
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) vstore(dst + v * kLanes, vload(dst + v * kLanes) + w * gr[v]);
            if constexpr (DOTS) {
              const float* x = panel_x + cc * T;
              vfloat d = gr[0] * vload(x);
#pragma GCC unroll 4
              for (int v = 1; v < V; ++v) d += gr[v] * vload(x + v * kLanes);
              return d;
            } else {
              return vfloat{};
            }
          };
          if constexpr (!DOTS) {
            for (int64_t j = j0; j < j1; ++j) step(j);
            return;
          }
          for (int64_t j = j0; j < j1; j += 16)
            store_dots(dv + j, std::min<int64_t>(16, j1 - j), add || t > 0, [&](int u) { return step(j + u); });
        };
        sweep_row(col, nullptr, j0, j1, K, 0, row);
      }
      return local_bad;
    });
    sum_parts<V>(acc_buf, parts, dxt, dsk, dsb, K, b0, bt, stream_rows<scalar_t>(dsk, K * B));
  }
}

// vec_sweep's loop over the stored positions [j, j1) of one row whose column indices were checked (float32, x
// contiguous when DOTS): per position, in order, dv[j] = g * x[col[j]] with DOTS (8 products multiplied and stored
// together) and acc[col[j]] = fma(values[j], g, acc[col[j]]) with SCATTER. Each index and value is read by a scalar
// load. It replaced a loop that checked each block of 8 indices in a vector and took the indices and values out of
// vectors lane by lane (~12 instructions a position, most of them extracts and shuffles): one process alternating
// the two (Zen 4, 2026-12-01, 4096 x 4096, batch 1, 11 rounds, per-round ratio new / old, the same bits): spmm_grad
// at 90 / 99% 0.90-0.93 / 0.80-0.84, sddmm 0.39-0.68 / 0.55-0.77, spmm_t 0.68-0.86 / 0.73-0.85.
// Tried and left out (same method): the columns in blocks of 512-2048 within panels of rows, so that x's and the
// accumulators' blocks share L1 (1.08-3.2x slower than one block); x and the accumulators interleaved in one [K,
// 2] buffer, so that a position touches one line instead of two (1.20-1.31x slower); the products stored one by
// one (1.01 of the old); at 4096 x 4096, sddmm's sweep and spmm_t's one after the other (0.92-1.09 of the one);
// float16 / bfloat16 through it as well (sddmm 0.50-1.23, spmm_t 0.58-0.68, but spmm_grad 0.98-1.11 of the
// checked loop, which they keep); on AVX-512, 16 positions a step with vgatherdps for x and vgatherdps +
// vscatterdps for the accumulators (against this loop: spmm_grad 1.41-1.49, sddmm 1.22-1.47, spmm_t 1.28-1.47).
template <bool DOTS, bool SCATTER, typename index_t>
inline void grad_span(const index_t* col, const float* values, float g, const float* x, float* acc, float* dv,
                      int64_t j, int64_t j1) {
  for (; j + 8 <= j1; j += 8) {
    alignas(32) float xv[8];
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) {
      const int64_t c = col[j + u];
      if constexpr (DOTS) xv[u] = x[c];
      if constexpr (SCATTER) acc[c] = std::fma(values[j + u], g, acc[c]);
    }
    if constexpr (DOTS) {
#ifdef __AVX2__  // one multiply and one store for the 8 (the compiler, left to itself, multiplies each on its own)
      _mm256_storeu_ps(dv + j, _mm256_mul_ps(_mm256_set1_ps(g), _mm256_load_ps(xv)));
#else
      for (int u = 0; u < 8; ++u) dv[j + u] = g * xv[u];
#endif
    }
  }
  for (; j < j1; ++j) {
    const int64_t c = col[j];
    if constexpr (DOTS) dv[j] = g * x[c];
    if constexpr (SCATTER) acc[c] = std::fma(values[j], g, acc[c]);
  }
}

// A single batch column (B == 1): the sweeps over W's CSR without panels, which would pad the column to 16 lanes
// (a training step at batch 1 cost about what one at batch 16 does). spmm_grad, 4096 x 4096 at 90 / 99%, one
// process (Zen 3, 2026-11-29): 4.7 / 0.66 ms through the panels (timed at batch 2: the same panel work) -> 2.4 /
// 0.32 ms; it streams the structure and writes the products (dv), ~2.3x the forward's memory traffic (the
// forward: 0.88 / 0.22 ms). Non-temporal stores for dv measured slower (3.1 -> 5.4 ms).
// Per stored (r, c): with DOTS, dv[j] = gy[r] * x[c] (float32, the values' gradient), with SCATTER, acc[c] += w *
// gy[r] into the calling thread's float32 accumulators (acc_buf [parts, K], K floats each: in L1 or L2), which
// sum_vec_parts then adds up. A column index outside [0, K) sets `bad` and contributes nothing. gy and x are read
// through their strides (gs, xs). In float32 (and x contiguous when DOTS), a row whose indices all lie in [0, K)
// goes through grad_span, the others through the checked loop; both add with one fma per position.
template <bool DOTS, bool SCATTER, typename index_t, typename scalar_t>
void vec_sweep(const int32_t* rowptr, const index_t* col, const scalar_t* values, const scalar_t* gy, int64_t gs,
               const scalar_t* x, int64_t xs, float* acc_buf, float* dv, int64_t rows, int64_t K,
               std::atomic<bool>& bad) {
  for_row_parts(rowptr, rows, bad, [&](int64_t part, int64_t r0, int64_t r1) {
    float* acc = SCATTER ? acc_buf + part * K : nullptr;
    if constexpr (SCATTER) std::fill(acc, acc + K, 0.f);
    bool local_bad = false;
    for (int64_t r = r0; r < r1; ++r) {
      const float g = static_cast<float>(gy[r * gs]);
      const int64_t j0 = rowptr[r], j1 = rowptr[r + 1];
      if constexpr (std::is_same_v<scalar_t, float>)
        if ((xs == 1 || !DOTS) && span_in_range(col, j0, j1, K)) {
          grad_span<DOTS, SCATTER>(col, values, g, x, acc, dv, j0, j1);
          continue;
        }
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t c = col[j];
        const bool ok = static_cast<uint64_t>(c) < static_cast<uint64_t>(K);
        local_bad |= !ok;
        const int64_t cc = ok ? c : 0;
        if constexpr (DOTS) dv[j] = ok ? g * static_cast<float>(x[cc * xs]) : 0.f;
        if constexpr (SCATTER) acc[cc] = std::fma(ok ? static_cast<float>(values[j]) : 0.f, g, acc[cc]);
      }
    }
    return local_bad;
  });
}

// out[k * so] = the sum over parts of acc[part, k] (vec_sweep's accumulators), converted to scalar_t.
template <typename scalar_t>
void sum_vec_parts(const float* acc, int64_t parts, scalar_t* out, int64_t so, int64_t K) {
  at::parallel_for(0, K, 4096, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      float total = acc[k];
      for (int64_t p = 1; p < parts; ++p) total += acc[p * K + k];
      out[k * so] = static_cast<scalar_t>(total);
    }
  });
}

// B == 1 through vec_sweep: fills dvalues [nnz] (the products gyt[row] * xt[col]) when it is defined and dxt
// [K, 1] (W^T @ gyt) when it is; gyt [rows, 1], xt [K, 1] (needed for dvalues), any strides; float32, float16 or
// bfloat16 (float64 takes the plain loops). Raises, naming `op`, on a column index outside [0, K).
void vec_grads(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& gyt,
               const at::Tensor& xt, at::Tensor& dvalues, at::Tensor& dxt, int64_t K, const char* op) {
  const int64_t rows = rowptr.numel() - 1, nnz = col.numel();
  const bool dots = dvalues.defined(), scatter = dxt.defined();
  const int64_t parts = std::max<int64_t>(1, row_parts(rows));
  // accumulators in slot 1; float32 products in slot 3 unless dvalues is float32
  float* acc = scatter ? cpu::scratch(1, parts * K).mutable_data_ptr<float>() : nullptr;
  at::Tensor dv = dots ? (dvalues.scalar_type() == at::kFloat ? dvalues : cpu::scratch(3, nnz)) : at::Tensor();
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gyt.scalar_type(), "vec_grads", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "vec_grads", [&] {
      const int32_t* rp = rowptr.const_data_ptr<int32_t>();
      const index_t* cp = col.const_data_ptr<index_t>();
      const scalar_t* vp = scatter ? values.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* gp = gyt.const_data_ptr<scalar_t>();
      const scalar_t* xp = dots ? xt.const_data_ptr<scalar_t>() : nullptr;
      const int64_t gs = gyt.stride(0), xs = dots ? xt.stride(0) : 0;
      float* dvp = dots ? dv.mutable_data_ptr<float>() : nullptr;
      if (dots && scatter)
        vec_sweep<true, true, index_t, scalar_t>(rp, cp, vp, gp, gs, xp, xs, acc, dvp, rows, K, bad);
      else if (dots)
        vec_sweep<true, false, index_t, scalar_t>(rp, cp, vp, gp, gs, xp, xs, acc, dvp, rows, K, bad);
      else
        vec_sweep<false, true, index_t, scalar_t>(rp, cp, vp, gp, gs, xp, xs, acc, dvp, rows, K, bad);
      if (scatter && !bad) sum_vec_parts<scalar_t>(acc, parts, dxt.mutable_data_ptr<scalar_t>(), dxt.stride(0), K);
    });
  });
  TORCH_CHECK_VALUE(!bad, op, ": a column index is outside [0, ", K, ")");
  if (dots && !dv.is_same(dvalues)) dvalues.copy_(dv);
}

// spmm_t over W^T blocked by W's rows (nb > 1 blocks; float32 / float16 / bfloat16, B > 32): W's values gathered
// into its order, then spmm_grad's sweep without the products (csc_sweep, in panels of up to 64 columns: without
// the dot products 64 fit the registers), W^T's columns split between threads. Against spmm over the plain W^T
// (spmm_impl), 4096 x 4096, one process alternating the two, 9 rounds, per-round ratio (Zen 4, 2026-12-01): batch
// 64 at 50 / 70 / 85% 0.41 / 0.58 / 0.65, batch 256 0.72 / 0.68 / 0.83 (with panels of at most 32 columns, 1.33 at
// batch 256, 70%). One accumulator per column, blocks and rows in order: the same bits as spmm_impl in the float32
// runs measured.
at::Tensor spmm_t_blocked(const at::Tensor& values, const at::Tensor& t_rowptr, int64_t nb, const at::Tensor& t_col,
                          const at::Tensor& t_perm, const at::Tensor& yt, int64_t rows, int64_t K) {
  const int64_t B = yt.size(1), nnz = values.numel();
  at::Tensor out = empty_output({K, B}, yt.options());
  if (K == 0 || B == 0) return out;
  if (rows == 0 || nnz == 0) return out.zero_();
  const int64_t T = panel_width(rows, B, l2_bytes());  // gyt's panel, read at random rows: all of L2
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_t_blocked", [&] {
    PYSPARSE_DISPATCH_INDEX(t_col, "spmm_t_blocked", [&] {
      const index_t* tcp = t_col.const_data_ptr<index_t>();
      const at::Tensor vals = gather_values<scalar_t, float, index_t>(values, t_perm, bad, tcp, rows);
      if (bad) return;
      float* dacc = cpu::scratch(4, K * T).mutable_data_ptr<float>();
      for_each_run(panel_runs(B, T), "spmm_t", [&](const PanelRun& s, int, auto v_tag) {
        const at::Tensor pg = pack_panels<scalar_t>(yt.narrow(1, s.b0, s.bt), s.T, 0);
        grad_csc_panels<decltype(v_tag)::value, false, index_t, scalar_t>(
            t_rowptr.const_data_ptr<int32_t>(), nb, tcp, vals.const_data_ptr<float>(), nullptr,
            pg.const_data_ptr<float>(), nullptr, 0, 0, nullptr, dacc,
            out.mutable_data_ptr<scalar_t>() + s.b0 * out.stride(1), out.stride(0), out.stride(1), rows, K, s.bt, bad);
      });
    });
  });
  TORCH_CHECK_VALUE(!bad, "spmm_t: a row index or t_perm entry of the transposed structure is out of range");
  return out;
}

at::Tensor spmm_t_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& yt,
                      int64_t n_cols, const std::optional<at::Tensor>& t_rowptr, const std::optional<at::Tensor>& t_col,
                      const std::optional<at::Tensor>& t_perm) {
  check_csr(rowptr, col, values, "spmm_t");
  check_dense(yt, values, "spmm_t", "yt");
  TORCH_CHECK_VALUE(values.device().is_cpu(), "spmm_t: tensors must be on the CPU for the CPU kernel");
  const int64_t rows = rowptr.numel() - 1, B = yt.size(1), K = n_cols;
  TORCH_CHECK_VALUE(yt.size(0) == rows, "spmm_t: yt has ", yt.size(0), " rows but W has ", rows);
  TORCH_CHECK_VALUE(K >= 0, "spmm_t: n_cols must be >= 0, got ", K);
  check_rowptr_cpu(rowptr, values.numel(), "spmm_t");
  // Two ways. Above a batch of 32, given W^T's structure (the layers cache it): spmm over it, W's values read
  // through the permutation (spmm_impl gathers them into column order once when there is more than one panel;
  // 4096 x 4096 at 90%, batch 256: 13-14 ms, against 21-23 ms for the scatter). Otherwise a scatter from W's
  // CSR into per-thread panels (scatter_panels): at batch 16, 90%, 1.5 ms (0.9 ms since it shares spmm_grad's
  // kernel), against 2.7 ms reading through the permutation in place and 4.7 ms gathering first (2026-11-29);
  // at batch 1 the same scatter without panels (vec_grads).
  // W^T blocked by W's rows (csr.structure's row_block) goes through spmm_grad's sweep instead (spmm_t_blocked;
  // float64 through the scatter). Where spmm_grad keeps W's CSR above batch 32 (csr_over_transposed: large or
  // tall matrices at batches up to 64, rows of one aliasing length up to 128), so does spmm_t: 4096 x 4096 in 2:4,
  // one process alternating, scatter / W^T, batch 48 / 64 17.5 / 25.4 and 17.2 / 25.2 ms, 128 34.6 / 35.6 ms
  // (2026-12-01; the other cases' figures at csr_over_transposed, and its rule for small matrices, which spmm_t
  // takes over a blocked W^T only).
  if (has_transposed(t_rowptr, t_col, t_perm) && B > 32) {
    const int64_t nb = check_transposed(values, *t_rowptr, *t_col, *t_perm, K, "spmm_t", /*blocked=*/true);
    check_rowptr_cpu(*t_rowptr, values.numel(), "spmm_t (transposed structure)");
    if (!csr_over_transposed(rowptr, values, K, nb, B, /*grad=*/false)) {
      if (nb == 1) return spmm_impl(*t_rowptr, *t_col, values, &*t_perm, yt, at::Tensor());
      if (yt.scalar_type() != at::kDouble) return spmm_t_blocked(values, *t_rowptr, nb, *t_col, *t_perm, yt, rows, K);
    }
  }
  const at::Tensor y = yt.scalar_type() == at::kDouble ? yt.contiguous() : yt;  // panels pack through strides
  at::Tensor out = empty_output({K, B}, y.options());
  if (K == 0 || B == 0) return out;
  if (rows == 0 || values.numel() == 0) return out.zero_();
  if (B == 1 && y.scalar_type() != at::kDouble) {  // a single column: no panels
    at::Tensor no_dots;
    vec_grads(rowptr, col, values, y, at::Tensor(), no_dots, out, K, "spmm_t");
    return out;
  }
  std::atomic<bool> bad{false};
#ifdef __AVX2__
  if (narrow_batch(B, y.scalar_type())) {  // panels of 8 columns
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_t_narrow", [&] {
      PYSPARSE_DISPATCH_INDEX(col, "spmm_t_narrow", [&] {
        const int64_t parts = std::max<int64_t>(1, row_parts(rows));
        const at::Tensor packed = pack8<scalar_t>(y, 0);
        float* acc = cpu::scratch(1, parts * K * kNarrow).mutable_data_ptr<float>();
        sweep_narrow<false, true, index_t, scalar_t>(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                                    values.const_data_ptr<scalar_t>(), packed.const_data_ptr<float>(),
                                                    nullptr, acc, nullptr, rows, K, bad);
        if (!bad) sum_parts8<scalar_t>(acc, parts, out.mutable_data_ptr<scalar_t>(), B, 1, K, B);
      });
    });
    TORCH_CHECK_VALUE(!bad, "spmm_t: a column index is outside [0, ", K, ")");
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_t_cpu", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "spmm_t_cpu", [&] {
      const int32_t* rp = rowptr.const_data_ptr<int32_t>();
      const index_t* cp = col.const_data_ptr<index_t>();
      const scalar_t* vp = values.const_data_ptr<scalar_t>();
      if (std::is_same_v<scalar_t, double>) {
        // float64 (gradcheck): a serial scatter, exact and simple.
        using acc_t = at::opmath_type<scalar_t>;
        std::vector<acc_t> acc(static_cast<size_t>(K * B), acc_t(0));
        const scalar_t* yp = y.const_data_ptr<scalar_t>();
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = rp[r]; j < rp[r + 1]; ++j) {
            const int64_t c = cp[j];
            if (static_cast<uint64_t>(c) >= static_cast<uint64_t>(K)) {
              bad = true;
              continue;
            }
            for (int64_t b = 0; b < B; ++b)
              acc[c * B + b] += static_cast<acc_t>(vp[j]) * static_cast<acc_t>(yp[r * B + b]);
          }
        scalar_t* op = out.mutable_data_ptr<scalar_t>();
        for (int64_t i = 0; i < K * B; ++i) op[i] = static_cast<scalar_t>(acc[i]);
        return;
      }
      const int64_t T = csr_panel_width(rows, K, B, /*grad=*/false);  // the accumulators [K, T] and yt's panel
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      // per-thread accumulators (slot 1: the packed panels are in slot 0)
      float* acc = cpu::scratch(1, std::max<int64_t>(1, row_parts(rows)) * K * T).mutable_data_ptr<float>();
      for_each_run(panel_runs(B, T), "spmm_t", [&](const PanelRun& s, int, auto v_tag) {
        const at::Tensor packed = pack_panels<scalar_t>(y.narrow(1, s.b0, s.bt), s.T, 0);
        scatter_panels<decltype(v_tag)::value, false, index_t, scalar_t>(
            rp, cp, vp, packed.const_data_ptr<float>(), nullptr, acc, nullptr, op + s.b0, B, 1, rows, K, s.bt, bad);
      });
    });
  });
  TORCH_CHECK_VALUE(!bad, "spmm_t: a column index is outside [0, ", K, ")");
  return out;
}

at::Tensor sddmm_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& a, const at::Tensor& b) {
  check_csr_structure(rowptr, col, "sddmm");
  TORCH_CHECK_VALUE(a.defined(), "sddmm: a is undefined");
  TORCH_CHECK_TYPE(is_matmul_float(a.scalar_type()), "sddmm: a must be float32, float16, bfloat16 or float64, got ",
                   a.scalar_type());
  TORCH_CHECK_VALUE(a.device() == col.device(), "sddmm: a is on ", a.device(), " but the structure is on ",
                    col.device());
  check_dense(a, a, "sddmm", "a");
  check_dense(b, a, "sddmm", "b");
  TORCH_CHECK_VALUE(a.device().is_cpu(), "sddmm: tensors must be on the CPU for the CPU kernel");
  const int64_t rows = rowptr.numel() - 1, K = b.size(0), B = a.size(1);
  TORCH_CHECK_VALUE(a.size(0) == rows, "sddmm: a has ", a.size(0), " rows but the structure has ", rows);
  TORCH_CHECK_VALUE(b.size(1) == B, "sddmm: a and b must have the same number of columns, got ", B, " and ", b.size(1));
  check_rowptr_cpu(rowptr, col.numel(), "sddmm");
  // float64 reads a and b contiguous; the other dtypes pack them into panels through their strides.
  const bool dbl = a.scalar_type() == at::kDouble;
  const at::Tensor ac = dbl ? a.contiguous() : a, bc = dbl ? b.contiguous() : b;
  at::Tensor out = empty_output({col.numel()}, a.options());
  if (col.numel() == 0) return out;
  if (B == 0) return out.zero_();
  if (B == 1 && !dbl) {  // a single column: no panels
    at::Tensor no_scatter;
    vec_grads(rowptr, col, at::Tensor(), ac, bc, out, no_scatter, K, "sddmm");
    return out;
  }
  std::atomic<bool> bad{false};
#ifdef __AVX2__
  if (narrow_batch(B, a.scalar_type())) {  // panels of 8 columns
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sddmm_narrow", [&] {
      PYSPARSE_DISPATCH_INDEX(col, "sddmm_narrow", [&] {
        const at::Tensor pa = pack8<scalar_t>(ac, 0), pb = pack8<scalar_t>(bc, 1);
        at::Tensor out_f =
            out.scalar_type() == at::kFloat ? out : at::empty({col.numel()}, a.options().dtype(at::kFloat));
        sweep_narrow<true, false, index_t, scalar_t>(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                                    nullptr, pa.const_data_ptr<float>(), pb.const_data_ptr<float>(),
                                                    nullptr, out_f.mutable_data_ptr<float>(), rows, K, bad);
        if (!out_f.is_same(out)) out.copy_(out_f);
      });
    });
    TORCH_CHECK_VALUE(!bad, "sddmm: a column index is outside [0, ", K, ")");
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sddmm_cpu", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "sddmm_cpu", [&] {
      const int32_t* rp = rowptr.const_data_ptr<int32_t>();
      const index_t* cp = col.const_data_ptr<index_t>();
      if (std::is_same_v<scalar_t, double>) {
        sddmm_plain<index_t, scalar_t>(rp, cp, ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                                       out.mutable_data_ptr<scalar_t>(), rows, K, B, bad);
        return;
      }
      const int64_t T = panel_width(std::max(rows, K), B, l2_bytes() / 2);  // a's and b's panels
      at::Tensor out_f =
          out.scalar_type() == at::kFloat ? out : at::empty({col.numel()}, a.options().dtype(at::kFloat));
      float* op = out_f.mutable_data_ptr<float>();
      for_each_run(panel_runs(B, T), "sddmm", [&](const PanelRun& s, int i, auto v_tag) {
        const at::Tensor pa = pack_panels<scalar_t>(ac.narrow(1, s.b0, s.bt), s.T, 0);
        const at::Tensor pb = pack_panels<scalar_t>(bc.narrow(1, s.b0, s.bt), s.T, 1);
        sddmm_panels<decltype(v_tag)::value, index_t>(rp, cp, pa.const_data_ptr<float>(), pb.const_data_ptr<float>(),
                                                      op, rows, K, s.bt, bad, /*add=*/i > 0);
      });
      if (!out_f.is_same(out)) out.copy_(out_f);
    });
  });
  TORCH_CHECK_VALUE(!bad, "sddmm: a column index is outside [0, ", K, ")");
  return out;
}


// The backward of spmm in one call: (dvalues, dxt) = (sddmm(W, gyt, xt), W^T @ gyt), one sweep over the stored
// positions for both (grad_csc_panels / scatter_panels / sweep_narrow / vec_sweep above; over W's CSR with large
// panels, sddmm's and spmm_t's sweeps over the same packed panels), and with bias_grad dbias = gyt.sum(1), summed
// as gyt is packed (an empty tensor without). float64 and empty shapes take the two ops (and at::sum).
std::tuple<at::Tensor, at::Tensor, at::Tensor> spmm_grad_cpu(
    const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& gyt,
    const at::Tensor& xt, const std::optional<at::Tensor>& t_rowptr, const std::optional<at::Tensor>& t_col,
    const std::optional<at::Tensor>& t_perm, bool bias_grad) {
  check_csr(rowptr, col, values, "spmm_grad");
  check_dense(gyt, values, "spmm_grad", "gyt");
  check_dense(xt, values, "spmm_grad", "xt");
  TORCH_CHECK_VALUE(values.device().is_cpu(), "spmm_grad: tensors must be on the CPU for the CPU kernel");
  const int64_t rows = rowptr.numel() - 1, K = xt.size(0), B = xt.size(1), nnz = values.numel();
  TORCH_CHECK_VALUE(gyt.size(0) == rows && gyt.size(1) == B, "spmm_grad: gyt must be [", rows, ", ", B,
                    "] (W's rows by xt's columns), got ", gyt.sizes());
  check_rowptr_cpu(rowptr, nnz, "spmm_grad");
  const bool transposed = has_transposed(t_rowptr, t_col, t_perm);
  int64_t nb = 1;  // W^T's blocks (csc_sweep)
  if (transposed) {
    nb = check_transposed(values, *t_rowptr, *t_col, *t_perm, K, "spmm_grad", /*blocked=*/true);
    check_rowptr_cpu(*t_rowptr, nnz, "spmm_grad (transposed structure)");
  }
  at::Tensor dxt = empty_input_grad(xt);
  if (values.scalar_type() == at::kDouble || rows == 0 || K == 0 || B == 0 || nnz == 0)
    return {sddmm_cpu(rowptr, col, gyt, xt),
            dxt.copy_(spmm_t_cpu(rowptr, col, values, gyt, K, t_rowptr, t_col, t_perm)),
            bias_grad ? gyt.sum(1) : at::empty({0}, values.options())};
  if (B == 1) {  // a single column: no panels; the bias gradient is gyt's column
    at::Tensor dvalues = empty_output({nnz}, values.options());
    vec_grads(rowptr, col, values, gyt, xt, dvalues, dxt, K, "spmm_grad");
    return {dvalues, dxt, bias_grad ? gyt.select(1, 0).clone() : at::empty({0}, values.options())};
  }
#ifdef __AVX2__
  if (narrow_batch(B, values.scalar_type())) {  // panels of 8 columns (below kGradCscMinBatch: W's CSR)
    at::Tensor dvalues = empty_output({nnz}, values.options());
    at::Tensor dbias = at::empty({bias_grad ? rows : 0}, values.options().dtype(at::kFloat));
    std::atomic<bool> bad{false};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_grad_narrow", [&] {
      PYSPARSE_DISPATCH_INDEX(col, "spmm_grad_narrow", [&] {
        const int64_t parts = std::max<int64_t>(1, row_parts(rows));
        const at::Tensor pg = pack8<scalar_t>(gyt, 0, bias_grad ? dbias.mutable_data_ptr<float>() : nullptr);
        const at::Tensor px = pack8<scalar_t>(xt, 1);
        float* acc = cpu::scratch(2, parts * K * kNarrow).mutable_data_ptr<float>();
        at::Tensor dv = values.scalar_type() == at::kFloat ? dvalues : cpu::scratch(3, nnz);
        sweep_narrow<true, true, index_t, scalar_t>(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                                   values.const_data_ptr<scalar_t>(), pg.const_data_ptr<float>(),
                                                   px.const_data_ptr<float>(), acc, dv.mutable_data_ptr<float>(), rows,
                                                   K, bad);
        if (bad) return;
        sum_parts8<scalar_t>(acc, parts, dxt.mutable_data_ptr<scalar_t>(), dxt.stride(0), dxt.stride(1), K, B);
        if (!dv.is_same(dvalues)) dvalues.copy_(dv);
      });
    });
    TORCH_CHECK_VALUE(!bad, "spmm_grad: a column index is outside [0, ", K, ")");
    return {dvalues, dxt, dbias.to(values.scalar_type())};
  }
#endif
  // Which sweep: over W^T's structure when it is given and the batch is above 32, where gathering the values
  // into its order before and scattering the products back after (two passes through the permutation, ~1 ms
  // each at 1.7M stored values with cold caches) cost less than the CSR sweep's scatter into dxt, once per
  // panel; else over W's CSR. 4096 x 4096 at 90%, the op alone (2026-11-29, W^T / CSR): batch
  // 256, 11-12.6 / 23 ms (sddmm + spmm_t 20-21); 128, 6.8 / 9.9; 64, 4.1 / 5.1-5.3; 33, 4.1 / 5.1; 32, 2.9 /
  // 2.5; 16, 2.4 / 1.4. Reading and writing through the permutation inside the sweep instead (on its first and
  // last panels) cost 13-15 ms at batch 256: those random accesses then compete with gyt's panel for L2 (again
  // on a Zen 4, 2026-12-01, one process alternating, the same bits: 1.37 / 1.37 / 1.16x the passes' time at batch
  // 64 / 128 / 256, 90%).
  //
  // W^T blocked by W's rows (nb > 1; csr.cpu_row_block gives the layers blocks of 256 rows below 87.5% sparsity;
  // csc_sweep): the gather and the scatter then walk a block's rows at a time, and each block's panel rows are
  // 256 rows of gyt's panel. 4096 x 4096, the op alone, one process alternating the plain and the blocked
  // structure, 9 rounds, per-round ratio blocked / plain (Zen 4, 2026-12-01): batch 64 at 50 / 70 / 80 / 85%
  // 0.54 / 0.59 / 0.75 / 0.88, batch 128 0.63 / 0.69 / 0.83 / 0.93, batch 256 0.72 / 0.79 / 0.88 / 0.99; 4096 x
  // 1024 at 70%, batch 64 / 256, 0.89 / 0.93, 1024 x 4096 0.95 / 1.02. At 90% (13 blocks of 316 rows, about 32
  // stored values of a column per block) 0.91-1.08 over batches 64-256, at 95% 0.83-1.04: no blocks there. (A
  // first version that also skipped the row indices' check in the gather had measured 0.83 at 90%, batch 64.)
  // Rows of one length spanning a multiple of 1 KB: W's CSR up to kAliasedCscMinBatch, the permutation passes
  // being slow there (4096 x 4096 in 2:4, the op alone, CSR / W^T: batch 48 36.5 / 60.2 ms, 64 34.4 / 58.4, 128
  // 65.9 / 74.0, 256 138 / 104; 1024 x 1024: 1.9 / 2.7, 2.3 / 2.7, 3.2 / 3.2, 6.5 / 5.1). And over a plain W^T,
  // large or tall matrices up to batch 64 (8192 x 8192 at 90%, batch 33: 46 -> 26 ms): csr_over_transposed.
  // Also small matrices up to batch 64, whose CSR sweep then takes the batch in one panel (csr_over_transposed).
  const bool csc = transposed && B > kGradCscMinBatch && !csr_over_transposed(rowptr, values, K, nb, B, /*grad=*/true);
  // Over W^T, gyt's panel read at random rows: all of L2, as spmm's, but at most 32 columns (kCscMaxPanel). On a
  // Zen 3 with 512 KB, all of it, 32 columns instead of 16, in one process alternating the two, ten rounds,
  // median: batch 256 at 90 / 95 / 99% 53.8 / 28.5 / 9.5 -> 45.5 / 24.7 / 8.1 ms, batch 64 at 99% 2.9 -> 2.5 ms
  // (2026-11-29). With 1 MB, all of it would be 64 columns: on a Zen 5 32 and 64 measured the same; on a Zen 4
  // the 64-column sweep is slower per stored value whether or not its panel fills L2 (one process alternating
  // the two, 11-15 rounds, per-round ratio 32 / 64, 2026-12-01, the op alone, W's rows x columns: 4096 x 4096 at
  // batch 256, 90 / 95 / 99% 0.88 / 0.86 / 0.89, batch 64 at 90 / 99% 0.89-0.90 / 0.99-1.01; 4096 x 1024 / 2048
  // at batch 256, 90%, 0.91 / 0.85; with 64-column panels of 256 / 512 KB, 1024 / 2048 x 4096 at batch 256, 90%
  // 0.88 / 0.98, 99% 0.94 / 0.83; the training step at batch 128 / 256, 90-99%, 0.86-0.97 / 0.79-0.94).
  // Over W's CSR, half of L2: xt's panel and the accumulators.
  const int64_t T = csc ? std::min(kCscMaxPanel, panel_width(rows, B, l2_bytes())) : csr_panel_width(rows, K, B, true);
  at::Tensor dvalues = empty_output({nnz}, values.options());
  // Over W^T, with as many panels as threads (or a multiple) and few stored values (their products, 4 bytes
  // each, within one core's L2), the batch is split between threads (grad_csc_tiles), each packing its own panels
  // as it goes and sweeping all of W^T's columns over them, rather than the columns (grad_csc_panels, after one
  // parallel pack of every panel). A/B, the op alone, batch 256 (2026-11-29): 4096 x 4096 at 99% 1.54-1.60 ->
  // 1.31-1.38 ms, 1024 x 1024 at 90% 0.62-0.64 -> 0.59 ms; with more stored values each thread's own stream of
  // products (and of the whole structure, once per panel) costs more than it saves: 4096 x 4096 at 98% mixed,
  // 97% 3.6-3.9 -> 4.3-4.4 ms, 90% 11.0 -> 12.2 ms.
  const int64_t ntiles = (B + T - 1) / T, threads = at::get_num_threads();
  const int64_t parts = csc && threads > 1 && ntiles % threads == 0 && nnz * 4 <= l2_bytes() ? threads : 1;
  // the batch in runs of panels (panel_runs), except where the threads pack their own (grad_csc_tiles: whole)
  const PanelRuns runs = panel_runs(B, T);
  // the bias gradient's float32 sums (padded to whole 16-row blocks; one row of them per part), converted to
  // values' dtype at the end
  const int64_t padded_rows = bias_grad ? (rows + kLanes - 1) / kLanes * kLanes : 0;
  at::Tensor dbias = at::empty({parts, padded_rows}, values.options().dtype(at::kFloat));
  float* dbp = bias_grad ? dbias.mutable_data_ptr<float>() : nullptr;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_grad_cpu", [&] {
    // each run's panels of gyt (with the bias gradient's sums) and of xt, packed in slots 0 and 1 as it comes
    // (unless the threads pack their own)
    auto pack_run = [&](const PanelRun& s, int i, bool with_x) {
      return std::make_pair(pack_panels<scalar_t>(gyt.narrow(1, s.b0, s.bt), s.T, 0, dbp, i > 0),
                            with_x ? pack_panels<scalar_t>(xt.narrow(1, s.b0, s.bt), s.T, 1) : at::Tensor());
    };
    scalar_t* dxp = dxt.mutable_data_ptr<scalar_t>();
    const int64_t dsk = dxt.stride(0), dsb = dxt.stride(1);
    scalar_t* dvp = dvalues.mutable_data_ptr<scalar_t>();
    if (csc) {
      // W's values in W^T's order as float32 (slot 2), the products in that order (slot 3, a row per part),
      // scattered back; blocked, xt's panels (slot 1: all of them, or one per part) and the partial sums of dxt
      // (slot 4, [parts, K, T])
      const at::Tensor dv = cpu::scratch(3, parts * nnz);
      const bool blocked = nb > 1;
      float* dacc = blocked ? cpu::scratch(4, parts * K * T).mutable_data_ptr<float>() : nullptr;
      PYSPARSE_DISPATCH_INDEX(*t_col, "spmm_grad_cpu", [&] {
        // the same pass checks the row indices, which the sweep reads unchecked (once per panel)
        const at::Tensor vals = gather_values<scalar_t, float, index_t>(values, *t_perm, bad,
                                                                        t_col->const_data_ptr<index_t>(), rows);
        TORCH_CHECK_VALUE(!bad, "spmm_grad: a row index or t_perm entry of the transposed structure is out of range");
        const int32_t* trp = t_rowptr->const_data_ptr<int32_t>();
        const index_t* tcp = t_col->const_data_ptr<index_t>();
        if (parts > 1) {
          float* pxp = blocked ? cpu::scratch(1, parts * K * T).mutable_data_ptr<float>() : nullptr;
          with_panel_width<kCscMaxPanel>(T, "spmm_grad", [&](auto v_tag) {
            grad_csc_tiles<decltype(v_tag)::value, index_t, scalar_t>(
                trp, nb, tcp, vals.const_data_ptr<float>(), dv.mutable_data_ptr<float>(),
                cpu::scratch(0, parts * rows * T).mutable_data_ptr<float>(), pxp, dacc, dbp, padded_rows,
                gyt.const_data_ptr<scalar_t>(), gyt.stride(0), gyt.stride(1), xt.const_data_ptr<scalar_t>(),
                xt.stride(0), xt.stride(1), dxp, dsk, dsb, rows, K, B, parts);
          });
        } else {
          for_each_run<kCscMaxPanel>(runs, "spmm_grad", [&](const PanelRun& s, int i, auto v_tag) {
            const auto panels = pack_run(s, i, blocked);
            const at::Tensor &pg = panels.first, &px = panels.second;
            const at::Tensor xs = xt.narrow(1, s.b0, s.bt);
            grad_csc_panels<decltype(v_tag)::value, true, index_t, scalar_t>(
                trp, nb, tcp, vals.const_data_ptr<float>(), dv.mutable_data_ptr<float>(), pg.const_data_ptr<float>(),
                xs.const_data_ptr<scalar_t>(), xs.stride(0), xs.stride(1),
                blocked ? px.const_data_ptr<float>() : nullptr, dacc, dxp + s.b0 * dsb, dsk, dsb, rows, K, s.bt, bad,
                /*add=*/i > 0);
          });
        }
      });
      scatter_values<scalar_t>(dv.const_data_ptr<float>(), t_perm->const_data_ptr<int32_t>(), dvp, nnz, parts);
    } else {
      // products straight into dvalues when it is float32, else through float32 scratch (slot 3)
      const at::Tensor acc = cpu::scratch(2, std::max<int64_t>(1, row_parts(rows)) * K * T);
      at::Tensor dv = values.scalar_type() == at::kFloat ? dvalues : cpu::scratch(3, nnz);
      float* dvf = dv.mutable_data_ptr<float>();
      // One sweep for both gradients (each stored position reads xt's panel row and adds into the accumulators'
      // row), or two sweeps over the same packed panels, sddmm's then spmm_t's, when those two randomly addressed
      // [K, T] arrays take a quarter of L2 or more: then each sweep alone, with half the random working set, costs
      // less than their sum in one. Zen 4 (1 MB of L2), 4096 rows, one process alternating the two, 9 rounds,
      // per-round ratio two / one (2026-11-30): K = 4096 at batch 16 / 24 / 32 (T = 16 / 32 / 32), 90% 0.95 / 0.83
      // / 0.81, 95% 0.92 / 0.80 / 0.77, 99% 0.93 / 0.86 / 0.87, batch 16 at 50 / 70 / 80% 0.96 / 0.86 / 0.71;
      // K = 2048, batch 16 at 80 / 90% 0.92 / 0.85, at 50 / 70% 1.11 / 1.05 (a quarter of L2: taken), batch 32 at
      // 70-90% 0.83-0.88; below a quarter one sweep: K = 1024, batch 16 / 32 at 90% 0.97 / 0.95, 50% 1.06 / 0.98;
      // K = 768 at 90% 1.06 / 0.99. (Batches 1-8 keep their one sweep, vec_sweep and sweep_narrow: two measured
      // 1.19-1.30 times slower on the Zen 3; at batch 1 with grad_span, 0.92-1.09 on the Zen 4: no gain either.)
      // The outputs were the same bits either way in every case measured.
      PYSPARSE_DISPATCH_INDEX(col, "spmm_grad_cpu", [&] {
        const int32_t* rp = rowptr.const_data_ptr<int32_t>();
        const index_t* cp = col.const_data_ptr<index_t>();
        const scalar_t* vp = values.const_data_ptr<scalar_t>();
        float* ap = acc.mutable_data_ptr<float>();
        for_each_run(runs, "spmm_grad", [&](const PanelRun& s, int i, auto v_tag) {
          constexpr int V = decltype(v_tag)::value;
          const auto panels = pack_run(s, i, true);  // xt's rows are read in the order of W's columns
          const float* pgp = panels.first.const_data_ptr<float>();
          const float* pxp = panels.second.const_data_ptr<float>();
          if (2 * K * s.T * static_cast<int64_t>(sizeof(float)) >= l2_bytes() / 4) {  // two sweeps
            sddmm_panels<V, index_t>(rp, cp, pgp, pxp, dvf, rows, K, s.bt, bad, /*add=*/i > 0);
            scatter_panels<V, false, index_t, scalar_t>(rp, cp, vp, pgp, nullptr, ap, nullptr, dxp + s.b0 * dsb, dsk,
                                                        dsb, rows, K, s.bt, bad);
          } else {
            scatter_panels<V, true, index_t, scalar_t>(rp, cp, vp, pgp, pxp, ap, dvf, dxp + s.b0 * dsb, dsk, dsb, rows,
                                                       K, s.bt, bad, /*add=*/i > 0);
          }
        });
      });
      TORCH_CHECK_VALUE(!bad, "spmm_grad: a column index is outside [0, ", K, ")");
      if (!dv.is_same(dvalues)) dvalues.copy_(dv);
    }
  });
  if (bias_grad)
    for (int64_t p = 1; p < parts; ++p) dbias[0].add_(dbias[p]);  // the parts' sums, in part order
  return {dvalues, dxt, dbias[0].narrow(0, 0, bias_grad ? rows : 0).to(values.scalar_type())};
}
}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("spmm", &spmm_cpu);
  m.impl("spmm_t", &spmm_t_cpu);
  m.impl("sddmm", &sddmm_cpu);
  m.impl("spmm_grad", &spmm_grad_cpu);
}

}  // namespace pysparse
