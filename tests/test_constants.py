"""The one constant folder (`propdsl.check.constants`): the checker and the simplifier agree.

The checker evaluates constants (param defaults, radii, indices) and the simplifier folds them
after parameter substitution; both go through `apply_arith`, so an expression has a value for
both or for neither. Before they were merged, the simplifier had no guard on exact integer
powers and the checker accepted NaN constants (a ball of radius `inf - inf`).
"""

from __future__ import annotations

import math

import pytest

import propdsl
from propdsl import ir as I
from propdsl.check.constants import (
    MAX_INT_BITS,
    NOT_CONST,
    ConstFailure,
    apply_arith,
    as_type,
    compare,
    eval_const,
)
from propdsl.simplify import fold
from propdsl.types import NAT, REAL

NET = "network f : Tensor[2] -> Tensor[2]\n"


@pytest.mark.parametrize(
    ("op", "a", "b", "value"),
    [
        ("+", 2, 3, 5),
        ("/", 7, 2, 3.5),
        ("^", 2, 10, 1024),
        ("^", -2, 3, -8),  # an integer power of a negative number is real
        ("^", -8.0, 3.0, -512.0),
        ("^", 2, -1, 0.5),
        ("^", 0, 0, 1),
        ("max", 1, 2.5, 2.5),
        ("min", -math.inf, 0, -math.inf),
        ("*", math.inf, 2, math.inf),
        ("/", 1, math.inf, 0.0),
        ("-", -math.inf, math.inf, -math.inf),
    ],
)
def test_values(op, a, b, value):
    out = apply_arith(op, a, b)
    assert out == value and type(out) is type(value)


@pytest.mark.parametrize(
    ("op", "a", "b", "why"),
    [
        ("/", 1, 0, "division by zero"),
        ("/", 1.0, 0.0, "division by zero"),
        ("^", 0.0, -1.0, "division by zero"),
        ("^", 10.0, 400.0, "too large"),  # a float overflow
        ("^", 10, 400, "too large"),  # an exact integer beyond the float range
        ("^", 2, MAX_INT_BITS + 1, "too large"),
        ("*", 2**1000, 2**100, "too large"),
        ("^", -8.0, 0.5, "not a real number"),  # a complex root
        ("^", -1, 0.5, "not a real number"),
        ("-", math.inf, math.inf, "not a number"),  # NaN
        ("*", 0, math.inf, "not a number"),
        ("/", math.inf, -math.inf, "not a number"),
    ],
)
def test_failures(op, a, b, why):
    with pytest.raises(ConstFailure, match=why):
        apply_arith(op, a, b)


def test_huge_integer_powers_fail_before_they_are_computed():
    # 10^(10^10) exactly would take minutes and gigabytes; the guard refuses it from the logs
    with pytest.raises(ConstFailure, match="too large"):
        apply_arith("^", 10, 10**10)
    assert apply_arith("^", 2, MAX_INT_BITS - 1) == 2 ** (MAX_INT_BITS - 1)


def test_comparisons_and_types():
    assert compare("<=", 1, 1.0) is True and compare("!=", 0, -0.0) is False
    assert as_type(4.0, NAT) == 4 and type(as_type(4.0, NAT)) is int
    assert type(as_type(1024, REAL)) is float
    assert as_type(True, REAL) is True


# -- checker and simplifier: the same constants have a value ---------------------------------------
CASES = [
    ("1 / 0", None),
    ("2 ^ 100000", None),
    ("(0 - 8) ^ 0.5", None),
    ("inf - inf", None),
    ("0 * inf", None),
    ("2 ^ 10", 1024.0),
    ("(0 - 2) ^ 3", -8.0),
    ("2 / 4", 0.5),
    ("inf * 2", math.inf),
]


def _ir(text: str) -> I.Node:
    a, op, b = {
        "1 / 0": (1, "/", 0),
        "2 ^ 100000": (2, "^", 100000),
        "(0 - 8) ^ 0.5": (-8, "^", 0.5),
        "inf - inf": (math.inf, "-", math.inf),
        "0 * inf": (0, "*", math.inf),
        "2 ^ 10": (2, "^", 10),
        "(0 - 2) ^ 3": (-2, "^", 3),
        "2 / 4": (2, "/", 4),
        "inf * 2": (math.inf, "*", 2),
    }[text]
    const = [I.Const(v, NAT if isinstance(v, int) else REAL) for v in (a, b)]
    return I.Arith(op, const[0], const[1], REAL)


@pytest.mark.parametrize(("text", "value"), CASES)
def test_the_checker_and_the_simplifier_agree(text, value):
    node = _ir(text)
    folded = fold(node)
    checked = eval_const(node, {})
    if value is None:
        assert checked is NOT_CONST and folded == node  # no value: left as it is
        with pytest.raises(propdsl.CheckError, match="cannot compute this constant"):
            propdsl.load(NET + f"param c : Real = {text}\n")
    else:
        assert checked == value and folded == I.Const(value, REAL)
        spec = propdsl.load(NET + f"param c : Real = {text}\n")
        assert spec.params["c"] == value


def test_a_ball_of_undefined_radius_is_an_error():
    # before the folders were merged, the checker accepted a NaN radius (`inf - inf` compared
    # with 0 is false, so "negative radius" never fired) and the verifier got a ball of NaNs
    text = NET + "property p(x) = forall z in ball(x, inf - inf): f(z)[0] > 0\n"
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(text)
    (diag,) = info.value.diagnostics
    assert diag.message == "cannot compute this constant: the value is undefined (not a number)"
    assert (diag.span.line, diag.span.col, diag.span.end_col) == (2, 37, 46)


def test_a_nan_param_default_is_refused_at_its_expression():
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(NET + "param c : Real = 0 * inf\n")
    (diag,) = info.value.diagnostics
    assert diag.message.startswith("cannot compute this constant")
    assert (diag.span.line, diag.span.col) == (2, 18)
