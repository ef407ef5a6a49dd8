"""Explanations of a network's decisions, their similarities and their robustness metrics.

Attributions are batched ([B, ...] inputs give [B, ...] maps) and, by default, differentiable
again (`create_graph=True`): an explanation property such as
`cosine(saliency(f, x', y), saliency(f, x, y)) >= tau` can then be trained, its loss
back-propagating through the input gradient into the weights (double backpropagation).

Similarities and distances map two [B, ...] maps to [B] values. Robustness metrics (named as in
the Quantus toolkit, lower is better except `alignment`) take an explanation function
`explain(x) -> map` and sample perturbed inputs uniformly in an L-inf ball.

Functions that take `model, x, y` expect `model` to map [B, ...] inputs to [B, K] logits, `y` to
be a [B] tensor of class indices, and samples not to interact (no batch statistics: call
`model.eval()` first when it has batch norm).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from propdsl.distributed import draw
from propdsl.region import Region

__all__ = [
    "alignment",
    "avg_sensitivity",
    "cosine",
    "gradient_x_input",
    "guided_backprop",
    "input_grad",
    "integrated_gradients",
    "local_lipschitz_estimate",
    "max_sensitivity",
    "mse",
    "normalised_l2",
    "pearson",
    "saliency",
    "smoothgrad",
    "spearman",
    "topk_intersection",
]

Explainer = Callable[[Tensor], Tensor]
NORM_EPS = 1e-12


# -- attributions --------------------------------------------------------------------------------


def input_grad(fn: Callable[[Tensor], Tensor], x: Tensor, *, create_graph: bool = True) -> Tensor:
    """Per-sample input gradient: `d fn(x)[b] / d x[b]` for every b, shaped like `x`.

    `fn` maps [B, ...] to [B] and must treat samples independently (then the gradient of the sum
    is each sample's own gradient). When `x` already requires grad (e.g. it is an attack point
    or depends on parameters), the gradient is taken with respect to `x` itself, so the result
    stays differentiable with respect to whatever `x` depends on. Works under `torch.no_grad()`.

    Args:
        fn: per-sample scalar function.
        x: [B, ...] inputs.
        create_graph: keep the graph of the gradient so that it can be differentiated again
            (needed to train on explanations); `False` returns a detached tensor.

    >>> import torch
    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> input_grad(lambda v: (v**2).sum(dim=1), x).tolist()
    [[2.0, 4.0], [6.0, 8.0]]
    """
    with torch.enable_grad():
        leaf = x if x.requires_grad else x.detach().requires_grad_(True)
        out = fn(leaf)
        if out.shape != (x.shape[0],):
            raise ValueError(
                f"input_grad needs one scalar per sample, got shape {tuple(out.shape)}"
            )
        if not out.requires_grad:  # fn does not depend on anything differentiable
            return torch.zeros_like(x)
        (g,) = torch.autograd.grad(out.sum(), leaf, create_graph=create_graph, allow_unused=True)
    if g is None:
        return torch.zeros_like(x)
    return g if create_graph else g.detach()


def _logit(model: nn.Module, y: Tensor) -> Callable[[Tensor], Tensor]:
    """The per-sample function v -> model(v)[b, y_b] (y repeated when v stacks several copies)."""

    def fn(v: Tensor) -> Tensor:
        out = model(v).flatten(1)
        labels = y.repeat(v.shape[0] // y.shape[0]) if v.shape[0] != y.shape[0] else y
        return out.gather(1, labels.reshape(-1, 1).to(out.device)).squeeze(1)

    return fn


def saliency(model: nn.Module, x: Tensor, y: Tensor, *, create_graph: bool = True) -> Tensor:
    """Gradient saliency (Simonyan et al. 2014): `d model(x)[b, y_b] / d x[b]`.

    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> s = saliency(model, torch.zeros(4, 3), torch.tensor([0, 1, 1, 0]))
    >>> bool(torch.equal(s[1], model.weight[1]))
    True
    """
    return input_grad(_logit(model, y), x, create_graph=create_graph)


def gradient_x_input(
    model: nn.Module, x: Tensor, y: Tensor, *, create_graph: bool = True
) -> Tensor:
    """Gradient times input (Shrikumar et al. 2016): `x * saliency(model, x, y)`.

    >>> import torch
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> torch.nn.init.ones_(model.weight)  # doctest: +ELLIPSIS
    Parameter...
    >>> gradient_x_input(model, torch.tensor([[2.0, 3.0]]), torch.tensor([0])).tolist()
    [[2.0, 3.0]]
    """
    return x * saliency(model, x, y, create_graph=create_graph)


def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    baseline: Tensor | None = None,
    steps: int = 64,
    create_graph: bool = True,
) -> Tensor:
    """Integrated gradients (Sundararajan et al. 2017) with the midpoint rule.

    `(x - x0) * mean_k g(x0 + t_k (x - x0))` with `t_k = (k + 1/2) / steps`, `g` the saliency
    and `x0` the baseline (zeros by default). The midpoint rule's error is O(1/steps^2) (the
    left/right Riemann sums of the original paper are O(1/steps), the trapezoid rule is O(1/steps^2)
    with twice the midpoint's constant and one more evaluation), so completeness,
    `sum(attribution) = f(x)_y - f(x0)_y`, holds closely already at 64 steps. All steps run as one
    batch of `steps * B` inputs.

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
    >>> x, y = torch.rand(2, 3), torch.tensor([0, 1])
    >>> ig = integrated_gradients(model, x, y)
    >>> gap = ig.sum(1) - (model(x) - model(torch.zeros_like(x)))[[0, 1], y]
    >>> bool(gap.abs().max() < 1e-3)
    True
    """
    if steps < 1:
        raise ValueError(f"integrated_gradients needs steps >= 1, got {steps}")
    x0 = torch.zeros_like(x) if baseline is None else baseline.expand_as(x).to(x)
    t = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    t = t.reshape(steps, *([1] * x.dim()))
    path = (x0 + t * (x - x0)).reshape(steps * x.shape[0], *x.shape[1:])
    g = input_grad(_logit(model, y), path, create_graph=create_graph)
    return (x - x0) * g.reshape(steps, *x.shape).mean(dim=0)


def smoothgrad(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    noise: float = 0.1,
    samples: int = 16,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
) -> Tensor:
    """SmoothGrad (Smilkov et al. 2017): the saliency averaged over `x + n`, `n ~ N(0, noise^2)`.

    `noise` is the standard deviation in input units (for pixels in [0, 1], 0.1 is the paper's
    10% noise level). All samples run as one batch of `samples * B` inputs.

    >>> import torch
    >>> model = torch.nn.Linear(3, 2)  # linear: every noisy gradient is the weight row
    >>> s = smoothgrad(model, torch.zeros(1, 3), torch.tensor([1]))
    >>> bool(torch.allclose(s[0], model.weight[1]))
    True
    """
    if samples < 1:
        raise ValueError(f"smoothgrad needs samples >= 1, got {samples}")
    # dim 1 is the batch: a sharded batch draws the whole batch's noise (propdsl.distributed)
    n = draw(
        torch.randn,
        (samples, *x.shape),
        batch_dim=1,
        generator=generator,
        dtype=x.dtype,
        device=x.device,
    ).mul_(noise)
    noisy = (x + n).reshape(samples * x.shape[0], *x.shape[1:])
    g = input_grad(_logit(model, y), noisy, create_graph=create_graph)
    return g.reshape(samples, *x.shape).mean(dim=0)


# -- guided backpropagation ---------------------------------------------------------------------
#
# Guided backprop changes the backward pass of each activation. A custom autograd function on
# the forward graph would also change the derivative of the map itself (an attack or a training
# step differentiates the map with respect to the input, and that second pass walks the same
# forward graph), so the model runs twice: a plain forward pass records each activation's input
# z with its true graph, and a second pass, whose activations pass back
# `relu(grad_out) * act'(z)` with z read from the first pass, gives the map. The map then
# depends on the input only through the true activations.


class _GuidedActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, true_z, derivative, value):  # type: ignore[override]
        ctx.save_for_backward(true_z)
        ctx.derivative = derivative
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        (true_z,) = ctx.saved_tensors
        return grad_out.clamp(min=0) * ctx.derivative(true_z), None, None, None


def _sigmoid(v: Tensor) -> Tensor:
    return 1 / (1 + torch.exp(-v))


def _softplus_derivative(beta: float, threshold: float) -> Callable[[Tensor], Tensor]:
    # d/dz softplus(z) = sigmoid(beta z), and 1 where torch's softplus turns linear.
    return lambda z: torch.where(z * beta > threshold, torch.ones_like(z), _sigmoid(beta * z))


def _option(args: tuple, kwargs: dict, position: int, name: str, default: float) -> float:
    if name in kwargs:
        return float(kwargs[name])
    return float(args[position]) if len(args) > position else default


_RELU = (torch.relu, F.relu, Tensor.relu)
_RELU_IN_PLACE = (torch.relu_, F.relu_, Tensor.relu_)


def _activation(
    func: Any, args: tuple, kwargs: dict, relu_beta: float | None
) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
    """(value, derivative) of a call of a monotone activation; None for any other call."""
    if func in _RELU_IN_PLACE or (func in _RELU or func is F.leaky_relu) and kwargs.get("inplace"):
        raise ValueError("guided backprop needs out-of-place activations (inplace=False)")
    if func in _RELU:
        z = args[0]
        if relu_beta is not None:
            return F.softplus(z, beta=relu_beta), _softplus_derivative(relu_beta, 20.0)
        return torch.relu(z), lambda v: (v > 0).to(v.dtype)
    if func is F.softplus:
        z = args[0]
        beta = _option(args, kwargs, 1, "beta", 1.0)
        threshold = _option(args, kwargs, 2, "threshold", 20.0)
        return F.softplus(z, beta=beta, threshold=threshold), _softplus_derivative(beta, threshold)
    if func is F.leaky_relu:
        z = args[0]
        slope = _option(args, kwargs, 1, "negative_slope", 0.01)
        return F.leaky_relu(z, slope), lambda v: torch.where(
            v > 0, torch.ones_like(v), torch.full_like(v, slope)
        )
    if func in (torch.tanh, Tensor.tanh, F.tanh):
        # tanh'(v) = 4 sigmoid(2v) (1 - sigmoid(2v))
        return torch.tanh(args[0]), lambda v: 4 * _sigmoid(2 * v) * (1 - _sigmoid(2 * v))
    if func in (torch.sigmoid, Tensor.sigmoid, F.sigmoid):
        return torch.sigmoid(args[0]), lambda v: _sigmoid(v) * (1 - _sigmoid(v))
    return None


class _Record(TorchFunctionMode):
    """The plain forward pass: records each activation's input (ReLUs as surrogates when
    `relu_beta` is set)."""

    def __init__(self, relu_beta: float | None):
        super().__init__()
        self.relu_beta = relu_beta
        self.inputs: list[Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        act = _activation(func, args, kwargs, self.relu_beta)
        if act is None:
            return func(*args, **kwargs)
        self.inputs.append(args[0])
        return act[0]


class _Guided(TorchFunctionMode):
    """The guided pass: the i-th activation call backpropagates with the i-th recorded input."""

    def __init__(self, relu_beta: float | None, inputs: list[Tensor]):
        super().__init__()
        self.relu_beta = relu_beta
        self.inputs = inputs
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        act = _activation(func, args, kwargs, self.relu_beta)
        if act is None:
            return func(*args, **kwargs)
        if self.calls >= len(self.inputs):
            raise RuntimeError("guided backprop: the model called more activations than before")
        true_z = self.inputs[self.calls]
        self.calls += 1
        value, derivative = act
        return _GuidedActivation.apply(args[0], true_z, derivative, value)


def _surrogate_beta() -> float | None:
    """The beta of an enclosing `propdsl.attacks.smooth_relu` block (an attack's surrogate),
    which the modes here would otherwise hide (the innermost mode sees a call first)."""
    from torch.overrides import _get_current_function_mode_stack

    beta = None
    for mode in _get_current_function_mode_stack():
        if type(mode).__name__ == "_SmoothReLU":
            beta = float(mode.beta)
    return beta


def guided_backprop(model: nn.Module, x: Tensor, y: Tensor, *, create_graph: bool = True) -> Tensor:
    """Guided backpropagation (Springenberg et al. 2015): the input gradient of
    `model(x)[b, y_b]`, where every ReLU passes back only positive gradients, and only where its
    input is positive: `grad_in = relu(grad_out) * [z > 0]`.

    Other monotone activations use the same rule with their own derivative,
    `grad_in = relu(grad_out) * act'(z)` (softplus: `sigmoid(beta z)`; leaky ReLU: 1 or its
    slope; tanh, sigmoid), so a softplus surrogate of a ReLU network (Chen et al. 2024 attack
    guided backprop maps on one; inside `propdsl.attacks.smooth_relu` the ReLUs are such
    surrogates) gives a smooth guided map that tends to the ReLU one as beta grows. Linear,
    convolution and pooling layers backpropagate as usual. Activations are caught as calls
    (`nn.ReLU`, `F.relu`, `nn.Softplus`, ...) through a `TorchFunctionMode`: no model is copied
    or modified; in-place activations are refused (`ValueError`). The map is differentiable
    again with `create_graph` (its true derivative: see the comment above).

    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> with torch.no_grad():
    ...     for p in model.parameters():
    ...         _ = p.fill_(1.0)
    ...     _ = model[2].weight.copy_(torch.tensor([[1.0, -1.0]]))
    >>> guided_backprop(model, torch.zeros(1, 2), torch.tensor([0])).tolist()
    [[1.0, 1.0]]
    """
    beta = _surrogate_beta()
    logit = _logit(model, y)
    with torch.enable_grad():
        leaf = x if x.requires_grad else x.detach().requires_grad_(True)
        record = _Record(beta)
        with record:
            model(leaf)
        if not create_graph:
            record.inputs = [z.detach() for z in record.inputs]
        with _Guided(beta, record.inputs):
            out = logit(leaf)
        if out.shape != (x.shape[0],):
            raise ValueError(f"guided backprop needs one logit per sample, got {tuple(out.shape)}")
        if not out.requires_grad:
            return torch.zeros_like(x)
        (g,) = torch.autograd.grad(out.sum(), leaf, create_graph=create_graph, allow_unused=True)
    if g is None:
        return torch.zeros_like(x)
    return g if create_graph else g.detach()


# -- similarities and distances ([B, ...] x [B, ...] -> [B]) --------------------------------------


def _pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"explanations must have the same shape, got {a.shape} and {b.shape}")
    return a.flatten(1), b.flatten(1)


def _unit(v: Tensor) -> Tensor:
    # A zero map stays zero (no direction), so its cosine with anything is 0.
    return v / v.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity of the flattened maps, in [-1, 1] (0 when either map is zero).

    >>> import torch
    >>> cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])).tolist()
    [0.7071067690849304]
    """
    a, b = _pair(a, b)
    return (_unit(a) * _unit(b)).sum(dim=1)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of the flattened maps (0 when either map is constant).

    >>> import torch
    >>> r = pearson(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]]))
    >>> round(r.item(), 4)
    0.9934
    """
    a, b = _pair(a, b)
    return cosine(a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True))


def _ranks(v: Tensor) -> Tensor:
    """Ranks 1..n along dim 1, ties given their average rank (as scipy.stats.rankdata)."""
    batch, n = v.shape
    values, order = v.sort(dim=1, stable=True)
    new_group = torch.ones_like(values, dtype=torch.bool)
    new_group[:, 1:] = values[:, 1:] != values[:, :-1]
    group = new_group.long().cumsum(dim=1) - 1 + n * torch.arange(batch, device=v.device)[:, None]
    position = torch.arange(1, n + 1, dtype=v.dtype, device=v.device).expand(batch, n).flatten()
    first = torch.full((batch * n,), math.inf, dtype=v.dtype, device=v.device)
    last = torch.full((batch * n,), -math.inf, dtype=v.dtype, device=v.device)
    first = first.scatter_reduce(0, group.flatten(), position, "amin")
    last = last.scatter_reduce(0, group.flatten(), position, "amax")
    mean_rank = ((first + last) / 2)[group.flatten()].reshape(batch, n)
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation (Pearson of the ranks; ties get average ranks).

    Ranks are piecewise constant: this is a metric, its gradient is zero.

    >>> import torch
    >>> r = spearman(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 5.0, 4.0]]))
    >>> round(r.item(), 4)
    0.5
    """
    a, b = _pair(a, b)
    return pearson(_ranks(a.detach()), _ranks(b.detach()))


