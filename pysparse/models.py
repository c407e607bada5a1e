"""Reference models: the MLP 64-300-100-10 (LeNet-300-100 for 8x8 digits) and a small CNN."""
from __future__ import annotations

from torch import nn


def mlp(in_features: int = 64, hidden: tuple[int, ...] = (300, 100), num_classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    widths = (in_features,) + tuple(hidden)
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))


def cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 8) -> nn.Sequential:
    """Two 3x3 convolutions (32, 64 channels), a 2x2 max-pool, then 128 hidden units."""
    if image_size % 2:
        raise ValueError(f"image_size must be even, got {image_size}")
    side = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes))


MODELS = {"mlp": mlp, "cnn": cnn}
