"""Coverage of users' models: products with constant matrices (`@`, `matmul`) and models with
several inputs (one region per input), against equivalent models, sampling and auto_LiRPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from propdsl.region import Region
from propdsl.verify import bounds
from propdsl.verify.bounds import compute_bounds
from propdsl.verify.layers import UnsupportedLayerError

D = torch.float64
METHODS = ["ibp", "crown_ibp", "crown", "alpha_crown"]


class MatMulNet(nn.Module):
    """The same two-layer network written with every form of matrix product."""

    def __init__(self, form: str):
        super().__init__()
        torch.manual_seed(0)
        self.form = form
        self.w1 = nn.Parameter(torch.randn(5, 7, dtype=D))
        self.w2 = nn.Parameter(torch.randn(7, 3, dtype=D))

    def forward(self, x):
        if self.form == "method":
            h = x.matmul(self.w1)
        elif self.form == "operator":
            h = x @ self.w1
        elif self.form == "function":
            h = torch.matmul(x, self.w1)
        else:
            h = torch.mm(x, self.w1)
        h = torch.relu(h)
        if self.form == "operator":
            return (self.w2.T @ h.unsqueeze(-1)).squeeze(-1)  # the constant on the left
        return h @ self.w2


def _linear_twin(net: MatMulNet) -> nn.Module:
    l1, l2 = nn.Linear(5, 7, bias=False, dtype=D), nn.Linear(7, 3, bias=False, dtype=D)
    with torch.no_grad():
        l1.weight.copy_(net.w1.T)
        l2.weight.copy_(net.w2.T)
    return nn.Sequential(l1, nn.ReLU(), l2)


def _region(p: float, x: torch.Tensor) -> Region:
    return Region.ball(x, {math.inf: 0.3, 2: 0.6, 1: 1.0}[p], p)


@pytest.mark.parametrize("form", ["method", "operator", "function", "mm"])
@pytest.mark.parametrize("p", [math.inf, 2, 1])
@pytest.mark.parametrize("method", METHODS)
def test_matmul_bounds_equal_the_linear_layers(form, p, method):
    net = MatMulNet(form)
    x = torch.randn(4, 5, dtype=D)
    region = _region(p, x)
    ours = compute_bounds(net, region, method)
    twin = compute_bounds(_linear_twin(net), region, method)
    torch.testing.assert_close(ours, twin)


class Shapes(nn.Module):
    """Products of higher-rank tensors with broadcast constants (auto_LiRPA's general-shape
    test, without its product of two inputs)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.w1 = torch.randn(3, 4, dtype=D)
        self.w2 = torch.randn(4, 4, 3, dtype=D)
        self.w3 = torch.randn(2, 5, dtype=D)
        self.v = torch.randn(3, dtype=D)

    def forward(self, x):
        y = torch.relu(x.matmul(self.w1))  # [B, 3] @ [3, 4]
        y = y.unsqueeze(1).unsqueeze(1).expand(-1, 1, 5, 4)  # [B, 1, 5, 4]
        y = torch.tanh(y @ self.w2)  # [B, 1, 5, 4] @ [4, 4, 3] -> [B, 4, 5, 3]
        y = torch.relu(self.w3 @ y)  # [2, 5] @ [B, 4, 5, 3] -> [B, 4, 2, 3]
        return (y @ self.v).flatten(1)  # a vector constant: [B, 4, 2]


@pytest.mark.parametrize("p", [math.inf, 2, 1])
@pytest.mark.parametrize("method", METHODS)
def test_matmul_of_any_rank_is_sound_by_sampling(p, method):
    net = Shapes()
    torch.manual_seed(2)
    x = torch.randn(3, 3, dtype=D)
    region = _region(p, x)
    lb, ub = compute_bounds(net, region, method)
    gen = torch.Generator().manual_seed(3)
    pts = torch.stack([region.sample(gen) for _ in range(500)], 1)
    with torch.no_grad():
        out = net(pts.reshape(-1, 3)).reshape(3, 500, -1)
    assert bool((out >= lb[:, None] - 1e-9).all() and (out <= ub[:, None] + 1e-9).all())
    assert bool((lb < ub).all())


