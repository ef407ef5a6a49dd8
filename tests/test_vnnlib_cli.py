"""`propdsl vnnlib`: VNN-COMP instances through the command line, and `propdsl.interop.competition`.

Answers are checked against hand-derived ones (tiny exported networks) and against the answers
the 2021 competition's verifiers agreed on (the shared instances, skipped when absent); every
`sat` assignment is re-checked here with onnxruntime's own session and the file's decimal bounds.
"""

from __future__ import annotations

import csv
import json
import re
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

ort = pytest.importorskip("onnxruntime")

from _vnncomp import require_vnncomp  # noqa: E402

from propdsl import cli  # noqa: E402
from propdsl.errors import UsageError  # noqa: E402
from propdsl.export import export_onnx  # noqa: E402
from propdsl.interop import competition  # noqa: E402
from propdsl.interop.competition import read_instances, solve_instance  # noqa: E402
from propdsl.verify.problem import Answer  # noqa: E402


def run(*args: str | Path):
    return CliRunner().invoke(cli.app, [str(a) for a in args])


def parse_answer(text: str) -> tuple[str, dict[str, float]]:
    """The competition's result text: the answer, and the assignment of a `sat` answer."""
    lines = text.strip().splitlines()
    values = {m[0]: float(m[1]) for m in re.findall(r"\((\w+_\d+) ([^()\s]+)\)", text)}
    return lines[0], values


def box_of(vnnlib: Path) -> dict[str, tuple[Decimal, Decimal]]:
    """The decimal bounds `(<= X_i c)` / `(>= X_i c)` of a file with one box (read here)."""
    lo: dict[str, Decimal] = {}
    hi: dict[str, Decimal] = {}
    for op, name, value in re.findall(
        r"\(assert \((<=|>=) (X_\d+) ([-\d.eE+]+)\)\)", vnnlib.read_text()
    ):
        (hi if op == "<=" else lo)[name] = Decimal(value)
    return {k: (lo[k], hi[k]) for k in lo}


