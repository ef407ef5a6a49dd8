"""Certified explanation stability with and without a curvature regulariser, on digits.

Trains `specs/explanation_certified.prop` twice per seed, with the same seed, epochs and data
split: **regularised** (the spec as written: cross-entropy plus `lambda = 5` times the change of
the saliency map under Gaussian noise) and **baseline** (`lambda = 0`: cross-entropy alone).
Both are verified (`propdsl verify`'s falsify-then-prove, CROWN Jacobian bounds) on the first
100 test images, for the spec's two properties at its radius (L-inf eps 0.1 within [0, 1]):

* `stable_saliency`: `norm(saliency(f, x', y) - saliency(f, x, y), 2)` at most 0.1 times
  `norm(saliency(f, x, y), 2)`;
* `aligned_saliency`: `cosine(saliency(f, x', y), saliency(f, x, y)) >= 0.8`.

Also measured: clean accuracy on the whole test split (359 images); the verified rate of both
properties over a grid of radii (the figure); and, for `stable_saliency`, the median over the
samples of the largest relative change of the saliency map that APGD finds (a lower bound of
the true worst case) and of the certified upper bound (`distance_bound` of the Jacobian bounds
over `norm(saliency(f, x, y), 2)`), which bracket the truth.

    python benchmarks/fig_explanation_stability.py                    # seeds 0, 1, 2
    python benchmarks/fig_explanation_stability.py --out DIR --seeds 0 --quick

Run folders, `results.json` and (with matplotlib) `explanation_stability.png` go to `--out`
(default `runs/fig_explanation_stability`). Equivalent commands for one seed:

    propdsl train specs/explanation_certified.prop --out runs/reg --threads 1
    propdsl train specs/explanation_certified.prop --out runs/base --threads 1 -p lambda=0
    propdsl verify specs/explanation_certified.prop --run runs/reg --threads 1
    propdsl verify specs/explanation_certified.prop --run runs/base --threads 1 -p lambda=0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import propdsl
from propdsl.attacks import APGD
from propdsl.explain import saliency
from propdsl.region import Region
from propdsl.runs import Run
from propdsl.train import TrainOptions, load_split, set_threads, train
from propdsl.verify.jacobian import distance_bound, jacobian_bounds
from propdsl.verify.report import verify_run

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "explanation_certified.prop"
OUT = ROOT / "runs" / "fig_explanation_stability"
PROPERTIES = ("stable_saliency", "aligned_saliency")
MODELS = {"baseline": {"lambda": 0.0}, "regularised": {}}  # param overrides of the spec
RADII = (0.02, 0.05, 0.1, 0.15, 0.2)
DELTAS = (0.05, 0.1, 0.25, 0.5)  # of stable_saliency, at the spec's radius
SAMPLES = 100
STATUSES = ("verified", "falsified", "unknown")  # unknown includes timeouts


@dataclass(frozen=True)
class Measurement:
    """One trained model of one seed."""

    model: str
    seed: int
    accuracy: float  # on the whole test split
    rates: dict[str, dict[str, float]]  # property -> verified / falsified / unknown
    curve: dict[str, list[tuple[float, float, float]]]  # property -> (eps, verified, falsified)
    deltas: list[tuple[float, float, float]]  # stable_saliency: (delta, verified, falsified)
    attacked: float  # median largest relative saliency change found by APGD
    certified: float  # median certified bound of the relative saliency change
    train_seconds: float
    verify_seconds: float


def measure(
    name: str, seed: int, out: Path, *, epochs: int | None = None, radii=RADII, deltas=DELTAS
) -> Measurement:
    """Train one model of the comparison with `seed`, then verify and attack it."""
    spec = propdsl.load(SPEC, MODELS[name])
    folder = out / f"seed{seed}" / name
    start = time.perf_counter()
    train(spec, TrainOptions(out=folder, epochs=epochs, seed=seed, threads=1, quiet=True))
    train_seconds = time.perf_counter() - start

    start = time.perf_counter()
    report = verify_run(spec, folder, samples=SAMPLES)  # writes verify.json, as the CLI does
    verify_seconds = time.perf_counter() - start
    rates = {
        p: {
            "verified": v.rate("verified"),
            "falsified": v.rate("falsified"),
            "unknown": v.rate("unknown") + v.rate("unknown (timeout)"),
        }
        for p, v in report.verdicts.items()
    }

    model = Run.open(folder).load_model("best")
    block = spec.verify_block
    assert block is not None
    test = load_split(spec, block, "test")  # the split of the run trained above (default seed)
    with torch.no_grad():
        accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
    x, y = test.x[:SAMPLES], test.y[:SAMPLES]

    curve: dict[str, list[tuple[float, float, float]]] = {p: [] for p in PROPERTIES}
    for eps in radii:
        at = spec.with_params(eps=eps)
        verdicts = at.verify(model, x, y, list(PROPERTIES), generator=_generator(seed))
        for p in PROPERTIES:
            curve[p].append((eps, verdicts[p].rate("verified"), verdicts[p].rate("falsified")))

    swept = []
    for delta in deltas:
        at = spec.with_params(delta=delta)
        verdicts = at.verify(model, x, y, ["stable_saliency"], generator=_generator(seed))
        stable = verdicts["stable_saliency"]
        swept.append((delta, stable.rate("verified"), stable.rate("falsified")))

    attacked, certified = relative_change(spec, model, x, y, seed)
    return Measurement(
        name,
        seed,
        accuracy,
        rates,
        curve,
        swept,
        float(attacked.median()),
        float(certified.median()),
        train_seconds,
        verify_seconds,
    )


def relative_change(
    spec, model: nn.Module, x: Tensor, y: Tensor, seed: int
) -> tuple[Tensor, Tensor]:
    """Per sample, `norm(s(x') - s(x), 2) / norm(s(x), 2)` at the APGD point of `stable_saliency`
    (a lower bound of its maximum over the ball), and the certified upper bound of that maximum."""
    eps = float(spec.params["eps"])
    attack = APGD(steps=50, restarts=2)
    found = spec.loss("stable_saliency", logic="dl2", attack=attack, generator=_generator(seed))
    point = found(model, x, y).counterexample["x'"].detach()
    g = saliency(model, x, y, create_graph=False).detach()
    g_point = saliency(model, point, y, create_graph=False).detach()
    norm = g.flatten(1).norm(dim=1)
    attacked = (g_point - g).flatten(1).norm(dim=1) / norm
    region = Region.ball(x, eps, math.inf, lo=0.0, hi=1.0)
    with torch.no_grad():
        lo, hi = jacobian_bounds(model, region=region, outputs=y[:, None])
        certified = distance_bound(lo[:, 0], hi[:, 0], g, 2) / norm
    return attacked, certified


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def table(results: list[Measurement]) -> str:
    """Per seed and model, then the mean over seeds."""
    head = (
        f"{'model':<12} {'seed':>4} {'clean acc':>9} "
        + " ".join(f"{p + ' v/f/u':>26}" for p in PROPERTIES)
        + f" {'rel. change: attacked':>21} {'certified':>9} {'train s':>7}"
    )
    lines = [head, "-" * len(head)]

    def line(name: str, seed: str, group: list[Measurement]) -> str:
        def mean(values) -> float:
            return statistics.fmean(values)

        cells = []
        for p in PROPERTIES:
            v, f, u = [mean([r.rates[p][s] for r in group]) for s in STATUSES]
            cells.append(f"{f'{v:.0%} / {f:.0%} / {u:.0%}':>26}")
        return (
            f"{name:<12} {seed:>4} {mean([r.accuracy for r in group]):>9.3f} "
            + " ".join(cells)
            + f" {mean([r.attacked for r in group]):>21.3f}"
            + f" {mean([r.certified for r in group]):>9.3f}"
            + f" {mean([r.train_seconds for r in group]):>7.1f}"
        )

    for r in results:
        lines.append(line(r.model, str(r.seed), [r]))
    if len({r.seed for r in results}) > 1:
        lines.append("-" * len(head))
        for name in MODELS:
            lines.append(line(name, "mean", [r for r in results if r.model == name]))
    return "\n".join(lines)


def _mean_curve(group: list[Measurement], prop: str, column: int) -> list[float]:
    """Mean over the group's seeds of one column (1 verified, 2 falsified) of a curve."""
    runs = [[point[column] for point in r.curve[prop]] for r in group]
    return [statistics.fmean(col) for col in zip(*runs, strict=True)]


