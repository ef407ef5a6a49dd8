"""Certified training (propdsl.loss.certified): `certified(p, method = ibp | crown_ibp)`.

On a linear network the bounds are exact, so the loss has a closed form computed here by hand:
the worst case of each margin over the (clipped) box, then `log(1 + sum exp(-m))`. Then: the
training eps ramp-up scales the radius, gradients reach the weights, and a few epochs of
certified training make many more digits provable than standard training does.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import propdsl
from propdsl.data import load_dataset
from propdsl.loss.compile import CompileError
from propdsl.models import build_model

SPEC = """
network f : Tensor[2] -> Tensor[3]
param eps : Real = 0.1
param c : Real = 0.0

property robust(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1): argmax(f(x')) == y

property either(x) =
  forall x' in ball(x, eps, inf) & box(0, 1): f(x')[0] >= c or f(x')[1] >= c

property stable(x) =
  forall x' in ball(x, eps, inf) & box(0, 1): norm(f(x') - f(x), inf) <= 1

property lipschitz(x) =
  forall x1 in ball(x, eps, inf), x2 in ball(x, eps, inf):
    norm(f(x1) - f(x2), 2) <= 10 * norm(x1 - x2, 2)

train f on tensors(path = "unused.npz") {
  loss = LOSS
}
"""

W = [[2.0, -1.0], [0.0, 1.0], [-1.0, 0.0]]
BIAS = [0.0, 0.5, 0.2]


def objective(loss: str, **params):
    return propdsl.load(SPEC.replace("LOSS", loss), params).objective()


def linear_net() -> nn.Module:
    net = nn.Linear(2, 3).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(W, dtype=torch.float64))
        net.bias.copy_(torch.tensor(BIAS, dtype=torch.float64))
    return net


def worst(c: list[float], x: tuple[float, float], eps: float) -> float:
    """min of c . (W x' + b) over the box [x - eps, x + eps] & [0, 1]^2 (by hand)."""
    lo = [max(v - eps, 0.0) for v in x]
    hi = [min(v + eps, 1.0) for v in x]
    cw = [sum(c[k] * W[k][i] for k in range(3)) for i in range(2)]
    value = sum(c[k] * BIAS[k] for k in range(3))
    return value + sum(min(cw[i] * lo[i], cw[i] * hi[i]) for i in range(2))


def hand_robust(x: tuple[float, float], label: int, eps: float) -> float:
    """IBP training's loss: cross-entropy of the worst-case logits (z_y = 0, z_j = -m_j)."""
    margins = [
        worst([float(k == label) - float(k == j) for k in range(3)], x, eps)
        for j in range(3)
        if j != label
    ]
    return math.log(1 + sum(math.exp(-m) for m in margins))


# float() of a loss that requires grad
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

POINTS = [((0.6, 0.2), 0), ((0.05, 0.9), 1), ((0.3, 0.5), 2), ((0.95, 0.02), 0)]


@pytest.mark.parametrize("method", ["ibp", "crown_ibp"])
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.2])
def test_loss_is_the_cross_entropy_of_the_worst_case_margins(method, eps):
    net = linear_net()
    obj = objective(f"certified(robust, method = {method})", eps=eps)
    for x, label in POINTS:
        got = obj(net, torch.tensor([x], dtype=torch.float64), torch.tensor([label]))
        assert float(got) == pytest.approx(hand_robust(x, label, eps), rel=1e-9, abs=1e-12)


def test_loss_is_per_sample_and_averaged():
    net = linear_net()
    obj = objective("cross_entropy + 2 * certified(robust)", eps=0.1)
    x = torch.tensor([p for p, _ in POINTS], dtype=torch.float64)
    y = torch.tensor([label for _, label in POINTS])
    ce = torch.nn.functional.cross_entropy(net(x), y)
    hand = sum(hand_robust(p, label, 0.1) for p, label in POINTS) / len(POINTS)
    assert float(obj(net, x, y)) == pytest.approx(float(ce) + 2 * hand, rel=1e-9)
    assert len(obj.last_terms) == 2  # both terms are logged


def test_the_ramp_scales_the_radius():
    net = linear_net()
    obj = objective("certified(robust)", eps=0.2)
    x, label = POINTS[0]
    xt, yt = torch.tensor([x], dtype=torch.float64), torch.tensor([label])
    for scale in (0.0, 0.25, 1.0):
        obj.radius_scale = scale
        assert float(obj(net, xt, yt)) == pytest.approx(hand_robust(x, label, 0.2 * scale))


def test_any_is_a_smooth_minimum_of_the_violations():
    """`a or b`: softplus(-logsumexp(m_a, m_b)), with m the worst-case margins."""
    net = linear_net()
    obj = objective("certified(either)", eps=0.1, c=0.4)
    for x, _ in POINTS:
        m0 = worst([1.0, 0.0, 0.0], x, 0.1) - 0.4
        m1 = worst([0.0, 1.0, 0.0], x, 0.1) - 0.4
        hand = math.log(1 + math.exp(-math.log(math.exp(m0) + math.exp(m1))))
        got = obj(net, torch.tensor([x], dtype=torch.float64), torch.tensor([0]))
        assert float(got) == pytest.approx(hand, rel=1e-9)


def test_constants_at_the_data_point_keep_their_gradient():
    """Standard robustness: rows f(x')[k] - f(x)[k] <= 1 read the network at x too."""
    net = linear_net()
    obj = objective("certified(stable)", eps=0.1)
    x, _ = POINTS[1]
    xt = torch.tensor([x], dtype=torch.float64)
    with torch.no_grad():
        centre = net(xt)[0].tolist()
    margins = []
    for k in range(3):
        e = [float(i == k) for i in range(3)]
        margins.append(worst([-v for v in e], x, 0.1) + centre[k] + 1)  # 1 - (f_k - f_k(x))
        margins.append(worst(e, x, 0.1) - centre[k] + 1)  # 1 + (f_k - f_k(x))
    hand = math.log(1 + sum(math.exp(-m) for m in margins))
    loss = obj(net, xt, torch.tensor([0]))
    assert float(loss) == pytest.approx(hand, rel=1e-9)
    loss.backward()
    assert net.weight.grad is not None and bool(torch.isfinite(net.weight.grad).all())


