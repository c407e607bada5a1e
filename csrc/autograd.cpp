// The sparse layers' autograd as C++ nodes: layer_linear (SparseLinear, and SparseConv2d's im2col path),
// layer_sparse_conv2d and layer_csr_to_dense (the dense path's weight) record one node each, whose backward calls
// the same ops as pysparse/ops.py's registered formulas (spmm_grad for values and input together, sddmm or
// spmm_t alone, the bias gradient from spmm_grad or a sum; sparse_conv2d_grad_values / _grad_input; csr_gather),
// and only for the inputs the running backward asks for
// (autograd.grad(y, x) computes no values gradient). One kernel for every device: the nodes call the device
// kernels through the dispatcher, below the Autograd key (where torch.library's Python wrapper of the ops'
// formulas would otherwise run on every call), except in a backward that builds a graph (create_graph=True),
// where those formulas record the second derivative.
//
// Why C++: a Python autograd.Function cost as much as a small layer's kernels (benchmarks/RESULTS.md). Eager,
// no_grad and torch.compile (which traces through the node into the ops) take these nodes; torch.func and
// forward-mode AD, which a C++ node does not support, take the Functions of pysparse/ops.py's _FUNC_FUNCTIONS.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common.h"  // channels_last

namespace pysparse {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

// A typed handle to one of pysparse's ops; each accessor below looks its op up once (a function-local static).
template <typename Sig>
c10::TypedOperatorHandle<Sig> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The ops' C++ signatures (as their schemas in csrc/ops.cpp): T a tensor, OptT an optional one, Ints int[2].
using T = const at::Tensor&;
using OptT = const OptTensor&;
using Ints = at::IntArrayRef;

const auto& spmm_op() {
  static const auto op = find_op<at::Tensor(T, T, T, T, OptT, OptT, OptT, OptT)>("pysparse::spmm");
  return op;
}

const auto& spmm_t_op() {
  static const auto op = find_op<at::Tensor(T, T, T, T, int64_t, OptT, OptT, OptT)>("pysparse::spmm_t");
  return op;
}

const auto& sddmm_op() {
  static const auto op = find_op<at::Tensor(T, T, T, T)>("pysparse::sddmm");
  return op;
}

const auto& spmm_grad_op() {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(T, T, T, T, T, OptT, OptT, OptT, bool)>(
      "pysparse::spmm_grad");
  return op;
}

const auto& sparse_conv2d_op() {
  static const auto op =
      find_op<at::Tensor(T, T, T, T, OptT, Ints, Ints, Ints, Ints, OptT, OptT, OptT)>("pysparse::sparse_conv2d");
  return op;
}

const auto& conv_grad_input_op() {
  static const auto op = find_op<at::Tensor(T, T, T, T, c10::SymIntArrayRef, Ints, Ints, Ints, Ints, OptT, OptT, OptT)>(
      "pysparse::sparse_conv2d_grad_input");
  return op;
}

const auto& conv_grad_values_op() {
  static const auto op = find_op<at::Tensor(T, T, T, T, Ints, Ints, Ints, Ints)>("pysparse::sparse_conv2d_grad_values");
  return op;
}

const auto& csr_to_dense_op() {
  static const auto op = find_op<at::Tensor(T, T, T, int64_t)>("pysparse::csr_to_dense");
  return op;
}

const auto& csr_gather_op() {
  static const auto op = find_op<at::Tensor(T, T, T)>("pysparse::csr_gather");
  return op;
}

// Below the Autograd key unless the backward that calls the ops builds a graph (create_graph=True: grad mode is
// on there), where the ops' registered formulas must record it.
struct BelowAutogradUnlessRecording {
  std::optional<at::AutoDispatchBelowADInplaceOrView> guard;
  BelowAutogradUnlessRecording() {
    if (!at::GradMode::is_enabled()) guard.emplace();
  }
};

// An undefined tensor for an absent optional one (what save_for_backward can hold), and back.
at::Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }
OptTensor as_optional(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// The kernels' view of a batch-major x [B, K]: xt [K, B], the transposed view, on every device. The CPU kernels
// pack the batch through its strides; the CUDA ones copy it batch-contiguous by a tiled transpose (csrc/cuda/spmm.cu,
// batch_contiguous), none where x is itself a preceding SparseLinear's output (the view of a contiguous [K, B]).
// The node saves the view, not a copy (as nn.Linear saves x). As pysparse/ops.py's _kernel_input.
at::Tensor kernel_input(const at::Tensor& x) { return x.t(); }

// What both nodes keep for their backward: W's structure and values, the kernels' input, W^T's structure
// (undefined where absent), and whether a bias was given. Both nodes take (rowptr, col, values, input, bias, ...)
// as their first five inputs: the gradients a backward may be asked for are those of inputs 2, 3 and 4.
void save_operands(AutogradContext* ctx, const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                   const at::Tensor& input, const OptTensor& bias, const OptTensor& t_rowptr, const OptTensor& t_col,
                   const OptTensor& t_perm) {
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  ctx->save_for_backward({rowptr, col, values, input, or_undefined(t_rowptr), or_undefined(t_col),
                          or_undefined(t_perm)});
}

// save_operands' tensors back, with the gradients the running backward asks for.
struct Operands {
  at::Tensor rowptr, col, values, input;
  OptTensor t_rowptr, t_col, t_perm;
  bool need_values, need_input, need_bias;
};

Operands saved_operands(AutogradContext* ctx) {
  const auto saved = ctx->get_saved_variables();
  return {saved[0],
          saved[1],
          saved[2],
          saved[3],
          as_optional(saved[4]),
          as_optional(saved[5]),
          as_optional(saved[6]),
          ctx->needs_input_grad(2),
          ctx->needs_input_grad(3),
          ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(4)};
}

}  // namespace

