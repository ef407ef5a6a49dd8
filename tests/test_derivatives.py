"""Derivatives beside bound rules (propdsl.verify.layers): each activation's `derivative_range`
against autograd, the registry's precedence over a rule's own method, and each affine rule's
fast `abs_backward` / `forward_linear` against the generic ones built from its matrix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from propdsl.verify import ActivationRule, AffineRule, register_rule
from propdsl.verify.graph import build_graph
from propdsl.verify.jacobian import DERIVATIVES, jacobian_bounds, register_derivative
from propdsl.verify.layers import REGISTRY, ReLURule, derivative_range

F64 = torch.float64

ACTIVATIONS = {
    "relu": nn.ReLU(),
    "leaky": nn.LeakyReLU(0.1),
    "leaky_steep": nn.LeakyReLU(3.0),
    "tanh": nn.Tanh(),
    "sigmoid": nn.Sigmoid(),
    "softplus": nn.Softplus(beta=2.0, threshold=1.0),
}


def _rule(module: nn.Module, n: int = 64):
    graph = build_graph(nn.Sequential(module), torch.zeros(2, n, dtype=F64))
    (node,) = [node for node in graph.nodes if isinstance(node.rule, ActivationRule)]
    return node.rule


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_derivative_ranges_hold_autograds_derivative(name):
    """On random intervals (some with an end at 0 or at the softplus switch), f' computed by
    autograd at the ends and at interior points lies in the rule's range."""
    module = ACTIVATIONS[name]
    rule = _rule(module)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(1, 64, generator=gen, dtype=F64) * 3
    b = torch.randn(1, 64, generator=gen, dtype=F64) * 3
    lower, upper = torch.minimum(a, b), torch.maximum(a, b)
    lower[0, :4], upper[0, :4] = 0.0, upper[0, :4].abs()  # kinks at an end
    lower[0, 4:8], upper[0, 4:8] = -lower[0, 4:8].abs(), 0.0
    lower[0, 8:12], upper[0, 8:12] = 0.4, 0.6  # softplus(beta 2, threshold 1) switches at 0.5
    d_lo, d_hi = derivative_range(rule, lower, upper)
    for t in torch.linspace(0, 1, 41, dtype=F64):
        x = (lower + t * (upper - lower)).requires_grad_(True)
        (g,) = torch.autograd.grad(module(x).sum(), x)
        assert bool(((d_lo <= g + 1e-12) & (g <= d_hi + 1e-12)).all()), (name, float(t))


def test_a_registered_derivative_takes_precedence_over_the_inherited_method():
    """register_derivative for a subclass of a built-in rule wins over the method it inherits
    (as the registry did when every built-in range was registered there)."""

    class Shifted(nn.ReLU):
        def forward(self, x):
            return torch.relu(x)

    @register_rule(Shifted)
    class ShiftedRule(ReLURule):
        pass

    net = nn.Sequential(nn.Linear(2, 3), Shifted(), nn.Linear(3, 1)).double()
    x = torch.rand(4, 2, dtype=F64)
    try:
        inherited = jacobian_bounds(net, x - 0.5, x + 0.5, method="ibp")
        plain = nn.Sequential(net[0], nn.ReLU(), net[2])  # the same network with nn.ReLU
        expected = jacobian_bounds(plain, x - 0.5, x + 0.5, method="ibp")
        assert all(torch.equal(g, w) for g, w in zip(inherited, expected, strict=True))

        @register_derivative(ShiftedRule)
        def everything(rule, lower, upper):  # a wider range than ReLU's
            return torch.full_like(lower, -1.0), torch.full_like(upper, 2.0)

        lo, hi = jacobian_bounds(net, x - 0.5, x + 0.5, method="ibp")
        assert float((hi - lo).sum().detach()) > float((inherited[1] - inherited[0]).sum().detach())
    finally:
        REGISTRY.pop(Shifted, None)
        DERIVATIVES.pop(ShiftedRule, None)


class _Layers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, v):
        h = self.fc(v.flatten(1)).reshape(-1, 1, 4, 4)
        h = self.bn(self.conv(h)) * 0.5 - 1.0
        h = F.avg_pool2d(h, 2) + F.adaptive_avg_pool2d(h, 2)
        return torch.flatten(h, 1)


def test_fast_affine_maps_equal_the_generic_ones():
    """Every overriding `abs_backward` / `forward_linear` (Linear, Conv2d, element-wise,
    reshapes, pooling) against `AffineRule`'s generic versions, which materialise the matrix
    from `backward`: the same values."""
    torch.manual_seed(0)
    net = _Layers().double().eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    graph = build_graph(net, torch.rand(2, 1, 4, 4, dtype=F64))
    checked = set()
    for node in graph.nodes[1:]:
        rule = node.rule
        assert isinstance(rule, AffineRule)
        R = torch.rand(3, 5, *rule.call.out_shape, dtype=F64)
        fast, generic = rule.abs_backward(R), AffineRule.abs_backward(rule, R)
        for f, g in zip(fast, generic, strict=True):
            torch.testing.assert_close(f, g)
        for k, shape in enumerate(rule.call.in_shapes):
            G = torch.randn(3, 5, *shape, dtype=F64)
            torch.testing.assert_close(
                rule.forward_linear(k, G), AffineRule.forward_linear(rule, k, G)
            )
        if type(rule).abs_backward is not AffineRule.abs_backward or rule.nonnegative:
            checked.add(type(rule).__name__)
    assert {"LinearRule", "Conv2dRule", "ReshapeRule", "AvgPool2dRule"} <= checked
    assert {"BatchNormRule", "AdaptiveAvgPool2dRule"} <= checked
