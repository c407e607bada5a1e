"""Seeing the input of each pruned weight while a model runs: what wanda's scores and compensate's refits read.

A weight's input shows in a call (``nn.attention.input_site``): an nn.Linear / nn.Conv2d's own call, or an
nn.MultiheadAttention's call for its projections. A module may also compute with a child nn.Linear's weight
without calling the child: torchvision's Swin Transformer attention runs ``F.linear(x, self.qkv.weight, bias)``.
For every nn.Linear, then, an F.linear call that takes its weight (the same tensor) outside the layer's own call
counts as a call of the layer with that input.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Hashable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


class _LinearCalls(TorchFunctionMode):
    """Calls ``seen(key, layer, (input,), {})`` for each F.linear whose weight is a watched layer's weight, made
    outside that layer's own call."""

    def __init__(self, weights: dict[int, tuple[Hashable, nn.Module]], inside: set[int], seen: Callable) -> None:
        super().__init__()
        self.weights, self.inside, self.seen = weights, inside, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            hit = self.weights.get(id(weight))
            if hit is not None and id(hit[1]) not in self.inside:
                self.seen(hit[0], hit[1], (args[0] if args else kwargs["input"],), {})
        return func(*args, **kwargs)


@contextmanager
def watch(sites: Mapping[Hashable, tuple[nn.Module, str, torch.Tensor]], seen: Callable) -> Iterator[None]:
    """While the block runs, ``seen(key, module, args, kwargs)`` each time the input of ``sites[key]`` = (the
    module whose call shows it, its kind as :func:`pysparse.nn.attention.input_site` gives, the weight) is seen:
    before the module's call with its arguments, and for an nn.Linear (kind "layer") also at an F.linear call
    elsewhere that takes its weight, with ``args`` = (that call's input,). ``seen`` may raise to end the pass."""
    handles, weights, inside = [], {}, set()
    try:
        for key, (module, kind, weight) in sites.items():
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs, key=key: seen(key, mod, args, kwargs), with_kwargs=True))
            if kind == "layer" and isinstance(module, nn.Linear):
                weights[id(weight)] = (key, module)
                handles.append(module.register_forward_pre_hook(lambda mod, args: inside.add(id(mod))))
                handles.append(module.register_forward_hook(lambda mod, args, out: inside.discard(id(mod)),
                                                            always_call=True))
        if weights:
            with _LinearCalls(weights, inside, seen):
                yield
        else:
            yield
    finally:
        for handle in handles:
            handle.remove()
