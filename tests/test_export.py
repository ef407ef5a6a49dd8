"""Export (propdsl.export, `propdsl export`): ONNX networks and VNN-LIB queries.

The ONNX file computes what the torch model computes (onnxruntime, 1e-5). Each VNN-LIB file is
read back three ways and must mean the negation of the property for its sample: VNN-LIB 2.0
files with the `vnnlib` package (input box and output polytopes), VNN-LIB 1.0 files with a small
reader written here, and by Marabou, which solves them against the ONNX network: `unsat` where we
verified, `sat` (with a real counterexample) where we falsified.
"""

from __future__ import annotations

import csv
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import propdsl
from propdsl.export import Format, export, export_onnx, instances
from propdsl.models import build_model
from propdsl.region import Region
from propdsl.verify.query import to_query

SPEC = """
network f : Tensor[2] -> Tensor[3]
param eps : Real = 0.1
param delta : Real = 0.3
param c : Real = 0.1
param eta : Real = 0.6

let unit = box(0, 1)

property cr(x, y) = forall x' in ball(x, eps, inf) & unit: argmax(f(x')) == y
property sr(x) = forall x' in ball(x, eps, inf) & unit: norm(f(x') - f(x), inf) <= delta
property lin(x) = forall x' in ball(x, eps, inf) & unit: 1.5 * f(x')[0] - 0.5 * f(x')[1] + c >= 0
property disj(x) = forall x' in ball(x, eps, inf) & unit: f(x')[0] >= c or f(x')[2] <= c
property impl(x, y) = forall x' in ball(x, eps, inf) & unit: y == 0 implies f(x')[0] >= c
property scr(x, y) = forall x' in ball(x, eps, inf) & unit: softmax(f(x'))[y] >= eta
property round(x) = forall x' in ball(x, eps, 2) & unit: f(x')[0] >= c
"""
NAMES = ("cr", "sr", "lin", "disj", "impl", "scr")


def refuted(name: str, out: np.ndarray, centre: np.ndarray, y: int, prm: dict) -> bool:
    """Does output vector `out` violate the (linear) condition of property `name`? By hand;
    for `scr` the sufficient margin condition that the query states."""
    if name == "cr":
        return any(out[j] >= out[y] for j in range(3) if j != y)
    if name == "sr":
        return bool(np.abs(out - centre).max() > prm["delta"])
    if name == "lin":
        return 1.5 * out[0] - 0.5 * out[1] + prm["c"] < 0
    if name == "disj":
        return out[0] < prm["c"] and out[2] > prm["c"]
    if name == "impl":
        return y == 0 and out[0] < prm["c"]
    if name == "scr":
        bound = math.log(2 * prm["eta"] / (1 - prm["eta"]))
        return any(out[y] - out[j] < bound for j in range(3) if j != y)
    raise KeyError(name)


PRM = {"eps": 0.1, "delta": 0.3, "c": 0.1, "eta": 0.6}


