"""SparseConv2d: a drop-in nn.Conv2d that stores and computes only its kept weights.

The forward is a direct sparse convolution (``pysparse.ops.sparse_conv2d``: no im2col buffer; each stored
weight adds a shifted input plane into its output plane) when there are DIRECT_MIN_OUTPUTS or more output
pixels per channel over the batch or the convolution is grouped, and im2col (``F.unfold``) +
``pysparse.ops.spmm`` otherwise. Zero padding
the same on both sides goes to the op (or to unfold), which writes the zeros into the layout it copies the input
into anyway: no padded copy of the input, and an unpadded gradient out of the backward. Other padding (modes
'reflect', 'replicate', 'circular'; 'same' with an even reach) is applied first with F.pad.
A grouped (or depthwise) weight is stored as one block-diagonal matrix over all input channels: each output
row's column indices simply start at its group's channels, so every group goes through one kernel call.
The output's memory format is nn.Conv2d's: channels-last for a channels-last input (the kernels read and write
that format in place), else contiguous; so is the input gradient's, for a channels-last output gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._fx import traced_call
from ._sparse_weight import SparseWeight, cast_to, initial_mask

# The direct sparse convolution runs when an output channel has at least DIRECT_MIN_OUTPUTS pixels over the
# batch (N * OH * OW) or at most DIRECT_MAX_DENSITY of the weights are kept; otherwise im2col + spmm. Measured
# on the 2-core CPU at 90%, forward and forward + backward (benchmarks/RESULTS.md): im2col wins for 49 output
# pixels (ResNet-18 layer4, batch 1: 0.66 against 1.29 ms), direct from 196 (layer3, batch 1) up, and at 99%
# everywhere. A grouped (or depthwise) convolution always takes the direct kernel: im2col unfolds every input
# channel for every output channel, groups times the columns each reads (2026-12-01, Zen 4, 90%, batch 1, forward
# / fwd + bwd: MobileNetV3's depthwise 5 x 5 on 576 channels of 7 x 7 0.061 / 0.32 ms direct against 0.57 /
# 1.96 ms im2col and 0.08 / 0.65 ms nn.Conv2d; 1024 channels in 32 groups on 7 x 7, fwd + bwd 0.75 against 1.62
# ms; at batch 8, im2col 10-70x slower than direct).
DIRECT_MIN_OUTPUTS = 128
DIRECT_MAX_DENSITY = 0.05
# Channels-last inputs on the CPU: an ungrouped layer (not 1 x 1) with fewer weights than this per output channel
# computes dense by default at any sparsity (SparseConv2d._small_channels_last). Measured at 90%, batch 8, 224 x 224
# RGB input, channels-last, the sparse kernels against nn.Conv2d (2026-12-02, Zen 4, one run each): 3 x 3
# stride 2 to 16 / 24 / 32 channels (27 weights per output) forward 0.52 / 0.76 / 0.62x, forward + backward 0.49
# / 0.63 / 0.72x; ConvNeXt's 4 x 4 stride 4 to 96 (48) 0.76x / 0.68x; but 5 x 5 stride 2 to 64 (75) 1.32x / 1.26x
# and ResNet's 7 x 7 stride 2 to 64 (147) 1.96x / 1.78x. On NCHW inputs the sparse kernels take 0.86-2.7x on
# these (3 x 3 to 16: 0.86x / 0.98x, to 24: 1.74x / 1.71x), and keep them (benchmarks/RESULTS.md).
SMALL_CL_COLUMNS = 64

_CONFIG = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
           "_reversed_padding_repeated_twice")


class SparseConv2d(SparseWeight):
    """``nn.Conv2d`` with the weight stored in CSR; every ``nn.Conv2d`` option (stride, padding including
    'same', dilation, groups and depthwise, bias, padding_mode). Give ``sparsity`` (random mask) or ``mask``
    (bool, the weight's shape [out, in/groups, kh, kw], True = keep); :meth:`from_dense` converts a trained
    ``nn.Conv2d``. The stored values are the Parameter ``values``. Below ``dense_below`` sparsity (default: the
    measured crossover, ``DENSE_BELOW`` = 0.7 on the CPU; on CUDA ``DENSE_BELOW_CUDA`` = 1.0, cuDNN being faster
    than the sparse kernels on ResNet-18's layers at every measured sparsity up to 99%) an ungrouped layer's
    forward computes with a dense copy of the weight built from the stored values, through F.conv2d (see
    ``SparseWeight.dense_below``); grouped and depthwise layers always use the sparse kernels."""

    # fwd + bwd over nn.Conv2d at 50 / 60 / 70 / 80% sparsity (2026-11-29, 2-core CPU): the digits GAN's G 4x4
    # 0.51 / 0.61 / 0.77 / 1.08x, G 8x8 0.73 / 0.89 / 1.06 / 1.41x, D stride 2 0.94 / 1.05 / 1.24 / 1.47x;
    # ResNet-18 layer1 (batch 8) 0.67 / 0.79 / 0.97 / 1.35x, layer3 0.43 / 0.55 / 0.66 / 1.00x.
    DENSE_BELOW = 0.7
    # Over nn.Conv2d (cuDNN) on an H200 (2026-11-29, benchmarks/RESULTS.md), forward + backward at 80 / 90 / 95 /
    # 99%: ResNet-18 layer1 0.11 / 0.12 / 0.27 / 0.19x, layer4 0.07 / 0.19 / 0.36 / 0.35x, every layer 0.07-0.42x;
    # the digits GAN's small layers, host-bound, swing between runs (0.46-0.63x in one, 0.48-1.47x in the next):
    # dense compute at every sparsity below 1.
    DENSE_BELOW_CUDA = 1.0

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 sparsity: Optional[float] = None, mask: Optional[torch.Tensor] = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        ops._check_int(in_channels, "in_channels")
        ops._check_int(out_channels, "out_channels")
        ops._check_int(groups, "groups", 1)
        dense = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                          padding_mode, device=device, dtype=dtype)
        self._init_from(dense, initial_mask("SparseConv2d", dense.weight, sparsity, mask))

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, mask: Optional[torch.Tensor] = None) -> "SparseConv2d":
        """A SparseConv2d holding ``conv``'s weights where ``mask`` is True (None: where the weight is non-zero)."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"from_dense expects an nn.Conv2d, got {type(conv).__name__}")
        self = cls.__new__(cls)
        SparseWeight.__init__(self)
        self._init_from(conv, conv.weight.detach() != 0 if mask is None else mask)
        return self

    def _init_from(self, conv: nn.Conv2d, mask: torch.Tensor) -> None:
        # nn.Conv2d builds with any of these and fails (or divides by zero) only at its first forward: say which
        # argument is wrong when the layer is made (the ops' own check of their geometry)
        for name in ("kernel_size", "stride", "dilation"):
            ops._pair2(getattr(conv, name), name, "SparseConv2d")
        if not isinstance(conv.padding, str):  # 'same' / 'valid'
            ops._pair2(conv.padding, "padding", "SparseConv2d", least=0)
        for name in _CONFIG:
            setattr(self, name, getattr(conv, name))
        self._store(conv.weight, mask)
        self._copy_bias(conv.bias)

    # The weight [out, in/g, kh, kw] as a block-diagonal [out, in * kh * kw] matrix.
    def _to_matrix(self, t: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return super()._to_matrix(t)
        out_g, cols_g = t.shape[0] // self.groups, t[0].numel()
        m = t.new_zeros((t.shape[0], cols_g * self.groups))
        for g in range(self.groups):
            m[g * out_g:(g + 1) * out_g, g * cols_g:(g + 1) * cols_g] = t[g * out_g:(g + 1) * out_g].reshape(out_g, -1)
        return m

    def _from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return m.reshape(self.weight_shape)
        out_g = self.weight_shape[0] // self.groups
        cols_g = m.shape[1] // self.groups
        blocks = [m[g * out_g:(g + 1) * out_g, g * cols_g:(g + 1) * cols_g] for g in range(self.groups)]
        return torch.cat(blocks).reshape(self.weight_shape)

    def _computes_dense(self, x: Optional[torch.Tensor] = None) -> bool:
        # Grouped and depthwise convolutions keep the sparse kernels at every sparsity: torch's CPU grouped
        # convolution was slower than them even at 30% (depthwise, 512 channels, 14 x 14, batch 8: nn.Conv2d
        # forward 17 ms, the kernels 2.7 ms; 128 channels in 32 groups, fwd + bwd, 46 against 24 ms). With torch
        # 2.14 on a Zen 4 (2026-12-01) that holds with autograd on (the same depthwise layer: nn.Conv2d forward
        # 1.8 ms, forward + backward 10.5 ms); under no_grad torch takes mkldnn (0.39 ms), which was faster than
        # the sparse kernel at batch 8 on some depthwise layers (MobileNetV3-small at 90%: 0.25-0.98x) until the NCHW
        # depthwise kernels computed plane by plane (2026-12-03: 1.06-9.8x on EfficientNet-B0's and MobileNetV3's
        # shapes at 90%; 0.74-0.84x at 50% on 7 x 7 planes; benchmarks/RESULTS.md), and the grouped ones with several
        # channels a group too (ResNeXt-50, RegNetY / X-400MF at 90%, batch 8: 0.58-2.26x -> 1.05-3.69x): left as it is.
        if self.groups != 1:
            return False
        return super()._computes_dense() or (x is not None and self._small_channels_last(x))

    def _small_channels_last(self, x: torch.Tensor) -> bool:
        """Whether the default switch sends this forward to the dense path at any sparsity: on the CPU, an
        ungrouped layer that is not 1 x 1 with fewer than SMALL_CL_COLUMNS weights per output channel
        (in_channels x kh x kw) on a channels-last input. Such a layer (the 3 x 3 stems on RGB images of MobileNet,
        EfficientNet, RegNet, ShuffleNet; ConvNeXt's and Swin's 4 x 4 patchify) does a few multiply-adds per output
        pixel, and the sparse kernel's moves of a few-channel channels-last input into its working layout cost
        more (see SMALL_CL_COLUMNS)."""
        kh, kw = self.kernel_size
        return (self._default_cpu_switch() and x.device.type == "cpu" and (kh, kw) != (1, 1) and
                self.in_channels * kh * kw < SMALL_CL_COLUMNS and ops._conv_format(x) == torch.channels_last)

    def _weight_is_matrix(self) -> bool:
        return self.groups == 1

    def _weight_positions(self, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        # entry (row, col) of the block-diagonal matrix sits in group row // out_g, at column col - g * cols_g of
        # that group's [out_g, cols_g] block: weight[row].flatten()[col - g * cols_g]
        cols_g = self.matrix_shape[1] // self.groups
        return row * cols_g + col - (row // (self.weight_shape[0] // self.groups)) * cols_g

    def to_dense(self) -> nn.Conv2d:
        """An nn.Conv2d with the same function (pruned weights are zeros)."""
        return self._fill_dense(nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                                          self.padding, self.dilation, self.groups, self.bias is not None,
                                          self.padding_mode, device=self.values.device, dtype=self.values.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.fx.Proxy):
            return traced_call(self, (x,))
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d expects input [N, {self.in_channels}, H, W] (or unbatched "
                             f"[{self.in_channels}, H, W]), got shape {tuple(x.shape)}")
        x, cast = self._layer_input(x)  # cast: autocast's dtype, or None (x has the layer's dtype)
        bias = cast_to(self.bias, cast)
        left, right, top, bottom = self._reversed_padding_repeated_twice
        (kh, kw), (dh, dw), (sh, sw) = self.kernel_size, self.dilation, self.stride
        h, w = x.shape[2] + top + bottom, x.shape[3] + left + right
        oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
        if oh <= 0 or ow <= 0:
            raise ValueError(f"input of spatial size {(h, w)} (after padding) is smaller than the kernel's reach")
        if self._computes_dense(x):  # below the crossover: torch's dense kernels (see dense_below), as nn.Conv2d
            weight = cast_to(self._compute_weight(), cast)
            if self.padding_mode != "zeros":
                y = F.conv2d(F.pad(x, (left, right, top, bottom), mode=self.padding_mode), weight, bias, self.stride,
                             0, self.dilation, self.groups)
            else:
                y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
            return y[0] if unbatched else y
        padding = [0, 0]
        if self.padding_mode == "zeros" and left == right and top == bottom:
            padding = [top, left]  # the op pads
        elif left or right or top or bottom:
            x = F.pad(x, (left, right, top, bottom), mode="constant" if self.padding_mode == "zeros"
                      else self.padding_mode)
        # The ops are called directly (the layer owns a checked structure; the kernels check again).
        transposed = (self.t_rowptr, self.t_col, self.t_perm)
        # (torch.export: the direct kernel, whatever the batch, so that one graph serves every batch size)
        if torch.compiler.is_exporting() or self.groups > 1 or x.shape[0] * oh * ow >= DIRECT_MIN_OUTPUTS or \
                1.0 - self.sparsity <= DIRECT_MAX_DENSITY:
            ops._check_input_kernel("sparse_conv2d", x)
            y = ops.layer_sparse_conv2d(self.rowptr, self.col, cast_to(self.effective_values(), cast), x, bias,
                                        list(self.kernel_size), list(self.stride), list(self.dilation), padding,
                                        *transposed)
        else:  # few output pixels, no groups: im2col + spmm does better (see DIRECT_MIN_OUTPUTS)
            n = x.shape[0]
            if self.kernel_size == (1, 1) and self.stride == (1, 1) and padding == [0, 0]:
                # a 1 x 1 convolution's im2col is its input: no F.unfold (one process alternating, 9 rounds, the
                # forward at 90%: MobileNetV3's SE blocks, 96 -> 24 and 576 -> 144 on 1 x 1 pixels at batch 1 / 8,
                # 0.66 / 0.53 of the time; 288 -> 96 on 7 x 7 0.65, EfficientNet's 1152 -> 192 at batch 2 0.69)
                xt = x.transpose(0, 1).reshape(x.shape[1], n * oh * ow)
            else:
                cols = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=padding,
                                stride=self.stride)  # [N, C*kh*kw, L]
                xt = cols.transpose(0, 1).reshape(cols.shape[1], n * oh * ow)
            ops._check_input_kernel("spmm", x)
            yt = ops.layer_linear(self.rowptr, self.col, cast_to(self.effective_values(), cast), xt.t(), bias,
                                  *transposed).t()  # (xt as the batch-major view layer_linear takes)
            # contiguous (channels-last for a channels-last x), as nn.Conv2d's output (a CNN's `x.view(x.size(0),
            # -1)` after it failed on the [O, N, ...]-ordered view, and the ops after it wrote [O, N, ...]-ordered
            # results that the next convolution copied): a small copy, fewer than DIRECT_MIN_OUTPUTS pixels a
            # channel
            y = yt.reshape(self.out_channels, n, oh, ow).transpose(0, 1).contiguous(memory_format=ops._conv_format(x))
        return y[0] if unbatched else y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
             f"padding={self.padding}")
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s + f", nnz={self.nnz}, sparsity={self.sparsity:.4f}"
