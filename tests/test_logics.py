"""Differentiable logics: hand-computed tables, exactness, ranges, gradients, registry, oracle."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from propdsl.logics import (
    DL2,
    QLL,
    STL,
    Cmp,
    Godel,
    Goguen,
    Logic,
    LogicError,
    Lukasiewicz,
    UnsupportedConnectiveError,
    Violation,
    Yager,
    available_logics,
    get_logic,
    register_logic,
    stack,
)
from propdsl.logics import base as logics_base

F64 = torch.float64
FUZZY = ["godel", "kleene_dienes", "lukasiewicz", "reichenbach", "goguen", "yager"]
EXACT_ATOMS = ["dl2", *FUZZY, "stl", "qll", "boolean"]
TRAINABLE = ["dl2", *FUZZY, "stl", "qll"]
ALL = [*TRAINABLE, "violation", "boolean"]
HYPOTHESIS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


def close(actual, expected):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12, equal_nan=False)


# ---------------------------------------------------------------------------------------------
# Atoms: hand-computed tables (default parameters: xi = 1).

PAIRS = [(1, 2), (2, 2), (3, 2), (0, 0), (-1, 1), (1, -1), (-3, -1)]
A = [float(a) for a, _ in PAIRS]
B = [float(b) for _, b in PAIRS]

# Fuzzy: a <= b -> 1 - max(a - b, 0) / (|a| + |b|); e.g. (3, 2): 1 - 1/5; (1, -1): 1 - 2/2;
# (-3, -1) for >=: 1 - 2/4. Strict comparisons are 1 - xi = 0 at equality.
FUZZY_ATOMS = {
    Cmp.LE: [1, 1, 0.8, 1, 1, 0, 1],
    Cmp.LT: [1, 0, 0.8, 0, 1, 0, 1],
    Cmp.GE: [2 / 3, 1, 1, 1, 0, 1, 0.5],
    Cmp.GT: [2 / 3, 0, 1, 0, 0, 1, 0.5],
    Cmp.EQ: [2 / 3, 1, 0.8, 1, 0, 0, 0.5],
    Cmp.NE: [1, 0, 1, 0, 1, 1, 1],
}
ATOMS = {
    "dl2": {
        Cmp.LE: [0, 0, 1, 0, 0, 2, 0],
        Cmp.LT: [0, 1, 1, 1, 0, 2, 0],
        Cmp.GE: [1, 0, 0, 0, 2, 0, 2],
        Cmp.GT: [1, 1, 0, 1, 2, 0, 2],
        Cmp.EQ: [1, 0, 1, 0, 2, 2, 2],
        Cmp.NE: [0, 1, 0, 1, 0, 0, 0],
    },
    "stl": {
        Cmp.LE: [1, 0, -1, 0, 2, -2, 2],
        Cmp.LT: [1, -1, -1, -1, 2, -2, 2],
        Cmp.GE: [-1, 0, 1, 0, -2, 2, -2],
        Cmp.GT: [-1, -1, 1, -1, -2, 2, -2],
        Cmp.EQ: [-1, 0, -1, 0, -2, -2, -2],
        Cmp.NE: [1, -1, 1, -1, 2, 2, 2],
    },
    "qll": {
        Cmp.LE: [-1, 0, 1, 0, -2, 2, -2],
        Cmp.LT: [-1, 1, 1, 1, -2, 2, -2],
        Cmp.GE: [1, 0, -1, 0, 2, -2, 2],
        Cmp.GT: [1, 1, -1, 1, 2, -2, 2],
        Cmp.EQ: [1, 0, 1, 0, 2, 2, 2],
        Cmp.NE: [-1, 1, -1, 1, -2, -2, -2],
    },
    "violation": {
        Cmp.LE: [-1, 0, 1, 0, -2, 2, -2],
        Cmp.LT: [-1, 0, 1, 0, -2, 2, -2],
        Cmp.GE: [1, 0, -1, 0, 2, -2, 2],
        Cmp.GT: [1, 0, -1, 0, 2, -2, 2],
        Cmp.EQ: [1, 0, 1, 0, 2, 2, 2],
        Cmp.NE: [-1, 0, -1, 0, -2, -2, -2],
    },
    **{name: FUZZY_ATOMS for name in FUZZY},
}
TRUE, FALSE = True, False
BOOLEAN_ATOMS = {
    Cmp.LE: [TRUE, TRUE, FALSE, TRUE, TRUE, FALSE, TRUE],
    Cmp.LT: [TRUE, FALSE, FALSE, FALSE, TRUE, FALSE, TRUE],
    Cmp.GE: [FALSE, TRUE, TRUE, TRUE, FALSE, TRUE, FALSE],
    Cmp.GT: [FALSE, FALSE, TRUE, FALSE, FALSE, TRUE, FALSE],
    Cmp.EQ: [FALSE, TRUE, FALSE, TRUE, FALSE, FALSE, FALSE],
    Cmp.NE: [TRUE, FALSE, TRUE, FALSE, TRUE, TRUE, TRUE],
}


@pytest.mark.parametrize("name", sorted(ATOMS))
def test_atom_tables(name):
    logic = get_logic(name)
    for op, expected in ATOMS[name].items():
        close(logic.atom(op, t(A), t(B)), expected)


def test_boolean_atom_table():
    logic = get_logic("boolean")
    for op, expected in BOOLEAN_ATOMS.items():
        assert logic.atom(op, t(A), t(B)).tolist() == expected


def test_xi_sets_the_value_of_strict_atoms_at_equality():
    two = t(2.0)
    for name in FUZZY:
        logic = get_logic(name, xi=0.25)
        close(logic.atom(Cmp.LT, two, two), 0.75)
        close(logic.atom(Cmp.NE, t(0.0), t(0.0)), 0.75)
        close(logic.atom(Cmp.LT, t(3.0), two), 0.8)  # unchanged away from equality
    close(get_logic("dl2", xi=0.5).atom(Cmp.GT, two, two), 0.5)
    close(get_logic("dl2", xi=0.5).atom(Cmp.NE, two, two), 0.5)
    close(get_logic("stl", xi=0.5).atom(Cmp.LT, two, two), -0.5)
    close(get_logic("qll", xi=0.5).atom(Cmp.NE, two, two), 0.5)
    close(get_logic("stl", xi=0).atom(Cmp.LT, two, two), 0.0)


@pytest.mark.parametrize(
    ("dtype", "b"), [(torch.bfloat16, 0.99609375), (torch.float16, 0.99951171875)]
)
def test_fuzzy_truth_of_a_violated_atom_never_rounds_to_one(dtype, b):
    # 1 - (1 - b) / (1 + b) rounds to 1 in this dtype: b is one ulp below 1.
    a, b = torch.tensor(1.0, dtype=dtype), torch.tensor(b, dtype=dtype)
    assert 1 - (a - b) / (a + b) == 1
    for name in FUZZY:
        truth = get_logic(name).atom(Cmp.LE, a, b)
        assert truth.dtype == dtype and truth < 1 and get_logic(name).loss(truth) > 0


@pytest.mark.parametrize("name", ALL)
def test_nan_operands_propagate(name):
    logic = get_logic(name)
    nan, one = t([math.nan]), t([1.0])
    for op in Cmp:
        for value in (logic.atom(op, nan, one), logic.atom(op, one, nan)):
            if name == "boolean":
                assert value.item() == (op is Cmp.NE)  # IEEE comparisons
            else:
                assert math.isnan(value.item()), op


@pytest.mark.slow  # the first operation on the meta device costs seconds
def test_tensors_stay_on_their_device():
    a, b = torch.zeros(4, device="meta"), torch.zeros(4, device="meta")
    values = torch.zeros(4, 3, device="meta")
    for name in ALL:
        logic = get_logic(name)
        v = values.bool() if name == "boolean" else values
        outs = [logic.atom(op, a, b) for op in Cmp] + [logic.atom(Cmp.LE, a, 1.0)]
        outs += [logic.conj(v), logic.disj(v), logic.loss(v), logic.conj(v[:, :0])]
        outs += [logic.constant(True, a)]
        if logic.has_negation:
            outs += [logic.neg(v), logic.implies(v, v)]
        assert all(out.device.type == "meta" for out in outs), name


def test_atoms_broadcast_and_promote():
    logic = get_logic("dl2")
    out = logic.atom(Cmp.LE, t([[1.0], [3.0]]), t([2.0, 0.0]))
    close(out, [[0, 1], [1, 3]])
    ints = logic.atom(Cmp.LE, torch.tensor([3, 1]), torch.tensor(2))
    assert ints.dtype == torch.get_default_dtype()
    assert ints.tolist() == [1.0, 0.0]
    assert (
        get_logic("godel").atom(Cmp.LE, t([3.0]).float(), t([2.0]).float()).dtype == torch.float32
    )


# ---------------------------------------------------------------------------------------------
# Connectives: hand-computed tables.

X2 = [0.2, 0.5]
X3 = [0.5, 0.75, 1.0]
IMPL = [(0.2, 0.5), (0.5, 0.2), (0.8, 0.2), (0.5, 0.5), (0.0, 0.0), (1.0, 0.0)]
GODEL_AND_OR = {"and2": 0.2, "or2": 0.5, "and3": 0.5, "or3": 1.0}
PRODUCT_AND_OR = {"and2": 0.1, "or2": 0.6, "and3": 0.375, "or3": 1.0}
FUZZY_CONNECTIVES = {
    "godel": {**GODEL_AND_OR, "implies": [1, 0.2, 0.2, 1, 1, 0]},
    "kleene_dienes": {**GODEL_AND_OR, "implies": [0.8, 0.5, 0.2, 0.5, 1, 0]},
    "lukasiewicz": {
        # and: max(0, 0.7 - 1), max(0, 2.25 - 2); or: min(1, 0.7), min(1, 2.25)
        **{"and2": 0.0, "or2": 0.7, "and3": 0.25, "or3": 1.0},
        "implies": [1, 0.7, 0.4, 1, 1, 0],
    },
    "reichenbach": {**PRODUCT_AND_OR, "implies": [0.9, 0.6, 0.36, 0.75, 1, 0]},
    "goguen": {**PRODUCT_AND_OR, "implies": [1, 0.4, 0.25, 1, 1, 0]},
    "yager": {
        # p = 2: and = 1 - sqrt(0.8^2 + 0.5^2) = 1 - sqrt(0.89); or = sqrt(0.2^2 + 0.5^2)
        "and2": 1 - math.sqrt(0.89),
        "or2": math.sqrt(0.29),
        "and3": 1 - math.sqrt(0.3125),  # 0.5^2 + 0.25^2 + 0
        "or3": 1.0,  # sqrt(0.25 + 0.5625 + 1) > 1
        "implies": [0.5**0.2, 0.2**0.5, 0.2**0.8, 0.5**0.5, 1, 0],  # b ** a, 0 ** 0 = 1
    },
}


@pytest.mark.parametrize("name", FUZZY)
def test_fuzzy_connective_tables(name):
    logic = get_logic(name)
    table = FUZZY_CONNECTIVES[name]
    close(logic.conj(t(X2)), table["and2"])
    close(logic.disj(t(X2)), table["or2"])
    close(logic.conj(t(X3)), table["and3"])
    close(logic.disj(t(X3)), table["or3"])
    a, b = t([p[0] for p in IMPL]), t([p[1] for p in IMPL])
    close(logic.implies(a, b), table["implies"])
    close(logic.neg(t([0.0, 0.25, 1.0])), [1.0, 0.75, 0.0])
    close(logic.loss(t([0.0, 0.25, 1.0])), [1.0, 0.75, 0.0])
    close(logic.constant(True, t([0.0, 0.0])), [1.0, 1.0])
    close(logic.constant(False, t([0.0, 0.0])), [0.0, 0.0])
    close(logic.conj(torch.empty(3, 0, dtype=F64)), [1.0, 1.0, 1.0])
    close(logic.disj(torch.empty(3, 0, dtype=F64)), [0.0, 0.0, 0.0])


def test_yager_p_changes_the_norm():
    close(get_logic("yager", p=1.0).conj(t([0.75, 0.5])), 0.25)  # p = 1 is Lukasiewicz
    close(get_logic("yager", p=2.0).conj(t([0.7, 0.6])), 0.5)  # 1 - sqrt(0.09 + 0.16)
    close(get_logic("yager", p=2.0).disj(t([0.3, 0.4])), 0.5)
    close(get_logic("yager", p=3.0).disj(t([0.5, 0.5])), (0.25) ** (1 / 3))  # (2 / 8) ** (1/3)


def test_dl2_connectives():
    dl2 = get_logic("dl2")
    close(dl2.conj(t([0.5, 2.0])), 2.5)
    close(dl2.disj(t([0.5, 2.0])), 1.0)
    close(dl2.conj(t([0.0, 1.0, 3.0])), 4.0)
    close(dl2.disj(t([0.0, 1.0, 3.0])), 0.0)
    close(dl2.conj(torch.empty(0, dtype=F64)), 0.0)
    close(dl2.disj(torch.empty(0, dtype=F64)), 1.0)
    close(dl2.loss(t([0.0, 2.5])), [0.0, 2.5])
    close(dl2.constant(True, t([7.0])), [0.0])
    close(dl2.constant(False, t([7.0])), [1.0])
    with pytest.raises(UnsupportedConnectiveError, match="push negations"):
        dl2.neg(t(1.0))
    with pytest.raises(ValueError, match="not a or b"):
        dl2.implies(t(1.0), t(0.0))


def test_stl_connectives():
    stl = get_logic("stl", k=1.0)
    e = math.exp
    close(stl.conj(t([1.0, 2.0])), -math.log(e(-1) + e(-2)))
    close(stl.disj(t([1.0, 2.0])), math.log((e(1) + e(2)) / 2))
    close(stl.conj(t([0.0, 0.0, 0.0])), -math.log(3))
    close(stl.disj(t([0.0, 0.0, 0.0])), 0.0)
    # implies(a, b) = or(-a, b)
    close(stl.implies(t(1.0), t(2.0)), math.log((e(-1) + e(2)) / 2))
    close(stl.neg(t([1.5, -2.0])), [-1.5, 2.0])
    close(stl.loss(t([-2.0, 0.0, 3.0])), [2.0, 0.0, 0.0])
    assert stl.constant(True, t([0.0])).item() == math.inf
    assert stl.constant(False, t([0.0])).item() == -math.inf
    assert stl.conj(torch.empty(0, dtype=F64)).item() == math.inf
    assert stl.disj(torch.empty(0, dtype=F64)).item() == -math.inf
    close(stl.conj(t([math.inf, 1.5])), 1.5)  # True is the unit of and


def test_stl_smoothing_is_sound():
    x = t([[0.3, -1.2, 2.0, 0.7], [0.0, 0.0, 0.0, 0.0]])
    for k in (0.5, 10.0, 100.0):
        stl = get_logic("stl", k=k)
        gap = math.log(4) / k
        conj, disj = stl.conj(x), stl.disj(x)
        assert torch.all(conj <= x.amin(-1)) and torch.all(conj >= x.amin(-1) - gap)
        assert torch.all(disj <= x.amax(-1)) and torch.all(disj >= x.amax(-1) - gap)
    close(
        get_logic("stl", k=100.0).conj(t([0.5, 2.0])),
        -math.log(math.exp(-50) + math.exp(-200)) / 100,
    )


def test_qll_connectives():
    qll = get_logic("qll", p=1.0)
    e = math.exp
    close(qll.conj(t([1.0, 2.0])), math.log(e(1) + e(2)))
    close(qll.disj(t([1.0, 2.0])), -math.log(e(-1) + e(-2)))
    close(get_logic("qll", p=2.0).conj(t([0.0, 0.0])), math.log(2) / 2)
    close(qll.neg(t(3.0)), -3.0)
    # implies(a, b) = or(-a, b) = -log(exp(a) + exp(-b))
    close(qll.implies(t(1.0), t(2.0)), -math.log(e(1) + e(-2)))
    close(qll.loss(t([-2.0, 0.0, 3.0])), [0.0, 0.0, 3.0])
    assert qll.constant(True, t([0.0])).item() == -math.inf
    assert qll.constant(False, t([0.0])).item() == math.inf
    assert qll.conj(torch.empty(0, dtype=F64)).item() == -math.inf
    assert qll.disj(torch.empty(0, dtype=F64)).item() == math.inf
    # De Morgan holds exactly: not(a and b) == (not a) or (not b)
    x = t([0.4, -1.3])
    close(qll.neg(qll.conj(x)), qll.disj(qll.neg(x)))


def test_violation_connectives():
    v = get_logic("violation")
    close(v.conj(t([-1.0, 0.5, -3.0])), 0.5)
    close(v.disj(t([-1.0, 0.5, -3.0])), -3.0)
    close(v.implies(t([2.0, -1.0]), t([1.0, 3.0])), [-2.0, 1.0])  # min(-a, b)
    close(v.neg(t(2.0)), -2.0)
    close(v.loss(t([-1.0, 0.0, 2.0])), [0.0, 0.0, 2.0])
    assert v.conj(torch.empty(0, dtype=F64)).item() == -math.inf
    assert v.disj(torch.empty(0, dtype=F64)).item() == math.inf
    assert not Violation.trainable and not get_logic("boolean").trainable


def test_boolean_connectives():
    b = get_logic("boolean")
    x = torch.tensor([[True, True], [True, False], [False, False]])
    assert b.conj(x).tolist() == [True, False, False]
    assert b.disj(x).tolist() == [True, True, False]
    assert b.conj(x, dim=0).tolist() == [False, False]
    assert b.neg(x[:, 1]).tolist() == [False, True, True]
    p, q = torch.tensor([True, True, False, False]), torch.tensor([True, False, True, False])
    assert b.implies(p, q).tolist() == [True, False, True, True]
    assert b.loss(torch.tensor([True, False])).tolist() == [0.0, 1.0]
    assert b.constant(True, torch.zeros(2)).tolist() == [True, True]
    assert b.conj(torch.empty(0, dtype=torch.bool)).item() is True
    assert b.disj(torch.empty(0, dtype=torch.bool)).item() is False


@pytest.mark.parametrize("name", ALL)
def test_reduction_dim_and_stack(name):
    logic = get_logic(name)
    atoms = stack([logic.atom(Cmp.LE, t([1.0, 3.0]), t(2.0)), logic.atom(Cmp.EQ, t(1.0), t(1.0))])
    assert atoms.shape == (2, 2)
    along_last = logic.conj(atoms)
    along_first = logic.conj(atoms.transpose(0, 1), dim=0)
    assert torch.equal(along_last, along_first)
    assert torch.equal(logic.disj(atoms, dim=-1), logic.disj(atoms.transpose(0, 1), dim=0))


# ---------------------------------------------------------------------------------------------
# Exactness and ranges (hypothesis).


def finite(width):
    bound = 2.0**100  # exact in float32 and float64
    return st.floats(-bound, bound, allow_nan=False, width=width)


def pairs(width):
    value = st.one_of(
        finite(width),
        st.integers(-3, 3).map(float),
        st.sampled_from([-0.0, math.inf, -math.inf]),
    )
    pair = st.one_of(
        st.tuples(value, value),
        value.map(lambda x: (x, x)),
        value.map(lambda x: (x, -x)),
    )
    return st.lists(pair, min_size=1, max_size=16)


@pytest.mark.parametrize("name", EXACT_ATOMS)
@HYPOTHESIS
@given(batch64=pairs(64), batch32=pairs(32))
def test_atom_loss_is_zero_exactly_when_it_holds(name, batch64, batch32):
    logic = get_logic(name)
    for dtype, batch in [(torch.float64, batch64), (torch.float32, batch32)]:
        a = torch.tensor([p[0] for p in batch], dtype=dtype)
        b = torch.tensor([p[1] for p in batch], dtype=dtype)
        for op in Cmp:
            value = logic.atom(op, a, b)
            holds = op.holds(a, b)
            loss = logic.loss(value)
            assert torch.all(loss >= 0)
            assert torch.equal(loss == 0, holds), (op, a, b, value)
            if name in FUZZY:
                assert value.dtype == dtype
                assert torch.all((value >= 0) & (value <= 1))
                assert torch.equal(value == 1, holds)


@HYPOTHESIS
@given(data=st.data())
def test_violation_sign_is_the_closure_semantics(data):
    batch = data.draw(pairs(64))
    a, b = t([p[0] for p in batch]), t([p[1] for p in batch])
    v = get_logic("violation")
    for op in Cmp:
        value, holds = v.atom(op, a, b), op.holds(a, b)
        assert torch.all(holds[value < 0]) and not torch.any(holds[value > 0])
        if not op.strict:
            assert torch.equal(v.loss(value) == 0, holds)


@pytest.mark.parametrize("name", FUZZY)
@HYPOTHESIS
@given(values=st.lists(st.floats(0, 1), min_size=1, max_size=5), other=st.floats(0, 1))
def test_fuzzy_connectives_stay_in_unit_interval(name, values, other):
    logic = get_logic(name)
    x = t(values)
    y = t(other)
    for out in (logic.conj(x), logic.disj(x), logic.neg(x), logic.implies(x, y)):
        assert torch.all((out >= 0) & (out <= 1))
    assert torch.all(logic.loss(logic.conj(x)) >= 0)


GRID = st.sampled_from([-3.0, -1.0, 0.0, 1.0, 2.0])
OPS = st.sampled_from(list(Cmp))


@pytest.mark.parametrize("name", ["dl2", "godel", "kleene_dienes", "reichenbach", "goguen", "stl"])
@HYPOTHESIS
@given(
    clauses=st.lists(
        st.lists(st.tuples(OPS, GRID, GRID), min_size=1, max_size=3), min_size=1, max_size=3
    )
)
def test_cnf_formulas(name, clauses):
    """Loss of a conjunction of disjunctions of atoms is 0 exactly (DL2, t-norms whose
    disjunction is strict) or at least soundly (STL) when the formula holds."""
    logic, boolean = get_logic(name), get_logic("boolean")

    def evaluate(lg):
        disjunctions = []
        for clause in clauses:
            atoms = [lg.atom(op, t(a), t(b)) for op, a, b in clause]
            disjunctions.append(lg.disj(stack(atoms)))
        return lg.conj(stack(disjunctions))

    holds = bool(evaluate(boolean))
    zero = bool(logic.loss(evaluate(logic)) == 0)
    if name == "stl":
        assert not zero or holds
    else:
        assert zero == holds


def test_qll_smoothing_as_specified():
    """Documented: QLL's `and` over-approximates the violation (sound), its `or` (the formula
    of the reference) under-approximates it by up to log(n) / p (not sound)."""
    qll = get_logic("qll", p=10.0)
    violated = t([0.01, 0.01])
    assert qll.conj(t([0.0, 0.0])).item() > 0  # both hold, the conjunction is reported violated
    assert qll.disj(violated).item() < 0  # neither holds, the disjunction is reported satisfied
    close(qll.disj(violated), 0.01 - math.log(2) / 10)


@pytest.mark.parametrize("name", ["lukasiewicz", "yager"])
def test_lukasiewicz_and_yager_disjunction_is_not_strict(name):
    """Documented: their disjunction reaches truth 1 with no disjunct true."""
    logic = get_logic(name)
    assert logic.disj(t([0.6, 0.8])).item() == 1.0


@pytest.mark.parametrize("name", ["dl2", *FUZZY, "qll"])
@HYPOTHESIS
@given(values=st.lists(st.floats(0, 2), min_size=3, max_size=3))
def test_nary_equals_nested_binary(name, values):
    logic = get_logic(name)
    if name in FUZZY:
        values = [v / 2 for v in values]
    x, y, z = (t(v) for v in values)
    flat = logic.conj(stack([x, y, z]))
    nested = logic.conj(stack([logic.conj(stack([x, y])), z]))
    torch.testing.assert_close(flat, nested, rtol=1e-9, atol=1e-12)
    flat = logic.disj(stack([x, y, z]))
    nested = logic.disj(stack([logic.disj(stack([x, y])), z]))
    torch.testing.assert_close(flat, nested, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Gradients.

ATOM_POINTS = (t([0.7, -1.3, 2.5, 0.4]), t([1.9, -0.6, 1.1, -0.9]))  # |a - b| and |a|, |b| >= 0.3
UNIT = t([[0.9, 0.7, 0.8], [0.2, 0.5, 0.1]])
IMPLICATION_POINTS = (t([0.3, 0.7, 0.15]), t([0.6, 0.4, 0.55]))


def gradcheck(fn, *inputs):
    inputs = tuple(x.clone().requires_grad_(True) for x in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", [*TRAINABLE, "violation"])
def test_gradcheck(name):
    logic = get_logic(name)
    for op in Cmp:
        gradcheck(lambda a, b, op=op: logic.atom(op, a, b), *ATOM_POINTS)
    values = UNIT if name in FUZZY else UNIT * 4 - 2.1  # no zero: loss kinks there
    gradcheck(logic.conj, values)
    gradcheck(logic.disj, values)
    gradcheck(lambda v: logic.conj(v, dim=0), values)
    gradcheck(logic.loss, values)
    if logic.has_negation:
        gradcheck(logic.neg, values)
        gradcheck(logic.implies, *IMPLICATION_POINTS)
    if name == "yager":
        gradcheck(get_logic("yager", p=3.5).conj, values)


def grads(fn, *inputs):
    inputs = [torch.as_tensor(x, dtype=F64).requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    return torch.autograd.grad(out.sum(), inputs, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("name", FUZZY)
def test_fuzzy_atom_gradients_at_the_boundary(name):
    logic = get_logic(name)
    for op in Cmp:
        for a, b in [(0.0, 0.0), (2.0, 2.0), (0.0, 1.0), (-1.0, 0.0)]:
            ga, gb = grads(lambda x, y, op=op: logic.atom(op, x, y), a, b)
            assert torch.isfinite(ga) and torch.isfinite(gb)
    # Holds at equality: nothing to climb. Fails at equality (strict): the violated side's slope.
    assert grads(lambda x, y: logic.atom(Cmp.LE, x, y), 2.0, 2.0) == (0.0, 0.0)
    ga, gb = grads(lambda x, y: logic.atom(Cmp.LT, x, y), 2.0, 2.0)
    close(ga, -0.25)  # d/da (1 - (a - b) / (|a| + |b|)) = -1/4 at a = b = 2
    close(gb, 0.25)


def test_hinge_gradients():
    dl2 = get_logic("dl2")
    assert grads(lambda x, y: dl2.atom(Cmp.LE, x, y), 2.0, 2.0) == (0.0, 0.0)
    assert grads(lambda x, y: dl2.atom(Cmp.LT, x, y), 2.0, 2.0) == (1.0, -1.0)
    assert grads(lambda x, y: dl2.atom(Cmp.NE, x, y), 2.0, 2.0) == (0.0, 0.0)
    # A conjunction that has just reached truth 0 can still climb out.
    (g,) = grads(get_logic("lukasiewicz").conj, [0.5, 0.5])
    close(g, [1.0, 1.0])
    (g,) = grads(get_logic("yager").conj, [1.0, 1.0])  # no NaN from the norm at 0
    assert torch.all(torch.isfinite(g))
    ga, gb = grads(get_logic("yager").implies, [0.0, 0.5], [0.0, 0.0])
    assert torch.all(torch.isfinite(ga)) and torch.all(torch.isfinite(gb))
    ga, gb = grads(get_logic("goguen").implies, [0.0, 0.5], [0.0, 0.0])
    assert torch.all(torch.isfinite(ga)) and torch.all(torch.isfinite(gb))


def test_gradient_free_atoms_can_be_backpropagated():
    a = t([1.0, 1.0, 2.0]).requires_grad_(True)
    for name in ["dl2", "godel"]:
        loss = get_logic(name).loss(get_logic(name).atom(Cmp.NE, a, t(1.0))).sum()
        (g,) = torch.autograd.grad(loss, a)
        assert torch.equal(g, torch.zeros(3, dtype=F64))


def test_violation_keeps_gradients_where_the_formula_holds():
    v = get_logic("violation")
    ga, gb = grads(
        lambda x, y: v.conj(stack([v.atom(Cmp.LE, x, y), v.atom(Cmp.GT, y, x)])), 1.0, 3.0
    )
    assert ga.item() == 1.0 and gb.item() == -1.0


# ---------------------------------------------------------------------------------------------
# Registry.


def test_available_logics():
    assert set(available_logics()) == set(ALL)
    assert available_logics() == sorted(available_logics())


def test_get_logic_parameters_and_aliases():
    assert get_logic("yager", p=2.0) == Yager(p=2.0)
    assert get_logic("yager", p=3).p == 3.0
    assert get_logic("stl", k=10.0) == STL(k=10.0)
    assert get_logic("qll", p=5).p == 5.0
    assert get_logic("dl2", xi=0.1) == DL2(xi=0.1)
    assert isinstance(get_logic("goedel"), Godel)
    assert isinstance(get_logic("product"), Goguen)
    assert isinstance(get_logic(" Lukasiewicz "), Lukasiewicz)
    assert hash(get_logic("qll")) == hash(QLL())


def test_unknown_logic():
    with pytest.raises(
        ValueError, match=r"unknown logic 'dl3'.*did you mean 'dl2'.*known: boolean, dl2"
    ):
        get_logic("dl3")
    with pytest.raises(LogicError, match="known:"):
        get_logic("nope")


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("yager", {"q": 2.0}, "accepted: xi, p"),
        ("dl2", {"p": 2.0}, "accepted: xi"),
        ("violation", {"k": 1.0}, "accepted: none"),
        ("yager", {"p": 0.0}, "p must be > 0"),
        ("yager", {"p": -1}, "p must be > 0"),
        ("yager", {"p": math.inf}, "p must be > 0"),
        ("stl", {"k": "10"}, "k must be a number"),
        ("qll", {"p": True}, "p must be a number"),
        ("godel", {"xi": 1.5}, "xi must be > 0 and <= 1"),
        ("godel", {"xi": 0.0}, "xi must be > 0"),
        ("dl2", {"xi": -1.0}, "xi must be > 0"),
        ("dl2", {"xi": math.nan}, "xi must be > 0"),
    ],
)
def test_bad_parameters(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_logic(name, **params)


def test_cmp_helpers():
    assert [op.negated for op in Cmp] == [Cmp.GE, Cmp.GT, Cmp.LE, Cmp.LT, Cmp.NE, Cmp.EQ]
    assert [op.converse for op in Cmp] == [Cmp.GT, Cmp.GE, Cmp.LT, Cmp.LE, Cmp.EQ, Cmp.NE]
    assert Cmp("<=") is Cmp.LE and Cmp.NE.strict and not Cmp.GE.strict
    a, b = t([1.0, 2.0, 3.0]), t(2.0)
    for op in Cmp:
        assert torch.equal(op.negated.holds(a, b), ~op.holds(a, b))
        assert torch.equal(op.converse.holds(b, a), op.holds(a, b))


@pytest.fixture
def fresh_registry(monkeypatch, clean_registries):
    # the spec registry too (clean_registries): register_logic adds an entry there as well
    monkeypatch.setattr(logics_base, "_REGISTRY", dict(logics_base._REGISTRY))
    monkeypatch.setattr(logics_base, "_ALIASES", dict(logics_base._ALIASES))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Hinge(Logic):
    """A user logic written from scratch: scaled hinge atoms, max / min connectives."""

    name = "user_hinge"
    has_negation = False
    aliases = ("hinge",)
    scale: float = 1.0

    def __post_init__(self):
        if self.scale <= 0:
            raise LogicError("scale must be > 0")

    def atom(self, op, lhs, rhs):
        if op is not Cmp.LE:
            raise LogicError("only <=")
        return self.scale * torch.relu(lhs - rhs)

    def conj(self, values, dim=-1):
        return values.amax(dim)

    def disj(self, values, dim=-1):
        return values.amin(dim)

    def neg(self, value):
        raise self._unsupported("not")

    def loss(self, value):
        return value

    def constant(self, truth, like):
        return torch.full_like(like, 0.0 if truth else math.inf)


def test_user_registered_logic(fresh_registry):
    assert register_logic(Hinge) is Hinge
    assert register_logic(Hinge) is Hinge  # registering again is harmless
    assert "user_hinge" in available_logics()
    logic = get_logic("hinge", scale=2.0)
    assert logic == Hinge(scale=2.0)
    value = logic.conj(
        stack([logic.atom(Cmp.LE, t(3.0), t(1.0)), logic.atom(Cmp.LE, t(0.0), t(1.0))])
    )
    close(logic.loss(value), 4.0)
    with pytest.raises(ValueError, match="accepted: scale"):
        get_logic("user_hinge", p=1)
    with pytest.raises(LogicError, match="scale must be > 0"):
        get_logic("user_hinge", scale=-1.0)
    with pytest.raises(UnsupportedConnectiveError):
        logic.implies(t(0.0), t(1.0))


def test_register_logic_errors(fresh_registry):
    with pytest.raises(LogicError, match="expects a Logic subclass"):
        register_logic(int)
    with pytest.raises(LogicError, match="abstract"):
        register_logic(type("Half", (Logic,), {"name": "half", "has_negation": True}))
    with pytest.raises(LogicError, match="lower-case identifier"):
        register_logic(type("Bad", (Hinge,), {"name": "Bad Name", "aliases": ()}))
    with pytest.raises(LogicError, match="aliases"):
        register_logic(type("BadAlias", (Hinge,), {"name": "bad_alias", "aliases": ("Up",)}))
    with pytest.raises(LogicError, match="has_negation"):
        register_logic(type("NoNeg", (Hinge,), {"name": "noneg", "aliases": (), "has_negation": 1}))
    with pytest.raises(LogicError, match="'dl2' is already taken"):
        register_logic(type("Clash", (Hinge,), {"name": "dl2", "aliases": ()}))
    with pytest.raises(LogicError, match="'product' is already taken"):
        register_logic(type("Clash2", (Hinge,), {"name": "fresh", "aliases": ("product",)}))


@pytest.mark.slow  # a fresh interpreter importing torch
def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, propdsl.logics; print('sympy' in sys.modules, 'lark' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------
# Oracle: property-driven-ml, where its definitions coincide with ours (docs/logics.md lists
# the deliberate differences).

ORACLE = {
    "godel": "GoedelFuzzyLogic",
    "kleene_dienes": "KleeneDienesFuzzyLogic",
    "lukasiewicz": "LukasiewiczFuzzyLogic",
    "reichenbach": "ReichenbachFuzzyLogic",
    "goguen": "GoguenFuzzyLogic",
    "yager": "YagerFuzzyLogic",
}


@pytest.fixture(scope="module")
def pdml():
    return pytest.importorskip("property_driven_ml.logics")


# Operands with |a| + |b| well above the oracle's eps clamp, equal pairs included.
OA = t([1.0, 2.0, 3.0, -1.0, 1.0, -3.0, 0.5, -0.25, 2.0])
OB = t([2.0, 2.0, 2.0, 1.0, -1.0, -1.0, 0.5, 0.75, -2.0])


@pytest.mark.parametrize("name", FUZZY)
def test_fuzzy_logics_match_the_oracle(pdml, name):
    ours = get_logic(name)
    theirs = getattr(pdml, ORACLE[name])(**({"p": 2.0} if name == "yager" else {}))
    close(ours.atom(Cmp.LE, OA, OB), theirs.LEQ(OA, OB))
    close(ours.atom(Cmp.GE, OA, OB), theirs.GEQ(OA, OB))
    close(ours.atom(Cmp.EQ, OA, OB), theirs.EQ(OA, OB))
    equal = OA == OB  # strict comparisons coincide at equality (both false)
    close(ours.atom(Cmp.LT, OA, OB)[equal], theirs.LT(OA, OB)[equal])
    close(ours.atom(Cmp.NE, OA, OB)[equal], theirs.NEQ(OA, OB)[equal])
    x, y, z = t([0.2, 0.9, 0.5, 1.0]), t([0.7, 0.6, 0.5, 0.3]), t([0.4, 0.95, 0.1, 1.0])
    close(ours.conj(stack([x, y])), theirs.AND(x, y))
    close(ours.disj(stack([x, y])), theirs.OR(x, y))
    close(ours.conj(stack([x, y, z])), theirs.AND(x, y, z))
    close(ours.disj(stack([x, y, z])), theirs.OR(x, y, z))
    close(ours.neg(x), theirs.NOT(x))
    differ = x != y  # Goedel's implication differs at a == b (theirs: b, the residuum: 1)
    close(ours.implies(x, y)[differ], theirs.IMPL(x, y)[differ])
    close(ours.implies(y, z), theirs.IMPL(y, z))


def test_dl2_stl_boolean_match_the_oracle(pdml):
    dl2, their_dl2 = get_logic("dl2"), pdml.DL2()
    for op, method in [(Cmp.LE, "LEQ"), (Cmp.GE, "GEQ"), (Cmp.LT, "LT"), (Cmp.GT, "GT")]:
        close(dl2.atom(op, OA, OB), getattr(their_dl2, method)(OA, OB))
    close(dl2.atom(Cmp.NE, OA, OB), their_dl2.NEQ(OA, OB))
    x, y = t([0.0, 1.5, 2.0]), t([3.0, 0.0, 0.5])
    close(dl2.conj(stack([x, y])), their_dl2.AND(x, y))
    close(dl2.disj(stack([x, y])), their_dl2.OR(x, y))

    stl, their_stl = get_logic("stl"), pdml.STL()
    close(stl.atom(Cmp.LE, OA, OB), their_stl.LEQ(OA, OB))
    close(stl.atom(Cmp.GE, OA, OB), their_stl.GEQ(OA, OB))
    close(stl.neg(x), their_stl.NOT(x))

    boolean, their_bool = get_logic("boolean"), pdml.BooleanLogic()
    for op, method in [
        (Cmp.LE, "LEQ"),
        (Cmp.GE, "GEQ"),
        (Cmp.LT, "LT"),
        (Cmp.GT, "GT"),
        (Cmp.EQ, "EQ"),
        (Cmp.NE, "NEQ"),
    ]:
        assert torch.equal(boolean.atom(op, OA, OB), getattr(their_bool, method)(OA, OB))
    p, q = OA > 0, OB > 0
    assert torch.equal(boolean.conj(stack([p, q])), their_bool.AND(p, q))
    assert torch.equal(boolean.disj(stack([p, q])), their_bool.OR(p, q))
    assert torch.equal(boolean.implies(p, q), their_bool.IMPL(p, q))
