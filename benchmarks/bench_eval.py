"""Cost of `propdsl eval` on the digits spec: the OpenMP wait policy, and the radius-0 shortcut.

Two measurements of the same work, each against its baseline:

* `eval command`: `propdsl eval specs/digits.prop --run R --threads 2 -q` (R: specs/digits.prop
  trained for one epoch), wall time of the whole command in a fresh process. Baseline: the
  OpenMP threads spin between operations as libgomp does by default (`GOMP_SPINCOUNT=300000`,
  which is libgomp's default spin count; the command leaves a user's choice alone). New: the
  command's own default, `OMP_WAIT_POLICY=PASSIVE` (idle threads sleep). Runs alternate between
  the two, so both see the same load; the ratio is baseline / new. On a machine whose cores are
  busy with other work, spinning threads slow each other down many times over; on an idle
  machine the two are close.
* `security at eps 0`: the attack of the security curve at radius 0, where every region is one
  point, against its replacement without steps (`evaluate._point_regions`): the same truth
  (checked here, sample by sample) without 150 forward-backward passes.

Run `python benchmarks/bench_eval.py [--quick]` or through `benchmarks/run.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "digits.prop"


def _train(out: Path) -> None:
    import propdsl
    from propdsl.train import TrainOptions, train

    train(propdsl.load(SPEC), TrainOptions(out=out, epochs=1, threads=2, quiet=True))


def _eval_seconds(run: Path, env: dict[str, str], samples: int | None) -> float:
    entry = "import sys; from propdsl.cli import main; sys.argv[0] = 'propdsl'; main()"
    cmd = [sys.executable, "-c", entry, "eval", str(SPEC), "--run", str(run)]
    cmd += ["--threads", "2", "-q", "--no-plots"]
    if samples is not None:
        cmd += ["--samples", str(samples)]
    full = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    full.pop("OMP_WAIT_POLICY", None)
    full.pop("GOMP_SPINCOUNT", None)
    full.update(env)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=full, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t0


def _radius_zero(run: Path, samples: int, rounds: int) -> dict:
    import torch

    import propdsl
    from propdsl import evaluate as ev
    from propdsl.results import load_split, open_run

    torch.set_num_threads(1)
    setup = open_run(propdsl.load(SPEC), run)
    ds = load_split(setup, "test")
    x, y = ds.x[:samples], ds.y[:samples]
    spec = setup.spec.with_params(eps=0.0)
    assert ev._point_regions(spec.properties["classification_robust"].formula)
    short = dataclasses.replace(ev.DEFAULT_ATTACK, steps=0, restarts=1)
    full_s, short_s = [], []
    for _ in range(rounds):
        truths = []
        for attack, out in ((ev.DEFAULT_ATTACK, full_s), (short, short_s)):
            t0 = time.perf_counter()
            truth, _ = ev._holds(
                spec,
                "classification_robust",
                attack,
                setup.model,
                x,
                y,
                256,
                0,
                torch.device("cpu"),
            )
            out.append(time.perf_counter() - t0)
            truths.append(truth)
        assert torch.equal(*truths), "the shortcut changed a verdict"
    full, fast = statistics.median(full_s), statistics.median(short_s)
    return {
        "benchmark": f"security at eps 0, {samples} samples",
        "ms": round(1000 * fast, 1),
        "baseline": "apgd(steps=50, restarts=3)",
        "baseline_ms": round(1000 * full, 1),
        "ratio": round(full / fast, 1),
        "target": "same truth",
    }


def run(quick: bool = False) -> list[dict]:
    samples = 60 if quick else None
    rounds = 1 if quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        r = Path(tmp) / "run"
        _train(r)
        spin, calm = [], []
        for _ in range(rounds):
            spin.append(_eval_seconds(r, {"GOMP_SPINCOUNT": "300000"}, samples))
            calm.append(_eval_seconds(r, {}, samples))
        before, after = statistics.median(spin), statistics.median(calm)
        rows = [
            {
                "benchmark": f"eval command, {samples or 'all 359'} samples, 2 threads",
                "ms": round(1000 * after),
                "baseline": "spinning OpenMP threads",
                "baseline_ms": round(1000 * before),
                "ratio": round(before / after, 2),
                "target": "faster under load",
                "load": os.getloadavg()[0],
            },
            _radius_zero(r, samples or 359, rounds),
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    for row in run(args.quick):
        print(row)


if __name__ == "__main__":
    main()
