"""Bound propagation (IBP, CROWN, alpha-CROWN): soundness first, then tightness.

Soundness: on random small networks of every supported layer and random regions (boxes, and
L-inf / L2 / L1 balls with or without a box), sampled points, box corners and the points a small
PGD attack finds all lie within the bounds, with and without a specification matrix C.
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

from propdsl.models import Normalize
from propdsl.region import Region
from propdsl.verify import (
    REGISTRY,
    AlphaOptions,
    ElementwiseLinearRule,
    Method,
    UnsupportedLayerError,
    bounds,
    compute_bounds,
    register_rule,
)

INF = math.inf
SLACK = 1e-5
ALPHA = AlphaOptions(iterations=4, lr=0.2)
METHODS = (Method.IBP, Method.CROWN_IBP, Method.CROWN, Method.ALPHA_CROWN)


# -- models ----------------------------------------------------------------------------------


class ResidualMLP(nn.Module):
    """A user module: residual addition, functional activations, flatten and view calls."""

    def __init__(self, d_in: int, width: int = 6):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.flatten(x, 1)
        h = F.relu(self.inp(h))
        h = h + self.fc2(torch.relu(self.fc1(h)))
        h = torch.tanh(h).view(h.size(0), -1)
        return self.out(0.5 * h - 0.25) / 2


class ResidualCNN(nn.Module):
    """Convolutions with a skip connection and functional pooling / activations."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(x), 0.1)
        h = h - F.softplus(self.conv2(h), beta=2.0)
        h = F.avg_pool2d(h, 2)
        return self.head(h.reshape(h.shape[0], -1))


class LayoutCNN(nn.Module):
    """Padding (zero and constant), permutations, transposes and concatenations (the layout
    operations of imported ONNX graphs) around a convolution."""

    def __init__(self):
        super().__init__()
        self.pad = nn.ZeroPad2d((1, 0, 0, 1))
        self.conv = nn.Conv2d(1, 2, 2)
        self.head = nn.Linear(32 + 32 + 40, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(self.pad(x)))  # [2, 4, 4]
        a = h.permute(0, 2, 3, 1)
        b = torch.transpose(F.pad(h, (0, 1), value=0.5), 1, 3)  # [5, 4, 2]
        c = torch.cat([a.flatten(1), torch.tanh(a).flatten(1), b.flatten(1)], dim=1)
        return self.head(c)


def _mlp(act: nn.Module, d_in: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, 7), act, nn.Linear(7, 7), act, nn.Linear(7, 3))


def _randomise_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            with torch.no_grad():
                m.weight.copy_(1 + 0.5 * torch.randn(n, generator=gen))
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))


# name -> (factory, per-sample input shape)
MODELS: dict[str, tuple] = {
    "relu": (lambda: _mlp(nn.ReLU()), (3,)),
    "leaky_relu": (lambda: _mlp(nn.LeakyReLU(0.1)), (3,)),
    "leaky_relu_negative": (lambda: _mlp(nn.LeakyReLU(-0.4)), (3,)),
    "leaky_relu_steep": (lambda: _mlp(nn.LeakyReLU(1.6)), (3,)),
    "tanh": (lambda: _mlp(nn.Tanh()), (3,)),
    "sigmoid": (lambda: _mlp(nn.Sigmoid()), (3,)),
    "softplus": (lambda: _mlp(nn.Softplus(beta=2.0)), (3,)),
    "batchnorm_dropout": (
        lambda: nn.Sequential(
            nn.Flatten(),
            nn.Linear(4, 6),
            nn.BatchNorm1d(6),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Identity(),
            nn.Linear(6, 3),
        ).eval(),
        (2, 2),
    ),
    "cnn": (
        lambda: nn.Sequential(
            Normalize(0.5, 0.25),
            nn.Conv2d(1, 3, 3, padding=1),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(3, 4, 2, stride=1),
            nn.Sigmoid(),
            nn.Dropout(0.5),
            nn.Flatten(),
            nn.Linear(4, 3),
        ).eval(),
        (1, 4, 4),
    ),
    "residual_mlp": (lambda: ResidualMLP(3), (3,)),
    "residual_cnn": (lambda: ResidualCNN(), (1, 4, 4)),
    "layout_cnn": (lambda: LayoutCNN(), (1, 4, 4)),
}


