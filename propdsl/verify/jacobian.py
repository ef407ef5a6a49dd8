"""Sound bounds of a network's Jacobian over an input region, and Lipschitz constants from them.

`jacobian_bounds(model, lower, upper)` returns element-wise bounds `lo <= d f_o / d x <= hi`,
valid at every x of the region (Fast-Lip / RecurJac style, Weng et al. 2018, Zhang et al. 2019):

1. bounds of every pre-activation over the region come from the bound engine (CROWN's
   intermediate bounds, or IBP's);
2. each activation's derivative is then bounded per neuron over its pre-activation interval
   (ReLU: {0}, {1} or [0, 1]; tanh / sigmoid: the range of f' on [l, u]; ...);
3. the Jacobian is propagated backwards from the output as an interval matrix: exactly through
   affine layers (centre and radius: `A_mid M +- A_rad |M|`) and by interval products through
   the activations' derivative intervals;
4. where affordable (`JacobianRelaxation`), a CROWN-style linear pass in the derivatives keeps
   the correlations that interval products lose, and the two bounds are intersected.

`lipschitz_bound(lo, hi, p, q)` turns the bounds into a Lipschitz constant from the q-norm of the
input to the p-norm of the output, valid on the (convex) region by the mean-value theorem.
See docs/jacobian.md for the soundness argument and the table of norms.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from propdsl import ir as I
from propdsl.explain import _EPS
from propdsl.logics import get_logic
from propdsl.loss.compile import CompileConfig, Compiler, Env
from propdsl.region import INF, Region, RegionError
from propdsl.verify.bounds import (
    Method,
    NamedEnum,
    _input_region,
    _method,
    _Propagation,
    _spec,
)
from propdsl.verify.graph import BoundGraph, build_graph
from propdsl.verify.layers import (
    ActivationRule,
    AdaptiveAvgPool2dRule,
    AffineRule,
    AvgPool2dRule,
    Conv2dRule,
    ConvexActivationRule,
    ElementwiseLinearRule,
    IdentityRule,
    Interval,
    LeakyReLURule,
    LinearRule,
    MaxPool2dRule,
    ReLURule,
    ReshapeRule,
    SoftplusRule,
    SShapedRule,
    UnsupportedLayerError,
)
from propdsl.verify.query import Unsupported, _over_region

__all__ = [
    "DERIVATIVES",
    "LINEAR_WORK_LIMIT",
    "JacobianQuery",
    "JacobianRelaxation",
    "cosine_lower_bound",
    "distance_bound",
    "jacobian_bounds",
    "lipschitz_bound",
    "lipschitz_constant",
    "mse_bound",
    "register_derivative",
    "to_jacobian_query",
    "topk_lower_bound",
]

log = logging.getLogger("propdsl.verify.jacobian")

# -- derivative ranges of activations --------------------------------------------------------------

DerivativeRange = Callable[[ActivationRule, Tensor, Tensor], Interval]

# Activation rule class -> (rule, lower, upper) -> (d_lo, d_hi): bounds of f' on [lower, upper].
DERIVATIVES: dict[type, DerivativeRange] = {}


def register_derivative(*rules: type) -> Callable[[DerivativeRange], DerivativeRange]:
    """Function decorator: the range of the derivative of the activations bound by `rules`
    (ActivationRule subclasses; subclasses of a registered rule inherit it).

    The function receives the rule and the pre-activation bounds [B, *shape] and returns
    element-wise bounds of f' over them, valid for the gradient autograd computes too (at a
    kink, every one-sided derivative).

    >>> from torch import nn
    >>> from propdsl.verify import ActivationRule, register_rule
    >>> class Cube(nn.Module):
    ...     def forward(self, x):
    ...         return x ** 3
    >>> @register_rule(Cube)
    ... class CubeRule(ActivationRule):
    ...     def function(self, x):
    ...         return x ** 3
    ...     def relax(self, lower, upper, alpha=None):
    ...         raise NotImplementedError  # IBP only
    >>> @register_derivative(CubeRule)
    ... def cube_derivative(rule, lower, upper):
    ...     closest = torch.minimum(torch.maximum(torch.zeros_like(lower), lower), upper)
    ...     return 3 * closest**2, 3 * torch.maximum(lower**2, upper**2)
    >>> net = nn.Sequential(nn.Linear(2, 2), Cube(), nn.Linear(2, 1))
    >>> lo, hi = jacobian_bounds(net, torch.zeros(1, 2), torch.ones(1, 2), method="ibp")
    >>> lo.shape
    torch.Size([1, 1, 2])
    >>> from propdsl.verify import REGISTRY
    >>> del REGISTRY[Cube], DERIVATIVES[CubeRule]
    """
    if not rules:
        raise TypeError("register_derivative needs at least one ActivationRule subclass")

    def decorate(fn: DerivativeRange) -> DerivativeRange:
        for rule in rules:
            if not (isinstance(rule, type) and issubclass(rule, ActivationRule)):
                raise TypeError(
                    f"register_derivative takes ActivationRule subclasses, not {rule!r}"
                )
            DERIVATIVES[rule] = fn
        return fn

    return decorate


def derivative_range(rule: ActivationRule, lower: Tensor, upper: Tensor) -> Interval:
    """Bounds of the activation's derivative on [lower, upper], from the registry."""
    for cls in type(rule).__mro__:
        fn = DERIVATIVES.get(cls)
        if fn is not None:
            return fn(rule, lower, upper)
    raise UnsupportedLayerError(
        f"{rule.call.describe()}: no derivative range for {type(rule).__name__}; register one "
        f"with @propdsl.verify.jacobian.register_derivative({type(rule).__name__})"
    )


@register_derivative(ReLURule)
def _relu_derivative(rule: ActivationRule, lower: Tensor, upper: Tensor) -> Interval:
    # autograd takes relu'(0) = 0; {0, 1} are the one-sided derivatives there.
    return (lower > 0).to(lower.dtype), (upper > 0).to(lower.dtype)


@register_derivative(LeakyReLURule)
def _leaky_relu_derivative(rule: ActivationRule, lower: Tensor, upper: Tensor) -> Interval:
    s = cast(LeakyReLURule, rule).slope
    # autograd takes the slope s at 0; 1 is the right derivative there.
    negative, positive = lower <= 0, upper >= 0
    both = negative & positive
    one = torch.ones_like(lower)
    value = torch.where(negative, s * one, one)  # used where only one side is possible
    return (
        torch.where(both, min(s, 1.0) * one, value),
        torch.where(both, max(s, 1.0) * one, value),
    )


@register_derivative(SShapedRule)
def _s_shaped_derivative(rule: ActivationRule, lower: Tensor, upper: Tensor) -> Interval:
    # f' increases on x <= 0 and decreases on x >= 0: the largest value is at the point of
    # [l, u] closest to 0 (0 itself when l < 0 < u), the smallest at an end point.
    df = cast(SShapedRule, rule).derivative
    closest = torch.minimum(torch.maximum(torch.zeros_like(lower), lower), upper)
    return torch.minimum(df(lower), df(upper)), df(closest)


@register_derivative(ConvexActivationRule)
def _convex_derivative(rule: ActivationRule, lower: Tensor, upper: Tensor) -> Interval:
    df = cast(ConvexActivationRule, rule).derivative  # increasing: f is convex
    return df(lower), df(upper)


@register_derivative(SoftplusRule)
def _softplus_derivative(rule: ActivationRule, lower: Tensor, upper: Tensor) -> Interval:
    sp = cast(SoftplusRule, rule)
    # torch's softplus is x above threshold / beta, where autograd's derivative is 1.
    linear = sp.beta * upper > sp.threshold
    upper_d = torch.where(linear, torch.ones_like(upper), sp.derivative(upper))
    return sp.derivative(lower), upper_d


