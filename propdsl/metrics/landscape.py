"""Input loss landscapes and flatness, for Chen et al. (2024, arXiv 2403.06013)'s claim that
adversarial training flattens the input landscape of the cross-entropy loss but not that of an
explanation loss.

* The **cross-entropy** loss `CE(f(x'), y)` and the **explanation loss**
  `||saliency(x') - saliency(x)||_2` (saliency of the label y; 0 at x' = x), evaluated at
  `x' = x + a d1 + b d2`, where `d1 = sign(grad_x CE(f(x), y))` is the adversarial (FGSM)
  direction and `d2` a random sign direction, so `a` and `b` are L-inf distances. No box: a
  landscape is a function of the input space. Values are means over the samples.
* **Flatness**: the largest eigenvalue of the input Hessian of the CE loss, per sample, by power
  iteration with Hessian-vector products (double backward). For piecewise-linear networks
  (ReLU) the input Hessian `J^T (diag(p) - p p^T) J` is positive semi-definite, so power
  iteration finds its largest eigenvalue; for other networks it finds the eigenvalue of largest
  magnitude (returned with its sign, as the Rayleigh quotient).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from propdsl.explain import saliency

__all__ = [
    "Landscape",
    "ce_loss",
    "directions",
    "explanation_loss",
    "loss_landscape",
    "top_hessian_eigenvalue",
]


def ce_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample cross-entropy [B]."""
    return F.cross_entropy(model(x).flatten(1), y, reduction="none")


def explanation_loss(model: nn.Module, x0: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample `||saliency(x) - saliency(x0)||_2` [B], saliency of the label y."""
    s0 = saliency(model, x0, y, create_graph=False)
    s = saliency(model, x, y, create_graph=False)
    return (s - s0).flatten(1).norm(dim=1)


def directions(
    model: nn.Module, x: Tensor, y: Tensor, *, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(adversarial, random) directions, shaped like x, entries +-1: `sign(grad_x CE)` (0 where
    the gradient is 0) and a uniformly random sign."""
    v = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(ce_loss(model, v, y).sum(), v)
    coin = torch.randint(0, 2, x.shape, generator=generator, device=x.device)
    return g.sign().detach(), (2 * coin - 1).to(x.dtype)


@dataclass(frozen=True)
class Landscape:
    """`steps` [P]: the offsets a (and b); 1-D means over samples along each direction
    (`ce_adversarial`, `ce_random`, `explanation_adversarial`, `explanation_random`, [P]); 2-D
    surfaces over `x + a d1 + b d2` (`ce_surface`, `explanation_surface`, [P, P], first index
    a). Tensors are float64 on CPU."""

    steps: Tensor
    ce_adversarial: Tensor
    ce_random: Tensor
    explanation_adversarial: Tensor
    explanation_random: Tensor
    ce_surface: Tensor | None
    explanation_surface: Tensor | None
    n: int


def _losses(model, x, y, points) -> tuple[float, float]:
    with torch.no_grad():
        ce = float(ce_loss(model, points, y).double().mean())
    ex = float(explanation_loss(model, x, points, y).double().mean())
    return ce, ex


def loss_landscape(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    radius: float = 0.1,
    points: int = 21,
    surface: bool = True,
    generator: torch.Generator | None = None,
) -> Landscape:
    """The CE and explanation losses along the adversarial and a random direction, on
    `points` offsets evenly spaced in [-radius, radius], and (with `surface`) on the
    `points x points` grid of both; means over the samples of x."""
    d1, d2 = directions(model, x, y, generator=generator)
    steps = torch.linspace(-radius, radius, points, dtype=torch.float64)
    curves: dict[str, list[float]] = {k: [] for k in ("ca", "cr", "ea", "er")}
    for a in steps.tolist():
        ce, ex = _losses(model, x, y, x + a * d1)
        curves["ca"].append(ce)
        curves["ea"].append(ex)
        ce, ex = _losses(model, x, y, x + a * d2)
        curves["cr"].append(ce)
        curves["er"].append(ex)
    ce_s = ex_s = None
    if surface:
        ce_s = torch.zeros(points, points, dtype=torch.float64)
        ex_s = torch.zeros(points, points, dtype=torch.float64)
        for i, a in enumerate(steps.tolist()):
            for j, b in enumerate(steps.tolist()):
                ce_s[i, j], ex_s[i, j] = _losses(model, x, y, x + a * d1 + b * d2)
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in curves.items()}
    return Landscape(
        steps=steps,
        ce_adversarial=t["ca"],
        ce_random=t["cr"],
        explanation_adversarial=t["ea"],
        explanation_random=t["er"],
        ce_surface=ce_s,
        explanation_surface=ex_s,
        n=int(x.shape[0]),
    )


def top_hessian_eigenvalue(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    iterations: int = 20,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per sample [B], the dominant eigenvalue of the Hessian of `CE(f(x), y)` in x, by
    `iterations` steps of power iteration with Hessian-vector products, returned as the
    Rayleigh quotient `<v, H v>` of the last unit vector v (largest eigenvalue for ReLU
    networks, whose input Hessian is positive semi-definite). Samples must not interact: the
    Hessian of the summed loss is then block-diagonal, one block per sample.
    """
    v = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (x.dim() - 1))
    xv = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(ce_loss(model, xv, y).sum(), xv, create_graph=True)
        value = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for k in range(iterations + 1):
            (hv,) = torch.autograd.grad((g * v).sum(), xv, retain_graph=k < iterations)
            value = (v * hv).flatten(1).sum(1)
            norm = hv.flatten(1).norm(dim=1)
            if k == iterations or not bool((norm > 0).any()):
                break
            shape = (-1, *[1] * (x.dim() - 1))
            v = torch.where(norm.view(shape) > 0, hv / norm.clamp_min(1e-30).view(shape), v)
    return value.detach()