def relu_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear):
                m.weight.mul_(2.0)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-8-8-3 ReLU network and 6 samples, exported in both syntaxes."""
    net = relu_net()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 2, generator=gen)
    with torch.no_grad():
        y = net(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # one misclassified sample
    spec = propdsl.load(SPEC, PRM)
    out = tmp_path_factory.mktemp("export")
    reports = {
        fmt: export(spec, net, x, y, out / fmt.value, properties=[*NAMES, "round"], fmt=fmt)
        for fmt in Format
    }
    return spec, net, x, y, reports


# -- ONNX ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options"),
    [("mlp", {"hidden": [16, 16]}), ("cnn", {"channels": [4, 8], "hidden": 16}), ("mlp", {})],
)
@pytest.mark.parametrize("dynamic", [False, True])
def test_onnx_computes_what_torch_computes(tmp_path, name, options, dynamic):
    ort = pytest.importorskip("onnxruntime")
    model = build_model(name, (1, 8, 8), 10, seed=0, **options).eval()
    path = export_onnx(model, (1, 8, 8), tmp_path / "f.onnx", dynamic_batch=dynamic)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "output")
    batch = 5 if dynamic else 1
    x = torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    (got,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert model.training is False and next(model.parameters()).dtype == torch.float32


def test_onnx_of_a_training_float64_model_is_float32_in_eval_mode(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Linear(2, 4), nn.Dropout(0.5), nn.Linear(4, 3)).double().train()
    path = export_onnx(model, (2,), tmp_path / "f.onnx")
    assert model.training  # the caller's model is left alone
    x = torch.rand(1, 2, dtype=torch.float64)
    (got,) = ort.InferenceSession(str(path)).run(None, {"input": x.float().numpy()})
    with torch.no_grad():
        want = model.eval()(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


# -- instances (the negated queries) -------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_instances_are_the_negated_properties(exported, name):
    spec, net, x, y, _ = exported
    prop = spec.property(name)
    query = to_query(prop.formula, [p for p, _ in prop.params], {"f": 3}, x, y, {"f": net})
    insts = instances(query)
    lo, hi = Region.ball(x, 0.1, math.inf, lo=0.0, hi=1.0).bounding_box()
    rng = np.random.default_rng(0)
    with torch.no_grad():
        centre = net(x).numpy().astype(np.float64)
    for i, inst in enumerate(insts):
        np.testing.assert_array_equal(inst.lower, lo[i].double().numpy())
        np.testing.assert_array_equal(inst.upper, hi[i].double().numpy())
        for out in centre[i] + rng.normal(0, 1.0, (300, 3)):
            want = refuted(name, out, centre[i], int(y[i]), PRM)
            assert inst.is_counterexample(x[i].numpy(), out) == want, (i, out)


def test_constant_negations():
    """A property false whatever the outputs (the negation is true) has no output assertion;
    one true whatever the outputs has no file."""
    from propdsl.export import vnnlib_text

    spec = propdsl.load(
        SPEC + "property label(x, y) = forall x' in ball(x, eps, inf) & unit: y == 0 and "
        "f(x')[0] >= -1000\n"
    )
    net = relu_net()
    x, y = torch.rand(2, 2), torch.tensor([0, 1])
    prop = spec.property("label")
    (first, second) = instances(to_query(prop.formula, ["x", "y"], {"f": 3}, x, y, {"f": net}))
    assert second.terms == ((),)  # y = 1: every output is a counterexample
    assert second.is_counterexample(x[1].numpy(), np.zeros(3))
    text = vnnlib_text(second, input_shape=(2,), outputs=3)
    assert "no output constraint" in text and "Y_0 " not in text.split("\n\n")[-1]
    assert len(first.terms) == 1  # y = 0: only f0 < -1000


def test_l2_balls_are_skipped(exported):
    *_, reports = exported
    for report in reports.values():
        assert "round" in report.skipped and "boxes" in report.skipped["round"]
        assert not any("round" in p.name for p in report.files)


# -- VNN-LIB 2.0 with the vnnlib package ---------------------------------------------------------
def test_vnnlib2_files_parse_and_mean_the_negation(exported):
    vnnlib = pytest.importorskip("vnnlib")
    compat = pytest.importorskip("vnnlib.compat")

    spec, net, x, y, reports = exported
    files = reports[Format.VNNLIB2].files
    assert len(files) == len(NAMES) * 6 - int((y != 0).sum())  # impl holds where y != 0
    rng = np.random.default_rng(1)
    with torch.no_grad():
        centre = net(x).numpy().astype(np.float64)
    for path in files:
        name, index = path.stem.rsplit("_", 1)
        i = int(index)
        query = vnnlib.parse_query_file(str(path))
        (network,) = query.networks
        assert [d.shape for d in network.inputs] == [[1, 2]]
        assert [d.shape for d in network.outputs] == [[1, 3]]
        (case,) = compat.transform(query)
        box = np.array(case.input_box)
        lo, hi = Region.ball(x[i : i + 1], 0.1, math.inf, lo=0.0, hi=1.0).bounding_box()
        np.testing.assert_allclose(box[:, 0], lo[0].numpy(), rtol=0, atol=0)
        np.testing.assert_allclose(box[:, 1], hi[0].numpy(), rtol=0, atol=0)
        polytopes = [(np.array(p.coeff_matrix), np.array(p.rhs)) for p in case.output_constraints]
        for out in centre[i] + rng.normal(0, 1.0, (200, 3)):
            parsed = any(bool(np.all(a @ out <= b)) for a, b in polytopes)
            assert parsed == refuted(name, out, centre[i], int(y[i]), PRM), (path.name, out)


# -- VNN-LIB 1.0: a reader of our own, then Marabou ----------------------------------------------
def read_vnnlib1(text: str):
    """(lower, upper, formula) of a VNN-COMP style file: input bounds `(>= X_i c)` /
    `(<= X_i c)` and a function of the outputs that is True on counterexamples."""
    tokens = re.findall(r"\(|\)|[^\s()]+", re.sub(r";[^\n]*", "", text))

    def parse(i: int):
        if tokens[i] != "(":
            return tokens[i], i + 1
        out, i = [], i + 1
        while tokens[i] != ")":
            item, i = parse(i)
            out.append(item)
        return out, i + 1

    forms, i = [], 0
    while i < len(tokens):
        form, i = parse(i)
        forms.append(form)
    names = [f[1] for f in forms if f[0] == "declare-const"]
    assert all(f[2] == "Real" for f in forms if f[0] == "declare-const")
    n = sum(name.startswith("X_") for name in names)
    lower, upper = np.full(n, -np.inf), np.full(n, np.inf)
    outputs = []
    for f in forms:
        if f[0] != "assert":
            continue
        body = f[1]
        if body[0] in ("<=", ">=") and isinstance(body[1], str) and body[1].startswith("X_"):
            k = int(body[1][2:])
            (upper if body[0] == "<=" else lower)[k] = float(body[2])
        else:
            outputs.append(body)

    def value(e, y):
        if isinstance(e, str):
            return y[int(e[2:])] if e.startswith("Y_") else float(e)
        if e[0] == "+":
            return sum(value(a, y) for a in e[1:])
        if e[0] == "*":
            return math.prod(value(a, y) for a in e[1:])
        if e[0] == "-":
            return -value(e[1], y) if len(e) == 2 else value(e[1], y) - value(e[2], y)
        raise ValueError(e)

    def truth(e, y):
        if e[0] == "and":
            return all(truth(a, y) for a in e[1:])
        if e[0] == "or":
            return any(truth(a, y) for a in e[1:])
        left, right = value(e[1], y), value(e[2], y)
        return left <= right if e[0] == "<=" else left >= right

    return lower, upper, lambda y: all(truth(e, y) for e in outputs)


def test_vnnlib1_files_mean_the_negation(exported):
    spec, net, x, y, reports = exported
    report = reports[Format.VNNLIB]
    assert len(report.files) == len(NAMES) * 6 - int((y != 0).sum())
    rng = np.random.default_rng(2)
    with torch.no_grad():
        centre = net(x).numpy().astype(np.float64)
    for path in report.files:
        name, index = path.stem.rsplit("_", 1)
        i = int(index)
        text = path.read_text()
        assert text.isascii() and not re.search(r"\d[eE][-+]?\d", text)  # plain decimals
        lower, upper, counterexample = read_vnnlib1(text)
        lo, hi = Region.ball(x[i : i + 1], 0.1, math.inf, lo=0.0, hi=1.0).bounding_box()
        np.testing.assert_array_equal(lower, lo[0].double().numpy())
        np.testing.assert_array_equal(upper, hi[0].double().numpy())
        for out in centre[i] + rng.normal(0, 1.0, (200, 3)):
            assert counterexample(out) == refuted(name, out, centre[i], int(y[i]), PRM)
    # the common shapes VNN-COMP tools parse
    cr = (report.out / "vnnlib" / "cr_1.vnnlib").read_text()
    assert re.search(r"\(and \(<= Y_\d Y_\d\)\)", cr)
    sr = (report.out / "vnnlib" / "sr_1.vnnlib").read_text()
    assert re.search(r"\(and \(>= Y_\d [\d.]+\)\)", sr)


def test_instances_csv(exported):
    *_, reports = exported
    for report in reports.values():
        rows = list(csv.reader(report.instances.read_text().splitlines()))
        assert [r[1] for r in rows] == [f"vnnlib/{p.name}" for p in report.files]
        assert {r[0] for r in rows} == {"onnx/f.onnx"} and {r[2] for r in rows} == {"60.0"}
        for onnx_path, vnnlib_path, _ in rows:
            assert (report.out / onnx_path).exists() and (report.out / vnnlib_path).exists()


@pytest.mark.filterwarnings("ignore:Tensorflow parser")
def test_marabou_solves_the_exported_queries(exported):
    """Marabou reads our ONNX and VNN-LIB 1.0 files: it proves what we verified and refutes what
    we falsified; each of its counterexamples violates the property on our network."""
    pytest.importorskip("maraboupy")
    from maraboupy import Marabou

    spec, net, x, y, reports = exported
    report = reports[Format.VNNLIB]
    verdicts = spec.verify(net, x, y, ["cr", "sr", "disj", "impl"], method="alpha_crown")
    with torch.no_grad():
        centre = net(x).numpy().astype(np.float64)
    seen = set()
    for path in report.files:
        name, index = path.stem.rsplit("_", 1)
        if name not in verdicts:
            continue
        i = int(index)
        network = Marabou.read_onnx(str(report.onnx))
        options = Marabou.createOptions(verbosity=0, timeoutInSeconds=30)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result, values, _ = network.solve(
                propertyFilename=str(path), options=options, verbose=False
            )
        status = verdicts[name].status[i]
        seen.add((status, result))
        if status == "verified":
            assert result == "unsat", path.name
        if status == "falsified":
            assert result == "sat", path.name
        if result == "sat":
            xs = np.array(network.inputVars[0]).flatten()
            point = torch.tensor([[values[int(v)] for v in xs]], dtype=torch.float32)
            point = Region.ball(x[i : i + 1], 0.1, math.inf, lo=0.0, hi=1.0).project(point)
            with torch.no_grad():
                out = net(point)[0].numpy().astype(np.float64)
            assert refuted(name, out, centre[i], int(y[i]), PRM), path.name
    assert ("verified", "unsat") in seen and ("falsified", "sat") in seen


def test_no_vnnlib_for_an_empty_region(tmp_path):
    """Before, a sample of unscaled pixels (its ball misses box(0, 1)) got a VNN-LIB file for
    the clamped single point (1, 1), a box outside the region. Now no file: the sample is
    skipped with the reason, and `instances` gives None for it."""
    spec = propdsl.load(SPEC)
    net = relu_net()
    x = torch.tensor([[0.3, 0.6], [200.0, 17.0], [0.95, 1.08]])  # 2: touches the box
    y = torch.tensor([0, 1, 2])
    prop = spec.property("cr")
    query = to_query(prop.formula, ["x", "y"], {"f": 3}, x, y, {"f": net})
    got = instances(query)
    assert got[1] is None and got[0] is not None and got[2] is not None
    np.testing.assert_allclose(got[2].lower, [0.85, 0.98], atol=1e-6)
    np.testing.assert_allclose(got[2].upper, [1.0, 1.0], atol=1e-6)
    report = export(spec, net, x, y, tmp_path / "out", properties=["cr"])
    names = sorted(p.name for p in report.files)
    assert names == ["cr_0.vnnlib", "cr_2.vnnlib"]
    assert not (tmp_path / "out" / "vnnlib" / "cr_1.vnnlib").exists()
    assert report.skipped == {"cr[1]": report.skipped["cr[1]"]}
    assert report.skipped["cr[1]"].startswith("the region is empty")
    assert "holds vacuously" in report.skipped["cr[1]"]
    rows = (tmp_path / "out" / "instances.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows] == ["vnnlib/cr_0.vnnlib", "vnnlib/cr_2.vnnlib"]


def test_two_point_properties_are_skipped_with_the_real_reason(tmp_path):
    """The skip reason names what VNN-LIB cannot state for each pair of norms, instead of
    "handles ... two in a Lipschitz bound" for exactly that form."""
    text = """