def make_model(name: str, seed: int) -> tuple[nn.Module, tuple[int, ...]]:
    factory, shape = MODELS[name]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory()
    _randomise_batchnorm(model, gen)
    return model, shape


# -- regions ---------------------------------------------------------------------------------

REGION_KINDS = ("box", "linf", "linf_clip", "l2", "l2_clip", "l1", "l1_clip")


def make_region(kind: str, centre: Tensor, eps: float, spread: Tensor) -> Region:
    """`spread` in [0, 1] shapes the box of kind 'box' around the centre."""
    if kind == "box":
        return Region.box(centre - eps * spread, centre + eps * (1 - spread))
    p = {"linf": INF, "l2": 2, "l1": 1}[kind.split("_")[0]]
    # L1 / L2 radii grow with the dimension so the balls are not negligibly small.
    radius = eps * (1 if p == INF else math.sqrt(centre[0].numel()) if p == 2 else 2.0)
    if kind.endswith("_clip"):
        return Region.ball(centre, radius, p, lo=0.0, hi=1.0)
    return Region.ball(centre, radius, p)


def repeat_region(kind: str, centre: Tensor, eps: float, spread: Tensor, k: int) -> Region:
    reps = (k, *([1] * (centre.dim() - 1)))
    return make_region(kind, centre.repeat(reps), eps, spread.repeat(reps))


# -- points to check -------------------------------------------------------------------------


def spec_values(model: nn.Module, x: Tensor, C: Tensor | None) -> Tensor:
    """[N, B, ...] points -> [N, B, S] values of C @ f (or the flattened outputs)."""
    n, b = x.shape[:2]
    y = model(x.reshape(n * b, *x.shape[2:])).reshape(n, b, -1)
    if C is None:
        return y
    Cb = C if C.dim() == 3 else C.expand(b, *C.shape)
    return torch.einsum("nbo,bso->nbs", y, Cb)


def pgd_points(
    model: nn.Module, kind: str, centre: Tensor, eps: float, spread: Tensor, C, steps: int = 12
) -> Tensor:
    """Every iterate of a sign-gradient attack on each spec row, both directions: [N, B, ...]."""
    b = centre.shape[0]
    rows = C.shape[-2] if C is not None else math.prod(model(centre[:1]).shape[1:])
    k = 2 * rows
    region = repeat_region(kind, centre, eps, spread, k)
    weights = torch.eye(rows).repeat_interleave(b, dim=0)  # [rows * b, rows]
    weights = torch.cat([weights, -weights])  # maximise and minimise
    lo, hi = region.bounding_box()
    step = (hi - lo).flatten(1).amax(1).clamp_min(1e-6) / 4
    step = step.reshape(-1, *([1] * (centre.dim() - 1)))
    x = region.sample(torch.Generator().manual_seed(1))
    points = []
    for i in range(steps):
        x = x.detach().requires_grad_(True)
        vals = spec_values(model, x.reshape(k, b, *x.shape[1:]), C).reshape(k * b, rows)
        (grad,) = torch.autograd.grad((vals * weights).sum(), x)
        x = region.project(x + step * (0.7**i) * grad.sign()).detach()
        points.append(x.reshape(k, b, *x.shape[1:]))
    return torch.cat(points)


def corner_points(kind: str, region: Region, n_max: int = 6) -> Tensor | None:
    """The corners of a box or an L-inf ball & box (small inputs only): [2^n, B, ...]."""
    if kind not in ("box", "linf", "linf_clip"):
        return None
    lo, hi = region.bounding_box()
    n = lo[0].numel()
    if n > n_max:
        return None
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)))  # [2^n, n]
    flat_lo, flat_hi = lo.flatten(1), hi.flatten(1)
    corners = flat_lo + bits[:, None, :] * (flat_hi - flat_lo)
    return corners.reshape(len(bits), *lo.shape)


