"""Compile normalised IR into batched torch computations under a differentiable logic.

The IR is compiled once into a tree of closures (equal sub-expressions share one closure), then
run per batch. Every value carries the batch as its first dimension; finite quantifiers
(`forall j in classes`) are vectorised: along a trailing axis of size K when the body is scalar
arithmetic and comparisons over entries `v[j]` (`f(x')[j]` is then `f(x')` itself), otherwise
by expanding the batch K-fold, where sub-expressions that do not mention the expanded variable
are computed once on the smaller batch and repeated.
Quantifiers over balls and boxes are solved by an attack (PGD / APGD) that maximises the body's
signed violation (logic `violation`: raw margins, so it keeps gradients where the property
holds); the chosen logic then evaluates the body at the attack's points, and the exact
(`boolean`) pass that reports `satisfied` reuses the same points and network outputs.
See docs/losses.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from propdsl import explain
from propdsl import ir as I
from propdsl.errors import UsageError
from propdsl.logics import Cmp, Logic, get_logic, stack
from propdsl.loss.attacks import APGD, PGD, run_attack
from propdsl.region import Region, lp_norm
from propdsl.simplify import nnf
from propdsl.types import BOOL, IndexTy, shape_of

VIOLATION = get_logic("violation")
BOOLEAN = get_logic("boolean")

Attack = PGD | APGD


class CompileError(UsageError):
    """A formula that this backend cannot turn into a loss (with the reason)."""


# -- runtime environment -------------------------------------------------------------------------
class Env:
    """Variable bindings for one evaluation: tensors with the batch first.

    `parent` is the enclosing environment; `factor` > 1 means this environment's batch is the
    parent's repeated `factor` times (a vectorised finite quantifier), so values computed in the
    parent are `repeat_interleave`d on the way down.

    Two caches: `cache` holds formula values (they depend on the logic), `shared` holds numbers
    (network outputs, norms, saliency maps), which are the same under every logic and are shared
    by the logic variants of one evaluation (`with_logic(..., share=True)`): the exact Boolean
    pass that reports `satisfied` reuses the loss pass's network outputs instead of recomputing
    them. The attack's variant (`share=False`) computes its own, as it runs the models in eval
    mode.

    `store` (one per evaluation, shared by every env of it) remembers the envs that quantifiers
    derive from an env: the attack's points and the finite quantifiers' expanded bindings, so
    that every logic variant evaluates the body at the same points with the same numbers.
    Only envs with `remember` set write to it; the attack's objective envs do not (their values
    are used once, and keeping them would keep every step's graph alive).
    """

    __slots__ = (
        "models",
        "values",
        "batch",
        "logic",
        "config",
        "parent",
        "factor",
        "cache",
        "shared",
        "store",
        "found",
        "grid",
        "remember",
    )

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        values: dict[str, Tensor],
        batch: int,
        logic: Logic,
        config: CompileConfig,
        parent: Env | None = None,
        factor: int = 1,
        *,
        shared: dict[int, Tensor] | None = None,
        remember: bool | None = None,
    ):
        self.models = models
        self.values = values
        self.batch = batch
        self.logic = logic
        self.config = config
        self.parent = parent
        self.factor = factor
        self.cache: dict[int, Tensor] = {}
        self.shared: dict[int, Tensor] = {} if shared is None else shared
        self.store: dict[tuple[int, int], Any] = parent.store if parent is not None else {}
        # the attack points of this evaluation: (logic, names, points), for counterexamples
        # and the mask of samples whose region is empty (None: none is)
        self.found: list[tuple[Logic, tuple[str, ...], tuple[Tensor, ...], Tensor | None]] = (
            parent.found if parent is not None else []
        )
        # finite quantifier envs: variable -> (its index per parent row [factor], is arange(k))
        self.grid: dict[str, tuple[Tensor, bool]] | None = None
        if remember is None:
            remember = parent.remember if parent is not None else True
        self.remember: bool = remember

    def child(
        self, values: dict[str, Tensor], factor: int = 1, *, shared: dict | None = None
    ) -> Env:
        return Env(
            self.models,
            values,
            self.batch * factor,
            self.logic,
            self.config,
            parent=self,
            factor=factor,
            shared=shared,
        )

    def with_logic(self, logic: Logic, *, share: bool = True) -> Env:
        """The same bindings (the whole chain of parents) under another logic.

        Formula caches are fresh (values depend on the logic). With `share`, numbers are shared
        with this env's chain; without, the new chain computes its own and remembers nothing.
        """
        if logic is self.logic and share:
            return self
        parent = self.parent.with_logic(logic, share=share) if self.parent is not None else None
        env = Env(
            self.models,
            self.values,
            self.batch,
            logic,
            self.config,
            parent,
            self.factor,
            shared=self.shared if share else None,
            remember=self.remember and share,
        )
        if parent is None:
            env.store, env.found = self.store, self.found
        env.grid = self.grid
        return env

    def recall(self, key: int) -> Any:
        """What `remember(key, ...)` stored for an env with the same bindings, or None."""
        found = self.store.get((key, id(self.shared))) if self.remember else None
        # The stored env's `shared` dict is kept alive by the record, so its id cannot have been
        # reused by another dict.
        return found[1] if found is not None and found[0] is self.shared else None

    def keep(self, key: int, record: Any) -> None:
        if self.remember:
            self.store[(key, id(self.shared))] = (self.shared, record)


@dataclass(frozen=True, kw_only=True)
class CompileConfig:
    attack: Attack = PGD()
    generator: torch.Generator | None = None
    radius_scale: float = 1.0  # the eps ramp-up of training multiplies every ball's radius


# -- compiled closures ---------------------------------------------------------------------------
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


class Compiler:
    """IR -> closures, hash-consed by structural equality of the nodes.

    `properties` are the formulas that `PropTerm`s (a property named in a train block's loss)
    refer to; `property_params` their parameter names, bound to the objective's `x` and `y`.
    """

    def __init__(
        self,
        properties: Mapping[str, I.Node] | None = None,
        *,
        property_params: Mapping[str, Sequence[str]] | None = None,
    ):
        self.memo: dict[I.Node, Code] = {}
        self.properties = dict(properties or {})
        self.property_params = {k: tuple(v) for k, v in (property_params or {}).items()}
        self.prop_codes: dict[str, Code] = {}

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
            raise CompileError(f"cannot compile {type(node).__name__} into a loss")
        code = builder(node, free)
        code.logical = _logical(node)
        return code

    # -- leaves ----------------------------------------------------------------------------------
    def _Const(self, node: I.Const, free):
        value = node.value
        if node.ty == BOOL:
            return _Lambda(node, free, lambda env: env.logic.constant(bool(value), _like(env)))
        if isinstance(node.ty, IndexTy):
            return _Lambda(
                node,
                free,
                lambda env: torch.full(
                    (env.batch,), int(value), dtype=torch.long, device=_device(env)
                ),
            )
        return _Lambda(
            node,
            free,
            lambda env: torch.tensor(float(value), dtype=_dtype(env), device=_device(env)),
        )

    def _Var(self, node: I.Var, free):
        name = node.name
        return _Lambda(node, free, lambda env: _lookup(env, name))

    def _ParamRef(self, node: I.ParamRef, free):
        raise CompileError(f"parameter '{node.name}' was not substituted")

    def _PropTerm(self, node: I.PropTerm, free):
        if node.name not in self.properties:
            raise CompileError(f"unknown property '{node.name}'")
        if node.name not in self.prop_codes:
            self.prop_codes[node.name] = self(self.properties[node.name])
        body = self.prop_codes[node.name]
        params = self.property_params.get(node.name, ())
        data = ("x", "y")[: len(params)]
        if params == data:
            return _Lambda(node, free | body.free, lambda env: env.logic.loss(body(env)))
        # `property p(img, label)` in a loss: bind its parameters to the sample's x and y.
        # (Binding in an env, not renaming the IR, so that a quantified `x` inside stays itself.)
        outer = frozenset(data)

        def run(env: Env) -> Tensor:
            values = {p: _lookup(env, d) for p, d in zip(params, data, strict=True)}
            return env.logic.loss(body(env.child(values)))

        return _Lambda(node, free | outer, run)

    # -- numbers ---------------------------------------------------------------------------------
    def _Apply(self, node: I.Apply, free):
        arg = self(node.arg)
        net = node.net

        def run(env: Env) -> Tensor:
            return env.models[net](arg(env))

        return _Lambda(node, free, run)

    def _Neg(self, node: I.Neg, free):
        x = self(node.operand)
        return _Lambda(node, free, lambda env: -x(env))

    def _Arith(self, node: I.Arith, free):
        a, b = self(node.left), self(node.right)
        sa, sb = shape_of(node.left.ty) or (), shape_of(node.right.ty) or ()
        nd = len(shape_of(node.type) or ())
        op = _ARITH[node.op]

        def run(env: Env) -> Tensor:
            return op(_align(a(env), sa, nd), _align(b(env), sb, nd))

        return _Lambda(node, free, run)

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

        return _Lambda(node, free, run)

    def _Fn(self, node: I.Fn, free):
        fn = node.fn
        args = [self(a) for a in node.args]
        if fn == "grad":
            return self._grad(node, free)
        if fn in ("saliency", "gradient_x_input", "integrated_gradients", "smoothgrad"):
            return self._explainer(node, free, args)
        if fn == "certified":
            try:
                from propdsl.loss.certified import compile_certified
            except ModuleNotFoundError as err:
                if err.name != "propdsl.loss.certified":
                    raise
                raise CompileError("certified training is not available in this build") from None
            return _Lambda(node, free, compile_certified(node, self))
        impl = _FUNCTIONS.get(fn)
        if impl is None:
            raise CompileError(f"'{fn}' has no loss implementation")
        shapes = [shape_of(a.ty) or () for a in node.args]
        options = dict(node.options)

        def run(env: Env) -> Tensor:
            return impl([a(env) for a in args], shapes, options)

        return _Lambda(node, free, run)

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
            leaf = v if v.requires_grad else v.detach().requires_grad_(True)
            # Re-evaluate the expression with the variable as a differentiable leaf.
            sub = owner.child({name: leaf})
            with torch.enable_grad():
                out = expr(sub)
                (g,) = torch.autograd.grad(out.sum(), leaf, create_graph=True)
            if env is not owner:
                factor = env.batch // owner.batch
                g = g.repeat_interleave(factor, dim=0) if factor > 1 else g
            return g

        return _Lambda(node, free, run)

    def _explainer(self, node: I.Fn, free, args):
        x, y = args
        net = str(node.option("net"))
        fn = node.fn
        opts: dict[str, Any] = {k: v for k, v in node.options if k != "net"}

        def run(env: Env) -> Tensor:
            model = env.models[net]
            xv, yv = x(env), y(env)
            with torch.enable_grad():
                if fn == "saliency":
                    return explain.saliency(model, xv, yv)
                if fn == "gradient_x_input":
                    return explain.gradient_x_input(model, xv, yv)
                if fn == "integrated_gradients":
                    baseline = opts.get("baseline")
                    base = None if baseline is None else torch.full_like(xv, float(baseline))
                    return explain.integrated_gradients(
                        model, xv, yv, baseline=base, steps=int(opts.get("steps", 64))
                    )
                return explain.smoothgrad(
                    model,
                    xv,
                    yv,
                    noise=float(opts.get("noise", 0.1)),
                    samples=int(opts.get("samples", 16)),
                    generator=env.config.generator,
                )

        return _Lambda(node, free, run)

    def _Cond(self, node: I.Cond, free):
        c, a, b = self(node.cond), self(node.then), self(node.orelse)
        nd = len(shape_of(node.type) or ())

        def run(env: Env) -> Tensor:
            mask = c(env.with_logic(BOOLEAN)).bool()
            av, bv = a(env), b(env)
            sa = tuple(av.shape[1:])
            m = mask.reshape(-1, *([1] * max(nd, len(sa))))
            return torch.where(m, av, bv)

        return _Lambda(node, free, run)

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
                like = torch.zeros(holds.shape, dtype=_dtype(env), device=holds.device)
                true, false = env.logic.constant(True, like), env.logic.constant(False, like)
                return torch.where(holds, true, false)

            return _Lambda(node, free, crisp)

        def run(env: Env) -> Tensor:
            lv, rv = a(env), b(env)
            if lv.dtype == torch.long or rv.dtype == torch.long:
                lv, rv = lv.to(_dtype(env)), rv.to(_dtype(env))
            lv, rv = _align(lv, sa, nd), _align(rv, sb, nd)
            value = env.logic.atom(op, lv, rv)
            if nd == 0:
                return value
            value = value.expand(env.batch, *value.shape[1:]) if value.dim() > 0 else value
            return env.logic.conj(value.reshape(env.batch, -1), dim=-1)

        return _Lambda(node, free, run)

    def _And(self, node: I.And, free):
        items = [self(i) for i in node.items]
        return _Lambda(
            node,
            free,
            lambda env: env.logic.conj(torch.stack([_b(i(env), env) for i in items], -1), -1),
        )

    def _Or(self, node: I.Or, free):
        items = [self(i) for i in node.items]
        return _Lambda(
            node,
            free,
            lambda env: env.logic.disj(torch.stack([_b(i(env), env) for i in items], -1), -1),
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
                lv, rv = _align(a(env), sa, nd), _align(b(env), sb, nd)
                value = env.logic.atom(op, lv, rv)
                if nd == 0:
                    return value
                value = value.expand(env.batch, *value.shape[1:])
                return env.logic.disj(value.reshape(env.batch, -1), dim=-1)

            return _Lambda(node, free, run)
        x = self(node.operand)

        def run_neg(env: Env) -> Tensor:
            if env.logic.has_negation:
                return env.logic.neg(x(env))
            raise CompileError(
                f"logic '{env.logic.name}' has no negation of this formula; "
                "rewrite it so that 'not' applies to comparisons only"
            )

        return _Lambda(node, free, run_neg)

    def _Implies(self, node: I.Implies, free):
        a, b = self(node.left), self(node.right)
        # For logics without negation: `not a or b` with the negation pushed to the atoms.
        rewritten = self(I.Or((nnf(node.left, True), node.right)))

        def run(env: Env) -> Tensor:
            if env.logic.has_negation:
                return env.logic.implies(a(env), b(env))
            return rewritten(env)

        return _Lambda(node, free, run)

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
                grid = {n: (c, len(sizes) == 1) for n, c in zip(names, cols, strict=True)}
                values = {n: c.repeat(batch) for n, c in zip(names, cols, strict=True)}
                found = layouts[(batch, device)] = (values, grid)
            return found

        def run(env: Env) -> Tensor:
            # One expanded env per bindings, kept for the other logic variants of this
            # evaluation (the exact pass reuses the numbers computed on the expanded batch).
            sub = env.recall(id(run))
            if sub is None:
                values, grid = layout(env.batch, _device(env))
                sub = env.child(dict(values), factor=total)
                sub.grid = grid
                env.keep(id(run), sub)
            elif sub.parent is not env:
                sub = _rebind(sub, env)
            out = _b(body(sub), sub).reshape(env.batch, total)
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

        return _Lambda(node, free, run)

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
                    col = cols[e.device] = torch.arange(k, device=e.device)
                return col == e.reshape(-1, 1)

            excluded = _Lambda(node, exclude.free, make_mask)
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
                        fill = fills[at] = env.logic.constant(kind == "forall", out.new_zeros(()))
                    out = torch.where(mask, fill, out)
                else:
                    out = out.masked_fill(mask, -math.inf if kind == "max" else math.inf)
            if kind == "forall":
                return env.logic.conj(out, -1)
            if kind == "exists":
                return env.logic.disj(out, -1)
            return out.amax(-1) if kind == "max" else out.amin(-1)

        return _Lambda(node, free, run)

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
            op = _ARITH[node.op]
            return _map2(
                self._along(node.left, var, k),
                self._along(node.right, var, k),
                lambda env, lhs, rhs: op(lhs, rhs),
            )
        if isinstance(node, I.Fn) and node.fn in _ELEMENTWISE and shape_of(node.type) == ():
            return _map1(self._along(node.args[0], var, k), _ELEMENTWISE[node.fn])
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
        body = self(node.body)
        domains = [self._domain(d) for d in node.domains]
        names = tuple(v.name for v in node.vars)
        negate = node.kind in ("exists", "min")  # the attack maximises

        def run(env: Env) -> Tensor:
            record = env.recall(id(run))
            if record is None:
                regions = [d(env) for d in domains]
                # The attack's own chain: the `violation` logic, numbers computed afresh (the
                # models run in eval mode during the attack), nothing remembered.
                violation_env = env.with_logic(VIOLATION, share=False)

                def objective(*pts: Tensor) -> Tensor:
                    value = body(violation_env.child(dict(zip(names, pts, strict=True))))
                    return -value if negate else value

                result = run_attack(
                    env.config.attack,
                    objective,
                    regions,
                    models=list(env.models.values()),
                    generator=env.config.generator,
                )
                empty = result.empty
                if empty is not None and not bool(empty.any()):
                    empty = None
                if empty is not None:
                    _warn_empty(names, node.kind)
                sub = env.child(dict(zip(names, result.points, strict=True)))
                env.keep(id(run), (sub, empty))
                if env.remember:
                    env.found.append((env.logic, names, result.points, empty))
            else:
                sub, empty = record
                if sub.parent is not env:
                    sub = _rebind(sub, env)
            value = body(sub)
            if empty is None:
                return value
            # Over an empty region the quantifier is vacuous: `forall` is true, `exists` false,
            # `max` -inf and `min` +inf (the bounds of an empty set), whatever the placeholder
            # point gives; `where` passes no gradient to the placeholder's value.
            if node.kind in ("forall", "exists"):
                fill = env.logic.constant(node.kind == "forall", value)
            else:
                fill = torch.full_like(value, -math.inf if node.kind == "max" else math.inf)
            return torch.where(_col(empty, value), fill, value)

        return _Lambda(node, free, run)

    def _domain(self, d: I.Domain) -> Callable[[Env], Region]:
        parts = d.parts if isinstance(d, I.Inter) else (d,)
        balls = [p for p in parts if isinstance(p, I.Ball)]
        boxes = [p for p in parts if isinstance(p, I.Box)]
        if len(balls) > 1:
            raise CompileError("an intersection of two balls is not supported by the attack")
        ball = balls[0] if balls else None
        ball_code = (self(ball.centre), self(ball.radius)) if ball else None
        box_codes = [(self(b.lo), self(b.hi)) for b in boxes]

        def run(env: Env) -> Region:
            region: Region | None = None
            if ball_code is not None:
                assert ball is not None
                centre = ball_code[0](env).detach()
                radius = ball_code[1](env).detach() * env.config.radius_scale
                region = Region.ball(centre, radius.reshape(-1) if radius.dim() else radius, ball.p)
            for lo_c, hi_c in box_codes:
                lo, hi = lo_c(env).detach(), hi_c(env).detach()
                if region is None:
                    like_shape = _region_shape(d, env)
                    region = Region.box(
                        lo.expand(like_shape).clone(), hi.expand(like_shape).clone()
                    )
                else:
                    region = region.intersect_box(lo, hi)
            assert region is not None
            return region

        return run


def _region_shape(d: I.Domain, env: Env) -> tuple[int, ...]:
    shape = d.shape or ()
    return (env.batch, *shape)


class _Lambda(Code):
    def __init__(self, node: I.Node, free: frozenset[str], fn: Callable[[Env], Any]):
        super().__init__(node, free)
        self.fn = fn

    def run(self, env: Env) -> Tensor:
        return self.fn(env)


# -- helpers ------------------------------------------------------------------------------------
def _lookup(env: Env, name: str) -> Tensor:
    e: Env | None = env
    while e is not None:
        if name in e.values:
            return e.values[name]
        e = e.parent
    raise CompileError(f"variable '{name}' is not bound")


def _col(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


class EmptyRegionWarning(UserWarning):
    """A quantifier ranged over an empty region for some samples (the ball misses the box):
    it took its vacuous value there (`forall` true, `exists` false)."""


def _warn_empty(names: tuple[str, ...], kind: str) -> None:
    # One message per quantifier kind and variables: the default filter shows it once.
    meaning = {
        "forall": "true there (no loss)",
        "exists": "false there (a constant loss without gradient)",
        "max": "-inf there",
        "min": "+inf there",
    }[kind]
    warnings.warn(
        f"the region of {', '.join(names)} is empty for some samples (the ball does not meet "
        f"the box: are the data in the box's units?); '{kind}' over it is {meaning}",
        EmptyRegionWarning,
        stacklevel=2,
    )


def _rebind(sub: Env, env: Env) -> Env:
    """`sub` (derived from another logic variant of `env`) as a child of `env`."""
    new = Env(
        env.models,
        sub.values,
        sub.batch,
        env.logic,
        env.config,
        env,
        sub.factor,
        shared=sub.shared,
    )
    new.grid = sub.grid
    return new


def _logical(node: I.Node) -> bool:
    """Whether the node's value depends on the logic (formulas, and losses of properties)."""
    if node.ty == BOOL:
        return True
    return any(
        isinstance(n, I.PropTerm) or (isinstance(n, I.Fn) and n.fn == "certified")
        for n in I.walk(node)
    )


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


def _b(value: Tensor, env: Env) -> Tensor:
    """A Bool value broadcast to the batch."""
    if value.dim() == 0:
        return value.expand(env.batch)
    return value


def _like(env: Env) -> Tensor:
    dtype = torch.bool if env.logic is BOOLEAN else _dtype(env)
    return torch.zeros(env.batch, dtype=dtype, device=_device(env))


def _first_tensor(env: Env) -> Tensor | None:
    e: Env | None = env
    while e is not None:
        for v in e.values.values():
            if isinstance(v, Tensor) and v.is_floating_point():
                return v
        e = e.parent
    return None


def _dtype(env: Env) -> torch.dtype:
    t = _first_tensor(env)
    return t.dtype if t is not None else torch.get_default_dtype()


def _device(env: Env) -> torch.device:
    t = _first_tensor(env)
    return t.device if t is not None else torch.device("cpu")


def _align(v: Tensor, shape: tuple[int, ...], nd: int) -> Tensor:
    """[B, *shape] -> [B, 1.., *shape] with `nd` trailing dims, for broadcasting."""
    if v.dim() == 0 or len(shape) >= nd:
        return v
    return v.reshape(v.shape[0], *([1] * (nd - len(shape))), *shape)


def _flat(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1) if v.dim() > 1 else v.reshape(-1, 1)


def _reduce_all(v: Tensor, how: str) -> Tensor:
    if v.dim() <= 1:
        return v
    flat = v.reshape(v.shape[0], -1)
    return {"sum": flat.sum(1), "mean": flat.mean(1), "max": flat.amax(1), "min": flat.amin(1)}[how]


def _kl(p: Tensor, q: Tensor) -> Tensor:
    p, q = _flat(p), _flat(q)
    tiny = torch.finfo(p.dtype).tiny
    return (p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum(1)


_ARITH: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "+": torch.add,
    "-": torch.sub,
    "*": torch.mul,
    "/": torch.div,
    "^": torch.pow,
    "max": torch.maximum,
    "min": torch.minimum,
}


def _norm(args, shapes, opts):
    v = args[0]
    if v.dim() <= 1:
        return v.abs()
    return lp_norm(v, float(opts["p"]))


_ELEMENTWISE: dict[str, Callable[[Tensor], Tensor]] = {
    "abs": torch.abs,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
}

_FUNCTIONS: dict[str, Callable[[list[Tensor], list[tuple[int, ...]], dict], Tensor]] = {
    "abs": lambda a, s, o: a[0].abs(),
    "exp": lambda a, s, o: a[0].exp(),
    "log": lambda a, s, o: a[0].log(),
    "sqrt": lambda a, s, o: a[0].sqrt(),
    "sigmoid": lambda a, s, o: torch.sigmoid(a[0]),
    "tanh": lambda a, s, o: torch.tanh(a[0]),
    "relu": lambda a, s, o: torch.relu(a[0]),
    "softmax": lambda a, s, o: torch.softmax(a[0], dim=-1),
    "log_softmax": lambda a, s, o: torch.log_softmax(a[0], dim=-1),
    "sum": lambda a, s, o: _reduce_all(a[0], "sum"),
    "mean": lambda a, s, o: _reduce_all(a[0], "mean"),
    "max": lambda a, s, o: _reduce_all(a[0], "max"),
    "min": lambda a, s, o: _reduce_all(a[0], "min"),
    "argmax": lambda a, s, o: a[0].argmax(dim=-1),
    "argmin": lambda a, s, o: a[0].argmin(dim=-1),
    "norm": _norm,
    "clamp": lambda a, s, o: torch.clamp(
        a[0], _align(a[1], (), len(s[0])), _align(a[2], (), len(s[0]))
    ),
    "dot": lambda a, s, o: (_flat(a[0]) * _flat(a[1])).sum(1),
    "cosine": lambda a, s, o: explain.cosine(a[0], a[1]),
    "pearson": lambda a, s, o: explain.pearson(a[0], a[1]),
    "mse": lambda a, s, o: explain.mse(a[0], a[1]),
    "kl": lambda a, s, o: _kl(a[0], a[1]),
    "topk_overlap": lambda a, s, o: explain.topk_intersection(a[0], a[1], int(o["k"])),
    "cross_entropy": lambda a, s, o: F.cross_entropy(a[0], a[1].long(), reduction="none"),
}


# -- public modules ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossOutput:
    """Per-sample results of a property loss on a batch.

    Attributes:
        loss: Tensor[B], >= 0, 0 where the logic says the property holds at the attack's points.
        satisfied: BoolTensor[B], the exact truth of the body at the attack's points.
        value: Tensor[B], the logic's value (truth degree or DL2 loss) of the property.
        counterexample: the attack's points per quantified variable (name -> Tensor[B, ...]),
            empty when the property has no quantifier over a region. NaN rows where the
            variable's region is empty (there is no point to report).
        empty: per quantified variable (the keys of `counterexample`), BoolTensor[B]: its region
            is empty for the sample, and its quantifier took the vacuous value there (`forall`
            true, `exists` false).
        all_empty: BoolTensor[B]: every quantifier over a region that the property evaluated for
            the sample ranged over an empty region, so `satisfied` is exact there: no attack
            point entered it. False where the property has no quantifier over a region, or one
            under a finite quantifier (K regions per sample).
    """

    loss: Tensor
    satisfied: Tensor
    value: Tensor
    counterexample: dict[str, Tensor]
    empty: dict[str, Tensor] = field(default_factory=dict)
    all_empty: Tensor | None = None


def resolve_logic(logic: str | Logic | Any) -> Logic:
    if isinstance(logic, Logic):
        return logic
    name, kwargs = _option(logic)
    return get_logic(name, **kwargs)


def resolve_attack(attack: Attack | Any | None) -> Attack:
    if attack is None:
        return PGD()
    if isinstance(attack, (PGD, APGD)):
        return attack
    name, kwargs = _option(attack)
    if name == "pgd":
        return PGD(**kwargs)
    if name == "apgd":
        return APGD(**kwargs)
    raise UsageError(f"unknown attack '{name}'; known attacks: pgd, apgd")


def _option(value: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(value, str):
        return value, {}
    name = getattr(value, "name", None)
    if name is not None and hasattr(value, "kw"):
        return name, value.kw()
    raise UsageError(f"expected a name or an option value, got {value!r}")


def _models(model: nn.Module | Mapping[str, nn.Module], networks: Sequence[str]):
    if isinstance(model, nn.Module):
        if len(networks) > 1:
            raise UsageError(
                f"the spec has {len(networks)} networks ({', '.join(networks)}): "
                "pass a dict of models by name"
            )
        return {n: model for n in networks} or {"f": model}
    missing = [n for n in networks if n not in model]
    if missing:
        raise UsageError(f"no model given for network(s): {', '.join(missing)}")
    return dict(model)


class PropertyLoss(nn.Module):
    """A compiled property: `forward(model, x, y)` -> `LossOutput` (per-sample, batched)."""

    def __init__(
        self,
        name: str,
        formula: I.Node,
        params: Sequence[str],
        networks: Sequence[str],
        logic: Logic,
        attack: Attack,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.name = name
        self.formula = formula
        self.params = tuple(params)
        self.networks = tuple(networks)
        self.logic = logic
        self.attack = attack
        self.generator = generator
        self.radius_scale = 1.0
        self.code = Compiler()(formula)
        self.quantified = [
            v.name
            for n in I.walk(formula)
            if isinstance(n, I.Quant) and n.kind in ("forall", "exists")
            for v, d in zip(n.vars, n.domains, strict=True)
            if not isinstance(d, I.Range)
        ]

    def env(self, model, x: Tensor, y: Tensor | None, logic: Logic) -> Env:
        values: dict[str, Tensor] = {}
        for i, p in enumerate(self.params):
            if i == 0:
                values[p] = x
            elif i == 1:
                if y is None:
                    raise UsageError(f"property '{self.name}' needs labels y")
                values[p] = y
        config = CompileConfig(
            attack=self.attack, generator=self.generator, radius_scale=self.radius_scale
        )
        return Env(_models(model, self.networks), values, x.shape[0], logic, config)

    def forward(self, model, x: Tensor, y: Tensor | None = None) -> LossOutput:
        env = self.env(model, x, y, self.logic)
        value = _b(self.code(env), env)
        points: dict[str, Tensor] = {}
        empty: dict[str, Tensor] = {}
        batch = x.shape[0]
        records = [r for r in env.found if r[0] is self.logic]  # the points the loss was at
        all_empty = torch.full((batch,), bool(records), dtype=torch.bool, device=x.device)
        for _, names, pts, none_in in records:
            mask = torch.zeros(pts[0].shape[0], dtype=torch.bool, device=pts[0].device)
            if none_in is not None:
                mask = none_in
            if mask.shape[0] == batch:
                all_empty = all_empty & mask
            else:  # K regions per sample (under a finite quantifier): not tracked per sample
                all_empty = torch.zeros_like(all_empty)
            for name, p in zip(names, pts, strict=True):
                if name in points:
                    continue
                # No point to report where the region is empty: the placeholder is not in it.
                points[name] = p if none_in is None else p.masked_fill(_col(mask, p), math.nan)
                empty[name] = mask
        with torch.no_grad():
            # The exact truth at the same points, reusing the numbers of the loss pass.
            exact = env.with_logic(BOOLEAN)
            satisfied = _b(self.code(exact), exact).bool()
        return LossOutput(self.logic.loss(value), satisfied, value, points, empty, all_empty)


class Objective(nn.Module):
    """The train block's `loss` expression: `forward(model, x, y)` -> scalar (batch mean).

    `last_terms` holds the batch mean of each top-level additive term of the last call.
    """

    def __init__(
        self,
        expr: I.Node,
        properties: Mapping[str, I.Node],
        networks: Sequence[str],
        logic: Logic,
        attack: Attack,
        *,
        terms: Sequence[tuple[str, I.Node]] = (),
        property_params: Mapping[str, Sequence[str]] | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.expr = expr
        self.networks = tuple(networks)
        self.logic = logic
        self.attack = attack
        self.generator = generator
        compiler = Compiler(properties, property_params=property_params)
        self.code = compiler(expr)
        self.term_codes = [(label, compiler(node)) for label, node in terms]
        self.last_terms: dict[str, float] = {}
        self.radius_scale = 1.0

    def forward(self, model, x: Tensor, y: Tensor) -> Tensor:
        config = CompileConfig(
            attack=self.attack, generator=self.generator, radius_scale=self.radius_scale
        )
        env = Env(_models(model, self.networks), {"x": x, "y": y}, x.shape[0], self.logic, config)
        per_sample = _b(self.code(env), env)
        self.last_terms = {
            label: float(_b(code(env), env).detach().mean()) for label, code in self.term_codes
        }
        return per_sample.mean()
