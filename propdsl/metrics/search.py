"""The smallest decision-changing perturbation an attack finds, by bisection over the radius.

Shared by Etmann et al.'s robustness `rho` (L2 distance, from the predicted class, no box) and
Woods et al.'s accuracy-robustness area (RMSE, from the true label, under the argmax or the
better-than-random criterion, inside the data's box).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from propdsl.attacks import APGD, PGD, run_attack
from propdsl.region import Region

SEARCH_ATTACK = APGD(steps=20, restarts=1)  # per bisection step

__all__ = [
    "SEARCH_ATTACK",
    "Criterion",
    "Distance",
    "MinPerturbation",
    "holds",
    "min_perturbation",
    "violation",
]


class Criterion(enum.Enum):
    """When the decision at a point counts as (still) correct for a label y, C classes."""

    ARGMAX = "argmax"  # argmax f(x) == y: Woods' "attack ARA", Etmann's F(x + e) == F(x)
    BTR = "btr"  # softmax(f(x))_y > 1 / C, better than random: Woods' "BTR ARA"


class Distance(enum.Enum):
    """The size of a perturbation e of an input with D entries."""

    L2 = "l2"  # ||e||_2
    RMSE = "rmse"  # ||e||_2 / sqrt(D)

    def scale(self, x: Tensor) -> float:
        """L2 radius per unit of this distance."""
        return 1.0 if self is Distance.L2 else math.sqrt(x[0].numel())


def holds(logits: Tensor, labels: Tensor, criterion: Criterion) -> Tensor:
    """[B] bool: the criterion at these logits [B, C]."""
    logits = logits.flatten(1)
    if criterion is Criterion.ARGMAX:
        return logits.argmax(1) == labels
    p = torch.softmax(logits, 1).gather(1, labels.reshape(-1, 1)).squeeze(1)
    return p > 1.0 / logits.shape[1]


def violation(logits: Tensor, labels: Tensor, criterion: Criterion) -> Tensor:
    """[B] signed objective the attack climbs, > 0 where the criterion fails (up to ties):
    the margin `max_{j != y} f_j - f_y`, or `log(1 / C) - log softmax(f)_y`."""
    logits = logits.flatten(1)
    own = labels.reshape(-1, 1)
    if criterion is Criterion.ARGMAX:
        true = logits.gather(1, own).squeeze(1)
        return logits.scatter(1, own, -math.inf).amax(1) - true
    log_p = torch.log_softmax(logits, 1).gather(1, own).squeeze(1)
    return -math.log(logits.shape[1]) - log_p


@dataclass(frozen=True)
class MinPerturbation:
    """Per sample [B] (float64 / bool, on CPU): `distance` of the smallest perturbation found
    that makes the criterion fail (0 where it fails at x itself; `max_distance` where none was
    found within it), `found` whether one was found (or it failed at x), `holds_at_x` the
    criterion at x."""

    distance: Tensor
    found: Tensor
    holds_at_x: Tensor


def min_perturbation(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    *,
    criterion: Criterion = Criterion.ARGMAX,
    distance: Distance = Distance.RMSE,
    attack: PGD | APGD = SEARCH_ATTACK,
    max_distance: float = 1.0,
    bisections: int = 12,
    box: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> MinPerturbation:
    """The smallest perturbation (in `distance`) an attack finds that breaks the criterion.

    First the attack climbs `violation` over `ball(x, max_distance) & box` (an L2 ball); a
    sample it does not break gets `max_distance` and `found = False`. Then `bisections` times at
    the middle of `[lo, hi]`, `hi` the smallest distance of a breaking point found so far, `lo`
    the largest radius at which the attack failed. The result is the distance of an actual
    breaking point: an **upper bound** on the true minimum (as tight as the attack is strong),
    within `max_distance / 2**bisections` of the radius where the attack starts to succeed.
    """
    n = x.shape[0]
    scale = distance.scale(x)
    out = torch.zeros(n, dtype=torch.float64)
    with torch.no_grad():
        ok = holds(model(x), labels, criterion).cpu()
    found = ~ok
    idx = torch.nonzero(ok).flatten()
    if idx.numel() == 0:
        return MinPerturbation(out, found, ok)
    xs, ys = x[idx.to(x.device)], labels[idx.to(labels.device)]
    lo, hi = box if box is not None else (None, None)

    def attack_at(sel: Tensor, radius: Tensor) -> tuple[Tensor, Tensor]:
        centre, own = xs[sel], ys[sel]
        region = Region.ball(centre, (radius * scale).to(centre), 2, lo=lo, hi=hi)
        result = run_attack(
            attack,
            lambda v: violation(model(v), own, criterion),
            [region],
            models=[model],
            generator=generator,
            # All restarts as one batch: the labels repeated per copy (sample-major).
            tiled=lambda k: lambda v: violation(model(v), own.repeat_interleave(k, 0), criterion),
        )
        (point,) = result.points
        with torch.no_grad():
            broken = (~holds(model(point), own, criterion)).cpu()
        size = ((point - centre).flatten(1).norm(dim=1) / scale).double().cpu()
        return broken, size

    m = idx.numel()
    everyone = torch.arange(m, device=x.device)
    broken, size = attack_at(everyone, torch.full((m,), float(max_distance), dtype=torch.float64))
    best = torch.where(broken, size, torch.full_like(size, float(max_distance)))
    lo_r = torch.zeros(m, dtype=torch.float64)
    for _ in range(bisections):
        sel = torch.nonzero(broken).flatten()
        if sel.numel() == 0:
            break
        mid = (lo_r[sel] + best[sel]) / 2
        hit, dist = attack_at(sel.to(x.device), mid)
        best[sel] = torch.where(hit, torch.minimum(best[sel], dist), best[sel])
        lo_r[sel] = torch.where(hit, lo_r[sel], mid)
    out[idx] = best
    found = found.clone()
    found[idx] = broken
    return MinPerturbation(out, found, ok)
