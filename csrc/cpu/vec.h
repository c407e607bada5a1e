// Vector helpers of the CPU kernels. First 16-lane float32 vectors (loads, stores, a 16 x 16 transpose); then
// the inner loops of the direct sparse convolution (csrc/cpu/conv.cpp), over contiguous runs of tens to
// thousands of elements: out = init + sum_t v_t * in_t (weighted_sum, register-blocked so that out is
// written once instead of once per term) and sums_t += dot(a, in_t) (dots, several windows per load of a).
// With AVX-512 the float32 versions use 16-lane FMAs, with AVX2 + FMA 8-lane ones, both with masked tails
// (masked-out lanes are neither read nor written, so a run may end anywhere); elsewhere (the portable build),
// and for float64, loops the compiler vectorises.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

namespace pysparse {
namespace cpu {

// ---------------------------------------------------------------------------------------------------------
// 16-lane float32 vectors, for the panel kernels (spmm.cpp) and the layout transposes (conv.cpp). With AVX-512
// a GCC vector extension of 64 bytes: one register. Elsewhere a struct of the widest vectors the target has
// (two AVX 8-lane or four SSE 4-lane parts): a 64-byte vector extension there has no machine mode, so GCC keeps
// every such variable in memory (on an AVX2-only Zen 3 spmm ran 3-11x slower: every multiply-add a
// stack load and store, the accumulators copied with `rep movs`), while a struct of parts that have one is
// split into registers.
// ---------------------------------------------------------------------------------------------------------
constexpr int64_t kLanes = 16;

#ifdef __AVX512F__
typedef float vfloat __attribute__((vector_size(64)));

inline vfloat vload(const float* p) {
  vfloat v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

// vload's store: unaligned, and through a float vector type, which may alias float objects only. A memcpy or
// intrinsic store may alias anything, so after each one in a loop the compiler reloads every pointer the loop
// reads through memory (a lambda's captures by reference): in scatter_panels' read-modify-write of its
// accumulators, four extra loads per stored position (spmm_grad at batch 16, 90%: 1.30 -> 1.10 ms, 2026-11-29).
typedef float vfloat_u __attribute__((vector_size(64), aligned(4)));
inline void vstore(float* p, vfloat v) { *reinterpret_cast<vfloat_u*>(p) = v; }
#else
#ifdef __AVX__
typedef float vpart __attribute__((vector_size(32)));
typedef float vpart_u __attribute__((vector_size(32), aligned(4)));  // unaligned, aliasing floats only (above)
#else
typedef float vpart __attribute__((vector_size(16)));
typedef float vpart_u __attribute__((vector_size(16), aligned(4)));
#endif
constexpr int kPartLanes = sizeof(vpart) / sizeof(float);
constexpr int kParts = kLanes / kPartLanes;

struct vfloat {
  vpart p[kParts];
  vfloat& operator+=(const vfloat& o) {
#pragma GCC unroll 4
    for (int i = 0; i < kParts; ++i) p[i] += o.p[i];
    return *this;
  }
};
static_assert(sizeof(vfloat) == kLanes * sizeof(float), "vfloat must be 16 packed floats");

inline vfloat operator+(vfloat a, const vfloat& b) { return a += b; }
inline vfloat operator*(const vfloat& a, const vfloat& b) {
  vfloat r;
#pragma GCC unroll 4
  for (int i = 0; i < kParts; ++i) r.p[i] = a.p[i] * b.p[i];
  return r;
}
inline vfloat operator+(const vfloat& a, float s) {
  vfloat r;
#pragma GCC unroll 4
  for (int i = 0; i < kParts; ++i) r.p[i] = a.p[i] + s;
  return r;
}
inline vfloat operator*(float s, const vfloat& a) {
  vfloat r;
#pragma GCC unroll 4
  for (int i = 0; i < kParts; ++i) r.p[i] = s * a.p[i];
  return r;
}

inline vfloat vload(const float* p) {
  vfloat v;
#pragma GCC unroll 4
  for (int i = 0; i < kParts; ++i) v.p[i] = *reinterpret_cast<const vpart_u*>(p + i * kPartLanes);
  return v;
}
inline void vstore(float* p, const vfloat& v) {
#pragma GCC unroll 4
  for (int i = 0; i < kParts; ++i) *reinterpret_cast<vpart_u*>(p + i * kPartLanes) = v.p[i];
}
#endif

#ifdef __AVX512F__
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }  // n in [0, 16]
#endif

// float16 / bfloat16 bits <-> float32 lanes. Up: exact (a bfloat16 is a float32's upper half; float16 through
// F16C). Down: rounded to nearest even, as c10's scalar conversions (a NaN bfloat16 is 0x7FC0, as c10 makes it).
// (Through a stack copy converted one value at a time, a bfloat16 depthwise channels-last layer took 2.6x its
// float32 time: Zen 4, 2026-12-02.)
template <typename T>
constexpr bool is_half_v = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__F16C__))
// c10's float32 -> bfloat16 rounding, lane by lane, for both ISAs' narrowing below: F a GCC vector of floats, U
// the same width of uint32_t. To nearest even (the upper half plus 0x7FFF and the kept half's lowest bit); a NaN
// becomes 0x7FC0. The bfloat16 in each lane's low 16 bits.
template <typename U, typename F>
inline U bf16_bits(F v) {
  const U b = reinterpret_cast<U>(v);
  const U rounded = (b + (((b >> 16) & 1u) + 0x7FFFu)) >> 16;
  return v != v ? U{} + 0x7FC0u : rounded;  // (v != v: the NaN lanes)
}
#endif
#ifdef __AVX512F__
inline vfloat widen16(__m256i h, c10::Half) { return _mm512_cvtph_ps(h); }
inline vfloat widen16(__m256i h, c10::BFloat16) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m256i narrow16(vfloat v, c10::Half) {
  return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m256i narrow16(vfloat v, c10::BFloat16) {
#ifdef __AVX512BF16__
  // One instruction where no lane is a NaN or a float32 subnormal (it rounds to nearest even as c10 does, but
  // flushes subnormals to zero and keeps a NaN's payload); those blocks take the integer rounding below.
  if (_mm512_fpclass_ps_mask(v, 0x01 | 0x20 | 0x80) == 0) return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#endif
  using U = uint32_t __attribute__((vector_size(64)));
  using F = float __attribute__((vector_size(64)));
  return _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(bf16_bits<U>(reinterpret_cast<F>(v))));
}
#elif defined(__AVX2__) && defined(__F16C__)
#define PYSPARSE_HALF_LANES 1
inline vpart widen8(__m128i h, c10::Half) { return _mm256_cvtph_ps(h); }
inline vpart widen8(__m128i h, c10::BFloat16) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m128i narrow8(vpart v, c10::Half) {
  return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m128i narrow8(vpart v, c10::BFloat16) {
  using U = uint32_t __attribute__((vector_size(32)));
  using F = float __attribute__((vector_size(32)));
  const __m256i r = reinterpret_cast<__m256i>(bf16_bits<U>(reinterpret_cast<F>(v)));
  // 8 words from the 32-bit lanes (each < 2^16): pack within 128-bit lanes, then the two quads in order
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(w);
}
#endif

// 16 values of p (n of them, the rest zero) as float32 lanes. (A partial float32 row takes a masked load: going
// through a stack copy stalls the vector load on the copy's narrower stores.)
template <typename scalar_t>
inline vfloat load_lanes(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == kLanes) return vload(p);
#ifdef __AVX512F__
    return _mm512_maskz_loadu_ps(tail_mask(n), p);
#endif
  }
