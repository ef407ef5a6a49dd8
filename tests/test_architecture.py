"""docs/architecture.md's worked example of adding a built-in function, done for real: its edits
are applied to a copy of the package and its example runs there (and fails without them).

An edit is a code block after `<!-- edit: PATH after: ANCHOR -->`: its lines go after the line of
PATH that contains ANCHOR (exactly one). The example is the python block after
`<!-- after the edits -->`. The page's other runnable blocks run in tests/test_docs.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "architecture.md"
_EDIT = re.compile(r"^<!--\s*edit:\s*(\S+)\s+after:\s*(.*?)\s*-->\s*$")
_AFTER = re.compile(r"^<!--\s*after the edits\s*-->\s*$")


def _blocks() -> tuple[list[tuple[str, str, str]], str]:
    lines = PAGE.read_text(encoding="utf-8").split("\n")
    edits: list[tuple[str, str, str]] = []
    example = None
    for i, line in enumerate(lines):
        edit, after = _EDIT.match(line), _AFTER.match(line)
        if not (edit or after):
            continue
        assert lines[i + 1].startswith("```"), f"architecture.md:{i + 1}: a code block must follow"
        end = lines.index("```", i + 2)
        body = "\n".join(lines[i + 2 : end]) + "\n"
        if edit:
            edits.append((edit.group(1), edit.group(2), body))
        else:
            example = body
    assert edits and example is not None
    return edits, example


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    for name in ("propdsl", "grammars"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    return tree


def _apply(tree: Path, path: str, anchor: str, body: str) -> None:
    file = tree / path
    lines = file.read_text(encoding="utf-8").split("\n")
    hits = [i for i, line in enumerate(lines) if anchor in line]
    assert len(hits) == 1, f"{path}: the anchor {anchor!r} is on {len(hits)} lines"
    lines[hits[0] + 1 : hits[0] + 1] = body.rstrip("\n").split("\n")
    file.write_text("\n".join(lines), encoding="utf-8")


def _run(tree: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_adding_a_built_in_as_the_page_says(tmp_path):
    edits, example = _blocks()
    assert {path for path, _, _ in edits} == {"propdsl/builtins.py", "propdsl/loss/compile.py"}
    tree = _tree(tmp_path)
    before = _run(tree, example)
    assert before.returncode != 0 and "unknown name 'softsign'" in before.stderr
    for path, anchor, body in edits:
        _apply(tree, path, anchor, body)
    done = _run(tree, example)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "formula: softsign(f(x)[0]) ≤ 0.5" in done.stdout
