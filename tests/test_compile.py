"""The property compiler (propdsl.loss.compile) against hand-written PyTorch.

Every expected value here is computed independently from the definitions of the logics (the
atom and connective tables of docs/logics.md, after Fischer et al. 2019 and Flinkow et al. 2025):
plain tensor formulas and Python loops, never the compiler or the logics module read back.
Points are fixed by an attack with no steps starting at the ball's centre, or injected by
replacing the attack with a function that returns given points.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import propdsl
from propdsl.attacks import AttackResult
from propdsl.logics import LogicError
from propdsl.loss import compile as C
from propdsl.models import build_model

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "specs" / "digits.prop"
LOGICS = ["dl2", "godel", "lukasiewicz", "goguen", "reichenbach", "yager", "stl", "qll"]
CENTRE = propdsl.PGD(steps=0, random_start=False)  # the attack's point is the ball's centre
K_STL = 10.0  # default STL sharpness
P_QLL = 10.0  # default QLL sharpness
P_YAGER = 2.0  # default Yager exponent


# -- hand-written semantics --------------------------------------------------------------------
def hand_conj(logic: str, lhs, rhs, *, strict=False, mask=None):
    """Loss of the conjunction over the last dim of the atoms `lhs <= rhs` (`<` when strict),
    only where `mask` is True; lhs, rhs: [B, n]. Written from the logics' definitions."""
    lhs, rhs = torch.broadcast_tensors(lhs, rhs)
    if mask is None:
        mask = torch.ones_like(lhs, dtype=torch.bool)
    d = lhs - rhs  # > 0 violated
    eq = (lhs == rhs).to(lhs.dtype) if strict else torch.zeros_like(lhs)
    if logic == "dl2":
        return torch.where(mask, d.clamp_min(0) + eq, 0.0).sum(-1)
    if logic == "stl":
        rob = torch.where(mask, -d - eq, math.inf)
        value = -torch.logsumexp(-K_STL * rob, -1) / K_STL
        return (-value).clamp_min(0)
    if logic == "qll":
        vio = torch.where(mask, d + eq, -math.inf)
        return (torch.logsumexp(P_QLL * vio, -1) / P_QLL).clamp_min(0)
    den = lhs.abs() + rhs.abs()
    truth = torch.where(den > 0, 1 - d.clamp_min(0) / torch.where(den > 0, den, 1.0), 1.0) - eq
    truth = torch.where(mask, truth, 1.0)
    if logic == "godel":
        t = truth.amin(-1)
    elif logic == "lukasiewicz":
        t = (truth.sum(-1) - (truth.shape[-1] - 1)).clamp_min(0)
    elif logic in ("goguen", "reichenbach"):
        t = truth.prod(-1)
    elif logic == "yager":
        t = (1 - ((1 - truth) ** P_YAGER).sum(-1) ** (1 / P_YAGER)).clamp_min(0)
    else:
        raise AssertionError(logic)
    return 1 - t


def hand_saliency(model, x, y):
    leaf = x.detach().requires_grad_(True)
    out = model(leaf).gather(1, y[:, None]).sum()
    (g,) = torch.autograd.grad(out, leaf, create_graph=True)
    return g


def hand_cosine(a, b):
    a, b = a.flatten(1), b.flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def others(y, k=10):
    """[B, k] mask of the classes other than y."""
    return torch.arange(k)[None, :] != y[:, None]


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def inject(monkeypatch):
    """Replace the attack by given points; checks that they lie in the attack's regions."""
    calls = []

    def use(*points):
        def fake(
            attack, objective, regions, *, models=(), generator=None, tiled=None, traceable=None
        ):
            assert len(regions) == len(points)
            for region, p in zip(regions, points, strict=True):
                assert bool(region.contains(p).all()), "injected point outside the region"
            calls.append(list(regions))
            value = objective(*points).detach()
            return AttackResult(points=tuple(points), value=value)

        monkeypatch.setattr(C, "run_attack", fake)
        return calls

    return use


def digits_batch(dtype=torch.float64, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g, dtype=dtype)
    x[0, 0, 0, :4] = 0.0  # pixels on the box's faces
    x[1, 0, 1, :4] = 1.0
    y = torch.randint(0, 10, (n,), generator=g)
    return x, y


def digits_mlp(dtype=torch.float64, activation="relu", seed=0):
    return build_model("mlp", (1, 8, 8), 10, hidden=[16], activation=activation, seed=seed).to(
        dtype
    )


