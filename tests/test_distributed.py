"""Distributed training, evaluation and verification (propdsl.distributed, docs/distributed.md).

The fast tests check the pieces without a process group: the shards partition a batch, and a
draw inside a sharded batch is the whole batch's draw restricted to the rank's rows (for every
kind of region the attacks start in, and for SmoothGrad's noise), which is what makes a rank's
attack starts those of one process. The slow tests start two CPU processes (gloo, one thread
each, tiny MLPs on a few digits) with torchrun or `--nproc 2` and compare with one process:
gradients of a step, weights after a resumed run, eval / verify JSON, a NaN on one rank, a rank
killed mid-epoch. The NCCL tests need two GPUs and skip without them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import propdsl
from propdsl import distributed, runs
from propdsl.cli import _without_nproc
from propdsl.region import Region
from propdsl.session import build_from_config
from propdsl.train import TrainOptions, train

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_distributed_worker.py"

SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = {eps}

property robust(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1):
    argmax(f(x')) == y

train f on digits(split = "train", limit = {limit}) {{
  model     = mlp(hidden = [16])
  epochs    = {epochs}
  batch     = {batch}
  seed      = 3
  optimizer = sgd(lr = {lr})
  attack    = pgd(steps = 3, restarts = 2)
  loss      = {loss}
}}
"""


