// Shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels: argument checks, the order-preserving float
// key used by every selection kernel, and the chunk table that splits a list of tensors into work items.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include "cpu/out_cache.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#ifdef __CUDACC__
#define PYSPARSE_HD __host__ __device__ __forceinline__
#else
#define PYSPARSE_HD inline
#endif

namespace pysparse {

// ---------------------------------------------------------------------------------------------------------
// Float keys: an order-preserving map from float to uint32 (a < b  <=>  key(a) < key(b)), with -0.0 and +0.0
// mapped to the same key so that they tie, as they do under float comparison. NaN has no place in the order;
// callers detect it before asking for a key.
// ---------------------------------------------------------------------------------------------------------
PYSPARSE_HD uint32_t float_key(float x) {
#ifdef __CUDA_ARCH__
  uint32_t bits = __float_as_uint(x);
#else
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
#endif
  if (bits == 0x80000000u) bits = 0u;  // -0.0 ties with +0.0
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// ---------------------------------------------------------------------------------------------------------
// Saliency methods.
// ---------------------------------------------------------------------------------------------------------
enum class Method : int { Magnitude = 0, Gradient = 1, Taylor = 2, Hessian = 3 };

inline Method parse_method(std::string_view name) {
  if (name == "magnitude") return Method::Magnitude;
  if (name == "gradient") return Method::Gradient;
  if (name == "taylor") return Method::Taylor;
  if (name == "hessian") return Method::Hessian;
  TORCH_CHECK_VALUE(false, "saliency: method must be one of 'magnitude', 'gradient', 'taylor', 'hessian', got '",
                    std::string(name), "'");
  return Method::Magnitude;  // unreachable
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// Validates the inputs of saliency(weight, method, grad, hessian) and returns the method. The optional tensor
// that the method needs must be present, of weight's shape, dtype and device.
inline Method check_saliency_args(const at::Tensor& weight, std::string_view method_name,
                                  const std::optional<at::Tensor>& grad,
                                  const std::optional<at::Tensor>& hessian) {
  const Method method = parse_method(method_name);
  check_float_tensor(weight, "saliency", "weight");
  auto check_companion = [&](const std::optional<at::Tensor>& t, const char* name) {
    TORCH_CHECK_VALUE(t.has_value() && t->defined(), "saliency: method '", std::string(method_name),
                      "' needs ", name);
    check_float_tensor(*t, "saliency", name);
    TORCH_CHECK_VALUE(t->sizes() == weight.sizes(), "saliency: ", name, " has shape ", t->sizes(),
                      " but weight has shape ", weight.sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == weight.scalar_type(), "saliency: ", name, " has dtype ",
                     t->scalar_type(), " but weight has dtype ", weight.scalar_type());
    TORCH_CHECK_VALUE(t->device() == weight.device(), "saliency: ", name, " is on ", t->device(),
                      " but weight is on ", weight.device());
  };
  if (method == Method::Gradient || method == Method::Taylor) check_companion(grad, "grad");
  if (method == Method::Hessian) check_companion(hessian, "hessian");
  return method;
}

// Validates a non-empty list of score tensors on one device, all float32/float16/bfloat16.
inline void check_scores(at::TensorList scores, const char* op) {
  TORCH_CHECK_VALUE(!scores.empty(), op, ": scores must be a non-empty list of tensors");
  for (size_t i = 0; i < scores.size(); ++i) {
    const std::string name = "scores[" + std::to_string(i) + "]";
    check_float_tensor(scores[i], op, name.c_str());
    TORCH_CHECK_VALUE(scores[i].device() == scores[0].device(), op, ": ", name, " is on ", scores[i].device(),
                      " but scores[0] is on ", scores[0].device());
  }
}

// Validates nm_masks(score, n, m) and returns the number of elements between two neighbours of a group
// (the product of the sizes after dim 1).
inline int64_t check_nm_args(const at::Tensor& score, int64_t n, int64_t m) {
  check_float_tensor(score, "nm_masks", "score");
  TORCH_CHECK_VALUE(score.dim() >= 2, "nm_masks: score must have at least 2 dimensions (out, in, ...), got ",
                    score.dim());
  TORCH_CHECK_VALUE(m >= 1 && m <= 128, "nm_masks: m must be in [1, 128], got ", m);
  TORCH_CHECK_VALUE(n >= 1 && n <= m, "nm_masks: n must be in [1, m] = [1, ", m, "], got ", n);
  TORCH_CHECK_VALUE(score.size(1) % m == 0, "nm_masks: the input dimension (dim 1, size ", score.size(1),
                    ") must be divisible by m = ", m);
  int64_t inner = 1;
  for (int64_t d = 2; d < score.dim(); ++d) inner *= score.size(d);
  return inner;
}

// Validates apply_mask_(mask, tensors): a bool mask and tensors of its shape on its device.
inline void check_apply_mask_args(const at::Tensor& mask, at::TensorList tensors) {
  TORCH_CHECK_VALUE(mask.defined(), "apply_mask_: mask is undefined");
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool, "apply_mask_: mask must be a bool tensor, got ",
                   mask.scalar_type());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_VALUE(t.defined(), "apply_mask_: tensors[", i, "] is undefined");
    TORCH_CHECK_VALUE(t.sizes() == mask.sizes(), "apply_mask_: tensors[", i, "] has shape ", t.sizes(),
                      " but mask has shape ", mask.sizes());
    TORCH_CHECK_VALUE(t.device() == mask.device(), "apply_mask_: tensors[", i, "] is on ", t.device(),
                      " but mask is on ", mask.device());
    const size_t es = t.element_size();
    TORCH_CHECK_TYPE(es == 1 || es == 2 || es == 4 || es == 8, "apply_mask_: tensors[", i,
                     "] has unsupported dtype ", t.scalar_type());
    TORCH_CHECK_TYPE(!t.is_complex(), "apply_mask_: tensors[", i, "] is complex, which is not supported");
    // Several elements at one address (an expanded view) would each be masked by a different mask element; two
    // tensors (or one and the mask) partly over the same memory, zeroed by different threads, race. One tensor
    // given twice, or as its own mask, is the same pass twice and stays allowed.
    TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, "apply_mask_: tensors[", i,
                      "] has elements that share memory (an expanded view?): clone() it first");
    TORCH_CHECK_VALUE(at::get_overlap_status(mask, t) != at::MemOverlapStatus::Partial, "apply_mask_: tensors[", i,
                      "] partly overlaps the mask's memory");
    for (size_t k = 0; k < i; ++k)
      TORCH_CHECK_VALUE(at::get_overlap_status(tensors[k], t) != at::MemOverlapStatus::Partial, "apply_mask_: tensors[",
                        k, "] and tensors[", i, "] partly share memory");
  }
}