def topk_intersection(a: Tensor, b: Tensor, k: int, *, absolute: bool = True) -> Tensor:
    """|T_k(a) & T_k(b)| / k: the share of the k most important features that both maps agree on.

    Importance is the magnitude `|a|` (as for saliency maps, Ghorbani et al. 2019), or the signed
    value with `absolute=False`. Ties are broken by `torch.topk`. Not differentiable.

    >>> import torch
    >>> a = torch.tensor([[0.9, -0.8, 0.1, 0.0]])
    >>> b = torch.tensor([[0.7, 0.0, 0.6, 0.1]])
    >>> topk_intersection(a, b, 2).tolist()
    [0.5]
    """
    a, b = _pair(a, b)
    if not 1 <= k <= a.shape[1]:
        raise ValueError(f"topk_intersection needs 1 <= k <= {a.shape[1]}, got {k}")
    if absolute:
        a, b = a.abs(), b.abs()
    in_a = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    in_b = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (in_a & in_b).sum(dim=1).to(a.dtype) / k


def mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference of the maps (the squared L2 distance over the number of entries).

    >>> import torch
    >>> mse(torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])).tolist()
    [2.5]
    """
    a, b = _pair(a, b)
    return (a - b).pow(2).mean(dim=1)


def normalised_l2(a: Tensor, b: Tensor) -> Tensor:
    """L2 distance of the unit-normalised maps, in [0, 2] (`sqrt(2 - 2 cosine)` for non-zero maps).

    >>> import torch
    >>> normalised_l2(torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 0.5]])).tolist()
    [1.4142135381698608]
    """
    a, b = _pair(a, b)
    return (_unit(a) - _unit(b)).norm(dim=1)


# -- robustness metrics ---------------------------------------------------------------------------


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num / den with 0 / 0 = 0 and x / 0 = inf (an explanation that moves from nothing)."""
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.where(num > 0, math.inf, 0.0).to(num))


