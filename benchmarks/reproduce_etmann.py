"""Etmann, Lunz, Maass & Schoenlieb 2019, "On the connection between adversarial robustness and
saliency map interpretability": alignment grows with robustness, per image and across models.

    python benchmarks/reproduce_etmann.py [--data digits] [--seeds 3] [--out DIR] [--quick]

Models: an MLP trained with NLL + lambda * ||grad_x NLL||_2 (double backpropagation, as in
specs/methods/gradient_etmann.prop) at several lambda (0 is standard training). Per test image
(propdsl.metrics.etmann): the alignment alpha = |<x, g>| / ||g|| (g the input gradient of the
predicted class's logit), the robustness rho (the L2 distance to the nearest class change, by
APGD and bisection: an upper bound) and the linearised robustness rho~ with Etmann et al.'s
bound rho~ <= alpha + |beta| / ||g||. Per model: mean alignment, mean rho, the Spearman
correlation of alpha and rho over images, and the share of images where the bound holds; across
models: the Spearman correlation of mean rho and mean alignment. Writes results.json, table.md,
alignment.png (per image, one panel per lambda) and models.png (mean alignment against mean rho
of every model) into --out.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from propdsl.metrics import etmann_metrics, rank_correlation

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _reproduce as R  # noqa: E402

LAMBDAS = (0.0, 0.01, 0.1, 1.0)
BODY = "  loss      = cross_entropy + lambda * norm(grad(cross_entropy(f(x), y), x), 2)\n"


def spec_text(s: R.Settings) -> str:
    return R.header(s) + "\nparam lambda : Real = 0.0\n\n" + R.train_block(s, BODY)


def main(argv: list[str] | None = None) -> None:
    args = R.parser(__doc__.splitlines()[0], epochs=20, samples=200).parse_args(argv)
    s = R.settings(args, "etmann")
    R.setup_threads()
    started = time.perf_counter()
    test = R.test_data(s)
    # quick: three models, so the correlation across models is defined
    lambdas = (LAMBDAS[0], LAMBDAS[2], LAMBDAS[3]) if s.quick else LAMBDAS
    keys = (
        "accuracy",
        "mean_alignment",
        "mean_rho",
        "spearman_alignment_rho",
        "rho_tilde_within_bound",
    )
    per_seed: dict[str, dict[str, list[float]]] = {
        str(lam): {k: [] for k in keys} for lam in lambdas
    }
    models: list[dict[str, float]] = []
    scatter: dict[str, tuple[list[float], list[float]]] = {}
    for seed in s.seeds:
        for lam in lambdas:
            model = R.train_model(spec_text(s), seed, {"lambda": lam})
            m = etmann_metrics(model, test.x, generator=torch.Generator().manual_seed(seed))
            summ = m.summary()
            row = per_seed[str(lam)]
            row["accuracy"].append(R.accuracy(model, test.x, test.y))
            for k in keys[1:]:
                v = summ[k]
                row[k].append(float("nan") if v is None else float(v))
            models.append(
                {
                    "lambda": lam,
                    "seed": seed,
                    "mean_alignment": row["mean_alignment"][-1],
                    "mean_rho": row["mean_rho"][-1],
                }
            )
            if seed == s.seeds[0]:
                found = m.rho_found
                scatter[str(lam)] = (m.alignment[found].tolist(), m.rho[found].tolist())
            print(
                f"seed {seed} lambda {lam}: "
                + ", ".join(f"{k} {v[-1]:.4f}" for k, v in row.items()),
                file=sys.stderr,
            )
    across = rank_correlation(
        torch.tensor([r["mean_alignment"] for r in models]),
        torch.tensor([r["mean_rho"] for r in models]),
    )
    summary = {
        lam: {k: R.mean_std([v for v in vals if v == v]) for k, vals in cols.items()}
        for lam, cols in per_seed.items()
    }
    table = R.markdown(
        [
            "lambda",
            "accuracy %",
            "mean alpha",
            "mean rho (L2)",
            "Spearman(alpha, rho)",
            "bound holds %",
        ],
        [
            [
                lam,
                R.cell(summary[lam]["accuracy"]),
                R.cell(summary[lam]["mean_alignment"], pct=False),
                R.cell(summary[lam]["mean_rho"], pct=False),
                R.cell(summary[lam]["spearman_alignment_rho"], pct=False),
                R.cell(summary[lam]["rho_tilde_within_bound"]),
            ]
            for lam in per_seed
        ],
    )
    table += f"\n\nacross the {len(models)} models: Spearman(mean alpha, mean rho) = " + (
        "n/a" if across is None else f"{across:.3f}"
    )
    plot(s, scatter, models)
    R.write(
        s,
        "etmann",
        {
            "lambdas": list(lambdas),
            "per_seed": per_seed,
            "summary": summary,
            "models": models,
            "spearman_across_models": across,
        },
        table,
        started,
    )


def plot(s: R.Settings, scatter, models) -> None:
    plt = R.figure()
    fig, axes = plt.subplots(1, len(scatter), figsize=(2.4 * len(scatter), 2.5), sharey=True)
    axes = axes if len(scatter) > 1 else [axes]
    for ax, (lam, (a, r)) in zip(axes, scatter.items(), strict=True):
        ax.scatter(r, a, s=4, alpha=0.6)
        ax.set_title(f"lambda {lam}", fontsize=8)
        ax.set_xlabel("rho (L2)", fontsize=8)
    axes[0].set_ylabel("alignment alpha", fontsize=8)
    fig.suptitle(f"Etmann et al. 2019 on {s.data}: per image (seed 0)", fontsize=9)
    fig.tight_layout()
    s.out.mkdir(parents=True, exist_ok=True)
    fig.savefig(s.out / "alignment.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 3))
    for lam in sorted({r["lambda"] for r in models}):
        pts = [r for r in models if r["lambda"] == lam]
        ax.scatter(
            [r["mean_rho"] for r in pts], [r["mean_alignment"] for r in pts], label=f"lambda {lam}"
        )
    ax.set_xlabel("mean rho (L2)")
    ax.set_ylabel("mean alignment")
    ax.set_title("across models (one point per seed)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(s.out / "models.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