# -- |M| for affine layers -------------------------------------------------------------------------


def _abs_backward(rule: AffineRule, R: Tensor) -> list[Tensor | None]:
    """R |M_k| for each bounded input k of the affine map out = sum_k M_k x_k + c, for R
    [B', S, *out_shape] >= 0: the radius of an interval Jacobian through the layer."""
    if isinstance(rule, LinearRule):
        return [R @ rule.weight.abs()]
    if isinstance(rule, Conv2dRule):
        # Each (input, output) pair of a convolution meets at most one kernel entry, so |M| is
        # the convolution with |W|.
        twin = copy.copy(rule)
        twin.weight, twin.bias, twin._matrix = rule.weight.abs(), None, None
        return twin.backward(R)[0]
    if isinstance(rule, ElementwiseLinearRule):
        out: list[Tensor | None] = []
        for scale, shape in zip(rule.scales, rule.call.in_shapes, strict=True):
            scaled = R if scale is None else R * scale.abs()
            out.append(scaled.sum_to_size((*R.shape[:2], *shape)))
        return out
    if isinstance(rule, ReshapeRule | IdentityRule | AvgPool2dRule | AdaptiveAvgPool2dRule):
        return rule.backward(R)[0]  # non-negative matrices: |M| = M
    return _dense_abs_backward(rule, R)


def _dense_abs_backward(rule: AffineRule, R: Tensor) -> list[Tensor | None]:
    """Any affine rule: materialise M from `backward` of the identity, then apply |M|."""
    out_shape = rule.call.out_shape
    n = math.prod(out_shape)
    eye = torch.eye(n, dtype=R.dtype, device=R.device).reshape(1, n, *out_shape)
    coeffs, _ = rule.backward(eye)
    out: list[Tensor | None] = []
    for coeff, shape in zip(coeffs, rule.call.in_shapes, strict=True):
        if coeff is None:
            out.append(None)
            continue
        M = coeff.reshape(coeff.shape[0], n, -1).abs()  # [1 or B, n_out, n_in]
        out.append((R.flatten(2) @ M).reshape(*R.shape[:2], *shape))
    return out


# -- the backward pass ---------------------------------------------------------------------------


def _interval_product(a_lo: Tensor, a_hi: Tensor, d_lo: Tensor, d_hi: Tensor) -> Interval:
    """The hull of {a * d : a in [a_lo, a_hi], d in [d_lo, d_hi]}, element-wise."""
    p1, p2, p3, p4 = a_lo * d_lo, a_lo * d_hi, a_hi * d_lo, a_hi * d_hi
    lo = torch.minimum(torch.minimum(p1, p2), torch.minimum(p3, p4))
    hi = torch.maximum(torch.maximum(p1, p2), torch.maximum(p3, p4))
    return lo, hi


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _backward(
    graph: BoundGraph,
    pre: list[Interval],
    spec: Tensor,
    keep: dict[int, Interval] | None = None,
) -> Interval:
    """Interval bounds of spec . d out / d input, from the output back to the input; with
    `keep`, also those of spec . d out / d node for every activation node (its output).

    Per node the interval is a centre [B', S, *shape] and a radius (None while exact)."""
    mids: dict[int, Tensor] = {graph.output: spec}
    rads: dict[int, Tensor | None] = {graph.output: None}
    for i in range(graph.output, 0, -1):
        if i not in mids:
            continue
        mid, rad = mids.pop(i), rads.pop(i)
        node = graph.nodes[i]
        if keep is not None and isinstance(node.rule, ActivationRule):
            keep[i] = (mid, mid) if rad is None else (mid - rad, mid + rad)
        rule = node.rule
        if isinstance(rule, AffineRule):
            ins: list[Tensor | None] = list(rule.backward(mid)[0])
            rad_ins: list[Tensor | None] = (
                [None] * len(ins) if rad is None else _abs_backward(rule, rad)
            )
        elif isinstance(rule, ActivationRule):
            d_lo, d_hi = derivative_range(rule, *pre[node.inputs[0]])
            a_lo, a_hi = (mid, mid) if rad is None else (mid - rad, mid + rad)
            lo, hi = _interval_product(a_lo, a_hi, d_lo.unsqueeze(1), d_hi.unsqueeze(1))
            ins, rad_ins = [(lo + hi) / 2], [(hi - lo) / 2]
        elif isinstance(rule, MaxPool2dRule):
            a_lo, a_hi = (mid, mid) if rad is None else (mid - rad, mid + rad)
            lo, hi = rule.derivative_backward(a_lo, a_hi, *pre[node.inputs[0]])
            ins, rad_ins = [(lo + hi) / 2], [(hi - lo) / 2]
        else:
            raise UnsupportedLayerError(
                f"{rule.call.describe() if rule is not None else 'the input'}: Jacobian bounds "
                "need an AffineRule or an ActivationRule for every operation"
            )
        for j, m, r in zip(node.inputs, ins, rad_ins, strict=True):
            if m is None:
                continue
            mids[j] = cast(Tensor, _add(mids.get(j), m))
            rads[j] = _add(rads.get(j), r)
    centre = mids.get(0)
    if centre is None:  # the output does not depend on the input through any path
        centre = spec.new_zeros(*spec.shape[:2], *graph.nodes[0].shape)
    radius = rads.get(0)
    return (centre, centre) if radius is None else (centre - radius, centre + radius)


# -- the linear pass -------------------------------------------------------------------------------
#
# The rows Lambda_0 = spec . d out / d x are what `_backward` computes with intervals: Lambda_out =
# spec and, for every other node i, Lambda_i = sum over its consumers c of Lambda_c M_{c,i} (c
# affine) or Lambda_c * d_c (c an activation; d_c its derivative, one variable per neuron, in the
# box [d_lo, d_hi] of `derivative_range`). Lambda_0 is multilinear in the d's, and interval
# products lose the correlations between entries that share them. The linear pass keeps them:
# CROWN-style back-substitution through this "Jacobian network", with each product z * d (z an
# entry of Lambda_c, bounded by the interval pass; d its derivative) replaced by the average of
# its two McCormick planes on each side:
#
#     z d = d_mid z + z_mid (d - d_mid) + e,   |e| <= z_rad d_rad.
#
# Both sides share the slopes, so the back-substitution does not depend on the bound's side or
# on the coefficients' signs: starting from the input (Gamma_0 = I), the coefficients Gamma_i
# of Lambda_i are the forward Jacobian d node_i / d x of the *centre network* (every derivative
# replaced by d_mid), the same for every spec row; each activation adds its error,
# |Gamma_in(c)| (max |Lambda_c| d_rad), where the z_mid (d - d_mid) and e terms are
# concretised over the box (|z_mid| d_rad + z_rad d_rad); and the output gives the centre
# network's Jacobian, Gamma_out . spec. The bounds are that Jacobian plus or minus the summed
# errors (docs/jacobian.md: why this choice of planes, the soundness argument, the figures).


class JacobianRelaxation(NamedEnum):
    """How `jacobian_bounds` bounds the products of the Jacobian with the derivative ranges; the
    strings "interval", "linear" and "auto" also work.

    * `INTERVAL`: interval products in one backward pass (Fast-Lip / RecurJac style);
    * `LINEAR`: that pass, then a CROWN-style linear pass in the derivatives (McCormick planes
      for the products; see docs/jacobian.md), the two intersected: never looser, tighter where
      Jacobian entries share derivatives (on the digits models: 2 to 6 times narrower, for
      1.0-1.3 times the cost with CROWN's pre-activation bounds, 1.5-2.3 times with IBP's);
    * `AUTO` (default): `LINEAR` while the linear pass takes at most `LINEAR_WORK_LIMIT`
      multiply-adds per sample, `INTERVAL` above (large inputs and wide layers).
    """

    INTERVAL = "interval"
    LINEAR = "linear"
    AUTO = "auto"


