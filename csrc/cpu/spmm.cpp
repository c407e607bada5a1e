// Sparse matmul, CPU: spmm (CSR x dense) and sddmm (its gradient with respect to the stored values).
//
// Layout: activations are transposed, [features, batch], so that every stored weight multiplies a contiguous
// run of the batch (a vectorised AXPY) and every sampled dot product reads two contiguous rows. The batch is
// cut into tiles of kTile so that the tile of xt that a thread sweeps stays in L2; rows are split between
// threads by stored count, not by row count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../common.h"

namespace pysparse {
namespace {

constexpr int64_t kTile = 32;

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

// rowptr[0] == 0, non-decreasing, rowptr[rows] == nnz: O(rows), done before any kernel reads through it.
void check_rowptr_cpu(const at::Tensor& rowptr, int64_t nnz, const char* op) {
  const int32_t* rp = rowptr.const_data_ptr<int32_t>();
  const int64_t rows = rowptr.numel() - 1;
  TORCH_CHECK_VALUE(rp[0] == 0 && rp[rows] == nnz, op, ": rowptr must start at 0 and end at nnz = ", nnz,
                    ", got ", rp[0], " and ", rp[rows]);
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(rp[r] <= rp[r + 1], op, ": rowptr must be non-decreasing (row ", r, ")");
}

template <typename index_t, typename scalar_t>
void spmm_kernel(const int32_t* rowptr, const index_t* col, const scalar_t* values, const scalar_t* xt,
                 const scalar_t* bias, scalar_t* yt, int64_t rows, int64_t K, int64_t B, std::atomic<bool>& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t parts = std::min<int64_t>(rows, at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      const auto [r0, r1] = row_range(rowptr, rows, part, parts);
      bool local_bad = false;
      for (int64_t b0 = 0; b0 < B; b0 += kTile) {
        const int64_t bt = std::min(kTile, B - b0);
        for (int64_t r = r0; r < r1; ++r) {
          acc_t acc[kTile];
          const acc_t init = bias ? static_cast<acc_t>(bias[r]) : acc_t(0);
          for (int64_t b = 0; b < kTile; ++b) acc[b] = init;
          for (int64_t j = rowptr[r]; j < rowptr[r + 1]; ++j) {
            const int64_t c = col[j];
            if (c < 0 || c >= K) {
              local_bad = true;
              continue;
            }
            const acc_t v = static_cast<acc_t>(values[j]);
            const scalar_t* x = xt + c * B + b0;
            if (bt == kTile) {
#pragma omp simd
              for (int64_t b = 0; b < kTile; ++b) acc[b] += v * static_cast<acc_t>(x[b]);
            } else {
              for (int64_t b = 0; b < bt; ++b) acc[b] += v * static_cast<acc_t>(x[b]);
            }
          }
          scalar_t* y = yt + r * B + b0;
          for (int64_t b = 0; b < bt; ++b) y[b] = static_cast<scalar_t>(acc[b]);
        }
      }
      if (local_bad) bad = true;
    }
  });
}

