"""Normalise typed IR at compile time (never per batch).

Steps, in order: parameter substitution, constant folding, the argmax rewrite
(`argmax(v) == y` becomes `forall j in classes \\ {y}: v[y] > v[j]`), negation normal form
(negations pushed to atoms, comparisons flipped), folding again, and linear forms of output
constraints: each atom that is linear in the network outputs at quantified points is annotated
with the equivalent conjunction of `C y + d >= 0` rows used by the verification backend.
"""

from __future__ import annotations

import itertools
from typing import Any

from propdsl import ir as I
from propdsl.builtins import BUILTINS
from propdsl.check.constants import ConstFailure, apply_arith, as_type, compare
from propdsl.types import BOOL, NAT, REAL, IndexTy, Ty, shape_of

_FLIP = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}


def simplify(node: I.Node, params: dict[str, tuple[Ty, Any]]) -> I.Node:
    """The normalised form of a property body (or any Bool / Real IR)."""
    node = substitute(node, params)
    node = fold(node)
    node = rewrite_argmax(node, _Names(node))
    node = nnf(node)
    node = fold(node)
    return annotate_linear(node, frozenset(), _Names(node))


# -- generic rebuilding --------------------------------------------------------------------------
def _rebuild(node: I.Node, f) -> I.Node:
    """Apply `f` to every child and rebuild the node (dataclass fields in place)."""
    if isinstance(node, I.Apply):
        return I.Apply(node.net, f(node.arg), node.type, span=node.span)
    if isinstance(node, I.Fn):
        return I.Fn(
            node.fn, tuple(f(a) for a in node.args), node.type, node.options, span=node.span
        )
    if isinstance(node, I.Arith):
        return I.Arith(node.op, f(node.left), f(node.right), node.type, span=node.span)
    if isinstance(node, I.Neg):
        return I.Neg(f(node.operand), span=node.span)
    if isinstance(node, I.Idx):
        return I.Idx(f(node.base), tuple(f(i) for i in node.indices), node.type, span=node.span)
    if isinstance(node, I.Cmp):
        return I.Cmp(node.op, f(node.left), f(node.right), span=node.span)
    if isinstance(node, I.And):
        return I.And(tuple(f(i) for i in node.items), span=node.span)
    if isinstance(node, I.Or):
        return I.Or(tuple(f(i) for i in node.items), span=node.span)
    if isinstance(node, I.Not):
        return I.Not(f(node.operand), span=node.span)
    if isinstance(node, I.Implies):
        return I.Implies(f(node.left), f(node.right), span=node.span)
    if isinstance(node, I.Cond):
        return I.Cond(f(node.cond), f(node.then), f(node.orelse), node.type, span=node.span)
    if isinstance(node, I.Ball):
        return I.Ball(f(node.centre), f(node.radius), node.p, span=node.span)
    if isinstance(node, I.Box):
        return I.Box(f(node.lo), f(node.hi), span=node.span, dims=node.dims)
    if isinstance(node, I.Inter):
        return I.Inter(tuple(f(p) for p in node.parts), span=node.span)
    if isinstance(node, I.Range):
        ex = f(node.exclude) if node.exclude is not None else None
        return I.Range(node.k, node.label, ex, span=node.span)
    if isinstance(node, I.Quant):
        return I.Quant(
            node.kind, node.vars, tuple(f(d) for d in node.domains), f(node.body), span=node.span
        )
    if isinstance(node, I.Linear):
        return node
    return node


def substitute(node: I.Node, params: dict[str, tuple[Ty, Any]]) -> I.Node:
    if isinstance(node, I.ParamRef):
        ty, value = params[node.name]
        return I.Const(value, ty, span=node.span)
    return _rebuild(node, lambda c: substitute(c, params))


# -- folding ------------------------------------------------------------------------------------
def _is_const(node: I.Node, value: float) -> bool:
    return isinstance(node, I.Const) and not isinstance(node.value, bool) and node.value == value


