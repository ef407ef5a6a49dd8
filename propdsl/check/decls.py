"""Declarations: networks, params, lets and properties, in the order of the spec.

Let functions and property templates are not checked where they are declared (only their names
are resolved there): they are inlined at their call sites and checked there with the argument
types (`propdsl.check.expr`), so they are shape-polymorphic.
"""

from __future__ import annotations

import functools
from typing import Any

from propdsl import ast as A
from propdsl import ir as I
from propdsl.builtins import EXPLAINERS, RANDOM, RESERVED
from propdsl.check.base import ERR, ErrTy
from propdsl.check.constants import NOT_CONST, coerce_param, override_hint
from propdsl.check.results import Checked, PropertyInfo, show_value
from propdsl.check.scope import (
    FunEntry,
    Names,
    NetEntry,
    ParamEntry,
    Scope,
    ValueEntry,
    decl_kind,
    entry_span,
    visible_networks,
    walk_ast,
)
from propdsl.registry import Kind
from propdsl.types import BOOL, NAT, REAL, IndexTy, NetworkTy, Scalar, TensorTy, Ty, tensor


class Declarations(Names):
    """The spec's declarations, one at a time, each under its own work budget."""

    def check_module(self, module: A.Module, prelude: Scope | None) -> Checked:
        top = Scope({}, prelude)
        for d in module.decls:
            if not isinstance(d, A.Block):
                self.all_top.setdefault(d.name, getattr(d, "name_span", None))
        for d in module.decls:
            if isinstance(d, A.Block):
                if self.within_limits(functools.partial(self.check_block, d, top)) == "fatal":
                    break
                continue
            prev = top.names.get(d.name)
            if prev is not None:
                first = entry_span(prev)
                self.error(
                    f"'{d.name}' is declared twice",
                    d.name_span,
                    notes=(f"first declared at line {first.line}",) if first else (),
                )
                continue
            if d.name in RESERVED:
                self.error(
                    f"'{d.name}' is a built-in and cannot be redeclared",
                    d.name_span,
                    "choose another name",
                )
                self.failed[d.name] = decl_kind(d)
                continue
            reported = len(self.diags)
            self._declaring = d.name
            try:
                entry = self.within_limits(functools.partial(self.check_decl, d, top))
            finally:
                self._declaring = None
            if entry == "fatal":
                self.failed[d.name] = decl_kind(d)
                break
            if entry == "limit":
                self.failed[d.name] = decl_kind(d)
                continue
            if isinstance(entry, FunEntry) and len(self.diags) > reported:
                entry.broken = True
            if entry is not None:
                top.names[d.name] = entry
            else:
                self.failed[d.name] = decl_kind(d)
        declared = {d.name for d in module.decls if isinstance(d, A.ParamDecl)}
        for name in self.overrides:
            if name not in declared:
                known = sorted(declared)
                hint = self.did_you_mean(str(name), known)
                msg = f"unknown parameter '{name}' in an override"
                self.error(
                    msg,
                    None,
                    f"did you mean '{hint}'?" if hint else f"known parameters: {', '.join(known)}",
                )
        return Checked(
            self.networks,
            self.params,
            self.properties,
            tuple(self.templates),
            tuple(self.blocks),
            self.network_spans,
        )

    def check_decl(self, d: A.Decl, scope: Scope) -> Any:
        if isinstance(d, A.NetworkDecl):
            ty = self.network_type(d.type, scope)
            if ty is None:
                return None
            self.networks[d.name] = ty
            self.network_spans[d.name] = d.name_span
            return NetEntry(d.name, ty, d.name_span)
        if isinstance(d, A.ParamDecl):
            return self.check_param(d, scope)
        if isinstance(d, A.LetDecl):
            if d.params is None:
                node = self.infer(d.body, scope)
                return ValueEntry(node, d.name_span)
            self.check_params_fresh(d.params, scope)
            self.resolve_names(d.body, scope, {p.name for p in d.params})
            return FunEntry(d, scope)
        if isinstance(d, A.PropertyDecl):
            return self.check_property(d, scope)
        raise TypeError(type(d).__name__)

    # -- types -----------------------------------------------------------------------------------
    def network_type(self, t: A.ArrowType, scope: Scope) -> NetworkTy | None:
        dom = self.type_expr(t.domain, scope)
        cod = self.type_expr(t.codomain, scope)
        ok = True
        for part, ty in ((t.domain, dom), (t.codomain, cod)):
            if not isinstance(ty, (TensorTy, ErrTy)):
                self.error(
                    f"a network maps tensors to tensors, not {ty}",
                    part.span,
                    "write for example Tensor[1, 8, 8] -> Tensor[10]",
                )
                ok = False
        if not ok or isinstance(dom, ErrTy) or isinstance(cod, ErrTy):
            return None
        assert isinstance(dom, TensorTy) and isinstance(cod, TensorTy)
        if len(cod.shape) != 1:
            self.error(
                f"a network's output must be a vector Tensor[K], not {cod}",
                t.codomain.span,
            )
            return None
        return NetworkTy(dom, cod)

    def type_expr(self, t: A.TypeExpr, scope: Scope) -> Ty:
        dims: list[int] = []
        for d in t.dims or ():
            v = self.const_value(d, scope, "a dimension")
            if v is None:
                return ERR
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                return self.error(f"a dimension must be a positive integer, got {v}", d.span)
            dims.append(v)
        name = t.name
        if name in ("Real", "Bool", "Nat"):
            if t.dims is not None:
                return self.error(f"{name} takes no dimensions", t.span)
            return Scalar(name)
        if name in ("Index", "Label"):
            if len(dims) != 1:
                return self.error(f"{name} takes one dimension, as in {name}[10]", t.span)
            return IndexTy(dims[0], name == "Label")
        if name == "Tensor":
            if t.dims is None:
                return self.error("Tensor needs its dimensions, as in Tensor[1, 8, 8]", t.span)
            return tensor(tuple(dims))
        known = ["Real", "Bool", "Nat", "Index", "Label", "Tensor"]
        hint = self.did_you_mean(name, known)
        return self.error(
            f"unknown type '{name}'",
            t.span,
            f"did you mean '{hint}'?" if hint else f"types are {', '.join(known)}",
        )

    # -- params ----------------------------------------------------------------------------------
    def check_param(self, d: A.ParamDecl, scope: Scope) -> Any:
        ty = self.type_expr(d.type, scope)
        if isinstance(ty, ErrTy):
            return None
        if ty not in (REAL, NAT, BOOL):
            self.error(f"a param must be Real, Nat or Bool, not {ty}", d.type.span)
            return None
        if d.name in self.overrides:
            raw = self.overrides[d.name]
            value = coerce_param(raw, ty)
            if value is None:
                shown = repr(raw) if len(repr(raw)) <= 40 else repr(raw)[:37] + "..."
                where = f"declared at line {d.name_span.line}" if d.name_span else ""
                why = override_hint(raw, ty)
                self.error(
                    f"parameter '{d.name}' is {ty}, but the override gives {shown}",
                    None,
                    f"{why} ({where})" if why and where else (why or where or None),
                )
                value = self.param_default(d, ty, scope)
                if value is None:
                    return None
        else:
            value = self.param_default(d, ty, scope)
            if value is None:
                return None
        self.params[d.name] = (ty, value)
        return ParamEntry(d.name, ty, value, d.name_span)

    def param_default(self, d: A.ParamDecl, ty: Ty, scope: Scope) -> Any:
        v = self.const_value(d.default, scope, "a param's default")
        if v is None:
            return None
        value = coerce_param(v, ty)
        if value is None:
            self.error(
                f"the default of '{d.name}' must be {ty}, got {show_value(v)}",
                d.default.span,
            )
            return None
        return value

    def const_value(self, e: A.Expr, scope: Scope, what: str) -> Any:
        """Evaluate a constant expression (numbers, params, arithmetic) at check time."""
        node = self.infer(e, scope)
        if isinstance(node.ty, ErrTy):
            return None
        value = self.const(node)
        if value is NOT_CONST:
            self.error(f"{what} must be a constant", e.span)
            return None
        return value

    # -- properties ------------------------------------------------------------------------------
    def check_property(self, d: A.PropertyDecl, scope: Scope) -> Any:
        self.check_params_fresh(d.params, scope)
        entry = FunEntry(d, scope)
        partner = None
        if d.partner is not None:
            partner = self.check_partner(d)
        if d.partner is None and self.is_template(d, scope):
            self.templates.append(d.name)
            self.resolve_names(d.body, scope, {p.name for p in d.params})
            return entry
        net = self.property_network(d, scope)
        inner = scope.child()
        params: list[tuple[str, Ty]] = []
        for i, p in enumerate(d.params):
            ty: Ty = ERR
            if p.annotation is not None:
                ty = self.type_expr(p.annotation, scope)
            if i in (0, 2) and net is not None:
                expect = self.networks[net].inp
                if p.annotation is None:
                    ty = expect
                elif not isinstance(ty, ErrTy) and ty != expect:
                    self.error(
                        f"'{p.name}' is bound to {net}'s inputs, {expect}, but is annotated {ty}",
                        p.annotation.span,
                    )
                    ty = expect
            if i in (1, 3) and net is not None:
                k = self.networks[net].out.shape[0]
                label = IndexTy(k, True)
                if p.annotation is None:
                    ty = label
                elif not isinstance(ty, ErrTy) and (not isinstance(ty, IndexTy) or ty.k != k):
                    self.error(
                        f"'{p.name}' is a label of {net}'s {k} classes, but is annotated {ty}",
                        p.annotation.span,
                        f"annotate it Label[{k}] or leave the annotation out",
                    )
                    ty = label
            if ty is ERR and p.annotation is None and "network" not in self.failed.values():
                several = len(visible_networks(self.networks, scope)) > 1
                self.error(
                    f"cannot type parameter '{p.name}': "
                    + (
                        f"property '{d.name}' applies none of the networks"
                        if several
                        else "no network is declared before it"
                    ),
                    p.span,
                    "annotate the parameter"
                    if several
                    else "declare a network first or annotate the parameter",
                )
            if p.name in inner.names:
                continue  # a repeated parameter, reported by check_params_fresh
            inner.names[p.name] = ValueEntry(I.Var(p.name, ty, span=p.span), p.span)
            params.append((p.name, ty))
        body = self.infer(d.body, inner)
        if not isinstance(body.ty, ErrTy) and body.ty != BOOL:
            self.error(f"a property must be Bool, but this is {body.ty}", d.body.span)
        drawn = next((n for n in I.walk(body) if isinstance(n, I.Fn) and n.fn in RANDOM), None)
        if drawn is not None:
            # A property is a statement to prove or refute; a random draw would make its
            # verdict a coin toss (and `verified` meaningless).
            self.error(
                f"property '{d.name}' uses '{drawn.fn}', a random draw",
                drawn.span or d.body.span,
                "random built-ins belong in a train block's loss",
            )
        self.properties[d.name] = PropertyInfo(
            d.name, tuple(params), net, body, d.span, partner=partner
        )
        return entry

    def check_partner(self, d: A.PropertyDecl) -> Any:
        """The partner source of a property of a pair `p(x, y, xt, yt) partner SOURCE`: an
        `OptionValue` of `registry.Kind.PARTNER`, or None after an error."""
        assert d.partner is not None
        if len(d.params) != 4:
            span = d.params[0].span if d.params else d.name_span
            self.error(
                f"a property with a partner takes four parameters (x, y, xt, yt), but "
                f"'{d.name}' has {len(d.params)}",
                span,
                f"write property {d.name}(x, y, xt, yt) partner ...",
            )
        names = {p.name for p in d.params}
        for node in walk_ast(d.body):
            if isinstance(node, A.Call) and node.func.id in names:
                self.error(
                    f"'{node.func.id}' is applied as a network, but a property with a partner "
                    "takes samples (x, y, xt, yt)",
                    node.func.span,
                )
                break
        return self.option_value(d.partner, Kind.PARTNER, "partner")

    def is_template(self, d: A.PropertyDecl, scope: Scope) -> bool:
        if len(d.params) > 2 or len(d.params) == 0:
            return True
        names = {p.name for p in d.params}
        for node in walk_ast(d.body):
            if isinstance(node, A.Call):
                if node.func.id in names:
                    return True
                if node.func.id in EXPLAINERS and node.args:
                    a0 = node.args[0]
                    if isinstance(a0, A.Name) and a0.id in names:
                        return True
        return False

    def property_network(self, d: A.PropertyDecl, scope: Scope) -> str | None:
        visible = visible_networks(self.networks, scope)
        if len(visible) == 1:
            return visible[0]
        for node in walk_ast(d.body):
            if isinstance(node, A.Call) and node.func.id in visible:
                return node.func.id
            # a network passed to a template or an explanation: f in robust(f, x, y)
            if isinstance(node, A.Name) and node.id in visible:
                return node.id
        return None
