"""The abstract syntax tree: frozen dataclasses, one per grammar rule alias.

Spans are carried for diagnostics but excluded from equality, so `parse(format(ast)) == ast`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from propdsl.source import Span


def _span() -> Span | None:
    return field(default=None, compare=False, repr=False)  # type: ignore[return-value]


# -- expressions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Expr:
    if TYPE_CHECKING:  # every expression has one (a field of each subclass, with a default)

        @property
        def span(self) -> Span | None: ...


@dataclass(frozen=True)
class Num(Expr):
    value: int | float
    span: Span | None = _span()


@dataclass(frozen=True)
class Str(Expr):
    value: str
    span: Span | None = _span()


@dataclass(frozen=True)
class BoolLit(Expr):
    value: bool
    span: Span | None = _span()


@dataclass(frozen=True)
class Name(Expr):
    id: str
    span: Span | None = _span()


@dataclass(frozen=True)
class ListExpr(Expr):
    items: tuple[Expr, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Keyword:
    name: str
    value: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Call(Expr):
    func: Name
    args: tuple[Expr, ...]
    keywords: tuple[Keyword, ...] = ()
    span: Span | None = _span()


@dataclass(frozen=True)
class Index(Expr):
    value: Expr
    indices: tuple[Expr, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Unary(Expr):
    op: str  # "-" or "not"
    operand: Expr
    span: Span | None = _span()


ARITH_OPS = ("+", "-", "*", "/", "^")
COMPARE_OPS = ("<", "<=", ">", ">=", "==", "!=")
BOOL_OPS = ("and", "or", "implies")


@dataclass(frozen=True)
class Binary(Expr):
    op: str  # arithmetic, comparison, "&", "and", "or", "implies"
    left: Expr
    right: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class IfExpr(Expr):
    cond: Expr
    then: Expr
    orelse: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class TypeExpr:
    name: str
    dims: tuple[Expr, ...] | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class ArrowType:
    domain: TypeExpr
    codomain: TypeExpr
    span: Span | None = _span()


@dataclass(frozen=True)
class Binder:
    name: str
    domain: Expr
    annotation: TypeExpr | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class Quantified(Expr):
    kind: str  # "forall", "exists" (Bool) or "max", "min" (Real)
    binders: tuple[Binder, ...]
    body: Expr
    span: Span | None = _span()


# -- declarations --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decl:
    name: str
    if TYPE_CHECKING:  # every declaration has them (fields of each subclass, with defaults)

        @property
        def span(self) -> Span | None: ...

        @property
        def name_span(self) -> Span | None: ...


@dataclass(frozen=True)
class Param:
    name: str
    annotation: TypeExpr | None = None
    span: Span | None = _span()


@dataclass(frozen=True)
class NetworkDecl(Decl):
    type: ArrowType
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class ParamDecl(Decl):
    type: TypeExpr
    default: Expr
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class LetDecl(Decl):
    params: tuple[Param, ...] | None  # None: a constant; a tuple: a function
    body: Expr
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class PropertyDecl(Decl):
    params: tuple[Param, ...]
    body: Expr
    # `property p(x, y, xt, yt) partner other_class(seed = 0) = ...`: how the partner sample
    # (xt, yt) of each sample (x, y) is drawn; None for a property of one sample or a template
    partner: Expr | None = None
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class Setting:
    key: str
    value: Expr
    span: Span | None = _span()
    key_span: Span | None = _span()


@dataclass(frozen=True)
class Block(Decl):
    """`train f on data { ... }` or `verify f on data { ... }`; `name` is the network's name."""

    kind: str
    source: Expr
    settings: tuple[Setting, ...]
    span: Span | None = _span()
    name_span: Span | None = _span()


@dataclass(frozen=True)
class Comment:
    text: str
    span: Span


@dataclass(frozen=True)
class Module:
    decls: tuple[Decl, ...]
    comments: tuple[Comment, ...] = field(default=(), compare=False, repr=False)
