"""Names and scopes: what a name is bound to, and the errors for names that are wrong.

Scoping (documented in docs/language.md): top-level names are visible after their declaration
only; the prelude is an outer scope that top-level declarations may shadow; a parameter or a
quantified variable may not reuse a name that is already visible (no shadowing inside a
declaration).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from propdsl import ast as A
from propdsl import ir as I
from propdsl.builtins import BUILTIN_NAMES, BUILTINS, EXPLAINERS, RESERVED
from propdsl.check.base import ERR, CheckerBase
from propdsl.source import Diagnostic, Span
from propdsl.types import NetworkTy, Ty


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


Entry = NetEntry | ParamEntry | ValueEntry | FunEntry


@dataclass
class Scope:
    names: dict[str, Any] = field(default_factory=dict)
    parent: Scope | None = None
    # The outermost scope of the prelude's definitions (`build_prelude`).
    is_prelude: bool = False
    # `own_var_names`' cache: the bindings seen so far and their variables' names.
    _seen: int = field(default=0, repr=False, compare=False)
    _var_names: set[str] = field(default_factory=set, repr=False, compare=False)

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
        if self._seen != len(self.names):
            for entry in itertools.islice(self.names.values(), self._seen, None):
                if isinstance(entry, ValueEntry):
                    self._var_names.update(
                        n.name for n in I.walk_unique(entry.node) if isinstance(n, I.Var)
                    )
            self._seen = len(self.names)
        return self._var_names


def is_prelude_scope(scope: Scope) -> bool:
    s: Scope | None = scope
    while s is not None:
        if s.is_prelude:
            return s.parent is None and scope is s
        s = s.parent
    return False


def is_prelude(scope: Scope, name: str) -> bool:
    """True when `name` resolves only in the outermost (prelude) scope."""
    s: Scope | None = scope
    while s is not None:
        if name in s.names:
            return s.parent is None and s.is_prelude
        s = s.parent
    return False


def names_in_scope(scope: Scope) -> set[str]:
    """Names of the IR variables reachable from a scope's bindings."""
    out: set[str] = set()
    s: Scope | None = scope
    while s is not None:
        out |= s.own_var_names()
        s = s.parent
    return out


def fresh_name(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "'"
    return name


def entry_span(entry: Any) -> Span | None:
    if isinstance(entry, FunEntry):
        return entry.decl.name_span
    return getattr(entry, "span", None)


def visible_networks(networks: Iterable[str], scope: Scope) -> list[str]:
    """The declared networks that `scope` sees (a network declared later is not visible)."""
    return [n for n in networks if isinstance(scope.lookup(n), NetEntry)]


# -- the AST -------------------------------------------------------------------------------------
def ast_children(e: A.Expr) -> Iterator[A.Expr]:
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


def walk_ast(e: A.Expr) -> Iterator[A.Expr]:
    yield e
    for c in ast_children(e):
        yield from walk_ast(c)


def network_params(d: A.PropertyDecl | A.LetDecl) -> list[str]:
    """The parameters that the body applies as networks (`net(x)`, `saliency(net, x, y)`)."""
    names = [p.name for p in d.params or ()]
    used = []
    for node in walk_ast(d.body):
        if isinstance(node, A.Call):
            if node.func.id in names:
                used.append(node.func.id)
            elif node.func.id in EXPLAINERS and node.args and isinstance(node.args[0], A.Name):
                used.append(node.args[0].id)
    return [n for n in names if n in used]


def decl_kind(d: A.Decl) -> str:
    return {
        A.NetworkDecl: "network",
        A.ParamDecl: "param",
        A.LetDecl: "let",
        A.PropertyDecl: "property",
    }.get(type(d), "block")


# -- positions and words for messages -------------------------------------------------------------
def keyword_name_span(k: A.Keyword) -> Span | None:
    """The span of the name in `name = value`."""
    if k.span is None:
        return None
    return Span(k.span.line, k.span.col, k.span.line, k.span.col + len(k.name))


def keyword_span(span: Span | None, keyword: str) -> Span | None:
    """The span of the keyword that starts a declaration spanning `span`."""
    if span is None:
        return None
    return Span(span.line, span.col, span.line, span.col + len(keyword))


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def given(n: int) -> str:
    return f"{n} {'was' if n == 1 else 'were'} given"


def line_of(span: Span | None) -> str:
    return str(span.line) if span is not None else "?"


def from_prelude(diag: Diagnostic, name: str, call: Span | None) -> Diagnostic:
    """A diagnostic inside the prelude's definition of `name`, moved to the user's call."""
    where = f"in the prelude's definition of '{name}': {diag.message}"
    return Diagnostic(where, call, diag.hint, notes=diag.notes)


# -- names ---------------------------------------------------------------------------------------
class Names(CheckerBase):
    """Fresh names for parameters and variables, unknown names and their hints."""

    def check_params_fresh(self, params: tuple[A.Param, ...], scope: Scope) -> None:
        seen: set[str] = set()
        for p in params:
            if p.name in seen:
                self.error(f"parameter '{p.name}' appears twice", p.span)
            seen.add(p.name)
            self.check_fresh(p.name, p.span, scope)

    def check_fresh(self, name: str, span: Span | None, scope: Scope) -> None:
        if name in RESERVED:
            self.error(f"'{name}' is a built-in and cannot be rebound", span, "choose another name")
            return
        entry = scope.lookup(name)
        if entry is not None and not is_prelude(scope, name):
            first = entry_span(entry)
            self.error(
                f"'{name}' is already defined; names may not be shadowed",
                span,
                "choose another name",
                notes=(f"'{name}' is defined at line {first.line}",) if first else (),
            )

    def resolve_names(self, e: A.Expr, scope: Scope, bound: set[str]) -> None:
        """Report unknown names in a body that is only type-checked where it is used."""
        if isinstance(e, A.Name):
            if e.id not in bound and not self.is_known(e.id, scope):
                self.unknown_name(e.id, e.span, scope, bound)
            return
        if isinstance(e, A.Call):
            fid = e.func.id
            if fid not in bound and fid not in BUILTINS and scope.lookup(fid) is None:
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
        for child in ast_children(e):
            self.resolve_names(child, scope, bound)

    def is_known(self, name: str, scope: Scope) -> bool:
        return scope.lookup(name) is not None or name in BUILTIN_NAMES

    def unknown_name(
        self, name: str, span: Span | None, scope: Scope, bound: Iterable[str] = ()
    ) -> Ty:
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
        hint = self.did_you_mean(name, lambda: scope.visible() | set(bound) | RESERVED)
        return self.error(
            f"unknown name '{name}'", span, f"did you mean '{hint}'?" if hint else None
        )
