"""Properties -> verification queries: an input region and linear output constraints.

`to_query` turns a property's normal form, for a batch of samples, into a `Query`: the region of
its quantified input (a ball intersected with boxes) and a tree of linear constraints
`C f(x') + d >= 0` (`> 0` for strict atoms) combined by all / any. Finite quantifiers are
expanded (a Python loop over class indices, never over samples); the rows of every leaf are
bounded together in one bound-propagation call that starts from their matrix C.

A disjunction is proved when one disjunct is proved over the whole region (sound, incomplete).
Parts of the body that do not mention the quantified input (`j != y`, `y == 3`, a premise about
the label) are evaluated exactly per sample; an implication `a implies b` becomes `not a or b`.
Formulas outside this fragment raise `Unsupported` with the position of the offending part.
Strong classification robustness, `softmax(f(x'))[y] >= eta` (or `log_softmax(f(x'))[y] >=
log(eta)`), is handled through a sufficient linear condition:
`f(x')[y] - f(x')[j] >= log((K - 1) * eta / (1 - eta))` for every j != y.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from propdsl import ir as I
from propdsl import simplify
from propdsl.errors import PropdslError
from propdsl.interpret import (
    BOOLEAN,
    Env,
    EvalConfig,
    Interpreter,
    env_device,
    env_dtype,
    sample_env,
)
from propdsl.region import Region
from propdsl.source import Span
from propdsl.types import shape_of


class Unsupported(PropdslError):
    """The property is outside what the verifier can decide (with a positioned reason)."""

    def __init__(self, reason: str, span: Span | None = None):
        self.reason = reason
        self.span = span
        super().__init__(reason)


# -- the constraint tree -------------------------------------------------------------------------
@dataclass
class Rows:
    """`C f + d >= 0` (or `> 0` where strict) for every row; C [B, S, O], d [B, S]."""

    C: Tensor
    d: Tensor
    strict: Tensor  # [S] bool


@dataclass
class All:
    children: list[Any]


@dataclass
class AnyOf:
    children: list[Any]


@dataclass
class Masked:
    """Where `mask` holds, the clause's truth is `value` regardless of the child."""

    child: Any
    mask: Tensor
    value: bool


@dataclass
class Query:
    """One property's verification query for a batch of samples."""

    network: str
    region: Region | None
    root: Any
    variable: str | None
    rows: list[Rows] = field(default_factory=list)

    def matrix(self) -> tuple[Tensor, Tensor, Tensor]:
        """All leaves' rows stacked: C [B, S, O], d [B, S], strict [S]."""
        C = torch.cat([r.C for r in self.rows], dim=1)
        d = torch.cat([r.d for r in self.rows], dim=1)
        strict = torch.cat([r.strict for r in self.rows])
        return C, d, strict

    def decide(self, lower: Tensor) -> Tensor:
        """Per sample: is the property proved, given lower bounds [B, S] of `C f`?"""
        proved: dict[int, Tensor] = {}
        start = 0
        for r in self.rows:
            s = r.C.shape[1]
            m = lower[:, start : start + s] + r.d
            ok = torch.where(r.strict, m > 0, m >= 0)
            proved[id(r)] = ok.all(dim=1) if s else torch.ones_like(m[:, 0], dtype=torch.bool)
            start += s
        return _evaluate(self.root, proved, lower.shape[0], lower.device)

    def margins(self, lower: Tensor) -> Tensor:
        """The certified margin per sample: the tree's value with rows worth `lower + d`,
        `all` = min, `any` = max, clauses decided exactly = +inf / -inf.

        It is >= 0 where `decide` proves the property (> 0 where the deciding rows are strict),
        and measures how far the bounds are from a proof elsewhere.
        """
        values: dict[int, Tensor] = {}
        start = 0
        for r in self.rows:
            s = r.C.shape[1]
            m = lower[:, start : start + s] + r.d
            values[id(r)] = (
                m.amin(dim=1) if s else torch.full_like(lower[:, 0], math.inf, dtype=lower.dtype)
            )
            start += s
        return _margin(self.root, values, lower.shape[0], lower)


def _margin(node: Any, values: dict[int, Tensor], batch: int, like: Tensor) -> Tensor:
    if isinstance(node, Rows):
        return values[id(node)]
    if isinstance(node, All | AnyOf):
        conj = isinstance(node, All)
        out = torch.full((batch,), math.inf if conj else -math.inf, dtype=like.dtype)
        out = out.to(like.device)
        for c in node.children:
            m = _margin(c, values, batch, like)
            out = torch.minimum(out, m) if conj else torch.maximum(out, m)
        return out
    if isinstance(node, Masked):
        inner = _margin(node.child, values, batch, like)
        fixed = torch.full_like(inner, math.inf if node.value else -math.inf)
        return torch.where(node.mask, fixed, inner)
    raise TypeError(type(node).__name__)


