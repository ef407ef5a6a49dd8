"""Woods et al. (2019), "Adversarial explanations for understanding image classification
decisions": the accuracy-robustness area (ARA) under both of its criteria, and adversarial
explanations.

ARA: per test image, `m_i` is the RMSE (`||e||_2 / sqrt(D)`) of a near-minimal perturbation an
attack finds that breaks the criterion (0 where it fails at the image itself); `A(e)` is the
fraction of images with `m_i > e`, and `ARA = integral over e >= 0 of max(0, A(e) - 1/C)`.
"Attack ARA" uses the criterion `argmax f(x) == y`; "BTR ARA" (better than random) uses
`softmax(f(x))_y > 1/C`.

Adversarial explanation: for a target class t, the point `x + delta` a targeted attack reaches
inside the RMSE ball of radius rho (0.1 in the paper) around x; the image itself is the
explanation (what the network needs to see to answer t).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from propdsl.attacks import APGD, PGD, run_attack
from propdsl.metrics.search import SEARCH_ATTACK, Criterion, Distance, min_perturbation
from propdsl.region import Region

__all__ = [
    "EXPLANATION_ATTACK",
    "AdversarialExplanations",
    "WoodsARA",
    "accuracy_robustness_area",
    "adversarial_explanations",
    "woods_ara",
]

EXPLANATION_ATTACK = APGD(steps=50, restarts=1)


def accuracy_robustness_area(distances: Tensor | Sequence[float], num_classes: int) -> float:
    """`integral over e >= 0 of max(0, A(e) - 1/C)`, `A(e)` the fraction of distances > e.

    `A` is a step function, so the integral is exact: with the distances sorted,
    `d_(1) <= ... <= d_(N)` and `d_(0) = 0`, `A(e) = (N - i + 1) / N` on `[d_(i-1), d_(i))`.

    >>> accuracy_robustness_area([0.0, 0.1, 0.3], num_classes=2)  # 0.1 * (2/3 - 1/2)
    0.016666666666666663
    """
    d = torch.as_tensor(distances, dtype=torch.float64).flatten().sort().values
    n = d.numel()
    if n == 0:
        return 0.0
    widths = torch.diff(d, prepend=d.new_zeros(1))
    share = (n - torch.arange(n, dtype=torch.float64)) / n
    return float((widths * (share - 1.0 / num_classes).clamp_min(0)).sum())


@dataclass(frozen=True)
class WoodsARA:
    """One criterion's ARA: `area`, the per-sample RMSE distances `m_i` (0 where the criterion
    fails at x; `max_rmse` where the attack found nothing within it, counted in
    `not_broken`)."""

    criterion: Criterion
    area: float
    num_classes: int
    max_rmse: float
    n: int
    not_broken: int
    median: float
    distances: tuple[float, ...] = field(repr=False)


def woods_ara(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    criterion: Criterion,
    *,
    attack: PGD | APGD = SEARCH_ATTACK,
    max_rmse: float = 1.0,
    bisections: int = 12,
    box: tuple[float, float] | None = (0.0, 1.0),
    batch: int = 256,
    generator: torch.Generator | None = None,
) -> WoodsARA:
    """Woods et al.'s ARA of `model` on (x, y) under `criterion` ("attack ARA": ARGMAX, "BTR
    ARA": BTR). The distances are upper bounds on the true minimal RMSE (an attack's), so the
    area is an upper bound too, as tight as the attack is strong."""
    parts, found = [], []
    for i in range(0, x.shape[0], batch):
        r = min_perturbation(
            model,
            x[i : i + batch],
            y[i : i + batch],
            criterion=criterion,
            distance=Distance.RMSE,
            attack=attack,
            max_distance=max_rmse,
            bisections=bisections,
            box=box,
            generator=generator,
        )
        parts.append(r.distance)
        found.append(r.found)
    d, f = torch.cat(parts), torch.cat(found)
    with torch.no_grad():
        k = int(model(x[:1]).flatten(1).shape[1])
    return WoodsARA(
        criterion=criterion,
        area=accuracy_robustness_area(d, k),
        num_classes=k,
        max_rmse=float(max_rmse),
        n=int(d.numel()),
        not_broken=int((~f).sum()),
        median=float(d.median()) if d.numel() else math.nan,
        distances=tuple(float(v) for v in d),
    )


@dataclass(frozen=True)
class AdversarialExplanations:
    """`points[b, k]`: x_b + delta toward `targets[k]` (on x's device, detached); `probability`
    [B, T] softmax of the target there; `reached` [B, T] whether it is the argmax there;
    `rmse` [B, T] the RMSE of delta (at most `radius`)."""

    points: Tensor
    targets: tuple[int, ...]
    probability: Tensor
    reached: Tensor
    rmse: Tensor
    radius: float


def adversarial_explanations(
    model: nn.Module,
    x: Tensor,
    *,
    radius: float = 0.1,
    targets: Sequence[int] | None = None,
    attack: PGD | APGD = EXPLANATION_ATTACK,
    box: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> AdversarialExplanations:
    """Woods et al.'s adversarial explanations: for every sample and target class t (default:
    all classes), the attack maximises `log softmax(f(x'))_t` over the RMSE ball of `radius`
    around x (an L2 ball of radius `radius * sqrt(D)`, inside `box`)."""
    with torch.no_grad():
        k = int(model(x[:1]).flatten(1).shape[1])
    chosen = tuple(range(k)) if targets is None else tuple(int(t) for t in targets)
    scale = math.sqrt(x[0].numel())
    lo, hi = box if box is not None else (None, None)
    points, probs, reached, sizes = [], [], [], []
    for t in chosen:
        target = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        region = Region.ball(x, radius * scale, 2, lo=lo, hi=hi)
        result = run_attack(
            attack,
            lambda v, target=target: (
                torch.log_softmax(model(v).flatten(1), 1)
                .gather(1, target.reshape(-1, 1))
                .squeeze(1)
            ),
            [region],
            models=[model],
            generator=generator,
        )
        (point,) = result.points
        with torch.no_grad():
            out = model(point).flatten(1)
        points.append(point.detach())
        probs.append(torch.softmax(out, 1)[:, t].detach().cpu())
        reached.append((out.argmax(1) == t).cpu())
        sizes.append(((point - x).flatten(1).norm(dim=1) / scale).detach().cpu())
    return AdversarialExplanations(
        points=torch.stack(points, 1),
        targets=chosen,
        probability=torch.stack(probs, 1),
        reached=torch.stack(reached, 1),
        rmse=torch.stack(sizes, 1),
        radius=float(radius),
    )