def fold(node: I.Node) -> I.Node:
    node = _rebuild(node, fold)
    if (
        isinstance(node, I.Arith)
        and isinstance(node.left, I.Const)
        and isinstance(node.right, I.Const)
    ):
        # the checker's constant folder, with its guards: what has no value stays as it is
        try:
            out = apply_arith(node.op, node.left.value, node.right.value)
        except (ConstFailure, TypeError):
            return node
        return I.Const(as_type(out, node.type), node.type, span=node.span)
    if isinstance(node, I.Arith) and shape_of(node.type) == ():
        left, right = node.left, node.right
        if node.op == "*" and _is_const(left, 1) and left.ty in (REAL, NAT):
            return right
        if node.op in ("*", "/") and _is_const(right, 1):
            return left
        if node.op == "+" and _is_const(left, 0):
            return right
        if node.op in ("+", "-") and _is_const(right, 0):
            return left
    if isinstance(node, I.Neg) and isinstance(node.operand, I.Const):
        v = node.operand.value
        return I.Const(-v, REAL if node.operand.ty == NAT else node.operand.ty, span=node.span)
    if isinstance(node, I.Neg) and isinstance(node.operand, I.Neg):
        return node.operand.operand
    if (
        isinstance(node, I.Cmp)
        and isinstance(node.left, I.Const)
        and isinstance(node.right, I.Const)
    ):
        return I.Const(compare(node.op, node.left.value, node.right.value), BOOL, span=node.span)
    if isinstance(node, (I.And, I.Or)):
        unit, zero = (True, False) if isinstance(node, I.And) else (False, True)
        items: list[I.Node] = []
        for it in node.items:
            sub = it.items if type(it) is type(node) else (it,)
            for s in sub:
                if isinstance(s, I.Const) and s.value is unit:
                    continue
                if isinstance(s, I.Const) and s.value is zero:
                    return I.Const(zero, BOOL, span=node.span)
                items.append(s)
        if not items:
            return I.Const(unit, BOOL, span=node.span)
        if len(items) == 1:
            return items[0]
        return type(node)(tuple(items), span=node.span)
    if isinstance(node, I.Not) and isinstance(node.operand, I.Const):
        return I.Const(not node.operand.value, BOOL, span=node.span)
    if isinstance(node, I.Implies) and isinstance(node.left, I.Const):
        return node.right if node.left.value else I.Const(True, BOOL, span=node.span)
    if isinstance(node, I.Implies) and isinstance(node.right, I.Const) and node.right.value:
        return I.Const(True, BOOL, span=node.span)
    if isinstance(node, I.Cond) and isinstance(node.cond, I.Const):
        return node.then if node.cond.value else node.orelse
    return node


# -- argmax rewrite ------------------------------------------------------------------------------
class _Names:
    """Fresh variable names that clash with no name in a tree."""

    def __init__(self, node: I.Node):
        self.used = {n.name for n in I.walk(node) if isinstance(n, I.Var)}
        for n in I.walk(node):
            if isinstance(n, I.Quant):
                self.used |= {v.name for v in n.vars}

    def fresh(self, base: str) -> str:
        for i in itertools.count():
            name = base if i == 0 else f"{base}{i}"
            if name not in self.used:
                self.used.add(name)
                return name
        raise AssertionError


def rewrite_argmax(node: I.Node, names: _Names) -> I.Node:
    node = _rebuild(node, lambda c: rewrite_argmax(c, names))
    if not isinstance(node, I.Cmp) or node.op not in ("==", "!="):
        return node
    left, right = node.left, node.right
    if not _is_argmax(left) and _is_argmax(right):
        left, right = right, left
    if not _is_argmax(left):
        return node
    assert isinstance(left, I.Fn)
    v = left.args[0]
    k = v.ty.shape[0]  # type: ignore[attr-defined]
    label = isinstance(right.ty, IndexTy) and right.ty.label
    j = I.Var(names.fresh("j"), IndexTy(k, label))
    at_e = I.Idx(v, (right,), REAL)
    at_j = I.Idx(v, (j,), REAL)
    dom = I.Range(k, label, exclude=right)
    biggest = BUILTINS[left.fn].selects == "max"
    if node.op == "==":
        body = I.Cmp(">", at_e, at_j) if biggest else I.Cmp("<", at_e, at_j)
        return I.Quant("forall", (j,), (dom,), body, span=node.span)
    body = I.Cmp(">=", at_j, at_e) if biggest else I.Cmp("<=", at_j, at_e)
    return I.Quant("exists", (j,), (dom,), body, span=node.span)


def _is_argmax(node: I.Node) -> bool:
    """argmax or argmin (a built-in that selects a position)."""
    rec = BUILTINS.get(node.fn) if isinstance(node, I.Fn) else None
    return rec is not None and rec.selects is not None


