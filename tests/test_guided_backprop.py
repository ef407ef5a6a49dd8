"""Guided backpropagation: against hand-written guided backward passes (backward hooks on the
ReLU modules, and a manual backward pass through an MLP), its smooth variants, its use in specs,
and the verifier's answer for it (no Jacobian bounds: unsupported with a reason, never a crash)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import propdsl
from propdsl.attacks import smooth_relu
from propdsl.explain import guided_backprop, saliency

F64 = torch.float64


def _hooked_guided(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Guided backprop by the textbook recipe: a backward hook on every nn.ReLU clamps the
    gradient it passes back at zero (its own backward already zeroes it where the input is
    not positive)."""
    handles = [
        m.register_full_backward_hook(lambda _m, g_in, _g_out: (g_in[0].clamp(min=0),))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    try:
        v = x.detach().clone().requires_grad_(True)
        out = model(v)
        out.gather(1, y.reshape(-1, 1)).sum().backward()
        return v.grad.detach()
    finally:
        for h in handles:
            h.remove()


def _mlp(act: nn.Module, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), act, nn.Linear(10, 8), act, nn.Linear(8, 4)).to(F64)


def _manual_guided(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, derivative):
    """A manual guided backward pass through Linear-act-Linear-act-Linear."""
    l1, _, l2, _, l3 = model
    z1 = x @ l1.weight.T + l1.bias
    h1 = model[1](z1)
    z2 = h1 @ l2.weight.T + l2.bias
    g = l3.weight[y]  # d logit_y / d h2, [B, 8]
    g = g.clamp(min=0) * derivative(z2)
    g = g @ l2.weight
    g = g.clamp(min=0) * derivative(z1)
    return g @ l1.weight


def test_guided_backprop_equals_hooked_and_manual_passes_on_a_relu_mlp():
    model = _mlp(nn.ReLU())
    x = torch.randn(7, 6, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2])
    got = guided_backprop(model, x, y)
    assert torch.allclose(got, _hooked_guided(model, x, y), atol=1e-12)
    assert torch.allclose(got, _manual_guided(model, x, y, lambda z: (z > 0).to(F64)), atol=1e-12)
    # it differs from the plain gradient (the test would not notice a saliency otherwise)
    assert not torch.allclose(got, saliency(model, x, y), atol=1e-6)


def test_guided_backprop_on_a_relu_cnn_with_max_pooling_equals_hooks():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 2 * 2, 5),
    ).to(F64)
    x = torch.rand(3, 1, 8, 8, dtype=F64)
    y = torch.tensor([4, 0, 2])
    assert torch.allclose(guided_backprop(model, x, y), _hooked_guided(model, x, y), atol=1e-12)


def test_softplus_guided_backprop_uses_its_derivative_and_is_differentiable_again():
    beta = 3.0
    model = _mlp(nn.Softplus(beta=beta))
    x = torch.randn(5, 6, dtype=F64)
    y = torch.tensor([3, 2, 1, 0, 3])
    want = _manual_guided(model, x, y, lambda z: torch.sigmoid(beta * z))
    assert torch.allclose(guided_backprop(model, x, y), want, atol=1e-12)
    # differentiable in x (double backpropagation): agrees with finite differences
    torch.autograd.gradcheck(
        lambda v: guided_backprop(model, v, y),
        (x.clone().requires_grad_(True),),
    )


def test_a_surrogate_turns_relus_into_guided_softplus():
    """Under an attack's softplus surrogate, the ReLUs backpropagate as guided softplus (the
    innermost mode would otherwise see the ReLU first and hide the surrogate)."""
    relu = _mlp(nn.ReLU(), seed=3)
    smooth = nn.Sequential(
        relu[0], nn.Softplus(beta=10.0), relu[2], nn.Softplus(beta=10.0), relu[4]
    )
    x = torch.randn(4, 6, dtype=F64)
    y = torch.tensor([0, 1, 2, 3])
    with smooth_relu(10.0):
        got = guided_backprop(relu, x, y)
    assert torch.allclose(got, guided_backprop(smooth, x, y), atol=1e-12)
    assert not torch.allclose(got, guided_backprop(relu, x, y), atol=1e-6)


def test_in_place_relus_are_refused_not_silently_wrong():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="out-of-place"):
        guided_backprop(model, torch.randn(2, 3), torch.tensor([0, 1]))


SPEC = """
network f : Tensor[6] -> Tensor[4]

param eps : Real = 0.05

property guided_stable(x, y) =
  forall x' in ball(x, eps, inf):
    cosine(guided_backprop(f, x', y), guided_backprop(f, x, y)) >= 0.5

property guided_positive(x, y) =
  sum(guided_backprop(f, x, y)) >= 0
"""


def test_guided_backprop_in_a_spec_is_the_library_map():
    spec = propdsl.load(SPEC)
    model = _mlp(nn.ReLU()).float()
    x = torch.randn(6, 6)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    out = spec.loss("guided_positive", logic="dl2")(model, x, y)
    want = guided_backprop(model, x, y).sum(1) >= 0
    assert torch.equal(out.satisfied, want)
    assert want.any() and not want.all()  # both outcomes occur: the comparison is tested


def test_verify_answers_unsupported_with_a_reason_for_guided_backprop():
    from propdsl.verify.jacobian import to_jacobian_query
    from propdsl.verify.query import Unsupported
    from propdsl.verify.run import UNSUPPORTED, VERIFIED, verify_property

    spec = propdsl.load(SPEC)
    model = _mlp(nn.Softplus(beta=5.0)).float()
    x = torch.rand(4, 6)
    y = model(x).argmax(1)
    prop = spec.property("guided_stable")
    with pytest.raises(Unsupported, match="'guided_backprop' has no certified bounds"):
        to_jacobian_query(prop.formula, ["x", "y"], {"f": 4}, x, y, {"f": model})
    v = verify_property(spec, "guided_stable", model, x, y, method="crown")
    for status, reason in zip(v.status, v.reasons, strict=True):
        assert status != VERIFIED
        if status == UNSUPPORTED:
            assert reason is not None and "guided_backprop" in reason
    assert UNSUPPORTED in v.status or all(s == "falsified" for s in v.status)


@pytest.mark.parametrize("act", [nn.Tanh(), nn.Sigmoid(), nn.LeakyReLU(0.1)])
def test_other_monotone_activations_follow_the_same_rule(act):
    model = _mlp(act, seed=2)
    x = torch.randn(5, 6, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 1])
    with torch.enable_grad():

        def derivative(z):
            v = z.detach().requires_grad_(True)
            (d,) = torch.autograd.grad(act(v).sum(), v)
            return d

    want = _manual_guided(model, x, y, derivative)
    assert torch.allclose(guided_backprop(model, x, y), want, atol=1e-12)
    if not isinstance(act, nn.LeakyReLU):  # leaky ReLU: piecewise linear, nothing to check
        torch.autograd.gradcheck(
            lambda v: guided_backprop(model, v, y[:2]), (x[:2].clone().requires_grad_(True),)
        )
