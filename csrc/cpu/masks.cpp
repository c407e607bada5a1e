// Mask selection, CPU: sparsity_masks (global radix select over a list of score tensors, no concatenated
// copy), threshold_masks and nm_masks.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../common.h"

namespace pysparse {
namespace {

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per work item
constexpr int64_t kBins = int64_t{1} << 16;   // 16-bit radix digits: two passes resolve a 32-bit key
// Up to this many scores, one nth_element on (key, position) pairs is cheaper than the histograms' fixed cost.
constexpr int64_t kSmallTotal = int64_t{1} << 15;

struct Source {
  const void* data;
  at::ScalarType dtype;
  bool* mask;
};

// The score list, made contiguous, with a bool output mask per tensor and the chunk table over all of them.
struct Prepared {
  std::vector<at::Tensor> contig;
  std::vector<at::Tensor> masks;
  std::vector<Source> sources;
  std::vector<Chunk> chunks;
  int64_t total = 0;
};

Prepared prepare(at::TensorList scores, const char* op) {
  check_scores(scores, op);
  TORCH_CHECK_VALUE(scores[0].device().is_cpu(), op, ": scores must be on the CPU for the CPU kernel");
  Prepared p;
  std::vector<int64_t> numels;
  for (const at::Tensor& s : scores) {
    p.contig.push_back(s.contiguous());
    p.masks.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool)));
    p.sources.push_back({p.contig.back().const_data_ptr(), s.scalar_type(), p.masks.back().mutable_data_ptr<bool>()});
    numels.push_back(s.numel());
    p.total += s.numel();
  }
  p.chunks = make_chunks(numels, kChunk);
  return p;
}

// Calls f(i, value) for i in [begin, end) of one source, reading its dtype as float.
template <typename F>
inline void for_each_value(const Source& s, int64_t begin, int64_t end, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.dtype, "pysparse_for_each_value", [&] {
    const scalar_t* p = static_cast<const scalar_t*>(s.data);
    for (int64_t i = begin; i < end; ++i) f(i, static_cast<float>(p[i]));
  });
}

void raise_if_nan(const Prepared& p, const std::vector<uint8_t>& nan_chunks, const char* op) {
  for (size_t c = 0; c < nan_chunks.size(); ++c)
    TORCH_CHECK_VALUE(!nan_chunks[c], op, ": scores[", p.chunks[c].tensor, "] contains NaN");
}

// Histogram of the 16-bit digit (key >> shift) & 0xFFFF over every element whose key matches `prefix` under
// `prefix_mask`. With nan_chunks, also flags the chunks holding a NaN.
void histogram_pass(const Prepared& p, int shift, uint32_t prefix_mask, uint32_t prefix, std::vector<int64_t>& hist,
                    std::vector<uint8_t>* nan_chunks) {
  const int64_t threads = at::get_num_threads();
  std::vector<int64_t> local(static_cast<size_t>(threads * kBins), 0);
  at::parallel_for(0, static_cast<int64_t>(p.chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    int64_t* h = local.data() + at::get_thread_num() * kBins;
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = p.chunks[c];
      bool nan = false;
      for_each_value(p.sources[ch.tensor], ch.begin, ch.end, [&](int64_t, float v) {
        if (v != v) {
          nan = true;
          return;
        }
        const uint32_t k = float_key(v);
        if ((k & prefix_mask) == prefix) ++h[(k >> shift) & 0xFFFFu];
      });
      if (nan && nan_chunks) (*nan_chunks)[c] = 1;
    }
  });
  hist.assign(kBins, 0);
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t b = 0; b < kBins; ++b) hist[b] += local[t * kBins + b];
}

