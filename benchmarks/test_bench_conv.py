"""SparseConv2d beside nn.Conv2d (mkldnn on the CPU, cuDNN on CUDA) on ResNet-18 layer shapes (224x224 input),
same inputs, one run. The layers are pinned to their sparse kernels (dense_below = 0): below a layer's default
crossover it would compute through nn.Conv2d's own kernels (SparseWeight.dense_below)."""
import pytest
import torch
from torch import nn

import pysparse
from pysparse.testing import devices_for

from _util import RESNET18_CONV, run

DEVICES = devices_for("sparse_conv2d", "spmm", "spmm_t", "sddmm", "spmm_grad")
SHAPES = RESNET18_CONV  # name: (in, out, kernel, stride, input size)
# for the channels-last benchmark, also MobileNetV3-small's pointwise layers (1 x 1: the pixels' rows) and
# depthwise ones (a sixth entry: groups; 3 x 3 and strided: the in-place depthwise kernels, 5 x 5 stride 1: the
# working layout)
CL_SHAPES = {**SHAPES, "mbv3-expand-1x1": (16, 72, 1, 1, 56), "mbv3-project-1x1": (576, 96, 1, 1, 7),
             "mbv3-dw-3x3-s2": (72, 72, 3, 2, 56, 72), "mbv3-dw-5x5-s2": (96, 96, 5, 2, 28, 96),
             "mbv3-dw-5x5-s1": (240, 240, 5, 1, 14, 240)}


def _layers(device, shape, sparsity):
    cin, cout, k, s, _, *groups = {**CL_SHAPES, **DW_SHAPES, **GROUPED_SHAPES}[shape]
    torch.manual_seed(0)
    dense = nn.Conv2d(cin, cout, k, stride=s, padding=k // 2, groups=groups[0] if groups else 1,
                      bias=False).to(device)
    mask = torch.rand(dense.weight.shape, device=device) >= sparsity
    with torch.no_grad():
        dense.weight.mul_(mask)
    return dense, _kernels_only(pysparse.SparseConv2d.from_dense(dense, mask))


def _kernels_only(layer):
    layer.dense_below = 0.0
    return layer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