// ---------------------------------------------------------------------------------------------------------
// Chunk table: a list of tensors is cut into work items of at most `chunk` elements, each inside one tensor,
// in global order (tensor 0 first, row-major inside a tensor). Work item order is global position order,
// which is what the deterministic tie-break of the selection kernels relies on.
// ---------------------------------------------------------------------------------------------------------
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels, int64_t chunk) {
  std::vector<Chunk> out;
  for (size_t t = 0; t < numels.size(); ++t)
    for (int64_t b = 0; b < numels[t]; b += chunk)
      out.push_back({static_cast<int64_t>(t), b, std::min(b + chunk, numels[t])});
  return out;
}

// Radix select helper: the bin holding the element of 0-based `rank` in a histogram, and how many elements
// lie in the bins below it.
struct BinRank {
  int64_t bin;
  int64_t below;
};

inline BinRank find_rank_bin(const int64_t* hist, int64_t bins, int64_t rank) {
  int64_t below = 0;
  for (int64_t b = 0; b < bins; ++b) {
    if (rank < below + hist[b]) return {b, below};
    below += hist[b];
  }
  TORCH_CHECK(false, "pysparse internal error: rank ", rank, " outside histogram of ", below, " elements");
  return {0, 0};
}

// Where a sparsity selection ends: prune every key < threshold_key, and of the keys == threshold_key the
// first `need` in global order (need == count_equal means all of them).
struct Selection {
  uint32_t threshold_key;
  int64_t need;
  int64_t count_equal;
};

// Runs the lambda with index_t = int16_t or int32_t, the dtype of a CSR column-index tensor.
#define PYSPARSE_DISPATCH_INDEX(col, NAME, ...) \
  [&] {                                         \
    if ((col).scalar_type() == at::kShort) {    \
      using index_t = int16_t;                  \
      __VA_ARGS__();                            \
    } else {                                    \
      using index_t = int32_t;                  \
      __VA_ARGS__();                            \
    }                                           \
  }()

