"""Names, types and shapes: AST -> typed IR, with every diagnostic collected.

The public interface of the checker package (`propdsl.check.checker` explains its parts):
`check` a parsed module, `build_prelude`, and what they return (`Checked`, `PropertyInfo`,
`BlockInfo`, `OptionValue`, `Scope`); the constant folder (`eval_const`, `coerce_param`) and
the limits a spec is checked under (`MAX_*`, docs/language.md "Limits").
"""

from __future__ import annotations

from propdsl.check.base import (
    ERR,
    MAX_ATTACK_NESTING,
    MAX_BOX_ELEMENTS,
    MAX_DIAGNOSTICS,
    MAX_EXPANDED,
    MAX_FINITE,
    MAX_HINTS,
    MAX_NESTING,
    MAX_RANGE,
    MAX_SPEC_EXPANDED,
)
from propdsl.check.checker import Checker, build_prelude, check
from propdsl.check.constants import NOT_CONST, coerce_param, eval_const
from propdsl.check.results import BlockInfo, Checked, OptionValue, PropertyInfo, show_value
from propdsl.check.scope import FunEntry, NetEntry, ParamEntry, Scope, ValueEntry

__all__ = [
    "ERR",
    "MAX_ATTACK_NESTING",
    "MAX_BOX_ELEMENTS",
    "MAX_DIAGNOSTICS",
    "MAX_EXPANDED",
    "MAX_FINITE",
    "MAX_HINTS",
    "MAX_NESTING",
    "MAX_RANGE",
    "MAX_SPEC_EXPANDED",
    "NOT_CONST",
    "BlockInfo",
    "Checked",
    "Checker",
    "FunEntry",
    "NetEntry",
    "OptionValue",
    "ParamEntry",
    "PropertyInfo",
    "Scope",
    "ValueEntry",
    "build_prelude",
    "check",
    "coerce_param",
    "eval_const",
    "show_value",
]
