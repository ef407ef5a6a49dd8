"""Explanations against torch.func / finite differences, and similarities against scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from propdsl.explain import (
    alignment,
    avg_sensitivity,
    cosine,
    gradient_x_input,
    input_grad,
    integrated_gradients,
    local_lipschitz_estimate,
    max_sensitivity,
    mse,
    normalised_l2,
    pearson,
    saliency,
    smoothgrad,
    spearman,
    topk_intersection,
)

F64 = torch.float64


def _net(act: type[nn.Module] = nn.Tanh, n_in: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 12), act(), nn.Linear(12, 12), act(), nn.Linear(12, 3)).to(
        F64
    )


def _reference_saliency(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One sample at a time through torch.func: the Jacobian row of the label's logit."""
    jac = vmap(jacrev(lambda v: net(v[None])[0]))(x)  # [B, K, n]
    return jac[torch.arange(len(y)), y]


@pytest.fixture
def case():
    net = _net(nn.Softplus)
    x = torch.rand(4, 5, dtype=F64)
    y = torch.tensor([0, 2, 1, 2])
    return net, x, y


def test_saliency_matches_jacrev_and_finite_differences(case):
    net, x, y = case
    s = saliency(net, x, y)
    assert s.shape == x.shape
    assert torch.allclose(s, _reference_saliency(net, x, y), atol=1e-12)
    h = 1e-6
    eye = torch.eye(5, dtype=F64)
    fd = torch.stack(
        [(net(x + h * e) - net(x - h * e))[torch.arange(4), y] / (2 * h) for e in eye], dim=1
    )
    assert torch.allclose(s, fd, atol=1e-7)


def test_input_grad_of_a_per_sample_function():
    x = torch.randn(3, 2, 2, dtype=F64)
    g = input_grad(lambda v: torch.tanh(v).pow(3).flatten(1).sum(dim=1), x)
    assert torch.allclose(g, 3 * torch.tanh(x) ** 2 * (1 - torch.tanh(x) ** 2))


def test_gradient_x_input(case):
    net, x, y = case
    assert torch.allclose(gradient_x_input(net, x, y), x * _reference_saliency(net, x, y))


def test_integrated_gradients_completeness_and_quadrature(case):
    _, x, y = case
    net = _net(nn.Tanh, seed=2)
    x = 3 * x  # a longer path with more curvature
    baseline = torch.full_like(x, -0.5)
    ig = integrated_gradients(net, x, y, baseline=baseline, steps=64)
    rows = torch.arange(4)
    delta = (net(x) - net(baseline))[rows, y]
    assert ((ig.sum(dim=1) - delta).abs() <= 0.01 * delta.abs()).all()
    # Against 32-node Gauss-Legendre quadrature of the path integral.
    nodes, weights = np.polynomial.legendre.leggauss(32)
    integral = torch.zeros_like(x)
    for t, wt in zip((nodes + 1) / 2, weights / 2, strict=True):
        integral += wt * _reference_saliency(net, baseline + float(t) * (x - baseline), y)
    assert torch.allclose(ig, (x - baseline) * integral, atol=1e-4)
    # The zero baseline is the default.
    ig0 = integrated_gradients(net, x, y, steps=64)
    assert ((ig0.sum(dim=1) - (net(x) - net(0 * x))[rows, y]).abs() < 1e-2 * delta.abs()).all()


