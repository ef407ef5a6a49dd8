"""Cost of the compiled property losses against hand-written PyTorch doing the same work.

One training step (forward + backward + optimizer step) on a batch of 64 digits, on the zoo's
digits MLP and CNN:

* `compiled`: `spec.loss("classification_robust", logic="dl2", attack=PGD(steps=10))` from
  specs/digits.prop, `out.loss.mean()` back-propagated.
* `hand`: the same work written directly in PyTorch: a uniform random start in the ball and box,
  10 projected sign steps on the signed margin `max_{j != y} f_j - f_y`, the best point visited
  kept per sample, then the DL2 loss `sum_{j != y} max(f_j - f_y, 0) + [f_j == f_y]` at that
  point and the exact truth `argmax f = y` there.
* `run_attack + hand`: the hand-written margin and DL2 loss, with the library's attack loop
  (`propdsl.attacks.run_attack`) in between.

The ratio compiled / hand is the whole overhead of the library (target <= 1.05); compiled /
(run_attack + hand) the compiler's own share. Another row gives the explanation-stability step
(DL2, PGD-10 on a softplus surrogate, double backpropagation) relative to a plain
cross-entropy step: the price of training on explanations.

The last rows repeat the comparison on MLPs 64-w-w-10 of growing width w (`size_sweep`): the
library's overhead is a fixed number of tensor operations per attack step, so its share falls
as the network grows.

Run `python benchmarks/bench_loss.py [--quick] [--threads N]` or through `benchmarks/run.py`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import propdsl
from propdsl.attacks import run_attack
from propdsl.data import load_dataset
from propdsl.models import build_model
from propdsl.region import Region

SPEC = Path(__file__).resolve().parent.parent / "specs" / "digits.prop"
BATCH = 64
STEPS = 10
EPS = 0.1


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(
    step: Callable[[], object],
    *,
    warmup: int,
    repeats: int,
    inner: int,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Median over `repeats` of the mean time of `inner` consecutive calls (seconds)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = clock()
        for _ in range(inner):
            step()
        times.append((clock() - start) / inner)
    return statistics.median(times)


def _model(kind: str) -> nn.Module:
    if kind == "mlp":
        return build_model("mlp", (1, 8, 8), 10, hidden=[100, 100], seed=0)
    return build_model("cnn", (1, 8, 8), 10, channels=[16, 32], hidden=100, seed=0)


def hand_pgd_point(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, gen) -> Tensor:
    """Hand-written PGD (sign steps of 2.5 eps / steps) on the signed margin, in eval mode;
    the most violating iterate per sample over the L-inf ball clipped to [0, 1]."""
    lo = (x - eps).clamp(0, 1)
    hi = (x + eps).clamp(0, 1)
    own = F.one_hot(y, 10).bool()
    alpha = 2.5 * eps / steps

    def margin(v: Tensor) -> Tensor:
        logits = model(v)
        return (logits - logits.gather(1, y[:, None])).masked_fill(own, -torch.inf).amax(1)

    was_training = model.training
    model.eval()
    start = x + (2 * torch.rand(x.shape, generator=gen, dtype=x.dtype) - 1) * eps
    point = torch.minimum(torch.maximum(start, lo), hi)
    best, best_value = point, None
    for k in range(steps + 1):
        leaf = point.detach().requires_grad_(True)
        with torch.enable_grad():
            value = margin(leaf)
            if k < steps:
                (g,) = torch.autograd.grad(value.sum(), leaf)
        value = value.detach()
        if best_value is None:
            best_value = value
        else:
            better = value > best_value
            best = torch.where(better[:, None, None, None], leaf.detach(), best)
            best_value = torch.where(better, value, best_value)
        if k < steps:
            point = torch.minimum(torch.maximum(leaf.detach() + alpha * g.sign(), lo), hi)
    model.train(was_training)
    return best


def hand_pgd_dl2(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, gen):
    """Hand-written PGD on the signed margin, then DL2 classification robustness at the point.

    Returns the per-sample DL2 loss (with graph into the weights) and the exact truth.
    """
    own = F.one_hot(y, 10).bool()
    logits = model(hand_pgd_point(model, x, y, eps, steps, gen))
    fy = logits.gather(1, y[:, None])
    terms = (logits - fy).clamp_min(0) + (logits == fy).to(logits.dtype)
    loss = terms.masked_fill(own, 0.0).sum(1)
    with torch.no_grad():
        satisfied = logits.argmax(1) == y
    return loss, satisfied


def library_attack_dl2(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, gen):
    """The hand-written margin and DL2 loss, with the library's attack loop in between.

    Against `compiled`, this isolates the compiler's own overhead from the attack's.
    """
    own = F.one_hot(y, 10).bool()

    def margin(v: Tensor) -> Tensor:
        logits = model(v)
        return (logits - logits.gather(1, y[:, None])).masked_fill(own, -torch.inf).amax(1)

    region = Region.ball(x, eps, math.inf, lo=0.0, hi=1.0)
    attack = propdsl.PGD(steps=steps)
    (point,) = run_attack(attack, margin, [region], models=[model], generator=gen).points
    logits = model(point)
    fy = logits.gather(1, y[:, None])
    terms = (logits - fy).clamp_min(0) + (logits == fy).to(logits.dtype)
    loss = terms.masked_fill(own, 0.0).sum(1)
    with torch.no_grad():
        satisfied = logits.argmax(1) == y
    return loss, satisfied


def run(quick: bool = False, threads: int | None = 2, clock: str = "wall") -> list[dict]:
    """Time one training step of each variant; one row per model and comparison.

    `clock="cpu"` measures the process's CPU time instead of wall time: on a shared machine
    with other work running it still gives the work done (use it with `threads=1`, where no
    worker thread spins while waiting).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    warmup, repeats, inner = (2, 3, 3) if quick else (3, 7, 3)
    rounds = 2 if quick else 3
    timing = dict(warmup=warmup, repeats=repeats, inner=inner, clock=CLOCKS[clock])
    data = load_dataset("digits", split="train", seed=0, limit=BATCH)
    x, y = data.x, data.y
    spec = propdsl.load(SPEC, params={"eps": EPS})
    attack = propdsl.PGD(steps=STEPS, restarts=1)
    robust = spec.loss("classification_robust", logic="dl2", attack=attack)
    stable = spec.loss(
        "explanation_stable",
        logic="dl2",
        attack=propdsl.PGD(steps=STEPS, restarts=1, surrogate_beta=10.0),
    )
    rows = []
    for kind in ("mlp", "cnn"):
        model = _model(kind)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        gen_c = torch.Generator().manual_seed(0)
        gen_h = torch.Generator().manual_seed(0)
        gen_a = torch.Generator().manual_seed(0)
        robust.generator = gen_c

        def compiled_step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            out = robust(model, x, y)
            out.loss.mean().backward()
            opt.step()

        def hand_step(model=model, opt=opt, gen=gen_h) -> None:
            opt.zero_grad(set_to_none=True)
            loss, _ = hand_pgd_dl2(model, x, y, EPS, STEPS, gen)
            loss.mean().backward()
            opt.step()

        def attack_step(model=model, opt=opt, gen=gen_a) -> None:
            opt.zero_grad(set_to_none=True)
            loss, _ = library_attack_dl2(model, x, y, EPS, STEPS, gen)
            loss.mean().backward()
            opt.step()

        def ce_step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        def stable_step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            stable(model, x, y).loss.mean().backward()
            opt.step()

        # Interleave the timings so that machine noise hits all alike; keep each one's best.
        t_hand, t_comp, t_att = [], [], []
        for _ in range(rounds):
            t_hand.append(_timed(hand_step, **timing))
            t_comp.append(_timed(compiled_step, **timing))
            t_att.append(_timed(attack_step, **timing))
        hand, comp, att = min(t_hand), min(t_comp), min(t_att)
        name = f"loss/{kind}: CR, DL2, PGD-{STEPS}, batch {BATCH}"
        rows.append(
            {
                "benchmark": name,
                "baseline": "hand-written PGD + DL2",
                "ms": round(1e3 * comp, 2),
                "baseline_ms": round(1e3 * hand, 2),
                "ratio": round(comp / hand, 3),
                "target": "<= 1.05",
                "clock": clock,
            }
        )
        rows.append(
            {
                "benchmark": name,
                "baseline": "run_attack + hand-written margin and DL2",
                "ms": round(1e3 * comp, 2),
                "baseline_ms": round(1e3 * att, 2),
                "ratio": round(comp / att, 3),
                "target": "compiler overhead",
                "clock": clock,
            }
        )
        t_ce = _timed(ce_step, **timing)
        t_st = _timed(stable_step, **{**timing, "warmup": 1, "repeats": 3, "inner": 1})
        rows.append(
            {
                "benchmark": f"loss/{kind}: explanation stability, DL2, PGD-{STEPS} (surrogate)",
                "baseline": "plain cross-entropy step",
                "ms": round(1e3 * t_st, 2),
                "baseline_ms": round(1e3 * t_ce, 2),
                "ratio": round(t_st / t_ce, 1),
                "target": "report",
                "clock": clock,
            }
        )
    rows += size_sweep(robust, x, y, quick=quick, timing=timing, clock=clock)
    return rows


