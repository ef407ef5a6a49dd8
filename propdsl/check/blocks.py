"""Train and verify blocks: the data source, each setting's value checked against the registry
(`propdsl.registry`: names, keyword types and ranges), and a train block's loss."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from propdsl import ast as A
from propdsl import ir as I
from propdsl import registry
from propdsl.check.base import ErrTy
from propdsl.check.constants import DECIMAL, NOT_CONST, coerce_param
from propdsl.check.results import BlockInfo, OptionValue, show_value
from propdsl.check.scope import (
    FunEntry,
    Names,
    NetEntry,
    Scope,
    ValueEntry,
    keyword_name_span,
    keyword_span,
    network_params,
)
from propdsl.registry import (
    BLOCK_KEYS,
    DEVICES,
    FLOAT32_MAX,
    OPTION_KINDS,
    Kind,
    Kw,
    Method,
)
from propdsl.source import Span
from propdsl.types import BOOL, NAT, REAL, STRING, IndexTy, NetworkTy, TensorTy, Ty, is_scalar

_TYPE_NAMES: dict[str, Ty] = {"Real": REAL, "Nat": NAT, "Bool": BOOL, "String": STRING}


class Blocks(Names):
    """`train` and `verify` blocks."""

    def check_block(self, b: A.Block, scope: Scope) -> None:
        self._top_scope_for_options = scope
        net = scope.lookup(b.name)
        if not isinstance(net, NetEntry):
            if net is None:
                self.unknown_name(b.name, b.name_span, scope)
            else:
                self.error(f"'{b.name}' is not a network", b.name_span)
            return
        data = self.check_data(b, net)
        keys = BLOCK_KEYS[b.kind]
        settings: list[tuple[str, Any]] = []
        seen: dict[str, Span | None] = {}
        for s in b.settings:
            if s.key in seen:
                prev = seen[s.key]
                self.error(
                    f"'{s.key}' is set twice",
                    s.key_span,
                    notes=(f"first set at line {prev.line}",) if prev else (),
                )
                continue
            seen[s.key] = s.key_span
            if s.key not in keys:
                hint = self.did_you_mean(s.key, list(keys))
                self.error(
                    f"unknown {b.kind} setting '{s.key}'",
                    s.key_span,
                    f"did you mean '{hint}'?" if hint else f"settings are {', '.join(keys)}",
                )
                continue
            value = self.setting_value(keys[s.key], s, b, net, scope)
            if value is not None:
                settings.append((s.key, value))
        if b.kind == "train" and "attacks" in seen:
            self.check_term_attacks(b, dict(settings))
        if b.kind == "train" and "adaptive" in seen:
            written = next(s for s in b.settings if s.key == "adaptive")
            self.check_adaptive(written, dict(settings))
        if b.kind == "verify" and "properties" not in seen:
            self.error(
                "a verify block needs 'properties = [...]'",
                keyword_span(b.span, b.kind) or b.name_span,
                "list the properties to check",
            )
        self.blocks.append(BlockInfo(b.kind, b.name, data, tuple(settings), b.span))

    def check_data(self, b: A.Block, net: NetEntry) -> tuple[str, tuple[tuple[str, Any], ...]]:
        src = b.source
        call = src if isinstance(src, A.Call) else None
        name_node = call.func if call else src
        if not isinstance(name_node, A.Name):
            self.error('expected a data source such as digits(split = "train")', src.span)
            return ("", ())
        name = name_node.id
        entry = registry.lookup(Kind.DATA, name)
        if entry is None:
            known = registry.names(Kind.DATA)
            hint = self.did_you_mean(name, known)
            self.error(
                f"unknown data source '{name}'",
                name_node.span,
                f"did you mean '{hint}'?" if hint else f"sources are {', '.join(known)}",
            )
            return (name, ())
        name = entry.name
        kwargs = self.option_kwargs(call, entry.keywords, name) if call else {}
        if kwargs is None:
            return (name, ())
        for key, example in entry.required:
            if key not in kwargs:
                self.error(f"{name}(...) needs {key} = {example}", src.span)
        if entry.shape is not None:
            shape, k = entry.shape
            if net.ty.inp.shape != shape or net.ty.out.shape != (k,):
                want = NetworkTy(TensorTy(shape), TensorTy((k,)))
                self.error(
                    f"data source '{name}' gives Tensor[{', '.join(map(str, shape))}] inputs in "
                    f"{k} classes, but network '{net.name}' is {net.ty}",
                    src.span,
                    f"declare network {net.name} : {want}",
                    notes=(f"'{net.name}' declared at line {net.span.line}",) if net.span else (),
                )
        return (name, tuple(sorted(kwargs.items())))

    def option_kwargs(
        self, call: A.Call, table: Mapping[str, Kw], fname: str
    ) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        if call.args:
            self.error(
                f"'{fname}' takes keyword arguments, as in {fname}(name = value)",
                call.args[0].span,
            )
            return None
        for k in call.keywords:
            if k.name not in table:
                hint = self.did_you_mean(k.name, list(table))
                self.error(
                    f"'{fname}' has no option '{k.name}'",
                    keyword_name_span(k),
                    f"did you mean '{hint}'?"
                    if hint
                    else (
                        f"its options are {', '.join(table)}"
                        if table
                        else f"'{fname}' takes no options"
                    ),
                )
                return None
            v = self.option_literal(k.value, table[k.name], k.name)
            if v is NOT_CONST:
                return None
            out[k.name] = v
        return out

    def option_literal(self, e: A.Expr, want: Kw, key: str) -> Any:
        """The value of an option keyword or block key: its type and range checked."""
        if want.choices:
            value: Any = (
                e.value if isinstance(e, (A.Str,)) else (e.id if isinstance(e, A.Name) else None)
            )
            if value not in want.choices:
                self.error(f"'{key}' must be one of {', '.join(want.choices)}", e.span)
                return NOT_CONST
            return value
        if want.type == "String":
            if not isinstance(e, A.Str):
                self.error(f"'{key}' must be a string in double quotes", e.span)
                return NOT_CONST
            return e.value
        if want.type == "List[Nat]":
            items = e.items if isinstance(e, A.ListExpr) else (e,)
            item = Kw(type="Nat", bounds=want.bounds)
            out = []
            for it in items:
                v = self.option_literal(it, item, key)
                if v is NOT_CONST:
                    return NOT_CONST
                out.append(v)
            return tuple(out)
        if want.type == "Activation":
            name = e.func.id if isinstance(e, A.Call) else (e.id if isinstance(e, A.Name) else "")
            activation = registry.lookup(Kind.ACTIVATION, name) if name else None
            if activation is None:
                self.error(
                    f"unknown activation '{name}'" if name else "expected an activation",
                    e.span,
                    f"activations are {', '.join(registry.names(Kind.ACTIVATION))}",
                )
                return NOT_CONST
            if isinstance(e, A.Call):
                kw = self.option_kwargs(e, activation.keywords, name)
                if kw is None:
                    return NOT_CONST
                return OptionValue(activation.name, tuple(sorted(kw.items())))
            return OptionValue(activation.name)
        if isinstance(e, (A.Str, A.ListExpr)):
            what = "a string" if isinstance(e, A.Str) else "a list"
            self.error(f"'{key}' must be {want.type}, not {what}", e.span)
            return NOT_CONST
        node = self.infer(e, self._top_scope_for_options)
        if isinstance(node.ty, ErrTy):
            return NOT_CONST
        v = self.const(node)
        if v is NOT_CONST:
            self.error(f"'{key}' must be a constant", e.span)
            return NOT_CONST
        return self.in_range(v, want, key, e)

    def in_range(self, v: Any, want: Kw, key: str, e: A.Expr) -> Any:
        """`v`, the value of `e`, converted to the keyword's type and checked against its range
        (the registry's keyword schema), or `NOT_CONST` after a positioned error."""
        c = coerce_param(v, _TYPE_NAMES[want.type])
        if c is None:
            self.error(f"'{key}' must be {want.type}, got {self.as_written(e, v)}", e.span)
            return NOT_CONST
        if want.type in ("Real", "Nat") and not want.allows(c):
            if isinstance(c, float) and not (math.isfinite(c) and abs(c) <= FLOAT32_MAX):
                self.error(
                    f"'{key}' must be a finite number (at most {FLOAT32_MAX:.4g} in size, "
                    f"the float32 range), got {self.as_written(e, v)}",
                    e.span,
                )
            else:
                assert want.bounds is not None
                shown = self.as_written(e, v)
                self.error(f"'{key}' must be {want.bounds.show()}, got {shown}", e.span)
            return NOT_CONST
        return c

    def as_written(self, e: A.Expr, value: Any) -> str:
        """A literal value as the spec writes it (`1e40`, not `1e+40`); else the value."""
        literal = e.operand if isinstance(e, A.Unary) and e.op == "-" else e
        sp = e.span
        if isinstance(literal, A.Num) and sp is not None and sp.line == sp.end_line:
            text = self.source.line(sp.line)[sp.col - 1 : sp.end_col - 1]
            try:  # the text at the span is this very number (not, say, the prelude's)
                if DECIMAL.fullmatch(text) and float(text) == float(value):
                    return text
            except OverflowError:
                pass
        return show_value(value)

    _top_scope_for_options: Scope = Scope()

    def option_value(self, e: A.Expr, kind: Kind, key: str) -> Any:
        """A registered name of `kind` with keywords: an `OptionValue` with the entry's
        canonical name (an alias resolved), or a `Method` for a verify block's method."""
        known = registry.names(kind, trainable_only=True)
        if isinstance(e, A.Name):
            name, call = e.id, None
        elif isinstance(e, A.Call):
            name, call = e.func.id, e
        else:
            self.error(f"'{key}' takes one of {', '.join(known)}", e.span)
            return None
        entry = registry.lookup(kind, name)
        where = e.func.span if isinstance(e, A.Call) else e.span
        if entry is not None and not entry.trainable:
            self.error(
                f"{kind.noun} '{name}' is for evaluation only and cannot train",
                where,
                f"trainable {kind.noun}s: {', '.join(known)}",
            )
            return None
        if entry is None:
            hint = self.did_you_mean(name, known)
            self.error(
                f"unknown {key} '{name}'",
                where,
                f"did you mean '{hint}'?" if hint else f"known: {', '.join(known)}",
            )
            return None
        kwargs = self.option_kwargs(call, entry.keywords, name) if call else {}
        if kwargs is None:
            return None
        if entry.name == "sgd" and kwargs.get("nesterov") and not kwargs.get("momentum", 0.0) > 0:
            # torch's SGD refuses Nesterov momentum without momentum
            assert call is not None
            nesterov = next(k for k in call.keywords if k.name == "nesterov")
            self.error(
                "'nesterov = true' needs a momentum > 0",
                nesterov.span,
                "set momentum, as in sgd(lr = 0.1, momentum = 0.9, nesterov = true)",
            )
            return None
        if kind is Kind.METHOD:
            return Method(entry.name)
        return OptionValue(entry.name, tuple(sorted(kwargs.items())))

    def setting_value(self, kind: Kw, s: A.Setting, b: A.Block, net: NetEntry, scope: Scope) -> Any:
        self._top_scope_for_options = scope
        e = s.value
        if kind.type in OPTION_KINDS:
            return self.option_value(e, OPTION_KINDS[kind.type], s.key)
        if kind.type == "device":
            v = e.value if isinstance(e, A.Str) else (e.id if isinstance(e, A.Name) else None)
            if v is None or not (v in DEVICES or re.fullmatch(r"cuda:[0-9]+", str(v))):
                self.error('device must be auto, cpu, cuda or "cuda:N"', e.span)
                return None
            return v
        if kind.type in ("Nat", "Real"):
            v = self.option_literal(e, kind, s.key)
            return None if v is NOT_CONST else v
        if kind.type == "properties":
            items = e.items if isinstance(e, A.ListExpr) else (e,)
            names = []
            for it in items:
                if not isinstance(it, A.Name):
                    self.error("list property names, as in [robust, stable]", it.span)
                    continue
                if it.id not in self.properties:
                    self.property_name_error(it, scope)
                    continue
                names.append(it.id)
            return tuple(names)
        if kind.type == "loss":
            return self.check_loss(e, b, net, scope)
        if kind.type == "attacks":
            return self.term_attacks(e)
        raise AssertionError(kind)

    def term_attacks(self, e: A.Expr) -> OptionValue | None:
        """`terms(name = attack, ...)`: an attack per term of the loss. The names are checked
        against the loss once the whole block is read (`check_term_attacks`)."""
        if not (isinstance(e, A.Call) and e.func.id == "terms") or e.args:
            self.error(
                "'attacks' takes terms(name = attack, ...)",
                e.span,
                "as in attacks = terms(robust = pgd(steps = 10), z = noise())",
            )
            return None
        out: list[tuple[str, Any]] = []
        spans: dict[str, Span | None] = {}
        for k in e.keywords:  # the parser rejects a keyword given twice
            spans[k.name] = keyword_name_span(k)
            value = self.option_value(k.value, Kind.ATTACK, "attack")
            if value is None:
                return None
            out.append((k.name, value))
        self._term_attack_spans = spans
        return OptionValue("terms", tuple(out))

    def check_term_attacks(self, b: A.Block, settings: dict[str, Any]) -> None:
        """Every name of `attacks = terms(...)` names a term of the loss: a property named in
        it, or a variable bound by a `max` / `min` / `forall` / `exists` over a region in it
        (not inside a property: a property's quantifiers follow the property's attack)."""
        attacks, loss = settings.get("attacks"), settings.get("loss")
        if attacks is None:
            return
        spans = self._term_attack_spans
        if loss is None:
            span = next(iter(spans.values()), None) or b.name_span
            self.error("'attacks' names terms of the loss, but the block has no valid 'loss'", span)
            return
        names = loss_term_names(loss)
        for name, _ in attacks.kwargs:
            if name in names:
                continue
            hint = self.did_you_mean(name, sorted(names))
            self.error(
                f"'{name}' is not a term of the loss",
                spans.get(name),
                f"did you mean '{hint}'?"
                if hint
                else (
                    f"terms: {', '.join(sorted(names))}"
                    if names
                    else "the loss has no property and no quantifier over a region"
                ),
            )

    _term_attack_spans: dict[str, Span | None] = {}

    def check_adaptive(self, written: A.Setting, settings: dict[str, Any]) -> None:
        """`adaptive = woods_psi(weight = "psi", ...)` sets a Real param that the loss uses."""
        value, loss = settings.get("adaptive"), settings.get("loss")
        if value is None:
            return
        span = written.value.span
        name = value.kw().get("weight")
        if name is None:
            self.error(f'{value.name}(...) needs weight = "NAME", the param it sets', span)
            return
        entry = self.params.get(name)
        if entry is None or entry[0] != REAL:
            reals = sorted(n for n, (ty, _) in self.params.items() if ty == REAL)
            self.error(
                f"'adaptive' sets param '{name}', but the spec has no Real param of that name",
                span,
                f"Real params: {', '.join(reals)}" if reals else "declare param NAME : Real = ...",
            )
            return
        if loss is not None and not any(
            isinstance(n, I.ParamRef) and n.name == name for n in I.walk(loss)
        ):
            self.error(f"'adaptive' sets param '{name}', which the loss does not use", span)

    def property_name_error(self, it: A.Name, scope: Scope) -> None:
        entry = scope.lookup(it.id)
        if isinstance(entry, FunEntry) and isinstance(entry.decl, A.PropertyDecl):
            # A template (its own or the prelude's): it needs more than one data sample (x, y).
            params = ", ".join(p.name for p in entry.decl.params)
            if not params:
                self.error(
                    f"'{it.id}' has no parameters; a property is about one sample (x) or (x, y)",
                    it.span,
                )
                return
            nets = network_params(entry.decl)
            if len(entry.decl.params) <= 2 and nets:
                self.error(
                    f"'{it.id}' uses its parameter '{nets[0]}' as a network, so it is a template, "
                    "not a property of one sample (x, y)",
                    it.span,
                    "apply the network itself in the property's body",
                )
                return
            if len(entry.decl.params) == 4 and not nets:
                self.error(
                    f"'{it.id}' takes four samples ({params}) but names no partner source, so "
                    "it is a template, not a property of a sample or of a pair",
                    it.span,
                    f"say how its partner is drawn: property {it.id}({params}) partner "
                    "other_class = ... (or class_mean, prototype(k = 150))",
                )
                return
            self.error(
                f"'{it.id}' is a template of ({params}), not a property of one sample (x, y)",
                it.span,
                f"wrap it: property robust(x, y) = {it.id}({params})",
            )
            return
        hint = self.did_you_mean(it.id, list(self.properties))
        self.error(
            f"unknown property '{it.id}'",
            it.span,
            f"did you mean '{hint}'?"
            if hint
            else (f"properties are {', '.join(self.properties)}" if self.properties else None),
        )

    def check_loss(self, e: A.Expr, b: A.Block, net: NetEntry, scope: Scope) -> I.Node | None:
        """The train block's objective: a Real expression per sample over (x, y)."""
        inner = scope.child()
        x = I.Var("x", net.ty.inp)
        y = I.Var("y", IndexTy(net.ty.out.shape[0], True))
        for v in (x, y):
            # In a loss, x and y always name the current sample (documented).
            inner.names[v.name] = ValueEntry(v, None)
        loss_scope = _LossScope(self, inner, net, x, y)
        node = loss_scope.infer(e)
        if isinstance(node.ty, ErrTy):
            return None
        if not is_scalar(node.ty) or node.ty == BOOL:
            self.error(
                f"a loss must be a Real number, but this is {node.ty}",
                e.span,
                "state the condition as a property and put its name in the loss "
                "(the block's logic turns it into a loss)"
                if node.ty == BOOL
                else "reduce it to a number, for example with mean(...)",
            )
            return None
        return node


def loss_term_names(loss: I.Node) -> set[str]:
    """The names `attacks = terms(...)` may give an attack: the properties named in the loss,
    and the variables its own quantifiers over regions bind."""
    names: set[str] = set()
    for n in I.walk(loss):
        if isinstance(n, I.PropTerm):
            names.add(n.name)
        elif isinstance(n, I.Quant):
            names.update(
                v.name for v, d in zip(n.vars, n.domains, strict=True) if not isinstance(d, I.Range)
            )
    return names


class _LossScope:
    """Checks a loss expression: properties and `cross_entropy` may appear as bare terms."""

    def __init__(self, checker: Blocks, scope: Scope, net: NetEntry, x: I.Var, y: I.Var):
        self.c = checker
        self.scope = scope
        self.net = net
        self.x, self.y = x, y

    def infer(self, e: A.Expr) -> I.Node:
        # the loss's own levels count towards the nesting limit, as in `Checker.infer`
        self.c.enter(e.span)
        try:
            return self._infer(e)
        finally:
            self.c.leave()

    def _infer(self, e: A.Expr) -> I.Node:
        c = self.c
        if isinstance(e, A.Name):
            if e.id == "cross_entropy":
                logits = I.Apply(self.net.name, self.x, self.net.ty.out, span=e.span)
                return I.Fn("cross_entropy", (logits, self.y), REAL, span=e.span)
            if e.id in c.properties:
                info = c.properties[e.id]
                if info.network not in (None, self.net.name):
                    c.error(f"property '{e.id}' is about network '{info.network}'", e.span)
                    return c.bad(e.span)
                return I.PropTerm(e.id, span=e.span)
            entry = self.scope.lookup(e.id)
            if isinstance(entry, FunEntry) and isinstance(entry.decl, A.PropertyDecl):
                c.property_name_error(e, self.scope)
                return c.bad(e.span)
        if isinstance(e, A.Call) and e.func.id == "certified":
            return self.certified(e)
        if isinstance(e, A.Binary) and e.op in A.ARITH_OPS:
            left, right = self.infer(e.left), self.infer(e.right)
            if isinstance(left.ty, ErrTy) or isinstance(right.ty, ErrTy):
                return c.bad(e.span)
            return c.arith(e.op, left, right, e)
        if isinstance(e, A.Unary) and e.op == "-":
            x = self.infer(e.operand)
            return x if isinstance(x.ty, ErrTy) else I.Neg(x, span=e.span)
        return c.infer(e, self.scope)

    def certified(self, e: A.Call) -> I.Node:
        c = self.c
        if len(e.args) != 1 or not isinstance(e.args[0], A.Name):
            c.error("certified takes one property name, as in certified(robust)", e.span)
            return c.bad(e.span)
        name = e.args[0]
        if name.id not in c.properties:
            c.property_name_error(name, self.scope)
            return c.bad(e.span)
        if c.properties[name.id].partner is not None:
            c.error(
                f"certified training bounds a property of one sample; '{name.id}' is a "
                "property of a pair",
                name.span,
                f"name it as a loss term instead: loss = ... + {name.id}",
            )
            return c.bad(e.span)
        method = "ibp"
        for k in e.keywords:
            if k.name != "method":
                c.error(
                    f"'certified' has no option '{k.name}'",
                    keyword_name_span(k),
                    "its option is method",
                )
                return c.bad(e.span)
            v = k.value.id if isinstance(k.value, A.Name) else None
            certified = [m.name for m in registry.entries(Kind.METHOD) if m.certified]
            if v not in certified:
                c.error(
                    "unknown certified training method" + (f" '{v}'" if v is not None else ""),
                    k.value.span,
                    f"methods are {', '.join(certified)}",
                )
                return c.bad(e.span)
            method = v
        return I.Fn("certified", (), REAL, (("property", name.id), ("method", method)), span=e.span)
