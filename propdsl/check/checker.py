"""The checker: AST -> typed IR, with every diagnostic collected.

`Checker` is composed of mixins over `CheckerBase` (the shared state: diagnostics, limits), one
per part of the language, each in its own module:

| mixin | module | checks |
|---|---|---|
| `Names` | scope.py | names and scopes: fresh names, unknown names and their hints |
| `Declarations` | decls.py | networks, params, lets, properties; types written in the spec |
| `Expressions` | expr.py | operators, indexing, quantifiers, calls; inlining lets and templates |
| `Builtins` | builtins.py | calls of built-in functions, by the rules their records name |
| `Blocks` | blocks.py | train / verify blocks against the registry; the loss |

Mixins, not separate objects, because the parts call one another at every level of an
expression (a block's setting is an expression, an expression calls a built-in whose argument
is an expression) and share one state; `CheckerBase` declares the methods one part calls on
another, so that each module type-checks alone.
"""

from __future__ import annotations

from typing import Any

from propdsl import ast as A
from propdsl.check.base import CheckerBase
from propdsl.check.blocks import Blocks
from propdsl.check.builtins import Builtins
from propdsl.check.decls import Declarations
from propdsl.check.expr import Expressions
from propdsl.check.results import Checked
from propdsl.check.scope import Names, Scope
from propdsl.errors import CheckError
from propdsl.source import Source, Span


class Checker(Declarations, Expressions, Builtins, Blocks, Names, CheckerBase):
    """Checks one spec (`check_module`) or the prelude (`check_decl` per declaration)."""


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
    top = Scope({}, is_prelude=True)
    for d in module.decls:
        entry = checker.check_decl(d, top)
        if entry is not None:
            top.names[d.name] = entry
    if checker.diags:
        raise CheckError(checker.diags, source)
    return top
