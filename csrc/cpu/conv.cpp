// Direct sparse convolution, CPU (Park et al., "Faster CNNs with direct sparse convolutions"): no im2col, no
// fold, forward and backward.
//
// Every kernel here works on "extended rows": a plane of OH rows is stored with the input's row stride Wp,
// so a stored weight (o, c, ki, kj) is one contiguous AXPY (or dot product) over (OH - 1) * Wp + OW elements
// between an output-shaped plane and the input plane shifted by the weight's tap; the Wp - OW extra columns
// per row are computed and dropped (or read as zeros). A stride s > 1 is turned into stride 1 first: the input
// is split into its s_h * s_w phases (x_p[a, b][i, j] = x[i * s_h + a, j * s_w + b], Hp x Wp each), and a tap
// (ki, kj) reads phase ((ki * d_h) % s_h, (kj * d_w) % s_w) at shift ((ki * d_h) / s_h, (kj * d_w) / s_w).
// With stride 1 there is one phase, the input itself. Zero padding is written into that layout as the input is
// copied in (and dropped as the input gradient is copied out): the layer passes its padding to the op instead
// of padding a copy first (F.pad, and a strided gradient out of its backward; a digits GAN step at 80%, A/B:
// 13.3-13.4 -> 11.7-12.0 ms, 2026-11-29).
//
// Small planes also interleave several images innermost (see Layout), so that a run stays long.
//
// - Forward: a task is (block of units, output channel o); each unit's output plane is a register-blocked
//   weighted sum of the shifted input windows of row o's stored weights (cpu::weighted_sum).
// - Input gradient: a task is (block of units, input channel c); the same weighted sum, phase by phase, over
//   c's stored weights (walked through W's cached transposed structure, or regrouped from the CSR), reading
//   gy in a layout with zeros around each run so that every shift is in bounds.
// - Values gradient: rows are split between threads by stored count; each stored weight is the sum over the
//   batch of dot(gy run of o, shifted window of x[c]) (cpu::dots).
// Both gradients read gy through an acc_t copy with rows zero-padded to Wp columns. Accumulation is float32
// (float64 for float64).
//
// Routes around that layout, taken first where they apply: 1 x 1 channels-last layers (the pixels' rows, the
// pointwise kernels), depthwise channels-last layers (16 channels of a pixel a vector, read in place) and
// depthwise NCHW layers (plane by plane from a zero-padded copy), float32 / float16 / bfloat16.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "../common.h"
#include "caches.h"
#include "rows.h"
#include "vec.h"

namespace pysparse {
namespace {

using cpu::beyond_caches;
using cpu::kLanes;
using cpu::load_lanes;
using cpu::store_lanes;
using cpu::stream_fence;
using cpu::stream_lanes;
using cpu::transpose16;
using cpu::vfloat;
using cpu::vload;
using cpu::vstore;

// The working layout of an input [N, C, H0, W0] zero-padded by (ph, pw) on both sides, H x W = (H0 + 2 ph) x
// (W0 + 2 pw), for a given stride, dilation and output size: the padded input's
// s_h * s_w phases, each Hp x Wp, with `nb` images interleaved innermost ("lanes"):
// [NB, C, s_h, s_w, Hp, Wp, nb], NB = ceil(N / nb), missing images zero. A unit is one block of nb images; a
// plane is one (unit, channel). Interleaving makes a tap's run nb times longer: for small images (a digits GAN
// works on 4x4 and 8x8 planes) a weight is then one AXPY over hundreds of elements instead of nb short ones.
// With stride 1, nb = 1 and no padding the layout is the input itself.
struct Layout {
  int64_t N, C, H, W, sh, sw, dh, dw, kh, kw, OH, OW;
  int64_t ph, pw;  // the padding inside H and W
  int64_t Hp, Wp;  // size of one phase
  int64_t nb, NB;  // images per unit, units
  int64_t plane;   // elements of one (unit, channel): sh * sw * Hp * Wp * nb
  int64_t len;     // a tap's run: ((OH - 1) * Wp + OW) * nb
  int64_t oplane;  // elements of one (unit, output channel) in the working layout: OH * Wp * nb
  int64_t phase;   // elements of one phase of a plane: Hp * Wp * nb
  int64_t reach;   // the largest shift of a tap inside its phase: ((kh-1)*dh / sh * Wp + (kw-1)*dw / sw) * nb
  Layout(int64_t N_, int64_t C_, int64_t H0, int64_t W0, at::IntArrayRef kernel, at::IntArrayRef stride,
         at::IntArrayRef dilation, at::IntArrayRef padding, int64_t OH_, int64_t OW_, int64_t nnz)
      : N(N_), C(C_), H(H0 + 2 * padding[0]), W(W0 + 2 * padding[1]), sh(stride[0]), sw(stride[1]),
        dh(dilation[0]), dw(dilation[1]), kh(kernel[0]), kw(kernel[1]), OH(OH_), OW(OW_), ph(padding[0]),
        pw(padding[1]), Hp((H + stride[0] - 1) / stride[0]), Wp((W + stride[1] - 1) / stride[1]) {
    // Enough lanes for runs of about 512 elements, but a unit's output plane within 8192 elements (32 KB); and
    // none when there are fewer than 0.25 stored weights per input element, where interleaving the input would
    // cost more than the short runs it saves.
    const int64_t run = (OH - 1) * Wp + OW;
    const int64_t by_run = (511 + run) / std::max<int64_t>(1, run), by_plane = 8192 / std::max<int64_t>(1, OH * Wp);
    nb = std::max<int64_t>(1, std::min({N, by_run, by_plane}));
    if (4 * nnz < C * H * W) nb = 1;
    // Then a multiple of 16 lanes where that leaves at most N / 8 missing images in the last unit: every tap's
    // shift is a multiple of nb elements, so each window of every weight then starts on a 64-byte line (the
    // layout is allocated 64-byte aligned) and a 16-float load touches one cache line instead of two. The
    // kernels stream windows from L2, so this is most of their memory traffic: a digits GAN's 3x3 layers at
    // batch 64, 80%, forward + backward: 4x4 planes (24 -> 32 lanes) 1.9 -> 1.5 ms, 8x8 (7 -> 16) 1.9-2.2 ->
    // 1.4-1.7 ms (2026-11-29).
    if (nb > 1) {
      const auto waste = [&](int64_t lanes) { return (N + lanes - 1) / lanes * lanes - N; };
      const int64_t up = (nb + 15) / 16 * 16, down = nb / 16 * 16;
      if (up <= by_plane && 8 * waste(up) <= N)
        nb = up;
      else if (down > 0 && 8 * waste(down) <= N)
        nb = down;
    }
    NB = (N + nb - 1) / nb;
    plane = sh * sw * Hp * Wp * nb;
    len = run * nb;
    oplane = OH * Wp * nb;
    phase = Hp * Wp * nb;
    reach = ((kh - 1) * dh / sh * Wp + (kw - 1) * dw / sw) * nb;
    taps.resize(static_cast<size_t>(kh * kw));
    for (int64_t t = 0; t < kh * kw; ++t) taps[t] = tap(t / kw, t % kw);
  }
  // Offset, inside one plane, of the window that tap (ki, kj) reads.
  int64_t tap(int64_t ki, int64_t kj) const {
    const int64_t a = ki * dh, b = kj * dw;
    return (((a % sh) * sw + b % sw) * Hp * Wp + (a / sh) * Wp + b / sw) * nb;
  }
  // The tap of W's column k = (c * kh + ki) * kw + kj (from the table).
  int64_t tap_of(int64_t k) const { return taps[k % (kh * kw)]; }
  // Offset, inside one unit (all C planes), of the window that column k reads: one 32-bit division (column
  // indices are int16 / int32), as the forward computes it for every stored weight of every call.
  int64_t window(int64_t k) const {
    const int32_t n = static_cast<int32_t>(kh * kw), c = static_cast<int32_t>(k) / n;
    return c * plane + taps[static_cast<int32_t>(k) - c * n];
  }
  std::vector<int64_t> taps;  // tap(ki, kj) at ki * kw + kj
};

// The map between a dense [N, C, H0, W0] tensor and the working layout [NB, C, sh, sw, Hp, Wp, nb] of that
// tensor zero-padded by (ph, pw) on both sides (H = H0 + 2 ph, W = W0 + 2 pw): element (n, c, y, x) is padded
// (h, w) = (y + ph, x + pw) = (i * sh + a, j * sw + b), at ((((n / nb) * C + c) * sh + a) * sw + b) * Hp + i) *
// Wp + j) * nb + n % nb; positions with no element (the padding, past N, H or W) are zero. The input uses the
// convolution's strides and padding; an output-shaped gradient uses stride 1, no padding and Wp columns (rows
// zero-padded to the input's phase width). Planes are `pitch` elements apart, each starting after `lead` zeros
// and followed by zeros up to the next (pitch 0: packed).
struct Interleave {
  int64_t N, C, H, W, sh, sw, Hp, Wp, nb, NB;
  int64_t lead = 0, pitch_ = 0;
  int64_t ph = 0, pw = 0;
  bool cl = false;  // the dense tensor is channels-last: (n, c, y, x) at ((n * H0 + y) * W0 + x) * C + c
  int64_t H0() const { return H - 2 * ph; }
  int64_t W0() const { return W - 2 * pw; }
  // Offset of element (n, c, y, 0) in the dense tensor, and the distance between neighbours in a row.
  int64_t row_at(int64_t n, int64_t c, int64_t y) const {
    return cl ? (n * H0() + y) * W0() * C + c : ((n * C + c) * H0() + y) * W0();
  }
  int64_t xstep() const { return cl ? C : 1; }
  // With one image a unit (nb = 1): where element row y starts inside a plane (phase row (y + ph) % sh, row
  // (y + ph) / sh), and, from there, where the element columns x0 + q, x0 + q + sw, ... (q < sw) land side by side
  // (phase column b = (x0 + q + pw) % sw, from j = (x0 + q + pw) / sw on): the channels-last moves' addresses.
  int64_t row_base(int64_t y) const { return ((y + ph) % sh) * sw * Hp * Wp + (y + ph) / sh * Wp; }
  int64_t run_offset(int64_t x0, int64_t q) const { return ((x0 + q + pw) % sw) * Hp * Wp + (x0 + q + pw) / sw; }
  int64_t plane() const { return sh * sw * Hp * Wp * nb; }
  int64_t pitch() const { return std::max(pitch_, lead + plane()); }
  bool identity() const {
    return !cl && sh == 1 && sw == 1 && nb == 1 && Wp == W && Hp == H && ph == 0 && pw == 0 && pitch() == plane();
  }
  // The columns j of phase column b that hold elements: [first, second), element column j * sw + b - pw.
  std::pair<int64_t, int64_t> columns(int64_t b) const { return span(b, sw, pw, W0(), Wp); }
  // The rows i of phase row a that hold elements: [first, second), element row i * sh + a - ph.
  std::pair<int64_t, int64_t> rows(int64_t a) const { return span(a, sh, ph, H0(), Hp); }
  // The indices i < n with i * s + a - pad in [0, size): [first, second).
  static std::pair<int64_t, int64_t> span(int64_t a, int64_t s, int64_t pad, int64_t size, int64_t n) {
    const int64_t lo = pad > a ? (pad - a + s - 1) / s : 0;
    const int64_t hi = pad + size > a ? std::min(n, (pad + size - a + s - 1) / s) : 0;
    return {std::min(lo, hi), hi};
  }
};

inline Interleave input_of(const Layout& L) {
  Interleave I{L.N, L.C, L.H, L.W, L.sh, L.sw, L.Hp, L.Wp, L.nb, L.NB};
  I.ph = L.ph;
  I.pw = L.pw;
  return I;
}
inline Interleave output_of(const Layout& L, int64_t O) { return {L.N, O, L.OH, L.OW, 1, 1, L.OH, L.Wp, L.nb, L.NB}; }
// The output gradient as the input gradient reads it: each run with `reach` zeros before it and zeros after it up
// to a whole phase, so that a tap's window of a phase can be read at any shift in [0, reach] without bounds.
inline Interleave padded_output_of(const Layout& L, int64_t O) {
  return {L.N, O, L.OH, L.OW, 1, 1, L.OH, L.Wp, L.nb, L.NB, L.reach, L.reach + L.phase};
}

// With stride 1 and lanes in whole 16s (the layouts Layout rounds them to), a plane of the working layout is
// the transpose of its nb images' planes, row by row: interleave and deinterleave move it 16 images x 16
// elements at a time through an in-register transpose instead of element by element with a stride of nb (a
// digits GAN's 3x3 layers spent ~16% of a training step there).
inline bool transposable(const Interleave& I) {
  return !I.cl && I.sh == 1 && I.sw == 1 && I.Hp == I.H && I.nb % kLanes == 0;
}

// Elements [p0, p0 + n) of a row-major H0 x W0 plane (n <= 16): the offset of each in the working layout's plane
// of row pitch Wp (lanes nb, padding (ph, pw)), for the 16 x 16 block moves.
inline void block_offsets(const Interleave& I, int64_t p0, int64_t n, int64_t (&at)[kLanes]) {
  const int64_t W0 = I.W0();
  int64_t i = p0 / W0, j = p0 % W0;
  for (int64_t e = 0; e < n; ++e) {
    at[e] = ((i + I.ph) * I.Wp + j + I.pw) * I.nb;
    if (++j == W0) j = 0, ++i;
  }
}

// Channels a task for the channels-last moves: 16 (a full transposed block), halved while that would leave fewer
// than two tasks a thread (tasks(g): their number with g channels a task), so that a batch of one still spreads
// over every core.
template <typename F>
int64_t channel_group(F&& tasks) {
  int64_t g = kLanes;
  const int64_t want = 2 * static_cast<int64_t>(at::get_num_threads());
  while (g > 1 && tasks(g) < want) g /= 2;
  return g;
}

// Lane masks and masked moves for strided phases: the lanes e < n with e % s == q; v's selected lanes stored
// side by side at p, and the reverse (p's values into the selected lanes of v, the others kept). With AVX-512 a
// compress / expand in registers and one masked access (the compiler's code for the element loops was AVX-512
// scatters, microcoded on Zen 4, or a branch per element).
inline uint32_t lanes_every(int64_t s, int64_t q, int64_t n) {
  uint32_t sel = 0;
  for (int64_t e = q; e < n; e += s) sel |= 1u << e;
  return sel;
}
inline void store_selected(float* p, vfloat v, uint32_t sel) {
#ifdef __AVX512F__
  _mm512_mask_storeu_ps(p, cpu::tail_mask(__builtin_popcount(sel)), _mm512_maskz_compress_ps(sel, v));
#else
  float t[kLanes];
  vstore(t, v);
  for (int64_t e = 0, r = 0; e < kLanes; ++e)
    if (sel >> e & 1u) p[r++] = t[e];
#endif
}
inline vfloat load_selected(const float* p, vfloat v, uint32_t sel) {
#ifdef __AVX512F__
  return _mm512_mask_expand_ps(v, sel, _mm512_maskz_loadu_ps(cpu::tail_mask(__builtin_popcount(sel)), p));
#else
  float t[kLanes];
  vstore(t, v);
  for (int64_t e = 0, r = 0; e < kLanes; ++e)
    if (sel >> e & 1u) t[e] = p[r++];
  return vload(t);
#endif
}

// Lanes [0, lanes) of block[e] into dst + e * stride, for e < count (<= 16). Its own function: the stores go
// through may-alias vector types, after which a caller's lambda would load whatever it reaches through its
// captures (the strides, the destination) again, at every store (bfloat16 1 x 1 16 -> 72 channels-last, batch 8:
// 0.61-0.65x -> 0.77x nn.Conv2d bfloat16 with this).
// stream: by streaming stores (stream_output).
template <typename scalar_t>
inline void put_lanes(scalar_t* p, vfloat v, int64_t n, bool stream) {
  if (stream)
    stream_lanes(p, v, n);
  else
    store_lanes(p, v, n);
}

template <typename scalar_t>
inline void store_block(scalar_t* dst, int64_t stride, const vfloat (&block)[kLanes], int64_t count, int64_t lanes,
                        bool stream = false) {
  for (int64_t e = 0; e < count; ++e) put_lanes(dst + e * stride, block[e], lanes, stream);
}

// The same to rows rows[0 .. count) of a [*, width] dst.
template <typename scalar_t>
inline void store_rows(scalar_t* dst, int64_t width, const int64_t* rows, const vfloat (&block)[kLanes], int64_t count,
                       int64_t lanes, bool stream = false) {
  for (int64_t e = 0; e < count; ++e) put_lanes(dst + rows[e] * width, block[e], lanes, stream);
}

// Whether a channels-last output (or input gradient) y of `elements` elements, C channels a pixel, is written by
// streaming stores (vec.h's stream_lanes; its 16-channel blocks then 64-byte aligned: float32, y aligned, C a
// multiple of 16): where it is larger than the threads' L2 caches together (caches.h). A 1 x 1 layer's forward,
// 24 -> 144 channels of 56 x 56 at 90%, batch 8 (14.5 MB out): 1.03-1.25 -> 0.64-0.70 ms; 16 -> 96 on 112 x 112
// (38.5 MB): 3.7-5.3 -> 1.9-2.0 ms. Whole channels-last models, which then read those outputs from memory:
// forward 0.87-0.96 of the time, training step 0.92-1.01 (benchmarks/RESULTS.md, thirty-ninth session).
template <typename scalar_t>
inline bool stream_output(const scalar_t* y, int64_t C, int64_t elements) {
  return std::is_same_v<scalar_t, float> && C % kLanes == 0 && reinterpret_cast<uintptr_t>(y) % 64 == 0 &&
         beyond_caches<scalar_t>(elements);
}

// The rows a task row of a channels-last depthwise kernel reads next, prefetched into L2 (software prefetch) in
// steps spread over the current row's work, so that their reads from memory overlap its arithmetic. Those kernels
// read each input pixel's 16-channel blocks far apart in time (block by block, C floats apart), which the hardware
// prefetchers do not follow: the rows came from memory at 8-12 GB/s, against 27-30 GB/s for a plain read of the
// tensor, and a layer whose input was not in L3 ran 2-3x slower than one whose input was (96 channels of
// 112 x 112, stride 2, batch 8, 90%: 3.2 -> 1.4 ms; prefetching the whole next row at once: 2.7 ms, its reads
// then no longer overlapping the arithmetic; benchmarks/RESULTS.md, fortieth session). Only for tensors larger
// than the threads' L2 caches (beyond_caches): smaller ones are likely in cache, where the prefetches cost 0-12%.
struct Prefetch {
  const char* p = nullptr;
  int64_t bytes = 0, done = 0;
  // the next range: `elements` elements from q (none: elements 0)
  template <typename scalar_t>
  void start(const scalar_t* q, int64_t elements) {
    p = reinterpret_cast<const char*>(q);
    bytes = elements * static_cast<int64_t>(sizeof(scalar_t));
    done = 0;
  }
  // prefetch the range up to its fraction i / n
  void to(int64_t i, int64_t n) {
    if (done >= bytes) return;
    for (const int64_t until = bytes * i / n; done < until; done += 64) __builtin_prefetch(p + done, 0, 2);
  }
};

// The input rows that output row r + 1 of a channels-last layer of layout L reads (through its first to its last
// tap row) and output row r does not, as elements of x [N, H, W, C]: the offset of their first and their number
// (0: none).
inline std::pair<int64_t, int64_t> next_input_rows(const Layout& L, int64_t r) {
  const int64_t H = L.H - 2 * L.ph, W = L.W - 2 * L.pw, span = (L.kh - 1) * L.dh;  // (H, W unpadded)
  const int64_t n = (r + 1) / L.OH, top = (r + 1) % L.OH * L.sh - L.ph;
  int64_t lo = std::max<int64_t>(0, top);
  if (r / L.OH == n) lo = std::max(lo, r % L.OH * L.sh - L.ph + span + 1);
  const int64_t hi = std::min(top + span, H - 1);
  if (hi < lo) return {0, 0};
  return {(n * H + lo) * W * L.C, (hi - lo + 1) * W * L.C};
}

// Channels-last tensors and the working layout with one image a unit (nb = 1), float32: both directions move up
// to 16 channels x 16 columns of an image row at a time, a contiguous [16 columns, 16 channels] block of the
// channels-last row transposed in registers, and a task (image, channel group) streams through that group's
// planes (Interleave::row_base / run_offset place the columns). Reading a channels-last input channel by channel
// with a stride of C, as the NCHW path reads its rows, made the forward of ResNet-18's layer1 at 90%, batch 8,
// twice as slow (4.1 -> 8.7 ms, Zen 4).
//
// A channels-last src [N, H0, W0, C] -> dst in the working layout (nb = 1), as float32. A task's planes are
// zeroed whole first (one fill each: zeroing only the padding's rows and columns took a fill call per row and
// side, ~14% of the copy's time), then the elements go in, row by row.
template <typename src_t>
void interleave_channels_last(const src_t* src, float* dst, const Interleave& I) {
  const int64_t H0 = I.H0(), W0 = I.W0(), C = I.C, pitch = I.pitch(), lead = I.lead;
  const int64_t sw = I.sw, pw = I.pw, N = I.N;
  const int64_t cb = channel_group([&](int64_t g) { return N * ((C + g - 1) / g); }), cblocks = (C + cb - 1) / cb;
  at::parallel_for(0, N * cblocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / cblocks, c0 = (t % cblocks) * cb, nc = std::min(cb, C - c0);
      float* const first = dst + (n * C + c0) * pitch;  // channel c0's plane, from its lead
      std::fill(first, first + nc * pitch, 0.f);
      for (int64_t y = 0; y < H0; ++y) {
        const src_t* in = src + (n * H0 + y) * W0 * C + c0;
        float* const row = first + lead + I.row_base(y);  // + k * pitch: channel c0 + k
        for (int64_t x0 = 0; x0 < W0; x0 += kLanes) {
          const int64_t nx = std::min(kLanes, W0 - x0);
          vfloat block[kLanes];
          if (nx == kLanes && nc == kLanes) {  // a full block (most of them): plain loads, no per-column test
            for (int64_t e = 0; e < kLanes; ++e) block[e] = load_lanes(in + (x0 + e) * C, kLanes);
          } else {
            for (int64_t e = 0; e < kLanes; ++e) block[e] = e < nx ? load_lanes(in + (x0 + e) * C, nc) : vfloat{};
          }
          transpose16(block);  // block[k] = columns x0 .. of channel c0 + k
          if (sw == 1) {
            store_block(row + x0 + pw, pitch, block, nc, nx);
            continue;
          }
          for (int64_t q = 0; q < std::min(sw, nx); ++q) {
            float* const p = row + I.run_offset(x0, q);
            const uint32_t sel = lanes_every(sw, q, nx);
            for (int64_t k = 0; k < nc; ++k) store_selected(p + k * pitch, block[k], sel);
          }
        }
      }
    }
  });
}

