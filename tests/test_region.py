"""Region: projection, sampling, containment and bounding boxes, against independent answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog, minimize

from propdsl.region import Region, RegionError, lp_norm

INF = math.inf
NORMS = (1, 2, INF)


def _offset_with_norm_at_most(rng: np.random.Generator, n: int, p: float, r: float) -> np.ndarray:
    u = rng.normal(size=n)
    size = np.linalg.norm(u, ord=p)
    return u / size * r * rng.uniform() if size > 0 else u


@st.composite
def regions_and_points(draw):
    """A non-empty `ball & box` (the centre may lie outside the box) and points far from it."""
    seed = draw(st.integers(0, 2**32 - 1))
    p = draw(st.sampled_from(NORMS))
    batch, n = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    radius = draw(st.sampled_from([0.0, 1e-3, 0.05, 0.3, 2.0]))
    with_box = draw(st.booleans())
    rng = np.random.default_rng(seed)
    lo = rng.uniform(-1, 0.5, size=(batch, n))
    hi = lo + rng.uniform(0, 1, size=(batch, n))
    if with_box:
        # A box point within the radius of the centre keeps the intersection non-empty.
        inside = lo + rng.uniform(size=(batch, n)) * (hi - lo)
        offsets = [_offset_with_norm_at_most(rng, n, p, radius) for _ in range(batch)]
        centre = inside + np.stack(offsets)
    else:
        centre = rng.normal(size=(batch, n))
    z = centre + rng.normal(scale=draw(st.sampled_from([0.01, 1.0, 10.0])), size=(batch, n))
    t = dict(dtype=torch.float64)
    box = dict(lo=torch.tensor(lo, **t), hi=torch.tensor(hi, **t)) if with_box else {}
    region = Region.ball(torch.tensor(centre, **t), radius, p, **box)
    return region, torch.tensor(z, **t)


@settings(max_examples=150, deadline=None)
@given(regions_and_points())
def test_project_is_feasible_idempotent_and_optimal(case):
    region, z = case
    assert not bool(region.is_empty().any())  # a box point within the radius exists
    q = region.project(z)
    assert bool(region.contains(q, tol=1e-9).all())
    assert torch.allclose(region.project(q), q, atol=1e-9)
    # The projection onto a convex set is characterised by <z - q, y - q> <= 0 for all feasible y.
    ys = torch.stack([region.sample() for _ in range(20)] + [region.project(z + 0.1)])
    inner = ((z - q) * (ys - q)).sum(dim=-1)
    scale = (z - q).norm(dim=-1) * (ys - q).norm(dim=-1)
    assert bool((inner <= 1e-7 * (1 + scale)).all())


def _qp_projection(z, c, r, p, lo=None, hi=None):
    """The Euclidean projection by a general-purpose solver (SLSQP), for tiny vectors."""
    n = len(z)
    if p == 1:  # x = c + u - v with u, v >= 0 and sum(u + v) <= r: a smooth problem

        def point(w):
            return c + w[:n] - w[n:]

        cons = [{"type": "ineq", "fun": lambda w: r - w.sum()}]
        bounds = [(0, None)] * (2 * n)
        w0 = np.zeros(2 * n)
    else:

        def point(w):
            return w

        cons = [{"type": "ineq", "fun": lambda w: r**2 - ((w - c) ** 2).sum()}]
        bounds = [(None, None)] * n
        w0 = c.copy()
    if lo is not None:
        cons.append({"type": "ineq", "fun": lambda w: point(w) - lo})
        cons.append({"type": "ineq", "fun": lambda w: hi - point(w)})
    res = minimize(
        lambda w: ((point(w) - z) ** 2).sum(),
        w0,
        method="SLSQP",
        bounds=bounds,
        constraints=cons,
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return point(res.x)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("with_box", [False, True])
def test_projection_matches_a_qp_solver_on_tiny_vectors(p, with_box):
    rng = np.random.default_rng(3)
    for _ in range(12):
        n = int(rng.integers(2, 5))
        c = rng.uniform(0, 1, n)
        z = c + rng.normal(scale=1.0, size=n)
        r = float(rng.uniform(0.1, 0.8))
        lo, hi = (np.zeros(n), np.ones(n)) if with_box else (None, None)
        expected = _qp_projection(z, c, r, p, lo, hi)
        box = dict(lo=0.0, hi=1.0) if with_box else {}
        region = Region.ball(torch.tensor(c[None]), r, p, **box)
        got = region.project(torch.tensor(z[None]))[0].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_l1_projection_by_hand():
    # Soft-thresholding (3, 1) onto the unit L1 ball: threshold 2 gives (1, 0);
    # (0.8, -0.6, 0.2) onto radius 1: threshold 0.2 gives (0.6, -0.4, 0).
    region = Region.ball(torch.zeros(2, 3, dtype=torch.float64), 1.0, 1)
    z = torch.tensor([[3.0, 1.0, 0.0], [0.8, -0.6, 0.2]], dtype=torch.float64)
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.6, -0.4, 0.0]], dtype=torch.float64)
    assert torch.allclose(region.project(z), expected)
    # Points already inside stay where they are.
    inner = torch.tensor([[0.2, -0.3, 0.1]], dtype=torch.float64)
    assert torch.equal(Region.ball(torch.zeros(1, 3), 1.0, 1).project(inner.float()), inner.float())


def test_projection_with_centre_outside_the_box_stays_feasible():
    # Ball then clip would give (1, 1), at distance sqrt(0.25 + 1) > 1 from the centre.
    region = Region.ball(torch.tensor([[1.5, 0.0]]), 1.0, 2, lo=0.0, hi=1.0)
    q = region.project(torch.tensor([[1.5, 2.0]]))
    assert bool(region.contains(q).all())
    # The closest feasible point of {x in [0,1]^2, |x - c| <= 1}: x1 = 1, x2 = sqrt(1 - 0.25).
    assert torch.allclose(q, torch.tensor([[1.0, math.sqrt(0.75)]]), atol=1e-6)


@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("with_box", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_samples_lie_in_the_region_and_its_bounding_box(p, with_box, dtype):
    gen = torch.Generator().manual_seed(1)
    centre = torch.rand(64, 2, 3, generator=gen, dtype=dtype)
    radius = torch.linspace(0, 0.5, 64, dtype=dtype)  # per-sample radii, one of them zero
    box = dict(lo=0.0, hi=1.0) if with_box else {}
    region = Region.ball(centre, radius, p, **box)
    x = region.sample(gen)
    assert x.dtype == dtype and x.shape == centre.shape
    assert bool(region.contains(x).all())
    assert torch.equal(x[0], centre[0])  # zero radius
    lo, hi = region.bounding_box()
    assert bool(((lo <= x) & (x <= hi)).all())


@pytest.mark.parametrize("p", NORMS)
def test_ball_samples_are_uniform(p):
    # For the uniform law on an n-dimensional ball, (||d|| / r)^n is uniform on [0, 1].
    n, count = 3, 4000
    region = Region.ball(torch.zeros(count, n, dtype=torch.float64), 0.7, p)
    d = region.sample(torch.Generator().manual_seed(2))
    u = (lp_norm(d, p) / 0.7) ** n
    assert abs(u.mean().item() - 0.5) < 0.02
    assert abs((u < 0.25).double().mean().item() - 0.25) < 0.03
    # Symmetry: every coordinate has mean zero.
    assert bool((d.mean(dim=0).abs() < 0.03).all())


def test_bounding_box_of_an_linf_ball_and_a_box_is_exact():
    centre = torch.tensor([[0.05, 0.5, 0.97]])
    region = Region.ball(centre, 0.1, INF, lo=0.0, hi=1.0)
    lo, hi = region.bounding_box()
    assert torch.allclose(lo, torch.tensor([[0.0, 0.4, 0.87]]))
    assert torch.allclose(hi, torch.tensor([[0.15, 0.6, 1.0]]))
    plain = Region.box(torch.zeros(2, 3), torch.ones(2, 3))
    assert bool(plain.contains(plain.sample()).all())
    assert torch.equal(plain.project(torch.full((2, 3), 2.0)), torch.ones(2, 3))


def test_float64_radius_is_not_rounded_through_float32():
    region = Region.ball(torch.zeros(2, 3, dtype=torch.float64), 0.1)
    assert region.radius is not None
    assert region.radius.tolist() == [0.1, 0.1]


def test_zero_radius_projects_onto_the_centre():
    centre = torch.rand(3, 4)
    for p in NORMS:
        region = Region.ball(centre, 0.0, p, lo=0.0, hi=1.0)
        assert torch.allclose(region.project(torch.randn(3, 4)), centre)


def test_bad_balls_are_rejected():
    with pytest.raises(ValueError, match="norm"):
        Region.ball(torch.zeros(1, 2), 0.1, 3)
    with pytest.raises(ValueError, match="non-negative"):
        Region.ball(torch.zeros(1, 2), -0.1)
    with pytest.raises(ValueError, match="non-negative"):
        Region.ball(torch.zeros(1, 2), math.nan)
    with pytest.raises(ValueError, match="entries"):
        Region.ball(torch.zeros(3, 2), torch.tensor([0.1, 0.2]))


# -- empty regions -------------------------------------------------------------------------------
def _distance_to_box(c: np.ndarray, lo: np.ndarray, hi: np.ndarray, p: float) -> float:
    """min ||c - z||_p over z in [lo, hi], by a solver (a linear program for p = 1 and inf)."""
    n = len(c)
    if p == 2:
        res = minimize(
            lambda z: ((z - c) ** 2).sum(),
            np.clip(c, lo, hi) * 0 + (lo + hi) / 2,  # start away from the answer
            method="L-BFGS-B",
            bounds=list(zip(lo, hi, strict=True)),
            options={"ftol": 1e-15, "gtol": 1e-12},
        )
        return float(np.sqrt(res.fun))
    # variables z (n) and t: |c_i - z_i| <= t_i (p = 1, minimise sum t) or <= t (p = inf)
    m = n if p == 1 else 1
    cost = np.concatenate([np.zeros(n), np.ones(m)])
    rows, rhs = [], []
    for i in range(n):
        t = np.zeros(m)
        t[i if p == 1 else 0] = -1
        e = np.zeros(n)
        e[i] = 1
        rows += [np.concatenate([e, t]), np.concatenate([-e, t])]
        rhs += [c[i], -c[i]]
    res = linprog(
        cost,
        A_ub=np.array(rows),
        b_ub=np.array(rhs),
        bounds=list(zip(lo, hi, strict=True)) + [(0, None)] * m,
        method="highs",
    )
    return float(res.fun)


@pytest.mark.parametrize("p", NORMS)
def test_is_empty_agrees_with_a_solver_on_random_balls_and_boxes(p):
    """Centres inside and far outside boxes (several intersected), radii around the distance:
    empty exactly where the solver's distance from the centre to the box exceeds the radius."""
    rng = np.random.default_rng({1: 11, 2: 12, INF: 13}[p])
    seen = {True: 0, False: 0}
    for _ in range(60):
        n = int(rng.integers(1, 5))
        c = rng.uniform(-1.5, 2.5, n)
        lo1, lo2 = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
        hi1, hi2 = lo1 + rng.uniform(0.2, 1.5, n), lo2 + rng.uniform(0.2, 1.5, n)
        lo, hi = np.maximum(lo1, lo2), np.minimum(hi1, hi2)
        t = dict(dtype=torch.float64)
        region = Region.ball(torch.tensor(c[None], **t), 0.0, p).intersect_box(
            torch.tensor(lo1, **t), torch.tensor(hi1, **t)
        )
        region = region.intersect_box(torch.tensor(lo2, **t), torch.tensor(hi2, **t))
        if np.any(lo > hi):  # the two boxes do not meet: empty whatever the radius
            for r in (0.0, 10.0):
                assert bool(
                    Region(
                        region.centre, torch.tensor([r], **t), p, region.lo, region.hi
                    ).is_empty()[0]
                )
            seen[True] += 1
            continue
        d = _distance_to_box(c, lo, hi, p)
        for r in (d * 0.9 - 1e-3, d * 1.1 + 1e-3, 0.0, 0.3):
            if r < 0 or abs(r - d) < 1e-5:  # within the touching tolerance
                continue
            sized = Region(region.centre, torch.tensor([r], **t), p, region.lo, region.hi)
            empty = bool(sized.is_empty()[0])
            assert empty == (d > r), (c, lo, hi, r, d)
            seen[empty] += 1
            if not empty:  # then the projection really lands in the region
                q = sized.project(torch.tensor(rng.normal(size=(1, n)), **t))
                assert bool(sized.contains(q, tol=1e-9)[0])
    assert seen[True] > 10 and seen[False] > 10


