"""benchmarks/reproduce_*.py: each paper's reproduction runs in quick mode and writes what its
docstring says, with relations that hold by construction checked on the numbers.

Each script trains tiny digits MLPs for 2 epochs and measures 32 test images (20-60 s of CPU):
slow tests. The full runs and their findings are in docs/reproductions.md.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(name: str, out: Path, *extra: str, env: dict[str, str] | None = None):
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        **(env or {}),
    }
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / f"reproduce_{name}.py"),
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        env=environ,
        timeout=900,
    )


def quick(name: str, tmp_path: Path) -> dict:
    proc = run(name, tmp_path, "--quick")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["paper"] == name
    assert results["settings"]["quick"] is True and results["settings"]["seeds"] == [0]
    assert results["settings"]["data"] == "digits"
    # the printed table is the one written
    assert (tmp_path / "table.md").read_text().strip() in proc.stdout
    return results


def finite(obj) -> bool:
    if isinstance(obj, dict):
        return all(finite(v) for v in obj.values())
    if isinstance(obj, list):
        return all(finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def test_casadio(tmp_path):
    r = quick("casadio", tmp_path)
    assert finite(r["summary"])
    assert r["properties"] == ["SR", "LR", "SCR"]
    assert r["methods"] == ["baseline", "noise", "fgsm", "pgd", "dl2_sr", "dl2_scr", "dl2_lr"]
    # the table: one row per method, one security column per property
    assert set(r["summary"]) == set(r["methods"])
    for method, cols in r["summary"].items():
        assert set(cols) == {"accuracy", "SR", "LR", "SCR"}, method
        for stat in cols.values():
            assert stat["n"] == 1 and stat["std"] == 0.0
            # shares of 32 test images
            assert 0.0 <= stat["mean"] <= 1.0
            assert abs(stat["mean"] * 32 - round(stat["mean"] * 32)) < 1e-9
    table = (tmp_path / "table.md").read_text().strip().splitlines()
    assert len(table) == 2 + 7 and all(line.count("|") == 6 for line in table)
    assert (tmp_path / "security.png").stat().st_size > 0


def test_chen(tmp_path):
    r = quick("chen", tmp_path)
    assert finite(r["per_seed"])
    assert r["methods"] == ["standard", "pgd", "sep_flatten", "sep_sharpen"]
    for method, cols in r["per_seed"].items():
        # the manipulation keeps the best point among the start and every step: End <= Start
        assert cols["expl_end"][0] <= cols["expl_start"][0] + 1e-9, method
        assert cols["expl_end_relative"][0] <= cols["expl_start_relative"][0] + 1e-9, method
        assert 0.0 <= cols["adversarial_accuracy"][0] <= 1.0
        # the input Hessian of the CE of a ReLU network is J^T (diag p - p p^T) J: PSD
        assert cols["hessian_top_eigenvalue"][0] >= -1e-6, method
        # the landscape rises are maxima over offsets that include 0
        assert cols["ce_rise_adversarial"][0] >= 0.0 and cols["expl_rise_random"][0] >= 0.0
    curves = r["landscapes_seed0"]["standard"]
    assert len(curves["steps"]) == len(curves["ce_adversarial"]) == 11
    assert abs(curves["explanation_adversarial"][5]) <= 1e-6  # the map at x itself
    for name in ("landscape.png", "expl.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_woods(tmp_path):
    r = quick("woods", tmp_path)
    assert finite(r["summary"])
    assert r["methods"] == ["standard", "standard_half_huber", "woods", "pgd"]
    top = r["max_rmse"] * (1 - 1 / 10)  # the area under A(e) - 1/C, A <= 1, up to max_rmse
    for method, cols in r["per_seed"].items():
        for key in ("attack_ara", "btr_ara"):
            assert 0.0 <= cols[key][0] <= top + 1e-9, (method, key)
        d = r["attack_distances_seed0"][method]
        assert len(d) == 32 and all(0.0 <= v <= r["max_rmse"] + 1e-9 for v in d)
    for name in ("ara.png", "explanations.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_etmann(tmp_path):
    r = quick("etmann", tmp_path)
    assert r["lambdas"] == [0.0, 0.1, 1.0]
    assert len(r["models"]) == 3
    across = r["spearman_across_models"]
    assert across is not None and -1.0 <= across <= 1.0
    for lam, cols in r["per_seed"].items():
        assert cols["mean_alignment"][0] >= 0.0, lam  # |<x, g>| / ||g||
        assert cols["mean_rho"][0] > 0.0, lam
        assert 0.0 <= cols["rho_tilde_within_bound"][0] <= 1.0
    for name in ("alignment.png", "models.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_missing_data_is_skipped(tmp_path):
    # an empty data folder: the MNIST files are missing, so the script says so and exits 0
    proc = run(
        "etmann",
        tmp_path / "out",
        "--quick",
        "--data",
        "mnist",
        env={"PROPDSL_DATA": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "skipped: mnist" in proc.stderr
    assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize("paper", ["etmann", "casadio"])
def test_runs_unchanged_on_mnist_files(tmp_path, paper):
    # MNIST files in the original (idx) format, written here: the same script, --data mnist
    sys.path.insert(0, str(Path(__file__).parent))
    from test_data import write_mnist

    write_mnist(tmp_path / "data", "MNIST", n_train=80, n_test=40)
    out = tmp_path / "out"
    proc = run(
        paper, out, "--quick", "--data", "mnist", env={"PROPDSL_DATA": str(tmp_path / "data")}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["data"] == "mnist" and finite(results)