def mixed_labels(model, x, y):
    """Labels that make the property hold for about half of the batch at the centre."""
    y = y.clone()
    y[::2] = model(x).argmax(1)[::2]
    return y


def in_ball(x, eps, seed=1):
    """A point of ball(x, eps, inf) & box(0, 1) at a random offset."""
    g = torch.Generator().manual_seed(seed)
    u = 2 * torch.rand(x.shape, generator=g, dtype=x.dtype) - 1
    return (x + eps * u).clamp(0, 1)


# -- the properties of specs/digits.prop, at a given point --------------------------------------
@pytest.mark.parametrize("logic", LOGICS)
def test_classification_robustness_at_centre(logic):
    spec = propdsl.load(DIGITS)
    model = digits_mlp()
    x, y = digits_batch()
    y = mixed_labels(model, x, y)
    out = spec.loss("classification_robust", logic=logic, attack=CENTRE)(model, x, y)
    f = model(x)
    fy = f.gather(1, y[:, None])
    # f_y > f_j for j != y:  the atoms f_j < f_y
    expected = hand_conj(logic, f, fy, strict=True, mask=others(y))
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(out.satisfied, f.argmax(1) == y)
    assert torch.equal(out.counterexample["x'"], x)
    assert 0 < int(out.satisfied.sum()) < len(y)


@pytest.mark.parametrize("logic", LOGICS)
def test_standard_robustness_at_point(logic, inject):
    model = digits_mlp()
    x, _ = digits_batch()
    point = in_ball(x, 0.1)
    change = (model(point) - model(x)).abs().amax(1).detach()
    delta = float(change.median())
    spec = propdsl.load(DIGITS, params={"delta": delta})
    calls = inject(point)
    out = spec.loss("standard_robust", logic=logic)(model, x)
    (region,) = calls[0]  # ball(x, eps, inf) & box(0, 1)
    assert torch.equal(region.centre, x) and region.p == math.inf
    assert torch.equal(region.radius, torch.full((len(x),), 0.1, dtype=x.dtype))
    assert float(region.lo) == 0.0 and float(region.hi) == 1.0
    expected = hand_conj(logic, change[:, None], torch.full_like(change[:, None], delta))
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(out.satisfied, change <= delta)
    assert torch.equal(out.counterexample["x'"], point)


@pytest.mark.parametrize("logic", LOGICS)
def test_lipschitz_robustness_at_points(logic, inject):
    model = digits_mlp()
    x, _ = digits_batch()
    x1, x2 = in_ball(x, 0.1, seed=1), in_ball(x, 0.1, seed=2)
    out_dist = (model(x1) - model(x2)).norm(dim=1).detach()
    in_dist = (x1 - x2).flatten(1).norm(dim=1)
    lip = float((out_dist / in_dist).median())
    spec = propdsl.load(DIGITS, params={"L": lip})
    calls = inject(x1, x2)
    out = spec.loss("lipschitz_robust", logic=logic)(model, x)
    expected = hand_conj(logic, out_dist[:, None], lip * in_dist[:, None])
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(out.satisfied, out_dist <= lip * in_dist)
    assert set(out.counterexample) == {"x1", "x2"}
    assert len(calls) == 1  # both points move in one attack


@pytest.mark.parametrize("logic", LOGICS)
def test_explanation_stability_at_point(logic, inject):
    model = digits_mlp(activation="tanh")
    x, y = digits_batch()
    point = in_ball(x, 0.3)
    sim = hand_cosine(hand_saliency(model, point, y), hand_saliency(model, x, y)).detach()
    tau = float(sim.median())
    spec = propdsl.load(DIGITS, params={"tau": tau, "eps": 0.3})
    inject(point)
    out = spec.loss("explanation_stable", logic=logic)(model, x, y)
    # cosine >= tau:  the atom tau <= cosine
    expected = hand_conj(logic, torch.full_like(sim[:, None], tau), sim[:, None])
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-12)
    assert torch.equal(out.satisfied, sim >= tau)


@pytest.mark.parametrize("logic", LOGICS)
def test_strong_classification_robustness_from_the_prelude(logic, inject):
    spec = propdsl.load(
        "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
        "property scr(x, y) = strong_classification_robustness(f, x, y, 0.1, 0.11)\n"
    )
    model = digits_mlp()
    x, y = digits_batch()
    y = mixed_labels(model, x, y)
    point = in_ball(x, 0.1)
    inject(point)
    out = spec.loss("scr", logic=logic)(model, x, y)
    prob = model(point).softmax(1).gather(1, y[:, None])
    expected = hand_conj(logic, torch.full_like(prob, 0.11), prob)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(out.satisfied, prob[:, 0] >= 0.11)
    assert 0 < int(out.satisfied.sum()) < len(y)