// (Outside the anonymous namespace: torch names the nodes after these types, e.g. in profiles and grad_fn.name().)
struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  // -> yt [N, B]; the caller returns its transposed view (taken outside the node, so that an in-place op on the
  // layer's output, ReLU(inplace=True), is allowed).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& rowptr, const at::Tensor& col,
                            const at::Tensor& values, const at::Tensor& x, const OptTensor& bias,
                            const OptTensor& t_rowptr, const OptTensor& t_col, const OptTensor& t_perm) {
    const at::Tensor xt = kernel_input(x);
    save_operands(ctx, rowptr, col, values, xt, bias, t_rowptr, t_col, t_perm);
    const at::AutoDispatchBelowADInplaceOrView below;  // (grad mode is off here, nothing would be recorded)
    return spmm_op().call(rowptr, col, values, xt, bias, t_rowptr, t_col, t_perm);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Operands s = saved_operands(ctx);
    const at::Tensor &rowptr = s.rowptr, &col = s.col, &values = s.values, &xt = s.input;
    const bool need_values = s.need_values, need_x = s.need_input, need_bias = s.need_bias;
    const at::Tensor& gyt = grads[0];  // [N, B]; the kernels take any strides
    at::Tensor dvalues, dxt, dbias;
    {
      const BelowAutogradUnlessRecording below;
      if (need_values && need_x) {  // one sweep for both, the bias gradient summed as gyt is packed
        std::tie(dvalues, dxt, dbias) =
            spmm_grad_op().call(rowptr, col, values, gyt, xt, s.t_rowptr, s.t_col, s.t_perm, need_bias);
        if (!need_bias) dbias = at::Tensor();
      } else {
        if (need_values) dvalues = sddmm_op().call(rowptr, col, gyt, xt);
        if (need_x) dxt = spmm_t_op().call(rowptr, col, values, gyt, xt.size(0), s.t_rowptr, s.t_col, s.t_perm);
      }
    }
    if (need_bias && !dbias.defined()) dbias = gyt.sum(1);
    return {at::Tensor(), at::Tensor(), dvalues, dxt.defined() ? dxt.t() : at::Tensor(), dbias,
            at::Tensor(),  at::Tensor(), at::Tensor()};
  }
};