def test_conv_forward(benchmark, device, batch, shape, sparsity, impl):
    dense, sparse = _layers(device, shape, sparsity)
    x = torch.randn(batch, SHAPES[shape][0], SHAPES[shape][4], SHAPES[shape][4], device=device)
    layer = sparse if impl == "pysparse" else dense
    benchmark.group = f"conv-fwd-{shape}-b{batch}-s{sparsity}-{device}"
    with torch.no_grad():
        run(benchmark, lambda: layer(x), device, rounds=10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("sparsity", [0.8, 0.9, 0.95, 0.99])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
def test_conv_forward_backward(benchmark, device, shape, sparsity, impl):
    """A training step's convolution work at batch 8: forward, then the input and weight gradients (the direct
    backward kernels for pysparse, mkldnn / cuDNN for dense)."""
    dense, sparse = _layers(device, shape, sparsity)
    cin, _, _, _, size = SHAPES[shape]
    x = torch.randn(8, cin, size, size, device=device, requires_grad=True)
    layer = sparse if impl == "pysparse" else dense
    g = torch.randn_like(dense(x))
    benchmark.group = f"conv-fwdbwd-{shape}-b8-s{sparsity}-{device}"
    run(benchmark, lambda: layer(x).backward(g), device, rounds=5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(CL_SHAPES))
@pytest.mark.parametrize("step", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
def test_conv_channels_last(benchmark, device, shape, step, impl):
    """Layers and tensors in torch.channels_last (a model after .to(memory_format=torch.channels_last)), batch 8,
    90%: the forward, or forward + backward; both layers read and write that format."""
    dense, sparse = _layers(device, shape, 0.9)
    cin, _, _, _, size = CL_SHAPES[shape][:5]
    cl = torch.channels_last
    layer = (sparse if impl == "pysparse" else dense).to(memory_format=cl)
    x = torch.randn(8, cin, size, size, device=device).contiguous(memory_format=cl).requires_grad_(step)
    benchmark.group = f"conv-cl-{'fwdbwd' if step else 'fwd'}-{shape}-b8-s0.9-{device}"
    if step:
        g = torch.randn_like(dense(x)).contiguous(memory_format=cl)
        run(benchmark, lambda: layer(x).backward(g), device, rounds=5)
    else:
        with torch.no_grad():
            run(benchmark, lambda: layer(x), device, rounds=10)


# Depthwise layers of EfficientNet-B0 and MobileNetV3 on NCHW tensors (the plane-by-plane kernels): entries as
# CL_SHAPES' depthwise ones.
DW_SHAPES = {"effnet-dw-5x5-s2-14": (672, 672, 5, 2, 14, 672), "effnet-dw-3x3-7": (1152, 1152, 3, 1, 7, 1152),
             "mbv3-dw-5x5-s1-7": (576, 576, 5, 1, 7, 576), "mbv3-dw-3x3-s2": (72, 72, 3, 2, 56, 72)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(DW_SHAPES))
@pytest.mark.parametrize("step", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
def test_conv_depthwise_nchw(benchmark, device, shape, step, impl):
    """Depthwise layers on NCHW tensors, batch 8, 90%: the forward (no_grad, where torch takes mkldnn), or forward
    + backward."""
    _grouped_nchw(benchmark, device, shape, DW_SHAPES[shape], "dw", step, impl)


# Grouped layers with several channels a group (ResNeXt-50 32x4d, RegNetY / X-400MF): name -> (in, out, kernel,
# stride, input size, groups)
GROUPED_SHAPES = {"resnext-g32-s2-28": (512, 512, 3, 2, 28, 32), "resnext-g32-7": (1024, 1024, 3, 1, 7, 32),
                  "regnety-g55-s2-14": (440, 440, 3, 2, 14, 55), "regnetx-g4-28": (64, 64, 3, 1, 28, 4)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(GROUPED_SHAPES))
@pytest.mark.parametrize("step", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
def test_conv_grouped_nchw(benchmark, device, shape, step, impl):
    """Grouped layers with several channels a group on NCHW tensors, batch 8, 90%: the forward (no_grad), or
    forward + backward."""
    _grouped_nchw(benchmark, device, shape, GROUPED_SHAPES[shape], "grouped", step, impl)


def _grouped_nchw(benchmark, device, shape, spec, kind, step, impl):
    dense, sparse = _layers(device, shape, 0.9)
    cin, _, _, _, size = spec[:5]
    layer = sparse if impl == "pysparse" else dense
    x = torch.randn(8, cin, size, size, device=device).requires_grad_(step)
    benchmark.group = f"conv-{kind}-nchw-{'fwdbwd' if step else 'fwd'}-{shape}-b8-s0.9-{device}"
    if step:
        g = torch.randn_like(dense(x))
        run(benchmark, lambda: layer(x).backward(g), device, rounds=5)
    else:
        with torch.no_grad():
            run(benchmark, lambda: layer(x), device, rounds=10)


# The digits GAN's convolutions (width 32, batch 64): G's 3x3 convs on 4x4 and 8x8 planes, D's 4x4 stride-2.
GAN_SHAPES = {  # name: (in, out, kernel, stride, padding, input size)
    "G-4x4": (128, 64, 3, 1, 1, 4),
    "G-8x8": (64, 32, 3, 1, 1, 8),
    "D-8x8-s2": (32, 64, 4, 2, 1, 4),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(GAN_SHAPES))
@pytest.mark.parametrize("sparsity", [0.8, 0.9])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
def test_conv_gan_forward_backward(benchmark, device, shape, sparsity, impl):
    cin, cout, k, s, p, size = GAN_SHAPES[shape]
    torch.manual_seed(0)
    dense = nn.Conv2d(cin, cout, k, stride=s, padding=p).to(device)
    mask = torch.rand(dense.weight.shape, device=device) >= sparsity
    with torch.no_grad():
        dense.weight.mul_(mask)
    layer = _kernels_only(pysparse.SparseConv2d.from_dense(dense, mask)) if impl == "pysparse" else dense
    x = torch.randn(64, cin, size, size, device=device, requires_grad=True)
    g = torch.randn_like(dense(x))
    benchmark.group = f"conv-gan-fwdbwd-{shape}-b64-s{sparsity}-{device}"
    run(benchmark, lambda: layer(x).backward(g), device, rounds=10)
