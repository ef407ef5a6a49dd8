"""The interpreter of the IR: normal-form formulas and expressions become batched closures.

An `Interpreter` compiles an IR node once into a tree of closures `env -> tensor` (`Code`);
structurally equal sub-expressions share one closure (hash-consing), so `f(x')` read by two
atoms is one network call. Every value carries the batch as its first dimension. A closure
whose free variables are not bound by the innermost environment is *lifted*: computed once in
the enclosing environment and repeated where the inner one expanded the batch.

Finite quantifiers (`forall j in classes`) are vectorised: along a trailing axis of size K when
the body is scalar arithmetic and comparisons over entries `v[j]` (`f(x')[j]` is then `f(x')`
itself), otherwise by expanding the batch K-fold. Formulas are evaluated under the logic of
the environment (`boolean` gives the exact truth). Quantifiers over regions have no exact
evaluation: the loss side (`propdsl.loss.compile.Compiler`) extends the interpreter with
attack-driven quantifiers, property terms and certified terms; the verifier uses it as it is,
for the parts of a property that do not depend on the quantified input, and for regions
(`Interpreter.domain`). See docs/architecture.md and docs/losses.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from propdsl import ir as I
from propdsl.interpret.builtins import (
    ARITH,
    ELEMENTWISE,
    EXPLAINERS,
    FUNCTIONS,
    align,
    explanation,
)
from propdsl.interpret.domains import compile_domain
from propdsl.interpret.env import (
    CompileError,
    Env,
    as_batch,
    env_device,
    env_dtype,
    lookup,
    rebind,
)
from propdsl.logics import Cmp, Logic, get_logic, stack
from propdsl.region import Region
from propdsl.simplify import nnf
from propdsl.tracing import stable
from propdsl.types import BOOL, IndexTy, shape_of

__all__ = ["BOOLEAN", "Code", "Interpreter", "Lambda"]

BOOLEAN = get_logic("boolean")


class Code:
    """One compiled node. `env -> value`, lifting to the parent env when possible.

    `logical` nodes (formulas, and numbers that contain a property's loss) are cached per logic;
    the others in the numeric cache that the logic variants of an evaluation share.
    """

    def __init__(self, node: I.Node, free: frozenset[str], logical: bool = True):
        self.node = node
        self.free = free
        self.logical = logical
        self.key = id(self)

    def __call__(self, env: Env) -> Tensor:
        cache = env.cache if self.logical else env.shared
        out = cache.get(self.key)
        if out is not None:
            return out
        if env.parent is not None and self.free.isdisjoint(env.values):
            # Lift: a value that does not read this env's own variables is computed in the
            # parent (once), and repeated when this env expands the batch.
            out = self(env.parent)
            if env.factor > 1 and isinstance(out, Tensor) and out.dim() > 0:
                out = out.repeat_interleave(env.factor, dim=0)
        else:
            out = self.run(env)
        cache[self.key] = out
        return out

    def run(self, env: Env) -> Tensor:
        raise NotImplementedError


class Interpreter:
    """IR -> closures, hash-consed by structural equality of the nodes.

    Subclasses add node kinds or replace how one is evaluated: a method `_Kind(node, free)`
    (Kind the IR class's name) returns the node's `Code`, a method `_fn_name(node, free)` that of
    the built-in function `name`. `logical(node)` says which values depend on the logic;
    `target` and `kind` name the backend in error messages.
    """

    target: ClassVar[str] = "an exact evaluation"
    kind: ClassVar[str] = "exact"

    def __init__(self) -> None:
        self.memo: dict[I.Node, Code] = {}

    def __call__(self, node: I.Node) -> Code:
        if isinstance(node, I.Linear):
            node = node.atom
        code = self.memo.get(node)
        if code is None:
            code = self.build(node)
            self.memo[node] = code
        return code

    def build(self, node: I.Node) -> Code:
        free = frozenset(I.free_vars(node))
        builder = getattr(self, f"_{type(node).__name__}", None)
        if builder is None:
            raise CompileError(f"cannot compile {type(node).__name__} into {self.target}")
        code = builder(node, free)
        code.logical = self.logical(node)
        return code

    def logical(self, node: I.Node) -> bool:
        """Whether the node's value depends on the logic (formulas)."""
        return node.ty == BOOL

    def domain(self, d: I.Domain) -> Callable[[Env], Region]:
        """`env -> Region` of a quantifier's domain (a ball, boxes, their intersection) for the
        environment's batch; see `propdsl.interpret.domains.compile_domain`."""
        return compile_domain(self, d)

    # -- leaves ----------------------------------------------------------------------------------
    def _Const(self, node: I.Const, free):
        value = node.value
        if node.ty == BOOL:
            return Lambda(node, free, lambda env: env.logic.constant(bool(value), _like(env)))
        if isinstance(node.ty, IndexTy):
            return Lambda(
                node,
                free,
                lambda env: torch.full(
                    (env.batch,), int(value), dtype=torch.long, device=env_device(env)
                ),
            )
        made: dict[tuple[torch.dtype, torch.device], Tensor] = {}

        def constant(env: Env) -> Tensor:
            # one 0-dim tensor per dtype and device, made once (no op reads it in place)
            at = (env_dtype(env), env_device(env))
            t = made.get(at)
            if t is None:
                t = made[at] = stable(torch.tensor(float(value), dtype=at[0], device=at[1]))
            return t

        return Lambda(node, free, constant)

    def _Var(self, node: I.Var, free):
        name = node.name
        return Lambda(node, free, lambda env: lookup(env, name))

    def _ParamRef(self, node: I.ParamRef, free):
        raise CompileError(f"parameter '{node.name}' was not substituted")

    # -- numbers ---------------------------------------------------------------------------------
    def _Apply(self, node: I.Apply, free):
        arg = self(node.arg)
        net = node.net

        def run(env: Env) -> Tensor:
            return env.models[net](arg(env))

        return Lambda(node, free, run)

    def _Neg(self, node: I.Neg, free):
        x = self(node.operand)
        return Lambda(node, free, lambda env: -x(env))

    def _Arith(self, node: I.Arith, free):
        a, b = self(node.left), self(node.right)
        sa, sb = shape_of(node.left.ty) or (), shape_of(node.right.ty) or ()
        nd = len(shape_of(node.type) or ())
        op = ARITH[node.op]

        def run(env: Env) -> Tensor:
            return op(align(a(env), sa, nd), align(b(env), sb, nd))

        return Lambda(node, free, run)

    def _Idx(self, node: I.Idx, free):
        base = self(node.base)
        # A constant index is a Python int (a view, no index tensor); others are per-sample.
        idx: list[int | Code] = [
            int(i.value) if isinstance(i, I.Const) else self(i) for i in node.indices
        ]
        first = node.indices[0]
        var = first.name if len(node.indices) == 1 and isinstance(first, I.Var) else None

        def run(env: Env) -> Tensor:
            if var is not None and env.grid is not None and var in env.grid:
                if env.parent is not None and base.free.isdisjoint(env.values):
                    # `f(x')[j]` under `forall j`: select the entries on the parent's batch
                    # instead of repeating the whole base K-fold and gathering from the copy.
                    return _select_grid(base(env.parent), *env.grid[var])
            v = base(env)
            for i in idx:
                if isinstance(i, int):
                    v = v[:, i]
                    continue
                j = i(env)
                if j.dim() == 0:
                    v = v[:, int(j)]
                    continue
                at = j.reshape(-1, *([1] * (v.dim() - 1)))
                if v.dim() > 2:
                    at = at.expand(v.shape[0], 1, *v.shape[2:])
                v = v.gather(1, at).squeeze(1)
            return v

        return Lambda(node, free, run)

    def _Fn(self, node: I.Fn, free):
        fn = node.fn
        args = [self(a) for a in node.args]
        if fn == "grad":
            return self._grad(node, free)
        if fn in EXPLAINERS:
            return self._explainer(node, free, args)
        # A subclass compiles a function of its own with a method `_fn_<name>` (looked up here,
        # not by overriding `_Fn`, which would add a frame to every level of a deep expression).
        special = getattr(self, f"_fn_{fn}", None)
        if special is not None:
            return special(node, free)
        impl = FUNCTIONS.get(fn)
        if impl is None:
            raise CompileError(f"'{fn}' has no {self.kind} implementation")
        shapes = [shape_of(a.ty) or () for a in node.args]
        options = dict(node.options)

        def run(env: Env) -> Tensor:
            return impl([a(env) for a in args], shapes, options)

        return Lambda(node, free, run)

    def _grad(self, node: I.Fn, free):
        expr_node, var_node = node.args
        assert isinstance(var_node, I.Var)
        expr = self(expr_node)
        name = var_node.name

        def run(env: Env) -> Tensor:
            owner: Env | None = env
            while owner is not None and name not in owner.values:
                owner = owner.parent
            assert owner is not None
            v = owner.values[name]
            # The expression may read variables bound between the owner and `env` (`j` in
            # `min j in classes: ... grad(f(x)[j], x)`), so it is re-evaluated in a child of
            # `env` with the variable rebound there, expanded to `env`'s batch: one row (and one
            # gradient) per binding. A value free of those variables is lifted by `Code` and
            # never reaches this point with `env is not owner`.
            factor = env.batch // owner.batch
            if factor > 1:
                v = v.repeat_interleave(factor, dim=0)
            leaf = v if v.requires_grad else v.detach().requires_grad_(True)
            sub = env.child({name: leaf})
            with torch.enable_grad():
                out = expr(sub)
                (g,) = torch.autograd.grad(out.sum(), leaf, create_graph=True)
            return g

        return Lambda(node, free, run)

    def _explainer(self, node: I.Fn, free, args):
        x, y = args
        net = str(node.option("net"))
        fn = node.fn
        opts: dict[str, Any] = {k: v for k, v in node.options if k != "net"}

        def run(env: Env) -> Tensor:
            model = env.models[net]
            xv, yv = x(env), y(env)
            with torch.enable_grad():
                return explanation(fn, model, xv, yv, opts, env.config.generator)

        return Lambda(node, free, run)

    def _Cond(self, node: I.Cond, free):
        c, a, b = self(node.cond), self(node.then), self(node.orelse)
        nd = len(shape_of(node.type) or ())

        def run(env: Env) -> Tensor:
            mask = c(env.with_logic(BOOLEAN)).bool()
            av, bv = a(env), b(env)
            sa = tuple(av.shape[1:])
            m = mask.reshape(-1, *([1] * max(nd, len(sa))))
            return torch.where(m, av, bv)

        return Lambda(node, free, run)

    # -- formulas --------------------------------------------------------------------------------
    def _Cmp(self, node: I.Cmp, free):
        a, b = self(node.left), self(node.right)
        op = Cmp(node.op)
        sa, sb = shape_of(node.left.ty), shape_of(node.right.ty)
        if sa is None or sb is None:
            raise CompileError("only numbers and tensors can be compared in a loss")
        nd = max(len(sa), len(sb))
        if isinstance(node.left.ty, IndexTy) or isinstance(node.right.ty, IndexTy):
            # Class indices compare crisply: `j != y` is plainly true or false under every
            # logic (a graded |j - y| would cap the attack's objective and the loss).
            def crisp(env: Env) -> Tensor:
                holds = op.holds(a(env), b(env))
                holds = holds.expand(env.batch) if holds.dim() == 0 else holds
                like = torch.zeros(holds.shape, dtype=env_dtype(env), device=holds.device)
                true, false = env.logic.constant(True, like), env.logic.constant(False, like)
                return torch.where(holds, true, false)

            return Lambda(node, free, crisp)

        def run(env: Env) -> Tensor:
            lv, rv = a(env), b(env)
            if lv.dtype == torch.long or rv.dtype == torch.long:
                lv, rv = lv.to(env_dtype(env)), rv.to(env_dtype(env))
            lv, rv = align(lv, sa, nd), align(rv, sb, nd)
            value = env.logic.atom(op, lv, rv)
            if nd == 0:
                return value
            value = value.expand(env.batch, *value.shape[1:]) if value.dim() > 0 else value
            return env.logic.conj(value.reshape(env.batch, -1), dim=-1)

        return Lambda(node, free, run)

    def _And(self, node: I.And, free):
        items = [self(i) for i in node.items]
        return Lambda(
            node,
            free,
            lambda env: env.logic.conj(torch.stack([as_batch(i(env), env) for i in items], -1), -1),
        )

    def _Or(self, node: I.Or, free):
        items = [self(i) for i in node.items]
        return Lambda(
            node,
            free,
            lambda env: env.logic.disj(torch.stack([as_batch(i(env), env) for i in items], -1), -1),
        )

    def _Not(self, node: I.Not, free):
        inner = node.operand
        if isinstance(inner, I.Linear):
            inner = inner.atom
        if isinstance(inner, I.Cmp):
            # not (every element holds) = some element fails: flipped atoms, disjoined
            a, b = self(inner.left), self(inner.right)
            op = Cmp(inner.op).negated
            sa, sb = shape_of(inner.left.ty) or (), shape_of(inner.right.ty) or ()
            nd = max(len(sa), len(sb))

            def run(env: Env) -> Tensor:
                lv, rv = align(a(env), sa, nd), align(b(env), sb, nd)
                value = env.logic.atom(op, lv, rv)
                if nd == 0:
                    return value
                value = value.expand(env.batch, *value.shape[1:])
                return env.logic.disj(value.reshape(env.batch, -1), dim=-1)

            return Lambda(node, free, run)
        x = self(node.operand)

        def run_neg(env: Env) -> Tensor:
            if env.logic.has_negation:
                return env.logic.neg(x(env))
            raise CompileError(
                f"logic '{env.logic.name}' has no negation of this formula; "
                "rewrite it so that 'not' applies to comparisons only"
            )

        return Lambda(node, free, run_neg)

    def _Implies(self, node: I.Implies, free):
        a, b = self(node.left), self(node.right)
        # For logics without negation: `not a or b` with the negation pushed to the atoms.
        rewritten = self(I.Or((nnf(node.left, True), node.right)))

        def run(env: Env) -> Tensor:
            if env.logic.has_negation:
                return env.logic.implies(a(env), b(env))
            return rewritten(env)

        return Lambda(node, free, run)

    def _Quant(self, node: I.Quant, free):
        if all(isinstance(d, I.Range) for d in node.domains):
            return self._finite(node, free)
        if any(isinstance(d, I.Range) for d in node.domains):
            # split mixed binders: finite ones outermost
            fin = [
                (v, d)
                for v, d in zip(node.vars, node.domains, strict=True)
                if isinstance(d, I.Range)
            ]
            cont = [
                (v, d)
                for v, d in zip(node.vars, node.domains, strict=True)
                if not isinstance(d, I.Range)
            ]
            inner = I.Quant(
                node.kind, tuple(v for v, _ in cont), tuple(d for _, d in cont), node.body
            )
            outer = I.Quant(node.kind, tuple(v for v, _ in fin), tuple(d for _, d in fin), inner)
            return self(outer)
        return self._continuous(node, free)

    def _finite(self, node: I.Quant, free):
        ranges: list[I.Range] = list(node.domains)  # type: ignore[arg-type]
        excludes = [self(r.exclude) if r.exclude is not None else None for r in ranges]
        sizes = [r.k for r in ranges]
        total = math.prod(sizes)
        names = [v.name for v in node.vars]
        kind = node.kind
        if len(names) == 1:
            along = self._along(node.body, names[0], sizes[0])
            if along is not None:
                return self._finite_along(node, free, along, excludes[0])
        body = self(node.body)
        # The expanded bindings depend only on the batch size and device: built once each.
        layouts: dict[tuple[int, torch.device], tuple[dict, dict]] = {}

        def layout(batch: int, device: torch.device) -> tuple[dict, dict]:
            found = layouts.get((batch, device))
            if found is None:
                if len(layouts) > 8:
                    layouts.clear()
                axes = [torch.arange(k, device=device) for k in sizes]
                cols = torch.cartesian_prod(*axes).reshape(total, len(sizes)).unbind(1)
                grid = {n: (stable(c), len(sizes) == 1) for n, c in zip(names, cols, strict=True)}
                values = {n: stable(c.repeat(batch)) for n, c in zip(names, cols, strict=True)}
                found = layouts[(batch, device)] = (values, grid)
            return found

        def run(env: Env) -> Tensor:
            # One expanded env per bindings, kept for the other logic variants of this
            # evaluation (the exact pass reuses the numbers computed on the expanded batch).
            sub = env.recall(id(run))
            if sub is None:
                values, grid = layout(env.batch, env_device(env))
                sub = env.child(dict(values), factor=total)
                sub.grid = grid
                env.keep(id(run), sub)
            elif sub.parent is not env:
                sub = rebind(sub, env)
            out = as_batch(body(sub), sub).reshape(env.batch, total)
            mask = None
            for i, ex in enumerate(excludes):
                if ex is not None:
                    hit = sub.grid[names[i]][0].reshape(1, -1) == ex(env).reshape(-1, 1)
                    mask = hit if mask is None else mask | hit
            if kind == "forall":
                if mask is not None:
                    out = torch.where(mask, env.logic.constant(True, out), out)
                return env.logic.conj(out, -1)
            if kind == "exists":
                if mask is not None:
                    out = torch.where(mask, env.logic.constant(False, out), out)
                return env.logic.disj(out, -1)
            if mask is not None:
                out = out.masked_fill(mask, -math.inf if kind == "max" else math.inf)
            return out.amax(-1) if kind == "max" else out.amin(-1)

        return Lambda(node, free, run)

    def _finite_along(self, node: I.Quant, free, along, exclude: Code | None):
        """`forall j in range(k): body` with the body evaluated along a trailing axis of size k.

        The batch is not expanded: `f(x')[j]` is `f(x')` itself ([B, k]), values that do not
        depend on `j` broadcast as [B, 1]. Same values as the expansion, far fewer operations.
        """
        kind, k = node.kind, node.domains[0].k  # type: ignore[attr-defined]
        fills: dict[tuple[Logic, torch.dtype, torch.device], Tensor] = {}
        excluded = None
        if exclude is not None:
            # [B, k] mask of the excluded value, computed (and cached) where the excluded value
            # is bound: once per batch, not once per attack step.
            cols: dict[torch.device, Tensor] = {}

            def make_mask(env: Env) -> Tensor:
                e = exclude(env)
                col = cols.get(e.device)
                if col is None:
                    col = cols[e.device] = stable(torch.arange(k, device=e.device))
                return col == e.reshape(-1, 1)

            excluded = Lambda(node, exclude.free, make_mask)
            excluded.logical = False

        def run(env: Env) -> Tensor:
            out = along(env)
            out = out.expand(env.batch, k) if out.shape != (env.batch, k) else out
            if excluded is not None:
                mask = excluded(env)
                if kind in ("forall", "exists"):
                    # the unit of the connective, as a 0-dim tensor made once per logic
                    at = (env.logic, out.dtype, out.device)
                    fill = fills.get(at)
                    if fill is None:
                        fill = fills[at] = stable(
                            env.logic.constant(kind == "forall", out.new_zeros(()))
                        )
                    out = out.masked_fill(mask, fill)
                else:
                    out = out.masked_fill(mask, -math.inf if kind == "max" else math.inf)
            if kind == "forall":
                return env.logic.conj(out, -1)
            if kind == "exists":
                return env.logic.disj(out, -1)
            return out.amax(-1) if kind == "max" else out.amin(-1)

        return Lambda(node, free, run)

    def _along(self, node: I.Node, var: str, k: int) -> Callable[[Env], Tensor] | None:
        """An evaluator of `node` for every value of `var` in range(k) at once: env -> [B, k],
        or [B, 1] / a 0-dim tensor where the value does not depend on `var`. None when `node`
        is not made of scalar arithmetic, comparisons and connectives over `base[var]` entries.
        """
        if isinstance(node, I.Linear):
            node = node.atom
        if var not in I.free_vars(node):
            entry = self._entry(node)
            if entry is not None:
                return entry
            if node.ty != BOOL and (isinstance(node.ty, IndexTy) or shape_of(node.ty) != ()):
                return None
            code = self(node)

            def const(env: Env) -> Tensor:
                v = code(env)
                return v.unsqueeze(-1) if v.dim() > 0 else v

            return const
        if isinstance(node, I.Idx):
            (index,) = node.indices if len(node.indices) == 1 else (None,)
            base_shape = shape_of(node.base.ty)
            if (
                isinstance(index, I.Var)
                and index.name == var
                and var not in I.free_vars(node.base)
                and base_shape is not None
                and len(base_shape) == 1
                and base_shape[0] >= k
            ):
                base = self(node.base)
                if base_shape[0] == k:
                    return base
                return lambda env: base(env)[:, :k]
            return None
        if isinstance(node, I.Neg):
            return _map1(self._along(node.operand, var, k), torch.neg)
        if isinstance(node, I.Arith) and shape_of(node.type) == ():
            op = ARITH[node.op]
            return _map2(
                self._along(node.left, var, k),
                self._along(node.right, var, k),
                lambda env, lhs, rhs: op(lhs, rhs),
            )
        if isinstance(node, I.Fn) and node.fn in ELEMENTWISE and shape_of(node.type) == ():
            return _map1(self._along(node.args[0], var, k), ELEMENTWISE[node.fn])
        negate = isinstance(node, I.Not) and isinstance(node.operand, I.Cmp | I.Linear)
        atom = node.operand if isinstance(node, I.Not) and negate else node
        if isinstance(atom, I.Linear):
            atom = atom.atom
        if isinstance(atom, I.Cmp):
            if shape_of(atom.left.ty) != () or shape_of(atom.right.ty) != ():
                return None
            cmp = Cmp(atom.op).negated if negate else Cmp(atom.op)
            return _map2(
                self._along(atom.left, var, k),
                self._along(atom.right, var, k),
                lambda env, lhs, rhs: env.logic.atom(cmp, lhs, rhs),
            )
        if isinstance(node, I.And | I.Or):
            found = [self._along(i, var, k) for i in node.items]
            items = [i for i in found if i is not None]
            if len(items) < len(found):
                return None
            conj = isinstance(node, I.And)

            def connective(env: Env) -> Tensor:
                values = stack([i(env) for i in items], -1)
                return env.logic.conj(values, -1) if conj else env.logic.disj(values, -1)

            return connective
        return None

    def _entry(self, node: I.Node) -> Callable[[Env], Tensor] | None:
        """`v[i]` for a vector `v` and a per-sample index `i` (such as `f(x')[y]`), as [B, 1]."""
        if not (isinstance(node, I.Idx) and len(node.indices) == 1):
            return None
        index, shape = node.indices[0], shape_of(node.base.ty)
        if isinstance(index, I.Const) or not isinstance(index.ty, IndexTy) or shape is None:
            return None
        if len(shape) != 1:
            return None
        base, at = self(node.base), self(index)

        def run(env: Env) -> Tensor:
            i = at(env)
            return base(env).gather(1, i.reshape(-1, 1)) if i.dim() > 0 else base(env)[:, i, None]

        return run

    def _continuous(self, node: I.Quant, free):
        names = ", ".join(v.name for v in node.vars)
        raise CompileError(
            f"'{node.kind}' over the region of {names} has no exact evaluation (a loss solves "
            "it with an attack, the verifier with bounds)"
        )


class Lambda(Code):
    """A compiled node evaluated by a function of the environment."""

    def __init__(self, node: I.Node, free: frozenset[str], fn: Callable[[Env], Any]):
        super().__init__(node, free)
        self.fn = fn

    def run(self, env: Env) -> Tensor:
        return self.fn(env)


def _map1(
    x: Callable[[Env], Tensor] | None, fn: Callable[[Tensor], Tensor]
) -> Callable[[Env], Tensor] | None:
    if x is None:
        return None
    return lambda env: fn(x(env))


def _map2(
    a: Callable[[Env], Tensor] | None,
    b: Callable[[Env], Tensor] | None,
    fn: Callable[[Env, Tensor, Tensor], Tensor],
) -> Callable[[Env], Tensor] | None:
    if a is None or b is None:
        return None
    return lambda env: fn(env, a(env), b(env))


def _select_grid(v: Tensor, col: Tensor, whole: bool) -> Tensor:
    """`v[b, col[t]]` for every parent row b and grid point t, flattened to [B * T, ...]."""
    if not whole or v.shape[1] != col.shape[0]:
        v = v.index_select(1, col)
    return v.reshape(-1, *v.shape[2:])


def _like(env: Env) -> Tensor:
    dtype = torch.bool if env.logic is BOOLEAN else env_dtype(env)
    return torch.zeros(env.batch, dtype=dtype, device=env_device(env))
