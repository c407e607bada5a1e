"""GANTrainer: alternating generator / discriminator updates on sparse models, with gradual or fixed sparsity,
a generator EMA, atomic checkpoints that resume exactly, sample grids, loss curves, and DDP.

Randomness is a pure function of (seed, step, rank): every step draws its latent codes, fake labels and (for
random saliency) pruning scores from a generator seeded by those numbers, and each epoch's data order from
(seed, epoch). Nothing depends on RNG state carried between steps, so a run resumed from a checkpoint at step
t continues exactly as the uninterrupted run does (on CPU, same seed).
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch.utils.data import Dataset

from ..io import atomic_write, readable_file
from ..ops import _check_fraction, _check_positive
from ..ops import _check_int as _int
from ..schedule import cubic_sparsity
from ..shrink import METHODS as SALIENCIES, model_sparsity, shrink, sparse_layers
from .losses import check_loss, d_loss, g_loss
from .models import Discriminator, Generator

FORMAT = "pysparse-gan-checkpoint"
VERSION = 1
SCHEDULES = ("gradual", "fixed")
ORDERS = ("gd", "dg")
_MIX = 0x9E3779B97F4A7C15


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (splitmix-style), so nearby (seed, step, rank) give unrelated streams."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * _MIX & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _rng(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_seed(*parts))


def tensors_of(data: Union[Dataset, tuple], *, name: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, C, H, W] in [0, 1], labels int64 [N]) from a Dataset of (image, label) or a tensor pair."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
    else:
        try:
            n = len(data)
        except TypeError:
            raise TypeError(f"{name} must be a Dataset of (image, label) or a tuple (images, labels), got "
                            f"{type(data).__name__}") from None
        if n == 0:
            raise ValueError(f"{name} is empty")
        try:
            loader = torch.utils.data.DataLoader(data, batch_size=1024)
            xs, ys = zip(*[(b[0], b[1]) for b in loader])
            x, y = torch.cat(xs), torch.cat(ys)
        except (RuntimeError, TypeError, IndexError, KeyError, ValueError) as exc:
            raise TypeError(f"{name} must be a Dataset of (image, label) pairs or a tuple (images, labels): "
                            f"reading it failed ({type(exc).__name__}: {exc})") from None
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{name}: images must be float [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    y = torch.as_tensor(y).long()
    if y.shape != (x.shape[0],):
        raise ValueError(f"{name}: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: images contain NaN or infinity")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:  # the generator draws in [0, 1]: normalised data would be matched against the wrong range
        raise ValueError(f"{name}: images must be in [0, 1] (the generator's range), got values in [{lo:.4g}, {hi:.4g}]")
    return x.float(), y


def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class GANTrainer:
    """Trains ``generator`` against ``discriminator`` on ``data`` (a Dataset of (image in [0, 1], label) or a
    tuple (images, labels); images are scaled to [-1, 1] for the models).

    Each step: a G step with D fixed and ``n_critic`` D steps with G fixed, in ``order`` "gd" (G first, the
    original description) or "dg". ``loss``: "non_saturating" (default), "minimax" or "hinge". Adam(lr, betas)
    for both. The EMA copy ``ema`` of G (decay ``ema_decay``, warmed up as min(decay, (1+t)/(10+t))) is the one
    to sample from.

    Sparsity: ``g_sparsity`` / ``d_sparsity`` are the targets for the sparse layers of each model. With
    ``schedule="gradual"`` (default) they are reached by Zhu & Gupta's cubic ramp from ``prune_begin`` to
    ``prune_end`` (default: 0 to half the steps), pruning every ``prune_every`` steps by ``saliency``
    (magnitude | gradient | taylor | random), each layer to the target (``prune_scope="layer"``) or all ranked
    together (``"global"``); with ``"fixed"`` the models are pruned once before the first step
    (``saliency="taylor"`` on one batch is SNIP; or random). Pruned weights are not stored at all, so they stay
    pruned after every step by construction.

    ``out``: a folder for checkpoints (``checkpoint.pt`` every ``checkpoint_every`` steps, at the end and on
    Ctrl-C), sample grids every ``sample_every`` steps and ``losses.png``. Under torch.distributed the models
    are wrapped in DistributedDataParallel, each rank takes its share of every batch, and only rank 0 writes.
    """

    def __init__(self, generator: Generator, discriminator: Discriminator, data, *, steps: int,
                 batch_size: int = 64, loss: str = "non_saturating", order: str = "gd", n_critic: int = 1,
                 lr_g: float = 2e-4, lr_d: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999),
                 ema_decay: float = 0.999, g_sparsity: float = 0.0, d_sparsity: float = 0.0,
                 schedule: str = "gradual", saliency: str = "magnitude", prune_scope: str = "layer",
                 prune_begin: Optional[int] = None,
                 prune_end: Optional[int] = None, prune_every: int = 50, seed: int = 0,
                 out: Optional[Union[str, os.PathLike]] = None, checkpoint_every: Optional[int] = None,
                 sample_every: Optional[int] = None, progress: bool = True) -> None:
        if not isinstance(generator, Generator) or not isinstance(discriminator, Discriminator):
            raise TypeError("generator and discriminator must be pysparse.gan.Generator / Discriminator, got "
                            f"{type(generator).__name__} / {type(discriminator).__name__}")
        shape = generator.image_shape
        if discriminator.image_shape != shape:
            raise ValueError("the generator and the discriminator are built for different image shapes")
        if (generator.num_classes is None) != (discriminator.num_classes is None) or \
                generator.num_classes != discriminator.num_classes:
            raise ValueError("the generator and the discriminator must both be unconditional or both conditional "
                             "on the same number of classes")
        self.steps = _int(steps, "steps", 1)
        self.batch_size = _int(batch_size, "batch_size", 1)
        self.loss = check_loss(loss)
        if order not in ORDERS:
            raise ValueError(f"order must be 'gd' (G step first) or 'dg', got {order!r}")
        self.order, self.n_critic = order, _int(n_critic, "n_critic", 1)
        _check_positive(lr_g, "lr_g")
        _check_positive(lr_d, "lr_d")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.ema_decay = _check_fraction(ema_decay, "ema_decay")
        self.g_sparsity = _check_fraction(g_sparsity, "g_sparsity")
        self.d_sparsity = _check_fraction(d_sparsity, "d_sparsity")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be 'gradual' or 'fixed', got {schedule!r}")
        if saliency not in SALIENCIES:
            raise ValueError(f"saliency must be one of {', '.join(SALIENCIES)}, got {saliency!r}")
        if prune_scope not in ("layer", "global"):
            raise ValueError(f"prune_scope must be 'layer' or 'global', got {prune_scope!r}")
        self.schedule, self.saliency, self.prune_scope = schedule, saliency, prune_scope
        for model, target, name in ((generator, self.g_sparsity, "generator"), (discriminator, self.d_sparsity,
                                                                              "discriminator")):
            if target > 0 and not sparse_layers(model):
                raise ValueError(f"a {name} sparsity above 0 needs a {name} built from sparse layers "
                                 "(sparse=True)")
        self.prune_begin = _int(prune_begin, "prune_begin", 0, none_ok=True) or 0
        self._default_end = prune_end is None  # derived from steps: a resumed run keeps the checkpoint's
        self.prune_end = _int(prune_end, "prune_end", 1, none_ok=True) or max(self.prune_begin + 1, self.steps // 2)
        if self.prune_end <= self.prune_begin:
            raise ValueError(f"prune_end ({self.prune_end}) must be after prune_begin ({self.prune_begin})")
        self.prune_every = _int(prune_every, "prune_every", 1)
        self.seed = _int(seed, "seed", 0)
        self.checkpoint_every = _int(checkpoint_every, "checkpoint_every", 1, none_ok=True)
        self.sample_every = _int(sample_every, "sample_every", 1, none_ok=True)
        self.out = Path(out) if out is not None else None
        self.progress = progress
        self.lr_g, self.lr_d, self.betas = float(lr_g), float(lr_d), tuple(float(b) for b in betas)

        self.x, self.y = tensors_of(data)
        if tuple(self.x.shape[1:]) != shape:
            raise ValueError(f"the data's images are {tuple(self.x.shape[1:])} but the models are built for "
                             f"{shape}")
        if generator.num_classes is not None and (int(self.y.min()) < 0 or
                                                  int(self.y.max()) >= generator.num_classes):
            raise ValueError(f"labels must be in [0, {generator.num_classes})")
        self.rank, self.world = _dist()
        if self.x.shape[0] < self.batch_size * self.world:
            raise ValueError(f"the data has {self.x.shape[0]} images, fewer than one batch "
                             f"({self.batch_size} x {self.world} ranks)")
        self.device = next(generator.parameters()).device
        self.x = self.x.mul(2).sub(1).to(self.device)
        self.y = self.y.to(self.device)
        self.G, self.D = generator, discriminator
        self.ema = copy.deepcopy(generator).requires_grad_(False)
        self.step_count = 0
        self.history: dict[str, list[float]] = {"g_loss": [], "d_loss": [], "d_real": [], "d_fake": [],
                                                "g_sparsity": [], "d_sparsity": []}
        self._make_optimizers()
        self._wrap()

    # ---- setup ----
    def _make_optimizers(self) -> None:
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=self.lr_g, betas=self.betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=self.lr_d, betas=self.betas)

    def _wrap(self) -> None:
        """DDP wrappers under torch.distributed (rebuilt after pruning changes the parameters)."""
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            dev = [self.device.index] if self.device.type == "cuda" else None
            self.G_ddp, self.D_ddp = DDP(self.G, device_ids=dev), DDP(self.D, device_ids=dev)
        else:
            self.G_ddp, self.D_ddp = self.G, self.D

    def _config(self) -> dict:
        return {"generator": self.G.config, "discriminator": self.D.config,
                "trainer": dict(steps=self.steps, batch_size=self.batch_size, loss=self.loss, order=self.order,
                                n_critic=self.n_critic, lr_g=self.lr_g, lr_d=self.lr_d, betas=list(self.betas),
                                ema_decay=self.ema_decay, g_sparsity=self.g_sparsity, d_sparsity=self.d_sparsity,
                                schedule=self.schedule, saliency=self.saliency, prune_scope=self.prune_scope,
                                prune_begin=self.prune_begin,
                                prune_end=self.prune_end, prune_every=self.prune_every, seed=self.seed)}

    # ---- data and noise: pure functions of (seed, epoch / step, rank) ----
    def _real_batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k-th real batch of the run (this rank's share)."""
        n, per = self.x.shape[0], self.batch_size * self.world
        per_epoch = n // per
        epoch, i = divmod(k, per_epoch)
        perm = torch.randperm(n, generator=_rng(self.seed, 1, epoch))
        idx = perm[i * per + self.rank * self.batch_size: i * per + (self.rank + 1) * self.batch_size].to(self.device)
        return self.x[idx], self.y[idx]

    def _noise(self, step: int, slot: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        g = _rng(self.seed, 2, step, slot, self.rank)
        z = torch.randn(self.batch_size, self.G.latent_dim, generator=g).to(self.device)
        y = None
        if self.G.num_classes is not None:
            y = torch.randint(0, self.G.num_classes, (self.batch_size,), generator=g).to(self.device)
        return z, y

    # ---- one step ----
    def _g_step(self, step: int) -> float:
        z, yf = self._noise(step, 0)
        self.D.requires_grad_(False)
        try:
            fake = self.G_ddp(z, yf)
            loss = g_loss(self.loss, self.D(fake, yf))  # D fixed: its plain module, no DDP reduction
            self.opt_g.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_g.step()
        finally:
            self.D.requires_grad_(True)
        self._update_ema(step)
        return float(loss.detach())

    def _d_step(self, step: int, k: int) -> tuple[float, float, float]:
        x, y = self._real_batch(step * self.n_critic + k)
        z, yf = self._noise(step, 1 + k)
        with torch.no_grad():
            fake = self.G(z, yf)
        labels = None if yf is None else torch.cat([y, yf])
        logits = self.D_ddp(torch.cat([x, fake]), labels)  # one forward: DDP reduces once
        real, fk = logits[: x.shape[0]], logits[x.shape[0]:]
        loss = d_loss(self.loss, real, fk)
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return float(loss.detach()), float(real.detach().mean()), float(fk.detach().mean())

    def _update_ema(self, step: int) -> None:
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.G.parameters()):
                e.lerp_(p.detach(), 1.0 - decay)
            for e, b in zip(self.ema.buffers(), self.G.buffers()):
                e.copy_(b)

    def _prune(self, step: int) -> None:
        """Prune to this step's targets (gradual) or, at step 0, straight to the final targets (fixed)."""
        changed = False
        for model, final, opt, followers, slot in ((self.G, self.g_sparsity, self.opt_g, [self.ema], 0),
                                                   (self.D, self.d_sparsity, self.opt_d, [], 1)):
            if final == 0.0:
                continue
            if self.schedule == "fixed":
                if step != 0:
                    continue
                target = final
            else:
                due = self.prune_begin <= step <= self.prune_end and (step - self.prune_begin) % self.prune_every == 0
                if not (due or step == self.prune_end):
                    continue
                target = cubic_sparsity(step, final=final, begin=self.prune_begin, end=self.prune_end)
            if target <= model_sparsity(model) + 1e-12:
                continue
            removed = shrink(model, target, self.saliency, scope=self.prune_scope, optimizers=[opt],
                             followers=followers,
                             generator=_rng(self.seed, 3, step, slot))
            changed |= bool(removed)
        if changed:
            self._wrap()

    def _score_batch(self) -> None:
        """One G and one D backward without an update: the gradients SNIP-style saliencies read at step 0."""
        z, yf = self._noise(0, 1000)
        x, y = self._real_batch(0)
        fake = self.G(z, yf)
        labels = None if yf is None else torch.cat([y, yf])
        logits = self.D(torch.cat([x, fake]), labels)
        self.G.zero_grad(set_to_none=True)
        self.D.zero_grad(set_to_none=True)
        real, fk = logits[: x.shape[0]], logits[x.shape[0]:]
        d_loss(self.loss, real, fk).backward(retain_graph=True, inputs=list(self.D.parameters()))
        g_loss(self.loss, fk).backward(inputs=list(self.G.parameters()))

    def train_step(self) -> dict[str, float]:
        """One step (G step and n_critic D steps), then any pruning due; returns the step's losses."""
        step = self.step_count
        if step == 0 and self.schedule == "fixed" and self.saliency in ("gradient", "taylor"):
            self._score_batch()
        if step == 0 and self.schedule == "fixed":
            self._prune(0)
        lg = None
        d = []
        if self.order == "gd":
            lg = self._g_step(step)
        for k in range(self.n_critic):
            d.append(self._d_step(step, k))
        if self.order == "dg":
            lg = self._g_step(step)
        if self.schedule == "gradual":
            self._prune(step)
        self.step_count = step + 1
        rec = {"g_loss": lg, "d_loss": sum(a for a, _, _ in d) / len(d), "d_real": sum(b for _, b, _ in d) / len(d),
               "d_fake": sum(c for _, _, c in d) / len(d), "g_sparsity": model_sparsity(self.G),
               "d_sparsity": model_sparsity(self.D)}
        for k, v in rec.items():
            self.history[k].append(v)
        return rec

    # ---- the loop ----
    def fit(self, steps: Optional[int] = None) -> dict[str, list[float]]:
        """Train until step ``steps`` (default: the ``steps`` given at construction), checkpointing, sampling
        and plotting as configured; Ctrl-C writes a checkpoint first. Returns the loss history."""
        end = self.steps if steps is None else _int(steps, "steps", 0)
        from tqdm.auto import tqdm

        bar = tqdm(total=end, initial=min(self.step_count, end), desc="GAN", disable=not self.progress or
                   self.rank != 0, dynamic_ncols=True)
        try:
            while self.step_count < end:
                rec = self.train_step()
                bar.update(1)
                if self.step_count % 10 == 0:
                    bar.set_postfix(g=f"{rec['g_loss']:.3f}", d=f"{rec['d_loss']:.3f}",
                                    sG=f"{rec['g_sparsity']:.2f}", sD=f"{rec['d_sparsity']:.2f}")
                if self.out is not None:
                    if self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
                        self._sync_buffers()
                        self.save_checkpoint(self.out / "checkpoint.pt")
                    if self.sample_every and self.step_count % self.sample_every == 0:
                        self.save_samples(self.out / f"samples_{self.step_count:06d}.png")
        except KeyboardInterrupt:
            if self.out is not None:
                self.save_checkpoint(self.out / "checkpoint.pt")
            raise
        finally:
            bar.close()
        self._sync_buffers()
        if self.out is not None:
            self.save_checkpoint(self.out / "checkpoint.pt")
            self.save_samples(self.out / "samples.png")
            self.plot_losses(self.out / "losses.png")
        return self.history

    def _sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm statistics, which each rank updates from its own shard; spectral-norm
        vectors) on every rank, so all ranks hold the same models (every rank must call it)."""
        if self.world > 1:
            for model in (self.G, self.D, self.ema):
                for b in model.buffers():
                    torch.distributed.broadcast(b, 0)

    # ---- outputs (rank 0 only) ----
    def save_samples(self, path: Union[str, os.PathLike], per_class: int = 10) -> None:
        """A PNG grid from the EMA generator with fixed codes: one row per class if conditional."""
        if self.rank != 0:
            return
        from torchvision.utils import save_image

        g = _rng(self.seed, 4)
        if self.G.num_classes is not None:
            y = torch.arange(self.G.num_classes).repeat_interleave(per_class).to(self.device)
            images, nrow = self.ema.sample(y.numel(), y, generator=g), per_class
        else:
            images, nrow = self.ema.sample(100, generator=g), 10
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.png")
        save_image(images, tmp, nrow=nrow, padding=1, pad_value=0.5)
        os.replace(tmp, path)

    def plot_losses(self, path: Union[str, os.PathLike]) -> None:
        if self.rank != 0 or not self.history["g_loss"]:
            return
        from ..sensitivity import _save_figure
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
        w = max(1, len(self.history["g_loss"]) // 100)
        smooth = (lambda v: torch.tensor(v).unfold(0, w, w).mean(1).tolist()) if w > 1 else (lambda v: v)
        xs = [(i + 1) * w for i in range(len(self.history["g_loss"]) // w)]
        for key in ("g_loss", "d_loss"):
            a.plot(xs, smooth(self.history[key]), label=key)
        a.set_xlabel("step")
        a.set_title(f"losses ({self.loss})")
        a.legend()
        for key in ("d_real", "d_fake"):
            b.plot(xs, smooth(self.history[key]), label=key)
        b.set_xlabel("step")
        b.set_title("mean D logits")
        b.legend()
        fig.tight_layout()
        _save_figure(fig, path)

    # ---- checkpoints ----
    def state_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "config": json.dumps(self._config(), sort_keys=True),
                "step": self.step_count, "generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
                "ema": self.ema.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "history": {k: torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()},
                "torch_rng": torch.get_rng_state()}

    def save_checkpoint(self, path: Union[str, os.PathLike]) -> None:
        """Write every piece of training state to ``path`` atomically (temp file + rename; rank 0 only)."""
        if self.rank == 0:
            state = self.state_dict()
            atomic_write(path, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, path: Union[str, os.PathLike]) -> "GANTrainer":
        """Restore a checkpoint written by a trainer with the same models and settings (``steps`` may
        differ); then ``fit`` continues from its step."""
        state = read_checkpoint(path)
        mine, theirs = self._config(), json.loads(state["config"])
        for key in ("generator", "discriminator"):
            if mine[key] != theirs[key]:
                raise ValueError(f"{path} is a checkpoint of another architecture: its {key} is {theirs[key]}, "
                                 f"this trainer's is {mine[key]}")
        a, b = dict(mine["trainer"]), dict(theirs["trainer"])
        a.pop("steps"), b.pop("steps")
        if self._default_end:  # the schedule's end came from the checkpoint run's steps: keep it
            a["prune_end"] = b.get("prune_end")
        if a != b:
            diff = {k: (b.get(k), a.get(k)) for k in a if a.get(k) != b.get(k)}
            raise ValueError(f"{path} was trained with other settings (checkpoint, this trainer): {diff}")
        try:
            for module, key in ((self.G, "generator"), (self.D, "discriminator"), (self.ema, "ema")):
                module.load_state_dict(state[key])
            self.ema.requires_grad_(False)
            self._make_optimizers()  # the sparse layers' values may have new shapes: fresh optimizers, then state
            self.opt_g.load_state_dict(state["opt_g"])
            self.opt_d.load_state_dict(state["opt_d"])
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"{path} does not fit these models: {exc}") from exc
        if self._default_end:
            self.prune_end = int(theirs["trainer"]["prune_end"])
        self.step_count = int(state["step"])
        self.history = {k: v.tolist() for k, v in state["history"].items()}
        torch.set_rng_state(state["torch_rng"])
        self._wrap()
        return self


def _load_error(exc: Exception) -> str:
    """torch.load's reason in a line. A weights-only refusal comes as a page of advice, which includes loading
    again with weights_only=False (running the file's pickled code: never for a file that fails here): only
    the refusal's own reason is kept."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        return "loading it without running pickled code refused it: " + " ".join(reason.split())
    return f"{type(exc).__name__}: {' '.join(text.split())}" if text.strip() else type(exc).__name__


def read_checkpoint(path: Union[str, os.PathLike]) -> dict:
    """Load a GAN checkpoint without running pickled code (``weights_only=True``); ValueError if it is not one."""
    path = readable_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupted, or not a torch file at all
        raise ValueError(f"{path} is not a readable pysparse GAN checkpoint (corrupted or foreign): "
                         f"{_load_error(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pysparse GAN checkpoint")
    if state.get("version") != VERSION:
        raise ValueError(f"{path} has checkpoint version {state.get('version')}, this pysparse reads {VERSION}")
    return state


def models_from_checkpoint(path: Union[str, os.PathLike]) -> tuple[Generator, Discriminator, Generator]:
    """(G, D, EMA G) rebuilt from a checkpoint's stored architecture and weights."""
    state = read_checkpoint(path)
    cfg = json.loads(state["config"])
    G, D = Generator(**cfg["generator"]), Discriminator(**cfg["discriminator"])
    ema = Generator(**cfg["generator"])
    try:
        G.load_state_dict(state["generator"])
        D.load_state_dict(state["discriminator"])
        ema.load_state_dict(state["ema"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: the weights do not fit the stored architecture: {exc}") from exc
    return G, D, ema.eval()