# -- negation normal form ------------------------------------------------------------------------
def nnf(node: I.Node, negate: bool = False) -> I.Node:
    if isinstance(node, I.Not):
        return nnf(node.operand, not negate)
    if isinstance(node, I.And):
        items = tuple(nnf(i, negate) for i in node.items)
        return (I.Or if negate else I.And)(items, span=node.span)
    if isinstance(node, I.Or):
        items = tuple(nnf(i, negate) for i in node.items)
        return (I.And if negate else I.Or)(items, span=node.span)
    if isinstance(node, I.Implies):
        if negate:
            return I.And((nnf(node.left), nnf(node.right, True)), span=node.span)
        return I.Implies(nnf(node.left), nnf(node.right), span=node.span)
    if isinstance(node, I.Quant) and node.kind in ("forall", "exists"):
        kind = node.kind
        if negate:
            kind = "exists" if kind == "forall" else "forall"
        return I.Quant(kind, node.vars, node.domains, nnf(node.body, negate), span=node.span)
    if isinstance(node, I.Cond) and node.ty == BOOL:
        return I.Cond(
            node.cond, nnf(node.then, negate), nnf(node.orelse, negate), BOOL, span=node.span
        )
    if isinstance(node, I.Const) and node.ty == BOOL:
        return I.Const(node.value != negate, BOOL, span=node.span)
    if isinstance(node, I.Cmp) and negate:
        scalar = shape_of(node.left.ty) == () and shape_of(node.right.ty) == ()
        booleans = node.left.ty == BOOL and node.op in ("==", "!=")
        if scalar or booleans:
            return I.Cmp(_FLIP[node.op], node.left, node.right, span=node.span)
    return I.Not(node, span=getattr(node, "span", None)) if negate else node


# -- linear forms --------------------------------------------------------------------------------
class _NotLinear(Exception):
    pass


def annotate_linear(node: I.Node, bound: frozenset[str], names: _Names) -> I.Node:
    """Wrap each atom that is linear in network outputs at quantified points in `Linear`."""
    if isinstance(node, I.Quant):
        # Every quantified variable but a finite index (enumerated by the backend) is bound:
        # a scalar `t : Real in box(0, 1)` is no more a per-sample value than a tensor `x'`.
        continuous = {v.name for v in node.vars if not isinstance(v.ty, IndexTy)}
        inner = bound | continuous
        body = annotate_linear(node.body, inner, names)
        return I.Quant(node.kind, node.vars, node.domains, body, span=node.span)
    if isinstance(node, (I.And, I.Or, I.Implies, I.Not, I.Cond)):
        return _rebuild(node, lambda c: annotate_linear(c, bound, names) if c.ty == BOOL else c)
    if isinstance(node, I.Cmp):
        forms = linear_forms(node, bound, names)
        if forms is not None:
            return I.Linear(node, forms, span=node.span)
    return node


def linear_forms(atom: I.Cmp, bound: frozenset[str], names: _Names):
    """The conjunction of linear forms equivalent to `atom`, or None outside the fragment."""
    if atom.op == "!=":
        return None
    left, right = atom.left, atom.right
    # |e| <= c  and  norm(v, inf) <= c  become two rows per element
    if atom.op in ("<=", "<") and isinstance(left, I.Fn) and _free_of(right, bound):
        if left.fn == "abs" and shape_of(left.ty) == ():
            e = left.args[0]
            return _forms_of_pairs(
                [(atom.op, e, right), (atom.op, I.Neg(e), right)], bound, names, ()
            )
        if left.fn == "norm" and left.option("p") == float("inf"):
            v = left.args[0]
            shape = shape_of(v.ty)
            if shape is not None and len(shape) == 1:
                k = I.Var(names.fresh("k"), IndexTy(shape[0]))
                vk = I.Idx(v, (k,), REAL)
                over = ((k, I.Range(shape[0])),)
                return _forms_of_pairs(
                    [(atom.op, vk, right), (atom.op, I.Neg(vk), right)], bound, names, over
                )
    ls, rs = shape_of(left.ty), shape_of(right.ty)
    if ls is None or rs is None:
        return None
    if ls == () and rs == ():
        return _forms_of_pairs([(atom.op, left, right)], bound, names, ())
    if len(ls) <= 1 and len(rs) <= 1:
        size = max(ls + rs)  # broadcasting: a side of size 1 is compared with every element
        k = I.Var(names.fresh("k"), IndexTy(size))
        lk, rk = _at(left, k, size), _at(right, k, size)
        return _forms_of_pairs([(atom.op, lk, rk)], bound, names, ((k, I.Range(size)),))
    return None


def _forms_of_pairs(pairs, bound, names, over):
    forms = []
    for op, left, right in pairs:
        form = _linear(op, left, right, bound, over)
        if form is None:
            return None
        forms.append(form)
    return tuple(forms)


def _free_of(node: I.Node, bound: frozenset[str]) -> bool:
    return not (I.free_vars(node) & bound)


def _linear(op, left, right, bound, over) -> I.LinearForm | None:
    if op in ("<", "<="):
        left, right = right, left
        op = {"<": ">", "<=": ">="}[op]
    conv = _Linearizer(bound)
    try:
        lin = conv.lin(left) + conv.lin(right).scale(-1.0)
    except _NotLinear:
        return None
    terms = []
    for node in conv.outputs:
        coef = lin.terms.get(node, 0.0)
        if coef != 0.0:
            assert isinstance(node, I.Idx) and isinstance(node.base, I.Apply)
            terms.append(I.OutputTerm(coef, node.base.net, node.base.arg, node.indices))
    return I.LinearForm(tuple(terms), conv.const_node(lin), op, over)


