"""The IR interpreter (propdsl.interpret) on its own, without the loss side: exact values against
hand computations, regions of domains, and the import boundary it gives the verifier."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import propdsl
from propdsl import ir as I
from propdsl.interpret import (
    BOOLEAN,
    CompileError,
    EvalConfig,
    Interpreter,
    differentiates,
    sample_env,
)

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
network f : Tensor[3] -> Tensor[3]

property robust(x, y) =
  forall x' in ball(x, 0.25, inf) & box(0, 1):
    argmax(f(x')) == y

property sums(x) =
  forall x' in ball(x, 0.5, 2):
    sum(f(x)) + max(f(x)) * 2 >= norm(f(x), 1) - 1

property stable(x, y) =
  forall x' in ball(x, 0.1, inf):
    cosine(saliency(f, x', y), saliency(f, x, y)) >= 0.5
"""


def _linear() -> nn.Linear:
    net = nn.Linear(3, 3).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, -1.0, 1.0]]))
        net.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return net


def test_the_exact_truth_of_a_finite_quantifier_matches_brute_force():
    """`forall j in classes \\ {y}: f(x)[y] > f(x)[j]` (the body of `robust` at x' := x) is
    the argmax test, sample by sample."""
    spec = propdsl.load(SPEC)
    quant = spec.property("robust").formula
    assert isinstance(quant, I.Quant)
    body = quant.body  # the finite quantifier over the classes, reading x'
    net = _linear()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=gen)
    env = sample_env({"f": net}, ["x", "y"], x, y, logic=BOOLEAN).child({"x'": x})
    truth = Interpreter()(body)(env)
    with torch.no_grad():
        expected = net(x).argmax(1) == y
    assert truth.dtype == torch.bool
    assert torch.equal(truth, expected)
    assert 0 < int(expected.sum()) < 64  # both outcomes occur


def test_built_ins_match_their_definitions():
    """`sum(f(x)) + max(f(x)) * 2 >= norm(f(x), 1) - 1`, each side computed by hand."""
    spec = propdsl.load(SPEC)
    cmp = spec.property("sums").formula.body
    cmp = cmp.atom if isinstance(cmp, I.Linear) else cmp
    assert isinstance(cmp, I.Cmp)
    net = _linear()
    x = torch.tensor([[0.2, 0.4, 0.9], [1.0, 0.0, 0.5]], dtype=torch.float64)
    env = sample_env({"f": net}, ["x"], x, None, logic=BOOLEAN)
    interp = Interpreter()
    with torch.no_grad():
        out = net(x)
        left = out.sum(1) + out.amax(1) * 2
        right = out.abs().sum(1) - 1
        torch.testing.assert_close(interp(cmp.left)(env), left)
        torch.testing.assert_close(interp(cmp.right)(env), right)
        assert torch.equal(interp(cmp)(env), left >= right)


def test_domains_become_regions_scaled_by_the_config():
    spec = propdsl.load(SPEC)
    x = torch.tensor([[0.1, 0.5, 0.95]], dtype=torch.float64)
    interp = Interpreter()
    robust = spec.property("robust").formula
    env = sample_env({"f": _linear()}, ["x", "y"], x, torch.tensor([0]), logic=BOOLEAN)
    lo, hi = interp.domain(robust.domains[0])(env).bounding_box()
    assert lo.tolist() == [[0.0, 0.25, 0.7]]  # the ball of radius 0.25 cut to [0, 1]
    torch.testing.assert_close(hi, torch.tensor([[0.35, 0.75, 1.0]], dtype=torch.float64))
    half = sample_env(
        {"f": _linear()},
        ["x", "y"],
        x,
        torch.tensor([0]),
        logic=BOOLEAN,
        config=EvalConfig(radius_scale=0.5),
    )
    lo, hi = interp.domain(robust.domains[0])(half).bounding_box()
    torch.testing.assert_close(lo, torch.tensor([[0.0, 0.375, 0.825]], dtype=torch.float64))
    l2 = interp.domain(spec.property("sums").formula.domains[0])(env)
    assert l2.p == 2.0 and float(l2.radius.reshape(-1)[0]) == 0.5


def test_a_quantifier_over_a_region_has_no_exact_evaluation():
    """Only the loss side (attacks) and the verifier (bounds) decide those."""
    spec = propdsl.load(SPEC)
    x = torch.rand(2, 3, dtype=torch.float64)
    env = sample_env({"f": _linear()}, ["x", "y"], x, torch.tensor([0, 1]), logic=BOOLEAN)
    with pytest.raises(CompileError, match="'forall' over the region of x' has no exact"):
        Interpreter()(spec.property("robust").formula)(env)


def test_differentiates_finds_explainers_and_grad():
    spec = propdsl.load(SPEC)
    assert differentiates(spec.property("stable").formula)
    assert not differentiates(spec.property("robust").formula)


def test_the_verifier_never_imports_the_loss_side_or_training():
    """Queries, Jacobian queries and verify runs evaluate through the interpreter: building a
    query for a property loads neither `propdsl.loss` nor `propdsl.train` (it did, through the
    loss compiler, before the interpreter had its own module)."""
    probe = """
import sys, json
import torch
import propdsl
import propdsl.verify.jacobian, propdsl.verify.run, propdsl.verify.report
from propdsl.verify.query import to_query
from propdsl.verify.jacobian import to_jacobian_query
spec = propdsl.load('specs/digits.prop')
net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
q = to_query(spec.property('classification_robust').formula, ['x', 'y'], {'f': 10}, x, y,
             {'f': net})
j = to_jacobian_query(spec.property('lipschitz_robust').formula, ['x'], {'f': 10}, x, None,
                      {'f': net})
assert q is not None and j is not None
print(json.dumps(sorted(m for m in sys.modules
                        if m.startswith(('propdsl.loss', 'propdsl.train')))))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _imports(path: Path) -> set[str]:
    """Every propdsl module a file imports, at the top, inside functions or for type checking."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {n for n in names if n.startswith("propdsl")}


def _under(names: set[str], *packages: str) -> set[str]:
    return {n for n in names for p in packages if n == p or n.startswith(p + ".")}


PROPDSL = ROOT / "propdsl"


@pytest.mark.parametrize(
    ("files", "forbidden"),
    [
        # the verifier: neither the loss side nor training
        (sorted((PROPDSL / "verify").rglob("*.py")), ("propdsl.loss", "propdsl.train")),
        # the bound engine: networks over regions, never the IR
        (
            [PROPDSL / "verify" / f for f in ("bounds.py", "layers.py", "graph.py")],
            ("propdsl.ir", "propdsl.interpret", "propdsl.simplify", "propdsl.api"),
        ),
        # the interpreter: shared by both back ends, so it imports neither
        (
            sorted((PROPDSL / "interpret").rglob("*.py")),
            ("propdsl.loss", "propdsl.verify", "propdsl.train", "propdsl.attacks"),
        ),
        # the attacks: regions and models only
        ([PROPDSL / "attacks.py"], ("propdsl.loss", "propdsl.verify", "propdsl.ir")),
    ],
    ids=["verify", "engine", "interpret", "attacks"],
)
def test_the_back_ends_import_boundaries(files, forbidden):
    assert files
    crossing = {str(f.relative_to(ROOT)): _under(_imports(f), *forbidden) for f in files}
    assert not {f: n for f, n in crossing.items() if n}
