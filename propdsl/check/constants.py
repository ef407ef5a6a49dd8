"""The one constant folder: values of constant expressions, for the checker (param defaults,
option values, indices, radii) and for the simplifier (folding after parameter substitution).

Both use the same operations and the same guards, so a constant the checker accepts is one the
simplifier folds and vice versa:
- exact integers stay below 2^1024 (the float range): `10 ^ 10 ^ 10` is "too large", never a
  hang of exact integer arithmetic;
- division by zero, a float overflow, a complex power (`(0 - 8) ^ 0.5`) and an undefined result
  (`inf - inf`, `0 * inf`: NaN) have no value. The checker reports them at the expression; the
  simplifier leaves such a node as it is.

Also here: `coerce_param`, the conversion of a value (a number from a spec, a string from the
command line, a number from Python) to a param type.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable
from typing import Any

from propdsl import ir as I
from propdsl.types import BOOL, NAT, REAL, STRING, Ty

# Constants must stay within float range: the backends compute in floats, and exact integer
# arithmetic on huge values (10^10^10) would otherwise hang the checker.
MAX_INT_BITS = 1024


class _NotConst:
    def __repr__(self) -> str:
        return "<not constant>"


# What `eval_const` returns for an expression without a value at check time.
NOT_CONST: Any = _NotConst()


class NotConstant(Exception):
    """The expression depends on something only known per sample."""


class ConstFailure(Exception):
    """A constant expression without a value: the message says why (division by zero, ...)."""


def _pow(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1:
        if b * math.log2(abs(a)) > MAX_INT_BITS:
            raise OverflowError("integer power")
    out = a**b
    if isinstance(out, complex):
        raise ValueError("complex power")
    return out


ARITH: dict[str, Callable[[Any, Any], Any]] = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "^": _pow,
    "max": max,
    "min": min,
}
COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}


def apply_arith(op: str, a: Any, b: Any) -> Any:
    """`a op b` on constant values (`op` one of + - * / ^ max min).

    Raises:
        ConstFailure: the result has no value (see the module docstring).

    >>> apply_arith("^", 2, 10), apply_arith("/", 7, 2)
    (1024, 3.5)
    """
    try:
        out = ARITH[op](a, b)
    except ZeroDivisionError:
        raise ConstFailure("division by zero") from None
    except OverflowError:
        raise ConstFailure("the value is too large") from None
    except ValueError:
        raise ConstFailure("the value is not a real number") from None
    if isinstance(out, int) and out.bit_length() > MAX_INT_BITS:
        raise ConstFailure("the value is too large")
    if isinstance(out, float) and math.isnan(out):
        raise ConstFailure("the value is undefined (not a number)")
    return out


def compare(op: str, a: Any, b: Any) -> bool:
    """`a op b` on constant values (`op` a comparison)."""
    return bool(COMPARE[op](a, b))


def as_type(value: Any, ty: Ty) -> Any:
    """A folded value as the IR holds a constant of type `ty`: an int for a whole `Nat`, a float
    for a `Real` (so that `2 ^ 10` typed Real is 1024.0)."""
    if ty == NAT and isinstance(value, float) and value.is_integer():
        return int(value)
    if ty != NAT and not isinstance(value, bool):
        return float(value) if not isinstance(value, int) or ty == REAL else value
    return value


def evaluate(
    node: I.Node,
    params: dict[str, tuple[Ty, Any]],
    memo: dict[int, tuple[I.Node, Any]] | None = None,
) -> Any:
    """The value of a constant scalar expression (numbers, params, `-`, arithmetic).

    Raises:
        NotConstant: it depends on something only known per sample.
        ConstFailure: it has no value (see `apply_arith`).

    `memo` (node id -> (node, value or failure)) keeps the results of the nodes evaluated, so
    that evaluating every node of a large constant expression in turn stays linear.
    """
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
            memo[id(n)] = (n, NotConstant() if found is None else found[1])
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
            memo[id(n)] = (n, NotConstant())
    value = memo[id(node)][1]
    if isinstance(value, Exception):
        raise type(value)(*value.args)
    return value


def _apply(node: I.Node, values: list[Any]) -> Any:
    """`-a` or `a op b`; a failure is returned as an exception object (kept in the memo)."""
    if isinstance(node, I.Neg):
        return -values[0]
    assert isinstance(node, I.Arith)
    try:
        return apply_arith(node.op, *values)
    except ConstFailure as failure:
        return failure


def eval_const(
    node: I.Node,
    params: dict[str, tuple[Ty, Any]],
    memo: dict[int, tuple[I.Node, Any]] | None = None,
) -> Any:
    """The value of a constant scalar expression, or `NOT_CONST` (see `evaluate`)."""
    try:
        return evaluate(node, params, memo)
    except (NotConstant, ConstFailure):
        return NOT_CONST


def const_or(node: I.Node, params: dict[str, tuple[Ty, Any]], default: Any) -> Any:
    v = eval_const(node, params)
    return default if v is NOT_CONST else v


# -- param values ---------------------------------------------------------------------------------
# Numbers on the command line are written as in a spec: ASCII digits only (Python's `float` would
# also read "١٫٥", "1_000" and "infinity"), plus `inf` / `-inf`.
DECIMAL = re.compile(r"[+-]?([0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)([eE][+-]?[0-9]+)?")
INTEGER = re.compile(r"[+-]?[0-9]+")


def coerce_param(value: Any, ty: Ty) -> Any:
    """A Python value converted to a param type, or None when it does not fit."""
    if isinstance(value, str) and ty != STRING:
        text = value.strip().lower()
        if ty == BOOL:
            return {"true": True, "false": False}.get(text)
        if text in ("inf", "+inf", "-inf"):
            value = -math.inf if text.startswith("-") else math.inf
        elif ty == NAT and INTEGER.fullmatch(text):
            try:
                value = int(text)
            except ValueError:  # more digits than Python converts
                return None
        elif DECIMAL.fullmatch(text):
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
        return value if 0 <= value and value.bit_length() <= MAX_INT_BITS else None
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


def override_hint(raw: Any, ty: Ty) -> str | None:
    """Why a command-line value does not fit, where the message alone would not say."""
    if not isinstance(raw, str):
        return None
    text = raw.strip()
    if ty in (REAL, NAT) and DECIMAL.fullmatch(text.lower()) and math.isinf(float(text)):
        return "the number is too large for a float; write inf for infinity"
    if ty in (REAL, NAT) and not text.isascii():
        return "numbers are written with the ASCII digits 0-9"
    if ty == NAT and INTEGER.fullmatch(text.lower()):
        return "a Nat is a whole number >= 0"
    return None