# AUTO takes the linear pass while it needs at most this many multiply-adds per sample (the
# digits MLP needs 0.8 M, the CNN 3.4 M; a CIFAR-sized CNN billions).
LINEAR_WORK_LIMIT = 1 << 26
# The linear pass's coefficients are computed in blocks of input coordinates holding at most
# this many entries.
LINEAR_BLOCK = 1 << 22


class _NoForward(Exception):
    """An affine layer the linear pass cannot apply forwards within the size limits."""


def _forward_linear(rule: AffineRule, k: int, G: Tensor) -> Tensor:
    """M_k G for the linear part M_k of the affine map out = sum_k M_k x_k + c, on G
    [*lead, *in_shape_k]: [*lead, *out_shape] (the adjoint of `rule.backward`)."""
    in_shape, out_shape = rule.call.in_shapes[k], rule.call.out_shape
    lead = G.shape[: G.dim() - len(in_shape)]
    if isinstance(rule, LinearRule):
        return G @ rule.weight.mT
    if isinstance(rule, IdentityRule):
        return G
    if isinstance(rule, ReshapeRule):
        return G.reshape(*lead, *out_shape)
    if isinstance(rule, ElementwiseLinearRule):
        scale = rule.scales[k]
        return (G if scale is None else G * scale).expand(*lead, *out_shape)
    if isinstance(rule, Conv2dRule):
        dense = rule._dense()  # noqa: SLF001 - [N_in, N_out], the images of the unit inputs
        if dense is not None:
            return (G.reshape(*lead, -1) @ dense).reshape(*lead, *out_shape)
        out = rule._conv(G.reshape(-1, *in_shape), rule.weight, None)  # noqa: SLF001
        return out.reshape(*lead, *out_shape)
    if isinstance(rule, AvgPool2dRule):
        return rule._pool(G.reshape(-1, *in_shape)).reshape(*lead, *out_shape)  # noqa: SLF001
    if isinstance(rule, AdaptiveAvgPool2dRule):
        out = F.adaptive_avg_pool2d(G.reshape(-1, *in_shape), rule.size)
        return out.reshape(*lead, *out_shape)
    # Any other affine rule: its matrix, from `backward` of the identity.
    n_out, n_in = math.prod(out_shape), math.prod(in_shape)
    if n_out * n_in > CHAIN_DENSE_LIMIT:
        raise _NoForward(rule.call.describe())
    eye = torch.eye(n_out, dtype=G.dtype, device=G.device).reshape(1, n_out, *out_shape)
    coeff = rule.backward(eye)[0][k]
    if coeff is None:
        return G.new_zeros(*lead, *out_shape)
    # [1 or B, n_out, *in_shape] -> [1 or B, 1, ..., n_in, n_out], batched like G
    M = coeff.reshape(coeff.shape[0], *([1] * (len(lead) - 2)), n_out, n_in).mT
    out = G.reshape(*lead, n_in) @ M
    return out.reshape(*out.shape[:-1], *out_shape)


def _linear_work(graph: BoundGraph, rows: int) -> int:
    """Multiply-adds per sample of the linear pass for `rows` spec rows: the input's size times
    the affine layers' sizes (as dense matrices) from the first activation on, plus the error
    products of the activations."""
    n_in = math.prod(graph.nodes[0].shape)
    work, started = 0, False
    for node in graph.nodes[1:]:
        size = math.prod(node.shape)
        if isinstance(node.rule, ActivationRule):
            started = True
            work += size * (rows + 1)
        elif started:
            fan = sum(math.prod(graph.nodes[j].shape) for j in node.inputs)
            mixes = isinstance(node.rule, AffineRule) and node.rule.mixes
            work += size * fan if mixes else size
    return n_in * work


