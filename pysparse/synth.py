"""Compact synthetic training sets from a trained (sparse, conditional) GAN, and their evaluation.

``synthesize(generator, ipc, method=...)`` returns a :class:`SyntheticSet` of ``ipc`` images per class:

- ``"sample"``: class-conditional samples of the generator (pass the EMA generator).
- ``"select"``: ``candidates`` samples per class, then the ``ipc`` most representative of each class by herding
  in the feature space of a classifier trained on the real data (greedy: each pick brings the running mean of
  the picked features closest to the class mean of all candidates).
- ``"match"``: distribution matching (Zhao & Bilen, DM) through the generator (as IT-GAN / DiM): the latent
  codes of the synthetic images (and, with ``pixels=True``, a pixel offset afterwards) are optimised so that
  for a freshly initialised random ConvNet at every iteration, each class's mean embedding of the synthetic
  images matches that of the real images of the class, and (beyond DM) so does its per-feature variance,
  which keeps the images of a class apart (measured: +0.6 points at IPC 10, +0.7 at IPC 50 on digits), and
  the whole distribution through a kernel MMD (Gaussian kernels at 1/4, 1 and 4 times the real embeddings'
  median squared distance, as M3D does; measured: +0.6 points at IPC 50 on digits).

``evaluate(set, data)`` trains fresh ConvNets from scratch only on the set and tests them on the real test split
(the DC / DM protocol: SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 256, lr x0.1 at half the epochs),
over several seeds, beside a random real subset of the same size and the full training set, in the same run.
"""
from __future__ import annotations

import copy
import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from . import models
from .retrain import check_labeled, fit_tensors
from .gan.metrics import sample_like, test_accuracy
from .io import _digest, as_path, read_safetensors, readable_file, write_safetensors
from .ops import _check_int, _check_positive

METHODS = ("sample", "select", "match")
FORMAT = "pysparse-synthetic-set"


@dataclass
class SyntheticSet:
    """``images`` float32 [N, C, H, W] in [0, 1], ``labels`` int64 [N]; ``ipc`` images per class."""
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if not isinstance(self.images, torch.Tensor) or self.images.dim() != 4 or self.images.dtype != torch.float32:
            raise ValueError("images must be a float32 tensor [N, C, H, W]")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64 or \
                self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 of shape ({self.images.shape[0]},)")
        if self.images.shape[0] == 0:
            raise ValueError("a synthetic set needs at least one image")
        if int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes})")
        if not bool(torch.isfinite(self.images).all()):
            raise ValueError("images contain NaN or infinity")
        low, high = float(self.images.min()), float(self.images.max())
        if low < 0 or high > 1:  # what synthesize makes, the GAN trainer and evaluate take: images in [0, 1]
            raise ValueError(f"images must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def ipc(self) -> int:
        """Images per class (the smallest class's count)."""
        return int(torch.bincount(self.labels, minlength=self.num_classes).min())

    def dataset(self) -> TensorDataset:
        """A torch Dataset of (image, label) pairs."""
        return TensorDataset(self.images, self.labels)

    def save(self, path: Union[str, os.PathLike], *, grid: bool = True) -> None:
        """Write ``path`` (safetensors: ``images``, ``labels`` and a checksum in the metadata), atomically, and
        a PNG grid beside it (same name, .png; one row per class)."""
        path = as_path(path)
        tensors = {"images": self.images.contiguous(), "labels": self.labels.contiguous()}
        meta = {"format": FORMAT, "num_classes": str(self.num_classes),
                "image_shape": json.dumps(list(self.image_shape)), "sha256": _digest(tensors)}
        write_safetensors(tensors, path, meta)
        if grid:
            self.save_grid(path.with_suffix(".png"))

    def save_grid(self, path: Union[str, os.PathLike], per_class: int = 10) -> None:
        from torchvision.utils import save_image

        rows = [self.images[self.labels == c][:per_class] for c in range(self.num_classes)]
        n = max(1, min(per_class, max(len(r) for r in rows)))
        pad = [torch.cat([r, torch.full((n - len(r), *self.image_shape), 0.5)]) if len(r) < n else r for r in rows]
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.tmp.png")
        save_image(torch.cat(pad), tmp, nrow=n, padding=1, pad_value=0.5)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], *, image_shape: Optional[tuple[int, int, int]] = None
             ) -> "SyntheticSet":
        """Read a file written by :meth:`save`; ValueError if it is corrupt, not a synthetic set, or (with
        ``image_shape``) of another image size."""
        path = readable_file(path)
        tensors, meta = read_safetensors(path, "a readable synthetic-set file")
        if meta.get("format") != FORMAT or set(tensors) != {"images", "labels"}:
            raise ValueError(f"{path} is not a pysparse synthetic-set file")
        if meta.get("sha256") != _digest(tensors):
            raise ValueError(f"{path} was modified or corrupted after it was written (checksum mismatch)")
        out = cls(tensors["images"], tensors["labels"], int(meta["num_classes"]))
        if image_shape is not None and tuple(out.image_shape) != tuple(image_shape):
            raise ValueError(f"{path} holds {out.image_shape} images, expected {tuple(image_shape)}")
        return out


