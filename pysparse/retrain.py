"""Retraining a pruned model: the three correction modes.

- ``"connectivity"``: only the kept weights train; pruned weights, their gradients and the optimizer's state for
  them stay exactly zero at every step (the fused ``apply_mask_`` kernel, after every backward and step).
- ``"weight"``: every weight trains (pruned ones restart at zero) at the given (pre-pruning) learning rate; then
  the mask is chosen again with the same method and sparsity, and the result says how many connections changed.
- ``"network"``: the weights are rewound to their initial values (``remember_init``), keeping the mask, and the
  network trains again with connectivity correction (the lottery-ticket recipe).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .nn._sparse_weight import SparseWeight, check_mask
from .nn.attention import SparseMultiheadAttention
from .prune import prune

MODES = ("connectivity", "weight", "network")
_INIT_ATTR = "_pysparse_init_state"


def remember_init(model: nn.Module) -> dict[str, torch.Tensor]:
    """Save a copy of ``model``'s current weights (call it at initialisation, or at an early checkpoint) for
    ``retrain(mode="network")``; returns the copy."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    object.__setattr__(model, _INIT_ATTR, state)
    return state


@dataclass
class RetrainResult:
    mode: str
    masks: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)       # mean training loss per epoch
    accuracy_before: Optional[float] = None
    accuracy_after: Optional[float] = None
    changed: Optional[int] = None                            # weight mode: connections whose mask flipped


def _check_inputs(inputs, what: str) -> None:
    """ValueError if a floating-point input batch holds NaN or inf."""
    if isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise ValueError(f"{what} holds NaN or inf")


def accuracy(model: nn.Module, data: Iterable) -> float:
    """Top-1 accuracy of ``model`` on (inputs, targets) batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for inputs, targets in data:
            _check_inputs(inputs, "the evaluation data")
            outputs = model(inputs)
            if bool(torch.isnan(outputs).any()):  # argmax would pick a class and count it
                raise ValueError("the model's outputs hold NaN: no accuracy to measure")
            correct += int((outputs.argmax(-1) == targets).sum())
            total += targets.numel()
    model.train(was_training)
    if total == 0:
        raise ValueError("the evaluation data yielded no example")
    return correct / total


def _optimizer(name_or_factory, params, lr, momentum, weight_decay):
    if callable(name_or_factory):
        return name_or_factory(params)
    if name_or_factory == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name_or_factory == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd', 'adam' or a callable params -> optimizer, got {name_or_factory!r}")


def mask_parameter_(mask: torch.Tensor, p: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None, *,
                    grad: bool = False) -> None:
    """Zero a parameter where ``mask`` is False, with (``grad``) its gradient and every tensor of its shape in
    ``optimizer``'s state (momentum, Adam's moments), in one fused pass."""
    state = optimizer.state.get(p, {}) if optimizer is not None else {}
    extra = [t for t in state.values() if isinstance(t, torch.Tensor) and t.shape == p.shape]
    ops.apply_mask_(mask, p.data, p.grad if grad else None, *extra)


def fit(model: nn.Module, data: Iterable, opt: torch.optim.Optimizer, *, epochs: int,
        loss_fn: Callable = F.cross_entropy, masks: Optional[Mapping[torch.Tensor, torch.Tensor]] = None,
        progress: bool = False, desc: str = "train", teacher: Optional[nn.Module] = None,
        temperature: float = 4.0, alpha: float = 0.9) -> list[float]:
    """The training loop: ``epochs`` passes over ``data``; returns the mean loss of each. With ``masks``
    (parameter tensor -> keep-mask), gradients are masked before every step and the weights and the optimizer's
    state after it (connectivity correction). With ``teacher``, the loss is :func:`distillation_loss`."""
    epoch_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm
        epoch_iter = tqdm(epoch_iter, desc=desc)
    model.train()
    losses = []
    for _ in epoch_iter:
        total, count = 0.0, 0
        for inputs, targets in data:
            opt.zero_grad(set_to_none=True)
            if teacher is None:
                loss = loss_fn(model(inputs), targets)
            else:
                with torch.no_grad():
                    soft = teacher(inputs)
                loss = distillation_loss(model(inputs), soft, targets, temperature=temperature, alpha=alpha,
                                         loss_fn=loss_fn)
            if not torch.isfinite(loss):
                _check_inputs(inputs, "the training data")  # the data's fault, not the learning rate's
                raise ValueError("the training loss became NaN or inf: lower lr")
            loss.backward()
            if masks:
                for p, m in masks.items():
                    if p.grad is not None:
                        ops.apply_mask_(m, p.grad)
            opt.step()
            if masks:
                with torch.no_grad():
                    for p, m in masks.items():
                        mask_parameter_(m, p, opt)
            total += float(loss.detach()) * targets.shape[0]
            count += targets.shape[0]
        if count == 0:
            raise ValueError("data yielded no batch")
        losses.append(total / count)
    return losses


def check_labeled(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> None:
    """A labeled image set for a classifier: x a float tensor of finite values, y int64 labels in [0,
    num_classes), one per image; ValueError / TypeError naming what is wrong."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    ops._check_int(num_classes, "num_classes", 1)
    if not x.is_floating_point():
        raise TypeError(f"x must be a float tensor, got {x.dtype}")
    if y.dtype != torch.long or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must be int64 labels, one per image of x ({x.shape[0]}), got {y.dtype} "
                         f"{tuple(y.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or inf")
    if y.numel() and not (0 <= int(y.min()) and int(y.max()) < num_classes):
        raise ValueError(f"y must be in [0, {num_classes}) (num_classes = {num_classes}), got labels in "
                         f"[{int(y.min())}, {int(y.max())}]")


