"""Properties decided by Jacobian bounds: IR matching, from a property's normal form to a
`JacobianQuery`.

Two families of properties are outside the linear fragment of `propdsl.verify.query` but are
decided from bounds of Jacobian rows over the region:

* Lipschitz bounds, `norm(f(x1) - f(x2), p) <= L * norm(x1 - x2, q)` for x1, x2 in a region
  (or x2 a point such as the sample itself): proved when the certified constant of
  `Analysis.lipschitz` (as `lipschitz_constant`) is at most L over a convex region holding
  both points;
* explanation stability, comparisons of `saliency(f, x', y)` (or `grad(f(x')[y], x')`,
  `gradient_x_input(f, x', y)`) with a map free of x': `norm(. - g, p) <= tau`,
  `mse(., g) <= tau`, `cosine(., g) >= tau`, `topk_overlap(., g, k) >= t`; the map's bounds
  are the Jacobian row y.

Such comparisons may be combined with `and` / `or`.

The parts of the property that do not depend on the quantified inputs (the reference map, the
thresholds, the regions) are evaluated by the interpreter (`propdsl.interpret`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from propdsl import ir as I
from propdsl.builtins import DISTANCES, EXACT_EXPLAINERS, SIMILARITIES, UNBOUNDED_EXPLAINERS
from propdsl.interpret import BOOLEAN, Env, Interpreter, sample_env
from propdsl.region import Region, RegionError
from propdsl.verify.bounds import Method, _method
from propdsl.verify.jacobian.analysis import Analysis, analyse
from propdsl.verify.jacobian.explanations import (
    cosine_lower_bound,
    distance_bound,
    mse_bound,
    product_bounds,
    topk_lower_bound,
)
from propdsl.verify.query import Unsupported, over_region

__all__ = ["JacobianQuery", "norm_of_difference", "to_jacobian_query"]


@dataclass(eq=False)
class _Atom:
    """One comparison: the Jacobian rows it needs ([B, K] output indices) and how their bounds
    [B, K, *input_shape] become a certified margin [B] (>= 0 proves it; > 0 where strict)."""

    rows: Tensor
    margin: Callable[[Tensor, Tensor, Analysis], Tensor]
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
            analysis = analyse(model, self.region, method)
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
    *,
    partner: tuple[Tensor, Tensor] | None = None,
) -> JacobianQuery | None:
    """The Jacobian query of a Lipschitz or explanation-stability property (see above), or None
    when `formula` has neither form (the caller then reports why the linear verifier cannot
    decide it).

    Raises:
        Unsupported: a strict Lipschitz inequality (false where the two points coincide), or
            an explanation without certified bounds (smoothgrad, integrated gradients).
    """
    env = sample_env(models, params, x, y, logic=BOOLEAN, partner=partner)
    interpreter = Interpreter()
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
    if not 1 <= len(variables) <= 2 or any(over_region(n) for n in I.walk(node)):
        return None
    regions = {v.name: interpreter.domain(d)(env) for v, d in zip(variables, domains, strict=True)}
    for var, reg in regions.items():
        # The hull below would turn an empty region's placeholder point into a box: refuse it
        # (the verifier decides such samples as vacuous before building a query).
        if bool(reg.is_empty().any()):
            raise RegionError(f"the region of {var} is empty for some samples")
    if len(variables) == 2 and domains[0] != domains[1]:
        region = _hull(*regions.values())
    else:
        region = regions[variables[0].name]
    matcher = _Matcher(interpreter, env, networks, set(regions))
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


_LOWER_BOUNDED = SIMILARITIES  # compared with >=
_UPPER_BOUNDED = DISTANCES  # compared with <=


class _Matcher:
    def __init__(
        self, interpreter: Interpreter, env: Env, networks: dict[str, int], binders: set[str]
    ):
        self.interpreter = interpreter
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
            return self.interpreter(node)(self.env).detach()

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
        outs = norm_of_difference(left)
        if outs is None:
            return None
        a, b, p = outs
        if not (isinstance(a, I.Apply) and isinstance(b, I.Apply) and a.net == b.net):
            return None
        factor: I.Node = I.Const(1.0)
        ins = norm_of_difference(right)
        if ins is None and isinstance(right, I.Arith) and right.op == "*":
            for c, other in ((right.left, right.right), (right.right, right.left)):
                ins = norm_of_difference(other)
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

        def margin(lo: Tensor, hi: Tensor, analysis: Analysis) -> Tensor:
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

        def margin(lo: Tensor, hi: Tensor, analysis: Analysis) -> Tensor:
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
        if isinstance(node, I.Fn) and node.fn in EXACT_EXPLAINERS:
            point, label = node.args
            if self._binder(point) and self.free(label):
                return node.fn, str(node.option("net")), label
        if isinstance(node, I.Fn) and node.fn in UNBOUNDED_EXPLAINERS:
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


def norm_of_difference(node: I.Node) -> tuple[I.Node, I.Node, float] | None:
    """(a, b, p) of `norm(a - b, p)`."""
    if not (isinstance(node, I.Fn) and node.fn == "norm"):
        return None
    (arg,) = node.args
    if not (isinstance(arg, I.Arith) and arg.op == "-"):
        return None
    return arg.left, arg.right, float(cast(float, node.option("p", 2.0)))