def test_dl2_loss_is_zero_exactly_where_satisfied():
    spec = propdsl.load(DIGITS)
    model = digits_mlp()
    x, y = digits_batch(n=16)
    y = mixed_labels(model, x, y)
    gen = torch.Generator().manual_seed(0)
    loss = spec.loss("classification_robust", "dl2", propdsl.PGD(steps=5), generator=gen)
    out = loss(model, x, y)
    assert torch.equal(out.loss == 0, out.satisfied)
    f = model(out.counterexample["x'"])  # the exact truth at the reported points
    assert torch.equal(out.satisfied, f.argmax(1) == y)
    assert 0 < int(out.satisfied.sum()) < len(y)


# -- the attack through the compiled property ----------------------------------------------------
def test_attack_points_lie_in_ball_and_box():
    spec = propdsl.load(DIGITS, params={"eps": 0.2})
    model = digits_mlp()
    x, y = digits_batch()
    gen = torch.Generator().manual_seed(0)
    out = spec.loss("classification_robust", attack=propdsl.PGD(steps=7), generator=gen)(
        model, x, y
    )
    point = out.counterexample["x'"]
    assert point.shape == x.shape
    assert float((point - x).abs().max()) <= 0.2 + 1e-12
    assert float(point.min()) >= 0.0 and float(point.max()) <= 1.0
    assert not torch.equal(point, x)


def test_attack_does_not_do_worse_than_the_centre():
    spec = propdsl.load(DIGITS)
    model = digits_mlp()
    x, y = digits_batch(n=16)

    def margin(v):  # the signed violation max_{j != y} f_j - f_y
        f = model(v)
        return (f - f.gather(1, y[:, None])).masked_fill(~others(y), -math.inf).amax(1)

    attack = propdsl.PGD(steps=10, random_start=False)
    out = spec.loss("classification_robust", attack=attack)(model, x, y)
    centre = margin(x)
    found = margin(out.counterexample["x'"])
    assert bool((found >= centre).all())
    assert bool((found > centre).any())
    # Standard robustness has a zero input gradient at the centre (|f(x') - f(x)| at x' = x),
    # so the attack needs its random start there; its loss at the centre is 0.
    with torch.no_grad():
        delta = float((model(in_ball(x, 0.1)) - model(x)).abs().amax(1).median())
    gen = torch.Generator().manual_seed(0)
    sr = propdsl.load(DIGITS, params={"delta": delta}).loss(
        "standard_robust", attack=propdsl.PGD(steps=10), generator=gen
    )
    out = sr(model, x)
    change = (model(out.counterexample["x'"]) - model(x)).abs().amax(1)
    torch.testing.assert_close(out.loss, (change - delta).clamp_min(0))
    assert float(change.detach().min()) > delta  # the attack left the centre for every sample


LINEAR_SPEC = """
network g : Tensor[5] -> Tensor[1]
param c : Real = 0.3
param eps : Real = 0.2
property upper(x) = forall x' in ball(x, eps, inf): g(x')[0] <= c
property clipped(x) = forall x' in ball(x, eps, inf) & box(0, 1): g(x')[0] <= c
property lower(x) = exists x' in ball(x, eps, inf): g(x')[0] <= c
"""