def fit_tensors(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
                seed: int, schedule: str = "step") -> nn.Module:
    """The classifier recipe of the evaluation code (synthetic-set evaluation, GAN metrics): SGD (momentum 0.9,
    weight decay 5e-4) over in-memory tensors in mini-batches, shuffled every epoch from ``seed``; ``schedule``
    "step" (lr x0.1 at half the epochs: DC / DM) or "cosine" (annealed to zero, per step). Returns ``net`` in
    eval mode."""
    if schedule not in ("step", "cosine"):
        raise ValueError(f"schedule must be 'step' or 'cosine', got {schedule!r}")
    ops._check_int(epochs, "epochs")
    ops._check_int(batch_size, "batch_size", 1)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
    ops._check_positive(lr, "lr")
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    cosine = None
    if schedule == "cosine":
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * max(1, -(-x.shape[0] // batch_size)))
    net.train()
    for epoch in range(epochs):
        if cosine is None and epoch == epochs // 2:
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if cosine is not None:
                cosine.step()
    return net.eval()


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor, *,
                      temperature: float = 4.0, alpha: float = 0.9, loss_fn: Callable = F.cross_entropy
                      ) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): alpha * T^2 * KL(teacher_T || student_T) on logits
    softened by temperature T, plus (1 - alpha) * loss_fn(logits, targets) on the labels."""
    if teacher_logits.shape != logits.shape:  # F.kl_div would broadcast or fail on a size deep in its graph
        raise ValueError(f"the teacher's logits have shape {tuple(teacher_logits.shape)} but the model's "
                         f"{tuple(logits.shape)}: the teacher must score the same classes")
    t = float(temperature)
    kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1), reduction="batchmean",
                  log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * loss_fn(logits, targets)


def _as_batches(data, batch_size: int = 64, seed: int = 0):
    """A SyntheticSet becomes a shuffled DataLoader of its images; anything else is used as it is."""
    from .synth import SyntheticSet

    if isinstance(data, SyntheticSet):
        from .data import loader

        return loader(data.dataset(), batch_size, shuffle=True, seed=seed)
    return data


def train(model: nn.Module, data: Iterable, *, epochs: int, lr: float, optimizer: Union[str, Callable] = "sgd",
          loss_fn: Callable = F.cross_entropy, momentum: float = 0.9, weight_decay: float = 0.0,
          progress: bool = False) -> list[float]:
    """Train a (dense) model; returns the mean loss per epoch."""
    ops._check_int(epochs, "epochs")
    ops._check_positive(lr, "lr")
    opt = _optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    return fit(model, data, opt, epochs=epochs, loss_fn=loss_fn, progress=progress)


def retrain(model: nn.Module, masks: Mapping[str, torch.Tensor], mode: str, data: Iterable, *, epochs: int,
            lr: float, optimizer: Union[str, Callable] = "sgd", loss_fn: Callable = F.cross_entropy,
            momentum: float = 0.9, weight_decay: float = 0.0, eval_data: Optional[Iterable] = None,
            init_state: Optional[Mapping[str, torch.Tensor]] = None, method: Optional[str] = None,
            sparsity: Optional[float] = None, prune_kwargs: Optional[Mapping] = None,
            teacher: Optional[nn.Module] = None, temperature: float = 4.0, alpha: float = 0.9,
            progress: bool = False) -> RetrainResult:
    """Retrain a pruned ``model`` (masks keyed by parameter name, True = keep) by one of the three modes.

    A sparsified model (``pysparse.sparsify``) retrains with ``mode="connectivity"``: its sparse layers' masks,
    keyed ``"<layer>.weight"`` as well, become their structure (the layers store only the kept weights, so
    nothing needs masking after a step); the other modes need the pruned weights and raise for such layers.

    ``data`` is any iterable of (inputs, targets) batches, iterated once per epoch. ``optimizer`` is "sgd"
    (with ``momentum``), "adam", or a callable building one from the parameters. ``eval_data`` adds accuracy
    before and after. ``mode="weight"`` needs ``method`` and ``sparsity`` to choose the mask again (and, for a
    data-driven method, uses ``data`` and ``loss_fn``; ``prune_kwargs`` passes more to ``pysparse.prune``).
    ``mode="network"`` rewinds to ``init_state`` or to what ``remember_init`` saved.

    Data-free retraining: ``data`` may be a ``pysparse.synth.SyntheticSet`` (batches of 64, shuffled), and
    ``teacher`` (e.g. the dense model) turns the loss into knowledge distillation: ``alpha`` * T^2 * KL on logits
    softened by ``temperature`` T, plus (1 - ``alpha``) * ``loss_fn`` on the labels.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    ops._check_int(epochs, "epochs")
    ops._check_positive(lr, "lr")
    params = dict(model.named_parameters())
    # sparse layers (after pysparse.sparsify): their masks are keyed by "<layer>.weight" too, a view, not a parameter
    sparse = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, SparseWeight)}
    for n, m in model.named_modules():  # and a sparse attention's in-projection by nn.MultiheadAttention's names
        if isinstance(m, SparseMultiheadAttention):
            sparse.update({f"{n}.{k}" if n else k: v for k, v in m.in_projections().items()})
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty mapping from parameter names to bool masks")
    for name, mask in masks.items():
        if name in sparse:  # shape and device only: a zero-stride view, no dense weight allocated
            layer = sparse[name]
            check_mask(mask, layer.values.new_empty(()).expand(layer.weight_shape), name=f"masks[{name!r}]")
        elif name not in params:
            raise ValueError(f"masks[{name!r}] names no parameter of the model")
        else:
            check_mask(mask, params[name], name=f"masks[{name!r}]")
    named_sparse = [n for n in masks if n in sparse]
    if named_sparse and mode != "connectivity":
        raise ValueError(f"mode={mode!r} needs the pruned weights, which the sparse layers {named_sparse[:3]} do not "
                         "store: retrain a sparsified model with mode='connectivity', or pysparse.densify it first")
    if mode == "weight" and (method is None or sparsity is None):
        raise ValueError("mode='weight' chooses the mask again: give method= and sparsity=")
    if mode == "network":
        init = init_state if init_state is not None else getattr(model, _INIT_ATTR, None)
        if init is None:
            raise ValueError("mode='network' needs the initial weights: call pysparse.remember_init(model) before "
                             "training, or pass init_state=")
        missing = sorted(set(model.state_dict()) - set(init))
        if missing:
            raise ValueError(f"init_state lacks {missing[:5]}")
    if not callable(optimizer) and optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd', 'adam' or a callable params -> optimizer, got {optimizer!r}")
    if teacher is not None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if teacher is model:
            raise ValueError("teacher must be another model (e.g. a copy of the dense model), not the one retrained")
        ops._check_fraction(alpha, "alpha", upper_inclusive=True)
        ops._check_positive(temperature, "temperature")
        teacher.eval()
    data = _as_batches(data)

    result = RetrainResult(mode=mode, masks={k: v.clone() for k, v in masks.items()})
    if eval_data is not None:
        result.accuracy_before = accuracy(model, eval_data)
    if mode == "network":
        with torch.no_grad():
            state = OrderedDict((k, v.clone()) for k, v in init.items())
            state._metadata = model.state_dict()._metadata  # modules' versions (torchvision's MNASNet reads its own)
            model.load_state_dict(state)
    for name in named_sparse:  # a sparse layer stores exactly its kept weights: the mask becomes its structure
        layer = sparse[name]
        if not torch.equal(layer.mask(), masks[name]):
            layer.set_mask(masks[name])  # kept values stay, newly kept weights start at zero, pruned ones go
    masked = {params[n]: m for n, m in masks.items() if n not in sparse}
    with torch.no_grad():
        for p, m in masked.items():  # pruned weights start at zero in every mode
            ops.apply_mask_(m, p.data)
    opt = _optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    correct = mode in ("connectivity", "network")

    result.losses = fit(model, data, opt, epochs=epochs, loss_fn=loss_fn, masks=masked if correct else None,
                        progress=progress, desc=f"retrain ({mode})", teacher=teacher, temperature=temperature,
                        alpha=alpha)

    if mode == "weight":
        kw = dict(prune_kwargs or {})
        kw.setdefault("exclude", [re.escape(n) for n in params if n.endswith("weight") and n not in masks])
        again = prune(model, method, sparsity=sparsity, data=data, loss_fn=loss_fn, **kw)
        result.changed = sum(int((again.masks[n] != masks[n]).sum()) for n in masks if n in again.masks)
        result.masks = again.masks
    if eval_data is not None:
        result.accuracy_after = accuracy(model, eval_data)
    return result
