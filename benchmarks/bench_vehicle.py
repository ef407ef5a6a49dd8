"""propdsl's classification-robustness loss step against Vehicle's (Daggitt et al. 2024) at the
same search budget.

The work: the DL2 classification-robustness loss of a batch of 64 digits on the zoo's MLP
(64-100-100-10), at eps = 0.1 (an L-inf ball within the pixel box), with the counterexample
search of Vehicle's default PyTorch sampler: 10 random starts x 5 sign-gradient steps, then the
loss back-propagated into the weights.

* `propdsl`: `spec.loss("classification_robust", logic="dl2", attack=PGD(steps=5, restarts=10))`
  from specs/digits.prop; all restarts run as one batch of 640 through the network.
* `propdsl, restarts one by one`: the same search with the objective evaluated restart by
  restart (`run_attack` without `tiled`: 10 network calls per step), the cost of the loop that
  the batched restarts replaced.
* `hand-written, batched`: the same search written directly in PyTorch (all restarts as one
  batch, the best restart per sample by tensor ops, DL2 at the chosen point).
* `Vehicle`: vehicle-lang's compiled loss of the same property (`robustAround` below, its
  default sampler with 10 samples x 5 steps), called per sample as its generated code takes one
  image at a time; timed on `--vehicle-samples` images (default 8) and scaled to the batch of 64
  (each image is an independent call, so the time is linear in their number). The compilation
  of the spec (seconds, once) is reported apart.

Vehicle is not a dependency of propdsl: install `vehicle-lang` (0.28) and torch in a separate
environment and point `PROPDSL_VEHICLE_PYTHON` at its Python interpreter; without it the Vehicle
row is skipped (with a note). That interpreter runs this file with `--vehicle-child`, which
imports neither propdsl nor anything but torch and vehicle_lang.

Run `python benchmarks/bench_vehicle.py [--quick] [--threads N] [--vehicle-samples N]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

BATCH = 64
EPS = 0.1
STEPS = 5
RESTARTS = 10
ENV = "PROPDSL_VEHICLE_PYTHON"
SPEC = Path(__file__).resolve().parent.parent / "specs" / "digits.prop"

# The property in Vehicle's language: Vehicle's own MNIST robustness example, for 8x8 digits
# flattened to 64 pixels.
VEHICLE_SPEC = """\
type Image = Tensor Real [64]
type Label = Index 10

@network
classifier : Image -> Tensor Real [10]

validImage : Image -> Bool
validImage x = forall i . 0 <= x ! i <= 1

advises : Image -> Label -> Bool
advises x i = forall j . j != i => classifier x ! i > classifier x ! j

@parameter
epsilon : Real

boundedByEpsilon : Image -> Bool
boundedByEpsilon x = forall i . -epsilon <= x ! i <= epsilon

robustAround : Image -> Label -> Bool
robustAround image label = forall perturbation .
  let perturbedImage = image - perturbation in
  boundedByEpsilon perturbation and validImage perturbedImage =>
    advises perturbedImage label

@parameter(infer=True)
n : Nat

@dataset
images : Vector Image n

@dataset
labels : Vector Label n