@pytest.mark.parametrize("method", ["ibp", "crown_ibp"])
def test_gradients_reach_every_weight(method):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    obj = objective(f"certified(robust, method = {method})", eps=0.1)
    x = torch.rand(16, 2)
    y = torch.randint(0, 3, (16,))
    loss = obj(net, x, y)
    assert loss.requires_grad and bool(torch.isfinite(loss))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
        assert float(p.grad.abs().sum()) > 0, name
    # a step against the gradient lowers the loss
    with torch.no_grad():
        for p in net.parameters():
            p -= 1e-3 * p.grad
    assert float(obj(net, x, y)) < float(loss)


def test_crown_ibp_is_never_looser_than_ibp():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.rand(32, 2)
    y = torch.randint(0, 3, (32,))
    ibp = objective("certified(robust)", eps=0.1)(net, x, y)
    mixed = objective("certified(robust, method = crown_ibp)", eps=0.1)(net, x, y)
    assert float(mixed) <= float(ibp) + 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["ibp", "crown_ibp"])
def test_the_loss_on_cuda_matches_the_cpu(method):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.rand(8, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    obj = objective(f"certified(robust, method = {method}) + certified(stable)", eps=0.1)
    cpu = obj(net, x, y)
    gpu_net = net.cuda()
    gpu = obj(gpu_net, x.cuda(), y.cuda())
    gpu.backward()
    assert float(gpu) == pytest.approx(float(cpu), rel=1e-9)
    assert all(p.grad is not None and p.grad.is_cuda for p in gpu_net.parameters())


def test_properties_outside_the_linear_fragment_are_refused():
    net = linear_net()
    obj = objective("certified(lipschitz)")
    with pytest.raises(CompileError, match=r"certified\(lipschitz\) \(line 16, column 3\)"):
        obj(net, torch.rand(2, 2, dtype=torch.float64), torch.tensor([0, 1]))


def test_the_certified_spec_checks_and_compiles():
    spec = propdsl.load("specs/certified.prop")
    block = spec.train_block
    assert block is not None and int(block.get("ramp")) > 0
    model = build_model("mlp", (1, 8, 8), 10, seed=0, hidden=[16])
    ds = load_dataset("digits", split="train", limit=8, seed=0)
    loss = spec.objective()(model, ds.x, ds.y)
    loss.backward()
    assert bool(torch.isfinite(loss))


def _train(spec, loss: str, x, y, *, epochs: int, ramp: int, seed: int = 0) -> nn.Module:
    """A plain loop over spec.objective() (the trainer's run folder is not needed here)."""
    line = "loss      = cross_entropy + certified(classification_robust, method = ibp)"
    assert line in spec.source.text
    spec = propdsl.load(spec.source.text.replace(line, f"loss      = {loss}"), spec.overrides)
    torch.manual_seed(seed)
    model = build_model("mlp", (1, 8, 8), 10, seed=seed, hidden=[64])
    obj = spec.objective()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(1, epochs + 1):
        obj.radius_scale = min(1.0, epoch / ramp)
        order = torch.randperm(x.shape[0])
        for i in range(0, x.shape[0], 64):
            idx = order[i : i + 64]
            loss_value = obj(model, x[idx], y[idx])
            opt.zero_grad()
            loss_value.backward()
            opt.step()
    return model.eval()


@pytest.mark.slow
def test_certified_training_makes_digits_provable():
    """Same data, model, optimiser and epochs; only the loss differs.

    At eps = 0.05 (the spec's radius) a digit classifier trained on the clean cross-entropy is
    already provable on most correctly classified test images (the pixel box clips much of the
    ball): certified training closes most of the remaining gap to the accuracy. At twice the
    radius the difference is large.
    """
    spec = propdsl.load("specs/certified.prop")
    assert spec.params["eps"] == 0.05
    wide = spec.with_params(eps=0.1)
    train = load_dataset("digits", split="train", limit=600, seed=0)
    test = load_dataset("digits", split="test", limit=100, seed=0)
    falsifier = propdsl.APGD(steps=20)
    accuracy, rate, rate_wide = {}, {}, {}
    for name, loss in (
        ("standard", "cross_entropy"),
        ("ibp", "cross_entropy + certified(classification_robust, method = ibp)"),
        ("crown_ibp", "cross_entropy + certified(classification_robust, method = crown_ibp)"),
    ):
        model = _train(spec, loss, train.x, train.y, epochs=20, ramp=10)
        with torch.no_grad():
            accuracy[name] = float((model(test.x).argmax(1) == test.y).float().mean())
        for s, out in ((spec, rate), (wide, rate_wide)):
            v = s.verify(
                model, test.x, test.y, ["classification_robust"], falsifier=falsifier
            )  # CROWN, the verify block's method
            out[name] = v["classification_robust"].rate("verified")
    for name in ("ibp", "crown_ibp"):
        assert accuracy[name] >= accuracy["standard"] - 0.05, accuracy
        assert rate[name] >= rate["standard"] + 0.05, (rate, accuracy)
        # correctly classified but not proved: at most half as many as after standard training
        assert accuracy[name] - rate[name] <= 0.5 * (accuracy["standard"] - rate["standard"])
        assert rate_wide[name] >= rate_wide["standard"] + 0.2, rate_wide
