"""Region: projection, sampling, containment and bounding boxes, against independent answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from propdsl.region import Region, lp_norm

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
