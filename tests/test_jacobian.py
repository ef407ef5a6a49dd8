"""Jacobian bounds (propdsl.verify.jacobian): soundness first, then exactness and tightness.

Soundness: on random small networks with every supported activation (and a CNN, a residual user
module) over random regions, the Jacobians autograd computes at sampled points and box corners lie
within [lo, hi]; the Lipschitz bounds derived from them exceed every sampled difference quotient.
Exactness: affine models get lo == hi == their matrix. Tightness: on ReLU networks the local
bound never exceeds the global product of the layers' norms. The linear pass (the default): sound
on its own, never looser than intervals, exact where intervals lose a cancellation (by hand), and
containing the exact vertex range of the multilinear Jacobian (enumerated) while tighter.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import propdsl
from propdsl.models import Normalize
from propdsl.region import Region
from propdsl.verify import ActivationRule, UnsupportedLayerError, register_rule
from propdsl.verify.jacobian import (
    DERIVATIVES,
    JacobianRelaxation,
    _analyse,
    _backward,
    _linear_pass,
    _output_spec,
    jacobian_bounds,
    lipschitz_bound,
    lipschitz_constant,
    register_derivative,
)
from propdsl.verify.run import FALSIFIED, UNSUPPORTED, VERIFIED

INF = math.inf
SLACK = 1e-9  # float64 throughout
NORMS = (1.0, 2.0, INF)


# -- models ----------------------------------------------------------------------------------


class Residual(nn.Module):
    """A user module: a skip connection, functional activations, a view."""

    def __init__(self, d_in: int = 3, width: int = 6):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.inp(x), 0.2)
        h = h + torch.tanh(self.fc(h))
        return self.out(F.softplus(h, beta=2.0).view(h.size(0), -1) * 0.5 - 1.0)


ACTIVATIONS = {
    "relu": lambda: nn.ReLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "leaky_relu_negative": lambda: nn.LeakyReLU(-0.5),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
    "softplus": lambda: nn.Softplus(beta=2.0),
    "softplus_threshold": lambda: nn.Softplus(beta=1.0, threshold=1.0),  # the linear branch too
}
KINDS = (*ACTIVATIONS, "mixed", "cnn", "residual")
# torch's softplus jumps by log1p(exp(-threshold)) / beta where it switches to x: with
# threshold 1 the function is not continuous, and no Lipschitz bound holds across the jump.
CONTINUOUS = tuple(k for k in KINDS if k != "softplus_threshold")


def make_net(kind: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(seed)
    if kind == "cnn":
        net: nn.Module = nn.Sequential(
            Normalize(0.5, 0.25),
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Dropout(0.3),
            nn.Conv2d(3, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Identity(),
            nn.Linear(4, 3),
        )
        shape: tuple[int, ...] = (1, 4, 4)
    elif kind == "residual":
        net, shape = Residual(), (3,)
    else:
        acts = list(ACTIVATIONS.values())[:3] if kind == "mixed" else [ACTIVATIONS[kind]] * 3
        net = nn.Sequential(
            nn.Linear(3, 7), acts[0](), nn.Linear(7, 7), acts[1](), nn.Linear(7, 5), acts[2](),
            nn.Linear(5, 3),
        )  # fmt: skip
        shape = (3,)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Linear | nn.Conv2d):
                m.weight.mul_(1.5)  # pre-activations of order 1: every derivative case occurs
    return net.double().eval(), shape


def make_region(kind: str, x: Tensor, eps: float) -> Region:
    if kind == "box":
        return Region.box(x - eps, x + 0.5 * eps)
    if kind == "linf":
        return Region.ball(x, eps, INF)
    if kind == "linf_box":
        return Region.ball(x, eps, INF, lo=0.0, hi=1.0)
    return Region.ball(x, eps, 2.0 if kind == "l2" else 1.0, lo=0.0, hi=1.0)


REGIONS = ("box", "linf", "linf_box", "l2", "l1")


def jacobian(net: nn.Module, x: Tensor) -> Tensor:
    """Per-sample Jacobians [B, O, *input_shape] by autograd."""

    def one(v: Tensor) -> Tensor:
        return net(v.unsqueeze(0)).squeeze(0)

    return torch.func.vmap(torch.func.jacrev(one))(x)


def sample_points(region: Region, count: int, gen: torch.Generator) -> list[Tensor]:
    """Uniform points of the region and random corners of its bounding box."""
    points = [region.sample(gen) for _ in range(count)]
    lo, hi = region.bounding_box()
    for _ in range(count // 4):
        corner = torch.where(torch.rand(lo.shape, generator=gen, dtype=lo.dtype) < 0.5, lo, hi)
        if region.centre is None or region.p == INF:
            points.append(corner)
    return points


def assert_inside(J: Tensor, lo: Tensor, hi: Tensor) -> None:
    below = float((lo - J).clamp_min(0).max().detach())
    above = float((J - hi).clamp_min(0).max().detach())
    assert below <= SLACK and above <= SLACK, (below, above)


# -- soundness -------------------------------------------------------------------------------


def _check_soundness(kind: str, region_kind: str, seed: int, eps: float, method: str) -> None:
    net, shape = make_net(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, *shape, generator=gen, dtype=torch.float64)
    region = make_region(region_kind, x, eps)
    lo, hi = jacobian_bounds(net, region=region, method=method)
    assert lo.shape == (3, 3, *shape) and bool((lo <= hi).all())
    for point in sample_points(region, 24, gen):
        assert_inside(jacobian(net, point), lo, hi)


# every kind (torch's thresholded softplus included), region, radius and pre-activation method
JACOBIAN_CASES = dict(
    kind=st.sampled_from(KINDS),
    region_kind=st.sampled_from(REGIONS),
    seed=st.integers(0, 10_000),
    eps=st.sampled_from([0.0, 0.01, 0.1, 0.5, 2.0]),
    method=st.sampled_from(["ibp", "crown"]),
)


@settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(**JACOBIAN_CASES)
def test_sampled_jacobians_lie_within_the_bounds(kind, region_kind, seed, eps, method):
    _check_soundness(kind, region_kind, seed, eps, method)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    region_kind=st.sampled_from(REGIONS),
    seed=st.integers(0, 10**6),
    eps=st.floats(0.0, 3.0),
    method=st.sampled_from(["ibp", "crown"]),
)
def test_sampled_jacobians_lie_within_the_bounds_many(kind, region_kind, seed, eps, method):
    _check_soundness(kind, region_kind, seed, eps, method)


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_every_activation_covers_its_kinks_and_plateaus(kind):
    """Points exactly at ReLU kinks (pre-activation 0) and deep in saturation still lie inside:
    the derivative interval must hold autograd's value at the kink."""
    net = nn.Sequential(nn.Linear(2, 4), ACTIVATIONS[kind](), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [30.0, 0.0], [-1.0, 1.0]]))
        net[0].bias.zero_()
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.5, 0.5]], dtype=torch.float64)
    for eps in (0.0, 0.5):
        lo, hi = jacobian_bounds(net, x - eps, x + eps)
        assert_inside(jacobian(net, x), lo, hi)


