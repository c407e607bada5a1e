"""Sensitivity analysis: how accuracy falls as each layer alone is pruned harder, as a table, JSON and a PNG."""
from __future__ import annotations

import copy
import json
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .ops import _check_fraction
from .prune import DATA_METHODS, PruneResult, nothing_to_prune, prunable_parameters, prune
from .retrain import accuracy

DEFAULT_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass
class SensitivityResult:
    baseline: float                               # the unpruned model's metric
    sparsities: list[float]
    curves: dict[str, list[float]]                # parameter name -> metric at each sparsity (that layer alone)
    method: str

    def table(self) -> str:
        head = f"{'parameter':<32}" + "".join(f"{s:>8.2f}" for s in self.sparsities)
        rows = [head, f"{'(unpruned)':<32}" + f"{self.baseline:>8.4f}"]
        rows += [f"{n:<32}" + "".join(f"{v:>8.4f}" for v in vals) for n, vals in self.curves.items()]
        return "\n".join(rows)

    def to_json(self) -> str:
        return json.dumps({"method": self.method, "baseline": self.baseline, "sparsities": self.sparsities,
                           "curves": self.curves}, indent=2)

    def plot(self, path) -> None:
        """A PNG: metric against sparsity, one line per layer, the unpruned model dashed."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, values in self.curves.items():
            ax.plot(self.sparsities, values, marker="o", label=name)
        ax.axhline(self.baseline, color="black", linestyle="--", linewidth=1, label="unpruned")
        ax.set_xlabel("sparsity of the layer (others dense)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"Sensitivity ({self.method})")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        _save_figure(fig, path)


def _save_figure(fig, path) -> None:
    """Writes a matplotlib figure as PNG atomically (temp file + rename)."""
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def plot_report(result: PruneResult, path) -> None:
    """A PNG of a pruning report: per-layer sparsity (bars) and parameter counts."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in result.layers]
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names) + 2), 4.5))
    ax.bar(range(len(names)), [r.sparsity for r in result.layers], color="tab:blue")
    for i, r in enumerate(result.layers):
        ax.text(i, r.sparsity, f"{r.kept}/{r.params}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("sparsity")
    ax.set_title(f"{result.method}: {result.sparsity:.1%} of {result.params} weights removed")
    _save_figure(fig, path)


def sensitivity(model: nn.Module, data: Iterable, *, method: str = "magnitude",
                sparsities: Sequence[float] = DEFAULT_SPARSITIES, metric: Callable = accuracy,
                exclude: Iterable = (), prune_data: Optional[Iterable] = None, loss_fn: Optional[Callable] = None,
                **prune_kwargs) -> SensitivityResult:
    """For each prunable layer alone, ``metric(pruned_copy, data)`` (default top-1 accuracy) at each sparsity.
    The model itself is not modified. Data-driven methods score on ``prune_data`` (default: ``data``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sparsities = [_check_fraction(s, "sparsities[i]") for s in sparsities]
    if not sparsities:
        raise ValueError("sparsities is empty")
    data = list(data)
    if not data:
        raise ValueError("data yielded no batch")
    params = prunable_parameters(model, exclude)
    if not params:
        raise nothing_to_prune(model)
    def measure(m) -> float:  # the metric's value, a finite real number (a NaN would plot as a gap, unnoticed)
        v = metric(m, data)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"metric must return a finite real number, got {v!r}")
        return float(v)

    baseline = measure(model)
    curves = {}
    for name in params:
        others = [n for n in params if n != name]
        values = []
        for s in sparsities:
            trial = copy.deepcopy(model)
            prune(trial, method, sparsity=s, scope="layer", exclude=list(exclude) + [re.escape(n) for n in others],
                  data=(prune_data if prune_data is not None else data) if method in DATA_METHODS else None,
                  loss_fn=loss_fn, min_density=0.0, **prune_kwargs)
            values.append(measure(trial))
        curves[name] = values
    return SensitivityResult(baseline=baseline, sparsities=sparsities, curves=curves, method=method)