network f : Tensor[2] -> Tensor[3]
property l2(x) =
  forall x1 in ball(x, 0.1, inf) & box(0, 1), x2 in ball(x, 0.1, inf) & box(0, 1):
    norm(f(x1) - f(x2), 2) <= 10 * norm(x1 - x2, 2)
property linf(x) =
  forall x1 in ball(x, 0.1, inf) & box(0, 1), x2 in ball(x, 0.1, inf) & box(0, 1):
    norm(f(x1) - f(x2), inf) <= 10 * norm(x1 - x2, 1)
property order(x) =
  forall x1 in ball(x, 0.1, inf), x2 in ball(x, 0.1, inf): f(x1)[0] <= f(x2)[0] + 1
"""
    spec = propdsl.load(text)
    report = export(spec, relu_net(), torch.rand(2, 2), None, tmp_path / "out")
    assert report.files == ()
    assert "compares the network at 2 inputs (x1, x2)" in report.skipped["l2"]
    assert "L2 norm is not linear" in report.skipped["l2"]
    assert "L-inf and L1 norms are piecewise linear" in report.skipped["linf"]
    assert "two network copies" in report.skipped["linf"]
    assert "strict '>'" in report.skipped["linf"]
    assert report.skipped["order"].startswith("<spec>:")
    assert "2 inputs (x1, x2)" in report.skipped["order"] and "norm" not in report.skipped["order"]


# -- propdsl export ------------------------------------------------------------------------------
CLI_SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = 0.02

let pixels = box(0, 1)

property robust(x, y) =
  forall x' in ball(x, eps, inf) & pixels:
    argmax(f(x')) == y

property lipschitz(x) =
  forall x1 in ball(x, eps, inf) & pixels, x2 in ball(x, eps, inf) & pixels:
    norm(f(x1) - f(x2), 2) <= 10 * norm(x1 - x2, 2)

train f on digits(split = "train", limit = 200) {
  model  = mlp(hidden = [16])
  epochs = 1
  loss   = cross_entropy
}

verify f on digits(split = "test") {
  properties = [robust, lipschitz]
  timeout    = 30
}
"""