def test_crown_is_at_least_as_tight_as_ibp():
    net, shape = make_net("relu", 3)
    x = torch.rand(4, *shape, dtype=torch.float64)
    ibp = jacobian_bounds(net, x - 0.2, x + 0.2, method="ibp")
    crown = jacobian_bounds(net, x - 0.2, x + 0.2, method="crown")
    width = [float((hi - lo).sum().detach()) for lo, hi in (ibp, crown)]
    assert width[1] <= width[0] + 1e-12
    # CROWN-IBP's pre-activation bounds are IBP's, so are its Jacobian bounds
    crown_ibp = jacobian_bounds(net, x - 0.2, x + 0.2, method="crown_ibp")
    for ours, theirs in zip(crown_ibp, ibp, strict=True):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)


def test_bounds_shrink_to_the_jacobian_at_a_point():
    net, shape = make_net("tanh", 1)
    x = torch.rand(4, *shape, dtype=torch.float64)
    lo, hi = jacobian_bounds(net, x, x)
    torch.testing.assert_close(lo, jacobian(net, x))
    torch.testing.assert_close(hi, jacobian(net, x))


# -- exactness on affine models ----------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("eps", [0.0, 0.3, 5.0])
def test_affine_models_are_exact(eps):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    cnn = nn.Sequential(
        Normalize(0.5, 0.2),
        nn.Conv2d(1, 2, 3, padding=1),
        nn.AvgPool2d(2),
        nn.Conv2d(2, 3, 2, padding="same"),  # asymmetric padding: the autograd fallback
        nn.Flatten(),
        nn.Linear(12, 3),
    )
    for net, shape in ((mlp, (1, 2, 3)), (cnn, (1, 4, 4))):
        net = net.double().eval()
        x = torch.rand(2, *shape, dtype=torch.float64)
        lo, hi = jacobian_bounds(net, x - eps, x + eps)
        assert torch.equal(lo, hi)
        torch.testing.assert_close(lo, jacobian(net, x))
        J = jacobian(net, x).flatten(2)
        torch.testing.assert_close(lipschitz_bound(lo, hi, 2, 2), torch.linalg.matrix_norm(J, 2))
        torch.testing.assert_close(lipschitz_bound(lo, hi, INF, INF), J.abs().sum(-1).amax(-1))
        torch.testing.assert_close(lipschitz_bound(lo, hi, 1, 1), J.abs().sum(1).amax(-1))


# -- tightness against the global bound ------------------------------------------------------


def _layer_norm_product(net: nn.Sequential, p: float, absolute: bool = False) -> float:
    out = 1.0
    for m in net:
        if isinstance(m, nn.Linear):
            W = m.weight.detach().abs() if absolute else m.weight.detach()
            out *= float(torch.linalg.matrix_norm(W, ord=p))
    return out


@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(seed=st.integers(0, 10_000), eps=st.sampled_from([0.0, 0.05, 0.5, 5.0, 100.0]))
def test_relu_local_bound_never_exceeds_the_global_product(seed, eps):
    net, shape = make_net("relu", seed)
    x = torch.rand(4, *shape, dtype=torch.float64)
    lo, hi = jacobian_bounds(net, x - eps, x + eps)
    # inf -> inf and 1 -> 1 norms depend on |W| alone: the element-wise bound is below the
    # product of the layers' norms.
    for p in (1, INF):
        assert bool((lipschitz_bound(lo, hi, p, p) <= _layer_norm_product(net, p) + 1e-9).all())
    # 2 -> 2: below the product of the norms of |W| (M <= |W_3| |W_2| |W_1| element-wise) ...
    bound = lipschitz_bound(lo, hi, 2, 2)
    assert bool((bound <= _layer_norm_product(net, 2, absolute=True) + 1e-9).all())
    # ... and below the plain spectral product wherever every neuron is stable (lo == hi).
    exact = (lo == hi).flatten(1).all(1)
    assert bool((bound[exact] <= _layer_norm_product(net, 2) + 1e-9).all())
    if eps == 0.0:
        assert bool(exact.all())
    # lipschitz_constant cuts the chain: below the global product in every norm, and below the
    # element-wise bound
    for p in NORMS:
        L = lipschitz_constant(net, x - eps, x + eps, p=p, q=p)
        assert bool((L <= _layer_norm_product(net, p) * (1 + 1e-9)).all()), p
        assert bool((L <= lipschitz_bound(lo, hi, p, p) + 1e-12).all())


# -- the linear pass -----------------------------------------------------------------------------


def _linear_and_interval(net: nn.Module, region: Region, method: str, outputs=None, C=None):
    """(raw linear-pass bounds, interval bounds, default bounds), each [B, K, *input_shape]."""
    analysis = _analyse(net, region, method, "interval")
    spec = _output_spec(outputs, C, analysis.graph.nodes[-1].shape, analysis.like)
    cuts: dict = {}
    interval = _backward(analysis.graph, analysis.bounds, spec, cuts)
    raw = _linear_pass(analysis.graph, analysis.bounds, spec, cuts)
    assert raw is not None
    analysis.relaxation = JacobianRelaxation.LINEAR
    return raw, interval, analysis.jacobian(outputs, C)


@settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(**JACOBIAN_CASES)
def test_linear_bounds_contain_sampled_jacobians(kind, region_kind, seed, eps, method):
    """The linear pass on its own (before the intersection) and the bounds jacobian_bounds
    returns with it contain autograd's Jacobians at sampled points and box corners; the latter
    are never looser than the interval pass's."""
    net, shape = make_net(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, *shape, generator=gen, dtype=torch.float64)
    region = make_region(region_kind, x, eps)
    C = torch.randn(3, 2, 3, generator=gen, dtype=torch.float64)  # two rows per sample
    with torch.no_grad():
        raw, (i_lo, i_hi), (lo, hi) = _linear_and_interval(net, region, method)
        raw_c, _, (c_lo, c_hi) = _linear_and_interval(net, region, method, C=C)
    assert bool((lo >= i_lo).all() and (hi <= i_hi).all() and (lo <= hi).all())
    for point in sample_points(region, 24, gen):
        J = jacobian(net, point)
        assert_inside(J, *raw)
        assert_inside(J, lo, hi)
        JC = (C @ J.flatten(2)).reshape(c_lo.shape)
        assert_inside(JC, *raw_c)
        assert_inside(JC, c_lo, c_hi)


def test_linear_pass_is_exact_where_nothing_is_uncertain():
    """Affine models, and any model at a single point: the linear pass gives the matrix."""
    cnn = nn.Sequential(
        Normalize(0.5, 0.2),
        nn.Conv2d(1, 2, 3, padding=1),
        nn.AvgPool2d(2, ceil_mode=True),  # the pooling's autograd path
        nn.Flatten(),
        nn.Linear(8, 3),
    ).double()
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    (lo, hi), _, _ = _linear_and_interval(cnn, Region.box(x - 1, x + 1), "crown")
    J = jacobian(cnn, x)
    torch.testing.assert_close(lo.expand_as(J), J)  # [1, ...]: the same for every sample
    torch.testing.assert_close(hi.expand_as(J), J)
    for kind in ("mixed", "cnn", "residual"):
        net, shape = make_net(kind, 0)
        x = torch.rand(2, *shape, dtype=torch.float64)
        (lo, hi), _, _ = _linear_and_interval(net, Region.box(x, x), "ibp")
        torch.testing.assert_close(lo, jacobian(net, x))
        torch.testing.assert_close(hi, jacobian(net, x))


def test_linear_pass_keeps_the_cancellation_intervals_lose():
    """By hand: y = relu(h1 - h2) with h1 = relu(x1 + x2), h2 = relu(x2 - x1) on x1 in [-1, 1],
    x2 in [5, 6]. h1 and h2 are active, the output neuron unstable (d in [0, 1]): dy/dx2 =
    d (1 - 1) = 0. Intervals bound d/dh = ([0, 1], [-1, 0]) and lose that both entries hold
    the same d: dy/dx2 in [-1, 1]. The linear pass keeps it: exactly 0."""
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1), nn.ReLU()).double()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 1.0]]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
        net[0].bias.zero_()
        net[2].bias.zero_()
    lower = torch.tensor([[-1.0, 5.0]], dtype=torch.float64)
    upper = torch.tensor([[1.0, 6.0]], dtype=torch.float64)
    i_lo, i_hi = jacobian_bounds(net, lower, upper, relaxation="interval")
    lo, hi = jacobian_bounds(net, lower, upper, relaxation="linear")
    assert i_lo.tolist() == [[[0.0, -1.0]]] and i_hi.tolist() == [[[2.0, 1.0]]]
    assert lo.tolist() == [[[0.0, 0.0]]] and hi.tolist() == [[[2.0, 0.0]]]
    assert torch.equal(jacobian_bounds(net, lower, upper)[0], lo)  # the default


def _vertex_range(net: nn.Sequential, analysis) -> tuple[Tensor, Tensor]:
    """The exact range of the Jacobian J(d) = W_L D_{L-1} ... D_1 W_1 over the box of the
    derivatives d (the analysis's derivative ranges): the smallest and largest value over all
    vertex combinations (J is multilinear in d, so its extremes lie at vertices)."""
    from propdsl.verify.jacobian import derivative_range

    weights = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    boxes = []
    for node in analysis.graph.nodes:
        if isinstance(node.rule, ActivationRule):
            lo, hi = derivative_range(node.rule, *analysis.bounds[node.inputs[0]])
            boxes.append((lo[0], hi[0]))
    sizes = [len(lo) for lo, _ in boxes]
    corners = torch.cartesian_prod(*([torch.tensor([0, 1])] * sum(sizes)))
    best_lo = best_hi = None
    for corner in corners:
        J = weights[0]
        for (lo, hi), bits, W in zip(boxes, corner.split(sizes), weights[1:], strict=True):
            J = W @ (torch.where(bits.bool(), hi, lo)[:, None] * J)
        best_lo = J if best_lo is None else torch.minimum(best_lo, J)
        best_hi = J if best_hi is None else torch.maximum(best_hi, J)
    return best_lo, best_hi