def test_empty_regions_by_hand():
    # unscaled pixels (0..255) under box(0, 1): only an image with every pixel <= 1.1 meets it
    x = torch.tensor([[0.0, 1.0, 0.5], [0.0, 255.0, 3.0], [1.1, 1.05, 0.0]])
    assert Region.ball(x, 0.1, INF, lo=0.0, hi=1.0).is_empty().tolist() == [False, True, False]
    # the L2 distance from (1.1, 1.1) to the unit square is 0.1 * sqrt(2) = 0.1414...
    c = torch.tensor([[1.1, 1.1]], dtype=torch.float64)
    assert Region.ball(c, 0.14, 2, lo=0.0, hi=1.0).is_empty().tolist() == [True]
    assert Region.ball(c, 0.15, 2, lo=0.0, hi=1.0).is_empty().tolist() == [False]
    # L1: 0.2; L-inf: 0.1
    assert Region.ball(c, 0.19, 1, lo=0.0, hi=1.0).is_empty().tolist() == [True]
    assert Region.ball(c, 0.21, 1, lo=0.0, hi=1.0).is_empty().tolist() == [False]
    assert Region.ball(c, 0.09, INF, lo=0.0, hi=1.0).is_empty().tolist() == [True]
    # exactly touching (the distance equals the radius): one point, non-empty, projected onto
    touching = Region.ball(torch.tensor([[1.5, 0.5]], dtype=torch.float64), 0.5, 2, lo=0.0, hi=1.0)
    assert touching.is_empty().tolist() == [False]
    q = touching.project(torch.tensor([[3.0, 3.0]], dtype=torch.float64))
    assert torch.allclose(q, torch.tensor([[1.0, 0.5]], dtype=torch.float64))
    # the region: ball(x, 0.1, inf) & box(2, 3) around points of [0, 1]
    far = Region.ball(torch.rand(4, 3), 0.1, INF, lo=2.0, hi=3.0)
    assert far.is_empty().all()
    # two boxes that do not meet, and a plain box with lo > hi in one sample
    assert Region.ball(torch.zeros(1, 2), 5.0, INF, lo=0.0, hi=1.0).intersect_box(
        2.0, 3.0
    ).is_empty().tolist() == [True]
    box = Region.box(torch.tensor([[0.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0]] * 2))
    assert box.is_empty().tolist() == [False, True]
    # without a box a ball is never empty
    assert not Region.ball(torch.full((2, 3), 1e6), 0.0, 2).is_empty().any()