// ---------------------------------------------------------------------------------------------------------
// Compressed sparse rows (CSR): rowptr int32 [rows + 1], col int16 or int32 [nnz], values [nnz]. Everything
// that can be checked without reading all indices is checked here; the kernels check each column index as
// they read it.
// ---------------------------------------------------------------------------------------------------------
inline void check_csr_structure(const at::Tensor& rowptr, const at::Tensor& col, const char* op) {
  TORCH_CHECK_VALUE(rowptr.defined() && col.defined(), op, ": undefined CSR tensor");
  TORCH_CHECK_TYPE(rowptr.scalar_type() == at::kInt, op, ": rowptr must be int32, got ", rowptr.scalar_type());
  TORCH_CHECK_TYPE(col.scalar_type() == at::kShort || col.scalar_type() == at::kInt, op,
                   ": col must be int16 or int32, got ", col.scalar_type());
  TORCH_CHECK_VALUE(rowptr.dim() == 1 && rowptr.numel() >= 1, op, ": rowptr must be 1-D with rows + 1 entries");
  TORCH_CHECK_VALUE(col.dim() == 1, op, ": col must be 1-D");
  TORCH_CHECK_VALUE(rowptr.is_contiguous() && col.is_contiguous(), op, ": rowptr and col must be contiguous");
  TORCH_CHECK_VALUE(col.numel() < (int64_t{1} << 31), op, ": more than 2^31 - 1 stored values");
  TORCH_CHECK_VALUE(rowptr.device() == col.device(), op, ": rowptr and col must be on one device");
}

// The dtypes of the matmul family: the three float formats, plus float64 for gradcheck.
inline bool is_matmul_float(at::ScalarType t) { return is_supported_float(t) || t == at::kDouble; }

inline void check_csr(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const char* op) {
  check_csr_structure(rowptr, col, op);
  TORCH_CHECK_VALUE(values.defined() && values.dim() == 1 && values.numel() == col.numel(), op,
                    ": values must be 1-D with one entry per column index (", col.numel(), ")");
  TORCH_CHECK_TYPE(is_matmul_float(values.scalar_type()), op,
                   ": values must be float32, float16, bfloat16 or float64, got ", values.scalar_type());
  TORCH_CHECK_VALUE(values.is_contiguous(), op, ": values must be contiguous");
  TORCH_CHECK_VALUE(values.device() == col.device(), op, ": values and the structure must be on one device");
}

// csr_to_dense's arguments: a CSR matrix of n_cols >= 0 columns.
inline void check_csr_to_dense(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                               int64_t n_cols) {
  check_csr(rowptr, col, values, "csr_to_dense");
  TORCH_CHECK_VALUE(n_cols >= 0, "csr_to_dense: n_cols must be >= 0, got ", n_cols);
}

// csr_gather's arguments: a CSR structure and a dense [rows, n_cols] matrix (any strides) on its device.
inline void check_csr_gather(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& dense) {
  check_csr_structure(rowptr, col, "csr_gather");
  TORCH_CHECK_VALUE(dense.defined() && dense.dim() == 2, "csr_gather: dense must be a 2-D tensor");
  TORCH_CHECK_TYPE(is_matmul_float(dense.scalar_type()),
                   "csr_gather: dense must be float32, float16, bfloat16 or float64, got ", dense.scalar_type());
  TORCH_CHECK_VALUE(dense.size(0) == rowptr.numel() - 1, "csr_gather: dense has ", dense.size(0),
                    " rows but the structure has ", rowptr.numel() - 1);
  TORCH_CHECK_VALUE(dense.device() == col.device(), "csr_gather: dense and the structure must be on one device");
}

// Whether W's transposed structure (t_rowptr, t_col, t_perm) is given, all three parts.
inline bool has_transposed(const std::optional<at::Tensor>& t_rowptr, const std::optional<at::Tensor>& t_col,
                           const std::optional<at::Tensor>& t_perm) {
  return t_rowptr.has_value() && t_rowptr->defined() && t_col.has_value() && t_col->defined() && t_perm.has_value() &&
         t_perm->defined();
}

// An uninitialised tensor for an op's output: on the CPU from the output cache (csrc/cpu/out_cache.h: no page
// faults on every call for multi-MB outputs), else at::empty.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return options.device().is_cpu() ? cpu::cached_empty(sizes, options) : at::empty(sizes, options);
}

// Whether a 4-d tensor is channels-last (and not also contiguous): the convolution ops read it in place and
// give their output in that format too, as nn.Conv2d does (the fakes in pysparse/ops.py follow the same rule).
inline bool channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// An uninitialised [N, C, H, W] output, channels-last when cl.
inline at::Tensor empty_output_4d(at::IntArrayRef sizes, const at::TensorOptions& options, bool cl) {
  if (!cl) return empty_output(sizes, options);
  return empty_output({sizes[0], sizes[2], sizes[3], sizes[1]}, options).permute({0, 3, 1, 2});
}

