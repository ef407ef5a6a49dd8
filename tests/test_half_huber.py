"""The half-Huber ReLU of Woods et al. (2019): the zoo's activation (propdsl.models) and its
bound and derivative rule (propdsl.verify.layers.HalfHuberRule).

The function is checked against its piecewise definition by hand; the rule's lines, IBP range
and derivative range by sampling random boxes (hypothesis) against the function and autograd;
whole-network CROWN / alpha-CROWN / Jacobian bounds against dense sampling; and `verify` on a
tiny half-Huber model against the exact truth of a 1-D network.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import propdsl
from propdsl.models import HalfHuberReLU, ModelError, build_model, make_activation
from propdsl.verify import ActivationRule, AlphaOptions, bounds
from propdsl.verify.graph import build_graph
from propdsl.verify.jacobian import jacobian_bounds
from propdsl.verify.layers import HalfHuberRule, derivative_range

F64 = torch.float64
SLACK = 1e-9


def _by_hand(x: float, delta: float) -> float:
    if x <= 0:
        return 0.0
    if x <= delta:
        return x * x / (2 * delta)
    return x - delta / 2


@pytest.mark.parametrize("delta", [0.5, 0.1, 2.0])
def test_the_function_and_its_derivative_are_the_papers(delta):
    xs = [-3.0, -1e-3, 0.0, 1e-3, delta / 3, delta, delta + 1e-3, 5.0]
    f = HalfHuberReLU(delta=delta)
    x = torch.tensor(xs, dtype=F64, requires_grad=True)
    out = f(x)
    assert out.tolist() == pytest.approx([_by_hand(v, delta) for v in xs], abs=1e-15)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.tolist() == pytest.approx([min(max(v, 0.0), delta) / delta for v in xs], abs=1e-15)


def test_the_zoo_builds_it_and_rejects_bad_deltas():
    assert make_activation("half_huber").delta == 0.5
    assert make_activation(("half_huber", {"delta": 0.25})).delta == 0.25
    net = build_model("mlp", (4,), 3, hidden=[5], activation=("half_huber", {"delta": 0.2}))
    assert [m.delta for m in net.modules() if isinstance(m, HalfHuberReLU)] == [0.2]
    for bad in (0.0, -1.0):
        with pytest.raises(ModelError, match="delta must be positive"):
            make_activation(("half_huber", {"delta": bad}))
    with pytest.raises(ModelError, match="takes delta"):
        make_activation(("half_huber", {"beta": 1.0}))


def test_a_spec_names_it_and_the_model_gets_it():
    spec = propdsl.load(
        "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
        "train f on digits {\n"
        "  model = mlp(hidden = [5], activation = half_huber(delta = 0.25))\n}\n"
    )
    written = spec.train_block.get("model").kw()["activation"]
    assert (written.name, written.kw()) == ("half_huber", {"delta": 0.25})
    net = build_model(
        "mlp", (1, 8, 8), 10, hidden=[5], activation=(written.name, dict(written.kwargs))
    )
    assert [m.delta for m in net.modules() if isinstance(m, HalfHuberReLU)] == [0.25]
    with pytest.raises(propdsl.CheckError):
        propdsl.load(
            "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
            "train f on digits {\n  model = mlp(activation = half_huber(delta = -1))\n}\n"
        )


def _rule(delta: float, n: int) -> HalfHuberRule:
    graph = build_graph(nn.Sequential(HalfHuberReLU(delta)), torch.zeros(1, n, dtype=F64))
    (node,) = [node for node in graph.nodes if isinstance(node.rule, ActivationRule)]
    assert isinstance(node.rule, HalfHuberRule)
    return node.rule


BOXES = st.lists(
    st.tuples(st.floats(-3, 3), st.floats(0, 4)), min_size=1, max_size=12
)  # (lower, width) per neuron; width 0 is a point


@settings(max_examples=60, deadline=None)
@given(boxes=BOXES, delta=st.sampled_from([0.5, 0.05, 1.5]), seed=st.integers(0, 2**16))
def test_the_relaxation_ibp_and_derivative_range_are_sound_on_random_boxes(boxes, delta, seed):
    lower = torch.tensor([[lo for lo, _ in boxes]], dtype=F64)
    upper = lower + torch.tensor([[w for _, w in boxes]], dtype=F64)
    rule = _rule(delta, lower.shape[1])
    t = torch.linspace(0, 1, 201, dtype=F64).reshape(-1, 1)
    x = (lower + t * (upper - lower)).requires_grad_(True)  # [201, n], ends included
    fx = HalfHuberReLU(delta)(x)
    (gx,) = torch.autograd.grad(fx.sum(), x)
    fx = fx.detach()
    x = x.detach()
    # CROWN's lines, and alpha-CROWN's for random slopes in the rule's range
    gen = torch.Generator().manual_seed(seed)
    lo_a, hi_a = rule.alpha_range(lower, upper)
    alphas = [
        None,
        *(
            lo_a + torch.rand(lo_a.shape, generator=gen, dtype=F64) * (hi_a - lo_a)
            for _ in range(3)
        ),
        lo_a,
        hi_a,
    ]
    for alpha in alphas:
        r = rule.relax(lower, upper, alpha)
        assert bool((r.lower_slope * x + r.lower_bias <= fx + SLACK).all())
        assert bool((fx <= r.upper_slope * x + r.upper_bias + SLACK).all())
    f_lo, f_hi = rule.ibp((lower, upper))
    assert bool(((f_lo <= fx + SLACK) & (fx <= f_hi + SLACK)).all())
    assert torch.allclose(f_lo, fx.min(0).values) and torch.allclose(f_hi, fx.max(0).values)
    d_lo, d_hi = derivative_range(rule, lower, upper)
    assert bool(((d_lo <= gx + SLACK) & (gx <= d_hi + SLACK)).all())
    assert torch.allclose(d_lo, gx.min(0).values) and torch.allclose(d_hi, gx.max(0).values)


def test_the_upper_line_is_the_chord_and_the_crown_lower_line_a_tangent():
    rule = _rule(0.5, 1)
    lower, upper = torch.tensor([[-1.0]], dtype=F64), torch.tensor([[1.0]], dtype=F64)
    r = rule.relax(lower, upper)
    # chord through (-1, 0) and (1, 0.75): slope 0.375, offset 0.375
    assert r.upper_slope.item() == pytest.approx(0.375)
    assert r.upper_bias.item() == pytest.approx(0.375)
    # tangent at the midpoint 0: slope 0, offset 0
    assert r.lower_slope.item() == pytest.approx(0.0)
    assert r.lower_bias.item() == pytest.approx(0.0)
    # tangent at x = 0.25 (alpha = f'(0.25) = 0.5): f(0.25) = 0.0625, line 0.5 x - 0.0625
    r = rule.relax(lower, upper, torch.tensor([[[0.5]]], dtype=F64))
    assert r.lower_bias.item() == pytest.approx(-0.0625)


def _net() -> nn.Module:
    torch.manual_seed(0)
    act = HalfHuberReLU(0.5)
    return nn.Sequential(nn.Linear(3, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 2)).double()


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha_crown"])
def test_network_bounds_contain_sampled_outputs_and_crown_is_tighter(method):
    net = _net()
    x = torch.rand(4, 3, dtype=F64)
    eps = 0.3
    lb, ub = bounds(
        net, x - eps, x + eps, method=method, options=AlphaOptions(iterations=5, lr=0.1)
    )
    pts = x.unsqueeze(1) + eps * (2 * torch.rand(4, 4000, 3, dtype=F64) - 1)
    corners = torch.tensor([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
    pts = torch.cat([pts, x.unsqueeze(1) + eps * corners.to(F64)], dim=1)
    with torch.no_grad():
        out = net(pts.reshape(-1, 3)).reshape(4, -1, 2)
    assert bool((lb.unsqueeze(1) <= out + 1e-9).all() and (out <= ub.unsqueeze(1) + 1e-9).all())
    if method != "ibp":
        li, ui = bounds(net, x - eps, x + eps, method="ibp")
        assert float((ub - lb).detach().sum()) < float((ui - li).detach().sum())


def test_jacobian_bounds_contain_sampled_jacobians():
    net = _net()
    x = torch.rand(2, 3, dtype=F64)
    eps = 0.2
    lo, hi = jacobian_bounds(net, x - eps, x + eps, method="crown")
    pts = (x.unsqueeze(1) + eps * (2 * torch.rand(2, 300, 3, dtype=F64) - 1)).reshape(-1, 3)
    jac = torch.stack(
        [torch.autograd.functional.jacobian(net, p.unsqueeze(0))[0, :, 0] for p in pts]
    )
    jac = jac.reshape(2, 300, *jac.shape[1:])
    assert bool((lo.unsqueeze(1) <= jac + 1e-9).all() and (jac <= hi.unsqueeze(1) + 1e-9).all())


def test_verify_decides_a_tiny_half_huber_model_exactly_where_it_can():
    # f(x) = (h(x) - 0.1, 0.1 - h(x)) with h the half-Huber ReLU: class 0 iff h(x) > 0.1, i.e.
    # x > sqrt(0.1) (= 0.316, on the quadratic piece for delta 0.5). A ball of radius eps
    # around x keeps class 0 iff x - eps > sqrt(0.1).
    net = nn.Sequential(nn.Linear(1, 1), HalfHuberReLU(0.5), nn.Linear(1, 2))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
        net[2].bias.copy_(torch.tensor([-0.1, 0.1]))
    spec = propdsl.load(
        "network f : Tensor[1] -> Tensor[2]\nparam eps : Real = 0.05\n"
        "property cr(x, y) = forall x' in ball(x, eps, inf): "
        "argmax(f(x')) == y\n",
        {"eps": 0.05},
    )
    x = torch.tensor([[0.9], [0.4], [0.36], [0.33]])
    y = torch.zeros(4, dtype=torch.long)
    out = spec.verify(net, x, y, ["cr"], method="crown")["cr"]
    threshold = math.sqrt(0.1)
    # 0.9, 0.4: x - eps > sqrt(0.1), verified; 0.36, 0.33: x - eps < sqrt(0.1), falsified
    expected = ["verified" if v - 0.05 > threshold else "falsified" for v in x.flatten().tolist()]
    assert expected == ["verified", "verified", "falsified", "falsified"]
    assert list(out.status) == expected