def _perturbations(
    explain: Explainer,
    x: Tensor,
    radius: float | Tensor,
    samples: int,
    lo: float | Tensor | None,
    hi: float | Tensor | None,
    generator: torch.Generator | None,
):
    if samples < 1:
        raise ValueError(f"robustness metrics need samples >= 1, got {samples}")
    x = x.detach()
    region = Region.ball(x, radius, math.inf, lo=lo, hi=hi)
    a = explain(x).flatten(1)
    for _ in range(samples):
        # One call per draw: `explain` usually closes over the labels of exactly B samples.
        xp = region.sample(generator)
        yield a, explain(xp).flatten(1), (x - xp).flatten(1)


def local_lipschitz_estimate(
    explain: Explainer,
    x: Tensor,
    *,
    radius: float | Tensor,
    samples: int = 16,
    lo: float | Tensor | None = None,
    hi: float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Quantus' LocalLipschitzEstimate: `max ||a(x) - a(x')||_2 / ||x - x'||_2` over sampled x'.

    `x'` is drawn uniformly in the L-inf ball of `radius` around `x` (clipped to the box
    `[lo, hi]` when given); `a = explain` maps [B, ...] inputs to [B, ...] attributions, e.g.
    `lambda v: saliency(model, v, y, create_graph=False)`. Returns [B]; lower is more robust.

    >>> import torch
    >>> x = torch.rand(3, 4)
    >>> est = local_lipschitz_estimate(lambda v: 2 * v, x, radius=0.1)  # a 2-Lipschitz map
    >>> bool(torch.allclose(est, torch.full((3,), 2.0)))
    True
    """
    worst = None
    for a, ap, dx in _perturbations(explain, x, radius, samples, lo, hi, generator):
        r = _ratio((a - ap).norm(dim=1), dx.norm(dim=1))
        worst = r if worst is None else torch.maximum(worst, r)
    assert worst is not None
    return worst


def _sensitivities(explain, x, radius, samples, lo, hi, generator):
    for a, ap, _ in _perturbations(explain, x, radius, samples, lo, hi, generator):
        yield _ratio((a - ap).norm(dim=1), a.norm(dim=1))


def max_sensitivity(
    explain: Explainer,
    x: Tensor,
    *,
    radius: float | Tensor,
    samples: int = 16,
    lo: float | Tensor | None = None,
    hi: float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Quantus' MaxSensitivity: `max ||a(x) - a(x')||_2 / ||a(x)||_2` over x' sampled uniformly
    in the L-inf ball (see `local_lipschitz_estimate` for the arguments). Returns [B].

    >>> import torch
    >>> max_sensitivity(lambda v: torch.ones_like(v), torch.rand(2, 3), radius=0.1).tolist()
    [0.0, 0.0]
    """
    it = _sensitivities(explain, x, radius, samples, lo, hi, generator)
    return torch.stack(list(it)).amax(dim=0)


