"""Test and benchmark helpers: the devices and dtypes every kernel test iterates over, and tensor builders.
Needs pytest (a test dependency)."""
import contextlib
from typing import Collection, Optional

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pysparse

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

_cuda_reason = ("no CUDA device visible" if not torch.cuda.is_available()
                else "pysparse was built without CUDA kernels")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(not pysparse.cuda_usable(), reason=_cuda_reason)])]


def devices_for(*ops: str) -> list:
    """DEVICES, with the CUDA case skipped (and saying why) while one of `ops` has no CUDA kernel yet."""
    missing = [op for op in ops if not pysparse._extension.has_kernel(op, "cuda")]
    if not missing or not pysparse.cuda_built():
        return DEVICES
    return ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skip(
        reason=f"no CUDA kernel yet for {', '.join(missing)}")])]


def make(shape, dtype=torch.float32, device="cpu", *, noncontig=False, gen=None, ties=False):
    """A random tensor of `shape`; with noncontig a strided view (every other element of a wider tensor);
    with ties, values drawn from a handful of levels (including -0.0 and 0.0) so that many are equal."""
    shape = tuple(shape)
    full = shape[:-1] + (shape[-1] * 2,) if (noncontig and len(shape) > 0) else shape
    if ties:
        levels = torch.tensor([-2.0, -0.0, 0.0, 0.5, 1.0, 3.0])
        t = levels[torch.randint(0, len(levels), full, generator=gen)]
    else:
        t = torch.randn(full, generator=gen)
    t = t.to(dtype=dtype, device=device)
    if noncontig and len(shape) > 0:
        t = t[..., ::2]
        assert not t.is_contiguous() or t.numel() <= 1
    return t


def assert_compiled_matches_eager(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """torch.compile(module, fullgraph=True) gives module's eager output for x and, backward from ``grad``, the
    same gradients of x and of every parameter (x must require grad; their .grad are overwritten)."""
    torch._dynamo.reset()
    tensors = [x, *module.parameters()]
    module(x).backward(grad)
    want = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    out = torch.compile(module, fullgraph=True)(x)
    torch.testing.assert_close(out, module(x))
    out.backward(grad)
    for got, w in zip((t.grad for t in tensors), want):
        torch.testing.assert_close(got, w)


class _OpsCalled(TorchDispatchMode):
    def __init__(self, names: set):
        super().__init__()
        self.names = names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.name())
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def ops_called():
    """Within the block, collects the names of the ops that reach the kernels (``"pysparse::spmm_t"``, ...),
    below autograd and torch's Python wrappers: which way through the code a call took."""
    names: set = set()
    with _OpsCalled(names):
        yield names


def autograd_nodes(t: torch.Tensor, through: Optional[Collection[str]] = None) -> list:
    """The names of the autograd nodes behind ``t``: its grad_fn and the nodes it reaches. With ``through`` (node
    type names, views say), the walk goes on only past nodes of those types and stops at the first of another."""
    names, seen, todo = [], set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.append(fn.name())
        if through is None or type(fn).__name__ in through:
            todo.extend(f for f, _ in fn.next_functions)
    return names
