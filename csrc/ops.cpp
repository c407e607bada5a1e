// The one place where every pysparse op schema is declared. Implementations register themselves per backend
// in csrc/cpu/<family>.cpp (CPU) and csrc/cuda/<family>.cu (CUDA); Python adds fake (meta) kernels and
// autograd formulas in pysparse/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "cpu/out_cache.h"
#include "cpu/scratch.h"

extern "C" {
// Importing pysparse._C loads this library, which runs the static registrations below and in the kernels.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "pysparse kernels (torch.ops.pysparse)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pysparse, m) {
  // Fused saliency scores (float32, weight's shape): magnitude |w|, gradient |g|, taylor |g*w|,
  // hessian 0.5*h*w^2.
  m.def("saliency(Tensor weight, str method, Tensor? grad=None, Tensor? hessian=None) -> Tensor");
  // Keep-masks over a list of score tensors that prune exactly num_prune elements, ranked globally, lowest
  // first, ties broken by global position (earlier list entry, then lower flat index, is pruned first).
  m.def("sparsity_masks(Tensor[] scores, int num_prune) -> Tensor[]");
  // Keep-masks: keep where score >= threshold.
  m.def("threshold_masks(Tensor[] scores, float threshold) -> Tensor[]");
  // N:M keep-mask: the n largest of every m consecutive elements along dim 1 (ties: lower index kept).
  m.def("nm_masks(Tensor score, int n, int m) -> Tensor");
  // Zeroes every tensor where mask is False, in one pass; returns the number of kept elements as a 0-dim
  // int64 tensor on mask's device (a tensor, not an int: no host sync, and torch.compile can functionalize it).
  m.def("apply_mask_(Tensor mask, Tensor(a!)[] tensors) -> Tensor");

  // Sparse x dense: yt = W @ xt (+ bias[:, None]) with W in CSR (rowptr int32 [R+1], col int16/int32 [nnz],
  // values [nnz]) and xt [K, B] dense (activations transposed: the batch is the contiguous dimension).
  // Accumulates in float32 (float64 for float64). The t_* arguments are W's transposed structure (CSR of W^T:
  // rowptr over columns, row indices, and the permutation from CSR to CSC order); only the backward uses them,
  // passing them on to spmm_t.
  m.def("spmm(Tensor rowptr, Tensor col, Tensor values, Tensor xt, Tensor? bias=None, Tensor? t_rowptr=None, "
        "Tensor? t_col=None, Tensor? t_perm=None) -> Tensor");
  // Transposed product: W^T @ yt with W given by its CSR (rowptr, col, values), yt [R, B] -> [n_cols, B].
  // The CPU kernel scatters from the CSR into per-thread accumulators for small batches and otherwise, when
  // given W^T's structure (t_rowptr, t_col, t_perm), permutes the values once and multiplies through it; the
  // CUDA kernel always takes the second way and needs the transposed structure.
  m.def("spmm_t(Tensor rowptr, Tensor col, Tensor values, Tensor yt, int n_cols, Tensor? t_rowptr=None, "
        "Tensor? t_col=None, Tensor? t_perm=None) -> Tensor");
  // Direct sparse convolution: y[n, o] = bias[o] + sum over stored (o, k) of values * x[n, c, oh*s + ki*d,
  // ow*s + kj*d], where column k = (c * kh + ki) * kw + kj indexes W viewed as [O, C * kh * kw] (grouped
  // weights: block-diagonal over all C input channels), x taken as zero-padded by padding[0] rows above and below
  // and padding[1] columns left and right (the CPU kernel writes the zeros as it lays x out: no padded copy of
  // its own). No im2col buffer is built. The t_* arguments (W's transposed structure) are for the backward only,
  // as in spmm.
  m.def("sparse_conv2d(Tensor rowptr, Tensor col, Tensor values, Tensor x, Tensor? bias, int[2] kernel_size, "
        "int[2] stride, int[2] dilation, int[2] padding, Tensor? t_rowptr=None, Tensor? t_col=None, "
        "Tensor? t_perm=None) -> Tensor");
  // The backward of sparse_conv2d, direct (no im2col / fold). Gradient with respect to the (unpadded) input, of
  // size x_size [N, C, H, W], from gy [N, O, OH, OW]: dx[n, c, r*s + ki*d - p0, q*s + kj*d - p1] += value *
  // gy[n, o, r, q] over the stored (o, k) (terms that fall in the padding are dropped), walking W's transposed
  // structure (t_*): CUDA needs it, the CPU kernel regroups the CSR itself when it is not given.
  m.def("sparse_conv2d_grad_input(Tensor rowptr, Tensor col, Tensor values, Tensor gy, SymInt[4] x_size, "
        "int[2] kernel_size, int[2] stride, int[2] dilation, int[2] padding, Tensor? t_rowptr=None, "
        "Tensor? t_col=None, Tensor? t_perm=None) -> Tensor");
  // Gradient with respect to the stored values: out[j] = sum over n, r, q of gy[n, o, r, q] *
  // xpad[n, c, r*s + ki*d, q*s + kj*d] for stored entry j = (o, k), xpad x zero-padded by padding; x's dtype.
  m.def("sparse_conv2d_grad_values(Tensor rowptr, Tensor col, Tensor x, Tensor gy, int[2] kernel_size, "
        "int[2] stride, int[2] dilation, int[2] padding) -> Tensor");
  // Sampled dense-dense product: out[j] = dot(a[row(j), :], b[col(j), :]) for every stored position j of the
  // CSR structure; a [R, B], b [K, B]. The gradient of spmm with respect to its values.
  m.def("sddmm(Tensor rowptr, Tensor col, Tensor a, Tensor b) -> Tensor");
  // The backward of spmm in one call: (sddmm(rowptr, col, gyt, xt), spmm_t(rowptr, col, values, gyt,
  // xt.size(0), t_*), dbias), i.e. the gradients with respect to the values [nnz] and to xt [K, B] from gyt
  // [R, B], and with bias_grad the bias's, gyt.sum(1) [R] (else an empty tensor). The CPU kernel computes the
  // first two in one sweep over the stored positions (each reads gyt's row once for both) and sums the bias
  // gradient while it packs gyt. dxt has xt's layout when xt is batch-major (the [K, B] view of a [B, K] batch),
  // else it is contiguous.
  m.def("spmm_grad(Tensor rowptr, Tensor col, Tensor values, Tensor gyt, Tensor xt, Tensor? t_rowptr=None, "
        "Tensor? t_col=None, Tensor? t_perm=None, bool bias_grad=False) -> (Tensor, Tensor, Tensor)");
  // A CSR matrix written out dense: [rows, n_cols], values at the stored positions, zeros elsewhere (values'
  // dtype). The sparse layers' dense path builds its weight with it.
  m.def("csr_to_dense(Tensor rowptr, Tensor col, Tensor values, int n_cols) -> Tensor");
  // A dense matrix [rows, n_cols] read at a CSR structure's stored positions: out[j] = dense[row(j), col[j]]
  // ([nnz], dense's dtype). csr_to_dense's gradient with respect to its values, and the other way round.
  m.def("csr_gather(Tensor rowptr, Tensor col, Tensor dense) -> Tensor");
  // The layers' training steps, each recorded as one C++ autograd node (csrc/autograd.cpp; a Python
  // autograd.Function costs as much as a small layer's kernel). layer_linear: SparseLinear's y [B, N] = x [B, K] @
  // W^T (+ bias), the transposed view of spmm's result on x's transposed view; its backward calls spmm_grad, or
  // sddmm / spmm_t. layer_sparse_conv2d: sparse_conv2d, its backward sparse_conv2d_grad_values / _grad_input.
  // Differentiable in values, x and bias.
  m.def("layer_linear(Tensor rowptr, Tensor col, Tensor values, Tensor x, Tensor? bias, Tensor? t_rowptr, "
        "Tensor? t_col, Tensor? t_perm) -> Tensor");
  m.def("layer_sparse_conv2d(Tensor rowptr, Tensor col, Tensor values, Tensor x, Tensor? bias, int[2] kernel_size, "
        "int[2] stride, int[2] dilation, int[2] padding, Tensor? t_rowptr, Tensor? t_col, Tensor? t_perm) -> Tensor");
  // The dense path's weight (a layer below its crossover computes through torch's dense kernels): csr_to_dense
  // recorded as one C++ node, its backward csr_gather of the weight's gradient. Differentiable in values.
  m.def("layer_csr_to_dense(Tensor rowptr, Tensor col, Tensor values, int n_cols) -> Tensor");
  // Frees the CPU kernels' scratch buffers held by the calling thread (csrc/cpu/scratch.h); returns the bytes
  // released. No tensors: one kernel for every device.
  m.def("release_scratch() -> int", [] { return pysparse::cpu::release_scratch(); });
  // The CPU output cache (csrc/cpu/out_cache.h): frees the blocks it holds (returns the bytes), sets the most
  // bytes it may hold (returns the previous limit), and the bytes it holds now.
  m.def("empty_cpu_cache() -> int", [] { return pysparse::cpu::empty_cpu_cache(); });
  m.def("set_cpu_cache_limit(int bytes) -> int",
        [](int64_t bytes) { return pysparse::cpu::set_cpu_cache_limit(bytes); });
  m.def("cpu_cache_bytes() -> int", [] { return pysparse::cpu::cpu_cache_bytes(); });
}
