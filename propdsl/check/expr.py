"""Expressions: names, operators, indexing, quantifiers and calls, typed into IR.

A call of a let function or a property template is inlined: its body is checked here, at the
call, with the argument types (`expand`). Calls of built-in functions are typed by their records'
rules (`propdsl.check.builtins`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from propdsl import ast as A
from propdsl import ir as I
from propdsl.builtins import BUILTINS
from propdsl.check.base import ERR, MAX_BOX_ELEMENTS, ErrTy, Limit
from propdsl.check.constants import NOT_CONST, ConstFailure, NotConstant, evaluate
from propdsl.check.scope import (
    FunEntry,
    Names,
    NetEntry,
    ParamEntry,
    Scope,
    ValueEntry,
    count,
    fresh_name,
    from_prelude,
    given,
    is_prelude,
    is_prelude_scope,
    line_of,
    names_in_scope,
    visible_networks,
)
from propdsl.source import Span
from propdsl.types import (
    BOOL,
    NAT,
    REAL,
    IndexTy,
    TensorTy,
    Ty,
    broadcast,
    is_numeric,
    is_scalar,
    shape_of,
    tensor,
)


class Expressions(Names):
    """Types an expression in a scope; `infer` dispatches on the AST node's class."""

    def infer(self, e: A.Expr, scope: Scope) -> I.Node:
        self.enter(e.span)
        try:
            rule: Callable[[A.Expr, Scope], I.Node] = getattr(self, f"_infer_{type(e).__name__}")
            return rule(e, scope)
        finally:
            self.leave()

    def bad(self, span: Span | None) -> I.Node:
        return I.Const(0, ERR, span=span)

    def _infer_Num(self, e: A.Num, scope: Scope) -> I.Node:
        if isinstance(e.value, int):
            return I.Const(e.value, NAT, span=e.span)
        return I.Const(e.value, REAL, span=e.span)

    def _infer_BoolLit(self, e: A.BoolLit, scope: Scope) -> I.Node:
        return I.Const(e.value, BOOL, span=e.span)

    def _infer_Str(self, e: A.Str, scope: Scope) -> I.Node:
        self.error("strings are only allowed as option values", e.span)
        return self.bad(e.span)

    def _infer_ListExpr(self, e: A.ListExpr, scope: Scope) -> I.Node:
        self.error("lists are only allowed as option values", e.span)
        return self.bad(e.span)

    def _infer_Name(self, e: A.Name, scope: Scope) -> I.Node:
        entry = scope.lookup(e.id)
        if entry is None:
            if e.id == "classes":
                return self.classes_domain(e.span, scope)
            if e.id in BUILTINS:
                self.error(f"'{e.id}' is a function; call it with arguments", e.span)
                return self.bad(e.span)
            self.unknown_name(e.id, e.span, scope)
            return self.bad(e.span)
        if isinstance(entry, ValueEntry):
            self.inline(entry.node, e.span)
            return entry.node
        if isinstance(entry, ParamEntry):
            return I.ParamRef(e.id, entry.ty, span=e.span)
        if isinstance(entry, NetEntry):
            self.error(
                f"network '{e.id}' must be applied to an input, as in {e.id}(x)",
                e.span,
            )
            return self.bad(e.span)
        if isinstance(entry, FunEntry):
            kind = "property" if isinstance(entry.decl, A.PropertyDecl) else "function"
            self.error(f"{kind} '{e.id}' must be called with its arguments", e.span)
            return self.bad(e.span)
        raise TypeError(entry)

    def classes_domain(self, span: Span | None, scope: Scope) -> I.Node:
        nets = visible_networks(self.networks, scope)
        if len(nets) != 1 and "network" in self.failed.values():
            return self.bad(span)
        if len(nets) != 1:
            self.error(
                "'classes' needs exactly one network to count the classes",
                span,
                "use range(K) instead",
            )
            return self.bad(span)
        return I.Range(self.networks[nets[0]].out.shape[0], True, span=span)

    def _infer_Unary(self, e: A.Unary, scope: Scope) -> I.Node:
        x = self.infer(e.operand, scope)
        if isinstance(x.ty, ErrTy):
            return x
        if e.op == "not":
            if not self.expect_bool(x, e.operand.span):
                return self.bad(e.span)
            return I.Not(x, span=e.span)
        if not is_numeric(x.ty):
            self.error(f"cannot negate {x.ty}", e.operand.span)
            return self.bad(e.span)
        return I.Neg(x, span=e.span)

    def expect_bool(self, x: I.Node, span: Span | None) -> bool:
        if isinstance(x.ty, ErrTy) or x.ty == BOOL:
            return True
        self.error(f"expected Bool, but this is {x.ty}", span)
        return False

    def _infer_Binary(self, e: A.Binary, scope: Scope) -> I.Node:
        left = self.infer(e.left, scope)
        right = self.infer(e.right, scope)
        if isinstance(left.ty, ErrTy) or isinstance(right.ty, ErrTy):
            return self.bad(e.span)
        op = e.op
        if op in ("and", "or", "implies"):
            ok = self.expect_bool(left, e.left.span) & self.expect_bool(right, e.right.span)
            if not ok:
                return self.bad(e.span)
            if op == "and":
                return I.And((left, right), span=e.span)
            if op == "or":
                return I.Or((left, right), span=e.span)
            return I.Implies(left, right, span=e.span)
        if op == "&":
            return self.intersect(left, right, e)
        if op in A.COMPARE_OPS:
            return self.compare(op, left, right, e)
        return self.arith(op, left, right, e)

    def intersect(self, left: I.Node, right: I.Node, e: A.Binary) -> I.Node:
        for side, node in ((e.left, left), (e.right, right)):
            if not isinstance(node, I.Domain) or isinstance(node, I.Range):
                self.error(f"'&' intersects balls and boxes, but this is {node.ty}", side.span)
                return self.bad(e.span)
        assert isinstance(left, I.Domain) and isinstance(right, I.Domain)
        balls = [
            p
            for d in (left, right)
            for p in (d.parts if isinstance(d, I.Inter) else (d,))
            if isinstance(p, I.Ball)
        ]
        if len(balls) > 1:
            self.error(
                "an intersection of two balls is not supported",
                e.span,
                "intersect one ball with boxes",
            )
            return self.bad(e.span)
        ls, rs = left.shape, right.shape
        if ls is not None and rs is not None and ls != rs:
            self.error(
                f"cannot intersect {_domain_words(left)} with {_domain_words(right)}: "
                "the shapes differ",
                e.span,
            )
            return self.bad(e.span)
        parts: list[I.Domain] = []
        for d in (left, right):
            parts.extend(d.parts if isinstance(d, I.Inter) else (d,))
        return I.Inter(tuple(parts), span=e.span)

    def compare(self, op: str, left: I.Node, right: I.Node, e: A.Binary) -> I.Node:
        lt, rt = left.ty, right.ty
        if lt == BOOL and rt == BOOL and op in ("==", "!="):
            return I.Cmp(op, left, right, span=e.span)
        if isinstance(lt, IndexTy) and isinstance(rt, IndexTy) and lt.k != rt.k:
            label = lt if lt.label else (rt if rt.label else None)
            self.error(
                f"cannot compare {lt} with {rt}: they range over different sizes",
                e.span,
                f"'classes' ranges over {label}; range(K) gives Index[K]" if label else None,
            )
            return self.bad(e.span)
        for idx_ty, other, side in ((lt, right, e.right), (rt, left, e.left)):
            if isinstance(idx_ty, IndexTy) and other.ty == NAT:
                v = self.const(other)
                if v is not NOT_CONST and not 0 <= v < idx_ty.k:
                    self.error(
                        f"{v} is not an element of {idx_ty} (0 to {idx_ty.k - 1})", side.span
                    )
                    return self.bad(e.span)
        ls, rs = shape_of(lt), shape_of(rt)
        if ls is None or rs is None:
            bad = e.left if ls is None else e.right
            self.error(f"cannot compare {lt if ls is None else rt}", bad.span)
            return self.bad(e.span)
        if broadcast(ls, rs) is None:
            self.error(f"cannot compare {lt} with {rt}: shapes do not broadcast", e.span)
            return self.bad(e.span)
        return I.Cmp(op, left, right, span=e.span)

    def arith(self, op: str, left: I.Node, right: I.Node, e: A.Binary) -> I.Node:
        ls, rs = shape_of(left.ty), shape_of(right.ty)
        if ls is None or rs is None:
            bad, node = (e.left, left) if ls is None else (e.right, right)
            self.error(f"'{op}' needs numbers or tensors, but this is {node.ty}", bad.span)
            return self.bad(e.span)
        if op == "^" and rs != ():
            self.error("an exponent must be a scalar", e.right.span)
            return self.bad(e.span)
        shape = broadcast(ls, rs)
        if shape is None:
            self.error(
                f"cannot apply '{op}' to {left.ty} and {right.ty}: shapes do not broadcast",
                e.span,
            )
            return self.bad(e.span)
        ty: Ty
        if shape == () and left.ty in (NAT,) and right.ty in (NAT,) and op in ("+", "*"):
            ty = NAT
        else:
            ty = tensor(shape)
        node = I.Arith(op, left, right, ty, span=e.span)
        if shape == ():
            try:
                evaluate(node, self.params, self._consts)
            except ConstFailure as err:
                self.error(f"cannot compute this constant: {err}", e.span)
                return self.bad(e.span)
            except NotConstant:
                pass
        return node

    def _infer_IfExpr(self, e: A.IfExpr, scope: Scope) -> I.Node:
        c = self.infer(e.cond, scope)
        a = self.infer(e.then, scope)
        b = self.infer(e.orelse, scope)
        if any(isinstance(n.ty, ErrTy) for n in (c, a, b)):
            return self.bad(e.span)
        if not self.expect_bool(c, e.cond.span):
            return self.bad(e.span)
        if a.ty == b.ty:
            ty = a.ty
        elif is_numeric(a.ty) and is_numeric(b.ty):
            sa, sb = shape_of(a.ty), shape_of(b.ty)
            assert sa is not None and sb is not None
            shape = broadcast(sa, sb)
            if shape is None:
                self.error(f"the branches have different shapes: {a.ty} and {b.ty}", e.span)
                return self.bad(e.span)
            ty = tensor(shape)
        else:
            self.error(f"the branches have different types: {a.ty} and {b.ty}", e.span)
            return self.bad(e.span)
        return I.Cond(c, a, b, ty, span=e.span)

    def _infer_Index(self, e: A.Index, scope: Scope) -> I.Node:
        base = self.infer(e.value, scope)
        if isinstance(base.ty, ErrTy):
            return base
        if not isinstance(base.ty, TensorTy):
            self.error(f"only tensors can be indexed, but this is {base.ty}", e.value.span)
            return self.bad(e.span)
        shape = base.ty.shape
        if len(e.indices) > len(shape):
            self.error(f"too many indices: {base.ty} has {len(shape)} dimension(s)", e.span)
            return self.bad(e.span)
        idx_nodes = []
        for dim, ie in zip(shape, e.indices, strict=False):
            node = self.infer(ie, scope)
            if isinstance(node.ty, ErrTy):
                return self.bad(e.span)
            if isinstance(node.ty, IndexTy):
                if node.ty.k != dim:
                    self.error(
                        f"{node.ty} cannot index a dimension of size {dim}",
                        ie.span,
                    )
                    return self.bad(e.span)
            elif node.ty == NAT:
                v = self.const(node)
                if v is not NOT_CONST and not 0 <= v < dim:
                    self.error(
                        f"index {v} is out of range for a dimension of size {dim}",
                        ie.span,
                        f"indices run from 0 to {dim - 1}",
                    )
                    return self.bad(e.span)
            else:
                self.error(f"an index must be Nat, Index or Label, but this is {node.ty}", ie.span)
                return self.bad(e.span)
            idx_nodes.append(node)
        return I.Idx(base, tuple(idx_nodes), tensor(shape[len(e.indices) :]), span=e.span)

    # -- quantifiers -----------------------------------------------------------------------------
    def _infer_Quantified(self, e: A.Quantified, scope: Scope) -> I.Node:
        inner = scope.child()
        vars_: list[I.Var] = []
        domains: list[I.Domain] = []
        failed = False
        combinations = self._finite  # of the finite binders around and up to here
        factors = self._finite > 1
        attacked = False  # a binder over a ball or a box
        for b in e.binders:
            dom = self.infer(b.domain, inner)
            self.check_fresh(b.name, b.span, inner)
            ty: Ty = ERR
            if isinstance(dom.ty, ErrTy):
                failed = True
            elif isinstance(dom, I.Range):
                ty = IndexTy(dom.k, dom.label)
                combinations *= dom.k
                if factors:  # a lone finite quantifier is bounded by MAX_RANGE or the network
                    self.check_finite(combinations, b.span)
                factors = True
            elif isinstance(dom, I.Domain):
                if not attacked:
                    self.check_attacks(self._attacks + 1, b.span)
                    attacked = True
                if dom.shape is None:
                    if b.annotation is None:
                        nets = visible_networks(self.networks, scope)
                        example = self.networks[nets[0]].inp if len(nets) == 1 else "Tensor[...]"
                        self.error(
                            f"cannot tell the shape of '{b.name}': a box with scalar bounds "
                            "fits tensors of any shape",
                            b.domain.span,
                            "intersect the box with a ball, or annotate the variable, as in "
                            f"'{e.kind} {b.name} : {example} in ...'",
                        )
                        failed = True
                    ty = ERR
                else:
                    ty = tensor(dom.shape)
            else:
                self.error(
                    f"a quantifier ranges over a ball, a box, range(K) or classes, not {dom.ty}",
                    b.domain.span,
                )
                failed = True
            if b.annotation is not None:
                ann = self.type_expr(b.annotation, scope)
                if isinstance(ty, ErrTy) and not isinstance(ann, ErrTy) and not failed:
                    ty = ann
                    if isinstance(ann, TensorTy) and isinstance(dom, I.Domain):
                        if math.prod(ann.shape) > MAX_BOX_ELEMENTS:
                            self.error(
                                f"'{b.name}' would hold {math.prod(ann.shape):,} numbers per "
                                f"sample, more than {MAX_BOX_ELEMENTS:,}",
                                b.annotation.span,
                                "a box with scalar bounds takes its variable's shape; "
                                "quantify over a smaller tensor",
                            )
                            failed = True
                        # the box takes the annotated shape: the backends build its region
                        dom = _with_dims(dom, ann.shape)
                elif not isinstance(ann, ErrTy) and not isinstance(ty, ErrTy) and ann != ty:
                    self.error(
                        f"'{b.name}' is annotated {ann}, but its domain holds {ty}",
                        b.annotation.span,
                    )
            # Inlined arguments may carry variables of the caller with this very name (a
            # template's `x'` applied to the caller's `x'`): rename to keep them apart.
            var = I.Var(fresh_name(b.name, names_in_scope(inner)), ty, span=b.span)
            inner.names[b.name] = ValueEntry(var, b.span)
            vars_.append(var)
            domains.append(dom if isinstance(dom, I.Domain) else I.Box(dom, dom))
        outer = (self._finite, self._attacks)
        self._finite, self._attacks = combinations, self._attacks + attacked
        try:
            body = self.infer(e.body, inner)
        finally:
            self._finite, self._attacks = outer
        if failed or isinstance(body.ty, ErrTy):
            return self.bad(e.span)
        if e.kind in ("forall", "exists"):
            if body.ty != BOOL:
                self.error(
                    f"the body of '{e.kind}' must be Bool, but this is {body.ty}",
                    e.body.span,
                    "use max / min to optimise a number",
                )
                return self.bad(e.span)
        elif not is_scalar(body.ty):
            self.error(
                f"the body of '{e.kind}' must be a Real number, but this is {body.ty}",
                e.body.span,
            )
            return self.bad(e.span)
        return I.Quant(e.kind, tuple(vars_), tuple(domains), body, span=e.span)

    # -- calls -----------------------------------------------------------------------------------
    def _infer_Call(self, e: A.Call, scope: Scope) -> I.Node:
        fid = e.func.id
        entry = scope.lookup(fid)
        if isinstance(entry, NetEntry):
            return self.apply_network(entry, e, scope)
        if isinstance(entry, FunEntry):
            return self.expand(entry, e, scope)
        if entry is not None:
            self.error(f"'{fid}' is not a function", e.func.span)
            return self.bad(e.span)
        if fid in BUILTINS:
            return self.builtin(fid, e, scope)
        if fid == "certified":
            self.error(
                "'certified' may only be a term of a train block's loss",
                e.func.span,
                "loss = cross_entropy + certified(robust)",
            )
        else:
            self.unknown_name(fid, e.func.span, scope)
        # Only unknown names in the arguments: their types mean nothing without the function.
        for a in (*e.args, *(k.value for k in e.keywords)):
            self.resolve_names(a, scope, set())
        return self.bad(e.span)

    def apply_network(self, net: NetEntry, e: A.Call, scope: Scope) -> I.Node:
        if len(e.args) != 1 or e.keywords:
            self.error(f"network '{net.name}' takes exactly one input", e.span)
            return self.bad(e.span)
        arg = self.infer(e.args[0], scope)
        if isinstance(arg.ty, ErrTy):
            return self.bad(e.span)
        if arg.ty != net.ty.inp:
            self.error(
                f"network '{net.name}' expects {net.ty.inp}, but this is {arg.ty}",
                e.args[0].span,
            )
            return self.bad(e.span)
        return I.Apply(net.name, arg, net.ty.out, span=e.span)

    def expand(self, entry: FunEntry, e: A.Call, scope: Scope) -> I.Node:
        d = entry.decl
        assert d.params is not None
        if e.keywords:
            self.error(f"'{d.name}' takes positional arguments only", e.keywords[0].span)
            return self.bad(e.span)
        if len(e.args) != len(d.params):
            where = (
                "in the prelude" if is_prelude(scope, d.name) else f"at line {line_of(d.name_span)}"
            )
            self.error(
                f"'{d.name}' takes {count(len(d.params), 'argument')}, but {given(len(e.args))}",
                e.span,
                notes=(f"{d.name}({', '.join(p.name for p in d.params)}) is declared {where}",),
            )
            return self.bad(e.span)
        if d.name in self._expanding:
            self.error(f"'{d.name}' calls itself", e.span)
            return self.bad(e.span)
        if entry.broken or id(entry) in self._quiet:
            return self.bad(e.span)
        inner = entry.scope.child()
        for p, a in zip(d.params, e.args, strict=True):
            if isinstance(a, A.Name) and isinstance(scope.lookup(a.id), NetEntry):
                inner.names[p.name] = scope.lookup(a.id)
                continue
            node = self.infer(a, scope)
            if isinstance(node.ty, ErrTy):
                return self.bad(e.span)
            if p.annotation is not None:
                ann = self.type_expr(p.annotation, entry.scope)
                if not isinstance(ann, ErrTy) and not assignable(node.ty, ann):
                    self.error(
                        f"'{d.name}' expects {ann} for '{p.name}', but this is {node.ty}",
                        a.span,
                    )
                    return self.bad(e.span)
            inner.names[p.name] = ValueEntry(node, a.span)
        self._expanding.append(d.name)
        self._expanding_entries.append(entry)
        before = len(self.diags)
        prelude = is_prelude_scope(entry.scope)
        try:
            body = self.infer(d.body, inner)
        except Limit as limit:
            if prelude:
                limit.diagnostic = from_prelude(limit.diagnostic, d.name, e.span)
            raise
        finally:
            self._expanding.pop()
            self._expanding_entries.pop()
        if prelude and len(self.diags) > before:
            # The prelude's text is not the user's: point at the call, quote the definition.
            self.diags[before:] = [from_prelude(g, d.name, e.span) for g in self.diags[before:]]
        if isinstance(d, A.PropertyDecl) and body.ty not in (BOOL, ERR):
            self.error(f"a property must be Bool, but this is {body.ty}", d.body.span)
            return self.bad(e.span)
        return body


def assignable(have: Ty, want: Ty) -> bool:
    if have == want:
        return True
    if want == REAL and (have == NAT or isinstance(have, IndexTy)):
        return True
    if want == NAT and isinstance(have, IndexTy):
        return True
    return isinstance(have, IndexTy) and isinstance(want, IndexTy) and have.k == want.k


def _with_dims(dom: I.Domain, dims: tuple[int, ...]) -> I.Domain:
    """A domain of scalar-bounded boxes given the shape of its annotated variable."""
    if isinstance(dom, I.Box):
        return dataclasses.replace(dom, dims=dims)
    if isinstance(dom, I.Inter):
        return dataclasses.replace(dom, parts=tuple(_with_dims(p, dims) for p in dom.parts))
    return dom


def _domain_words(d: I.Domain) -> str:
    """`a ball of Tensor[1, 8, 8]`: a domain as a user would name it."""
    kind = {I.Ball: "a ball", I.Box: "a box"}.get(type(d), "an intersection")
    return f"{kind} of {tensor(d.shape)}" if d.shape is not None else kind