@pytest.mark.parametrize("random_start", [True, False])
def test_attack_reaches_the_closed_form_worst_case_of_a_linear_network(random_start):
    torch.manual_seed(3)
    net = nn.Linear(5, 1).double()
    w, b = net.weight[0].detach(), float(net.bias.detach())
    x = torch.rand(6, 5, dtype=torch.float64)
    x[0, :2] = torch.tensor([0.05, 0.95])  # near the box's faces
    spec = propdsl.load(LINEAR_SPEC)
    attack = propdsl.PGD(steps=10, random_start=random_start)
    gen = torch.Generator().manual_seed(0)
    eps, c = 0.2, 0.3
    with torch.no_grad():
        # max of w.x' over the L-inf ball: x + eps sign(w)
        out = spec.loss("upper", attack=attack, generator=gen)(net, x)
        worst = x + eps * w.sign()
        torch.testing.assert_close(out.counterexample["x'"], worst, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.loss, (x @ w + b + eps * w.abs().sum() - c).relu())
        # with the box: each coordinate at the end of [max(x - eps, 0), min(x + eps, 1)]
        out = spec.loss("clipped", attack=attack, generator=gen)(net, x)
        worst = torch.where(w > 0, (x + eps).clamp(max=1), (x - eps).clamp(min=0))
        torch.testing.assert_close(out.counterexample["x'"], worst, rtol=0, atol=1e-12)
        torch.testing.assert_close(out.loss, (worst @ w + b - c).relu())
        # exists: the attack minimises, the best case is x - eps sign(w)
        out = spec.loss("lower", attack=attack, generator=gen)(net, x)
        best = x @ w + b - eps * w.abs().sum()
        torch.testing.assert_close(out.loss, (best - c).relu())
        assert torch.equal(out.satisfied, best <= c)


# -- objectives ----------------------------------------------------------------------------------
def objective_spec(loss: str, **params) -> propdsl.Spec:
    text = (
        "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
        "param eps : Real = 0.1\n"
        f'train f on digits(split = "train") {{\n  loss = {loss}\n}}\n'
    )
    return propdsl.load(text, params=params or None)


def test_objective_of_the_digits_spec_and_its_terms():
    spec = propdsl.load(DIGITS)
    model = digits_mlp()
    x, y = digits_batch()
    y = mixed_labels(model, x, y)
    objective = spec.objective(attack=CENTRE)
    value = objective(model, x, y)
    f = model(x)
    ce = F.cross_entropy(f, y)
    dl2 = hand_conj("dl2", f, f.gather(1, y[:, None]), strict=True, mask=others(y))
    torch.testing.assert_close(value, ce + 0.5 * dl2.mean())
    assert objective.last_terms == pytest.approx(
        {
            "cross_entropy(f(x), y)": ce.item(),
            "0.5 · loss[classification_robust]": (0.5 * dl2.mean()).item(),
        },
        rel=1e-9,
    )


def test_a_cross_entropy_loss_is_pytorch_s_fused_mean_without_the_interpreter(monkeypatch):
    """`loss = cross_entropy` (standard training) is `F.cross_entropy(f(x), y)` with its mean
    reduction, taken without building an environment; other losses over the cross-entropy keep
    the general path. Values and weight gradients match the hand-written loss."""
    model = digits_mlp()
    x, y = digits_batch()

    def value_and_grads(objective):
        model.zero_grad(set_to_none=True)
        value = objective(model, x, y)
        value.backward()
        return value.detach(), [p.grad.clone() for p in model.parameters()]

    objective = objective_spec("cross_entropy").objective(attack=CENTRE)
    assert objective._ce_net == "f"
    # the interpreter is not run: its code would raise
    monkeypatch.setattr(objective, "code", lambda env: (_ for _ in ()).throw(AssertionError))
    fast, fast_grads = value_and_grads(objective)
    hand, hand_grads = value_and_grads(lambda m, a, b: F.cross_entropy(m(a), b))
    assert torch.equal(fast, hand)
    for g, h in zip(fast_grads, hand_grads, strict=True):
        assert torch.equal(g, h)
    assert objective.last_term_values == {}
    monkeypatch.undo()
    # the general path (fast paths off) gives the same mean of the per-sample losses
    general = objective_spec("cross_entropy").objective(attack=CENTRE)
    general._ce_net = None
    slow, slow_grads = value_and_grads(general)
    torch.testing.assert_close(slow, hand, rtol=1e-6, atol=0.0)
    for g, h in zip(slow_grads, hand_grads, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-5, atol=1e-7)
    # a loss that scales it is not the cross-entropy alone: the general path, the same number
    scaled = objective_spec("2 * cross_entropy").objective(attack=CENTRE)
    assert scaled._ce_net is None
    torch.testing.assert_close(value_and_grads(scaled)[0], 2 * hand, rtol=1e-6, atol=0.0)


