"""The `propdsl` command: help, summaries, formatting, and exit codes (0, 1, 2, 70)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import propdsl
from propdsl import cli

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "specs" / "digits.prop"

GOOD = """\
network f : Tensor[2] -> Tensor[3]

param eps : Real = 0.1

property robust(x, y) =
  forall x' in ball(x, eps, inf):
    argmax(f(x')) == y
"""


def run(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Through the console-script entry point, as a shell would see it."""
    monkeypatch.setattr(sys, "argv", ["propdsl", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), out, err


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "robust.prop"
    path.write_text(GOOD, encoding="utf-8")
    return path


# -- help and version ----------------------------------------------------------------------------
def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"propdsl {propdsl.__version__}"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--help"], ["check", "fmt", "--version", "--debug"]),
        (["check", "--help"], ["check", "--param", "spec"]),
        (["fmt", "--help"], ["fmt", "--check"]),
    ],
)
def test_help(args, words):
    result = run(*args)
    assert result.exit_code == 0
    for word in words:
        assert word in result.stdout, word


# -- check ---------------------------------------------------------------------------------------
def test_check_prints_the_summary():
    result = run("check", str(DIGITS))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.startswith(f"spec {DIGITS}: ok\n")
    assert "networks:\n  f : Tensor[1, 8, 8] -> Tensor[10]\n" in out
    assert "params:\n  eps : Real = 0.1\n  delta : Real = 2\n  L : Real = 10\n" in out
    assert "properties:\n  classification_robust(x : Tensor[1, 8, 8], y : Label[10])\n" in out
    assert (
        "    formula: ∀ x' ∈ B∞(x, 0.1) ∩ [0, 1]. ∀ j ∈ classes \\ {y}. f(x')[y] > f(x')[j]\n"
        in out
    )
    assert "      f(x')[y] - f(x')[j] > 0\n" in out
    for name in ("standard_robust", "lipschitz_robust", "explanation_stable"):
        assert f"  {name}(x : Tensor[1, 8, 8]" in out
    assert 'train f on digits(split = "train"):' in out
    assert 'verify f on digits(split = "test"):' in out
    assert result.stderr == ""


def test_param_override_changes_the_printed_value():
    result = run("check", str(DIGITS), "--param", "eps=0.05", "-p", "delta=3")
    assert result.exit_code == 0, result.output
    assert "  eps : Real = 0.05  (overridden)\n" in result.stdout
    assert "  delta : Real = 3  (overridden)\n" in result.stdout
    assert "B∞(x, 0.05)" in result.stdout and "B∞(x, 0.1)" not in result.stdout


def test_spec_error_exits_1_with_a_positioned_message(tmp_path: Path):
    bad = tmp_path / "bad.prop"
    bad.write_text(GOOD.replace("ball(x, eps, inf)", "ball(x, epsilon, inf)"), encoding="utf-8")
    result = run("check", str(bad))
    assert result.exit_code == 1
    assert result.stderr == (
        f"{bad}:6:24: error: unknown name 'epsilon'\n"
        "  6 |   forall x' in ball(x, epsilon, inf):\n"
        "    |                        ^^^^^^^\n"
        "  hint: did you mean 'eps'?\n"
    )
    assert "Traceback" not in result.output


def test_syntax_error_exits_1(tmp_path: Path):
    bad = tmp_path / "bad.prop"
    bad.write_text("network f : Tensor[2] -> \n", encoding="utf-8")
    result = run("check", str(bad))
    assert result.exit_code == 1
    assert f"{bad}:1:" in result.stderr and "error:" in result.stderr
    assert "Traceback" not in result.output


def test_bad_override_value_exits_1():
    result = run("check", str(DIGITS), "--param", "eps=abc")
    assert result.exit_code == 1
    assert "parameter 'eps' is Real" in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["check", "no/such/file.prop"], "no such spec file"),
        (["check", str(DIGITS), "--param", "foo"], "--param expects name=value"),
        (["check", str(DIGITS), "--param", "=1"], "--param expects name=value"),
        (["check", str(DIGITS), "--bogus-flag"], "--bogus-flag"),
        (["frobnicate"], "frobnicate"),
        (["check"], "Missing argument"),
        (["fmt"], "Missing argument"),
        (["fmt", "no/such/file.prop"], "no such spec file"),
    ],
)
def test_usage_errors_exit_2(args, message):
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_exit_codes_through_the_entry_point(monkeypatch, capsys, spec_file):
    assert run_main(monkeypatch, capsys, "check", str(spec_file))[0] == 0
    code, _, err = run_main(monkeypatch, capsys, "check", "missing.prop")
    assert code == 2 and "no such spec file" in err
    code, _, err = run_main(monkeypatch, capsys, "nope")
    assert code == 2 and "Traceback" not in err
    spec_file.write_text("let = 1\n", encoding="utf-8")
    code, _, err = run_main(monkeypatch, capsys, "check", str(spec_file))
    assert code == 1 and "error:" in err and "Traceback" not in err


