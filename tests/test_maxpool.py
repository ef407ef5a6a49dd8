"""The MaxPool bound rule (`MaxPool2dRule`): sound, exact where it can be, tight where derived.

* soundness (hypothesis): on small networks with max pooling of every configuration (kernel,
  stride, padding, dilation, ceil_mode), sampled points and box corners lie within the IBP,
  CROWN-IBP, CROWN and alpha-CROWN bounds, also without the intersection with IBP;
* IBP of a pool is the exact range (brute force over the box's vertices, where a monotone
  function reaches its extremes);
* the linear lines hold on sampled points, touch the function where they must, and give the
  hand-derived CROWN bounds of a small network (tighter than the constant upper bound of
  DeepPoly / auto_LiRPA);
* gradients through the bounds stay finite (the -inf padding of the windows does not leak).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from propdsl.region import Region
from propdsl.verify import AlphaOptions, Method, UnsupportedLayerError, bounds, compute_bounds
from propdsl.verify.graph import build_graph
from propdsl.verify.layers import MaxPool2dRule

SLACK = 1e-5
METHODS = (Method.IBP, Method.CROWN_IBP, Method.CROWN, Method.ALPHA_CROWN)

# kernel, stride, padding, dilation, ceil_mode; the smallest input side that fits
CONFIGS = [
    dict(kernel_size=2),
    dict(kernel_size=2, stride=1),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=2, stride=1, dilation=2),
    dict(kernel_size=(1, 3), stride=(1, 2), padding=(0, 1)),
    dict(kernel_size=(2, 1)),
]


class PoolNet(nn.Module):
    """conv -> relu -> max pool -> linear, with a skip from the input (so the pooled values
    and the input meet again, as in the hand-derived example)."""

    def __init__(self, config: dict, side: int, gen: torch.Generator):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 2, padding=1)
        self.pool = nn.MaxPool2d(**config)
        with torch.no_grad():
            pooled = self.pool(torch.zeros(1, 2, side + 1, side + 1)).numel()
        self.head = nn.Linear(pooled, 3)
        self.skip = nn.Linear(side * side, 3)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool(torch.relu(self.conv(x)))
        return self.head(h.flatten(1)) + self.skip(x.flatten(1))


def _corners(lo: Tensor, hi: Tensor) -> Tensor:
    n = lo[0].numel()
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=lo.dtype)
    flat_lo, flat_hi = lo.flatten(1), hi.flatten(1)
    return (flat_lo + bits[:, None, :] * (flat_hi - flat_lo)).reshape(len(bits), *lo.shape)


def check_pool_net(config: dict, seed: int, eps: float, side: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    net = PoolNet(config, side, gen)
    centre = torch.randn(2, 1, side, side, generator=gen)
    lo = centre - eps * torch.rand(centre.shape, generator=gen)
    hi = centre + eps * torch.rand(centre.shape, generator=gen)
    with torch.no_grad():
        points = lo + (hi - lo) * torch.rand(256, *lo.shape, generator=gen)
        if side * side <= 9:
            points = torch.cat([points, _corners(lo, hi)])
        values = net(points.reshape(-1, *lo.shape[1:])).reshape(points.shape[0], 2, -1)
    region = Region.box(lo, hi)
    # float32 sums in different orders: the slack grows with the outputs' size
    slack = SLACK * (1 + float(values.abs().max()))
    ibp = compute_bounds(net, region, Method.IBP)
    for method in METHODS:
        lb, ub = compute_bounds(net, region, method, options=AlphaOptions(iterations=3))
        assert bool((values >= lb - slack).all() and (values <= ub + slack).all()), method
        if method is not Method.IBP:  # CROWN is intersected with IBP: never looser
            assert bool((lb >= ibp[0] - slack).all() and (ub <= ibp[1] + slack).all())
    lb, ub = compute_bounds(net, region, Method.CROWN, intersect_ibp=False)
    assert bool((values >= lb - slack).all() and (values <= ub + slack).all()), "raw CROWN"


@settings(
    max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    config=st.sampled_from(CONFIGS),
    seed=st.integers(0, 10_000),
    eps=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    side=st.sampled_from([3, 5]),
)
def test_sound_on_every_configuration(config: dict, seed: int, eps: float, side: int) -> None:
    check_pool_net(config, seed, eps, side)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    config=st.sampled_from(CONFIGS),
    seed=st.integers(0, 10**9),
    eps=st.sampled_from([0.0, 0.05, 0.3, 1.0, 3.0]),
    side=st.sampled_from([3, 4, 5, 6]),
)
def test_sound_on_every_configuration_many(config: dict, seed: int, eps: float, side: int) -> None:
    check_pool_net(config, seed, eps, side)


@pytest.mark.parametrize("config", CONFIGS)
def test_ibp_of_a_pool_is_its_exact_range(config: dict) -> None:
    """max is monotone: its extremes over a box are at vertices; brute force over all 2^9."""
    gen = torch.Generator().manual_seed(0)
    pool = nn.MaxPool2d(**config)
    lo = torch.randn(1, 1, 3, 3, generator=gen)
    hi = lo + torch.rand(lo.shape, generator=gen)
    with torch.no_grad():
        values = pool(_corners(lo, hi).reshape(-1, 1, 3, 3))
    lb, ub = bounds(pool, lo, hi, method="ibp")
    assert torch.equal(lb[0], values.min(0).values) and torch.equal(ub[0], values.max(0).values)
    lb, ub = bounds(pool, lo, hi, method="crown")
    assert torch.allclose(lb[0], values.min(0).values) and torch.allclose(
        ub[0], values.max(0).values
    )


@pytest.mark.parametrize("config", CONFIGS)
def test_the_lines_hold_and_touch(config: dict) -> None:
    gen = torch.Generator().manual_seed(1)
    pool = nn.MaxPool2d(**config)
    lo = torch.randn(3, 2, 5, 5, generator=gen)
    hi = lo + 2 * torch.rand(lo.shape, generator=gen)
    graph = build_graph(pool, lo[:2])
    rule = graph.nodes[1].rule
    assert isinstance(rule, MaxPool2dRule)
    low_pos, up_pos, slope, offset = rule.lines(lo, hi)
    assert bool(((slope >= 0) & (slope <= 1)).all())
    x = lo + (hi - lo) * torch.rand(400, *lo.shape, generator=gen)
    y = pool(x.reshape(-1, 2, 5, 5)).reshape(400, 3, 2, -1)
    flat = x.reshape(400, 3, 2, -1)
    below = flat.gather(3, low_pos.expand(400, -1, -1, -1))
    line = slope * flat.gather(3, up_pos.expand(400, -1, -1, -1)) + offset
    assert bool((below <= y + SLACK).all() and (y <= line + SLACK).all())
    # the upper line runs from the second-largest upper bound c at l_i to u_i at u_i, never
    # above max(u): pointwise at least as tight as the constant max(u)
    l_i = lo.reshape(3, 2, -1).gather(2, up_pos)
    u_i = hi.reshape(3, 2, -1).gather(2, up_pos)
    assert torch.allclose(slope * u_i + offset, u_i, atol=1e-6)
    u_max = pool(hi).reshape(3, 2, -1)
    assert torch.allclose(u_i, u_max)
    assert bool((slope * l_i + offset <= u_max + 1e-6).all())


class MaxMinusThird(nn.Module):
    """f(x) = max(x0, x1) - x0 / 3 over a 1 x 2 image."""

    def __init__(self):
        super().__init__()
        self.pool = nn.MaxPool2d((1, 2))
        self.lin = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[-1 / 3, 0.0]]))

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x).flatten(1) + self.lin(x.flatten(1))


def test_crown_bounds_of_a_hand_derived_example() -> None:
    """x0 in [0, 3], x1 in [1, 2]. Lower line: y >= x1 (the largest lower bound), so
    f >= x1 - x0/3 >= 0. Upper line: i = x0 (the largest upper bound 3), c = 2, so
    y <= 2 + (3 - 2) / (3 - 0) * x0 and f <= 2, the true maximum (IBP: 3; the constant upper
    bound max(u) = 3 of DeepPoly and auto_LiRPA would give 3 too)."""
    net = MaxMinusThird()
    lo, hi = torch.tensor([[[[0.0, 1.0]]]]), torch.tensor([[[[3.0, 2.0]]]])
    lb, ub = bounds(net, lo, hi, method="ibp")
    assert lb.item() == pytest.approx(0.0) and ub.item() == pytest.approx(3.0)
    lb, ub = compute_bounds(net, Region.box(lo, hi), "crown", intersect_ibp=False)
    assert lb.item() == pytest.approx(0.0, abs=1e-6) and ub.item() == pytest.approx(2.0)
    # the true range, on a fine grid: [2/3, 2]
    g = torch.linspace(0, 1, 301)
    x0, x1 = torch.meshgrid(3 * g, 1 + g, indexing="ij")
    f = torch.maximum(x0, x1) - x0 / 3
    assert f.max().item() == pytest.approx(2.0) and f.min().item() == pytest.approx(2 / 3)


def test_decided_windows_are_exact() -> None:
    """A window whose largest lower bound beats every other upper bound is its element."""
    net = MaxMinusThird()
    lo, hi = torch.tensor([[[[2.0, 0.0]]]]), torch.tensor([[[[3.0, 1.5]]]])
    # f = x0 - x0/3 = 2 x0 / 3 on the whole box: [4/3, 2]
    lb, ub = compute_bounds(net, Region.box(lo, hi), "crown", intersect_ibp=False)
    assert lb.item() == pytest.approx(4 / 3) and ub.item() == pytest.approx(2.0)


def test_crown_is_tighter_than_ibp_on_a_pooling_cnn() -> None:
    gen = torch.Generator().manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 3, 2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(12, 4),
    )
    x = torch.randn(4, 1, 6, 6, generator=gen)
    ilb, iub = bounds(net, x - 0.05, x + 0.05, method="ibp")
    clb, cub = bounds(net, x - 0.05, x + 0.05, method="crown")
    assert float((cub - clb).detach().mean()) < 0.8 * float((iub - ilb).detach().mean())


def test_functional_max_pooling_and_gradients() -> None:
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: Tensor) -> Tensor:
            return F.max_pool2d(torch.tanh(self.conv(x)), 3, stride=2, padding=1).flatten(1)

    net = Functional()
    x = torch.randn(2, 1, 6, 6)
    for method in ("ibp", "crown"):
        lb, ub = bounds(net, x - 0.1, x + 0.1, method=method)
        y = net(x)
        assert bool((lb <= y + SLACK).all() and (y <= ub + SLACK).all())
        (ub - lb).sum().backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        net.zero_grad()


def test_unsupported_pool_settings() -> None:
    x = torch.randn(1, 1, 4, 4)

    class WithIndices(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2, return_indices=True)

        def forward(self, x: Tensor) -> Tensor:
            return self.pool(x)[0]

    with pytest.raises(UnsupportedLayerError, match="returns a tuple"):
        bounds(WithIndices(), x, x)
    with pytest.raises(UnsupportedLayerError, match=r"\[C, H, W\]"):
        bounds(nn.MaxPool2d(2), torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))


def test_every_input_neuron_of_a_pool_gets_crown_bounds() -> None:
    """The engine tightens a pool's input with CROWN (as an activation's): a pool after a
    linear layer of a ReLU network gets bounds no looser than the IBP-only pass."""
    gen = torch.Generator().manual_seed(3)
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(4, 8),
        nn.ReLU(),
        nn.Linear(8, 8),
        nn.Unflatten(1, (2, 2, 2)),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2, 2),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(3, 1, 2, 2, generator=gen)
    crown = bounds(net, x - 0.2, x + 0.2, method="crown")
    crown_ibp = bounds(net, x - 0.2, x + 0.2, method="crown_ibp")
    width = lambda b: float((b[1] - b[0]).detach().sum())  # noqa: E731
    assert width(crown) <= width(crown_ibp) + 1e-6
    assert math.isfinite(width(crown))


# -- Jacobian bounds -------------------------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_jacobian_bounds_contain_autograds_jacobians(config: dict, method: str) -> None:
    from propdsl.verify.jacobian import jacobian_bounds

    gen = torch.Generator().manual_seed(4)
    net = PoolNet(config, 4, gen)
    centre = torch.randn(2, 1, 4, 4, generator=gen)
    lo, hi = centre - 0.2, centre + 0.2
    jlo, jhi = jacobian_bounds(net, lo, hi, method=method)
    assert jlo.shape == (2, 3, 1, 4, 4)
    for k in range(40):
        x = lo + (hi - lo) * torch.rand(lo.shape, generator=gen)
        J = torch.func.vmap(torch.func.jacrev(lambda z: net(z[None])[0]))(x)
        assert bool((J >= jlo - SLACK).all() and (J <= jhi + SLACK).all()), k


def test_jacobian_of_a_decided_window_is_exact_and_of_an_open_one_an_interval() -> None:
    from propdsl.verify.jacobian import jacobian_bounds

    net = MaxMinusThird()  # f = max(x0, x1) - x0 / 3
    decided = torch.tensor([[[[2.0, 0.0]]]]), torch.tensor([[[[3.0, 1.5]]]])
    lo, hi = jacobian_bounds(net, *decided)
    assert lo.flatten().tolist() == pytest.approx([2 / 3, 0.0])
    assert hi.flatten().tolist() == pytest.approx([2 / 3, 0.0])
    open_ = torch.tensor([[[[0.0, 1.0]]]]), torch.tensor([[[[3.0, 2.0]]]])
    lo, hi = jacobian_bounds(net, *open_)
    # df/dx0 is 1 - 1/3 or -1/3, df/dx1 is 0 or 1, depending on which element is the max
    assert lo.flatten().tolist() == pytest.approx([-1 / 3, 0.0])
    assert hi.flatten().tolist() == pytest.approx([2 / 3, 1.0])


def test_lipschitz_constants_through_max_pooling_hold_on_pairs() -> None:
    from propdsl.verify.jacobian import lipschitz_constant

    gen = torch.Generator().manual_seed(5)
    net = PoolNet(dict(kernel_size=3, stride=1, padding=1), 3, gen)
    centre = torch.randn(1, 1, 3, 3, generator=gen)
    lo, hi = centre - 0.3, centre + 0.3
    bound = lipschitz_constant(net, lo, hi, p=2, q=2)
    x1 = lo + (hi - lo) * torch.rand(500, 1, 3, 3, generator=gen)
    x2 = lo + (hi - lo) * torch.rand(500, 1, 3, 3, generator=gen)
    with torch.no_grad():
        ratio = (net(x1) - net(x2)).norm(dim=1) / (x1 - x2).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= float(bound[0]) + SLACK


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    from propdsl.verify.jacobian import jacobian_bounds

    gen = torch.Generator().manual_seed(6)
    net = PoolNet(dict(kernel_size=3, stride=2, padding=1), 5, gen)
    x = torch.randn(2, 1, 5, 5, generator=gen)
    cpu = bounds(net, x - 0.1, x + 0.1, method="crown")
    jcpu = jacobian_bounds(net, x - 0.1, x + 0.1)
    net, x = net.cuda(), x.cuda()
    gpu = bounds(net, x - 0.1, x + 0.1, method="crown")
    jgpu = jacobian_bounds(net, x - 0.1, x + 0.1)
    for a, b in zip((*cpu, *jcpu), (*gpu, *jgpu), strict=True):
        assert torch.allclose(a.detach(), b.detach().cpu(), atol=1e-4)