def test_smoothgrad(case):
    net, x, y = case
    # No noise: the plain saliency.
    assert torch.allclose(smoothgrad(net, x, y, noise=0.0, samples=3), saliency(net, x, y))
    # Seeded: reproducible; with noise: different from the saliency.
    a = smoothgrad(net, x, y, generator=torch.Generator().manual_seed(0))
    b = smoothgrad(net, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and not torch.allclose(a, saliency(net, x, y))
    # A quadratic form has a linear gradient, so its noise average is the gradient at x.
    quad = nn.Linear(5, 2, bias=False).to(F64)

    def model(v):
        return quad(v) ** 2

    many = smoothgrad(model, x, y % 2, samples=4000, generator=torch.Generator().manual_seed(1))
    exact = 2 * quad(x)[torch.arange(4), y % 2, None] * quad.weight[y % 2]
    assert torch.allclose(many, exact, atol=0.03)


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_double_backprop_reaches_the_weights(act):
    net = _net(act, seed=4)
    x = torch.rand(6, 5, dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    penalty = saliency(net, x, y).pow(2).sum()
    grads = torch.autograd.grad(penalty, list(net.parameters()), allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[-1] is None  # the output bias does not move the saliency

    # The same gradient through torch.func, one sample at a time.
    params = dict(net.named_parameters())

    def reference(p):
        def logit(v, onehot):
            return (functional_call(net, p, (v[None],))[0] * onehot).sum()

        return vmap(grad(logit))(x, nn.functional.one_hot(y, 3).to(F64)).pow(2).sum()

    expected = grad(reference)(params)
    for (name, _), g in zip(net.named_parameters(), grads, strict=True):
        assert torch.allclose(expected[name] if g is None else g, expected[name], atol=1e-10)


def test_create_graph_false_detaches_and_no_grad_is_fine(case):
    net, x, y = case
    assert not saliency(net, x, y, create_graph=False).requires_grad
    with torch.no_grad():
        s = saliency(net, x, y, create_graph=False)
    assert torch.allclose(s, _reference_saliency(net, x, y))


def test_saliency_stays_differentiable_in_an_input_that_requires_grad(case):
    net, x, y = case
    base = x.clone().requires_grad_(True)
    s = saliency(net, 2 * base, y)  # a non-leaf input, as an attack point would be
    (g,) = torch.autograd.grad(s.pow(2).sum(), base)
    assert g.abs().sum() > 0


# -- similarities -------------------------------------------------------------------------------


def test_similarities_by_hand():
    a = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 0.0]], dtype=F64)
    b = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=F64)
    # <a, b> = 4, |a| = 3, |b| = sqrt(5); a zero map has cosine 0.
    assert torch.allclose(cosine(a, b), torch.tensor([4 / (3 * 5**0.5), 0.0], dtype=F64))
    assert torch.allclose(mse(a, b), torch.tensor([(1 + 4 + 1) / 3, 1.0], dtype=F64))
    unit_a, unit_b = a[0] / 3, b[0] / 5**0.5
    expected = torch.stack([(unit_a - unit_b).norm(), torch.tensor(1.0, dtype=F64)])
    assert torch.allclose(normalised_l2(a, b), expected)
    # Top-2 by magnitude: {1, 2} vs {0, 2}.
    assert torch.allclose(topk_intersection(a[:1], b[:1], 2), torch.tensor([0.5], dtype=F64))
    magnitude = topk_intersection(torch.tensor([[-5.0, 1, 2]]), torch.tensor([[9.0, 1, 2]]), 2)
    assert magnitude.tolist() == [1.0]  # {0, 2} vs {0, 2}
    plain = topk_intersection(
        torch.tensor([[-5.0, 1.0, 2.0]]), torch.tensor([[9.0, 1, 2]]), 2, absolute=False
    )
    assert plain.tolist() == [0.5]  # signed: {2, 1} vs {0, 2}
    same = torch.rand(2, 8)
    assert topk_intersection(same, same, 3).tolist() == [1.0, 1.0]


