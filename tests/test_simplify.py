"""The simplifier: hand-derived normal forms and linear forms, and sympy as an independent oracle.

Expected strings below were derived by hand from the rules in propdsl/simplify.py's docstring
(parameter substitution, folding, the argmax rewrite, negation normal form, linear forms
`sum(coef * f(x')[i]) + const  op  0` with `op` in >=, >, ==).
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import propdsl
from propdsl import ir as I
from propdsl.pretty import linear_form, show
from propdsl.simplify import fold
from propdsl.types import BOOL, NAT, REAL, IndexTy, TensorTy, shape_of

sympy = pytest.importorskip("sympy")

HEAD = """\
network f : Tensor[4] -> Tensor[3]
param eps : Real = 0.1
param c : Real = 2.0
"""
BALL = "forall x' in ball(x, eps, inf): "
FX = "∀ x' ∈ B∞(x, 0.1). "


def prop(body: str, head: str = HEAD, **params) -> propdsl.Property:
    spec = propdsl.load(f"{head}property p(x, y) =\n  {body}\n", params or None)
    return spec.properties["p"]


def forms(p: propdsl.Property) -> list[str]:
    return [linear_form(f) for f in p.linear_forms]


# -- normalised formulas and their linear forms ----------------------------------------------------
CASES = [
    # the argmax rewrite, both sides, both operators, argmin
    (
        BALL + "argmax(f(x')) == y",
        FX + "∀ j ∈ classes \\ {y}. f(x')[y] > f(x')[j]",
        ["f(x')[y] - f(x')[j] > 0"],
    ),
    (
        BALL + "y == argmax(f(x'))",
        FX + "∀ j ∈ classes \\ {y}. f(x')[y] > f(x')[j]",
        ["f(x')[y] - f(x')[j] > 0"],
    ),
    (
        BALL + "argmax(f(x')) != y",
        FX + "∃ j ∈ classes \\ {y}. f(x')[j] ≥ f(x')[y]",
        ["f(x')[j] - f(x')[y] ≥ 0"],
    ),
    (
        BALL + "argmin(f(x')) == y",
        FX + "∀ j ∈ classes \\ {y}. f(x')[y] < f(x')[j]",
        ["f(x')[j] - f(x')[y] > 0"],
    ),
    (
        BALL + "argmax(f(x')) == 2",
        FX + "∀ j ∈ {0..2} \\ {2}. f(x')[2] > f(x')[j]",
        ["f(x')[2] - f(x')[j] > 0"],
    ),
    (
        BALL + "not (argmax(f(x')) == y)",
        FX + "∃ j ∈ classes \\ {y}. f(x')[y] ≤ f(x')[j]",
        ["f(x')[j] - f(x')[y] ≥ 0"],
    ),
    # parameters substituted, constants folded, neutral elements dropped
    (
        "forall x' in ball(x, 2 * eps, inf): f(x')[0] >= 2 * eps",
        "∀ x' ∈ B∞(x, 0.2). f(x')[0] ≥ 0.2",
        ["f(x')[0] - 0.2 ≥ 0"],
    ),
    (BALL + "f(x')[0] >= c ^ 2 - 1 + 0 * eps", FX + "f(x')[0] ≥ 3", ["f(x')[0] - 3 ≥ 0"]),
    (BALL + "f(x')[1 + 1] >= 7 / 2", FX + "f(x')[2] ≥ 3.5", ["f(x')[2] - 3.5 ≥ 0"]),
    (BALL + "f(x')[0] >= -c", FX + "f(x')[0] ≥ -2", ["f(x')[0] + 2 ≥ 0"]),
    (
        BALL + "f(x')[0] * 1 + 0 >= 1 * f(x')[1] / 1",
        FX + "f(x')[0] ≥ f(x')[1]",
        ["f(x')[0] - f(x')[1] ≥ 0"],
    ),
    (BALL + "f(x')[0] >= 0 or 1 < 2", FX + "true", []),
    (BALL + "f(x')[0] >= 0 and 1 < 2", FX + "f(x')[0] ≥ 0", ["f(x')[0] ≥ 0"]),
    # negation normal form
    (
        "not (forall x' in ball(x, eps, inf): f(x')[0] > 1)",
        "∃ x' ∈ B∞(x, 0.1). f(x')[0] ≤ 1",
        ["-f(x')[0] + 1 ≥ 0"],
    ),
    (
        "not (exists x' in ball(x, eps, inf): f(x')[0] < 0 or f(x')[1] != 2)",
        FX + "f(x')[0] ≥ 0 ∧ f(x')[1] = 2",
        ["f(x')[0] ≥ 0", "f(x')[1] - 2 = 0"],
    ),
    (
        BALL + "not (f(x')[0] > f(x')[1] implies f(x')[2] < 0)",
        FX + "f(x')[0] > f(x')[1] ∧ f(x')[2] ≥ 0",
        ["f(x')[0] - f(x')[1] > 0", "f(x')[2] ≥ 0"],
    ),
    (
        BALL + "not (not (f(x')[0] >= 0) and true)",
        FX + "f(x')[0] ≥ 0",
        ["f(x')[0] ≥ 0"],
    ),
    (
        BALL + "not (f(x')[0] == 1 or f(x')[1] <= f(x')[2])",
        FX + "f(x')[0] ≠ 1 ∧ f(x')[1] > f(x')[2]",
        ["f(x')[1] - f(x')[2] > 0"],  # the != atom has no linear form
    ),
    (
        BALL + "not (if f(x)[0] > 0 then f(x')[0] > 0 else f(x')[1] > 0)",
        FX + "if f(x)[0] > 0 then f(x')[0] ≤ 0 else f(x')[1] ≤ 0",
        ["f(x)[0] > 0", "-f(x')[0] ≥ 0", "-f(x')[1] ≥ 0"],
    ),
    # implication is kept (not rewritten to a disjunction)
    (
        BALL + "f(x')[0] > 0 implies f(x')[1] <= c",
        FX + "f(x')[0] > 0 ⇒ f(x')[1] ≤ 2",
        ["f(x')[0] > 0", "-f(x')[1] + 2 ≥ 0"],
    ),
    # strict and equality atoms
    (BALL + "f(x')[0] < f(x')[1]", FX + "f(x')[0] < f(x')[1]", ["f(x')[1] - f(x')[0] > 0"]),
    (BALL + "f(x')[1] == 2", FX + "f(x')[1] = 2", ["f(x')[1] - 2 = 0"]),
    # standard robustness: norm inf <= c gives two rows per output (2K rows)
    (
        BALL + "norm(f(x') - f(x), inf) <= c",
        FX + "‖f(x') - f(x)‖∞ ≤ 2",
        ["-f(x')[k] + 2 + f(x)[k] ≥ 0 for k ∈ {0..2}", "f(x')[k] + 2 - f(x)[k] ≥ 0 for k ∈ {0..2}"],
    ),
    (
        BALL + "abs(f(x')[0] - 3 * f(x')[1]) <= c / 4",
        FX + "|f(x')[0] - 3 · f(x')[1]| ≤ 0.5",
        ["3·f(x')[1] - f(x')[0] + 0.5 ≥ 0", "-3·f(x')[1] + f(x')[0] + 0.5 ≥ 0"],
    ),
    # vector comparisons: one row per element
    (BALL + "f(x') >= 0", FX + "f(x') ≥ 0", ["f(x')[k] ≥ 0 for k ∈ {0..2}"]),
    (
        BALL + "f(x') - f(x) >= -c",
        FX + "f(x') - f(x) ≥ -2",
        ["f(x')[k] - f(x)[k] + 2 ≥ 0 for k ∈ {0..2}"],
    ),
    # values of the data point are per-sample constants
    (
        BALL + "f(x')[y] >= f(x)[y] - eps",
        FX + "f(x')[y] ≥ f(x)[y] - 0.1",
        ["f(x')[y] - (f(x)[y] - 0.1) ≥ 0"],
    ),
    # outside the linear fragment: no linear form
    (BALL + "softmax(f(x'))[y] >= 0.5", FX + "softmax(f(x'))[y] ≥ 0.5", []),
    (BALL + "norm(f(x') - f(x), 2) <= c", FX + "‖f(x') - f(x)‖₂ ≤ 2", []),
    (BALL + "f(x')[0] * f(x')[1] >= 0", FX + "f(x')[0] · f(x')[1] ≥ 0", []),
    (BALL + "f(x')[0] / f(x')[1] >= 1", FX + "f(x')[0] / f(x')[1] ≥ 1", []),
    (BALL + "exp(f(x')[0]) >= 1", FX + "exp(f(x')[0]) ≥ 1", []),
    (BALL + "f(x')[0] != f(x')[1]", FX + "f(x')[0] ≠ f(x')[1]", []),
    (BALL + "norm(f(x'), inf) <= f(x')[0]", FX + "‖f(x')‖∞ ≤ f(x')[0]", []),
    (BALL + "abs(f(x')[0]) >= c", FX + "|f(x')[0]| ≥ 2", []),
    # a max over a ball is not a value at the data point
    (
        "(max x' in ball(x, eps, inf): f(x')[0]) <= c",
        "(max_{x' ∈ B∞(x, 0.1)} f(x')[0]) ≤ 2",
        [],
    ),
    # a continuous scalar variable is quantified, not a per-sample constant
    ("forall t : Real in box(0, 1): f(x)[0] >= t", "∀ t ∈ [0, 1]. f(x)[0] ≥ t", []),
]


@pytest.mark.parametrize(
    ("body", "formula", "expected_forms"), CASES, ids=[c[0].removeprefix(BALL) for c in CASES]
)
def test_normal_form_and_linear_forms(body, formula, expected_forms):
    p = prop(body)
    assert show(p.formula) == formula
    assert forms(p) == expected_forms


def test_negated_vector_comparison_stays_an_atom():
    """`not` cannot flip an element-wise comparison; the loss compiler negates it instead."""
    p = prop(BALL + "not (f(x') >= 0) and f(x')[0] > 1")
    assert show(p.formula) == FX + "¬(f(x') ≥ 0) ∧ f(x')[0] > 1"
    (negated, _) = p.formula.body.items
    assert isinstance(negated, I.Not)


def test_constants_show_with_their_digits():
    p = prop(BALL + "f(x')[0] >= big", HEAD + "param big : Real = 1234567.0\n", eps="1e-7")
    assert show(p.formula) == "∀ x' ∈ B∞(x, 1e-07). f(x')[0] ≥ 1234567"
    p = prop(BALL + "f(x')[0] >= eps", eps="0.123456789")
    assert show(p.formula) == "∀ x' ∈ B∞(x, 0.123456789). f(x')[0] ≥ 0.123456789"
    p = prop(BALL + "f(x')[0] >= 0.1 + 0.2")  # float noise is not shown
    assert show(p.formula) == FX + "f(x')[0] ≥ 0.3"


def test_prelude_property_is_inlined_and_normalised():
    p = prop("classification_robustness(f, x, y, eps)")
    assert show(p.formula) == (
        "∀ x' ∈ B∞(x, 0.1) ∩ [0, 1]. ∀ j ∈ classes \\ {y}. f(x')[y] > f(x')[j]"
    )
    assert forms(p) == ["f(x')[y] - f(x')[j] > 0"]


def test_overridden_param_is_substituted():
    body = BALL + "f(x')[0] >= 2 * eps"
    p = prop(body, eps="0.05")
    assert show(p.formula) == "∀ x' ∈ B∞(x, 0.05). f(x')[0] ≥ 0.1"
    spec = propdsl.load(f"{HEAD}property p(x, y) =\n  {body}\n").with_params(eps=0.25)
    assert show(spec.properties["p"].formula) == "∀ x' ∈ B∞(x, 0.25). f(x')[0] ≥ 0.5"


def test_no_param_reference_survives():
    for body, _, _ in CASES:
        formula = prop(body).formula
        assert not any(isinstance(n, I.ParamRef) for n in I.walk(formula)), body


def test_no_negation_above_a_scalar_atom():
    """After NNF, `not` only wraps comparisons it cannot flip (vector ones)."""
    for body, _, _ in CASES:
        for n in I.walk(prop(body).formula):
            if isinstance(n, I.Not):
                atom = n.operand.atom if isinstance(n.operand, I.Linear) else n.operand
                assert isinstance(atom, I.Cmp), body
                shapes = {shape_of(atom.left.ty), shape_of(atom.right.ty)}
                assert shapes != {()}, body


# -- the fields of a linear form -------------------------------------------------------------------
def _coefs(form: I.LinearForm) -> dict[str, float]:
    return {show(I.Idx(I.Apply(t.net, t.arg, REAL), t.index, REAL)): t.coef for t in form.terms}


def test_standard_robustness_rows():
    p = prop(BALL + "norm(f(x') - f(x), inf) <= c")
    upper, lower = p.linear_forms
    for form, sign in ((upper, -1.0), (lower, 1.0)):
        assert _coefs(form) == {"f(x')[k]": sign}
        assert form.op == ">="
        ((k, rng),) = form.over
        assert k.name == "k" and k.type == IndexTy(3)
        assert rng == I.Range(3) and rng.k * len(p.linear_forms) == 6  # 2K rows
        assert all(t.arg == I.Var("x'", TensorTy((4,))) for t in form.terms)
    assert show(upper.const) == "2 + f(x)[k]"
    assert show(lower.const) == "2 - f(x)[k]"


def test_argmax_rows_are_over_the_enclosing_label_quantifier():
    p = prop(BALL + "argmax(f(x')) == y")
    (form,) = p.linear_forms
    assert _coefs(form) == {"f(x')[y]": 1.0, "f(x')[j]": -1.0}
    assert form.op == ">" and form.over == () and form.const == I.Const(0.0, REAL)
    (_, inner) = [n for n in I.walk(p.formula) if isinstance(n, I.Quant)]
    assert inner.vars == (I.Var("j", IndexTy(3, True)),)
    assert inner.domains == (I.Range(3, True, I.Var("y", IndexTy(3, True))),)


def test_abs_rows_coefficients():
    p = prop(BALL + "abs(f(x')[0] - 3 * f(x')[1]) <= c / 4")
    first, second = p.linear_forms
    assert _coefs(first) == {"f(x')[0]": -1.0, "f(x')[1]": 3.0}
    assert _coefs(second) == {"f(x')[0]": 1.0, "f(x')[1]": -3.0}
    assert first.const == second.const == I.Const(0.5, REAL)


def test_fresh_index_names_avoid_clashes():
    p = prop("forall k in range(3): " + BALL + "f(x') >= f(x')[k]")
    ((var, rng),) = p.linear_forms[0].over
    assert var.name != "k" and rng == I.Range(3)


def test_size_one_vector_is_broadcast_against_every_element():
    head = (
        "network f : Tensor[4] -> Tensor[3]\n"
        "network g : Tensor[4] -> Tensor[1]\n"
        "param eps : Real = 0.1\n"
    )
    for atom in ("f(x') >= g(x')", "g(x') <= f(x')"):
        body = "forall x' in ball(x, eps, inf): " + atom
        spec = propdsl.load(f"{head}property p(x : Tensor[4]) =\n  {body}\n")
        (form,) = spec.properties["p"].linear_forms
        assert linear_form(form) == "f(x')[k] - g(x')[0] ≥ 0 for k ∈ {0..2}", atom


# -- folding on the IR directly ------------------------------------------------------------------
def test_fold_keeps_nat_arithmetic_integral():
    two, three = I.Const(2, NAT), I.Const(3, NAT)
    out = fold(I.Arith("+", two, three, NAT))
    assert out == I.Const(5, NAT) and type(out.value) is int
    out = fold(I.Arith("/", I.Const(7, NAT), two, REAL))
    assert out == I.Const(3.5, REAL)
    out = fold(I.Arith("^", two, I.Const(10, NAT), REAL))
    assert out == I.Const(1024.0, REAL) and type(out.value) is float


def test_fold_leaves_undefined_constants_alone():
    div0 = I.Arith("/", I.Const(1.0), I.Const(0.0), REAL)
    assert fold(div0) == div0
    root = I.Arith("^", I.Const(-8.0), I.Const(0.5), REAL)
    assert fold(root) == root
    inf_minus_inf = I.Arith("-", I.Const(math.inf), I.Const(math.inf), REAL)
    assert fold(inf_minus_inf) == inf_minus_inf


def test_fold_boolean_units_and_zeros():
    a = I.Cmp(">", I.Var("a", REAL), I.Const(0.0))
    t, f = I.Const(True, BOOL), I.Const(False, BOOL)
    assert fold(I.And((a, t))) == a
    assert fold(I.And((a, f))) == f
    assert fold(I.Or((a, t))) == t
    assert fold(I.Or((f, I.Or((a, f))))) == a
    assert fold(I.Implies(f, a)) == t
    assert fold(I.Implies(t, a)) == a
    assert fold(I.Implies(a, t)) == t
    assert fold(I.Not(f)) == t
    assert fold(I.Cond(t, I.Const(1.0), I.Var("a", REAL), REAL)) == I.Const(1.0)


# -- sympy as an oracle for linear forms ----------------------------------------------------------
O = sympy.symbols("o0:3")  # f(x')[i]: outputs at the quantified point
D = sympy.symbols("d0:3")  # f(x)[i]: per-sample values
OV, DV = sympy.symbols("o d")  # f(x')[k], f(x)[k] in vector comparisons
PARAMS = {"eps": sympy.Rational(1, 10), "c": sympy.Integer(2)}
FACTORS = [("2", 2), ("3", 3), ("0.5", sympy.Rational(1, 2)), ("1.5", sympy.Rational(3, 2))]
FACTORS += [(k, v) for k, v in PARAMS.items()]


def _leaves(vector: bool):
    scalar = [
        *[(f"f(x')[{i}]", O[i]) for i in range(3)],
        *[(f"f(x)[{i}]", D[i]) for i in range(3)],
        ("1", sympy.Integer(1)),
        ("0.25", sympy.Rational(1, 4)),
        *FACTORS,
    ]
    if vector:
        scalar += [("f(x')", OV), ("f(x)", DV), ("f(x')", OV)]
    return st.sampled_from(scalar)


def _linear_tree(vector: bool):
    factor = st.sampled_from(FACTORS)

    def extend(children):
        def op(sym, fn):
            return lambda a, b: (f"({a[0]} {sym} {b[0]})", fn(a[1], b[1]))

        return st.one_of(
            st.builds(op("+", lambda a, b: a + b), children, children),
            st.builds(op("-", lambda a, b: a - b), children, children),
            st.builds(op("*", lambda a, b: a * b), factor, children),
            st.builds(op("*", lambda a, b: a * b), children, factor),
            st.builds(op("/", lambda a, b: a / b), children, factor),
            st.builds(lambda a: (f"-{a[0]}", -a[1]), children),
        )

    return st.recursive(_leaves(vector), extend, max_leaves=8)


def _to_sympy(node: I.Node, k_name: str | None):
    if isinstance(node, I.Const):
        return sympy.nsimplify(node.value, rational=True)
    if isinstance(node, I.Neg):
        return -_to_sympy(node.operand, k_name)
    if isinstance(node, I.Arith) and node.op in ("+", "-", "*", "/"):
        a, b = _to_sympy(node.left, k_name), _to_sympy(node.right, k_name)
        return {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[node.op]
    if isinstance(node, I.Apply):  # a vector, read at element k
        assert node.net == "f" and node.arg.name in ("x", "x'") and k_name is not None
        return DV if node.arg.name == "x" else OV
    if isinstance(node, I.Idx):
        (i,) = node.indices
        if isinstance(i, I.Var):  # element k of a vector expression (per-sample constants)
            assert i.name == k_name
            return _to_sympy(node.base, k_name)
        assert isinstance(node.base, I.Apply) and node.base.arg.name in ("x", "x'")
        return (D if node.base.arg.name == "x" else O)[i.value]
    raise AssertionError(f"unexpected node in a linear form: {node}")


OPS = {">=": (">=", 1), ">": (">", 1), "==": ("==", 1), "<=": (">=", -1), "<": (">", -1)}
ORACLE = settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def _check_against_sympy(lhs, rhs, op, vector):
    body = f"{BALL}f(x')[0] + {lhs[0]} {op} {rhs[0]}"
    if vector:
        body = f"{BALL}f(x') + {lhs[0]} {op} {rhs[0]}"
    want_op, sign = OPS[op]
    anchor = OV if vector else O[0]
    expected = sympy.expand(sign * (anchor + lhs[1] - rhs[1]).subs(PARAMS))
    p = prop(body)
    (form,) = p.linear_forms
    assert form.op == want_op
    k_name = form.over[0][0].name if vector else None
    assert bool(form.over) == vector
    ours = _to_sympy(form.const, k_name)
    for t in form.terms:
        assert t.net == "f" and t.arg.name == "x'" and len(t.index) == 1
        ours += sympy.nsimplify(t.coef, rational=True) * _to_sympy(
            I.Idx(I.Apply("f", t.arg, REAL), t.index, REAL), k_name
        )
    diff = sympy.expand(ours - expected)
    # float arithmetic in the simplifier: equal up to rounding, coefficient by coefficient
    poly = sympy.Poly(diff, *O, *D, OV, DV)
    assert all(abs(float(v)) < 1e-9 for v in poly.coeffs()), (body, diff)
    # the output terms are exactly the outputs with a non-zero coefficient
    outputs = [OV, *O] if vector else list(O)
    want = {s for s in outputs if sympy.Poly(expected, s).degree() > 0}
    got = {_to_sympy(I.Idx(I.Apply("f", t.arg, REAL), t.index, REAL), k_name) for t in form.terms}
    assert got == want, body


@ORACLE
@given(_linear_tree(False), _linear_tree(False), st.sampled_from(sorted(OPS)))
def test_linear_forms_agree_with_sympy(lhs, rhs, op):
    _check_against_sympy(lhs, rhs, op, vector=False)


@settings(ORACLE, max_examples=60)
@given(_linear_tree(True), _linear_tree(True), st.sampled_from(sorted(OPS)))
def test_vector_linear_forms_agree_with_sympy(lhs, rhs, op):
    _check_against_sympy(lhs, rhs, op, vector=True)