@pytest.mark.parametrize("seed", [0, 1, 3, 5])
def test_linear_bounds_against_the_vertex_enumeration(seed):
    """Seeded 2-hidden-layer ReLU networks with unstable neurons in both layers: the exact range
    of the multilinear Jacobian over the derivative box (all 2^8 vertices) lies within the
    linear bounds, which are strictly tighter than the interval bounds."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)
    ).double()  # fmt: skip
    x = torch.rand(1, 2, dtype=torch.float64)
    with torch.no_grad():
        analysis = _analyse(net, Region.box(x - 0.6, x + 0.6), "crown", "interval")
        for i in (1, 3):  # the pre-activations
            lo, hi = analysis.bounds[i]
            assert bool(((lo < 0) & (hi > 0)).any()), i
        i_lo, i_hi = analysis.jacobian(None, None)
        analysis.relaxation = JacobianRelaxation.LINEAR
        lo, hi = analysis.jacobian(None, None)
        v_lo, v_hi = _vertex_range(net, analysis)
    assert_inside(v_lo, lo, hi)
    assert_inside(v_hi, lo, hi)
    assert float((hi - lo).sum()) < float((i_hi - i_lo).sum()) - 1e-3


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_forward_maps_are_the_adjoints_of_backward():
    """<M G, A> = <G, A M> for every affine rule the linear pass applies forwards (and the dense
    fallback for a user's rule)."""
    from propdsl.verify import REGISTRY, AffineRule
    from propdsl.verify.graph import build_graph
    from propdsl.verify.jacobian import _forward_linear

    class Mix(nn.Module):
        def forward(self, v):
            return v @ torch.tensor([[1.0, 2.0], [-3.0, 0.5]], dtype=v.dtype)

    @register_rule(Mix)
    class MixRule(AffineRule):
        def backward(self, A):
            M = torch.tensor([[1.0, -3.0], [2.0, 0.5]], dtype=A.dtype)  # out = M v
            return [A @ M], None

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 2, padding="same")  # asymmetric padding
            self.bn = nn.BatchNorm2d(2)
            self.fc = nn.Linear(8, 2)
            self.mix = Mix()

        def forward(self, v):
            h = self.bn(self.conv(v)) * 0.5 + v  # v broadcasts over the channels
            h = F.avg_pool2d(h, 2, ceil_mode=True) - F.adaptive_avg_pool2d(h, 2)
            return self.mix(self.fc(torch.flatten(h, 1)))

    try:
        torch.manual_seed(0)
        net = Branches().double().eval()
        with torch.no_grad():
            net.bn.running_mean.uniform_(-1, 1)
            net.bn.running_var.uniform_(0.5, 2)
        example = torch.rand(2, 1, 4, 4, dtype=torch.float64)
        graph = build_graph(net, example)
        checked = set()
        for node in graph.nodes[1:]:
            rule = node.rule
            for k, shape in enumerate(rule.call.in_shapes):
                G = torch.randn(3, 5, *shape, dtype=torch.float64)
                A = torch.randn(3, 5, *rule.call.out_shape, dtype=torch.float64)
                forward = _forward_linear(rule, k, G)
                back = rule.backward(A)[0][k]
                torch.testing.assert_close((forward * A).sum(), (G * back).sum())
                checked.add(type(rule).__name__)
        assert {"Conv2dRule", "AvgPool2dRule", "AdaptiveAvgPool2dRule", "MixRule"} <= checked
    finally:
        REGISTRY.pop(Mix, None)


def test_auto_takes_the_linear_pass_below_the_work_limit(monkeypatch):
    import propdsl.verify.jacobian as module

    net, shape = make_net("tanh", 0)
    x = torch.rand(3, *shape, dtype=torch.float64)
    linear = jacobian_bounds(net, x - 0.3, x + 0.3, relaxation="linear")
    interval = jacobian_bounds(net, x - 0.3, x + 0.3, relaxation=JacobianRelaxation.INTERVAL)
    width = [float((hi - lo).sum().detach()) for lo, hi in (linear, interval)]
    assert width[0] < width[1]
    assert torch.equal(jacobian_bounds(net, x - 0.3, x + 0.3)[0], linear[0])
    monkeypatch.setattr(module, "LINEAR_WORK_LIMIT", 0)
    assert torch.equal(jacobian_bounds(net, x - 0.3, x + 0.3)[0], interval[0])
    L = lipschitz_constant(net, x - 0.3, x + 0.3, relaxation="auto")
    assert torch.equal(L, lipschitz_constant(net, x - 0.3, x + 0.3, relaxation="interval"))
    with pytest.raises(ValueError, match="tightest"):
        jacobian_bounds(net, x, x, relaxation="tightest")


