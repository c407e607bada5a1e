// csr_to_dense and csr_gather, CPU: a CSR matrix written out dense, and a dense matrix read at a CSR
// structure's positions (its inverse on those positions, and its gradient). The sparse layers' dense path below
// the speed crossover builds its weight with the first on every forward and takes its values' gradient with the
// second: torch's scatter / gather with flat int64 positions cost ~50 ms for a 4096 x 4096 weight at 20% on a
// 2-core machine (figures in benchmarks/RESULTS.md). Rows are split between threads; each row is zeroed and
// written while it sits in L1. A column index outside [0, n_cols) raises (after the pass).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>

#include "../common.h"
#include "rows.h"

namespace pysparse {
namespace {

// Rows per task: about 64 KB of the dense matrix.
inline int64_t row_grain(int64_t n_cols, int64_t element_size) {
  return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, n_cols * element_size));
}

at::Tensor csr_to_dense_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                            int64_t n_cols) {
  check_csr_to_dense(rowptr, col, values, n_cols);
  TORCH_CHECK_VALUE(values.device().is_cpu(), "csr_to_dense: tensors must be on the CPU for the CPU kernel");
  const int64_t rows = rowptr.numel() - 1;
  cpu::check_rowptr_cpu(rowptr, values.numel(), "csr_to_dense");
  at::Tensor out = empty_output({rows, n_cols}, values.options());
  if (out.numel() == 0) return out;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "csr_to_dense_cpu", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "csr_to_dense_cpu", [&] {
      const int32_t* rp = rowptr.const_data_ptr<int32_t>();
      const index_t* cp = col.const_data_ptr<index_t>();
      const scalar_t* vp = values.const_data_ptr<scalar_t>();
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, rows, row_grain(n_cols, sizeof(scalar_t)), [&](int64_t r0, int64_t r1) {
        bool good = true;
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* row = op + r * n_cols;
          std::memset(static_cast<void*>(row), 0, n_cols * sizeof(scalar_t));  // all-zero bits: +0 in every format
          for (int64_t j = rp[r]; j < rp[r + 1]; ++j) {
            const uint64_t c = static_cast<uint64_t>(static_cast<int64_t>(cp[j]));
            const bool in = c < static_cast<uint64_t>(n_cols);
            good &= in;
            if (in) row[c] = vp[j];
          }
        }
        if (!good) bad = true;
      });
    });
  });
  TORCH_CHECK_VALUE(!bad, "csr_to_dense: a column index is outside [0, ", n_cols, ")");
  return out;
}

at::Tensor csr_gather_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& dense) {
  check_csr_gather(rowptr, col, dense);
  TORCH_CHECK_VALUE(dense.device().is_cpu(), "csr_gather: tensors must be on the CPU for the CPU kernel");
  const int64_t rows = rowptr.numel() - 1, n_cols = dense.size(1), nnz = col.numel();
  cpu::check_rowptr_cpu(rowptr, nnz, "csr_gather");
  at::Tensor out = empty_output({nnz}, dense.options());
  if (nnz == 0) return out;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dense.scalar_type(), "csr_gather_cpu", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "csr_gather_cpu", [&] {
      const int32_t* rp = rowptr.const_data_ptr<int32_t>();
      const index_t* cp = col.const_data_ptr<index_t>();
      const scalar_t* dp = dense.const_data_ptr<scalar_t>();
      const int64_t s0 = dense.stride(0), s1 = dense.stride(1);
      scalar_t* op = out.mutable_data_ptr<scalar_t>();
      cpu::for_row_parts(rp, rows, bad, [&](int64_t, int64_t r0, int64_t r1) {
        bool good = true;
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* row = dp + r * s0;
          for (int64_t j = rp[r]; j < rp[r + 1]; ++j) {
            const uint64_t c = static_cast<uint64_t>(static_cast<int64_t>(cp[j]));
            const bool in = c < static_cast<uint64_t>(n_cols);
            good &= in;
            op[j] = in ? row[static_cast<int64_t>(c) * s1] : scalar_t(0);
          }
        }
        return !good;
      });
    });
  });
  TORCH_CHECK_VALUE(!bad, "csr_gather: a column index is outside [0, ", n_cols, ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("csr_to_dense", &csr_to_dense_cpu);
  m.impl("csr_gather", &csr_gather_cpu);
}

}  // namespace pysparse