def _spec(tmp_path: Path, name: str, **kw) -> Path:
    values = dict(eps=0.05, limit=41, epochs=1, batch=64, lr=1.0, loss="cross_entropy")
    values.update(kw)
    path = tmp_path / f"{name}.prop"
    path.write_text(SPEC.format(**values))
    return path


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _torchrun(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    # `--`: torchrun's parser would take `--run` for its own (abbreviated) --run-path
    command += ["--nproc-per-node", "2", "--", str(WORKER), *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT
    )


def _propdsl(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "propdsl", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT
    )


# -- without a process group ---------------------------------------------------------------------


@pytest.mark.parametrize("n", range(0, 12))
@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_shards_partition_a_batch_in_order(n, size):
    parts = [distributed.shard_range(n, r, size) for r in range(size)]
    assert [i for lo, hi in parts for i in range(lo, hi)] == list(range(n))
    sizes = [hi - lo for lo, hi in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # the first ranks take the larger parts


def test_one_process_is_the_identity():
    assert not distributed.active()
    assert (distributed.rank(), distributed.world(), distributed.is_main()) == (0, 1, True)
    assert distributed.gather([1, 2]) == [1, 2]
    assert list(distributed.shard(range(5))) == list(range(5))
    assert distributed.from_main(lambda: 7) == 7
    with distributed.sharded_batch(5) as part:
        assert (part.lo, part.hi, part.sharded, part.weight) == (0, 5, False, 1.0)
    with pytest.raises(OSError, match="full disk"):
        distributed.from_main(lambda: (_ for _ in ()).throw(OSError("full disk")))


def test_backend_by_device():
    assert distributed.backend(cuda=False) == "gloo"
    assert distributed.backend(cuda=True) == "cpu:gloo,cuda:nccl"


def test_more_processes_than_gpus_is_a_usage_error(monkeypatch):
    from propdsl.errors import UsageError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="2 processes on this machine but 1 GPU"):
        distributed.local_device()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.local_device() == torch.device("cuda", 1)


def test_draw_keeps_the_rows_of_the_whole_batch():
    def whole(fn, shape, *args, **kw):
        return fn(*args, shape, generator=torch.Generator().manual_seed(5), **kw)

    with distributed.global_draws(7, 4, 3):
        gen = torch.Generator().manual_seed(5)
        got = distributed.draw(torch.rand, (3, 2), generator=gen)
        assert torch.equal(got, whole(torch.rand, (7, 2))[4:7])
        gen = torch.Generator().manual_seed(5)
        got = distributed.draw(torch.randint, (3, 4), 0, 9, generator=gen)
        assert torch.equal(got, whole(torch.randint, (7, 4), 0, 9)[4:7])
        gen = torch.Generator().manual_seed(5)
        got = distributed.draw(torch.randn, (2, 3, 5), batch_dim=1, generator=gen)
        assert torch.equal(got, whole(torch.randn, (2, 7, 5))[:, 4:7])
        # another batch size (not this rank's part): a plain draw
        gen = torch.Generator().manual_seed(5)
        got = distributed.draw(torch.rand, (6, 2), generator=gen)
        assert torch.equal(got, whole(torch.rand, (6, 2)))
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(
        distributed.draw(torch.rand, (3, 2), generator=gen), whole(torch.rand, (3, 2))
    )


@pytest.mark.parametrize("kind", ["inf", "2", "1", "box"])
def test_random_starts_do_not_depend_on_the_rank(kind):
    """Each rank's random attack starts are the rows of one process's: the same points for the
    same samples, whatever the split (here 7 samples as 3 + 2 + 2)."""
    centre = torch.rand(7, 1, 3, 3, generator=torch.Generator().manual_seed(0))

    def region(c):
        if kind == "box":
            return Region.box(c - 0.1, c + 0.2)
        return Region.ball(c, 0.3, float(kind), lo=0.0, hi=1.0)

    one = region(centre).sample(torch.Generator().manual_seed(1))
    parts = []
    for r in range(3):
        lo, hi = distributed.shard_range(7, r, 3)
        with distributed.global_draws(7, lo, hi - lo):
            parts.append(region(centre[lo:hi]).sample(torch.Generator().manual_seed(1)))
    assert torch.equal(torch.cat(parts), one)
    # and a plain draw of a part would differ: the test can fail
    plain = region(centre[3:5]).sample(torch.Generator().manual_seed(1))
    assert not torch.equal(plain, one[3:5])


def test_smoothgrad_noise_does_not_depend_on_the_rank():
    from propdsl.explain import smoothgrad

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    one = smoothgrad(model, x, y, samples=4, generator=torch.Generator().manual_seed(2))
    with distributed.global_draws(5, 3, 2):
        part = smoothgrad(
            model, x[3:], y[3:], samples=4, generator=torch.Generator().manual_seed(2)
        )
    torch.testing.assert_close(part, one[3:], rtol=0, atol=1e-6)


def test_nproc_is_taken_out_of_the_command_line():
    assert _without_nproc(["train", "s.prop", "--nproc", "2", "-q"]) == ["train", "s.prop", "-q"]
    assert _without_nproc(["train", "--nproc=4", "s.prop"]) == ["train", "s.prop"]


def test_nproc_under_torchrun_is_a_usage_error(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from propdsl.cli import app

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(distributed, "env_world", lambda: 2)
    result = CliRunner().invoke(app, ["train", str(_spec(tmp_path, "s")), "--nproc", "2"])
    assert result.exit_code == 2
    assert "do not combine it with torchrun" in result.output


# -- two processes (gloo) ------------------------------------------------------------------------


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def _initial(run: Path) -> dict[str, torch.Tensor]:
    config = json.loads((run / "config.json").read_text())
    return build_from_config(config["model"], config["seed"]).state_dict()


@pytest.mark.slow
def test_a_step_split_over_two_ranks_has_the_gradients_of_one_process(tmp_path):
    """One SGD step (lr 1) over the whole global batch: w0 - w1 is the gradient. 41 samples are
    split 21 + 20; the PGD loss draws its random starts per sample (two restarts). A third run
    takes 6 steps of 8, 8, 8, 8, 8 and 1 samples: the last batch is too small to split."""
    specs = [
        _spec(tmp_path, "standard"),
        _spec(tmp_path, "pgd", loss="cross_entropy + robust"),
        _spec(tmp_path, "steps", loss="cross_entropy + robust", batch=8, lr=0.1),
    ]
    done = _torchrun("train", str(tmp_path / "two"), *map(str, specs))
    assert done.returncode == 0, done.stderr[-3000:]
    grads = []
    for i, spec_file in enumerate(specs):
        one = train(propdsl.load(spec_file), TrainOptions(out=tmp_path / f"one{i}", quiet=True))
        two = tmp_path / "two" / str(i)
        assert json.loads((two / "config.json").read_text())["processes"] == 2
        w0, w1, w2 = _initial(one.run), _weights(one.run), _weights(two)
        for k in w0:
            torch.testing.assert_close(w0[k] - w2[k], w0[k] - w1[k], rtol=0, atol=2e-6)
        grads.append(torch.cat([(w0[k] - w1[k]).flatten() for k in w0]))
        # the metrics mean what they mean in one process (loss and terms: batch means)
        rows1, rows2 = runs.read_metrics(one.run), runs.read_metrics(two)
        for key in rows1[0]:
            if key not in ("seconds", "train_seconds"):
                assert rows2[0][key] == pytest.approx(rows1[0][key], rel=1e-6, abs=1e-7), key
    assert grads[0].abs().max() > 1e-3  # a real step
    assert not torch.allclose(grads[0], grads[1], atol=1e-4)  # the attack term counted


@pytest.mark.slow
def test_a_resumed_two_process_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    spec = _spec(tmp_path, "s", loss="cross_entropy + robust", batch=8, lr=0.1, epochs=3)
    whole = _propdsl("train", str(spec), "--out", str(tmp_path / "whole"), "--nproc", "2", "-q")
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _propdsl(
        "train", str(spec), "--out", str(tmp_path / "cut"), "--epochs", "1", "--nproc", "2", "-q"
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert runs.read_manifest(tmp_path / "cut").epoch == 1
    rest = _propdsl(
        "train", str(spec), "--out", str(tmp_path / "cut"), "--resume", "--epochs", "3",
        "--nproc", "2", "-q",
    )  # fmt: skip
    assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = ("seconds", "train_seconds")
    rows = [
        [{k: v for k, v in r.items() if k not in drop} for r in runs.read_metrics(tmp_path / d)]
        for d in ("whole", "cut")
    ]
    assert rows[0] == rows[1] and len(rows[0]) == 3


@pytest.mark.slow
def test_eval_and_verify_shard_their_samples_and_give_the_json_of_one_process(tmp_path):
    spec = _spec(tmp_path, "s", eps=0.01, epochs=4, batch=16, lr=0.5, limit=200)
    result = train(propdsl.load(spec), TrainOptions(out=tmp_path / "run", quiet=True))
    run = result.run
    ev = ["eval", str(spec), "--run", str(run), "--samples", "37", "-q"]
    ve = ["verify", str(spec), "--run", str(run), "--samples", "37", "-q"]
    for command in (ev, ve):
        done = _propdsl(*command)
        assert done.returncode == 0, done.stderr[-3000:]
    one_eval = json.loads((run / "eval.json").read_text())
    one_verify = json.loads((run / "verify.json").read_text())
    npz = run / one_verify["results"] / "counterexamples" / "robust.npz"
    one_points = dict(np.load(npz))
    done = _torchrun("cli", *ev, "+", *ve)
    assert done.returncode == 0, done.stderr[-3000:]
    two_eval = json.loads((run / "eval.json").read_text())
    two_verify = json.loads((run / "verify.json").read_text())
    assert two_eval == one_eval
    for data in (one_verify, two_verify):
        for entry in data["properties"].values():
            entry.pop("seconds")
    assert two_verify == one_verify
    rates = one_verify["properties"]["robust"]["rates"]
    assert rates["verified"] > 0 and rates["falsified"] > 0  # both kinds of verdict compared
    two_points = dict(np.load(npz))
    assert one_points.keys() == two_points.keys()
    assert all(np.array_equal(one_points[k], two_points[k], equal_nan=True) for k in one_points)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_naming_the_term(tmp_path):
    model = tmp_path / "nan_model.py"
    model.write_text(
        "import os, torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        out = self.lin(x.flatten(1))\n"
        "        # on rank 1 alone, NaN from the second training-mode call: the robust term's\n"
        "        self.calls = getattr(self, 'calls', 0) + (1 if self.training else 0)\n"
        "        if os.environ.get('RANK') == '1' and self.calls >= 2:\n"
        "            out = out * float('nan')\n"
        "        return out\n"
        "def make(input_shape, num_classes):\n"
        "    return Net()\n"
    )
    spec = _spec(tmp_path, "s", batch=8, epochs=2, loss="cross_entropy + robust")
    out = tmp_path / "run"
    done = _propdsl(
        "train", str(spec), "--out", str(out), "--model", f"{model}:make", "--nproc", "2", "-q"
    )
    assert done.returncode == 1, done.stderr[-3000:]
    # every rank stops; rank 0 alone prints the message, which names the term NaN on rank 1
    found = re.findall(
        r"the term (.*) of the loss became NaN or infinite in epoch 1, batch 1", done.stderr
    )
    assert len(found) == 1, done.stderr[-3000:]
    assert found[0] == "'loss[robust]'"  # the cross-entropy, computed first, stayed finite
    assert "no epoch had finished" in done.stderr
    assert runs.read_manifest(out) is None


@pytest.mark.slow
def test_an_error_of_rank_0_stops_every_rank_with_its_message_once(tmp_path):
    """Only rank 0 touches the run folder: another training holds it, so rank 0 alone fails;
    the job ends with one process's exit code and message, printed once."""
    spec = _spec(tmp_path, "s")
    out = tmp_path / "run"
    out.mkdir()
    with runs.locked(out, "train"):
        one = _propdsl("train", str(spec), "--out", str(out), "-q")
        two = _propdsl("train", str(spec), "--out", str(out), "-q", "--nproc", "2")
    assert one.returncode not in (0, 70), one.stderr
    message = one.stderr.strip().splitlines()[-1]
    assert "in use" in message or "busy" in message or "lock" in message, message
    assert two.returncode == one.returncode, two.stderr[-3000:]
    assert two.stderr.count(message) == 1, two.stderr[-3000:]
    assert "Traceback" not in two.stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in environ:
        if item.startswith(b"RANK="):
            return item[5:].decode()
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_a_rank_killed_mid_epoch_ends_the_job_and_keeps_the_last_checkpoint(tmp_path):
    spec = _spec(tmp_path, "s", loss="cross_entropy + robust", batch=8, lr=0.1, epochs=500,
                 limit=400)  # fmt: skip
    out = tmp_path / "run"
    command = [sys.executable, "-m", "propdsl", "train", str(spec), "--out", str(out)]
    job = subprocess.Popen(
        [*command, "--nproc", "2", "-q"],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            manifest = runs.read_manifest(out) if (out / runs.MANIFEST).exists() else None
            if manifest is not None and manifest.epoch >= 1:
                break
            assert job.poll() is None, job.communicate()[1][-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the first epoch did not finish")
        victim = next(p for p in _children(job.pid) if _rank_of(p) == "1")
        os.kill(victim, signal.SIGKILL)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 1, stderr[-3000:]
    kept = runs.read_manifest(out)
    assert kept is not None and kept.epoch >= 1
    assert f"process rank 1 (pid {victim}) was killed by SIGKILL" in stderr, stderr[-1500:]
    assert f"{out} keeps epoch {kept.epoch}" in stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    # the last good checkpoint: every file matches the manifest, and it loads
    assert runs.verify(out, kept) == []
    config = json.loads((out / "config.json").read_text())
    model = build_from_config(config["model"], config["seed"])
    assert runs.load_weights(out, "last", model)["epoch"] == kept.epoch


# -- CUDA / NCCL ---------------------------------------------------------------------------------

two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two GPUs"
)


@two_gpus
@pytest.mark.slow
def test_nccl_step_has_the_gradients_of_one_process(tmp_path):
    text = _spec(tmp_path, "pgd", loss="cross_entropy + robust").read_text()
    spec = tmp_path / "cuda.prop"
    spec.write_text(text.replace("seed      = 3", 'seed      = 3\n  device    = "cuda"'))
    done = _torchrun("train", str(tmp_path / "two"), str(spec))
    assert done.returncode == 0, done.stderr[-3000:]
    one = train(propdsl.load(spec), TrainOptions(out=tmp_path / "one", quiet=True))
    w0, w1, w2 = _initial(one.run), _weights(one.run), _weights(tmp_path / "two" / "0")
    for k in w0:
        torch.testing.assert_close(w0[k] - w2[k], w0[k] - w1[k], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_backend_of_a_cuda_machine_uses_nccl_for_cuda_tensors():
    assert "cuda:nccl" in distributed.backend()


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_says_how_to_resume(tmp_path):
    spec = _spec(tmp_path, "s", batch=8, lr=0.1, epochs=500, limit=400)
    out = tmp_path / "run"
    job = subprocess.Popen(
        [sys.executable, "-m", "propdsl", "train", str(spec), "--out", str(out), "--nproc", "2"],
        env=_env(),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while runs.read_manifest(out) is None if out.exists() else True:
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1]
            time.sleep(0.2)
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130, stderr[-3000:]
    kept = runs.read_manifest(out)
    assert kept is not None and runs.verify(out, kept) == []
    assert f"{out} keeps epoch {kept.epoch}: continue with" in stderr, stderr[-3000:]
    assert "--resume --nproc 2" in stderr and "Traceback" not in stderr


@pytest.mark.slow
def test_vnnlib_instances_shared_out_over_two_processes_give_one_process_records(tmp_path):
    """`propdsl vnnlib --instances ... --nproc 2`: the ranks take every other instance and rank
    0 writes the one report; the answers and counterexamples are those of one process."""
    import csv

    sys.path.insert(0, str(Path(__file__).parent))
    from _vnncomp import require_vnncomp

    root = require_vnncomp()
    with open(root / "instances.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["benchmark"] == "test"]
    assert len(rows) == 5  # an odd count: the ranks take 3 and 2
    chosen = tmp_path / "instances.csv"
    with open(chosen, "w", newline="") as f:
        writer = csv.DictWriter(f, ["benchmark", "onnx", "vnnlib", "timeout_s", "expected"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r[k] for k in writer.fieldnames})
    reports = {}
    for name, extra in (("one", ["-q"]), ("two", ["--nproc", "2"])):
        report = tmp_path / f"{name}.json"
        done = _propdsl(
            "vnnlib", "--instances", str(chosen), "--root", str(root), "--json", str(report),
            *extra,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert "test" in done.stdout  # rank 0's summary table
        reports[name] = json.loads(report.read_text())["instances"]
    # each instance solved once, by one of the two ranks (each prints its own progress)
    assert sorted(re.findall(r"\[(\d)/5\]", done.stderr)) == ["1", "2", "3", "4", "5"]
    keys = ("vnnlib", "answer", "decided", "wrong", "counterexample", "output")
    one = [{k: r.get(k) for k in keys} for r in reports["one"]]
    two = [{k: r.get(k) for k in keys} for r in reports["two"]]
    assert two == one
    assert [r["answer"] for r in one] == [r["expected"] for r in rows]


@pytest.mark.parametrize(
    "exits, named",
    [
        # rank 1 killed; rank 0 aborted in the backend's teardown after losing it: rank 1
        (
            {0: -signal.SIGABRT, 1: -signal.SIGKILL},
            "process rank 1 (pid 101) was killed by SIGKILL",
        ),
        # rank 0 reported the lost peer itself and exited with 1: rank 1
        ({0: 1, 1: -signal.SIGKILL}, "process rank 1 (pid 101) was killed by SIGKILL"),
        # an abort alone is named; the launcher's SIGTERMs to the others never are
        (
            {0: -signal.SIGTERM, 1: -signal.SIGABRT},
            "process rank 1 (pid 101) was killed by SIGABRT",
        ),
        ({0: 1, 1: -signal.SIGTERM}, None),
        # rank 0 failed by itself (a folder in use, exit 2); rank 1 aborted in the backend's
        # teardown after rank 0 had gone: rank 0's error and exit code are the job's
        ({0: 2, 1: -signal.SIGABRT}, None),
        # a rank 0 killed by any signal is named: the other ranks print nothing of their own
        ({0: -signal.SIGABRT, 1: 2}, "process rank 0 (pid 100) was killed by SIGABRT"),
    ],
)
def test_the_launcher_names_the_process_that_died_not_the_one_that_aborted_after(
    monkeypatch, exits, named
):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure
    from torch.distributed.launcher import api

    failures = {
        r: ProcessFailure(local_rank=r, pid=100 + r, exitcode=code, error_file="/nonexistent")
        for r, code in exits.items()
    }

    def elastic_launch(config, entry):
        def run(*args):
            raise ChildFailedError("propdsl", failures)

        return run

    monkeypatch.setattr(api, "elastic_launch", elastic_launch)
    with pytest.raises(distributed.JobFailed) as info:
        distributed.launch(["train", "x.prop"], 2)
    assert info.value.died == named
    own = [code for _, code in sorted(exits.items()) if code > 0]
    assert info.value.exit_code == (own[0] if own else 1)


@pytest.mark.parametrize(
    "rank, code, lost, teardown",
    [
        (0, 0, False, False),  # a success: barrier, then out at once, everywhere
        (1, 0, False, False),
        (0, 2, False, False),  # rank 0 after an error: its message is out; out at once
        (0, 130, False, False),
        (1, 2, False, True),  # the others after an error: the teardown frees rank 0
        (1, 130, False, True),
        (1, 1, True, False),  # a process whose peer died: out at once
    ],
)
def test_how_a_process_of_a_job_ends(monkeypatch, rank, code, lost, teardown):
    """`propdsl.cli.main` at the end of a command in a job: which processes tear their group
    down (gloo's teardown aborted rank 0 after an error in CI, and the job's exit code was
    lost) and which end at once with their own exit code."""
    import propdsl.cli as cli

    calls: list[object] = []

    def app(**kwargs):
        raise SystemExit(code)

    class Left(Exception):
        pass

    def leave_now(c):
        calls.append(("leave now", c))
        raise Left

    monkeypatch.setattr(cli, "app", app)
    monkeypatch.setattr(cli, "_leave_now", leave_now)
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "is_main", lambda: rank == 0)
    monkeypatch.setattr(distributed, "peer_lost", lambda: lost)
    monkeypatch.setattr(distributed, "finish", lambda ok: calls.append(("barrier", ok)))
    monkeypatch.setattr(distributed, "shutdown", lambda ok=False: calls.append("teardown"))
    with pytest.raises(SystemExit if teardown else Left) as info:
        cli.main()
    if teardown:
        assert calls == ["teardown"] and info.value.code == code
    else:
        assert calls == [("barrier", code == 0), ("leave now", code)]