def sample_points(region: Region, k: int = 64) -> Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.stack([region.sample(gen) for _ in range(k)])


def assert_sound(lb: Tensor, ub: Tensor, values: Tensor, what: str) -> None:
    lb, ub = lb.reshape(values.shape[1:]), ub.reshape(values.shape[1:])
    low = (lb - values).max().item()
    high = (values - ub).max().item()
    assert low <= SLACK and high <= SLACK, f"{what}: bound violated by {max(low, high):.3g}"


def check_soundness(name: str, seed: int, kind: str, eps: float, batch_c: bool | None) -> None:
    model, shape = make_model(name, seed)
    gen = torch.Generator().manual_seed(seed)
    centre = torch.rand(2, *shape, generator=gen)
    spread = torch.rand(2, *shape, generator=gen)
    region = make_region(kind, centre, eps, spread)
    C = None
    if batch_c is not None:
        C = torch.randn(2, 2, 3, generator=gen) if batch_c else torch.randn(2, 3, generator=gen)
    with torch.no_grad():
        pts = [sample_points(region)]
        corners = corner_points(kind, region)
        if corners is not None:
            pts.append(corners)
    pts.append(pgd_points(model, kind, centre, eps, spread, C))
    with torch.no_grad():
        values = spec_values(model, torch.cat(pts), C)
    for method in METHODS:
        lb, ub = compute_bounds(model, region, method, C, ALPHA)
        assert bool((lb <= ub + SLACK).all()), f"{name} {method}: lb > ub"
        assert_sound(lb, ub, values, f"{name} {method.value} {kind} eps={eps} C={batch_c}")


# -- soundness -------------------------------------------------------------------------------

EPS = st.sampled_from([0.0, 0.01, 0.1, 0.3, 1.0])


@pytest.mark.parametrize("name", sorted(MODELS))
@settings(
    max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    seed=st.integers(0, 10_000),
    kind=st.sampled_from(REGION_KINDS),
    eps=EPS,
    batch_c=st.sampled_from([None, False, True]),
)
def test_sound_on_every_layer(name: str, seed: int, kind: str, eps: float, batch_c) -> None:
    check_soundness(name, seed, kind, eps, batch_c)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**9),
    kind=st.sampled_from(REGION_KINDS),
    eps=EPS,
    batch_c=st.sampled_from([None, False, True]),
)
def test_sound_on_every_layer_many(name: str, seed: int, kind: str, eps: float, batch_c) -> None:
    check_soundness(name, seed, kind, eps, batch_c)