def test_select_keeps_per_sample_and_shared_parts():
    centre = torch.rand(4, 3)
    region = Region.ball(centre, torch.tensor([0.1, 0.2, 0.3, 0.4]), 2, lo=0.0, hi=1.0)
    region = region.intersect_box(torch.zeros(4, 3), torch.full((4, 3), 0.9))
    part = region.select(torch.tensor([3, 1]))
    assert torch.equal(part.centre, centre[[3, 1]])
    assert part.radius.tolist() == pytest.approx([0.4, 0.2])
    assert part.lo.shape == (2, 3) and part.shape == (2, 3)
    mask = torch.tensor([True, False, False, True])
    assert torch.equal(region.select(mask).centre, centre[mask])
    shared = Region.ball(centre, 0.1, INF, lo=0.0, hi=1.0).select(torch.tensor([0]))
    assert shared.lo.dim() == 0 and shared.centre.shape == (1, 3)


def test_non_finite_centres_and_bounds_are_region_errors():
    x = torch.rand(3, 2)
    x[1, 0] = math.nan
    with pytest.raises(RegionError, match=r"centre has 1 NaN or infinite values \(samples 1\)"):
        Region.ball(x, 0.1, INF, lo=0.0, hi=1.0)
    with pytest.raises(RegionError, match="centre"):
        Region.ball(torch.full((2, 2), math.inf), 0.1, 2)
    with pytest.raises(RegionError, match="lower bound has 1 NaN"):
        Region.ball(torch.rand(2, 2), 0.1, INF, lo=torch.tensor([0.0, math.nan]), hi=1.0)
    with pytest.raises(RegionError, match="upper bound"):
        Region.box(torch.zeros(2, 2), torch.full((2, 2), math.nan))
    with pytest.raises(RegionError, match="NaN"):
        Region.ball(torch.rand(2, 2), 0.1).intersect_box(math.nan, 1.0)
    # an infinite box bound is a half-open box, not an error; RegionError is a UsageError
    half = Region.ball(torch.rand(2, 2), 0.1, INF, lo=-math.inf, hi=1.0)
    assert not half.is_empty().any()
    assert issubclass(RegionError, ValueError)
    from propdsl.errors import UsageError

    assert issubclass(RegionError, UsageError)


