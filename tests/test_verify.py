"""Verification (propdsl.verify.run, query, report): soundness first.

The verdicts are checked against the properties' meaning, written here by hand in plain torch:
a sample is never `verified` when any search (our APGD from a fresh seed, PGD, dense random
sampling, a grid that includes the box corners of 2-D inputs, and Marabou, a complete verifier,
where it is installed) finds a point of the region where the property is false; a `falsified`
sample always comes with a point inside the region where the property is false. Then: exact
verdicts on linear networks (bounds are exact there), the order IBP <= CROWN <= alpha-CROWN,
positioned `unsupported` reasons, timeouts, the API and `propdsl verify`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import propdsl
from propdsl import runs
from propdsl.errors import UsageError
from propdsl.loss.attacks import APGD, PGD
from propdsl.region import Region
from propdsl.verify import AlphaOptions
from propdsl.verify.query import Unsupported, to_query
from propdsl.verify.run import FALSIFIED, STATUSES, TIMEOUT, UNKNOWN, UNSUPPORTED, VERIFIED

INF = math.inf
METHODS = ("ibp", "crown_ibp", "crown", "alpha_crown")
ALPHA = AlphaOptions(iterations=5, lr=0.2)
# only the ball's centre: the bounds, not the falsifier, must then decide every sample
CENTRE = PGD(steps=0, random_start=False)
PARAMS = ("eps", "delta", "a", "b", "c", "c2", "eta")

# The linear fragment: properties of f : Tensor[...] -> Tensor[3] over ball(x, eps, p) & box(0, 1)
BODIES = {
    "cr": "argmax(f(x')) == y",
    "scr": "softmax(f(x'))[y] >= eta",
    "scr_log": "log_softmax(f(x'))[y] >= log(eta)",
    "sr": "norm(f(x') - f(x), inf) <= delta",
    "lin": "a * f(x')[0] - b * f(x')[1] + c >= 0",
    "disj": "f(x')[0] >= c or f(x')[1] <= c2",
    "impl": "f(x')[0] >= c implies f(x')[1] <= c2",
    "margins": "forall j in classes: j != y implies f(x')[y] - f(x')[j] >= c",
    "elementwise": "abs(f(x') - f(x)) <= delta",
}
LABELLED = {"cr", "scr", "scr_log", "margins"}


def spec_text(shape: tuple[int, ...], p: float) -> str:
    norm = "inf" if p == INF else str(int(p))
    lines = [f"network f : Tensor[{', '.join(map(str, shape))}] -> Tensor[3]"]
    lines += [f"param {n} : Real = 0.5" for n in PARAMS]
    for name, body in BODIES.items():
        args = "x, y" if name in LABELLED else "x"
        lines.append(
            f"property {name}({args}) =\n  forall x' in ball(x, eps, {norm}) & box(0, 1):\n"
            f"    {body}"
        )
    return "\n".join(lines) + "\n"


def holds(name: str, out, centre_out, y, prm: dict) -> torch.Tensor:
    """The exact truth of property `name` at outputs `out` [N, 3] (by hand, from its text)."""
    f0, f1 = out[:, 0], out[:, 1]
    others = torch.ones_like(out, dtype=torch.bool).scatter(1, y[:, None], False)
    fy = out.gather(1, y[:, None])
    if name == "cr":
        return ((fy > out) | ~others).all(1)
    if name == "scr":
        return torch.softmax(out, 1).gather(1, y[:, None])[:, 0] >= prm["eta"]
    if name == "scr_log":
        return torch.log_softmax(out, 1).gather(1, y[:, None])[:, 0] >= math.log(prm["eta"])
    if name in ("sr", "elementwise"):
        return (out - centre_out).abs().amax(1) <= prm["delta"]
    if name == "lin":
        return prm["a"] * f0 - prm["b"] * f1 + prm["c"] >= 0
    if name == "disj":
        return (f0 >= prm["c"]) | (f1 <= prm["c2"])
    if name == "impl":
        return (f0 < prm["c"]) | (f1 <= prm["c2"])
    if name == "margins":
        return ((fy - out >= prm["c"]) | ~others).all(1)
    raise KeyError(name)


def make_net(kind: str, seed: int, dtype=torch.float64) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    if kind == "conv":
        net = nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48, 8),
            nn.ReLU(),
            nn.Linear(8, 3),
        )
        shape: tuple[int, ...] = (1, 4, 4)
    else:
        act = {
            "relu": nn.ReLU(),
            "tanh": nn.Tanh(),
            "sigmoid": nn.Sigmoid(),
            "leaky_relu": nn.LeakyReLU(0.1),
        }[kind]
        net = nn.Sequential(nn.Linear(2, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 3))
        shape = (2,)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                m.weight.mul_(2.0)  # outputs of order 1: verdicts of every kind
    return net.to(dtype).eval(), shape


def search_points(spec, name, net, x, y, region, gen, dense: int, strong: bool) -> torch.Tensor:
    """[B, M, ...] points of the region: APGD (and PGD when `strong`) from fresh seeds, uniform
    samples, and for 2-D L-inf regions a 21 x 21 grid of the box (its corners included)."""
    found = []
    attacks = (APGD(steps=40, restarts=2), PGD(steps=30)) if strong else (APGD(steps=20),)
    for attack in attacks:
        loss = spec.loss(name, logic="dl2", attack=attack, generator=gen)
        found.append(loss(net, x, y).counterexample["x'"][:, None])
    b = x.shape[0]
    assert region.centre is not None and region.radius is not None
    many = Region(
        region.centre.repeat_interleave(dense, 0),
        region.radius.repeat_interleave(dense, 0),
        region.p,
        region.lo,
        region.hi,
    )
    found.append(many.sample(gen).reshape(b, dense, *x.shape[1:]))
    if x.shape[1:] == (2,) and region.p == INF:
        lo, hi = region.bounding_box()
        t = torch.linspace(0, 1, 21, dtype=x.dtype)
        grid = torch.cartesian_prod(t, t)
        found.append(lo[:, None] + grid[None] * (hi - lo)[:, None])
    return torch.cat(found, 1)


def violated_at(name, net, x, y, points, prm) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: does some point violate the property, and the first such point."""
    b, m = points.shape[:2]
    with torch.no_grad():
        out = net(points.reshape(b * m, *x.shape[1:])).reshape(b * m, -1)
        centre = net(x).repeat_interleave(m, 0)
    ok = holds(name, out, centre, y.repeat_interleave(m), prm).reshape(b, m)
    first = (~ok).float().argmax(1)
    return (~ok).any(1), points[torch.arange(b), first]