#ifdef __AVX512F__
  if constexpr (is_half_v<scalar_t>) {
    if (n == kLanes) return widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), scalar_t());
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return widen16(_mm256_maskz_loadu_epi16(tail_mask(n), p), scalar_t());
#endif
  }
#elif defined(PYSPARSE_HALF_LANES)
  if constexpr (is_half_v<scalar_t>) {
    if (n == kLanes) {
      vfloat v;
      v.p[0] = widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), scalar_t());
      v.p[1] = widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)), scalar_t());
      return v;
    }
  }
#endif
  float tmp[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<float>(p[i]);
  return vload(tmp);
}

// The first n lanes of v into p (n <= 16), converted to scalar_t.
template <typename scalar_t>
inline void store_lanes(scalar_t* p, vfloat v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == kLanes) return vstore(p, v);
#ifdef __AVX512F__
    return _mm512_mask_storeu_ps(p, tail_mask(n), v);
#endif
  }
#ifdef __AVX512F__
  if constexpr (is_half_v<scalar_t>) {
    if (n == kLanes) return _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow16(v, scalar_t()));
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_mask_storeu_epi16(p, tail_mask(n), narrow16(v, scalar_t()));
#endif
  }
#elif defined(PYSPARSE_HALF_LANES)
  if constexpr (is_half_v<scalar_t>) {
    if (n == kLanes) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow8(v.p[0], scalar_t()));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), narrow8(v.p[1], scalar_t()));
      return;
    }
  }