def _linear_pass(
    graph: BoundGraph,
    pre: list[Interval],
    spec: Tensor,
    cuts: dict[int, Interval],
    block: int = LINEAR_BLOCK,
) -> Interval | None:
    """Linear bounds [B', S, *input_shape] of spec . d out / d input (see the comment above),
    from the pre-activation bounds `pre` and the interval pass's bounds `cuts` of
    spec . d out / d node for every activation node; None where an affine layer has no forward
    map within the size limits."""
    nodes = graph.nodes
    if any(isinstance(node.rule, MaxPool2dRule) for node in nodes):
        return None  # max pooling has interval derivative bounds only
    # Per activation: the centre of its derivative range [B, 1, *shape] and the error weights
    # max |Lambda_c| d_rad [B, S, n_c].
    centres: dict[int, Tensor] = {}
    weights: dict[int, Tensor] = {}
    for c, node in enumerate(nodes):
        if isinstance(node.rule, ActivationRule):
            d_lo, d_hi = derivative_range(node.rule, *pre[node.inputs[0]])
            z_lo, z_hi = cuts[c]
            centres[c] = ((d_hi + d_lo) / 2).unsqueeze(1)
            bound = torch.maximum(z_lo.abs(), z_hi.abs())
            weights[c] = (bound * ((d_hi - d_lo) / 2).unsqueeze(1)).flatten(2)
    shape = nodes[0].shape
    n = math.prod(shape)
    batch = max([spec.shape[0], *(w.shape[0] for w in weights.values())])
    widest = max(math.prod(node.shape) for node in nodes)
    step = max(1, block // (batch * widest))
    eye = torch.eye(n, dtype=spec.dtype, device=spec.device)
    spec_t = spec.flatten(2).mT  # [B', n_out, S]
    mids: list[Tensor] = []
    rads: list[Tensor] = []
    try:
        for first in range(0, n, step):
            rows = eye[first : first + step].reshape(1, -1, *shape)
            mid, rad = _linear_block(graph, centres, weights, spec_t, rows)
            mids.append(mid)
            rads.append(rad)
    except _NoForward:
        return None
    mid = torch.cat(mids, dim=1).mT  # [B'', S, n]
    rad = torch.cat(rads, dim=1).mT
    lo, hi = mid - rad, mid + rad
    lead = lo.shape[:2]
    return lo.reshape(*lead, *shape), hi.reshape(*lead, *shape)


def _linear_block(
    graph: BoundGraph,
    centres: dict[int, Tensor],
    weights: dict[int, Tensor],
    spec_t: Tensor,
    rows: Tensor,
) -> tuple[Tensor, Tensor]:
    """The centre network's Jacobian and the error bound, [B'', T, S] each, for the input
    directions `rows` [1, T, *input_shape]."""
    gammas: dict[int, Tensor] = {0: rows}
    mid: Tensor | None = None
    rad: Tensor | None = None
    for i in range(len(graph.nodes)):
        G = gammas.pop(i, None)
        if G is None:
            continue
        if i == graph.output:
            mid = G.flatten(2) @ spec_t
            continue
        for c in graph.consumers[i]:
            consumer = graph.nodes[c]
            rule = consumer.rule
            if isinstance(rule, ActivationRule):
                rad = _add(rad, G.abs().flatten(2) @ weights[c].mT)
                new: Tensor | None = G * centres[c]
            else:
                new = None
                for k, j in enumerate(consumer.inputs):
                    if j == i:
                        new = _add(new, _forward_linear(cast(AffineRule, rule), k, G))
            gammas[c] = cast(Tensor, _add(gammas.get(c), new))
    mid = cast(Tensor, mid)
    return mid, torch.zeros_like(mid) if rad is None else rad


def _output_spec(
    outputs: Sequence[int] | Tensor | None,
    C: Tensor | None,
    out_shape: torch.Size,
    like: Tensor,
) -> Tensor:
    """Rows [B', S, *out_shape] whose Jacobians are bounded."""
    n = math.prod(out_shape)
    batch = like.shape[0]
    if C is not None:
        if outputs is not None:
            raise ValueError("give outputs or C, not both")
        rows = cast(Tensor, _spec(C, out_shape, like))
        return rows[:, : rows.shape[1] // 2]  # _spec stacks [C; -C]
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    if outputs is None:
        return eye.reshape(1, n, *out_shape)
    index = torch.as_tensor(outputs, device=like.device)
    if index.dtype in (torch.bool,) or index.is_floating_point() or index.dim() not in (1, 2):
        raise ValueError(
            "outputs must be output indices: a sequence [K] shared by the batch or a tensor "
            f"[B, K] per sample, got {tuple(index.shape)} {index.dtype}"
        )
    if index.dim() == 2 and index.shape[0] != batch:
        raise ValueError(f"outputs [B, K] must have B = {batch} rows, got {index.shape[0]}")
    if bool(((index < 0) | (index >= n)).any()):
        raise ValueError(f"outputs must lie in 0..{n - 1}")
    rows = eye[index.long()]  # [K, n] or [B, K, n]
    rows = rows if rows.dim() == 3 else rows.unsqueeze(0)
    return rows.reshape(rows.shape[0], rows.shape[1], *out_shape)


def jacobian_bounds(
    model: nn.Module,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
    *,
    region: Region | None = None,
    outputs: Sequence[int] | Tensor | None = None,
    C: Tensor | None = None,
    method: Method | str = Method.CROWN,
    relaxation: JacobianRelaxation | str = JacobianRelaxation.AUTO,
) -> tuple[Tensor, Tensor]:
    """Element-wise bounds of the Jacobian d f_o / d x valid at every x of the input region.

    Args:
        model: a network the bound engine can trace (see docs/bounds.md): nn.Sequential or a
            user module made of Linear, Conv2d, pooling, Normalize, reshapes, residual sums and
            ReLU / LeakyReLU / Tanh / Sigmoid / Softplus.
        lower, upper: the input box [B, *input_shape]; or give `region`.
        region: a `Region` (an Lp ball, optionally intersected with a box).
        outputs: which outputs (flattened indices): a sequence [K] shared by the batch, or a
            tensor [B, K] per sample (say `y[:, None]` for the saliency of the label). Default:
            every output.
        C: instead of `outputs`, a specification [B, S, O] or [S, O]: bound the Jacobian of
            C @ f (e.g. of margins f_y - f_j).
        method: how the pre-activation bounds are computed: `Method.CROWN` (tighter) or
            `Method.IBP` (faster).
        relaxation: how products with the derivative ranges are bounded: `"interval"`
            (interval products), `"linear"` (interval bounds intersected with CROWN-style
            linear bounds in the derivatives: never looser, a few times the cost) or `"auto"`
            (default: linear while its work is at most `LINEAR_WORK_LIMIT` per sample); see
            `JacobianRelaxation`.

    Returns:
        (lo, hi), each [B, K, *input_shape] (K = len(outputs), S with C, O by default), with
        lo <= d f_o(x) / d x <= hi for every x in the region: the gradients autograd computes,
        and at kinks of ReLU-like activations every one-sided derivative.

    Raises:
        UnsupportedLayerError: an operation without an affine rule or a derivative range.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    >>> x = torch.zeros(4, 2)
    >>> lo, hi = jacobian_bounds(net, x - 0.1, x + 0.1)
    >>> J = torch.func.vmap(torch.func.jacrev(net))(x)  # [4, 1, 2]
    >>> lo.shape, bool(((lo <= J) & (J <= hi)).all())
    (torch.Size([4, 1, 2]), True)
    """
    analysis = _analyse(model, _input_region(lower, upper, region), method, relaxation)
    return analysis.jacobian(outputs, C)


@dataclass(eq=False)
class _Analysis:
    """A model's bound graph with the bounds of every node over one region."""

    graph: BoundGraph
    bounds: list[Interval]
    box: Interval  # the region's bounding box [B, *input_shape]
    relaxation: JacobianRelaxation = JacobianRelaxation.AUTO
    # lipschitz's cache: every output's Jacobian bounds with respect to the input and to each
    # activation's output, and the chain's factors (None when the graph is not a chain)
    _cuts: tuple[Interval, dict[int, Interval]] | None = None
    _factors: list[tuple[Tensor, Tensor | None]] | None = None

    @property
    def like(self) -> Tensor:
        return self.box[0]

    def jacobian(self, outputs: Sequence[int] | Tensor | None, C: Tensor | None) -> Interval:
        out_shape = self.graph.nodes[self.graph.output].shape
        spec = _output_spec(outputs, C, out_shape, self.like)
        lo, hi = self._rows(spec)
        shape = (self.like.shape[0], *lo.shape[1:])
        return lo.expand(shape), hi.expand(shape)

    def _linear(self, rows: int) -> bool:
        """Whether to take the linear pass for `rows` spec rows."""
        if self.relaxation is not JacobianRelaxation.AUTO:
            return self.relaxation is JacobianRelaxation.LINEAR
        work = _linear_work(self.graph, rows)
        if work > LINEAR_WORK_LIMIT:
            log.debug(
                "Jacobian bounds: interval pass only (the linear pass would take about %d "
                "multiply-adds per sample, above LINEAR_WORK_LIMIT)",
                work,
            )
            return False
        return True

    def _rows(self, spec: Tensor, keep: dict[int, Interval] | None = None) -> Interval:
        """Bounds of spec . d out / d input: the interval pass, tightened by the linear pass
        where `relaxation` asks for it (`keep` as for `_backward`)."""
        cuts = keep if keep is not None else {}
        lo, hi = _backward(self.graph, self.bounds, spec, cuts)
        if bool((lo == hi).all()) or not self._linear(spec.shape[1]):
            return lo, hi  # exact already (every derivative known), or intervals asked for
        return _intersect((lo, hi), _linear_pass(self.graph, self.bounds, spec, cuts))

    def lipschitz(self, p: float | str, q: float | str) -> Tensor:
        """A certified Lipschitz constant [B] from the q-norm of the input to the p-norm of
        every output (see `lipschitz_constant`)."""
        p, q = _norm_value(p), _norm_value(q)
        if self._cuts is None:
            spec = _output_spec(None, None, self.graph.nodes[self.graph.output].shape, self.like)
            keep: dict[int, Interval] = {}
            self._cuts = (self._rows(spec, keep), keep)
            self._factors = _chain_factors(self.graph, self.bounds, self.like)
        (lo, hi), keep = self._cuts
        batch = self.like.shape[0]
        best = lipschitz_bound(*_expand(lo, hi, batch), p, q)
        if (p, q) != (2.0, 2.0):
            # Through the 2 -> 2 bound: ||y||_p <= n_out^max(0, 1/p - 1/2) ||y||_2 and
            # ||v||_2 <= n_in^max(0, 1/2 - 1/q) ||v||_q.
            n_out, n_in = lo.shape[1], math.prod(lo.shape[2:])
            factor = n_out ** max(0.0, 1 / p - 0.5) * n_in ** max(0.0, 0.5 - 1 / q)
            best = torch.minimum(best, factor * self.lipschitz(2, 2))
        if self._factors is None:
            return best
        # Cut the chain after each activation k: J = (d f / d u_k)(d u_k / d x), the first
        # factor bounded from its interval, the second by the product of the layers' norms.
        running = torch.ones(batch, dtype=best.dtype, device=best.device)
        nodes = self.graph.nodes
        activations = [n.index for n in nodes if isinstance(n.rule, ActivationRule)]
        for (A, m), k in zip(self._factors[:-1], activations, strict=True):
            running = running * _factor_norm(A, m, q)
            best = torch.minimum(best, lipschitz_bound(*_expand(*keep[k], batch), p, q) * running)
        return best


def _intersect(bounds: Interval, tight: Interval | None) -> Interval:
    """The intersection of two bounds of one quantity; where rounding makes it empty (both
    nearly a point), the first."""
    if tight is None:
        return bounds
    lo, hi = torch.maximum(bounds[0], tight[0]), torch.minimum(bounds[1], tight[1])
    empty = lo > hi
    return torch.where(empty, bounds[0], lo), torch.where(empty, bounds[1], hi)


def _expand(lo: Tensor, hi: Tensor, batch: int) -> Interval:
    shape = (batch, *lo.shape[1:])
    return lo.expand(shape), hi.expand(shape)


def _analyse(
    model: nn.Module,
    region: Region,
    method: Method | str,
    relaxation: JacobianRelaxation | str = JacobianRelaxation.AUTO,
) -> _Analysis:
    method = _method(method)
    relaxation = JacobianRelaxation(relaxation)
    if method is Method.ALPHA_CROWN:
        raise ValueError("Jacobian bounds take pre-activation bounds from 'ibp' or 'crown'")
    if method is Method.CROWN_IBP:  # its intermediate bounds are IBP's
        method = Method.IBP
    lo, hi = region.bounding_box()
    example = ((lo[:1] + hi[:1]) / 2).repeat(2, *([1] * (lo.dim() - 1)))
    graph = build_graph(model, example)
    prop = _Propagation(graph, region, lo, hi)
    if method is Method.IBP:
        prop.run_ibp()
    else:
        prop.run_crown()
    return _Analysis(graph, prop.bounds, (lo, hi), relaxation)


# -- Lipschitz constants -------------------------------------------------------------------------


def _norm_value(p: float | int | str) -> float:
    value = INF if isinstance(p, str) and p.strip().lower() in ("inf", "infinity") else float(p)
    if value not in (1.0, 2.0, INF):
        raise ValueError(f"norms must be 1, 2 or inf, got {p!r}")
    return value


def lipschitz_bound(lo: Tensor, hi: Tensor, p: float | str = 2, q: float | str = 2) -> Tensor:
    """An upper bound [B] of the operator norm ||J||_{q -> p} of every J with lo <= J <= hi.

    `lo`, `hi` are Jacobian bounds [B, O, *input_shape]; with M = max(|lo|, |hi|) (>= |J|
    element-wise) and ||J v||_p <= || M |v| ||_p, the bound is the q -> p norm of the
    non-negative matrix M, which has a closed form for every pair (rows of M are outputs):

    | q -> p | bound |
    |---|---|
    | inf -> inf | largest row sum |
    | 1 -> 1 | largest column sum |
    | 2 -> 2 | min(sigma_max(M), sigma_max(J_mid) + sigma_max(R)) |
    | 1 -> 2 | largest column L2 norm |
    | 1 -> inf | largest entry |
    | 2 -> inf | largest row L2 norm |
    | inf -> 1 | sum of all entries (v = 1 is optimal for M >= 0) |
    | inf -> 2 | L2 norm of the row sums (M v <= M 1 for 0 <= v <= 1) |
    | 2 -> 1 | L2 norm of the column sums (Cauchy-Schwarz with v along M^T 1) |

    For 2 -> 2 the signed centre J_mid = (lo + hi) / 2 and radius R = (hi - lo) / 2 can do better
    (||J||_2 <= ||J_mid||_2 + ||R||_2, as |J - J_mid| <= R): exact when lo = hi. For the other
    pairs the same split gains nothing: their bounds are monotone and subadditive in M, and
    M = |J_mid| + R.

    Over a convex region whose Jacobians all lie in [lo, hi], the mean-value theorem gives
    ||f(x1) - f(x2)||_p <= L ||x1 - x2||_q (see docs/jacobian.md).

    >>> import torch
    >>> J = torch.tensor([[[3.0, -4.0]]])
    >>> [round(float(lipschitz_bound(J, J, p, q)), 4) for p, q in ((2, 2), (1, "inf"), ("inf", 1))]
    [5.0, 7.0, 4.0]
    """
    p, q = _norm_value(p), _norm_value(q)
    if lo.shape != hi.shape or lo.dim() < 3:
        raise ValueError("lo and hi must be Jacobian bounds of one shape [B, O, *input_shape]")
    M = torch.maximum(lo.abs(), hi.abs()).flatten(2)  # [B, O, N]
    if q == INF:
        rows = M.sum(-1)  # M 1
        if p == INF:
            return rows.amax(-1)
        return rows.sum(-1) if p == 1 else rows.norm(dim=-1)
    if q == 1:
        cols = M.amax(1) if p == INF else (M.sum(1) if p == 1 else M.norm(dim=1))
        return cols.amax(-1)
    # q == 2
    if p == INF:
        return M.norm(dim=-1).amax(-1)
    if p == 1:
        return M.sum(1).norm(dim=-1)
    mid, rad = ((hi + lo) / 2).flatten(2), ((hi - lo) / 2).flatten(2)
    return torch.minimum(_spectral(M), _spectral(mid) + _spectral(rad))


def _spectral(S: Tensor) -> Tensor:
    """The largest singular value of each matrix [..., m, n], from above: the square root of
    the largest eigenvalue of the smaller Gram matrix (3x faster than an SVD on CPU), raised by
    the Gram's rounding error (about k eps relative for k x k)."""
    G = S @ S.mT if S.shape[-2] <= S.shape[-1] else S.mT @ S
    k = G.shape[-1]
    top = torch.linalg.eigvalsh(G)[..., -1].clamp_min(0).sqrt()
    return top * (1 + k * torch.finfo(S.dtype).eps)


def lipschitz_constant(
    model: nn.Module,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
    *,
    region: Region | None = None,
    p: float | str = 2,
    q: float | str = 2,
    method: Method | str = Method.CROWN,
    relaxation: JacobianRelaxation | str = JacobianRelaxation.AUTO,
) -> Tensor:
    """A certified local Lipschitz constant [B] of the model over each (convex) region:
    ||f(x1) - f(x2)||_p <= L ||x1 - x2||_q for all x1, x2 in the region.

    `lipschitz_bound` of the Jacobian bounds (tight for small regions, where few neurons are
    unstable), and, for chains of layers (nn.Sequential), the smallest of the bounds obtained
    by cutting the chain after an activation k: `lipschitz_bound` of the bounds of d f / d u_k
    (u_k the activation's output) times the product of the q -> q norms of the layers before,
    each with the activation's largest |f'| on the region, `||diag(m_i) A_i||`. The cut after
    the last activation is the product of the layers' local norms, which never exceeds the
    global product of the layers' norms. For norms other than 2 -> 2, the 2 -> 2 bound
    converted with the norm equivalences of the input and output dimensions competes too.
    Computed without gradients.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> x = torch.rand(4, 2)
    >>> L = lipschitz_constant(net, x - 0.1, x + 0.1, p=2, q=2)
    >>> L.shape
    torch.Size([4])
    """
    with torch.no_grad():
        analysis = _analyse(model, _input_region(lower, upper, region), method, relaxation)
        return analysis.lipschitz(p, q)


# Chains whose affine segments have at most this many (input, output) pairs get the chain bound.
CHAIN_DENSE_LIMIT = 1 << 20


def _dense(rule: AffineRule, like: Tensor) -> Tensor | None:
    """The linear part of a single-input affine rule as a matrix [n_out, n_in] (or None)."""
    n_out = math.prod(rule.call.out_shape)
    n_in = math.prod(rule.call.in_shapes[0])
    if n_out * n_in > CHAIN_DENSE_LIMIT:
        return None
    eye = torch.eye(n_out, dtype=like.dtype, device=like.device)
    (coeff,), _ = rule.backward(eye.reshape(1, n_out, *rule.call.out_shape))
    if coeff is None:
        return like.new_zeros(n_out, n_in)
    if coeff.shape[0] != 1:  # depends on the sample
        return None
    return coeff.reshape(n_out, n_in)


def _chain_factors(
    graph: BoundGraph, bounds: list[Interval], like: Tensor
) -> list[tuple[Tensor, Tensor | None]] | None:
    """J = A_L D_{L-1} A_{L-1} ... D_1 A_1 as factors (A_i [n_out, n_in], the largest |f'|
    of the activation after it [B, n_out], None for the last), or None for other graphs."""
    factors: list[tuple[Tensor, Tensor | None]] = []
    segment: Tensor | None = None  # the product of the affine maps since the last activation
    with torch.no_grad():
        for i in range(1, len(graph.nodes)):
            node = graph.nodes[i]
            if node.inputs != (i - 1,):
                return None
            rule = node.rule
            if isinstance(rule, AffineRule):
                M = _dense(rule, like)
                if M is None:
                    return None
                segment = M if segment is None else M @ segment
                if segment.numel() > CHAIN_DENSE_LIMIT:
                    return None
            elif isinstance(rule, ActivationRule):
                d_lo, d_hi = derivative_range(rule, *bounds[node.inputs[0]])
                m = torch.maximum(d_lo.abs(), d_hi.abs()).flatten(1)
                factors.append((_or_eye(segment, m.shape[1], like), m))
                segment = None
            else:
                return None
    n_out = math.prod(graph.nodes[graph.output].shape)
    factors.append((_or_eye(segment, n_out, like), None))
    return factors


def _or_eye(segment: Tensor | None, n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device) if segment is None else segment


def _factor_norm(A: Tensor, m: Tensor | None, p: float) -> Tensor:
    """||diag(m) A||_{p -> p} per sample [B] (or ||A|| when m is None)."""
    S = A if m is None else m.unsqueeze(-1) * A
    if p == INF:
        return S.abs().sum(-1).amax(-1)
    if p == 1:
        return S.abs().sum(-2).amax(-1)
    return _spectral(S)


# -- explanation bounds --------------------------------------------------------------------------


def _flat_pair(lo: Tensor, hi: Tensor, g: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if lo.shape != hi.shape or lo.shape != g.shape:
        raise ValueError(
            f"map bounds {tuple(lo.shape)} / {tuple(hi.shape)} and reference {tuple(g.shape)} "
            "must have one shape [B, ...]"
        )
    return lo.flatten(1), hi.flatten(1), g.flatten(1)


def distance_bound(lo: Tensor, hi: Tensor, g: Tensor, p: float | str = 2) -> Tensor:
    """max over maps s with lo <= s <= hi of ||s - g||_p, per sample [B].

    Each entry of |s - g| is at most max(hi - g, g - lo) (exact per entry, wherever g is), and
    Lp norms are monotone in the absolute entries.

    >>> import torch
    >>> distance_bound(torch.tensor([[0.0, -1.0]]), torch.tensor([[2.0, 1.0]]),
    ...                torch.tensor([[0.5, 0.0]]), "inf").tolist()
    [1.5]
    """
    lo, hi, g = _flat_pair(lo, hi, g)
    gap = torch.maximum(hi - g, g - lo)
    return torch.linalg.vector_norm(gap, ord=_norm_value(p), dim=1)


def mse_bound(lo: Tensor, hi: Tensor, g: Tensor) -> Tensor:
    """max over maps s in [lo, hi] of the mean squared difference to g, per sample [B]."""
    lo, hi, g = _flat_pair(lo, hi, g)
    return torch.maximum(hi - g, g - lo).pow(2).mean(dim=1)


def cosine_lower_bound(lo: Tensor, hi: Tensor, g: Tensor) -> Tensor:
    """A lower bound [B] of `propdsl.explain.cosine(s, g)` over every map s with lo <= s <= hi.

    The dot product s . g is bounded below exactly by interval arithmetic (d = sum of
    min(lo g, hi g)); ||s|| lies between the distance from 0 to the box (N_min) and
    ||max(|lo|, |hi|)|| (N_max). With the cosine's guard against zero maps (norms clamped at
    1e-12, as in `explain.cosine`): d / (max(N_max, eps) max(||g||, eps)) when d >= 0, and
    d / (max(N_min, eps) max(||g||, eps)) when d < 0; clamped into [-1, 1].

    A second, geometric bound: every s of the box lies within R = `distance_bound(lo, hi, g, 2)`
    of g, and the angle between g and any point of that ball is at most arcsin(R / ||g||), so
    cos >= sqrt(1 - (R / ||g||)^2) when ||g|| - R > 0 (the guard then never applies). The larger
    of the two is returned: the first wins for wide boxes, the second when the box is narrow
    but far from 0 in a few entries.

    >>> import torch
    >>> g = torch.tensor([[1.0, 0.0]])
    >>> round(float(cosine_lower_bound(g, torch.tensor([[1.0, 0.5]]), g)), 4)
    0.8944
    """
    lo, hi, g = _flat_pair(lo, hi, g)
    dot = torch.minimum(lo * g, hi * g).sum(dim=1)
    largest = torch.linalg.vector_norm(torch.maximum(lo.abs(), hi.abs()), dim=1)
    nearest = torch.clamp(torch.zeros_like(lo), lo, hi)  # the point of the box closest to 0
    smallest = torch.linalg.vector_norm(nearest, dim=1)
    g_norm = torch.linalg.vector_norm(g, dim=1).clamp_min(_EPS)
    norm = torch.where(dot >= 0, largest, smallest).clamp_min(_EPS)
    interval = (dot / (norm * g_norm)).clamp(-1.0, 1.0)
    radius = torch.linalg.vector_norm(torch.maximum(hi - g, g - lo), dim=1)
    g_true = torch.linalg.vector_norm(g, dim=1)
    ratio = radius / g_true.clamp_min(_EPS)
    inside = (g_true - radius > _EPS) & (ratio < 1.0)
    geometric = torch.sqrt((1.0 - ratio.clamp(max=1.0) ** 2).clamp_min(0.0))
    return torch.where(inside, torch.maximum(interval, geometric), interval)


def topk_lower_bound(lo: Tensor, hi: Tensor, g: Tensor, k: int) -> Tensor:
    """A lower bound [B] of `propdsl.explain.topk_intersection(s, g, k)` (importance |.|) over
    every map s with lo <= s <= hi.

    Feature i is in the top k of |s| for every s of the box when at most k - 1 other features
    can reach its smallest magnitude (#{j != i : max|s_j| >= min|s_i|} <= k - 1, whatever the
    tie-breaking); the bound counts such features among the top k of |g| (chosen by
    `torch.topk`, as the property does). The whole top-k set is certified when the bound is 1.

    >>> import torch
    >>> lo, hi = torch.tensor([[0.8, 0.5, 0.0]]), torch.tensor([[1.0, 0.7, 0.1]])
    >>> topk_lower_bound(lo, hi, torch.tensor([[1.0, 0.7, 0.0]]), 1).tolist()
    [1.0]
    """
    lo, hi, g = _flat_pair(lo, hi, g)
    n = lo.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in 1..{n}, got {k}")
    cross = (lo < 0) & (hi > 0)
    low = torch.where(cross, torch.zeros_like(lo), torch.minimum(lo.abs(), hi.abs()))
    high = torch.maximum(lo.abs(), hi.abs())
    ordered = high.sort(dim=1).values
    # features whose largest magnitude reaches low_i (i itself included)
    reach = n - torch.searchsorted(ordered, low.contiguous(), side="left")
    certain = reach <= k
    top = g.abs().topk(k, dim=1).indices
    return certain.gather(1, top).sum(dim=1).to(lo.dtype) / k


def product_bounds(a_lo: Tensor, a_hi: Tensor, b_lo: Tensor, b_hi: Tensor) -> Interval:
    """Element-wise bounds of a * b for a in [a_lo, a_hi] and b in [b_lo, b_hi] (gradient x
    input from bounds of the input and of the saliency)."""
    return _interval_product(a_lo, a_hi, b_lo, b_hi)


# -- properties decided by Jacobian bounds -------------------------------------------------------
#
# Two families of properties are outside the linear fragment of `propdsl.verify.query` but are
# decided from bounds of Jacobian rows over the region:
#
# * Lipschitz bounds, `norm(f(x1) - f(x2), p) <= L * norm(x1 - x2, q)` for x1, x2 in a region
#   (or x2 a point such as the sample itself): proved when the certified constant of
#   `_Analysis.lipschitz` (as `lipschitz_constant`) is at most L over a convex region holding
#   both points;
# * explanation stability, comparisons of `saliency(f, x', y)` (or `grad(f(x')[y], x')`,
#   `gradient_x_input(f, x', y)`) with a map free of x': `norm(. - g, p) <= tau`,
#   `mse(., g) <= tau`, `cosine(., g) >= tau`, `topk_overlap(., g, k) >= t`; the map's bounds
#   are the Jacobian row y.
#
# Such comparisons may be combined with `and` / `or`.


@dataclass(eq=False)
class _Atom:
    """One comparison: the Jacobian rows it needs ([B, K] output indices) and how their bounds
    [B, K, *input_shape] become a certified margin [B] (>= 0 proves it; > 0 where strict)."""

    rows: Tensor
    margin: Callable[[Tensor, Tensor, _Analysis], Tensor]
    strict: bool = False


@dataclass(eq=False)
class _Combine:
    conj: bool
    children: list[_Atom | _Combine]


@dataclass(eq=False)
class JacobianQuery:
    """A property decided from Jacobian bounds over one convex region, for a batch of samples."""

    network: str
    region: Region
    root: _Atom | _Combine
    atoms: list[_Atom]

    def prove(self, model: nn.Module, method: Method | str = Method.CROWN) -> tuple[Tensor, Tensor]:
        """(proved [B] bool, certified margin [B]); alpha-CROWN falls back to CROWN's
        pre-activation bounds."""
        method = _method(method)
        if method is Method.ALPHA_CROWN:
            method = Method.CROWN
        rows = torch.cat([a.rows for a in self.atoms], dim=1)
        shared = bool((rows == rows[:1]).all())
        with torch.no_grad():
            analysis = _analyse(model, self.region, method)
            lo, hi = analysis.jacobian(rows[0] if shared else rows, None)
        results: dict[int, tuple[Tensor, Tensor]] = {}
        start = 0
        for atom in self.atoms:
            k = atom.rows.shape[1]
            with torch.no_grad():
                m = atom.margin(lo[:, start : start + k], hi[:, start : start + k], analysis)
            results[id(atom)] = (m > 0 if atom.strict else m >= 0, m)
            start += k
        return _fold(self.root, results)


def _fold(
    node: _Atom | _Combine, results: dict[int, tuple[Tensor, Tensor]]
) -> tuple[Tensor, Tensor]:
    if isinstance(node, _Atom):
        return results[id(node)]
    parts = [_fold(c, results) for c in node.children]
    proved = torch.stack([p for p, _ in parts])
    margin = torch.stack([m for _, m in parts])
    if node.conj:
        return proved.all(0), margin.amin(0)
    return proved.any(0), margin.amax(0)


class _NoMatch(Exception):
    """The formula is not of a form the Jacobian route decides."""


def to_jacobian_query(
    formula: I.Node,
    params: Sequence[str],
    networks: dict[str, int],
    x: Tensor,
    y: Tensor | None,
    models: dict[str, nn.Module],
) -> JacobianQuery | None:
    """The Jacobian query of a Lipschitz or explanation-stability property (see above), or None
    when `formula` has neither form (the caller then reports why the linear verifier cannot
    decide it).

    Raises:
        Unsupported: a strict Lipschitz inequality (false where the two points coincide), or
            an explanation without certified bounds (smoothgrad, integrated gradients).
    """
    values = {params[0]: x}
    if len(params) > 1 and y is not None:
        values[params[1]] = y
    env = Env(models, values, x.shape[0], get_logic("boolean"), CompileConfig())
    compiler = Compiler()
    node = formula
    variables: list[I.Var] = []
    domains: list[I.Domain] = []
    while (
        isinstance(node, I.Quant)
        and node.kind == "forall"
        and not any(isinstance(d, I.Range) for d in node.domains)
    ):
        variables += node.vars
        domains += node.domains
        node = node.body
    if not 1 <= len(variables) <= 2 or any(_over_region(n) for n in I.walk(node)):
        return None
    regions = {v.name: compiler._domain(d)(env) for v, d in zip(variables, domains, strict=True)}  # noqa: SLF001
    for var, reg in regions.items():
        # The hull below would turn an empty region's placeholder point into a box: refuse it
        # (the verifier decides such samples as vacuous before building a query).
        if bool(reg.is_empty().any()):
            raise RegionError(f"the region of {var} is empty for some samples")
    if len(variables) == 2 and domains[0] != domains[1]:
        region = _hull(*regions.values())
    else:
        region = regions[variables[0].name]
    matcher = _Matcher(compiler, env, networks, set(regions))
    try:
        root = matcher.clause(node)
    except _NoMatch:
        return None
    for point in matcher.points:
        if not bool(region.contains(point, tol=0.0).all()):
            # The mean-value theorem needs the segment to the point inside the region.
            region = _hull(region, Region.box(point, point))
    return JacobianQuery(cast(str, matcher.network), region, root, matcher.atoms)


def _hull(*regions: Region) -> Region:
    """The smallest box containing every region (convex, so it holds every segment)."""
    boxes = [r.bounding_box() for r in regions]
    lo = boxes[0][0]
    hi = boxes[0][1]
    for b_lo, b_hi in boxes[1:]:
        lo, hi = torch.minimum(lo, b_lo), torch.maximum(hi, b_hi)
    return Region.box(lo, hi)


_LOWER_BOUNDED = ("cosine", "topk_overlap")  # compared with >=
_UPPER_BOUNDED = ("norm", "mse")  # compared with <=


class _Matcher:
    def __init__(self, compiler: Compiler, env: Env, networks: dict[str, int], binders: set[str]):
        self.compiler = compiler
        self.env = env
        self.networks = networks
        self.binders = binders
        self.network: str | None = None
        self.atoms: list[_Atom] = []
        self.points: list[Tensor] = []  # points the region must contain (one-point Lipschitz)

    # -- helpers -------------------------------------------------------------------------------
    def free(self, node: I.Node) -> bool:
        return not (I.free_vars(node) & self.binders)

    def value(self, node: I.Node) -> Tensor:
        """A sub-formula free of the quantified inputs, evaluated exactly per sample."""
        with torch.enable_grad():  # explanations of the sample need input gradients
            return self.compiler(node)(self.env).detach()

    def per_sample(self, node: I.Node) -> Tensor:
        v = self.value(node).reshape(-1)
        return v.expand(self.env.batch) if v.numel() == 1 else v

    def use(self, net: str) -> None:
        if self.network not in (None, net):
            raise _NoMatch
        self.network = net

    def add(self, rows: Tensor, margin, strict: bool = False) -> _Atom:
        atom = _Atom(rows, margin, strict)
        self.atoms.append(atom)
        return atom

    # -- clauses -------------------------------------------------------------------------------
    def clause(self, node: I.Node) -> _Atom | _Combine:
        if isinstance(node, I.And | I.Or):
            return _Combine(isinstance(node, I.And), [self.clause(c) for c in node.items])
        if isinstance(node, I.Linear):
            node = node.atom
        if not isinstance(node, I.Cmp) or node.op not in ("<=", "<", ">=", ">"):
            raise _NoMatch
        op, left, right = node.op, node.left, node.right
        if op in (">=", ">"):  # a <= form: small <= large
            op, left, right = {">=": "<=", ">": "<"}[op], right, left
        strict = op == "<"
        lipschitz = self.lipschitz(left, right, node)
        if lipschitz is not None:
            return lipschitz
        if self.free(right) and isinstance(left, I.Fn) and left.fn in _UPPER_BOUNDED:
            return self.explanation(left, right, upper=True, strict=strict)
        if self.free(left) and isinstance(right, I.Fn) and right.fn in _LOWER_BOUNDED:
            return self.explanation(right, left, upper=False, strict=strict)
        raise _NoMatch

    # -- Lipschitz -----------------------------------------------------------------------------
    def lipschitz(self, left: I.Node, right: I.Node, cmp: I.Cmp) -> _Atom | None:
        """`norm(f(a) - f(b), p) <= c * norm(a - b, q)` (c may be absent or on either side)."""
        outs = _norm_of_difference(left)
        if outs is None:
            return None
        a, b, p = outs
        if not (isinstance(a, I.Apply) and isinstance(b, I.Apply) and a.net == b.net):
            return None
        factor: I.Node = I.Const(1.0)
        ins = _norm_of_difference(right)
        if ins is None and isinstance(right, I.Arith) and right.op == "*":
            for c, other in ((right.left, right.right), (right.right, right.left)):
                ins = _norm_of_difference(other)
                if ins is not None and self.free(c):
                    factor = c
                    break
                ins = None
        if ins is None:
            return None
        a2, b2, q = ins
        # IR equality ignores spans: the same two points, in either order
        if {a.arg, b.arg} != {a2, b2} or a.arg == b.arg:
            return None
        quantified = [n for n in (a.arg, b.arg) if isinstance(n, I.Var) and n.name in self.binders]
        if not quantified:
            return None
        for n in (a.arg, b.arg):
            if not (isinstance(n, I.Var) and n.name in self.binders):
                if not self.free(n):
                    return None
                self.points.append(self.value(n))  # the one-point form: f(x') vs f(x)
        if cmp.op in ("<", ">"):
            raise Unsupported(
                "a strict Lipschitz inequality fails where the two points coincide; use '<='",
                cmp.span,
            )
        self.use(a.net)
        bound = self.per_sample(factor)
        outputs = self.networks[a.net]
        rows = torch.arange(outputs, device=bound.device).expand(self.env.batch, outputs)

        def margin(lo: Tensor, hi: Tensor, analysis: _Analysis) -> Tensor:
            return bound.to(lo) - analysis.lipschitz(p, q)

        return self.add(rows, margin)

    # -- explanations --------------------------------------------------------------------------
    def explanation(self, fn: I.Fn, threshold: I.Node, *, upper: bool, strict: bool) -> _Atom:
        """`fn(E(x'), g) <= / >= threshold` for an explanation E of x' and a map g free of x'."""
        if fn.fn == "norm":
            (arg,) = fn.args
            if not (isinstance(arg, I.Arith) and arg.op == "-"):
                raise _NoMatch
            pair: tuple[I.Node, ...] = (arg.left, arg.right)
        else:
            pair = fn.args[:2]
        first, second = pair
        explained, reference = (first, second) if self.free(second) else (second, first)
        if not self.free(reference):
            raise _NoMatch
        kind, net, label = self.explainer(explained)
        self.use(net)
        g = self.value(reference)
        tau = self.per_sample(threshold)
        rows = self.per_sample(label).long().reshape(-1, 1)
        if bool(((rows < 0) | (rows >= self.networks[net])).any()):
            raise _NoMatch
        name, options = fn.fn, dict(fn.options)

        def margin(lo: Tensor, hi: Tensor, analysis: _Analysis) -> Tensor:
            lo, hi = lo[:, 0], hi[:, 0]  # the saliency's bounds [B, *input_shape]
            if kind == "gradient_x_input":
                lo, hi = product_bounds(*analysis.box, lo, hi)
            ref = g.to(lo).expand_as(lo)
            if name == "norm":
                value = distance_bound(lo, hi, ref, float(cast(float, options["p"])))
            elif name == "mse":
                value = mse_bound(lo, hi, ref)
            elif name == "cosine":
                value = cosine_lower_bound(lo, hi, ref)
            else:
                value = topk_lower_bound(lo, hi, ref, int(cast(int, options["k"])))
            t = tau.to(lo)
            return t - value if upper else value - t

        return self.add(rows, margin, strict)

    def explainer(self, node: I.Node) -> tuple[str, str, I.Node]:
        """(kind, network, label) of `saliency(f, x', y)`, `grad(f(x')[y], x')` or
        `gradient_x_input(f, x', y)` at a quantified input."""
        if isinstance(node, I.Fn) and node.fn in ("saliency", "gradient_x_input"):
            point, label = node.args
            if self._binder(point) and self.free(label):
                return node.fn, str(node.option("net")), label
        if isinstance(node, I.Fn) and node.fn in ("smoothgrad", "integrated_gradients"):
            raise Unsupported(
                f"'{node.fn}' has no certified bounds; Jacobian bounds cover saliency, "
                "grad(f(x')[y], x') and gradient_x_input",
                node.span,
            )
        if isinstance(node, I.Fn) and node.fn == "grad":
            expr, wrt = node.args
            if (
                self._binder(wrt)
                and isinstance(expr, I.Idx)
                and isinstance(expr.base, I.Apply)
                and len(expr.indices) == 1
                and expr.base.arg == wrt
                and self.free(expr.indices[0])
            ):
                return "saliency", expr.base.net, expr.indices[0]
        raise _NoMatch

    def _binder(self, node: I.Node) -> bool:
        return isinstance(node, I.Var) and node.name in self.binders


def _norm_of_difference(node: I.Node) -> tuple[I.Node, I.Node, float] | None:
    """(a, b, p) of `norm(a - b, p)`."""
    if not (isinstance(node, I.Fn) and node.fn == "norm"):
        return None
    (arg,) = node.args
    if not (isinstance(arg, I.Arith) and arg.op == "-"):
        return None
    return arg.left, arg.right, float(cast(float, node.option("p", 2.0)))