def _check_ipc(ipc) -> int:
    return _check_int(ipc, "ipc (images per class)", 1)


def _conditional(generator) -> int:
    k = getattr(generator, "num_classes", None)
    if not k or not hasattr(generator, "sample"):
        raise ValueError("synthesize needs a class-conditional generator (pysparse.gan.Generator with "
                         "num_classes); this one cannot be told which class to draw")
    return k


def check_weight(name: str, v) -> float:
    """A loss-term weight of "match" (variance, mmd): a finite number >= 0, else ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return float(v)


def synthesize(generator: nn.Module, ipc: int, *, method: str = "match", real=None, extractor=None,
               candidates: int = 50, iterations: int = 2000, pixels: bool = True, lr: float = 0.05,
               real_batch: int = 64, width: int = 32, variance: float = 1.0, mmd: float = 100.0,
               pixel_lr: Optional[float] = None, pixel_share: float = 1 / 3, augment: bool = False, seed: int = 0,
               progress: bool = False) -> SyntheticSet:
    """``ipc`` images per class from a class-conditional ``generator`` by ``method`` (see the module doc).
    ``real`` (images in [0, 1], labels) is needed by "match" (and by "select" when no ``extractor`` is given:
    a classifier is trained on it); ``candidates`` is the pool per class for "select". "match" runs
    ``iterations`` Adam steps (``lr``) on the latent codes, the last ``pixel_share`` of them on a pixel offset
    instead (``pixel_lr``, default lr / 5) when ``pixels``; each step draws a random ConvNet of ``width``
    channels and ``real_batch`` real images per class, and matches each class's mean embedding and (weighted by
    ``variance``; 0 = means only, as DM) its per-feature variance, plus ``mmd`` times the squared kernel MMD
    between each class's synthetic and real embeddings (0 = off). With ``augment`` both sides are first seen
    through the same random affine transforms (zoom, rotation, shift: differentiable siamese augmentation, as DM
    does with DSA); off by default: on digits, whose evaluation trains without augmentation, it cost 2-4 points
    (benchmarks/RESULTS.md)."""
    ipc = _check_ipc(ipc)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    k = _conditional(generator)
    labels = torch.arange(k).repeat_interleave(ipc)
    if method == "sample":
        return SyntheticSet(sample_like(generator, labels, seed=seed), labels, k)
    if method == "select":
        _check_int(candidates, f"candidates (at least ipc = {ipc})", ipc)
        return _select(generator, ipc, k, candidates, real, extractor, seed)
    if real is None:
        raise ValueError("method 'match' needs real=(images, labels) to match")
    _check_int(iterations, "iterations", 1)
    _check_int(real_batch, "real_batch", 1)
    _check_int(width, "width", 1)
    pixel_lr = lr / 5 if pixel_lr is None else pixel_lr
    _check_positive(lr, "lr")
    _check_positive(pixel_lr, "pixel_lr")
    if not 0.0 < pixel_share < 1.0:
        raise ValueError(f"pixel_share must be in (0, 1), got {pixel_share!r}")
    for name, v in (("variance", variance), ("mmd", mmd)):
        check_weight(name, v)
    if not isinstance(augment, bool):
        raise TypeError(f"augment must be a bool, got {type(augment).__name__}")
    return _match(generator, ipc, k, _real(real, k), iterations, pixels, lr, pixel_lr,
                  pixel_share, real_batch, width, float(variance), float(mmd), augment, seed, progress)


def _real(real, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .gan.trainer import tensors_of

    x, y = tensors_of(real, name="real")
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise ValueError(f"real labels must be in [0, {k})")
    return x, y


def _select(generator, ipc, k, candidates, real, extractor, seed) -> SyntheticSet:
    from .gan import metrics

    if extractor is None:
        if real is None:
            raise ValueError("method 'select' needs extractor= or real=(images, labels) to train one")
        x, y = _real(real, k)
        extractor = metrics.ClassifierFeatures(metrics.train_classifier(x, y, num_classes=k, seed=seed))
    pool_labels = torch.arange(k).repeat_interleave(candidates)
    pool = sample_like(generator, pool_labels, seed=seed)
    feats = torch.cat([extractor(c) for c in pool.split(2048)]).double()
    chosen_t = _herding(feats, pool_labels, ipc, k)
    return SyntheticSet(pool[chosen_t].contiguous(), pool_labels[chosen_t].contiguous(), k)


def _herding(feats: torch.Tensor, labels: torch.Tensor, ipc: int, k: int) -> torch.Tensor:
    """Per class, ``ipc`` indices chosen greedily so that the running mean of the chosen features stays
    closest to the class mean (herding, Welling 2009)."""
    chosen = []
    for c in range(k):
        idx = (labels == c).nonzero().squeeze(1)
        f = feats[idx].double()
        mu, total = f.mean(0), torch.zeros_like(f[0])
        free = torch.ones(len(idx), dtype=torch.bool)
        for t in range(ipc):
            dist = ((mu - (total + f) / (t + 1)) ** 2).sum(1)
            dist[~free] = float("inf")
            j = int(dist.argmin())
            chosen.append(int(idx[j]))
            free[j] = False
            total += f[j]
    return torch.tensor(chosen)


def _affine(n: int, g: torch.Generator, scale: float = 1.2, degrees: float = 15.0, shift: float = 0.125
            ) -> torch.Tensor:
    """n random affine maps [n, 2, 3] for F.affine_grid: zoom in [1/scale, scale], rotation within +-degrees,
    translation within +-shift of the image size (DSA's scale / rotate / crop)."""
    zoom = torch.exp((torch.rand(n, generator=g) * 2 - 1) * math.log(scale))
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(degrees)
    move = (torch.rand(n, 2, generator=g) * 2 - 1) * (2 * shift)  # affine_grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    return torch.stack([torch.stack([cos, -sin, move[:, 0]], 1), torch.stack([sin, cos, move[:, 1]], 1)], 1)


def _transform(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidths) -> torch.Tensor:
    """Squared maximum mean discrepancy between the rows of ``a`` and of ``b`` under a sum of Gaussian kernels
    exp(-|x - y|^2 / (2 s)), one per ``s`` in ``bandwidths`` (the biased estimator: zero when a and b are the
    same set)."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or t.shape[0] == 0:
            raise ValueError(f"mmd2: {name} must be a non-empty 2-D tensor (rows = samples)")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"mmd2: a has {a.shape[1]} features per row but b has {b.shape[1]}")
    bandwidths = list(bandwidths)
    if not bandwidths or not all(float(s) > 0 for s in bandwidths):
        raise ValueError(f"mmd2: bandwidths must be positive, got {bandwidths!r}")
    return _mmd2(a, b, bandwidths)


def _mmd2(a, b, bandwidths):
    """mmd2 without the argument checks (match's inner loop: bandwidths are tensors there, and checking them
    would synchronise a GPU every iteration)."""
    def kernel(x, y):
        d2 = torch.cdist(x, y).pow(2)
        return sum(torch.exp(-d2 / (2 * s)) for s in bandwidths)

    return kernel(a, a).mean() + kernel(b, b).mean() - 2 * kernel(a, b).mean()


def _match(generator, ipc, k, real, iterations, pixels, lr, pixel_lr, pixel_share, real_batch, width, variance,
           mmd, augment, seed, progress) -> SyntheticSet:
    # The dense copy's construction and the random ConvNets draw from torch's global generator: fork it and seed
    # it, so that the set depends on ``seed`` alone (not on what the caller drew before) and the caller's random
    # stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _match_seeded(generator, ipc, k, real, iterations, pixels, lr, pixel_lr, pixel_share, real_batch,
                             width, variance, mmd, augment, seed, progress)


def _match_seeded(generator, ipc, k, real, iterations, pixels, lr, pixel_lr, pixel_share, real_batch, width,
                  variance, mmd, augment, seed, progress) -> SyntheticSet:
    from tqdm.auto import tqdm

    x, y = real
    shape = tuple(x.shape[1:])
    if shape != generator.image_shape:
        raise ValueError(f"the real images are {shape} but the generator draws {generator.image_shape}")
    by_class = [x[y == c] for c in range(k)]
    if any(len(b) == 0 for b in by_class):
        raise ValueError("every class needs at least one real image to match")
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(ipc)
    z = torch.randn(len(labels), generator.latent_dim, generator=g).requires_grad_(True)
    offset = torch.zeros(len(labels), *shape, requires_grad=True)
    # The latents are optimised through a dense copy of the generator (same function): on these 4x4 and 8x8
    # planes the sparse convolutions' forward + backward at 80-90% still take up to ~1.5x the dense ones
    # (benchmarks/RESULTS.md), and nothing here is stored or shipped. The caller's generator is left untouched.
    from .convert import densify

    generator = densify(copy.deepcopy(generator)).eval().requires_grad_(False)
    z_iters = iterations if not pixels else max(1, round(iterations * (1 - pixel_share)))
    opt_z = torch.optim.Adam([z], lr=lr)
    opt_x = torch.optim.Adam([offset], lr=pixel_lr)
    draw = lambda: ((generator(z, labels) + 1) / 2 + offset).clamp(0, 1)  # noqa: E731  the set, in [0, 1]
    for it in tqdm(range(iterations), desc="match", disable=not progress):
        embed = models.convnet(shape[0], k, shape[1], width=width)[:-1].requires_grad_(False)
        images = draw()
        # every class in one forward each (instance norm: no statistic is shared across images)
        picks = [torch.randint(0, len(p), (min(real_batch, len(p)),), generator=g) for p in by_class]
        real_x = torch.cat([p[i] for p, i in zip(by_class, picks)])
        if augment:  # siamese: the i-th real and the i-th synthetic image of every class share one transform
            theta = _affine(max(real_batch, ipc), g)
            real_x = _transform(real_x, torch.cat([theta[:len(i)] for i in picks]))
            images = _transform(images, theta[:ipc].repeat(k, 1, 1))
        with torch.no_grad():
            per_class = embed(real_x).split([len(i) for i in picks])
            target = torch.stack([f.mean(0) for f in per_class])
        mine_f = embed(images).reshape(k, ipc, -1)
        loss = (mine_f.mean(1) - target).pow(2).sum()
        if variance and ipc > 1:  # and the spread: each class's per-feature variance
            tvar = torch.stack([f.var(0) for f in per_class])
            loss = loss + variance * (mine_f.var(1) - tvar).pow(2).sum()
        if mmd:  # and the whole distribution, through kernels scaled to the real embeddings' spread
            for c, f in enumerate(per_class):
                med = torch.cdist(f, f).pow(2).median().clamp_min(1e-12)
                loss = loss + mmd * _mmd2(mine_f[c], f, (med / 4, med, med * 4))
        opt = opt_z if it < z_iters else opt_x
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        images = draw()
    return SyntheticSet(images.detach().contiguous(), labels, k)


# ---- evaluation ----
def train_convnet(x: torch.Tensor, y: torch.Tensor, *, num_classes: int, epochs: int, seed: int,
                  width: int = 128, batch_size: int = 256, lr: float = 0.01) -> nn.Module:
    """A fresh ConvNet trained only on (x, y) by the DC / DM recipe: SGD(lr, momentum 0.9, wd 5e-4), batch 256,
    lr x0.1 at half the epochs."""
    check_labeled(x, y, num_classes)
    torch.manual_seed(seed)
    net = models.convnet(x.shape[1], num_classes, x.shape[-1], width=width)
    return fit_tensors(net, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, schedule="step")


def random_subset(train: tuple[torch.Tensor, torch.Tensor], ipc: int, num_classes: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``ipc`` random real images of each class."""
    _check_ipc(ipc)
    _check_int(num_classes, "num_classes", 1)
    x, y = train
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(num_classes):
        pool = (y == c).nonzero().squeeze(1)
        if len(pool) < ipc:
            raise ValueError(f"ipc {ipc} is larger than class {c}'s {len(pool)} real training images")
        idx.append(pool[torch.randperm(len(pool), generator=g)[:ipc]])
    i = torch.cat(idx)
    return x[i], y[i]


def _stats(accs: list[float]) -> dict:
    return {"mean": statistics.mean(accs), "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "runs": accs}


def evaluate(synthetic: SyntheticSet, data, *, seeds: int = 5, epochs: int = 300, full_epochs: int = 50,
             width: int = 128, baselines: bool = True, full: bool = True, progress: bool = False) -> dict:
    """Test accuracy (mean, std over ``seeds``) of ConvNets trained from scratch only on ``synthetic``; with
    ``baselines``, in the same run and recipe, on a random real subset of the same size per class (a new
    subset per seed) and (``full``) on the whole training set (``full_epochs``: 50 epochs of the 1437 digits
    are 300 steps, as many as 300 epochs of an IPC-10 set). ``data``: a ``pysparse.data.Split`` (or anything with ``.train``, ``.test``)."""
    from tqdm.auto import tqdm

    from .gan.trainer import tensors_of

    if not isinstance(synthetic, SyntheticSet):
        raise TypeError(f"synthetic must be a SyntheticSet, got {type(synthetic).__name__}")
    _check_int(seeds, "seeds", 1)
    train, test = tensors_of(data.train, name="train"), tensors_of(data.test, name="test")
    if tuple(train[0].shape[1:]) != synthetic.image_shape:
        raise ValueError(f"the synthetic images are {synthetic.image_shape}, the data's {tuple(train[0].shape[1:])}")
    k = synthetic.num_classes
    runs: dict[str, list[float]] = {"synthetic": []}
    if baselines:
        runs["random_real"] = []
        if full:
            runs["full"] = []
    bar = tqdm(total=seeds * len(runs), desc="evaluate", disable=not progress)
    for s in range(seeds):
        kw = dict(num_classes=k, epochs=epochs, seed=s, width=width)
        runs["synthetic"].append(test_accuracy(train_convnet(synthetic.images, synthetic.labels, **kw), test))
        bar.update(1)
        if baselines:
            rx, ry = random_subset(train, synthetic.ipc, k, seed=1000 + s)
            runs["random_real"].append(test_accuracy(train_convnet(rx, ry, **kw), test))
            bar.update(1)
            if full:
                kw["epochs"] = full_epochs
                runs["full"].append(test_accuracy(train_convnet(*train, **kw), test))
                bar.update(1)
    bar.close()
    out = {name: _stats(v) for name, v in runs.items()}
    out.update(ipc=synthetic.ipc, images=len(synthetic), seeds=seeds, epochs=epochs)
    return out