#endif
  float tmp[kLanes];
  vstore(tmp, v);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(tmp[i]);
}

// The same as a non-temporal ("streaming") store where that is a full float32 vector: the line goes to memory
// without being read first or kept in the caches. p must then be 64-byte aligned (with AVX: two 32-byte halves,
// 32-byte aligned). Streaming stores are weakly ordered: a writer calls stream_fence() before other threads read.
template <typename scalar_t>
inline void stream_lanes(scalar_t* p, vfloat v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (n == kLanes) {
#ifdef __AVX512F__
      return _mm512_stream_ps(p, v);
#elif defined(__AVX__)
      _mm256_stream_ps(p, static_cast<__m256>(v.p[0]));
      _mm256_stream_ps(p + 8, static_cast<__m256>(v.p[1]));
      return;
#endif
    }
  }
  store_lanes(p, v, n);
}

inline void stream_fence() {
#ifdef __AVX__
  _mm_sfence();
#endif
}

// In-register transpose of a 16 x 16 block (r[i] = row i). With AVX-512: unpacks and lane shuffles (below).
// Elsewhere each part-wide square block is transposed in registers (transpose_part: unpacks and shuffles with AVX,
// rounds of interleaving row j with row j + 2 with SSE), and the blocks trade places.
#ifdef __AVX512F__
// In-lane unpacks first (pairs of rows, then pairs of pairs: r[4i + j]'s 128-bit lane l holds column 4l + j of
// rows 4i .. 4i + 3), then two rounds of 128-bit lane shuffles put those lanes in place. Against four rounds of
// two-source permutes (vpermt2ps): the same 64 instructions, but the unpacks are in-lane single-cycle ones; on
// Zen 4, a [8, 56, 56, 64] channels-last tensor moved into padded planes 16 x 16 at a time, 0.41-0.56 -> 0.24 ms
// (a plain copy: 0.08; without the transposes: 0.11; two threads, L3-resident, 2026-12-02).
inline void transpose16(vfloat (&r)[kLanes]) {
  __m512 a[kLanes], b[kLanes];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_ps(__m512(r[2 * i]), __m512(r[2 * i + 1]));
    a[2 * i + 1] = _mm512_unpackhi_ps(__m512(r[2 * i]), __m512(r[2 * i + 1]));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const __m512d a0 = _mm512_castps_pd(a[4 * i]), a1 = _mm512_castps_pd(a[4 * i + 1]),
                  a2 = _mm512_castps_pd(a[4 * i + 2]), a3 = _mm512_castps_pd(a[4 * i + 3]);
    b[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    b[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    b[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    b[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  // lanes (0, 2) of each of a pair of row groups, and lanes (1, 3): a[8i + j] holds columns j and 8 + j, a[8i +
  // 4 + j] columns 4 + j and 12 + j, of rows 8i .. 8i + 7
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      a[8 * i + j] = _mm512_shuffle_f32x4(b[8 * i + j], b[8 * i + 4 + j], 0x88);
      a[8 * i + 4 + j] = _mm512_shuffle_f32x4(b[8 * i + j], b[8 * i + 4 + j], 0xdd);
    }
#pragma GCC unroll 8
  for (int j = 0; j < 8; ++j) {
    r[j] = vfloat(_mm512_shuffle_f32x4(a[j], a[8 + j], 0x88));
    r[8 + j] = vfloat(_mm512_shuffle_f32x4(a[j], a[8 + j], 0xdd));
  }
}
#else
#ifdef __AVX__
// An 8 x 8 block: unpacks of row pairs, shuffles of pair pairs, then 128-bit halves exchanged (24 instructions;
// two-source shuffles by __builtin_shuffle took 48: GCC builds each from an unpack and a half move). Blocks moved
// through it, Zen 4 running the AVX2 build: 0.32 -> 0.26 ms a million floats (2026-12-02).
inline void transpose_part(vpart (&b)[kPartLanes]) {
  __m256 t[8], u[8];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(__m256(b[2 * i]), __m256(b[2 * i + 1]));
    t[2 * i + 1] = _mm256_unpackhi_ps(__m256(b[2 * i]), __m256(b[2 * i + 1]));
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {  // u[4i + j]: column j of rows 4i .. 4i + 3 in the low half, 4 + j in the high
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    b[j] = vpart(_mm256_permute2f128_ps(u[j], u[4 + j], 0x20));
    b[4 + j] = vpart(_mm256_permute2f128_ps(u[j], u[4 + j], 0x31));
  }
}
#else
inline void transpose_part(vpart (&b)[kPartLanes]) {
  typedef int32_t vint __attribute__((vector_size(sizeof(vpart))));
  const vint lo = {0, 4, 1, 5};
  const vint hi = {2, 6, 3, 7};
  constexpr int rounds = 2;
  constexpr int half = kPartLanes / 2;
#pragma GCC unroll 2
  for (int round = 0; round < rounds; ++round) {
    vpart t[kPartLanes];
#pragma GCC unroll 2
    for (int j = 0; j < half; ++j) {
      t[2 * j] = __builtin_shuffle(b[j], b[j + half], lo);
      t[2 * j + 1] = __builtin_shuffle(b[j], b[j + half], hi);
    }
#pragma GCC unroll 4
    for (int j = 0; j < kPartLanes; ++j) b[j] = t[j];
  }
}
#endif

inline void transpose16(vfloat (&r)[kLanes]) {
  vfloat out[kLanes];
#pragma GCC unroll 4
  for (int I = 0; I < kParts; ++I)
#pragma GCC unroll 4
    for (int J = 0; J < kParts; ++J) {
      vpart b[kPartLanes];
#pragma GCC unroll 8
      for (int k = 0; k < kPartLanes; ++k) b[k] = r[I * kPartLanes + k].p[J];
      transpose_part(b);
#pragma GCC unroll 8
      for (int k = 0; k < kPartLanes; ++k) out[J * kPartLanes + k].p[I] = b[k];
    }
#pragma GCC unroll 16
  for (int j = 0; j < kLanes; ++j) r[j] = out[j];
}
#endif

// ---------------------------------------------------------------------------------------------------------
// Runs of the direct convolution
// ---------------------------------------------------------------------------------------------------------
template <typename T>
inline void axpy(T* __restrict__ out, const T* __restrict__ in, T v, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[i] += v * in[i];
}

// dot(a, b) over len elements.
template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t len) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += a[i] * b[i];
  return s;
}

// out[i] = init + sum over t < n of vals[t] * base[offs[t] + i], for i < len.
template <typename T>
inline void weighted_sum(T* __restrict__ out, T init, const T* base, const int64_t* offs, const T* vals, int64_t n,
                         int64_t len) {
  std::fill(out, out + len, init);
  for (int64_t t = 0; t < n; ++t) axpy(out, base + offs[t], vals[t], len);
}

// sums[t] += dot(a, base + offs[t]) over len elements, for t < n (the values gradient: one output-gradient run
// against many input windows).
template <typename T>
inline void dots(const T* a, const T* base, const int64_t* offs, int64_t n, int64_t len, T* sums) {
  for (int64_t t = 0; t < n; ++t) sums[t] += dot(a, base + offs[t], len);
}

#ifdef __AVX512F__
// 64 outputs (four registers) at a time, every term summed into them before they are stored; the last, partial
// tile is masked per register.
template <>
inline void weighted_sum<float>(float* __restrict__ out, float init, const float* base, const int64_t* offs,
                                const float* vals, int64_t n, int64_t len) {
  for (int64_t i0 = 0; i0 < len; i0 += 64) {
    const int64_t left = len - i0;
    __m512 a0 = _mm512_set1_ps(init), a1 = a0, a2 = a0, a3 = a0;
    if (left >= 64) {
      for (int64_t t = 0; t < n; ++t) {
        const float* p = base + offs[t] + i0;
        const __m512 v = _mm512_set1_ps(vals[t]);
        a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p), a0);
        a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 16), a1);
        a2 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 32), a2);
        a3 = _mm512_fmadd_ps(v, _mm512_loadu_ps(p + 48), a3);
      }
      _mm512_storeu_ps(out + i0, a0);
      _mm512_storeu_ps(out + i0 + 16, a1);
      _mm512_storeu_ps(out + i0 + 32, a2);
      _mm512_storeu_ps(out + i0 + 48, a3);
    } else {
      const __mmask16 m0 = tail_mask(std::min<int64_t>(16, left)),
                      m1 = tail_mask(std::clamp<int64_t>(left - 16, 0, 16)),
                      m2 = tail_mask(std::clamp<int64_t>(left - 32, 0, 16)),
                      m3 = tail_mask(std::clamp<int64_t>(left - 48, 0, 16));
      for (int64_t t = 0; t < n; ++t) {
        const float* p = base + offs[t] + i0;
        const __m512 v = _mm512_set1_ps(vals[t]);
        a0 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m0, p), a0);
        a1 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m1, p + 16), a1);
        a2 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m2, p + 32), a2);
        a3 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m3, p + 48), a3);
      }
      _mm512_mask_storeu_ps(out + i0, m0, a0);
      _mm512_mask_storeu_ps(out + i0 + 16, m1, a1);
      _mm512_mask_storeu_ps(out + i0 + 32, m2, a2);
      _mm512_mask_storeu_ps(out + i0 + 48, m3, a3);
    }
  }
}

