"""fold_batchnorm: eval-mode BatchNorm folded into the convolution before it, sparse or dense."""
import copy
import os

import pytest
import torch
import torchvision
from torch import nn

import pysparse
from pysparse import SparseConv2d


def _randomise_norms(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters that are not the identity (as after training)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.track_running_stats:
                    m.running_mean.normal_(0, 0.2)
                    m.running_var.uniform_(0.5, 1.5)
                if m.affine:
                    m.weight.normal_()
                    m.bias.normal_()
    return model


def _sparse_resnet(seed=0):
    torch.manual_seed(seed)
    model = _randomise_norms(torchvision.models.resnet18(num_classes=10))
    masks = pysparse.prune(model, "magnitude", sparsity=0.9, scope="layer").masks
    return pysparse.sparsify(model, masks).eval()


def test_folds_a_sparse_resnet_keeping_its_masks(tmp_path):
    model = _sparse_resnet()
    masks = {n: m.mask() for n, m in model.named_modules() if isinstance(m, SparseConv2d)}
    assert len(masks) == 20
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = model(x)
        folded = pysparse.fold_batchnorm(copy.deepcopy(model))
        out = folded(x)
    assert type(folded) is torchvision.models.ResNet
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    for name, mask in masks.items():  # every convolution kept its structure and got the BatchNorm's bias
        layer = folded.get_submodule(name)
        assert isinstance(layer, SparseConv2d) and torch.equal(layer.mask(), mask) and layer.bias is not None
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # saved folded, loaded into a fresh model folded the same way
    path = os.path.join(tmp_path, "folded.safetensors")
    pysparse.save(folded, path)
    fresh = pysparse.load(path, pysparse.fold_batchnorm(torchvision.models.resnet18(num_classes=10).eval()))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels_last", [False, True])
def test_folds_dense_and_grouped_convolutions(channels_last):
    torch.manual_seed(1)
    model = _randomise_norms(torchvision.models.mobilenet_v3_small(num_classes=10)).eval()
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        folded = pysparse.fold_batchnorm(copy.deepcopy(model))
        out = folded(x)
    assert n_norms == 34 and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


class _Shared(nn.Module):
    """Pairs fold_batchnorm must leave: a convolution whose output is also used elsewhere, a BatchNorm called
    twice, a BatchNorm after something else, a BatchNorm without running statistics, a Conv2d subclass, a
    spectrally normalised sparse convolution. One foldable pair (conv_ok -> bn_ok)."""

    class _Standardised(nn.Conv2d):
        def forward(self, x):
            w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    def __init__(self):
        super().__init__()
        self.conv_ok, self.bn_ok = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_two_users, self.bn_two_users = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv_a, self.conv_b, self.bn_twice = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.conv_stats, self.bn_no_stats = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
        self.conv_sub, self.bn_sub = self._Standardised(4, 4, 1), nn.BatchNorm2d(4)
        self.conv_sn = pysparse.nn.spectral_norm(SparseConv2d(4, 4, 1, sparsity=0.5))
        self.bn_sn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.bn_ok(self.conv_ok(x))
        t = self.conv_two_users(x)
        x = self.bn_two_users(t) + t
        x = self.bn_twice(self.conv_a(x)) + self.bn_twice(self.conv_b(x))
        x = self.bn_after_relu(torch.relu(x))
        x = self.bn_no_stats(self.conv_stats(x))
        x = self.bn_sub(self.conv_sub(x))
        return self.bn_sn(self.conv_sn(x))


def test_leaves_what_it_cannot_fold():
    torch.manual_seed(2)
    model = _randomise_norms(_Shared()).eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        ref = model(x)
        folded = pysparse.fold_batchnorm(copy.deepcopy(model))
        out = folded(x)
    assert isinstance(folded.bn_ok, nn.Identity) and folded.conv_ok.bias is not None
    kept = [n for n, m in folded.named_children() if isinstance(m, nn.BatchNorm2d)]
    assert kept == ["bn_two_users", "bn_twice", "bn_after_relu", "bn_no_stats", "bn_sub", "bn_sn"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_bad_input():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        pysparse.fold_batchnorm("resnet")
    with pytest.raises(ValueError, match=r"for inference: call model.eval\(\)"):
        pysparse.fold_batchnorm(torchvision.models.resnet18())

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # data-dependent: torch.fx cannot trace it

    model = Branchy().eval()
    with pytest.raises(ValueError, match="tracing the model with torch.fx, which failed"):
        pysparse.fold_batchnorm(model)
    assert isinstance(model.bn, nn.BatchNorm2d)  # untouched
