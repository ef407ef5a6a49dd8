"""`propdsl train`: the run folder, every method spec, resume, NaN stops, data sources, user models.

Everything trains tiny seeded models on a few hundred digits (the data source's `limit`), so the
whole module runs in seconds; the one slow test trains three small models for a dozen epochs
and checks that robust training methods raise the security that an independent attack measures.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import propdsl
from propdsl import cli
from propdsl.errors import CheckError, UsageError
from propdsl.logics import available_logics, logic_class
from propdsl.models import build_model
from propdsl.runs import Run
from propdsl.syntax import format_text
from propdsl.train import (
    TrainingDiverged,
    TrainingInterrupted,
    TrainOptions,
    load_split,
    resolve_device,
    run_folder,
    set_threads,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted((ROOT / "specs" / "methods").glob("*.prop"))

TINY = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = 0.1

let pixels = box(0, 1)

property robust(x, y) =
  classification_robustness(f, x, y, eps)

property stable(x) =
  standard_robustness(f, x, eps, 2.0)

train f on digits(split = "train", limit = 200) {
  model     = mlp(hidden = [16])
  epochs    = 2
  batch     = 50
  optimizer = adam(lr = 0.01)
  logic     = dl2
  attack    = pgd(steps = 2)
  loss      = cross_entropy + 0.5 * robust
}
"""

# Three epochs with a learning-rate schedule and attack starts: all of it must resume exactly.
RESUMABLE = (
    TINY.replace("limit = 200", "limit = 120")
    .replace("epochs    = 2", "epochs    = 3")
    .replace("batch     = 50", "batch     = 40\n  schedule  = step(step_size = 1, gamma = 0.5)")
)


def write(tmp_path: Path, text: str, name: str = "tiny.prop") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def options(out: Path, **kwargs) -> TrainOptions:
    return TrainOptions(**{"quiet": True, "threads": 1, "eval_samples": 64, **kwargs, "out": out})


