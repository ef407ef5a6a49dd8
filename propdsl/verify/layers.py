"""Bound rules: how one layer type maps intervals (IBP) and linear bounds (CROWN) backwards.

Every operation of a traced model is bound by one rule object, built from a `Call` (the module or
function, its constant arguments and the per-sample shapes). Rules come in two kinds the engine
knows how to propagate:

* `AffineRule`: the operation is affine in its bounded inputs (Linear, Conv2d, pooling by
  averaging, BatchNorm in eval mode, reshapes, sums). `backward(A)` maps coefficients on the
  output to coefficients on each input plus a constant: exact, no relaxation needed.
* `ActivationRule`: an element-wise nonlinearity of one input. `relax(l, u)` returns a lower and
  an upper line per neuron, valid on the neuron's input interval [l, u]; alpha-CROWN optimises
  the slopes of those lines within `alpha_range`.

* `NonlinearRule`: a nonlinearity over several elements (max pooling). `backward(A, l, u)`
  back-substitutes through a linear lower and upper function built from the input's bounds.

A plain `BoundRule` with only `ibp` is enough for interval bound propagation.

The Jacobian bounds (`propdsl.verify.jacobian`) read each rule's derivative beside its bounds:
an activation's `derivative_range(l, u)` (the range of f' on [l, u]), a nonlinear rule's
`derivative_backward`, and an affine rule's `abs_backward` (through |M|) and `forward_linear`
(M applied forwards); affine rules without their own get the generic ones from their matrix.
So a new activation, bounds and derivative, is one class.

`REGISTRY` maps module classes, functions and tensor-method names to rule classes;
`register_rule(key, ...)(RuleClass)` adds or replaces an entry, so a new layer is one new class:

>>> import torch
>>> from torch import nn
>>> class Double(nn.Module):
...     def forward(self, x):
...         return 2 * x
>>> @register_rule(Double)
... class DoubleRule(ElementwiseLinearRule):
...     def terms(self):
...         return [2.0], None
>>> rule_for_module(Double()) is DoubleRule
True
"""

from __future__ import annotations

import abc
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from propdsl.errors import PropdslError
from propdsl.models import HalfHuberReLU

__all__ = [
    "DERIVATIVES",
    "REGISTRY",
    "ActivationRule",
    "AffineRule",
    "BoundArg",
    "BoundRule",
    "Call",
    "ElementwiseLinearRule",
    "Interval",
    "NonlinearRule",
    "Relaxation",
    "SShapedRule",
    "UnsupportedLayerError",
    "derivative_range",
    "interval_product",
    "register_derivative",
    "register_rule",
    "rule_for_call",
    "rule_for_module",
]

Interval = tuple[Tensor, Tensor]


class UnsupportedLayerError(PropdslError, NotImplementedError):
    """The model contains a layer or function that no bound rule covers (or covers only in part)."""


class NoForwardMap(Exception):
    """An affine layer whose linear part cannot be applied forwards within the size limits."""


# The generic `AffineRule.forward_linear` materialises matrices of at most this many entries.
FORWARD_DENSE_LIMIT = 1 << 20


def interval_product(a_lo: Tensor, a_hi: Tensor, d_lo: Tensor, d_hi: Tensor) -> Interval:
    """The hull of {a * d : a in [a_lo, a_hi], d in [d_lo, d_hi]}, element-wise."""
    p1, p2, p3, p4 = a_lo * d_lo, a_lo * d_hi, a_hi * d_lo, a_hi * d_hi
    lo = torch.minimum(torch.minimum(p1, p2), torch.minimum(p3, p4))
    hi = torch.maximum(torch.maximum(p1, p2), torch.maximum(p3, p4))
    return lo, hi


# -- calls ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BoundArg:
    """Placeholder, in `Call.args`, for the `index`-th bounded input of the operation."""

    index: int


@dataclass(frozen=True, eq=False)
class Call:
    """One operation of the traced model, as a rule sees it.

    `target` is the module instance (for layers), the function, or the tensor-method name.
    Bounded inputs appear in `args` / `kwargs` as `BoundArg(i)`; everything else is a constant.
    Shapes are per sample (without the batch dimension).
    """

    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    in_shapes: tuple[torch.Size, ...]
    out_shape: torch.Size
    name: str
    dtype: torch.dtype
    device: torch.device

    @property
    def module(self) -> Any:
        """The module of a layer call (typed Any: rules read their own layer's attributes)."""
        if not isinstance(self.target, nn.Module):
            raise TypeError(f"{self.describe()} is not a module call")
        return self.target

    def arg(self, position: int, name: str, default: Any = None) -> Any:
        """An argument given by position or by keyword (the way Python would bind it)."""
        if position < len(self.args):
            return self.args[position]
        return self.kwargs.get(name, default)

    def constant(self, position: int, name: str, default: Any = None) -> Any:
        """Like `arg`, but the argument must not depend on the bounded input."""
        value = self.arg(position, name, default)
        if isinstance(value, BoundArg):
            raise UnsupportedLayerError(
                f"{self.describe()}: argument '{name}' depends on the input; bound propagation "
                "needs it to be a constant"
            )
        return value

    def tensor(self, value: Any) -> Tensor:
        """A constant as a tensor on the model's device and dtype."""
        return torch.as_tensor(value, dtype=self.dtype, device=self.device)

    def describe(self) -> str:
        return f"'{self.name}' ({describe_target(self.target)})"


def describe_target(target: Any) -> str:
    if isinstance(target, nn.Module):
        cls = type(target)
        prefix = "nn." if cls.__module__.startswith("torch.nn") else f"{cls.__module__}."
        return prefix + cls.__qualname__
    if isinstance(target, str):
        return f"tensor method .{target}()"
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or repr(target)
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"F.{name}"
    if module.startswith("torch"):
        return f"torch.{name}"
    if module in ("_operator", "operator"):
        return f"operator.{name}"
    return f"{module}.{name}" if module else name


# -- rules ---------------------------------------------------------------------------------------


class BoundRule(abc.ABC):
    """Bounds of one operation. Subclasses read what they need from the `Call` in `__init__`
    (and raise `UnsupportedLayerError` for configurations they cannot bound)."""

    def __init__(self, call: Call):
        self.call = call

    @abc.abstractmethod
    def ibp(self, *inputs: Interval) -> Interval:
        """Element-wise bounds [B, *out_shape] of the output, given bounds of each input."""

    def derivative_backward(self, lo: Tensor, hi: Tensor, lower: Tensor, upper: Tensor) -> Interval:
        """Interval bounds of R . d out / d x for every R in [lo, hi] ([B', S, *out_shape]),
        valid at every x of the input box [lower, upper] ([B, *in_shape]): the Jacobian bounds'
        step through a nonlinear single-input operation (affine rules take theirs from
        `backward` and `abs_backward`)."""
        raise UnsupportedLayerError(
            f"{self.call.describe()}: Jacobian bounds need an AffineRule or an ActivationRule "
            "for every operation"
        )


class AffineRule(BoundRule):
    """An operation that is affine in its bounded inputs: out = sum_k M_k x_k + c.

    `mixes` is False for maps that act on each element alone (reshapes, element-wise scaling):
    interval arithmetic through them loses nothing.
    """

    mixes: ClassVar[bool] = True
    # True when every M_k is non-negative (reshapes, averages): then |M_k| = M_k.
    nonnegative: ClassVar[bool] = False

    @abc.abstractmethod
    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        """Coefficients A [B', S, *out_shape] on the output -> coefficients on each input
        ([B', S, *in_shape_k], None for an input that does not occur) and the constant
        A . c of shape [B', S] (None when zero). B' is 1 or the batch size."""

    def abs_backward(self, R: Tensor) -> list[Tensor | None]:
        """R |M_k| for each bounded input k, for R [B', S, *out_shape] >= 0: the radius of an
        interval Jacobian through the layer. Generic: M from `backward` of the identity (rules
        override it with a map that does not materialise M)."""
        if self.nonnegative:
            return self.backward(R)[0]
        out_shape = self.call.out_shape
        n = math.prod(out_shape)
        eye = torch.eye(n, dtype=R.dtype, device=R.device).reshape(1, n, *out_shape)
        coeffs, _ = self.backward(eye)
        out: list[Tensor | None] = []
        for coeff, shape in zip(coeffs, self.call.in_shapes, strict=True):
            if coeff is None:
                out.append(None)
                continue
            M = coeff.reshape(coeff.shape[0], n, -1).abs()  # [1 or B, n_out, n_in]
            out.append((R.flatten(2) @ M).reshape(*R.shape[:2], *shape))
        return out

    def forward_linear(self, k: int, G: Tensor) -> Tensor:
        """M_k G on G [*lead, *in_shape_k] -> [*lead, *out_shape]: the linear part of input k
        applied forwards (the adjoint of `backward`), for the Jacobian's linear pass. Generic:
        M_k from `backward` of the identity, up to `FORWARD_DENSE_LIMIT` entries, beyond which
        it raises `NoForwardMap` (rules override it with their own map)."""
        in_shape, out_shape = self.call.in_shapes[k], self.call.out_shape
        lead = G.shape[: G.dim() - len(in_shape)]
        n_out, n_in = math.prod(out_shape), math.prod(in_shape)
        if n_out * n_in > FORWARD_DENSE_LIMIT:
            raise NoForwardMap(self.call.describe())
        eye = torch.eye(n_out, dtype=G.dtype, device=G.device).reshape(1, n_out, *out_shape)
        coeff = self.backward(eye)[0][k]
        if coeff is None:
            return G.new_zeros(*lead, *out_shape)
        # [1 or B, n_out, *in_shape] -> [1 or B, 1, ..., n_in, n_out], batched like G
        M = coeff.reshape(coeff.shape[0], *([1] * (len(lead) - 2)), n_out, n_in).mT
        out = G.reshape(*lead, n_in) @ M
        return out.reshape(*out.shape[:-1], *out_shape)

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        """Row norms of the linear part M, applied forwards to per-element weights v >= 0
        ([1, *in_shape]): for q = 2, u_k = sum_j M_kj^2 v_j (v holds squared weights); for
        q = inf, u_k = max_j |M_kj| v_j. Composed along a chain with at most one mixing layer
        (`BoundGraph.is_direct`), they give the dual norms of the rows of the whole chain: the
        closed-form bounds of an affine function of an L2 / L1 ball. None: no closed form (the
        engine then bounds the chain by a backward pass)."""
        return None

    def ibp(self, *inputs: Interval) -> Interval:
        # Generic and exact per input: backward from the identity, concretised over each box.
        like = inputs[0][0]
        n = math.prod(self.call.out_shape)
        eye = torch.eye(n, dtype=like.dtype, device=like.device)
        spec = torch.cat([eye, -eye]).reshape(1, 2 * n, *self.call.out_shape)
        coeffs, bias = self.backward(spec)
        lb = torch.zeros((), dtype=like.dtype, device=like.device)
        for coeff, (lo, hi) in zip(coeffs, inputs, strict=True):
            if coeff is not None:
                lb = lb + concretize_box(coeff, lo, hi)
        if bias is not None:
            lb = lb + bias
        lb = lb.expand(like.shape[0], 2 * n)
        shape = (like.shape[0], *self.call.out_shape)
        return lb[:, :n].reshape(shape), (-lb[:, n:]).reshape(shape)