// The same with nb > 1 images a unit (lanes), the layout of small planes: a task is a unit's 16 channels, and each
// element (one pixel of the unit's images) moves as a [images, 16 channels] block of the channels-last rows, its
// rows one pixel of an image each, transposed in registers into 16 channels' runs of lanes. Element by element with
// a stride of C (the generic loop), a 3 x 3 stride-2 layer's copy of 256 channels of 28 x 28 (batch 8, 3 lanes)
// read each 64-byte line once per channel: a quarter of its forward, which took 1.5x its NCHW time. This way
// (one process switching per call, 7 rounds, per-round ratio, 90%): its forward 0.65 and values gradient 0.75 of
// the time, 512 ch 14 x 14 stride 2 0.72 / 0.71, 3 x 3 stride 1 on 256 ch 14 x 14 and 512 ch 7 x 7 0.95-0.97 /
// 0.85 (benchmarks/RESULTS.md).
template <typename src_t>
void interleave_channels_last_lanes(const src_t* src, float* dst, const Interleave& I) {
  const int64_t C = I.C, nb = I.nb, pitch = I.pitch(), sw = I.sw, image = I.H0() * I.W0() * C;
  const int64_t cblocks = (C + kLanes - 1) / kLanes;
  at::parallel_for(0, I.NB * cblocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u = t / cblocks, c0 = (t % cblocks) * kLanes, nc = std::min(kLanes, C - c0);
      const int64_t lanes = std::min(nb, I.N - u * nb);
      float* const first = dst + (u * C + c0) * pitch + I.lead;  // channel c0's plane (+ k * pitch: c0 + k)
      std::fill(first - I.lead, first - I.lead + nc * pitch, 0.f);
      for (int64_t a = 0; a < I.sh; ++a)
        for (int64_t b = 0; b < sw; ++b) {
          const auto [j0, j1] = I.columns(b);
          const auto [i0, i1] = I.rows(a);
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t y = i * I.sh + a - I.ph;  // the element row
            float* const o = first + (((a * sw + b) * I.Hp + i) * I.Wp) * nb;
            for (int64_t l0 = 0; l0 < lanes; l0 += kLanes) {
              const int64_t nl = std::min(kLanes, lanes - l0);
              const src_t* in = src + I.row_at(u * nb + l0, c0, y);  // + l * image: image l0 + l
              for (int64_t j = j0; j < j1; ++j) {
                const src_t* px = in + (j * sw + b - I.pw) * C;
                vfloat block[kLanes];
                for (int64_t l = 0; l < kLanes; ++l)
                  block[l] = l < nl ? load_lanes(px + l * image, nc) : vfloat{};
                transpose16(block);  // block[k] = images l0 .. of channel c0 + k
                store_block(o + j * nb + l0, pitch, block, nc, nl);
              }
            }
          }
        }
    }
  });
}

// The inverse for one image: channels c0 .. c0 + nc of image n, whose planes (without lead) start at
// planes[k * kstride], into a channels-last dst [N, H0, W0, C].
template <typename dst_t>
void deinterleave_channels_last(const float* planes, int64_t kstride, dst_t* dst, const Interleave& I, int64_t n,
                                int64_t c0, int64_t nc, bool stream = false) {
  stream = stream && c0 % kLanes == 0;  // (aligned blocks)
  const int64_t H0 = I.H0(), W0 = I.W0();
  for (int64_t y = 0; y < H0; ++y) {
    const int64_t base = I.row_base(y);
    for (int64_t x0 = 0; x0 < W0; x0 += kLanes) {
      const int64_t nx = std::min(kLanes, W0 - x0);
      vfloat block[kLanes];
      for (int64_t k = 0; k < kLanes; ++k) {
        if (k >= nc) {
          block[k] = vfloat{};
        } else if (I.sw == 1) {
          block[k] = load_lanes(planes + k * kstride + base + x0 + I.pw, nx);
        } else {
          block[k] = vfloat{};
          for (int64_t q = 0; q < std::min(I.sw, nx); ++q)
            block[k] = load_selected(planes + k * kstride + base + I.run_offset(x0, q), block[k],
                                     lanes_every(I.sw, q, nx));
        }
      }
      transpose16(block);  // block[e] = channels c0 .. of column x0 + e
      store_block(dst + ((n * H0 + y) * W0 + x0) * I.C + c0, I.C, block, nx, nc, stream);
    }
  }
}

// The same with nb > 1 images a unit: channels c0 .. c0 + nc (nc <= 16) of unit u's images, each element's
// [16 channels, images] block transposed in registers into the images' channels-last pixels (the input gradient
// of a 3 x 3 stride-2 layer on 256 channels of 28 x 28, batch 8, wrote them element by element with a stride of
// C: ~40% of its time; this way 0.68 of it, 512 channels of 14 x 14 0.65, stride 1 on 14 x 14 / 7 x 7 0.93-0.95).
template <typename dst_t>
void deinterleave_channels_last_lanes(const float* planes, int64_t kstride, dst_t* dst, const Interleave& I,
                                      int64_t u, int64_t c0, int64_t nc, bool stream = false) {
  stream = stream && c0 % kLanes == 0;
  const int64_t nb = I.nb, lanes = std::min(nb, I.N - u * nb), image = I.H0() * I.W0() * I.C;
  for (int64_t a = 0; a < I.sh; ++a)
    for (int64_t b = 0; b < I.sw; ++b) {
      const auto [j0, j1] = I.columns(b);
      const auto [i0, i1] = I.rows(a);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t y = i * I.sh + a - I.ph;  // the element row
        const float* p = planes + (((a * I.sw + b) * I.Hp + i) * I.Wp) * nb;  // + k * kstride: channel c0 + k
        for (int64_t l0 = 0; l0 < lanes; l0 += kLanes) {
          const int64_t nl = std::min(kLanes, lanes - l0);
          dst_t* const out = dst + I.row_at(u * nb + l0, c0, y);  // + l * image: image l0 + l
          for (int64_t j = j0; j < j1; ++j) {
            vfloat block[kLanes];
            for (int64_t k = 0; k < kLanes; ++k)
              block[k] = k < nc ? load_lanes(p + k * kstride + j * nb + l0, nl) : vfloat{};
            transpose16(block);  // block[l] = channels c0 .. of image l0 + l
            store_block(out + (j * I.sw + b - I.pw) * I.C, image, block, nl, nc, stream);
          }
        }
      }
    }
}

// src [N, C, H0, W0] -> dst in the working layout, converting to dst_t; parallel over (unit, channel), one
// output row (i, all j, all lanes) at a time (transposable layouts: 16 x 16 blocks).
template <typename src_t, typename dst_t>
void interleave(const src_t* src, dst_t* dst, const Interleave& I) {
  if constexpr (std::is_same_v<dst_t, float>) {
    if (I.cl) return I.nb == 1 ? interleave_channels_last(src, dst, I) : interleave_channels_last_lanes(src, dst, I);
  }
  const int64_t H0 = I.H0(), W0 = I.W0(), hw = H0 * W0, row = I.Wp * I.nb;
  at::parallel_for(0, I.NB * I.C, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t u = t / I.C, c = t % I.C, lanes = std::min(I.nb, I.N - u * I.nb);
      dst_t* out = dst + t * I.pitch() + I.lead;
      std::fill(out - I.lead, out, dst_t(0));
      std::fill(out + I.plane(), out - I.lead + I.pitch(), dst_t(0));
      if constexpr (std::is_same_v<dst_t, float>) {
        if (transposable(I)) {
          // the padding's rows, then its columns beside each row of elements (and the columns past W up to Wp)
          std::fill(out, out + I.ph * row, 0.f);
          std::fill(out + (I.ph + H0) * row, out + I.H * row, 0.f);
          for (int64_t i = I.ph; I.Wp > W0 && i < I.ph + H0; ++i) {
            std::fill(out + i * row, out + (i * I.Wp + I.pw) * I.nb, 0.f);
            std::fill(out + (i * I.Wp + I.pw + W0) * I.nb, out + (i + 1) * row, 0.f);
          }
          for (int64_t p0 = 0; p0 < hw; p0 += kLanes) {
            const int64_t n = std::min(kLanes, hw - p0);
            int64_t at[kLanes];
            block_offsets(I, p0, n, at);
            for (int64_t l0 = 0; l0 < I.nb; l0 += kLanes) {
              vfloat block[kLanes];
              for (int64_t r = 0; r < kLanes; ++r)
                block[r] = l0 + r < lanes ? load_lanes(src + ((u * I.nb + l0 + r) * I.C + c) * hw + p0, n) : vfloat{};
              transpose16(block);  // block[e] = element p0 + e of images l0 ..
              for (int64_t e = 0; e < n; ++e) vstore(out + at[e] + l0, block[e]);
            }
          }
          continue;
        }
      }
      if (!I.cl && I.nb == 1 && I.sh == 1 && I.sw == 1) {
        // Stride 1, one image a plane (a padded copy): the plane zeroed by one fill, then its element rows copied
        // in, instead of the padding zeroed row by row below (three fills a row: on small planes those calls
        // were most of the copy). One process alternating the two, 9 rounds, per-round ratio (Zen 4,
        // 2026-12-01), SparseConv2d's forward at 90%: MobileNetV3's depthwise 5 x 5 on 576 channels of 7 x 7
        // at batch 8 / 1 0.48-0.76 / 0.70-0.81, 3 x 3 on 512 of 14 x 14 0.57-0.76; ResNet-18's 3 x 3 on 56 x
        // 56 / 28 x 28 0.94-1.04 / 0.79-0.93. (Stride 2 the same way: depthwise 0.91-0.93, ResNet-18 0.98-1.03:
        // left as it is.)
        std::fill(out, out + I.plane(), dst_t(0));
        const src_t* r = src + (u * I.C + c) * hw;
        for (int64_t y = 0; y < H0; ++y) {
          dst_t* o = out + (y + I.ph) * I.Wp + I.pw;
          for (int64_t j = 0; j < W0; ++j) o[j] = static_cast<dst_t>(r[y * W0 + j]);
        }
        continue;
      }
      for (int64_t a = 0; a < I.sh; ++a)
        for (int64_t b = 0; b < I.sw; ++b) {
          const auto [j0, j1] = I.columns(b);
          for (int64_t i = 0; i < I.Hp; ++i) {
            const int64_t y = i * I.sh + a - I.ph;  // the element row
            dst_t* o = out + (((a * I.sw + b) * I.Hp + i) * I.Wp) * I.nb;
            if (y < 0 || y >= H0) {
              std::fill(o, o + row, dst_t(0));
              continue;
            }
            std::fill(o, o + j0 * I.nb, dst_t(0));
            if (lanes < I.nb) std::fill(o + j0 * I.nb, o + j1 * I.nb, dst_t(0));
            std::fill(o + j1 * I.nb, o + row, dst_t(0));
            if (!I.cl && I.nb == 1 && I.sw == 1) {  // a plain row copy (the common stride-1 case), vectorised
              const src_t* r = src + ((u * I.C + c) * H0 + y) * W0;
              for (int64_t j = j0; j < j1; ++j) o[j] = static_cast<dst_t>(r[j - I.pw]);
              continue;
            }
            // every other element of a row, vectorised (two loads, a shuffle; the loop below is scalar): the
            // forward of ResNet-18's stride-2 3 x 3 downsample at 90 / 95%, batch 8, 7.2 / 4.8 -> 6.7 / 4.3 ms
            if (!I.cl && I.nb == 1 && I.sw == 2) {
              const src_t* r = src + ((u * I.C + c) * H0 + y) * W0 + b - I.pw;
              for (int64_t j = j0; j < j1; ++j) o[j] = static_cast<dst_t>(r[2 * j]);
              continue;
            }
            // (channels-last: a channel's row is every C-th element of the image row)
            const int64_t xs = I.xstep();
            for (int64_t l = 0; l < lanes; ++l) {
              const src_t* r = src + I.row_at(u * I.nb + l, c, y);
              for (int64_t j = j0; j < j1; ++j)
                o[j * I.nb + l] = static_cast<dst_t>(r[(j * I.sw + b - I.pw) * xs]);
            }
          }
        }
    }
  });
}

// The inverse for plane t = (unit, channel) of the working layout, starting at `in` (after its lead): its
// elements into dst [N, C, H0, W0] (positions with no element are dropped).
template <typename src_t, typename dst_t>
void deinterleave_plane(const src_t* in, dst_t* dst, const Interleave& I, int64_t t) {
  const int64_t H0 = I.H0(), W0 = I.W0(), hw = H0 * W0;
  const int64_t u = t / I.C, c = t % I.C, lanes = std::min(I.nb, I.N - u * I.nb);
  if constexpr (std::is_same_v<src_t, float>) {
    if (transposable(I)) {
      for (int64_t p0 = 0; p0 < hw; p0 += kLanes) {
        const int64_t n = std::min(kLanes, hw - p0);
        int64_t at[kLanes];
        block_offsets(I, p0, n, at);
        for (int64_t l0 = 0; l0 < lanes; l0 += kLanes) {
          vfloat block[kLanes];
          for (int64_t e = 0; e < kLanes; ++e) block[e] = e < n ? vload(in + at[e] + l0) : vfloat{};
          transpose16(block);  // block[r] = elements p0 .. of image l0 + r
          for (int64_t r = 0; r < kLanes && l0 + r < lanes; ++r)
            store_lanes(dst + ((u * I.nb + l0 + r) * I.C + c) * hw + p0, block[r], n);
        }
      }
      return;
    }
  }
  if (!I.cl && I.nb == 1 && I.sw == 2) {
    // Stride 2 across: an element row's even and odd elements come from the rows of two phases, A and B; written
    // as pairs, both phases at once (contiguous stores instead of every other element, twice). The input
    // gradient of the downsample above: 5.6 / 3.7 -> 4.8 / 2.9 ms.
    const int64_t q = I.pw & 1;
    for (int64_t a = 0; a < I.sh; ++a) {
      const auto [i0, i1] = I.rows(a);
      for (int64_t i = i0; i < i1; ++i) {
        const src_t* A = in + ((a * 2 + q) * I.Hp + i) * I.Wp + (I.pw - q) / 2;
        const src_t* B = in + ((a * 2 + 1 - q) * I.Hp + i) * I.Wp + (I.pw + q) / 2;
        dst_t* r = dst + ((u * I.C + c) * H0 + i * I.sh + a - I.ph) * W0;
        for (int64_t m = 0; m < W0 / 2; ++m) {
          r[2 * m] = static_cast<dst_t>(A[m]);
          r[2 * m + 1] = static_cast<dst_t>(B[m]);
        }
        if (W0 % 2) r[W0 - 1] = static_cast<dst_t>(A[W0 / 2]);
      }
    }
    return;
  }
  for (int64_t a = 0; a < I.sh; ++a)
    for (int64_t b = 0; b < I.sw; ++b) {
      const auto [j0, j1] = I.columns(b);
      for (int64_t i = 0; i < I.Hp; ++i) {
        const int64_t y = i * I.sh + a - I.ph;
        if (y < 0 || y >= H0) continue;
        const src_t* p = in + (((a * I.sw + b) * I.Hp + i) * I.Wp) * I.nb;
        if (!I.cl && I.nb == 1 && I.sw == 1) {  // a plain row copy
          dst_t* r = dst + ((u * I.C + c) * H0 + y) * W0;
          for (int64_t j = j0; j < j1; ++j) r[j - I.pw] = static_cast<dst_t>(p[j]);
          continue;
        }
        const int64_t xs = I.xstep();
        for (int64_t l = 0; l < lanes; ++l) {
          dst_t* r = dst + I.row_at(u * I.nb + l, c, y);
          for (int64_t j = j0; j < j1; ++j) r[(j * I.sw + b - I.pw) * xs] = static_cast<dst_t>(p[j * I.nb + l]);
        }
      }
    }
}

