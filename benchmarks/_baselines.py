"""The PyTorch code each pysparse kernel replaces, and the inputs the benchmarks share."""
import torch

import pysparse

N_SELECT = 25_000_000      # 25M scores ...
N_TENSORS = 50             # ... split into 50 tensors
SPARSITY = 0.9


def select_scores(device="cpu"):
    gen = torch.Generator().manual_seed(2)
    return [torch.rand(N_SELECT // N_TENSORS, generator=gen).to(device) for _ in range(N_TENSORS)]


def select_pysparse(scores):
    return pysparse.sparsity_masks(scores, SPARSITY)


def select_kthvalue_on_cat(scores):
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = round(SPARSITY * flat.numel())
    threshold = torch.kthvalue(flat, k).values
    return [s > threshold for s in scores]


def select_topk_on_cat(scores):
    """What torch.nn.utils.prune.global_unstructured does: concatenate, topk(largest=False), scatter a mask."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    k = round(SPARSITY * flat.numel())
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, k, largest=False).indices] = False
    return [m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores)]


def eager_taylor(w, g):
    return (g * w).abs()


def eager_hessian(w, h):
    return 0.5 * h * w.pow(2)
