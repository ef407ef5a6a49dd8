"""The typed intermediate representation produced by the checker and rewritten by the simplifier.

Let-bound constants, functions and property templates are inlined, names are resolved and every
node carries its type. No lark, sympy or torch here: backends (losses, verification) read this.
Spans are kept for diagnostics and excluded from equality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from propdsl.source import Span
from propdsl.types import BOOL, REAL, Ty


def _span() -> Span | None:
    return field(default=None, compare=False, repr=False)  # type: ignore[return-value]


@dataclass(frozen=True)
class Node:
    @property
    def ty(self) -> Ty:
        raise NotImplementedError

    def children(self) -> tuple[Node, ...]:
        return ()


@dataclass(frozen=True)
class Const(Node):
    value: float | int | bool
    type: Ty = REAL
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return self.type


@dataclass(frozen=True)
class Var(Node):
    """A property parameter bound to the data (`x`, `y`) or a quantified variable."""

    name: str
    type: Ty
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return self.type


@dataclass(frozen=True)
class ParamRef(Node):
    """A spec `param`, replaced by its value in the simplifier."""

    name: str
    type: Ty
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return self.type


@dataclass(frozen=True)
class Apply(Node):
    """`f(arg)`: a network applied to one input (batched by the backends)."""

    net: str
    arg: Node
    type: Ty
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return self.type

    def children(self) -> tuple[Node, ...]:
        return (self.arg,)


@dataclass(frozen=True)
class Fn(Node):
    """A built-in function: `norm`, `softmax`, `saliency` ... `options` holds constant keywords."""

    fn: str
    args: tuple[Node, ...]
    type: Ty
    options: tuple[tuple[str, object], ...] = ()
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return self.type

    def children(self) -> tuple[Node, ...]:
        return self.args

    def option(self, key: str, default: object = None) -> object:
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class Arith(Node):
    op: str  # + - * / ^ max min
    left: Node
    right: Node
    type: Ty
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return self.type

    def children(self) -> tuple[Node, ...]:
        return (self.left, self.right)


@dataclass(frozen=True)
class Neg(Node):
    operand: Node
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return self.operand.ty

    def children(self) -> tuple[Node, ...]:
        return (self.operand,)


@dataclass(frozen=True)
class Idx(Node):
    base: Node
    indices: tuple[Node, ...]
    type: Ty
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return self.type

    def children(self) -> tuple[Node, ...]:
        return (self.base, *self.indices)


@dataclass(frozen=True)
class Cmp(Node):
    """A comparison; tensor operands compare element-wise and hold when every element does."""

    op: str
    left: Node
    right: Node
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return BOOL

    def children(self) -> tuple[Node, ...]:
        return (self.left, self.right)


@dataclass(frozen=True)
class And(Node):
    items: tuple[Node, ...]
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return BOOL

    def children(self) -> tuple[Node, ...]:
        return self.items


@dataclass(frozen=True)
class Or(Node):
    items: tuple[Node, ...]
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return BOOL

    def children(self) -> tuple[Node, ...]:
        return self.items


@dataclass(frozen=True)
class Not(Node):
    operand: Node
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return BOOL

    def children(self) -> tuple[Node, ...]:
        return (self.operand,)


@dataclass(frozen=True)
class Implies(Node):
    left: Node
    right: Node
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return BOOL

    def children(self) -> tuple[Node, ...]:
        return (self.left, self.right)


@dataclass(frozen=True)
class Cond(Node):
    cond: Node
    then: Node
    orelse: Node
    type: Ty
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return self.type

    def children(self) -> tuple[Node, ...]:
        return (self.cond, self.then, self.orelse)


# -- domains -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Domain(Node):
    @property
    def ty(self) -> Ty:
        from propdsl.types import DomainTy

        return DomainTy(self.shape)

    @property
    def shape(self) -> tuple[int, ...] | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Ball(Domain):
    centre: Node
    radius: Node
    p: float
    span: Span | None = _span()

    @property
    def shape(self) -> tuple[int, ...] | None:
        from propdsl.types import shape_of

        return shape_of(self.centre.ty)

    def children(self) -> tuple[Node, ...]:
        return (self.centre, self.radius)


@dataclass(frozen=True)
class Box(Domain):
    """`box(lo, hi)`. With scalar bounds the box fits tensors of any shape: `dims` is then the
    shape its variable is annotated with (`forall z : Tensor[1, 8, 8] in box(0, 1)`)."""

    lo: Node
    hi: Node
    span: Span | None = _span()
    dims: tuple[int, ...] | None = None

    @property
    def shape(self) -> tuple[int, ...] | None:
        from propdsl.types import shape_of

        s = shape_of(self.lo.ty) or shape_of(self.hi.ty)
        return s if s else self.dims

    def children(self) -> tuple[Node, ...]:
        return (self.lo, self.hi)


@dataclass(frozen=True)
class Inter(Domain):
    parts: tuple[Domain, ...]
    span: Span | None = _span()

    @property
    def shape(self) -> tuple[int, ...] | None:
        for p in self.parts:
            if p.shape is not None:
                return p.shape
        return None

    def children(self) -> tuple[Node, ...]:
        return self.parts


@dataclass(frozen=True)
class Range(Domain):
    """`range(K)` or `classes`, optionally without one element (from the argmax rewrite)."""

    k: int
    label: bool = False
    exclude: Node | None = None
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        from propdsl.types import FiniteTy

        return FiniteTy(self.k, self.label)

    @property
    def shape(self) -> tuple[int, ...] | None:
        return ()

    def children(self) -> tuple[Node, ...]:
        return (self.exclude,) if self.exclude is not None else ()


@dataclass(frozen=True)
class Quant(Node):
    """`forall` / `exists` (Bool) or `max` / `min` (Real) over one or more variables."""

    kind: str
    vars: tuple[Var, ...]
    domains: tuple[Domain, ...]
    body: Node
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return BOOL if self.kind in ("forall", "exists") else REAL

    def children(self) -> tuple[Node, ...]:
        return (*self.domains, self.body)


@dataclass(frozen=True)
class PropTerm(Node):
    """A property used as a loss term (train blocks): its loss under the block's logic."""

    name: str
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return REAL


