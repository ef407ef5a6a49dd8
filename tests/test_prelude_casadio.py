"""The prelude's Casadio et al. (2022) properties against their definitions.

Casadio, Komendantskaya, Daggitt, Kokke, Katz, Amir, Refaeli 2022, "Neural Network Robustness as a
Verification Property: A Principled Case Study". With B the L-inf ball of radius eps around the
sample x intersected with the input box:

* SR:  forall x' in B. ||f(x') - f(x)||_inf <= delta
* LR:  forall x' in B. ||f(x') - f(x)||_inf <= L * ||x' - x||_inf   (one point fixed at x)
* SCR: forall x' in B. softmax(f(x'))_y >= eta

The expected values are closed forms on 2-input linear models (the supremum of a linear function
over a box is reached at a corner), computed by hand from W and b, never by the compiler; the
grid tests evaluate the prelude's bodies through the compiler at given points and compare them
with the formulas written in torch.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import propdsl
from propdsl.attacks import AttackResult
from propdsl.loss import compile as C

NET = "network f : Tensor[2] -> Tensor[2]\n"
SPEC = NET + (
    "param eps : Real = 0.1\n"
    "param delta : Real = 1.0\n"
    "param L : Real = 10.0\n"
    "param eta : Real = 0.5\n"
    "property sr(x) = standard_robustness(f, x, eps, delta)\n"
    "property sr_softmax(x) = standard_robustness_softmax(f, x, eps, delta)\n"
    "property lr(x) = lipschitz_robustness(f, x, eps, L)\n"
    "property lr2(x) = lipschitz_robustness_two_point(f, x, eps, L)\n"
    "property scr(x, y) = strong_classification_robustness(f, x, y, eps, eta)\n"
)
W = [[1.0, -2.0], [0.5, 0.5]]
B = [0.3, -0.1]
X = torch.tensor([[0.5, 0.5], [0.3, 0.6]], dtype=torch.float64)  # balls inside [0, 1]^2
EPS = 0.1
# restarts: |softmax(f(x')) - softmax(f(x))| has a local maximum at each of two opposite corners
ATTACK = propdsl.PGD(steps=50, restarts=8)


def linear(weight=W, bias=B) -> nn.Linear:
    model = nn.Linear(2, len(weight)).to(torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.tensor(weight, dtype=torch.float64))
        model.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return model.eval()


def verdicts(name: str, model, y=None, **params):
    spec = propdsl.load(SPEC, params={"eps": EPS, **params})
    g = torch.Generator().manual_seed(0)
    return spec.verify(model, X, y, [name], falsifier=ATTACK, generator=g)[name].status


def test_standard_robustness_sup_is_eps_times_the_largest_row_sum():
    # sup_{|d|_inf <= eps} ||W d||_inf = eps * max_i sum_j |W_ij| = 0.1 * 3 = 0.3
    sup = EPS * max(abs(a) + abs(b) for a, b in W)
    assert sup == pytest.approx(0.3)
    assert verdicts("sr", linear(), delta=sup + 0.01) == ["verified"] * 2
    assert verdicts("sr", linear(), delta=sup - 0.01) == ["falsified"] * 2


def test_lipschitz_robustness_is_the_inf_to_inf_operator_norm():
    # sup_d ||W d||_inf / ||d||_inf = ||W||_{inf -> inf} = 3 (the largest absolute row sum)
    assert verdicts("lr", linear(), L=3.01) == ["verified"] * 2
    # the L2 -> L2 constant (spectral norm, from the 2x2 closed form) differs: 2.31 < 3
    a, b, c, d = W[0][0], W[0][1], W[1][0], W[1][1]
    t, det = a * a + b * b + c * c + d * d, a * d - b * c
    spectral = math.sqrt((t + math.sqrt(t * t - 4 * det * det)) / 2)
    assert 2.2 < spectral < 2.4
    assert verdicts("lr2", linear(), L=spectral * 1.01) == ["verified"] * 2
    # L = 2.5 > spectral norm: the two-point L2 form holds where Casadio's LR fails (at the
    # corner x + eps * (1, -1): ||W d||_inf = 0.3 > 2.5 * 0.1)
    assert verdicts("lr2", linear(), L=2.5) == ["verified"] * 2
    assert verdicts("lr", linear(), L=2.5) == ["falsified"] * 2


def test_strong_classification_robustness_closed_form():
    # two classes: softmax(f)_0 = sigmoid(f_0 - f_1) = sigmoid(m . x + c), m = W_0 - W_1,
    # c = b_0 - b_1; its minimum on the ball is at x - eps * sign(m)
    m = [W[0][0] - W[1][0], W[0][1] - W[1][1]]
    c = B[0] - B[1]
    y = torch.zeros(2, dtype=torch.long)
    lows = []
    for x1, x2 in X.tolist():
        z = m[0] * x1 + m[1] * x2 + c - EPS * (abs(m[0]) + abs(m[1]))
        lows.append(1 / (1 + math.exp(-z)))
    for i, low in enumerate(lows):
        assert verdicts("scr", linear(), y=y, eta=low - 0.005)[i] == "verified"
        assert verdicts("scr", linear(), y=y, eta=low + 0.005)[i] == "falsified"


def test_standard_robustness_softmax_is_on_probabilities():
    # two classes: both probabilities move by |sigmoid(z') - sigmoid(z)|, z = m . x + c linear,
    # largest at one of the two corners x +- eps * sign(m)
    m = [W[0][0] - W[1][0], W[0][1] - W[1][1]]
    c = B[0] - B[1]

    def sig(v):
        return 1 / (1 + math.exp(-v))

    sups = []
    for x1, x2 in X.tolist():
        z = m[0] * x1 + m[1] * x2 + c
        r = EPS * (abs(m[0]) + abs(m[1]))
        sups.append(max(abs(sig(z + r) - sig(z)), abs(sig(z - r) - sig(z))))
    model = linear()
    spec = propdsl.load(SPEC, params={"eps": EPS})
    for i, sup in enumerate(sups):
        g = torch.Generator().manual_seed(i)
        low = spec.with_params(delta=sup * 0.95).loss("sr_softmax", "dl2", ATTACK, generator=g)
        high = spec.with_params(delta=sup * 1.05).loss("sr_softmax", "dl2", ATTACK, generator=g)
        assert not bool(low(model, X).satisfied[i])  # the attack reaches the corner
        assert bool(high(model, X).satisfied[i])  # and nothing beyond the supremum exists
    # on logits the same model's SR supremum is 0.3 (not a probability)
    assert verdicts("sr", model, delta=0.31) == ["verified"] * 2


def test_two_point_l2_lipschitz_does_not_imply_standard_robustness():
    # f(x) = x1 + x2: L2 -> L2 constant sqrt(2), but on the L-inf ball f moves by 2 * eps;
    # with L * eps = delta the two-point form holds and SR fails (the old prelude comment's claim)
    model = linear(weight=[[1.0, 1.0]], bias=[0.0])
    spec = propdsl.load(
        "network f : Tensor[2] -> Tensor[1]\n"
        "param L : Real = 1.0\n"
        "property lr2(x) = lipschitz_robustness_two_point(f, x, 0.1, L)\n"
        "property lr(x) = lipschitz_robustness(f, x, 0.1, L)\n"
        "property sr(x) = standard_robustness(f, x, 0.1, L * 0.1)\n",
        params={"L": math.sqrt(2) * 1.001},
    )
    out = spec.verify(model, X, None, ["lr2", "lr", "sr"], falsifier=ATTACK)
    assert out["lr2"].status == ["verified"] * 2
    assert out["sr"].status == ["falsified"] * 2
    assert out["lr"].status == ["falsified"] * 2  # Casadio's LR fails too, as it must
    # with L = 2 = ||W||_{inf -> inf}, LR holds and so does SR with delta = L * eps
    out = spec.with_params(L=2.0 + 1e-6).verify(model, X, None, ["lr", "sr"], falsifier=ATTACK)
    assert out["lr"].status == ["verified"] * 2
    assert out["sr"].status == ["verified"] * 2


# -- the bodies at given points, and LR => SR on a grid -----------------------------------------
def at_points(monkeypatch, points: torch.Tensor):
    def fake(attack, objective, regions, *, models=(), generator=None, **_):
        (region,) = regions
        assert bool(region.contains(points).all()), "grid point outside the ball"
        return AttackResult(points=(points,), value=objective(points).detach())

    monkeypatch.setattr(C, "run_attack", fake)


def grid(x: torch.Tensor, eps: float, n: int = 9) -> torch.Tensor:
    t = torch.linspace(-eps, eps, n, dtype=torch.float64)
    d = torch.cartesian_prod(t, t)
    return (x + d).clamp(0, 1)


@pytest.mark.parametrize("seed", range(4))
def test_lipschitz_implies_standard_robustness_on_a_grid(monkeypatch, seed):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).to(torch.float64)
    for p in model.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    spec = propdsl.load(NET.replace("Tensor[2]\n", "Tensor[3]\n") + SPEC[len(NET) :])
    x = torch.rand(1, 2, generator=g, dtype=torch.float64)
    points = grid(x, EPS)
    xs = x.expand_as(points)
    with torch.no_grad():
        change = (model(points) - model(xs)).abs().amax(1)
        dist = (points - xs).abs().amax(1)
    for L in (0.5, 1.0, 2.0, 4.0):
        delta = L * EPS
        at_points(monkeypatch, points)
        lr = spec.with_params(L=L).loss("lr", "dl2")(model, xs).satisfied
        sr = spec.with_params(delta=delta).loss("sr", "dl2")(model, xs).satisfied
        # the bodies are the definitions (hand formulas in torch)
        assert torch.equal(lr, change <= L * dist)
        assert torch.equal(sr, change <= delta)
        # pointwise, hence on the whole grid: LR with L * eps <= delta implies SR
        assert not (lr & ~sr).any()
        if bool(lr.all()):
            assert bool(sr.all())
