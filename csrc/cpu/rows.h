// Row partitioning and checks shared by the CPU kernels that walk a CSR matrix row by row (csrc/cpu/spmm.cpp,
// csrc/cpu/conv.cpp): parts of about equal stored count, one per thread, and the rowptr and index checks they
// rely on.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <utility>

namespace pysparse {
namespace cpu {

// Rows [first, last) of part `part` of `parts`, with about the same number of stored values in each part.
inline std::pair<int64_t, int64_t> row_range(const int32_t* rowptr, int64_t rows, int64_t part, int64_t parts) {
  const int64_t nnz = rowptr[rows];
  auto row_at = [&](int64_t p) -> int64_t {
    if (p >= parts) return rows;
    const int64_t target = nnz * p / parts;
    return std::lower_bound(rowptr, rowptr + rows, static_cast<int32_t>(target)) - rowptr;
  };
  return {row_at(part), row_at(part + 1)};
}

// How many row ranges the row-parallel kernels use: one per thread (fewer for tiny matrices).
inline int64_t row_parts(int64_t rows) { return std::min<int64_t>(rows, at::get_num_threads()); }

// Runs f(part, first_row, last_row) on row_parts(rows) ranges of about equal stored count, in parallel; f
// returns true when it met an out-of-range index, which sets `bad`.
template <typename F>
inline void for_row_parts(const int32_t* rowptr, int64_t rows, std::atomic<bool>& bad, F&& f) {
  const int64_t parts = row_parts(rows);
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      const auto [r0, r1] = row_range(rowptr, rows, part, parts);
      if (f(part, r0, r1)) bad = true;
    }
  });
}

// Whether every idx[i], b <= i < e, lies in [0, bound): serial, vectorisable (a pass that also does other work
// per chunk calls it on its chunk).
template <typename index_t>
inline bool chunk_in_range(const index_t* idx, int64_t b, int64_t e, int64_t bound) {
  bool good = true;
  for (int64_t i = b; i < e; ++i)
    good &= static_cast<uint64_t>(static_cast<int64_t>(idx[i])) < static_cast<uint64_t>(bound);
  return good;
}

// Whether every idx[i], i < n, lies in [0, bound): one pass, vectorisable, parallel. The panel kernels read each
// stored position once per panel of the batch; they check the indices here once instead of at every read.
template <typename index_t>
inline bool indices_in_range(const index_t* idx, int64_t n, int64_t bound) {
  std::atomic<bool> all{true};
  at::parallel_for(0, n, int64_t{1} << 16, [&](int64_t b, int64_t e) {
    if (!chunk_in_range(idx, b, e, bound)) all = false;
  });
  return all;
}

// rowptr[0] == 0, non-decreasing, rowptr[rows] == nnz: O(rows), done before any kernel reads through it.
inline void check_rowptr_cpu(const at::Tensor& rowptr, int64_t nnz, const char* op) {
  const int32_t* rp = rowptr.const_data_ptr<int32_t>();
  const int64_t rows = rowptr.numel() - 1;
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[rows] == nnz, op, ": rowptr must start at 0 and end at nnz = ", nnz, ", got ",
                    rp[0], " and ", rp[rows]);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(rp[r] <= rp[r + 1], op, ": rowptr must be non-decreasing (row ", r, ")");
}

}  // namespace cpu
}  // namespace pysparse