SIZES = (32, 100, 400, 1600)


def size_sweep(
    robust, x: Tensor, y: Tensor, *, quick: bool, timing: dict, clock: str
) -> list[dict]:
    """compiled / hand-written against the network's size: MLPs 64-w-w-10. The library's
    overhead is a number of tensor operations per attack step, fixed whatever the network, so
    the ratio should fall towards 1 as the network's own work grows."""
    rows = []
    for width in SIZES[:3] if quick else SIZES:
        model = build_model("mlp", (1, 8, 8), 10, hidden=[width, width], seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        gen_h = torch.Generator().manual_seed(0)
        robust.generator = torch.Generator().manual_seed(0)

        def compiled_step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            robust(model, x, y).loss.mean().backward()
            opt.step()

        def hand_step(model=model, opt=opt, gen=gen_h) -> None:
            opt.zero_grad(set_to_none=True)
            hand_pgd_dl2(model, x, y, EPS, STEPS, gen)[0].mean().backward()
            opt.step()

        t_hand, t_comp = [], []
        for _ in range(2):
            t_hand.append(_timed(hand_step, **timing))
            t_comp.append(_timed(compiled_step, **timing))
        hand, comp = min(t_hand), min(t_comp)
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            {
                "benchmark": f"loss/mlp 64-{width}-{width}-10 ({params} weights): CR, DL2, "
                f"PGD-{STEPS}, batch {BATCH}",
                "baseline": "hand-written PGD + DL2",
                "ms": round(1e3 * comp, 2),
                "baseline_ms": round(1e3 * hand, 2),
                "ratio": round(comp / hand, 3),
                "target": "<= 1.05",
                "clock": clock,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()
    for row in run(quick=args.quick, threads=args.threads, clock=args.clock):
        print(row)


if __name__ == "__main__":
    main()