// t [N, C, H, W] of scalar_t in the working layout as acc_t: t itself when that is already the layout. A
// channels-last t is read in place (other strides: a contiguous copy first).
template <typename scalar_t, typename acc_t>
at::Tensor to_layout(const at::Tensor& t, Interleave I) {
  I.cl = channels_last(t);
  const at::Tensor tc = I.cl ? t : t.contiguous();
  if (I.identity() && std::is_same_v<scalar_t, acc_t>) return tc;
  at::Tensor out = empty_output({I.NB, I.C, I.pitch()}, tc.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  interleave<scalar_t, acc_t>(tc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<acc_t>(), I);
  return out;
}

// Units per task: `per_unit` elements of each unit's working set within about `budget` elements.
inline int64_t unit_block(int64_t units, int64_t per_unit, int64_t budget) {
  return std::max<int64_t>(1, std::min(units, budget / std::max<int64_t>(1, per_unit)));
}

// ---------------------------------------------------------------------------------------------------------
// Pointwise (1 x 1, no padding, any stride) convolutions of channels-last tensors
// ---------------------------------------------------------------------------------------------------------
// W's rows (or W^T's) as the pointwise kernels read them: row pointers, each entry's column (idx) and value as
// float32; an entry whose column is outside [0, K) is marked in outside, sets bad, and reads column 0 with value 0.
struct PointwiseRows {
  std::vector<int64_t> ptr;
  std::vector<int32_t> idx;
  std::vector<float> val;
  std::vector<uint8_t> outside;
};

// From the CSR (values may be null: the values gradient needs only the columns).
template <typename index_t, typename scalar_t>
PointwiseRows pointwise_rows(const int32_t* rowptr, const index_t* col, const scalar_t* values, int64_t R, int64_t K,
                             std::atomic<bool>& bad) {
  const int64_t nnz = rowptr[R];
  PointwiseRows w{std::vector<int64_t>(rowptr, rowptr + R + 1), std::vector<int32_t>(static_cast<size_t>(nnz)),
                  std::vector<float>(static_cast<size_t>(nnz)), std::vector<uint8_t>(static_cast<size_t>(nnz))};
  at::parallel_for(0, nnz, 4096, [&](int64_t j0, int64_t j1) {
    bool local_bad = false;
    for (int64_t j = j0; j < j1; ++j) {
      const bool ok = static_cast<uint64_t>(col[j]) < static_cast<uint64_t>(K);
      local_bad |= !ok;
      w.idx[j] = ok ? static_cast<int32_t>(col[j]) : 0;
      w.val[j] = ok && values ? static_cast<float>(values[j]) : 0.f;
      w.outside[j] = !ok;
    }
    if (local_bad) bad = true;
  });
  return w;
}

// A strided 1 x 1 convolution (no padding) reads input pixel (n, oh sh, ow sw) for output pixel (n, oh, ow): the
// rows of its channels-last [N, H, W, C] input (and of its input gradient) by output pixel.
struct PixelMap {
  int64_t OH, OW, H, W, sh, sw;
  // rows[i] = the input pixel of output pixel q0 + i, for i < n
  void rows(int64_t q0, int64_t n, int64_t* out) const {
    int64_t img = q0 / (OH * OW), oh = q0 % (OH * OW) / OW, ow = q0 % OW;
    for (int64_t i = 0; i < n; ++i) {
      out[i] = (img * H + oh * sh) * W + ow * sw;
      if (++ow == OW) {
        ow = 0;
        if (++oh == OH) oh = 0, ++img;
      }
    }
  }
  // the pixels of the H x W images behind P output pixels (whole images)
  int64_t input_pixels(int64_t P) const { return P / (OH * OW) * H * W; }
};

// Pixels row(0) .. row(np - 1) (np <= T, T a multiple of 16) of a [P, width] channels-last tensor -> panel
// [width, T] of float32 (channel k's pixels in row k; missing pixels zero), 16 pixels x 16 channels a register
// transpose. row(i): the tile's i-th pixel (p0 + i, or a strided layer's input pixel).
template <typename scalar_t, typename Row>
void pixels_to_panel(const scalar_t* src, int64_t width, const Row& row, int64_t np, int64_t T, float* panel) {
  for (int64_t s0 = 0; s0 < T; s0 += kLanes) {
    const int64_t ns = std::clamp<int64_t>(np - s0, 0, kLanes);
    for (int64_t k0 = 0; k0 < width; k0 += kLanes) {
      const int64_t nk = std::min(kLanes, width - k0);
      vfloat block[kLanes];
      for (int64_t e = 0; e < kLanes; ++e)
        block[e] = e < ns ? load_lanes(src + row(s0 + e) * width + k0, nk) : vfloat{};
      transpose16(block);  // block[k] = channel k0 + k of the 16 pixels
      for (int64_t k = 0; k < nk; ++k) vstore(panel + (k0 + k) * T + s0, block[k]);
    }
  }
}

// pointwise_channels_last's kernel for tiles of T = 16 V pixels (below).
template <int V, typename scalar_t>
void pointwise_tiles(const PointwiseRows& w, int64_t R, int64_t K, const scalar_t* x, const scalar_t* bias, scalar_t* y,
                     int64_t P, const PixelMap* x_map, const PixelMap* y_map) {
  constexpr int64_t T = V * kLanes;
  const bool stream = stream_output(y, R, (y_map ? y_map->input_pixels(P) : P) * R);
  const int64_t* ptr = w.ptr.data();
  const int32_t* idx = w.idx.data();
  const float* val = w.val.data();
  const int64_t tiles = (P + T - 1) / T;
  at::parallel_for(0, tiles, std::max<int64_t>(1, 2048 / V / std::max<int64_t>(1, K + R)), [&](int64_t t0, int64_t t1) {
    std::vector<float> panel(static_cast<size_t>(K * T));  // [K, T]: channel k of the tile's pixels
    vfloat out[V][kLanes];
    int64_t rows[T];  // a strided layer's pixels
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = t * T, np = std::min(T, P - p0);
      if (x_map) {
        x_map->rows(p0, np, rows);
        pixels_to_panel(x, K, [&](int64_t i) { return rows[i]; }, np, T, panel.data());
      } else {
        pixels_to_panel(x, K, [p0](int64_t i) { return p0 + i; }, np, T, panel.data());
        if (y_map) y_map->rows(p0, np, rows);
      }
      for (int64_t r0 = 0; r0 < R; r0 += kLanes) {
        const int64_t nr = std::min(kLanes, R - r0);
        for (int64_t k = 0; k < kLanes; ++k) {
          vfloat acc[V];
          const float b = k < nr && bias ? static_cast<float>(bias[r0 + k]) : 0.f;
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) acc[v] = vfloat{} + b;
          const int64_t j1 = k < nr ? ptr[r0 + k + 1] : 0;
          for (int64_t j = k < nr ? ptr[r0 + k] : 0; j < j1; ++j) {
            const float* src = panel.data() + idx[j] * T;
            const float wv = val[j];
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) acc[v] += wv * vload(src + v * kLanes);
          }
#pragma GCC unroll 4
          for (int v = 0; v < V; ++v) out[v][k] = acc[v];
        }
        for (int64_t v = 0; v * kLanes < np; ++v) {
          transpose16(out[v]);  // out[v][e] = rows r0 .. of pixel p0 + v * 16 + e
          const int64_t ne = std::min(kLanes, np - v * kLanes);
          if (y_map)
            store_rows(y + r0, R, rows + v * kLanes, out[v], ne, nr, stream);
          else
            store_block(y + (p0 + v * kLanes) * R + r0, R, out[v], ne, nr, stream);
        }
      }
    }
    if (stream) stream_fence();
  });
}

// A channels-last x [N, H, W, K] is a [P, K] matrix of pixels (P = N * H * W), and a 1 x 1 convolution is
// y [P, R] = x W^T: no working layout, no planes. A tile of T = 16 V pixels at a time: their [T, K] rows
// transposed in registers (16 x 16 blocks) into a [K, T] panel (in L1 / L2), then each output row r is a sum of
// its stored weights times panel rows (V 16-lane multiply-adds each), 16 rows at a time transposed back into the
// pixels' [16, 16] blocks of y. The forward uses W's rows; the input gradient the same with W^T's (entries by
// input channel). Through the working layout, both directions of the layout change cost more than the few
// products of a 1 x 1 layer (MobileNetV3-small's, channels-last: 16 -> 72 on 56 x 56, batch 8, 0.79 ms NCHW
// against 1.30 ms). V = 4 where there are tiles enough for every thread: per row, its entries' loop (a branch
// the predictor misses at a row's end: rows of 90% sparse 16 -> 72 hold 0-5 entries) and the pointer loads are
// shared by 64 pixels instead of 16, and the four sums are independent. w: the R rows' entries, columns in [0, K).
// A strided layer (ResNet's downsampling shortcuts) is the same over the pixels it reads: x_map gives the forward's
// input rows by output pixel, y_map the input gradient's output rows (the caller zeroes the others; one map at
// most). Through the working layout ResNet-50's 256 -> 512 stride-2 shortcut on 56 x 56, batch 8, 90%, took 8.2 ms
// forward and 18.7 ms backward, 1.07x / 1.10x nn.Conv2d; this way 2.7 / 7.3 ms (benchmarks/RESULTS.md).
template <typename scalar_t>
void pointwise_channels_last(const PointwiseRows& w, int64_t R, int64_t K, const scalar_t* x, const scalar_t* bias,
                             scalar_t* y, int64_t P, const PixelMap* x_map = nullptr, const PixelMap* y_map = nullptr) {
  const int64_t threads = at::get_num_threads();
  if (P >= 4 * 64 * threads)
    pointwise_tiles<4>(w, R, K, x, bias, y, P, x_map, y_map);
  else if (P >= 4 * 32 * threads)
    pointwise_tiles<2>(w, R, K, x, bias, y, P, x_map, y_map);
  else
    pointwise_tiles<1>(w, R, K, x, bias, y, P, x_map, y_map);
}

// The values gradient of a pointwise layer on channels-last x [P, K] and gy [P, R]: dv[j] = sum over pixels of
// gy[p, r] x[p, idx[j]] for entry j of row r. A tile of T pixels (a multiple of 16) is transposed into panels
// x [K, T] and gy [R, T] (16 x 16 register transposes, missing pixels zero), then each entry adds one dot product
// of two panel rows (cpu::dots). Threads take ranges of tiles and sum into their own [nnz] array, added into dv at
// the end: the transposes, most of the work, are done once. T: the two panels within ~64 KB, but at least 64
// pixels (or a thread's share of P, rounded up to 16, where that is less): each dot product ends in a horizontal
// sum and a scalar add, which 16-pixel tiles (K + R > 682) paid for every single multiply-add. On ResNet-50's and
// MobileNetV3's wider 1 x 1 layers 64-pixel tiles take 0.54-0.81 of the time (benchmarks/RESULTS.md), although
// their panels outgrow L1.
template <typename scalar_t>
void pointwise_grad_values_channels_last(const PointwiseRows& w, int64_t R, int64_t K, const scalar_t* x,
                                         const scalar_t* gy, int64_t P, float* dv, const PixelMap* x_map = nullptr) {
  const int64_t* ptr = w.ptr.data();
  const int64_t nnz = ptr[R];
  const int64_t threads = at::get_num_threads();
  const int64_t T = std::min(std::clamp<int64_t>((int64_t{1} << 14) / std::max<int64_t>(1, K + R) / kLanes * kLanes,
                                                 64, 256),
                             std::max<int64_t>(kLanes, ((P + threads - 1) / threads + kLanes - 1) / kLanes * kLanes));
  const int64_t tiles = (P + T - 1) / T;
  std::vector<int64_t> offs(static_cast<size_t>(nnz));
  for (int64_t j = 0; j < nnz; ++j) offs[j] = w.idx[j] * T;
  std::mutex done;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> xpanel(static_cast<size_t>(K * T)), gpanel(static_cast<size_t>(R * T));
    std::vector<float> part(static_cast<size_t>(nnz), 0.f);
    std::vector<int64_t> rows(static_cast<size_t>(x_map ? T : 0));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = t * T, np = std::min(T, P - p0);
      const auto tile = [p0](int64_t i) { return p0 + i; };
      if (x_map) {
        x_map->rows(p0, np, rows.data());
        pixels_to_panel(x, K, [&](int64_t i) { return rows[i]; }, np, T, xpanel.data());
      } else {
        pixels_to_panel(x, K, tile, np, T, xpanel.data());
      }
      pixels_to_panel(gy, R, tile, np, T, gpanel.data());
      for (int64_t r = 0; r < R; ++r)
        cpu::dots(gpanel.data() + r * T, xpanel.data(), offs.data() + ptr[r], ptr[r + 1] - ptr[r], T,
                  part.data() + ptr[r]);
    }
    const std::lock_guard<std::mutex> lock(done);
    for (int64_t j = 0; j < nnz; ++j) dv[j] += part[j];
  });
}

// Whether a convolution is pointwise (1 x 1, no padding, any stride) on a channels-last float32 / half / bfloat16
// tensor: pointwise_channels_last's case.
inline bool pointwise_channels_last_case(const at::Tensor& t, at::IntArrayRef kernel, at::IntArrayRef padding) {
  return channels_last(t) && t.scalar_type() != at::kDouble && kernel[0] == 1 && kernel[1] == 1 && padding[0] == 0 &&
         padding[1] == 0;
}

// A pointwise layer's input pixels by output pixel where it is strided (else none: the same pixels).
inline std::optional<PixelMap> pixel_map(const Layout& L) {
  if (L.sh == 1 && L.sw == 1) return std::nullopt;
  return PixelMap{L.OH, L.OW, L.H, L.W, L.sh, L.sw};
}

// ---------------------------------------------------------------------------------------------------------
// Depthwise convolutions (each output channel reads its own input channel only) of channels-last tensors
// ---------------------------------------------------------------------------------------------------------
// A depthwise layer (groups = C = O) stores a block-diagonal matrix: row c's entries are taps of input channel c.
// On a channels-last x each pixel's channels lie side by side, so 16 output channels of a pixel are one vector:
// the sum over taps of a vector of the 16 channels' weights for that tap (zero where not stored) times the
// input pixel the tap reaches, read in place. No working layout: through it, the transposes into and out of the
// planes cost several times the few products (MobileNetV3-small's 3 x 3 stride-2 layer on 72 channels of 56 x 56,
// batch 8, 90%: 2.17 ms that way, 0.18 here, nn.Conv2d's 0.17 channels-last; benchmarks/RESULTS.md).
// taps: [kh * kw, Cp] (Cp: C rounded up to 16), tap t's weight of each channel as float32; any[t * blocks + b]:
// whether tap t holds a stored weight in channel block b (a tap without one is skipped there).
struct DepthwiseTaps {
  int64_t Cp, blocks;
  std::vector<float> w;
  std::vector<uint8_t> any;
};

// Whether W is depthwise (O == C, every entry j of row o a tap k in [0, taps) of input channel o: column
// o * taps + k); f(o, j, k) for each entry, in CSR order, until one is not. The callers ask first with a no-op f
// (an ungrouped layer fails within its first row), then allocate and fill.
template <typename index_t, typename F>
bool each_depthwise_tap(const int32_t* rowptr, const index_t* col, int64_t O, int64_t C, int64_t taps, F&& f) {
  if (O != C) return false;
  for (int64_t o = 0; o < O; ++o)
    for (int64_t j = rowptr[o]; j < rowptr[o + 1]; ++j) {
      const int64_t k = static_cast<int64_t>(col[j]) - o * taps;  // the tap, when column col[j] is channel o's
      if (k < 0 || k >= taps) return false;
      f(o, j, k);
    }
  return true;
}

// The taps of W when it is depthwise (each_depthwise_tap); otherwise nothing (the general kernel then takes it,
// and reports bad columns). values may be null (the values gradient needs only which taps are stored: weights 0).
template <typename index_t, typename scalar_t>
std::optional<DepthwiseTaps> depthwise_taps(const int32_t* rowptr, const index_t* col, const scalar_t* values,
                                            int64_t O, int64_t C, int64_t taps) {
  if (!each_depthwise_tap(rowptr, col, O, C, taps, [](int64_t, int64_t, int64_t) {})) return std::nullopt;
  const int64_t blocks = (C + kLanes - 1) / kLanes;
  DepthwiseTaps d{blocks * kLanes, blocks, std::vector<float>(static_cast<size_t>(taps * blocks * kLanes), 0.f),
                  std::vector<uint8_t>(static_cast<size_t>(taps * blocks), 0)};
  each_depthwise_tap(rowptr, col, O, C, taps, [&](int64_t o, int64_t j, int64_t k) {
    d.w[k * d.Cp + o] = values ? static_cast<float>(values[j]) : 0.f;
    d.any[k * blocks + o / kLanes] = 1;
  });
  return d;
}

// The taps of W when a channels-last layer of layout L is depthwise and the direct kernels beat the working
// layout there; otherwise nothing (the working layout takes it). The route, by a count of 16-lane multiply-adds
// per output pixel: direct, one per (channel block, tap with a stored weight in the block); through the working
// layout one per 16 stored weights (runs of pixels), plus the two transposes, ~4 per 16 channels of each input
// and output pixel (fitted to MobileNetV3-small's depthwise layers at 90%, batch 1 and 8, 2026-12-02, Zen 4:
// 3 x 3 layers go direct (72 channels of 56 x 56 at stride 2, batch 8: 2.17 -> 0.18 ms), 5 x 5 stride-1 ones,
// whose blocks hold most taps while each channel holds 2-3, keep the working layout (240 channels of 14 x 14,
// batch 8: 0.28 ms there, 0.43 direct)). rowptr is checked (rowptr[O] = nnz).
template <typename index_t, typename scalar_t>
std::optional<DepthwiseTaps> direct_depthwise(const int32_t* rowptr, const index_t* col, const scalar_t* values,
                                              int64_t O, const Layout& L) {
  std::optional<DepthwiseTaps> d = depthwise_taps(rowptr, col, values, O, L.C, L.kh * L.kw);
  if (!d) return d;
  int64_t used = 0;
  for (const uint8_t a : d->any) used += a;
  const int64_t in_pixels = L.N * (L.H - 2 * L.ph) * (L.W - 2 * L.pw), out_pixels = L.N * L.OH * L.OW;
  if (16 * used * out_pixels > rowptr[O] * out_pixels + 4 * L.C * (in_pixels + out_pixels)) return std::nullopt;
  return d;
}

