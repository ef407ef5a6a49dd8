"""Etmann et al. (2019), "On the connection between adversarial robustness and saliency map
interpretability": alignment, robustness and linearised robustness, per sample.

With i* the predicted class, Psi the logits and g = grad_x Psi^{i*}(x):

* alignment `alpha(x) = |<x, g>| / ||g||_2`;
* robustness `rho(x) = inf {||e||_2 : F(x + e) != F(x)}`, from the **predicted** class, with no
  box: estimated by an attack with bisection over the radius (`propdsl.metrics.search`), so the
  value is the norm of an actual decision-changing perturbation, an upper bound on `rho`;
* linearised robustness `rho~(x) = min_{j != i*} (Psi^{i*} - Psi^j) / ||grad Psi^{i*} -
  grad Psi^j||_2`, the distance to the nearest decision boundary of the network linearised at x
  (exact `rho` for a linear model), computed in closed form with autograd;
* the paper's bound for bias-free ReLU networks, `rho~ <= alpha + |beta| / ||g||_2` with
  `beta = Psi^{i*}(x) - <x, g>` (0 for such networks); its right side is returned too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from propdsl.attacks import APGD, PGD
from propdsl.metrics.search import SEARCH_ATTACK, Criterion, Distance, min_perturbation

__all__ = [
    "EtmannMetrics",
    "alignment",
    "etmann_metrics",
    "linearized_robustness",
    "rank_correlation",
    "robustness",
]


def _logit_gradients(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Logits [B, C] and the gradient of every logit [B, C, D] (one backward pass per class;
    samples must not interact)."""
    v = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(v).flatten(1)
        grads = [
            torch.autograd.grad(logits[:, j].sum(), v, retain_graph=j + 1 < logits.shape[1])[0]
            for j in range(logits.shape[1])
        ]
    return logits.detach(), torch.stack([g.flatten(1) for g in grads], 1)


def linearized_robustness(model: nn.Module, x: Tensor) -> Tensor:
    """Etmann et al.'s `rho~(x) = min_{j != i*} (Psi^{i*} - Psi^j) / ||grad Psi^{i*} -
    grad Psi^j||_2`, per sample [B]; `inf` where every gradient difference is 0.

    >>> import torch
    >>> model = torch.nn.Linear(2, 2)  # the boundary x_0 = 0.5
    >>> _ = model.weight.data.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    >>> _ = model.bias.data.copy_(torch.tensor([-0.5, 0.5]))
    >>> round(linearized_robustness(model, torch.tensor([[0.8, 0.0]])).item(), 6)
    0.3
    """
    logits, grads = _logit_gradients(model, x)
    b = torch.arange(x.shape[0], device=logits.device)
    top = logits.argmax(1)
    num = logits[b, top].unsqueeze(1) - logits  # [B, C]
    den = (grads[b, top].unsqueeze(1) - grads).norm(dim=2)  # [B, C]
    safe = torch.where(den > 0, den, torch.ones_like(den))
    ratio = torch.where(den > 0, num / safe, torch.full_like(num, math.inf))
    ratio[b, top] = math.inf
    return ratio.amin(1)


