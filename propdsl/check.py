"""Names, types and shapes: AST -> typed IR, with every diagnostic collected.

Scoping (documented in docs/language.md): top-level names are visible after their declaration only;
the prelude is an outer scope that top-level declarations may shadow; a parameter or a quantified
variable may not reuse a name that is already visible (no shadowing inside a declaration).
Let functions and property templates are inlined at their call sites and checked there with the
argument types, so they are shape-polymorphic.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any

from propdsl import ast as A
from propdsl import ir as I
from propdsl import options as O
from propdsl.errors import CheckError
from propdsl.source import Diagnostic, Source, Span, suggest
from propdsl.types import (
    BOOL,
    NAT,
    REAL,
    STRING,
    DomainTy,
    FiniteTy,
    IndexTy,
    ListTy,
    NetworkTy,
    OptionTy,
    Scalar,
    TensorTy,
    Ty,
    broadcast,
    is_numeric,
    is_scalar,
    shape_of,
    tensor,
)

# Only the first errors are shown (errors.MAX_REPORTED); this bounds the work on hopeless input.
MAX_DIAGNOSTICS = 1000
# Did-you-mean hints are computed for the first errors only: each compares a name with every
# visible one, so a hint for each of thousands of errors would be quadratic work.
MAX_HINTS = 50

# Limits on what a spec can make the checker and the backends do (docs/language.md, "Limits").
# Let constants, functions, templates and the prelude are inlined at every use, so a few lines
# of doubling definitions (`let a2 = a1 + a1`) would expand to an exponential formula.
# Expression nodes of one declaration (property, let, param, block) once everything is inlined;
# each use of a let constant or of a function's argument counts its whole size.
MAX_EXPANDED = 10_000
# ... and of the whole spec.
MAX_SPEC_EXPANDED = 100_000
# Levels of nesting of one expression, inlined definitions included. Every pass over the AST and
# the IR (this checker, the simplifier, the printers, the loss compiler, the verifier's query
# builder) recurses a few Python frames per level: at this depth they all stay far below
# Python's recursion limit (1000 frames).
MAX_NESTING = 120
# range(K): K values; nested finite quantifiers (range(K) and classes): the product of their
# sizes. The backends enumerate every combination for every sample of a batch. `classes` alone
# is exempt: it is the network's own output size.
MAX_RANGE = 10_000
MAX_FINITE = 10_000
# Quantifiers over balls and boxes nested in one another: each is solved by an attack that runs
# the attack of the one inside at every step, so the work is (steps + 1) ** nesting.
MAX_ATTACK_NESTING = 3
# Elements of a variable over a box with scalar bounds, whose shape comes from its annotation
# alone (any other domain has the shape of a tensor that exists: an input, an output): the
# backends hold a batch of such points.
MAX_BOX_ELEMENTS = 2**20


class _ErrTy(Ty):
    def show(self) -> str:
        return "<error>"


ERR = _ErrTy()

EXPLAINERS = ("saliency", "gradient_x_input", "integrated_gradients", "smoothgrad")
ELEMENTWISE = ("abs", "exp", "log", "sqrt", "sigmoid", "tanh", "relu")
VECTOR_MAPS = ("softmax", "log_softmax")
REDUCTIONS = ("sum", "mean")
PAIR_SCALARS = ("dot", "cosine", "pearson", "mse", "kl")
BUILTIN_FUNCTIONS = frozenset(
    (
        *ELEMENTWISE,
        *VECTOR_MAPS,
        *REDUCTIONS,
        *PAIR_SCALARS,
        *EXPLAINERS,
        "norm",
        "max",
        "min",
        "argmax",
        "argmin",
        "clamp",
        "cross_entropy",
        "grad",
        "topk_overlap",
        "ball",
        "box",
        "range",
    )
)
BUILTIN_NAMES = frozenset(("classes",))


# -- scope entries -------------------------------------------------------------------------------
@dataclass
class NetEntry:
    name: str
    ty: NetworkTy
    span: Span | None


@dataclass
class ParamEntry:
    name: str
    ty: Ty
    value: Any
    span: Span | None


@dataclass
class ValueEntry:
    """A name bound to a typed IR value (let constants, inlined arguments, variables)."""

    node: I.Node
    span: Span | None


@dataclass
class FunEntry:
    decl: A.LetDecl | A.PropertyDecl
    scope: Scope
    # Errors were reported in the declaration itself: its expansions stay quiet.
    broken: bool = False


@dataclass
class Scope:
    names: dict[str, Any] = field(default_factory=dict)
    parent: Scope | None = None

    def lookup(self, name: str) -> Any:
        s: Scope | None = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        return None

    def child(self) -> Scope:
        return Scope({}, self)

    def visible(self) -> set[str]:
        out: set[str] = set()
        s: Scope | None = self
        while s is not None:
            out |= set(s.names)
            s = s.parent
        return out

    def own_var_names(self) -> set[str]:
        """Names of the IR variables in this scope's own value bindings.

        Cached and extended as bindings are added (they are never replaced), so that a spec
        with many lets and quantifiers costs linear work, not a walk of every let per binder.
        """
        cache = self.__dict__.setdefault("_var_cache", [0, set()])
        if cache[0] != len(self.names):
            for entry in itertools.islice(self.names.values(), cache[0], None):
                if isinstance(entry, ValueEntry):
                    cache[1].update(
                        n.name for n in I.walk_unique(entry.node) if isinstance(n, I.Var)
                    )
            cache[0] = len(self.names)
        return cache[1]


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PropertyInfo:
    """A closed property: parameters bound to one data sample, body as typed IR."""

    name: str
    params: tuple[tuple[str, Ty], ...]
    network: str | None
    body: I.Node
    span: Span | None = field(default=None, compare=False)


@dataclass(frozen=True)
class BlockInfo:
    """A checked `train` or `verify` block: settings as typed values."""

    kind: str
    network: str
    data: tuple[str, tuple[tuple[str, Any], ...]]
    settings: tuple[tuple[str, Any], ...]
    span: Span | None = field(default=None, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.settings).get(key, default)


@dataclass(frozen=True)
class OptionValue:
    """`adam(lr = 1e-3)` or `dl2`: a name from an option table with constant keyword values."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def kw(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def show(self) -> str:
        if not self.kwargs:
            return self.name
        return f"{self.name}({', '.join(f'{k} = {_show_value(v)}' for k, v in self.kwargs)})"


def _show_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_show_value(x) for x in v) + "]"
    if isinstance(v, OptionValue):
        return v.show()
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v)


@dataclass(frozen=True)
class Checked:
    networks: dict[str, NetworkTy]
    params: dict[str, tuple[Ty, Any]]
    properties: dict[str, PropertyInfo]
    templates: tuple[str, ...]
    blocks: tuple[BlockInfo, ...]
    network_spans: dict[str, Span | None] = field(default_factory=dict, compare=False)