// y [N, OH, OW, C] (channels-last) from x [N, H, W, C]; tasks are output rows (image, oy). Per output pixel and
// block of 16 channels: the bias, plus each tap's weights times the input pixel it reaches (skipped outside the
// image: the zero padding).
template <typename scalar_t>
void depthwise_channels_last(const DepthwiseTaps& d, const scalar_t* x, const scalar_t* bias, scalar_t* y,
                             const Layout& L) {
  const int64_t N = L.N, C = L.C, H = L.H - 2 * L.ph, W = L.W - 2 * L.pw, OH = L.OH, OW = L.OW;  // (H, W unpadded)
  const int64_t kh = L.kh, kw = L.kw, sh = L.sh, sw = L.sw, dh = L.dh, dw = L.dw, ph = L.ph, pw = L.pw;
  std::vector<float> b(static_cast<size_t>(d.Cp), 0.f);
  for (int64_t c = 0; c < C && bias; ++c) b[c] = static_cast<float>(bias[c]);
  const int64_t per_row = std::max<int64_t>(1, OW * d.blocks * kh * kw);
  // Output columns [lo, hi) read every tap's input column inside the image (ox * sw - pw + kj * dw in [0, W) for
  // every kj): no checks there.
  const int64_t reach = W + pw - (kw - 1) * dw;  // ox * sw < reach
  const int64_t lo = std::min(OW, (pw + sw - 1) / sw);
  const int64_t hi = std::max(lo, std::min(OW, reach > 0 ? (reach + sw - 1) / sw : 0));
  // A row's taps, block by block (block cb's from first[cb] to first[cb + 1]): weight vector, input offset of
  // output column 0 and the tap's column shift, for the taps with a stored weight in the block. An output row
  // whose taps all read inside the image (an interior row) takes the one list built here, its offsets from the
  // row's first input row; a row at the top or bottom edge builds its own, without the taps whose input row is
  // outside (the zero padding), offsets from the image's first row. (Built for every row, the lists cost a
  // quarter of MobileNetV3's 5 x 5 layers on 7 x 7 outputs.)
  struct Taps {
    std::vector<const float*> wt;
    std::vector<int64_t> src, shift, first;
  };
  const size_t most = static_cast<size_t>(kh * kw * d.blocks);
  const auto build = [&](Taps& t, int64_t iy0, bool edge) {  // iy0: the row's first input row (oy * sh - ph)
    t.wt.resize(most);
    t.src.resize(most);
    t.shift.resize(most);
    t.first.resize(static_cast<size_t>(d.blocks + 1));
    int64_t nt = 0;
    for (int64_t cb = 0; cb < d.blocks; ++cb) {
      t.first[cb] = nt;
      for (int64_t ki = 0; ki < kh; ++ki) {
        const int64_t iy = iy0 + ki * dh;
        if (edge && (iy < 0 || iy >= H)) continue;
        for (int64_t kj = 0; kj < kw; ++kj)
          if (d.any[(ki * kw + kj) * d.blocks + cb]) {
            t.wt[nt] = d.w.data() + (ki * kw + kj) * d.Cp + cb * kLanes;
            t.shift[nt] = kj * dw - pw;
            t.src[nt++] = (iy * W + kj * dw - pw) * C + cb * kLanes;
          }
      }
    }
    t.first[d.blocks] = nt;
  };
  Taps interior;
  build(interior, 0, false);
  const bool stream = stream_output(y, C, N * OH * OW * C);
  const bool ahead = beyond_caches<scalar_t>(N * H * W * C);
  at::parallel_for(0, N * OH, std::max<int64_t>(1, 4096 / per_row), [&](int64_t r0, int64_t r1) {
    // Output pixel by pixel, each pixel's blocks in turn, so that x and y are read and written along their rows.
    Taps edge;
    Prefetch next;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, oy = r % OH, iy0 = oy * sh - ph;
      const auto [from, count] = ahead && r + 1 < r1 ? next_input_rows(L, r) : std::pair<int64_t, int64_t>{0, 0};
      next.start(x + from, count);
      const bool inside_rows = iy0 >= 0 && iy0 + (kh - 1) * dh < H;
      if (!inside_rows) build(edge, iy0, true);
      const Taps& t = inside_rows ? interior : edge;
      const int64_t *first = t.first.data(), *src = t.src.data(), *shift = t.shift.data();
      const float* const* wt = t.wt.data();
      const scalar_t* xr = x + (n * H + (inside_rows ? iy0 : 0)) * W * C;
      scalar_t* out = y + (n * OH + oy) * OW * C;
      // P output pixels from ox, every channel block; INSIDE: every tap reads inside the image (no checks). Each
      // pixel's sum is a chain of dependent multiply-adds, one per tap: so four pixels at a time inside the image
      // (four independent sums per weight vector; against one pixel at a time, old / new extension in alternate
      // processes, 2026-12-02, Zen 4, 90%, forward over nn.Conv2d channels-last: 32 channels of 112 x 112, 3 x 3,
      // batch 1 / 8, 0.66 / 0.77x -> 0.98 / 0.90x), and a single pixel's taps split between four sums (with the
      // shared interior list: the kernel alone 1.03-1.37x faster on MobileNetV3-small's depthwise shapes, where
      // rows of 7-28 pixels leave many single pixels; benchmarks/RESULTS.md, thirty-fourth session).
      const auto pixels = [&](auto P, auto INSIDE, int64_t ox) {
        constexpr int np = decltype(P)::value;
        for (int64_t cb = 0; cb < d.blocks; ++cb) {
          const int64_t nc = std::min(kLanes, C - cb * kLanes);
          if constexpr (np == 1) {
            const auto add = [&](vfloat& a, int64_t e) {
              if constexpr (!decltype(INSIDE)::value) {
                const int64_t ix = ox * sw + shift[e];
                if (ix < 0 || ix >= W) return;
              }
              a += vload(wt[e]) * load_lanes(xr + src[e] + ox * sw * C, nc);
            };
            vfloat a0 = vload(b.data() + cb * kLanes), a1{}, a2{}, a3{};
            int64_t e = first[cb];
            for (; e + 4 <= first[cb + 1]; e += 4) {
              add(a0, e);
              add(a1, e + 1);
              add(a2, e + 2);
              add(a3, e + 3);
            }
            for (; e < first[cb + 1]; ++e) add(a0, e);
            put_lanes(out + ox * C + cb * kLanes, (a0 + a1) + (a2 + a3), nc, stream);
          } else {
            vfloat acc[np];
            for (int u = 0; u < np; ++u) acc[u] = vload(b.data() + cb * kLanes);
            for (int64_t e = first[cb]; e < first[cb + 1]; ++e) {
              const vfloat w = vload(wt[e]);
              const scalar_t* p = xr + src[e] + ox * sw * C;
              for (int u = 0; u < np; ++u) {
                if constexpr (!decltype(INSIDE)::value) {
                  const int64_t ix = (ox + u) * sw + shift[e];
                  if (ix < 0 || ix >= W) continue;
                }
                acc[u] += w * load_lanes(p + u * sw * C, nc);
              }
            }
            for (int u = 0; u < np; ++u) put_lanes(out + (ox + u) * C + cb * kLanes, acc[u], nc, stream);
          }
        }
      };
      using one = std::integral_constant<int, 1>;
      using four = std::integral_constant<int, 4>;
      int64_t ox = 0;
      for (; ox < lo; ++ox) pixels(one{}, std::false_type{}, ox), next.to(ox + 1, OW);
      for (; ox + 4 <= hi; ox += 4) pixels(four{}, std::true_type{}, ox), next.to(ox + 4, OW);
      for (; ox < hi; ++ox) pixels(one{}, std::true_type{}, ox), next.to(ox + 1, OW);
      for (; ox < OW; ++ox) pixels(one{}, std::false_type{}, ox), next.to(ox + 1, OW);
    }
    if (stream) stream_fence();
  });
}

// The input gradient of a depthwise layer on channels-last gy [N, OH, OW, C] -> dx [N, H, W, C]: each input
// pixel gathers, per block of 16 channels, each tap's weights times the output pixel that read it through that
// tap (oy * sh - ph + ki * dh = iy, ox * sw - pw + kj * dw = ix). Tasks are input rows. Along a row the input
// columns of one phase (ix mod sw) meet the same taps, at output columns one apart: per phase, each tap's first
// output column, and the range of steps where every tap's output column is inside [0, OW) (no checks there).
template <typename scalar_t>
void depthwise_grad_input_channels_last(const DepthwiseTaps& d, const scalar_t* gy, scalar_t* dx, const Layout& L) {
  const int64_t N = L.N, C = L.C, H = L.H - 2 * L.ph, W = L.W - 2 * L.pw, OH = L.OH, OW = L.OW;  // (H, W unpadded)
  const int64_t kh = L.kh, kw = L.kw, sh = L.sh, sw = L.sw, dh = L.dh, dw = L.dw, ph = L.ph, pw = L.pw;
  const int64_t per_row = std::max<int64_t>(1, W * d.blocks * kh * kw / std::max<int64_t>(1, sh * sw));
  // The output column each tap column kj meets at step 0 of phase ph0 (kMiss where it meets none: tx not a
  // multiple of sw), and below per input row each tap row ki's output row: worked out once instead of per block
  // and phase (their divisions were a quarter of the kernel at 7 x 7 outputs, 2026-12-02).
  constexpr int64_t kMiss = std::numeric_limits<int64_t>::min();
  const int64_t phases = std::min(sw, W);
  std::vector<int64_t> column0(static_cast<size_t>(phases * kw));
  for (int64_t ph0 = 0; ph0 < phases; ++ph0)
    for (int64_t kj = 0; kj < kw; ++kj) {
      const int64_t tx = ph0 + pw - kj * dw;  // = ox * sw at step 0
      column0[ph0 * kw + kj] = ((tx % sw) + sw) % sw ? kMiss : (tx >= 0 ? tx / sw : -((-tx) / sw));  // (exact)
    }
  const bool stream = stream_output(dx, C, N * H * W * C);
  const bool ahead = beyond_caches<scalar_t>(N * OH * OW * C);
  at::parallel_for(0, N * H, std::max<int64_t>(1, 4096 / per_row), [&](int64_t r0, int64_t r1) {
    const size_t taps = static_cast<size_t>(kh * kw);
    std::vector<const float*> wt(taps);
    std::vector<int64_t> src(taps), first(taps), row0(static_cast<size_t>(kh));
    Prefetch next;  // the gy row input row r + 1 meets through tap row 0, which row r does not (dilation 1)
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / H, iy = r % H;
      scalar_t* out = dx + r * W * C;
      const int64_t ty1 = (r + 1) % H + ph;  // = oy * sh of that row
      const bool new_row = ahead && r + 1 < r1 && ty1 % sh == 0 && ty1 / sh < OH;
      next.start(new_row ? gy + ((r + 1) / H * OH + ty1 / sh) * OW * C : gy, new_row ? OW * C : 0);
      for (int64_t ki = 0; ki < kh; ++ki) {
        const int64_t ty = iy + ph - ki * dh;  // = oy * sh
        row0[ki] = ty < 0 || ty % sh || ty / sh >= OH ? kMiss : ty / sh;
      }
      for (int64_t cb = 0; cb < d.blocks; ++cb) {
        const int64_t c0 = cb * kLanes, nc = std::min(kLanes, C - c0);
        for (int64_t ph0 = 0; ph0 < phases; ++ph0) {  // input columns ph0, ph0 + sw, ...
          int64_t nt = 0, jlo = 0, jhi = (W - 1 - ph0) / sw + 1;  // steps j: ix = ph0 + j * sw
          const int64_t steps = jhi;
          for (int64_t ki = 0; ki < kh; ++ki) {
            const int64_t oy = row0[ki];
            if (oy == kMiss) continue;
            for (int64_t kj = 0; kj < kw; ++kj) {
              const int64_t ox0 = column0[ph0 * kw + kj];
              if (ox0 == kMiss || !d.any[(ki * kw + kj) * d.blocks + cb]) continue;
              wt[nt] = d.w.data() + (ki * kw + kj) * d.Cp + c0;
              first[nt] = ox0;
              src[nt++] = ((n * OH + oy) * OW + ox0) * C + c0;
              jlo = std::max(jlo, -ox0);
              jhi = std::min(jhi, OW - ox0);
            }
          }
          // P columns from step j (INSIDE: every tap's output column inside [0, OW), no checks; only P = 1 is used
          // outside). Inside, four columns at a time: each tap's weights loaded once for them, four independent sums
          // (the same sums in the same order as one at a time). One process switching per round, 90%,
          // channels-last: 0.65-0.89 of the time on MobileNetV2's depthwise layers at batch 8, 0.71-0.82 at batch 1
          // (benchmarks/RESULTS.md, fortieth session).
          const auto columns = [&](auto P, auto INSIDE, int64_t j) {
            constexpr int np = decltype(P)::value;
            vfloat acc[np] = {};
            for (int64_t e = 0; e < nt; ++e) {
              if constexpr (!decltype(INSIDE)::value)
                if (first[e] + j < 0 || first[e] + j >= OW) continue;
              const vfloat w = vload(wt[e]);
              const scalar_t* p = gy + src[e] + j * C;
              for (int u = 0; u < np; ++u) acc[u] += w * load_lanes(p + u * C, nc);
            }
            for (int u = 0; u < np; ++u) put_lanes(out + (ph0 + (j + u) * sw) * C + c0, acc[u], nc, stream);
          };
          using one = std::integral_constant<int, 1>;
          using four = std::integral_constant<int, 4>;
          jhi = std::max(jlo, std::min(jhi, steps));
          jlo = std::min(jlo, steps);
          int64_t j = 0;
          for (; j < jlo; ++j) columns(one{}, std::false_type{}, j);
          for (; j + 4 <= jhi; j += 4) columns(four{}, std::true_type{}, j);
          for (; j < jhi; ++j) columns(one{}, std::true_type{}, j);
          for (; j < steps; ++j) columns(one{}, std::false_type{}, j);
        }
        next.to(cb + 1, d.blocks);
      }
    }
    if (stream) stream_fence();
  });
}

// The values gradient's sums for M taps of one tap row (m...) and NB (1 or 2) blocks of 16 channels from c0:
// out[i] (a [taps, Cp] table's entries, NB x 16 from c0) += the sum over output columns ox in [lo[i], hi[i]) of gy
// pixel ox (g: gy's output row at c0) times x pixel ox * sw + shift[i] (xr: x's input row at c0); nc channels from
// c0 are real (the rest read as zeros). Each sum is one chain in ascending ox, the order a tap at a time would take
// (same bits); where all M taps reach (columns [LO, HI)) they share each gy load, and the two blocks' chains and
// the taps' run side by side.
template <int NB, typename scalar_t, size_t... m>
inline void tap_dots(const scalar_t* g, const scalar_t* xr, int64_t C, int64_t nc, int64_t sw, const int64_t* shift,
                     const int64_t* lo, const int64_t* hi, float* const* out, std::index_sequence<m...>) {
  constexpr size_t M = sizeof...(m);
  vfloat acc[NB][M] = {};
  const int64_t n0 = NB == 2 ? kLanes : nc, n1 = nc - kLanes;  // (n1: the second block's, when there is one)
  // gv: gy pixel ox's blocks
  const auto gy_at = [&](int64_t ox, vfloat* gv) {
    gv[0] = load_lanes(g + ox * C, n0);
    if constexpr (NB == 2) gv[1] = load_lanes(g + ox * C + kLanes, n1);
  };
  const auto add = [&](auto tap, int64_t ox, const vfloat* gv) {
    constexpr size_t i = decltype(tap)::value;
    const scalar_t* xo = xr + (ox * sw + shift[i]) * C;
    acc[0][i] += gv[0] * load_lanes(xo, n0);
    if constexpr (NB == 2) acc[1][i] += gv[1] * load_lanes(xo + kLanes, n1);
  };
  // tap i alone over columns [a, b)
  const auto alone = [&](auto tap, int64_t a, int64_t b) {
    vfloat gv[NB];
    for (int64_t ox = a; ox < b; ++ox) {
      gy_at(ox, gv);
      add(tap, ox, gv);
    }
  };
  const int64_t LO = std::max({lo[m]...}), HI = std::min({hi[m]...});
  if (HI <= LO) {
    (alone(std::integral_constant<size_t, m>{}, lo[m], hi[m]), ...);
  } else {
    (alone(std::integral_constant<size_t, m>{}, lo[m], LO), ...);
    vfloat gv[NB];
    for (int64_t ox = LO; ox < HI; ++ox) {
      gy_at(ox, gv);
      (add(std::integral_constant<size_t, m>{}, ox, gv), ...);
    }
    (alone(std::integral_constant<size_t, m>{}, HI, hi[m]), ...);
  }
  for (int b = 0; b < NB; ++b) ((vstore(out[m] + b * kLanes, vload(out[m] + b * kLanes) + acc[b][m])), ...);
}

// The values gradient of a depthwise layer on channels-last x and gy: per tap t and channel c, the sum over
// output pixels of gy[p, c] times x at the pixel tap t reads (one 16-lane multiply-add per output pixel, block
// and stored tap; each tap's range of output columns inside the image, no checks). Threads sum their output rows
// into their own [taps, Cp] table, added together at the end; the stored entries then read the table.
// An output row goes two channel blocks at a time (the last alone when their number is odd), and for each, tap
// row by tap row, up to four of the row's taps with a stored weight in either block at once (tap_dots): the two
// blocks' gy columns and x rows (2 x 64 bytes a pixel, ~(kh + 1) x OW x 128 bytes) stay in L1 while every tap
// reads them. Taking each tap across all blocks in turn read the whole gy row again for each tap, from L2, with
// one chain of multiply-adds at a time: 1.2-1.8x the time on MobileNetV2's and EfficientNet-B0's depthwise layers
// with 14 or more output columns, about the same on those with 7 (benchmarks/RESULTS.md, forty-first session).
template <typename index_t, typename scalar_t>
void depthwise_grad_values_channels_last(const DepthwiseTaps& d, const int32_t* rowptr, const index_t* col,
                                         const scalar_t* x, const scalar_t* gy, scalar_t* dv, const Layout& L) {
  const int64_t N = L.N, C = L.C, H = L.H - 2 * L.ph, W = L.W - 2 * L.pw, OH = L.OH, OW = L.OW;  // (H, W unpadded)
  const int64_t kh = L.kh, kw = L.kw, sh = L.sh, sw = L.sw, dh = L.dh, dw = L.dw, ph = L.ph, pw = L.pw;
  const int64_t taps = kh * kw;
  // tap column kj reads x column ox * sw + shift[kj], inside [0, W) for ox in [lo[kj], hi[kj])
  std::vector<int64_t> shift(kw), lo(kw), hi(kw);
  for (int64_t kj = 0; kj < kw; ++kj) {
    shift[kj] = kj * dw - pw;
    lo[kj] = std::min(OW, shift[kj] >= 0 ? 0 : (-shift[kj] + sw - 1) / sw);
    hi[kj] = std::max(lo[kj], std::min(OW, W - shift[kj] > 0 ? (W - shift[kj] + sw - 1) / sw : 0));
  }
  std::vector<float> table(static_cast<size_t>(taps * d.Cp), 0.f);
  std::mutex done;
  const int64_t per_row = std::max<int64_t>(1, OW * d.blocks * taps);
  const bool ahead = beyond_caches<scalar_t>(N * H * W * C);
  at::parallel_for(0, N * OH, std::max<int64_t>(1, 4096 / per_row), [&](int64_t r0, int64_t r1) {
    std::vector<float> part(static_cast<size_t>(taps * d.Cp), 0.f);
    Prefetch next_x, next_gy;  // the input rows output row r + 1 reads and row r does not, and its gy row
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / OH, oy = r % OH;
      const scalar_t* g = gy + r * OW * C;
      const auto [from, count] = ahead && r + 1 < r1 ? next_input_rows(L, r) : std::pair<int64_t, int64_t>{0, 0};
      next_x.start(x + from, count);
      next_gy.start(g + OW * C, ahead && r + 1 < r1 ? OW * C : 0);
      for (int64_t cb = 0; cb < d.blocks; cb += 2) {
        next_x.to(cb + 1, d.blocks);
        next_gy.to(cb + 1, d.blocks);
        const bool pair = cb + 1 < d.blocks;
        const int64_t c0 = cb * kLanes, nc = std::min((pair ? 2 : 1) * kLanes, C - c0);
        for (int64_t ki = 0; ki < kh; ++ki) {
          const int64_t iy = oy * sh - ph + ki * dh;
          if (iy < 0 || iy >= H) continue;
          const scalar_t* xr = x + (n * H + iy) * W * C + c0;
          int64_t at_shift[4], at_lo[4], at_hi[4];
          float* out[4];
          int m = 0;  // taps gathered
          const auto run = [&](auto seq) {
            if (pair) tap_dots<2>(g + c0, xr, C, nc, sw, at_shift, at_lo, at_hi, out, seq);
            else tap_dots<1>(g + c0, xr, C, nc, sw, at_shift, at_lo, at_hi, out, seq);
          };
          const auto flush = [&] {
            switch (m) {
              case 1: run(std::make_index_sequence<1>{}); break;
              case 2: run(std::make_index_sequence<2>{}); break;
              case 3: run(std::make_index_sequence<3>{}); break;
              case 4: run(std::make_index_sequence<4>{}); break;
            }
            m = 0;
          };
          for (int64_t kj = 0; kj < kw; ++kj) {
            const uint8_t* any = d.any.data() + (ki * kw + kj) * d.blocks + cb;
            if (!any[0] && !(pair && any[1])) continue;
            at_shift[m] = shift[kj];
            at_lo[m] = lo[kj];
            at_hi[m] = hi[kj];
            out[m] = part.data() + (ki * kw + kj) * d.Cp + c0;
            if (++m == 4) flush();
          }
          flush();
        }
      }
    }
    const std::lock_guard<std::mutex> lock(done);
    for (size_t i = 0; i < part.size(); ++i) table[i] += part[i];
  });
  for (int64_t o = 0; o < C; ++o)
    for (int64_t j = rowptr[o]; j < rowptr[o + 1]; ++j)
      dv[j] = static_cast<scalar_t>(table[(static_cast<int64_t>(col[j]) - o * taps) * d.Cp + o]);
}

// ---------------------------------------------------------------------------------------------------------
// Grouped convolutions of NCHW tensors (depthwise ones included)
// ---------------------------------------------------------------------------------------------------------
// A layer in G groups computes each image's group (a "unit") from that group's C / G input planes alone. Each
// output plane is its own stencil: the bias plus, for each stored weight of the channel (a tap (ki, kj) of one
// of the group's input planes: 2-3 of 25 at 90% depthwise), the weight times that input plane shifted by the
// tap. Planes are contiguous, so a unit's input planes are copied once into zero-padded float32 planes of the
// padded layout (L.H x L.W), side by side, and each output row takes 16 columns at a time: one multiply-add per
// stored weight, its input read at stride sw from the padded row at an offset that names plane and tap, no
// checks (four chunks of 16 a pass, so that each weight's offset and value are loaded once for four; rows
// narrower than 16 at stride 1 as one run, PlaneShape::ext). A channel without a stored weight costs its bias
// fill. Through the working layout instead (channel blocks interleaved, then the output planes back), the layout
// moves cost several times the few products: EfficientNet-B0's 5 x 5 stride-2 depthwise layer on 672 channels of
// 14 x 14 at 90%, batch 8, took 1.9-2.2 ms there against nn.Conv2d's 1.0; 0.24-0.51 ms here. Over EfficientNet-B0's
// and MobileNetV3's depthwise shapes at 90%, batch 8 (one process switching per call, 9 rounds, median per-round
// ratio, Zen 4, 2026-12-03): forward 0.16-0.54, input gradient 0.24-0.57, values gradient 0.20-0.90 of the working
// layout's time. Grouped layers with several channels a group (ResNeXt, RegNet) where plane_route takes them:
// forward (no_grad, batch 8, 90%) against nn.Conv2d 0.58-2.26x before, 1.13-3.10x after (benchmarks/RESULTS.md).
// Which layers are grouped is read from the CSR (block_groups): the op has no groups argument.