def test_linear_pass_in_float32_is_sound_and_differentiable():
    """A float32 CNN on 8x8 inputs: sampled Jacobians inside the bounds (1e-5 slack), and the
    bounds' width differentiable in the parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 20),
        nn.Tanh(), nn.Linear(20, 5),
    )  # fmt: skip
    x = torch.rand(4, 1, 8, 8)
    region = Region.ball(x, 0.05, INF, lo=0.0, hi=1.0)
    lo, hi = jacobian_bounds(net, region=region, relaxation="linear")
    assert lo.dtype == torch.float32
    gen = torch.Generator().manual_seed(0)
    for point in sample_points(region, 16, gen):
        J = jacobian(net, point)
        assert bool(((lo - 1e-5 <= J) & (J <= hi + 1e-5)).all())
    (hi - lo).sum().backward()
    for m in (net[0], net[3], net[5]):
        assert m.weight.grad is not None and bool(m.weight.grad.isfinite().all())
        assert float(m.weight.grad.abs().sum()) > 0


@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    kind=st.sampled_from(CONTINUOUS),
    region_kind=st.sampled_from(REGIONS),
    seed=st.integers(0, 10_000),
    eps=st.sampled_from([0.05, 0.3, 1.0]),
    p=st.sampled_from(NORMS),
)
def test_linear_lipschitz_constants_are_sound_and_no_larger(kind, region_kind, seed, eps, p):
    net, shape = make_net(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, *shape, generator=gen, dtype=torch.float64)
    region = make_region(region_kind, x, eps)
    linear = lipschitz_constant(net, region=region, p=p, q=p, relaxation="linear")
    interval = lipschitz_constant(net, region=region, p=p, q=p, relaxation="interval")
    assert bool((linear <= interval).all())
    quotients = _difference_quotients(net, region, gen, p, p, count=32)
    assert bool((quotients <= linear * (1 + 1e-9) + 1e-12).all()), (quotients, linear)


# -- Lipschitz bounds ------------------------------------------------------------------------


def test_lipschitz_bound_table_on_a_fixed_matrix():
    J = torch.tensor([[[1.0, -2.0], [3.0, 0.5]]], dtype=torch.float64)
    M = J.abs()[0]
    expected = {
        (INF, INF): 3.5,
        (1, 1): 4.0,
        (2, 2): float(torch.linalg.matrix_norm(J[0], 2)),
        (2, 1): float(torch.linalg.vector_norm(M, dim=0).max()),  # p = 2 out, q = 1 in
        (INF, 1): 3.0,
        (INF, 2): float(torch.linalg.vector_norm(M, dim=1).max()),
        (1, INF): 6.5,
        (2, INF): float(torch.linalg.vector_norm(M.sum(1))),
        (1, 2): float(torch.linalg.vector_norm(M.sum(0))),
    }
    for (p, q), value in expected.items():
        assert float(lipschitz_bound(J, J, p, q)) == pytest.approx(value), (p, q)
    with pytest.raises(ValueError, match="1, 2 or inf"):
        lipschitz_bound(J, J, 3, 2)


@settings(
    max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    lo=st.lists(st.floats(-2, 2), min_size=6, max_size=6),
    width=st.lists(st.floats(0, 1), min_size=6, max_size=6),
    seed=st.integers(0, 1000),
)
def test_lipschitz_bound_covers_every_matrix_in_the_box(lo, width, seed):
    """Random matrices J of the box and random vectors v: ||J v||_p <= L ||v||_q."""
    low = torch.tensor(lo, dtype=torch.float64).reshape(1, 2, 3)
    high = low + torch.tensor(width, dtype=torch.float64).reshape(1, 2, 3)
    gen = torch.Generator().manual_seed(seed)
    J = low + (high - low) * torch.rand(200, 2, 3, generator=gen, dtype=torch.float64)
    J[:8] = torch.where(torch.rand(8, 2, 3, generator=gen) < 0.5, low, high)  # corners
    v = torch.randn(200, 3, 1, generator=gen, dtype=torch.float64)
    v[:8] = torch.sign(v[:8])
    for p in NORMS:
        for q in NORMS:
            L = float(lipschitz_bound(low, high, p, q))
            out = torch.linalg.vector_norm((J @ v).squeeze(-1), ord=p, dim=-1)
            inp = torch.linalg.vector_norm(v.squeeze(-1), ord=q, dim=-1)
            assert bool((out <= L * inp + 1e-9).all()), (p, q)


def _difference_quotients(net, region, gen, p, q, count=64) -> Tensor:
    """max over sampled pairs (and nearby pairs: the local slope) of ||f(a) - f(b)||_p /
    ||a - b||_q, per sample."""
    best = torch.zeros(region.shape[0], dtype=torch.float64)
    with torch.no_grad():
        for i in range(count):
            a = region.sample(gen)
            b = region.sample(gen) if i % 2 else region.project(a + 1e-4 * torch.randn_like(a))
            num = torch.linalg.vector_norm((net(a) - net(b)).flatten(1), ord=p, dim=1)
            den = torch.linalg.vector_norm((a - b).flatten(1), ord=q, dim=1)
            best = torch.maximum(best, torch.where(den > 0, num / den.clamp_min(1e-300), 0.0))
    return best


@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    kind=st.sampled_from(CONTINUOUS),
    region_kind=st.sampled_from(REGIONS),
    seed=st.integers(0, 10_000),
    eps=st.sampled_from([0.05, 0.3, 1.0]),
    p=st.sampled_from(NORMS),
    q=st.sampled_from(NORMS),
)
def test_lipschitz_bound_exceeds_sampled_difference_quotients(kind, region_kind, seed, eps, p, q):
    net, shape = make_net(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(3, *shape, generator=gen, dtype=torch.float64)
    region = make_region(region_kind, x, eps)
    lo, hi = jacobian_bounds(net, region=region)
    quotients = _difference_quotients(net, region, gen, p, q)
    for L in (lipschitz_bound(lo, hi, p, q), lipschitz_constant(net, region=region, p=p, q=q)):
        assert bool((quotients <= L * (1 + 1e-9) + 1e-12).all()), (quotients, L)


def test_lipschitz_constant_of_a_chain_ending_in_an_activation():
    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2), nn.Sigmoid()
    ).double()  # fmt: skip
    x = torch.rand(4, 3, dtype=torch.float64)
    region = Region.ball(x, 0.3, INF)
    gen = torch.Generator().manual_seed(0)
    for p in NORMS:
        for q in NORMS:
            L = lipschitz_constant(net, region=region, p=p, q=q, method="ibp")
            assert bool((_difference_quotients(net, region, gen, p, q) <= L * (1 + 1e-9)).all())


# -- options, errors, devices --------------------------------------------------------------


def test_outputs_and_C_select_rows():
    net, shape = make_net("sigmoid", 7)
    x = torch.rand(4, *shape, dtype=torch.float64)
    lo, hi = jacobian_bounds(net, x - 0.1, x + 0.1)
    sub = jacobian_bounds(net, x - 0.1, x + 0.1, outputs=[2, 0])
    assert torch.equal(sub[0], lo[:, [2, 0]]) and torch.equal(sub[1], hi[:, [2, 0]])
    y = torch.tensor([0, 1, 2, 1])
    per = jacobian_bounds(net, x - 0.1, x + 0.1, outputs=y[:, None])
    rows = torch.arange(4)
    assert torch.equal(per[0][:, 0], lo[rows, y]) and torch.equal(per[1][:, 0], hi[rows, y])
    # C: the Jacobian of a margin, tighter than the difference of two intervals
    C = torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    c_lo, c_hi = jacobian_bounds(net, x - 0.1, x + 0.1, C=C)
    assert c_lo.shape == (4, 1, *shape)
    assert bool((c_lo[:, 0] >= lo[:, 0] - hi[:, 1] - 1e-12).all())
    assert bool((c_hi[:, 0] <= hi[:, 0] - lo[:, 1] + 1e-12).all())
    J = jacobian(net, x)
    assert_inside((J[:, 0] - J[:, 1]).unsqueeze(1), c_lo, c_hi)
    with pytest.raises(ValueError, match="outputs or C"):
        jacobian_bounds(net, x, x, outputs=[0], C=C)
    with pytest.raises(ValueError, match="outputs must lie"):
        jacobian_bounds(net, x, x, outputs=[3])
    with pytest.raises(ValueError, match="'ibp' or 'crown'"):
        jacobian_bounds(net, x, x, method="alpha_crown")


def test_public_entry_point_and_float32():
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.rand(2, 3)
    lo, hi = propdsl.jacobian_bounds(net, x - 0.05, x + 0.05)
    assert lo.dtype == torch.float32 and lo.shape == (2, 2, 3)
    J = jacobian(net, x)
    assert bool(((lo - 1e-6 <= J) & (J <= hi + 1e-6)).all())


def test_unsupported_layers_are_named():
    net = nn.Sequential(nn.Linear(3, 3), nn.Hardtanh(), nn.Linear(3, 2)).double()
    x = torch.rand(2, 3, dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match="Hardtanh"):
        jacobian_bounds(net, x, x)

    class Square(nn.Module):
        def forward(self, v):
            return v * v

    @register_rule(Square)
    class SquareRule(ActivationRule):
        def function(self, v):
            return v * v

        def ibp(self, *inputs):
            ((lo, hi),) = inputs
            low = torch.where(
                (lo <= 0) & (hi >= 0), torch.zeros_like(lo), torch.minimum(lo**2, hi**2)
            )
            return low, torch.maximum(lo**2, hi**2)

        def relax(self, lower, upper, alpha=None):
            raise NotImplementedError

    from propdsl.verify import REGISTRY

    try:
        net = nn.Sequential(nn.Linear(3, 3), Square(), nn.Linear(3, 2)).double()
        with pytest.raises(UnsupportedLayerError, match="register_derivative\\(SquareRule\\)"):
            jacobian_bounds(net, x - 0.1, x + 0.1, method="ibp")

        @register_derivative(SquareRule)
        def square_derivative(rule, lower, upper):
            return 2 * lower, 2 * upper

        lo, hi = jacobian_bounds(net, x - 0.1, x + 0.1, method="ibp")
        assert_inside(jacobian(net, x), lo, hi)
    finally:
        REGISTRY.pop(Square, None)
        DERIVATIVES.pop(SquareRule, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_matches_the_cpu():
    net, shape = make_net("mixed", 2)
    x = torch.rand(5, *shape, dtype=torch.float64)
    cpu = jacobian_bounds(net, region=Region.ball(x, 0.2, INF, lo=0.0, hi=1.0))
    gpu = jacobian_bounds(net.cuda(), region=Region.ball(x.cuda(), 0.2, INF, lo=0.0, hi=1.0))
    torch.testing.assert_close(gpu[0].cpu(), cpu[0])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1])


# -- explanation bounds ----------------------------------------------------------------------


@settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(seed=st.integers(0, 10_000), spread=st.sampled_from([0.0, 0.05, 0.5, 3.0]))
def test_explanation_bounds_cover_every_map_in_the_box(seed, spread):
    """distance, mse, cosine and top-k bounds against `propdsl.explain` on random maps of the
    box (corners included) and a random reference."""
    from propdsl.explain import cosine, mse, topk_intersection
    from propdsl.verify.jacobian import (
        cosine_lower_bound,
        distance_bound,
        mse_bound,
        topk_lower_bound,
    )

    gen = torch.Generator().manual_seed(seed)
    centre = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    width = spread * torch.rand(2, 6, generator=gen, dtype=torch.float64)
    lo, hi = centre - width, centre + width
    g = centre + 0.3 * torch.randn(2, 6, generator=gen, dtype=torch.float64)
    maps = lo + (hi - lo) * torch.rand(300, 2, 6, generator=gen, dtype=torch.float64)
    maps[:50] = torch.where(torch.rand(50, 2, 6, generator=gen) < 0.5, lo, hi)
    s = maps.reshape(-1, 6)  # every map against its sample's reference and bounds

    def tile(t: Tensor) -> Tensor:
        return t.repeat(maps.shape[0], 1)

    for p in NORMS:
        actual = torch.linalg.vector_norm(s - tile(g), ord=p, dim=1)
        assert bool((actual <= tile(distance_bound(lo, hi, g, p)[:, None])[:, 0] + 1e-12).all())
    assert bool((mse(s, tile(g)) <= tile(mse_bound(lo, hi, g)[:, None])[:, 0] + 1e-12).all())
    low = tile(cosine_lower_bound(lo, hi, g)[:, None])[:, 0]
    assert bool((cosine(s, tile(g)) >= low - 1e-12).all())
    for k in (1, 2, 5):
        low = tile(topk_lower_bound(lo, hi, g, k)[:, None])[:, 0]
        assert bool((topk_intersection(s, tile(g), k) >= low).all())
    # a point box: the bounds are the values themselves
    torch.testing.assert_close(cosine_lower_bound(g, g, g), torch.ones(2, dtype=torch.float64))
    assert bool((topk_lower_bound(g, g, g, 2) == 1.0).all())


def test_cosine_bound_uses_the_ball_around_the_reference_when_tighter():
    from propdsl.explain import cosine
    from propdsl.verify.jacobian import cosine_lower_bound

    # g = (3, 4), the box g +- (0.3, 0.4): within R = 0.5 of g, so cos >= sqrt(1 - 0.1^2); the
    # interval bound is only 22.5 / (5.5 * 5) = 0.818, and the box's worst corner has 0.99517
    g = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    half = torch.tensor([[0.3, 0.4]], dtype=torch.float64)
    low = float(cosine_lower_bound(g - half, g + half, g))
    assert low == pytest.approx(math.sqrt(0.99), abs=1e-12)
    corners = g + half * torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=torch.float64)
    worst = float(cosine(corners, g.expand(4, 2)).min())
    assert worst == pytest.approx(24.3 / (math.sqrt(3.3**2 + 3.6**2) * 5), abs=1e-12)
    assert low <= worst < low + 1e-3


# -- verdicts ----------------------------------------------------------------------------------

VERDICT_SPEC = """\
network f : Tensor[3] -> Tensor[3]
param eps : Real = 0.1
param L : Real = 1.0
param tau : Real = 0.9
param delta : Real = 0.5
let cube = box(0, 1)