# -- exactness and tightness -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["crown", "crown_ibp"])
@pytest.mark.parametrize("with_c", [False, True])
def test_crown_is_exact_on_a_linear_layer(with_c: bool, method: str) -> None:
    torch.manual_seed(3)
    layer = nn.Linear(4, 3)
    x = torch.rand(5, 4)
    lo, hi = x - 0.2, x + 0.1
    C = torch.randn(2, 3) if with_c else None
    corners = corner_points("box", Region.box(lo, hi))
    assert corners is not None
    with torch.no_grad():
        values = spec_values(layer, corners, C)
    lb, ub = bounds(layer, lo, hi, method=method, C=C)
    torch.testing.assert_close(lb, values.amin(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(ub, values.amax(0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("p", [1, 2])
def test_crown_is_exact_on_a_linear_layer_over_a_ball(p: float) -> None:
    torch.manual_seed(4)
    layer = nn.Linear(5, 2)
    centre, r = torch.rand(3, 5), 0.3
    lb, ub = bounds(layer, region=Region.ball(centre, r, p))
    dual = INF if p == 1 else 2
    spread = r * torch.linalg.vector_norm(layer.weight, ord=dual, dim=1)
    with torch.no_grad():
        mid = layer(centre)
    torch.testing.assert_close(lb, mid - spread, atol=1e-6, rtol=0)
    torch.testing.assert_close(ub, mid + spread, atol=1e-6, rtol=0)


def test_ball_bounds_beat_the_bounding_box() -> None:
    torch.manual_seed(5)
    net = _mlp(nn.ReLU(), d_in=6)
    centre = torch.rand(4, 6)
    ball = Region.ball(centre, 0.5, 2)
    lo, hi = ball.bounding_box()
    for method in ("ibp", "crown"):
        with torch.no_grad():
            lb_ball, ub_ball = bounds(net, region=ball, method=method)
            lb_box, ub_box = bounds(net, lo, hi, method=method)
        assert bool((lb_ball >= lb_box - 1e-6).all() and (ub_ball <= ub_box + 1e-6).all())
        assert float((ub_ball - lb_ball).sum()) < float((ub_box - lb_box).sum())


@pytest.mark.parametrize("seed", range(4))
@torch.no_grad()
def test_crown_is_tighter_than_ibp_on_relu_mlps(seed: int) -> None:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 4))
    x = torch.rand(8, 5)
    region = Region.ball(x, 0.1, INF)
    lb_i, ub_i = compute_bounds(net, region, "ibp")
    lb_c, ub_c = compute_bounds(net, region, "crown")
    # Intersected with IBP: never looser, element by element.
    assert bool((lb_c >= lb_i - 1e-6).all() and (ub_c <= ub_i + 1e-6).all())
    # Pure CROWN: tighter in total.
    lb_p, ub_p = compute_bounds(net, region, "crown", intersect_ibp=False)
    assert float((ub_p - lb_p).sum()) < float((ub_i - lb_i).sum())


@pytest.mark.parametrize(
    "act", [nn.ReLU(), nn.LeakyReLU(0.2), nn.Tanh(), nn.Sigmoid(), nn.Softplus()]
)
@torch.no_grad()  # alpha-CROWN optimises with autograd even so
def test_alpha_crown_is_never_looser_and_strictly_tighter_when_crown_is_loose(act) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), act, nn.Linear(16, 16), act, nn.Linear(16, 3))
    x = torch.rand(6, 4)
    eps = 0.5 if isinstance(act, nn.Sigmoid | nn.Softplus) else 0.25
    C = torch.tensor([[1.0, -1.0, 0.0], [0.0, 1.0, -1.0]])
    lb_c, ub_c = bounds(net, x - eps, x + eps, method="crown", C=C)
    lb_a, ub_a = bounds(net, x - eps, x + eps, method="alpha_crown", C=C)
    assert bool((lb_a >= lb_c - 1e-6).all() and (ub_a <= ub_c + 1e-6).all())
    # The guard against frozen slopes (torch >= 2.14 clamp gradients): the bound must move.
    gain = float((lb_a - lb_c).sum() + (ub_c - ub_a).sum())
    assert gain > 1e-3 * float((ub_c - lb_c).sum())


@torch.no_grad()
def test_alpha_crown_moves_relu_slopes_initialised_at_zero_and_one() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 2))
    x = torch.rand(4, 3)
    # Only the output's slopes (one hidden layer: the intermediate bounds are exact anyway).
    opts = AlphaOptions(iterations=10, lr=0.1, optimize_intermediate=False)
    lb_c, _ = bounds(net, x - 0.3, x + 0.3, method="crown")
    lb_a, _ = bounds(net, x - 0.3, x + 0.3, method="alpha_crown", options=opts)
    assert float((lb_a - lb_c).sum()) > 1e-3


def test_alpha_options_validation() -> None:
    with pytest.raises(ValueError):
        AlphaOptions(iterations=-1)
    with pytest.raises(ValueError):
        AlphaOptions(lr=0.0)
    with pytest.raises(TypeError):
        AlphaOptions(iterations=2.5)  # type: ignore[arg-type]
    net = _mlp(nn.ReLU())
    x = torch.rand(2, 3)
    lb_c, ub_c = bounds(net, x - 0.1, x + 0.1, method="crown")
    lb_0, ub_0 = bounds(
        net, x - 0.1, x + 0.1, method="alpha_crown", options=AlphaOptions(iterations=0)
    )
    torch.testing.assert_close(lb_0, lb_c.detach())