def ort_outputs(onnx: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    return session.run(None, {inp.name: x.astype(np.float32).reshape(shape)})[0].reshape(-1)


# -- a tiny network with hand-derived answers (no shared data needed) ----------------------------


@pytest.fixture(scope="module")
def diff_net(tmp_path_factory) -> Path:
    """On [0, 1]^2: y0 = relu(x0 - x1) - relu(x1 - x0) = x0 - x1, y1 = relu(x0 + x1) - 1."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]))
        net[2].bias.copy_(torch.tensor([0.0, -1.0]))
    path = tmp_path_factory.mktemp("vnncli") / "diff.onnx"
    export_onnx(net, (2,), path)
    return path


def vnnlib_text(output_condition: str) -> str:
    return (
        "(declare-const X_0 Real)\n(declare-const X_1 Real)\n"
        "(declare-const Y_0 Real)\n(declare-const Y_1 Real)\n"
        "(assert (>= X_0 0))\n(assert (<= X_0 1))\n(assert (>= X_1 0))\n(assert (<= X_1 1))\n"
        f"(assert {output_condition})\n"
    )


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        # y0 = x0 - x1 reaches 1 at (1, 0): >= 0.75 is sat, >= 1.25 is not
        ("(>= Y_0 0.75)", "sat"),
        ("(>= Y_0 1.25)", "unsat"),
        # y1 = x0 + x1 - 1 lies in [-1, 1]
        # y1 >= 0.5 and y0 >= 0.9 add up to 2 x0 >= 2.4: no x0 <= 1 does it
        ("(and (>= Y_1 0.5) (>= Y_0 0.9))", "unsat"),
        ("(or (<= Y_1 -1.5) (>= Y_1 0.99))", "sat"),
    ],
)
def test_hand_derived_answers(tmp_path, diff_net, condition, expected):
    prop = tmp_path / "p.vnnlib"
    prop.write_text(vnnlib_text(condition))
    result = run("vnnlib", diff_net, prop, "--timeout", "20")
    assert result.exit_code == 0, result.output
    answer, values = parse_answer(result.stdout)
    assert answer == expected
    if expected == "sat":
        x0, x1 = values["X_0"], values["X_1"]
        assert 0 <= x0 <= 1 and 0 <= x1 <= 1
        y = ort_outputs(diff_net, np.array([x0, x1]))
        assert values["Y_0"] == pytest.approx(float(y[0])) and values["Y_1"] == pytest.approx(
            float(y[1])
        )
        assert abs(y[0] - (x0 - x1)) < 1e-6 and abs(y[1] - (x0 + x1 - 1)) < 1e-6
        if condition == "(>= Y_0 0.75)":
            assert y[0] >= 0.75
        else:
            assert y[1] <= -1.5 or y[1] >= 0.99


def test_onnxruntime_disagreeing_gives_unknown(tmp_path, diff_net, monkeypatch):
    """The solver's counterexample is rejected when onnxruntime's outputs do not violate the
    property: `unknown` with the reason, never `sat`."""
    from propdsl.interop import onnx_import

    prop = tmp_path / "p.vnnlib"
    prop.write_text(vnnlib_text("(>= Y_0 0.75)"))
    monkeypatch.setattr(onnx_import, "onnx_forward", lambda path, x: np.zeros((1, 2)))
    result = solve_instance(diff_net, prop, timeout=20)
    assert result.answer is Answer.UNKNOWN
    assert result.counterexample is None
    assert "does not violate the property by onnxruntime's outputs" in result.reason
    assert result.text() == "unknown\n"
    cli_result = run("vnnlib", diff_net, prop)
    assert cli_result.exit_code == 0 and cli_result.stdout == "unknown\n"


def test_a_network_the_bound_engine_does_not_cover_is_unknown(tmp_path, diff_net, monkeypatch):
    from propdsl.verify import complete
    from propdsl.verify.layers import UnsupportedLayerError

    def refuse(*args, **kwargs):
        raise UnsupportedLayerError("no bound rule for Erf (node 'erf_1')")

    prop = tmp_path / "p.vnnlib"
    prop.write_text(vnnlib_text("(>= Y_0 0.75)"))
    monkeypatch.setattr(complete, "solve", refuse)
    r = run("vnnlib", diff_net, prop)
    assert r.exit_code == 0 and r.stdout == "unknown\n"
    assert "does not cover the network: no bound rule for Erf" in r.stderr


def test_out_file_is_never_overwritten_silently(tmp_path, diff_net):
    prop = tmp_path / "p.vnnlib"
    prop.write_text(vnnlib_text("(>= Y_0 1.25)"))
    out = tmp_path / "answer.txt"
    out.write_text("keep me\n")
    refused = run("vnnlib", diff_net, prop, "--out", out)
    assert refused.exit_code == 2 and "exists; --force overwrites it" in refused.output
    assert out.read_text() == "keep me\n"
    forced = run("vnnlib", diff_net, prop, "--out", out, "--force")
    assert forced.exit_code == 0 and out.read_text() == "unsat\n"
    fresh = tmp_path / "new.txt"
    assert run("vnnlib", diff_net, prop, "--out", fresh).exit_code == 0
    assert fresh.read_text() == "unsat\n"


def test_bad_files_and_options_are_clear_errors(tmp_path, diff_net):
    bad = tmp_path / "bad.vnnlib"
    bad.write_text("(declare-const X_0 Real)\n(assert (<= X_0 1)\n")
    r = run("vnnlib", diff_net, bad)
    assert r.exit_code == 1 and f"{bad}:2:1: unbalanced '('" in r.output
    r = run("vnnlib", diff_net, tmp_path / "missing.vnnlib")
    assert r.exit_code == 2 and "no such VNN-LIB file" in r.output
    r = run("vnnlib", bad, bad)  # not an ONNX file
    assert r.exit_code == 2 and "not an ONNX model" in r.output
    prop = tmp_path / "p.vnnlib"
    prop.write_text(vnnlib_text("(>= Y_0 1.25)"))
    beyond = tmp_path / "beyond.vnnlib"
    beyond.write_text(
        vnnlib_text("(>= Y_2 1.25)").replace("Y_1 Real)", "Y_1 Real)\n(declare-const Y_2 Real)")
    )
    r = run("vnnlib", diff_net, beyond)
    assert r.exit_code == 1 and "beyond.vnnlib:" in r.output
    for args in (
        [],
        [diff_net],
        [diff_net, prop, "--timeout", "0"],
        [diff_net, prop, "--json", tmp_path / "r.json"],
        [diff_net, prop, "--instances", tmp_path / "i.csv"],
        ["--instances", tmp_path / "i.csv", "--timeout", "5"],
        ["--instances", tmp_path / "missing.csv"],
    ):
        r = run("vnnlib", *args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error: ") and "Traceback" not in r.output


def test_read_instances_layouts_and_errors(tmp_path):
    (tmp_path / "b").mkdir()
    plain = tmp_path / "instances.csv"
    plain.write_text("onnx/n.onnx,vnnlib/p.vnnlib,60\nn2.onnx,q.vnnlib,7.5,sat\n")
    rows = read_instances(plain)
    assert [(r.onnx, r.vnnlib, r.timeout, r.expected) for r in rows] == [
        (tmp_path / "onnx/n.onnx", tmp_path / "vnnlib/p.vnnlib", 60.0, ""),
        (tmp_path / "n2.onnx", tmp_path / "q.vnnlib", 7.5, "sat"),
    ]
    named = tmp_path / "named.csv"
    named.write_text("benchmark,onnx,vnnlib,timeout_s,expected,note\nb,n.onnx,p.vnnlib,5,unsat,x\n")
    (row,) = read_instances(named, tmp_path / "root")
    assert row.onnx == tmp_path / "root" / "b" / "n.onnx" and row.benchmark == "b"
    assert row.expected == "unsat" and row.columns == {"note": "x"}
    for text, message in (
        ("a.onnx,b.vnnlib\n", ":1: a row needs onnx,vnnlib,timeout"),
        ("a.onnx,b.vnnlib,60\na.onnx,b.vnnlib,-1\n", ":2: the timeout '-1' is not a positive"),
        ("a.onnx,b.vnnlib,60,maybe\n", ":1: the expected answer 'maybe'"),
        ("", "no instances"),
    ):
        plain.write_text(text)
        with pytest.raises(UsageError, match=re.escape(message)):
            read_instances(plain)


def test_instances_run_reports_errors_and_wrong_answers(tmp_path, diff_net):
    """A row whose files the readers refuse is an `error` record and the run goes on; an answer
    against the expected one counts as wrong (here the expected answer is deliberately false)."""
    (tmp_path / "sat.vnnlib").write_text(vnnlib_text("(>= Y_0 0.75)"))
    (tmp_path / "bad.vnnlib").write_text("(assert\n")
    csv_path = tmp_path / "instances.csv"
    csv_path.write_text(
        f"{diff_net},sat.vnnlib,20,unsat\n{diff_net},bad.vnnlib,20,unsat\n{diff_net},sat.vnnlib,20\n"
    )
    report = tmp_path / "report.json"
    r = run("vnnlib", "--instances", csv_path, "--json", report)
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    answers = [rec["answer"] for rec in data["instances"]]
    assert answers == ["sat", "error", "sat"]
    assert [rec["wrong"] for rec in data["instances"]] == [True, False, False]
    assert "bad.vnnlib:1:1: unbalanced" in data["instances"][1]["reason"]
    (row,) = data["summary"]
    assert (row["total"], row["decided"], row["wrong"], row["error"]) == (3, 2, 1, 1)
    assert "1 decided answer(s) contradict the expected ones" in r.stdout
    again = run("vnnlib", "--instances", csv_path, "--json", report)
    assert again.exit_code == 2 and "exists" in again.output


def test_inward_rounding_stays_inside():
    bounds = torch.tensor([0.1, -0.29855281193475053, 1.0, -1e-30], dtype=torch.float64)
    up = competition._inward(bounds, torch.float32, up=True)
    down = competition._inward(bounds, torch.float32, up=False)
    assert bool((up.double() >= bounds).all()) and bool((down.double() <= bounds).all())
    # one float32 step at most: the nearest float32 on the inside
    assert bool((torch.nextafter(up, torch.full_like(up, -1.0)).double() < bounds).all())
    assert float(up[2]) == 1.0 and float(down[2]) == 1.0


# -- the VNN-COMP 2021 instances ---------------------------------------------------------------


def test_smoke_sat_instance_is_confirmed_in_the_files_box(tmp_path):
    root = require_vnncomp()
    onnx, prop = root / "test" / "test_sat.onnx", root / "test" / "test_prop.vnnlib"
    out = tmp_path / "result.txt"
    r = run("vnnlib", onnx, prop, "--timeout", "60", "--out", out)
    assert r.exit_code == 0, r.output
    answer, values = parse_answer(out.read_text())
    assert answer == "sat"
    box = box_of(prop)
    x = np.array([values[f"X_{i}"] for i in range(len(box))])
    for i, (lo, hi) in enumerate(box.values()):
        assert lo <= Decimal(float(x[i])) <= hi, (i, x[i], lo, hi)
    y = ort_outputs(onnx, x)
    assert [values[f"Y_{j}"] for j in range(5)] == pytest.approx(y.tolist(), abs=1e-7)
    # ACAS Xu property 3's violation: the first output (COC) is minimal
    assert float(y[0]) <= float(y[1:].min())


# the 5 smoke tests and fast ACAS Xu / MNIST instances (about 1 s each on a 2-core machine)
FAST = [
    ("acasxu", "ACASXU_run2a_1_8_batch_2000.onnx", "prop_1.vnnlib"),
    ("acasxu", "ACASXU_run2a_2_1_batch_2000.onnx", "prop_2.vnnlib"),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_4_0.03.vnnlib"),
    ("mnistfc", "mnist-net_256x2.onnx", "prop_7_0.03.vnnlib"),
]


@pytest.mark.slow
def test_smoke_and_fast_instances_match_the_expected_answers(tmp_path):
    """What CI runs on real instances: every answer is the one the 2021 verifiers agreed on."""
    root = require_vnncomp()
    with open(root / "instances.csv", newline="") as f:
        rows = [
            r
            for r in csv.DictReader(f)
            if r["benchmark"] == "test" or (r["benchmark"], r["onnx"], r["vnnlib"]) in FAST
        ]
    assert len(rows) == 9
    chosen = tmp_path / "instances.csv"
    with open(chosen, "w", newline="") as f:
        writer = csv.DictWriter(f, ["benchmark", "onnx", "vnnlib", "timeout_s", "expected"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in writer.fieldnames})
    report = tmp_path / "report.json"
    r = run("vnnlib", "--instances", chosen, "--root", root, "--json", report, "-q")
    assert r.exit_code == 0, r.output
    records = json.loads(report.read_text())["instances"]
    assert [(rec["vnnlib"], rec["answer"]) for rec in records] == [
        (row["vnnlib"], row["expected"]) for row in rows
    ]
    for rec, row in zip(records, rows, strict=True):
        if rec["answer"] == "sat":  # re-run here: onnxruntime's outputs, as reported
            y = ort_outputs(root / row["benchmark"] / row["onnx"], np.array(rec["counterexample"]))
            assert rec["output"] == pytest.approx(y.tolist(), abs=1e-6)
    assert all(b in r.stdout for b in ("test", "acasxu", "mnistfc"))


# -- propdsl verify --model NET.onnx and --complete ------------------------------------------------

DIGITS_SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = 0.05

let pixels = box(0, 1)

property robust(x, y) =
  forall x' in ball(x, eps, inf) & pixels:
    argmax(f(x')) == y

verify f on digits(split = "test") {
  properties = [robust]
  method     = crown
}
"""


def digits_net(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


@pytest.fixture(scope="module")
def digits_case(tmp_path_factory):
    """A seeded digits MLP, its ONNX file, the spec, and 16 test images labelled by the model's
    own predictions (so that a good share of the samples are provable)."""
    import propdsl
    from propdsl.data import load_dataset

    folder = tmp_path_factory.mktemp("vnncli_verify")
    spec_path = folder / "digits.prop"
    spec_path.write_text(DIGITS_SPEC)
    net = digits_net()
    onnx = export_onnx(net, (1, 8, 8), folder / "net.onnx")
    x = load_dataset("digits", split="test", seed=0).x[:16]
    with torch.no_grad():
        y = net(x).argmax(1)
    return propdsl.load(spec_path), spec_path, net, onnx, x, y


def weak_falsifier():
    from propdsl.attacks import APGD

    return APGD(steps=1, restarts=1)  # leaves counterexamples for the complete verifier


@pytest.mark.slow
def test_complete_decides_every_sample_crown_leaves_open(digits_case):
    """Every sample CROWN leaves unknown is verified or falsified by branch and bound; every
    falsified one carries a point in its region that the model misclassifies; the verified
    ones survive a strong attack; the samples CROWN decided keep their verdicts."""
    from propdsl.attacks import APGD

    spec, _, net, _, x, y = digits_case
    eps = 0.05
    crown = spec.verify(net, x, y, ["robust"], falsifier=weak_falsifier())["robust"]
    full = spec.verify(
        net, x, y, ["robust"], falsifier=weak_falsifier(), complete=True, timeout=30
    )["robust"]
    open_idx = [i for i, s in enumerate(crown.status) if s == "unknown"]
    assert len(open_idx) >= 2, crown.status  # the case exercises the complete verifier
    for i, (before, after) in enumerate(zip(crown.status, full.status, strict=True)):
        if i in open_idx:
            assert after in ("verified", "falsified"), (i, full.reasons[i])
            assert full.reasons[i].startswith("complete verifier: ")
        else:
            assert after == before
    points = full.counterexamples["x'"]
    falsified = [i for i, s in enumerate(full.status) if s == "falsified"]
    assert falsified
    p = points[falsified]
    assert float((p - x[falsified]).abs().max()) <= eps + 1e-6
    assert float(p.min()) >= 0 and float(p.max()) <= 1
    with torch.no_grad():
        assert bool((net(p).argmax(1) != y[falsified]).all())
    verified = [i for i, s in enumerate(full.status) if s == "verified"]
    strong = spec.verify(
        net, x[verified], y[verified], ["robust"], falsifier=APGD(steps=200, restarts=8)
    )["robust"]
    assert "falsified" not in strong.status


def test_complete_timeout_gives_unknown_timeout_with_its_reason(digits_case):
    spec, _, net, _, x, y = digits_case
    kw = dict(falsifier=weak_falsifier(), generator=torch.Generator().manual_seed(0))
    crown = spec.verify(net, x, y, ["robust"], **kw)["robust"]
    kw["generator"] = torch.Generator().manual_seed(0)
    v = spec.verify(net, x, y, ["robust"], complete=True, timeout=1e-3, **kw)["robust"]
    assert "unknown (timeout)" in v.status
    for i, status in enumerate(v.status):
        if status == "unknown (timeout)":
            assert crown.status[i] == "unknown"
            assert v.reasons[i].startswith("complete verifier: timeout after 0.001 s")
    with pytest.raises(UsageError, match="complete must be True or False"):
        spec.verify(net, x, y, ["robust"], complete="yes")


def test_onnx_model_verdicts_match_the_torch_model(digits_case):
    import propdsl

    spec, _, net, onnx, x, y = digits_case
    imported = propdsl.load_onnx(onnx)
    kw = dict(falsifier=weak_falsifier())
    gen = torch.Generator().manual_seed(0)
    mine = spec.verify(imported, x, y, ["robust"], generator=gen, **kw)["robust"]
    gen = torch.Generator().manual_seed(0)
    theirs = spec.verify(net, x, y, ["robust"], generator=gen, **kw)["robust"]
    assert mine.status == theirs.status
    assert torch.allclose(mine.margin, theirs.margin, atol=1e-4, equal_nan=True)


def test_onnx_model_that_does_not_fit_the_spec_is_refused(tmp_path, digits_case):
    import propdsl

    spec, spec_path, _, _, x, y = digits_case
    flat = export_onnx(nn.Sequential(nn.Linear(64, 10)), (64,), tmp_path / "flat.onnx")
    with pytest.raises(UsageError, match=r"network 'f' is Tensor\[1, 8, 8\] -> Tensor\[10\]"):
        spec.verify(propdsl.load_onnx(flat), x, y, ["robust"])
    r = run("verify", spec_path, "--model", flat, "--samples", "4")
    assert r.exit_code == 2 and "takes Tensor[64] and gives 10 outputs" in r.output
    wrong_out = export_onnx(digits_net()[:2], (1, 8, 8), tmp_path / "out16.onnx")
    r = run("verify", spec_path, "--model", wrong_out, "--samples", "4")
    assert r.exit_code == 2 and "gives 16 outputs" in r.output
    r = run("verify", spec_path, "--model", flat, "--run", tmp_path)
    assert r.exit_code == 2 and "drop --run" in r.output
    r = run("verify", spec_path)
    assert r.exit_code == 2 and "give --run RUN" in r.output
    for extra, message in (
        (["--checkpoint", "last"], "go with --run"),
        (["--spec-differs-ok"], "go with --run"),
        (["--device", "cuda"], "drop --device"),
    ):
        r = run("verify", spec_path, "--model", wrong_out, *extra)
        assert r.exit_code == 2 and message in r.output, r.output


@pytest.mark.slow
def test_propdsl_verify_model_onnx_complete_cli(digits_case):
    """`propdsl verify SPEC --model NET.onnx --complete`: no sample left unknown, and the same
    verdicts as the library on the same 16 test samples."""
    _, spec_path, _, onnx, _, _ = digits_case
    r = run("verify", spec_path, "--model", onnx, "--samples", "16", "--complete", "-q")
    assert r.exit_code == 0, r.output
    assert "method crown + complete, split test, 16 samples" in r.output
    assert f"model: {onnx}" in r.output
    line = next(ln for ln in r.output.splitlines() if ln.startswith("robust"))
    verified, falsified, unknown = (float(v.rstrip("%")) for v in line.split()[1:4])
    assert unknown == 0.0 and verified + falsified == pytest.approx(100.0)


@pytest.mark.slow
def test_propdsl_verify_run_complete(tmp_path):
    """`propdsl verify SPEC --run RUN --complete`: a tiny trained digits run; verify.json says
    `complete`, has its own results folder, and leaves no sample unknown; the counterexamples
    saved lie in their regions and the run's model misclassifies them."""
    import propdsl
    from propdsl import runs
    from propdsl.train import TrainOptions, train

    spec_path = tmp_path / "tiny.prop"
    spec_path.write_text(
        DIGITS_SPEC
        + 'train f on digits(split = "train", limit = 300) {\n  model  = mlp(hidden = [16])\n'
        "  epochs = 3\n  batch  = 64\n  loss   = cross_entropy\n}\n"
    )
    train(propdsl.load(spec_path), TrainOptions(out=tmp_path / "run", quiet=True, threads=1))
    args = ["verify", spec_path, "--run", tmp_path / "run", "--samples", "12", "-q"]
    r = run(*args, "--param", "eps=0.02", "--complete", "--timeout", "30")
    assert r.exit_code == 0, r.output
    assert "method crown + complete" in r.output
    data = json.loads((tmp_path / "run" / "verify.json").read_text())
    assert data["complete"] is True and data["settings"]["complete"] is True
    per_sample = data["properties"]["robust"]["per_sample"]
    assert all(s["status"] in ("verified", "falsified") for s in per_sample)
    folder = tmp_path / "run" / data["results"]
    npz = np.load(folder / "counterexamples" / "robust.npz")
    index, x, points = npz["index"], npz["x"], npz["point[x']"]
    assert list(index) == [s["index"] for s in per_sample if s["status"] == "falsified"]
    assert np.abs(points - x).max() <= 0.02 + 1e-6 and points.min() >= 0 and points.max() <= 1
    model = runs.Run.open(tmp_path / "run").load_model()
    with torch.no_grad():
        pred = model(torch.tensor(points)).argmax(1).numpy()
    assert (pred != np.array([per_sample[i]["label"] for i in index])).all()
    plain = run(*args, "--param", "eps=0.02")
    assert plain.exit_code == 0, plain.output
    again = json.loads((tmp_path / "run" / "verify.json").read_text())
    assert again["results"] != data["results"] and again["complete"] is False
    r = run(*args, "--complete", "--device", "cuda")
    assert r.exit_code == 2 and "--complete runs on the CPU" in r.output