def _boom(self):
    raise RuntimeError("boom")


def test_internal_error_exits_70_without_traceback(monkeypatch):
    monkeypatch.setattr(propdsl.api.Spec, "summary", _boom)
    result = run("check", str(DIGITS))
    assert result.exit_code == 70
    assert "internal error: RuntimeError: boom" in result.stderr
    assert "please report it" in result.stderr and "--debug" in result.stderr
    assert "Traceback" not in result.output


def test_debug_shows_the_traceback(monkeypatch):
    monkeypatch.setattr(propdsl.api.Spec, "summary", _boom)
    result = run("--debug", "check", str(DIGITS))
    assert result.exit_code == 70
    assert "Traceback (most recent call last)" in result.stderr
    assert "RuntimeError: boom" in result.stderr
    # the flag does not stick to later commands in the same process
    result = run("check", str(DIGITS))
    assert result.exit_code == 70 and "Traceback" not in result.output


# -- fmt -----------------------------------------------------------------------------------------
MESSY = "network f:Tensor[2]->Tensor[3]\nparam eps:Real=0.1   # radius\n"
TIDY = "network f : Tensor[2] -> Tensor[3]\n\nparam eps : Real = 0.1  # radius\n"


def test_fmt_rewrites_in_place(tmp_path: Path):
    path = tmp_path / "messy.prop"
    path.write_text(MESSY, encoding="utf-8")
    result = run("fmt", str(path))
    assert result.exit_code == 0, result.output
    assert f"reformatted {path}" in result.stdout
    assert path.read_text(encoding="utf-8") == TIDY
    result = run("fmt", str(path))
    assert result.exit_code == 0 and "1 file(s) already formatted" in result.stdout
    assert path.read_text(encoding="utf-8") == TIDY


def test_fmt_check_reports_without_writing(tmp_path: Path):
    messy, tidy = tmp_path / "messy.prop", tmp_path / "tidy.prop"
    messy.write_text(MESSY, encoding="utf-8")
    tidy.write_text(TIDY, encoding="utf-8")
    result = run("fmt", "--check", str(messy), str(tidy))
    assert result.exit_code == 1
    assert f"would reformat {messy}" in result.stdout and str(tidy) not in result.stdout
    assert messy.read_text(encoding="utf-8") == MESSY
    result = run("fmt", "--check", str(tidy))
    assert result.exit_code == 0, result.output


def test_fmt_on_a_spec_with_a_syntax_error_exits_1(tmp_path: Path):
    path = tmp_path / "bad.prop"
    path.write_text("let a = (1 +\n", encoding="utf-8")
    result = run("fmt", str(path))
    assert result.exit_code == 1
    assert "error: unexpected end of file" in result.stderr
    assert "Traceback" not in result.output
    assert path.read_text(encoding="utf-8") == "let a = (1 +\n"


def test_fmt_keeps_the_digits_example_parseable(tmp_path: Path):
    path = tmp_path / "digits.prop"
    shutil.copy(DIGITS, path)
    assert run("fmt", str(path)).exit_code == 0
    assert run("fmt", "--check", str(path)).exit_code == 0
    assert propdsl.load(path).summary() == propdsl.load(DIGITS).summary().replace(
        str(DIGITS), str(path)
    )