# -- API -------------------------------------------------------------------------------------


def test_methods_by_name_and_shapes() -> None:
    net = _mlp(nn.ReLU())
    x = torch.rand(3, 3)
    for name in ("ibp", "CROWN", "alpha-crown", "alpha_crown", "CROWN-IBP", Method.IBP):
        lb, ub = bounds(net, x - 0.1, x + 0.1, method=name)
        assert lb.shape == ub.shape == (3, 3)
    lb, ub = bounds(net, x - 0.1, x + 0.1, C=torch.randn(3, 5, 3))
    assert lb.shape == (3, 5)
    with pytest.raises(ValueError, match="unknown bound method"):
        bounds(net, x, x, method="deeppoly")
    with pytest.raises(ValueError, match="C must be"):
        bounds(net, x, x, C=torch.randn(2, 4))
    with pytest.raises(ValueError, match="either"):
        bounds(net, x, x, region=Region.box(x, x))
    with pytest.raises(ValueError, match="exceed"):
        bounds(net, x + 1, x)


def test_box_and_region_agree_and_points_give_exact_bounds() -> None:
    net = _mlp(nn.Tanh())
    x = torch.rand(3, 3)
    y = net(x)
    for method in METHODS:
        lb, ub = bounds(net, x, x, method=method)
        torch.testing.assert_close(lb, y.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(ub, y.detach(), atol=1e-5, rtol=0)
        a = bounds(net, x - 0.1, x + 0.1, method=method)
        b = bounds(net, region=Region.box(x - 0.1, x + 0.1), method=method)
        torch.testing.assert_close(a, b)


def test_output_shape_without_c_keeps_the_model_output_shape() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU())
    x = torch.rand(2, 1, 4, 4)
    lb, ub = bounds(net, x - 0.1, x + 0.1)
    assert lb.shape == ub.shape == (2, 2, 4, 4)


def test_float64_and_gradients_reach_the_weights() -> None:
    net = _mlp(nn.Softplus()).double()
    x = torch.rand(2, 3, dtype=torch.float64)
    lb, ub = bounds(net, x - 0.1, x + 0.1, method="crown")
    assert lb.dtype == torch.float64
    (ub - lb).sum().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads if g is not None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda() -> None:
    model, shape = make_model("cnn", 0)
    model = model.cuda()
    x = torch.rand(3, *shape, device="cuda")
    C = torch.randn(2, 3, device="cuda")
    for method in METHODS:
        lb, ub = bounds(model, x - 0.05, x + 0.05, method=method, C=C, options=ALPHA)
        assert lb.device.type == "cuda" and lb.shape == (3, 2)
        values = spec_values(model, x[None], C)[0]
        assert bool((lb <= values + SLACK).all() and (values <= ub + SLACK).all())


# -- unsupported layers and extension --------------------------------------------------------


class _Max(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.abs(x)


class _Product(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * x


def test_unsupported_layers_are_named_with_the_rule_to_register() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Softmax(1), nn.Flatten(), nn.Linear(2, 1))
    x = torch.rand(1, 1, 6, 6)
    with pytest.raises(UnsupportedLayerError, match=r"layer '1' \(nn\.Softmax\).*register_rule"):
        bounds(net, x, x)
    with pytest.raises(UnsupportedLayerError, match=r"torch\.abs.*register_rule"):
        bounds(_Max(), x, x)
    with pytest.raises(UnsupportedLayerError, match="product"):
        bounds(_Product(), x, x)
    bn = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(UnsupportedLayerError, match="eval"):
        bounds(bn, torch.zeros(2, 2), torch.ones(2, 2))


class Scale(nn.Module):
    def __init__(self, s: float):
        super().__init__()
        self.s = s

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow: cannot be traced
            return x * self.s
        return x * self.s


@pytest.fixture
def clean_registry():
    saved = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(saved)


@pytest.mark.usefixtures("clean_registry")
def test_a_new_layer_is_one_new_class() -> None:
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), Scale(-2.0), nn.Linear(3, 1))
    x = torch.rand(2, 2)
    with pytest.raises(UnsupportedLayerError, match="cannot trace"):
        bounds(net, x - 0.1, x + 0.1)

    @register_rule(Scale)
    class ScaleRule(ElementwiseLinearRule):
        def terms(self):
            return [self.call.module.s], None

    lb, ub = bounds(net, x - 0.1, x + 0.1)
    y = net(x)
    assert bool((lb <= y).all() and (y <= ub).all())


