"""GAN losses written from the discriminator's logits (numerically stable: softplus, not log(sigmoid)).

- ``"minimax"``: the original game min_G max_D E[log D(x)] + E[log(1 - D(G(z)))]. D minimises
  softplus(-D(x)) + softplus(D(G(z))); G minimises log(1 - sigmoid(D(G(z)))) = -softplus(D(G(z))).
- ``"non_saturating"`` (default): same D loss; G minimises -log D(G(z)) = softplus(-D(G(z))).
- ``"hinge"``: D minimises relu(1 - D(x)) + relu(1 + D(G(z))); G minimises -D(G(z)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("minimax", "non_saturating", "hinge")


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {name!r}")
    return name


def d_loss(name: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss (mean over the batch) from its logits on real and generated images."""
    if check_loss(name) == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss(name: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's loss (mean over the batch) from the discriminator's logits on generated images."""
    name = check_loss(name)
    if name == "minimax":
        return -F.softplus(fake_logits).mean()
    if name == "non_saturating":
        return F.softplus(-fake_logits).mean()
    return -fake_logits.mean()
