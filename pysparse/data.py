"""Data sets. ``load("digits")`` is scikit-learn's bundled 8x8 handwritten digits (no download); MNIST,
Fashion-MNIST and CIFAR-10 load through torchvision from files the user already has; nothing is downloaded."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .ops import _check_number

NAMES = ("digits", "mnist", "fashion-mnist", "cifar10", "imagefolder")


@dataclass
class Split:
    train: Dataset
    test: Dataset
    num_classes: int
    image_shape: tuple[int, int, int]


SEED_LIMIT = 2**32  # scikit-learn's random_state range, [0, 2**32)


def check_seed(seed) -> int:
    """A data seed: an int in [0, 2**32); ValueError naming ``seed`` otherwise (the CLI's --seed uses it too)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return seed


def load(name: str, *, root: Optional[str] = None, test_size: float = 0.2, seed: int = 0) -> Split:
    """``digits``: 1797 images [1, 8, 8] in [0, 1], a stratified split with ``test_size`` of them held out
    (``random_state=seed``). The others read ``root`` (torchvision's layout) and never download."""
    if name not in NAMES:
        raise ValueError(f"data set must be one of {', '.join(NAMES)}, got {name!r}")
    check_seed(seed)
    _check_number(test_size, "test_size")
    if not 0.0 < test_size < 1.0:  # NaN fails too
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        tr, te = train_test_split(range(len(y)), test_size=test_size, stratify=y.numpy(), random_state=seed)
        tr, te = torch.tensor(tr), torch.tensor(te)
        return Split(TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te]), 10, (1, 8, 8))
    if root is None or not os.path.isdir(root):
        raise FileNotFoundError(f"{name}: give root= a folder that holds the data set's files "
                                f"(torchvision's layout; pysparse never downloads), got {root!r}")
    import torchvision
    from torchvision import transforms

    tf = transforms.ToTensor()
    try:
        if name == "imagefolder":
            full = torchvision.datasets.ImageFolder(root, transform=tf)
            n_test = int(len(full) * test_size)
            gen = torch.Generator().manual_seed(seed)
            test, train = torch.utils.data.random_split(full, [n_test, len(full) - n_test], generator=gen)
            return Split(train, test, len(full.classes), tuple(full[0][0].shape))
        cls = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
               "cifar10": torchvision.datasets.CIFAR10}[name]
        train = cls(root, train=True, download=False, transform=tf)
        test = cls(root, train=False, download=False, transform=tf)
    except RuntimeError as exc:  # torchvision: "Dataset not found. You can use download=True ..."
        raise FileNotFoundError(f"{name}: the files are not under {root} (torchvision's layout expected; "
                                f"pysparse never downloads): {exc}") from None
    shape = (3, 32, 32) if name == "cifar10" else (1, 28, 28)
    return Split(train, test, 10, shape)


def loader(dataset: Dataset, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """A DataLoader; with shuffle, its order is fixed by ``seed``."""
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen)
