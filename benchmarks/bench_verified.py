"""CROWN-verified classification robustness on digits after five training methods.

One spec, one model and one schedule for every method; only the loss changes:

* standard: the cross-entropy alone;
* PGD adversarial training: the cross-entropy at a PGD point of the training ball (Madry);
* property-driven: the cross-entropy plus the property under DL2 (attack-based, Fischer);
* certified, IBP / CROWN-IBP: the cross-entropy plus `certified(...)` (Gowal; Zhang).

The attack-based methods train at the radius the property states (0.1); certified training at
TRAIN_EPS = 0.15, larger as is usual for IBP (Gowal et al. train at 0.2 for a test radius of 0.1
on MNIST); radii ramp up over the first epochs. Each model is then verified on the whole test
split at eps = 0.05 and 0.1 with `spec.verify` (APGD falsifier, then CROWN, and alpha-CROWN in
a second column). Rates are shares of the test images (verified + falsified + unknown = 1);
clean accuracy is on the same images.

    python benchmarks/bench_verified.py            # full (about 6 minutes on one core)
    python benchmarks/bench_verified.py --quick    # fewer epochs, fewer samples
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import propdsl
from propdsl.train import TrainOptions, load_split, train

TRAIN_EPS = 0.15
VERIFY_EPS = (0.05, 0.1)
SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = 0.1
param train_eps : Real = {train_eps}  # certified training's radius

let pixels = box(0, 1)

property robust(x, y) =
  forall x' in ball(x, eps, inf) & pixels: argmax(f(x')) == y

property robust_wide(x, y) =
  forall x' in ball(x, train_eps, inf) & pixels: argmax(f(x')) == y

train f on digits(split = "train") {{
  model     = mlp(hidden = [1024])
  epochs    = {epochs}
  batch     = 32
  optimizer = adam(lr = 0.001)
  schedule  = cosine(min_lr = 0.00001)
  ramp      = {ramp}
  logic     = dl2
  attack    = pgd(steps = 10, restarts = 1)
  loss      = {loss}
}}
"""
METHODS = {
    "standard": "cross_entropy",
    "PGD adversarial": "max x' in ball(x, eps, inf) & pixels: cross_entropy(f(x'), y)",
    "property-driven (DL2)": "cross_entropy + robust",
    "certified, IBP": "cross_entropy + certified(robust_wide, method = ibp)",
    "certified, CROWN-IBP": "cross_entropy + certified(robust_wide, method = crown_ibp)",
}


def spec_for(loss: str, epochs: int, ramp: int) -> propdsl.Spec:
    text = SPEC.format(train_eps=TRAIN_EPS, epochs=epochs, ramp=ramp, loss=loss)
    return propdsl.load(text)


def run(quick: bool = False) -> list[dict[str, object]]:
    """One row per training method: clean accuracy, training seconds, and per verification
    radius the verified / falsified / unknown shares of the test images."""
    torch.set_num_threads(1)
    epochs, ramp, samples = (10, 4, 100) if quick else (100, 30, None)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, loss in METHODS.items():
            spec = spec_for(loss, epochs, ramp)
            start = time.perf_counter()
            options = TrainOptions(out=Path(tmp) / name, threads=1, quiet=True, seed=0)
            model = train(spec, options).model.eval()
            seconds = time.perf_counter() - start
            block = spec.train_block
            assert block is not None
            test = load_split(spec, block, "test", seed=0)
            x, y = test.x[:samples], test.y[:samples]
            with torch.no_grad():
                accuracy = float((model(x).argmax(1) == y).float().mean())
            row: dict[str, object] = dict(
                benchmark=f"verified: {name}", accuracy=accuracy, train_s=seconds
            )
            for eps in VERIFY_EPS:
                verdicts = spec.with_params(eps=eps).verify(
                    model, x, y, properties=["robust"], method="alpha_crown"
                )["robust"]
                crown = spec.with_params(eps=eps).verify(
                    model, x, y, properties=["robust"], method="crown"
                )["robust"]
                row[f"crown@{eps}"] = crown.rate("verified")
                row[f"alpha@{eps}"] = verdicts.rate("verified")
                row[f"falsified@{eps}"] = verdicts.rate("falsified")
            rows.append(row)
    return rows


def _table(rows: list[dict[str, object]]) -> str:
    head = f"{'method':<24} {'clean':>6} {'train s':>8}"
    for eps in VERIFY_EPS:
        head += f"  {'CROWN@' + str(eps):>10} {'a-CROWN':>8} {'falsified':>9}"
    lines = [head]
    for r in rows:
        line = f"{str(r['benchmark']).removeprefix('verified: '):<24} {r['accuracy']:>6.3f} "
        line += f"{r['train_s']:>8.0f}"
        for eps in VERIFY_EPS:
            line += f"  {r[f'crown@{eps}']:>10.3f} {r[f'alpha@{eps}']:>8.3f}"
            line += f" {r[f'falsified@{eps}']:>9.3f}"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and samples")
    args = parser.parse_args()
    print(f"digits test split, MLP 64-1024-10; certified training at eps {TRAIN_EPS}")
    print(_table(run(quick=args.quick)))


if __name__ == "__main__":
    main()
