"""Run folders under attack and accident: tampering, interruption at every write, concurrency.

A run folder is data (docs/security.md): it names a user model but never runs it; its files are
written as one commit per epoch, so a kill, SIGTERM, Ctrl-C or full disk at any write leaves a
folder that `--resume` continues to the bit-identical weights of an uninterrupted run; a lock
keeps two writers apart; damaged or hand-edited files are clear usage errors (exit 2).

Every training here is a tiny seeded MLP on 100 digits for 3 epochs (a tenth of a second), so the
sweeps over every write boundary stay in seconds; the exhaustive sweeps are marked slow.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import propdsl
from propdsl import cli, runs
from propdsl.runs import Run, RunFolderError, RunInUse
from propdsl.train import (
    MAX_THREADS,
    RunWriteError,
    TrainingDiverged,
    TrainingInterrupted,
    TrainOptions,
    set_threads,
    train,
    weights_problem,
)

# Three epochs: the first two improve the validation accuracy (best is rewritten), the third
# does not (best stays), so the sweeps cover both shapes of an epoch's commit.
SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = 0.1

property robust(x, y) =
  classification_robustness(f, x, y, eps)

train f on digits(split = "train", limit = 100) {
  model     = mlp(hidden = [16])
  epochs    = 3
  batch     = 20
  optimizer = adam(lr = 0.03)
  schedule  = step(step_size = 1, gamma = 0.5)
  attack    = pgd(steps = 1)
  loss      = cross_entropy + 0.5 * robust
}
"""
EPOCH_FILES = ("last.safetensors", "last.json", "last.state.pt", "best.safetensors", "best.json")
FORK = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def opts(out: Path, **kw) -> TrainOptions:
    # force: the sweeps train over an earlier run in the same folder on purpose
    force = not kw.get("resume", False)
    return TrainOptions(**{"quiet": True, "threads": 1, "force": force, **kw, "out": out})


def cli_run(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def spec_file(tmp_path: Path, text: str = SPEC, name: str = "tiny.prop") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def untimed(table: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in table]


def best_epoch(table: list[dict]) -> int:
    """The epoch `best` must hold: the first with the highest validation accuracy."""
    accs = [r["val_accuracy"] for r in table]
    return accs.index(max(accs)) + 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """SPEC trained for its 3 epochs in one go."""
    folder = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    train(propdsl.load(SPEC), opts(folder / "run"))
    table = rows(folder / "run")
    accs = [r["val_accuracy"] for r in table]
    # the premise of the sweeps: best moves at epoch 2 and stays at epoch 3
    assert accs[1] > accs[0] and accs[2] <= accs[1], accs
    return folder / "run"


def assert_committed_set(run: Path) -> int | None:
    """The folder holds one epoch's complete set, once a commit a kill cut short is completed
    (as `Run.open` and `--resume` do); returns that epoch (0: none yet), or None for a folder
    whose earlier run was being cleared (no config.json: not a run until it is run again)."""
    if not (run / "config.json").exists():
        return None
    if runs.needs_recovery(run):
        with runs.locked(run, "test"):
            runs.recover(run)
    manifest = runs.read_manifest(run)
    if manifest is None:
        assert not (run / "last.safetensors").exists()
        return 0
    assert runs.verify(run, manifest) == []
    epoch = manifest.epoch
    table = rows(run)
    assert [r["epoch"] for r in table] == list(range(1, epoch + 1))
    assert json.loads((run / "last.json").read_text())["epoch"] == epoch
    assert json.loads((run / "best.json").read_text())["epoch"] == best_epoch(table)
    state = torch.load(run / "last.state.pt", weights_only=True)
    assert state["epoch"] == epoch
    return epoch


def assert_equals_reference(run: Path, reference: Path) -> None:
    assert same_weights(run / "last.safetensors", reference / "last.safetensors")
    assert same_weights(run / "best.safetensors", reference / "best.safetensors")
    table = rows(run)
    assert [r["epoch"] for r in table] == [1, 2, 3]  # complete and unique
    assert untimed(table) == untimed(rows(reference))
    assert json.loads((run / "best.json").read_text())["epoch"] == best_epoch(table)
    csv_epochs = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()]
    assert csv_epochs[1:] == ["1", "2", "3"]
    assert runs.verify(run, runs.read_manifest(run)) == []
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


# -- fault injection at the write boundaries -----------------------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL in-process: nothing of propdsl may catch it."""


