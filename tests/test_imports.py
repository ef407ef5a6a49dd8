"""Import hygiene: `import propdsl` and `propdsl check` load neither torch nor sympy.

Each case runs in a fresh interpreter (this one has long imported both). No timing asserts:
speed is measured by the benchmarks; here we only check what gets imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "sympy", "numpy", "matplotlib", "sklearn")


def loaded_after(code: str) -> dict[str, bool]:
    """Which heavy modules are in sys.modules after running `code` in a new interpreter."""
    probe = f"""
import sys, json
{code}
print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_propdsl_is_light():
    loaded = loaded_after("import propdsl")
    assert not loaded["torch"] and not loaded["sympy"], loaded


def test_loading_and_summarising_a_spec_is_light():
    loaded = loaded_after(
        "import propdsl\n"
        "spec = propdsl.load('specs/digits.prop')\n"
        "text = spec.summary()\n"
        "assert spec.properties and spec.format()"
    )
    assert not loaded["torch"] and not loaded["sympy"], loaded


def test_check_command_is_light():
    loaded = loaded_after(
        "from propdsl import cli\n"
        "sys.argv = ['propdsl', 'check', 'specs/digits.prop']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit as exc:\n"
        "    assert exc.code in (0, None), exc.code\n"
    )
    assert not loaded["torch"] and not loaded["sympy"], loaded


def test_fmt_check_command_is_light():
    loaded = loaded_after(
        "from propdsl import cli\n"
        "sys.argv = ['propdsl', 'fmt', '--check', 'specs/digits.prop']\n"
        "try:\n"
        "    cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
    )
    assert not loaded["torch"] and not loaded["sympy"], loaded


def test_loading_the_offline_datasets_does_not_import_scikit_learn():
    """digits and breast_cancer are read from scikit-learn's files (its import takes about a
    second of every `train`, `eval` and `verify`)."""
    loaded = loaded_after(
        "from propdsl.data import load_dataset\n"
        "assert len(load_dataset('digits', split='train', seed=0)) > 1000\n"
        "assert len(load_dataset('breast_cancer', split='train', seed=0)) > 300\n"
    )
    assert loaded["torch"] and not loaded["sklearn"], loaded
