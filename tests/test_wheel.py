"""The built wheel ships the grammar and the prelude, and works without the repository."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling", reason="hatchling (the build backend) is a dev dependency")
    pytest.importorskip("build", reason="build is a dev dependency")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), "."],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("propdsl-*.whl")
    return path


def test_wheel_contents(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "propdsl/grammars/propdsl.lark" in names
    assert "propdsl/prelude.prop" in names
    assert "propdsl/syntax/parser.py" in names and "propdsl/cli.py" in names
    assert not any(n.startswith(("tests/", "specs/", "grammars/", ".venv/")) for n in names)
    with zipfile.ZipFile(wheel) as zf:
        grammar = zf.read("propdsl/grammars/propdsl.lark").decode()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "propdsl = propdsl.cli:main" in zf.read(entry_points).decode()
    assert grammar == (ROOT / "grammars" / "propdsl.lark").read_text(encoding="utf-8")


def test_wheel_parses_a_spec_with_its_own_grammar(wheel: Path, tmp_path: Path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    grammar = site / "propdsl" / "grammars" / "propdsl.lark"
    marker = "// read from the wheel"
    grammar.write_text(grammar.read_text(encoding="utf-8") + marker + "\n", encoding="utf-8")
    # -I -S: no site hooks, so the repository's editable install cannot leak in; the venv's
    # site-packages come last, only for the dependencies (lark).
    code = f"""
import json, sys
sys.path[:0] = [{str(site)!r}]
sys.path.append({sysconfig.get_paths()["purelib"]!r})
import propdsl
from propdsl.syntax.parser import grammar_text
spec = propdsl.load({str(ROOT / "specs" / "digits.prop")!r})
print(json.dumps({{
    "module": propdsl.__file__,
    "marker": {marker!r} in grammar_text(),
    "properties": sorted(spec.properties),
    "summary": spec.summary().splitlines()[0],
}}))
"""
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert Path(out["module"]).is_relative_to(site)
    assert out["marker"], "grammar_text() did not read the wheel's grammar file"
    assert out["properties"] == [
        "classification_robust",
        "explanation_stable",
        "lipschitz_robust",
        "standard_robust",
    ]
    assert out["summary"].endswith(": ok")