# -- the checker --------------------------------------------------------------------------------
class Checker:
    def __init__(self, source: Source, overrides: dict[str, Any] | None = None):
        self.source = source
        self.overrides = dict(overrides or {})
        self.diags: list[Diagnostic] = []
        self.all_top: dict[str, Span | None] = {}
        self.networks: dict[str, NetworkTy] = {}
        self.network_spans: dict[str, Span | None] = {}
        self.params: dict[str, tuple[Ty, Any]] = {}
        self.properties: dict[str, PropertyInfo] = {}
        self.templates: list[str] = []
        self.blocks: list[BlockInfo] = []
        self._fresh = 0
        self._expanding: list[str] = []
        # Top-level declarations that were rejected (name -> "network", "param", ...): their
        # uses are not reported again, which would only repeat the first error.
        self.failed: dict[str, str] = {}
        self._declaring: str | None = None  # the top-level declaration being checked
        # The work limits (see MAX_EXPANDED and the others above).
        self._expanding_entries: list[FunEntry] = []
        self._spent = 0  # expanded nodes of the current declaration
        self._spent_total = 0  # ... of the whole spec
        self._nesting = 0  # levels of the expression being checked, inlined definitions included
        self._finite = 1  # combinations of the finite quantifiers around it
        self._attacks = 0  # quantifiers over balls and boxes around it
        self._measured: dict[int, tuple[I.Node, int, int, int, int]] = {}
        self._consts: dict[int, tuple[I.Node, Any]] = {}
        self._hints = 0
        self._quiet: set[int] = set()  # FunEntry ids whose expansion crossed a limit

    # -- diagnostics -----------------------------------------------------------------------------
    def error(self, message: str, span: Span | None, hint: str | None = None, notes=()) -> Ty:
        if len(self.diags) < MAX_DIAGNOSTICS:
            self.diags.append(Diagnostic(message, span, hint, notes=tuple(notes) + self.context()))
        return ERR

    def context(self) -> tuple[str, ...]:
        """Notes naming the definitions being expanded, innermost first (a long chain cut)."""
        names = [f"while expanding '{name}'" for name in reversed(self._expanding)]
        if len(names) > 6:
            names = [*names[:3], f"... {len(names) - 5} more expansions", *names[-2:]]
        return tuple(names)

    def did_you_mean(self, name: str, candidates: Any) -> str | None:
        """A close candidate for `name` (see `suggest`), for the first `MAX_HINTS` errors only.

        `candidates` may be a function, called only when a hint is still computed.
        """
        if self._hints >= MAX_HINTS or len(self.diags) >= MAX_DIAGNOSTICS:
            return None
        self._hints += 1
        return suggest(name, candidates() if callable(candidates) else candidates)

    # -- limits ----------------------------------------------------------------------------------
    def enter(self, span: Span | None) -> None:
        """One more level of an expression being checked (undone by `leave`)."""
        self._nesting += 1
        if self._nesting > MAX_NESTING:
            self.too_deep(span)
        self.spend(1, span)

    def leave(self) -> None:
        self._nesting -= 1

    def too_deep(self, span: Span | None) -> None:
        raise self.limit(
            f"this expression is nested too deeply: more than {MAX_NESTING} levels once lets, "
            "functions and templates are inlined",
            span,
            "a chain of definitions that each use the previous one nests one level per link; "
            "shorten the chain",
        )

    def spend(self, nodes: int, span: Span | None) -> None:
        """Count `nodes` more expression nodes of the current declaration and of the spec."""
        self._spent += nodes
        self._spent_total += nodes
        if self._spent_total > MAX_SPEC_EXPANDED:
            raise self.limit(
                f"the spec is too large: more than {MAX_SPEC_EXPANDED:,} expression nodes in "
                "all once lets, functions and templates are inlined",
                span,
                "each use of a let or a function copies its definition",
                fatal=True,
            )
        if self._spent > MAX_EXPANDED:
            raise self.limit(
                f"this declaration is too large: more than {MAX_EXPANDED:,} expression nodes "
                "once lets, functions and templates are inlined",
                span,
                "each use of a let or a function copies its definition, so definitions that "
                "each use the previous one twice grow exponentially",
            )

    def limit(self, message: str, span: Span | None, hint: str, fatal: bool = False) -> _Limit:
        notes = self.context()
        if notes and self._declaring:
            # the chain of expansions began in this declaration
            notes += (f"while checking '{self._declaring}'",)
        diagnostic = Diagnostic(message, span, hint, notes=notes)
        return _Limit(diagnostic, tuple(self._expanding_entries), fatal)

    def measure(self, node: I.Node) -> tuple[int, int, int, int]:
        """(tree size, depth, finite combinations, attack nesting) of an IR node, memoised per
        node object, so that a let constant shared many times over is measured once (work
        linear in the DAG, not in the tree)."""
        memo = self._measured
        found = memo.get(id(node))
        if found is not None:
            return found[1:]
        stack: list[tuple[I.Node, bool]] = [(node, False)]
        while stack:
            n, ready = stack.pop()
            if id(n) in memo:
                continue
            kids = n.children()
            if not ready:
                stack.append((n, True))
                stack.extend((c, False) for c in kids if id(c) not in memo)
                continue
            size, depth, finite, attacks = 1, 0, 1, 0
            for c in kids:
                _, cs, cd, cf, ca = memo[id(c)]
                size, depth = size + cs, max(depth, cd)
                finite, attacks = max(finite, cf), max(attacks, ca)
            if isinstance(n, I.Quant):
                finite *= _finite_combinations(n.domains)
                attacks += _is_attacked(n.domains)
            memo[id(n)] = (n, size, depth + 1, finite, attacks)
        return memo[id(node)][1:]

    def const(self, node: I.Node) -> Any:
        """`eval_const` memoised per node object (a constant is evaluated once, not once per
        enclosing expression)."""
        return eval_const(node, self.params, self._consts)

    # -- modules ---------------------------------------------------------------------------------
    def check_module(self, module: A.Module, prelude: Scope | None) -> Checked:
        top = Scope({}, prelude)
        for d in module.decls:
            if not isinstance(d, A.Block):
                self.all_top.setdefault(d.name, getattr(d, "name_span", None))
        for d in module.decls:
            if isinstance(d, A.Block):
                if self.within_limits(lambda d=d: self.check_block(d, top)) == "fatal":
                    break
                continue
            prev = top.names.get(d.name)
            if prev is not None:
                first = _entry_span(prev)
                self.error(
                    f"'{d.name}' is declared twice",
                    d.name_span,
                    notes=(f"first declared at line {first.line}",) if first else (),
                )
                continue
            if d.name in BUILTIN_FUNCTIONS or d.name in BUILTIN_NAMES:
                self.error(
                    f"'{d.name}' is a built-in and cannot be redeclared",
                    d.name_span,
                    "choose another name",
                )
                self.failed[d.name] = _decl_kind(d)
                continue
            reported = len(self.diags)
            self._declaring = d.name
            try:
                entry = self.within_limits(lambda d=d: self.check_decl(d, top))
            finally:
                self._declaring = None
            if entry == "fatal":
                self.failed[d.name] = _decl_kind(d)
                break
            if entry == "limit":
                self.failed[d.name] = _decl_kind(d)
                continue
            if isinstance(entry, FunEntry) and len(self.diags) > reported:
                entry.broken = True
            if entry is not None:
                top.names[d.name] = entry
            else:
                self.failed[d.name] = _decl_kind(d)
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

    def within_limits(self, check: Any) -> Any:
        """`check()` for one declaration, under its own expansion budget. A crossed limit is
        reported and abandons the declaration: "limit" (or "fatal" for the whole spec's limit,
        after which nothing more is checked) is returned instead of the result."""
        self._spent = 0
        try:
            return check()
        except _Limit as limit:
            if len(self.diags) < MAX_DIAGNOSTICS:
                self.diags.append(limit.diagnostic)
            # Its other uses stay quiet: the first report is enough and each would cost the
            # budget again. Marked here, not on the entries: the prelude's are shared by every
            # spec loaded in the process.
            self._quiet.update(id(entry) for entry in limit.entries)
            return "fatal" if limit.fatal else "limit"

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
            if not isinstance(ty, (TensorTy, _ErrTy)):
                self.error(
                    f"a network maps tensors to tensors, not {ty}",
                    part.span,
                    "write for example Tensor[1, 8, 8] -> Tensor[10]",
                )
                ok = False
        if not ok or isinstance(dom, _ErrTy) or isinstance(cod, _ErrTy):
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
        if isinstance(ty, _ErrTy):
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
                why = _override_hint(raw, ty)
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
        if True:
            v = self.const_value(d.default, scope, "a param's default")
            if v is None:
                return None
            value = coerce_param(v, ty)
            if value is None:
                self.error(
                    f"the default of '{d.name}' must be {ty}, got {_show_value(v)}",
                    d.default.span,
                )
                return None
            return value

    def const_value(self, e: A.Expr, scope: Scope, what: str) -> Any:
        """Evaluate a constant expression (numbers, params, arithmetic) at check time."""
        node = self.infer(e, scope)
        if isinstance(node.ty, _ErrTy):
            return None
        value = self.const(node)
        if value is _NOT_CONST:
            self.error(f"{what} must be a constant", e.span)
            return None
        return value

    # -- properties ------------------------------------------------------------------------------
    def check_params_fresh(self, params: tuple[A.Param, ...], scope: Scope) -> None:
        seen: set[str] = set()
        for p in params:
            if p.name in seen:
                self.error(f"parameter '{p.name}' appears twice", p.span)
            seen.add(p.name)
            self.check_fresh(p.name, p.span, scope)

    def check_fresh(self, name: str, span: Span | None, scope: Scope) -> None:
        if name in BUILTIN_FUNCTIONS or name in BUILTIN_NAMES:
            self.error(f"'{name}' is a built-in and cannot be rebound", span, "choose another name")
            return
        entry = scope.lookup(name)
        if entry is not None and not _is_prelude(scope, name):
            first = _entry_span(entry)
            self.error(
                f"'{name}' is already defined; names may not be shadowed",
                span,
                "choose another name",
                notes=(f"'{name}' is defined at line {first.line}",) if first else (),
            )

    def check_property(self, d: A.PropertyDecl, scope: Scope) -> Any:
        self.check_params_fresh(d.params, scope)
        entry = FunEntry(d, scope)
        if self.is_template(d, scope):
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
            if i == 0 and net is not None:
                expect = self.networks[net].inp
                if p.annotation is None:
                    ty = expect
                elif not isinstance(ty, _ErrTy) and ty != expect:
                    self.error(
                        f"'{p.name}' is bound to {net}'s inputs, {expect}, but is annotated {ty}",
                        p.annotation.span,
                    )
                    ty = expect
            if i == 1 and net is not None:
                k = self.networks[net].out.shape[0]
                expect = IndexTy(k, True)
                if p.annotation is None:
                    ty = expect
                elif not isinstance(ty, _ErrTy) and (not isinstance(ty, IndexTy) or ty.k != k):
                    self.error(
                        f"'{p.name}' is a label of {net}'s {k} classes, but is annotated {ty}",
                        p.annotation.span,
                        f"annotate it Label[{k}] or leave the annotation out",
                    )
                    ty = expect
            if ty is ERR and p.annotation is None and "network" not in self.failed.values():
                several = sum(isinstance(scope.lookup(n), NetEntry) for n in self.networks) > 1
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
        if not isinstance(body.ty, _ErrTy) and body.ty != BOOL:
            self.error(f"a property must be Bool, but this is {body.ty}", d.body.span)
        self.properties[d.name] = PropertyInfo(d.name, tuple(params), net, body, d.span)
        return entry

    def is_template(self, d: A.PropertyDecl, scope: Scope) -> bool:
        if len(d.params) > 2 or len(d.params) == 0:
            return True
        names = {p.name for p in d.params}
        for node in _walk_ast(d.body):
            if isinstance(node, A.Call):
                if node.func.id in names:
                    return True
                if node.func.id in EXPLAINERS and node.args:
                    a0 = node.args[0]
                    if isinstance(a0, A.Name) and a0.id in names:
                        return True
        return False

    def property_network(self, d: A.PropertyDecl, scope: Scope) -> str | None:
        visible = [n for n in self.networks if isinstance(scope.lookup(n), NetEntry)]
        if len(visible) == 1:
            return visible[0]
        for node in _walk_ast(d.body):
            if isinstance(node, A.Call) and node.func.id in visible:
                return node.func.id
            # a network passed to a template or an explanation: f in robust(f, x, y)
            if isinstance(node, A.Name) and node.id in visible:
                return node.id
        return None

    # -- name resolution for templates -----------------------------------------------------------
    def resolve_names(self, e: A.Expr, scope: Scope, bound: set[str]) -> None:
        """Report unknown names in a body that is only type-checked where it is used."""
        if isinstance(e, A.Name):
            if e.id not in bound and not self.is_known(e.id, scope):
                self.unknown_name(e.id, e.span, scope, bound)
            return
        if isinstance(e, A.Call):
            fid = e.func.id
            if fid not in bound and fid not in BUILTIN_FUNCTIONS and scope.lookup(fid) is None:
                self.unknown_name(fid, e.func.span, scope, bound)
            for a in (*e.args, *(k.value for k in e.keywords)):
                self.resolve_names(a, scope, bound)
            return
        if isinstance(e, A.Quantified):
            inner = set(bound)
            for b in e.binders:
                self.resolve_names(b.domain, scope, inner)
                inner.add(b.name)
            self.resolve_names(e.body, scope, inner)
            return
        for child in _ast_children(e):
            self.resolve_names(child, scope, bound)

    def is_known(self, name: str, scope: Scope) -> bool:
        return scope.lookup(name) is not None or name in BUILTIN_NAMES

    def unknown_name(self, name: str, span: Span | None, scope: Scope, bound=()) -> Ty:
        if name in self.failed and scope.lookup(name) is None:
            return ERR
        if name == self._declaring:
            return self.error(f"'{name}' refers to itself; definitions cannot be recursive", span)
        if name in self.all_top and scope.lookup(name) is None:
            where = self.all_top[name]
            line = f" (line {where.line})" if where else ""
            return self.error(
                f"'{name}' is used before its declaration{line}",
                span,
                "declare it before this use",
            )
        hint = self.did_you_mean(
            name, lambda: scope.visible() | set(bound) | BUILTIN_FUNCTIONS | BUILTIN_NAMES
        )
        return self.error(
            f"unknown name '{name}'", span, f"did you mean '{hint}'?" if hint else None
        )

    # -- expressions -----------------------------------------------------------------------------
    def infer(self, e: A.Expr, scope: Scope) -> I.Node:
        self.enter(e.span)
        try:
            return getattr(self, f"_infer_{type(e).__name__}")(e, scope)
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
            if e.id in BUILTIN_FUNCTIONS:
                self.error(f"'{e.id}' is a function; call it with arguments", e.span)
                return self.bad(e.span)
            self.unknown_name(e.id, e.span, scope)
            return self.bad(e.span)
        if isinstance(entry, ValueEntry):
            self.inline(entry.node, e.span)
            return _respan(entry.node, e.span)
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

    def inline(self, node: I.Node, span: Span | None) -> None:
        """Account for a let constant or an argument placed here: its whole size, its depth below
        this level, and its range quantifiers within the ones around it."""
        size, depth, finite, attacks = self.measure(node)
        if size > 1:
            self.spend(size - 1, span)
        if self._nesting + depth - 1 > MAX_NESTING:
            self.too_deep(span)
        if finite > 1 and self._finite > 1:
            self.check_finite(self._finite * finite, span)
        if attacks:
            self.check_attacks(self._attacks + attacks, span)

    def check_finite(self, combinations: int, span: Span | None) -> None:
        if combinations > MAX_FINITE:
            raise self.limit(
                f"too many combinations of nested finite quantifiers: {combinations:,}, more "
                f"than {MAX_FINITE:,}",
                span,
                "every sample of a batch is evaluated at each combination of the values of "
                "nested range(K) and classes quantifiers; quantify over fewer values",
            )

    def check_attacks(self, nesting: int, span: Span | None) -> None:
        if nesting > MAX_ATTACK_NESTING:
            raise self.limit(
                f"quantifiers over balls and boxes are nested {nesting} deep, more than "
                f"{MAX_ATTACK_NESTING}",
                span,
                "each is solved by an attack that runs the attacks of those inside it at every "
                "step; quantify over several variables in one quantifier instead, as in "
                "'forall a in D1, b in D2: ...'",
            )

    def classes_domain(self, span: Span | None, scope: Scope) -> I.Node:
        nets = [n for n in self.networks if isinstance(scope.lookup(n), NetEntry)]
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
        if isinstance(x.ty, _ErrTy):
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
        if isinstance(x.ty, _ErrTy) or x.ty == BOOL:
            return True
        self.error(f"expected Bool, but this is {x.ty}", span)
        return False

    def _infer_Binary(self, e: A.Binary, scope: Scope) -> I.Node:
        left = self.infer(e.left, scope)
        right = self.infer(e.right, scope)
        if isinstance(left.ty, _ErrTy) or isinstance(right.ty, _ErrTy):
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
                if v is not _NOT_CONST and not 0 <= v < idx_ty.k:
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
                _eval(node, self.params, self._consts)
            except _ConstFailure as err:
                self.error(f"cannot compute this constant: {err}", e.span)
                return self.bad(e.span)
            except _NotConstant:
                pass
        return node

    def _infer_IfExpr(self, e: A.IfExpr, scope: Scope) -> I.Node:
        c = self.infer(e.cond, scope)
        a = self.infer(e.then, scope)
        b = self.infer(e.orelse, scope)
        if any(isinstance(n.ty, _ErrTy) for n in (c, a, b)):
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
        if isinstance(base.ty, _ErrTy):
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
            if isinstance(node.ty, _ErrTy):
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
                if v is not _NOT_CONST and not 0 <= v < dim:
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
            if isinstance(dom.ty, _ErrTy):
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
                        nets = [n for n in self.networks if isinstance(scope.lookup(n), NetEntry)]
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
                if isinstance(ty, _ErrTy) and not isinstance(ann, _ErrTy) and not failed:
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
                elif not isinstance(ann, _ErrTy) and not isinstance(ty, _ErrTy) and ann != ty:
                    self.error(
                        f"'{b.name}' is annotated {ann}, but its domain holds {ty}",
                        b.annotation.span,
                    )
            # Inlined arguments may carry variables of the caller with this very name (a
            # template's `x'` applied to the caller's `x'`): rename to keep them apart.
            var = I.Var(_fresh_name(b.name, _names_in_scope(inner)), ty, span=b.span)
            inner.names[b.name] = ValueEntry(var, b.span)
            vars_.append(var)
            domains.append(dom if isinstance(dom, I.Domain) else I.Box(dom, dom))
        outer = (self._finite, self._attacks)
        self._finite, self._attacks = combinations, self._attacks + attacked
        try:
            body = self.infer(e.body, inner)
        finally:
            self._finite, self._attacks = outer
        if failed or isinstance(body.ty, _ErrTy):
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
        if fid in BUILTIN_FUNCTIONS:
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
        if isinstance(arg.ty, _ErrTy):
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
                "in the prelude" if _is_prelude(scope, d.name) else f"at line {_line(d.name_span)}"
            )
            self.error(
                f"'{d.name}' takes {_count(len(d.params), 'argument')}, but {_given(len(e.args))}",
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
            if isinstance(node.ty, _ErrTy):
                return self.bad(e.span)
            if p.annotation is not None:
                ann = self.type_expr(p.annotation, entry.scope)
                if not isinstance(ann, _ErrTy) and not _assignable(node.ty, ann):
                    self.error(
                        f"'{d.name}' expects {ann} for '{p.name}', but this is {node.ty}",
                        a.span,
                    )
                    return self.bad(e.span)
            inner.names[p.name] = ValueEntry(node, a.span)
        self._expanding.append(d.name)
        self._expanding_entries.append(entry)
        before = len(self.diags)
        prelude = _is_prelude_scope(entry.scope)
        try:
            body = self.infer(d.body, inner)
        except _Limit as limit:
            if prelude:
                limit.diagnostic = _from_prelude(limit.diagnostic, d.name, e.span)
            raise
        finally:
            self._expanding.pop()
            self._expanding_entries.pop()
        if prelude and len(self.diags) > before:
            # The prelude's text is not the user's: point at the call, quote the definition.
            self.diags[before:] = [_from_prelude(g, d.name, e.span) for g in self.diags[before:]]
        if isinstance(d, A.PropertyDecl) and body.ty not in (BOOL, ERR):
            self.error(f"a property must be Bool, but this is {body.ty}", d.body.span)
            return self.bad(e.span)
        return _respan(body, e.span)

    def builtin(self, fid: str, e: A.Call, scope: Scope) -> I.Node:
        spec = O.EXPLAINER_KEYWORDS.get(fid, {})
        for k in e.keywords:
            if k.name not in spec:
                hint = self.did_you_mean(k.name, list(spec))
                self.error(
                    f"'{fid}' has no keyword '{k.name}'",
                    _keyword_name_span(k),
                    f"did you mean '{hint}'?"
                    if hint
                    else (
                        f"its keywords are {', '.join(spec)}"
                        if spec
                        else f"'{fid}' takes positional arguments only"
                    ),
                )
                return self.bad(e.span)
        if fid in EXPLAINERS:
            return self.explainer(fid, e, scope)
        if fid == "grad":
            return self.grad(e, scope)
        args = [self.infer(a, scope) for a in e.args]
        if any(isinstance(a.ty, _ErrTy) for a in args):
            return self.bad(e.span)
        handler = getattr(self, f"_fn_{fid}", None)
        if handler is None:
            for group, h in (
                (ELEMENTWISE, self._fn_elementwise),
                (VECTOR_MAPS, self._fn_vector_map),
                (REDUCTIONS, self._fn_reduction),
                (PAIR_SCALARS, self._fn_pair),
            ):
                if fid in group:
                    handler = h
                    break
        assert handler is not None, fid
        return handler(fid, e, args, scope)

    def arity(self, fid: str, e: A.Call, args: list[I.Node], *counts: int) -> bool:
        if len(args) in counts:
            return True
        want = " or ".join(map(str, counts))
        noun = "argument" if counts == (1,) else "arguments"
        self.error(f"'{fid}' takes {want} {noun}, but {_given(len(args))}", e.span)
        return False

    def numeric(self, fid: str, node: I.Node, span: Span | None) -> bool:
        if is_numeric(node.ty):
            return True
        self.error(f"'{fid}' needs a number or tensor, but this is {node.ty}", span)
        return False

    def _fn_elementwise(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 1) or not self.numeric(fid, args[0], e.args[0].span):
            return self.bad(e.span)
        ty = args[0].ty
        return I.Fn(
            fid, tuple(args), REAL if ty == NAT or isinstance(ty, IndexTy) else ty, span=e.span
        )

    def _fn_vector_map(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 1):
            return self.bad(e.span)
        ty = args[0].ty
        if not isinstance(ty, TensorTy) or len(ty.shape) != 1:
            self.error(f"'{fid}' needs a vector Tensor[K], but this is {ty}", e.args[0].span)
            return self.bad(e.span)
        return I.Fn(fid, tuple(args), ty, span=e.span)

    def _fn_reduction(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 1) or not self.numeric(fid, args[0], e.args[0].span):
            return self.bad(e.span)
        return I.Fn(fid, tuple(args), REAL, span=e.span)

    def same_shape(self, fid, e, args) -> bool:
        a, b = shape_of(args[0].ty), shape_of(args[1].ty)
        if a is None or b is None or a != b:
            self.error(
                f"'{fid}' needs two tensors of the same shape, got {args[0].ty} and {args[1].ty}",
                e.span,
            )
            return False
        return True

    def _fn_pair(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 2) or not self.same_shape(fid, e, args):
            return self.bad(e.span)
        return I.Fn(fid, tuple(args), REAL, span=e.span)

    def _fn_topk_overlap(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 3) or not self.same_shape(fid, e, args[:2]):
            return self.bad(e.span)
        k = self.const_of(args[2], e.args[2].span, "k")
        shape = shape_of(args[0].ty) or ()
        size = math.prod(shape)
        if k is None or not isinstance(k, int) or not 1 <= k <= size:
            self.error(f"k must be a constant between 1 and {size}", e.args[2].span)
            return self.bad(e.span)
        return I.Fn(fid, tuple(args[:2]), REAL, (("k", k),), span=e.span)

    def const_of(self, node: I.Node, span: Span | None, what: str) -> Any:
        v = self.const(node)
        if v is _NOT_CONST:
            self.error(f"{what} must be a constant", span)
            return None
        return v

    def _fn_norm(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 1, 2) or not self.numeric(fid, args[0], e.args[0].span):
            return self.bad(e.span)
        p: Any = 2
        if len(args) == 2:
            p = self.const_of(args[1], e.args[1].span, "the norm's p")
            if p is None:
                return self.bad(e.span)
            if p not in (1, 2, math.inf):
                self.error(f"norm's p must be 1, 2 or inf, got {_show_value(p)}", e.args[1].span)
                return self.bad(e.span)
        return I.Fn("norm", (args[0],), REAL, (("p", float(p)),), span=e.span)

    def _fn_max(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 1, 2):
            return self.bad(e.span)
        if len(args) == 1:
            if not isinstance(args[0].ty, TensorTy):
                self.error(f"'{fid}' of one argument needs a tensor, got {args[0].ty}", e.span)
                return self.bad(e.span)
            return I.Fn(fid, (args[0],), REAL, span=e.span)
        fake = A.Binary(fid, e.args[0], e.args[1], span=e.span)
        return self.arith(fid, args[0], args[1], fake)

    _fn_min = _fn_max

    def _fn_argmax(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 1):
            return self.bad(e.span)
        ty = args[0].ty
        if not isinstance(ty, TensorTy) or len(ty.shape) != 1:
            self.error(f"'{fid}' needs a vector Tensor[K], but this is {ty}", e.args[0].span)
            return self.bad(e.span)
        return I.Fn(fid, (args[0],), IndexTy(ty.shape[0], True), span=e.span)

    _fn_argmin = _fn_argmax

    def _fn_clamp(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 3):
            return self.bad(e.span)
        for a, s in zip(args, e.args, strict=True):
            if not self.numeric(fid, a, s.span):
                return self.bad(e.span)
        for a, s in zip(args[1:], e.args[1:], strict=True):
            if not is_scalar(a.ty):
                self.error("clamp's bounds must be scalars", s.span)
                return self.bad(e.span)
        ty = args[0].ty
        return I.Fn(fid, tuple(args), REAL if is_scalar(ty) else ty, span=e.span)

    def _fn_cross_entropy(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 2):
            return self.bad(e.span)
        logits, label = args
        if not isinstance(logits.ty, TensorTy) or len(logits.ty.shape) != 1:
            self.error(f"cross_entropy needs logits Tensor[K], got {logits.ty}", e.args[0].span)
            return self.bad(e.span)
        k = logits.ty.shape[0]
        if not isinstance(label.ty, IndexTy) or label.ty.k != k:
            self.error(f"cross_entropy needs a label Label[{k}], got {label.ty}", e.args[1].span)
            return self.bad(e.span)
        return I.Fn(fid, (logits, label), REAL, span=e.span)

    def _fn_ball(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 2, 3):
            return self.bad(e.span)
        centre, radius = args[0], args[1]
        if not is_numeric(centre.ty):
            self.error(f"a ball's centre must be a tensor, got {centre.ty}", e.args[0].span)
            return self.bad(e.span)
        if not is_scalar(radius.ty):
            self.error(f"a ball's radius must be a Real number, got {radius.ty}", e.args[1].span)
            return self.bad(e.span)
        r = self.const(radius)
        if r is not _NOT_CONST and r < 0:
            self.error(
                f"a ball's radius must be non-negative, got {_show_value(r)}", e.args[1].span
            )
            return self.bad(e.span)
        p: Any = math.inf
        if len(args) == 3:
            p = self.const_of(args[2], e.args[2].span, "the ball's norm")
            if p is None:
                return self.bad(e.span)
            if p not in (1, 2, math.inf):
                self.error(
                    f"a ball's norm must be 1, 2 or inf, got {_show_value(p)}", e.args[2].span
                )
                return self.bad(e.span)
        return I.Ball(centre, radius, float(p), span=e.span)

    def _fn_box(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 2):
            return self.bad(e.span)
        lo, hi = args
        for a, s in zip(args, e.args, strict=True):
            if not self.numeric("box", a, s.span):
                return self.bad(e.span)
        ls, hs = shape_of(lo.ty), shape_of(hi.ty)
        if ls and hs and ls != hs:
            self.error(f"a box's bounds differ in shape: {lo.ty} and {hi.ty}", e.span)
            return self.bad(e.span)
        a, b = self.const(lo), self.const(hi)
        if _NOT_CONST not in (a, b) and is_scalar(lo.ty) and is_scalar(hi.ty) and a > b:
            self.error(f"an empty box: the lower bound {a} exceeds the upper bound {b}", e.span)
            return self.bad(e.span)
        return I.Box(lo, hi, span=e.span)

    def _fn_range(self, fid, e, args, scope):
        if not self.arity(fid, e, args, 1):
            return self.bad(e.span)
        k = self.const_of(args[0], e.args[0].span, "range's size")
        if k is None:
            return self.bad(e.span)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            self.error(f"range needs a positive integer, got {_show_value(k)}", e.args[0].span)
            return self.bad(e.span)
        if k > MAX_RANGE:
            self.error(
                f"range({k}) is too large: a finite domain holds at most {MAX_RANGE:,} values",
                e.args[0].span,
                "the backends evaluate every value for every sample; quantify over a ball or "
                "a box, or over fewer values",
            )
            return self.bad(e.span)
        return I.Range(k, False, span=e.span)

    def grad(self, e: A.Call, scope: Scope) -> I.Node:
        if len(e.args) != 2:
            self.error(
                f"'grad' takes 2 arguments, but {_given(len(e.args))}",
                e.span,
                "grad(expression, variable)",
            )
            return self.bad(e.span)
        wrt = self.infer(e.args[1], scope)
        if isinstance(wrt.ty, _ErrTy):
            return self.bad(e.span)
        if not isinstance(wrt, I.Var) or not isinstance(wrt.ty, TensorTy):
            self.error(
                "grad differentiates with respect to a tensor variable (a property parameter "
                "or a quantified variable)",
                e.args[1].span,
            )
            return self.bad(e.span)
        expr = self.infer(e.args[0], scope)
        if isinstance(expr.ty, _ErrTy):
            return self.bad(e.span)
        if not is_scalar(expr.ty):
            self.error(f"grad needs a Real expression, but this is {expr.ty}", e.args[0].span)
            return self.bad(e.span)
        return I.Fn("grad", (expr, wrt), wrt.ty, span=e.span)

    def explainer(self, fid: str, e: A.Call, scope: Scope) -> I.Node:
        if len(e.args) != 3:
            self.error(
                f"'{fid}' takes 3 arguments (network, input, label), but {_given(len(e.args))}",
                e.span,
            )
            return self.bad(e.span)
        f = e.args[0]
        entry = scope.lookup(f.id) if isinstance(f, A.Name) else None
        if entry is None and isinstance(f, A.Name) and f.id in self.failed:
            return self.bad(e.span)
        if not isinstance(entry, NetEntry):
            nets = [n for n in self.networks if isinstance(scope.lookup(n), NetEntry)]
            net = nets[0] if len(nets) == 1 else "f"
            self.error(
                f"the first argument of '{fid}' must be a network",
                f.span,
                f"pass the network itself, as in {fid}({net}, x, y)",
            )
            return self.bad(e.span)
        x = self.infer(e.args[1], scope)
        y = self.infer(e.args[2], scope)
        if isinstance(x.ty, _ErrTy) or isinstance(y.ty, _ErrTy):
            return self.bad(e.span)
        if x.ty != entry.ty.inp:
            self.error(f"'{fid}' needs an input {entry.ty.inp}, but this is {x.ty}", e.args[1].span)
            return self.bad(e.span)
        k = entry.ty.out.shape[0]
        if not (isinstance(y.ty, IndexTy) and y.ty.k == k) and not (
            y.ty == NAT and 0 <= _const_or(y, self.params, -1) < k
        ):
            self.error(f"'{fid}' needs a class Label[{k}], but this is {y.ty}", e.args[2].span)
            return self.bad(e.span)
        opts: list[tuple[str, object]] = [("net", entry.name)]
        for kw in e.keywords:
            node = self.infer(kw.value, scope)
            if isinstance(node.ty, _ErrTy):
                return self.bad(e.span)
            v = self.const_of(node, kw.value.span, f"'{kw.name}'")
            if v is None:
                return self.bad(e.span)
            value = self.in_range(v, O.EXPLAINER_KEYWORDS[fid][kw.name], kw.name, kw.value)
            if value is _NOT_CONST:
                return self.bad(e.span)
            opts.append((kw.name, value))
        return I.Fn(fid, (x, y), entry.ty.inp, tuple(opts), span=e.span)

    # -- blocks ----------------------------------------------------------------------------------
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
        keys = O.TRAIN_KEYS if b.kind == "train" else O.VERIFY_KEYS
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
        if b.kind == "verify" and "properties" not in seen:
            self.error(
                "a verify block needs 'properties = [...]'",
                _keyword_span(b.span, b.kind) or b.name_span,
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
        if name not in O.DATASETS:
            hint = self.did_you_mean(name, list(O.DATASETS))
            self.error(
                f"unknown data source '{name}'",
                name_node.span,
                f"did you mean '{hint}'?" if hint else f"sources are {', '.join(O.DATASETS)}",
            )
            return (name, ())
        kwargs = self.option_kwargs(call, O.DATASETS[name], name) if call else {}
        if kwargs is None:
            return (name, ())
        if name == "tensors" and "path" not in kwargs:
            self.error('tensors(...) needs path = "file.npz"', src.span)
        if name in O.DATASET_SHAPES:
            shape, k = O.DATASET_SHAPES[name]
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
        self, call: A.Call, table: dict[str, O.Kw], fname: str
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
                    _keyword_name_span(k),
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
            if v is _NOT_CONST:
                return None
            out[k.name] = v
        return out

    def option_literal(self, e: A.Expr, want: O.Kw, key: str) -> Any:
        """The value of an option keyword or block key: its type and range checked."""
        if want.choices:
            value: Any = (
                e.value if isinstance(e, (A.Str,)) else (e.id if isinstance(e, A.Name) else None)
            )
            if value not in want.choices:
                self.error(f"'{key}' must be one of {', '.join(want.choices)}", e.span)
                return _NOT_CONST
            return value
        if want.type == "String":
            if not isinstance(e, A.Str):
                self.error(f"'{key}' must be a string in double quotes", e.span)
                return _NOT_CONST
            return e.value
        if want.type == "List[Nat]":
            items = e.items if isinstance(e, A.ListExpr) else (e,)
            item = O.Kw(type="Nat", bounds=want.bounds)
            out = []
            for it in items:
                v = self.option_literal(it, item, key)
                if v is _NOT_CONST:
                    return _NOT_CONST
                out.append(v)
            return tuple(out)
        if want.type == "Activation":
            name = e.func.id if isinstance(e, A.Call) else (e.id if isinstance(e, A.Name) else "")
            if name not in O.ACTIVATIONS:
                self.error(
                    f"unknown activation '{name}'" if name else "expected an activation",
                    e.span,
                    f"activations are {', '.join(O.ACTIVATIONS)}",
                )
                return _NOT_CONST
            if isinstance(e, A.Call):
                kw = self.option_kwargs(e, O.ACTIVATION_OPTIONS, name)
                if kw is None:
                    return _NOT_CONST
                return OptionValue(name, tuple(sorted(kw.items())))
            return OptionValue(name)
        if isinstance(e, (A.Str, A.ListExpr)):
            what = "a string" if isinstance(e, A.Str) else "a list"
            self.error(f"'{key}' must be {want.type}, not {what}", e.span)
            return _NOT_CONST
        node = self.infer(e, self._top_scope_for_options)
        if isinstance(node.ty, _ErrTy):
            return _NOT_CONST
        v = self.const(node)
        if v is _NOT_CONST:
            self.error(f"'{key}' must be a constant", e.span)
            return _NOT_CONST
        return self.in_range(v, want, key, e)

    def in_range(self, v: Any, want: O.Kw, key: str, e: A.Expr) -> Any:
        """`v`, the value of `e`, converted to the keyword's type and checked against its range
        (options.py), or `_NOT_CONST` after a positioned error."""
        c = coerce_param(v, _TYPE_NAMES[want.type])
        if c is None:
            self.error(f"'{key}' must be {want.type}, got {self.as_written(e, v)}", e.span)
            return _NOT_CONST
        if want.type in ("Real", "Nat") and not want.allows(c):
            if isinstance(c, float) and not (math.isfinite(c) and abs(c) <= O.FLOAT32_MAX):
                self.error(
                    f"'{key}' must be a finite number (at most {O.FLOAT32_MAX:.4g} in size, "
                    f"the float32 range), got {self.as_written(e, v)}",
                    e.span,
                )
            else:
                assert want.bounds is not None
                shown = self.as_written(e, v)
                self.error(f"'{key}' must be {want.bounds.show()}, got {shown}", e.span)
            return _NOT_CONST
        return c

    def as_written(self, e: A.Expr, value: Any) -> str:
        """A literal value as the spec writes it (`1e40`, not `1e+40`); else the value."""
        literal = e.operand if isinstance(e, A.Unary) and e.op == "-" else e
        sp = e.span
        if isinstance(literal, A.Num) and sp is not None and sp.line == sp.end_line:
            text = self.source.line(sp.line)[sp.col - 1 : sp.end_col - 1]
            try:  # the text at the span is this very number (not, say, the prelude's)
                if _DECIMAL.fullmatch(text) and float(text) == float(value):
                    return text
            except OverflowError:
                pass
        return _show_value(value)

    _top_scope_for_options: Scope = Scope()

    def option_value(self, e: A.Expr, table: dict[str, dict[str, O.Kw]], key: str) -> Any:
        if isinstance(e, A.Name):
            name, call = e.id, None
        elif isinstance(e, A.Call):
            name, call = e.func.id, e
        else:
            self.error(f"'{key}' takes one of {', '.join(table)}", e.span)
            return None
        if name not in table:
            hint = self.did_you_mean(name, list(table))
            self.error(
                f"unknown {key} '{name}'",
                e.func.span if isinstance(e, A.Call) else e.span,
                f"did you mean '{hint}'?" if hint else f"known: {', '.join(table)}",
            )
            return None
        kwargs = self.option_kwargs(call, table[name], name) if call else {}
        if kwargs is None:
            return None
        if name == "sgd" and kwargs.get("nesterov") and not kwargs.get("momentum", 0.0) > 0:
            # torch's SGD refuses Nesterov momentum without momentum
            assert call is not None
            nesterov = next(k for k in call.keywords if k.name == "nesterov")
            self.error(
                "'nesterov = true' needs a momentum > 0",
                nesterov.span,
                "set momentum, as in sgd(lr = 0.1, momentum = 0.9, nesterov = true)",
            )
            return None
        return OptionValue(name, tuple(sorted(kwargs.items())))

    def setting_value(self, kind: O.Kw, s: A.Setting, b: A.Block, net: NetEntry, scope: Scope):
        self._top_scope_for_options = scope
        e = s.value
        if kind.type in O.OPTION_TABLES:
            return self.option_value(e, O.OPTION_TABLES[kind.type], s.key)
        if kind.type == "device":
            v = e.value if isinstance(e, A.Str) else (e.id if isinstance(e, A.Name) else None)
            if v is None or not (v in O.DEVICES or re.fullmatch(r"cuda:[0-9]+", str(v))):
                self.error('device must be auto, cpu, cuda or "cuda:N"', e.span)
                return None
            return v
        if kind.type in ("Nat", "Real"):
            v = self.option_literal(e, kind, s.key)
            return None if v is _NOT_CONST else v
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
        raise AssertionError(kind)

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
            nets = _network_params(entry.decl)
            if len(entry.decl.params) <= 2 and nets:
                self.error(
                    f"'{it.id}' uses its parameter '{nets[0]}' as a network, so it is a template, "
                    "not a property of one sample (x, y)",
                    it.span,
                    "apply the network itself in the property's body",
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
        if isinstance(node.ty, _ErrTy):
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


class _LossScope:
    """Checks a loss expression: properties and `cross_entropy` may appear as bare terms."""

    def __init__(self, checker: Checker, scope: Scope, net: NetEntry, x: I.Var, y: I.Var):
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
            if isinstance(left.ty, _ErrTy) or isinstance(right.ty, _ErrTy):
                return c.bad(e.span)
            return c.arith(e.op, left, right, e)
        if isinstance(e, A.Unary) and e.op == "-":
            x = self.infer(e.operand)
            return x if isinstance(x.ty, _ErrTy) else I.Neg(x, span=e.span)
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
        method = "ibp"
        for k in e.keywords:
            if k.name != "method":
                c.error(
                    f"'certified' has no option '{k.name}'",
                    _keyword_name_span(k),
                    "its option is method",
                )
                return c.bad(e.span)
            v = k.value.id if isinstance(k.value, A.Name) else None
            if v not in O.CERTIFIED_METHODS:
                c.error(
                    "unknown certified training method" + (f" '{v}'" if v is not None else ""),
                    k.value.span,
                    f"methods are {', '.join(O.CERTIFIED_METHODS)}",
                )
                return c.bad(e.span)
            method = v
        return I.Fn("certified", (), REAL, (("property", name.id), ("method", method)), span=e.span)


_TYPE_NAMES: dict[str, Ty] = {"Real": REAL, "Nat": NAT, "Bool": BOOL, "String": STRING}


# -- helpers -------------------------------------------------------------------------------------
class _NotConst:
    def __repr__(self) -> str:
        return "<not constant>"


_NOT_CONST: Any = _NotConst()


def eval_const(
    node: I.Node,
    params: dict[str, tuple[Ty, Any]],
    memo: dict[int, tuple[I.Node, Any]] | None = None,
) -> Any:
    """The value of a constant scalar expression, or `_NOT_CONST`.

    `memo` (node id -> (node, value or failure)) keeps the results of the nodes evaluated, so
    that evaluating every node of a large constant expression in turn stays linear.
    """
    try:
        return _eval(node, params, memo)
    except (_NotConstant, _ConstFailure):
        return _NOT_CONST


class _NotConstant(Exception):
    pass


class _ConstFailure(Exception):
    """A constant expression without a value: the message says why (division by zero, ...)."""


class _Limit(Exception):
    """A work limit crossed: the declaration being checked is abandoned (see `Checker.spend`)."""

    def __init__(self, diagnostic: Diagnostic, entries: tuple[FunEntry, ...], fatal: bool):
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic
        self.entries = entries  # the definitions being expanded when it was crossed
        self.fatal = fatal  # the whole spec's limit: nothing more is checked


def _finite_combinations(domains: tuple[I.Domain, ...]) -> int:
    """The values of a quantifier's finite binders (range(K), classes) together."""
    return math.prod(d.k for d in domains if isinstance(d, I.Range))


def _is_attacked(domains: tuple[I.Domain, ...]) -> int:
    """1 when a quantifier has a binder over a ball or a box (solved by an attack), else 0."""
    return int(any(not isinstance(d, I.Range) for d in domains))


# Constants must stay within float range: the backends compute in floats, and exact integer
# arithmetic on huge values (10^10^10) would otherwise hang the checker.
_MAX_INT_BITS = 1024


def _eval(
    node: I.Node, params: dict[str, tuple[Ty, Any]], memo: dict[int, tuple[I.Node, Any]] | None
) -> Any:
    # Iterative, children before parents: a deep constant needs no Python recursion.
    memo = {} if memo is None else memo
    stack: list[tuple[I.Node, bool]] = [(node, False)]
    while stack:
        n, ready = stack.pop()
        if id(n) in memo:
            continue
        if isinstance(n, I.Const):
            memo[id(n)] = (n, n.value)
        elif isinstance(n, I.ParamRef):
            found = params.get(n.name)
            memo[id(n)] = (n, _NotConstant() if found is None else found[1])
        elif isinstance(n, (I.Neg, I.Arith)):
            kids = n.children()
            if not ready:
                stack.append((n, True))
                stack.extend((c, False) for c in kids)
                continue
            values = [memo[id(c)][1] for c in kids]
            failed = next((v for v in values if isinstance(v, Exception)), None)
            memo[id(n)] = (n, failed if failed is not None else _apply(n, values))
        else:
            memo[id(n)] = (n, _NotConstant())
    value = memo[id(node)][1]
    if isinstance(value, Exception):
        raise type(value)(*value.args)
    return value


def _apply(node: I.Node, values: list[Any]) -> Any:
    """`-a` or `a op b` on constant values; a failure is returned as an exception object."""
    if isinstance(node, I.Neg):
        return -values[0]
    assert isinstance(node, I.Arith)
    try:
        out = _ARITH[node.op](*values)
    except ZeroDivisionError:
        return _ConstFailure("division by zero")
    except OverflowError:
        return _ConstFailure("the value is too large")
    except ValueError:
        return _ConstFailure("the value is not a real number")
    if isinstance(out, int) and out.bit_length() > _MAX_INT_BITS:
        return _ConstFailure("the value is too large")
    return out


def _pow(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        if b * math.log2(abs(a)) > _MAX_INT_BITS:
            raise OverflowError("integer power")
    out = a**b
    if isinstance(out, complex):
        raise ValueError("complex power")
    return out


_ARITH = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "^": _pow,
    "max": max,
    "min": min,
}


def _const_or(node: I.Node, params, default):
    v = eval_const(node, params)
    return default if v is _NOT_CONST else v


# Numbers on the command line are written as in a spec: ASCII digits only (Python's `float` would
# also read "١٫٥", "1_000" and "infinity"), plus `inf` / `-inf`.
_DECIMAL = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def coerce_param(value: Any, ty: Ty) -> Any:
    """A Python value converted to a param type, or None when it does not fit."""
    if isinstance(value, str) and ty != STRING:
        text = value.strip().lower()
        if ty == BOOL:
            return {"true": True, "false": False}.get(text)
        if text in ("inf", "+inf", "-inf"):
            value = -math.inf if text.startswith("-") else math.inf
        elif ty == NAT and _INTEGER.fullmatch(text):
            try:
                value = int(text)
            except ValueError:  # more digits than Python converts
                return None
        elif _DECIMAL.fullmatch(text):
            value = float(text)
            if math.isinf(value):  # 1e999: too large, not infinity
                return None
        else:
            return None
    if ty == BOOL:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    # numbers.Real / Integral, so that numpy scalars from a user's script are accepted too
    if ty == NAT:
        if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
            real = float(value)
            value = int(real) if real.is_integer() else real
        if not isinstance(value, numbers.Integral):
            return None
        value = int(value)
        return value if 0 <= value and value.bit_length() <= _MAX_INT_BITS else None
    if ty == REAL:
        if not isinstance(value, numbers.Real):
            return None
        try:
            real = float(value)
        except OverflowError:
            return None
        return None if math.isnan(real) else real
    if ty == STRING:
        return value if isinstance(value, str) else None
    return None


def _override_hint(raw: Any, ty: Ty) -> str | None:
    """Why a command-line value does not fit, where the message alone would not say."""
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    if ty in (REAL, NAT) and _DECIMAL.fullmatch(text.lower()) and math.isinf(float(text)):
        return "the number is too large for a float; write inf for infinity"
    if ty in (REAL, NAT) and not text.isascii():
        return "numbers are written with the ASCII digits 0-9"
    if ty == NAT and _INTEGER.fullmatch(text.lower()):
        return "a Nat is a whole number >= 0"
    return None


def _assignable(have: Ty, want: Ty) -> bool:
    if have == want:
        return True
    if want == REAL and (have == NAT or isinstance(have, IndexTy)):
        return True
    if want == NAT and isinstance(have, IndexTy):
        return True
    return isinstance(have, IndexTy) and isinstance(want, IndexTy) and have.k == want.k


def _is_prelude_scope(scope: Scope) -> bool:
    s: Scope | None = scope
    while s is not None:
        if getattr(s, "is_prelude", False):
            return s.parent is None and scope is s
        s = s.parent
    return False


def _names_in_scope(scope: Scope) -> set[str]:
    """Names of the IR variables reachable from a scope's bindings."""
    out: set[str] = set()
    s: Scope | None = scope
    while s is not None:
        out |= s.own_var_names()
        s = s.parent
    return out


def _fresh_name(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "'"
    return name


def _respan(node: I.Node, span: Span | None) -> I.Node:
    return node


def _from_prelude(diag: Diagnostic, name: str, call: Span | None) -> Diagnostic:
    """A diagnostic inside the prelude's definition of `name`, moved to the user's call."""
    where = f"in the prelude's definition of '{name}': {diag.message}"
    return Diagnostic(where, call, diag.hint, notes=diag.notes)


def _with_dims(dom: I.Domain, dims: tuple[int, ...]) -> I.Domain:
    """A domain of scalar-bounded boxes given the shape of its annotated variable."""
    if isinstance(dom, I.Box):
        return dataclasses.replace(dom, dims=dims)
    if isinstance(dom, I.Inter):
        return dataclasses.replace(dom, parts=tuple(_with_dims(p, dims) for p in dom.parts))
    return dom


def _network_params(d: A.PropertyDecl | A.LetDecl) -> list[str]:
    """The parameters that the body applies as networks (`net(x)`, `saliency(net, x, y)`)."""
    names = [p.name for p in d.params or ()]
    used = []
    for node in _walk_ast(d.body):
        if isinstance(node, A.Call):
            if node.func.id in names:
                used.append(node.func.id)
            elif node.func.id in EXPLAINERS and node.args and isinstance(node.args[0], A.Name):
                used.append(node.args[0].id)
    return [n for n in names if n in used]


def _domain_words(d: I.Domain) -> str:
    """`a ball of Tensor[1, 8, 8]`: a domain as a user would name it."""
    kind = {I.Ball: "a ball", I.Box: "a box"}.get(type(d), "an intersection")
    return f"{kind} of {tensor(d.shape)}" if d.shape is not None else kind


def _keyword_name_span(k: A.Keyword) -> Span | None:
    """The span of the name in `name = value`."""
    if k.span is None:
        return None
    return Span(k.span.line, k.span.col, k.span.line, k.span.col + len(k.name))


def _decl_kind(d: A.Decl) -> str:
    return {
        A.NetworkDecl: "network",
        A.ParamDecl: "param",
        A.LetDecl: "let",
        A.PropertyDecl: "property",
    }.get(type(d), "block")


def _keyword_span(span: Span | None, keyword: str) -> Span | None:
    """The span of the keyword that starts a declaration spanning `span`."""
    if span is None:
        return None
    return Span(span.line, span.col, span.line, span.col + len(keyword))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _given(n: int) -> str:
    return f"{n} {'was' if n == 1 else 'were'} given"


def _line(span: Span | None) -> str:
    return str(span.line) if span is not None else "?"


def _entry_span(entry: Any) -> Span | None:
    if isinstance(entry, FunEntry):
        return entry.decl.name_span
    return getattr(entry, "span", None)


def _is_prelude(scope: Scope, name: str) -> bool:
    """True when `name` resolves only in the outermost (prelude) scope."""
    s: Scope | None = scope
    while s is not None:
        if name in s.names:
            return s.parent is None and getattr(s, "is_prelude", False)
        s = s.parent
    return False


def _ast_children(e: A.Expr):
    if isinstance(e, A.Call):
        yield from e.args
        yield from (k.value for k in e.keywords)
    elif isinstance(e, A.Index):
        yield e.value
        yield from e.indices
    elif isinstance(e, A.Unary):
        yield e.operand
    elif isinstance(e, A.Binary):
        yield e.left
        yield e.right
    elif isinstance(e, A.IfExpr):
        yield from (e.cond, e.then, e.orelse)
    elif isinstance(e, A.ListExpr):
        yield from e.items
    elif isinstance(e, A.Quantified):
        yield from (b.domain for b in e.binders)
        yield e.body


def _walk_ast(e: A.Expr):
    yield e
    for c in _ast_children(e):
        yield from _walk_ast(c)


def check(
    module: A.Module,
    source: Source,
    overrides: dict[str, Any] | None = None,
    prelude: Scope | None = None,
) -> Checked:
    """Check a parsed module; raise `CheckError` with every diagnostic found."""
    checker = Checker(source, overrides)
    result = checker.check_module(module, prelude)
    if checker.diags:
        # A template used twice reports an error in its body once.
        seen: set[tuple[str, Span | None]] = set()
        unique = []
        for d in checker.diags:
            if (d.message, d.span) not in seen:
                seen.add((d.message, d.span))
                unique.append(d)
        raise CheckError(unique, source)
    return result


def build_prelude(module: A.Module, source: Source) -> Scope:
    """Check the prelude module and return it as the outermost scope of user specs."""
    checker = Checker(source)
    top = Scope({})
    top.is_prelude = True  # type: ignore[attr-defined]
    for d in module.decls:
        entry = checker.check_decl(d, top)
        if entry is not None:
            top.names[d.name] = entry
    if checker.diags:
        raise CheckError(checker.diags, source)
    return top


def _unused(*_: Any) -> None:  # keep imports used by type annotations only
    _ = (DomainTy, FiniteTy, ListTy, OptionTy)