def _evaluate(node: Any, proved: dict[int, Tensor], batch: int, device) -> Tensor:
    if isinstance(node, Rows):
        return proved[id(node)]
    if isinstance(node, All):
        out = torch.ones(batch, dtype=torch.bool, device=device)
        for c in node.children:
            out &= _evaluate(c, proved, batch, device)
        return out
    if isinstance(node, AnyOf):
        out = torch.zeros(batch, dtype=torch.bool, device=device)
        for c in node.children:
            out |= _evaluate(c, proved, batch, device)
        return out
    if isinstance(node, Masked):
        inner = _evaluate(node.child, proved, batch, device)
        return torch.where(node.mask, torch.full_like(inner, node.value), inner)
    raise TypeError(type(node).__name__)


# -- building ------------------------------------------------------------------------------------
def to_query(
    formula: I.Node,
    params: Sequence[str],
    networks: dict[str, int],
    x: Tensor,
    y: Tensor | None,
    models: dict[str, Any],
    *,
    config: EvalConfig | None = None,
    partner: tuple[Tensor, Tensor] | None = None,
) -> Query | None:
    """The query of `formula` for samples (x, y); None when it has no quantified input.

    Args:
        formula: a property's normal form (`Property.formula`).
        params: the property's parameter names, bound to x and y.
        networks: output size of each network by name.
        x, y: the batch.
        models: the networks (to evaluate constants such as `f(x)` at the data point).
        config: evaluation settings; its `radius_scale` (the training eps ramp-up) scales every
            ball's radius. Default: radii as written.

    Raises:
        Unsupported: the formula is outside the linear fragment (with the offending position).
    """
    # a property of a pair: the partner (xt, yt) is a constant input, like x itself
    env = sample_env(models, params, x, y, logic=BOOLEAN, config=config, partner=partner)
    builder = _Builder(Interpreter(), networks, env)
    node = formula
    outer_finite: list[I.Quant] = []
    while isinstance(node, I.Quant) and all(isinstance(d, I.Range) for d in node.domains):
        outer_finite.append(node)
        node = node.body
    if not (isinstance(node, I.Quant) and node.kind == "forall"):
        # `max` / `min` over a region count too: the attack only bounds them from one side.
        if any(over_region(n) for n in I.walk(formula)):
            raise Unsupported(
                "the verifier handles properties of the form 'forall v in region: ...'",
                getattr(formula, "span", None),
            )
        return None
    if outer_finite:
        raise Unsupported(
            "put the quantifier over the input region outermost", getattr(formula, "span", None)
        )
    tensor_vars = [
        (v, d) for v, d in zip(node.vars, node.domains, strict=True) if not isinstance(d, I.Range)
    ]
    if len(tensor_vars) != 1:
        names = ", ".join(v.name for v, _ in tensor_vars)
        raise Unsupported(
            f"the linear verifier handles one quantified input, this property has "
            f"{len(tensor_vars)} ({names}); of properties over two inputs, only Lipschitz bounds "
            "'norm(f(x1) - f(x2), p) <= L * norm(x1 - x2, q)' are verified (from Jacobian bounds)",
            node.span,
        )
    var, dom = tensor_vars[0]
    finite = [
        (v, d) for v, d in zip(node.vars, node.domains, strict=True) if isinstance(d, I.Range)
    ]
    body = node.body
    if finite:
        body = I.Quant("forall", tuple(v for v, _ in finite), tuple(d for _, d in finite), body)
    builder.binder = var.name
    for n in I.walk(body):
        if over_region(n):
            raise Unsupported("nested quantifiers over regions are not supported", n.span)
    region = builder.interpreter.domain(dom)(env)
    root = builder.clause(body, env)
    return Query(builder.network or next(iter(networks)), region, root, var.name, builder.rows)


