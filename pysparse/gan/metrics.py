"""Offline GAN quality metrics (nothing is downloaded): features of a classifier trained on the real data.

- ``frechet_distance``: the Fréchet distance between two Gaussians fitted to feature sets (FID's formula, with
  a classifier's penultimate layer in place of Inception). ``fid`` computes it for two image sets; the same
  distance between the real train and the real test split is the floor a perfect generator would reach.
- ``class_accuracy``: for a conditional G, the share of its samples of each class that the classifier labels
  as that class.
- ``cas``: classification accuracy score (Ravuri & Vinyals 2019): a classifier trained only on generated
  images, tested on the real test split.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import models, ops
from ..retrain import check_labeled, fit_tensors


class ClassifierFeatures(nn.Module):
    """A feature extractor from a trained classifier (an ``nn.Sequential`` ending in hidden -> ReLU ->
    Linear): images in [0, 1] -> the penultimate activations [N, num_features]. Works as the ``feature``
    module of torchmetrics' FrechetInceptionDistance (it has ``num_features``)."""

    def __init__(self, classifier: nn.Sequential) -> None:
        super().__init__()
        if not isinstance(classifier, nn.Sequential) or not isinstance(classifier[-1], nn.Linear):
            raise TypeError("classifier must be an nn.Sequential whose last layer is an nn.Linear")
        self.classifier = classifier.eval()
        self.num_features = classifier[-1].in_features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier[:-1](images.float()).reshape(images.shape[0], -1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images.float()).argmax(-1)


def train_classifier(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, epochs: int = 30, batch_size: int = 64,
                     lr: float = 0.05, seed: int = 0, model: Optional[nn.Module] = None) -> nn.Sequential:
    """pysparse.models.cnn trained with SGD (momentum 0.9, cosine lr) on images in [0, 1]."""
    if x.shape[0] == 0:
        raise ValueError("cannot train a classifier on an empty set")
    check_labeled(x, y, num_classes)
    torch.manual_seed(seed)
    net = model if model is not None else models.cnn(x.shape[1], num_classes, x.shape[-1])
    return fit_tensors(net, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, schedule="cosine")


def _features(extractor: nn.Module, images: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    return torch.cat([extractor(images[i:i + batch]) for i in range(0, images.shape[0], batch)]).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for feature sets a [N, d], b [M, d] (N, M >= 2).
    The trace of the square root is taken as the sum of the square roots of the eigenvalues of
    S_a^(1/2) S_b S_a^(1/2) (symmetric PSD), in float64."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"need two feature sets [N, d] and [M, d] with N, M >= 2, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    for name, t in (("a", a), ("b", b)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"frechet_distance: feature set {name} holds NaN or inf")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    m = root_a @ s_b @ root_a
    tr_root = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(s_a) + torch.trace(s_b) - 2 * tr_root)


def fid(extractor: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Classifier-feature FID between two image sets (images in [0, 1])."""
    return frechet_distance(_features(extractor, real), _features(extractor, fake))


def class_accuracy(extractor: ClassifierFeatures, generator: nn.Module, *, per_class: int = 100,
                   seed: int = 0) -> dict:
    """Share of a conditional generator's samples that the classifier assigns to the requested class:
    {"mean": ..., "per_class": [...]}."""
    k = getattr(generator, "num_classes", None)
    if not k:
        raise ValueError("class_accuracy needs a class-conditional generator (num_classes set)")
    ops._check_int(per_class, "per_class", 1)
    y = torch.arange(k).repeat_interleave(per_class)
    images = generator.sample(y.numel(), y, generator=torch.Generator().manual_seed(seed))
    hit = (extractor.predict(images) == y).float()
    per = hit.reshape(k, per_class).mean(1)
    return {"mean": float(hit.mean()), "per_class": per.tolist()}


def sample_like(generator: nn.Module, labels: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Generated images in [0, 1]: one per label (conditional G) or ``len(labels)`` unconditional samples."""
    g = torch.Generator().manual_seed(seed)
    if getattr(generator, "num_classes", None):
        return torch.cat([generator.sample(len(c), c, generator=g) for c in labels.split(1024)])
    return torch.cat([generator.sample(len(c), generator=g) for c in labels.split(1024)])


def cas(generator: nn.Module, train_labels: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], *,
        num_classes: int, epochs: int = 30, seed: int = 0) -> float:
    """Classification accuracy score: a classifier trained only on one generated image per training label
    (same class balance as the real set), tested on the real test split."""
    x = sample_like(generator, train_labels, seed=seed + 1)
    return test_accuracy(train_classifier(x, train_labels, num_classes=num_classes, epochs=epochs, seed=seed), test)


def test_accuracy(net: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Top-1 accuracy of ``net`` on a (images, labels) pair of tensors (``pysparse.accuracy`` over its chunks)."""
    from ..retrain import accuracy

    return accuracy(net, zip(test[0].split(1024), test[1].split(1024)))


def _check_sets(generator: nn.Module, train, test, num_classes: int) -> None:
    """evaluate's real splits: (images [N, C, H, W], labels in [0, num_classes)) pairs of one image shape, the
    generator's (a pysparse Generator's image_shape); ValueError / TypeError naming the split."""
    shapes = {}
    for name, pair in (("train", train), ("test", test)):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(f"{name} must be a pair (images, labels) of tensors, got {type(pair).__name__}")
        try:
            check_labeled(*pair, num_classes)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        if pair[0].dim() != 4:
            raise ValueError(f"{name}: images must be [N, C, H, W], got shape {tuple(pair[0].shape)}")
        shapes[name] = tuple(pair[0].shape[1:])
    if shapes["train"] != shapes["test"]:
        raise ValueError(f"train images are {shapes['train']} but test images are {shapes['test']}")
    drawn = getattr(generator, "image_shape", None)  # a pysparse Generator's (other modules may not say)
    if drawn is not None and shapes["train"] != drawn:
        raise ValueError(f"the generator makes {drawn} images but the real ones are {shapes['train']}")


def evaluate(generator: nn.Module, train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
             *, num_classes: int, extractor: Optional[ClassifierFeatures] = None, seed: int = 0,
             with_cas: bool = True, epochs: int = 30) -> dict:
    """Every metric for ``generator`` against real (images in [0, 1], labels) splits: FID (one generated image
    per real training label vs the real test split), its floor FID(real train, real test) (the same sample
    sizes: what a generator of fresh real images would score), the classifier's own test accuracy, and for a
    conditional G the per-class label accuracy and CAS."""
    _check_sets(generator, train, test, num_classes)
    if extractor is None:
        extractor = ClassifierFeatures(train_classifier(*train, num_classes=num_classes, epochs=epochs, seed=seed))
    clf_acc = test_accuracy(extractor.classifier, test)
    fake = sample_like(generator, train[1], seed=seed)
    out = {"fid": fid(extractor, test[0], fake), "fid_floor": fid(extractor, test[0], train[0]),
           "classifier_test_accuracy": clf_acc}
    if getattr(generator, "num_classes", None):
        out["class_accuracy"] = class_accuracy(extractor, generator, seed=seed)
        if with_cas:
            out["cas"] = cas(generator, train[1], test, num_classes=num_classes, epochs=epochs, seed=seed)
    return out
