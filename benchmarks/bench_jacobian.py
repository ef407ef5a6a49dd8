"""Time Jacobian bounds (local Lipschitz constants) against CROWN on 100 digits.

The zoo's digits models, untrained and seeded (as in bench_bounds.py): the MLP 64-100-100-10 and
the CNN (conv 16 / 32, kernel 4, stride 2, then 100 hidden units). For each model and L-inf radius
(the ball intersected with the pixel box [0, 1], as in specs/digits.prop):

* `crown margins`: CROWN bounds of the 9 classification margins f_y - f_j of each sample (what
  `classification_robust` needs), the baseline;
* `jacobian crown/interval` ... `jacobian ibp/linear`: bounds of the whole Jacobian (10 x 64
  entries per sample) with CROWN's or IBP's pre-activation bounds (what explanation properties
  need), with the interval pass alone or with the linear pass too (`relaxation=`);
* `lipschitz crown/interval` ... `lipschitz ibp/linear`: the certified 2 -> 2 local Lipschitz
  constant (`lipschitz_constant`: the Jacobian bounds, then the chain's cuts), what
  `lipschitz_robust` needs.

Columns: milliseconds per sample (wall, best of repeated runs, one thread), the ratio to CROWN's
margins, for the linear rows the ratio of time and of mean Jacobian width to the interval row
of the same method (measured in the same run), the mean certified Lipschitz constant, the mean
of a sampled lower bound of the local Lipschitz constant (the largest spectral norm of the true
Jacobian at 32 points of each ball), and the fraction verified: every margin proved (crown
margins), the certified constant at most 10 (specs/digits.prop's L) for the Lipschitz rows.
auto_LiRPA 0.7.1's Jacobian bounds took about 0.5 s per sample on the same machine (`target`).

    python benchmarks/bench_jacobian.py            # full
    python benchmarks/bench_jacobian.py --quick    # fewer repeats, one radius
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from propdsl.data import load_dataset
from propdsl.models import build_model
from propdsl.region import Region
from propdsl.verify import bounds
from propdsl.verify.jacobian import jacobian_bounds, lipschitz_constant

BATCH = 100
L_SPEC = 10.0
LIRPA_MS = 500.0  # auto_LiRPA 0.7.1, per sample, measured on the same machine
SAMPLED_POINTS = 32


def digits(n: int = BATCH) -> tuple[Tensor, Tensor]:
    data = load_dataset("digits", split="test", seed=0)
    return data.x[:n], data.y[:n]


def models() -> dict[str, nn.Module]:
    return {
        "mlp 64-100-100-10": build_model("mlp", (1, 8, 8), 10, hidden=[100, 100], seed=0),
        "cnn 16/32 k4 s2": build_model("cnn", (1, 8, 8), 10, channels=[16, 32], seed=0),
    }


def margins(y: Tensor, classes: int = 10) -> Tensor:
    """C [B, K-1, K]: rows e_y - e_j for j != y."""
    eye = torch.eye(classes)
    rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    keep = ~torch.eye(classes, dtype=torch.bool)[y]
    return rows[keep].reshape(len(y), classes - 1, classes)


def _best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(wall seconds, result): the fastest of `repeats` runs after a warm-up."""
    result = fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def sampled_lipschitz(model: nn.Module, region: Region, points: int, seed: int = 0) -> Tensor:
    """max over `points` random points of each region of ||J(x)||_2: a lower bound [B] of the
    local 2 -> 2 Lipschitz constant."""

    def one(v: Tensor) -> Tensor:
        return model(v.unsqueeze(0)).squeeze(0)

    jac = torch.func.vmap(torch.func.jacrev(one))
    gen = torch.Generator().manual_seed(seed)
    best = torch.zeros(region.shape[0])
    for _ in range(points):
        J = jac(region.sample(gen)).flatten(2)
        best = torch.maximum(best, torch.linalg.matrix_norm(J, ord=2))
    return best