def test_propdsl_export_end_to_end(tmp_path):
    from propdsl import cli
    from propdsl.train import TrainOptions, train

    spec_path = tmp_path / "tiny.prop"
    spec_path.write_text(CLI_SPEC, encoding="utf-8")
    train(propdsl.load(spec_path), TrainOptions(out=tmp_path / "run", quiet=True, threads=1))
    out = tmp_path / "bench"
    args = ["export", str(spec_path), "--run", str(tmp_path / "run"), "--to", "vnnlib", str(out)]
    result = CliRunner().invoke(cli.app, [*args, "--samples", "3", "--param", "eps=0.03"])
    assert result.exit_code == 0, result.output
    assert "3 VNN-LIB files" in result.output
    # the real reasons (two network evaluations; a non-linear L2 norm), not a claim that the
    # property has the one form it does have
    skip = next(line for line in result.output.splitlines() if "skipped lipschitz" in line)
    assert "compares the network at 2 inputs (x1, x2)" in skip
    assert "L2 norm is not linear" in skip and "or two in a Lipschitz bound" not in skip
    rows = list(csv.reader((out / "instances.csv").read_text().splitlines()))
    assert rows == [["onnx/f.onnx", f"vnnlib/robust_{i}.vnnlib", "30.0"] for i in range(3)]
    lower, upper, _ = read_vnnlib1((out / "vnnlib" / "robust_0.vnnlib").read_text())
    assert lower.shape == (64,) and np.all(upper - lower <= 0.06 + 1e-7)
    result = CliRunner().invoke(cli.app, [*args[:-3], "--to", "smtlib", str(out)])
    assert result.exit_code == 2 and "--to must be vnnlib or vnnlib2" in result.output
