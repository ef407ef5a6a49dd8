"""Input regions: an Lp ball intersected with a box, batched over samples.

A `Region` is the tensor-level meaning of the language's domains `ball(c, r, p) & box(lo, hi)`.
Attacks project onto it and sample from it; bound propagation concretises linear functions over it.
Every tensor carries the batch as its first dimension; `lo` / `hi` broadcast against `centre`.

A region may be empty for some samples: a ball that misses the box (a centre far outside it, as
with unscaled pixels 0..255 under `box(0, 1)`), or two boxes that do not meet. `is_empty()` says
which; no consumer may treat such a sample's projection or bounding box as a point of the region
(there is none). Centres must be finite: a NaN or infinite centre is a `RegionError`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from propdsl.distributed import draw
from propdsl.errors import UsageError

INF = math.inf

# A ball misses its box (the region is empty) when the Lp distance from the centre to the box
# exceeds the radius by more than `contains`' default tolerance plus a few units of rounding of
# the region's dtype: decimal data and radii rounded to float32 (1.1 and 0.1 miss each other by
# 2e-8 there) touch. Such a region's one point is the box point nearest the centre, inside the
# ball up to that tolerance, as every point the attacks return is.
_EMPTY_TOL = 1e-6


class RegionError(UsageError, ValueError):
    """A region that cannot be built (a NaN or infinite centre, a NaN radius or box bound) or
    used as asked (bound propagation over an empty or unbounded region)."""


def _finite_ok(t: Tensor, *, allow_inf: bool = False) -> Tensor:
    """0-dim BoolTensor: `t` has no NaN (and, unless `allow_inf`, no infinite) values."""
    if allow_inf:
        return ~t.isnan().any()
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    # the largest magnitude is finite exactly when every entry is (NaN propagates through
    # amax): three ops where `isfinite(t).all()` takes five
    return t.abs().amax() < math.inf


def _bound(value: float | Tensor, ref: Tensor) -> tuple[Tensor, Tensor | bool | None]:
    """A box bound as a tensor of `ref`'s dtype and device, with its validity still to check:
    a Python number or 0-dim tensor (a constant such as the spec's `box(0, 1)`) is checked here
    without a reduction (False if NaN, None if fine); any other tensor's check is returned as a
    0-dim BoolTensor for the caller to fuse with its other checks into one host sync."""
    if isinstance(value, int | float):
        return torch.as_tensor(value, dtype=ref.dtype, device=ref.device), not math.isnan(value)
    t = torch.as_tensor(value, dtype=ref.dtype, device=ref.device)
    if t.dim() > 0:
        return t, _finite_ok(t, allow_inf=True)
    return t, not math.isnan(t.item())


def _all_true(checks: list[Tensor | bool | None]) -> bool:
    """Whether every check holds (None: nothing to check; a bool: known; a 0-dim BoolTensor:
    read back), with one host sync for all the tensors (none if a bool already failed)."""
    if any(c is False for c in checks):
        return False
    pending = [c for c in checks if isinstance(c, Tensor)]
    if not pending:
        return True
    ok = pending[0]
    for c in pending[1:]:
        ok = ok & c
    return bool(ok)


def _check_finite(t: Tensor, what: str, *, allow_inf: bool = False) -> None:
    bad = t.isnan() if allow_inf else ~torch.isfinite(t)
    if bool(bad.any()):
        kind = "NaN" if allow_inf else "NaN or infinite"
        where = ""
        if t.dim() > 0 and t.shape[0] > 1:
            rows = bad.reshape(t.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            shown = ", ".join(map(str, rows[:5])) + (", ..." if len(rows) > 5 else "")
            where = f" (samples {shown})"
        raise RegionError(f"{what} has {int(bad.sum())} {kind} values{where}")


def _per_sample(value: float | Tensor, like: Tensor) -> Tensor:
    """Reshape a scalar or [B] radius so it broadcasts against a [B, ...] tensor."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if value.dim() == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def rows(v: Tensor) -> Tensor:
    """[B, ...] as [B, n]: one row per sample (a scalar variable, [B], is [B, 1])."""
    return v.reshape(v.shape[0], -1)


def lp_norm(v: Tensor, p: float) -> Tensor:
    """Per-sample Lp norm of a [B, ...] tensor (p in 1, 2, inf)."""
    flat = rows(v)
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
        # Every validity check of the construction as one fused test and one host sync (this
        # runs once per attack, i.e. per training step); on a failure the checks run one by
        # one, in their order, for the first one's message.
        scalar = isinstance(radius, int | float)
        checks = [_finite_ok(centre), bool(radius >= 0) if scalar else (r >= 0).all()]
        lo_t = lo_ok = hi_t = hi_ok = None
        if lo is not None:
            lo_t, lo_ok = _bound(lo, centre)
        if hi is not None:
            hi_t, hi_ok = _bound(hi, centre)
        if r.numel() not in (1, centre.shape[0]) or not _all_true([*checks, lo_ok, hi_ok]):
            _check_finite(centre, "the ball's centre")
            if r.numel() not in (1, centre.shape[0]):
                n = centre.shape[0]
                raise ValueError(f"ball radius has {r.numel()} entries for {n} centres")
            if not bool((r >= 0).all()):
                raise ValueError("ball radius must be non-negative (and not NaN)")
            for bound, name in ((lo_t, "lower"), (hi_t, "upper")):
                if bound is not None:
                    _check_finite(bound, f"the box's {name} bound", allow_inf=True)
        r = r.expand(centre.shape[0])
        return Region(centre=centre, radius=r, p=float(p), lo=lo_t, hi=hi_t)

    @staticmethod
    def box(lo: Tensor, hi: Tensor) -> Region:
        """The box [lo, hi] per sample (bounds [B, ...]; lo > hi somewhere makes it empty)."""
        if lo.shape != hi.shape:
            raise ValueError("box bounds must have the same shape")
        if not _all_true([_finite_ok(lo, allow_inf=True), _finite_ok(hi, allow_inf=True)]):
            _check_finite(lo, "the box's lower bound", allow_inf=True)
            _check_finite(hi, "the box's upper bound", allow_inf=True)
        return Region(centre=None, radius=None, p=INF, lo=lo, hi=hi)

    def intersect_box(self, lo: float | Tensor, hi: float | Tensor) -> Region:
        """This region intersected with one more box (boxes intersect element-wise)."""
        ref = self.centre if self.centre is not None else self.lo
        assert ref is not None
        lo_t, lo_ok = _bound(lo, ref)
        hi_t, hi_ok = _bound(hi, ref)
        if not _all_true([lo_ok, hi_ok]):
            _check_finite(lo_t, "the box's lower bound", allow_inf=True)
            _check_finite(hi_t, "the box's upper bound", allow_inf=True)
        new_lo = lo_t if self.lo is None else torch.maximum(self.lo, lo_t)
        new_hi = hi_t if self.hi is None else torch.minimum(self.hi, hi_t)
        return Region(self.centre, self.radius, self.p, new_lo, new_hi)

    # -- geometry --------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        ref = self.centre if self.centre is not None else self.lo
        assert ref is not None
        return ref.shape

    def is_empty(self) -> Tensor:
        """BoolTensor[B]: which samples' regions have no point at all.

        A box is empty where some `lo > hi`. A ball meets a box exactly when the box point
        nearest the centre lies within the radius; for every p that point is the centre clipped
        into the box (each coordinate's distance is minimised independently), so the test is
        `||centre - clip(centre)||_p > radius` (computed in float64; a distance above the radius
        by at most `contains`' default tolerance, 1e-6, plus the dtype's rounding counts as
        touching). Several boxes are intersected element-wise first.

        >>> import torch
        >>> c = torch.tensor([[0.5, 0.5], [3.0, 0.5], [1.05, 1.05]])
        >>> Region.ball(c, 0.1, math.inf, lo=0.0, hi=1.0).is_empty().tolist()
        [False, True, False]
        >>> Region.ball(c, 0.1, 2, lo=0.0, hi=1.0).is_empty().tolist()  # L2: 0.0707 from the box
        [False, True, False]
        >>> Region.ball(c, 0.1, 1, lo=0.0, hi=1.0).is_empty().tolist()  # L1: 0.1 from the box
        [False, True, False]
        """
        shape = self.shape
        batch = shape[0]
        parts: list[Tensor] = []
        if self.lo is not None and self.hi is not None:
            # Compared as given: a bound shared by every sample (the spec's `box(0, 1)`) once.
            crossed = self.lo > self.hi
            if crossed.dim() == len(shape) and crossed.shape[0] == batch:
                parts.append(crossed.expand(shape).reshape(batch, -1).any(dim=1))
            else:
                parts.append(crossed.any().expand(batch))
        if self.centre is not None:
            assert self.radius is not None
            dtype = self.centre.dtype
            # L-inf in the region's own dtype when it is float32 or float64: each coordinate's
            # `c - clip(c)` is one correctly rounded subtraction (clip is exact) and the max is
            # exact, so the computed distance is within a relative eps/2 of the true one, and
            # the sums on the right within 2 eps: far inside the 4 eps * (r + dist) of rounding
            # allowed, so a region that meets its box is never called empty. Sums of L1 / L2
            # norms round more (n terms), so those go through float64 as before.
            native = self.p == INF and dtype in (torch.float32, torch.float64)
            work = dtype if native else torch.float64
            c = self.centre.to(work)
            lo = None if self.lo is None else self.lo.to(work)
            hi = None if self.hi is None else self.hi.to(work)
            # clamp is max-then-min, as the nearest box point needs (also where lo > hi)
            nearest = c if lo is None and hi is None else torch.clamp(c, lo, hi)
            dist = lp_norm(c - nearest, self.p)
            r = self.radius.to(work).expand(batch)
            rounding = 4 * torch.finfo(dtype).eps * (r + dist)
            parts.append(dist > r + _EMPTY_TOL + rounding)
        if not parts:
            return torch.zeros(batch, dtype=torch.bool, device=self._device())
        if len(parts) == 1:
            return parts[0].clone() if parts[0].stride(0) == 0 else parts[0]
        return parts[0] | parts[1]

    def select(self, index: Tensor) -> Region:
        """The region of the samples `index` (a [K] index or a [B] boolean mask)."""
        batch = self.shape[0]

        def pick(t: Tensor | None) -> Tensor | None:
            # Per-sample tensors have the region's number of dimensions (broadcasting aligns
            # their first one with the batch); others are shared by every sample.
            if t is None or t.dim() != len(self.shape) or t.shape[0] != batch:
                return t
            return t[index]

        radius = None if self.radius is None else self.radius[index]
        return Region(pick(self.centre), radius, self.p, pick(self.lo), pick(self.hi))

    def _device(self) -> torch.device:
        ref = self.centre if self.centre is not None else self.lo
        assert ref is not None
        return ref.device

    def bounding_box(self) -> tuple[Tensor, Tensor]:
        """Element-wise bounds [B, ...] containing the region (exact for L-inf balls and boxes).

        Meaningless for a sample whose region is empty (`is_empty()`): there it is the box point
        nearest the centre (or, for plain boxes, bounds with lo > hi), which is not in the region.
        """
        if self.centre is None:
            assert self.lo is not None and self.hi is not None
            return self.lo.expand(self.shape).clone(), self.hi.expand(self.shape).clone()
        assert self.radius is not None
        r = _per_sample(self.radius, self.centre)
        lo, hi = self.centre - r, self.centre + r
        if self.lo is not None and self.hi is not None:
            # clamp is max-then-min: the same as the two steps below, one op each
            return torch.clamp(lo, self.lo, self.hi), torch.clamp(hi, self.lo, self.hi)
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
        centre lies outside the box. For a sample whose region is empty (`is_empty()`) it is the
        box point nearest the centre, which is NOT in the region: callers must check emptiness.
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
            ok &= rows(z >= self.lo - tol).all(dim=1)
        if self.hi is not None:
            ok &= rows(z <= self.hi + tol).all(dim=1)
        return ok

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """One random feasible point per sample: uniform in the ball (or box), then projected
        (for an empty sample, a point outside the region, as `project` returns).

        For a centre inside the box the projection of a ball point is plain clipping, so the
        points are uniform in the ball with the mass outside the box moved onto its faces.
        """
        if self.centre is None:
            lo, hi = self.bounding_box()
            u = draw(torch.rand, lo.shape, generator=generator, dtype=lo.dtype, device=lo.device)
            return lo + u * (hi - lo)
        assert self.radius is not None
        c = self.centre
        r = _per_sample(self.radius, c)
        n = c[0].numel()
        kw: dict[str, Any] = dict(generator=generator, dtype=c.dtype, device=c.device)
        if self.p == INF:
            delta = (2 * draw(torch.rand, c.shape, **kw) - 1) * r
            # delta is in the ball already: projecting is clipping into the box (as `project`
            # does, without its clamp of delta to the radius)
            return self.clip_box(c + delta)
        elif self.p == 2:
            g = draw(torch.randn, c.shape, **kw)
            g = g / _per_sample(lp_norm(g, 2), c).clamp_min(1e-12)
            u = draw(torch.rand, (c.shape[0],), **kw).pow(1.0 / n)
            delta = g * _per_sample(u, c) * r
        else:
            # Uniform in the L1 ball: signed exponentials over a sum with one extra exponential.
            e = -draw(torch.rand, (c.shape[0], n + 1), **kw).clamp_min(1e-12).log()
            signs = draw(torch.randint, c.shape, 0, 2, generator=generator, device=c.device) * 2 - 1
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
    v = rows(delta)
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
        good, bad = rows(delta).abs().amax(dim=1), delta.new_zeros(batch)
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