@pytest.mark.usefixtures("clean_registry")
def test_a_rule_with_interval_bounds_only_serves_ibp() -> None:
    from propdsl.verify import BoundRule

    @register_rule(nn.Hardtanh)
    class HardtanhRule(BoundRule):
        def ibp(self, *inputs):
            ((lo, hi),) = inputs
            return lo.clamp(-1, 1), hi.clamp(-1, 1)

    net = nn.Sequential(nn.Linear(2, 3), nn.Hardtanh(), nn.Linear(3, 1))
    x = torch.rand(2, 2)
    lb, ub = bounds(net, x - 0.5, x + 0.5, method="ibp")
    y = net(x)
    assert bool((lb <= y).all() and (y <= ub).all())
    with pytest.raises(UnsupportedLayerError, match="HardtanhRule has interval bounds only"):
        bounds(net, x - 0.5, x + 0.5, method="crown")


# -- the bound-propagation package as an oracle ----------------------------------------------


@pytest.fixture(scope="module")
def bp():
    pytest.importorskip("bound_propagation")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import bound_propagation

    return bound_propagation


def _oracle_net(act: nn.Module, seed: int, d_in: int = 5) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 12), act, nn.Linear(12, 12), act, nn.Linear(12, 4))


@pytest.mark.parametrize(
    "act", [nn.ReLU(), nn.Tanh(), nn.Sigmoid()], ids=["relu", "tanh", "sigmoid"]
)
@pytest.mark.parametrize("seed", range(3))
def test_matches_bound_propagation(bp, act: nn.Module, seed: int, clean_registry) -> None:
    """Same IBP; same CROWN and CROWN-IBP when our S-shape bisection takes its 10 steps, our
    output bounds are not intersected with IBP's, and its ReLU uses CROWN's adaptive lower
    slope."""
    from propdsl.verify.layers import SigmoidRule, TanhRule

    @register_rule(nn.Sigmoid)
    class Sigmoid10(SigmoidRule):
        bisection_steps = 10

    @register_rule(nn.Tanh)
    class Tanh10(TanhRule):
        bisection_steps = 10

    net = _oracle_net(act, seed)
    x = torch.rand(6, 5)
    lo, hi = x - 0.3, x + 0.3
    oracle = bp.BoundModelFactory(adaptive_relu=True).build(net)
    box = bp.HyperRectangle(lo, hi)
    with torch.no_grad():
        ibp = oracle.ibp(box)
        crown = oracle.crown(box).concretize()
        crown_ibp = oracle.crown_ibp(box).concretize()
    lb, ub = bounds(net, lo, hi, method="ibp")
    torch.testing.assert_close(lb, ibp.lower, atol=1e-6, rtol=0)
    torch.testing.assert_close(ub, ibp.upper, atol=1e-6, rtol=0)
    # CROWN-IBP's wider interval pre-activation bounds leave 10 bisection steps a coarser
    # tangent point on Tanh / Sigmoid: the two libraries' rounding differs by up to ~2e-5.
    for method, theirs, tol in (("crown", crown, 1e-5), ("crown_ibp", crown_ibp, 1e-4)):
        lb, ub = compute_bounds(net, Region.box(lo, hi), method, intersect_ibp=False)
        torch.testing.assert_close(lb, theirs.lower, atol=tol, rtol=0)
        torch.testing.assert_close(ub, theirs.upper, atol=tol, rtol=0)


