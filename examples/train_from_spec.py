"""Train, evaluate and verify from a spec with the library: what the commands do, in Python.

    python examples/train_from_spec.py [RUN_FOLDER]

The spec's train block says what to train and how; `propdsl.train.train` writes a run folder
(config.json, metrics, checkpoints, the spec as trained), exactly as

    propdsl train specs/methods/property_dl2.prop --out RUN --epochs 3 -p eps=0.05

would. Then, as `propdsl eval` and `propdsl verify` would, the script evaluates the best
checkpoint on the first 100 test images (clean accuracy, constraint accuracy and security) and
verifies the spec's property on them; eval.json and verify.json land in the run folder. The
spec (property-driven training under DL2: `cross_entropy + weight * robust`) asks for 20 epochs;
the override keeps this to 3. Without RUN_FOLDER it works in a temporary folder. About 15 s on a
CPU.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import propdsl
from propdsl.evaluate import evaluate, render_table
from propdsl.runs import Run, read_metrics
from propdsl.train import TrainOptions, train
from propdsl.verify.report import verify_run

SPEC = Path(__file__).resolve().parent.parent / "specs" / "methods" / "property_dl2.prop"


def main(run: Path, epochs: int = 3, samples: int = 100) -> None:
    spec = propdsl.load(SPEC, params={"eps": 0.05})
    result = train(spec, TrainOptions(out=run, epochs=epochs, quiet=True))
    for row in read_metrics(result.run):
        print(
            f"epoch {row['epoch']}: loss {row['loss']:.3f}, "
            f"validation accuracy {row['val_accuracy']:.3f}, "
            f"robust at the training attack's points {row['satisfied[robust]']:.3f}"
        )
    opened = Run.open(result.run)
    print(f"run folder {opened.path}: {sorted(p.name for p in opened.path.iterdir())}")

    # the spec as trained (the run keeps a copy), the best checkpoint, the test split
    trained = propdsl.load(result.run / "spec.prop", params={"eps": 0.05})
    report = evaluate(trained, result.run, samples=samples, eps_grid=(), plots=False)
    print()
    print(render_table(report))
    verdicts = verify_run(trained, result.run, samples=samples)
    print()
    print(verdicts.table())


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp) / "run")