# -- the installed console script ----------------------------------------------------------------
@pytest.mark.skipif(
    shutil.which("propdsl", path=str(Path(sys.executable).parent)) is None,
    reason="console script not installed",
)
def test_console_script(spec_file):
    exe = shutil.which("propdsl", path=str(Path(sys.executable).parent))
    ok = subprocess.run([exe, "check", str(spec_file)], capture_output=True, text=True)
    assert ok.returncode == 0 and "robust(x : Tensor[2], y : Label[3])" in ok.stdout
    bad = subprocess.run([exe, "check", "--param"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_python_dash_m_runs_the_same_command_line(spec_file):
    ok = subprocess.run(
        [sys.executable, "-m", "propdsl", "check", str(spec_file)], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "robust(x : Tensor[2], y : Label[3])" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "propdsl", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


# -- eval, verify, export: what a new user meets (issue 13) ----------------------------------------
RUN_SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]
param eps : Real = 0.1
property robust(x, y) = forall x' in ball(x, eps, inf) & box(0, 1): argmax(f(x')) == y
train f on digits(split = "train") {
  model = mlp(hidden = [6])
  loss  = cross_entropy
}
verify f on digits(split = "test") {
  properties = [robust]
  method     = ibp
}
"""

TABULAR = """\
network f : Tensor[30] -> Tensor[2]
param eps : Real = 0.02
property robust(x, y) = forall x' in ball(x, eps, inf): argmax(f(x')) == y
train f on breast_cancer(split = "train") {
  model = mlp(hidden = [8])
  loss  = cross_entropy
}
"""


@pytest.fixture
def small_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run folder as `propdsl train --param eps=0.05` writes it (config.json, spec.prop, a
    best checkpoint) of an untrained mlp(hidden=[6]) on digits, and its spec file."""
    from propdsl import runs
    from propdsl.models import build_model

    spec = tmp_path / "small.prop"
    spec.write_text(RUN_SPEC, encoding="utf-8")
    run = tmp_path / "run"
    run.mkdir()
    (run / runs.SPEC).write_text(RUN_SPEC, encoding="utf-8")
    model = {"name": "mlp", "kwargs": {"hidden": [6]}, "user": None}
    config = {
        "spec": str(spec),
        "spec_sha256": runs.spec_hash(RUN_SPEC),
        "params": {"eps": 0.05},
        "seed": 0,
        "model": {**model, "input_shape": [1, 8, 8], "num_classes": 10},
    }
    runs.write_json(run / runs.CONFIG, config)
    net = build_model("mlp", (1, 8, 8), 10, hidden=[6], seed=0)
    runs.save_checkpoint(run, "best", net, {"epoch": 1})
    return spec, run


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "--samples", "2"],
        ["verify", "--samples", "2"],
        ["export", "OUT", "--samples", "2"],
    ],
)
def test_a_spec_that_does_not_fit_the_run_exits_2_naming_both(small_run, tmp_path, command):
    """`verify specs/breast_cancer.prop --run runs/demo` exited 70 with a conv2d error."""
    _, run_dir = small_run
    tabular = tmp_path / "tabular.prop"
    tabular.write_text(TABULAR, encoding="utf-8")
    name, *rest = command
    rest = [str(tmp_path / "out") if a == "OUT" else a for a in rest]
    result = run(name, str(tabular), *rest, "--run", str(run_dir))
    assert result.exit_code == 2, result.output
    assert "Tensor[30] -> Tensor[2]" in result.stderr
    assert "Tensor[1, 8, 8] -> Tensor[10]" in result.stderr
    assert "internal error" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--samples", "0"], "--samples must be a positive whole number, got 0"),
        (["eval", "--samples", "-3"], "--samples must be a positive whole number, got -3"),
        (["eval", "--threads", "0"], "--threads must be a positive whole number, got 0"),
        (["eval", "--checkpoint", "first"], "--checkpoint must be best or last"),
        (["verify", "--samples", "-3"], "--samples must be a positive whole number, got -3"),
        (["verify", "--samples", "0"], "--samples must be a positive whole number, got 0"),
        (["verify", "--timeout", "0"], "--timeout must be a positive, finite number"),
        (["verify", "--timeout", "inf"], "--timeout must be a positive, finite number"),
        (["verify", "--timeout", "-2"], "--timeout must be a positive, finite number"),
        (["export", "OUT", "--samples", "-1"], "--samples must be a positive whole number"),
        (["export", "OUT", "--timeout", "nan"], "--timeout must be a positive, finite number"),
    ],
)
def test_counts_and_limits_exit_2(small_run, tmp_path, args, message):
    spec, run_dir = small_run
    name, *rest = args
    rest = [str(tmp_path / "out") if a == "OUT" else a for a in rest]
    result = run(name, str(spec), *rest, "--run", str(run_dir))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert not (run_dir / "eval").exists() and not (run_dir / "verify").exists()
    assert not (tmp_path / "out").exists()


