import pytest
import torch
from torch import nn

import pysparse
from pysparse import data, models


def test_digits_split():
    split = data.load("digits")
    assert len(split.train) + len(split.test) == 1797 and split.num_classes == 10 and split.image_shape == (1, 8, 8)
    x, y = split.train[0]
    assert x.shape == (1, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and 0 <= int(y) < 10
    assert len(data.load("digits", test_size=0.3).test) == 540  # stratified 70/30
    labels = torch.stack([y for _, y in split.test])
    assert torch.bincount(labels).min() >= 30  # every class in the held-out part


def test_models_shapes():
    assert models.mlp()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert models.cnn()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert models.cnn(3, 10, 32)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: data.load("imagenet"), ValueError, "data set must be one of"),
    (lambda: data.load("mnist"), FileNotFoundError, "never downloads"),
    (lambda: data.load("cifar10", root="/nonexistent/folder"), FileNotFoundError, "never downloads"),
    (lambda: data.load("digits", test_size=1.5), ValueError, "test_size"),
    (lambda: data.load("digits", test_size="0.2"), TypeError, "test_size must be a real number"),
    (lambda: data.load("imagefolder", root="/nonexistent", test_size=float("nan")), ValueError, "test_size"),
    (lambda: data.load("digits", seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*32\), got -1"),
    (lambda: data.load("digits", seed=2**32), ValueError, "seed must be an int"),
    (lambda: data.load("digits", seed=1.0), ValueError, "seed must be an int"),
    (lambda: models.cnn(image_size=7), ValueError, "image_size must be even"),
    (lambda: models.cnn(in_channels=0), ValueError, "in_channels must be an int >= 1, got 0"),  # was a model
    (lambda: models.cnn(num_classes=1), ValueError, "num_classes must be an int >= 2, got 1"),
    (lambda: models.mlp(hidden=(300, 0)), ValueError, r"hidden\[1\] must be an int >= 1, got 0"),
    (lambda: models.mlp(hidden=300), TypeError, "hidden must be a tuple of layer widths"),
    (lambda: models.mlp(in_features=0), ValueError, "in_features must be an int >= 1"),
    (lambda: models.convnet(width=0), ValueError, "width must be an int >= 1, got 0"),
    (lambda: models.convnet(depth=0), ValueError, "depth must be an int >= 1 or None, got 0"),
    (lambda: models.convnet(image_size=2, depth=2), ValueError, "too small for depth 2"),
    (lambda: pysparse.iterative_sparsities(0.9, 0), ValueError, "rounds must be"),
    (lambda: pysparse.GradualPruner(nn.Linear(2, 2), "magnitude", final_sparsity=0.5, begin=0, end=10, frequency=0),
     ValueError, "frequency must be"),
    (lambda: pysparse.train(nn.Linear(2, 2), [], epochs=1, lr=-1.0), ValueError, "lr must be"),
    (lambda: pysparse.train(nn.Linear(2, 2), [], epochs=1, lr=float("inf")), ValueError,
     "lr must be a positive finite number"),  # inf was taken, and every weight became NaN
    (lambda: pysparse.train(nn.Linear(2, 2), [], epochs=-1, lr=0.1), ValueError, "epochs must be"),
    (lambda: pysparse.train(nn.Linear(2, 2), [], epochs=1, lr=0.1), ValueError, "data yielded no batch"),
    (lambda: pysparse.train(nn.Linear(2, 2), [(torch.tensor([[0.0, float("nan")]]), torch.tensor([1]))], epochs=1,
                            lr=0.1), ValueError, "the training data holds NaN or inf"),  # was "lower lr"
    (lambda: pysparse.accuracy(nn.Linear(2, 2), [(torch.tensor([[float("inf"), 0.0]]), torch.tensor([1]))]),
     ValueError, "the evaluation data holds NaN or inf"),  # was an accuracy from argmax over NaN logits
    (lambda: pysparse.accuracy(nn.Linear(2, 2).requires_grad_(False).apply(
        lambda m: m.weight.fill_(float("nan")) if isinstance(m, nn.Linear) else None),
        [(torch.ones(1, 2), torch.tensor([1]))]), ValueError, "the model's outputs hold NaN"),
    (lambda: pysparse.accuracy(nn.Linear(2, 2), []), ValueError, "yielded no example"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_missing_dataset_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not under"):
        data.load("mnist", root=str(tmp_path))
