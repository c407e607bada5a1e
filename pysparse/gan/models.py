"""DCGAN-style generator and discriminator made of pysparse's sparse layers.

G: z (and, if conditional, a label embedding concatenated to it) -> SparseLinear -> [C, s0, s0] -> k times
(nearest upsample x2 -> SparseConv2d 3x3 -> BatchNorm -> ReLU) -> SparseConv2d 3x3 -> tanh, images in [-1, 1].
D: k times (SparseConv2d 4x4 stride 2 -> LeakyReLU 0.2) -> flatten -> SparseLinear -> one logit; conditional D
adds the projection term <embed(y), h> (Miyato & Koyama 2018). Spectral normalisation on every D layer by
default (through the sparse kernels), no normalisation layer in D. Weights N(0, 0.02) (DCGAN).

The image side is s0 * 2^k: 8 = 2 * 4 (digits), 28 = 7 * 4 (MNIST), 32 = 4 * 8 (CIFAR); any side that halves
to between 2 and 8 in at most 4 steps works.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import SparseConv2d, SparseLinear
from ..nn import spectral_norm as _sn
from ..nn._sparse_weight import SparseWeight
from ..ops import _check_fraction, _check_int


def plan(image_size: int) -> tuple[int, int]:
    """(s0, k): the base side and the number of x2 steps for ``image_size``; ValueError if unsupported."""
    _check_int(image_size, "image_size", 4)
    side, k = image_size, 0
    while side % 2 == 0 and side // 2 >= 2 and (k < 2 or side > 8) and k < 4:
        side, k = side // 2, k + 1
    if k == 0 or side > 8:
        raise ValueError(f"image_size {image_size} is not supported: it must be s0 * 2^k with s0 in [2, 8] and "
                         "1 <= k <= 4 (e.g. 8, 16, 28, 32, 64)")
    return side, k


def _check_common(channels, latent_dim, num_classes, width, sparsity):
    _check_int(channels, "channels", 1)
    _check_int(width, "width", 1)
    _check_int(latent_dim, "latent_dim", 1, none_ok=True)
    _check_int(num_classes, "num_classes (None: unconditional)", 2, none_ok=True)
    return _check_fraction(sparsity, "sparsity")


def dcgan_init_(module: nn.Module) -> nn.Module:
    """DCGAN initialisation: conv / linear weights N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, SparseWeight):
                m.values.normal_(0.0, 0.02)
            elif isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                m.weight.normal_(0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.weight.normal_(1.0, 0.02)
            else:
                continue
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()
    return module


def _check_labels(y, num_classes, n, who):
    if num_classes is None:
        if y is not None:
            raise ValueError(f"this {who} is unconditional; do not pass labels")
        return
    if y is None:
        raise ValueError(f"this {who} is class-conditional: pass labels y (int64, one per sample)")
    if not isinstance(y, torch.Tensor) or y.dtype != torch.long or y.shape != (n,):
        raise ValueError(f"labels must be an int64 tensor of shape ({n},), got "
                         f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}")
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]")


def _layer_types(sparse: bool, sparsity: float):
    if not sparse:
        return nn.Linear, nn.Conv2d
    return (functools.partial(SparseLinear, sparsity=sparsity), functools.partial(SparseConv2d, sparsity=sparsity))