def curves(results: list[Measurement]) -> str:
    """Verified (and falsified) rate against the radius, mean over seeds."""
    radii = [point[0] for point in results[0].curve[PROPERTIES[0]]]
    head = f"{'property':<17} {'model':<12} " + " ".join(f"{e:>10}" for e in radii)
    lines = [
        f"verified / falsified by L-inf radius (first {SAMPLES} test images, mean over seeds)",
        head,
    ]
    for p in PROPERTIES:
        for name in MODELS:
            group = [r for r in results if r.model == name]
            pairs = zip(_mean_curve(group, p, 1), _mean_curve(group, p, 2), strict=True)
            cells = " ".join(f"{f'{v:.0%} / {f:.0%}':>10}" for v, f in pairs)
            lines.append(f"{p:<17} {name:<12} {cells}")
    return "\n".join(lines)


def delta_table(results: list[Measurement]) -> str:
    """stable_saliency's verified / falsified rate against delta, mean over seeds."""
    deltas = [d for d, _, _ in results[0].deltas]
    head = f"{'model':<12} " + " ".join(f"{d:>10}" for d in deltas)
    eps = propdsl.load(SPEC).params["eps"]
    lines = [f"stable_saliency at eps {eps}: verified / falsified by delta (mean over seeds)", head]
    for name in MODELS:
        group = [r for r in results if r.model == name]
        cells = []
        for i in range(len(deltas)):
            v = statistics.fmean(r.deltas[i][1] for r in group)
            f = statistics.fmean(r.deltas[i][2] for r in group)
            cells.append(f"{f'{v:.0%} / {f:.0%}':>10}")
        lines.append(f"{name:<12} " + " ".join(cells))
    return "\n".join(lines)