class Faults:
    """Counts every write boundary of a run folder (a new temporary, a rename, a removal, the
    directory fsync) and fails at the k-th, before it happens: `interrupt` (Ctrl-C / SIGTERM),
    `enospc` (a full disk; a temporary is written half), or `kill` (the process dies at once,
    no cleanup: `os._exit` in a forked child)."""

    NAMES = ("_write_new", "_link_new", "_replace", "_remove", "_fsync_dir")

    def __init__(self, monkeypatch, at: int | None = None, mode: str = "interrupt"):
        self.calls: list[str] = []
        self.at = at
        self.mode = mode
        for name in self.NAMES:
            monkeypatch.setattr(runs, name, self._wrap(name, getattr(runs, name)))

    def _wrap(self, name: str, real: Callable):
        def step(*args):
            self.calls.append(name)
            if len(self.calls) == self.at:
                if self.mode == "interrupt":
                    raise KeyboardInterrupt
                if self.mode == "enospc":
                    if name == "_write_new":  # the disk fills in the middle of the file
                        folder, file, data = args
                        tmp = real(folder, file, data[: len(data) // 2])
                        os.unlink(folder / tmp)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                if name == "_write_new":  # killed in the middle of the file: half of it stays
                    folder, file, data = args
                    real(folder, file, data[: len(data) // 2])
                os._exit(137)
            return real(*args)

        return step


def in_child(fn: Callable[[], None]) -> int:
    """Run `fn` in a forked child; its exit code (137: killed at a boundary)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            fn()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def continue_run(run: Path) -> None:
    """What the user does next: resume when the folder holds this run's config (seed 0), else
    run the command again."""
    config = run / "config.json"
    if config.exists() and json.loads(config.read_text()).get("seed") == 0:
        train(propdsl.load(SPEC), opts(run, resume=True))
    else:
        train(propdsl.load(SPEC), opts(run))


def sweep(tmp_path, monkeypatch, reference: Path, mode: str, ks) -> int:
    """Fail a fresh run (into a folder holding an earlier run of another seed) at each boundary
    k, check the folder holds a committed set, continue it, compare with the reference."""
    checked = 0
    for k in ks:
        run = tmp_path / f"{mode}-{k}"
        train(propdsl.load(SPEC), opts(run, seed=7, epochs=1))  # an earlier run in the folder
        with monkeypatch.context() as patch:
            faults = Faults(patch, at=k, mode=mode)
            if mode == "kill":
                code = in_child(lambda r=run: train(propdsl.load(SPEC), opts(r)))
                assert code == 137, f"boundary {k}: the child exited {code}"
            elif mode == "interrupt":
                with pytest.raises(TrainingInterrupted) as info:
                    train(propdsl.load(SPEC), opts(run))
                kept = info.value.epoch if info.value.started else None
            else:
                with pytest.raises(RunWriteError, match="No space left on device") as info:
                    train(propdsl.load(SPEC), opts(run))
                kept = info.value.epoch
            if mode != "kill":
                assert len(faults.calls) == k
        epoch = assert_committed_set(run)
        ours = epoch is not None and json.loads((run / "config.json").read_text())["seed"] == 0
        if mode != "kill" and kept is not None and ours:
            assert epoch == kept, f"boundary {k}: the error says epoch {kept}, folder has {epoch}"
        continue_run(run)
        assert_equals_reference(run, reference)
        checked += 1
    return checked


@pytest.fixture(scope="module")
def boundaries(tmp_path_factory, reference) -> list[str]:
    """The write boundaries of one fresh 3-epoch run over an earlier run, in order."""
    folder = tmp_path_factory.mktemp("count")
    train(propdsl.load(SPEC), opts(folder / "run", seed=7, epochs=1))
    with pytest.MonkeyPatch.context() as patch:
        faults = Faults(patch)
        train(propdsl.load(SPEC), opts(folder / "run"))
    assert_equals_reference(folder / "run", reference)
    return faults.calls


def epoch_two(boundaries: list[str]) -> range:
    """The boundaries of epoch 2's commit (best rewritten): between the 2nd and 3rd fsyncs."""
    fsyncs = [i + 1 for i, name in enumerate(boundaries) if name == "_fsync_dir"]
    return range(fsyncs[1] + 1, fsyncs[2] + 1)


def test_the_boundaries_are_what_one_commit_per_epoch_writes(boundaries):
    # clearing the earlier run (all its files), config + spec + fsync, then per epoch: temporaries
    # (when best moves, best.safetensors and best.json are hard links to last's temporaries),
    # the manifest, the renames, one fsync (7 files when best moves, 5 when it stays)
    clear = ["_remove"] * (len(runs.RESULT_COPIES) + len(runs.RESULT_DIRS) + len(runs.RUN_FILES))
    start = ["_write_new", "_replace"] * 2 + ["_fsync_dir"]

    def commit(best: bool):
        n = 7 if best else 5
        staged = ["_write_new"] * 3 + ["_link_new"] * 2 * best + ["_write_new"] * 2
        return staged + ["_write_new", "_replace"] + ["_replace"] * n + ["_fsync_dir"]

    assert boundaries == clear + start + commit(True) + commit(True) + commit(False)


# The commits of this tiny model are made inline (`INLINE_COMMIT_BYTES`); the epoch's sweeps run
# them in the background thread as well.
@pytest.fixture(params=["inline", "background"])
def commit_path(request, monkeypatch):
    import propdsl.train as trainer

    if request.param == "background":
        monkeypatch.setattr(trainer, "INLINE_COMMIT_BYTES", -1)
    return request.param


def test_ctrl_c_at_every_write_of_an_epoch_resumes_bit_for_bit(
    tmp_path, monkeypatch, reference, boundaries, commit_path
):
    assert sweep(tmp_path, monkeypatch, reference, "interrupt", epoch_two(boundaries)) == 17


@FORK
def test_a_kill_at_every_write_of_an_epoch_resumes_bit_for_bit(
    tmp_path, monkeypatch, reference, boundaries, commit_path
):
    assert sweep(tmp_path, monkeypatch, reference, "kill", epoch_two(boundaries)) == 17


@pytest.mark.slow  # about 60 runs per mode
@pytest.mark.parametrize("mode", ["interrupt", "enospc", pytest.param("kill", marks=FORK)])
def test_a_failure_at_every_write_boundary_of_a_run_resumes_bit_for_bit(
    tmp_path, monkeypatch, reference, boundaries, mode
):
    ks = range(1, len(boundaries) + 1)
    assert sweep(tmp_path, monkeypatch, reference, mode, ks) == len(boundaries)


@FORK
def test_a_commit_whose_staged_files_did_not_reach_the_disk_falls_back(
    tmp_path, monkeypatch, reference, boundaries
):
    """A power cut after epoch 2's manifest but before its renames, with a staged file torn
    (its data never reached the disk): the folder falls back to epoch 1. Torn after a rename
    happened, there is nothing to fall back to: a clear refusal."""
    first_rename = epoch_two(boundaries)[0] + 9  # after 7 temporaries + the manifest's 2 steps
    assert boundaries[first_rename - 3 : first_rename] == ["_write_new", "_replace", "_replace"]
    for k, expected in ((first_rename, 1), (first_rename + 1, None)):
        run = tmp_path / f"torn-{k}"
        with monkeypatch.context() as patch:
            Faults(patch, at=k, mode="kill")
            assert in_child(lambda r=run: train(propdsl.load(SPEC), opts(r))) == 137
        manifest = runs.read_manifest(run)
        assert manifest.epoch == 2
        pending = [t for t in manifest.staged.values() if (run / t).exists()]
        torn = run / pending[-1]
        torn.write_bytes(b"\0" * len(torn.read_bytes()))
        if expected is None:
            with pytest.raises(RunFolderError, match="epoch 2 are damaged"):
                train(propdsl.load(SPEC), opts(run, resume=True))
            continue
        Run.open(run)
        assert runs.read_manifest(run).epoch == 1
        assert assert_committed_set(run) == 1
        train(propdsl.load(SPEC), opts(run, resume=True))
        assert_equals_reference(run, reference)


def test_a_full_disk_keeps_the_previous_epoch_and_says_how_to_go_on(
    tmp_path, monkeypatch, reference
):
    path = spec_file(tmp_path)
    run = tmp_path / "run"
    real = runs._write_new
    written = []

    def full_after_epoch_one(folder, name, data):
        written.append(name)
        if runs.read_manifest(folder) is not None and name == "last.state.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(folder, name, data)

    monkeypatch.setattr(runs, "_write_new", full_after_epoch_one)
    result = cli_run("train", str(path), "--out", str(run), "--threads", "1", "-q")
    assert result.exit_code == 2, result.output
    first, then = result.stderr.splitlines()
    assert first.startswith(f"error: cannot write epoch 2 to {run}: No space left on device")
    assert "the run keeps epoch 1" in first
    assert then == f"  then: propdsl train {path} --out {run} --resume"
    assert assert_committed_set(run) == 1
    monkeypatch.undo()
    again = cli_run(*shlex.split(then.split("then: ")[1])[1:], "--threads", "1", "-q")
    assert again.exit_code == 0, again.output
    assert_equals_reference(run, reference)


# -- the commit in the background ----------------------------------------------------------------
# Each epoch's commit runs in a background thread while the next epoch trains (the sweeps above
# inject their faults there). These pin what the thread must not change: a Ctrl-C waits for the
# commit in flight, the commit writes the epoch's end state whatever the next epoch does
# meanwhile, and its errors stop the run at once with the message an inline commit gave.
# A tiny model's commit is small enough to be made inline (`INLINE_COMMIT_BYTES`): the tests
# of the background thread lower the limit so that every commit goes there.
def commit_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("propdsl-commit")]


@pytest.fixture
def background(monkeypatch):
    import propdsl.train as trainer

    monkeypatch.setattr(trainer, "INLINE_COMMIT_BYTES", -1)


def test_commits_up_to_the_inline_size_are_made_in_the_loops_thread(tmp_path, monkeypatch):
    """Each commit runs inline when its distinct bytes are at most INLINE_COMMIT_BYTES (best's
    bytes, the same objects as last's, counted once) and in the commit thread above it."""
    import propdsl.train as trainer

    seen: list[tuple[str, int]] = []
    real = runs.commit_epoch

    def commit_epoch(run, epoch, files, **kw):
        distinct = {id(b): b for b in files.values()}.values()
        seen.append((threading.current_thread().name, sum(len(b) for b in distinct)))
        return real(run, epoch, files, **kw)

    monkeypatch.setattr(runs, "commit_epoch", commit_epoch)
    train(propdsl.load(SPEC), opts(tmp_path / "a"))
    assert [thread for thread, _ in seen] == ["MainThread"] * 3
    sizes = [size for _, size in seen]
    assert max(sizes) <= trainer.INLINE_COMMIT_BYTES
    # epochs that improve write best as well, without doubling the count: all about one size
    assert max(sizes) < 1.5 * min(sizes)
    assert sizes == sorted(sizes)  # the metrics files grow by a row (~400 bytes) an epoch
    seen.clear()
    limit = (sizes[0] + sizes[1]) // 2  # the first epoch's commit inline, the later ones not
    monkeypatch.setattr(trainer, "INLINE_COMMIT_BYTES", limit)
    train(propdsl.load(SPEC), opts(tmp_path / "b"))
    for thread, size in seen:
        assert thread == ("MainThread" if size <= limit else "propdsl-commit_0"), (thread, size)
    assert [thread for thread, _ in seen] == ["MainThread"] + ["propdsl-commit_0"] * 2


def test_a_ctrl_c_while_a_commit_is_in_flight_waits_for_it(
    tmp_path, monkeypatch, reference, background
):
    """Epoch 2's commit is held before its first file while epoch 3 trains; Ctrl-C in epoch 3's
    validation (the folder still at epoch 1) returns only once that commit is done: it reports
    epoch 2, the folder holds epoch 2's complete set, and resuming ends as the reference."""
    import propdsl.train as trainer

    run = tmp_path / "run"
    release = threading.Event()
    seen: dict[str, object] = {}
    real_write, real_evaluate = runs._write_new, trainer.evaluate_epoch
    count = {"last": 0, "evaluations": 0}

    def held_write(folder, name, data):
        if name == "last.safetensors":
            count["last"] += 1
            if count["last"] == 2:  # epoch 2's commit, in the background
                assert release.wait(30), "the interrupt never came"
        return real_write(folder, name, data)

    def interrupt_in_epoch_three(*args, **kwargs):
        count["evaluations"] += 1
        if count["evaluations"] == 3:
            seen["epoch on disk"] = runs.read_manifest(run).epoch
            seen["in flight"] = commit_threads()
            threading.Timer(0.2, release.set).start()  # the commit goes on after the interrupt
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(runs, "_write_new", held_write)
    monkeypatch.setattr(trainer, "evaluate_epoch", interrupt_in_epoch_three)
    with pytest.raises(TrainingInterrupted) as info:
        train(propdsl.load(SPEC), opts(run))
    assert seen["epoch on disk"] == 1 and seen["in flight"]
    # returned after the commit: nothing half-written, no thread left, the lock free
    assert info.value.epoch == 2 and info.value.started
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert not commit_threads()
    assert assert_committed_set(run) == 2
    with runs.locked(run, "test"):
        pass
    monkeypatch.undo()
    train(propdsl.load(SPEC), opts(run, resume=True))
    assert_equals_reference(run, reference)


def test_the_commit_writes_the_epochs_end_state_while_the_next_epoch_trains(
    tmp_path, monkeypatch, reference, background
):
    """Epoch 1's commit is held until epoch 2 has taken two optimizer steps (changing the
    weights and the optimizer state in place), then a Ctrl-C: the folder holds exactly what a
    one-epoch run ends with, and resuming ends as the reference."""
    one = tmp_path / "one"
    train(propdsl.load(SPEC), opts(one, epochs=1))
    import propdsl.train as trainer

    run = tmp_path / "run"
    stepped = threading.Event()
    count = {"last": 0, "evaluations": 0, "steps": 0}
    real_write, real_evaluate = runs._write_new, trainer.evaluate_epoch
    real_step = torch.optim.Adam.step

    def held_write(folder, name, data):
        if name == "last.safetensors":
            count["last"] += 1
            if count["last"] == 1:
                assert stepped.wait(30), "epoch 2 never stepped"
        return real_write(folder, name, data)

    def evaluate(*args, **kwargs):
        count["evaluations"] += 1
        return real_evaluate(*args, **kwargs)

    def step(self, *args, **kwargs):
        if count["evaluations"] == 1:  # in epoch 2
            count["steps"] += 1
            if count["steps"] == 3:
                stepped.set()
                raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(runs, "_write_new", held_write)
    monkeypatch.setattr(trainer, "evaluate_epoch", evaluate)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with pytest.raises(TrainingInterrupted) as info:
        train(propdsl.load(SPEC), opts(run))
    assert info.value.epoch == 1 and count["steps"] == 3
    assert assert_committed_set(run) == 1
    assert same_weights(run / "last.safetensors", one / "last.safetensors")
    ours, theirs = runs.load_state(run), runs.load_state(one)
    for a, b in zip(
        ours["optimizer"]["state"].values(), theirs["optimizer"]["state"].values(), strict=True
    ):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rows(run)[0]["loss"] == rows(one)[0]["loss"]
    monkeypatch.undo()
    train(propdsl.load(SPEC), opts(run, resume=True))
    assert_equals_reference(run, reference)


@pytest.mark.parametrize("failure", ["enospc", "bug"])
def test_a_failed_commit_stops_the_next_epoch_at_once_with_the_same_error(
    tmp_path, monkeypatch, reference, failure, background
):
    """Epoch 2's commit fails (a full disk; a bug) while epoch 3 trains: the run stops after the
    batch in progress (not at the end of epoch 3) with the error an inline commit raised, the
    folder keeps epoch 1, and resuming ends as the reference."""
    import propdsl.train as trainer

    run = tmp_path / "run"
    stepped, failed = threading.Event(), threading.Event()
    count = {"last": 0, "evaluations": 0, "steps": 0}
    real_write, real_evaluate = runs._write_new, trainer.evaluate_epoch
    real_step = torch.optim.Adam.step

    def failing_write(folder, name, data):
        if name == "last.state.pt":
            count["last"] += 1
            if count["last"] == 2:
                assert stepped.wait(30)
                failed.set()
                if failure == "enospc":
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                raise RuntimeError("a bug in the commit")
        return real_write(folder, name, data)

    def evaluate(*args, **kwargs):
        count["evaluations"] += 1
        return real_evaluate(*args, **kwargs)

    def step(self, *args, **kwargs):
        if count["evaluations"] == 2:  # in epoch 3
            count["steps"] += 1
            if count["steps"] == 2:  # the commit fails during this batch
                stepped.set()
                assert failed.wait(30)
                time.sleep(0.05)  # the failure reaches its future
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(runs, "_write_new", failing_write)
    monkeypatch.setattr(trainer, "evaluate_epoch", evaluate)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    if failure == "enospc":
        with pytest.raises(RunWriteError) as info:
            train(propdsl.load(SPEC), opts(run))
        assert str(info.value) == (
            f"cannot write epoch 2 to {run}: No space left on device; the run keeps epoch 1 "
            "(fix the cause, then resume)"
        )
        assert info.value.epoch == 1
    else:
        with pytest.raises(RuntimeError, match="a bug in the commit"):
            train(propdsl.load(SPEC), opts(run))
    assert count["steps"] == 2  # stopped after the failure's batch; epoch 3 has 5 or more
    assert count["evaluations"] == 2
    assert not commit_threads()
    assert assert_committed_set(run) == 1
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    train(propdsl.load(SPEC), opts(run, resume=True))
    assert_equals_reference(run, reference)


def test_best_is_a_hard_link_to_last_and_keeps_its_bytes_when_last_moves_on(
    tmp_path, monkeypatch, reference
):
    """Epochs 1 and 2 improve: best.* are the same files as last.* (hard links, no second copy);
    epoch 3 does not: last.* are new files and best.* keep epoch 2's bytes. Where the file system
    refuses hard links, best.* are written as copies, with the same content."""
    run = tmp_path / "run"
    train(propdsl.load(SPEC), opts(run, epochs=2))
    for ext in ("safetensors", "json"):
        last, best = os.stat(run / f"last.{ext}"), os.stat(run / f"best.{ext}")
        assert (last.st_ino, last.st_dev) == (best.st_ino, best.st_dev) and best.st_nlink == 2
    before = (run / "best.safetensors").read_bytes()
    train(propdsl.load(SPEC), opts(run, resume=True, epochs=3))
    assert (run / "best.safetensors").read_bytes() == before
    assert os.stat(run / "best.safetensors").st_nlink == 1
    assert not os.path.samefile(run / "last.safetensors", run / "best.safetensors")
    assert_equals_reference(run, reference)

    def no_links(*args, **kwargs):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    copied = tmp_path / "copied"
    train(propdsl.load(SPEC), opts(copied, epochs=2))
    assert not os.path.samefile(copied / "last.safetensors", copied / "best.safetensors")
    assert os.stat(copied / "best.safetensors").st_nlink == 1
    assert same_weights(copied / "best.safetensors", copied / "last.safetensors")
    assert assert_committed_set(copied) == 2
    train(propdsl.load(SPEC), opts(copied, resume=True, epochs=3))
    assert_equals_reference(copied, reference)


def test_metrics_files_serialise_each_row_once_with_the_same_bytes():
    table = runs.MetricsFiles()
    rows_so_far: list[dict] = []
    for row in (
        {"epoch": 1, "loss": 0.5, "val_accuracy": None},
        {"epoch": 2, "loss": 0.25, "val_accuracy": 0.5},
        {"epoch": 3, "loss": 0.125, "val_accuracy": 0.75, "w": 1.5},  # a new column
        {"epoch": 4, "loss": "a,b", "val_accuracy": 1.0},  # quoted, and w missing
    ):
        rows_so_far.append(row)
        assert table.add(row) == runs.metrics_files(rows_so_far)
    resumed = runs.MetricsFiles(rows_so_far[:2])
    assert resumed.add(rows_so_far[2]) == runs.metrics_files(rows_so_far[:3])
    csv_text = runs.metrics_files(rows_so_far)[runs.METRICS_CSV].decode()
    assert csv_text.splitlines() == [
        "epoch,loss,val_accuracy,w",
        "1,0.5,,",
        "2,0.25,0.5,",
        "3,0.125,0.75,1.5",
        '4,"a,b",1.0,',
    ]


# -- the lock ------------------------------------------------------------------------------------
@FORK
def test_a_second_training_into_a_busy_folder_fails_fast_naming_the_holder(tmp_path, reference):
    path = spec_file(tmp_path)
    run = tmp_path / "run"
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def first():
        def pause(row):
            if row["epoch"] == 1:
                os.write(ready_w, b"1")
                os.read(go_r, 1)  # hold the folder until the second training was refused

        train(propdsl.load(path), opts(run), on_epoch=pause)

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            first()
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    try:
        assert os.read(ready_r, 1) == b"1"
        second = cli_run("train", str(path), "--out", str(run), "--seed", "3", "--force", "-q")
        refused = cli_run("train", str(path), "--out", str(run), "--resume", "-q")
    finally:
        os.write(go_w, b"1")
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for result in (second, refused):
        assert result.exit_code == 2, result.output
        message = result.stderr
        assert message.startswith(f"error: {run} is in use: train by pid {pid} on ")
        assert "wait for it to finish" in message and "Traceback" not in result.output
    # the first training's files are its own, complete and consistent
    assert json.loads((run / "config.json").read_text())["seed"] == 0
    assert assert_committed_set(run) == 3
    assert_equals_reference(run, reference)


def test_readers_share_the_lock_and_exclude_a_writer(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with runs.locked(run, "eval", shared=True), runs.locked(run, "verify", shared=True):
        with pytest.raises(RunInUse, match="reading it"):
            with runs.locked(run, "train"):
                pass
    with runs.locked(run, "train"):
        holder = json.loads((run / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["purpose"] == "train"
        with pytest.raises(RunInUse, match=rf"train by pid {os.getpid()}"):
            with runs.locked(run, "eval", shared=True):
                pass
    assert (run / ".lock").read_text() == ""  # the record names a current holder only
    with runs.locked(run, "train"):  # released
        pass


@FORK
def test_the_lock_of_a_killed_process_is_free(tmp_path):
    run = tmp_path / "run"
    run.mkdir()

    def hold_and_die():
        with runs.locked(run, "train"):
            os._exit(137)

    assert in_child(hold_and_die) == 137
    with runs.locked(run, "train"):
        pass


def test_a_folder_another_tool_wrote_is_refused_untouched(tmp_path):
    path = spec_file(tmp_path)
    folder = tmp_path / "webapp"
    folder.mkdir()
    files = {"config.json": '{"name": "webapp", "port": 8080}\n', "metrics.csv": "a,b\n1,2\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    result = cli_run("train", str(path), "--out", str(folder), "-q")
    assert result.exit_code == 2, result.output
    assert f"{folder} is not a propdsl run folder" in result.stderr
    assert "config.json, metrics.csv" in result.stderr
    assert {p.name: p.read_text() for p in folder.iterdir()} == files


# -- temporaries and symlinks --------------------------------------------------------------------
def test_planted_symlinks_never_redirect_a_write(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    run = tmp_path / "run"
    train(propdsl.load(SPEC), opts(run, epochs=1))
    # the fixed temporary names of earlier versions, the run's own names, and the lock
    for name in ("config.json.tmp", "metrics.csv.tmp", "last.safetensors.tmp", "spec.prop"):
        (run / name).unlink(missing_ok=True)
        (run / name).symlink_to(outside)
    train(propdsl.load(SPEC), opts(run, epochs=2))
    assert outside.read_text() == "keep me"
    assert not (run / "spec.prop").is_symlink()
    assert (run / "spec.prop").read_text() == SPEC

    (run / ".lock").unlink()
    (run / ".lock").symlink_to(outside)
    with pytest.raises(RunFolderError, match="cannot lock"):
        train(propdsl.load(SPEC), opts(run, epochs=3, resume=True))
    assert outside.read_text() == "keep me"


class _Names:
    """Stands for `runs._NAMES`: hands out the given 12-hex-digit random parts in turn."""

    def __init__(self, *tokens: str):
        self.tokens = iter(tokens)
        self.drawn = 0

    def getrandbits(self, k: int) -> int:
        assert k == 48
        self.drawn += 1
        return int(next(self.tokens), 16)


def test_temporary_names_are_the_pattern_stray_ones_are_removed_by():
    names = {runs._temp_name("last.safetensors") for _ in range(200)}
    assert len(names) == 200
    assert all(runs._TEMP.match(n)["name"] == "last.safetensors" for n in names)


def test_a_temporary_name_already_taken_is_never_opened(tmp_path, monkeypatch):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".config.json.aaaaaaaaaaaa.tmp").symlink_to(outside)
    names = _Names("aaaaaaaaaaaa", "bbbbbbbbbbbb")
    monkeypatch.setattr(runs, "_NAMES", names)
    runs.write_json(folder / "config.json", {"a": 1})
    assert json.loads((folder / "config.json").read_text()) == {"a": 1}
    assert outside.read_text() == "keep me"
    assert names.drawn == 2  # the planted name was drawn first, and skipped
    monkeypatch.undo()
    (folder / "plot.png").symlink_to(outside)  # a reader's result file, planted as a symlink
    runs.write_bytes(folder / "plot.png", b"png")
    assert (folder / "plot.png").read_bytes() == b"png" and outside.read_text() == "keep me"
    # best as a hard link to last's temporary: a name taken by a planted symlink is skipped
    (folder / ".best.safetensors.aaaaaaaaaaaa.tmp").symlink_to(outside)
    names = _Names("cccccccccccc", "aaaaaaaaaaaa", "bbbbbbbbbbbb", "dddddddddddd")
    monkeypatch.setattr(runs, "_NAMES", names)
    weights = b"weights"
    runs.commit_epoch(folder, 1, {"last.safetensors": weights, "best.safetensors": weights})
    assert outside.read_text() == "keep me"
    assert names.drawn == 4
    assert (folder / "best.safetensors").read_bytes() == weights
    assert os.path.samefile(folder / "best.safetensors", folder / "last.safetensors")
    assert runs.verify(folder, runs.read_manifest(folder)) == []


# -- a run folder never runs code ----------------------------------------------------------------
PAYLOAD = """\
from pathlib import Path
Path({marker!r}).write_text("ran")


def make(input_shape, num_classes):
    raise SystemExit("never")
"""


def _plant_payload(tmp_path: Path, run: Path) -> Path:
    marker = tmp_path / "PWNED"
    (tmp_path / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    config = json.loads((run / "config.json").read_text())
    config["model"]["user"] = f"{tmp_path / 'payload.py'}:make"
    runs.write_json(run / "config.json", config)
    return marker


def test_a_run_folder_naming_code_never_runs_it(tmp_path, monkeypatch):
    path = spec_file(tmp_path)
    run = tmp_path / "run"
    train(propdsl.load(path), opts(run, epochs=1))
    marker = _plant_payload(tmp_path, run)
    monkeypatch.chdir(tmp_path)

    evaluated = cli_run("eval", str(path), "--run", str(run), "--samples", "4", "--no-plots")
    assert evaluated.exit_code == 2, evaluated.output
    assert "never runs code" in evaluated.stderr and "--model" in evaluated.stderr
    with pytest.raises(RunFolderError, match="never runs code"):
        Run.open(run).load_model()
    resumed = cli_run("train", str(path), "--out", str(run), "--resume", "--epochs", "2", "-q")
    assert resumed.exit_code == 2, resumed.output
    assert "never runs code" in resumed.stderr
    assert not marker.exists()

    # a --model that is not the run's model is refused before anything is imported
    other = tmp_path / "other.py"
    other.write_text(PAYLOAD.format(marker=str(marker)))
    with pytest.raises(RunFolderError, match="is not the model"):
        Run.open(run).load_model(model_ref=f"{other}:make")
    assert not marker.exists()


def test_a_zoo_run_refuses_a_model_reference(tmp_path):
    run = tmp_path / "run"
    train(propdsl.load(SPEC), opts(run, epochs=1))
    with pytest.raises(RunFolderError, match="zoo model 'mlp'"):
        Run.open(run).load_model(model_ref="torch.nn:Identity")


# -- damaged and hand-edited files: exit 2, never 70 ---------------------------------------------
class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _rehash(run: Path, name: str) -> None:
    """Edit the manifest as an attacker would, so only the content checks remain."""
    manifest = json.loads((run / runs.MANIFEST).read_text())
    manifest["files"][name] = runs.sha256((run / name).read_bytes())
    (run / runs.MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture
def trained(tmp_path) -> tuple[Path, Path]:
    path = spec_file(tmp_path)
    run = tmp_path / "run"
    train(propdsl.load(path), opts(run, epochs=1))
    return path, run


def _resume(path: Path, run: Path):
    return cli_run("train", str(path), "--out", str(run), "--resume", "--epochs", "2", "-q")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (pickle.dumps(Exploit()), "damaged or is not a propdsl optimizer state"),
        (b"PK\x03\x04 truncated", "damaged or is not a propdsl optimizer state"),
        (b"", "damaged or is not a propdsl optimizer state"),
    ],
    ids=["malicious", "truncated", "empty"],
)
def test_a_bad_state_file_is_refused_without_running_it(
    trained, tmp_path, monkeypatch, content, message
):
    path, run = trained
    monkeypatch.chdir(tmp_path)
    (run / "last.state.pt").write_bytes(content)
    result = _resume(path, run)
    assert result.exit_code == 2, result.output
    assert "last.state.pt differ from checkpoint.json" in result.stderr
    _rehash(run, "last.state.pt")
    result = _resume(path, run)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "weights_only" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "PWNED").exists()


def test_a_state_from_another_optimizer_is_refused(trained):
    path, run = trained
    state = torch.load(run / "last.state.pt", weights_only=True)
    state["optimizer"]["param_groups"] = []
    (run / "last.state.pt").write_bytes(runs.state_bytes(state))
    _rehash(run, "last.state.pt")
    result = _resume(path, run)
    assert result.exit_code == 2 and "does not fit this optimizer" in result.stderr


@pytest.mark.parametrize("epoch", [-3, 0, 10**6, 1.5, "1"])
def test_a_hand_edited_epoch_is_refused(trained, epoch):
    path, run = trained
    state = torch.load(run / "last.state.pt", weights_only=True)
    state["epoch"] = epoch
    (run / "last.state.pt").write_bytes(runs.state_bytes(state))
    _rehash(run, "last.state.pt")
    result = _resume(path, run)
    assert result.exit_code == 2, result.output
    assert (
        "last.state.pt epoch" in result.stderr and "checkpoint.json says epoch 1" in result.stderr
    )

    manifest = json.loads((run / runs.MANIFEST).read_text())
    manifest["epoch"] = epoch
    (run / runs.MANIFEST).write_text(json.dumps(manifest))
    result = _resume(path, run)
    assert result.exit_code == 2, result.output
    assert "checkpoint.json" in result.stderr and "Traceback" not in result.output


def test_edited_metrics_are_refused_and_a_resaved_csv_is_rewritten(trained, reference):
    path, run = trained
    (run / "metrics.csv").write_text("epoch\n1\n")  # a spreadsheet saved it
    result = cli_run("train", str(path), "--out", str(run), "--resume", "--epochs", "3", "-q")
    assert result.exit_code == 0, result.output
    assert_equals_reference(run, reference)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:1]) + "\n")
    _rehash(run, "metrics.jsonl")
    result = cli_run("train", str(path), "--out", str(run), "--resume", "--epochs", "4", "-q")
    assert result.exit_code == 2 and "one row for each of epochs 1..3" in result.stderr


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("best.safetensors", b"garbage", "not a valid safetensors file"),
        ("best.safetensors", None, "not a valid safetensors file"),  # cut in half
        ("config.json", b"[]", "is not a JSON object"),
        ("config.json", b"{", "is not valid JSON"),
        ("config.json", b'{"model": 5}', "no 'model' object"),
        (
            "config.json",
            b'{"model": {"name": "mlp", "input_shape": [-1], "num_classes": 10}}',
            "input_shape",
        ),
        (
            "config.json",
            b'{"model": {"name": "nope", "input_shape": [1, 8, 8], "num_classes": 10}}',
            "its model cannot be built",
        ),
        ("best.json", b"[1]", "not a JSON object"),
    ],  # fmt: skip
)
def test_damaged_files_are_usage_errors_for_eval(trained, name, content, message):
    path, run = trained
    (run / runs.MANIFEST).unlink()  # as a hand-made run folder: only the content checks
    if content is None:
        data = (run / name).read_bytes()
        content = data[: len(data) // 2]
    (run / name).write_bytes(content)
    result = cli_run("eval", str(path), "--run", str(run), "--samples", "4", "--no-plots")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_a_damaged_checkpoint_is_caught_by_its_digest(trained):
    path, run = trained
    data = bytearray((run / "best.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight: still a valid safetensors file
    (run / "best.safetensors").write_bytes(bytes(data))
    result = cli_run("eval", str(path), "--run", str(run), "--samples", "4", "--no-plots")
    assert result.exit_code == 2, result.output
    assert "does not match" in result.stderr and "checkpoint.json" in result.stderr


def test_an_older_folder_without_a_manifest_is_not_resumed(trained):
    path, run = trained
    (run / runs.MANIFEST).unlink()
    result = _resume(path, run)
    assert result.exit_code == 2 and "no checkpoint.json" in result.stderr


def _evil_npz(tmp_path: Path) -> Path:
    x = np.empty(40, dtype=object)
    x[:] = [Exploit()] * 40
    np.savez(tmp_path / "evil.npz", x=x, y=np.arange(40) % 10)  # object arrays are pickled
    text = SPEC.replace('digits(split = "train", limit = 100)', 'tensors(path = "evil.npz")')
    return spec_file(tmp_path, text)


def test_an_npz_with_a_pickle_inside_never_runs_it(tmp_path, monkeypatch):
    # Object arrays are pickled inside the npz: the reader refuses them before any unpickling,
    # as a data error (exit 1) that names the array.
    monkeypatch.chdir(tmp_path)
    result = cli_run("train", str(_evil_npz(tmp_path)), "--out", str(tmp_path / "run"), "-q")
    assert result.exit_code == 1, result.output
    assert "'x' holds Python objects" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "PWNED").exists()


def test_changed_training_data_are_refused_on_resume(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.random((40, 1, 8, 8)).astype(np.float32), np.arange(40) % 10
    np.savez(tmp_path / "data.npz", x=x, y=y)
    text = SPEC.replace('digits(split = "train", limit = 100)', 'tensors(path = "data.npz")')
    path = spec_file(tmp_path, text)
    run = tmp_path / "run"
    assert cli_run("train", str(path), "--out", str(run), "--epochs", "1", "-q").exit_code == 0
    x[3, 0, 2, 2] += 0.5
    np.savez(tmp_path / "data.npz", x=x, y=y)
    result = cli_run("train", str(path), "--out", str(run), "--resume", "--epochs", "2", "-q")
    assert result.exit_code == 2, result.output
    assert "its training data differs" in result.stderr


def test_symlink_loops_are_usage_errors(tmp_path):
    path = spec_file(tmp_path)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    result = cli_run("train", str(path), "--out", str(tmp_path / "a" / "run"), "-q")
    assert result.exit_code == 2, result.output
    assert "Too many levels of symbolic links" in result.stderr
    result = cli_run("train", str(path), "--out", str(tmp_path / "a"), "-q", "--resume")
    assert result.exit_code == 2, result.output
    result = cli_run("eval", str(path), "--run", str(tmp_path / "a"), "--no-plots")
    assert result.exit_code == 2 and "no such run folder" in result.stderr


# -- threads -------------------------------------------------------------------------------------
def test_threads_out_of_range_are_refused_before_torch_sees_them(tmp_path):
    path = spec_file(tmp_path)
    result = cli_run("train", str(path), "--out", str(tmp_path / "run"), "--threads", "100000")
    assert result.exit_code == 2 and "1024" in result.output and "Traceback" not in result.output
    for bad in (0, MAX_THREADS + 1, 100_000, -1):
        with pytest.raises(propdsl.UsageError, match="between 1 and 1024"):
            set_threads(bad)
    assert set_threads(MAX_THREADS) == MAX_THREADS
    set_threads(1)


@pytest.mark.slow  # a fresh interpreter: a few seconds of imports
def test_threads_in_a_spec_beyond_the_range_never_crash(tmp_path):
    text = SPEC.replace("epochs    = 3", "epochs    = 1\n  threads   = 100000")
    path = spec_file(tmp_path, text)
    done = subprocess.run(
        [sys.executable, "-c", "from propdsl.cli import main; main()", "train", str(path)]
        + ["--out", str(tmp_path / "r"), "-q"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(propdsl.__file__).parents[1])},
    )
    assert done.returncode in (1, 2), (done.returncode, done.stderr)  # spec or usage error
    assert "100000" in done.stderr and "Traceback" not in done.stderr


# -- exploding weights ---------------------------------------------------------------------------
def test_exploded_weights_never_become_a_checkpoint(tmp_path):
    # one batch per epoch: every batch loss is finite (it is taken before the step), and only
    # the check of the weights at the epoch's end sees the explosion
    text = SPEC.replace("adam(lr = 0.03)", "adam(lr = 1e36)").replace(
        "batch     = 20", "batch = 500"
    )
    path = spec_file(tmp_path, text)
    run = tmp_path / "run"
    result = cli_run("train", str(path), "--out", str(run), "-q")
    assert result.exit_code == 1, result.output
    assert "the weights after epoch 1 exploded (|w| reaches" in result.stderr
    assert "no epoch had finished" in result.stderr
    assert not (run / "last.safetensors").exists() and not (run / "best.safetensors").exists()


def test_weights_problem_checks_finiteness_and_size():
    from torch import nn

    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    assert weights_problem(net) is None
    with torch.no_grad():
        net[0].weight[0, 0] = 2e6
    assert "exploded (|w| reaches 2e+06 in '0.weight'" in weights_problem(net)
    with torch.no_grad():
        net[0].weight[0, 0] = 0.5
        net[1].running_var[1] = math.inf  # a buffer: not trained, but saved
    assert "are not finite ('1.running_var'" in weights_problem(net)
    with torch.no_grad():
        net[1].running_var[1] = 5e6  # a buffer may be large, only not NaN or infinite
    assert weights_problem(net) is None
    with torch.no_grad():
        net[0].bias[1] = math.nan
    assert "are not finite ('0.bias'" in weights_problem(net)
    half = nn.Sequential(nn.Linear(3, 2)).to(torch.float16)  # not float32
    assert weights_problem(half) is None
    with torch.no_grad():
        half[0].weight[1, 1] = -math.inf
    assert "are not finite ('0.weight'" in weights_problem(half)


def test_an_epoch_with_nan_weights_keeps_the_one_before(tmp_path, monkeypatch):
    """NaN weights after the last step of epoch 3: no batch loss saw them, the weights check
    does, and epoch 2 stays the last checkpoint."""
    run = tmp_path / "run"
    real = torch.optim.Adam.step
    steps: list[int] = []  # optimizer steps so far, at the end of each epoch
    count = {"n": 0}

    def poisoned_step(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count["n"] += 1
        if len(steps) == 2 and count["n"] == 3 * steps[0]:
            with torch.no_grad():
                self.param_groups[0]["params"][0][0, 0] = math.nan
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned_step)
    with pytest.raises(TrainingDiverged, match="after epoch 3 are not finite") as info:
        train(propdsl.load(SPEC), opts(run), on_epoch=lambda row: steps.append(count["n"]))
    assert "the checkpoint of epoch 2 is kept" in str(info.value)
    assert assert_committed_set(run) == 2
    saved = load_file(str(run / "last.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


# -- the Ctrl-C hint -----------------------------------------------------------------------------
def test_the_interrupt_hint_is_an_exact_command(tmp_path, monkeypatch, reference):
    """Interrupted after epoch 1 of `--epochs 2` (the block says 3): the printed command
    continues to epoch 2 exactly; interrupted before the first epoch ended, the printed command
    starts it again with the same settings."""
    path = spec_file(tmp_path, SPEC.replace("epochs    = 3", "epochs    = 5"))
    import propdsl.train as trainer

    real = trainer.evaluate_epoch
    calls = {"n": 0, "stop": 2}

    def interrupt_at_evaluation(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["stop"]:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate_epoch", interrupt_at_evaluation)
    run = tmp_path / "run"
    args = ("train", str(path), "--out", str(run), "--epochs", "3", "--threads", "1", "-q")
    stopped = cli_run(*args)
    assert stopped.exit_code == 130, stopped.output
    first, command = stopped.stderr.splitlines()
    assert first == f"interrupted; {run} keeps epoch 1: continue with"
    assert command == f"  propdsl train {path} --out {run} --resume"
    resumed = cli_run(*shlex.split(command)[1:])
    assert resumed.exit_code == 0, resumed.output
    assert_equals_reference(run, reference)  # 3 epochs, not the block's 5

    calls.update(n=0, stop=1)
    fresh = tmp_path / "fresh"
    stopped = cli_run("train", str(path), "--out", str(fresh), "--epochs", "3", "-q")
    assert stopped.exit_code == 130
    assert stopped.stderr.startswith(
        f"interrupted before the first epoch finished; {fresh} holds no checkpoint yet"
    )
    command = stopped.stderr.splitlines()[-1]
    assert command == f"  propdsl train {path} --out {fresh} --resume"
    calls.update(stop=0)
    resumed = cli_run(*shlex.split(command)[1:])
    assert resumed.exit_code == 0, resumed.output
    assert_equals_reference(fresh, reference)


def test_an_interrupt_before_the_run_starts_says_nothing_was_written(tmp_path, monkeypatch):
    path = spec_file(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("propdsl.train.load_split", interrupted)
    run = tmp_path / "run"
    result = cli_run("train", str(path), "--out", str(run), "-q")
    assert result.exit_code == 130
    assert result.stderr.startswith(f"interrupted before the run started; {run} holds nothing")
    assert "--resume" not in result.stderr and not run.exists()


def test_sigterm_stops_a_run_between_commits(tmp_path, reference):
    run = tmp_path / "run"

    def terminate(row):
        if row["epoch"] == 2:
            # the handler runs in the main thread at the next bytecode, as a real SIGTERM would
            threading.Thread(target=os.kill, args=(os.getpid(), 15)).start()
            threading.Event().wait(1.0)

    with pytest.raises(TrainingInterrupted) as info:
        train(propdsl.load(SPEC), opts(run), on_epoch=terminate)
    assert info.value.epoch == 2 and info.value.started
    train(propdsl.load(SPEC), opts(run, resume=True))
    assert_equals_reference(run, reference)


def test_resume_remembers_the_runs_settings(tmp_path, reference):
    run = tmp_path / "run"
    path = spec_file(tmp_path, SPEC.replace("epochs    = 3", "epochs    = 9"))
    args = ("train", str(path), "--out", str(run), "--epochs", "1", "--threads", "1", "-q")
    assert cli_run(*args).exit_code == 0
    config = json.loads((run / "config.json").read_text())
    assert (config["epochs"], config["threads"], config["device"]) == (1, 1, "cpu")
    # the run is complete at its own epoch count: resuming trains nothing
    assert cli_run("train", str(path), "--out", str(run), "--resume", "-q").exit_code == 0
    assert [r["epoch"] for r in rows(run)] == [1]
    # a larger --epochs trains on, to the weights of training at once
    done = cli_run("train", str(path), "--out", str(run), "--resume", "--epochs", "3", "-q")
    assert done.exit_code == 0, done.output
    assert_equals_reference(run, reference)
    fewer = cli_run("train", str(path), "--out", str(run), "--resume", "--epochs", "2", "-q")
    assert fewer.exit_code == 2 and "already trained 3 epochs" in fewer.stderr


def test_resume_keeps_the_params_the_run_started_with(tmp_path):
    path = spec_file(tmp_path)
    run = tmp_path / "run"
    args = ("train", str(path), "--out", str(run), "--threads", "1", "-q")
    assert cli_run(*args, "-p", "eps=0.05", "--epochs", "1").exit_code == 0
    resumed = cli_run(*args, "--resume", "--epochs", "2")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((run / "config.json").read_text())["params"] == {"eps": 0.05}
    assert [r["epoch"] for r in rows(run)] == [1, 2]
    other = cli_run(*args, "--resume", "--epochs", "3", "-p", "eps=0.1")
    assert other.exit_code == 2 and "its params differ from" in other.stderr


def test_a_seed_beyond_the_generators_range_is_a_usage_error(tmp_path):
    path = spec_file(tmp_path)
    result = cli_run("train", str(path), "--out", str(tmp_path / "run"), "--seed", str(2**60))
    assert result.exit_code == 2 and "Traceback" not in result.output
    with pytest.raises(propdsl.UsageError, match="seed must be a whole number between 0 and"):
        train(propdsl.load(SPEC), opts(tmp_path / "api", seed=2**60))


def test_a_fresh_training_never_replaces_a_run_without_force(tmp_path):
    # A second `train` into a run folder used to replace the run after a log line; now it is
    # refused (exit 2, nothing changed) unless --force, which also drops the replaced run's
    # eval / verify results (they belong to its weights).
    path = spec_file(tmp_path)
    run = tmp_path / "run"
    assert cli_run("train", str(path), "--out", str(run), "--epochs", "1", "-q").exit_code == 0
    done = cli_run("eval", str(path), "--run", str(run), "--samples", "4", "--no-plots", "-q")
    assert done.exit_code == 0, done.output
    assert (run / "eval").is_dir() and (run / "eval.json").exists()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    again = cli_run("train", str(path), "--out", str(run), "--epochs", "2", "-q")
    assert again.exit_code == 2, again.output
    assert "holds a run (epoch 1 of 1" in again.stderr and "--force" in again.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    both = cli_run("train", str(path), "--out", str(run), "--resume", "--force", "-q")
    assert both.exit_code == 2 and "use one" in both.stderr
    forced = cli_run("train", str(path), "--out", str(run), "--epochs", "2", "--force", "-q")
    assert forced.exit_code == 0, forced.output
    assert runs.read_manifest(run).epoch == 2
    assert not (run / "eval").exists() and not (run / "eval.json").exists()


@pytest.mark.parametrize("command", ["eval", "verify", "export"])
def test_readers_of_a_run_fail_fast_while_a_training_holds_it(trained, command, tmp_path):
    path, run = trained
    args = [command, str(path), "--run", str(run), "--samples", "2"]
    args += [str(tmp_path / "out")] if command == "export" else []
    with runs.locked(run, "train"):  # what a training holds for its whole run
        result = cli_run(*args)
    assert result.exit_code == 2, result.output
    assert "in use" in result.stderr and not (run / "eval").exists()


def test_results_are_never_written_through_a_planted_symlink(trained, tmp_path):
    path, run = trained
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "eval").symlink_to(outside, target_is_directory=True)
    result = cli_run("eval", str(path), "--run", str(run), "--samples", "2", "--no-plots")
    assert result.exit_code == 2, result.output
    assert "symlink" in result.stderr and list(outside.iterdir()) == []