@dataclass(frozen=True)
class Relaxation:
    """Lines per neuron with lower_slope * x + lower_bias <= f(x) <= upper_slope * x + upper_bias
    for every x in the neuron's input interval. Tensors broadcast against [B, *shape] (CROWN) or
    [B, S, *shape] (alpha-CROWN, one line per specification row)."""

    lower_slope: Tensor
    lower_bias: Tensor
    upper_slope: Tensor
    upper_bias: Tensor


class ActivationRule(BoundRule):
    """An element-wise nonlinearity of a single input."""

    @abc.abstractmethod
    def function(self, x: Tensor) -> Tensor:
        """The activation itself (used for IBP and exact line offsets)."""

    def ibp(self, *inputs: Interval) -> Interval:
        # Monotone non-decreasing by default; rules for other shapes override.
        ((lo, hi),) = inputs
        return self.function(lo), self.function(hi)

    def needs_bounds(self, lower: Tensor, upper: Tensor) -> Tensor:
        """Which neurons' relaxations would gain from tighter input bounds (bool, like lower).
        The engine computes CROWN bounds only for those."""
        return torch.ones_like(lower, dtype=torch.bool)

    @abc.abstractmethod
    def relax(self, lower: Tensor, upper: Tensor, alpha: Tensor | None = None) -> Relaxation:
        """Sound lines on [lower, upper]. `alpha` ([k, ...] broadcasting against lower) holds
        optimised slope parameters; None asks for CROWN's default choice."""

    def init_alpha(self, lower: Tensor, upper: Tensor) -> Tensor | None:
        """CROWN's own slope parameters [k, *lower.shape] (alpha-CROWN starts there), or None
        when the relaxation has nothing to optimise."""
        return None

    def alpha_range(self, lower: Tensor, upper: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """Where alpha-CROWN projects the parameters after each step: numbers, or tensors
        [k or 1, *lower.shape]."""
        return 0.0, 1.0

    def derivative_range(self, lower: Tensor, upper: Tensor) -> Interval:
        """Element-wise bounds of f' over the pre-activation bounds [lower, upper] ([B, *shape]),
        valid for the gradient autograd computes too (at a kink, every one-sided derivative).
        Needed for Jacobian bounds only; the engine reads it through `derivative_range`, so a
        function registered with `register_derivative` takes precedence."""
        raise UnsupportedLayerError(
            f"{self.call.describe()}: no derivative range for {type(self).__name__}; give the "
            "rule a derivative_range method, or register one with "
            f"@propdsl.verify.jacobian.register_derivative({type(self).__name__})"
        )

    def derivative_backward(self, lo: Tensor, hi: Tensor, lower: Tensor, upper: Tensor) -> Interval:
        # The chain rule through an element-wise map: R * f', an interval product per element.
        d_lo, d_hi = derivative_range(self, lower, upper)
        return interval_product(lo, hi, d_lo.unsqueeze(1), d_hi.unsqueeze(1))


# -- registry ------------------------------------------------------------------------------------

REGISTRY: dict[Any, type[BoundRule]] = {}
_version = [0]  # bumped on every registration: cached traces depend on which modules have rules

# Duck-typed module rules, tried after the registry: (predicate, rule class).
_DUCK_RULES: list[tuple[Callable[[nn.Module], bool], type[BoundRule]]] = []


def register_rule(*targets: Any) -> Callable[[type[BoundRule]], type[BoundRule]]:
    """Class decorator: bound `targets` (module classes, functions, tensor-method names) with
    the decorated rule class. A later registration replaces an earlier one.

    >>> from torch import nn
    >>> @register_rule(nn.Hardtanh, "hardtanh")
    ... class HardtanhRule(ActivationRule):
    ...     def function(self, x):
    ...         return torch.clamp(x, -1.0, 1.0)
    ...     def relax(self, lower, upper, alpha=None):
    ...         raise NotImplementedError  # IBP only
    >>> REGISTRY[nn.Hardtanh].__name__
    'HardtanhRule'
    >>> del REGISTRY[nn.Hardtanh], REGISTRY["hardtanh"]
    """
    if not targets:
        raise TypeError("register_rule needs at least one module class, function or method name")

    def decorate(rule: type[BoundRule]) -> type[BoundRule]:
        if not (isinstance(rule, type) and issubclass(rule, BoundRule)):
            raise TypeError(f"register_rule decorates BoundRule subclasses, not {rule!r}")
        for target in targets:
            REGISTRY[target] = rule
        _version[0] += 1
        return rule

    return decorate


def rule_for_module(module: nn.Module) -> type[BoundRule] | None:
    """The rule class of a module: its own class, a registered base class whose `forward` it
    does not override, or a duck-typed rule (modules named Normalize with mean and std)."""
    cls = type(module)
    if cls in REGISTRY:
        return REGISTRY[cls]
    for base in cls.__mro__[1:]:
        if base in REGISTRY and getattr(cls, "forward", None) is getattr(base, "forward", None):
            return REGISTRY[base]
    for predicate, rule in _DUCK_RULES:
        if predicate(module):
            return rule
    return None


def registry_version() -> int:
    """Changes whenever a rule is registered (cached traces depend on the registry)."""
    return _version[0]


def rule_for_call(target: Any) -> type[BoundRule] | None:
    """The rule class of a function or tensor-method name, if one is registered."""
    try:
        return REGISTRY.get(target)
    except TypeError:  # unhashable target
        return None


DerivativeRange = Callable[[ActivationRule, Tensor, Tensor], Interval]

# Derivative ranges registered for rule classes one does not own: rule class ->
# (rule, lower, upper) -> (d_lo, d_hi). A rule's own `derivative_range` method is the usual place.
DERIVATIVES: dict[type, DerivativeRange] = {}


def register_derivative(*rules: type) -> Callable[[DerivativeRange], DerivativeRange]:
    """Function decorator: the range of the derivative of the activations bound by `rules`
    (ActivationRule subclasses; subclasses of a registered rule inherit it), for a rule class
    without its own `derivative_range` method, or to replace it.

    The function receives the rule and the pre-activation bounds [B, *shape] and returns
    element-wise bounds of f' over them, valid for the gradient autograd computes too (at a
    kink, every one-sided derivative).

    >>> from torch import nn
    >>> from propdsl.verify import ActivationRule, register_rule
    >>> from propdsl.verify.jacobian import jacobian_bounds
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
    """Bounds of the activation's derivative on [lower, upper]: along the rule's class
    hierarchy, the first registered function (`DERIVATIVES`) or `derivative_range` method."""
    for cls in type(rule).__mro__:
        fn = DERIVATIVES.get(cls)
        if fn is not None:
            return fn(rule, lower, upper)
        if cls is ActivationRule:
            break
        method = vars(cls).get("derivative_range")
        if method is not None:
            return method(rule, lower, upper)
    return rule.derivative_range(lower, upper)  # ActivationRule's: names what is missing


# -- tensor helpers shared with the engine -------------------------------------------------------


def concretize_box(A: Tensor, lower: Tensor, upper: Tensor) -> Tensor:
    """min over x in [lower, upper] of A . x, for A [B', S, *shape] and bounds [B, *shape]."""
    coeff = A.flatten(2)
    mid = ((upper + lower) / 2).flatten(1).unsqueeze(-1)
    rad = ((upper - lower) / 2).flatten(1).unsqueeze(-1)
    return (coeff @ mid - coeff.abs() @ rad).squeeze(-1)


def sum_spec(t: Tensor) -> Tensor:
    """Sum every dimension after the first two ([B', S, ...] -> [B', S])."""
    return t.flatten(2).sum(-1) if t.dim() > 2 else t


def _sum_to(A: Tensor, shape: Sequence[int]) -> Tensor:
    """Undo broadcasting of an input of per-sample `shape` into A's trailing dimensions."""
    target = (*A.shape[:2], *shape)
    return A if tuple(A.shape) == target else A.sum_to_size(target)


def _vjp_backward(
    fn: Callable[..., Tensor], A: Tensor, in_shapes: Sequence[torch.Size]
) -> tuple[list[Tensor | None], Tensor]:
    """Backward through an affine `fn` by autograd: A M_k are the vector-Jacobian products,
    A . c is A against fn(0). Used for configurations without a closed form."""
    lead = A.shape[:2]
    flat = A.reshape(-1, *A.shape[2:])
    create = torch.is_grad_enabled()
    with torch.enable_grad():
        zeros = [
            torch.zeros(flat.shape[0], *s, dtype=A.dtype, device=A.device, requires_grad=True)
            for s in in_shapes
        ]
        out = fn(*zeros)
        grads = torch.autograd.grad(
            out, zeros, grad_outputs=flat, create_graph=create, allow_unused=True
        )
    coeffs: list[Tensor | None] = [
        None if g is None else g.reshape(*lead, *g.shape[1:]) for g in grads
    ]
    bias = (flat * out).flatten(1).sum(-1).reshape(lead)
    return coeffs, bias if create else bias.detach()


# -- affine rules --------------------------------------------------------------------------------


@register_rule(nn.Linear, F.linear)
class LinearRule(AffineRule):
    """y = x W^T + b over the last dimension."""

    def __init__(self, call: Call):
        super().__init__(call)
        if isinstance(call.target, nn.Module):
            self.weight, self.bias = call.module.weight, call.module.bias
        else:
            self.weight = call.constant(1, "weight")
            self.bias = call.constant(2, "bias")

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        centre = F.linear((hi + lo) / 2, self.weight, self.bias)
        radius = F.linear((hi - lo) / 2, self.weight.abs())
        return centre - radius, centre + radius

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        bias = None if self.bias is None else sum_spec(A @ self.bias)
        return [A @ self.weight], bias

    def abs_backward(self, R: Tensor) -> list[Tensor | None]:
        return [R @ self.weight.abs()]

    def forward_linear(self, k: int, G: Tensor) -> Tensor:
        return G @ self.weight.mT

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        if q == 2:
            return v @ self.weight.square().mT
        return (v.unsqueeze(-2) * self.weight.abs()).amax(-1)


@register_rule(operator.matmul, torch.matmul, "matmul", torch.mm, "mm")
class MatMulRule(AffineRule):
    """`x @ W` and `W @ x` (operator, torch.matmul, the tensor method, torch.mm) with one
    input-dependent factor and a constant one (broadcast like torch.matmul; a constant must not
    depend on the batch)."""

    def __init__(self, call: Call):
        super().__init__(call)
        a, b = call.arg(0, "input"), call.arg(1, "other")
        if isinstance(a, BoundArg) and isinstance(b, BoundArg):
            raise _product_error(call)
        self.left = isinstance(a, BoundArg)  # the bounded factor is on the left
        weight = b if self.left else a
        self.weight = weight if isinstance(weight, Tensor) else call.tensor(weight)
        rank = len(call.in_shapes[0])  # per-sample rank of the bounded factor
        if self.weight.dim() > max(rank, 2) or (not self.left and rank < 2):
            raise UnsupportedLayerError(
                f"{call.describe()}: a constant factor of shape {list(self.weight.shape)} "
                f"against per-sample inputs of shape {list(call.in_shapes[0])} would mix the "
                "batch dimension into the product"
            )

    def _apply(self, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight if self.left else weight @ x

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        centre = self._apply((hi + lo) / 2, self.weight)
        radius = self._apply((hi - lo) / 2, self.weight.abs())
        return centre - radius, centre + radius

    def _back(self, A: Tensor, weight: Tensor) -> Tensor:
        w = weight
        if self.left:  # out = x @ w: coefficients A @ w^T
            coeff = A.unsqueeze(-1) * w if w.dim() == 1 else A @ w.mT
        else:  # out = w @ x: coefficients w^T @ A
            coeff = w.unsqueeze(-1) * A.unsqueeze(-2) if w.dim() == 1 else w.mT @ A
        return _sum_to(coeff, self.call.in_shapes[0])

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        return [self._back(A, self.weight)], None

    def abs_backward(self, R: Tensor) -> list[Tensor | None]:
        return [self._back(R, self.weight.abs())]

    def forward_linear(self, k: int, G: Tensor) -> Tensor:
        return self._apply(G, self.weight)

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        if self.weight.dim() != 2 or len(self.call.in_shapes[0]) < (1 if self.left else 2):
            return None
        w = self.weight
        if q == 2:
            return self._apply(v, w.square())
        if self.left:  # max over n of v[..., n] |w[n, m]|
            return (v.unsqueeze(-1) * w.abs()).amax(-2)
        return (w.abs().unsqueeze(-1) * v.unsqueeze(-3)).amax(-2)  # [.., k, n, m] -> [.., k, m]


def _conv_output_padding(
    in_hw: Sequence[int], out_hw: Sequence[int], kernel, stride, padding, dilation
) -> tuple[int, ...]:
    """The output_padding that makes conv_transpose2d return exactly the input's size."""
    return tuple(
        i - ((o - 1) * s - 2 * p + d * (k - 1) + 1)
        for i, o, k, s, p, d in zip(in_hw, out_hw, kernel, stride, padding, dilation, strict=True)
    )


# Convolutions backwards as one matrix product only on images at most this many times the
# kernel's area (`Conv2dRule._small_matrix`).
MATRIX_AREA_RATIO = 8


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


@register_rule(nn.Conv2d, F.conv2d)
class Conv2dRule(AffineRule):
    """2-d convolution (zero padding). Backwards: a transposed convolution (autograd for
    asymmetric 'same' padding), never the layer's dense matrix."""

    def __init__(self, call: Call):
        super().__init__(call)
        if isinstance(call.target, nn.Module):
            m = call.module
            if m.padding_mode != "zeros":
                raise UnsupportedLayerError(
                    f"{call.describe()}: padding_mode '{m.padding_mode}' is not supported "
                    "(only zero padding)"
                )
            self.weight, self.bias = m.weight, m.bias
            stride, padding, dilation, groups = m.stride, m.padding, m.dilation, m.groups
        else:
            self.weight = call.constant(1, "weight")
            self.bias = call.constant(2, "bias")
            stride = call.constant(3, "stride", 1)
            padding = call.constant(4, "padding", 0)
            dilation = call.constant(5, "dilation", 1)
            groups = call.constant(6, "groups", 1)
        self.stride, self.dilation, self.groups = _pair(stride), _pair(dilation), groups
        kernel = tuple(self.weight.shape[-2:])
        self.padding: tuple[int, int] | None
        if padding == "valid":
            self.padding = (0, 0)
        elif padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, kernel, strict=True)]
            # Even totals pad symmetrically; odd ones pad one more on the right: use autograd.
            self.padding = tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None
        else:
            self.padding = _pair(padding)
        self.conv_padding = self.padding if self.padding is not None else padding
        if self.padding is not None:
            self.output_padding = _conv_output_padding(
                call.in_shapes[0][-2:],
                call.out_shape[-2:],
                kernel,
                self.stride,
                self.padding,
                self.dilation,
            )

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.conv_padding, self.dilation, self.groups)

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        centre = self._conv((hi + lo) / 2, self.weight, self.bias)
        radius = self._conv((hi - lo) / 2, self.weight.abs(), None)
        return centre - radius, centre + radius

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        # A transposed convolution of A's rows: memory linear in the activations (never the
        # layer's [inputs x outputs] matrix).
        bias = None if self.bias is None else A.sum((-1, -2)) @ self.bias
        if self.padding is None:
            coeffs, _ = _vjp_backward(
                lambda x: self._conv(x, self.weight, None), A, self.call.in_shapes
            )
            return coeffs, bias
        matrix = self._small_matrix(A)
        if matrix is not None:
            lead = A.shape[:2]
            back = A.reshape(-1, matrix.shape[1]) @ matrix.T
            return [back.reshape(*lead, *self.call.in_shapes[0])], bias
        return [self._transpose(A, self.weight)], bias

    def _small_matrix(self, A: Tensor) -> Tensor | None:
        """The layer as a matrix [N_in, N_out], only when it is no larger than the rows A it is
        applied to (and has fewer inputs than A has rows): memory stays linear in what the
        backward pass holds anyway, and on small images one matrix product beats a transposed
        convolution of many tiny images several times over. Built once per rule (one bound
        call), from the images of the unit inputs, so it follows the weights (differentiably).

        Per row the matrix costs H W multiply-adds per (input channel, output element) where
        the transposed convolution costs kh kw: on images more than `MATRIX_AREA_RATIO` times
        the kernel's area the product does too much more work to win (at 14 x 14 under a 4 x 4
        kernel, 12 times the work, it took 1.6x the transposed convolution's time)."""
        n_in, n_out = math.prod(self.call.in_shapes[0]), math.prod(self.call.out_shape)
        rows = A.numel() // n_out
        if n_in > rows or n_in * n_out > A.numel():
            return None
        area = math.prod(self.call.in_shapes[0][-2:])
        if area > MATRIX_AREA_RATIO * math.prod(self.weight.shape[-2:]):
            return None
        cached = getattr(self, "_matrix", None)
        tracked = torch.is_grad_enabled() and self.weight.requires_grad
        if (
            cached is None
            or (cached.dtype, cached.device) != (A.dtype, A.device)
            or (
                tracked and not cached.requires_grad  # built without the weights' gradient
            )
        ):
            basis = torch.eye(n_in, dtype=A.dtype, device=A.device)
            images = self._conv(basis.reshape(n_in, *self.call.in_shapes[0]), self.weight, None)
            cached = images.reshape(n_in, n_out)
            self._matrix = cached
        return cached

    def _transpose(self, A: Tensor, weight: Tensor) -> Tensor:
        assert self.padding is not None  # callers use autograd for asymmetric padding
        lead = A.shape[:2]
        flat = A.reshape(-1, *A.shape[2:])
        back = F.conv_transpose2d(
            flat,
            weight,
            None,
            self.stride,
            self.padding,
            self.output_padding,
            self.groups,
            self.dilation,
        )
        return back.reshape(*lead, *back.shape[1:])

    def abs_backward(self, R: Tensor) -> list[Tensor | None]:
        # Each (input, output) pair of a convolution meets at most one kernel entry, so |M| is
        # the convolution with |W|.
        if self.padding is None:
            coeffs, _ = _vjp_backward(
                lambda x: self._conv(x, self.weight.abs(), None), R, self.call.in_shapes
            )
            return coeffs
        return [self._transpose(R, self.weight.abs())]

    def forward_linear(self, k: int, G: Tensor) -> Tensor:
        in_shape, out_shape = self.call.in_shapes[0], self.call.out_shape
        lead = G.shape[: G.dim() - len(in_shape)]
        out = self._conv(G.reshape(-1, *in_shape), self.weight, None)
        return out.reshape(*lead, *out_shape)

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        # Each (input, output) pair meets at most one kernel entry: M_kj^2 is the convolution
        # with W^2, and max_j |M_kj| v_j a maximum over each output's window.
        if q == 2:
            return self._conv(v, self.weight.square(), None)
        if self.padding is None or len(self.call.in_shapes[0]) != 3:
            return None
        cols = F.unfold(v, tuple(self.weight.shape[-2:]), self.dilation, self.padding, self.stride)
        g = self.groups
        out_c, per_group = self.weight.shape[0], self.weight.shape[1]
        cols = cols.reshape(g, 1, per_group * self.weight[0, 0].numel(), -1)  # [g, 1, K, L]
        w = self.weight.abs().reshape(g, out_c // g, -1, 1)  # [g, O/g, K, 1]
        out = torch.cat([(w[k] * cols[k]).amax(1) for k in range(g)])  # [O, L]
        return out.reshape(1, *self.call.out_shape)


@register_rule(nn.AvgPool2d, F.avg_pool2d)
class AvgPool2dRule(AffineRule):
    """Average pooling: a depth-wise convolution with a constant kernel (non-negative weights,
    so IBP is exact). Unusual settings (ceil_mode, padding excluded from the count, a divisor
    override) go through autograd."""

    nonnegative = True

    def __init__(self, call: Call):
        super().__init__(call)
        if isinstance(call.target, nn.Module):
            m = call.module
            kernel, stride, padding = m.kernel_size, m.stride, m.padding
            ceil, include, divisor = m.ceil_mode, m.count_include_pad, m.divisor_override
        else:
            kernel = call.constant(1, "kernel_size")
            stride = call.constant(2, "stride", None)
            padding = call.constant(3, "padding", 0)
            ceil = call.constant(4, "ceil_mode", False)
            include = call.constant(5, "count_include_pad", True)
            divisor = call.constant(6, "divisor_override", None)
        self.kernel = _pair(kernel)
        self.stride = _pair(stride) if stride not in (None, []) else self.kernel
        self.padding = _pair(padding)
        self.options = dict(ceil_mode=ceil, count_include_pad=include, divisor_override=divisor)
        self.simple = not ceil and divisor is None and (include or self.padding == (0, 0))

    def _pool(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel, self.stride, self.padding, **self.options)

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        return self._pool(lo), self._pool(hi)

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        if not self.simple:
            coeffs, _ = _vjp_backward(self._pool, A, self.call.in_shapes)
            return coeffs, None
        in_shape = self.call.in_shapes[0]
        channels = in_shape[-3]
        weight = A.new_full((channels, 1, *self.kernel), 1.0 / math.prod(self.kernel))
        pad = _conv_output_padding(
            in_shape[-2:], self.call.out_shape[-2:], self.kernel, self.stride, self.padding, (1, 1)
        )
        lead = A.shape[:2]
        flat = A.reshape(-1, *A.shape[-3:])
        back = F.conv_transpose2d(flat, weight, None, self.stride, self.padding, pad, channels)
        return [back.reshape(*lead, *in_shape)], None

    def forward_linear(self, k: int, G: Tensor) -> Tensor:
        in_shape = self.call.in_shapes[0]
        lead = G.shape[: G.dim() - len(in_shape)]
        return self._pool(G.reshape(-1, *in_shape)).reshape(*lead, *self.call.out_shape)

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        if not self.simple:
            return None
        size = math.prod(self.kernel)  # every weight is 1 / size
        if q == 2:
            return self._pool(v) / size
        # v >= 0: the zero padding never beats a window's own entries.
        return F.max_pool2d(v, self.kernel, self.stride, self.padding) / size


@register_rule(nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d)
class AdaptiveAvgPool2dRule(AffineRule):
    """Adaptive average pooling (non-negative weights: IBP is exact; backward by autograd)."""

    nonnegative = True

    def __init__(self, call: Call):
        super().__init__(call)
        if isinstance(call.target, nn.Module):
            self.size = call.module.output_size
        else:
            self.size = call.constant(1, "output_size")

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        return F.adaptive_avg_pool2d(lo, self.size), F.adaptive_avg_pool2d(hi, self.size)

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        fn = lambda x: F.adaptive_avg_pool2d(x, self.size)  # noqa: E731
        coeffs, _ = _vjp_backward(fn, A, self.call.in_shapes)
        return coeffs, None

    def forward_linear(self, k: int, G: Tensor) -> Tensor:
        in_shape = self.call.in_shapes[0]
        lead = G.shape[: G.dim() - len(in_shape)]
        out = F.adaptive_avg_pool2d(G.reshape(-1, *in_shape), self.size)
        return out.reshape(*lead, *self.call.out_shape)


@register_rule(
    nn.Flatten,
    nn.Unflatten,
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    "flatten",
    "view",
    "reshape",
    "squeeze",
    "unsqueeze",
)
class ReshapeRule(AffineRule):
    """Any per-sample reshape (the element order is kept; the batch dimension stays first)."""

    mixes = False
    nonnegative = True

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        shape = (lo.shape[0], *self.call.out_shape)
        return lo.reshape(shape), hi.reshape(shape)

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        return [A.reshape(*A.shape[:2], *self.call.in_shapes[0])], None

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        return v.reshape(1, *self.call.out_shape)

    def forward_linear(self, k: int, G: Tensor) -> Tensor:
        lead = G.shape[: G.dim() - len(self.call.in_shapes[0])]
        return G.reshape(*lead, *self.call.out_shape)


@register_rule(operator.getitem)
class SliceRule(AffineRule):
    """Basic indexing of the per-sample axes (`x[:, 2:5]`, `x[..., ::2]`, `x[:, 0]`); the
    batch axis must be kept whole. Backwards the coefficients return to the selected places."""

    mixes = False
    nonnegative = True

    def __init__(self, call: Call):
        super().__init__(call)
        index = call.args[1] if len(call.args) > 1 else None
        index = index if isinstance(index, tuple) else (index,)
        rank = len(call.in_shapes[0]) + 1
        if any(not isinstance(k, slice | int) and k is not Ellipsis for k in index) or any(
            isinstance(k, bool) for k in index
        ):
            raise UnsupportedLayerError(
                f"{call.describe()}: only slices and integers index input-dependent tensors"
            )
        if index.count(Ellipsis) > 1:  # pragma: no cover - Python refuses this itself
            raise UnsupportedLayerError(f"{call.describe()}: several ellipses")
        if Ellipsis in index:
            k = index.index(Ellipsis)
            index = index[:k] + (slice(None),) * (rank - len(index) + 1) + index[k + 1 :]
        first = index[0] if index else slice(None)
        if first != slice(None):
            raise UnsupportedLayerError(
                f"{call.describe()}: indexing the batch dimension; bound propagation treats "
                "samples independently"
            )
        if any(isinstance(k, slice) and k.step is not None and k.step < 0 for k in index):
            raise UnsupportedLayerError(f"{call.describe()}: negative steps")  # pragma: no cover
        self.index = index[1:]

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        key = (slice(None), *self.index)
        return lo[key], hi[key]

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        out = A.new_zeros(*A.shape[:2], *self.call.in_shapes[0])
        out[(slice(None), slice(None), *self.index)] = A
        return [out], None

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        return v[(slice(None), *self.index)]


@register_rule("expand", "expand_as", "repeat", torch.tile, "tile")
class RepeatRule(AffineRule):
    """Copies of the input's elements: `expand` / `expand_as` (broadcasting) and `repeat` /
    `tile` (tiling) along per-sample axes; backwards the copies' coefficients are summed."""

    mixes = False
    nonnegative = True

    def __init__(self, call: Call):
        super().__init__(call)
        in_shape, out_shape = tuple(call.in_shapes[0]), tuple(call.out_shape)
        self.tile = call.target in ("repeat", torch.tile, "tile")
        if self.tile:
            reps = call.args[1:] if len(call.args) > 1 else (call.kwargs.get("dims"),)
            if len(reps) == 1 and isinstance(reps[0], tuple | list):
                reps = tuple(reps[0])
            reps = tuple(int(r) for r in reps)
            rank = len(out_shape) + 1
            reps = (1,) * (rank - len(reps)) + reps
            padded = (1,) * (len(out_shape) - len(in_shape)) + in_shape
            if (
                reps[0] != 1
                or tuple(r * d for r, d in zip(reps[1:], padded, strict=True)) != out_shape
            ):
                raise UnsupportedLayerError(
                    f"{call.describe()}: repeats {list(reps)} tile the batch dimension; bound "
                    "propagation treats samples independently"
                )
            self.reps, self.padded = reps[1:], padded
        elif len(out_shape) < len(in_shape):  # pragma: no cover - torch refuses this itself
            raise UnsupportedLayerError(f"{call.describe()}: cannot expand to fewer dimensions")

    def _forward(self, x: Tensor) -> Tensor:
        lead = x.shape[0]
        if self.tile:
            return x.reshape(lead, *self.padded).repeat(1, *self.reps)
        return x.reshape(
            lead, *((1,) * (len(self.call.out_shape) - x.dim() + 1)), *x.shape[1:]
        ).expand(lead, *self.call.out_shape)

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        return self._forward(lo), self._forward(hi)

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        lead = A.shape[:2]
        in_shape = self.call.in_shapes[0]
        if not self.tile:
            padded = (1,) * (len(self.call.out_shape) - len(in_shape)) + tuple(in_shape)
            return [A.sum_to_size(*lead, *padded).reshape(*lead, *in_shape)], None
        split = [n for r, d in zip(self.reps, self.padded, strict=True) for n in (r, d)]
        tiles = A.reshape(*lead, *split)
        summed = tiles.sum(tuple(2 + 2 * k for k in range(len(self.reps))))
        return [summed.reshape(*lead, *in_shape)], None


@register_rule(
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    "contiguous",
    "clone",
)
class IdentityRule(AffineRule):
    """Identity, and dropout taken as the identity of eval mode (bounds are of the
    deterministic network, whatever the module's training flag)."""

    mixes = False
    nonnegative = True

    def ibp(self, *inputs: Interval) -> Interval:
        return inputs[0]

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        return [A], None

    def forward_linear(self, k: int, G: Tensor) -> Tensor:
        return G

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        return v


class ElementwiseLinearRule(AffineRule):
    """out = sum_k scale_k * x_k + shift, element-wise with broadcasting; `terms()` returns the
    scales (one per bounded input, None for 1) and the shift (None for 0), as numbers or tensors
    that broadcast against one sample."""

    mixes = False

    def __init__(self, call: Call):
        super().__init__(call)
        if any(len(s) != len(call.out_shape) for s in call.in_shapes):
            raise UnsupportedLayerError(
                f"{call.describe()}: broadcasting inputs of shapes "
                f"{[list(s) for s in call.in_shapes]} to {list(call.out_shape)} mixes the batch "
                "dimension with the others"
            )
        scales, shift = self.terms()
        self.scales = [None if s is None else self._per_sample(s) for s in scales]
        self.shift = None if shift is None else self._per_sample(shift)

    @abc.abstractmethod
    def terms(self) -> tuple[list[Any], Any]:
        """(scales, shift) of the element-wise affine map."""

    def _per_sample(self, value: Any) -> Tensor:
        t = self.call.tensor(value) if not isinstance(value, Tensor) else value
        t = t.to(dtype=self.call.dtype)
        rank = len(self.call.out_shape)
        if t.dim() > rank:
            # A leading batch dimension of 1 is fine; anything else depends on the batch.
            if any(d != 1 for d in t.shape[: t.dim() - rank]):
                raise UnsupportedLayerError(
                    f"{self.call.describe()}: a constant of shape {list(t.shape)} depends on the "
                    "batch; constants must broadcast against a single sample"
                )
            t = t.reshape(t.shape[t.dim() - rank :])
        return t

    def ibp(self, *inputs: Interval) -> Interval:
        lo_sum = hi_sum = torch.zeros((), dtype=inputs[0][0].dtype, device=inputs[0][0].device)
        for scale, (lo, hi) in zip(self.scales, inputs, strict=True):
            if scale is None:
                lo_sum, hi_sum = lo_sum + lo, hi_sum + hi
            else:
                a, b = lo * scale, hi * scale
                lo_sum, hi_sum = lo_sum + torch.minimum(a, b), hi_sum + torch.maximum(a, b)
        if self.shift is not None:
            lo_sum, hi_sum = lo_sum + self.shift, hi_sum + self.shift
        shape = (inputs[0][0].shape[0], *self.call.out_shape)
        return lo_sum.expand(shape), hi_sum.expand(shape)

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        coeffs: list[Tensor | None] = []
        for scale, shape in zip(self.scales, self.call.in_shapes, strict=True):
            coeffs.append(_sum_to(A if scale is None else A * scale, shape))
        bias = None if self.shift is None else sum_spec(A * self.shift)
        return coeffs, bias

    def abs_backward(self, R: Tensor) -> list[Tensor | None]:
        out: list[Tensor | None] = []
        for scale, shape in zip(self.scales, self.call.in_shapes, strict=True):
            scaled = R if scale is None else R * scale.abs()
            out.append(scaled.sum_to_size((*R.shape[:2], *shape)))
        return out

    def forward_linear(self, k: int, G: Tensor) -> Tensor:
        lead = G.shape[: G.dim() - len(self.call.in_shapes[k])]
        scale = self.scales[k]
        return (G if scale is None else G * scale).expand(*lead, *self.call.out_shape)

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        # One input copied element by element; a broadcast input would reach an output twice.
        if len(self.scales) != 1 or self.call.in_shapes[0] != self.call.out_shape:
            return None
        scale = self.scales[0]
        if scale is None:
            return v
        return v * (scale.square() if q == 2 else scale.abs())


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d)
class BatchNormRule(ElementwiseLinearRule):
    """Batch normalisation in eval mode: a per-channel scale and shift from the running
    statistics. In training mode the layer depends on the whole batch and has no rule."""

    def terms(self) -> tuple[list[Any], Any]:
        m = self.call.module
        if m.training or m.running_mean is None or m.running_var is None:
            raise UnsupportedLayerError(
                f"{self.call.describe()} uses batch statistics (training mode or no running "
                "statistics); bound the model in eval mode: call model.eval() first"
            )
        scale = torch.rsqrt(m.running_var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        shift = -m.running_mean * scale
        if m.bias is not None:
            shift = shift + m.bias
        channel_shape = (-1, *([1] * (len(self.call.out_shape) - 1)))
        return [scale.reshape(channel_shape)], shift.reshape(channel_shape)


def _is_normalize(module: nn.Module) -> bool:
    return (
        type(module).__name__ == "Normalize"
        and isinstance(getattr(module, "mean", None), Tensor)
        and isinstance(getattr(module, "std", None), Tensor)
    )


class NormalizeRule(ElementwiseLinearRule):
    """`(x - mean) / std` of a module named Normalize with `mean` and `std` buffers (found by
    duck typing, so the model zoo need not be imported)."""

    def terms(self) -> tuple[list[Any], Any]:
        m = self.call.module
        scale = 1.0 / m.std
        return [scale], -m.mean * scale


_DUCK_RULES.append((_is_normalize, NormalizeRule))


def _split_binary(call: Call) -> tuple[Any, Any, Any]:
    """(first, second, alpha) of add / sub in any calling form."""
    alpha = call.kwargs.get("alpha", 1)
    return call.arg(0, "input"), call.arg(1, "other"), alpha


@register_rule(operator.add, operator.iadd, torch.add, "add", "add_")
class AddRule(ElementwiseLinearRule):
    """x + y (residual connections) and x + constant, with torch.add's `alpha`."""

    def terms(self) -> tuple[list[Any], Any]:
        a, b, alpha = _split_binary(self.call)
        scale_b = None if alpha == 1 else alpha
        if isinstance(a, BoundArg) and isinstance(b, BoundArg):
            return [None, scale_b], None
        if isinstance(a, BoundArg):
            return [None], b if alpha == 1 else self.call.tensor(b) * alpha
        return [scale_b], a


@register_rule(operator.sub, operator.isub, torch.sub, "sub", "sub_")
class SubRule(ElementwiseLinearRule):
    """x - y, x - constant and constant - x."""

    def terms(self) -> tuple[list[Any], Any]:
        a, b, alpha = _split_binary(self.call)
        if isinstance(a, BoundArg) and isinstance(b, BoundArg):
            return [None, -alpha], None
        if isinstance(a, BoundArg):
            return [None], -self.call.tensor(b) * alpha
        return [-alpha], a


@register_rule(operator.neg, torch.neg, "neg")
class NegRule(ElementwiseLinearRule):
    def terms(self) -> tuple[list[Any], Any]:
        return [-1.0], None


def _product_error(call: Call) -> UnsupportedLayerError:
    return UnsupportedLayerError(
        f"{call.describe()}: a product or quotient of two input-dependent tensors has no bound "
        "rule (only multiplication and division by constants)"
    )


@register_rule(operator.mul, operator.imul, torch.mul, "mul", "mul_")
class MulRule(ElementwiseLinearRule):
    """x * constant (either order)."""

    def terms(self) -> tuple[list[Any], Any]:
        a, b = self.call.arg(0, "input"), self.call.arg(1, "other")
        if isinstance(a, BoundArg) and isinstance(b, BoundArg):
            raise _product_error(self.call)
        return [b if isinstance(a, BoundArg) else a], None


@register_rule(operator.truediv, operator.itruediv, torch.div, "div", "div_")
class DivRule(ElementwiseLinearRule):
    """x / constant."""

    def terms(self) -> tuple[list[Any], Any]:
        b = self.call.arg(1, "other")
        if isinstance(b, BoundArg) or self.call.kwargs.get("rounding_mode") is not None:
            raise _product_error(self.call)
        return [1.0 / self.call.tensor(b)], None


# -- activations ---------------------------------------------------------------------------------


@register_rule(nn.ReLU, torch.relu, F.relu, "relu", "relu_")
class ReLURule(ActivationRule):
    """ReLU: the triangle relaxation. Upper line: the chord from (l, 0) to (u, u). Lower line:
    slope alpha in [0, 1] through the origin; CROWN's adaptive choice is 1 when u >= -l, else 0
    (the smaller area). Stable neurons are exact."""

    def function(self, x: Tensor) -> Tensor:
        return torch.relu(x)

    def needs_bounds(self, lower: Tensor, upper: Tensor) -> Tensor:
        return (lower < 0) & (upper > 0)

    def relax(self, lower: Tensor, upper: Tensor, alpha: Tensor | None = None) -> Relaxation:
        unstable = (lower < 0) & (upper > 0)
        active = (lower >= 0).to(lower.dtype)
        width = torch.where(unstable, upper - lower, torch.ones_like(lower))
        upper_slope = torch.where(unstable, upper / width, active)
        upper_bias = torch.where(unstable, -lower * upper_slope, torch.zeros_like(lower))
        slope = (upper >= -lower).to(lower.dtype) if alpha is None else alpha[0]
        lower_slope = torch.where(unstable, slope, active)
        zero = torch.zeros((), dtype=lower.dtype, device=lower.device)
        return Relaxation(lower_slope, zero, upper_slope, upper_bias)

    def init_alpha(self, lower: Tensor, upper: Tensor) -> Tensor | None:
        return (upper >= -lower).to(lower.dtype).unsqueeze(0)

    def derivative_range(self, lower: Tensor, upper: Tensor) -> Interval:
        # autograd takes relu'(0) = 0; {0, 1} are the one-sided derivatives there.
        return (lower > 0).to(lower.dtype), (upper > 0).to(lower.dtype)


@register_rule(nn.LeakyReLU, F.leaky_relu)
class LeakyReLURule(ActivationRule):
    """leaky_relu(x) = s x + (1 - s) relu(x): the ReLU relaxation, scaled and shifted (its lines
    swap roles when s > 1, where the function is concave)."""

    def __init__(self, call: Call):
        super().__init__(call)
        if isinstance(call.target, nn.Module):
            self.slope = float(call.module.negative_slope)
        else:
            self.slope = float(call.constant(1, "negative_slope", 0.01))
        self.relu = ReLURule(call)

    def function(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.slope)

    def ibp(self, *inputs: Interval) -> Interval:
        # Monotone unless s < 0; either way the extrema are at the ends or at the kink.
        ((lo, hi),) = inputs
        kink = torch.minimum(torch.clamp_min(lo, 0.0), hi).clamp_min(lo)
        values = [self.function(lo), self.function(hi), self.function(kink)]
        return (
            torch.minimum(torch.minimum(values[0], values[1]), values[2]),
            torch.maximum(torch.maximum(values[0], values[1]), values[2]),
        )

    def needs_bounds(self, lower: Tensor, upper: Tensor) -> Tensor:
        return (lower < 0) & (upper > 0)

    def relax(self, lower: Tensor, upper: Tensor, alpha: Tensor | None = None) -> Relaxation:
        r = self.relu.relax(lower, upper, alpha)
        s, c = self.slope, 1.0 - self.slope
        lo = (r.lower_slope, r.lower_bias) if c >= 0 else (r.upper_slope, r.upper_bias)
        hi = (r.upper_slope, r.upper_bias) if c >= 0 else (r.lower_slope, r.lower_bias)
        return Relaxation(s + c * lo[0], c * lo[1], s + c * hi[0], c * hi[1])

    def init_alpha(self, lower: Tensor, upper: Tensor) -> Tensor | None:
        return self.relu.init_alpha(lower, upper)

    def derivative_range(self, lower: Tensor, upper: Tensor) -> Interval:
        s = self.slope
        # autograd takes the slope s at 0; 1 is the right derivative there.
        negative, positive = lower <= 0, upper >= 0
        both = negative & positive
        one = torch.ones_like(lower)
        value = torch.where(negative, s * one, one)  # used where only one side is possible
        return (
            torch.where(both, min(s, 1.0) * one, value),
            torch.where(both, max(s, 1.0) * one, value),
        )


def _secant(f_lo: Tensor, f_hi: Tensor, lower: Tensor, upper: Tensor, fallback: Tensor) -> Tensor:
    width = upper - lower
    safe = torch.where(width > 0, width, torch.ones_like(width))
    return torch.where(width > 0, (f_hi - f_lo) / safe, fallback)


def _offset(
    f: Callable[[Tensor], Tensor], slope: Tensor, points: Sequence[Tensor], pick: Callable
) -> Tensor:
    """max (pick=torch.maximum) or min of f(x) - slope * x over candidate points in [l, u]; the
    candidates must include the extremum. A tangency point is found from a detached slope: at an
    interior extremum the offset's derivative in the slope is -x (envelope theorem)."""
    first, *rest = points
    best = f(first) - slope * first
    for x in rest:
        best = pick(best, f(x) - slope * x)
    return best


class ConvexActivationRule(ActivationRule):
    """A smooth convex increasing activation. Upper line: the chord (the tightest). Lower line:
    any slope a, with the largest valid offset min_x f(x) - a x, reached where f'(x) = a;
    CROWN uses the tangent at the midpoint, alpha-CROWN optimises a in [f'(l), f'(u)]."""

    @abc.abstractmethod
    def derivative(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def inverse_derivative(self, slope: Tensor) -> Tensor:
        """The x with f'(x) = slope (clamped into the range of f' before inverting)."""

    def relax(self, lower: Tensor, upper: Tensor, alpha: Tensor | None = None) -> Relaxation:
        f = self.function
        f_lo, f_hi = f(lower), f(upper)
        mid = (lower + upper) / 2
        chord = _secant(f_lo, f_hi, lower, upper, self.derivative(mid))
        # Convex: f(x) - chord * x is largest at an end point.
        upper_bias = torch.maximum(f_lo - chord * lower, f_hi - chord * upper)
        slope = self.derivative(mid) if alpha is None else alpha[0]
        touch = torch.minimum(torch.maximum(self.inverse_derivative(slope), lower), upper)
        lower_bias = _offset(f, slope, (lower, upper, touch), torch.minimum)
        return Relaxation(slope, lower_bias, chord, upper_bias)

    def init_alpha(self, lower: Tensor, upper: Tensor) -> Tensor | None:
        return self.derivative((lower + upper) / 2).unsqueeze(0)

    def alpha_range(self, lower: Tensor, upper: Tensor) -> tuple[Tensor | float, Tensor | float]:
        return self.derivative(lower).unsqueeze(0), self.derivative(upper).unsqueeze(0)

    def derivative_range(self, lower: Tensor, upper: Tensor) -> Interval:
        return self.derivative(lower), self.derivative(upper)  # increasing: f is convex


@register_rule(nn.Softplus, F.softplus)
class SoftplusRule(ConvexActivationRule):
    """softplus(x) = log(1 + exp(beta x)) / beta. The relaxation uses the smooth formula; torch
    switches to x above `threshold / beta`, a difference below exp(-threshold) / beta."""

    def __init__(self, call: Call):
        super().__init__(call)
        if isinstance(call.target, nn.Module):
            self.beta, self.threshold = call.module.beta, call.module.threshold
        else:
            self.beta = call.constant(1, "beta", 1.0)
            self.threshold = call.constant(2, "threshold", 20.0)
        if not self.beta > 0:
            raise UnsupportedLayerError(f"{call.describe()}: softplus needs beta > 0")

    def function(self, x: Tensor) -> Tensor:
        bx = self.beta * x
        return (torch.relu(bx) + torch.log1p(torch.exp(-bx.abs()))) / self.beta

    def ibp(self, *inputs: Interval) -> Interval:
        """The exact range of torch's softplus on [lo, hi]. It is not monotone: at
        t = threshold / beta it drops from the smooth formula to x (by log1p(exp(-threshold)) /
        beta), so an interval across t has its minimum near t and its maximum possibly at t."""
        ((lo, hi),) = inputs
        t = self.threshold / self.beta
        f_lo = F.softplus(lo, self.beta, self.threshold)
        f_hi = F.softplus(hi, self.beta, self.threshold)
        f_t = F.softplus(torch.full_like(lo, t), self.beta, self.threshold)  # smooth at t
        across = (lo <= t) & (hi > t)
        lower = torch.where(across, torch.minimum(f_lo, torch.full_like(lo, t)), f_lo)
        upper = torch.where(across, torch.maximum(f_t, f_hi), f_hi)
        return lower, upper

    def relax(self, lower: Tensor, upper: Tensor, alpha: Tensor | None = None) -> Relaxation:
        # torch's softplus is x above threshold / beta: below the smooth formula by at most
        # `gap`, never above it. The upper line stays valid; the lower one drops by the gap.
        r = super().relax(lower, upper, alpha)
        gap = math.log1p(math.exp(-self.threshold)) / self.beta
        return Relaxation(r.lower_slope, r.lower_bias - gap, r.upper_slope, r.upper_bias)

    def derivative(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.beta * x)

    def inverse_derivative(self, slope: Tensor) -> Tensor:
        tiny = torch.finfo(slope.dtype).tiny
        s = slope.detach().clamp(tiny, 1.0 - torch.finfo(slope.dtype).eps)
        return torch.logit(s) / self.beta

    def derivative_range(self, lower: Tensor, upper: Tensor) -> Interval:
        # torch's softplus is x above threshold / beta, where autograd's derivative is 1.
        linear = self.beta * upper > self.threshold
        upper_d = torch.where(linear, torch.ones_like(upper), self.derivative(upper))
        return self.derivative(lower), upper_d


# -- half-Huber ReLU (Woods et al. 2019) --------------------------------------------------------


@register_rule(HalfHuberReLU)
class HalfHuberRule(ConvexActivationRule):
    """f(x) = 0 for x <= 0, x^2 / (2 delta) on (0, delta], x - delta / 2 above. f' =
    clamp(x, 0, delta) / delta is continuous and non-decreasing, so f is convex and increasing
    on the whole line: IBP is monotone, the chord is the upper line and every tangent a lower
    one (CROWN: at the midpoint; alpha-CROWN: any slope in [f'(l), f'(u)], touching where
    f'(x) = slope, i.e. x = slope * delta). The derivative range is [f'(l), f'(u)]."""

    def __init__(self, call: Call):
        super().__init__(call)
        self.delta = float(call.module.delta)

    def function(self, x: Tensor) -> Tensor:
        c = x.clamp(0.0, self.delta)
        return c * (x - c / 2) / self.delta

    def derivative(self, x: Tensor) -> Tensor:
        return x.clamp(0.0, self.delta) / self.delta

    def inverse_derivative(self, slope: Tensor) -> Tensor:
        # Slopes 0 and 1 are flat pieces (x <= 0, x >= delta): any of their points touches;
        # slope * delta is one of them, and `relax` clamps it into [l, u].
        return slope.detach().clamp(0.0, 1.0) * self.delta


class SShapedRule(ActivationRule):
    """A sigmoid-like activation: increasing, odd-symmetric about (0, f(0)), convex for x <= 0
    and concave for x >= 0.

    Any slope a gives a sound line with the exact offset max / min over [l, u] of f(x) - a x: the
    extremum sits at an end point, at 0, or where f'(x) = a on the convex (min) or concave (max)
    branch. CROWN's slopes: for the upper line the chord where it lies above f (u <= 0, or
    f'(u) >= chord), the tangent at the midpoint when l >= 0, and otherwise the tangent through
    (l, f(l)) found by bisection; the lower line mirrors this. alpha-CROWN optimises both slopes
    in [0, max f' on [l, u]].
    """

    bisection_steps = 24

    @abc.abstractmethod
    def derivative(self, x: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def inverse_derivative(self, slope: Tensor) -> Tensor:
        """The x >= 0 with f'(x) = slope (0 above f'(0), large as slope -> 0)."""

    def _upper_slope(self, lower: Tensor, upper: Tensor) -> Tensor:
        f, df = self.function, self.derivative
        f_lo, f_hi = f(lower), f(upper)
        mid = (lower + upper) / 2
        chord = _secant(f_lo, f_hi, lower, upper, df(mid))
        slope = torch.where(upper <= 0, chord, df(mid))
        crossing = (lower < 0) & (upper > 0)
        if bool(crossing.any()):
            # The tangent at d in [0, u] that passes through (l, f(l)): bisection on the sign of
            # f(d) + f'(d)(l - d) - f(l), increasing in d. The left end's slope is the larger,
            # so its line through (l, f(l)) stays above the curve.
            left = torch.zeros_like(upper)
            right = torch.clamp_min(upper, 0.0)
            d = (left + right) / 2
            for _ in range(self.bisection_steps):
                below = f(d) + df(d) * (lower - d) - f_lo <= 0
                left = torch.where(below, d, left)
                right = torch.where(below, right, d)
                d = (left + right) / 2
            tangent = torch.where(df(upper) >= chord, chord, df(left))
            slope = torch.where(crossing, tangent, slope)
        return slope

    def relax(self, lower: Tensor, upper: Tensor, alpha: Tensor | None = None) -> Relaxation:
        if alpha is None:
            up = self._upper_slope(lower, upper)
            # Odd symmetry: the lower line on [l, u] has the slope of the upper line on [-u, -l].
            low = self._upper_slope(-upper, -lower)
        else:
            low, up = alpha[0], alpha[1]
        f = self.function

        def clamp(x: Tensor) -> Tensor:
            return torch.minimum(torch.maximum(x, lower), upper)

        zero = clamp(torch.zeros_like(lower))
        touch_up = clamp(self.inverse_derivative(up))
        touch_low = clamp(-self.inverse_derivative(low))
        upper_bias = _offset(f, up, (lower, upper, zero, touch_up), torch.maximum)
        lower_bias = _offset(f, low, (lower, upper, zero, touch_low), torch.minimum)
        return Relaxation(low, lower_bias, up, upper_bias)

    def init_alpha(self, lower: Tensor, upper: Tensor) -> Tensor | None:
        return torch.stack([self._upper_slope(-upper, -lower), self._upper_slope(lower, upper)])

    def alpha_range(self, lower: Tensor, upper: Tensor) -> tuple[Tensor | float, Tensor | float]:
        peak = self.derivative(torch.minimum(torch.maximum(torch.zeros_like(lower), lower), upper))
        return 0.0, peak.unsqueeze(0)

    def derivative_range(self, lower: Tensor, upper: Tensor) -> Interval:
        # f' increases on x <= 0 and decreases on x >= 0: the largest value is at the point of
        # [l, u] closest to 0 (0 itself when l < 0 < u), the smallest at an end point.
        df = self.derivative
        closest = torch.minimum(torch.maximum(torch.zeros_like(lower), lower), upper)
        return torch.minimum(df(lower), df(upper)), df(closest)


@register_rule(nn.Sigmoid, torch.sigmoid, F.sigmoid, "sigmoid")
class SigmoidRule(SShapedRule):
    def function(self, x: Tensor) -> Tensor:
        return torch.sigmoid(x)

    def derivative(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(x)
        return s * (1 - s)

    def inverse_derivative(self, slope: Tensor) -> Tensor:
        # s (1 - s) = a with s >= 1/2: s = (1 + sqrt(1 - 4a)) / 2, x = logit(s).
        a = slope.detach().clamp(torch.finfo(slope.dtype).tiny, 0.25)
        root = torch.sqrt(1 - 4 * a)
        return torch.log1p(root) - torch.log1p(-root).clamp_min(-1e30)


@register_rule(nn.Tanh, torch.tanh, F.tanh, "tanh")
class TanhRule(SShapedRule):
    def function(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def derivative(self, x: Tensor) -> Tensor:
        return 1 - torch.tanh(x) ** 2

    def inverse_derivative(self, slope: Tensor) -> Tensor:
        # 1 - t^2 = a: t = sqrt(1 - a), x = atanh(t).
        a = slope.detach().clamp(torch.finfo(slope.dtype).tiny, 1.0)
        return torch.atanh(torch.sqrt(1 - a))


# -- layout rules (transpose, concatenation, zero padding) ----------------------------------------


def _per_sample_axis(call: Call, axis: int, rank: int) -> int:
    """A tensor axis (batch included, negative allowed) as a per-sample axis (0 = the first
    axis after the batch); the batch axis itself is refused."""
    full = axis + rank + 1 if axis < 0 else axis
    if not 0 < full <= rank:
        raise UnsupportedLayerError(
            f"{call.describe()}: axis {axis} is the batch dimension or out of range; bound "
            "propagation treats samples independently"
        )
    return full - 1


@register_rule(torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes")
class PermuteRule(AffineRule):
    """A permutation of the per-sample axes (`permute`, `transpose`); the batch stays first."""

    mixes = False

    def __init__(self, call: Call):
        super().__init__(call)
        rank = len(call.in_shapes[0])
        target = call.target
        if target in (torch.transpose, "transpose", torch.swapaxes, "swapaxes"):
            a = _per_sample_axis(call, call.constant(1, "dim0"), rank)
            b = _per_sample_axis(call, call.constant(2, "dim1"), rank)
            order = list(range(rank))
            order[a], order[b] = order[b], order[a]
        else:
            dims = call.constant(1, "dims")
            if isinstance(dims, int):  # x.permute(0, 2, 1): the dims as separate arguments
                dims = call.args[1:]
            dims = [int(d) for d in dims]
            if len(dims) != rank + 1 or (dims[0] % (rank + 1)) != 0:
                raise UnsupportedLayerError(
                    f"{call.describe()}: permutation {dims} moves the batch dimension; bound "
                    "propagation treats samples independently"
                )
            order = [_per_sample_axis(call, d, rank) for d in dims[1:]]
        self.order = order  # out axis k is in axis order[k] (per sample)
        self.inverse = [order.index(j) for j in range(rank)]

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        dims = (0, *(k + 1 for k in self.order))
        return lo.permute(dims), hi.permute(dims)

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        return [A.permute(0, 1, *(k + 2 for k in self.inverse))], None

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        return v.permute(0, *(k + 1 for k in self.order))


@register_rule(torch.cat, torch.concat, torch.concatenate)
class CatRule(AffineRule):
    """Concatenation of input-dependent tensors along a per-sample axis."""

    mixes = False

    def __init__(self, call: Call):
        super().__init__(call)
        tensors = call.arg(0, "tensors")
        if not all(isinstance(t, BoundArg) for t in tensors):
            raise UnsupportedLayerError(
                f"{call.describe()}: concatenating constants with input-dependent tensors has no "
                "bound rule (every concatenated tensor must depend on the input)"
            )
        rank = len(call.out_shape)
        self.axis = _per_sample_axis(call, call.constant(1, "dim", 0), rank)
        self.order = [t.index for t in tensors]
        self.sizes = [call.in_shapes[i][self.axis] for i in self.order]

    def ibp(self, *inputs: Interval) -> Interval:
        lows = [inputs[i][0] for i in self.order]
        highs = [inputs[i][1] for i in self.order]
        return torch.cat(lows, self.axis + 1), torch.cat(highs, self.axis + 1)

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        pieces = torch.split(A, self.sizes, dim=self.axis + 2)
        coeffs: list[Tensor | None] = [None] * len(self.call.in_shapes)
        for i, piece in zip(self.order, pieces, strict=True):
            coeffs[i] = piece if coeffs[i] is None else coeffs[i] + piece
        return coeffs, None


@register_rule(nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, F.pad)
class ConstantPadRule(AffineRule):
    """Padding with a constant (zero padding before a convolution with asymmetric padding);
    backwards the padding is cut off again."""

    mixes = False

    def __init__(self, call: Call):
        super().__init__(call)
        if isinstance(call.target, nn.Module):
            pad, value, mode = call.module.padding, call.module.value, "constant"
        else:
            pad = call.constant(1, "pad")
            mode = call.constant(2, "mode", "constant")
            value = call.constant(3, "value", None)
        if mode != "constant":
            raise UnsupportedLayerError(f"{call.describe()}: only constant padding is bounded")
        self.value = 0.0 if value is None else float(value)
        self.pad = tuple(int(p) for p in pad)
        if len(self.pad) % 2 or len(self.pad) // 2 > len(call.in_shapes[0]):
            raise UnsupportedLayerError(f"{call.describe()}: padding {list(pad)} pads the batch")
        if any(p < 0 for p in self.pad):
            raise UnsupportedLayerError(f"{call.describe()}: negative padding (cropping)")

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        return F.pad(lo, self.pad, value=self.value), F.pad(hi, self.pad, value=self.value)

    def forward_dual(self, v: Tensor, q: float) -> Tensor | None:
        return F.pad(v, self.pad)  # padded entries are constants: no weight on the input

    def backward(self, A: Tensor) -> tuple[list[Tensor | None], Tensor | None]:
        index: list[slice] = [slice(None)] * A.dim()
        for k in range(len(self.pad) // 2):  # F.pad lists the last axis first
            before, after = self.pad[2 * k], self.pad[2 * k + 1]
            axis = A.dim() - 1 - k
            index[axis] = slice(before, A.shape[axis] - after)
        bias = None
        if self.value != 0.0:
            # The padded entries are the constant: their coefficients times it.
            inner = torch.zeros_like(A)
            inner[tuple(index)] = A[tuple(index)]
            bias = sum_spec(A - inner) * self.value
        return [A[tuple(index)]], bias


# -- nonlinear operations over several elements --------------------------------------------------


class NonlinearRule(BoundRule):
    """A nonlinear operation that is not element-wise (max pooling). CROWN bounds it with a
    linear lower and a linear upper function of its input, built from the input's bounds:
    `backward` takes the coefficients A on the output and the input's bounds and returns
    coefficients on the input and a constant with A . out >= A_in . x + c on the whole input
    box (the lower line where A >= 0, the upper one where A < 0). The engine computes CROWN
    bounds of the input's neurons flagged by `needs_bounds`, as for activations."""

    def needs_bounds(self, lower: Tensor, upper: Tensor) -> Tensor:
        return torch.ones_like(lower, dtype=torch.bool)

    @abc.abstractmethod
    def backward(
        self, A: Tensor, lower: Tensor, upper: Tensor
    ) -> tuple[list[Tensor | None], Tensor | None]:
        """A [B', S, *out_shape] -> ([A_in [B, S, *in_shape]], constant [B, S] or None), a
        sound linear lower bound of A . out over the input box [lower, upper] ([B, *in_shape])."""


@register_rule(nn.MaxPool2d, F.max_pool2d, torch.max_pool2d)
class MaxPool2dRule(NonlinearRule):
    """2-d max pooling (any kernel, stride, padding, dilation, ceil_mode).

    IBP is exact: the pool of the lower bounds and the pool of the upper bounds.

    CROWN, per output y = max_k x_k over its window, given bounds l_k <= x_k <= u_k:

    * lower line: y >= x_j for the window element j with the largest lower bound (as in
      DeepPoly, Singh et al. 2019, and auto_LiRPA's BoundMaxPool);
    * upper line: let i be the element with the largest upper bound and c the largest upper
      bound of the others. Every other x_k <= c, so y <= max(x_i, c), a convex function of x_i
      alone, which lies below its chord on [l_i, u_i]:
      y <= c + (u_i - c) / (u_i - l_i) * (x_i - l_i). When l_i >= c the window is decided
      (y = x_i, exact). The line never exceeds u_i on the box, so it is pointwise at least as
      tight as the constant max_k u_k that DeepPoly and auto_LiRPA use for undecided windows.
    """

    def __init__(self, call: Call):
        super().__init__(call)
        if isinstance(call.target, nn.Module):
            m = call.module
            kernel, stride, padding = m.kernel_size, m.stride, m.padding
            dilation, ceil, indices = m.dilation, m.ceil_mode, m.return_indices
        else:
            kernel = call.constant(1, "kernel_size")
            stride = call.constant(2, "stride", None)
            padding = call.constant(3, "padding", 0)
            dilation = call.constant(4, "dilation", 1)
            ceil = call.constant(5, "ceil_mode", False)
            indices = call.constant(6, "return_indices", False)
        if indices:
            raise UnsupportedLayerError(f"{call.describe()}: return_indices=True has no bounds")
        if len(call.in_shapes[0]) != 3:
            raise UnsupportedLayerError(
                f"{call.describe()}: max pooling is bounded on [C, H, W] samples, got "
                f"{list(call.in_shapes[0])}"
            )
        self.kernel = _pair(kernel)
        self.stride = _pair(stride) if stride not in (None, []) else self.kernel
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.ceil = bool(ceil)
        channels, height, width = call.in_shapes[0]
        out_h, out_w = call.out_shape[-2:]
        # unfold has no ceil_mode: pad the bottom / right with -inf until the last window fits.
        extra = [
            max(0, (o - 1) * s + d * (k - 1) + 1 - (n + 2 * p))
            for o, s, d, k, n, p in zip(
                (out_h, out_w),
                self.stride,
                self.dilation,
                self.kernel,
                (height, width),
                self.padding,
                strict=True,
            )
        ]
        ph, pw = self.padding
        self.pad = (pw, pw + extra[1], ph, ph + extra[0])
        # Window slot -> flat input position (-1 in the padding), [K, L].
        positions = torch.arange(height * width, dtype=torch.float64).reshape(1, 1, height, width)
        positions = self._unfold(F.pad(positions, self.pad, value=-1.0))[0, 0]
        if positions.shape[-1] != out_h * out_w:
            raise UnsupportedLayerError(  # pragma: no cover - torch's sizes always match
                f"{call.describe()}: cannot match the pooling windows to the output"
            )
        self.positions = positions.to(torch.long)

    def _unfold(self, x: Tensor) -> Tensor:
        """[B, C, H', W'] (padded) -> [B, C, K, L]: the K values of each of the L windows."""
        b, c = x.shape[:2]
        cols = F.unfold(
            x.reshape(b * c, 1, *x.shape[-2:]), self.kernel, self.dilation, 0, self.stride
        )
        return cols.reshape(b, c, *cols.shape[-2:])

    def _windows(self, x: Tensor) -> Tensor:
        return self._unfold(F.pad(x, self.pad, value=-math.inf))

    def _pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(
            x, self.kernel, self.stride, self.padding, self.dilation, ceil_mode=self.ceil
        )

    def ibp(self, *inputs: Interval) -> Interval:
        ((lo, hi),) = inputs
        return self._pool(lo), self._pool(hi)

    def lines(self, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per output [B, C, L]: the flat input position of the lower line's element, the
        upper line's element, its slope and its offset (y <= slope * x + offset)."""
        lo_w, hi_w = self._windows(lower), self._windows(upper)
        low_slot = lo_w.argmax(2, keepdim=True)
        if hi_w.shape[2] > 1:
            top, slots = hi_w.topk(2, dim=2)
            u, second, up_slot = top[:, :, :1], top[:, :, 1:], slots[:, :, :1]
        else:
            u, up_slot = hi_w, torch.zeros_like(low_slot)
            second = torch.full_like(u, -math.inf)
        l_up = lo_w.gather(2, up_slot)
        decided = l_up >= second
        # c = max(second, l_up) equals `second` where undecided and keeps every branch of the
        # `where`s finite (an infinite unused branch would give NaN gradients).
        c = torch.maximum(second, l_up)
        width = torch.where(decided, torch.ones_like(u), u - l_up)
        slope = torch.where(decided, torch.ones_like(u), (u - c) / width)
        offset = torch.where(decided, torch.zeros_like(u), c - slope * l_up)
        positions = self.positions.to(lower.device).expand(lower.shape[0], lower.shape[1], -1, -1)
        return (
            positions.gather(2, low_slot).squeeze(2),
            positions.gather(2, up_slot).squeeze(2),
            slope.squeeze(2),
            offset.squeeze(2),
        )

    def backward(
        self, A: Tensor, lower: Tensor, upper: Tensor
    ) -> tuple[list[Tensor | None], Tensor | None]:
        low_pos, up_pos, slope, offset = self.lines(lower, upper)
        batch, channels = lower.shape[:2]
        rows = A.shape[1]
        flat = A.reshape(A.shape[0], rows, channels, -1).expand(batch, -1, -1, -1)
        pos, neg = flat.clamp(min=0), flat.clamp(max=0)
        coeff = flat.new_zeros(batch, rows, channels, math.prod(self.call.in_shapes[0][-2:]))
        coeff = coeff.scatter_add(3, low_pos.unsqueeze(1).expand(-1, rows, -1, -1), pos)
        coeff = coeff.scatter_add(
            3, up_pos.unsqueeze(1).expand(-1, rows, -1, -1), neg * slope.unsqueeze(1)
        )
        bias = (neg * offset.unsqueeze(1)).flatten(2).sum(-1)
        return [coeff.reshape(batch, rows, *self.call.in_shapes[0])], bias

    def derivative_backward(
        self, lo: Tensor, hi: Tensor, lower: Tensor, upper: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Interval bounds of R . d out / d x for R in [lo, hi] ([B', S, *out_shape]), valid at
        every x of the input box [lower, upper] (for the Jacobian bounds).

        d out_o / d x_k is 1 for the element autograd takes as the window's maximum and 0 for
        the others. Only the elements whose upper bound reaches the window's largest lower
        bound can be that maximum: for them the derivative lies in [0, 1], or is exactly 1 when
        there is one of them (a decided window); for the rest it is 0."""
        lo_w, hi_w = self._windows(lower), self._windows(upper)
        candidate = hi_w >= lo_w.max(2, keepdim=True).values  # padding (-inf) never is
        sole = candidate.sum(2, keepdim=True) == 1
        d_hi = candidate.to(lo.dtype).unsqueeze(1)  # [B, 1, C, K, L]
        d_lo = (candidate & sole).to(lo.dtype).unsqueeze(1)
        batch, channels = lower.shape[:2]
        rows = lo.shape[1]
        a_lo = lo.reshape(lo.shape[0], rows, channels, 1, -1)
        a_hi = hi.reshape(hi.shape[0], rows, channels, 1, -1)
        # d is in [d_lo, d_hi] within [0, 1]: the products' extremes are at d_lo or d_hi.
        p_lo = torch.minimum(a_lo * d_lo, a_lo * d_hi)
        p_hi = torch.maximum(a_hi * d_lo, a_hi * d_hi)
        positions = self.positions.to(lower.device).clamp_min(0)  # padding slots carry 0
        index = positions.reshape(1, 1, 1, -1).expand(batch, rows, channels, -1)
        n_in = math.prod(self.call.in_shapes[0][-2:])
        out_lo = p_lo.new_zeros(batch, rows, channels, n_in)
        out_hi = p_hi.new_zeros(batch, rows, channels, n_in)
        out_lo = out_lo.scatter_add(3, index, p_lo.reshape(batch, rows, channels, -1))
        out_hi = out_hi.scatter_add(3, index, p_hi.reshape(batch, rows, channels, -1))
        shape = (batch, rows, *self.call.in_shapes[0])
        return out_lo.reshape(shape), out_hi.reshape(shape)