def figure(results: list[Measurement], path: Path) -> Path | None:
    """Verified (solid, the band spans the seeds) and falsified (dashed) rates against the
    radius, one panel per property; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    radii = [point[0] for point in results[0].curve[PROPERTIES[0]]]
    fig, axes = plt.subplots(1, len(PROPERTIES), figsize=(9, 3.4), sharey=True)
    captions = {
        "stable_saliency": "relative L2 change <= 0.1",
        "aligned_saliency": "cosine >= 0.8",
    }
    for ax, p in zip(axes, PROPERTIES, strict=True):
        for name, colour in zip(MODELS, ("tab:grey", "tab:blue"), strict=True):
            group = [r for r in results if r.model == name]
            ax.plot(radii, _mean_curve(group, p, 1), marker="o", color=colour, label=name)
            if len(group) > 1:
                runs = [[point[1] for point in r.curve[p]] for r in group]
                low = [min(col) for col in zip(*runs, strict=True)]
                high = [max(col) for col in zip(*runs, strict=True)]
                ax.fill_between(radii, low, high, color=colour, alpha=0.2, linewidth=0)
            falsified = _mean_curve(group, p, 2)
            if any(falsified):
                ax.plot(radii, falsified, "--", color=colour, label=f"{name}: falsified")
        ax.set_title(f"{p}: {captions[p]}", fontsize=9)
        ax.set_xlabel("L-inf radius eps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"share of {SAMPLES} test images")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7, loc="center right")  # the colours are the same in every panel
    fig.suptitle("verified (solid) and falsified (dashed)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(
    seeds, out: Path, *, epochs: int | None = None, radii=RADII, deltas=DELTAS
) -> list[Measurement]:
    return [
        measure(name, s, out, epochs=epochs, radii=radii, deltas=deltas)
        for s in seeds
        for name in MODELS
    ]


def run(quick: bool = False) -> list[dict[str, object]]:
    """For benchmarks/run.py: one row per model and seed (seed 0 only with `quick`)."""
    threads = torch.get_num_threads()
    set_threads(1)  # the documented figures were taken on one thread
    try:
        if quick:
            results = compare((0,), OUT, radii=(0.1,), deltas=())
        else:
            results = compare((0, 1, 2), OUT)
    finally:
        torch.set_num_threads(threads)
    return [
        {
            "benchmark": "explanation_stability",
            "model": r.model,
            "seed": r.seed,
            "accuracy": r.accuracy,
            **{f"{p}.{k}": v for p in PROPERTIES for k, v in r.rates[p].items()},
            "attacked": r.attacked,
            "certified": r.certified,
            "train_s": r.train_seconds,
        }
        for r in results
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder (default {OUT})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="override the spec's 30 epochs")
    parser.add_argument("--quick", action="store_true", help="the spec's radius only")
    args = parser.parse_args()
    set_threads(1)
    radii, deltas = ((0.1,), ()) if args.quick else (RADII, DELTAS)
    results = compare(args.seeds, args.out, epochs=args.epochs, radii=radii, deltas=deltas)
    print(f"{SPEC.relative_to(ROOT)}: eps 0.1 (L-inf, pixels in [0, 1]), first {SAMPLES} test")
    print("images, CROWN Jacobian bounds; v/f/u = verified / falsified / unknown")
    print(table(results))
    if len(radii) > 1:
        print()
        print(curves(results))
    if deltas:
        print()
        print(delta_table(results))
    args.out.mkdir(parents=True, exist_ok=True)
    data = {"spec": str(SPEC.relative_to(ROOT)), "results": [asdict(r) for r in results]}
    (args.out / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    print(f"results: {args.out / 'results.json'}")
    if len(radii) > 1:
        png = figure(results, args.out / "explanation_stability.png")
        if png is not None:
            print(f"figure: {png}")


if __name__ == "__main__":
    main()