// One output row at a time for B == 1 (a sparse matrix-vector product): the tile loop would waste its lanes.
template <typename index_t, typename scalar_t>
void spmv_kernel(const int32_t* rowptr, const index_t* col, const scalar_t* values, const scalar_t* x,
                 const scalar_t* bias, scalar_t* y, int64_t rows, int64_t K, std::atomic<bool>& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t parts = std::min<int64_t>(rows, at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      const auto [r0, r1] = row_range(rowptr, rows, part, parts);
      bool local_bad = false;
      for (int64_t r = r0; r < r1; ++r) {
        acc_t acc = bias ? static_cast<acc_t>(bias[r]) : acc_t(0);
        for (int64_t j = rowptr[r]; j < rowptr[r + 1]; ++j) {
          const int64_t c = col[j];
          if (c < 0 || c >= K) {
            local_bad = true;
            continue;
          }
          acc += static_cast<acc_t>(values[j]) * static_cast<acc_t>(x[c]);
        }
        y[r] = static_cast<scalar_t>(acc);
      }
      if (local_bad) bad = true;
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

#define PYSPARSE_DISPATCH_INDEX(col, NAME, ...)                         \
  [&] {                                                                 \
    if ((col).scalar_type() == at::kShort) {                            \
      using index_t = int16_t;                                          \
      __VA_ARGS__();                                                    \
    } else {                                                            \
      using index_t = int32_t;                                          \
      __VA_ARGS__();                                                    \
    }                                                                   \
  }()

at::Tensor spmm_cpu(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& xt,
                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&) {
  check_csr(rowptr, col, values, "spmm");
  check_dense(xt, values, "spmm", "xt");
  TORCH_CHECK_VALUE(values.device().is_cpu(), "spmm: tensors must be on the CPU for the CPU kernel");
  const int64_t rows = rowptr.numel() - 1, K = xt.size(0), B = xt.size(1);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == rows, "spmm: bias must have ", rows, " entries, got ",
                      bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "spmm: bias dtype ", bias->scalar_type(),
                     " differs from values dtype ", values.scalar_type());
    TORCH_CHECK_VALUE(bias->device() == values.device(), "spmm: bias is on another device than values");
  }
  check_rowptr_cpu(rowptr, values.numel(), "spmm");
  const at::Tensor x = xt.contiguous();
  const at::Tensor bs = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor yt = at::empty({rows, B}, x.options());
  if (rows == 0 || B == 0) return yt;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "spmm_cpu", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "spmm_cpu", [&] {
      const scalar_t* bp = bs.defined() ? bs.const_data_ptr<scalar_t>() : nullptr;
      if (B == 1) {
        spmv_kernel<index_t, scalar_t>(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                       values.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), bp,
                                       yt.mutable_data_ptr<scalar_t>(), rows, K, bad);
      } else {
        spmm_kernel<index_t, scalar_t>(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                       values.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), bp,
                                       yt.mutable_data_ptr<scalar_t>(), rows, K, B, bad);
      }
    });
  });
  TORCH_CHECK_VALUE(!bad, "spmm: a column index is outside [0, ", K, ")");
  return yt;
}

template <typename index_t, typename scalar_t>
void sddmm_kernel(const int32_t* rowptr, const index_t* col, const scalar_t* a, const scalar_t* b, scalar_t* out,
                  int64_t rows, int64_t K, int64_t B, std::atomic<bool>& bad) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t parts = std::min<int64_t>(rows, at::get_num_threads());
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t part = pb; part < pe; ++part) {
      const auto [r0, r1] = row_range(rowptr, rows, part, parts);
      bool local_bad = false;
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* ar = a + r * B;
        for (int64_t j = rowptr[r]; j < rowptr[r + 1]; ++j) {
          const int64_t c = col[j];
          if (c < 0 || c >= K) {
            local_bad = true;
            out[j] = scalar_t(0);
            continue;
          }
          const scalar_t* bc = b + c * B;
          acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < B; ++i) acc += static_cast<acc_t>(ar[i]) * static_cast<acc_t>(bc[i]);
          out[j] = static_cast<scalar_t>(acc);
        }
      }
      if (local_bad) bad = true;
    }
  });
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
  TORCH_CHECK_VALUE(b.size(1) == B, "sddmm: a and b must have the same number of columns, got ", B, " and ",
                    b.size(1));
  check_rowptr_cpu(rowptr, col.numel(), "sddmm");
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  at::Tensor out = at::empty({col.numel()}, a.options());
  if (col.numel() == 0) return out;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "sddmm_cpu", [&] {
    PYSPARSE_DISPATCH_INDEX(col, "sddmm_cpu", [&] {
      sddmm_kernel<index_t, scalar_t>(rowptr.const_data_ptr<int32_t>(), col.const_data_ptr<index_t>(),
                                      ac.const_data_ptr<scalar_t>(), bc.const_data_ptr<scalar_t>(),
                                      out.mutable_data_ptr<scalar_t>(), rows, K, B, bad);
    });
  });
  TORCH_CHECK_VALUE(!bad, "sddmm: a column index is outside [0, ", K, ")");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CPU, m) {
  m.impl("spmm", &spmm_cpu);
  m.impl("sddmm", &sddmm_cpu);
}

}  // namespace pysparse