def test_adversarial_training_objective(inject):
    model = digits_mlp()
    x, y = digits_batch()
    clean = F.cross_entropy(model(x), y)
    adv = "max x' in ball(x, eps, inf) & box(0, 1): cross_entropy(f(x'), y)"
    attack = propdsl.PGD(steps=5, random_start=False)
    value = objective_spec(adv).objective(attack=attack)(model, x, y)
    assert value.item() > clean.item() + 1e-6
    at_zero = objective_spec(adv, eps=0.0).objective(attack=propdsl.PGD(steps=3))(model, x, y)
    torch.testing.assert_close(at_zero, clean, rtol=1e-12, atol=0)
    point = in_ball(x, 0.1)
    inject(point)
    value = objective_spec(adv).objective()(model, x, y)
    torch.testing.assert_close(value, F.cross_entropy(model(point), y))


def test_gradient_regulariser_is_double_backpropagation():
    model = digits_mlp()  # ReLU: the input gradient of the saliency is 0, the weights' is not
    x, y = digits_batch()
    objective = objective_spec("cross_entropy + 100 * mean(saliency(f, x, y) ^ 2)").objective()
    value = objective(model, x, y)
    value.backward()
    got = [p.grad.clone() for p in model.parameters()]

    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    g = hand_saliency(twin, x, y)
    hand = F.cross_entropy(twin(x), y) + 100 * (g**2).flatten(1).mean(1).mean()
    hand.backward()
    torch.testing.assert_close(value, hand)
    for a, p in zip(got, twin.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)

    reg = objective_spec("mean(saliency(f, x, y) ^ 2)").objective()
    model.zero_grad(set_to_none=True)
    reg(model, x, y).backward()
    first = model[1].weight.grad
    assert first is not None and float(first.abs().max()) > 0


def test_trades_objective(inject):
    model = digits_mlp()
    x, y = digits_batch()
    trades = (
        "cross_entropy + 6 * max x' in ball(x, eps, inf) & box(0, 1): "
        "kl(softmax(f(x)), softmax(f(x')))"
    )
    point = in_ball(x, 0.1)
    inject(point)
    objective = objective_spec(trades).objective()
    value = objective(model, x, y)
    p, q = model(x).softmax(1), model(point).softmax(1)
    kl = (p * (p.log() - q.log())).sum(1)
    ce = F.cross_entropy(model(x), y)
    torch.testing.assert_close(value, ce + 6 * kl.mean())
    assert set(objective.last_terms) == {
        "cross_entropy(f(x), y)",
        "6 · (max_{x' ∈ B∞(x, 0.1) ∩ [0, 1]} kl(softmax(f(x)), softmax(f(x'))))",
    }
    assert objective.last_terms["cross_entropy(f(x), y)"] == pytest.approx(ce.item(), rel=1e-9)


def test_objective_binds_a_property_s_own_parameter_names():
    spec = propdsl.load(
        "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
        "property r(img, label) =\n"
        "  forall x in ball(img, 0.1, inf) & box(0, 1): argmax(f(x)) == label\n"
        'train f on digits(split = "train") {\n  loss = cross_entropy + 2 * r\n}\n'
    )
    model = digits_mlp()
    x, y = digits_batch()
    value = spec.objective(attack=CENTRE)(model, x, y)
    f = model(x)
    dl2 = hand_conj("dl2", f, f.gather(1, y[:, None]), strict=True, mask=others(y))
    torch.testing.assert_close(value, F.cross_entropy(f, y) + 2 * dl2.mean())


# -- finite quantifiers, connectives ---------------------------------------------------------------
FINITE_SPEC = """
network f : Tensor[3] -> Tensor[4]
property all_below(x, y) = forall j in classes: f(x)[j] <= f(x)[y] + 0.5
property some_high(x) = exists j in range(4): f(x)[j] >= 0.3
property pairs(x) = forall i in range(4), j in range(4): f(x)[i] - f(x)[j] <= 1
property top(x) = (max j in range(4): f(x)[j]) <= 0.2
property band(x) = forall j in range(4): f(x)[j] <= 0.5 and -0.5 <= 2 * f(x)[j]
property bottom(x) = (min j in range(4): f(x)[j]) >= -0.2
property not_y(x, y) = argmax(f(x)) != y
property implication(x) = f(x)[0] >= f(x)[1] implies f(x)[2] <= f(x)[3]
property choice(x) = (if f(x)[0] >= 0 then f(x)[1] else f(x)[2]) <= 0.1
property lifted_choice(x, y) =
  forall j in classes: (if f(x)[0] >= 0 then f(x)[j] else f(x)[y]) <= 0.5
"""


@pytest.fixture
def small():
    torch.manual_seed(0)
    net = nn.Linear(3, 4).double()
    x = torch.randn(32, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (32,))
    return propdsl.load(FINITE_SPEC), net, x, y


