"""VNN-LIB in (`read_vnnlib`): files as verification problems.

* every VNN-LIB file of the VNN-COMP 2021 set parses; boxes and C matrices of several files are
  checked entry by entry against the file text; the polarity is checked on the networks: sampled
  points and attacks never violate an instance whose expected answer is `unsat`, and attacks find
  violations (confirmed by onnxruntime) on instances whose answer is `sat`;
* the semantics of the pieces (disjunctions over different boxes give several problems, `=`
  two rows, arithmetic, strict comparisons, outward rounding to float32);
* VNN-LIB 2.0 (through the `vnnlib` package) gives the same problems as the same property in 1.0;
* malformed files are one-line `file:line:col: message` errors at the right place.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from _vnncomp import instances, require_vnncomp

from propdsl.errors import UsageError
from propdsl.interop.vnnlib import VnnlibError, parse_vnnlib, read_vnnlib
from propdsl.verify.problem import Problem

ACAS = ((1, 1, 5), 5)
MNIST = ((784, 1), 10)
SHAPES = {"acasxu": ACAS, "mnistfc": MNIST}


def shapes_of(benchmark: str, onnx: str) -> tuple[tuple[int, ...], int]:
    if benchmark == "test":
        return (
            ((1,), 1) if onnx in ("test_nano.onnx", "test_tiny.onnx", "test_small.onnx") else ACAS
        )
    return SHAPES[benchmark]


def box(problem: Problem) -> tuple[list[float], list[float]]:
    lo, hi = problem.region.bounding_box()
    return lo.flatten().tolist(), hi.flatten().tolist()


def rows(problem: Problem) -> list[tuple[list[list[float]], list[float]]]:
    return [(d.A.tolist(), d.b.tolist()) for d in problem.disjuncts]


def f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


# -- the VNN-COMP 2021 files ---------------------------------------------------------------------


def check_parses(root: Path, benchmark: str, vnnlib: str, shape, outputs: int) -> None:
    problems = read_vnnlib(root / benchmark / vnnlib, shape, outputs)
    assert problems, vnnlib
    for p in problems:
        lo, hi = p.region.bounding_box()
        assert lo.shape == (1, *shape) and lo.dtype == torch.float32
        assert bool((lo <= hi).all())
        assert all(d.A.shape[1] == outputs for d in p.disjuncts)


def vnncomp_files(root: Path) -> list[tuple[str, str, tuple[int, ...], int]]:
    """The distinct (benchmark, file, input shape, outputs) of the instances."""
    rows_ = instances(root)
    assert len(rows_) == 111
    files = {(r["benchmark"], r["vnnlib"], *shapes_of(r["benchmark"], r["onnx"])) for r in rows_}
    assert len(files) == 42  # 8 ACAS Xu properties, 30 MNIST ones, 4 tests
    return sorted(files)


def test_the_vnncomp_instances_parse() -> None:
    root = require_vnncomp()
    files = vnncomp_files(root)
    # every ACAS Xu and test file, and two MNIST ones (all of them: the slow test below)
    for benchmark, vnnlib, shape, outputs in files:
        if benchmark != "mnistfc" or vnnlib in ("prop_0_0.03.vnnlib", "prop_14_0.05.vnnlib"):
            check_parses(root, benchmark, vnnlib, shape, outputs)
    # the ACAS Xu properties 9 and 10, not among the instances, parse too
    for k in (9, 10):
        check_parses(root, "acasxu", f"prop_{k}.vnnlib", *ACAS)


@pytest.mark.slow
def test_every_vnncomp_instance_parses() -> None:
    root = require_vnncomp()
    for benchmark, vnnlib, shape, outputs in vnncomp_files(root):
        check_parses(root, benchmark, vnnlib, shape, outputs)


def test_acasxu_property_1_by_hand() -> None:
    root = require_vnncomp()
    (p,) = read_vnnlib(root / "acasxu" / "prop_1.vnnlib", *ACAS)
    lo, hi = box(p)
    assert lo == [f32(v) for v in (0.6, -0.5, -0.5, 0.45, -0.5)] or all(
        abs(a - b) < 1e-7 for a, b in zip(lo, (0.6, -0.5, -0.5, 0.45, -0.5), strict=True)
    )
    assert hi[1:] == [0.5, 0.5, 0.5, -0.45] or all(
        abs(a - b) < 1e-7 for a, b in zip(hi[1:], (0.5, 0.5, 0.5, -0.45), strict=True)
    )
    assert abs(hi[0] - 0.679857769) < 1e-7
    # (assert (>= Y_0 3.991125645861615)): -Y_0 <= -3.99...
    ((A, b),) = rows(p)
    assert A == [[-1.0, 0.0, 0.0, 0.0, 0.0]]
    assert abs(b[0] + 3.991125645861615) < 1e-6


def test_acasxu_properties_3_and_7_by_hand() -> None:
    root = require_vnncomp()
    (p3,) = read_vnnlib(root / "acasxu" / "prop_3.vnnlib", *ACAS)
    # (<= Y_0 Y_1) ... (<= Y_0 Y_4): one conjunction of four rows Y_0 - Y_k <= 0
    ((A, b),) = rows(p3)
    assert A == [
        [1.0, -1.0, 0, 0, 0],
        [1.0, 0, -1.0, 0, 0],
        [1.0, 0, 0, -1.0, 0],
        [1.0, 0, 0, 0, -1.0],
    ]
    assert b == [0.0] * 4
    lo, hi = box(p3)
    assert abs(lo[0] + 0.303531156) < 1e-7 and abs(hi[0] + 0.298552812) < 1e-7
    assert abs(lo[2] - 0.493380324) < 1e-7 and hi[2] == 0.5
    (p7,) = read_vnnlib(root / "acasxu" / "prop_7.vnnlib", *ACAS)
    # (or (and (<= Y_3 Y_0) (<= Y_3 Y_1) (<= Y_3 Y_2)) (and (<= Y_4 Y_0) ...)): two disjuncts
    (A1, b1), (A2, b2) = rows(p7)
    assert A1 == [[-1.0, 0, 0, 1.0, 0], [0, -1.0, 0, 1.0, 0], [0, 0, -1.0, 1.0, 0]]
    assert A2 == [[-1.0, 0, 0, 0, 1.0], [0, -1.0, 0, 0, 1.0], [0, 0, -1.0, 0, 1.0]]
    assert b1 == b2 == [0.0] * 3


def test_acasxu_property_6_is_two_boxes() -> None:
    root = require_vnncomp()
    p1, p2 = read_vnnlib(root / "acasxu" / "prop_6.vnnlib", *ACAS)
    assert (p1.name, p2.name) == ("prop_6.vnnlib[0]", "prop_6.vnnlib[1]")
    (lo1, hi1), (lo2, hi2) = box(p1), box(p2)
    # X_1 in [0.11140846, 0.499999896] in the first, [-0.499999896, -0.11140846] in the second
    assert abs(lo1[1] - 0.11140846) < 1e-7 and abs(hi1[1] - 0.499999896) < 1e-7
    assert abs(lo2[1] + 0.499999896) < 1e-7 and abs(hi2[1] + 0.11140846) < 1e-7
    assert lo1[0] == lo2[0] and hi1[3:] == hi2[3:]
    # the output disjunction (Y_0 not minimal: some Y_k <= Y_0) is in both
    for p in (p1, p2):
        assert [A for A, _ in rows(p)] == [
            [[-1.0, 1.0, 0, 0, 0]],
            [[-1.0, 0, 1.0, 0, 0]],
            [[-1.0, 0, 0, 1.0, 0]],
            [[-1.0, 0, 0, 0, 1.0]],
        ]


def test_mnist_property_by_hand() -> None:
    root = require_vnncomp()
    path = root / "mnistfc" / "prop_7_0.03.vnnlib"
    (p,) = read_vnnlib(path, *MNIST)
    lo, hi = box(p)
    text = path.read_text()
    for i in (0, 400, 783):  # the file's own lines for these pixels
        upper = float(re.search(rf"\(assert \(<= X_{i} ([^)]+)\)\)", text).group(1))
        lower = float(re.search(rf"\(assert \(>= X_{i} ([^)]+)\)\)", text).group(1))
        assert lo[i] <= lower <= lo[i] + 1e-7 and hi[i] - 1e-7 <= upper <= hi[i]
    assert abs(lo[400] - 0.005294119939208031) < 1e-8 and abs(hi[400] - 0.06529411673545837) < 1e-8
    # (or (and (>= Y_0 Y_9)) ... (and (>= Y_8 Y_9))): nine disjuncts Y_9 - Y_k <= 0
    assert len(p.disjuncts) == 9
    for k, (A, b) in enumerate(rows(p)):
        expected = [0.0] * 10
        expected[k], expected[9] = -1.0, 1.0
        assert A == [expected] and b == [0.0]


def test_tiny_files_by_hand() -> None:
    root = require_vnncomp()
    (nano,) = read_vnnlib(root / "test" / "test_nano.vnnlib", (1,), 1)
    assert box(nano) == ([-1.0], [1.0]) and rows(nano) == [([[1.0]], [-1.0])]  # Y_0 <= -1
    for name in ("test_tiny", "test_small"):
        # (or (and (>= X_0 -1) (<= X_0 1) (>= Y_0 100))): the box sits inside the disjunction
        (p,) = read_vnnlib(root / "test" / f"{name}.vnnlib", (1,), 1)
        assert box(p) == ([-1.0], [1.0]) and rows(p) == [([[-1.0]], [-100.0])]


def _margin(problem: Problem, y: torch.Tensor) -> torch.Tensor:
    """>= 0 exactly where y [B, n] violates: max over disjuncts of min over rows of b - A y."""
    values = []
    for d in problem.disjuncts:
        slack = d.b.to(y) - y @ d.A.to(y).T
        values.append(slack.min(1).values if slack.shape[1] else y.new_full((y.shape[0],), 1e9))
    return torch.stack(values, 1).max(1).values


def check_polarity(root: Path, row: dict, *, steps: int, restarts: int) -> bool:
    """Whether an attack finds a violation; a found one is confirmed with onnxruntime, and
    sampled points never violate an `unsat` instance."""
    from propdsl.interop.onnx_import import load_onnx, onnx_forward
    from propdsl.loss.attacks import PGD, run_attack

    onnx_path = root / row["benchmark"] / row["onnx"]
    model = load_onnx(onnx_path)
    problems = read_vnnlib(
        root / row["benchmark"] / row["vnnlib"], model.input_shape, model.num_outputs
    )
    found = False
    for p in problems:
        with torch.no_grad():
            points = torch.cat(
                [p.region.sample(torch.Generator().manual_seed(k)) for k in range(64)]
            )
            sampled = bool(p.violated_at(model(points).flatten(1)).any())
        if row["expected"] == "unsat":
            assert not sampled, f"{row['vnnlib']}: a sampled point violates an unsat instance"
        attack = PGD(steps=steps, restarts=restarts)
        result = run_attack(
            attack,
            lambda x, p=p: _margin(p, model(x).flatten(1)),
            [p.region],
            models=[model],
            generator=torch.Generator().manual_seed(0),
        )
        if bool((result.value >= 0).any()):
            (x,) = result.points
            assert bool(p.region.contains(x).all())
            y = torch.from_numpy(onnx_forward(onnx_path, x[0])).reshape(1, -1)
            assert float(_margin(p, y.double())[0]) >= -1e-5, "onnxruntime disagrees"
            found = True
    if row["expected"] == "unsat":
        assert not found, f"{row['vnnlib']} on {row['onnx']}: a counterexample to an unsat instance"
    return found


@pytest.mark.parametrize(
    "onnx, vnnlib, expected",
    [
        ("test_sat.onnx", "test_prop.vnnlib", True),
        ("test_unsat.onnx", "test_prop.vnnlib", False),
        ("ACASXU_run2a_1_7_batch_2000.onnx", "prop_3.vnnlib", True),
        ("ACASXU_run2a_1_1_batch_2000.onnx", "prop_3.vnnlib", False),
        ("mnist-net_256x2.onnx", "prop_7_0.03.vnnlib", True),
        ("mnist-net_256x2.onnx", "prop_0_0.03.vnnlib", False),
    ],
)
def test_polarity_on_some_instances(onnx: str, vnnlib: str, expected: bool) -> None:
    pytest.importorskip("onnxruntime")
    root = require_vnncomp()
    (row,) = [r for r in instances(root) if r["onnx"] == onnx and r["vnnlib"] == vnnlib]
    assert (row["expected"] == "sat") == expected
    assert check_polarity(root, row, steps=50, restarts=3) == expected


@pytest.mark.slow
# a few ACAS Xu boxes start where every ReLU is stable and the objective flat: the attack warns
@pytest.mark.filterwarnings("ignore::propdsl.loss.attacks.VanishingGradientWarning")
def test_polarity_on_every_instance() -> None:
    pytest.importorskip("onnxruntime")
    root = require_vnncomp()
    found = 0
    for row in instances(root):
        found += check_polarity(root, row, steps=50, restarts=3)
    # 35 instances are sat; a plain attack finds 23 of them (and none of the 76 unsat ones)
    assert found >= 20


# -- semantics -----------------------------------------------------------------------------------

HEAD = """(declare-const X_0 Real)
(declare-const X_1 Real)
(declare-const Y_0 Real)
(declare-const Y_1 Real)
(declare-const Y_2 Real)
"""
BOX = "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 -1))\n(assert (<= X_1 1))\n"


def parse(body: str, *, head: str = HEAD, shape=(2,), outputs: int = 3, **kw) -> list[Problem]:
    return parse_vnnlib(head + body, shape, outputs, name="t.vnnlib", **kw)


def test_arithmetic_terms_are_normalised_exactly() -> None:
    (p,) = parse(
        BOX
        + "(assert (<= (+ (* 2 Y_0) (- Y_1) 1.5) (/ Y_2 4)))\n"
        + "(assert (>= (- Y_0 Y_1 Y_2) (* -0.5 (+ Y_1 3))))\n"
        + "(assert (= Y_2 (* 3 2)))\n"
    )
    # 2y0 - y1 + 1.5 <= y2/4;  y0 - y1 - y2 >= -0.5 y1 - 1.5;  y2 = 6 (two rows)
    ((A, b),) = rows(p)
    assert A == [[2.0, -1.0, -0.25], [-1.0, 0.5, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]
    assert b == [-1.5, 1.5, 6.0, -6.0]


def test_strict_comparisons_read_as_non_strict() -> None:
    (strict,) = parse(BOX + "(assert (< Y_0 Y_1))\n(assert (> Y_2 1))\n")
    (plain,) = parse(BOX + "(assert (<= Y_0 Y_1))\n(assert (>= Y_2 1))\n")
    assert rows(strict) == rows(plain)


def test_disjunctions_over_boxes_give_several_problems() -> None:
    body = (
        "(assert (>= X_1 -1))\n(assert (<= X_1 1))\n"
        "(assert (or (and (>= X_0 0) (<= X_0 1) (<= Y_0 0))\n"
        "            (and (>= X_0 0) (<= X_0 1) (<= Y_1 0))\n"
        "            (and (>= X_0 2) (<= X_0 3) (<= Y_2 0))))\n"
    )
    first, second = parse(body)
    assert box(first) == ([0.0, -1.0], [1.0, 1.0]) and box(second) == ([2.0, -1.0], [3.0, 1.0])
    assert [A for A, _ in rows(first)] == [[[1.0, 0, 0]], [[0, 1.0, 0]]]
    assert [A for A, _ in rows(second)] == [[[0, 0, 1.0]]]
    assert (first.name, second.name) == ("t.vnnlib[0]", "t.vnnlib[1]")


def test_and_distributes_over_or() -> None:
    (p,) = parse(BOX + "(assert (and (or (<= Y_0 0) (<= Y_1 0)) (or (<= Y_2 0) (>= Y_2 5))))\n")
    assert [A for A, _ in rows(p)] == [
        [[1.0, 0, 0], [0, 0, 1.0]],
        [[1.0, 0, 0], [0, 0, -1.0]],
        [[0, 1.0, 0], [0, 0, 1.0]],
        [[0, 1.0, 0], [0, 0, -1.0]],
    ]


def test_empty_boxes_and_false_disjuncts_drop_out() -> None:
    body = (
        "(assert (or (and (>= X_0 2) (<= X_0 1) (<= Y_0 0)) (and (>= X_0 0) (<= X_0 1) (<= 1 0))))"
    )
    assert parse("(assert (>= X_1 -1))\n(assert (<= X_1 1))\n" + body) == []
    # no output constraint at all: every output violates (an empty conjunction)
    (p,) = parse(BOX)
    assert rows(p) == [([], [])]
    assert bool(p.violated_at(torch.zeros(2, 3)).all())


def test_bounds_are_rounded_outward() -> None:
    (p,) = parse(
        "(assert (>= X_0 0.1))\n(assert (<= X_0 0.1))\n(assert (>= X_1 -0.3))\n"
        "(assert (<= X_1 1e-3))\n(assert (<= Y_0 0.7))\n"
    )
    lo, hi = box(p)
    assert Fraction(lo[0]) < Fraction("0.1") < Fraction(hi[0])  # 0.1 is no float32
    assert Fraction(lo[1]) <= Fraction("-0.3") and Fraction(hi[1]) >= Fraction("0.001")
    assert hi[0] - lo[0] < 1e-8
    ((_, b),) = rows(p)
    assert Fraction(b[0]) >= Fraction("0.7") and b[0] - 0.7 < 1e-7
    (p64,) = parse("(assert (>= X_0 0.1))\n(assert (<= X_0 0.1))\n" + BOX[40:], dtype=torch.float64)
    assert p64.region.bounding_box()[0].dtype == torch.float64
    lo64, hi64 = box(p64)
    assert lo64[0] <= 0.1 <= hi64[0] and hi64[0] - lo64[0] <= 2e-17


def test_comments_and_ignored_commands() -> None:
    (p,) = parse("; a comment (with parentheses\n(set-logic QF_LRA)\n" + BOX + "(check-sat)\n")
    assert box(p) == ([0.0, -1.0], [1.0, 1.0])


def test_read_vnnlib_reads_files_and_reports_missing_ones(tmp_path: Path) -> None:
    path = tmp_path / "p.vnnlib"
    path.write_text(HEAD + BOX + "(assert (<= Y_0 Y_1))\n")
    (p,) = read_vnnlib(path, (2,), 3)
    assert p.name == "p.vnnlib" and rows(p) == [([[1.0, -1.0, 0.0]], [0.0])]
    (q,) = read_vnnlib(path, 2, 3)  # an int shape is a flat input
    assert q.region.bounding_box()[0].shape == (1, 2)
    with pytest.raises(UsageError, match="no such VNN-LIB file"):
        read_vnnlib(tmp_path / "absent.vnnlib", (2,), 3)


# -- VNN-LIB 2.0 ---------------------------------------------------------------------------------

V2 = """(vnnlib-version <2.0>)
(declare-network f
  (declare-input X float32 [1, 2])
  (declare-output Y float32 [1, 3]))