property lip(x) =
  forall x1 in ball(x, eps, inf) & cube, x2 in ball(x, eps, inf) & cube:
    norm(f(x1) - f(x2), {p}) <= L * norm(x1 - x2, {q})

property lip_at(x) =
  forall x' in ball(x, eps, inf) & cube:
    norm(f(x') - f(x), {p}) <= norm(x' - x, {q}) * L

property cos(x, y) =
  forall x' in ball(x, eps, inf) & cube:
    cosine(saliency(f, x', y), saliency(f, x, y)) >= tau

property dist(x, y) =
  forall x' in ball(x, eps, inf) & cube:
    delta >= norm(grad(f(x')[y], x') - saliency(f, x, y), {p})

property top(x, y) =
  forall x' in ball(x, eps, inf) & cube:
    topk_overlap(saliency(f, x', y), saliency(f, x, y), 1) >= 1 and
    cosine(gradient_x_input(f, x', y), gradient_x_input(f, x, y)) >= tau
"""
VERDICT_PROPERTIES = ("lip", "lip_at", "cos", "dist", "top")


def _norm_text(p: float) -> str:
    return "inf" if p == INF else str(int(p))


def _violations(name, net, x, y, points, prm) -> Tensor:
    """Which samples the points violate property `name` at (its meaning, by hand)."""
    from propdsl.explain import cosine, gradient_x_input, saliency, topk_intersection

    p, q = prm["p"], prm["q"]
    if name in ("lip", "lip_at"):
        a, b = points if name == "lip" else (points[0], x)
        with torch.no_grad():
            out = torch.linalg.vector_norm(net(a) - net(b), ord=p, dim=1)
        return out > prm["L"] * torch.linalg.vector_norm(a - b, ord=q, dim=1) + 1e-9
    (point,) = points[:1]
    s, g = saliency(net, point, y, create_graph=False), saliency(net, x, y, create_graph=False)
    if name == "cos":
        return cosine(s, g) < prm["tau"] - 1e-9
    if name == "dist":
        return torch.linalg.vector_norm(s - g, ord=p, dim=1) > prm["delta"] + 1e-9
    gx = gradient_x_input(net, point, y, create_graph=False)
    gx0 = gradient_x_input(net, x, y, create_graph=False)
    return (topk_intersection(s, g, 1) < 1) | (cosine(gx, gx0) < prm["tau"] - 1e-9)


def _search(name, net, x, y, region, prm, gen, rounds: int = 40) -> Tensor:
    """An independent search: random points of the region, and for Lipschitz a few ascent steps
    on the difference quotient. Which samples it refutes."""
    found = torch.zeros(x.shape[0], dtype=torch.bool)
    for _ in range(rounds):
        pair = [region.sample(gen), region.sample(gen)]
        found |= _violations(name, net, x, y, pair, prm)
    if name in ("lip", "lip_at"):
        a = region.sample(gen).requires_grad_(True)
        b = (region.sample(gen) if name == "lip" else x.clone()).requires_grad_(name == "lip")
        step = float(prm["eps"]) / 5
        for _ in range(20):
            num = torch.linalg.vector_norm(net(a) - net(b), ord=prm["p"], dim=1)
            den = torch.linalg.vector_norm(a - b, ord=prm["q"], dim=1).clamp_min(1e-9)
            leaves = [a, b] if name == "lip" else [a]
            grads = torch.autograd.grad((num / den).sum(), leaves)
            with torch.no_grad():
                a = region.project(a + step * grads[0].sign()).requires_grad_(True)
                if name == "lip":
                    b = region.project(b + step * grads[1].sign()).requires_grad_(True)
            found |= _violations(name, net, x, y, [a.detach(), b.detach()], prm)
    return found


VERDICT_CASES = dict(
    kind=st.sampled_from(["relu", "tanh", "softplus", "sigmoid"]),
    seed=st.integers(0, 10_000),
    eps=st.sampled_from([0.01, 0.05, 0.2]),
    L=st.sampled_from([0.05, 0.5, 2.0, 8.0]),
    tau=st.sampled_from([0.5, 0.95]),
    delta=st.sampled_from([0.05, 1.0]),
    p=st.sampled_from(NORMS),
    q=st.sampled_from(NORMS),
)


@settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(**VERDICT_CASES)
def test_verified_never_meets_a_counterexample(kind, seed, eps, L, tau, delta, p, q):
    _check_verdicts(kind, seed, eps, L, tau, delta, p, q)


@pytest.mark.slow
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**VERDICT_CASES)
def test_verified_never_meets_a_counterexample_many(kind, seed, eps, L, tau, delta, p, q):
    _check_verdicts(kind, seed, eps, L, tau, delta, p, q)


def _check_verdicts(kind, seed, eps, L, tau, delta, p, q):
    """spec.verify's verdicts against an independent search: never `verified` where the search
    refutes the property; `falsified` points lie in the region (and violate Lipschitz bounds)."""
    from propdsl.loss.attacks import PGD

    net, _ = make_net(kind, seed)
    prm = dict(eps=eps, L=L, tau=tau, delta=delta, p=p, q=q)
    text = VERDICT_SPEC.format(p=_norm_text(p), q=_norm_text(q))
    spec = propdsl.load(text, {"eps": eps, "L": L, "tau": tau, "delta": delta})
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y = net(x).argmax(1)
    falsifier = PGD(steps=5, restarts=1, surrogate_beta=10.0)
    out = spec.verify(net, x, y, list(VERDICT_PROPERTIES), falsifier=falsifier, generator=gen)
    region = Region.ball(x, eps, INF, lo=0.0, hi=1.0)
    for name in VERDICT_PROPERTIES:
        v = out[name]
        assert v.reason is None and UNSUPPORTED not in v.status, (name, v.reason)
        found = _search(name, net, x, y, region, prm, gen)
        for i, status in enumerate(v.status):
            if status == VERIFIED:
                assert not bool(found[i]), (name, i)
                assert float(v.margin[i]) >= 0
            if status == FALSIFIED:
                one = Region.ball(x[i : i + 1], eps, INF, lo=0.0, hi=1.0)
                points = [v.counterexamples[k][i : i + 1] for k in sorted(v.counterexamples)]
                for pt in points:
                    assert bool(one.contains(pt, tol=1e-9).all())
                if name in ("lip", "lip_at"):  # the stored pair violates the property
                    keys = ("x1", "x2") if name == "lip" else ("x'",)
                    pair = [v.counterexamples[k][i : i + 1] for k in keys]
                    assert bool(_violations(name, net, x[i : i + 1], y[i : i + 1], pair, prm))


def test_lipschitz_verdicts_follow_the_bound():
    """L above the certified bound: verified with margin L - bound; L below the local constant
    that sampling finds: falsified, with a stored pair that violates the property."""
    net, _ = make_net("tanh", 4)
    x = torch.rand(5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    region = Region.ball(x, 0.05, INF, lo=0.0, hi=1.0)
    bound = lipschitz_constant(net, region=region, p=2, q=2)
    local = _difference_quotients(net, region, torch.Generator().manual_seed(2), 2, 2)
    text = VERDICT_SPEC.format(p="2", q="2")
    high = float(bound.max()) * 1.01
    spec = propdsl.load(text, {"eps": 0.05, "L": high})
    v = spec.verify(net, x, None, ["lip"])["lip"]
    assert v.status == [VERIFIED] * 5
    torch.testing.assert_close(v.margin, high - bound)
    low = float(local.min()) * 0.5
    spec = propdsl.load(text, {"eps": 0.05, "L": low})
    v = spec.verify(net, x, None, ["lip"])["lip"]
    assert v.status == [FALSIFIED] * 5
    prm = dict(p=2.0, q=2.0, L=low)
    pair = [v.counterexamples["x1"], v.counterexamples["x2"]]
    assert bool(_violations("lip", net, x, None, pair, prm).all())
    assert bool(
        region.contains(pair[0], tol=1e-9).all() and region.contains(pair[1], tol=1e-9).all()
    )


def test_jacobian_queries_from_formulas():
    """Which normal forms take the Jacobian route, and their regions."""
    from propdsl.region import RegionError
    from propdsl.verify.jacobian import JacobianQuery, to_jacobian_query
    from propdsl.verify.query import Unsupported

    net, _ = make_net("tanh", 0)
    x = torch.rand(2, 3, dtype=torch.float64)
    y = torch.tensor([0, 2])
    spec = propdsl.load(
        VERDICT_SPEC.format(p="2", q="inf")
        + """
property lip_far(x) =
  forall x' in ball(x, eps, inf) & box(0.5, 1):
    norm(f(x') - f(x), 1) <= 3 * norm(x - x', 1)
property lip_strict(x) =
  forall x1 in ball(x, eps, inf), x2 in ball(x, eps, inf):
    norm(f(x1) - f(x2), 2) < L * norm(x1 - x2, 2)
property pair_other(x) =
  forall x1 in ball(x, eps, inf), x2 in ball(x, eps, inf):
    f(x1)[0] <= f(x2)[0] + 1
property cos_wrong_way(x, y) =
  forall x' in ball(x, eps, inf):
    cosine(saliency(f, x', y), saliency(f, x, y)) <= tau
property smooth(x, y) =
  forall x' in ball(x, eps, inf):
    cosine(smoothgrad(f, x', y), smoothgrad(f, x, y)) >= tau
"""
    )

    def query(name):
        prop = spec.property(name)
        params = [n for n, _ in prop.params]
        return to_jacobian_query(prop.formula, params, {"f": 3}, x, y, {"f": net})

    for name in VERDICT_PROPERTIES:
        assert isinstance(query(name), JacobianQuery), name
    assert len(query("top").atoms) == 2
    # x lies outside box(0.5, 1) (its ball still meets the box): the region grows to the box
    # hull with x
    x[0], x[1] = 0.45, 0.7
    far = query("lip_far")
    assert far is not None and far.region.centre is None
    assert bool((far.region.bounding_box()[0][0] <= 0.45).all())
    # a ball that misses the box is an empty region: no hull of a point outside it
    x[0] = 0.1
    with pytest.raises(RegionError, match="region of x' is empty"):
        query("lip_far")
    for name in ("pair_other", "cos_wrong_way"):
        assert query(name) is None, name
    with pytest.raises(Unsupported, match="strict Lipschitz") as err:
        query("lip_strict")
    assert err.value.span is not None
    with pytest.raises(Unsupported, match="'smoothgrad' has no certified bounds") as err:
        query("smooth")
    assert err.value.span is not None


@pytest.mark.filterwarnings("ignore:the attack objective's input gradient is exactly zero")
def test_propdsl_verify_decides_lipschitz_and_explanations(tmp_path):
    """End to end: `propdsl verify specs/digits.prop` on a quickly trained run."""
    import json
    from pathlib import Path

    from typer.testing import CliRunner

    from propdsl import cli

    spec = Path(__file__).resolve().parents[1] / "specs" / "digits.prop"
    run = tmp_path / "run"
    runner = CliRunner()
    args = ["train", str(spec), "--out", str(run), "--epochs", "1", "--threads", "1", "-q"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        cli.app,
        ["verify", str(spec), "--run", str(run), "--samples", "10", "--threads", "1"]
        + ["--property", "lipschitz_robust", "--property", "explanation_stable"],
    )
    assert result.exit_code == 0, result.output
    assert "unsupported" not in result.output
    data = json.loads((run / "verify.json").read_text())
    for name in ("lipschitz_robust", "explanation_stable"):
        prop = data["properties"][name]
        assert prop["rates"].get(UNSUPPORTED, 0.0) == 0.0
        for s in prop["per_sample"]:
            if s["status"] == VERIFIED:
                assert s["margin"] >= 0


def test_relaxations_and_methods_are_named_by_their_strings():
    from propdsl.verify.bounds import Method
    from propdsl.verify.jacobian import JacobianRelaxation

    assert JacobianRelaxation(" Linear ") is JacobianRelaxation.LINEAR
    assert JacobianRelaxation("auto") is JacobianRelaxation.AUTO
    assert Method("Alpha-CROWN") is Method.ALPHA_CROWN
    with pytest.raises(ValueError, match="not a valid JacobianRelaxation"):
        JacobianRelaxation("mccormick")


class _Twice(nn.Module):
    """A node read twice by one operation (`h + h`)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        return self.out(h + h)


@pytest.mark.parametrize("relaxation", ["interval", "linear"])
def test_a_node_read_twice_by_one_operation_counts_twice_not_four_times(relaxation):
    # Regression: the linear pass visited the consumer once per reading and summed both
    # readings each time, so `h + h` counted 4 h and the bounds missed the true Jacobian.
    torch.manual_seed(0)
    net = _Twice()
    x = torch.randn(2, 3)
    lo, hi = jacobian_bounds(net, x - 0.1, x + 0.1, relaxation=relaxation)
    for k in range(20):
        z = x + 0.2 * (torch.rand(x.shape, generator=torch.Generator().manual_seed(k)) - 0.5)
        J = torch.func.vmap(torch.func.jacrev(net))(z)
        assert bool(((J >= lo - 1e-6) & (J <= hi + 1e-6)).all())
