// The two inner loops of the direct sparse convolution (csrc/cpu/conv.cpp): out += v * in, and a running
// sum of in_a * in_b, over short contiguous runs (tens to thousands of elements). With AVX-512 the float32
// versions use 16-lane FMAs and a masked tail (masked-out lanes are neither read nor written, so a run may end
// anywhere); elsewhere, and for float64, a loop the compiler vectorises.
#pragma once

#include <cstdint>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace pysparse {
namespace cpu {

template <typename T>
inline void axpy(T* __restrict__ out, const T* __restrict__ in, T v, int64_t len) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) out[i] += v * in[i];
}

// A running dot product: a vector of partial sums that is reduced once, at the end (dot_sum), rather than
// after every run.
template <typename T>
struct Dot {
  T s = 0;
  void add(const T* __restrict__ a, const T* __restrict__ b, int64_t len) {
    T t = 0;
#pragma omp simd reduction(+ : t)
    for (int64_t i = 0; i < len; ++i) t += a[i] * b[i];
    s += t;
  }
  T sum() const { return s; }
};

#ifdef __AVX512F__
inline __mmask16 tail_mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

template <>
inline void axpy<float>(float* __restrict__ out, const float* __restrict__ in, float v, int64_t len) {
  const __m512 vv = _mm512_set1_ps(v);
  int64_t i = 0;
  for (; i + 16 <= len; i += 16)
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(vv, _mm512_loadu_ps(in + i), _mm512_loadu_ps(out + i)));
  if (i < len) {
    const __mmask16 m = tail_mask(len - i);
    _mm512_mask_storeu_ps(out + i, m,
                          _mm512_fmadd_ps(vv, _mm512_maskz_loadu_ps(m, in + i), _mm512_maskz_loadu_ps(m, out + i)));
  }
}

template <>
struct Dot<float> {
  __m512 acc = _mm512_setzero_ps();
  void add(const float* __restrict__ a, const float* __restrict__ b, int64_t len) {
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < len) {
      const __mmask16 m = tail_mask(len - i);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
  }
  float sum() const { return _mm512_reduce_add_ps(acc); }
};
#endif

}  // namespace cpu
}  // namespace pysparse