template <>
inline float dot<float>(const float* __restrict__ a, const float* __restrict__ b, int64_t len) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= len; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < len) {
    const __mmask16 m = tail_mask(len - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// Four windows at a time: each load of a feeds four FMAs.
template <>
inline void dots<float>(const float* a, const float* base, const int64_t* offs, int64_t n, int64_t len, float* sums) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const float *b0 = base + offs[t], *b1 = base + offs[t + 1], *b2 = base + offs[t + 2], *b3 = base + offs[t + 3];
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) {
      const __m512 va = _mm512_loadu_ps(a + i);
      s0 = _mm512_fmadd_ps(va, _mm512_loadu_ps(b0 + i), s0);
      s1 = _mm512_fmadd_ps(va, _mm512_loadu_ps(b1 + i), s1);
      s2 = _mm512_fmadd_ps(va, _mm512_loadu_ps(b2 + i), s2);
      s3 = _mm512_fmadd_ps(va, _mm512_loadu_ps(b3 + i), s3);
    }
    if (i < len) {
      const __mmask16 m = tail_mask(len - i);
      const __m512 va = _mm512_maskz_loadu_ps(m, a + i);
      s0 = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, b0 + i), s0);
      s1 = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, b1 + i), s1);
      s2 = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, b2 + i), s2);
      s3 = _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, b3 + i), s3);
    }
    sums[t] += _mm512_reduce_add_ps(s0);
    sums[t + 1] += _mm512_reduce_add_ps(s1);
    sums[t + 2] += _mm512_reduce_add_ps(s2);
    sums[t + 3] += _mm512_reduce_add_ps(s3);
  }
  for (; t < n; ++t) sums[t] += dot(a, base + offs[t], len);
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
// AVX2 twins of the AVX-512 versions above (the generic loops load and store out once per term, and read a once
// per window). Lanes at and past n of an 8-lane block are neither read nor written (maskload / maskstore).
inline __m256i tail_mask8(int64_t n) {  // n in [0, 8]
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lane);
}