def cli_run(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


# -- the run folder ------------------------------------------------------------------------------
def test_train_writes_a_complete_run_folder(tmp_path: Path):
    path = write(tmp_path, TINY)
    run = tmp_path / "run"
    result = train(propdsl.load(path), options(run))

    assert result.run == run
    assert {p.name for p in run.iterdir()} >= {
        "config.json",
        "spec.prop",
        "metrics.jsonl",
        "metrics.csv",
        "last.safetensors",
        "last.json",
        "last.state.pt",
        "best.safetensors",
        "best.json",
    }
    assert not list(run.glob("*.tmp"))
    assert (run / "spec.prop").read_text(encoding="utf-8") == TINY

    config = json.loads((run / "config.json").read_text())
    assert config["spec_sha256"] == hashlib.sha256(TINY.encode()).hexdigest()
    assert config["params"] == {"eps": 0.1}
    assert config["seed"] == 0 and config["epochs"] == 2 and config["batch"] == 50
    assert config["versions"]["propdsl"] == propdsl.__version__
    assert config["versions"]["torch"] == torch.__version__
    assert config["versions"]["python"].count(".") == 2
    assert config["model"]["name"] == "mlp" and config["model"]["kwargs"] == {"hidden": [16]}
    assert config["data"] == {"name": "digits", "split": "train", "limit": 200}
    assert config["logic"] == "dl2" and config["attack"] == "pgd(steps = 2)"
    assert config["optimizer"] == "adam(lr = 0.01)" and config["device"] == "cpu"
    assert "cross_entropy" in config["loss"] and "robust" in config["loss"]

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows == result.metrics
    for row in rows:
        terms = {k: v for k, v in row.items() if k.startswith("loss[")}
        assert len(terms) == 2 and any("robust" in k for k in terms)
        # the loss is the sum of its terms, batch by batch, so also on average
        assert row["loss"] == pytest.approx(sum(terms.values()), rel=1e-5)
        assert 0.0 <= row["val_accuracy"] <= 1.0
        assert 0.0 <= row["satisfied[robust]"] <= 1.0
        assert 0.0 <= row["satisfied[stable]"] <= 1.0
        assert row["radius_scale"] == 1.0 and row["lr"] == 0.01
        assert 0.0 <= row["train_seconds"] <= row["seconds"]
    assert rows[1]["loss"] < rows[0]["loss"]

    with open(run / "metrics.csv", newline="", encoding="utf-8") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and set(table[0]) == set(rows[0])
    for line, row in zip(table, rows, strict=True):
        for key, value in row.items():
            assert float(line[key]) == pytest.approx(value)

    last = json.loads((run / "last.json").read_text())
    assert last["epoch"] == 2 and last["metrics"] == rows[1]
    trained = {k: v.detach() for k, v in result.model.state_dict().items()}
    saved = weights(run / "last.safetensors")
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    best = json.loads((run / "best.json").read_text())
    accs = [r["val_accuracy"] for r in rows]
    assert best["epoch"] == accs.index(max(accs)) + 1
    assert (run / "last.state.pt").exists()  # optimizer state, for --resume

    reopened = Run.open(run).load_model("last")
    x = torch.rand(5, 1, 8, 8)
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(reopened(x), result.model(x))


def test_ramp_grows_the_radius_over_the_first_epochs(tmp_path: Path):
    text = TINY.replace("epochs    = 2", "epochs    = 3\n  ramp      = 2").replace("200", "60")
    result = train(propdsl.load(text), options(tmp_path / "run", eval_samples=8))
    assert [r["radius_scale"] for r in result.metrics] == [0.5, 1.0, 1.0]


def test_with_a_ramp_best_is_chosen_among_the_full_radius_epochs(tmp_path: Path, monkeypatch):
    # accuracy falls while the radius grows: the most accurate epoch is the least robust one
    accuracies = iter([0.9, 0.8, 0.5, 0.7, 0.6])
    real = propdsl.train.evaluate_epoch

    def scripted(*args, **kwargs):
        return {**real(*args, **kwargs), "val_accuracy": next(accuracies)}

    monkeypatch.setattr(propdsl.train, "evaluate_epoch", scripted)
    text = TINY.replace("epochs    = 2", "epochs    = 5\n  ramp      = 3").replace("200", "60")
    result = train(propdsl.load(text), options(tmp_path / "run", eval_samples=8))
    assert [r["radius_scale"] for r in result.metrics][2:] == [1.0, 1.0, 1.0]
    assert json.loads((tmp_path / "run" / "best.json").read_text())["epoch"] == 4


def test_a_fresh_run_replaces_an_old_one_and_text_specs_get_a_default_folder(tmp_path: Path):
    spec = propdsl.load(TINY.replace("epochs    = 2", "epochs    = 1").replace("200", "60"))
    run = tmp_path / "run"
    (run).mkdir()
    (run / "notes.txt").write_text("mine")
    train(spec, options(run, eval_samples=8, seed=1))
    first = weights(run / "best.safetensors")
    with pytest.raises(propdsl.UsageError, match="holds a run"):
        train(spec, options(run, eval_samples=8))  # an earlier propdsl run: kept
    train(spec, options(run, eval_samples=8, force=True))  # replaced when asked to
    assert len(weights(run / "best.safetensors")) == 4  # two Linear layers
    assert not torch.equal(weights(run / "best.safetensors")["1.weight"], first["1.weight"])
    assert json.loads((run / "config.json").read_text())["seed"] == 0
    assert (run / "notes.txt").read_text() == "mine"
    assert run_folder(spec, TrainOptions()) == Path("runs") / "spec"
    assert run_folder(propdsl.load(write(tmp_path, TINY)), TrainOptions()) == Path("runs/tiny")


def test_without_validation_data_best_is_last(tmp_path: Path):
    text = TINY.replace("limit = 200", "limit = 60, val_fraction = 0.0")
    result = train(propdsl.load(text), options(tmp_path / "run"))
    assert [r["val_accuracy"] for r in result.metrics] == [None, None]
    assert result.metrics[-1]["satisfied[robust]"] is None
    assert json.loads((tmp_path / "run" / "best.json").read_text())["epoch"] == 2
    assert_same_weights(
        tmp_path / "run" / "best.safetensors", tmp_path / "run" / "last.safetensors"
    )


def test_threads_are_restored_and_devices_checked(tmp_path: Path):
    torch.set_num_threads(1)
    spec = propdsl.load(TINY.replace("epochs    = 2", "epochs    = 1").replace("200", "60"))
    train(spec, TrainOptions(out=tmp_path / "run", quiet=True, threads=2, eval_samples=8))
    assert torch.get_num_threads() == 1
    assert set_threads(1) == 1
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(propdsl.UsageError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(propdsl.UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_a_spec_without_a_train_block_is_a_usage_error(tmp_path: Path):
    spec = propdsl.load("network f : Tensor[1, 8, 8] -> Tensor[10]\n")
    with pytest.raises(propdsl.UsageError, match="no train block"):
        train(spec, options(tmp_path / "run"))


# -- the method specs ----------------------------------------------------------------------------
def test_there_is_a_method_spec_for_each_training_method_and_logic():
    names = {p.stem for p in METHODS}
    assert {
        "standard",
        "noise_augmentation",
        "fgsm_augmentation",
        "adversarial_pgd",
        "trades",
        "gradient_woods",
        "gradient_etmann",
        "explanation_sep",
        "certified_ibp",
        "certified_crown_ibp",
    } <= names
    for logic in available_logics():
        if logic_class(logic).trainable:
            assert f"property_{logic}" in names


@pytest.mark.parametrize("path", METHODS, ids=[p.stem for p in METHODS])
def test_method_spec_checks_and_is_canonical(path: Path):
    checked = cli_run("check", str(path))
    assert checked.exit_code == 0, checked.output
    assert cli_run("fmt", "--check", str(path)).exit_code == 0, f"run: propdsl fmt {path}"
    text = path.read_text(encoding="utf-8")
    assert format_text(text, path.name) == text
    assert "limit" not in text  # user-facing: the full data
    block = propdsl.load(path).train_block
    assert block is not None and block.get("loss") is not None


@pytest.mark.parametrize("path", METHODS, ids=[p.stem for p in METHODS])
def test_method_spec_trains_a_short_epoch_with_a_finite_loss(path: Path, tmp_path: Path):
    text = path.read_text(encoding="utf-8")
    source = 'digits(split = "train")'
    assert source in text
    spec = propdsl.load(text.replace(source, 'digits(split = "train", limit = 64)'))
    result = train(spec, options(tmp_path / "run", epochs=1, batch=32, eval_samples=16))
    (row,) = result.metrics
    losses = {k: v for k, v in row.items() if k == "loss" or k.startswith("loss[")}
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert 0.0 <= row["val_accuracy"] <= 1.0 and 0.0 <= row["satisfied[robust]"] <= 1.0
    if path.stem.startswith("property_"):
        assert "loss[robust]" in row or any("· loss[robust]]" in k for k in row)


def test_the_training_guide_specs_load_and_are_canonical():
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```prop\n(.*?)^```", text, re.DOTALL | re.MULTILINE)
    assert blocks
    for body in blocks:
        assert propdsl.load(body).train_block is not None
        assert format_text(body, "training.md") == body


# -- resume --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: three epochs of RESUMABLE in one go."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    spec = propdsl.load(write(folder, RESUMABLE, "resumable.prop"))
    torch.set_num_threads(1)
    train(spec, options(folder / "run"))
    return folder / "run"


def test_resume_after_an_interruption_ends_with_the_same_weights(tmp_path, uninterrupted):
    spec = propdsl.load(write(tmp_path, RESUMABLE, "resumable.prop"))
    run = tmp_path / "run"

    def interrupt(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, options(run), on_epoch=interrupt)
    assert json.loads((run / "last.json").read_text())["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1

    result = train(spec, options(run, resume=True))
    assert [r["epoch"] for r in result.metrics] == [1, 2, 3]
    assert [r["lr"] for r in result.metrics] == [0.005, 0.0025, 0.00125]
    for tag in ("last", "best"):
        assert_same_weights(run / f"{tag}.safetensors", uninterrupted / f"{tag}.safetensors")
    reference = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").open()]
    assert without_times(result.metrics) == without_times(reference)
    with open(run / "metrics.csv", newline="", encoding="utf-8") as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]


def test_training_on_with_more_epochs_equals_training_at_once(tmp_path, uninterrupted):
    spec = propdsl.load(write(tmp_path, RESUMABLE, "resumable.prop"))
    run = tmp_path / "run"
    train(spec, options(run, epochs=1))
    train(spec, options(run, epochs=3, resume=True))
    assert_same_weights(run / "last.safetensors", uninterrupted / "last.safetensors")
    assert json.loads((run / "config.json").read_text())["epochs"] == 3


def test_cli_resume_and_its_refusals(tmp_path, uninterrupted):
    path = write(tmp_path, RESUMABLE, "resumable.prop")
    run = tmp_path / "run"
    first = cli_run("train", str(path), "--epochs", "1", "--out", str(run), "--threads", "1")
    assert first.exit_code == 0, first.output
    assert "epoch 1/1" in first.stderr and f"run folder: {run}; val accuracy" in first.stdout

    other_seed = cli_run("train", str(path), "--out", str(run), "--resume", "--seed", "5", "-q")
    assert other_seed.exit_code == 2 and "its seed differs" in other_seed.stderr

    nowhere = cli_run("train", str(path), "--out", str(tmp_path / "none"), "--resume", "-q")
    assert nowhere.exit_code == 2 and "config.json is missing" in nowhere.stderr

    args = ("train", str(path), "--out", str(run), "--threads", "1", "--resume", "-q")
    second = cli_run(*args, "--epochs", "3")
    assert second.exit_code == 0, second.output
    assert_same_weights(run / "last.safetensors", uninterrupted / "last.safetensors")


def test_cli_interrupt_says_how_to_resume(tmp_path, monkeypatch):
    path = write(tmp_path, TINY)

    def interrupted(*args, **kwargs):
        raise TrainingInterrupted(tmp_path / "run", 2, True)

    monkeypatch.setattr("propdsl.train.train", interrupted)
    args = ("train", str(path), "--out", str(tmp_path / "run"), "-q")
    result = cli_run(*args, "--model", "nets.py:make")
    assert result.exit_code == 130
    assert result.stderr == (
        f"interrupted; {tmp_path / 'run'} keeps epoch 2: continue with\n"
        f"  propdsl train {path} --out {tmp_path / 'run'} --resume --model nets.py:make\n"
    )
    assert "Traceback" not in result.output


# -- NaN -----------------------------------------------------------------------------------------
NAN_TERM = TINY.replace("0.5 * robust", "log(cross_entropy(f(x), y) - 100)")


def test_a_nan_term_stops_training_naming_the_term(tmp_path: Path):
    with pytest.raises(TrainingDiverged) as info:
        train(propdsl.load(NAN_TERM), options(tmp_path / "run"))
    message = str(info.value)
    assert "'log(cross_entropy(f(x), y) - 100)'" in message
    assert "epoch 1, batch 1" in message and "no epoch had finished" in message
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_deferred_nan_check_reports_the_same_batch_and_term(tmp_path: Path, monkeypatch):
    """On an accelerator the loop checks the losses on the device, once per epoch: the message
    names the same term, epoch and batch as the check before every optimizer step, and nothing
    of the epoch is committed. (Forced on the CPU here.)"""
    monkeypatch.setattr("propdsl.train._check_each_step", lambda device: False)
    # The term is NaN from batch 1 on: the later bad batches do not replace the first.
    with pytest.raises(TrainingDiverged) as info:
        train(propdsl.load(NAN_TERM), options(tmp_path / "run"))
    message = str(info.value)
    assert "'log(cross_entropy(f(x), y) - 100)'" in message
    assert "epoch 1, batch 1" in message and "no epoch had finished" in message
    assert not (tmp_path / "run" / "last.safetensors").exists()


def test_deferred_nan_check_finds_a_later_first_bad_batch(tmp_path: Path, monkeypatch):
    """The first non-finite batch is recorded, not the last one: batch 3 of epoch 2 here."""
    import propdsl.loss.compile as C

    calls = {"n": 0}
    forward = C.Objective.forward

    def poisoned(self, model, x, y):
        calls["n"] += 1
        out = forward(self, model, x, y)
        # 4 batches an epoch (200 images, batch 50): call 7 is epoch 2, batch 3.
        return out * math.nan if calls["n"] >= 7 else out

    monkeypatch.setattr(C.Objective, "forward", poisoned)
    for deferred in (False, True):
        calls["n"] = 0
        monkeypatch.setattr("propdsl.train._check_each_step", lambda device, d=deferred: not d)
        run = tmp_path / f"run{deferred}"
        with pytest.raises(TrainingDiverged, match=r"epoch 2, batch 3;") as info:
            train(propdsl.load(TINY.replace(" + 0.5 * robust", "")), options(run))
        assert "loss 'cross_entropy(f(x), y)'" in str(info.value)
        assert json.loads((run / "last.json").read_text())["epoch"] == 1


def test_epoch_sums_on_the_device_equal_the_per_step_host_sums(tmp_path: Path, monkeypatch):
    """The metrics do not depend on where the sums are kept: bit-equal rows."""
    rows = []
    for check in (True, False):
        monkeypatch.setattr("propdsl.train._check_each_step", lambda device, c=check: c)
        result = train(propdsl.load(TINY), options(tmp_path / f"run{check}"))
        rows.append([{k: v for k, v in r.items() if "seconds" not in k} for r in result.metrics])
    assert rows[0] == rows[1]
    terms = [k for k in rows[0][0] if k.startswith("loss[")]
    assert len(terms) == 2 and rows[0][0]["loss"] > 0  # the total and both terms are there
    assert rows[0][0]["loss"] == pytest.approx(sum(rows[0][0][k] for k in terms), rel=1e-5)


def test_nan_after_an_epoch_keeps_the_last_checkpoint_intact(tmp_path: Path):
    text = TINY.replace(" + 0.5 * robust", "")
    model = build_model("mlp", (1, 8, 8), 10, hidden=[16], seed=0)
    run = tmp_path / "run"
    snapshot = {}

    def poison(row):
        snapshot.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            model[1].weight.fill_(math.nan)

    with pytest.raises(TrainingDiverged, match=r"loss 'cross_entropy\(f\(x\), y\)'.*epoch 2"):
        train(propdsl.load(text), options(run), model=model, on_epoch=poison)
    saved = weights(run / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert all(torch.equal(saved[k], snapshot[k]) for k in saved)
    assert json.loads((run / "last.json").read_text())["epoch"] == 1
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_cli_divergence_exits_1_with_a_message(tmp_path: Path):
    exploding = TINY.replace("adam(lr = 0.01)", "sgd(lr = 1e30)")
    path = write(tmp_path, exploding)
    result = cli_run("train", str(path), "--out", str(tmp_path / "run"), "-q")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: the ") and "became NaN or infinite" in result.stderr
    assert "Traceback" not in result.output


# -- data sources --------------------------------------------------------------------------------
def _torchvision_spec(source: str, root: Path) -> str:
    image = source in ("cifar10", "svhn")
    shape = "3, 32, 32" if image else "1, 28, 28"
    model = "cnn(channels = [4], hidden = [8])" if image else "mlp(hidden = [8])"
    return f"""\
network f : Tensor[{shape}] -> Tensor[10]

property robust(x, y) =
  classification_robustness(f, x, y, 0.05)

train f on {source}(split = "train", root = "{root.as_posix()}", val_fraction = 0.2) {{
  model  = {model}
  epochs = 1
  batch  = 8
  attack = pgd(steps = 1)
  loss   = cross_entropy + robust
}}
"""


@pytest.mark.parametrize("source", ["mnist", "fashion_mnist", "cifar10", "svhn"])
def test_torchvision_sources_train_from_files_in_their_original_formats(tmp_path, source):
    from test_data import write_cifar, write_mnist, write_svhn

    root = tmp_path / "data"
    root.mkdir()
    if source == "mnist":
        write_mnist(root, "MNIST")
    elif source == "fashion_mnist":
        write_mnist(root, "FashionMNIST", gz=True)
    elif source == "cifar10":
        write_cifar(root)
    else:
        write_svhn(root)
    spec = propdsl.load(_torchvision_spec(source, root))
    result = train(spec, options(tmp_path / "run"))
    (row,) = result.metrics
    assert math.isfinite(row["loss"]) and 0.0 <= row["val_accuracy"] <= 1.0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"]["name"] == source
    model_name = "cnn" if source in ("cifar10", "svhn") else "mlp"
    assert config["model"]["name"] == model_name


def test_a_data_shape_mismatch_is_a_positioned_spec_error(tmp_path: Path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x=rng.random((20, 5)), y=np.arange(20) % 10)
    text = TINY.replace('digits(split = "train", limit = 200)', 'tensors(path = "data.npz")')
    path = write(tmp_path, text)
    line = text.splitlines().index(next(t for t in text.splitlines() if t.startswith("train")))
    with pytest.raises(propdsl.CheckError) as info:
        train(propdsl.load(path), options(tmp_path / "run"))
    (diag,) = info.value.diagnostics
    assert diag.span.line == line + 1

    result = cli_run("train", str(path), "--out", str(tmp_path / "run"), "-q")
    assert result.exit_code == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{path}:{line + 1}:")
    assert "gives Tensor[5] inputs in 10 classes" in first and "Tensor[1, 8, 8]" in first
    assert "^" in result.stderr and "Traceback" not in result.output


def test_a_bad_model_option_is_a_positioned_spec_error(tmp_path: Path):
    # The option types check (kernel is a list of naturals); the lengths are checked when the
    # model is built, and the error still points at the train block, with the hint.
    text = TINY.replace("mlp(hidden = [16])", "cnn(channels = [4, 8], stride = [1, 2, 2])")
    path = write(tmp_path, text)
    line = text.splitlines().index(next(t for t in text.splitlines() if t.startswith("train")))
    result = cli_run("train", str(path), "--out", str(tmp_path / "run"), "-q")
    assert result.exit_code == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{path}:{line + 1}:")
    assert "model: stride has 3 entries but channels has 2" in first
    assert "hint: give one stride for every conv layer" in result.stderr
    assert "^" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "run" / "last.safetensors").exists()


# -- user models ---------------------------------------------------------------------------------
USER_SPEC = TINY.replace("mlp(hidden = [16])", "user").replace("limit = 200", "limit = 60")
USER_MODULE = """\
from torch import nn


def make(input_shape, num_classes):
    size = 1
    for d in input_shape:
        size *= d
    return nn.Sequential(nn.Flatten(), nn.Linear(size, 12), nn.Tanh(), nn.Linear(12, num_classes))
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"propdsl_user_nets_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_a_user_model_by_reference(tmp_path, user_module):
    spec = propdsl.load(write(tmp_path, USER_SPEC))
    with pytest.raises(propdsl.UsageError, match="--model"):
        train(spec, options(tmp_path / "none"))
    run = tmp_path / "run"
    result = train(spec, options(run, model=f"{user_module}:make", eval_samples=8))
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["user"] == f"{user_module}:make"
    assert isinstance(result.model[2], nn.Tanh)
    # the run folder names the model but never imports it: the caller names it
    with pytest.raises(propdsl.UsageError, match=f"never runs code.*--model {user_module}:make"):
        Run.open(run).load_model("last")
    reopened = Run.open(run).load_model("last", model_ref=f"{user_module}:make")
    x = torch.rand(3, 1, 8, 8)
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(reopened(x), result.model(x))

    cli_out = tmp_path / "cli"
    args = ("train", str(tmp_path / "tiny.prop"), "--out", str(cli_out), "-q", "--threads", "1")
    done = cli_run(*args, "--model", f"{user_module}:make")
    assert done.exit_code == 0, done.output
    assert_same_weights(cli_out / "last.safetensors", run / "last.safetensors")


def test_a_user_model_object_through_the_api(tmp_path: Path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    start = model[1].weight.detach().clone()
    result = train(propdsl.load(USER_SPEC), options(tmp_path / "run", eval_samples=8), model=model)
    assert result.model is model
    assert not torch.equal(model[1].weight, start)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["class"] == "torch.nn.modules.container.Sequential"
    with pytest.raises(propdsl.UsageError, match="model object from the API"):
        Run.open(tmp_path / "run").load_model()


@pytest.mark.slow  # a fresh interpreter: a few seconds of imports
@pytest.mark.skipif(
    shutil.which("propdsl", path=str(Path(sys.executable).parent)) is None,
    reason="console script not installed",
)
def test_console_script_trains_a_user_model_from_pythonpath(tmp_path, user_module):
    exe = shutil.which("propdsl", path=str(Path(sys.executable).parent))
    path = write(tmp_path, USER_SPEC)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    args = [exe, "train", str(path), "--out", str(tmp_path / "run"), "-q", "--threads", "1"]
    done = subprocess.run([*args, "--model", f"{user_module}:make"], env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    assert (tmp_path / "run" / "last.safetensors").exists()


# -- robust training works -----------------------------------------------------------------------
def _security(spec_path: Path, tmp_path: Path, epochs: int) -> tuple[float, float]:
    """Clean test accuracy and constraint security against APGD-20 (not the training attack)."""
    spec = propdsl.load(spec_path)
    result = train(spec, options(tmp_path / spec_path.stem, epochs=epochs))
    test = load_split(spec, spec.train_block, "test", split_seed=0)
    model = result.model.eval()
    with torch.no_grad():
        acc = float((model(test.x).argmax(1) == test.y).float().mean())
    attack = propdsl.APGD(steps=20, restarts=1)
    check = spec.loss("robust", attack=attack, generator=torch.Generator().manual_seed(0))
    return acc, float(check(model, test.x, test.y).satisfied.float().mean())


@pytest.mark.slow  # about a minute: three MLPs, 12 epochs each, on all of digits
def test_robust_training_raises_security_far_above_standard_training(tmp_path: Path):
    methods = ROOT / "specs" / "methods"
    std_acc, std_sec = _security(methods / "standard.prop", tmp_path, 12)
    pgd_acc, pgd_sec = _security(methods / "adversarial_pgd.prop", tmp_path, 12)
    dl2_acc, dl2_sec = _security(methods / "property_dl2.prop", tmp_path, 12)
    print(
        f"standard {std_acc:.3f}/{std_sec:.3f}  pgd {pgd_acc:.3f}/{pgd_sec:.3f}  "
        f"dl2 {dl2_acc:.3f}/{dl2_sec:.3f}"
    )
    assert min(std_acc, pgd_acc, dl2_acc) >= 0.9
    assert std_sec <= 0.55
    assert pgd_sec >= std_sec + 0.2 and pgd_sec >= 1.5 * std_sec
    assert dl2_sec >= std_sec + 0.2 and dl2_sec >= 1.5 * std_sec


@pytest.mark.parametrize("with_terms", [False, True])
def test_epoch_sums_on_the_host_equal_the_device_sums(with_terms):
    """On the CPU the epoch's sums are host floats (the per-step check already reads the loss);
    elsewhere float64 tensors. Both are the float64 sums of the same float32 values."""
    from propdsl.train import _Sums

    gen = torch.Generator().manual_seed(3)
    losses = torch.rand(40, generator=gen) * 10
    terms = torch.rand(40, 2, generator=gen)
    host = _Sums(torch.device("cpu"), check_each_step=True)
    device = _Sums(torch.device("cpu"), check_each_step=False)
    for step, (loss, t) in enumerate(zip(losses, terms, strict=True), 1):
        named = {"cross_entropy(f(x), y)": t[0], "0.5 · loss[r]": t[1]} if with_terms else {}
        assert host.add(loss, named, step) and device.add(loss, named, step)
    expected = {"loss": math.fsum(float(v) for v in losses)}
    if with_terms:
        expected |= {
            "loss[cross_entropy(f(x), y)]": math.fsum(float(v) for v in terms[:, 0]),
            "loss[0.5 · loss[r]]": math.fsum(float(v) for v in terms[:, 1]),
        }
    assert set(host.totals()) == set(device.totals()) == set(expected)
    for key, value in expected.items():
        assert host.totals()[key] == pytest.approx(value, rel=1e-12)
        assert device.totals()[key] == pytest.approx(value, rel=1e-12)
    assert host.diverged() is None and device.diverged() is None
    assert not host.add(torch.tensor(math.nan), {}, 41)
    device.add(torch.tensor(math.inf), {}, 41)
    assert device.diverged() == (41, [])
    # a distributed step's values, already reduced over the ranks (host floats)
    host = _Sums(torch.device("cpu"), check_each_step=True)
    device = _Sums(torch.device("cpu"), check_each_step=False)
    for loss, t in zip(losses.tolist(), terms.tolist(), strict=True):
        named = {"cross_entropy(f(x), y)": t[0], "0.5 · loss[r]": t[1]} if with_terms else {}
        host.add_reduced(loss, named)
        device.add_reduced(loss, named)
    for key, value in expected.items():
        assert host.totals()[key] == pytest.approx(value, rel=1e-12)
        assert device.totals()[key] == pytest.approx(value, rel=1e-12)


def _optimizer_block(name: str, **kw):
    from propdsl.check import BlockInfo
    from propdsl.check.results import OptionValue

    option = OptionValue(name, tuple(kw.items()))
    return BlockInfo("train", "f", ("digits", ()), (("optimizer", option),))


@pytest.mark.parametrize(
    "name, kw",
    [
        ("adam", {"lr": 0.01}),
        ("adamw", {"lr": 0.01, "weight_decay": 0.01}),
        ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}),
    ],
)
def test_optimizers_take_pytorch_s_fused_kernel_unless_told_not_to(name, kw):
    """By default the fused kernel: the same update as PyTorch's unfused one (a second
    implementation) up to rounding; `fused = false` gives the unfused kernel itself."""
    from propdsl.train import make_optimizer

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=gen), torch.randn(3, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in start] for _ in range(4)]

    def trained(**extra):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = make_optimizer(_optimizer_block(name, **kw, **extra), params)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.clone()
            optimizer.step()
        return optimizer, params

    fused, fused_params = trained()
    plain, plain_params = trained(fused=False)
    assert fused.param_groups[0]["fused"] is True
    assert not plain.param_groups[0]["fused"]
    unfused = getattr(torch.optim, {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD"}[name])
    reference = [torch.nn.Parameter(t.clone()) for t in start]
    by_hand = unfused(reference, **kw)
    for step in grads:
        for p, g in zip(reference, step, strict=True):
            p.grad = g.clone()
        by_hand.step()
    for f, p, r in zip(fused_params, plain_params, reference, strict=True):
        assert torch.equal(p, r)  # fused = false is PyTorch's default kernel, bit for bit
        torch.testing.assert_close(f, r, rtol=1e-6, atol=1e-6)


def test_a_resumed_optimizer_keeps_the_kernel_it_was_trained_with():
    """The kernel is part of the optimizer state: a run saved by an unfused optimizer (an older
    propdsl) resumes unfused."""
    from propdsl.train import make_optimizer

    params = [torch.nn.Parameter(torch.ones(3))]
    old = torch.optim.Adam(params, lr=0.01)
    params[0].grad = torch.ones(3)
    old.step()
    resumed = make_optimizer(_optimizer_block("adam", lr=0.01), params)
    assert resumed.param_groups[0]["fused"] is True
    resumed.load_state_dict(old.state_dict())
    assert not resumed.param_groups[0]["fused"]


def test_fused_falls_back_where_no_kernel_exists_and_is_an_error_when_asked_for():
    from propdsl.train import make_optimizer

    meta = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    assert not make_optimizer(_optimizer_block("adam"), meta).param_groups[0]["fused"]
    with pytest.raises(UsageError, match=r"adam\(fused = true\): PyTorch has no fused kernel f"):
        make_optimizer(_optimizer_block("adam", fused=True), meta)


def test_a_spec_can_turn_the_fused_kernel_off_and_must_give_a_bool(tmp_path):
    base = (
        "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
        'train f on digits(split = "train") {\n  loss = cross_entropy\n'
    )
    spec = propdsl.load(base + "  optimizer = adam(lr = 0.01, fused = false)\n}\n")
    result = train(spec, options(tmp_path / "run", epochs=1))
    state = torch.load(tmp_path / "run" / "last.state.pt", weights_only=True)
    assert not state["optimizer"]["param_groups"][0]["fused"]
    assert result.metrics[0]["loss"] > 0
    with pytest.raises(CheckError, match="fused"):
        propdsl.load(base + "  optimizer = sgd(lr = 0.1, fused = 1)\n}\n")


# -- per-epoch seeding -----------------------------------------------------------------------------


def test_seed_global_on_the_cpu_seeds_the_cpu_generator_as_torch_manual_seed_does(monkeypatch):
    """The CPU generator's draws after `seed_global(v, cpu)` are those after
    `torch.manual_seed(v)`, and no accelerator's seeding is queued (what costs ~1 ms a call)."""
    from propdsl.train import seed_global

    torch.manual_seed(1234)
    expected = (torch.rand(5), torch.randn(3, 3), torch.randint(0, 10, (4,)))
    torch.manual_seed(99)  # another state first

    def queued(*args, **kwargs):
        raise AssertionError("an accelerator's seeding was queued")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", queued)
    seed_global(1234, torch.device("cpu"))
    got = (torch.rand(5), torch.randn(3, 3), torch.randint(0, 10, (4,)))
    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_seed_global_elsewhere_is_torch_manual_seed(monkeypatch):
    from propdsl.train import seed_global

    calls = []
    monkeypatch.setattr(torch, "manual_seed", lambda value: calls.append(value))
    seed_global(7, torch.device("meta"))
    assert calls == [7]


def test_every_epoch_reseeds_the_global_generator(tmp_path: Path, monkeypatch):
    """Epoch e of a run with seed s starts from `torch.manual_seed(s * 100003 + e)`'s CPU state
    (dropout draws from it); no epoch queues an accelerator's seeding."""
    import propdsl.train as trainer

    seeds = []
    real = trainer.seed_global

    def record(value, device):
        real(value, device)
        seeds.append((value, torch.random.get_rng_state()))

    def queued(*args, **kwargs):  # the model's initial seeding (once, before) may queue it
        if seeds:
            raise AssertionError("an epoch queued an accelerator's seeding")

    monkeypatch.setattr(trainer, "seed_global", record)
    monkeypatch.setattr(torch.cuda, "manual_seed_all", queued)
    spec = propdsl.load(write(tmp_path, TINY.replace("epochs    = 2", "epochs    = 3")))
    train(spec, options(tmp_path / "run", seed=5))
    monkeypatch.undo()
    assert [value for value, _ in seeds] == [5 * 100_003 + e for e in (1, 2, 3)]
    for value, state in seeds:
        torch.manual_seed(value)
        assert torch.equal(torch.random.get_rng_state(), state)