// The groups of W as these kernels take them: the largest G > 1 dividing O and C such that every entry of row o
// reads an input channel of group o / (O / G) (columns [g Cg taps, (g + 1) Cg taps), Cg = C / G): a grouped layer's
// block-diagonal matrix (depthwise: G = C), or an ungrouped one masked that way. 1 when there is none, or when a
// column is outside [0, C * taps) (the general kernel then reports it). Candidates are tried from the largest; one
// fails at its first row outside its blocks (an ungrouped layer's first row rules them all out), and the first
// that holds reads every entry once. (A layer in G groups is in every divisor of G too: the first that holds is
// the largest.)
template <typename index_t>
int64_t block_groups(const int32_t* rowptr, const index_t* col, int64_t O, int64_t C, int64_t taps) {
  const int64_t cols = C * taps;
  for (int64_t d = std::gcd(O, C); d > 1; --d) {
    if (O % d != 0 || C % d != 0) continue;
    const int64_t out_g = O / d, width = cols / d;
    bool holds = true;
    for (int64_t g = 0; g < d && holds; ++g) {
      const int64_t lo = g * width, hi = lo + width;
      for (int64_t j = rowptr[g * out_g]; j < rowptr[(g + 1) * out_g]; ++j) {
        const int64_t k = static_cast<int64_t>(col[j]);
        if (k < lo || k >= hi) {
          if (k < 0 || k >= cols) return 1;
          holds = false;
          break;
        }
      }
    }
    if (holds) return d;
  }
  return 1;
}

// A stencil over units: destination plane r's taps are [ptr[r], ptr[r + 1]), each an offset into its unit's padded
// source planes (plane * padded + row * pitch + column) and a weight as float32 (0 without values). The forward's
// (and the values gradient's, the scattered input gradient's) in CSR order, from source = input channels to
// destination = output channels; the input gradient's the other way (input_taps). Built in
// parallel, group by group (a group's entries are one range of the CSR, and of its transpose), uninitialized first.
struct PlaneTaps {
  int64_t G, in_g, out_g;  // groups; source and destination planes of a unit
  std::vector<int32_t> ptr;  // by destination channel
  std::unique_ptr<int64_t[]> off;
  std::unique_ptr<float[]> w;
  std::vector<uint8_t> used;  // by source channel: whether a tap reads it
  PlaneTaps(int64_t G_, int64_t in_g_, int64_t out_g_, int64_t nnz)
      : G(G_), in_g(in_g_), out_g(out_g_), ptr(static_cast<size_t>(G_ * out_g_ + 1), 0),
        off(new int64_t[static_cast<size_t>(std::max<int64_t>(1, nnz))]),
        w(new float[static_cast<size_t>(std::max<int64_t>(1, nnz))]), used(static_cast<size_t>(G_ * in_g_), 0) {}
};

// Calls f(g, e0, e1) for ranges of groups in parallel; e0, e1: the group's entries in the CSR ([rowptr[g out_g],
// rowptr[(g + 1) out_g])).
template <typename F>
void each_group(const int32_t* rowptr, int64_t G, int64_t out_g, F&& f) {
  const int64_t nnz = rowptr[G * out_g];
  at::parallel_for(0, G, std::max<int64_t>(1, G * 4096 / std::max<int64_t>(1, nnz)), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) f(g, rowptr[g * out_g], rowptr[(g + 1) * out_g]);
  });
}

// Lanes l < n of p[l * s] (the rest zero). Stride 2 with AVX-512: two masked loads (only the elements read) and
// the even lanes picked by one permute.
inline vfloat load_strided(const float* p, int64_t s, int64_t n) {
  if (s == 1) return load_lanes(p, n);
#ifdef __AVX512F__
  if (s == 2) {
    const int64_t m = 2 * n - 1;  // elements 0 .. 2 (n - 1)
    const __m512 a = _mm512_maskz_loadu_ps(cpu::tail_mask(std::min<int64_t>(kLanes, m)), p);
    const __m512 b = _mm512_maskz_loadu_ps(cpu::tail_mask(std::max<int64_t>(0, m - kLanes)), p + kLanes);
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    return _mm512_permutex2var_ps(a, even, b);
  }
#endif
  float t[kLanes] = {};
  for (int64_t l = 0; l < n; ++l) t[l] = p[l * s];
  return vload(t);
}

// p[l * s] += lanes l < n of v. Stride 2 with AVX-512: v spread over the even lanes of two vectors (zeros
// between), added to the two masked loads and stored back under the same masks.
inline void add_strided(float* p, int64_t s, vfloat v, int64_t n) {
  if (s == 1) return store_lanes(p, load_lanes(p, n) + v, n);
#ifdef __AVX512F__
  if (s == 2) {
    const int64_t m = 2 * n - 1;
    const __mmask16 ma = cpu::tail_mask(std::min<int64_t>(kLanes, m));
    const __mmask16 mb = cpu::tail_mask(std::max<int64_t>(0, m - kLanes));
    const __m512 zero = _mm512_setzero_ps();
    const __m512i lo = _mm512_set_epi32(16, 7, 16, 6, 16, 5, 16, 4, 16, 3, 16, 2, 16, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(16, 15, 16, 14, 16, 13, 16, 12, 16, 11, 16, 10, 16, 9, 16, 8);
    _mm512_mask_storeu_ps(p, ma, _mm512_add_ps(_mm512_maskz_loadu_ps(ma, p), _mm512_permutex2var_ps(v, lo, zero)));
    _mm512_mask_storeu_ps(p + kLanes, mb,
                          _mm512_add_ps(_mm512_maskz_loadu_ps(mb, p + kLanes), _mm512_permutex2var_ps(v, hi, zero)));
    return;
  }
#endif
  float t[kLanes];
  vstore(t, v);
  for (int64_t l = 0; l < n; ++l) p[l * s] += t[l];
}

// Lanes l < n of v into p[l * s], the elements between left as they are. Stride 2 with AVX-512: v spread over the
// even lanes of two vectors, stored under masks of the even lanes.
inline void store_strided(float* p, int64_t s, vfloat v, int64_t n) {
  if (s == 1) return store_lanes(p, v, n);
#ifdef __AVX512F__
  if (s == 2) {
    const int64_t m = 2 * n - 1;
    const __mmask16 even = 0x5555;
    const __mmask16 ma = cpu::tail_mask(std::min<int64_t>(kLanes, m)) & even;
    const __mmask16 mb = cpu::tail_mask(std::clamp<int64_t>(m - kLanes, 0, kLanes)) & even;
    const __m512i lo = _mm512_set_epi32(0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0);
    const __m512i hi = _mm512_set_epi32(0, 15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8);
    _mm512_mask_storeu_ps(p, ma, _mm512_permutexvar_ps(lo, v));
    _mm512_mask_storeu_ps(p + kLanes, mb, _mm512_permutexvar_ps(hi, v));
    return;
  }
#endif
  float t[kLanes];
  vstore(t, v);
  for (int64_t l = 0; l < n; ++l) p[l * s] = t[l];
}

// The sizes the NCHW kernels' inner functions take by value: their masked stores may alias anything, so values
// read through a reference or a lambda's captures would be loaded again after each one.
struct PlaneShape {
  int64_t H0, W0, ph, pw, pitch, padded, OH, OW, sh, sw;
  explicit PlaneShape(const Layout& L)
      : H0(L.H - 2 * L.ph), W0(L.W - 2 * L.pw), ph(L.ph), pw(L.pw), pitch(L.W), padded(L.H * L.W), OH(L.OH),
        OW(L.OW), sh(L.sh), sw(L.sw) {}
  // Whether a plane's output rows are one run of extended() = (OH - 1) * pitch + OW elements (the pitch - OW
  // columns between rows computed and dropped, or read as zeros): at stride 1, where that takes fewer 16-lane
  // vectors than row by row (rows narrower than 16 columns: a 7 x 7 plane 4 instead of 7), within kExtMax.
  int64_t extended() const { return (OH - 1) * pitch + OW; }
  bool ext() const {
    return sh == 1 && sw == 1 && extended() <= kExtMax &&
           (extended() + kLanes - 1) / kLanes < OH * ((OW + kLanes - 1) / kLanes);
  }
  static constexpr int64_t kExtMax = 2048;
};

// The strided input gradient (or one with padding beyond the kernel's reach) scatters (scatter_units) with at most
// this many stored weights an input channel, else gathers phase by phase (grouped_grad_input_nchw): the phases
// store every element of dx once, even where few taps reach it. The two forced in turn per call (one process, 9
// rounds, median per-round ratio, Zen 4, 2026-12-03), stride-2 depthwise and grouped layers of EfficientNet-B0 /
// MobileNetV3 / ResNeXt-50 / RegNet: phases one by one (as without AVX-512) against the scatter, with 0.9-2.5
// weights an input channel 1.14-1.57 (batch 8, 90%) and 1.23-1.53 (batch 1); with 7-15, 0.46-0.90 / 0.61-1.01; at
// 50% with 4.3-4.5, 0.95-1.09, with 12.5, 0.55-0.69. With the column phases paired (AVX-512): 0.9-1.0 weights
// 0.76-1.04 (batch 8) and 0.87-1.08 (batch 1), 2.4-2.5 weights 0.70-1.05 / 0.90-1.07, 7-15 weights 0.34-0.57.
#ifdef __AVX512F__
constexpr double kScatterPerInput = 1;
#else
constexpr double kScatterPerInput = 4;
#endif

// Whether a layer of layout L in G groups, with nnz stored weights over O output channels, takes the NCHW plane
// kernels for op (else the working layout): always, but for the few weights that would fill a small plane's
// 16-lane chunks badly at stride 1 (t, stored weights a destination plane: an output channel, or for the input
// gradient an input channel): t > 20 on planes under 100 pixels, where the working layout's interleaved images
// keep its runs long. Measured with each forced in turn per call (one process, 9 rounds, median per-round ratio,
// Zen 4, 2026-12-03) on the grouped 3 x 3 layers of ResNeXt-50 / -101, RegNetY- and RegNetX-400MF (4-64 channels
// a group), as a fraction of the working layout's time:
// - depthwise layers (G = C, with a channel multiplier too): 0.23-0.76 at 90% (EfficientNet-B0's, MobileNetV3's),
//   0.45-0.92 unpruned (7 x 7, 5 x 5);
// - grouped, batch 8, 90%: forward 0.42-0.91, values gradient 0.17-0.93, input gradient 0.29-0.75 (stride 1) and
//   0.57-1.00 (stride 2, phases one by one; paired since, about a quarter less); batch 1: forward 0.65-1.20, values
//   gradient 0.67-1.10, strided input gradient 0.78-1.38 (the larger on 112 x 112 and 56 x 56 planes; before pairing);
// - 50% (t = 36-144), batch 8: stride 2 0.76-0.94; stride 1 on 14 x 14 and 28 x 28 planes 0.66-1.01, on 7 x 7
//   1.02-1.16: those take the working layout.
enum class PlaneOp { forward, grad_input, grad_values };

// Whether the stride-1 input gradient's stencil applies (grouped_grad_input_nchw): padding within the kernel's reach.
inline bool flipped_case(const Layout& L) {
  return L.sh == 1 && L.sw == 1 && L.ph <= (L.kh - 1) * L.dh && L.pw <= (L.kw - 1) * L.dw;
}

inline bool plane_route(const Layout& L, int64_t O, int64_t nnz, PlaneOp op, int64_t G) {
  if (G == L.C) return true;  // depthwise (also with a channel multiplier)
  const double t = static_cast<double>(nnz) / std::max<int64_t>(1, op == PlaneOp::grad_input ? L.C : O);
  const int64_t pixels = op == PlaneOp::grad_input ? (L.H - 2 * L.ph) * (L.W - 2 * L.pw) : L.OH * L.OW;
  return !(L.sh == 1 && L.sw == 1 && t > 20 && pixels < 100);
}

// The groups the NCHW plane kernels take W in for op (block_groups), or 0 where they do not (W is not grouped, or
// the working layout is faster there: plane_route).
template <typename index_t>
int64_t plane_groups(const int32_t* rowptr, const index_t* col, int64_t O, const Layout& L, PlaneOp op) {
  const int64_t G = block_groups(rowptr, col, O, L.C, L.kh * L.kw);
  return G > 1 && plane_route(L, O, rowptr[O], op, G) ? G : 0;
}

// W's taps in G groups (plane_groups) for the forward, the values gradient and the scattered input gradient: offsets
// into the unit's input planes padded as L (values may be null: weights 0).
template <typename index_t, typename scalar_t>
PlaneTaps plane_taps(const int32_t* rowptr, const index_t* col, const scalar_t* values, int64_t O, const Layout& L,
                     int64_t G) {
  const int64_t taps = L.kh * L.kw, in_g = L.C / G, out_g = O / G, padded = L.H * L.W;
  PlaneTaps t(G, in_g, out_g, rowptr[O]);
  std::copy(rowptr, rowptr + O + 1, t.ptr.begin());
  std::vector<int64_t> at(static_cast<size_t>(in_g * taps));  // a group's column -> its offset, its channel
  std::vector<int32_t> chan(static_cast<size_t>(in_g * taps));
  for (int64_t k = 0; k < in_g * taps; ++k) {
    const int64_t l = k / taps, q = k % taps;
    at[k] = l * padded + (q / L.kw) * L.dh * L.W + (q % L.kw) * L.dw;
    chan[k] = static_cast<int32_t>(l);
  }
  each_group(rowptr, G, out_g, [&](int64_t g, int64_t e0, int64_t e1) {
    const int64_t base = g * in_g * taps;
    uint8_t* used = t.used.data() + g * in_g;
    for (int64_t j = e0; j < e1; ++j) {
      const int64_t k = static_cast<int64_t>(col[j]) - base;
      t.off[j] = at[k];
      t.w[j] = values ? static_cast<float>(values[j]) : 0.f;
      used[chan[k]] = 1;
    }
  });
  return t;
}

// W's taps by input channel (G groups) for the input gradient, read from gy's planes padded to P: tap q of an entry
// of row o goes to destination c * parts + part[q] (c: the entry's input channel), at offset (o - g out_g) *
// P.padded + at[q] (g: the group). A counting sort of each group's entries (rows ascending); the group's
// destinations and entries are one range each. Sources (used) are the output channels.
template <typename index_t, typename scalar_t>
PlaneTaps input_taps(const int32_t* rowptr, const index_t* col, const scalar_t* values, int64_t O, const Layout& L,
                     int64_t G, const PlaneShape& P, int64_t parts, const std::vector<int64_t>& part,
                     const std::vector<int64_t>& at) {
  const int64_t taps = L.kh * L.kw, out_g = O / G, in_g = L.C / G;
  PlaneTaps t(G, out_g, in_g, rowptr[O]);
  t.ptr.assign(static_cast<size_t>(L.C * parts + 1), 0);
  t.used.assign(static_cast<size_t>(O), 0);
  std::vector<int64_t> dest(static_cast<size_t>(in_g * taps));  // a group's column -> its destination in the group
  for (int64_t k = 0; k < in_g * taps; ++k) dest[k] = (k / taps) * parts + part[k % taps];
  each_group(rowptr, G, out_g, [&](int64_t g, int64_t e0, int64_t e1) {
    const int64_t base = g * in_g * taps, width = in_g * parts;
    int32_t* ptr = t.ptr.data() + g * width;  // this group's destinations: counts in ptr[1 .. width]
    for (int64_t j = e0; j < e1; ++j) ++ptr[dest[static_cast<int64_t>(col[j]) - base] + 1];
    std::vector<int32_t> next(static_cast<size_t>(width));
    int32_t run = static_cast<int32_t>(e0);
    for (int64_t d = 0; d < width; ++d) {
      next[d] = run;
      run += ptr[d + 1];
    }
    for (int64_t o = g * out_g; o < (g + 1) * out_g; ++o) {
      if (rowptr[o] < rowptr[o + 1]) t.used[o] = 1;
      for (int64_t j = rowptr[o]; j < rowptr[o + 1]; ++j) {
        const int64_t k = static_cast<int64_t>(col[j]) - base, q = next[dest[k]]++;
        t.off[q] = (o - g * out_g) * P.padded + at[k % taps];
        t.w[q] = static_cast<float>(values[j]);
      }
    }
  });
  for (int64_t d = 0; d < L.C * parts; ++d) t.ptr[d + 1] += t.ptr[d];  // counts -> offsets (a group starts at e0)
  return t;
}

// dst[0 .. n) = src[0 .. n), float32 <-> scalar_t, 16 lanes at a time (a function of its own: its stores may alias
// anything, and the caller's loop bounds then stay in registers).
template <typename src_t, typename dst_t>
void copy_row(const src_t* src, dst_t* dst, int64_t n) {
  for (int64_t q = 0; q < n; q += kLanes) {
    const int64_t m = std::min(kLanes, n - q);
    store_lanes(dst + q, load_lanes(src + q, m), m);
  }
}

// Plane (H0 x W0 of src) into the interior of pad (the padded plane, its border zero and left alone), as float32.
template <typename scalar_t>
void pad_plane(const scalar_t* src, float* pad, const PlaneShape S) {
  for (int64_t y = 0; y < S.H0; ++y) copy_row(src + y * S.W0, pad + (y + S.ph) * S.pitch + S.pw, S.W0);
}

// The interior of the padded plane pad into out (H0 x W0), converted to scalar_t.
template <typename scalar_t>
void unpad_plane(const float* pad, scalar_t* out, const PlaneShape S) {
  for (int64_t y = 0; y < S.H0; ++y) copy_row(pad + (y + S.ph) * S.pitch + S.pw, out + y * S.W0, S.W0);
}

// Calls f(std::integral_constant<int64_t, SW>{}) with SW = sw for strides 1 and 2, else 0 (any stride, read from
// the shape): the inner loops take the stride as a constant.
template <typename F>
void with_column_stride(int64_t sw, F&& f) {
  if (sw == 1) return f(std::integral_constant<int64_t, 1>{});
  if (sw == 2) return f(std::integral_constant<int64_t, 2>{});
  f(std::integral_constant<int64_t, 0>{});
}

// A plane's output in chunks of 16 columns (fewer at a row's end): row by row, or, where S.ext(), the extended rows
// 16 elements at a time. Chunk c's first input in the padded plane (before a tap's offset), its lanes, and where
// it goes in the output plane (row-major OH x OW, or the extended rows).
struct PlaneChunks {
  int64_t count, per_row, step, sw, E;
  bool ext;
  explicit PlaneChunks(const PlaneShape& S, bool ext_)
      : per_row((S.OW + kLanes - 1) / kLanes), step(S.sh * S.pitch), sw(S.sw), E(S.extended()), ext(ext_) {
    count = ext ? (E + kLanes - 1) / kLanes : S.OH * per_row;
  }
  void at(int64_t c, const PlaneShape& S, int64_t& in, int64_t& n, int64_t& out) const {
    if (ext) {
      in = out = c * kLanes;
      n = std::min(kLanes, E - in);
      return;
    }
    const int64_t oy = c / per_row, ox = (c - oy * per_row) * kLanes;
    in = oy * step + ox * sw;
    n = std::min(kLanes, S.OW - ox);
    out = oy * S.OW + ox;
  }
};

// A chunk's load (n lanes, every s-th element) with its masks computed once, before the loops over taps reuse it.
template <int64_t SW>
struct ChunkLoad {
  int64_t s = 1, n = 0;
#ifdef __AVX512F__
  __mmask16 a = 0, b = 0;
#endif
  void set(int64_t s_, int64_t n_) {
    s = s_;
    n = n_;
#ifdef __AVX512F__
    const int64_t m = s == 2 ? 2 * n - 1 : n;  // stride 2: elements 0 .. 2 (n - 1), as load_strided
    a = cpu::tail_mask(std::min<int64_t>(kLanes, m));
    b = cpu::tail_mask(std::clamp<int64_t>(m - kLanes, 0, kLanes));
#endif
  }
  vfloat operator()(const float* p) const {
#ifdef __AVX512F__
    if constexpr (SW == 1) return _mm512_maskz_loadu_ps(a, p);
    if constexpr (SW == 2) {
      const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
      return _mm512_permutex2var_ps(_mm512_maskz_loadu_ps(a, p), even, _mm512_maskz_loadu_ps(b, p + kLanes));
    }
#endif
    return load_strided(p, SW ? SW : s, n);
  }
};

// M chunks of an output plane (in[i], n[i] as PlaneChunks gives them), each b + the sum over taps [j0, j1) of w[j]
// times the padded plane from off[j] + in[i], read every SW-th column (SW 0: sw), in registers; stored at dst +
// at[i] (every ds-th element, float32 only). Several chunks a pass load each tap's offset and weight once for all (1024 channels of 7 x 7 in 32 groups
// at 90%: ~29 taps an output plane).
template <int M, int64_t SW, typename dst_t>
inline void stencil_chunks(const float* pad, const int64_t* off, const float* w, int64_t j0, int64_t j1, float b,
                           const int64_t* in, const int64_t* n, int64_t sw, dst_t* dst, const int64_t* at,
                           int64_t ds = 1) {
  ChunkLoad<SW> ld[M];
  vfloat a[M];
  for (int i = 0; i < M; ++i) {
    ld[i].set(SW ? SW : sw, n[i]);
    a[i] = vfloat{} + b;
  }
  for (int64_t j = j0; j < j1; ++j) {
    const float wj = w[j];
    const float* p = pad + off[j];
#pragma GCC unroll 4
    for (int i = 0; i < M; ++i) a[i] += wj * ld[i](p + in[i]);
  }
  if constexpr (std::is_same_v<dst_t, float>) {
    if (ds != 1) {
#pragma GCC unroll 4
      for (int i = 0; i < M; ++i) store_strided(dst + at[i], ds, a[i], n[i]);
      return;
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < M; ++i) store_lanes(dst + at[i], a[i], n[i]);
}

// One output plane: out = b + the sum over taps [j0, j1) of w[j] times the padded plane from off[j], read every
// SW-th column (SW 0: S.sw); four chunks a pass. Extended rows go through a buffer, then each row's OW columns
// into out.
template <int64_t SW, typename scalar_t>
void stencil_plane(const float* pad, const int64_t* off, const float* w, int64_t j0, int64_t j1, float b,
                   scalar_t* out, const PlaneShape S) {
  const PlaneChunks P(S, SW == 1 && S.ext());
  float buf[PlaneShape::kExtMax];
  const auto pass = [&](auto m, int64_t c0) {
    constexpr int M = decltype(m)::value;
    int64_t in[M], n[M], at[M];
    for (int i = 0; i < M; ++i) P.at(c0 + i, S, in[i], n[i], at[i]);
    if (P.ext)
      stencil_chunks<M, SW>(pad, off, w, j0, j1, b, in, n, S.sw, buf, at);
    else
      stencil_chunks<M, SW>(pad, off, w, j0, j1, b, in, n, S.sw, out, at);
  };
  int64_t c = 0;
  for (; c + 4 <= P.count; c += 4) pass(std::integral_constant<int, 4>{}, c);
  for (; c < P.count; ++c) pass(std::integral_constant<int, 1>{}, c);
  if (P.ext)
    for (int64_t oy = 0; oy < S.OH; ++oy) copy_row(buf + oy * S.pitch, out + oy * S.OW, S.OW);
}

// One input-gradient plane: pad (zeroed, padded) += each tap's w[j] times the output-gradient plane g, written
// every SW-th column from off[j] (SW 0: S.sw). Tap by tap: the taps of one row chunk in turn would each load what
// the last one stored, at an offset that store cannot forward to (at 50%, 5 x 5 stride 2, 1.4-1.6x the time).
template <int64_t SW, typename scalar_t>
void scatter_plane(const scalar_t* g, const int64_t* off, const float* w, int64_t j0, int64_t j1, float* pad,
                   const PlaneShape S) {
  const int64_t sw = SW ? SW : S.sw, step = S.sh * S.pitch;
  for (int64_t j = j0; j < j1; ++j) {
    const float wj = w[j];
    for (int64_t oy = 0; oy < S.OH; ++oy) {
      float* row = pad + oy * step + off[j];
      for (int64_t ox = 0; ox < S.OW; ox += kLanes) {
        const int64_t n = std::min(kLanes, S.OW - ox);
        add_strided(row + ox * sw, sw, wj * load_lanes(g + oy * S.OW + ox, n), n);
      }
    }
  }
}

// acc[j - j0] += lanes of g times the padded plane from off[j], every SW-th column, for taps [j0, j1): four chunks
// of g a pass, each tap's sum added to its vector once a pass. Where S.ext(), g goes into extended rows first
// (zeros between the rows).
template <int64_t SW, typename scalar_t>
void dots_plane(const float* pad, const scalar_t* g, const int64_t* off, int64_t j0, int64_t j1, vfloat* acc,
                const PlaneShape S) {
  const PlaneChunks P(S, SW == 1 && S.ext());
  const int64_t s = SW ? SW : S.sw;
  float buf[PlaneShape::kExtMax];
  if (P.ext)
    for (int64_t oy = 0; oy < S.OH; ++oy) {
      copy_row(g + oy * S.OW, buf + oy * S.pitch, S.OW);
      if (oy + 1 < S.OH) std::fill(buf + oy * S.pitch + S.OW, buf + (oy + 1) * S.pitch, 0.f);
    }
  const auto pass = [&](auto m, int64_t c0) {
    constexpr int M = decltype(m)::value;
    int64_t in[M], n[M], at[M];
    vfloat v[M];
    ChunkLoad<SW> ld[M];
    for (int i = 0; i < M; ++i) {
      P.at(c0 + i, S, in[i], n[i], at[i]);
      v[i] = P.ext ? load_lanes(buf + at[i], n[i]) : load_lanes(g + at[i], n[i]);
      ld[i].set(s, n[i]);
    }
    for (int64_t j = j0; j < j1; ++j) {
      const float* p = pad + off[j];
      vfloat t = v[0] * ld[0](p + in[0]);
      for (int i = 1; i < M; ++i) t += v[i] * ld[i](p + in[i]);
      acc[j - j0] += t;
    }
  };
  int64_t c = 0;
  for (; c + 4 <= P.count; c += 4) pass(std::integral_constant<int, 4>{}, c);
  for (; c < P.count; ++c) pass(std::integral_constant<int, 1>{}, c);
}

// Padded planes copied together before any is read, up to 32 KB of them: a plane's loads right after the copy's
// stores, at other offsets, would wait for those stores (no forwarding).
inline int64_t plane_group(const PlaneShape& S) {
  return std::max<int64_t>(1, std::min<int64_t>(64, 8192 / std::max<int64_t>(1, S.padded)));
}

// Units per task: about 16K elements of input and output a task.
inline int64_t unit_grain(const PlaneShape& S, const PlaneTaps& t) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, t.in_g * S.padded + t.out_g * S.OH * S.OW));
}

