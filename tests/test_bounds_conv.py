"""Convolutions without dense matrices: windowed rows (patches), transposed convolutions and the
closed-form bounds of affine maps of L2 / L1 balls, checked against dense computations and
against sampling."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from propdsl.region import Region
from propdsl.verify.bounds import _Propagation, compute_bounds
from propdsl.verify.graph import build_graph
from propdsl.verify.patches import Patches, addcmul, times, unit_patches, writable

D = torch.float64  # exact comparisons: float64 throughout


class Residual(nn.Module):
    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, 4, 3, stride=stride, padding=1)
        self.shortcut = nn.Conv2d(channels, 4, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, dilation=1)
        self.fc = nn.LazyLinear(3)

    def forward(self, x):
        y = torch.relu(self.conv1(self.bn(x)))
        y = y + self.shortcut(x)
        y = torch.relu(self.conv2(y))
        return self.fc(y.flatten(1))


def _conv_net(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "stride":
        net = nn.Sequential(
            nn.Conv2d(2, 4, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=0), nn.ReLU(),
            nn.Flatten(), nn.LazyLinear(3),
        )  # fmt: skip
    elif kind == "dilation":
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=1, padding=1, dilation=1), nn.Tanh(),
            nn.Flatten(), nn.LazyLinear(3),
        )  # fmt: skip
    elif kind == "groups":
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4), nn.ReLU(),
            nn.Flatten(), nn.LazyLinear(3),
        )  # fmt: skip
    elif kind == "pool_bn":
        net = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
            nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, padding=1), nn.Sigmoid(),
            nn.Flatten(), nn.LazyLinear(3),
        )  # fmt: skip
    else:
        net = Residual(2, 2)
    net(torch.zeros(1, 2, 8, 8))  # materialise the lazy layer
    net = net.to(D)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1.5, 1.5)
    return net.eval()


KINDS = ["stride", "dilation", "groups", "pool_bn", "residual"]


def _region(kind: str, x: torch.Tensor, eps: float) -> Region:
    if kind == "box":
        return Region.ball(x, eps, math.inf, lo=0.0, hi=1.0)
    if kind == "l2":
        return Region.ball(x, eps * 4, 2)
    return Region.ball(x, eps * 8, 1, lo=0.0, hi=1.0)


def _propagation(net: nn.Module, region: Region) -> _Propagation:
    lo, hi = region.bounding_box()
    graph = build_graph(net, ((lo[:1] + hi[:1]) / 2).repeat(2, 1, 1, 1))
    prop = _Propagation(graph, region, lo, hi)
    prop.run_crown()
    return prop


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ball", ["box", "l2", "l1"])
def test_windowed_rows_equal_dense_rows(kind, ball):
    # The backward pass from every 3-d node with windowed rows gives the rows and the bounds of
    # the dense backward pass from unit vectors.
    net = _conv_net(kind, 0)
    x = torch.rand(3, 2, 8, 8, dtype=D)
    prop = _propagation(net, _region(ball, x, 0.05))
    checked = 0
    for node in prop.graph.nodes[1:]:
        if len(node.shape) != 3 or node.index == prop.graph.output:
            continue
        n = math.prod(node.shape)
        rows = torch.arange(n)
        A_p, b_p = prop.backward(node.index, unit_patches(tuple(node.shape), rows, x))
        A_d, b_d = prop.backward(node.index, prop._unit_spec(node.index, rows))
        dense_p = A_p.to_dense() if not isinstance(A_p, torch.Tensor) else A_p
        torch.testing.assert_close(dense_p.expand_as(A_d), A_d.expand_as(dense_p))
        torch.testing.assert_close(
            torch.as_tensor(b_p).expand(3, 2 * n), torch.as_tensor(b_d).expand(3, 2 * n)
        )
        torch.testing.assert_close(prop.concretize(A_p, b_p), prop.concretize(A_d, b_d))
        checked += 1
    assert checked >= 2


@pytest.mark.parametrize(
    "stride,padding,dilation,groups",
    [(1, 0, 1, 1), (2, 1, 1, 1), (3, 2, 2, 1), (1, 1, 1, 2), (2, 0, 1, 4), (2, 3, 2, 2)],
)
def test_conv_backward_equals_its_dense_matrix(stride, padding, dilation, groups):
    # The transposed convolution of A's rows equals A times the layer's matrix (built here
    # from the images of the unit inputs, as the previous dense implementation did).
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 4, 3, stride=stride, padding=padding, dilation=dilation, groups=groups)
    conv = conv.to(D)
    from propdsl.verify.layers import Conv2dRule

    graph = build_graph(conv, torch.zeros(2, 4, 9, 7, dtype=D))
    rule = graph.nodes[1].rule
    assert isinstance(rule, Conv2dRule)
    in_shape, out_shape = graph.nodes[0].shape, graph.nodes[1].shape
    n_in = math.prod(in_shape)
    with torch.no_grad():
        images = conv(torch.eye(n_in, dtype=D).reshape(n_in, *in_shape)) - conv.bias[:, None, None]
    M = images.reshape(n_in, -1)  # [inputs, outputs]
    for rows in (5, 300):  # few rows: a transposed convolution; many: the layer's matrix
        A = torch.randn(2, rows, *out_shape, dtype=D)
        (coeff,), bias = rule.backward(A)
        torch.testing.assert_close(coeff.reshape(2, rows, -1), A.reshape(2, rows, -1) @ M.T)
        torch.testing.assert_close(bias, (A * conv.bias[:, None, None]).flatten(2).sum(-1))
    A = torch.randn(2, 5, *out_shape, dtype=D)
    (abs_coeff,) = rule.abs_backward(A.abs())
    torch.testing.assert_close(abs_coeff.reshape(2, 5, -1), A.abs().reshape(2, 5, -1) @ M.T.abs())
    v = torch.rand(1, *in_shape, dtype=D)
    torch.testing.assert_close(rule.forward_dual(v, 2.0).flatten(), M.T.square() @ v.flatten())
    torch.testing.assert_close(
        rule.forward_dual(v, math.inf).flatten(), (M.T.abs() * v.flatten()).amax(1)
    )


@pytest.mark.parametrize("side,matrix", [(8, True), (10, False)])
def test_conv_backward_takes_the_matrix_on_small_images_only(side, matrix):
    # Many rows: on an image up to 8 times the kernel's area the layer's matrix, beyond it the
    # transposed convolution (less work per row); the same coefficients either way.
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).to(D)
    graph = build_graph(conv, torch.zeros(2, 2, side, side, dtype=D))
    rule = graph.nodes[1].rule
    in_shape, out_shape = graph.nodes[0].shape, graph.nodes[1].shape
    n_in = math.prod(in_shape)
    A = torch.randn(2, 2 * n_in, *out_shape, dtype=D)  # rows enough for the matrix by size
    assert (rule._small_matrix(A) is not None) == matrix
    with torch.no_grad():
        images = conv(torch.eye(n_in, dtype=D).reshape(n_in, *in_shape)) - conv.bias[:, None, None]
    (coeff,), _ = rule.backward(A)
    torch.testing.assert_close(
        coeff.reshape(*A.shape[:2], -1), A.reshape(*A.shape[:2], -1) @ images.reshape(n_in, -1).T
    )


class Prefix(nn.Module):
    """Element-wise maps around one mixing layer: a direct chain."""

    def __init__(self, mixing: nn.Module):
        super().__init__()
        self.bn = nn.BatchNorm2d(2)
        self.mixing = mixing
        self.scale = torch.linspace(-2, 2, 4, dtype=D).reshape(4, 1, 1)

    def forward(self, x):
        return (self.mixing(self.bn(2.0 * x - 0.5)) * self.scale).permute(0, 2, 3, 1)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("layer", ["conv", "conv_groups", "pool"])
def test_closed_form_ball_bounds_equal_the_backward_pass(p, layer):
    torch.manual_seed(2)
    mixing = {
        "conv": nn.Conv2d(2, 4, 3, stride=2, padding=1),
        "conv_groups": nn.Conv2d(2, 4, 3, padding=2, dilation=2, groups=2),
        "pool": nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(2, 4, 1)),
    }[layer]
    net = Prefix(mixing if layer != "pool" else mixing[0])
    if layer == "pool":
        net.scale = torch.linspace(-2, 2, 2, dtype=D).reshape(2, 1, 1)
    net.bn.running_mean.uniform_(-1, 1)
    net.bn.running_var.uniform_(0.5, 2)
    net = net.to(D).eval()
    x = torch.rand(3, 2, 6, 6, dtype=D)
    region = Region.ball(x, torch.tensor([0.1, 0.3, 0.5], dtype=D), p)
    prop = _propagation(net, region)
    out = prop.graph.output
    assert prop.graph.is_direct(out)
    closed = prop._ball_image(out)
    assert closed is not None
    n = math.prod(prop.graph.nodes[out].shape)
    lb = prop.concretize(*prop.backward(out, prop._unit_spec(out, None)))
    torch.testing.assert_close(closed[0].reshape(3, -1), lb[:, :n])
    torch.testing.assert_close(closed[1].reshape(3, -1), -lb[:, n:])


def _sample_ball(region: Region, count: int, generator: torch.Generator) -> torch.Tensor:
    assert region.centre is not None
    points = [region.sample(generator) for _ in range(count)]
    # the ball's surface too: the extremes of an affine map lie there
    c = region.centre
    for _ in range(count // 4):
        d = torch.randn(c.shape, generator=generator, dtype=c.dtype)
        if region.p == 1:
            d = d * (torch.rand(c.shape, generator=generator, dtype=c.dtype) < 0.02)
        norm = d.flatten(1).norm(p=region.p, dim=1).clamp_min(1e-12)
        r = region.radius.reshape(-1, *([1] * (c.dim() - 1)))
        points.append(region.project(c + d / norm.reshape(-1, *([1] * (c.dim() - 1))) * r))
    return torch.stack(points, 1)


def _check_sound(kind: str, ball: str, method: str, seed: int, eps: float) -> None:
    net = _conv_net(kind, seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 2, 8, 8, generator=gen, dtype=D)
    region = _region(ball, x, eps)
    lb, ub = compute_bounds(net, region, method)
    pts = _sample_ball(region, 60, gen)
    assert all(bool(region.contains(pts[:, k]).all()) for k in range(pts.shape[1]))
    with torch.no_grad():
        out = net(pts.reshape(-1, *x.shape[1:])).reshape(2, pts.shape[1], -1)
    assert bool((out >= lb[:, None] - 1e-6).all()), (out.min(1).values - lb).min()
    assert bool((out <= ub[:, None] + 1e-6).all()), (ub - out.max(1).values).min()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ball", ["box", "l2", "l1"])
def test_conv_crown_bounds_are_sound_by_sampling(kind, ball):
    _check_sound(kind, ball, "crown", 3, 0.1)


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    ball=st.sampled_from(["box", "l2", "l1"]),
    method=st.sampled_from(["ibp", "crown_ibp", "crown", "alpha_crown"]),
    seed=st.integers(0, 10_000),
    eps=st.floats(0.005, 0.2),
)
def test_conv_bounds_are_sound_by_sampling(kind, ball, method, seed, eps):
    _check_sound(kind, ball, method, seed, eps)


@pytest.mark.parametrize("kind", ["dilation", "residual"])
def test_alpha_crown_with_window_slopes_is_sound_and_tightens(kind):
    # The intermediate rows of convolutional nodes reach the activations before them as
    # windows; their slopes are parameters per window entry.
    net = _conv_net(kind, 5)
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 2, 8, 8, generator=gen, dtype=D)
    region = _region("box", x, 0.15)
    lo, hi = region.bounding_box()
    graph = build_graph(net, ((lo[:1] + hi[:1]) / 2).repeat(2, 1, 1, 1))
    prop = _Propagation(graph, region, lo, hi)
    prop.run_crown()
    out = graph.nodes[graph.output].shape[0]
    spec = torch.cat([torch.eye(out, dtype=D), -torch.eye(out, dtype=D)]).unsqueeze(0)
    crown = prop.spec_bound(spec).detach()
    from propdsl.verify import AlphaOptions

    best = prop.optimise(spec, crown, AlphaOptions(iterations=15, lr=0.2))
    assert prop.windows, "no activation was reached by windowed rows"
    assert bool((best >= crown).all()) and bool((best > crown + 1e-6).any())
    _check_sound(kind, "box", "alpha_crown", 5, 0.15)


# -- products written into their own operands (memory) -------------------------------------------


def test_products_are_written_in_place_only_where_that_is_safe():
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 3, 5, generator=gen) for _ in range(3))
    row = torch.randn(1, 3, 5, generator=gen)
    # Owned, of the result's shape, not recorded: the result is a itself, the same numbers.
    expected = a * row
    mine = a.clone()
    out = times(mine, row, owned=True)
    assert out.data_ptr() == mine.data_ptr() and torch.equal(out, expected)
    mine = a.clone()
    out = addcmul(mine, b, c, owned=True)
    assert out.data_ptr() == mine.data_ptr() and torch.equal(out, torch.addcmul(a, b, c))
    # Not owned, an expanded view, a smaller operand than the result, a recorded operand:
    # a new tensor, the operand untouched.
    expanded = row.expand(2, 3, 5)
    tracked = b.clone().requires_grad_()
    for first, second, owned in (
        (a, b, False),
        (expanded, b, True),
        (row, a, True),
        (a.clone(), tracked, True),
    ):
        before = first.clone()
        out = times(first, second, owned=owned)
        assert out.data_ptr() != first.data_ptr() and torch.equal(out, before * second)
        assert torch.equal(first, before)
    assert not writable(expanded, b) and not writable(row, a) and writable(a, row)
    assert times(a.clone(), tracked, owned=True).requires_grad  # autograd still sees it


def test_window_dot_and_mask_in_place_equal_their_out_of_place_forms():
    gen = torch.Generator().manual_seed(1)
    rows = torch.tensor([0, 7, 20, 35])
    P = unit_patches((2, 6, 6), rows, torch.zeros(1, dtype=D))
    P = P.with_data(torch.randn(1, 8, 2, 4, 4, generator=gen, dtype=D))
    P = Patches(P.data, P.ah, P.aw, (1, 1), (2, 2), P.shape)  # windows over the border
    t = torch.rand(3, 1, 2, 6, 6, generator=gen, dtype=D)
    torch.testing.assert_close(
        P.dot(t, absolute=True), P.with_data(P.data.abs()).dot(t), rtol=0, atol=0
    )
    kept = P.data.clone()
    masked = P.with_data(P.data.clone()).masked(inplace=True)
    assert torch.equal(masked.data, P.masked().data) and torch.equal(P.data, kept)
    assert bool((masked.data != P.data).any())  # the border was zeroed


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ball", ["box", "l2"])
def test_in_place_backward_gives_the_bounds_of_the_out_of_place_one(kind, ball, monkeypatch):
    # Without autograd the backward pass writes its products into their own operands and
    # drops relu(A) early; with the weights' gradient recorded it takes the out-of-place
    # products it always took. Both give the same bounds (up to one rounding: a fused
    # multiply-add may round differently when its output's layout differs).
    calls: list[bool] = []
    # (the package exports a function named `bounds`, so the module is looked up by name)
    engine = importlib.import_module("propdsl.verify.bounds")
    patches = importlib.import_module("propdsl.verify.patches")

    def spy(a, b):
        calls.append(patches_writable(a, b))
        return calls[-1]

    patches_writable = patches.writable
    monkeypatch.setattr(patches, "writable", spy)
    monkeypatch.setattr(engine, "writable", spy)
    net = _conv_net(kind, 2)
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(2), dtype=D)
    region = _region(ball, x, 0.08)
    for method in ("crown", "crown_ibp"):
        calls.clear()
        lb, ub = compute_bounds(net, region, method, intersect_ibp=False)
        assert lb.requires_grad and not any(calls)  # the out-of-place products
        calls.clear()
        with torch.no_grad():
            lb_in, ub_in = compute_bounds(net, region, method, intersect_ibp=False)
        assert any(calls)  # some products were written in place
        torch.testing.assert_close(lb_in, lb.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ub_in, ub.detach(), rtol=1e-12, atol=1e-12)


def test_in_place_backward_at_the_benchmark_architecture():
    # The mnist_a_adv architecture of the scaling benchmark (8 x 8, float32, batch 2, shared
    # and per-sample rows): the bounds with and without autograd agree to float32 rounding.
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 100), nn.ReLU(), nn.Linear(100, 10),
    ).eval()  # fmt: skip
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for eps, p in ((0.02, math.inf), (0.1, math.inf), (0.5, 2)):
        region = Region.ball(x, eps, p)
        lb, ub = compute_bounds(net, region, "crown", intersect_ibp=False)
        with torch.no_grad():
            lb_in, ub_in = compute_bounds(net, region, "crown", intersect_ibp=False)
        torch.testing.assert_close(lb_in, lb.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ub_in, ub.detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("per_row", [False, True])
def test_dense_lines_in_slices_of_rows_equal_the_whole(per_row, monkeypatch):
    # Large dense rows go through an activation's lines a slice of rows at a time (relu(A) is
    # never whole); the rows and the offsets are those of the whole computation.
    engine = importlib.import_module("propdsl.verify.bounds")
    from propdsl.verify.layers import Relaxation

    gen = torch.Generator().manual_seed(4)
    A = torch.randn(2, 7, 3, 5, generator=gen, dtype=D)
    lines = torch.randn(4, 2, 7 if per_row else 1, 3, 5, generator=gen, dtype=D)
    r = Relaxation(*lines)
    bias = torch.randn(2, 7, generator=gen, dtype=D)
    pos = A.clamp(min=0)
    expected = torch.addcmul(A * r.upper_slope, pos, r.lower_slope - r.upper_slope)
    offsets = (A * r.upper_bias + pos * (r.lower_bias - r.upper_bias)).flatten(2).sum(-1)
    sliced: list[slice] = []
    row_slice = engine._row_slice
    monkeypatch.setattr(engine, "LINES_SLICE", 90)  # 3 rows of 2 x 15 entries a slice

    def spy(t, cut):
        sliced.append(cut)
        return row_slice(t, cut)

    monkeypatch.setattr(engine, "_row_slice", spy)
    out, total = engine._dense_lines(A, r, bias)
    assert len(sliced) == 2 * 3  # offsets and slopes of the slices [0, 3), [3, 6), [6, 7)
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(total, bias + offsets, rtol=1e-14, atol=1e-14)


def test_dense_lines_in_slices_give_the_bounds_of_the_whole_pass(monkeypatch):
    engine = importlib.import_module("propdsl.verify.bounds")
    net = _conv_net("stride", 4)
    x = torch.rand(3, 2, 8, 8, generator=torch.Generator().manual_seed(4), dtype=D)
    region = _region("box", x, 0.08)
    calls = []
    row_slice = engine._row_slice

    def spy(t, cut):
        calls.append(cut)
        return row_slice(t, cut)

    with torch.no_grad():
        whole = compute_bounds(net, region, "crown", intersect_ibp=False)
        monkeypatch.setattr(engine, "LINES_SLICE", 64)
        monkeypatch.setattr(engine, "_row_slice", spy)
        sliced = compute_bounds(net, region, "crown", intersect_ibp=False)
    assert calls  # the lines were taken in slices
    for a, b in zip(sliced, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
