"""Cost of the per-epoch commit of a run folder (`propdsl.runs.commit_epoch`) on a tiny model.

An epoch of a tiny model is so short that writing its checkpoint is a visible part of it. Three
ways to end an epoch, timed in the same process, interleaved, on the same folder's filesystem:

* `commit`: what `train` does: the epoch's files to fresh temporaries, the manifest, the renames,
  one fsync of the folder;
* `no fsync`: the same without the folder fsync (the baseline: nothing made durable);
* `fsync every file`: an fsync of each temporary before the manifest as well (what an earlier
  version measured at 3-4x slower epochs, and why the commit makes do with one fsync);
* `before`: the writes of propdsl before the commit existed: each file to `NAME.tmp` and renamed,
  one by one, no manifest, no fsync (not atomic as a set; for the before/after comparison).

Each row is the median wall time of one epoch of `train` (an MLP 64-16-10 on 100 digits, PGD-1
training, 3 epochs per run, runs interleaved); `ratio` is the row against `before`.

Run `python benchmarks/bench_run_commit.py [--quick] [--dir DIR]` or through `benchmarks/run.py`
(DIR: where the run folders go, default a temporary folder; fsync costs depend on the disk).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

import propdsl
from propdsl import runs
from propdsl.train import TrainOptions, train

SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

property robust(x, y) =
  classification_robustness(f, x, y, 0.1)

train f on digits(split = "train", limit = 100) {
  model     = mlp(hidden = [16])
  epochs    = 3
  batch     = 20
  optimizer = adam(lr = 0.03)
  attack    = pgd(steps = 1)
  loss      = cross_entropy + 0.5 * robust
}
"""
EPOCHS = 3


@contextmanager
def _mode(name: str):
    """Patch the commit's durability step for one timing mode."""
    real_write, real_fsync, real_commit = runs._write_new, runs._fsync_dir, runs.commit_epoch
    if name == "before":

        def per_file(run, epoch, files, **_):
            for file, data in files.items():
                tmp = run / (file + ".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, run / file)

        runs.commit_epoch = per_file
    elif name == "no fsync":
        runs._fsync_dir = lambda folder: None
    elif name == "fsync every file":

        def write_and_fsync(folder, file, data):
            tmp = real_write(folder, file, data)
            fd = os.open(folder / tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            return tmp

        runs._write_new = write_and_fsync
    try:
        yield
    finally:
        runs._write_new, runs._fsync_dir, runs.commit_epoch = real_write, real_fsync, real_commit


def run(quick: bool = False, folder: str | None = None) -> list[dict]:
    spec = propdsl.load(SPEC)
    repeats = 3 if quick else 12
    modes = ("before", "no fsync", "commit", "fsync every file")
    times: dict[str, list[float]] = {m: [] for m in modes}
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(dir=folder) as root:
        base = Path(root)
        options = TrainOptions(out=base / "warm", quiet=True, threads=1, eval_samples=16)
        train(spec, options)  # warm-up
        for i in range(repeats):
            for mode in modes:
                out = base / f"{mode.replace(' ', '_')}-{i}"
                with _mode(mode):
                    t0 = time.perf_counter()
                    train(spec, TrainOptions(out=out, quiet=True, threads=1, eval_samples=16))
                    times[mode].append((time.perf_counter() - t0) / EPOCHS)
    base_ms = statistics.median(times["before"]) * 1000
    rows = []
    for mode in modes:
        ms = statistics.median(times[mode]) * 1000
        rows.append(
            {
                "benchmark": f"epoch end: {mode}",
                "ms": round(ms, 2),
                "baseline": "before",
                "baseline_ms": round(base_ms, 2),
                "ratio": round(ms / base_ms, 3),
                "target": "",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dir", default=None, help="where the run folders go")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for row in run(args.quick, args.dir):
        print(
            f"{row['benchmark']:<28} {row['ms']:8.2f} ms/epoch   ratio {row['ratio']:.3f} "
            f"(against {row['baseline']}: {row['baseline_ms']:.2f} ms)"
        )


if __name__ == "__main__":
    main()
