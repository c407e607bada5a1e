"""Pruning schedules: one-shot is ``prune`` itself; iterative (k rounds of prune-then-retrain up to a target);
gradual (Zhu & Gupta 2017: a cubic sparsity ramp, pruning a little every few steps while training)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .ops import _check_fraction
from .prune import PruneResult, prune
from .retrain import mask_parameter_


def cubic_sparsity(step: int, *, final: float, begin: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's target at ``step``: s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^3, flat outside
    [begin, end]."""
    final, initial = _check_fraction(final, "final"), _check_fraction(initial, "initial")
    if initial > final:  # the schedule only prunes: pruned weights do not grow back
        raise ValueError(f"initial must be <= final, got initial={initial}, final={final}")
    if not (isinstance(begin, int) and isinstance(end, int)) or end <= begin or begin < 0:
        raise ValueError(f"need integers 0 <= begin < end, got begin={begin!r}, end={end!r}")
    t = min(max(step, begin), end)
    return final + (initial - final) * (1.0 - (t - begin) / (end - begin)) ** 3


def iterative_sparsities(target: float, rounds: int) -> list[float]:
    """Sparsities of ``rounds`` prune-then-retrain rounds that keep the same fraction of the remaining weights
    each round and end at ``target``: 1 - (1 - target)^(k / rounds)."""
    target = _check_fraction(target, "target")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    return [1.0 - (1.0 - target) ** (k / rounds) for k in range(1, rounds + 1)]


def iterative_prune(model: nn.Module, method: str, target: float, rounds: int,
                    retrain_fn: Callable[[nn.Module, dict], None], **prune_kwargs) -> list[PruneResult]:
    """``rounds`` rounds of prune (to the next of ``iterative_sparsities``) then ``retrain_fn(model, masks)``.
    Weights pruned in a round stay pruned: later rounds rank them lowest."""
    results, masks = [], None
    for s in iterative_sparsities(target, rounds):
        result = prune(model, method, sparsity=s, **prune_kwargs)
        if masks is not None:  # already-pruned weights are zero and score lowest; make sure they stay out
            for n, m in result.masks.items():
                m &= masks[n]
        masks = result.masks
        retrain_fn(model, masks)
        results.append(result)
    return results


class GradualPruner:
    """Gradual pruning during training. Call ``step(i)`` after each optimizer step: every ``frequency`` steps
    between ``begin`` and ``end`` it prunes to ``cubic_sparsity(i)``; at every step it re-applies the current
    masks to the weights, their grads and the optimizer's state (so pruned weights stay zero)."""

    def __init__(self, model: nn.Module, method: str, *, final_sparsity: float, begin: int, end: int,
                 frequency: int = 100, initial_sparsity: float = 0.0,
                 optimizer: Optional[torch.optim.Optimizer] = None, **prune_kwargs) -> None:
        _check_fraction(final_sparsity, "final_sparsity")  # named as the caller wrote it, then the rest
        _check_fraction(initial_sparsity, "initial_sparsity")
        if initial_sparsity > final_sparsity:
            raise ValueError(f"initial_sparsity must be <= final_sparsity, got {initial_sparsity} > {final_sparsity}")
        cubic_sparsity(begin, final=final_sparsity, begin=begin, end=end, initial=initial_sparsity)  # validates
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"frequency must be an int >= 1, got {frequency!r}")
        self.model, self.method, self.optimizer = model, method, optimizer
        self.final, self.initial, self.begin, self.end, self.frequency = (final_sparsity, initial_sparsity, begin,
                                                                          end, frequency)
        self.prune_kwargs = prune_kwargs
        self.masks: Optional[dict[str, torch.Tensor]] = None
        self.history: list[tuple[int, float]] = []  # (step, sparsity reached)

    def step(self, i: int) -> Optional[PruneResult]:
        result = None
        due = self.begin <= i <= self.end and (i - self.begin) % self.frequency == 0
        if due or (i >= self.end and not self.history):
            target = cubic_sparsity(i, final=self.final, begin=self.begin, end=self.end, initial=self.initial)
            if self.masks is None or target > self.history[-1][1]:
                result = prune(self.model, self.method, sparsity=target, **self.prune_kwargs)
                if self.masks is not None:
                    for n, m in result.masks.items():
                        m &= self.masks[n]
                self.masks = result.masks
                self.history.append((i, result.sparsity))
        if self.masks is not None:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, m in self.masks.items():
                    mask_parameter_(m, params[n], self.optimizer, grad=True)
        return result
