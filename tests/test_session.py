"""Run setup in one place (propdsl.session): the names it took over stay importable from where
they were, the commands that read runs never import training, and a split's first samples are
drawn one way for eval, verify and export."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import propdsl
from propdsl import results, runs, session, train
from propdsl.data import load_dataset
from propdsl.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

train f on digits(split = "train", val_fraction = {val}) {{
  loss = cross_entropy
}}
"""


def test_the_moved_names_are_importable_from_their_old_places():
    assert train.set_threads is session.set_threads
    assert train.resolve_device is session.resolve_device
    assert train.load_split is session.load_block_split
    assert train.MAX_THREADS == session.MAX_THREADS
    assert results.open_run is session.open_run
    assert results.load_split is session.load_run_split
    for name in ("Checkpoint", "ParamSource", "RunSetup", "check_fit", "holds_run", "run_params"):
        assert getattr(results, name) is getattr(session, name), name


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


@pytest.mark.parametrize(
    "path",
    [
        *sorted((ROOT / "propdsl" / "verify").rglob("*.py")),
        ROOT / "propdsl" / "evaluate.py",
        ROOT / "propdsl" / "export.py",
        ROOT / "propdsl" / "results.py",
        ROOT / "propdsl" / "session.py",
    ],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_run_readers_never_import_training(path):
    """eval, verify and export set up through propdsl.session (they imported propdsl.train for
    the device, and results.py for a block's split, before)."""
    assert not {n for n in _imports(path) if n == "propdsl.train" or n.startswith("propdsl.train.")}


def _setup(tmp_path: Path, val: float) -> session.RunSetup:
    spec = propdsl.load(SPEC.format(val=val))
    run = runs.Run(tmp_path, {"seed": 3}, spec.source.text)
    return session.RunSetup(
        run=run,
        spec=spec,
        params=(),
        model=None,
        checkpoint=session.Checkpoint.BEST,
        checkpoint_epoch=None,
        checkpoint_note=None,
        weights_sha256="",
        spec_sha256="",
        spec_differs=False,
    )


def test_load_samples_takes_the_first_samples_of_the_seeded_split(tmp_path):
    setup = _setup(tmp_path, 0.1)
    every = load_dataset("digits", split="test", seed=3, val_fraction=0.1)
    ds = session.load_samples(setup, "test", 7, torch.device("cpu"))
    assert torch.equal(ds.x, every.x[:7]) and torch.equal(ds.y, every.y[:7])
    assert ds.name == every.name
    whole = session.load_samples(setup, "test", None, "cpu")
    assert len(whole) == len(every) > 7


def test_load_samples_refuses_an_empty_split(tmp_path):
    setup = _setup(tmp_path, 0.0)
    with pytest.raises(UsageError, match="the val split is empty"):
        session.load_samples(setup, "val", None, "cpu")