// Writes the keep-masks of a selection: keep key > t, and of key == t all but the first `need` in global order.
void write_selection(const Prepared& p, const Selection& sel) {
  const uint32_t t = sel.threshold_key;
  const int64_t nchunks = static_cast<int64_t>(p.chunks.size());
  if (sel.need == sel.count_equal) {
    at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = p.chunks[c];
        bool* mask = p.sources[ch.tensor].mask;
        for_each_value(p.sources[ch.tensor], ch.begin, ch.end,
                       [&](int64_t i, float v) { mask[i] = float_key(v) > t; });
      }
    });
    return;
  }
  // Ties split: count the keys equal to t per chunk, scan, then rank them in order inside each chunk.
  std::vector<int64_t> equal_before(static_cast<size_t>(nchunks) + 1, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = p.chunks[c];
      int64_t count = 0;
      for_each_value(p.sources[ch.tensor], ch.begin, ch.end, [&](int64_t, float v) { count += float_key(v) == t; });
      equal_before[c + 1] = count;
    }
  });
  for (int64_t c = 0; c < nchunks; ++c) equal_before[c + 1] += equal_before[c];
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = p.chunks[c];
      bool* mask = p.sources[ch.tensor].mask;
      int64_t rank = equal_before[c];
      for_each_value(p.sources[ch.tensor], ch.begin, ch.end, [&](int64_t i, float v) {
        const uint32_t k = float_key(v);
        if (k == t) {
          mask[i] = rank >= sel.need;
          ++rank;
        } else {
          mask[i] = k > t;
        }
      });
    }
  });
}

// Small inputs: each score becomes (key << 32 | global position), a total order that is exactly the ranking
// rule; nth_element finds the last pruned item and everything above it is kept.
void select_small(const Prepared& p, int64_t num_prune) {
  std::vector<uint64_t> items;
  items.reserve(static_cast<size_t>(p.total));
  auto item = [](float v, int64_t position) {
    return (static_cast<uint64_t>(float_key(v)) << 32) | static_cast<uint64_t>(position);
  };
  int64_t offset = 0;
  for (size_t t = 0; t < p.sources.size(); ++t) {
    bool nan = false;
    for_each_value(p.sources[t], 0, p.contig[t].numel(), [&](int64_t i, float v) {
      nan |= v != v;
      items.push_back(item(v, offset + i));
    });
    TORCH_CHECK_VALUE(!nan, "sparsity_masks: scores[", t, "] contains NaN");
    offset += p.contig[t].numel();
  }
  if (num_prune == 0) {
    for (const at::Tensor& m : p.masks) m.fill_(true);
    return;
  }
  std::nth_element(items.begin(), items.begin() + (num_prune - 1), items.end());
  const uint64_t last_pruned = items[num_prune - 1];
  offset = 0;
  for (size_t t = 0; t < p.sources.size(); ++t) {
    bool* mask = p.sources[t].mask;
    for_each_value(p.sources[t], 0, p.contig[t].numel(),
                   [&](int64_t i, float v) { mask[i] = item(v, offset + i) > last_pruned; });
    offset += p.contig[t].numel();
  }
}

std::vector<at::Tensor> sparsity_masks_cpu(at::TensorList scores, int64_t num_prune) {
  Prepared p = prepare(scores, "sparsity_masks");
  TORCH_CHECK_VALUE(num_prune >= 0 && num_prune <= p.total, "sparsity_masks: num_prune must be in [0, ", p.total,
                    "] (the number of scores), got ", num_prune);
  if (p.total <= kSmallTotal) {
    select_small(p, num_prune);
    return p.masks;
  }
  std::vector<int64_t> hist;
  std::vector<uint8_t> nan_chunks(p.chunks.size(), 0);
  histogram_pass(p, 16, 0u, 0u, hist, &nan_chunks);
  raise_if_nan(p, nan_chunks, "sparsity_masks");
  if (num_prune == 0 || num_prune == p.total) {
    for (at::Tensor& m : p.masks) m.fill_(num_prune == 0);
    return p.masks;
  }
  // The last pruned element has rank num_prune - 1 in (key, position) order; find its key digit by digit.
  const int64_t rank = num_prune - 1;
  const BinRank hi = find_rank_bin(hist.data(), kBins, rank);
  const uint32_t hi_prefix = static_cast<uint32_t>(hi.bin) << 16;
  histogram_pass(p, 0, 0xFFFF0000u, hi_prefix, hist, nullptr);
  const BinRank lo = find_rank_bin(hist.data(), kBins, rank - hi.below);
  const Selection sel{hi_prefix | static_cast<uint32_t>(lo.bin), num_prune - hi.below - lo.below, hist[lo.bin]};
  write_selection(p, sel);
  return p.masks;
}

