"""Input regions: an Lp ball intersected with a box, batched over samples.

A `Region` is the tensor-level meaning of the language's domains `ball(c, r, p) & box(lo, hi)`.
Attacks project onto it and sample from it; bound propagation concretises linear functions over it.
Every tensor carries the batch as its first dimension; `lo` / `hi` broadcast against `centre`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

INF = math.inf


def _per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """Reshape a scalar or [B] radius so it broadcasts against a [B, ...] tensor."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def lp_norm(v: Tensor, p: float) -> Tensor:
    """Per-sample Lp norm of a [B, ...] tensor (p in 1, 2, inf)."""
    flat = v.flatten(1)
    if p == INF:
        return flat.abs().amax(dim=1)
    if p == 1:
        return flat.abs().sum(dim=1)
    if p == 2:
        return flat.norm(dim=1)
    return flat.abs().pow(p).sum(dim=1).pow(1.0 / p)


@dataclass(frozen=True, eq=False)
class Region:
    """`ball(centre, radius, p) & box(lo, hi)` for a batch of centres.

    `radius` is a scalar or a [B] tensor; `p` is 1, 2 or `math.inf`. Either part may be absent:
    `centre is None` is a plain box (then `lo` and `hi` must be given, with a batch dimension);
    `lo is None and hi is None` is a plain ball.

    >>> import torch
    >>> r = Region.ball(torch.zeros(2, 3), 0.1, math.inf, lo=0.0, hi=1.0)
    >>> r.bounding_box()[1][0].tolist()
    [0.10000000149011612, 0.10000000149011612, 0.10000000149011612]
    """

    centre: Tensor | None
    radius: Tensor | None
    p: float
    lo: Tensor | None = None
    hi: Tensor | None = None

    # -- construction ----------------------------------------------------------------------------
    @staticmethod
    def ball(
        centre: Tensor,
        radius: float | Tensor,
        p: float = INF,
        *,
        lo: float | Tensor | None = None,
        hi: float | Tensor | None = None,
    ) -> Region:
        if p not in (1, 2, INF):
            raise ValueError(f"ball norm must be 1, 2 or inf, got {p}")
        # Convert straight to the centre's dtype: a Python float must not pass through float32.
        r = _per_sample(radius, centre).flatten()
        if r.numel() not in (1, centre.shape[0]):
            raise ValueError(f"ball radius has {r.numel()} entries for {centre.shape[0]} centres")
        if not bool((r >= 0).all()):
            raise ValueError("ball radius must be non-negative (and not NaN)")
        r = r.expand(centre.shape[0])
        to: dict[str, Any] = dict(dtype=centre.dtype, device=centre.device)
        lo_t = None if lo is None else torch.as_tensor(lo, **to)
        hi_t = None if hi is None else torch.as_tensor(hi, **to)
        return Region(centre=centre, radius=r, p=float(p), lo=lo_t, hi=hi_t)

    @staticmethod
    def box(lo: Tensor, hi: Tensor) -> Region:
        if lo.shape != hi.shape:
            raise ValueError("box bounds must have the same shape")
        return Region(centre=None, radius=None, p=INF, lo=lo, hi=hi)

    def intersect_box(self, lo: float | Tensor, hi: float | Tensor) -> Region:
        """This region intersected with one more box (boxes intersect element-wise)."""
        ref = self.centre if self.centre is not None else self.lo
        assert ref is not None
        lo_t = torch.as_tensor(lo, dtype=ref.dtype, device=ref.device)
        hi_t = torch.as_tensor(hi, dtype=ref.dtype, device=ref.device)
        new_lo = lo_t if self.lo is None else torch.maximum(self.lo, lo_t)
        new_hi = hi_t if self.hi is None else torch.minimum(self.hi, hi_t)
        return Region(self.centre, self.radius, self.p, new_lo, new_hi)

    # -- geometry --------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        ref = self.centre if self.centre is not None else self.lo
        assert ref is not None
        return ref.shape

    def bounding_box(self) -> tuple[Tensor, Tensor]:
        """Element-wise bounds [B, ...] containing the region (exact for L-inf balls and boxes)."""
        if self.centre is None:
            assert self.lo is not None and self.hi is not None
            return self.lo.expand(self.shape).clone(), self.hi.expand(self.shape).clone()
        assert self.radius is not None
        r = _per_sample(self.radius, self.centre)
        lo, hi = self.centre - r, self.centre + r
        if self.lo is not None:
            lo = torch.maximum(lo, self.lo)
            hi = torch.maximum(hi, self.lo)
        if self.hi is not None:
            hi = torch.minimum(hi, self.hi)
            lo = torch.minimum(lo, self.hi)
        return lo, hi

    def clip_box(self, z: Tensor) -> Tensor:
        if self.lo is not None:
            z = torch.maximum(z, self.lo)
        if self.hi is not None:
            z = torch.minimum(z, self.hi)
        return z

    def project(self, z: Tensor) -> Tensor:
        """The Euclidean projection of `z` onto the region (the closest feasible point).

        Exact for every p: for p = inf both parts are boxes and clipping twice is exact; for
        p = 1 and 2 without a box the closed forms are used (rescaling; Duchi et al. 2008); for
        p = 1 and 2 with a box the optimality conditions reduce the problem to one scalar (the
        ball constraint's multiplier) that is found by bisection, returning the feasible end of
        the bracket. The result is feasible whenever the region is non-empty, also when the
        centre lies outside the box. (For an empty region it is the box point nearest the centre.)
        """
        if self.centre is None:
            return self.clip_box(z)
        assert self.radius is not None
        delta = z - self.centre
        r = _per_sample(self.radius, self.centre)
        if self.p == INF:
            delta = torch.maximum(torch.minimum(delta, r), -r)
            return self.clip_box(self.centre + delta)
        if self.lo is None and self.hi is None:
            if self.p == 2:
                norm = _per_sample(lp_norm(delta, 2), self.centre)
                delta = delta * torch.clamp_max(r / norm.clamp_min(1e-12), 1.0)
            else:
                delta = _project_l1(delta, r)
            return self.centre + delta
        # The box in coordinates relative to the centre.
        inf = torch.full_like(delta, INF)
        dlo = -inf if self.lo is None else (self.lo - self.centre).expand_as(delta)
        dhi = inf if self.hi is None else (self.hi - self.centre).expand_as(delta)
        delta = _project_ball_box(delta, r.flatten(), self.p, dlo, dhi)
        return self.clip_box(self.centre + delta)

    def contains(self, z: Tensor, tol: float = 1e-6) -> Tensor:
        """BoolTensor[B]: which samples' points lie in the region (with absolute tolerance)."""
        ok = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        if self.centre is not None:
            assert self.radius is not None
            ok &= lp_norm(z - self.centre, self.p) <= self.radius + tol
        if self.lo is not None:
            ok &= (z >= self.lo - tol).flatten(1).all(dim=1)
        if self.hi is not None:
            ok &= (z <= self.hi + tol).flatten(1).all(dim=1)
        return ok

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One random feasible point per sample: uniform in the ball (or box), then projected.

        For a centre inside the box the projection of a ball point is plain clipping, so the
        points are uniform in the ball with the mass outside the box moved onto its faces.
        """
        if self.centre is None:
            lo, hi = self.bounding_box()
            u = torch.rand(lo.shape, generator=generator, dtype=lo.dtype, device=lo.device)
            return lo + u * (hi - lo)
        assert self.radius is not None
        c = self.centre
        r = _per_sample(self.radius, c)
        n = c[0].numel()
        kw: dict[str, Any] = dict(generator=generator, dtype=c.dtype, device=c.device)
        if self.p == INF:
            delta = (2 * torch.rand(c.shape, **kw) - 1) * r
        elif self.p == 2:
            g = torch.randn(c.shape, **kw)
            g = g / _per_sample(lp_norm(g, 2), c).clamp_min(1e-12)
            u = torch.rand(c.shape[0], **kw).pow(1.0 / n)
            delta = g * _per_sample(u, c) * r
        else:
            # Uniform in the L1 ball: signed exponentials over a sum with one extra exponential.
            e = -torch.rand((c.shape[0], n + 1), **kw).clamp_min(1e-12).log()
            signs = torch.randint(0, 2, c.shape, generator=generator, device=c.device) * 2 - 1
            w = e[:, :n] / e.sum(dim=1, keepdim=True)
            delta = w.reshape(c.shape) * signs.to(c.dtype) * r
        if self.lo is None and self.hi is None:
            return c + delta
        return self.project(c + delta)


def _project_l1(delta: Tensor, r: Tensor) -> Tensor:
    """Exact Euclidean projection of each sample's `delta` onto the L1 ball of radius r.

    Sort-based soft thresholding (Duchi et al. 2008).
    """
    shape = delta.shape
    v = delta.flatten(1)
    radius = r.flatten()
    inside = v.abs().sum(dim=1) <= radius
    u, _ = v.abs().sort(dim=1, descending=True)
    css = u.cumsum(dim=1)
    k = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=v.dtype)
    cond = u - (css - radius[:, None]) / k > 0
    rho = cond.to(v.dtype).mul(k).argmax(dim=1)
    theta = (css.gather(1, rho[:, None]).squeeze(1) - radius) / (rho + 1).to(v.dtype)
    theta = theta.clamp_min(0)
    w = torch.sign(v) * torch.clamp_min(v.abs() - theta[:, None], 0)
    return torch.where(inside[:, None], v, w).reshape(shape)


def _project_ball_box(delta: Tensor, r: Tensor, p: float, dlo: Tensor, dhi: Tensor) -> Tensor:
    """Projection of `delta` onto {||d||_p <= r} & [dlo, dhi] for p in (1, 2), per sample.

    With a multiplier for the ball constraint the problem separates per coordinate, and each
    one-dimensional minimiser over an interval is the unconstrained one clipped:
      p = 2: d(t) = clip(t * delta), t = 1 / (1 + multiplier) in [0, 1], largest feasible t;
      p = 1: d(m) = clip(soft_threshold(delta, m)), m in [0, max |delta|], smallest feasible m.
    ||d|| is monotone in the scalar, so bisection finds it; the feasible end is returned.
    """

    def at(s: Tensor) -> Tensor:
        s = s.reshape(-1, *([1] * (delta.dim() - 1)))
        if p == 2:
            d = s * delta
        else:
            d = torch.sign(delta) * torch.clamp_min(delta.abs() - s, 0)
        return torch.minimum(torch.maximum(d, dlo), dhi)

    def feasible(d: Tensor) -> Tensor:
        return lp_norm(d, p) <= r

    batch = delta.shape[0]
    if p == 2:  # feasible end `good` = 0 (the box point nearest the centre), bad end = 1
        good, bad = delta.new_zeros(batch), delta.new_ones(batch)
    else:  # feasible end = max |delta| (soft threshold to zero), bad end = 0
        good, bad = delta.flatten(1).abs().amax(dim=1), delta.new_zeros(batch)
    done = feasible(at(bad))
    if bool(done.all()):
        return at(bad)
    # Each halving gains one bit; the mantissa's width (+2) reaches the dtype's resolution.
    for _ in range(round(-math.log2(torch.finfo(delta.dtype).eps)) + 2):
        mid = 0.5 * (good + bad)
        ok = feasible(at(mid))
        good = torch.where(ok, mid, good)
        bad = torch.where(ok, bad, mid)
    return torch.where(done.reshape(-1, *([1] * (delta.dim() - 1))), at(bad), at(good))
