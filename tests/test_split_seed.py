"""The data split has its own seed: the training seed changes initialisation and order, never
the test set, so runs of several seeds are compared on the same test images."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import propdsl
from propdsl.data import load_dataset
from propdsl.session import DEFAULT_SPLIT_SEED, RunSetup, load_samples, open_run
from propdsl.train import TrainOptions, train

SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

train f on digits(split = "train"SOURCE) {
  model     = mlp(hidden = [8])
  epochs    = 1
  batch     = 64
  optimizer = adam(lr = 0.01)
  loss      = cross_entropy
}
"""


def run(tmp_path: Path, name: str, seed: int, source: str = "") -> Path:
    path = tmp_path / f"{name}.prop"
    path.write_text(SPEC.replace("SOURCE", source), encoding="utf-8")
    out = tmp_path / name
    options = TrainOptions(out=out, seed=seed, quiet=True, threads=1, eval_samples=16)
    train(propdsl.load(path), options)
    return out


def config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


@pytest.mark.slow
def test_runs_of_two_seeds_share_their_split(tmp_path):
    a, b = run(tmp_path, "a", seed=1), run(tmp_path, "b", seed=2)
    ca, cb = config(a), config(b)
    assert (ca["seed"], cb["seed"]) == (1, 2)
    assert ca["split_seed"] == cb["split_seed"] == DEFAULT_SPLIT_SEED
    assert ca["data_sha256"] == cb["data_sha256"]  # the same train and val parts
    spec = propdsl.load(tmp_path / "a.prop")
    test_a = load_samples(open_run(spec, a), "test", None, "cpu")
    test_b = load_samples(open_run(propdsl.load(tmp_path / "b.prop"), b), "test", None, "cpu")
    assert torch.equal(test_a.x, test_b.x) and torch.equal(test_a.y, test_b.y)
    # ... which is the test split of the default split seed, not of either training seed
    expected = load_dataset("digits", split="test", seed=DEFAULT_SPLIT_SEED)
    assert torch.equal(test_a.x, expected.x)
    assert not torch.equal(load_dataset("digits", split="test", seed=1).x, expected.x)


@pytest.mark.slow
def test_the_data_source_seed_is_the_split_seed(tmp_path):
    folder = run(tmp_path, "c", seed=0, source=", seed = 7")
    assert config(folder)["split_seed"] == 7
    test = load_samples(open_run(propdsl.load(tmp_path / "c.prop"), folder), "test", 5, "cpu")
    assert torch.equal(test.x, load_dataset("digits", split="test", seed=7).x[:5])


@pytest.mark.slow
def test_resume_keeps_the_recorded_split(tmp_path):
    folder = run(tmp_path, "d", seed=3)
    path = tmp_path / "d.prop"
    options = TrainOptions(out=folder, epochs=2, resume=True, quiet=True, threads=1)
    result = train(propdsl.load(path), options)
    assert [r["epoch"] for r in result.metrics] == [1, 2]
    assert config(folder)["split_seed"] == DEFAULT_SPLIT_SEED


def test_runs_from_before_the_split_seed_used_their_training_seed():
    old = SimpleNamespace(run=SimpleNamespace(config={"seed": 3}))
    new = SimpleNamespace(run=SimpleNamespace(config={"seed": 3, "split_seed": 0}))
    assert RunSetup.split_seed.fget(old) == 3
    assert RunSetup.split_seed.fget(new) == 0