def truth_le(a, b):
    den = a.abs() + b.abs()
    return torch.where(den > 0, 1 - (a - b).clamp_min(0) / torch.where(den > 0, den, 1.0), 1.0)


@pytest.mark.parametrize("logic", ["dl2", "godel", "goguen", "stl"])
def test_forall_over_classes_matches_a_python_loop(small, logic):
    spec, net, x, y = small
    out = spec.loss("all_below", logic=logic)(net, x, y)
    f = net(x)
    fy = f.gather(1, y[:, None])[:, 0]
    atoms = [(f[:, j], fy + 0.5) for j in range(4)]
    if logic == "dl2":
        expected = sum((a - b).clamp_min(0) for a, b in atoms)
    elif logic == "godel":
        expected = 1 - torch.stack([truth_le(a, b) for a, b in atoms]).amin(0)
    elif logic == "goguen":
        prod = torch.ones_like(fy)
        for a, b in atoms:
            prod = prod * truth_le(a, b)
        expected = 1 - prod
    else:
        rob = torch.stack([b - a for a, b in atoms])
        expected = (torch.logsumexp(-K_STL * rob, 0) / K_STL).clamp_min(0)
    torch.testing.assert_close(out.loss, expected)
    assert torch.equal(out.satisfied, torch.stack([a <= b for a, b in atoms]).all(0))


def test_exists_and_two_variable_forall_match_python_loops(small):
    spec, net, x, y = small
    f = net(x)
    out = spec.loss("some_high", logic="dl2")(net, x)
    prod = torch.ones(len(x), dtype=f.dtype)
    for j in range(4):
        prod = prod * (0.3 - f[:, j]).clamp_min(0)
    torch.testing.assert_close(out.loss, prod)
    assert torch.equal(out.satisfied, (f >= 0.3).any(1))
    godel = spec.loss("some_high", logic="godel")(net, x)
    best = torch.stack([truth_le(torch.full_like(f[:, j], 0.3), f[:, j]) for j in range(4)])
    torch.testing.assert_close(godel.loss, 1 - best.amax(0))

    out = spec.loss("pairs", logic="dl2")(net, x)
    total = sum((f[:, i] - f[:, j] - 1).clamp_min(0) for i in range(4) for j in range(4))
    torch.testing.assert_close(out.loss, total)
    assert torch.equal(out.satisfied, (f.amax(1) - f.amin(1)) <= 1)
    assert 0 < int(out.satisfied.sum()) < len(x)


@pytest.mark.parametrize("logic", ["dl2", "godel"])
def test_conjunctions_under_a_finite_quantifier_match_a_python_loop(small, logic):
    spec, net, x, _ = small
    f = net(x)
    out = spec.loss("band", logic=logic)(net, x)
    atoms = [(f[:, j], torch.full_like(f[:, j], 0.5)) for j in range(4)]
    atoms += [(torch.full_like(f[:, j], -0.5), 2 * f[:, j]) for j in range(4)]
    if logic == "dl2":
        expected = sum((a - b).clamp_min(0) for a, b in atoms)
    else:
        expected = 1 - torch.stack([truth_le(a, b) for a, b in atoms]).amin(0)
    torch.testing.assert_close(out.loss, expected)
    assert torch.equal(out.satisfied, torch.stack([a <= b for a, b in atoms]).all(0))
    assert 0 < int(out.satisfied.sum()) < len(x)


def test_max_and_min_over_a_range(small):
    spec, net, x, _ = small
    f = net(x)
    top = spec.loss("top", logic="dl2")(net, x)
    torch.testing.assert_close(top.loss, (f.amax(1) - 0.2).clamp_min(0))
    bottom = spec.loss("bottom", logic="dl2")(net, x)
    torch.testing.assert_close(bottom.loss, (-0.2 - f.amin(1)).clamp_min(0))
    assert torch.equal(bottom.satisfied, f.amin(1) >= -0.2)


def test_argmax_not_equal(small):
    spec, net, x, y = small
    f = net(x)
    y = y.clone()
    y[::2] = f.argmax(1)[::2]
    out = spec.loss("not_y", logic="dl2")(net, x, y)
    fy = f.gather(1, y[:, None])
    # exists j != y: f_j >= f_y; DL2's `or` is the product of the atoms' losses
    expected = torch.where(others(y, 4), (fy - f).clamp_min(0), 1.0).prod(1)
    torch.testing.assert_close(out.loss, expected)
    assert torch.equal(out.satisfied, f.argmax(1) != y)
    assert torch.equal(out.loss == 0, out.satisfied)