std::vector<at::Tensor> threshold_masks_cpu(at::TensorList scores, double threshold) {
  Prepared p = prepare(scores, "threshold_masks");
  TORCH_CHECK_VALUE(threshold == threshold, "threshold_masks: threshold is NaN");
  const float t = static_cast<float>(threshold);
  std::vector<uint8_t> nan_chunks(p.chunks.size(), 0);
  at::parallel_for(0, static_cast<int64_t>(p.chunks.size()), 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = p.chunks[c];
      bool* mask = p.sources[ch.tensor].mask;
      bool nan = false;
      for_each_value(p.sources[ch.tensor], ch.begin, ch.end, [&](int64_t i, float v) {
        nan |= v != v;
        mask[i] = v >= t;
      });
      if (nan) nan_chunks[c] = 1;
    }
  });
  raise_if_nan(p, nan_chunks, "threshold_masks");
  return p.masks;
}

template <typename scalar_t>
void nm_kernel(const scalar_t* s, bool* keep, int64_t outer, int64_t d1, int64_t inner, int64_t n, int64_t m,
               bool* saw_nan) {
  const int64_t groups_per_row = d1 / m;
  const int64_t ngroups = outer * groups_per_row * inner;
  std::atomic<bool> nan_found{false};
  at::parallel_for(0, ngroups, 1024, [&](int64_t gb, int64_t ge) {
    uint32_t keys[128];
    for (int64_t gi = gb; gi < ge; ++gi) {
      const int64_t r = gi % inner;
      const int64_t g = (gi / inner) % groups_per_row;
      const int64_t o = gi / (inner * groups_per_row);
      const int64_t base = (o * d1 + g * m) * inner + r;
      bool nan = false;
      for (int64_t j = 0; j < m; ++j) {
        const float v = static_cast<float>(s[base + j * inner]);
        nan |= v != v;
        keys[j] = float_key(v);
      }
      if (nan) nan_found = true;
      for (int64_t j = 0; j < m; ++j) {
        int64_t rank = 0;  // elements that beat j: larger, or equal and earlier
        for (int64_t q = 0; q < m; ++q) rank += (keys[q] > keys[j]) || (keys[q] == keys[j] && q < j);
        keep[base + j * inner] = rank < n;
      }
    }
  });
  *saw_nan = nan_found;
}

at::Tensor nm_masks_cpu(const at::Tensor& score, int64_t n, int64_t m) {
  const int64_t inner = check_nm_args(score, n, m);
  TORCH_CHECK_VALUE(score.device().is_cpu(), "nm_masks: score must be on the CPU for the CPU kernel");
  const at::Tensor s = score.contiguous();
  at::Tensor keep = at::empty(s.sizes(), s.options().dtype(at::kBool));
  if (s.numel() == 0) return keep;
  bool saw_nan = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "nm_masks_cpu", [&] {
    nm_kernel<scalar_t>(s.const_data_ptr<scalar_t>(), keep.mutable_data_ptr<bool>(), s.size(0), s.size(1), inner, n,
                        m, &saw_nan);
  });
  TORCH_CHECK_VALUE(!saw_nan, "nm_masks: score contains NaN");
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("sparsity_masks", &sparsity_masks_cpu);
  m.impl("threshold_masks", &threshold_masks_cpu);
  m.impl("nm_masks", &nm_masks_cpu);
}

}  // namespace pysparse