def test_pearson_and_spearman_match_scipy():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, 4, generator=gen, dtype=F64)
    b = a + torch.randn(5, 3, 4, generator=gen, dtype=F64)
    ties_a = torch.randint(0, 4, (5, 12), generator=gen).to(F64)
    ties_b = torch.randint(0, 4, (5, 12), generator=gen).to(F64)
    for x, y in ((a, b), (ties_a, ties_b)):
        xs, ys = x.flatten(1).numpy(), y.flatten(1).numpy()
        ref_p = [stats.pearsonr(u, v).statistic for u, v in zip(xs, ys, strict=True)]
        ref_s = [stats.spearmanr(u, v).statistic for u, v in zip(xs, ys, strict=True)]
        np.testing.assert_allclose(pearson(x, y).numpy(), ref_p, atol=1e-12)
        np.testing.assert_allclose(spearman(x, y).numpy(), ref_s, atol=1e-12)


def test_pearson_and_cosine_are_differentiable():
    a = torch.rand(2, 5, dtype=F64, requires_grad=True)
    b = torch.rand(2, 5, dtype=F64)
    (ga,) = torch.autograd.grad((cosine(a, b) + pearson(a, b)).sum(), a)
    assert torch.isfinite(ga).all() and ga.abs().sum() > 0


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError):
        cosine(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        topk_intersection(torch.zeros(2, 3), torch.zeros(2, 3), 4)


# -- robustness metrics -------------------------------------------------------------------------


def test_metrics_on_maps_with_known_constants():
    x = torch.rand(3, 4, dtype=F64) + 1.0
    gen = torch.Generator().manual_seed(0)
    # a(x) = 2x is 2-Lipschitz everywhere, and its relative change is ||x - x'|| / ||x||.
    lip = local_lipschitz_estimate(lambda v: 2 * v, x, radius=0.1, generator=gen)
    assert torch.allclose(lip, torch.full((3,), 2.0, dtype=F64))
    worst = max_sensitivity(lambda v: 2 * v, x, radius=0.1, samples=64, generator=gen)
    mean = avg_sensitivity(lambda v: 2 * v, x, radius=0.1, samples=64, generator=gen)
    bound = 0.1 * 2 / x.norm(dim=1)  # ||x - x'||_2 <= sqrt(4) * 0.1 in the L-inf ball
    assert bool(((mean < worst) & (worst <= bound)).all())
    assert bool((worst > 0.5 * bound).all())
    # A constant explanation is perfectly robust.
    const = max_sensitivity(lambda v: torch.ones_like(v), x, radius=0.1, generator=gen)
    assert const.tolist() == [0.0, 0.0, 0.0]


def test_metrics_respect_the_box_and_run_on_saliency(case):
    net, x, y = case
    seen = []

    def explain(v):
        seen.append(v)
        return saliency(net, v, y, create_graph=False)

    x = x.clone()
    x[:, 0] = 1.0
    lip = local_lipschitz_estimate(explain, x, radius=0.2, samples=4, lo=0.0, hi=1.0)
    assert lip.shape == (4,) and bool((lip > 0).all())
    assert all(bool(((v >= 0) & (v <= 1)).all()) for v in seen)
    # The estimate never exceeds the largest Jacobian norm of the saliency map along the box.
    hess = vmap(jacrev(jacrev(lambda v: net(v[None])[0])))(x)  # [B, K, n, n]
    local = torch.linalg.matrix_norm(hess[torch.arange(4), y], ord=2)
    assert bool((lip <= 1.5 * local).all())


def test_alignment_of_linear_and_bias_free_relu_models():
    lin = nn.Linear(4, 3, bias=False).to(F64)
    x = torch.rand(5, 4, dtype=F64)
    c = lin(x).argmax(dim=1)
    w = lin.weight[c]
    expected = (x * w).sum(dim=1).abs() / w.norm(dim=1)
    assert torch.allclose(alignment(lin, x), expected)
    # Bias-free ReLU networks are positively homogeneous: <x, g(x)> = f(x)_c.
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).to(
        F64
    )
    out = relu(x)
    c = out.argmax(dim=1)
    g = _reference_saliency(relu, x, c)
    expected = out[torch.arange(5), c].abs() / g.norm(dim=1)
    assert torch.allclose(alignment(relu, x), expected)