class _Lin:
    """A linear combination `{key: coef}`; key None is the constant 1, an `Idx(Apply)` node at a
    quantified point is an output term, any other node (free of quantified tensor variables) is
    an opaque value computed per sample."""

    def __init__(self, terms: dict[Any, float]):
        self.terms = {k: v for k, v in terms.items() if v != 0.0}

    def is_number(self) -> bool:
        return all(k is None for k in self.terms)

    def number(self) -> float:
        return self.terms.get(None, 0.0)

    def scale(self, c: float) -> _Lin:
        return _Lin({k: v * c for k, v in self.terms.items()})

    def __add__(self, other: _Lin) -> _Lin:
        out = dict(self.terms)
        for k, v in other.terms.items():
            out[k] = out.get(k, 0.0) + v
        return _Lin(out)


class _Linearizer:
    """IR -> linear combinations over the network outputs at quantified points."""

    def __init__(self, bound: frozenset[str]):
        self.bound = bound
        self.outputs: list[I.Node] = []

    def lin(self, node: I.Node) -> _Lin:
        if isinstance(node, I.Const) and not isinstance(node.value, bool):
            return _Lin({None: float(node.value)})
        if _free_of(node, self.bound):
            # a `max`/`min` over a domain is not computable at the data point: not a constant
            if any(isinstance(n, I.Quant) for n in I.walk(node)):
                raise _NotLinear
            return _Lin({node: 1.0})
        if isinstance(node, I.Idx) and isinstance(node.base, I.Apply) and len(node.indices) == 1:
            if any(not _free_of(i, self.bound) for i in node.indices):
                raise _NotLinear
            if node not in self.outputs:
                self.outputs.append(node)
            return _Lin({node: 1.0})
        if isinstance(node, I.Idx) and len(node.indices) == 1:
            pushed = _push_index(node.base, node.indices[0])
            if pushed is not None:
                return self.lin(pushed)
            raise _NotLinear
        if isinstance(node, I.Neg):
            return self.lin(node.operand).scale(-1.0)
        if isinstance(node, I.Arith) and node.op in ("+", "-"):
            right = self.lin(node.right)
            return self.lin(node.left) + (right if node.op == "+" else right.scale(-1.0))
        if isinstance(node, I.Arith) and node.op in ("*", "/"):
            a, b = self.lin(node.left), self.lin(node.right)
            if b.is_number():
                c = b.number()
                if node.op == "/":
                    if c == 0.0:
                        raise _NotLinear
                    c = 1.0 / c
                return a.scale(c)
            if a.is_number() and node.op == "*":
                return b.scale(a.number())
        raise _NotLinear

    def const_node(self, lin: _Lin) -> I.Node:
        """The output-free part of a combination as an IR expression."""
        out: I.Node | None = None
        for key, coef in lin.terms.items():
            if key is not None and key in self.outputs:
                continue
            if key is None:
                term: I.Node = I.Const(coef, REAL)
            elif coef == 1.0:
                term = key
            elif coef == -1.0:
                term = I.Neg(key)
            else:
                term = I.Arith("*", I.Const(coef, REAL), key, REAL)
            if out is None:
                out = term
            elif isinstance(term, I.Neg):
                out = I.Arith("-", out, term.operand, REAL)
            else:
                out = I.Arith("+", out, term, REAL)
        return out if out is not None else I.Const(0.0, REAL)


def _at(n: I.Node, idx: I.Node, size: int) -> I.Node:
    """Element `idx` of `n` broadcast to a vector of `size`: scalars and size-1 vectors repeat."""
    shape = shape_of(n.ty)
    if shape == ():
        return n
    if shape == (1,) and size != 1:
        return I.Idx(n, (I.Const(0, NAT),), REAL)
    return I.Idx(n, (idx,), REAL)


def _push_index(base: I.Node, idx: I.Node) -> I.Node | None:
    """`(a op b)[i]` as `a[i] op b[i]` for vector arithmetic (scalars stay as they are)."""
    shape = shape_of(base.ty)
    size = shape[0] if shape else 1
    if isinstance(base, I.Arith) and base.op in ("+", "-", "*", "/"):
        return I.Arith(base.op, _at(base.left, idx, size), _at(base.right, idx, size), REAL)
    if isinstance(base, I.Neg):
        return I.Neg(_at(base.operand, idx, size))
    return None