def test_linf_emptiness_in_float32_matches_the_float64_test():
    """L-inf `is_empty` runs in float32 for float32 regions (no float64 copies per attack); on
    random float32 centres, boxes and radii, some exactly touching (radius = the distance as
    float32 computes it, where a region that meets its box must never be called empty), its
    answer is the float64 formula's: the distance, rounded once per coordinate, stays far
    inside the 4 eps * (r + dist) of rounding allowed."""
    gen = torch.Generator().manual_seed(7)
    b, n = 4000, 6
    c = torch.rand(b, n, generator=gen) * 4 - 1.5
    lo = torch.rand(b, n, generator=gen) - 0.5
    hi = lo + torch.rand(b, n, generator=gen) * 1.5 + 0.1
    dist32 = (c - c.clamp(lo, hi)).abs().amax(dim=1)
    kind = torch.randint(0, 4, (b,), generator=gen)
    scale = torch.rand(b, generator=gen)
    radius = (
        torch.stack([dist32, dist32 * 0.999, dist32 + 1e-3, scale * 2.0], dim=1)
        .gather(1, kind[:, None])
        .squeeze(1)
    )
    region = Region.ball(c, radius, INF).intersect_box(lo, hi)
    got = region.is_empty()
    # The float64 formula, independently: distance, tolerance and rounding allowance.
    c64, r64 = c.double(), radius.double()
    d64 = (c64 - torch.minimum(torch.maximum(c64, lo.double()), hi.double())).abs().amax(dim=1)
    eps = torch.finfo(torch.float32).eps
    want = d64 > r64 + 1e-6 + 4 * eps * (r64 + d64)
    assert torch.equal(got, want)
    touching = kind == 0
    assert not got[touching].any()  # exactly touching: never empty
    assert got.sum() > 100 and (~got).sum() > 100  # both answers are exercised