def check_soundness(kind, seed, eps, p, prm, *, batch=8, dense=256, strong=False):
    """Every verdict of every property under every method against the searches; returns the
    verdict counts. `strong`: stronger searches and the default falsifier."""
    net, shape = make_net(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, *shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        pred = net(x).argmax(1)
    y = torch.where(
        torch.rand(batch, generator=gen) < 0.75, pred, torch.randint(0, 3, (batch,), generator=gen)
    )
    spec = propdsl.load(spec_text(shape, p), {"eps": eps, **prm})
    region = Region.ball(x, eps, p, lo=0.0, hi=1.0)
    counts = dict.fromkeys(STATUSES, 0)
    falsifiers = [CENTRE, APGD(steps=50, restarts=2) if strong else APGD(steps=15)]
    for name in BODIES:
        points = search_points(spec, name, net, x, y, region, gen, dense, strong)
        bad, witness = violated_at(name, net, x, y, points, prm)
        verified = {}
        for falsifier in falsifiers:
            for method in METHODS if falsifier is CENTRE else ("crown",):
                v = spec.verify(
                    net,
                    x,
                    y,
                    [name],
                    method=method,
                    falsifier=falsifier,
                    alpha=ALPHA,
                    generator=torch.Generator().manual_seed(seed + 1),
                )[name]
                assert v.reason is None, v.reason
                status = v.status
                for i, s in enumerate(status):
                    counts[s] += 1
                    assert s in (VERIFIED, FALSIFIED, UNKNOWN), s
                    if s == VERIFIED:
                        assert not bool(bad[i]), (
                            f"{name} verified by {method} on sample {i}, but it fails at "
                            f"{witness[i].tolist()} ({kind}, seed {seed}, eps {eps}, p {p}, {prm})"
                        )
                        assert v.margin[i] >= 0
                    if s == FALSIFIED:
                        point = v.counterexamples["x'"][i : i + 1]
                        assert bool(region_of(x[i : i + 1], eps, p).contains(point, tol=1e-9))
                        with torch.no_grad():
                            out, centre = net(point), net(x[i : i + 1])
                        assert not bool(holds(name, out, centre, y[i : i + 1], prm)[0]), (
                            f"{name}: the counterexample of sample {i} satisfies the property"
                        )
                if falsifier is CENTRE:
                    verified[method] = torch.tensor([s == VERIFIED for s in status])
        # IBP <= CROWN (CROWN's bounds are intersected with IBP's) <= alpha-CROWN (starts from
        # CROWN, keeps the best): per sample, with the same falsifier
        assert bool((verified["crown"] | ~verified["ibp"]).all()), name
        assert bool((verified["alpha_crown"] | ~verified["crown"]).all()), name
    return counts


def region_of(x, eps, p):
    return Region.ball(x, eps, p, lo=0.0, hi=1.0)


PARAM_STRATEGY = st.fixed_dictionaries(
    {
        "delta": st.floats(0.05, 2.0),
        "a": st.floats(-2.0, 2.0),
        "b": st.floats(-2.0, 2.0),
        "c": st.floats(-1.0, 1.0),
        "c2": st.floats(-1.0, 1.0),
        "eta": st.floats(0.34, 0.95),
    }
)
EPS_STRATEGY = st.one_of(st.just(0.0), st.floats(0.0, 0.05), st.floats(0.0, 0.4))
KINDS = ("relu", "tanh", "sigmoid", "leaky_relu", "conv")


@pytest.fixture(autouse=True)
def _quiet_attacks():
    # flat attack objectives (saturated sigmoids, a constant premise) are expected here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# -- soundness: property tests ---------------------------------------------------------------
@settings(
    max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 10_000),
    eps=EPS_STRATEGY,
    p=st.sampled_from([INF, INF, 2.0]),
    prm=PARAM_STRATEGY,
)
def test_never_verified_when_a_counterexample_exists(kind, seed, eps, p, prm):
    # 8 examples x 9 properties x 8 samples x 4 verdicts: ~2,300 verdicts checked
    check_soundness(kind, seed, eps, p, prm, batch=8, dense=128)


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 10**6),
    eps=EPS_STRATEGY,
    p=st.sampled_from([INF, INF, 2.0, 1.0]),
    prm=PARAM_STRATEGY,
)
def test_never_verified_when_a_counterexample_exists_many(kind, seed, eps, p, prm):
    # 40 examples x 9 properties x 10 samples x 4 verdicts: ~14,400 verdicts checked
    check_soundness(kind, seed, eps, p, prm, batch=10, dense=512, strong=True)


def test_the_searches_find_counterexamples():
    """The soundness test is not vacuous: all verdicts occur, and the searches refute."""
    counts = dict.fromkeys(STATUSES, 0)
    for kind, seed, eps in (("relu", 1, 0.1), ("tanh", 2, 0.3), ("conv", 3, 0.05)):
        prm = dict(delta=0.5, a=1.0, b=0.5, c=0.1, c2=0.2, eta=0.6)
        for k, v in check_soundness(kind, seed, eps, INF, prm, batch=6, dense=64).items():
            counts[k] += v
    assert counts[VERIFIED] > 50 and counts[FALSIFIED] > 50 and counts[UNKNOWN] > 0


# -- soundness: a complete verifier as the oracle ---------------------------------------------
def _marabou_counterexample(onnx_path, lo, hi, conjunction) -> np.ndarray | None:
    """An input in [lo, hi] whose outputs satisfy every `(coefs, rhs)`: coefs . y <= rhs, found
    by Marabou (complete), or None when none exists."""
    from maraboupy import Marabou

    net = Marabou.read_onnx(str(onnx_path))
    xs = np.array(net.inputVars[0]).flatten()
    ys = np.array(net.outputVars[0]).flatten()
    for i, v in enumerate(xs):
        net.setLowerBound(int(v), float(lo[i]))
        net.setUpperBound(int(v), float(hi[i]))
    for coefs, rhs in conjunction:
        net.addInequality([int(ys[j]) for j in coefs], list(coefs.values()), float(rhs))
    options = Marabou.createOptions(verbosity=0, timeoutInSeconds=30)
    result, values, _ = net.solve(options=options, verbose=False)
    assert result in ("sat", "unsat"), result
    if result == "unsat":
        return None
    return np.array([values[int(v)] for v in xs])