// One tile of outputs: `full` (<= 8) whole 8-lane blocks, then with TAIL one block masked by m when full < 8.
template <bool TAIL>
inline void weighted_tile(float* __restrict__ out, float init, const float* base, const int64_t* offs,
                          const float* vals, int64_t n, int64_t full, __m256i m, bool add) {
  constexpr int R = 8;
  __m256 acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (!add)
      acc[r] = _mm256_set1_ps(init);
    else if (!TAIL || r < full)
      acc[r] = _mm256_loadu_ps(out + 8 * r);
    else if (r == full)
      acc[r] = _mm256_maskload_ps(out + 8 * r, m);
  }
  for (int64_t t = 0; t < n; ++t) {
    const float* p = base + offs[t];
    const __m256 v = _mm256_set1_ps(vals[t]);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      if (!TAIL || r < full)
        acc[r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(p + 8 * r), acc[r]);
      else if (r == full)
        acc[r] = _mm256_fmadd_ps(v, _mm256_maskload_ps(p + 8 * r, m), acc[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (!TAIL || r < full)
      _mm256_storeu_ps(out + 8 * r, acc[r]);
    else if (r == full)
      _mm256_maskstore_ps(out + 8 * r, m, acc[r]);
  }
}

// Terms are taken 32 at a time, each group over the whole run: a tile then reads 32 windows, whose lines the
// hardware prefetchers follow, rather than all of them (ResNet-18's layer4 has ~460 terms of 488 outputs per
// output channel: 460 streams of four lines per tile, each a demand miss). One process alternating all-terms
// and groups of 24 / 32 / 48, 13 rounds, median (Zen 3, 2026-11-30): forward at 90% layer1 / layer2 / layer3 /
// layer4 5.27 / 4.68 / 6.08 / 5.96 -> 4.50 / 4.23 / 5.15 / 5.14 ms (32), input gradient 3.99 / 4.93 / 7.46 /
// 6.58 -> 3.67 / 4.45 / 6.23 / 5.80 ms; 24 and 48 within a few percent of 32.
constexpr int64_t kTermGroup = 32;

// 64 outputs (eight registers) at a time, every term of a group summed into them before they are stored. With
// dots below, against the generic loops (one process alternating the two, 9 rounds, median; Zen 3, 2026-11-30,
// before the term groups), ResNet-18's layers at batch 8, 90%: forward 1.0-1.4x, values gradient 1.45-1.8x,
// input gradient 1.45-1.9x faster; a training step of layer1 / layer3 25.7 / 32.1 -> 15.8 / 20.2 ms, a GAN-sized
// 3 x 3 layer (32 -> 64 channels on 8 x 8) at batch 64, 80% 5.8 -> 3.0 ms (RESULTS.md).
template <>
inline void weighted_sum<float>(float* __restrict__ out, float init, const float* base, const int64_t* offs,
                                const float* vals, int64_t n, int64_t len) {
  const __m256i none = _mm256_setzero_si256();
  for (int64_t t0 = 0; t0 < std::max<int64_t>(n, 1); t0 += kTermGroup) {  // n = 0: one pass, out = init
    const int64_t g = std::min(kTermGroup, n - t0);
    const bool add = t0 > 0;  // a later group adds to the stored sums (float32 either way: the same result)
    int64_t i0 = 0;
    for (; i0 + 64 <= len; i0 += 64)
      weighted_tile<false>(out + i0, init, base + i0, offs + t0, vals + t0, g, 8, none, add);
    if (i0 < len) {
      const int64_t left = len - i0;
      weighted_tile<true>(out + i0, init, base + i0, offs + t0, vals + t0, g, left / 8, tail_mask8(left % 8), add);
    }
  }
}

inline float hsum8(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// W windows at a time against one 8-lane block of a: each load of a feeds W FMAs, W independent chains.
template <int W>
inline void dots_block(const float* a, const float* base, const int64_t* offs, int64_t len, float* sums) {
  const float* b[W];
  __m256 s[W];
#pragma GCC unroll 8
  for (int w = 0; w < W; ++w) b[w] = base + offs[w], s[w] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 va = _mm256_loadu_ps(a + i);
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) s[w] = _mm256_fmadd_ps(va, _mm256_loadu_ps(b[w] + i), s[w]);
  }
  if (i < len) {
    const __m256i m = tail_mask8(len - i);
    const __m256 va = _mm256_maskload_ps(a + i, m);
#pragma GCC unroll 8
    for (int w = 0; w < W; ++w) s[w] = _mm256_fmadd_ps(va, _mm256_maskload_ps(b[w] + i, m), s[w]);
  }
#pragma GCC unroll 8
  for (int w = 0; w < W; ++w) sums[w] += hsum8(s[w]);
}

template <>
inline void dots<float>(const float* a, const float* base, const int64_t* offs, int64_t n, int64_t len, float* sums) {
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) dots_block<8>(a, base, offs + t, len, sums + t);
  if (t + 4 <= n) dots_block<4>(a, base, offs + t, len, sums + t), t += 4;
  for (; t < n; ++t) dots_block<1>(a, base, offs + t, len, sums + t);
}
#endif

}  // namespace cpu
}  // namespace pysparse
