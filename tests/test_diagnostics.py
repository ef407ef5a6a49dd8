"""Golden diagnostics: every kind of user mistake, rendered exactly as `propdsl check` prints it.

Each `tests/golden/NAME.prop` is a wrong spec; `NAME.expected` is what `propdsl check` writes on
stderr for it (exit code 1). A first-line comment `# args: ...` adds command-line arguments
(`--param` overrides). After a deliberate change of a message, regenerate with

    PROPDSL_REGEN=1 .venv/bin/pytest tests/test_diagnostics.py

and read every changed `.expected` file before committing it: the message must be clear, the caret
under the whole offending span, and the hint helpful.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import propdsl
from propdsl.cli import app
from propdsl.errors import MAX_REPORTED, CheckError, ParseError, SpecError

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
CASES = sorted(p.stem for p in GOLDEN.glob("*.prop"))
REGEN = os.environ.get("PROPDSL_REGEN") == "1"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # Spec paths are given relative to the repository root, so expected outputs hold no
    # machine-specific paths.
    monkeypatch.chdir(ROOT)


def _cli_args(name: str) -> list[str]:
    path = f"tests/golden/{name}.prop"
    first = (ROOT / path).read_text(encoding="utf-8").split("\n", 1)[0]
    extra = shlex.split(first.removeprefix("# args:")) if first.startswith("# args:") else []
    return ["check", path, *extra]


def _check(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.stdout, result.stderr


def test_there_is_a_case_per_error_kind() -> None:
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", CASES)
def test_golden(name: str) -> None:
    code, out, err = _check(_cli_args(name))
    expected_file = GOLDEN / f"{name}.expected"
    if REGEN:
        expected_file.write_text(err, encoding="utf-8")
    assert code == 1, f"exit code {code}; stdout:\n{out}\nstderr:\n{err}"
    assert out == ""
    assert "Traceback" not in err and "internal error" not in err
    assert err == expected_file.read_text(encoding="utf-8")


def test_no_stale_expected_files() -> None:
    stale = {p.stem for p in GOLDEN.glob("*.expected")} - set(CASES)
    assert not stale, f"expected files without a spec: {sorted(stale)}"


@pytest.mark.parametrize("name", ["syntax_unclosed_paren", "name_unknown_with_hint"])
def test_installed_command(name: str) -> None:
    """The console script itself (a real process): same text, exit code 1."""
    proc = subprocess.run(
        [sys.executable, "-c", "from propdsl.cli import main; main()", *_cli_args(name)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (GOLDEN / f"{name}.expected").read_text(encoding="utf-8")


# -- structure of the reports ---------------------------------------------------------------------
def _spec_error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        propdsl.load(text)
    return info.value


HEADER = "network f : Tensor[2] -> Tensor[3]\nparam eps : Real = 0.1\n"


def test_end_of_file_errors_point_at_the_end() -> None:
    err = _spec_error(HEADER + "property p(x) = f(x)[0] > (1 +\n\n# done\n\n")
    assert isinstance(err, ParseError)
    (diag,) = err.diagnostics
    # just after the last code: the blank lines and the comment after it are skipped
    assert (diag.span.line, diag.span.col) == (3, 31)
    assert diag.message.startswith("unexpected end of file")


def test_several_errors_are_all_reported_sorted_by_position() -> None:
    text = (
        HEADER
        + "property b(x) = forall z in ball(x, epss): f(z)[0] > 0\n"
        + "property a(x) = norm(f(x), 3) <= unknown\n"
        + "property c(x) = f(x)[7] > 0\n"
    )
    err = _spec_error(text)
    assert isinstance(err, CheckError)
    positions = [(d.span.line, d.span.col) for d in err.diagnostics]
    assert positions == sorted(positions)
    assert [d.message for d in err.diagnostics] == [
        "unknown name 'epss'",
        "norm's p must be 1, 2 or inf, got 3",
        "unknown name 'unknown'",
        "index 7 is out of range for a dimension of size 3",
    ]
    assert err.render().endswith("\n4 errors")


def test_syntax_errors_in_several_declarations_are_all_reported() -> None:
    text = HEADER + "let a = (1\nlet b = 2 +\nlet c = [3\n"
    err = _spec_error(text)
    assert isinstance(err, ParseError)
    assert [d.span.line for d in err.diagnostics] == [3, 4, 5]


def test_many_errors_are_capped() -> None:
    n = MAX_REPORTED + 7
    text = HEADER + "".join(f"property p{i}(x) = f(x)[0] > missing{i}\n" for i in range(n))
    err = _spec_error(text)
    assert len(err.diagnostics) == n
    rendered = err.render()
    assert rendered.count(": error: ") == MAX_REPORTED
    assert rendered.endswith(f"... and 7 more errors\n{n} errors")
    # the first ones, in order
    assert "missing0" in rendered and f"missing{MAX_REPORTED - 1}'" in rendered
    assert f"missing{MAX_REPORTED}'" not in rendered


def test_an_error_inside_a_template_names_the_expansion() -> None:
    text = HEADER + "let bad(v) = v[5]\nproperty p(x) = bad(f(x)) > 0\n"
    (diag,) = _spec_error(text).diagnostics
    assert diag.message == "index 5 is out of range for a dimension of size 3"
    assert diag.notes == ("while expanding 'bad'",)


def test_unknown_function_does_not_cascade() -> None:
    # the arguments of an unknown function are only name-checked
    text = HEADER + "property p(x) = forall z in ball(x, eps): nrom(f(z) - f(x), inf) <= 1\n"
    messages = [d.message for d in _spec_error(text).diagnostics]
    assert messages == ["unknown name 'nrom'"]


def test_overflowing_constants_are_errors_not_hangs() -> None:
    for expr in ("10^10^10", "2^100000", "1 / (2 - 2)", "(0 - 8)^0.5"):
        err = _spec_error(HEADER + f"param big : Real = {expr}\n")
        (diag,) = err.diagnostics
        assert diag.message.startswith("cannot compute this constant"), diag.message
