"""Data-parallel training throughput: 1 process against 2 (torchrun, gloo on the CPU).

Both train the digits CNN of specs/digits.prop (`cnn(channels = [16, 32], hidden = 100)`) with
`loss = cross_entropy + 0.5 * classification_robust` under DL2 with PGD-10, global batch 64, Adam,
on the digits train split (1258 images; 512 with --quick), one torch thread per process. Reported:

* samples per second of the training batches (the `train_seconds` of metrics.jsonl, rank 0's
  clock, epoch-end validation left out), the first epoch left out (warm-up); the ratio of 2
  processes to 1, measured in the same invocation;
* the communication share of a step: the time spent in the gradient all-reduce (one per step,
  waiting for the slower rank included) over the training time, and the pure all-reduce of a
  gradient-sized buffer measured alone afterwards (both ranks at a barrier first).

Two processes can only be faster when two cores are free: on a 2-core machine shared with other
work the ratio says more about the load than about propdsl (the table shows the load average).

Run `python benchmarks/bench_distributed.py [--quick]` or through `benchmarks/run.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = 0.1

property classification_robust(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1):
    argmax(f(x')) == y

train f on digits(split = "train"{limit}) {{
  model     = cnn(channels = [16, 32], hidden = 100)
  epochs    = {epochs}
  batch     = 64
  optimizer = adam(lr = 0.001)
  logic     = dl2
  attack    = pgd(steps = 10, restarts = 1)
  loss      = cross_entropy + 0.5 * classification_robust
}}
"""


def _worker(spec_file: str, out: str, result: str) -> None:
    """One process: train, timing the gradient all-reduce; rank 0 writes the figures."""
    import torch

    import propdsl
    from propdsl import distributed
    from propdsl.train import TrainOptions, train

    distributed.init_from_env()
    comm = [0.0]
    sync = distributed.sync_gradients

    def timed(params, stats):
        t0 = time.perf_counter()
        try:
            return sync(params, stats)
        finally:
            comm[0] += time.perf_counter() - t0

    distributed.sync_gradients = timed  # type: ignore[assignment]
    res = train(propdsl.load(Path(spec_file)), TrainOptions(out=Path(out), quiet=True, threads=1))
    rows = res.metrics[1:]  # the first epoch is warm-up
    n = _train_size(res)
    figures = {
        "processes": distributed.world(),
        "train_seconds": sum(r["train_seconds"] for r in rows),
        "samples": n * len(rows),
        "steps": -(-n // 64) * len(rows),
        "comm_seconds_all_epochs": comm[0],
        "train_seconds_all_epochs": sum(r["train_seconds"] for r in res.metrics),
    }
    if distributed.active():
        params = sum(p.numel() for p in res.model.parameters())
        buffer = torch.zeros(params + 3)
        for _ in range(5):
            distributed.all_reduce_(buffer)
        alone = []
        for _ in range(50):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            distributed.all_reduce_(buffer)
            alone.append(time.perf_counter() - t0)
        alone.sort()
        figures["allreduce_ms"] = 1000 * alone[len(alone) // 2]
        figures["parameters"] = params
    if distributed.is_main():
        Path(result).write_text(json.dumps(figures))
    distributed.shutdown()


def _train_size(res) -> int:
    config = json.loads((res.run / "config.json").read_text())
    import propdsl
    from propdsl.train import load_split

    spec = propdsl.load(res.run / "spec.prop")
    return len(load_split(spec, spec.train_block, "train", seed=config["seed"]))


def _measure(nproc: int, spec: Path, tmp: Path) -> dict:
    out, result = tmp / f"run{nproc}", tmp / f"result{nproc}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    me = str(Path(__file__).resolve())
    if nproc == 1:
        command = [sys.executable, me, "--worker", str(spec), str(out), str(result)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(nproc), "--", me]
        command += ["--worker", str(spec), str(out), str(result)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{nproc} processes failed:\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def run(quick: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        spec = tmp / "digits_pgd.prop"
        limit = ", limit = 512" if quick else ""
        spec.write_text(SPEC.format(limit=limit, epochs=3 if quick else 4))
        load = os.getloadavg()[0]
        one = _measure(1, spec, tmp)
        two = _measure(2, spec, tmp)
    rows = []
    base = one["samples"] / one["train_seconds"]
    for figures in (one, two):
        rate = figures["samples"] / figures["train_seconds"]
        row = {
            "benchmark": f"train digits CNN, PGD-10, {figures['processes']} process(es)",
            "ms": 1000 * figures["train_seconds"] / figures["steps"],  # per global batch
            "samples_per_s": rate,
            "ratio": rate / base,
            "cores": os.cpu_count(),
            "load_avg": round(load, 2),
        }
        if figures["processes"] > 1:
            # all-reduce calls, waits for the slower rank included, over the training time
            row["comm_share"] = (
                figures["comm_seconds_all_epochs"] / figures["train_seconds_all_epochs"]
            )
            # the bare all-reduce of a gradient-sized buffer, per step, over a step's time
            row["allreduce_ms"] = figures["allreduce_ms"]
            row["allreduce_share"] = figures["allreduce_ms"] / row["ms"]
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("SPEC", "OUT", "RESULT"))
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    for row in run(args.quick):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