def _negations(name: str, y: int, centre_out: np.ndarray, prm: dict) -> list[list]:
    """The property's negation as a disjunction of conjunctions of `coefs . f <= rhs`."""
    k = len(centre_out)
    if name == "cr":  # some f_j >= f_y
        return [[({y: 1.0, j: -1.0}, 0.0)] for j in range(k) if j != y]
    if name == "sr":  # some |f_j - f_j(x)| >= delta
        out = []
        for j in range(k):
            out.append([({j: 1.0}, centre_out[j] - prm["delta"])])
            out.append([({j: -1.0}, -centre_out[j] - prm["delta"])])
        return out
    if name == "lin":  # a f0 - b f1 + c <= 0
        return [[({0: prm["a"], 1: -prm["b"]}, -prm["c"])]]
    if name == "disj":  # f0 <= c and f1 >= c2
        return [[({0: 1.0}, prm["c"]), ({1: -1.0}, -prm["c2"])]]
    raise KeyError(name)


@settings(
    max_examples=6, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(seed=st.integers(0, 10_000), eps=st.floats(0.01, 0.3), prm=PARAM_STRATEGY)
def test_agrees_with_marabou(tmp_path_factory, seed, eps, prm):
    """On 2-8-8-3 ReLU networks: `verified` => Marabou finds no counterexample; `falsified` =>
    Marabou finds one; every Marabou counterexample (re-checked) => not verified."""
    pytest.importorskip("maraboupy")
    from propdsl.export import export_onnx

    net, shape = make_net("relu", seed)
    path = export_onnx(net, shape, tmp_path_factory.mktemp("marabou") / "f.onnx")
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
        centre = net(x)
    spec = propdsl.load(spec_text(shape, INF), {"eps": eps, **prm})
    lo, hi = region_of(x, eps, INF).bounding_box()
    checked = 0
    for name in ("cr", "sr", "lin", "disj"):
        verdicts = spec.verify(net, x, y, [name], method="alpha_crown", alpha=ALPHA)[name]
        for i, status in enumerate(verdicts.status):
            found = None
            for conj in _negations(name, int(y[i]), centre[i].numpy(), prm):
                found = _marabou_counterexample(path, lo[i].numpy(), hi[i].numpy(), conj)
                if found is not None:
                    break
            real = False
            if found is not None:  # re-check Marabou's point on our network, exactly
                point = torch.tensor(found, dtype=torch.float64)[None]
                point = region_of(x[i : i + 1], eps, INF).project(point)
                with torch.no_grad():
                    real = not bool(holds(name, net(point), centre[i : i + 1], y[i : i + 1], prm))
            if status == VERIFIED:
                assert not real, f"{name} sample {i}: verified, Marabou refutes it at {found}"
            if status == FALSIFIED:
                assert found is not None, f"{name} sample {i}: falsified, Marabou proves it"
            checked += 1
    assert checked == 24


# -- exact verdicts on linear networks --------------------------------------------------------
W = [[2.0, -1.0], [0.0, 1.0], [-1.0, 0.0]]
BIAS = [0.0, 0.5, 0.2]
LINEAR_SPEC = """
network f : Tensor[2] -> Tensor[3]
param eps : Real = 0.1
param t : Real = 0.0
param eta : Real = 0.9
property robust(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1): argmax(f(x')) == y
property above(x) =
  forall x' in ball(x, eps, inf) & box(0, 1): f(x')[0] >= t
property strong(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1): softmax(f(x'))[y] >= eta
property strong_log(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1): log_softmax(f(x'))[y] >= log(eta)
"""


def linear_net() -> nn.Module:
    net = nn.Linear(2, 3).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(W, dtype=torch.float64))
        net.bias.copy_(torch.tensor(BIAS, dtype=torch.float64))
    return net


def worst_case(c: list[float], d: float, lo: list[float], hi: list[float]) -> float:
    """min over the box of c . (W x + b) + d: each input at the end its coefficient prefers."""
    cw = [sum(c[k] * W[k][i] for k in range(3)) for i in range(2)]
    return (
        sum(c[k] * BIAS[k] for k in range(3))
        + d
        + sum(min(cw[i] * lo[i], cw[i] * hi[i]) for i in range(2))
    )


