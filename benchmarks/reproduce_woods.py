"""Woods, Chen & Teuscher 2019, "Adversarial explanations for understanding image classification
decisions and improved neural network robustness": the input-gradient regulariser against
standard and adversarial training, measured by attack ARA and BTR ARA.

    python benchmarks/reproduce_woods.py [--data digits] [--seeds 3] [--out DIR] [--quick]

Methods: standard training (ReLU; and half-Huber ReLU, to separate the activation's effect),
Woods et al.'s regulariser (cross-entropy + psi * mean |d s(x)/dx|^2 with s a random logit w.p.
0.8 else the margin, adaptive psi, half-Huber ReLU, as in specs/methods/gradient_woods.prop), and
PGD adversarial training (eps 0.1) for reference. Metrics (propdsl.metrics.woods): clean
accuracy, attack ARA (criterion argmax f(x) == y) and BTR ARA (softmax(f(x))_y > 1/C), areas
under A(e) - 1/C over the RMSE of a near-minimal perturbation found by APGD and bisection. Writes
results.json, table.md, ara.png (the A(e) curves) and explanations.png (adversarial
explanations of one test image per method) into --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from propdsl.metrics import Criterion, adversarial_explanations, woods_ara

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _reproduce as R  # noqa: E402

METHODS = ("standard", "standard_half_huber", "woods", "pgd")
HALF_HUBER = "half_huber(delta = 0.5)"
MAX_RMSE = 0.5  # the ARA integrates A(e) - 1/C up to this RMSE (pixels in [0, 1])

WOODS_BODY = """\
  adaptive  = woods_psi(weight = "psi", base = 220, rate = 0.02, target = 1.5, down = 0.01, up = 1)
  loss      = cross_entropy + psi * mean(grad(score(f(x), y), x) ^ 2)
"""
PGD_BODY = """\
  attack    = pgd(steps = 10, restarts = 1)
  loss      = max x' in ball(x, eps, inf) & pixels: cross_entropy(f(x'), y)
"""
DECLS = """
param eps : Real = 0.1
param psi : Real = 220.0

let pixels = box(0, 1)

# the margin of class c, and Woods et al.'s score: a random logit w.p. 0.8, else the margin
let margin(v, c) = v[c] - max j in classes: if j == c then min(v) else v[j]
let score(v, c) = if uniform() < 0.8 then v[random_class(v)] else margin(v, c)
"""


def spec_text(s: R.Settings, method: str) -> str:
    if method == "standard":
        block = R.train_block(s, "  loss      = cross_entropy\n")
    elif method == "standard_half_huber":
        block = R.train_block(s, "  loss      = cross_entropy\n", activation=HALF_HUBER)
    elif method == "woods":
        block = R.train_block(s, WOODS_BODY, activation=HALF_HUBER)
    else:
        block = R.train_block(s, PGD_BODY)
    return R.header(s) + DECLS + "\n" + block


def main(argv: list[str] | None = None) -> None:
    args = R.parser(__doc__.splitlines()[0], epochs=20, samples=200).parse_args(argv)
    s = R.settings(args, "woods")
    R.setup_threads()
    started = time.perf_counter()
    test = R.test_data(s)
    keys = ("accuracy", "attack_ara", "btr_ara")
    per_seed: dict[str, dict[str, list[float]]] = {m: {k: [] for k in keys} for m in METHODS}
    curves: dict[str, list[float]] = {}
    explanations = {}
    for seed in s.seeds:
        for method in METHODS:
            model = R.train_model(spec_text(s, method), seed)
            gen = torch.Generator().manual_seed(seed)
            attack = woods_ara(
                model, test.x, test.y, Criterion.ARGMAX, max_rmse=MAX_RMSE, generator=gen
            )
            btr = woods_ara(model, test.x, test.y, Criterion.BTR, max_rmse=MAX_RMSE, generator=gen)
            row = per_seed[method]
            row["accuracy"].append(R.accuracy(model, test.x, test.y))
            row["attack_ara"].append(attack.area)
            row["btr_ara"].append(btr.area)
            if seed == s.seeds[0]:
                curves[method] = list(attack.distances)
                explanations[method] = adversarial_explanations(
                    model, test.x[:1], radius=0.1, generator=gen
                )
            print(
                f"seed {seed} {method}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in row.items()),
                file=sys.stderr,
            )
    summary = {m: {k: R.mean_std(v) for k, v in cols.items()} for m, cols in per_seed.items()}
    table = R.markdown(
        ["method", "accuracy %", "attack ARA", "BTR ARA"],
        [
            [
                m,
                R.cell(summary[m]["accuracy"]),
                R.cell(summary[m]["attack_ara"], pct=False),
                R.cell(summary[m]["btr_ara"], pct=False),
            ]
            for m in METHODS
        ],
    )
    plot(s, curves, explanations, test.x[:1])
    R.write(
        s,
        "woods",
        {
            "methods": list(METHODS),
            "max_rmse": MAX_RMSE,
            "per_seed": per_seed,
            "summary": summary,
            "attack_distances_seed0": curves,
        },
        table,
        started,
    )


def plot(s: R.Settings, curves, explanations, image) -> None:
    plt = R.figure()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method, d in curves.items():
        t = torch.tensor(sorted(d))
        e = torch.linspace(0, MAX_RMSE, 200)
        share = (t[None, :] > e[:, None]).double().mean(1)
        ax.plot(e, share, label=method)
    ax.axhline(0.1, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("RMSE of the perturbation e")
    ax.set_ylabel("A(e): still correct")
    ax.set_title(f"Woods et al. 2019 on {s.data}: attack accuracy curves", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    s.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(s.out / "ara.png", dpi=110)
    plt.close(fig)

    methods = list(explanations)
    k = len(explanations[methods[0]].targets)
    fig, axes = plt.subplots(len(methods), k + 1, figsize=(0.9 * (k + 1), 0.95 * len(methods)))
    for i, m in enumerate(methods):
        pts = explanations[m].points[0]  # [targets, C, H, W] of the one image
        axes[i][0].imshow(image[0].mean(0), cmap="gray", vmin=0, vmax=1)
        axes[i][0].set_ylabel(m, fontsize=6)
        for t in range(k):
            axes[i][t + 1].imshow(pts[t].mean(0), cmap="gray", vmin=0, vmax=1)
            if i == 0:
                axes[i][t + 1].set_title(f"-> {t}", fontsize=6)
        for a in axes[i]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle("adversarial explanations (RMSE 0.1): image, then each target", fontsize=7)
    fig.tight_layout()
    fig.savefig(s.out / "explanations.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
