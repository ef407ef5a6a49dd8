"""examples/: every script runs and shows what its docstring says; the indexes list them all.

Each script re-checks its own claims and exits non-zero when one fails (a verified image that
the attack broke, a sampled value outside a certified bound, a counterexample outside its ball);
the tests below run them as a user would and read what they print. examples/library_api.py is
run by tests/test_compile.py. Each takes 5-15 s of CPU on digits: slow tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))

# what each script must print (regular expressions, in this order)
EXPECTED = {
    "classification_robustness.py": [
        r"cross-entropy\s+0\.05",
        r"\+ 0\.5 \* robust \(DL2\)\s+0\.10",
        r"verified images all resisted the attack; robust and robust_direct agree everywhere",
    ],
    "strong_classification_robustness.py": [
        r"classification robustness\s+\d",
        r"strong, eta = 0\.99",
        r"the three forms verify the same images",
    ],
    "standard_robustness.py": [
        r"cross-entropy\s+\d",
        r"TRADES\s+\d",
        r"median over the images of the largest logit change",
    ],
    "lipschitz_robustness.py": [
        r"sampled \(lower bounds\)",
        r"certified \(upper bounds\)",
        r"no image is verified for an L below its sampled constant",
    ],
    "explanation_stability.py": [
        r"surrogate_beta=None: .* \(the attack warned: zero input gradient\)",
        r"surrogate_beta=10\.0: smallest cosine found [\d.]+\n",
        r"0\.20\s+[\d.]+\s+[\d.]+",
    ],
    "train_from_spec.py": [
        r"epoch 3: loss",
        r"clean accuracy\s+0\.\d+",
        r"verification: method crown, split test, 100 samples",
    ],
    "own_training_loop.py": [
        r"cross-entropy only\n  test accuracy",
        r"cross-entropy \+ robust \(DL2\)\n  epoch 1",
        r"epoch 6: eps 0\.100",
        r"constraint security at eps 0\.1",
    ],
    "verify_external_model.py": [
        r"a plain PyTorch model",
        r"counterexamples: inside their balls True, label changed True",
        r"sampled outputs outside: 0\n",
    ],
    "export_onnx_vnnlib.py": [
        r"8 VNN-LIB 1\.0 files",
        r"input boxes = the eps-balls clipped to \[0, 1\], within 0\.0e\+00",
        r"(onnxruntime against torch: largest difference \d\.\de-0[5-9]|not installed)",
    ],
}


def test_every_example_is_tested_and_listed():
    assert set(EXPECTED) | {"library_api.py"} == set(EXAMPLES)
    for index in (ROOT / "examples" / "README.md", ROOT / "README.md"):
        listed = set(re.findall(r"\[(\w+\.py)\]\(", index.read_text(encoding="utf-8")))
        assert listed == set(EXAMPLES), f"{index.relative_to(ROOT)} lists {sorted(listed)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tmp_path: Path):
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        cwd=tmp_path,  # the scripts find specs/ next to themselves, and write nothing here
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    position = 0
    for pattern in EXPECTED[name]:
        match = re.compile(pattern).search(done.stdout, position)
        assert match, f"{name}: no {pattern!r} after position {position} in:\n{done.stdout}"
        position = match.end()
    assert list(tmp_path.iterdir()) == [], "the example wrote into the working folder"