// A [K, B] tensor for the gradient of the input xt [K, B]: in xt's layout when xt is batch-major (stride 1 along
// K: the transposed view of a [B, K] batch, what the layers pass), so that autograd hands the [B, K] gradient
// on without a transposing copy; else contiguous. The rule of spmm_grad on every device (CUDA's kernels write
// it contiguous, then transpose it into xt's layout) and of the fake kernel in pysparse/ops.py.
inline bool batch_major(const at::Tensor& xt) { return xt.stride(0) == 1 && xt.stride(1) != 1; }
inline at::Tensor empty_input_grad(const at::Tensor& xt) {
  if (batch_major(xt)) return empty_output({xt.size(1), xt.size(0)}, xt.options()).t();
  return empty_output({xt.size(0), xt.size(1)}, xt.options());
}

// Validates W's transposed structure for a W of n_cols columns: the CSR of W^T (t_rowptr over the n_cols
// columns, t_col the row indices) beside values, and t_perm a contiguous int32 map from its positions to W's
// stored values, one entry per value on values' device (the kernels check each entry's range as they read it).
// With `blocked` (the CPU's spmm_t and spmm_grad), W^T may also be blocked by W's rows (csr.structure's
// row_block): t_rowptr then has nb * n_cols + 1 entries, nb >= 1 blocks of n_cols columns each. Returns nb.
inline int64_t check_transposed(const at::Tensor& values, const at::Tensor& t_rowptr, const at::Tensor& t_col,
                                const at::Tensor& t_perm, int64_t n_cols, const char* op, bool blocked = false) {
  const std::string where = std::string(op) + " (transposed structure)";
  check_csr(t_rowptr, t_col, values, where.c_str());
  const int64_t t_rows = t_rowptr.numel() - 1;
  const bool whole = n_cols > 0 && t_rows % n_cols == 0 && t_rows >= n_cols;
  TORCH_CHECK_VALUE(t_rows == n_cols || (blocked && whole), op, ": t_rowptr has ", t_rows, " rows but W has ",
                    n_cols, " columns",
                    whole ? " (a transposed structure blocked by W's rows is taken only by the CPU's spmm_t and "
                            "spmm_grad: build it with row_block=None)"
                          : "");
  TORCH_CHECK_TYPE(t_perm.scalar_type() == at::kInt && t_perm.dim() == 1 && t_perm.numel() == values.numel() &&
                       t_perm.is_contiguous() && t_perm.device() == values.device(),
                   op, ": t_perm must be a contiguous int32 permutation of the stored values, on values' device");
  return n_cols > 0 ? t_rows / n_cols : 1;
}

// Checks a convolution's kernel_size, stride and dilation (2 entries each, all >= 1) and padding (2 entries,
// >= 0: zeros on both sides of each spatial dim) and returns the output size of an input of spatial size h x w,
// which padded must cover the kernel's reach.
inline std::pair<int64_t, int64_t> conv_output_size(int64_t h, int64_t w, at::IntArrayRef kernel,
                                                    at::IntArrayRef stride, at::IntArrayRef dilation,
                                                    at::IntArrayRef padding, const char* op) {
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2 && dilation.size() == 2 && padding.size() == 2, op,
                    ": kernel_size, stride, dilation and padding must have 2 entries");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(kernel[i] >= 1 && stride[i] >= 1 && dilation[i] >= 1, op,
                      ": kernel_size, stride and dilation must be >= 1");
    TORCH_CHECK_VALUE(kernel[i] <= INT32_MAX && stride[i] <= INT32_MAX && dilation[i] <= INT32_MAX, op,
                      ": kernel_size, stride and dilation must be below 2^31");
    TORCH_CHECK_VALUE(padding[i] >= 0, op, ": padding must be >= 0, got ", padding);
    // (sizes below 2^31 each keep every product of the kernels' index arithmetic within int64)
    TORCH_CHECK_VALUE(padding[i] <= INT32_MAX && (i == 0 ? h : w) + 2 * padding[i] <= INT32_MAX, op,
                      ": the padded input must be below 2^31 in each spatial dim, got ", h, "x", w, " padded by ",
                      padding);
  }
  const int64_t reach_h = dilation[0] * (kernel[0] - 1) + 1, reach_w = dilation[1] * (kernel[1] - 1) + 1;
  const int64_t ph = h + 2 * padding[0], pw = w + 2 * padding[1];
  TORCH_CHECK_VALUE(ph >= reach_h && pw >= reach_w, op, ": input of spatial size ", h, "x", w, " (", ph, "x", pw,
                    " padded) is smaller than the kernel's reach");
  return {(ph - reach_h) / stride[0] + 1, (pw - reach_w) / stride[1] + 1};
}