def test_implication_rewritten_for_dl2_and_native_for_reichenbach(small):
    spec, net, x, _ = small
    f = net(x)
    f0, f1, f2, f3 = f.unbind(1)
    holds = (f0 < f1) | (f2 <= f3)
    dl2 = spec.loss("implication", logic="dl2")(net, x)
    # not (f0 >= f1) or f2 <= f3  ->  (f0 < f1) or (f2 <= f3); or = product
    expected = ((f0 - f1).clamp_min(0) + (f0 == f1).to(f.dtype)) * (f2 - f3).clamp_min(0)
    torch.testing.assert_close(dl2.loss, expected)
    assert torch.equal(dl2.satisfied, holds)
    assert torch.equal(dl2.loss == 0, holds)
    reich = spec.loss("implication", logic="reichenbach")(net, x)
    a, b = truth_le(f1, f0), truth_le(f2, f3)
    torch.testing.assert_close(reich.loss, 1 - (1 - a + a * b))
    assert torch.equal(reich.satisfied, holds)
    assert 0 < int(holds.sum()) < len(x)


def test_if_then_else(small):
    spec, net, x, y = small
    f = net(x)
    out = spec.loss("choice", logic="dl2")(net, x)
    chosen = torch.where(f[:, 0] >= 0, f[:, 1], f[:, 2])
    torch.testing.assert_close(out.loss, (chosen - 0.1).clamp_min(0))
    assert torch.equal(out.satisfied, chosen <= 0.1)
    # the condition does not depend on j: it is computed once, still under exact semantics
    out = spec.loss("lifted_choice", logic="dl2")(net, x, y)
    fy = f.gather(1, y[:, None])
    chosen = torch.where(f[:, :1] >= 0, f, fy)
    torch.testing.assert_close(out.loss, (chosen - 0.5).clamp_min(0).sum(1))
    assert torch.equal(out.satisfied, (chosen <= 0.5).all(1))


def test_mixed_binders_report_truth_at_the_loss_points():
    spec = propdsl.load(
        "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
        "property p(x, y) = forall j in classes, x' in ball(x, 0.1, inf):\n"
        "  f(x')[j] <= f(x')[y] + 0.5\n"
    )
    model = digits_mlp()
    x, y = digits_batch(n=32)
    gen = torch.Generator().manual_seed(0)
    out = spec.loss("p", logic="dl2", attack=propdsl.PGD(steps=1), generator=gen)(model, x, y)
    # one attack point per sample and class j, in the order (sample, j)
    points = out.counterexample["x'"].reshape(32, 10, 1, 8, 8)
    f = model(points.flatten(0, 1)).reshape(32, 10, 10)
    own = f.gather(2, y[:, None, None].expand(32, 10, 1))[..., 0]  # f(x'_{b,j})[y_b]
    at_j = f.diagonal(dim1=1, dim2=2)  # f(x'_{b,j})[j]
    torch.testing.assert_close(out.loss, (at_j - own - 0.5).clamp_min(0).sum(1))
    assert torch.equal(out.satisfied, (at_j <= own + 0.5).all(1))
    assert torch.equal(out.loss == 0, out.satisfied)
    assert 0 < int(out.satisfied.sum()) < len(y)


def test_counterexamples_of_two_quantifiers():
    spec = propdsl.load(
        "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
        "property two(x) = (forall a in ball(x, 0.1, inf): f(a)[0] <= 5)\n"
        "  and (forall b in ball(x, 0.3, inf): f(b)[1] <= 5)\n"
    )
    model = digits_mlp()
    x, _ = digits_batch()
    out = spec.loss("two", attack=propdsl.PGD(steps=2))(model, x)
    assert set(out.counterexample) == {"a", "b"}
    assert float((out.counterexample["a"] - x).abs().max()) <= 0.1 + 1e-12
    assert float((out.counterexample["b"] - x).abs().max()) > 0.1


# -- dtypes, gradients, modes --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(dtype):
    spec = propdsl.load(DIGITS)
    model = digits_mlp(dtype)
    x, y = digits_batch(dtype)
    y = mixed_labels(model, x, y)
    out = spec.loss("classification_robust", logic="godel", attack=CENTRE)(model, x, y)
    assert out.loss.dtype == dtype and out.counterexample["x'"].dtype == dtype
    f = model(x)
    expected = hand_conj("godel", f, f.gather(1, y[:, None]), strict=True, mask=others(y))
    torch.testing.assert_close(out.loss, expected)  # default tolerances of the dtype
    assert torch.equal(out.satisfied, f.argmax(1) == y)


