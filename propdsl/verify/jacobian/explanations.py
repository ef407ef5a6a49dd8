"""Bounds of explanation comparisons over a box of maps: the saliency's bounds are Jacobian
rows, and these turn them into certified distances, cosines and top-k overlaps against a
reference map. See docs/jacobian.md, "Explanation bounds".
"""

from __future__ import annotations

import torch
from torch import Tensor

from propdsl.explain import NORM_EPS
from propdsl.verify.jacobian.lipschitz import norm_value
from propdsl.verify.layers import Interval, interval_product

__all__ = [
    "cosine_lower_bound",
    "distance_bound",
    "mse_bound",
    "product_bounds",
    "topk_lower_bound",
]


def _flat_pair(lo: Tensor, hi: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if lo.shape != hi.shape or lo.shape != g.shape:
        raise ValueError(
            f"map bounds {tuple(lo.shape)} / {tuple(hi.shape)} and reference {tuple(g.shape)} "
            "must have one shape [B, ...]"
        )
    return lo.flatten(1), hi.flatten(1), g.flatten(1)


def distance_bound(lo: Tensor, hi: Tensor, g: Tensor, p: float | str = 2) -> Tensor:
    """max over maps s with lo <= s <= hi of ||s - g||_p, per sample [B].

    Each entry of |s - g| is at most max(hi - g, g - lo) (exact per entry, wherever g is), and
    Lp norms are monotone in the absolute entries.

    >>> import torch
    >>> distance_bound(torch.tensor([[0.0, -1.0]]), torch.tensor([[2.0, 1.0]]),
    ...                torch.tensor([[0.5, 0.0]]), "inf").tolist()
    [1.5]
    """
    lo, hi, g = _flat_pair(lo, hi, g)
    gap = torch.maximum(hi - g, g - lo)
    return torch.linalg.vector_norm(gap, ord=norm_value(p), dim=1)


def mse_bound(lo: Tensor, hi: Tensor, g: Tensor) -> Tensor:
    """max over maps s in [lo, hi] of the mean squared difference to g, per sample [B]."""
    lo, hi, g = _flat_pair(lo, hi, g)
    return torch.maximum(hi - g, g - lo).pow(2).mean(dim=1)


def cosine_lower_bound(lo: Tensor, hi: Tensor, g: Tensor) -> Tensor:
    """A lower bound [B] of `propdsl.explain.cosine(s, g)` over every map s with lo <= s <= hi.

    The dot product s . g is bounded below exactly by interval arithmetic (d = sum of
    min(lo g, hi g)); ||s|| lies between the distance from 0 to the box (N_min) and
    ||max(|lo|, |hi|)|| (N_max). With the cosine's guard against zero maps (norms clamped at
    1e-12, as in `explain.cosine`): d / (max(N_max, eps) max(||g||, eps)) when d >= 0, and
    d / (max(N_min, eps) max(||g||, eps)) when d < 0; clamped into [-1, 1].

    A second, geometric bound: every s of the box lies within R = `distance_bound(lo, hi, g, 2)`
    of g, and the angle between g and any point of that ball is at most arcsin(R / ||g||), so
    cos >= sqrt(1 - (R / ||g||)^2) when ||g|| - R > 0 (the guard then never applies). The larger
    of the two is returned: the first wins for wide boxes, the second when the box is narrow
    but far from 0 in a few entries.

    >>> import torch
    >>> g = torch.tensor([[1.0, 0.0]])
    >>> round(float(cosine_lower_bound(g, torch.tensor([[1.0, 0.5]]), g)), 4)
    0.8944
    """
    lo, hi, g = _flat_pair(lo, hi, g)
    dot = torch.minimum(lo * g, hi * g).sum(dim=1)
    largest = torch.linalg.vector_norm(torch.maximum(lo.abs(), hi.abs()), dim=1)
    nearest = torch.clamp(torch.zeros_like(lo), lo, hi)  # the point of the box closest to 0
    smallest = torch.linalg.vector_norm(nearest, dim=1)
    g_norm = torch.linalg.vector_norm(g, dim=1).clamp_min(NORM_EPS)
    norm = torch.where(dot >= 0, largest, smallest).clamp_min(NORM_EPS)
    interval = (dot / (norm * g_norm)).clamp(-1.0, 1.0)
    radius = torch.linalg.vector_norm(torch.maximum(hi - g, g - lo), dim=1)
    g_true = torch.linalg.vector_norm(g, dim=1)
    ratio = radius / g_true.clamp_min(NORM_EPS)
    inside = (g_true - radius > NORM_EPS) & (ratio < 1.0)
    geometric = torch.sqrt((1.0 - ratio.clamp(max=1.0) ** 2).clamp_min(0.0))
    return torch.where(inside, torch.maximum(interval, geometric), interval)


def topk_lower_bound(lo: Tensor, hi: Tensor, g: Tensor, k: int) -> Tensor:
    """A lower bound [B] of `propdsl.explain.topk_intersection(s, g, k)` (importance |.|) over
    every map s with lo <= s <= hi.

    Feature i is in the top k of |s| for every s of the box when at most k - 1 other features
    can reach its smallest magnitude (#{j != i : max|s_j| >= min|s_i|} <= k - 1, whatever the
    tie-breaking); the bound counts such features among the top k of |g| (chosen by
    `torch.topk`, as the property does). The whole top-k set is certified when the bound is 1.

    >>> import torch
    >>> lo, hi = torch.tensor([[0.8, 0.5, 0.0]]), torch.tensor([[1.0, 0.7, 0.1]])
    >>> topk_lower_bound(lo, hi, torch.tensor([[1.0, 0.7, 0.0]]), 1).tolist()
    [1.0]
    """
    lo, hi, g = _flat_pair(lo, hi, g)
    n = lo.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in 1..{n}, got {k}")
    cross = (lo < 0) & (hi > 0)
    low = torch.where(cross, torch.zeros_like(lo), torch.minimum(lo.abs(), hi.abs()))
    high = torch.maximum(lo.abs(), hi.abs())
    ordered = high.sort(dim=1).values
    # features whose largest magnitude reaches low_i (i itself included)
    reach = n - torch.searchsorted(ordered, low.contiguous(), side="left")
    certain = reach <= k
    top = g.abs().topk(k, dim=1).indices
    return certain.gather(1, top).sum(dim=1).to(lo.dtype) / k


def product_bounds(a_lo: Tensor, a_hi: Tensor, b_lo: Tensor, b_hi: Tensor) -> Interval:
    """Element-wise bounds of a * b for a in [a_lo, a_hi] and b in [b_lo, b_hi] (gradient x
    input from bounds of the input and of the saliency)."""
    return interval_product(a_lo, a_hi, b_lo, b_hi)