def test_a_warning_is_one_line_without_a_source_line(monkeypatch):
    """A VanishingGradientWarning printed `.../compile.py:771: VanishingGradientWarning: ...`
    and then the source line `result = run_attack(`."""
    import warnings

    from propdsl.loss.attacks import VanishingGradientWarning

    def summary(self):
        warnings.warn("the attack cannot move", VanishingGradientWarning, stacklevel=1)
        return "summary"

    monkeypatch.setattr(propdsl.api.Spec, "summary", summary)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        result = run("check", str(DIGITS))
    assert result.exit_code == 0
    assert result.stderr == "warning: the attack cannot move\n"


def test_eval_shows_progress_and_the_runs_params(small_run):
    spec, run_dir = small_run
    result = run("eval", str(spec), "--run", str(run_dir), "--samples", "3", "--threads", "1")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("eval 1/") and "property robust" in lines[0]
    assert any("accuracy-robustness area" in line for line in lines)
    assert lines[-1].startswith("eval: done in ")
    assert "params: eps=0.05 (from the run)" in result.stdout
    assert "checkpoint best (epoch 1)" in result.stdout
    folder = next((run_dir / "eval").iterdir())
    assert folder.name.startswith("test-n3-best-")
    assert f"wrote {folder}: eval.json" in result.stdout
    # -q: no progress; --param: another folder, and the header says where the value came from.
    result = run(
        "eval",
        str(spec),
        "--run",
        str(run_dir),
        "--samples",
        "3",
        "--threads",
        "1",
        "-q",
        "--no-plots",
        "--param",
        "eps=0.1",
    )
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "eps=0.1 (override; the run was trained with 0.05)" in result.stdout
    assert len(list((run_dir / "eval").iterdir())) == 2


def test_verify_shows_progress_and_where_the_results_are(small_run):
    spec, run_dir = small_run
    result = run("verify", str(spec), "--run", str(run_dir), "--samples", "3", "--threads", "1")
    assert result.exit_code == 0, result.output
    first, last = result.stderr.splitlines()
    assert first.startswith("verify 1/1: property robust (") and first.endswith("s so far)")
    assert last.startswith("verify: done in ")
    assert "params: eps=0.05 (from the run)" in result.stdout
    folder = next((run_dir / "verify").iterdir())
    assert folder.name.startswith("ibp-test-n3-best-")
    assert f"verdicts: {folder / 'verify.json'}" in result.stdout


def test_a_spec_other_than_the_runs_needs_spec_differs_ok(small_run, tmp_path):
    _, run_dir = small_run
    other = tmp_path / "other.prop"
    other.write_text(RUN_SPEC.replace("ibp", "crown"), encoding="utf-8")
    args = ["verify", str(other), "--run", str(run_dir), "--samples", "2", "--threads", "1"]
    result = run(*args)
    assert result.exit_code == 2 and "is not the spec" in result.stderr
    result = run(*args, "--spec-differs-ok", "-q")
    assert result.exit_code == 0, result.output
    assert "is not the spec" in result.stdout  # the header's note
    assert "-spec" in next((run_dir / "verify").iterdir()).name


def test_idle_openmp_threads_sleep_unless_the_user_chose(monkeypatch):
    """Spinning threads made eval 15x and a training epoch 2-20x slower on a shared 2-core
    machine (benchmarks/bench_eval.py); the CLI asks for sleeping ones before torch loads."""
    monkeypatch.delitem(sys.modules, "torch")  # as in a fresh `propdsl` process
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    cli._calm_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    cli._calm_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    cli._calm_threads()
    assert "OMP_WAIT_POLICY" not in os.environ
