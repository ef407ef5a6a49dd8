"""Regions and verification soundness: random networks and random regions, some empty.

Random small networks and random input regions (an Lp ball, p in {1, 2, inf}, intersected with
two random boxes; centres inside and far outside the boxes; some regions empty because the ball
misses the boxes, some because the two boxes do not meet). Checked against computations written
here in numpy, independent of `propdsl.region`:

* emptiness: the two boxes' intersection, and the Lp distance from the centre to it (the centre
  clipped into the box is its nearest point, coordinate by coordinate);
* every `falsified` counterexample and every existential witness lies in its region
  (`Region.contains`) and really violates / satisfies the property on the network;
* no `verified` forall over a non-empty region is violated at any point of an independent
  random search (uniform points of the box part, kept when inside the ball, the nearest box
  point, and the box corners inside the ball);
* empty regions get the vacuous verdicts with their reason: `forall` verified, `exists`
  falsified, no point reported;
* the losses: a forall over an empty region adds no loss and no gradient, the warning says why,
  and certified training bounds only the non-empty samples.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import propdsl
from propdsl.loss.attacks import APGD
from propdsl.loss.compile import EmptyRegionWarning
from propdsl.region import Region
from propdsl.verify.run import FALSIFIED, UNKNOWN, VERIFIED

INF = math.inf
NORMS = {"1": 1.0, "2": 2.0, "inf": INF}
TOUCH = 1e-4  # samples this close to touching are left out of the vacuity checks

SPEC = """\
network f : Tensor[{n}] -> Tensor[3]
param r : Real = 0.1
param a : Real = 0.0
param b : Real = 1.0
param a2 : Real = 0.0
param b2 : Real = 1.0
param c : Real = 0.0
param c2 : Real = 0.0
property margin(x) =
  forall x' in ball(x, r, {p}) & box(a, b) & box(a2, b2): f(x')[0] - f(x')[1] >= c
property robust(x, y) =
  forall x' in ball(x, r, {p}) & box(a, b) & box(a2, b2): argmax(f(x')) == y
property reach(x) =
  exists x' in ball(x, r, {p}) & box(a, b) & box(a2, b2): f(x')[2] >= c2
"""


def holds(name: str, out: torch.Tensor, y: torch.Tensor, prm: dict) -> torch.Tensor:
    """The body's truth at outputs out [N, 3], by hand from the spec's text."""
    if name == "margin":
        return out[:, 0] - out[:, 1] >= prm["c"]
    if name == "robust":
        others = torch.ones_like(out, dtype=torch.bool).scatter(1, y[:, None], False)
        return ((out.gather(1, y[:, None]) > out) | ~others).all(1)
    return out[:, 2] >= prm["c2"]


def make_net(seed: int, n: int, act: str) -> nn.Module:
    torch.manual_seed(seed)
    a = nn.ReLU() if act == "relu" else nn.Tanh()
    net = nn.Sequential(nn.Linear(n, 8), a, nn.Linear(8, 8), a, nn.Linear(8, 3)).double()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(2.0)
    return net.eval()


@st.composite
def cases(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 3))
    p = draw(st.sampled_from(sorted(NORMS)))
    batch = 5
    a, a2 = rng.uniform(-0.5, 0.5, 2)
    b = a + rng.uniform(0.1, 1.5)
    # the second box: overlapping the first, or (one case in five) disjoint from it
    if draw(st.integers(0, 4)) == 4:
        a2 = b + rng.uniform(0.01, 0.5)
    b2 = a2 + rng.uniform(0.1, 1.5)
    lo, hi = max(a, a2), min(b, b2)
    if lo <= hi:  # three centres inside the box, one near it (in or out), one far away
        centre = np.concatenate(
            [
                rng.uniform(-50, 50, size=(1, n)),
                rng.uniform(lo, hi, size=(3, n)),
                rng.uniform(lo - 0.3, hi + 0.3, size=(1, n)),
            ]
        )
    else:
        centre = rng.normal(size=(batch, n))
    r = float(draw(st.sampled_from([0.02, 0.1, 0.3, 0.8])))
    prm = dict(r=r, a=float(a), b=float(b), a2=float(a2), b2=float(b2), c=float(rng.normal()))
    prm["c2"] = float(rng.normal(-1.0))
    return dict(
        seed=seed,
        n=n,
        p=p,
        x=torch.tensor(centre),
        prm=prm,
        act=draw(st.sampled_from(["relu", "tanh"])),
        method=draw(st.sampled_from(["ibp", "crown"])),
    )


def distances(x: np.ndarray, prm: dict, p: float) -> np.ndarray:
    """Lp distance [B] from each centre to the boxes' intersection (inf where they miss)."""
    lo, hi = max(prm["a"], prm["a2"]), min(prm["b"], prm["b2"])
    if lo > hi:
        return np.full(len(x), np.inf)
    d = x - np.clip(x, lo, hi)
    return np.linalg.norm(d, ord=p, axis=1) if p != INF else np.abs(d).max(axis=1)


