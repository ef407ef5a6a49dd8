"""Casadio et al. 2022, "Neural network robustness as a verification property: a principled case
study": constraint security of every training method against every robustness property.

    python benchmarks/reproduce_casadio.py [--data digits] [--seeds 3] [--out DIR] [--quick]

Properties (x-hat the data point, B = the L-inf ball of radius eps around it, inside [0, 1]):
SR (softmax outputs move by at most delta), LR (||f(x) - f(x-hat)||_inf <= L ||x - x-hat||_inf,
one point fixed, L = 10) and SCR (the true class keeps softmax probability >= eta = 0.7), stated
inline below exactly so. Methods: the baseline (cross-entropy), data augmentation with random
noise in B, a static FGSM-augmented training set (made once), PGD adversarial training, and DL2
training on each of SR, SCR and LR. Constraint security: the share of test points where the
property holds at the point of the paper's oracle (signed gradient steps of 0.01, projected, 50
steps, 1 restart). Writes results.json, table.md and security.png into --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import propdsl

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _reproduce as R  # noqa: E402

EPS, DELTA, LIPSCHITZ, ETA = 0.1, 0.1, 10.0, 0.7
PROPERTIES = ("SR", "LR", "SCR")
METHODS = ("baseline", "noise", "fgsm", "pgd", "dl2_sr", "dl2_scr", "dl2_lr")
ORACLE_LR, ORACLE_STEPS = 0.01, 50


def properties_text() -> str:
    return f"""
param eps : Real = {EPS}
param delta : Real = {DELTA}
param L : Real = {LIPSCHITZ}
param eta : Real = {ETA}
param weight : Real = 1.0

let pixels = box(0, 1)

property SR(x) =
  forall x' in ball(x, eps, inf) & pixels:
    norm(softmax(f(x')) - softmax(f(x)), inf) <= delta

property LR(x) =
  forall x' in ball(x, eps, inf) & pixels:
    norm(f(x') - f(x), inf) <= L * norm(x' - x, inf)

property SCR(x, y) =
  forall x' in ball(x, eps, inf) & pixels:
    softmax(f(x'))[y] >= eta
"""


def method_body(method: str) -> str:
    pgd = "  attack    = pgd(steps = 10, restarts = 1)\n"
    if method == "baseline":
        return "  loss      = cross_entropy\n"
    if method == "noise":  # a uniform random point of B (PGD with 0 steps: its random start)
        return (
            "  attack    = pgd(steps = 0)\n"
            "  loss      = max x' in ball(x, eps, inf) & pixels: cross_entropy(f(x'), y)\n"
        )
    if method == "fgsm":
        return f"  augment   = fgsm(eps = {EPS})\n  loss      = cross_entropy\n"
    if method == "pgd":
        return pgd + "  loss      = max x' in ball(x, eps, inf) & pixels: cross_entropy(f(x'), y)\n"
    prop = method.removeprefix("dl2_").upper()
    return pgd + f"  logic     = dl2\n  loss      = cross_entropy + weight * {prop}\n"


def spec_text(s: R.Settings, method: str) -> str:
    return R.header(s) + properties_text() + "\n" + R.train_block(s, method_body(method))


def security(spec, model, x, y, prop: str, seed: int) -> float:
    """Share of samples where `prop` holds at the oracle's point (Casadio et al.'s attack:
    signed steps of ORACLE_LR, projected, ORACLE_STEPS steps, one restart)."""
    oracle = propdsl.PGD(steps=ORACLE_STEPS, restarts=1, step_size=ORACLE_LR * ORACLE_STEPS / EPS)
    check = spec.loss(prop, attack=oracle, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # the attack takes its own input gradients
        return float(check(model, x, y).satisfied.float().mean())


def main(argv: list[str] | None = None) -> None:
    args = R.parser(__doc__.splitlines()[0], epochs=20, samples=200).parse_args(argv)
    s = R.settings(args, "casadio")
    R.setup_threads()
    started = time.perf_counter()
    test = R.test_data(s)
    per_seed: dict[str, dict[str, list[float]]] = {
        m: {k: [] for k in ("accuracy", *PROPERTIES)} for m in METHODS
    }
    for seed in s.seeds:
        for method in METHODS:
            text = spec_text(s, method)
            model = R.train_model(text, seed)
            spec = propdsl.load(text)
            per_seed[method]["accuracy"].append(R.accuracy(model, test.x, test.y))
            for prop in PROPERTIES:
                per_seed[method][prop].append(security(spec, model, test.x, test.y, prop, seed))
            print(
                f"seed {seed} {method}: "
                + ", ".join(f"{k} {v[-1]:.3f}" for k, v in per_seed[method].items()),
                file=sys.stderr,
            )
    summary = {m: {k: R.mean_std(v) for k, v in cols.items()} for m, cols in per_seed.items()}
    table = R.markdown(
        ["method", "accuracy %", *(f"{p} security %" for p in PROPERTIES)],
        [[m, *(R.cell(summary[m][k]) for k in ("accuracy", *PROPERTIES))] for m in METHODS],
    )
    plot(s, summary)
    R.write(
        s,
        "casadio",
        {
            "params": {"eps": EPS, "delta": DELTA, "L": LIPSCHITZ, "eta": ETA},
            "oracle": {"lr": ORACLE_LR, "steps": ORACLE_STEPS, "restarts": 1},
            "methods": list(METHODS),
            "properties": list(PROPERTIES),
            "per_seed": per_seed,
            "summary": summary,
        },
        table,
        started,
    )


def plot(s: R.Settings, summary) -> None:
    plt = R.figure()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / len(PROPERTIES)
    for i, prop in enumerate(PROPERTIES):
        means = [100 * summary[m][prop]["mean"] for m in METHODS]
        stds = [100 * summary[m][prop]["std"] for m in METHODS]
        pos = [j + (i - 1) * width for j in range(len(METHODS))]
        ax.bar(pos, means, width, yerr=stds, capsize=2, label=prop)
    ax.set_xticks(range(len(METHODS)), METHODS, fontsize=8)
    ax.set_ylabel("constraint security %")
    ax.set_ylim(0, 100)
    ax.set_title(f"Casadio et al. 2022 on {s.data}: security by method (eps {EPS})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    s.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(s.out / "security.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