# -- linear forms (simplifier output for the verification backend) --------------------------------
@dataclass(frozen=True)
class OutputTerm:
    """`coef * net(arg)[index]`; `index` is Index/Label typed (a constant, `y` or a range var)."""

    coef: float
    net: str
    arg: Node
    index: tuple[Node, ...]


@dataclass(frozen=True)
class LinearForm:
    """`sum(terms) + const  op  0` with `op` in `>=`, `>`, `==`, for every value of the finite
    index variables in `over`. `const` is free of the tensor variables of the enclosing
    quantifiers (it may read the data, the labels and the network at the data point)."""

    terms: tuple[OutputTerm, ...]
    const: Node
    op: str
    over: tuple[tuple[Var, Range], ...] = ()


@dataclass(frozen=True)
class Linear(Node):
    """A comparison atom annotated with linear forms whose conjunction is equivalent to it."""

    atom: Cmp
    forms: tuple[LinearForm, ...]
    span: Span | None = _span()

    @property
    def ty(self) -> Ty:
        return BOOL

    def children(self) -> tuple[Node, ...]:
        return (self.atom,)


# The traversals below are iterative: however deep a formula, they need no Python recursion.
def walk(node: Node):
    """Pre-order traversal of a node and its children (a shared node once per occurrence)."""
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(reversed(n.children()))


def walk_unique(node: Node):
    """Every distinct node object under `node` once (linear in the DAG, not the tree)."""
    seen: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        yield n
        stack.extend(n.children())


def free_vars(node: Node) -> set[str]:
    """Names of variables used in `node` and not bound inside it."""
    out: set[str] = set()
    stack: list[tuple[Node, frozenset[str]]] = [(node, frozenset())]
    while stack:
        n, bound = stack.pop()
        if isinstance(n, Var):
            if n.name not in bound:
                out.add(n.name)
            continue
        if isinstance(n, Quant):
            # a quantifier binds its variables in its domains and its body alike
            bound = bound | {v.name for v in n.vars}
        stack.extend((c, bound) for c in n.children())
    return out


def is_inf(value: object) -> bool:
    return isinstance(value, float) and math.isinf(value)
