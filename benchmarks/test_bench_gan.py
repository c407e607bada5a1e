"""Training-step throughput of the sparse GAN (pysparse layers at 0 / 80 / 90% sparsity, spectral norm through
the sparse kernels; at 0% the layers take their dense path, see SparseWeight.dense_below) beside the same GAN built from dense nn.Linear / nn.Conv2d (torch's spectral_norm), on
the digits shapes (8x8, conditional, width 32, batch 64) and 32x32x3, one run. images/s = batch * 2 / time
(one G step and one D step each see a batch of generated images)."""
import pytest
import torch
from torch import nn

import pysparse
from pysparse.gan import Discriminator, GANTrainer, Generator
from pysparse.testing import devices_for

from _util import run

DEVICES = devices_for("sparse_conv2d", "spmm", "spmm_t", "sddmm", "spmm_grad")
BATCH = 64


def _dense_twin(model: nn.Module, spectral: bool) -> nn.Module:
    pysparse.densify(model)
    if spectral:
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.utils.parametrizations.spectral_norm(m)
    return model


def _trainer(device, size, channels, impl, sparsity):
    torch.manual_seed(0)
    G = Generator(size, channels, num_classes=10, width=32)
    D = Discriminator(size, channels, num_classes=10, width=32, spectral_norm=impl == "pysparse")
    if impl == "pysparse" and sparsity:
        from pysparse.shrink import shrink
        shrink(G, sparsity, "random", generator=torch.Generator().manual_seed(0))
        shrink(D, sparsity, "random", generator=torch.Generator().manual_seed(1))
    if impl == "dense":
        G, D = _dense_twin(G, False), _dense_twin(D, True)
    G, D = G.to(device), D.to(device)
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(512, channels, size, size, generator=g), torch.randint(0, 10, (512,), generator=g))
    return GANTrainer(G, D, data, steps=10 ** 6, batch_size=BATCH, progress=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(8, 1), (32, 3)], ids=["digits8", "cifar32"])
@pytest.mark.parametrize("sparsity", [0.0, 0.8, 0.9])
@pytest.mark.parametrize("impl", ["pysparse", "dense"])
def test_gan_train_step(benchmark, device, shape, sparsity, impl):
    """The dense entry is the same dense GAN in every sparsity group (the baseline each ratio is taken to)."""
    t = _trainer(device, *shape, impl, sparsity)
    benchmark.group = f"gan-step-{shape[0]}x{shape[0]}x{shape[1]}-s{sparsity}-{device}"
    run(benchmark, t.train_step, device, rounds=10 if shape[0] == 8 else 3)
    if benchmark.stats is not None:  # (None under --benchmark-disable, a smoke run of the benchmarks)
        benchmark.extra_info["images_per_s"] = 2 * BATCH / benchmark.stats.stats.median
