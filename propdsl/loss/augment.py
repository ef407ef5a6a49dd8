"""Training-data augmentation made once, before training.

`FGSMAugment` is the FGSM-augmented data set of Casadio et al. 2022 ("Neural Network Robustness
as a Verification Property: A Principled Case Study"): every training input gets one adversarial
copy by the fast gradient sign method (Goodfellow et al. 2015),

    x_adv = clip(x + eps * sign(grad_x cross_entropy(f(x), y)), lo, hi),

computed with the model as it is before the first step (its initial weights) and kept fixed for
the whole training; the model then trains on the originals and the copies (labels kept). Unlike
adversarial training, the copies never follow the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FGSMAugment"]


@dataclass(frozen=True, kw_only=True)
class FGSMAugment:
    """Options: the L-inf step `eps`, and the box [lo, hi] the copies are clipped to."""

    eps: float
    lo: float = 0.0
    hi: float = 1.0
    batch: int = 256  # inputs per gradient computation: memory, not the result

    def __post_init__(self) -> None:
        if not self.eps > 0:
            raise ValueError(f"fgsm eps must be positive, got {self.eps}")
        if not self.lo <= self.hi:
            raise ValueError(f"fgsm needs lo <= hi, got [{self.lo}, {self.hi}]")

    def copies(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """The FGSM copy of every input, computed in eval mode (training flags restored)."""
        flags = [(m, m.training) for m in model.modules()]
        model.eval()
        out = []
        try:
            for start in range(0, x.shape[0], self.batch):
                xb = x[start : start + self.batch].detach().clone().requires_grad_(True)
                yb = y[start : start + self.batch]
                with torch.enable_grad():
                    loss = F.cross_entropy(model(xb), yb, reduction="sum")
                    (g,) = torch.autograd.grad(loss, xb)
                out.append((xb.detach() + self.eps * g.sign()).clamp(self.lo, self.hi))
        finally:
            for module, flag in flags:
                module.training = flag
        return torch.cat(out) if out else x.clone()

    def augment(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The originals followed by their copies, and the labels twice."""
        return torch.cat([x, self.copies(model, x, y)]), torch.cat([y, y])
