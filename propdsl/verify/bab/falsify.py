"""The falsifier of branch and bound: projected gradient ascent on the problem's violation.

The objective is `Rows.violation`: the largest, over the disjuncts, of the smallest slack
`b_r - A_r y` of the disjunct's rows (positive where a disjunct holds with room to spare). Each
start climbs it with steps scaled per coordinate to its sub-domain's box (ACAS Xu's inputs
differ in range by orders of magnitude), shrinking geometrically, projected onto its region
after every step; the best point of each start is kept. The exact check of a candidate is the
caller's (the problem's own `violated_at` on the user's model).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from propdsl.region import INF, Region
from propdsl.verify.bab.spec import Rows

__all__ = ["climb"]


def climb(
    model: nn.Module, rows: Rows, region: Region, start: Tensor, steps: int
) -> tuple[Tensor, Tensor]:
    """Maximise the violation from each start [P, ...] in its region (batched [P]).

    Returns the best points [P, ...] and their violations [P] (detached).
    """
    x = region.project(start.detach())
    with torch.no_grad():
        best_v = rows.violation(model(x))
    best_x = x.clone()
    if steps == 0:
        return best_x, best_v
    lo, hi = region.bounding_box()
    width = (hi - lo).clamp_min(0)
    radius = None
    if region.centre is not None and region.p != INF:
        radius = region.radius.reshape(-1, *([1] * (x.dim() - 1)))  # type: ignore[union-attr]
    first, last = 0.25, 0.002
    for step in range(steps):
        frac = first * (last / first) ** (step / max(1, steps - 1))
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            v = rows.violation(model(x))
            (g,) = torch.autograd.grad(v.sum(), x)
        with torch.no_grad():
            if radius is None:
                move = g.sign() * width * frac
            else:
                flat = g.flatten(1)
                norm = flat.norm(dim=1) if region.p == 2 else flat.abs().amax(dim=1)
                norm = torch.where(norm > 0, norm, torch.ones_like(norm))
                move = g / norm.reshape(-1, *([1] * (x.dim() - 1))) * radius * 2 * frac
            x = region.project(x + move)
            v = rows.violation(model(x))
            better = v > best_v
            best_v = torch.where(better, v, best_v)
            best_x[better] = x[better]
            if not math.isfinite(float(best_v.max())):
                break
    return best_x.detach(), best_v.detach()