def test_parameter_gradients_come_only_from_the_final_loss():
    spec = propdsl.load(DIGITS)
    model = digits_mlp()
    x, y = digits_batch()
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(0)
    out = spec.loss("classification_robust", attack=propdsl.PGD(steps=5), generator=gen)(
        model, x, y
    )
    assert all(p.grad is None for p in model.parameters())
    out.loss.sum().backward()

    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    f = twin(out.counterexample["x'"])
    hand_conj("dl2", f, f.gather(1, y[:, None]), strict=True, mask=others(y)).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_training_flags_are_restored():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 10)
    ).double()
    model.train()
    model[3].eval()  # mixed flags must come back as they were
    flags = [m.training for m in model.modules()]
    x, y = digits_batch()
    spec = propdsl.load(DIGITS)
    spec.loss("classification_robust", attack=propdsl.PGD(steps=2))(model, x, y)
    assert [m.training for m in model.modules()] == flags
    model.eval()
    spec.objective(attack=propdsl.PGD(steps=2))(model, x, y)
    assert not any(m.training for m in model.modules())


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_property_lists_the_known_ones():
    spec = propdsl.load(DIGITS)
    with pytest.raises(propdsl.UsageError) as info:
        spec.loss("classification_robustt")
    message = str(info.value)
    assert "classification_robustt" in message
    for name in ("classification_robust", "standard_robust", "lipschitz_robust"):
        assert name in message


def test_unknown_logic_and_attack():
    spec = propdsl.load(DIGITS)
    with pytest.raises(LogicError) as info:
        spec.loss("classification_robust", logic="dl3")
    assert isinstance(info.value, propdsl.UsageError)
    assert "dl2" in str(info.value) and "godel" in str(info.value)
    with pytest.raises(propdsl.UsageError, match="known attacks: pgd, apgd"):
        spec.loss("classification_robust", attack="fgsm")


def test_missing_labels_is_a_usage_error():
    spec = propdsl.load(DIGITS)
    x, _ = digits_batch()
    with pytest.raises(propdsl.UsageError, match="needs labels"):
        spec.loss("classification_robust")(digits_mlp(), x)


# -- devices and the example ----------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_on_cuda():
    spec = propdsl.load(DIGITS)
    model = digits_mlp(torch.float32).cuda()
    x, y = digits_batch(torch.float32)
    x, y = x.cuda(), y.cuda()
    out = spec.loss("classification_robust", attack=propdsl.PGD(steps=3))(model, x, y)
    assert out.loss.device.type == "cuda" and out.satisfied.device.type == "cuda"
    out.loss.mean().backward()
    cpu = spec.loss("classification_robust", attack=CENTRE)(model.cpu(), x.cpu(), y.cpu())
    gpu = spec.loss("classification_robust", attack=CENTRE)(model.cuda(), x, y)
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # about 8-12 s: a few epochs of training on digits
def test_example_runs():
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "library_api.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "before ->" in done.stdout and "satisfied at attack points" in done.stdout


def test_a_scalar_variable_over_a_box_is_attacked_within_it():
    # `t : Real` is one number per sample ([B]): the attack's region code once assumed [B, ...]
    # and crashed (exit 70). The worst t of `t * (w . x) <= 1` over [0, 1] is 1 where w . x > 0
    # and 0 elsewhere; the property holds exactly where w . x <= 1.
    spec = propdsl.load(
        "network f : Tensor[2] -> Tensor[1]\n"
        "property p(x) = forall t : Real in box(0, 1): f(t * x)[0] <= 1\n"
    )
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    x = torch.tensor([[0.2, 0.1], [1.0, 1.0], [-1.0, 0.0], [0.5, 0.5]])
    out = spec.loss("p", logic="dl2", attack=propdsl.PGD(steps=20))(model, x)
    wx = x @ torch.tensor([1.0, 2.0])
    t = out.counterexample["t"]
    assert t.shape == (4,) and bool(((t >= 0) & (t <= 1)).all())
    assert torch.allclose(t, (wx > 0).float(), atol=1e-6)
    assert out.satisfied.tolist() == (wx <= 1).tolist()