@property
robust : Vector Bool n
robust = foreach i . robustAround (images ! i) (labels ! i)
"""


def hand_batched_dl2(model, x: Tensor, y: Tensor, eps: float, gen: torch.Generator) -> Tensor:
    """PGD with RESTARTS x STEPS on the signed margin, all restarts as one batch, the best
    iterate per sample over all steps and restarts; the per-sample DL2 loss at that point."""
    k, b = RESTARTS, x.shape[0]
    lo = (x - eps).clamp(0, 1).repeat_interleave(k, 0)
    hi = (x + eps).clamp(0, 1).repeat_interleave(k, 0)
    yk = y.repeat_interleave(k)
    own = F.one_hot(yk, 10).bool()
    alpha = 2.5 * eps / STEPS
    was_training = model.training
    model.eval()
    starts = [x + (2 * torch.rand(x.shape, generator=gen) - 1) * eps for _ in range(k)]
    point = torch.clamp(torch.stack(starts, 1).flatten(0, 1), lo, hi)
    best, best_value = point, None
    for step in range(STEPS + 1):
        leaf = point.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(leaf)
            value = (logits - logits.gather(1, yk[:, None])).masked_fill(own, -math.inf).amax(1)
            if step < STEPS:
                (g,) = torch.autograd.grad(value.sum(), leaf)
        value = value.detach()
        if best_value is None:
            best_value = value
        else:
            better = value > best_value
            best = torch.where(better[:, None, None, None], leaf.detach(), best)
            best_value = torch.where(better, value, best_value)
        if step < STEPS:
            point = torch.clamp(leaf.detach() + alpha * g.sign(), lo, hi)
    pick = best_value.view(b, k).argmax(1) + torch.arange(b) * k
    model.train(was_training)
    logits = model(best[pick])
    fy = logits.gather(1, y[:, None])
    terms = (logits - fy).clamp_min(0) + (logits == fy).to(logits.dtype)
    return terms.masked_fill(F.one_hot(y, 10).bool(), 0.0).sum(1)


def _timed(step, repeats: int) -> float:
    # warm-up: past the attacks after which a hot objective is traced (propdsl.tracing), as in
    # a training run (the hand-written steps get the same)
    for _ in range(10):
        step()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return statistics.median(times)


def _vehicle(model, x: Tensor, y: Tensor, samples: int, python: str) -> dict:
    """Run the Vehicle side in its own interpreter; its seconds per image and compile time."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "robust.vcl").write_text(VEHICLE_SPEC)
        # The weights only: the child rebuilds the same eager `nn.Sequential` (the zoo's MLP).
        torch.save(model.state_dict(), folder / "model.pt")
        torch.save({"x": x[:samples].reshape(samples, 64), "y": y[:samples]}, folder / "data.pt")
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
        done = subprocess.run(
            [python, str(Path(__file__).resolve()), "--vehicle-child", str(folder)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"the Vehicle run failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def vehicle_child(folder: Path) -> None:
    """Under Vehicle's interpreter: compile the spec, time the loss of each image."""
    import vehicle_lang  # noqa: F401  (fails clearly when this is not Vehicle's interpreter)
    from vehicle_lang.loss import pytorch as vehicle_loss

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    start = time.perf_counter()
    spec = vehicle_loss.load_specification(str(folder / "robust.vcl"))
    compile_s = time.perf_counter() - start
    from importlib.metadata import version

    model = _plain_mlp()
    model.load_state_dict(torch.load(folder / "model.pt"))
    data = torch.load(folder / "data.pt")
    x, y = data["x"], data["y"]
    robust = spec["robustAround"]
    eps = torch.tensor(EPS)

    def classifier(v: Tensor) -> Tensor:
        return model(v.reshape(1, 1, 8, 8).to(torch.float32))[0]

    def step(i: int) -> None:
        model.zero_grad(set_to_none=True)
        loss = torch.as_tensor(robust(classifier, eps, x[i], int(y[i])))
        if loss.requires_grad:
            loss.backward()

    step(0)  # warm-up
    start = time.process_time()
    for i in range(x.shape[0]):
        step(i)
    per_image = (time.process_time() - start) / x.shape[0]
    found = {"per_image_s": per_image, "compile_s": compile_s, "version": version("vehicle-lang")}
    print(json.dumps(found))


def _plain_mlp() -> torch.nn.Module:
    """The zoo's digits MLP (`build_model("mlp", (1, 8, 8), 10, hidden=[100, 100])`) in plain
    torch, for the Vehicle side, which does not import propdsl."""
    nn = torch.nn
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 100),
        nn.ReLU(),
        nn.Linear(100, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def run(quick: bool = False, threads: int | None = 2, vehicle_samples: int = 8) -> list[dict]:
    import propdsl
    from propdsl.attacks import run_attack
    from propdsl.data import load_dataset
    from propdsl.models import build_model
    from propdsl.region import Region

    if threads is not None:
        torch.set_num_threads(threads)
    repeats = 3 if quick else 7
    data = load_dataset("digits", split="train", seed=0, limit=BATCH)
    x, y = data.x, data.y
    model = build_model("mlp", (1, 8, 8), 10, hidden=[100, 100], seed=0)
    # The Vehicle side rebuilds it in plain torch: check that the layouts agree.
    _plain_mlp().load_state_dict(model.state_dict())
    spec = propdsl.load(SPEC, params={"eps": EPS})
    attack = propdsl.PGD(steps=STEPS, restarts=RESTARTS)
    loss = spec.loss("classification_robust", logic="dl2", attack=attack)
    loss.generator = torch.Generator().manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    own = F.one_hot(y, 10).bool()

    def propdsl_step() -> None:
        model.zero_grad(set_to_none=True)
        loss(model, x, y).loss.mean().backward()

    def one_by_one_step() -> None:
        # The library's attack with the objective called restart by restart (no `tiled`).
        model.zero_grad(set_to_none=True)

        def margin(v: Tensor) -> Tensor:
            logits = model(v)
            return (logits - logits.gather(1, y[:, None])).masked_fill(own, -math.inf).amax(1)

        region = Region.ball(x, EPS, math.inf, lo=0.0, hi=1.0)
        (point,) = run_attack(attack, margin, [region], models=[model], generator=gen).points
        logits = model(point)
        fy = logits.gather(1, y[:, None])
        terms = (logits - fy).clamp_min(0) + (logits == fy).to(logits.dtype)
        terms.masked_fill(own, 0.0).sum(1).mean().backward()

    def hand_step() -> None:
        model.zero_grad(set_to_none=True)
        hand_batched_dl2(model, x, y, EPS, gen).mean().backward()

    times: dict[str, list[float]] = {"propdsl": [], "one": [], "hand": []}
    for _ in range(2):  # interleaved, the best of each kept
        times["hand"].append(_timed(hand_step, repeats))
        times["propdsl"].append(_timed(propdsl_step, repeats))
        times["one"].append(_timed(one_by_one_step, repeats))
    t = {k: min(v) for k, v in times.items()}
    name = f"loss/mlp: CR, DL2, {RESTARTS} restarts x {STEPS} steps, batch {BATCH}"
    rows = [
        {
            "benchmark": name,
            "baseline": "hand-written, restarts batched",
            "ms": round(1e3 * t["propdsl"], 2),
            "baseline_ms": round(1e3 * t["hand"], 2),
            "ratio": round(t["propdsl"] / t["hand"], 3),
            "target": "report",
            "clock": "cpu",
        },
        {
            "benchmark": name,
            "baseline": "library attack, restarts one by one",
            "ms": round(1e3 * t["propdsl"], 2),
            "baseline_ms": round(1e3 * t["one"], 2),
            "ratio": round(t["propdsl"] / t["one"], 3),
            "target": "report",
            "clock": "cpu",
        },
    ]
    python = os.environ.get(ENV)
    if not python:
        rows.append({"benchmark": name, "baseline": "Vehicle", "skipped": f"{ENV} is not set"})
        return rows
    found = _vehicle(model, x, y, min(vehicle_samples, BATCH), python)
    vehicle_s = found["per_image_s"] * BATCH
    rows.append(
        {
            "benchmark": name,
            "baseline": f"Vehicle {found['version']} (default sampler, same budget)",
            "ms": round(1e3 * t["propdsl"], 2),
            "baseline_ms": round(1e3 * vehicle_s),
            "speedup": round(vehicle_s / t["propdsl"], 1),
            "target": ">= 500x",
            "clock": "cpu",
            "vehicle_images_timed": min(vehicle_samples, BATCH),
            "vehicle_compile_s": round(found["compile_s"], 1),
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vehicle-samples", type=int, default=8)
    parser.add_argument("--vehicle-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.vehicle_child is not None:
        vehicle_child(args.vehicle_child)
        return
    for row in run(args.quick, args.threads, args.vehicle_samples):
        print(row)


if __name__ == "__main__":
    main()
