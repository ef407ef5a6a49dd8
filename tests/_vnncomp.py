"""Where the VNN-COMP 2021 instances are (not part of the repository): `PROPDSL_VNNCOMP`, else
`<repository>/../shared/vnncomp2021`. Tests that need them skip cleanly when they are absent."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest


def vnncomp_dir() -> Path | None:
    env = os.environ.get("PROPDSL_VNNCOMP")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "vnncomp2021")
    for path in candidates:
        if (path / "instances.csv").is_file():
            return path
    return None


def require_vnncomp() -> Path:
    path = vnncomp_dir()
    if path is None:
        pytest.skip("the VNN-COMP 2021 instances are not here (set PROPDSL_VNNCOMP)")
    return path


def instances(root: Path) -> list[dict[str, str]]:
    with open(root / "instances.csv", newline="") as f:
        return list(csv.DictReader(f))