// Validates the gradient gy [N, O, OH, OW] of a sparse convolution of an input of size x_size [N, C, H, W]:
// gy's dtype and device are those of `like` (named like_name), its shape is the convolution's output shape.
// Returns (OH, OW).
inline std::pair<int64_t, int64_t> check_conv_grad(const at::Tensor& gy, const at::Tensor& like,
                                                   const char* like_name, int64_t rows, at::IntArrayRef x_size,
                                                   at::IntArrayRef kernel, at::IntArrayRef stride,
                                                   at::IntArrayRef dilation, at::IntArrayRef padding,
                                                   const char* op) {
  TORCH_CHECK_VALUE(x_size.size() == 4 && x_size[0] >= 0 && x_size[1] >= 0, op,
                    ": the input size must be [N, C, H, W], got ", x_size);
  const auto [oh, ow] = conv_output_size(x_size[2], x_size[3], kernel, stride, dilation, padding, op);
  TORCH_CHECK_VALUE(gy.defined() && gy.dim() == 4, op, ": gy must be [N, O, OH, OW]");
  TORCH_CHECK_TYPE(gy.scalar_type() == like.scalar_type(), op, ": gy has dtype ", gy.scalar_type(), " but ",
                   like_name, " has dtype ", like.scalar_type());
  TORCH_CHECK_VALUE(gy.device() == like.device(), op, ": gy and ", like_name, " must be on one device");
  TORCH_CHECK_VALUE(gy.size(0) == x_size[0] && gy.size(1) == rows && gy.size(2) == oh && gy.size(3) == ow, op,
                    ": gy has shape ", gy.sizes(), " but the convolution's output is [", x_size[0], ", ", rows,
                    ", ", oh, ", ", ow, "]");
  return {oh, ow};
}

// Validates sparse_conv2d_grad_values' arguments (all but the device kind) and returns (OH, OW).
inline std::pair<int64_t, int64_t> check_sparse_conv2d_grad_values(const at::Tensor& rowptr, const at::Tensor& col,
                                                                   const at::Tensor& x, const at::Tensor& gy,
                                                                   at::IntArrayRef kernel, at::IntArrayRef stride,
                                                                   at::IntArrayRef dilation, at::IntArrayRef padding) {
  const char* op = "sparse_conv2d_grad_values";
  check_csr_structure(rowptr, col, op);
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 4, op, ": x must be [N, C, H, W]");
  TORCH_CHECK_TYPE(is_matmul_float(x.scalar_type()), op, ": x must be float32, float16, bfloat16 or float64, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.device() == rowptr.device(), op, ": x and the structure must be on one device");
  return check_conv_grad(gy, x, "x", rowptr.numel() - 1, x.sizes(), kernel, stride, dilation, padding, op);
}

// Validates sparse_conv2d's arguments and returns the output spatial size.
inline std::pair<int64_t, int64_t> check_sparse_conv2d(const at::Tensor& rowptr, const at::Tensor& col,
                                                       const at::Tensor& values, const at::Tensor& x,
                                                       const std::optional<at::Tensor>& bias, at::IntArrayRef kernel,
                                                       at::IntArrayRef stride, at::IntArrayRef dilation,
                                                       at::IntArrayRef padding) {
  check_csr(rowptr, col, values, "sparse_conv2d");
  TORCH_CHECK_VALUE(x.defined() && x.dim() == 4, "sparse_conv2d: x must be [N, C, H, W]");
  TORCH_CHECK_TYPE(x.scalar_type() == values.scalar_type(), "sparse_conv2d: x has dtype ", x.scalar_type(),
                   " but values has dtype ", values.scalar_type());
  TORCH_CHECK_VALUE(x.device() == values.device(), "sparse_conv2d: x and values must be on one device");
  const int64_t rows = rowptr.numel() - 1;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->numel() == rows, "sparse_conv2d: bias must have ", rows, " entries");
    TORCH_CHECK_TYPE(bias->scalar_type() == values.scalar_type(), "sparse_conv2d: bias dtype differs from values");
    TORCH_CHECK_VALUE(bias->device() == values.device(), "sparse_conv2d: bias is on another device than values");
  }
  const auto [oh, ow] = conv_output_size(x.size(2), x.size(3), kernel, stride, dilation, padding, "sparse_conv2d");
  return {oh, ow};
}

}  // namespace pysparse
