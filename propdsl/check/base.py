"""The checker's shared state: diagnostics and the limits on what a spec can make it do.

`CheckerBase` holds what every part of the checker reads and writes (the diagnostics, the
declarations checked so far, the work spent); the parts are mixins over it (names and scopes,
declarations, expressions, built-ins, blocks) composed into `Checker` (`propdsl.check.checker`).
The methods one part calls on another are declared here, so that each part type-checks alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from propdsl import ast as A
from propdsl import ir as I
from propdsl.check.constants import NOT_CONST, eval_const
from propdsl.check.results import BlockInfo, PropertyInfo
from propdsl.registry import Kind, Kw
from propdsl.source import Diagnostic, Source, Span, suggest
from propdsl.types import NetworkTy, Ty

if TYPE_CHECKING:
    from propdsl.check.scope import FunEntry, Scope

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


class Limit(Exception):
    """A work limit crossed: the declaration being checked is abandoned (see `spend`)."""

    def __init__(self, diagnostic: Diagnostic, entries: tuple[FunEntry, ...], fatal: bool):
        super().__init__(diagnostic.message)
        self.diagnostic = diagnostic
        self.entries = entries  # the definitions being expanded when it was crossed
        self.fatal = fatal  # the whole spec's limit: nothing more is checked


class ErrTy(Ty):
    """The type of an expression already reported as wrong: its uses stay quiet."""

    def show(self) -> str:
        return "<error>"


ERR = ErrTy()


class CheckerBase:
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
    def error(
        self, message: str, span: Span | None, hint: str | None = None, notes: Iterable[str] = ()
    ) -> Ty:
        if len(self.diags) < MAX_DIAGNOSTICS:
            self.diags.append(Diagnostic(message, span, hint, notes=tuple(notes) + self.context()))
        return ERR

    def context(self) -> tuple[str, ...]:
        """Notes naming the definitions being expanded, innermost first (a long chain cut)."""
        names = [f"while expanding '{name}'" for name in reversed(self._expanding)]
        if len(names) > 6:
            names = [*names[:3], f"... {len(names) - 5} more expansions", *names[-2:]]
        return tuple(names)

    def did_you_mean(
        self, name: str, candidates: Iterable[str] | Callable[[], Iterable[str]]
    ) -> str | None:
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

    def limit(self, message: str, span: Span | None, hint: str, fatal: bool = False) -> Limit:
        notes = self.context()
        if notes and self._declaring:
            # the chain of expansions began in this declaration
            notes += (f"while checking '{self._declaring}'",)
        diagnostic = Diagnostic(message, span, hint, notes=notes)
        return Limit(diagnostic, tuple(self._expanding_entries), fatal)

    def within_limits(self, check: Callable[[], Any]) -> Any:
        """`check()` for one declaration, under its own expansion budget. A crossed limit is
        reported and abandons the declaration: "limit" (or "fatal" for the whole spec's limit,
        after which nothing more is checked) is returned instead of the result."""
        self._spent = 0
        try:
            return check()
        except Limit as limit:
            if len(self.diags) < MAX_DIAGNOSTICS:
                self.diags.append(limit.diagnostic)
            # Its other uses stay quiet: the first report is enough and each would cost the
            # budget again. Marked here, not on the entries: the prelude's are shared by every
            # spec loaded in the process.
            self._quiet.update(id(entry) for entry in limit.entries)
            return "fatal" if limit.fatal else "limit"

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

    # -- constants -------------------------------------------------------------------------------
    def const(self, node: I.Node) -> Any:
        """`eval_const` memoised per node object (a constant is evaluated once, not once per
        enclosing expression)."""
        return eval_const(node, self.params, self._consts)

    def const_of(self, node: I.Node, span: Span | None, what: str) -> Any:
        """The constant value of `node`, or None after an error saying it must be one."""
        v = self.const(node)
        if v is NOT_CONST:
            self.error(f"{what} must be a constant", span)
            return None
        return v

    # -- what the parts call on one another (defined in the mixins) -------------------------------
    def infer(self, e: A.Expr, scope: Scope) -> I.Node:  # expr.py
        raise NotImplementedError

    def bad(self, span: Span | None) -> I.Node:  # expr.py
        raise NotImplementedError

    def arith(self, op: str, left: I.Node, right: I.Node, e: A.Binary) -> I.Node:  # expr.py
        raise NotImplementedError

    def type_expr(self, t: A.TypeExpr, scope: Scope) -> Ty:  # decls.py
        raise NotImplementedError

    def option_value(self, e: A.Expr, kind: Kind, key: str) -> Any:  # blocks.py
        raise NotImplementedError

    def unknown_name(  # scope.py
        self, name: str, span: Span | None, scope: Scope, bound: Iterable[str] = ()
    ) -> Ty:
        raise NotImplementedError

    def resolve_names(self, e: A.Expr, scope: Scope, bound: set[str]) -> None:  # scope.py
        raise NotImplementedError

    def check_fresh(self, name: str, span: Span | None, scope: Scope) -> None:  # scope.py
        raise NotImplementedError

    def builtin(self, fid: str, e: A.Call, scope: Scope) -> I.Node:  # builtins.py
        raise NotImplementedError

    def in_range(self, v: Any, want: Kw, key: str, e: A.Expr) -> Any:  # blocks.py
        raise NotImplementedError

    def check_block(self, b: A.Block, scope: Scope) -> None:  # blocks.py
        raise NotImplementedError

    def property_name_error(self, it: A.Name, scope: Scope) -> None:  # blocks.py
        raise NotImplementedError


def _finite_combinations(domains: tuple[I.Domain, ...]) -> int:
    """The values of a quantifier's finite binders (range(K), classes) together."""
    n = 1
    for d in domains:
        if isinstance(d, I.Range):
            n *= d.k
    return n


def _is_attacked(domains: tuple[I.Domain, ...]) -> int:
    """1 when a quantifier has a binder over a ball or a box (solved by an attack), else 0."""
    return int(any(not isinstance(d, I.Range) for d in domains))