// dst's planes (OH x OW of S) from src's (H0 x W0 of S), both contiguous, a unit (an image's group: t.in_g source
// planes, t.out_g destination planes) at a time: the unit's source planes that a tap reads copied into padded
// planes (those of several units together, up to plane_group planes), then each destination plane r (of all
// channels: g * out_g + l) is stencil_plane over its taps plus its bias (0 without); one without a tap gets its
// bias. Tasks are units. The forward, and the input gradient at stride 1 (input_taps flipped, over gy).
template <typename scalar_t>
void stencil_units(const PlaneTaps& t, const scalar_t* src, const scalar_t* bias, scalar_t* dst, int64_t N,
                   const PlaneShape S) {
  const int64_t in_plane = S.H0 * S.W0, out_plane = S.OH * S.OW, G = t.G, in_g = t.in_g, out_g = t.out_g;
  const int64_t batch = std::max<int64_t>(1, plane_group(S) / in_g);  // units copied together
  const int32_t* ptr = t.ptr.data();
  const int64_t* off = t.off.get();
  const float* w = t.w.get();
  const uint8_t* used = t.used.data();
  at::parallel_for(0, N * G, unit_grain(S, t), [&](int64_t u0, int64_t u1) {
    std::vector<float> pad(static_cast<size_t>(std::min(batch, u1 - u0) * in_g * S.padded), 0.f);
    with_column_stride(S.sw, [&](auto SW) {
      for (int64_t b0 = u0; b0 < u1; b0 += batch) {
        const int64_t b1 = std::min(u1, b0 + batch);
        for (int64_t u = b0; u < b1; ++u) {
          const int64_t c0 = (u % G) * in_g;
          for (int64_t l = 0; l < in_g; ++l)
            if (used[c0 + l])
              pad_plane(src + (u * in_g + l) * in_plane, pad.data() + ((u - b0) * in_g + l) * S.padded, S);
        }
        for (int64_t u = b0; u < b1; ++u) {
          const float* planes = pad.data() + (u - b0) * in_g * S.padded;
          const int64_t r0 = (u % G) * out_g;
          for (int64_t l = 0; l < out_g; ++l) {
            const int64_t r = r0 + l;
            const float b = bias ? static_cast<float>(bias[r]) : 0.f;
            scalar_t* out = dst + (u * out_g + l) * out_plane;
            if (ptr[r] == ptr[r + 1])
              std::fill(out, out + out_plane, static_cast<scalar_t>(b));
            else
              stencil_plane<decltype(SW)::value>(planes, off, w, ptr[r], ptr[r + 1], b, out, S);
          }
        }
      }
    });
  });
}

// y [N, O, OH, OW] from x [N, C, H0, W0] (both contiguous).
template <typename scalar_t>
void grouped_nchw(const PlaneTaps& t, const scalar_t* x, const scalar_t* bias, scalar_t* y, const Layout& L) {
  stencil_units(t, x, bias, y, L.N, PlaneShape(L));
}

// dx [N, C, H0, W0] from gy [N, O, OH, OW] (both contiguous), W's taps t (plane_taps) scattered: per unit, each
// output plane's taps add w * gy's rows into the unit's zeroed padded float32 input planes (at stride sw), whose
// interiors are then dx's planes. Tasks are units.
template <typename scalar_t>
void scatter_units(const PlaneTaps& t, const scalar_t* gy, scalar_t* dx, const Layout& L) {
  const PlaneShape S(L);
  const int64_t G = t.G, in_plane = S.H0 * S.W0, out_plane = S.OH * S.OW, in_g = t.in_g, out_g = t.out_g;
  const int32_t* ptr = t.ptr.data();
  const int64_t* off = t.off.get();
  const float* w = t.w.get();
  const uint8_t* used = t.used.data();
  at::parallel_for(0, L.N * G, unit_grain(S, t), [&](int64_t u0, int64_t u1) {
    std::vector<float> pad(static_cast<size_t>(in_g * S.padded));
    with_column_stride(S.sw, [&](auto SW) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t c0 = (u % G) * in_g, r0 = (u % G) * out_g;
        for (int64_t l = 0; l < in_g; ++l)
          if (used[c0 + l]) std::fill(pad.begin() + l * S.padded, pad.begin() + (l + 1) * S.padded, 0.f);
        for (int64_t l = 0; l < out_g; ++l)
          scatter_plane<decltype(SW)::value>(gy + (u * out_g + l) * out_plane, off, w, ptr[r0 + l], ptr[r0 + l + 1],
                                             pad.data(), S);
        for (int64_t l = 0; l < in_g; ++l) {
          scalar_t* out = dx + (u * in_g + l) * in_plane;
          if (used[c0 + l])
            unpad_plane(pad.data() + l * S.padded, out, S);
          else
            std::fill(out, out + in_plane, scalar_t(0));
        }
      }
    });
  });
}

// dst[i * drow + jx * ds] for i < rows, jx < cols: the sum over taps [j0, j1) of w[j] times src from off[j] + i *
// pitch + jx, four chunks of 16 a pass (a phase of a strided layer's input gradient).
inline void phase_plane(const float* src, int64_t pitch, const int64_t* off, const float* w, int64_t j0, int64_t j1,
                        float* dst, int64_t drow, int64_t ds, int64_t rows, int64_t cols) {
  const int64_t per_row = (cols + kLanes - 1) / kLanes, count = rows * per_row;
  const auto pass = [&](auto m, int64_t c0) {
    constexpr int M = decltype(m)::value;
    int64_t in[M], n[M], at[M];
    for (int i = 0; i < M; ++i) {
      const int64_t c = c0 + i, r = c / per_row, x = (c - r * per_row) * kLanes;
      in[i] = r * pitch + x;
      n[i] = std::min(kLanes, cols - x);
      at[i] = r * drow + x * ds;
    }
    stencil_chunks<M, 1>(src, off, w, j0, j1, 0.f, in, n, 1, dst, at, ds);
  };
  int64_t c = 0;
  for (; c + 4 <= count; c += 4) pass(std::integral_constant<int, 4>{}, c);
  for (; c < count; ++c) pass(std::integral_constant<int, 1>{}, c);
}

#ifdef __AVX512F__
// Rows [i0, i1) of row phase a of a float32 dx plane out (H0 x W0) at column stride 2, both column phases together:
// per 16 columns x of the phases, column phase 0's taps [p0, p1) and phase 1's [q0, q1) summed over gy's padded
// planes g (pitch), and the two sums interleaved into dx's 32 columns from 2 x - pw: two whole-vector stores (masked
// at the row's ends) instead of one masked store of 16 of 32 elements a phase. Against the phases one by one (one
// process switching per call, 9 rounds, median per-round ratio, Zen 4, 2026-12-03; stride-2 grouped and depthwise
// layers of ResNeXt-50, RegNet, EfficientNet-B0 with 7-29 weights an input channel): 0.66-0.87 of the time at batch
// 8, 0.70-0.93 at batch 1; at 50% (36-144 weights) 0.82-1.12.
inline void paired_phase_rows(const float* g, int64_t pitch, const int64_t* off, const float* w, int64_t p0,
                              int64_t p1, int64_t q0, int64_t q1, float* out, int64_t W0, int64_t pw, int64_t rstep,
                              int64_t r0, int64_t i0, int64_t i1) {
  const int64_t xs = pw / 2, xe = (pw + W0 + 1) / 2;
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  const auto lanes = [W0](int64_t start) {  // lanes l of 16 with 0 <= start + l < W0
    const int64_t first = std::clamp<int64_t>(-start, 0, kLanes), end = std::clamp<int64_t>(W0 - start, 0, kLanes);
    return static_cast<__mmask16>(cpu::tail_mask(end) & ~cpu::tail_mask(std::min(first, end)));
  };
  const auto store = [&](float* drow, int64_t x, __m512 v0, __m512 v1) {
    const int64_t start = 2 * x - pw;
    _mm512_mask_storeu_ps(drow + start, lanes(start), _mm512_permutex2var_ps(v0, lo, v1));
    _mm512_mask_storeu_ps(drow + start + kLanes, lanes(start + kLanes), _mm512_permutex2var_ps(v0, hi, v1));
  };
  for (int64_t i = i0; i < i1; ++i) {
    const float* row = g + i * pitch;
    float* drow = out + (r0 + (i - i0) * rstep) * W0;
    int64_t x = xs;
    for (; x + kLanes < xe; x += 2 * kLanes) {  // two chunks a pass: four independent sums
      const __mmask16 m = cpu::tail_mask(std::min(kLanes, xe - x - kLanes));
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
      for (int64_t j = p0; j < p1; ++j) {
        const __m512 v = _mm512_set1_ps(w[j]);
        a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + x + off[j]), a0);
        a1 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, row + x + kLanes + off[j]), a1);
      }
      for (int64_t j = q0; j < q1; ++j) {
        const __m512 v = _mm512_set1_ps(w[j]);
        b0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(row + x + off[j]), b0);
        b1 = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, row + x + kLanes + off[j]), b1);
      }
      store(drow, x, a0, b0);
      store(drow, x + kLanes, a1, b1);
    }
    if (x < xe) {
      const __mmask16 m = cpu::tail_mask(std::min(kLanes, xe - x));
      __m512 a0 = _mm512_setzero_ps(), b0 = a0;
      for (int64_t j = p0; j < p1; ++j)
        a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), _mm512_maskz_loadu_ps(m, row + x + off[j]), a0);
      for (int64_t j = q0; j < q1; ++j)
        b0 = _mm512_fmadd_ps(_mm512_set1_ps(w[j]), _mm512_maskz_loadu_ps(m, row + x + off[j]), b0);
      store(drow, x, a0, b0);
    }
  }
}
#endif

// dx [N, C, H0, W0] from gy [N, O, OH, OW] (both contiguous), W in G groups, gathered (no scatter: each dx element
// is one sum of taps, in registers). Stride 1 with padding within the kernel's reach: the forward's stencil over
// gy's planes padded by the kernel's reach less the padding, the taps flipped and by input channel; each dx row
// takes its taps' sum (against a tap-by-tap scatter into a padded plane, depthwise layers at 90%, batch 8:
// 0.40-0.97 of the time; 0.19-0.72 at 50%). Otherwise by phase: the padded input's element (i sh + a, j sw + b)
// is read through tap (ki, kj) only when ki dh = a (mod sh) and kj dw = b (mod sw), by output pixel (i - ki dh / sh,
// j - kj dw / sw) (integer division); so each phase (a, b) of dx's padded plane is a stride-1 stencil of its taps
// over gy's planes padded by (kh - 1) dh / sh rows above and (kw - 1) dw / sw columns left, its elements inside the
// image written every sw-th one into dx's plane (float32; at column stride 2 with AVX-512 both column phases of a
// row together, paired_phase_rows; other types into float32 padded planes, a unit's then copied into dx: copied
// plane by plane, each copy's loads waited on the phases' masked stores). Tasks are units (an image's group). With
// few stored weights an input channel (kScatterPerInput), scattered instead.
template <typename index_t, typename scalar_t>
void grouped_grad_input_nchw(const int32_t* rowptr, const index_t* col, const scalar_t* values, int64_t O,
                             int64_t G, const scalar_t* gy, scalar_t* dx, const Layout& L) {
  const PlaneShape S(L);
  const int64_t taps = L.kh * L.kw, reach_h = (L.kh - 1) * L.dh, reach_w = (L.kw - 1) * L.dw;
  if (flipped_case(L)) {
    // The transposed problem: gy's planes (OH x OW) padded by reach - padding, dx's planes its output.
    PlaneShape P = S;
    P.H0 = S.OH;
    P.W0 = S.OW;
    P.ph = reach_h - L.ph;
    P.pw = reach_w - L.pw;
    P.pitch = S.OW + 2 * P.pw;
    P.padded = (S.OH + 2 * P.ph) * P.pitch;
    P.OH = S.H0;
    P.OW = S.W0;
    std::vector<int64_t> flip(static_cast<size_t>(taps));
    for (int64_t q = 0; q < taps; ++q) flip[q] = (reach_h - (q / L.kw) * L.dh) * P.pitch + reach_w - (q % L.kw) * L.dw;
    const PlaneTaps f = input_taps(rowptr, col, values, O, L, G, P, 1, std::vector<int64_t>(taps, 0), flip);
    stencil_units(f, gy, static_cast<const scalar_t*>(nullptr), dx, L.N, P);
    return;
  }
  if (rowptr[O] <= kScatterPerInput * L.C) {
    scatter_units(plane_taps(rowptr, col, values, O, L, G), gy, dx, L);
    return;
  }
  const int64_t sh = L.sh, sw = L.sw, phases = sh * sw, top = reach_h / sh, left = reach_w / sw;
  PlaneShape P = S;  // gy's planes padded by (top, left), rows and columns up to the phases' extent (L.Hp x L.Wp)
  P.H0 = S.OH;
  P.W0 = S.OW;
  P.ph = top;
  P.pw = left;
  P.pitch = left + L.Wp;
  P.padded = (top + L.Hp) * P.pitch;
  std::vector<int64_t> part(static_cast<size_t>(taps)), at(static_cast<size_t>(taps));
  for (int64_t q = 0; q < taps; ++q) {
    const int64_t y = (q / L.kw) * L.dh, x = (q % L.kw) * L.dw;
    part[q] = (y % sh) * sw + x % sw;
    at[q] = (top - y / sh) * P.pitch + left - x / sw;
  }
  const PlaneTaps t = input_taps(rowptr, col, values, O, L, G, P, phases, part, at);
  const int64_t in_plane = S.H0 * S.W0, out_plane = S.OH * S.OW, in_g = L.C / G, out_g = O / G;
  const int32_t* ptr = t.ptr.data();
  const int64_t* off = t.off.get();
  const float* w = t.w.get();
  const uint8_t* used = t.used.data();
  // per phase: the rows i and columns j of dx's padded plane inside the image (ph <= i sh + a < ph + H0, ...)
  const auto inside = [](int64_t p, int64_t n, int64_t a, int64_t s, int64_t& i0, int64_t& i1) {
    i0 = p > a ? (p - a + s - 1) / s : 0;
    i1 = std::max(i0, p + n > a ? (p + n - a + s - 1) / s : 0);
  };
  // float32 dx is written in place; other types go through float32 padded planes (all of a unit's, then copied)
  constexpr bool direct = std::is_same_v<scalar_t, float>;
  at::parallel_for(0, L.N * G, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, out_g * P.padded + in_g * in_plane)),
                   [&](int64_t u0, int64_t u1) {
    std::vector<float> g(static_cast<size_t>(out_g * P.padded), 0.f);
    std::vector<float> pad(direct ? 0 : static_cast<size_t>(in_g * S.padded));
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t gi = u % G;
      for (int64_t l = 0; l < out_g; ++l)
        if (used[gi * out_g + l]) pad_plane(gy + (u * out_g + l) * out_plane, g.data() + l * P.padded, P);
      for (int64_t l = 0; l < in_g; ++l) {
        const int64_t c = gi * in_g + l;
        scalar_t* out = dx + (u * in_g + l) * in_plane;
        if (ptr[c * phases] == ptr[(c + 1) * phases]) {
          std::fill(out, out + in_plane, scalar_t(0));
          continue;
        }
#ifdef __AVX512F__
        if constexpr (direct) {
          if (sw == 2) {  // both column phases of a row together
            for (int64_t a = 0; a < sh; ++a) {
              int64_t i0, i1;
              inside(L.ph, S.H0, a, sh, i0, i1);
              const int64_t p = c * phases + a * 2;
              paired_phase_rows(g.data(), P.pitch, off, w, ptr[p], ptr[p + 1], ptr[p + 1], ptr[p + 2], out, S.W0,
                                L.pw, sh, i0 * sh + a - L.ph, i0, i1);
            }
            continue;
          }
        }
#endif
        for (int64_t p = 0; p < phases; ++p) {  // (a phase without a tap gets zeros)
          const int64_t a = p / sw, b = p % sw;
          int64_t i0, i1, x0, x1;
          inside(L.ph, S.H0, a, sh, i0, i1);
          inside(L.pw, S.W0, b, sw, x0, x1);
          float* dst;
          int64_t drow;
          if constexpr (direct) {
            dst = out + (i0 * sh + a - L.ph) * S.W0 + x0 * sw + b - L.pw;
            drow = sh * S.W0;
          } else {
            dst = pad.data() + l * S.padded + (i0 * sh + a) * S.pitch + x0 * sw + b;
            drow = sh * S.pitch;
          }
          phase_plane(g.data() + i0 * P.pitch + x0, P.pitch, off, w, ptr[c * phases + p], ptr[c * phases + p + 1],
                      dst, drow, sw, i1 - i0, x1 - x0);
        }
      }
      if constexpr (!direct)
        for (int64_t l = 0; l < in_g; ++l) {
          const int64_t c = gi * in_g + l;
          if (ptr[c * phases] < ptr[(c + 1) * phases])
            unpad_plane(pad.data() + l * S.padded, dx + (u * in_g + l) * in_plane, S);
        }
    }
  });
}

