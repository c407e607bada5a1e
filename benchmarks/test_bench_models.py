"""Whole torchvision models (ResNet-18, MobileNetV3-small, ViT-B/16) pruned layer by layer by magnitude and
sparsified (`pysparse.sparsify`, default crossovers) beside the same pruned model left dense, forward at 224 x 224,
one run (`models.py` alternates the two round by round, for ratios on a noisy machine)."""
import pytest
import torch

from pysparse.testing import devices_for

from _util import run
from models import pruned_pair

DEVICES = devices_for("sparse_conv2d", "spmm")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v3_small", "vit_b_16"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("sparsity", [0.9, 0.95])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
def test_model_forward(benchmark, device, model, batch, sparsity, impl):
    dense, sparse, _ = pruned_pair(model, sparsity)
    net = (sparse if impl == "pysparse" else dense).to(device).eval()
    x = torch.randn(batch, 3, 224, 224, device=device)
    benchmark.group = f"model-fwd-{model}-b{batch}-s{sparsity}-{device}"
    with torch.no_grad():
        run(benchmark, lambda: net(x), device, rounds=5)