def run(quick: bool = False) -> list[dict[str, object]]:
    torch.set_num_threads(1)
    x, y = digits()
    C = margins(y)
    repeats = 3 if quick else 10
    rows: list[dict[str, object]] = []
    for name, model in models().items():
        model.eval()
        for eps in (0.02,) if quick else (0.02, 0.1):
            region = Region.ball(x, eps, math.inf, lo=0.0, hi=1.0)
            with torch.no_grad():
                crown, (lb, _) = _best_time(  # type: ignore[misc]
                    lambda m=model, r=region: bounds(m, region=r, method="crown", C=C), repeats
                )
                rows.append(
                    dict(
                        model=name,
                        eps=eps,
                        benchmark="jacobian",
                        method="crown margins",
                        ms=1e3 * crown / BATCH,
                        ratio=1.0,
                        verified=float((lb > 0).all(1).float().mean()),
                    )
                )

                def row(label, wall, name=name, eps=eps, crown=crown, **extra) -> dict:
                    return dict(
                        model=name,
                        eps=eps,
                        benchmark="jacobian",
                        method=label,
                        ms=1e3 * wall / BATCH,
                        baseline="crown margins",
                        baseline_ms=1e3 * crown / BATCH,
                        ratio=wall / crown,
                        target=LIRPA_MS,
                        **extra,
                    )

                for method in ("crown", "ibp"):
                    interval: dict[str, float] = {}
                    for relax in ("interval", "linear"):
                        wall, (lo, hi) = _best_time(  # type: ignore[misc]
                            lambda m=model, r=region, k=method, rx=relax: jacobian_bounds(
                                m, region=r, method=k, relaxation=rx
                            ),
                            repeats,
                        )
                        width = float((hi - lo).mean())
                        extra = _versus(interval, "jacobian", wall, width)
                        rows.append(row(f"jacobian {method}/{relax}", wall, **extra))
                        wall, L = _best_time(
                            lambda m=model, r=region, k=method, rx=relax: lipschitz_constant(
                                m, region=r, p=2, q=2, method=k, relaxation=rx
                            ),
                            repeats,
                        )
                        extra = _versus(interval, "lipschitz", wall, None)
                        rows.append(
                            row(
                                f"lipschitz {method}/{relax}",
                                wall,
                                lipschitz=float(L.mean()),  # type: ignore[union-attr]
                                verified=float((L <= L_SPEC).float().mean()),  # type: ignore[operator]
                                **extra,
                            )
                        )
            with torch.no_grad():
                sampled_l = sampled_lipschitz(model, region, 8 if quick else SAMPLED_POINTS)
            sampled = float(sampled_l.mean())
            for r in rows:
                if r["eps"] == eps and r["model"] == name and "lipschitz" in r:
                    r["sampled"] = sampled
    return rows


def _versus(
    interval: dict[str, float], kind: str, wall: float, width: float | None
) -> dict[str, float]:
    """The linear row's time (and width) over the interval row's, recorded in `interval` when
    the interval row comes first."""
    if f"{kind} wall" not in interval:
        interval[f"{kind} wall"] = wall
        if width is not None:
            interval[f"{kind} width"] = width
        return {}
    out = {"x_interval": wall / interval[f"{kind} wall"]}
    if width is not None:
        out["width_ratio"] = width / interval[f"{kind} width"]
    return out


def _table(rows: list[dict[str, object]]) -> str:
    head = f"{'model':<19} {'eps':>5} {'method':<24} {'ms/sample':>9} {'x crown':>8}"
    lines = [
        head + f" {'x interval':>10} {'width':>6} {'L bound':>8} {'L sampled':>9} {'verified':>8}"
    ]
    for r in rows:
        cells = []
        for key, size, fmt in (
            ("x_interval", 10, ".2f"),
            ("width_ratio", 6, ".3f"),
            ("lipschitz", 8, ".3f"),
            ("sampled", 9, ".3f"),
            ("verified", 8, ".2f"),
        ):
            cells.append(f"{r[key]:>{size}{fmt}}" if key in r else " " * size)
        lines.append(
            f"{r['model']:<19} {r['eps']:>5} {r['method']:<24} {r['ms']:>9.3f} "
            f"{r['ratio']:>8.2f} " + " ".join(cells)
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, one radius")
    args = parser.parse_args()
    print(f"digits, batch {BATCH}, L-inf ball & [0, 1], untrained zoo models, torch threads 1")
    print(_table(run(quick=args.quick)))


if __name__ == "__main__":
    main()