struct Conv2dFunction : public torch::autograd::Function<Conv2dFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& rowptr, const at::Tensor& col,
                            const at::Tensor& values, const at::Tensor& x, const OptTensor& bias,
                            at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef dilation,
                            at::IntArrayRef padding, const OptTensor& t_rowptr, const OptTensor& t_col,
                            const OptTensor& t_perm) {
    ctx->saved_data["geometry"] = c10::List<int64_t>({kernel[0], kernel[1], stride[0], stride[1], dilation[0],
                                                      dilation[1], padding[0], padding[1]});
    save_operands(ctx, rowptr, col, values, x, bias, t_rowptr, t_col, t_perm);
    const at::AutoDispatchBelowADInplaceOrView below;
    return sparse_conv2d_op().call(rowptr, col, values, x, bias, kernel, stride, dilation, padding, t_rowptr, t_col,
                                   t_perm);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Operands s = saved_operands(ctx);
    const at::Tensor &rowptr = s.rowptr, &col = s.col, &values = s.values, &x = s.input;
    const bool need_values = s.need_values, need_x = s.need_input, need_bias = s.need_bias;
    const auto g = ctx->saved_data["geometry"].toIntVector();
    const at::IntArrayRef kernel(&g[0], 2), stride(&g[2], 2), dilation(&g[4], 2), padding(&g[6], 2);
    // in x's memory format, as torch's convolutions take it: a channels-last model's input gradients stay
    // channels-last (the ops return dx in gy's format), and torch's BatchNorm and activation backwards meet one
    // format instead of two (MobileNetV3-small's channels-last training step at batch 8: ~3x their NCHW time)
    const at::Tensor gy =
        grads[0].contiguous(channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
    at::Tensor dvalues, dx, dbias;
    {
      const BelowAutogradUnlessRecording below;
      if (need_values) dvalues = conv_grad_values_op().call(rowptr, col, x, gy, kernel, stride, dilation, padding);
      if (need_x)
        dx = conv_grad_input_op().call(rowptr, col, values, gy, x.sym_sizes(), kernel, stride, dilation, padding,
                                       s.t_rowptr, s.t_col, s.t_perm);
    }
    if (need_bias) dbias = gy.sum({0, 2, 3});
    return {at::Tensor(), at::Tensor(), dvalues,      dx,           dbias,        at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The dense path's weight: W [rows, n_cols] written out from its stored values; the gradient of the values is the
// weight's gradient read at the stored positions.
struct DenseWeightFunction : public torch::autograd::Function<DenseWeightFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& rowptr, const at::Tensor& col,
                            const at::Tensor& values, int64_t n_cols) {
    ctx->save_for_backward({rowptr, col});
    const at::AutoDispatchBelowADInplaceOrView below;
    return csr_to_dense_op().call(rowptr, col, values, n_cols);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor dvalues;
    if (ctx->needs_input_grad(2)) {
      const auto saved = ctx->get_saved_variables();
      const BelowAutogradUnlessRecording below;
      dvalues = csr_gather_op().call(saved[0], saved[1], grads[0]);  // (the kernel reads any strides)
    }
    return {at::Tensor(), at::Tensor(), dvalues, at::Tensor()};
  }
};

namespace {

// y [B, N] = x [B, K] @ W^T + bias: spmm on x's transposed view, returned as its result's transposed view.
at::Tensor layer_linear(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values, const at::Tensor& x,
                  const OptTensor& bias, const OptTensor& t_rowptr, const OptTensor& t_col,
                  const OptTensor& t_perm) {
  TORCH_CHECK_VALUE(x.dim() == 2, "layer_linear: x must be 2-D [batch, in_features], got ", x.dim(), " dims");
  return LinearFunction::apply(rowptr, col, values, x, bias, t_rowptr, t_col, t_perm).t();
}

// sparse_conv2d, recorded as one Conv2dFunction node.
at::Tensor layer_sparse_conv2d(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                               const at::Tensor& x, const OptTensor& bias, at::IntArrayRef kernel,
                               at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding,
                               const OptTensor& t_rowptr, const OptTensor& t_col, const OptTensor& t_perm) {
  for (const auto& [arg, name] : {std::pair{kernel, "kernel_size"}, std::pair{stride, "stride"},
                                   std::pair{dilation, "dilation"}, std::pair{padding, "padding"}})
    TORCH_CHECK_VALUE(arg.size() == 2, "layer_sparse_conv2d: ", name, " must have 2 entries, got ", arg.size());
  return Conv2dFunction::apply(rowptr, col, values, x, bias, kernel, stride, dilation, padding, t_rowptr, t_col,
                               t_perm);
}

// csr_to_dense, recorded as one DenseWeightFunction node.
at::Tensor layer_csr_to_dense(const at::Tensor& rowptr, const at::Tensor& col, const at::Tensor& values,
                              int64_t n_cols) {
  return DenseWeightFunction::apply(rowptr, col, values, n_cols);
}

}  // namespace

TORCH_LIBRARY_IMPL(pysparse, CompositeImplicitAutograd, m) {
  m.impl("layer_linear", &layer_linear);
  m.impl("layer_sparse_conv2d", &layer_sparse_conv2d);
  m.impl("layer_csr_to_dense", &layer_csr_to_dense);
}

}  // namespace pysparse