def search(x: np.ndarray, prm: dict, p: float, rng: np.random.Generator, m: int = 400):
    """Points of each sample's region [B, M', n] (a list: counts differ), found without
    propdsl: uniform points of the box part kept when inside the ball, the nearest box point,
    and the box corners inside the ball."""
    lo, hi = max(prm["a"], prm["a2"]), min(prm["b"], prm["b2"])
    r = prm["r"]
    found = []
    for c in x:
        blo, bhi = np.maximum(c - r, lo), np.minimum(c + r, hi)
        if np.any(blo > bhi):
            found.append(np.zeros((0, len(c))))
            continue
        u = blo + rng.uniform(size=(m, len(c))) * (bhi - blo)
        corners = np.array(np.meshgrid(*zip(blo, bhi, strict=True))).reshape(len(c), -1).T
        pts = np.concatenate([u, corners, np.clip(c, lo, hi)[None]])
        dist = np.linalg.norm(pts - c, ord=p, axis=1) if p != INF else np.abs(pts - c).max(1)
        found.append(pts[dist <= r])
    return found


def check_case(case) -> dict[str, int]:
    p = NORMS[case["p"]]
    n, prm, x = case["n"], case["prm"], case["x"]
    net = make_net(case["seed"] % 1000, n, case["act"])
    spec = propdsl.load(SPEC.format(n=n, p=case["p"]), prm)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[1] = (y[1] + 1) % 3  # one wrong label: falsified verdicts too
    out = spec.verify(
        net,
        x,
        y,
        method=case["method"],
        falsifier=APGD(steps=15),
        generator=torch.Generator().manual_seed(case["seed"]),
    )
    region = Region.ball(x, prm["r"], p, lo=prm["a"], hi=prm["b"]).intersect_box(
        prm["a2"], prm["b2"]
    )
    dist = distances(x.numpy(), prm, p)
    empty = dist > prm["r"] + TOUCH
    clear = np.abs(dist - prm["r"]) > TOUCH  # not within rounding of touching
    points = search(x.numpy(), prm, p, np.random.default_rng(case["seed"]))
    counts = {"empty": 0, "falsified": 0, "witness": 0, "verified": 0}
    for name, v in out.items():
        kind = "exists" if name == "reach" else "forall"
        for i, s in enumerate(v.status):
            if clear[i] and empty[i]:
                counts["empty"] += 1
                assert s == (VERIFIED if kind == "forall" else FALSIFIED), (name, i, case)
                assert v.reasons[i].startswith("the region is empty"), v.reasons[i]
                for pts in (*v.counterexamples.values(), *v.witnesses.values()):
                    assert bool(pts[i].isnan().all())  # never a point outside the region
                continue
            if clear[i]:
                assert s != VERIFIED or v.reasons[i] is None  # not a vacuous verdict
            if s == UNKNOWN:
                assert v.reasons[i] and "certified margin" in v.reasons[i]
            if s == FALSIFIED and kind == "forall":
                pt = v.counterexamples["x'"][i : i + 1]
                assert bool(region.select(torch.tensor([i])).contains(pt).all()), (name, i)
                with torch.no_grad():
                    assert not bool(holds(name, net(pt), y[i : i + 1], prm)[0]), (name, i)
                counts["falsified"] += 1
            if s == VERIFIED and kind == "exists":
                pt = v.witnesses["x'"][i : i + 1]
                assert bool(region.select(torch.tensor([i])).contains(pt).all()), (name, i)
                with torch.no_grad():
                    assert bool(holds(name, net(pt), y[i : i + 1], prm)[0]), (name, i)
                counts["witness"] += 1
            if s == VERIFIED and kind == "forall" and len(points[i]):
                with torch.no_grad():
                    outs = net(torch.tensor(points[i]))
                ok = holds(name, outs, y[i].expand(len(points[i])), prm)
                assert bool(ok.all()), (name, i, points[i][~ok.numpy()][0], case)
                counts["verified"] += 1
    return counts


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@settings(max_examples=30, **SETTINGS)
@given(cases())
def test_verdicts_respect_regions_empty_or_not(case):
    check_case(case)


@pytest.mark.slow
@settings(max_examples=300, **SETTINGS)
@given(cases())
def test_verdicts_respect_regions_empty_or_not_many(case):
    check_case(case)


def test_the_random_cases_reach_every_kind_of_verdict():
    """The property test is not vacuous: over a fixed set of cases, every check fires."""
    totals = dict.fromkeys(("empty", "falsified", "witness", "verified"), 0)

    @settings(max_examples=30, **SETTINGS)
    @given(cases())
    def run(case):
        for k, v in check_case(case).items():
            totals[k] += v

    run()
    assert all(v >= 5 for v in totals.values()), totals