// The sum of v's 16 lanes, as a tree (a chain of 16 scalar adds a stored weight took as long as its dot products
// on 7 x 7 planes at batch 1).
inline float lane_sum(vfloat v) {
#ifdef __AVX512F__
  return _mm512_reduce_add_ps(v);
#else
  float l[kLanes];
  vstore(l, v);
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t i = 0; i < w; ++i) l[i] += l[i + w];
  return l[0];
#endif
}

// dv[j] (CSR order) = the sum over images and output pixels of gy times x at the pixel entry j reads (x and gy
// contiguous NCHW). The units, group by group (all images of group 0, then of group 1, ...), are split into one
// range a thread; a range sums each group's entries in vectors over its images (the group's input planes padded,
// plane_group of them together, then each output plane's dot products). With at least four groups a range,
// the ranges split at group boundaries and each writes its groups' sums into dv; otherwise (a group's images over
// several ranges) each range sums into its own [nnz] array, added together at the end.
template <typename scalar_t>
void grouped_grad_values_nchw(const PlaneTaps& t, const scalar_t* x, const scalar_t* gy, scalar_t* dv,
                              const Layout& L) {
  const PlaneShape S(L);
  const int64_t N = L.N, G = t.G, in_g = t.in_g, out_g = t.out_g, units = N * G;
  const int64_t C = L.C, O = G * out_g, nnz = t.ptr[O], in_plane = S.H0 * S.W0, out_plane = S.OH * S.OW;
  const int64_t batch = std::max<int64_t>(1, plane_group(S) / in_g);  // images of a group padded together
  const int64_t ranges = std::max<int64_t>(
      1, std::min<int64_t>(at::get_num_threads(), units / std::max<int64_t>(1, unit_grain(S, t))));
  const bool whole = G >= 4 * ranges;  // ranges of whole groups (each within a group of the others' share)
  const int32_t* ptr = t.ptr.data();
  const int64_t* off = t.off.get();
  const uint8_t* used = t.used.data();
  std::vector<std::vector<float>> parts(whole ? 0 : static_cast<size_t>(ranges));
  at::parallel_for(0, ranges, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      float* part = nullptr;
      if (!whole) {
        parts[q].assign(static_cast<size_t>(nnz), 0.f);
        part = parts[q].data();
      }
      std::vector<float> pad(static_cast<size_t>(std::min(batch, N) * in_g * S.padded), 0.f);
      std::vector<vfloat> acc;
      const int64_t v0 = whole ? G * q / ranges * N : units * q / ranges;
      const int64_t v1 = whole ? G * (q + 1) / ranges * N : units * (q + 1) / ranges;
      with_column_stride(S.sw, [&](auto SW) {
        for (int64_t v = v0; v < v1;) {  // group g = v / N, images [n0, n1) of it
          const int64_t g = v / N, n0 = v % N, n1 = std::min(N, n0 + (v1 - v)), e0 = ptr[g * out_g];
          const int64_t e1 = ptr[(g + 1) * out_g];
          v += n1 - n0;
          if (e0 == e1) continue;
          acc.assign(static_cast<size_t>(e1 - e0), vfloat{});
          for (int64_t b0 = n0; b0 < n1; b0 += batch) {
            const int64_t b1 = std::min(n1, b0 + batch);
            for (int64_t n = b0; n < b1; ++n)
              for (int64_t l = 0; l < in_g; ++l)
                if (used[g * in_g + l])
                  pad_plane(x + (n * C + g * in_g + l) * in_plane, pad.data() + ((n - b0) * in_g + l) * S.padded, S);
            for (int64_t n = b0; n < b1; ++n)
              for (int64_t o = g * out_g; o < (g + 1) * out_g; ++o)
                if (ptr[o] < ptr[o + 1])
                  dots_plane<decltype(SW)::value>(pad.data() + (n - b0) * in_g * S.padded, gy + (n * O + o) * out_plane,
                                                  off, ptr[o], ptr[o + 1], acc.data() + (ptr[o] - e0), S);
          }
          if (part)
            for (int64_t j = e0; j < e1; ++j) part[j] += lane_sum(acc[j - e0]);
          else
            for (int64_t j = e0; j < e1; ++j) dv[j] = static_cast<scalar_t>(lane_sum(acc[j - e0]));
        }
      });
    }
  });
  if (whole) return;
  at::parallel_for(0, nnz, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      float s = 0.f;
      for (const auto& part : parts) s += part[j];
      dv[j] = static_cast<scalar_t>(s);
    }
  });
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------
// A task is (block of units, output channel o); the block's output planes accumulate in acc_t, in cache.
template <typename index_t, typename scalar_t, typename acc_t>
void conv_kernel(const int32_t* rowptr, const index_t* col, const scalar_t* values, const acc_t* xp,
                 const scalar_t* bias, scalar_t* y, bool y_cl, const Layout& L, int64_t O, std::atomic<bool>& bad) {
  const int64_t K = L.C * L.kh * L.kw, nnz = rowptr[O];
  // Every stored weight's window start inside a unit and its value as acc_t, once per call (tasks of the same
  // row in other unit blocks share them). A column outside [0, K) sets bad (the op then raises) and reads the
  // window at 0 with value 0.
  std::vector<int64_t> offs(static_cast<size_t>(nnz));
  std::vector<acc_t> vals(static_cast<size_t>(nnz));
  at::parallel_for(0, nnz, 4096, [&](int64_t j0, int64_t j1) {
    bool local_bad = false;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k = col[j];
      const bool ok = static_cast<uint64_t>(k) < static_cast<uint64_t>(K);
      local_bad |= !ok;
      offs[j] = ok ? L.window(k) : 0;
      vals[j] = ok ? static_cast<acc_t>(values[j]) : acc_t(0);
    }
    if (local_bad) bad = true;
  });
  // A task is (block of units, group of G output channels): G = 1 for an NCHW y; up to 16 for a channels-last y
  // (channel_group), whose pixels then take G channels at a time (a 16 x 16 transpose in registers) instead of
  // every O-th element channel by channel. The block's accumulators within 256 KB and its input within ~512 KB
  // (float32), so that a thread, which takes consecutive tasks (unit-block major), sweeps every output channel over
  // inputs in L2.
  const auto blocks = [&](int64_t g) {  // unit blocks with g channels a task
    const int64_t ublock = std::min(unit_block(L.NB, g * L.oplane, int64_t{1} << 16),
                                    unit_block(L.NB, L.C * L.plane, int64_t{1} << 17));
    return std::make_pair(ublock, (L.NB + ublock - 1) / ublock);
  };
  const int64_t G = y_cl ? channel_group([&](int64_t g) { return (O + g - 1) / g * blocks(g).second; }) : 1;
  const int64_t groups = (O + G - 1) / G;
  const int64_t ublock = blocks(G).first, ublocks = blocks(G).second;  // (no structured bindings: captured below)
  const Interleave out = output_of(L, O);  // y's planes in the working layout
  const bool stream = y_cl && stream_output(y, O, L.N * L.OH * L.OW * O);
  at::parallel_for(0, groups * ublocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(static_cast<size_t>(G * ublock * L.oplane));  // [channel in group, unit, oplane]
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t o0 = (task % groups) * G, o1 = std::min(O, o0 + G);
      const int64_t u0 = (task / groups) * ublock, u1 = std::min(L.NB, u0 + ublock);
      for (int64_t o = o0; o < o1; ++o) {
        const acc_t b = bias ? static_cast<acc_t>(bias[o]) : acc_t(0);
        const int64_t j0 = rowptr[o], n = rowptr[o + 1] - j0;
        for (int64_t u = u0; u < u1; ++u)
          cpu::weighted_sum(acc.data() + ((o - o0) * ublock + u - u0) * L.oplane, b, xp + u * L.C * L.plane,
                            offs.data() + j0, vals.data() + j0, n, L.len);
      }
      // Unit planes [OH, Wp, nb] -> y[n, o] [OH, OW].
      for (int64_t u = u0; u < u1; ++u)
        for (int64_t l = 0; l < L.nb && u * L.nb + l < L.N; ++l) {
          const int64_t n = u * L.nb + l;
          if (!y_cl) {
            const acc_t* src = acc.data() + (u - u0) * L.oplane;
            scalar_t* dst = y + (n * O + o0) * L.OH * L.OW;
            if constexpr (std::is_same_v<acc_t, float>) {
              // One image a unit: each row a contiguous run, 16 lanes at a time (element by element, with the
              // stride nb unknown to the compiler, the copy was half of a narrow 1 x 1 layer's forward: 32 -> 192
              // on 28 x 28 at 90%, one process switching per call, 11 rounds, per-round ratio, Zen 4, 2026-12-03:
              // batch 8 / 1 0.71 / 0.78 of the time, 16 -> 72 on 56 x 56 0.84 / 0.78; 3 x 3 layers 0.94-1.03).
              if (L.nb == 1) {
                for (int64_t r = 0; r < L.OH; ++r) copy_row(src + r * L.Wp, dst + r * L.OW, L.OW);
                continue;
              }
            }
            for (int64_t r = 0; r < L.OH; ++r)
              for (int64_t q = 0; q < L.OW; ++q)
                dst[r * L.OW + q] = static_cast<scalar_t>(src[(r * L.Wp + q) * L.nb + l]);
            continue;
          }
          // channels-last: y[n] is [OH, OW, O], pixel p's channels o0 .. o1 side by side
          const acc_t* src = acc.data() + (u - u0) * L.oplane + l;
          const int64_t stride = ublock * L.oplane;  // from one channel's plane to the next
          if constexpr (std::is_same_v<acc_t, float>) {
            if (L.nb == 1) {
              deinterleave_channels_last(src, stride, y, out, n, o0, o1 - o0, stream);
              continue;
            }
          }
          scalar_t* dst = y + n * L.OH * L.OW * O + o0;
          for (int64_t r = 0; r < L.OH; ++r)
            for (int64_t q = 0; q < L.OW; ++q)
              for (int64_t o = o0; o < o1; ++o)
                dst[(r * L.OW + q) * O + o - o0] =
                    static_cast<scalar_t>(src[(o - o0) * stride + (r * L.Wp + q) * L.nb]);
        }
    }
    if (stream) stream_fence();
  });
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                             const at::Tensor& x, const std::optional<at::Tensor>& bias, at::IntArrayRef kernel,
                             at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&) {
  const auto [OH, OW] = check_sparse_conv2d(rowptr, col, values, x, bias, kernel, stride, dilation, padding);
  TORCH_CHECK_VALUE(values.device().is_cpu(), "sparse_conv2d: tensors must be on the CPU for the CPU kernel");
  cpu::check_rowptr_cpu(rowptr, values.numel(), "sparse_conv2d");
  const int64_t O = rowptr.numel() - 1;
  const at::Tensor bs = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const Layout L(x.size(0), x.size(1), x.size(2), x.size(3), kernel, stride, dilation, padding, OH, OW,
                 col.numel());
  const bool cl = channels_last(x);  // then y too, as nn.Conv2d's
  at::Tensor y = empty_output_4d({L.N, O, OH, OW}, x.options(), cl);
  if (y.numel() == 0) return y;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_conv2d_cpu", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "sparse_conv2d_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if constexpr (std::is_same_v<acc_t, float>) {
        if (pointwise_channels_last_case(x, kernel, padding)) {
          const PointwiseRows w = pointwise_rows(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                                 values.const_data_ptr<scalar_t>(), O, L.C, bad);
          const auto map = pixel_map(L);
          pointwise_channels_last<scalar_t>(w, O, L.C, x.const_data_ptr<scalar_t>(),
                                            bs.defined() ? bs.const_data_ptr<scalar_t>() : nullptr,
                                            y.mutable_data_ptr<scalar_t>(), L.N * L.OH * L.OW,
                                            map ? &*map : nullptr);
          return;
        }
      }
      if constexpr (std::is_same_v<acc_t, float>) {
        if (cl) {  // (float32, half, bfloat16)
          if (const auto taps = direct_depthwise(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                                 values.const_data_ptr<scalar_t>(), O, L)) {
            depthwise_channels_last<scalar_t>(*taps, x.const_data_ptr<scalar_t>(),
                                              bs.defined() ? bs.const_data_ptr<scalar_t>() : nullptr,
                                              y.mutable_data_ptr<scalar_t>(), L);
            return;
          }
        } else if (x.is_contiguous()) {
          if (const int64_t G = plane_groups(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), O, L,
                                             PlaneOp::forward)) {
            const PlaneTaps t = plane_taps(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                           values.const_data_ptr<scalar_t>(), O, L, G);
            grouped_nchw<scalar_t>(t, x.const_data_ptr<scalar_t>(),
                                   bs.defined() ? bs.const_data_ptr<scalar_t>() : nullptr,
                                   y.mutable_data_ptr<scalar_t>(), L);
            return;
          }
        }
      }
      const at::Tensor xp = to_layout<scalar_t, acc_t>(x, input_of(L));
      conv_kernel<index_t, scalar_t, acc_t>(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                            values.const_data_ptr<scalar_t>(), xp.const_data_ptr<acc_t>(),
                                            bs.defined() ? bs.const_data_ptr<scalar_t>() : nullptr,
                                            y.mutable_data_ptr<scalar_t>(), cl, L, O, bad);
    });
  });
  TORCH_CHECK_VALUE(!bad, "sparse_conv2d: a column index is outside [0, C * kh * kw)");
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------
// The stored weights grouped by input channel: for every channel c, its entries (row o, tap offset inside a
// plane, value as acc_t) ordered by o, then tap. A counting sort, O(nnz + C); entries with a column outside
// [0, C * kh * kw) set bad and are dropped. Grouping by channel rather than by column (c, ki, kj) lets the
// input-gradient kernel apply all of a row's taps while gy[unit, o] is in L1.
template <typename acc_t>
struct ByChannel {
  std::vector<int32_t> ptr, row;
  std::vector<int64_t> off;
  std::vector<acc_t> val;
  // f(o, tap offset, value) for every stored weight of input channel c; returns false (none are bad here).
  template <typename F>
  bool each(int64_t c, F&& f) const {
    for (int64_t e = ptr[c]; e < ptr[c + 1]; ++e) f(row[e], off[e], val[e]);
    return false;
  }
};

// W's cached transposed structure (CSC over the columns k = (c, ki, kj), rows ascending, and the permutation
// into the stored values), read in place: no build. Rows or permutation entries outside their range are
// skipped and reported. The values, read through the permutation, are prefetched kValuePrefetch entries ahead
// (a random read each, most of them misses: the input gradient of ResNet-18's layer4 at 90%, batch 8, one
// process alternating the two, 21 rounds: 5.01 -> 4.83 ms median, 4.68 -> 4.22 ms minimum; the other layers,
// whose kernels read fewer stored values per element, unchanged; Zen 3, 2026-11-30).
constexpr int64_t kValuePrefetch = 32;

template <typename tindex_t, typename scalar_t, typename acc_t>
struct Transposed {
  const int32_t* ptr;
  const tindex_t* row;
  const int32_t* perm;
  const scalar_t* values;
  int64_t O, nnz;
  const Layout& L;
  template <typename F>
  bool each(int64_t c, F&& f) const {
    bool bad = false;
    const int64_t last = ptr[(c + 1) * L.kh * L.kw];
    for (int64_t ki = 0; ki < L.kh; ++ki)
      for (int64_t kj = 0; kj < L.kw; ++kj) {
        const int64_t k = (c * L.kh + ki) * L.kw + kj, off = L.taps[ki * L.kw + kj];
        for (int64_t e = ptr[k]; e < ptr[k + 1]; ++e) {
          if (e + kValuePrefetch < last) {
            const uint32_t ahead = static_cast<uint32_t>(perm[e + kValuePrefetch]);
            if (ahead < static_cast<uint64_t>(nnz)) __builtin_prefetch(values + ahead);
          }
          const int64_t o = row[e], p = perm[e];
          if (static_cast<uint64_t>(o) >= static_cast<uint64_t>(O) ||
              static_cast<uint64_t>(p) >= static_cast<uint64_t>(nnz)) {
            bad = true;
            continue;
          }
          f(o, off, static_cast<acc_t>(values[p]));
        }
      }
    return bad;
  }
};