class _Builder:
    def __init__(self, interpreter: Interpreter, networks: dict[str, int], env: Env):
        self.interpreter = interpreter
        self.networks = networks
        self.env = env
        self.binder = ""
        self.network: str | None = None
        self.rows: list[Rows] = []

    def eval(self, node: I.Node, env: Env) -> Tensor:
        return self.interpreter(node)(env)

    def clause(self, node: I.Node, env: Env) -> Any:
        if isinstance(node, I.Const) and isinstance(node.value, bool):
            return All([]) if node.value else AnyOf([])
        if self.binder not in I.free_vars(node):
            return self.exact(node, env)
        if isinstance(node, I.Linear):
            return All([self.form_rows(f, env) for f in node.forms])
        if isinstance(node, I.Cmp):
            sufficient = self.strong_classification(node, env)
            if sufficient is not None:
                return sufficient
            rewritten = self.elementwise(node)
            if rewritten is not None:
                return self.clause(rewritten, env)
            raise Unsupported(
                "this comparison is not linear in the network's outputs at the quantified point",
                node.span,
            )
        if isinstance(node, I.And):
            return All([self.clause(c, env) for c in node.items])
        if isinstance(node, I.Or):
            return AnyOf([self.clause(c, env) for c in node.items])
        if isinstance(node, I.Quant) and all(isinstance(d, I.Range) for d in node.domains):
            return self.finite(node, env)
        if isinstance(node, I.Implies):
            if self.binder not in I.free_vars(node.left):
                # A premise about the sample alone: where it is false the implication holds.
                premise = self.truth(node.left, env)
                return Masked(self.clause(node.right, env), ~premise, True)
            return AnyOf([self.clause(self.negated(node.left), env), self.clause(node.right, env)])
        if isinstance(node, I.Cond) and self.binder not in I.free_vars(node.cond):
            cond = self.truth(node.cond, env)
            return AnyOf(
                [
                    Masked(self.clause(node.then, env), ~cond, False),
                    Masked(self.clause(node.orelse, env), cond, False),
                ]
            )
        raise Unsupported(
            f"'{type(node).__name__}' is outside the verifier's linear fragment",
            getattr(node, "span", None),
        )

    def truth(self, node: I.Node, env: Env) -> Tensor:
        """The exact truth [B] of a formula free of the quantified input."""
        value = self.eval(node, env).bool().reshape(-1)
        return value.expand(env.batch) if value.numel() == 1 else value

    def exact(self, node: I.Node, env: Env) -> Any:
        """A clause decided per sample without bounds: true where it holds, false elsewhere."""
        return Masked(AnyOf([]), self.truth(node, env), True)

    def negated(self, node: I.Node) -> I.Node:
        """`not node` in negation normal form, its atoms annotated with linear forms again."""
        out = simplify.nnf(_strip_linear(node), negate=True)
        return simplify.annotate_linear(out, frozenset({self.binder}), simplify._Names(out))

    def elementwise(self, node: I.Cmp) -> I.Node | None:
        """`abs(v) <= c` for a vector v: `v <= c and -v <= c`, element by element."""
        op, left, right = node.op, node.left, node.right
        if op in (">=", ">"):
            op, left, right = {">=": "<=", ">": "<"}[op], right, left
        if op not in ("<=", "<") or not (isinstance(left, I.Fn) and left.fn == "abs"):
            return None
        v = left.args[0]
        if len(shape_of(v.ty) or ()) != 1:
            return None
        parts = (I.Cmp(op, v, right, span=node.span), I.Cmp(op, I.Neg(v), right, span=node.span))
        out = simplify.annotate_linear(
            I.And(parts, span=node.span), frozenset({self.binder}), simplify._Names(node)
        )
        assert isinstance(out, I.And)
        return out if all(isinstance(p, I.Linear) for p in out.items) else None

    def finite(self, node: I.Quant, env: Env) -> Any:
        children = []
        ranges: list[I.Range] = list(node.domains)  # type: ignore[arg-type]
        for combo in _product([r.k for r in ranges]):
            values = {
                v.name: torch.full((env.batch,), c, dtype=torch.long, device=env_device(env))
                for v, c in zip(node.vars, combo, strict=True)
            }
            sub = env.child(values)
            child = self.clause(node.body, sub)
            mask = torch.zeros(env.batch, dtype=torch.bool, device=env_device(env))
            for r, c in zip(ranges, combo, strict=True):
                if r.exclude is not None:
                    mask |= self.eval(r.exclude, env).long() == c
            if bool(mask.any()):
                child = Masked(child, mask, node.kind == "forall")
            children.append(child)
        return All(children) if node.kind == "forall" else AnyOf(children)

    def form_rows(self, form: I.LinearForm, env: Env) -> Any:
        if form.over:
            (var, rng), *rest = form.over
            inner = I.LinearForm(form.terms, form.const, form.op, tuple(rest))
            parts = []
            for c in range(rng.k):
                sub = env.child(
                    {
                        var.name: torch.full(
                            (env.batch,), c, dtype=torch.long, device=env_device(env)
                        )
                    }
                )
                parts.append(self.form_rows(inner, sub))
            return All(parts)
        batch = env.batch
        C = None
        for term in form.terms:
            if not (isinstance(term.arg, I.Var) and term.arg.name == self.binder):
                raise Unsupported(
                    "the network must be applied to the quantified variable itself",
                    getattr(term.arg, "span", None),
                )
            if self.network not in (None, term.net):
                raise Unsupported("a property about two networks at once", None)
            self.network = term.net
            size = self.networks[term.net]
            if C is None:
                C = torch.zeros(batch, 1, size, dtype=env_dtype(env), device=env_device(env))
            idx = self.eval(term.index[0], env).long().reshape(-1)
            idx = idx.expand(batch) if idx.numel() == 1 else idx
            C[torch.arange(batch, device=C.device), 0, idx] += term.coef
        if C is None:
            size = self.networks[self.network or next(iter(self.networks))]
            C = torch.zeros(batch, 1, size, dtype=env_dtype(env), device=env_device(env))
        d = self.eval(form.const, env).to(C.dtype).reshape(-1)
        d = d.expand(batch) if d.numel() == 1 else d
        d = d.reshape(batch, 1)
        if form.op == "==":
            strict = torch.tensor([False, False], device=C.device)
            both = Rows(torch.cat([C, -C], 1), torch.cat([d, -d], 1), strict)
            self.rows.append(both)
            return both
        rows = Rows(C, d, torch.tensor([form.op == ">"], device=C.device))
        self.rows.append(rows)
        return rows

    def strong_classification(self, node: I.Cmp, env: Env) -> Any:
        """`softmax(f(x'))[y] >= eta` (or `log_softmax(f(x'))[y] >= log(eta)`) via the margins
        `f[y] - f[j] >= log((K-1) eta / (1 - eta))` for every j != y (sufficient)."""
        op, left, right = node.op, node.left, node.right
        if op in ("<=", "<"):
            op, left, right = {"<=": ">=", "<": ">"}[op], right, left
        if op not in (">=", ">") or not isinstance(left, I.Idx) or len(left.indices) != 1:
            return None
        sm = left.base
        if not (
            isinstance(sm, I.Fn)
            and sm.fn in ("softmax", "log_softmax")
            and isinstance(sm.args[0], I.Apply)
        ):
            return None
        app = sm.args[0]
        if not (isinstance(app.arg, I.Var) and app.arg.name == self.binder):
            return None
        k = self.networks[app.net]
        if self.binder in I.free_vars(right) or k < 2 or self.network not in (None, app.net):
            return None
        self.network = app.net
        batch = env.batch
        # the threshold per sample (a constant, or computed from the sample), in float64
        eta = self.eval(right, env).detach().double().reshape(-1).expand(batch)
        if sm.fn == "log_softmax":
            eta = eta.exp()  # log p >= c  <=>  p >= exp(c)
        # eta <= 0: always true (bound -inf); eta >= 1: never provable (bound +inf)
        bound = torch.log((k - 1) * eta / (1 - eta)).nan_to_num(nan=math.inf)
        bound = torch.where(eta <= 0, -math.inf, torch.where(eta >= 1, math.inf, bound))
        y = self.eval(left.indices[0], env).long().reshape(-1).expand(batch)
        C = torch.zeros(batch, k, k, dtype=env_dtype(env), device=env_device(env))
        rows = torch.arange(batch, device=C.device)
        for j in range(k):
            C[rows, j, y] += 1.0
            C[rows, j, j] -= 1.0
        d = (-bound).to(C).reshape(batch, 1).expand(batch, k).clone()
        # row j == y is 0 >= -bound: meaningless; make it trivially true
        d[rows, y] = math.inf
        strict = torch.full((k,), op == ">", device=C.device)
        r = Rows(C, d, strict)
        self.rows.append(r)
        return r


def _product(sizes: list[int]) -> list[tuple[int, ...]]:
    out: list[tuple[int, ...]] = [()]
    for k in sizes:
        out = [(*p, c) for p in out for c in range(k)]
    return out


def over_region(node: I.Node) -> bool:
    """A quantifier (forall, exists, max, min) over a ball or a box."""
    return isinstance(node, I.Quant) and not all(isinstance(d, I.Range) for d in node.domains)


def _strip_linear(node: I.Node) -> I.Node:
    if isinstance(node, I.Linear):
        return node.atom
    return simplify._rebuild(node, _strip_linear)