@pytest.mark.parametrize(
    ("centre", "radius", "lo", "hi", "message"),
    [
        (math.nan, 0.1, math.nan, 1.0, "the ball's centre has 1 NaN or infinite values"),
        (math.inf, -0.1, 0.0, 1.0, "the ball's centre has 1 NaN or infinite values"),
        (0.5, -0.1, math.nan, 1.0, "ball radius must be non-negative"),
        (0.5, math.nan, 0.0, 1.0, "ball radius must be non-negative"),
        (0.5, 0.1, math.nan, 1.0, "the box's lower bound has 1 NaN values"),
        (0.5, 0.1, 0.0, torch.tensor(math.nan), "the box's upper bound has 1 NaN values"),
        (0.5, torch.tensor([0.1, -1.0]), 0.0, 1.0, "ball radius must be non-negative"),
        (0.5, 0.1, torch.tensor([0.0, math.nan]), 1.0, "the box's lower bound has 1 NaN values"),
    ],
)
def test_ball_reports_the_first_invalid_input_after_the_fused_check(
    centre, radius, lo, hi, message
):
    """The validity checks run fused (one host read); on a failure the first failing input in
    the order centre, radius, lower bound, upper bound is the one reported."""
    c = torch.full((2, 2), 0.5)
    c[0, 0] = centre
    with pytest.raises(ValueError, match=message):
        Region.ball(c, radius, INF, lo=lo, hi=hi)
    # valid inputs of the same kinds pass
    Region.ball(torch.full((2, 2), 0.5), 0.1, INF, lo=torch.tensor(0.0), hi=1.0)