def avg_sensitivity(
    explain: Explainer,
    x: Tensor,
    *,
    radius: float | Tensor,
    samples: int = 16,
    lo: float | Tensor | None = None,
    hi: float | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Quantus' AvgSensitivity: the mean instead of the max of `max_sensitivity`. Returns [B].

    >>> import torch
    >>> avg_sensitivity(lambda v: torch.ones_like(v), torch.rand(2, 3), radius=0.1).tolist()
    [0.0, 0.0]
    """
    it = _sensitivities(explain, x, radius, samples, lo, hi, generator)
    return torch.stack(list(it)).mean(dim=0)


def alignment(model: nn.Module, x: Tensor, *, create_graph: bool = False) -> Tensor:
    """Etmann et al. (2019)'s alignment `|<x, g(x)>| / ||g(x)||_2`, g the saliency of the
    predicted class, per sample [B]. Higher is better: it grows with robustness, and for
    bias-free ReLU networks (where `<x, g(x)> = f(x)_c`) it is the linearised robustness
    `|f(x)_c| / ||g(x)||_2`.

    >>> import torch
    >>> model = torch.nn.Linear(2, 2, bias=False)
    >>> with torch.no_grad():
    ...     _ = model.weight.copy_(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    >>> round(alignment(model, torch.tensor([[1.0, 1.0]])).item(), 4)  # |3 + 4| / 5
    1.4
    """
    with torch.no_grad():
        predicted = model(x).flatten(1).argmax(dim=1)
    g = saliency(model, x, predicted, create_graph=create_graph).flatten(1)
    return _ratio((x.flatten(1) * g).sum(dim=1).abs(), g.norm(dim=1))