template <typename index_t, typename scalar_t, typename acc_t>
ByChannel<acc_t> by_channel(const int32_t* rowptr, const index_t* col, const scalar_t* values, int64_t rows,
                            const Layout& L, std::atomic<bool>& bad) {
  const int64_t taps = L.kh * L.kw, K = L.C * taps;
  ByChannel<acc_t> t;
  t.ptr.assign(static_cast<size_t>(L.C + 1), 0);
  for (int64_t j = 0; j < rowptr[rows]; ++j) {
    const int64_t k = col[j];
    if (static_cast<uint64_t>(k) >= static_cast<uint64_t>(K)) {
      bad = true;
      continue;
    }
    ++t.ptr[k / taps + 1];
  }
  for (int64_t c = 0; c < L.C; ++c) t.ptr[c + 1] += t.ptr[c];
  t.row.resize(t.ptr[L.C]);
  t.off.resize(t.ptr[L.C]);
  t.val.resize(t.ptr[L.C]);
  std::vector<int32_t> next(t.ptr.begin(), t.ptr.end() - 1);
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t j = rowptr[o]; j < rowptr[o + 1]; ++j) {
      const int64_t k = col[j];
      if (static_cast<uint64_t>(k) >= static_cast<uint64_t>(K)) continue;
      const int32_t at = next[k / taps]++;
      t.row[at] = static_cast<int32_t>(o);
      t.off[at] = L.tap_of(k);
      t.val[at] = static_cast<acc_t>(values[j]);
    }
  return t;
}

// The input gradient dx [N, C, H0, W0] from g = gy in the padded output layout [NB, O, pitch]
// (padded_output_of). A task is (block of units, input channel c). dx[i] = sum over c's weights of value *
// gy_run(o)[i - shift] is the forward's weighted sum again, phase by phase: each weight reads its run at reach -
// (its shift inside the phase), the zeros around the run supplying the out-of-window terms. The block's planes,
// summed in the working layout, go straight from there into dx (deinterleave_plane: the padding's positions are
// dropped).
template <typename scalar_t, typename acc_t, typename Entries>
void conv_grad_input_kernel(const Entries& t, const acc_t* g, scalar_t* dx, bool dx_cl, const Layout& L, int64_t O,
                            int64_t pitch, std::atomic<bool>& bad) {
  Interleave I = input_of(L);
  I.cl = dx_cl;
  const int64_t P = L.sh * L.sw;
  // A task is (block of units, group of G input channels): G = 1 for an NCHW dx; up to 16 for a channels-last one
  // (channel_group), whose pixels then take G channels at a time (deinterleave_channels_last) instead of every
  // C-th element.
  const auto blocks = [&](int64_t g) {  // unit blocks with g channels a task
    const int64_t ublock = std::min(unit_block(L.NB, g * L.plane, int64_t{1} << 16),
                                    unit_block(L.NB, O * pitch, int64_t{1} << 17));
    return std::make_pair(ublock, (L.NB + ublock - 1) / ublock);
  };
  const int64_t G = dx_cl ? channel_group([&](int64_t g) { return (L.C + g - 1) / g * blocks(g).second; }) : 1;
  const int64_t groups = (L.C + G - 1) / G;
  const int64_t ublock = blocks(G).first, ublocks = blocks(G).second;  // (no structured bindings: captured below)
  const bool by_blocks = dx_cl;  // deinterleave_channels_last[_lanes] (float32 accumulation)
  const bool stream = dx_cl && stream_output(dx, L.C, L.N * (L.H - 2 * L.ph) * (L.W - 2 * L.pw) * L.C);
  // Per phase, the part of its plane that holds elements of dx (from the first element's position to the last's,
  // rows of Wp): only that part is summed, the padding's rows and columns around it being dropped anyway (the
  // whole phase before: ResNet-18's layer4, 7 x 7 in a 9 x 9 phase, 90 / 95%, batch 8, one process alternating
  // the two, 21 rounds, median: 10.9 / 5.7 -> 9.1 / 4.6 ms, Zen 3, 2026-11-30).
  std::vector<int64_t> start(P), len(P);
  for (int64_t p = 0; p < P; ++p) {
    const auto [i0, i1] = I.rows(p / L.sw);
    const auto [j0, j1] = I.columns(p % L.sw);
    const bool any = i1 > i0 && j1 > j0;
    start[p] = any ? (i0 * L.Wp + j0) * L.nb : 0;
    len[p] = any ? ((i1 - 1 - i0) * L.Wp + j1 - j0) * L.nb : 0;
  }
  // A channel's weights as the kernel reads them, per phase: where each starts reading a unit's g, and its value
  // (entries of a weight outside its range set bad and are skipped).
  auto build = [&](int64_t c, std::vector<int64_t>* offs, std::vector<acc_t>* vals) {
    for (int64_t p = 0; p < P; ++p) {
      offs[p].clear();
      vals[p].clear();
    }
    if (t.each(c, [&](int64_t o, int64_t off, acc_t v) {
          const int64_t p = P == 1 ? 0 : off / L.phase;
          offs[p].push_back(o * pitch + L.reach - (off - p * L.phase));
          vals[p].push_back(v);
        }))
      bad = true;
  };
  // With several unit blocks, every channel's entries are built once, before the tasks (built per task, they
  // were built once per unit block: ~10% of the kernel's time at layer3); with one, each task builds its own
  // channel's just before use. ResNet-18's layers at 90%, batch 8 (one process alternating the two, 11 rounds,
  // minima, Zen 3, 2026-11-30): layer1 4.03 -> 3.70 ms, layer2 3.75 -> 3.50, layer3 4.85 -> 4.38; layer4 (one
  // unit) unchanged.
  const bool prebuilt = ublocks > 1;
  std::vector<std::vector<int64_t>> all_offs(static_cast<size_t>(prebuilt ? L.C * P : 0));
  std::vector<std::vector<acc_t>> all_vals(all_offs.size());
  if (prebuilt)
    at::parallel_for(0, L.C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) build(c, all_offs.data() + c * P, all_vals.data() + c * P);
    });
  at::parallel_for(0, groups * ublocks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> acc(static_cast<size_t>(G * ublock * L.plane));  // [channel in group, unit, plane]
    std::vector<std::vector<int64_t>> task_offs(prebuilt ? 0 : P);  // per phase
    std::vector<std::vector<acc_t>> task_vals(task_offs.size());
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t c0 = (task % groups) * G, c1 = std::min(L.C, c0 + G);
      const int64_t u0 = (task / groups) * ublock, u1 = std::min(L.NB, u0 + ublock);
      for (int64_t c = c0; c < c1; ++c) {
        if (!prebuilt) build(c, task_offs.data(), task_vals.data());
        const std::vector<int64_t>* co = prebuilt ? all_offs.data() + c * P : task_offs.data();
        const std::vector<acc_t>* cv = prebuilt ? all_vals.data() + c * P : task_vals.data();
        for (int64_t u = u0; u < u1; ++u)
          for (int64_t p = 0; p < P; ++p)
            cpu::weighted_sum(acc.data() + ((c - c0) * ublock + u - u0) * L.plane + p * L.phase + start[p],
                              acc_t(0), g + u * O * pitch + start[p], co[p].data(), cv[p].data(),
                              static_cast<int64_t>(co[p].size()), len[p]);
      }
      for (int64_t u = u0; u < u1; ++u) {
        if constexpr (std::is_same_v<acc_t, float>) {
          if (by_blocks) {  // G <= 16 channels
            if (L.nb == 1)
              deinterleave_channels_last(acc.data() + (u - u0) * L.plane, ublock * L.plane, dx, I, u, c0, c1 - c0,
                                         stream);
            else
              deinterleave_channels_last_lanes(acc.data() + (u - u0) * L.plane, ublock * L.plane, dx, I, u, c0,
                                               c1 - c0, stream);
            continue;
          }
        }
        for (int64_t c = c0; c < c1; ++c)
          deinterleave_plane<acc_t, scalar_t>(acc.data() + ((c - c0) * ublock + u - u0) * L.plane, dx, I, u * L.C + c);
      }
    }
    if (stream) stream_fence();
  });
}

// dvalues [nnz] from the input in the working layout xp and g (gy in the output working layout): rows split
// between threads by stored count; a thread walks its rows unit block by unit block (the block's input stays in
// cache), adding each stored weight's dot products to its sum.
template <typename index_t, typename scalar_t, typename acc_t>
void conv_grad_values_kernel(const int32_t* rowptr, const index_t* col, const acc_t* xp, const acc_t* g,
                             scalar_t* dv, const Layout& L, int64_t O, std::atomic<bool>& bad) {
  const int64_t K = L.C * L.kh * L.kw;
  const int64_t ublock = unit_block(L.NB, L.C * L.plane, int64_t{1} << 17);
  cpu::for_row_parts(rowptr, O, bad, [&](int64_t, int64_t r0, int64_t r1) {
    const int64_t j0 = rowptr[r0], j1 = rowptr[r1];
    // Each stored weight's window start inside a unit (-1: a bad column, skipped), and its running sum.
    std::vector<int64_t> offs(static_cast<size_t>(j1 - j0));
    std::vector<acc_t> sum(static_cast<size_t>(j1 - j0), acc_t(0));
    bool outside = false;
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t k = col[j];
      const bool ok = static_cast<uint64_t>(k) < static_cast<uint64_t>(K);
      outside |= !ok;
      offs[j - j0] = ok ? L.window(k) : -1;
    }
    for (int64_t u0 = 0; u0 < L.NB; u0 += ublock) {
      const int64_t u1 = std::min(L.NB, u0 + ublock);
      for (int64_t o = r0; o < r1; ++o) {
        int64_t e0 = rowptr[o] - j0;
        const int64_t e1 = rowptr[o + 1] - j0;
        while (e0 < e1) {  // runs of valid entries (all of the row unless an index is bad)
          if (offs[e0] < 0) {
            ++e0;
            continue;
          }
          int64_t e = e0;
          while (e < e1 && offs[e] >= 0) ++e;
          for (int64_t u = u0; u < u1; ++u)
            cpu::dots(g + (u * O + o) * L.oplane, xp + u * L.C * L.plane, offs.data() + e0, e - e0, L.len,
                      sum.data() + e0);
          e0 = e;
        }
      }
    }
    for (int64_t j = j0; j < j1; ++j) dv[j] = static_cast<scalar_t>(sum[j - j0]);
    return outside;
  });
}

at::Tensor sparse_conv2d_grad_input_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                                        const at::Tensor& gy, at::IntArrayRef x_size, at::IntArrayRef kernel,
                                        at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding,
                                        const std::optional<at::Tensor>& t_rowptr,
                                        const std::optional<at::Tensor>& t_col,
                                        const std::optional<at::Tensor>& t_perm) {
  // The kernel walks the weights of one input channel at a time: through W's transposed structure when given
  // (the layers cache it), else regrouped by channel here from the CSR (a counting sort).
  const char* op = "sparse_conv2d_grad_input";
  check_csr(rowptr, col, values, op);
  const int64_t O = rowptr.numel() - 1, nnz = values.numel();
  const auto [OH, OW] = check_conv_grad(gy, values, "values", O, x_size, kernel, stride, dilation, padding, op);
  TORCH_CHECK_VALUE(values.device().is_cpu(), op, ": tensors must be on the CPU for the CPU kernel");
  cpu::check_rowptr_cpu(rowptr, nnz, op);
  const bool have_transposed = has_transposed(t_rowptr, t_col, t_perm);
  const Layout L(x_size[0], x_size[1], x_size[2], x_size[3], kernel, stride, dilation, padding, OH, OW, nnz);
  if (have_transposed) {
    check_transposed(values, *t_rowptr, *t_col, *t_perm, L.C * L.kh * L.kw, op);
    cpu::check_rowptr_cpu(*t_rowptr, nnz, op);
  }
  const bool cl = channels_last(gy);  // then dx too
  if (c10::multiply_integers(x_size) == 0 || gy.numel() == 0)
    return empty_output_4d(x_size, gy.options(), cl).zero_();  // (at::zeros would drop the memory format)
  at::Tensor dx = empty_output_4d(x_size, gy.options(), cl);
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_conv2d_grad_input_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (pointwise_channels_last_case(gy, kernel, padding)) {
        // dx [P, C] = gy [P, O] W: the pointwise kernel over W^T's rows (the input channels' entries); a strided
        // layer's dx is zero outside the pixels it reads
        PointwiseRows w;  // (entries out of range are skipped by each(), which reports them)
        w.ptr.assign(static_cast<size_t>(L.C + 1), 0);
        w.idx.reserve(static_cast<size_t>(nnz));
        w.val.reserve(static_cast<size_t>(nnz));
        const auto gather = [&](const auto& entries) {
          for (int64_t c = 0; c < L.C; ++c) {
            if (entries.each(c, [&](int64_t o, int64_t, float v) {
                  w.idx.push_back(static_cast<int32_t>(o));
                  w.val.push_back(v);
                }))
              bad = true;
            w.ptr[c + 1] = static_cast<int64_t>(w.idx.size());
          }
        };
        if (have_transposed) {
          PYSPARSE_DISPATCH_INDEX(*t_col, "sparse_conv2d_grad_input_cpu", [&] {
            gather(Transposed<index_t, scalar_t, acc_t>{t_rowptr->const_data_ptr<int32_t>(),
                                                        t_col->const_data_ptr<index_t>(),
                                                        t_perm->const_data_ptr<int32_t>(),
                                                        values.const_data_ptr<scalar_t>(), O, nnz, L});
          });
        } else {
          PYSPARSE_DISPATCH_INDEX(col, "sparse_conv2d_grad_input_cpu", [&] {
            gather(by_channel<index_t, scalar_t, acc_t>(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                                        values.const_data_ptr<scalar_t>(), O, L, bad));
          });
        }
        const auto map = pixel_map(L);
        if (map) dx.zero_();
        pointwise_channels_last<scalar_t>(w, L.C, O, gy.const_data_ptr<scalar_t>(), nullptr,
                                          dx.mutable_data_ptr<scalar_t>(), L.N * L.OH * L.OW, nullptr,
                                          map ? &*map : nullptr);
        return;
      }
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      if (cl) {  // (float32, half, bfloat16)
        std::optional<DepthwiseTaps> taps;
        PYSPARSE_DISPATCH_INDEX(col, "sparse_conv2d_grad_input_cpu", [&] {
          taps = direct_depthwise(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                  values.const_data_ptr<scalar_t>(), O, L);
        });
        if (taps) {
          depthwise_grad_input_channels_last<scalar_t>(*taps, gy.const_data_ptr<scalar_t>(),
                                                       dx.mutable_data_ptr<scalar_t>(), L);
          return;
        }
      } else if (gy.is_contiguous()) {
        bool done = false;
        PYSPARSE_DISPATCH_INDEX(col, "sparse_conv2d_grad_input_cpu", [&] {
          const int32_t* rp = rowptr.const_data_ptr<int32_t>();
          const index_t* cp = col.const_data_ptr<index_t>();
          const scalar_t* vp = values.const_data_ptr<scalar_t>();
          if (const int64_t G = plane_groups(rp, cp, O, L, PlaneOp::grad_input)) {
            grouped_grad_input_nchw<index_t, scalar_t>(rp, cp, vp, O, G, gy.const_data_ptr<scalar_t>(),
                                                       dx.mutable_data_ptr<scalar_t>(), L);
            done = true;
          }
        });
        if (done) return;
      }
    }
    const Interleave GI = padded_output_of(L, O);
    const at::Tensor g = to_layout<scalar_t, acc_t>(gy, GI);
    if (have_transposed) {
      PYSPARSE_DISPATCH_INDEX(*t_col, "sparse_conv2d_grad_input_cpu", [&] {
        const Transposed<index_t, scalar_t, acc_t> t{t_rowptr->const_data_ptr<int32_t>(),
                                                     t_col->const_data_ptr<index_t>(),
                                                     t_perm->const_data_ptr<int32_t>(),
                                                     values.const_data_ptr<scalar_t>(), O, nnz, L};
        conv_grad_input_kernel<scalar_t, acc_t>(t, g.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), cl, L, O,
                                                GI.pitch(), bad);
      });
    } else {
      PYSPARSE_DISPATCH_INDEX(col, "sparse_conv2d_grad_input_cpu", [&] {
        const ByChannel<acc_t> t = by_channel<index_t, scalar_t, acc_t>(
            rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), values.const_data_ptr<scalar_t>(), O, L,
            bad);
        conv_grad_input_kernel<scalar_t, acc_t>(t, g.const_data_ptr<acc_t>(), dx.mutable_data_ptr<scalar_t>(), cl, L, O,
                                                GI.pitch(), bad);
      });
    }
  });
  TORCH_CHECK_VALUE(!bad, op,
                    have_transposed ? ": a row index or t_perm entry of the transposed structure is out of range"
                                    : ": a column index is outside [0, C * kh * kw)");
  return dx;
}

at::Tensor sparse_conv2d_grad_values_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& x,
                                         const at::Tensor& gy, at::IntArrayRef kernel, at::IntArrayRef stride,
                                         at::IntArrayRef dilation, at::IntArrayRef padding) {
  const char* op = "sparse_conv2d_grad_values";
  const auto [OH, OW] = check_sparse_conv2d_grad_values(rowptr, col, x, gy, kernel, stride, dilation, padding);
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": tensors must be on the CPU for the CPU kernel");
  const int64_t O = rowptr.numel() - 1;
  cpu::check_rowptr_cpu(rowptr, col.numel(), op);
  at::Tensor dv = empty_output({col.numel()}, x.options()).zero_();
  if (col.numel() == 0 || gy.numel() == 0) return dv;
  const Layout L(x.size(0), x.size(1), x.size(2), x.size(3), kernel, stride, dilation, padding, OH, OW,
                 col.numel());
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_conv2d_grad_values_cpu", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "sparse_conv2d_grad_values_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      if constexpr (std::is_same_v<acc_t, float>) {
        if (pointwise_channels_last_case(x, kernel, padding) && channels_last(gy)) {
          // entries with a column outside [0, C) get 0 (and the op raises)
          const int64_t nnz = col.numel();
          const PointwiseRows w = pointwise_rows(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                                 static_cast<const scalar_t*>(nullptr), O, L.C, bad);
          std::vector<float> sums(static_cast<size_t>(nnz), 0.f);
          const auto map = pixel_map(L);
          pointwise_grad_values_channels_last<scalar_t>(w, O, L.C, x.const_data_ptr<scalar_t>(),
                                                        gy.const_data_ptr<scalar_t>(), L.N * L.OH * L.OW,
                                                        sums.data(), map ? &*map : nullptr);
          scalar_t* out = dv.mutable_data_ptr<scalar_t>();
          for (int64_t j = 0; j < nnz; ++j) out[j] = w.outside[j] ? scalar_t(0) : static_cast<scalar_t>(sums[j]);
          return;
        }
      }
      if constexpr (std::is_same_v<acc_t, float>) {
        if (channels_last(x) && channels_last(gy)) {  // (float32, half, bfloat16)
          if (const auto taps = direct_depthwise(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                                 static_cast<const scalar_t*>(nullptr), O, L)) {
            depthwise_grad_values_channels_last<index_t, scalar_t>(*taps, rowptr.const_data_ptr<int32_t>(),
                                                                   col.const_data_ptr<index_t>(),
                                                                   x.const_data_ptr<scalar_t>(),
                                                                   gy.const_data_ptr<scalar_t>(),
                                                                   dv.mutable_data_ptr<scalar_t>(), L);
            return;
          }
        } else if (!channels_last(x) && !channels_last(gy) && x.is_contiguous() && gy.is_contiguous()) {
          if (const int64_t G = plane_groups(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(), O, L,
                                             PlaneOp::grad_values)) {
            const PlaneTaps t = plane_taps(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                           static_cast<const scalar_t*>(nullptr), O, L, G);
            grouped_grad_values_nchw<scalar_t>(t, x.const_data_ptr<scalar_t>(), gy.const_data_ptr<scalar_t>(),
                                               dv.mutable_data_ptr<scalar_t>(), L);
            return;
          }
        }
      }
      const at::Tensor xp = to_layout<scalar_t, acc_t>(x, input_of(L));
      const at::Tensor g = to_layout<scalar_t, acc_t>(gy, output_of(L, O));
      conv_grad_values_kernel<index_t, scalar_t, acc_t>(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                                        xp.const_data_ptr<acc_t>(), g.const_data_ptr<acc_t>(),
                                                        dv.mutable_data_ptr<scalar_t>(), L, O, bad);
    });
  });
  TORCH_CHECK_VALUE(!bad, op, ": a column index is outside [0, C * kh * kw)");
  return dv;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("sparse_conv2d", &sparse_conv2d_cpu);
  m.impl("sparse_conv2d_grad_input", &sparse_conv2d_grad_input_cpu);
  m.impl("sparse_conv2d_grad_values", &sparse_conv2d_grad_values_cpu);
}

}  // namespace pysparse