# -- losses over empty regions -------------------------------------------------------------------
LOSS_SPEC = """\
network f : Tensor[2] -> Tensor[3]
property robust(x, y) = forall x' in ball(x, 0.1, inf) & box(0, 1): argmax(f(x')) == y
property some(x) = exists x' in ball(x, 0.1, inf) & box(0, 1): f(x')[0] >= -1000
"""


def _batch():
    x = torch.tensor([[0.2, 0.7], [0.5, 0.5], [200.0, 3.0], [0.3, 255.0]], dtype=torch.float64)
    return x, torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("logic", ["dl2", "godel", "lukasiewicz", "stl", "qll"])
def test_a_forall_over_an_empty_region_adds_no_loss_and_no_gradient(logic):
    """Before, the loss of samples 2 and 3 was the loss at the clamped point (1, 1): a garbage
    loss with a gradient pulling the network towards a point outside the region."""
    spec = propdsl.load(LOSS_SPEC)
    net = make_net(3, 2, "relu")
    x, y = _batch()
    loss = spec.loss("robust", logic=logic, generator=torch.Generator().manual_seed(0))
    with pytest.warns(
        EmptyRegionWarning, match="region of x' is empty .* 'forall' over it is true"
    ):
        out = loss(net, x, y)
    assert out.empty["x'"].tolist() == [False, False, True, True]
    assert out.all_empty.tolist() == [False, False, True, True]
    assert out.loss[2:].tolist() == [0.0, 0.0] and out.satisfied[2:].tolist() == [True, True]
    assert bool(out.counterexample["x'"][2:].isnan().all())
    assert bool(torch.isfinite(out.counterexample["x'"][:2]).all())
    # the gradient of the empty samples' losses is exactly zero, and finite overall
    grads = torch.autograd.grad(out.loss[2:].sum(), list(net.parameters()), allow_unused=True)
    assert all(g is None or bool((g == 0).all()) for g in grads)
    net.zero_grad()
    out = loss(net, x, y)
    out.loss.sum().backward()
    assert all(bool(torch.isfinite(q.grad).all()) for q in net.parameters())


def test_an_exists_over_an_empty_region_is_false_without_gradient():
    spec = propdsl.load(LOSS_SPEC)
    net = make_net(3, 2, "relu")
    x, y = _batch()
    with pytest.warns(EmptyRegionWarning, match="'exists' over it is false"):
        out = spec.loss("some", logic="dl2")(net, x, y)
    assert out.satisfied.tolist() == [True, True, False, False]
    assert out.empty["x'"].tolist() == [False, False, True, True]
    assert out.loss[:2].tolist() == [0.0, 0.0] and out.loss[2:].tolist() == [1.0, 1.0]
    if out.loss.requires_grad:  # a constant: no gradient reaches the network
        grads = torch.autograd.grad(out.loss[2:].sum(), list(net.parameters()), allow_unused=True)
        assert all(g is None or bool((g == 0).all()) for g in grads)


def test_the_training_objective_stays_finite_with_empty_regions(tmp_path):
    x, y = _batch()
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    train = 'train f on tensors(path = "d.npz") {\n  loss = cross_entropy + robust\n}\n'
    (tmp_path / "s.prop").write_text(LOSS_SPEC + train, encoding="utf-8")
    spec = propdsl.load(tmp_path / "s.prop")
    net = make_net(3, 2, "relu").float()
    objective = spec.objective(generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EmptyRegionWarning)
        value = objective(net, x.float(), y)
    value.backward()
    assert math.isfinite(float(value)) and objective.last_terms
    assert all(math.isfinite(v) for v in objective.last_terms.values())
    assert all(bool(torch.isfinite(q.grad).all()) for q in net.parameters())


@pytest.mark.parametrize("method", ["ibp", "crown_ibp"])
def test_certified_training_bounds_only_non_empty_samples(method):
    """Before, the empty samples' clamped point was bounded as if it were their region."""
    from propdsl.loss.certified import certified_loss

    spec = propdsl.load(LOSS_SPEC)
    formula = spec.property("robust").formula
    net = make_net(5, 2, "relu")
    x, y = _batch()
    args = (formula, ("x", "y"), {"f": 3}, {"f": net})
    with pytest.warns(EmptyRegionWarning):
        mixed = certified_loss(*args, x, y, method=method)
    alone = certified_loss(*args, x[:2], y[:2], method=method)
    assert mixed[2:].tolist() == [0.0, 0.0]
    torch.testing.assert_close(mixed[:2], alone)
    mixed.sum().backward()
    assert all(bool(torch.isfinite(q.grad).all()) for q in net.parameters())