class _ImageModel(nn.Module):
    """Generator and Discriminator: models of images [channels, image_size, image_size]."""

    channels: int
    image_size: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, image_size, image_size): the images this model draws or scores."""
        return (self.channels, self.image_size, self.image_size)


class Generator(_ImageModel):
    """DCGAN-style generator of [channels, image_size, image_size] images in [-1, 1] from N(0, 1) codes.

    ``num_classes`` makes it class-conditional (a label embedding of ``latent_dim`` values concatenated to z).
    ``sparsity`` is the starting sparsity of every sparse layer (random masks; 0 = all weights stored, for a
    schedule that prunes while training). ``width`` is the channel count of the last hidden layer; it doubles
    towards the base. ``sparse=False`` builds the same network from dense nn.Linear / nn.Conv2d (a baseline).
    """

    def __init__(self, image_size: int = 8, channels: int = 1, *, latent_dim: int = 64,
                 num_classes: Optional[int] = None, width: int = 32, sparsity: float = 0.0,
                 sparse: bool = True) -> None:
        super().__init__()
        sparsity = _check_common(channels, latent_dim, num_classes, width, sparsity)
        if not sparse and sparsity:
            raise ValueError("a dense (sparse=False) model cannot start at a sparsity above 0")
        self.config = dict(image_size=image_size, channels=channels, latent_dim=latent_dim,
                           num_classes=num_classes, width=width, sparse=bool(sparse))
        linear, conv = _layer_types(sparse, sparsity)
        s0, k = plan(image_size)
        self.image_size, self.channels, self.latent_dim, self.num_classes = image_size, channels, latent_dim, \
            num_classes
        self.s0 = s0
        widths = [width * 2 ** (k - i) for i in range(k + 1)]  # base ... last hidden
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        in_dim = latent_dim * (2 if num_classes else 1)
        self.fc = linear(in_dim, widths[0] * s0 * s0)
        self.bn0 = nn.BatchNorm2d(widths[0])
        blocks = []
        for a, b in zip(widths, widths[1:]):
            blocks += [nn.Upsample(scale_factor=2, mode="nearest"),
                       conv(a, b, 3, padding=1, bias=False), nn.BatchNorm2d(b),
                       nn.ReLU()]
        blocks += [conv(widths[-1], channels, 3, padding=1), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)
        dcgan_init_(self)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must be a [batch, {self.latent_dim}] tensor, got {tuple(getattr(z, 'shape', ()))}")
        _check_labels(y, self.num_classes, z.shape[0], "generator")
        h = z if self.embed is None else torch.cat([z, self.embed(y)], 1)
        h = self.fc(h).reshape(z.shape[0], -1, self.s0, self.s0)
        return self.blocks(F.relu(self.bn0(h)))

    def sample(self, n: int, y: Optional[torch.Tensor] = None, *, generator: Optional[torch.Generator] = None
               ) -> torch.Tensor:
        """``n`` images in [0, 1] (eval mode, no gradient); conditional G needs labels ``y``."""
        _check_int(n, "n", 1)
        z = torch.randn(n, self.latent_dim, generator=generator).to(next(self.parameters()).device)
        was = self.training
        self.eval()
        with torch.no_grad():
            x = self(z, y)
        self.train(was)
        return (x + 1) / 2


class Discriminator(_ImageModel):
    """DCGAN-style discriminator giving one logit per image; ``num_classes`` adds the projection term.
    Spectral normalisation on every layer unless ``spectral_norm=False``; ``sparse=False`` builds it from
    dense layers (torch's spectral_norm)."""

    def __init__(self, image_size: int = 8, channels: int = 1, *, num_classes: Optional[int] = None,
                 width: int = 32, sparsity: float = 0.0, spectral_norm: bool = True, sparse: bool = True) -> None:
        super().__init__()
        sparsity = _check_common(channels, None, num_classes, width, sparsity)
        if not sparse and sparsity:
            raise ValueError("a dense (sparse=False) model cannot start at a sparsity above 0")
        self.config = dict(image_size=image_size, channels=channels, num_classes=num_classes, width=width,
                           spectral_norm=bool(spectral_norm), sparse=bool(sparse))
        linear, conv = _layer_types(sparse, sparsity)
        s0, k = plan(image_size)
        self.image_size, self.channels, self.num_classes = image_size, channels, num_classes
        widths = [channels] + [width * 2 ** i for i in range(k)]
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            layers += [conv(a, b, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers, nn.Flatten())
        feat = widths[-1] * s0 * s0
        self.fc = linear(feat, 1)
        self.embed = nn.Embedding(num_classes, feat) if num_classes else None
        dcgan_init_(self)
        if spectral_norm:
            for m in list(self.modules()):
                if isinstance(m, (SparseWeight, nn.Linear, nn.Conv2d)):
                    _sn(m)
            if self.embed is not None:
                _sn(self.embed)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = self.image_shape
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(f"images must be [batch, {', '.join(map(str, shape))}], got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        _check_labels(y, self.num_classes, x.shape[0], "discriminator")
        h = self.features(x)
        out = self.fc(h).squeeze(1)
        if self.embed is not None:
            out = out + (self.embed(y) * h).sum(1)
        return out