@pytest.mark.parametrize("seed", range(3))
def test_spec_matches_bound_propagation_with_c_folded_into_the_last_layer(bp, seed: int) -> None:
    net = _oracle_net(nn.ReLU(), seed)
    C = torch.randn(3, 4)
    merged = nn.Sequential(*net[:-1], nn.Linear(12, 3))
    with torch.no_grad():
        merged[-1].weight.copy_(C @ net[-1].weight)
        merged[-1].bias.copy_(C @ net[-1].bias)
    x = torch.rand(4, 5)
    lo, hi = x - 0.2, x + 0.2
    oracle = bp.BoundModelFactory(adaptive_relu=True).build(merged)
    box = bp.HyperRectangle(lo, hi)
    with torch.no_grad():
        ibp, crown = oracle.ibp(box), oracle.crown(box).concretize()
        crown_ibp = oracle.crown_ibp(box).concretize()
    lb, ub = bounds(net, lo, hi, method="ibp", C=C)
    torch.testing.assert_close(lb, ibp.lower, atol=1e-5, rtol=0)
    torch.testing.assert_close(ub, ibp.upper, atol=1e-5, rtol=0)
    for method, theirs in (("crown", crown), ("crown_ibp", crown_ibp)):
        lb, ub = compute_bounds(net, Region.box(lo, hi), method, C=C, intersect_ibp=False)
        torch.testing.assert_close(lb, theirs.lower, atol=1e-5, rtol=0)
        torch.testing.assert_close(ub, theirs.upper, atol=1e-5, rtol=0)


def test_auto_lirpa_backend_agrees_when_installed() -> None:
    pytest.importorskip("auto_LiRPA")
    from propdsl.verify.lirpa import lirpa_bounds

    net = _oracle_net(nn.ReLU(), 0)
    x = torch.rand(3, 5)
    region = Region.ball(x, 0.1)
    C = torch.randn(2, 4)
    for method in ("ibp", "crown_ibp", "crown"):
        ours = compute_bounds(net, region, method, C, intersect_ibp=False)
        theirs = lirpa_bounds(net, region, method, C)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["ibp", "crown", "alpha_crown"])
def test_softplus_with_a_small_threshold_is_bounded_soundly(method):
    # torch's softplus switches to x above threshold / beta; with threshold 1 the smooth formula
    # lies 0.31 above it there. The relaxation must hold for torch's function, not the formula.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(3, 16),
        nn.Softplus(beta=1.0, threshold=1.0),
        nn.Linear(16, 16),
        nn.Softplus(beta=2.0, threshold=0.5),
        nn.Linear(16, 4),
    )
    x = torch.randn(8, 3)
    eps = 0.5
    lb, ub = bounds(net, x - eps, x + eps, method=method)
    samples = x[:, None, :] + (2 * torch.rand(8, 4000, 3) - 1) * eps
    with torch.no_grad():
        out = net(samples.reshape(-1, 3)).reshape(8, 4000, 4)
    assert bool((out >= lb[:, None, :] - 1e-5).all()) and bool((out <= ub[:, None, :] + 1e-5).all())


def test_softplus_interval_is_the_exact_range_of_torchs_function():
    # threshold 1: softplus(0.9) = 1.241 but softplus(1.01) = 1.01 (torch returns x there)
    net = nn.Sequential(nn.Softplus(beta=1.0, threshold=1.0))
    lo = torch.tensor([[0.9, -2.0, 1.5, 0.9, -0.5]])
    hi = torch.tensor([[1.01, -1.0, 2.0, 3.0, 1.0]])
    lb, ub = bounds(net, lo, hi, method="ibp")
    grid = lo + (hi - lo) * torch.linspace(0, 1, 200_001)[:, None]
    values = nn.functional.softplus(grid, 1.0, 1.0)
    torch.testing.assert_close(lb[0], values.min(0).values, atol=1e-4, rtol=0)
    torch.testing.assert_close(ub[0], values.max(0).values, atol=1e-4, rtol=0)
    assert bool((values >= lb).all()) and bool((values <= ub).all())