(assert (>= X[0, 0] 0.0))
(assert (<= X[0, 0] 1.0))
(assert (>= X[0, 1] -1.0))
(assert (<= X[0, 1] 1.0))
(assert (or (and (<= (+ (* 2.0 Y[0, 0]) (* -1.0 Y[0, 1])) 0.5)) (and (>= Y[0, 2] 3.0))))
"""
V1 = BOX + "(assert (or (and (<= (+ (* 2.0 Y_0) (* -1.0 Y_1)) 0.5)) (and (>= Y_2 3.0))))\n"


def test_vnnlib2_gives_the_problems_of_the_same_property_in_vnnlib1() -> None:
    pytest.importorskip("vnnlib")
    (v2,) = parse_vnnlib(V2, (2,), 3, name="t2.vnnlib")
    (v1,) = parse(V1)
    assert box(v2) == box(v1)
    assert rows(v2) == rows(v1) == [([[2.0, -1.0, 0.0]], [0.5]), ([[0.0, 0.0, -1.0]], [-3.0])]


def test_vnnlib2_errors_are_positioned() -> None:
    pytest.importorskip("vnnlib")
    with pytest.raises(VnnlibError, match=r"^t2\.vnnlib:8:21: .*") as err:
        parse_vnnlib(V2.replace("(<= X[0, 1] 1.0)", "(<= X[0, 1] 1)"), (2,), 3, name="t2.vnnlib")
    assert "\n" not in str(err.value)
    with pytest.raises(VnnlibError, match=r"^t2\.vnnlib:3:3: the file declares 2 inputs"):
        parse_vnnlib(V2, (3,), 3, name="t2.vnnlib")
    with pytest.raises(VnnlibError, match="no upper bound"):
        parse_vnnlib(V2.replace("(assert (<= X[0, 1] 1.0))\n", ""), (2,), 3, name="t2.vnnlib")


@pytest.mark.parametrize("fmt", ["vnnlib", "vnnlib2"])
def test_propdsls_exported_files_mean_what_the_exporter_means(fmt: str) -> None:
    """Files written by `propdsl export` read back to problems that hold exactly where the
    exporter's own `Instance.is_counterexample` says a counterexample is (random points)."""
    if fmt == "vnnlib2":
        pytest.importorskip("vnnlib")
    from propdsl.export import Atom, Format, Instance, vnnlib_text

    inst = Instance(
        lower=np.array([0.25, -1.0, 0.0, 0.5]),
        upper=np.array([0.5, 1.5, 0.125, 0.75]),
        terms=(
            (Atom(((0, 1.0), (2, -1.0)), 0.25),),
            (Atom(((1, 2.0),), -0.5), Atom(((0, -1.0), (1, 1.0)), 0.0)),
        ),
    )
    text = vnnlib_text(inst, input_shape=(2, 2), outputs=3, fmt=Format(fmt))
    (p,) = parse_vnnlib(text, (2, 2), 3, dtype=torch.float64)
    assert box(p) == (inst.lower.tolist(), inst.upper.tolist())
    assert [len(b) for _, b in rows(p)] == [1, 2]  # the rows may be scaled, the meaning not
    gen = torch.Generator().manual_seed(0)
    lo, hi = (torch.from_numpy(v).reshape(1, 2, 2) for v in (inst.lower, inst.upper))
    x = lo - 0.05 + (hi - lo + 0.1) * torch.rand(400, 2, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(400, 3, generator=gen, dtype=torch.float64)
    ours = p.region.contains(x, tol=0.0) & p.violated_at(y)
    theirs = [inst.is_counterexample(x[k].numpy(), y[k].numpy()) for k in range(400)]
    assert ours.tolist() == theirs
    assert 0 < sum(theirs) < 400


# -- errors --------------------------------------------------------------------------------------


def error_at(body: str, line: int, col: int, message: str, **kw) -> None:
    with pytest.raises(VnnlibError) as err:
        parse(body, **kw)
    text = str(err.value)
    assert "\n" not in text
    assert re.match(rf"t\.vnnlib:{line}:{col}: ", text), text
    assert re.search(message, text), text
    assert isinstance(err.value, UsageError)


def test_unbalanced_parentheses() -> None:
    error_at(BOX + "(assert (<= Y_0 1)\n", 10, 1, r"unbalanced '\(' \(never closed\)")
    error_at(BOX + "(assert (<= Y_0 1)))\n", 10, 20, r"unbalanced '\)'")


def test_unknown_symbols_and_commands() -> None:
    error_at(BOX + "(assert (<= Z_0 1))\n", 10, 13, "unknown symbol 'Z_0'")
    error_at(BOX + "(assert (<= Y_0 foo))\n", 10, 17, "unknown symbol 'foo'")
    error_at(BOX + "(assert (~= Y_0 1))\n", 10, 10, "unknown formula '~='")
    error_at(BOX + "(assert (<= (max Y_0 Y_1) 1))\n", 10, 14, "unknown term 'max'")
    error_at(BOX + "(push 1)\n", 10, 2, "unknown command 'push'")
    error_at(BOX + "(assert (not (<= Y_0 1)))\n", 10, 9, "'not' is not supported")
    error_at(BOX + "stray\n", 10, 1, "'stray' outside parentheses")


def test_nonlinear_terms() -> None:
    error_at(BOX + "(assert (<= (* Y_0 Y_1) 1))\n", 10, 20, "nonlinear term")
    error_at(BOX + "(assert (<= (/ 1 Y_1) 1))\n", 10, 18, "division by a variable")
    error_at(BOX + "(assert (<= (/ Y_1 0) 1))\n", 10, 20, "division by zero")


def test_inputs_without_bounds() -> None:
    error_at(BOX.replace("(assert (<= X_1 1))\n", ""), 2, 16, "X_1 has no upper bound")
    error_at(BOX.replace("(assert (>= X_0 0))\n", ""), 1, 16, "X_0 has no lower bound")
    body = BOX[:40] + "(assert (or (and (>= X_1 0) (<= X_1 1)) (and (>= X_1 0))))\n"
    error_at(body, 2, 16, "X_1 has no upper bound in disjunct 2 of 2")


def test_indices_beyond_the_network() -> None:
    error_at("(declare-const X_2 Real)\n" + BOX, 6, 16, r"'X_2' is beyond the network's 2 inputs")
    error_at(BOX, 5, 16, r"'Y_2' is beyond the network's 2 outputs \(Y_0 \.\.\. Y_1\)", outputs=2)
    error_at(BOX, 2, 16, r"X_2 is never declared: the network has 3 inputs", shape=(3,))
    error_at(BOX + "(assert (<= Y_3 1))\n", 10, 13, r"'Y_3' is not declared")


def test_constraints_that_are_no_box() -> None:
    error_at(BOX + "(assert (<= X_0 X_1))\n", 10, 9, "several inputs is not a box bound")
    error_at(BOX + "(assert (<= X_0 Y_1))\n", 10, 9, "mixes inputs")


def test_declarations() -> None:
    error_at(
        BOX,
        6,
        16,
        r"'X_1' is declared twice \(first at 2:16\)",
        head=HEAD + "(declare-const X_1 Real)\n",
    )
    error_at(
        BOX,
        5,
        20,
        "'X_0' must be declared Real, not 'Int'",
        head=HEAD.replace("(declare-const X_0 Real)\n", "") + "(declare-const X_0 Int)\n",
    )
