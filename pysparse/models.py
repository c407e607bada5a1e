"""Reference models: the MLP 64-300-100-10 (LeNet-300-100 for 8x8 digits), a small CNN, and the ConvNet of
the dataset-condensation literature."""
from __future__ import annotations

from torch import nn

from .ops import _check_int


def mlp(in_features: int = 64, hidden: tuple[int, ...] = (300, 100), num_classes: int = 10) -> nn.Sequential:
    _check_int(in_features, "in_features", 1)
    _check_int(num_classes, "num_classes", 2)
    if not isinstance(hidden, (tuple, list)):
        raise TypeError(f"hidden must be a tuple of layer widths, got {type(hidden).__name__}")
    for i, h in enumerate(hidden):
        _check_int(h, f"hidden[{i}]", 1)
    layers: list[nn.Module] = [nn.Flatten()]
    widths = (in_features,) + tuple(hidden)
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], num_classes))


def cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 8) -> nn.Sequential:
    """Two 3x3 convolutions (32, 64 channels), a 2x2 max-pool, then 128 hidden units."""
    _check_int(in_channels, "in_channels", 1)
    _check_int(num_classes, "num_classes", 2)
    _check_int(image_size, "image_size", 2)
    if image_size % 2:
        raise ValueError(f"image_size must be even, got {image_size}")
    side = image_size // 2
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, num_classes))


MODELS = {"mlp": mlp, "cnn": cnn}


def convnet(in_channels: int = 1, num_classes: int = 10, image_size: int = 8, width: int = 128,
            depth: int | None = None) -> nn.Sequential:
    """The ConvNet of the dataset-condensation literature (DC, DM): ``depth`` blocks of 3x3 conv (``width``
    channels) -> instance norm (GroupNorm with one channel per group, affine) -> ReLU -> 2x2 average pool, then
    a linear classifier. ``depth`` defaults to the number of halvings that keep the side >= 2 (at most 3)."""
    _check_int(in_channels, "in_channels", 1)
    _check_int(num_classes, "num_classes", 2)
    _check_int(image_size, "image_size", 2)
    _check_int(width, "width", 1)
    _check_int(depth, "depth", 1, none_ok=True)
    if depth is None:
        depth, side = 0, image_size
        while side // 2 >= 2 and depth < 3:
            side, depth = side // 2, depth + 1
    if depth < 1 or image_size >> depth < 1:
        raise ValueError(f"image_size {image_size} is too small for depth {depth}")
    layers: list[nn.Module] = []
    c = in_channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width), nn.ReLU(), nn.AvgPool2d(2)]
        c = width
    side = image_size >> depth
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * side * side, num_classes))


MODELS["convnet"] = convnet
