"""Time IBP, CROWN and alpha-CROWN on 100 digits, against a plain forward pass.

Untrained models (seeded), the ones auto_LiRPA 0.7.1 was timed on: an MLP 64-100-100-10 and a CNN
(conv 16 / 32, kernel 4, stride 2, then 100 hidden units). The query is classification
robustness: the specification rows are the 9 margins f_y - f_j of each sample's label, over an
L-inf ball (not clipped). Times are the best of repeated runs on one thread; ratios are against
the forward pass of the same batch measured in the same run.

    python benchmarks/bench_bounds.py            # full
    python benchmarks/bench_bounds.py --quick    # fewer repeats
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from propdsl.region import Region
from propdsl.verify import AlphaOptions, Method, bounds

EPS = 0.02
BATCH = 100


def digits(n: int = BATCH) -> tuple[Tensor, Tensor]:
    data = load_digits()
    x = torch.tensor(data.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)
    return x, torch.tensor(data.target[:n])


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
        nn.Linear(100, 10),
    )  # fmt: skip


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 2 * 2, 100), nn.ReLU(), nn.Linear(100, 10),
    )  # fmt: skip


def margins(y: Tensor, classes: int = 10) -> Tensor:
    """C [B, K-1, K]: rows e_y - e_j for j != y."""
    eye = torch.eye(classes)
    rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)  # [B, K, K]
    keep = ~torch.eye(classes, dtype=torch.bool)[y]  # drop j == y
    return rows[keep].reshape(len(y), classes - 1, classes)


def _best_time(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds, result): the least disturbed of `repeats` runs after a
    warm-up (minima, as the machines are shared)."""
    result = fn()
    wall, cpu = math.inf, math.inf
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, result


def run(quick: bool = False) -> list[dict[str, object]]:
    """One row per (model, method): wall and CPU seconds per 100 samples, the wall-time ratio to
    a forward pass of the same batch, the mean lower bound of the margins (tighter is larger)
    and the fraction of samples verified (every margin's lower bound > 0)."""
    torch.set_num_threads(1)
    x, y = digits()
    C = margins(y)
    region = Region.ball(x, EPS)
    rows: list[dict[str, object]] = []
    repeats = 3 if quick else 10
    options = AlphaOptions(iterations=20, lr=0.1)
    for name, factory in (("mlp 64-100-100-10", mlp), ("cnn 16/32 k4 s2", cnn)):
        torch.manual_seed(0)
        model = factory().eval()
        with torch.no_grad():
            forward, forward_cpu, _ = _best_time(lambda model=model: model(x), 20 * repeats)
            rows.append(dict(model=name, method="forward", seconds=forward, cpu=forward_cpu))
            for method in Method:
                reps = max(1, repeats // 5) if method is Method.ALPHA_CROWN else repeats

                def call(model=model, method=method) -> tuple[Tensor, Tensor]:
                    return bounds(model, region=region, method=method, C=C, options=options)

                wall, cpu, (lb, _) = _best_time(call, reps)  # type: ignore[misc]
                rows.append(
                    dict(
                        model=name,
                        method=method.value,
                        seconds=wall,
                        cpu=cpu,
                        ratio=wall / forward,
                        bound=float(lb.mean()),
                        verified=float((lb > 0).all(dim=1).float().mean()),
                    )
                )
    return rows


def _table(rows: list[dict[str, object]]) -> str:
    head = f"{'model':<20} {'method':<12} {'s / 100':>9} {'cpu s':>9} {'x forward':>10}"
    lines = [head + f" {'mean lb':>8} {'verified':>9}"]
    for r in rows:
        ratio = f"{r['ratio']:.1f}" if "ratio" in r else "1"
        bound = f"{r['bound']:.4f}" if "bound" in r else ""
        verified = f"{r['verified']:.2f}" if "verified" in r else ""
        lines.append(
            f"{r['model']:<20} {r['method']:<12} {r['seconds']:>9.5f} {r['cpu']:>9.5f} "
            f"{ratio:>10} {bound:>8} {verified:>9}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    print(f"digits, batch {BATCH}, L-inf eps {EPS}, untrained models, torch threads 1")
    print(_table(run(quick=args.quick)))


if __name__ == "__main__":
    main()
