"""torch.fx symbolic tracing (torchvision's ``create_feature_extractor``, FX graph passes): the sparse layers are
recorded as one ``call_module`` node each, as FX records torch's own layers (its leaf modules), instead of being
traced through (their forward checks shapes and picks kernels by batch size: control flow a symbolic trace
refuses). The traced GraphModule calls the layer itself."""
from __future__ import annotations

from typing import Optional

import torch.fx
from torch import nn


def traced_call(module: nn.Module, args: tuple, kwargs: Optional[dict] = None) -> torch.fx.Proxy:
    """``module(*args, **kwargs)``, with a torch.fx Proxy among the arguments, as one call_module node."""
    kwargs = kwargs or {}
    proxy = next(a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy))
    return proxy.tracer.create_proxy("call_module", proxy.tracer.path_of_module(module), args, kwargs)