def test_products_that_cannot_be_bounded_are_refused():
    class Square(nn.Module):
        def forward(self, x):
            return x.unsqueeze(1) @ x.unsqueeze(2)

    class Batched(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.randn(2, 4, 3)

        def forward(self, x):  # [B, 2, 5, 4] @ [2, 4, 3]: fine; [B, 2, 4] @ [2, 4, 3] is not
            return x @ self.w

    x = torch.zeros(2, 4)
    with pytest.raises(UnsupportedLayerError, match="product or quotient"):
        bounds(Square(), x, x + 1)
    x = torch.zeros(2, 2, 4)
    with pytest.raises(UnsupportedLayerError, match="mix the batch"):
        bounds(Batched(), x, x + 1)
    lb, ub = bounds(Batched(), torch.zeros(3, 2, 5, 4), torch.ones(3, 2, 5, 4))
    assert lb.shape == (3, 2, 5, 3)


class TwoInputs(nn.Module):
    """auto_LiRPA's two-input example: an image given as its two halves."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv1 = nn.Conv2d(1, 4, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 4, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 3 * 3, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x, y):
        x = torch.cat([x, y], dim=2)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class Whole(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, z):
        return self.net(z[:, :, :6], z[:, :, 6:])


@pytest.mark.parametrize("method", METHODS)
def test_two_inputs_equal_the_model_of_their_concatenation(method):
    net = TwoInputs().to(D)
    x = torch.rand(3, 1, 12, 12, dtype=D)
    lo, hi = x - 0.05, x + 0.05
    parts = bounds(net, (lo[:, :, :6], lo[:, :, 6:]), (hi[:, :, :6], hi[:, :, 6:]), method=method)
    whole = bounds(Whole(net), lo, hi, method=method)
    torch.testing.assert_close(parts, whole)
    regions = (Region.box(lo[:, :, :6], hi[:, :, :6]), Region.box(lo[:, :, 6:], hi[:, :, 6:]))
    torch.testing.assert_close(bounds(net, region=regions, method=method), whole)


@pytest.mark.parametrize("method", METHODS)
def test_two_inputs_with_their_own_balls_are_sound_by_sampling(method):
    net = TwoInputs().to(D)
    x = torch.rand(2, 1, 12, 12, dtype=D)
    regions = (
        Region.ball(x[:, :, :6], 0.1, 2, lo=0.0, hi=1.0),
        Region.ball(x[:, :, 6:], 0.2, 1),
    )
    lb, ub = bounds(net, region=regions, method=method)
    gen = torch.Generator().manual_seed(5)
    for _ in range(200):
        a, b = regions[0].sample(gen), regions[1].sample(gen)
        assert bool(regions[0].contains(a).all() and regions[1].contains(b).all())
        with torch.no_grad():
            out = net(a, b)
        assert bool((out >= lb - 1e-9).all() and (out <= ub + 1e-9).all())
    # each part's ball is used (by the backward passes; IBP takes balls in closed form only
    # through single-input affine chains): tighter than the product of the bounding boxes
    boxes = tuple(Region.box(*r.bounding_box()) for r in regions)
    box_lb, box_ub = bounds(net, region=boxes, method=method)
    assert bool((lb >= box_lb - 1e-9).all() and (ub <= box_ub + 1e-9).all())
    if method != "ibp":
        assert float((box_ub - box_lb).sum()) > float((ub - lb).sum())


def test_several_inputs_are_checked():
    net = TwoInputs()
    a, b = torch.zeros(2, 1, 6, 12), torch.zeros(3, 1, 6, 12)
    with pytest.raises(ValueError, match="batch sizes"):
        bounds(net, region=(Region.box(a, a + 1), Region.box(b, b + 1)))
    with pytest.raises(ValueError, match="tuple"):
        bounds(net, (a, a), a + 1)
    with pytest.raises(UnsupportedLayerError, match="one region per input"):
        bounds(net, a, a + 1)


def test_two_inputs_agree_with_auto_lirpa_when_installed():
    pytest.importorskip("auto_LiRPA")
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    net = TwoInputs()
    x = torch.rand(2, 1, 12, 12)
    a, b = x[:, :, :6], x[:, :, 6:]
    model = BoundedModule(
        net, (torch.zeros_like(a), torch.zeros_like(b)), bound_opts={"conv_mode": "matrix"}
    )
    ptb = PerturbationLpNorm(norm=math.inf, eps=0.03)
    ta, tb = BoundedTensor(a, ptb), BoundedTensor(b, ptb)
    regions = (Region.ball(a, 0.03), Region.ball(b, 0.03))
    for ours_name, theirs_name in (("ibp", "IBP"), ("crown", "backward")):
        with torch.no_grad():
            theirs = model.compute_bounds(x=(ta, tb), method=theirs_name)
            ours = compute_bounds(net, regions, ours_name, intersect_ibp=False)
        torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=0)


def test_matmul_agrees_with_auto_lirpa_when_installed():
    pytest.importorskip("auto_LiRPA")
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    net = MatMulNet("method").float()
    x = torch.randn(3, 5)
    model = BoundedModule(net, torch.zeros_like(x), verbose=0)
    for p, eps in ((math.inf, 0.3), (2, 0.6)):
        tx = BoundedTensor(x, PerturbationLpNorm(norm=p, eps=eps))
        for ours_name, theirs_name in (("ibp", "IBP"), ("crown", "backward")):
            with torch.no_grad():
                theirs = model.compute_bounds(x=(tx,), method=theirs_name)
                ours = compute_bounds(net, Region.ball(x, eps, p), ours_name, intersect_ibp=False)
            torch.testing.assert_close(ours[0], theirs[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(ours[1], theirs[1], atol=1e-4, rtol=0)