def alignment(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per sample [B]: Etmann et al.'s alignment `|<x, g>| / ||g||_2`, `||g||_2` and the offset
    `beta = Psi^{i*}(x) - <x, g>`, g the saliency of the predicted class (0 / 0 = 0).

    >>> import torch
    >>> model = torch.nn.Linear(2, 2, bias=False)
    >>> _ = model.weight.data.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    >>> [round(v.item(), 4) for v in alignment(model, torch.tensor([[1.0, 1.0]]))]
    [1.4, 5.0, 0.0]
    """
    logits, grads = _logit_gradients(model, x)
    b = torch.arange(x.shape[0], device=logits.device)
    top = logits.argmax(1)
    g = grads[b, top]
    dot = (x.detach().flatten(1) * g).sum(1)
    norm = g.norm(dim=1)
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    align = torch.where(norm > 0, dot.abs() / safe, torch.zeros_like(dot))
    return align, norm, logits[b, top] - dot


def robustness(
    model: nn.Module,
    x: Tensor,
    *,
    attack: PGD | APGD = SEARCH_ATTACK,
    max_l2: float | None = None,
    bisections: int = 12,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Etmann et al.'s `rho(x)`, estimated: the L2 norm of the smallest perturbation an attack
    finds that changes the predicted class (no box: the paper's definition has none), and
    whether one was found within `max_l2` (default `sqrt(D)`: RMSE 1). An upper bound on the
    true `rho` where found; `max_l2` where not. Returns ([B] float64, [B] bool), on CPU.
    """
    with torch.no_grad():
        predicted = model(x).flatten(1).argmax(1)
    limit = math.sqrt(x[0].numel()) if max_l2 is None else float(max_l2)
    found = min_perturbation(
        model,
        x,
        predicted,
        criterion=Criterion.ARGMAX,
        distance=Distance.L2,
        attack=attack,
        max_distance=limit,
        bisections=bisections,
        box=None,
        generator=generator,
    )
    return found.distance, found.found


def rank_correlation(a: Tensor, b: Tensor) -> float | None:
    """Spearman's rank correlation of two [N] samples (average ranks for ties); None for fewer
    than 3 values or a constant sample.

    >>> a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    >>> round(rank_correlation(a, a**2), 12), round(rank_correlation(a, -a), 12)
    (1.0, -1.0)
    """
    a, b = a.double().flatten(), b.double().flatten()
    if a.numel() < 3:
        return None

    def ranks(v: Tensor) -> Tensor:
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(v.numel(), dtype=v.dtype)
        for value in v.unique():  # ties get their average rank
            tie = v == value
            if int(tie.sum()) > 1:
                r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else None


@dataclass(frozen=True)
class EtmannMetrics:
    """Per-sample values [N] (float64, CPU) and their summaries. `rho` is the attack's estimate
    (an upper bound; `rho_found` False where no perturbation within `max_l2` changed the class,
    then `rho == max_l2`); `bound` is `alpha + |beta| / ||g||`."""

    alignment: Tensor
    rho: Tensor
    rho_found: Tensor
    rho_tilde: Tensor
    bound: Tensor
    max_l2: float

    def summary(self) -> dict[str, float | int | None]:
        found = self.rho_found
        finite = torch.isfinite(self.rho_tilde)

        def mean(v: Tensor) -> float | None:
            return float(v.mean()) if v.numel() else None

        return {
            "n": int(self.alignment.numel()),
            "mean_alignment": mean(self.alignment),
            "mean_rho": mean(self.rho[found]),
            "mean_rho_tilde": mean(self.rho_tilde[finite]),
            "rho_found": int(found.sum()),
            "spearman_alignment_rho": rank_correlation(self.alignment[found], self.rho[found]),
            "spearman_alignment_rho_tilde": rank_correlation(
                self.alignment[finite], self.rho_tilde[finite]
            ),
            "rho_tilde_within_bound": mean((self.rho_tilde <= self.bound * (1 + 1e-6)).double()),
        }


def etmann_metrics(
    model: nn.Module,
    x: Tensor,
    *,
    attack: PGD | APGD = SEARCH_ATTACK,
    max_l2: float | None = None,
    bisections: int = 12,
    batch: int = 256,
    generator: torch.Generator | None = None,
) -> EtmannMetrics:
    """Alignment, `rho` (by attack) and `rho~` (closed form) of every sample of x."""
    parts: dict[str, list[Tensor]] = {k: [] for k in ("align", "rho", "found", "tilde", "bound")}
    limit = math.sqrt(x[0].numel()) if max_l2 is None else float(max_l2)
    for i in range(0, x.shape[0], batch):
        xb = x[i : i + batch]
        align, norm, beta = alignment(model, xb)
        safe = torch.where(norm > 0, norm, torch.ones_like(norm))
        bound = torch.where(norm > 0, align + beta.abs() / safe, torch.full_like(align, math.inf))
        rho, found = robustness(
            model, xb, attack=attack, max_l2=limit, bisections=bisections, generator=generator
        )
        parts["align"].append(align.double().cpu())
        parts["bound"].append(bound.double().cpu())
        parts["tilde"].append(linearized_robustness(model, xb).double().cpu())
        parts["rho"].append(rho)
        parts["found"].append(found)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return EtmannMetrics(
        alignment=cat["align"],
        rho=cat["rho"],
        rho_found=cat["found"],
        rho_tilde=cat["tilde"],
        bound=cat["bound"],
        max_l2=limit,
    )