@pytest.mark.parametrize("method", ["crown", "alpha_crown"])
def test_chunks_change_memory_not_verdicts(method):
    """The open samples are bounded `chunk` at a time; bounds are per sample, so one at a time,
    three at a time and all at once give the same verdicts and margins."""
    net, shape = make_net("conv", 4)
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(10, *shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    spec = propdsl.load(spec_text(shape, INF), {"eps": 0.02, "delta": 0.3, "c": 0.0})
    names = ["cr", "sr", "margins"]
    runs_ = [
        spec.verify(net, x, y, names, method=method, falsifier=CENTRE, alpha=ALPHA, chunk=k)
        for k in (1, 3, 1000)
    ]
    for name in names:
        statuses = [r[name].status for r in runs_]
        assert statuses[0] == statuses[1] == statuses[2], name
        if name == "cr":  # both verdicts, so the chunks split proved and open samples
            assert {VERIFIED, UNKNOWN} <= set(statuses[0]), statuses[0]
        for other in runs_[1:]:
            torch.testing.assert_close(other[name].margin, runs_[0][name].margin, equal_nan=True)
    with pytest.raises(UsageError, match="chunk must be a positive integer"):
        spec.verify(net, x, y, ["cr"], chunk=0)


# f0 = 2 x0 - x1, f1 = x1 + 0.5, f2 = 0.2 - x0. At x = (0.6, 0.2), label 0:
# f0 - f1 = 2 x0 - 2 x1 - 0.5 is smallest at (0.6 - eps, 0.2 + eps): 0.3 - 4 eps, > 0 iff
# eps < 0.075; f0 - f2 = 3 x0 - x1 - 0.2 >= 1.6 - 4 eps stays positive.
# At x = (0.05, 0.05): f0 >= 0 - 0.15 on the clipped box [0, 0.15]^2 (-0.25 without clipping).
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("prop", "x", "label", "eps", "t", "expected"),
    [
        ("robust", (0.6, 0.2), 0, 0.05, 0.0, VERIFIED),  # 0.3 - 0.2 = 0.1
        ("robust", (0.6, 0.2), 0, 0.07, 0.0, VERIFIED),  # 0.02
        ("robust", (0.6, 0.2), 0, 0.08, 0.0, FALSIFIED),  # -0.02
        ("robust", (0.6, 0.2), 1, 0.0, 0.0, FALSIFIED),  # f1 = 0.7 < f0 = 1.0
        ("robust", (0.6, 0.2), 0, 0.0, 0.0, VERIFIED),  # a point: 0.3 > 0
        ("above", (0.05, 0.05), 0, 0.1, -0.2, VERIFIED),  # -0.15 >= -0.2 thanks to the box
        ("above", (0.05, 0.05), 0, 0.1, -0.1, FALSIFIED),  # -0.15 < -0.1
        ("above", (0.5, 0.5), 0, 0.25, -0.25, VERIFIED),  # 0.5 - 0.75 = -0.25: on the boundary
        ("above", (0.5, 0.5), 0, 0.25, -0.2, FALSIFIED),
    ],
)
def test_linear_network_verdicts_are_exact(method, prop, x, label, eps, t, expected):
    net = linear_net()
    spec = propdsl.load(LINEAR_SPEC, {"eps": eps, "t": t})
    xt = torch.tensor([x], dtype=torch.float64)
    yt = torch.tensor([label])
    lo = [max(v - eps, 0.0) for v in x]
    hi = [min(v + eps, 1.0) for v in x]
    if prop == "robust":
        rows = [[float(k == label) - float(k == j) for k in range(3)] for j in range(3)]
        worst = min(worst_case(rows[j], 0.0, lo, hi) for j in range(3) if j != label)
        exact = VERIFIED if worst > 0 else FALSIFIED
    else:
        exact = VERIFIED if worst_case([1.0, 0.0, 0.0], -t, lo, hi) >= 0 else FALSIFIED
    assert exact == expected
    v = spec.verify(net, xt, yt, [prop], method=method, alpha=ALPHA)[prop]
    assert v.status == [expected]
    if expected == VERIFIED and prop == "above":
        # the certified margin is the exact worst case: bounds are exact on a linear network
        assert float(v.margin[0]) == pytest.approx(worst_case([1.0, 0, 0], -t, lo, hi), abs=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_strong_classification_uses_the_margin_condition(method):
    """softmax(f)[y] >= eta is proved through f_y - f_j >= log((K - 1) eta / (1 - eta))."""
    net = linear_net()
    x = torch.tensor([[0.9, 0.1]], dtype=torch.float64)  # f = (1.7, 0.6, -0.7): label 0
    y = torch.tensor([0])
    # over the ball of radius 0.02 the corner (0.88, 0.12) minimises both margins:
    # f0 - f1 = 2 x0 - 2 x1 - 0.5 >= 1.02 and f0 - f2 = 3 x0 - x1 - 0.2 >= 2.32
    p_min = 1 / (1 + math.exp(-1.02) + math.exp(-2.32))  # 0.6855
    for eta, expected in ((0.55, VERIFIED), (0.65, UNKNOWN), (0.7, FALSIFIED)):
        condition = math.log(2 * eta / (1 - eta)) <= 1.02  # 0.894, 1.312, 1.540
        assert condition == (expected == VERIFIED)
        assert (p_min >= eta) == (expected != FALSIFIED)
        for name in ("strong", "strong_log"):
            spec = propdsl.load(LINEAR_SPEC, {"eps": 0.02, "eta": eta})
            v = spec.verify(net, x, y, [name], method=method, alpha=ALPHA)[name]
            assert v.status == [expected], (name, eta)


@pytest.mark.parametrize("method", METHODS)
def test_clauses_about_the_sample_are_decided_exactly(method):
    """Branches on the label, premises free of x', constants: no bounds needed for them."""
    spec = propdsl.load(
        LINEAR_SPEC
        + """
property branch(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1):
    if y == 0 then f(x')[0] >= t else f(x')[1] >= t
property premise(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1): y == 2 implies f(x')[2] >= t
""",
        {"eps": 0.05, "t": 0.6},
    )
    net = linear_net()
    # x = (0.6, 0.2): over the ball f0 >= 1.1 - 0.25 = 0.85 and f1 in [0.65, 0.75], f2 <= -0.35
    x = torch.tensor([[0.6, 0.2]] * 3, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    out = spec.verify(net, x, y, ["branch", "premise"], method=method, alpha=ALPHA)
    assert out["branch"].status == [VERIFIED, VERIFIED, VERIFIED]
    assert out["premise"].status == [VERIFIED, VERIFIED, FALSIFIED]
    assert math.isinf(float(out["premise"].margin[0]))  # decided without a bound
    spec = spec.with_params(t=0.8)  # f1 >= 0.8 fails for y = 1, f0 >= 0.8 still holds
    out = spec.verify(net, x, y, ["branch"], method=method, alpha=ALPHA)
    assert out["branch"].status == [VERIFIED, FALSIFIED, FALSIFIED]


def test_margins_measure_the_distance_to_a_proof():
    """Classification robustness: the certified margin is the worst bounded logit margin."""
    net = linear_net()
    spec = propdsl.load(LINEAR_SPEC, {"eps": 0.05})
    x = torch.tensor([[0.6, 0.2]], dtype=torch.float64)
    v = spec.verify(net, x, torch.tensor([0]), ["robust"], method="crown")["robust"]
    assert v.status == [VERIFIED]
    assert float(v.margin[0]) == pytest.approx(0.3 - 4 * 0.05, abs=1e-9)


# -- unsupported, timeouts ---------------------------------------------------------------------
UNSUPPORTED_SPEC = """\
network f : Tensor[2] -> Tensor[3]
param eps : Real = 0.1

property lipschitz(x) =
  forall x1 in ball(x, eps, inf), x2 in ball(x, eps, inf):
    norm(f(x1) - f(x2), 2) <= 10 * norm(x1 - x2, 2) + 1

property curved(x) =
  forall x' in ball(x, eps, inf):
    f(x')[0] * f(x')[1] >= -100
"""


def test_unsupported_reasons_are_positioned():
    spec = propdsl.load(UNSUPPORTED_SPEC)
    net, _ = make_net("relu", 0)
    x = torch.rand(3, 2, dtype=torch.float64)
    out = spec.verify(net, x, None)
    assert out["lipschitz"].status == [UNSUPPORTED] * 3
    assert out["lipschitz"].reason.startswith("<spec>:5:3: ")
    assert "Lipschitz" in out["lipschitz"].reason
    assert out["curved"].status == [UNSUPPORTED] * 3
    assert out["curved"].reason.startswith("<spec>:10:5: ")
    assert "not linear" in out["curved"].reason


def test_unsupported_properties_are_still_falsified():
    spec = propdsl.load(UNSUPPORTED_SPEC.replace("-100", "100"))
    net, _ = make_net("relu", 0)
    v = spec.verify(net, torch.rand(3, 2, dtype=torch.float64), None, ["curved"])["curved"]
    assert v.status == [FALSIFIED] * 3  # f0 * f1 is far below 100 everywhere


def test_to_query_raises_unsupported_with_the_span():
    spec = propdsl.load(UNSUPPORTED_SPEC)
    prop = spec.property("curved")
    net, _ = make_net("relu", 0)
    with pytest.raises(Unsupported) as err:
        to_query(prop.formula, ["x"], {"f": 3}, torch.rand(2, 2).double(), None, {"f": net})
    assert (err.value.span.line, err.value.span.col) == (10, 5)


def test_existential_properties_are_never_falsified_by_a_failed_search():
    spec = propdsl.load(
        """
        network f : Tensor[2] -> Tensor[3]
        property reach(x) = exists x' in ball(x, 0.1, inf): f(x')[0] >= 1000
        property easy(x) = exists x' in ball(x, 0.1, inf): f(x')[0] <= 1000
        property premise(x) = (forall x' in ball(x, 0.1, inf): f(x')[0] >= 1000) implies false
        """
    )
    net, _ = make_net("relu", 0)
    x = torch.rand(4, 2, dtype=torch.float64)
    out = spec.verify(net, x, None)
    assert out["reach"].status == [UNSUPPORTED] * 4  # not found is no proof of absence
    assert out["easy"].status == [VERIFIED] * 4  # the attack's point is a witness
    # a forall in a premise is existential: the attack's point refutes the premise
    assert out["premise"].status == [VERIFIED] * 4


def test_timeout_gives_unknown_timeout():
    net, shape = make_net("relu", 5)
    spec = propdsl.load(spec_text(shape, INF), {"eps": 0.2})
    x = torch.rand(8, 2, dtype=torch.float64)
    y = net(x).argmax(1)
    full = spec.verify(net, x, y, ["cr"], falsifier=CENTRE)["cr"]
    timed = spec.verify(net, x, y, ["cr"], falsifier=CENTRE, timeout=0.0)["cr"]
    assert set(timed.status) <= {TIMEOUT, FALSIFIED}
    for a, b in zip(full.status, timed.status, strict=True):
        assert (b == FALSIFIED) == (a == FALSIFIED)
    assert TIMEOUT in timed.status


# -- empty regions, non-finite inputs, reasons --------------------------------------------------
EMPTY_SPEC = """\
network f : Tensor[2] -> Tensor[3]
param eps : Real = 0.1
property robust(x, y) = forall x' in ball(x, eps, {p}) & box(0, 1): argmax(f(x')) == y
property impossible(x) = forall x' in ball(x, eps, {p}) & box(0, 1): f(x')[0] >= 1000
property far(x) = exists x' in ball(x, eps, {p}) & box(2, 3): f(x')[0] > -1000
property near(x) = exists x' in ball(x, eps, {p}) & box(0, 1): f(x')[0] > -1000
property pair(x) =
  forall x1 in ball(x, eps, {p}) & box(0, 1), x2 in ball(x, eps, {p}) & box(2, 3):
    f(x1)[0] >= f(x2)[0] + 1000
property chain(x) =
  forall x1 in ball(x, eps, {p}) & box(0, 1):
    forall x2 in ball(x, eps, {p}) & box(2, 3): f(x1)[0] >= 1000
property either(x) =
  (forall x1 in ball(x, eps, {p}) & box(2, 3): f(x1)[0] >= 1000)
  or (exists x2 in ball(x, eps, {p}) & box(2, 3): f(x2)[0] >= -1000)
property both(x) =
  (forall x1 in ball(x, eps, {p}) & box(2, 3): f(x1)[0] >= 1000)
  and (exists x2 in ball(x, eps, {p}) & box(2, 3): f(x2)[0] >= -1000)
property dependent(x) =
  forall x1 in ball(x, eps, {p}) & box(0, 1):
    exists x2 in ball(x1, eps, {p}) & box(2, 3): f(x2)[0] > -1000
"""


def _mixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Samples 0-2 in the unit box (non-empty regions), 3-5 unscaled pixels (0..255): a ball of
    radius 0.1 around them misses box(0, 1) (sample 5 by 0.15 in one coordinate only)."""
    gen = torch.Generator().manual_seed(4)
    inside = torch.rand(3, 2, generator=gen, dtype=torch.float64)
    pixels = torch.tensor([[0.0, 255.0], [128.0, 3.0], [1.25, 0.5]], dtype=torch.float64)
    return torch.cat([inside, pixels]), torch.zeros(6, dtype=torch.long)


@pytest.mark.parametrize("p", ["inf", "2", "1"])
def test_empty_regions_get_vacuous_verdicts_with_a_reason(p):
    """The issue's cases: before, a forall over an empty region was falsified with a
    counterexample 254 away and an exists over one was `verified` by a point outside it. Now
    per sample: forall over an empty region is verified, exists falsified, both with the reason
    and no point; the non-empty samples of the same batch are decided as usual."""
    net, _ = make_net("relu", 0)
    spec = propdsl.load(EMPTY_SPEC.format(p=p))
    x, y = _mixed_batch()
    gen = torch.Generator().manual_seed(0)
    out = spec.verify(net, x, y, falsifier=APGD(steps=10), generator=gen)
    # the regions of samples 0-2 (the others are empty: each of those samples lies more than
    # 0.1 from box(0, 1))
    region = Region.ball(x[:3], 0.1, {"inf": INF, "2": 2, "1": 1}[p], lo=0.0, hi=1.0)

    impossible = out["impossible"]  # false on every non-empty region, vacuous on the others
    assert impossible.status == [FALSIFIED] * 3 + [VERIFIED] * 3
    for i in range(3, 6):
        assert impossible.reasons[i].startswith("the region is empty")
        assert "vacuously" in impossible.reasons[i]
    points = impossible.counterexamples["x'"]
    assert bool(region.contains(points[:3]).all())
    assert bool(points[3:].isnan().all())  # no point outside its region is ever reported
    with torch.no_grad():
        assert bool((net(points[:3])[:, 0] < 1000).all())

    robust = out["robust"]
    assert robust.status[3:] == [VERIFIED] * 3
    for s, r in zip(robust.status[:3], robust.reasons[:3], strict=True):
        assert (r is None) == (s in (VERIFIED, FALSIFIED))
    for i, s in enumerate(robust.status[:3]):
        if s == FALSIFIED:
            assert bool(region.contains(robust.counterexamples["x'"][:3])[i])

    far = out["far"]  # box(2, 3) misses every ball: never a witness outside the region
    assert far.status == [FALSIFIED] * 6 and far.counterexamples == {}
    assert all(r.startswith("the region is empty") and "no witness" in r for r in far.reasons)
    near = out["near"]
    assert near.status == [VERIFIED] * 3 + [FALSIFIED] * 3
    assert near.reasons[:3] == [None] * 3 and all(
        r.startswith("the region is") for r in near.reasons[3:]
    )

    # one empty factor of a product makes it empty; so does an independent nested region
    assert out["pair"].status == [VERIFIED] * 6
    assert all("x2" in r for r in out["pair"].reasons)
    assert out["chain"].status == [VERIFIED] * 6
    # every region empty: the exact evaluation decides (true or false; true and false)
    assert out["either"].status == [VERIFIED] * 6
    assert out["both"].status == [FALSIFIED] * 6
    for name in ("either", "both"):
        assert all(r.startswith("every region") for r in out[name].reasons)
    # an inner region that depends on the outer point: false where x1 has points (no witness
    # for any of them), never verified there; vacuous where x1's own region is empty
    assert VERIFIED not in out["dependent"].status[:3]
    assert out["dependent"].status[3:] == [VERIFIED] * 3


def test_bound_propagation_refuses_empty_and_non_finite_regions():
    from propdsl.region import RegionError
    from propdsl.verify.bounds import bounds, compute_bounds
    from propdsl.verify.jacobian import lipschitz_constant

    net, _ = make_net("relu", 0)
    x, _ = _mixed_batch()
    region = Region.ball(x, 0.1, INF, lo=0.0, hi=1.0)
    for method in METHODS:
        with pytest.raises(RegionError, match=r"empty for 3 of 6 samples \(3, 4, 5\)"):
            compute_bounds(net, region, method)
    with pytest.raises(RegionError, match="empty"):
        lipschitz_constant(net, region=region)
    lower = torch.zeros(2, 2, dtype=torch.float64)
    upper = lower + 0.1
    lower[1, 0] = math.nan
    with pytest.raises(UsageError, match="NaN"):
        bounds(net, lower, upper)
    with pytest.raises(UsageError, match="unbounded"):
        bounds(net, torch.full((1, 2), -math.inf).double(), torch.zeros(1, 2).double())
    # the non-empty samples alone are fine
    lb, ub = compute_bounds(net, region.select(torch.arange(3)), "crown")
    assert bool(torch.isfinite(lb).all() and (lb <= ub).all())


def test_verify_and_export_reject_non_finite_inputs(tmp_path):
    """Before, a NaN pixel gave a `falsified` verdict with a NaN counterexample."""
    from propdsl.export import export

    net, _ = make_net("relu", 0)
    spec = propdsl.load(EMPTY_SPEC.format(p="inf"))
    x, y = _mixed_batch()
    x[4, 1] = math.nan
    x[5, 0] = math.inf
    with pytest.raises(UsageError, match=r"x has 2 NaN or infinite values \(samples 4, 5\)"):
        spec.verify(net, x, y, ["robust"])
    with pytest.raises(UsageError, match="NaN or infinite"):
        export(spec, net, x, y, tmp_path / "out", properties=["robust"])


def test_every_open_verdict_has_a_reason():
    """unknown: the method and the certified margin that fell short; timeout: the budget;
    unsupported: the positioned reason, per sample too; plain verdicts: no reason."""
    net, shape = make_net("relu", 5)
    spec = propdsl.load(spec_text(shape, INF), {"eps": 0.2})
    x = torch.rand(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = net(x).argmax(1)
    v = spec.verify(net, x, y, ["cr"], method="ibp", falsifier=CENTRE)["cr"]
    assert UNKNOWN in v.status and v.reason is None
    for i, s in enumerate(v.status):
        if s == UNKNOWN:
            m = float(v.margin[i])
            assert m < 0
            assert v.reasons[i] == (
                f"the ibp bounds are too loose: certified margin {m:.4g}, a proof needs >= 0; "
                "a tighter method or a smaller region may prove it"
            )
        else:
            assert v.reasons[i] is None
    timed = spec.verify(net, x, y, ["cr"], falsifier=CENTRE, timeout=0.0)["cr"]
    for s, r in zip(timed.status, timed.reasons, strict=True):
        if s == TIMEOUT:
            assert r.startswith("timeout: the budget of 0 s per sample (0 s for 8 samples)")
    un = propdsl.load(UNSUPPORTED_SPEC).verify(net, x, None, ["curved"])["curved"]
    assert un.status == [UNSUPPORTED] * 8 and un.reasons == [un.reason] * 8


# -- the API -------------------------------------------------------------------------------------
def test_spec_verify_api():
    net, shape = make_net("relu", 7, dtype=torch.float32)
    spec = propdsl.load(spec_text(shape, INF), {"eps": 0.05})
    x = torch.rand(5, 2)
    y = net(x).argmax(1)
    out = spec.verify(net, x, y, ["cr", "sr"], method="ibp")
    assert list(out) == ["cr", "sr"]
    for v in out.values():
        assert len(v.status) == 5 and v.margin.shape == (5,)
        assert sum(v.rate(s) for s in STATUSES) == pytest.approx(1.0)
        assert v.seconds >= 0
    assert net.training is False
    net.train()
    spec.verify(net, x, y, ["cr"])
    assert net.training  # the mode is restored
    with pytest.raises(propdsl.UsageError, match="unknown property"):
        spec.verify(net, x, y, ["nope"])
    with pytest.raises(propdsl.UsageError, match="unknown verification method 'exact'"):
        spec.verify(net, x, y, ["cr"], method="exact")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_verdicts_on_cuda_match_the_cpu():
    net, shape = make_net("relu", 11)
    spec = propdsl.load(spec_text(shape, INF), {"eps": 0.1, "c": 0.1, "c2": 0.2})
    x = torch.rand(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x).argmax(1)
    names = list(BODIES)
    cpu = spec.verify(net, x, y, names, falsifier=CENTRE)
    gpu_net = make_net("relu", 11)[0].cuda()
    gpu = spec.verify(gpu_net, x.cuda(), y.cuda(), names, falsifier=CENTRE)
    for name in names:
        assert gpu[name].status == cpu[name].status, name
        torch.testing.assert_close(gpu[name].margin, cpu[name].margin, equal_nan=True)


# -- propdsl verify ---------------------------------------------------------------------------
CLI_SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = 0.1

let pixels = box(0, 1)

property robust(x, y) =
  forall x' in ball(x, eps, inf) & pixels:
    argmax(f(x')) == y

property stable(x) =
  forall x' in ball(x, eps, inf) & pixels:
    norm(f(x') - f(x), inf) <= 100

property lipschitz(x) =
  forall x1 in ball(x, eps, inf) & pixels, x2 in ball(x, eps, inf) & pixels:
    norm(f(x1) - f(x2), 2) <= 10 * norm(x1 - x2, 2)

train f on digits(split = "train", limit = 300) {
  model  = mlp(hidden = [16])
  epochs = 2
  batch  = 64
  loss   = cross_entropy
}

verify f on digits(split = "test") {
  properties = [robust, stable, lipschitz]
  method     = crown
}
"""


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    from propdsl.train import TrainOptions, train

    folder = tmp_path_factory.mktemp("verify_cli")
    spec_path = folder / "tiny.prop"
    spec_path.write_text(CLI_SPEC, encoding="utf-8")
    train(propdsl.load(spec_path), TrainOptions(out=folder / "run", quiet=True, threads=1))
    return spec_path, folder / "run"


def test_propdsl_verify_end_to_end(trained_run):
    from propdsl import cli
    from propdsl.data import load_dataset

    spec_path, run = trained_run
    result = CliRunner().invoke(
        cli.app,
        ["verify", str(spec_path), "--run", str(run), "--samples", "12", "--param", "eps=0.15"],
    )
    assert result.exit_code == 0, result.output
    assert "verification: method crown, split test, 12 samples" in result.output
    assert "unsupported" not in result.output  # Lipschitz: Jacobian bounds (docs/jacobian.md)
    data = json.loads((run / "verify.json").read_text())
    assert data["method"] == "crown" and data["samples"] == 12 and data["params"]["eps"] == 0.15
    assert data["param_sources"]["eps"] == "override" and data["checkpoint"] == "best"
    folder = run / data["results"]  # RUN/verify/<method>-<key>/, RUN/verify.json its copy
    assert folder.parent == run / "verify" and folder.name.startswith("crown-test-n12-best-")
    assert json.loads((folder / "verify.json").read_text()) == data
    assert f"verdicts: {folder / 'verify.json'}" in result.output
    assert set(data["properties"]) == {"robust", "stable", "lipschitz"}
    robust = data["properties"]["robust"]
    assert sum(robust["rates"].values()) == pytest.approx(1.0)
    statuses = [s["status"] for s in robust["per_sample"]]
    assert len(statuses) == 12 and FALSIFIED in statuses
    assert data["properties"]["stable"]["rates"][VERIFIED] == 1.0
    for s in data["properties"]["stable"]["per_sample"]:
        assert s["margin"] > 0
    lipschitz = data["properties"]["lipschitz"]
    assert lipschitz["rates"].get(UNSUPPORTED, 0.0) == 0.0 and lipschitz["reason"] is None
    for s in lipschitz["per_sample"]:
        assert s["status"] != VERIFIED or s["margin"] >= 0
    # every per-sample entry has a reason; every open verdict says why
    for prop in data["properties"].values():
        for s in prop["per_sample"]:
            assert "reason" in s
            if s["status"] not in (VERIFIED, FALSIFIED):
                assert isinstance(s["reason"], str) and s["reason"]

    # counterexamples: inside the region, misclassified by the run's model
    npz = np.load(folder / "counterexamples" / "robust.npz")
    index, x, points = npz["index"], npz["x"], npz["point[x']"]
    assert list(index) == [i for i, s in enumerate(statuses) if s == FALSIFIED]
    test = load_dataset("digits", split="test", seed=0)
    assert np.allclose(x, test.x[:12].numpy()[index])
    assert np.abs(points - x).max() <= 0.15 + 1e-6
    assert points.min() >= 0 and points.max() <= 1
    model = runs.Run.open(run).load_model()
    labels = np.array([robust["per_sample"][i]["label"] for i in index])
    with torch.no_grad():
        pred = model(torch.tensor(points)).argmax(1).numpy()
    assert (pred != labels).all()
    assert (folder / "counterexamples" / "robust.png").exists()
    # every open sample says why
    for s in robust["per_sample"]:
        if s["status"] in (UNKNOWN, TIMEOUT):
            assert s["reason"], s


def test_propdsl_verify_with_crown_ibp_reports_its_own_bounds(trained_run):
    """`--method crown_ibp` on the CLI, and `spec.verify(..., method="crown_ibp")`: the
    certified margin of `robust` is the smallest CROWN-IBP lower bound of the 9 margins
    f_y - f_j over the clipped ball, computed here directly (labels: the model's predictions,
    so that most samples are provable)."""
    from propdsl import cli
    from propdsl.data import load_dataset
    from propdsl.verify.bounds import compute_bounds

    spec_path, run = trained_run
    args = ["verify", str(spec_path), "--run", str(run), "--samples", "12"]
    result = CliRunner().invoke(cli.app, [*args, "--method", "CROWN-IBP"])
    assert result.exit_code == 0, result.output
    assert "verification: method crown_ibp, split test, 12 samples" in result.output
    assert json.loads((run / "verify.json").read_text())["method"] == "crown_ibp"

    model = runs.Run.open(run).load_model()
    x = load_dataset("digits", split="test", seed=0).x[:12]
    with torch.no_grad():
        y = model(x).argmax(1)
    rows = torch.eye(10)[y].unsqueeze(1) - torch.eye(10).unsqueeze(0)  # [12, 10, 10]
    C = torch.stack([rows[i][torch.arange(10) != y[i]] for i in range(12)])
    eps = 0.005
    with torch.no_grad():
        lb, _ = compute_bounds(model, Region.ball(x, eps, math.inf, lo=0.0, hi=1.0), "crown_ibp", C)
    spec = propdsl.load(spec_path, {"eps": eps})
    v = spec.verify(model, x, y, ["robust"], method="crown_ibp")["robust"]
    assert v.status.count(VERIFIED) >= 6
    for i, status in enumerate(v.status):
        if status == VERIFIED:
            assert float(v.margin[i]) == pytest.approx(float(lb[i].min()), abs=1e-5)
        else:
            assert float(lb[i].min()) < 0


def test_propdsl_verify_usage_errors(trained_run):
    from propdsl import cli

    spec_path, run = trained_run
    runner = CliRunner()
    result = runner.invoke(cli.app, ["verify", str(spec_path), "--run", str(run), "--method", "x"])
    assert result.exit_code == 2 and "--method" in result.output
    assert "ibp, crown_ibp, crown, alpha_crown" in result.output
    result = runner.invoke(cli.app, ["verify", str(spec_path), "--run", str(run / "nope")])
    assert result.exit_code == 2 and "no such run folder" in result.output


# -- the report: reasons, counterexample pictures (issue 13) ---------------------------------------


def _verdicts(status, margins, reasons=None):
    from propdsl.verify.run import PropertyVerdicts

    v = PropertyVerdicts("robust", status, torch.tensor(margins, dtype=torch.float64))
    if reasons is not None:
        v.reasons = reasons  # what the verifier gives per sample, where it does
    return v


def test_the_table_says_why_samples_are_unknown():
    from propdsl.verify.report import VerifyReport, _reasons

    nan = float("nan")
    v = _verdicts([VERIFIED, UNKNOWN, UNKNOWN, TIMEOUT, FALSIFIED], [0.2, -0.31, -0.05, nan, nan])
    reasons = {"robust": _reasons(v)}
    assert reasons["robust"][0] is None and reasons["robust"][4] is None
    assert reasons["robust"][1] == "bounds too loose: certified margin -0.31, a proof needs >= 0"
    report = VerifyReport("crown", "test", 5, {"robust": v}, Path("v.json"), (), reasons=reasons)
    lines = report.table().splitlines()
    row = lines.index(next(line for line in lines if line.startswith("robust")))
    assert lines[row + 1] == (
        "  unknown, 2 samples (e.g. #1): bounds too loose: certified margin -0.31, a proof "
        "needs >= 0"
    )
    assert lines[row + 2] == (
        "  unknown (timeout), 1 sample (e.g. #3): the time limit per sample ran out"
    )
    # The verifier's own reasons, where it gives them, come first.
    given = [None, "the crown bounds are too loose: certified margin -0.31", None, None, None]
    v = _verdicts(
        [VERIFIED, UNKNOWN, UNKNOWN, TIMEOUT, FALSIFIED], [0.2, -0.31, -0.05, nan, nan], given
    )
    assert _reasons(v)[1] == given[1]
    assert _reasons(v)[2].startswith("bounds too loose: certified margin -0.05")


def test_counterexample_pictures_show_index_label_prediction_and_margin(trained_run, monkeypatch):
    """The PNG of a property's counterexamples: each column's sample index in the split, its
    label, the predictions at the sample and at the counterexample, and the label's logit
    margin at the counterexample, computed here from the saved points."""
    from propdsl import plots
    from propdsl.verify.report import verify_run

    spec_path, run = trained_run
    seen = {}

    def grab(x, points, index, labels, pred_x, pred_point, margins, path, **kw):
        seen.update(index=list(index), labels=labels, pred_x=pred_x, pred_point=pred_point)
        seen.update(margins=margins, title=kw["title"])
        path.write_bytes(b"")
        return path

    monkeypatch.setattr(plots, "counterexample_grid", grab)
    spec = propdsl.load(spec_path, {"eps": 0.15})
    report = verify_run(spec, run, samples=12, properties=["robust"])
    npz = np.load(report.results / "counterexamples" / "robust.npz")
    index = list(npz["index"])
    assert seen["index"] == index[:8]
    assert f"{min(len(index), 8)} of {len(index)} counterexamples" in seen["title"]
    model = runs.Run.open(run).load_model()
    points = torch.tensor(npz["point[x']"][:8])
    from propdsl.data import load_dataset

    labels = [int(v) for v in load_dataset("digits", split="test", seed=0).y[index[:8]]]
    assert list(seen["labels"]) == labels
    with torch.no_grad():
        logits = model(points)
        at_x = model(torch.tensor(npz["x"][:8])).argmax(1)
    for j, label in enumerate(labels):
        others = torch.cat([logits[j, :label], logits[j, label + 1 :]])
        assert seen["margins"][j] == pytest.approx(float(logits[j, label] - others.max()), abs=1e-5)
        assert seen["margins"][j] < 0  # misclassified there: a counterexample
        assert seen["pred_point"][j] == int(logits[j].argmax()) and seen["pred_x"][j] == int(
            at_x[j]
        )
