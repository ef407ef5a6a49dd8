"""Choose the certified-training recipe of `bench_verified.py`'s target rows on held-out data.

The test split is only looked at once a recipe is chosen. This study splits the 1,438 non-test
digits into 1,151 training and 287 validation images (a fixed permutation), trains the target
CNN (conv 16 k3 s1, conv 32 k4 s2, dense 1024) with each variant below and reports the share of
validation images CROWN-verified at eps 0.1 (`spec.verify`: APGD falsifier, then CROWN), the
falsified share and clean accuracy, and the same on the first 287 training images (the
generalisation gap). Every variant: 300 epochs, batch 32, learning rate 1e-3 with a cosine
schedule down to 1e-5, training radius 0.15 ramped up over 60 epochs, loss = cross-entropy +
the IBP (or CROWN-IBP) worst-case cross-entropy of the 9 margins; the bounds come from
`propdsl.verify.compute_bounds`. This is a plain loop, not `propdsl train`, so that the
variants (weight decay, beta mixing of CROWN-IBP, the cross-entropy weight) are one flag each.

    python benchmarks/select_recipe.py --jobs 2                  # every variant, seed 0
    python benchmarks/select_recipe.py --variants wd0.1 --seeds 0 1
"""

from __future__ import annotations

import argparse
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

import propdsl
from propdsl.region import Region
from propdsl.train import load_split
from propdsl.verify.bounds import compute_bounds

SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]
param eps : Real = 0.1
property robust(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1): argmax(f(x')) == y
train f on digits(split = "train", val_fraction = 0) { loss = cross_entropy }
"""


@dataclass(frozen=True)
class Recipe:
    weight_decay: float = 0.0  # AdamW's decoupled decay (0: Adam)
    train_eps: float = 0.15
    ramp: int = 60
    hidden: int = 1024
    ce_weight: float = 1.0  # weight of the clean cross-entropy beside the certified term
    beta: tuple[float, float] = (0.0, 0.0)  # CROWN-IBP share at the ramp's start and end
    epochs: int = 300


VARIANTS = {
    "ibp": Recipe(),
    "wd0.1": Recipe(weight_decay=0.1),
    "wd0.3": Recipe(weight_decay=0.3),
    "wd1": Recipe(weight_decay=1.0),
    "wd0.1-eps0.18": Recipe(weight_decay=0.1, train_eps=0.18),
    "wd0.1-hidden512": Recipe(weight_decay=0.1, hidden=512),
    "wd0.1-ramp100": Recipe(weight_decay=0.1, ramp=100),
    "ce0": Recipe(ce_weight=0.0),
    "crown_ibp-1to0": Recipe(beta=(1.0, 0.0)),
}


def splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = propdsl.load(SPEC)
    data = load_split(spec, spec.train_block, "train", split_seed=0)
    order = torch.randperm(len(data.x), generator=torch.Generator().manual_seed(123))
    n_val = int(0.2 * len(data.x))
    val, train = order[:n_val], order[n_val:]
    return data.x[train], data.y[train], data.x[val], data.y[val]


def margins_lower(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str):
    """Lower bounds [B, 9] of f_y - f_j over the clipped L-inf ball."""
    eye = torch.eye(10)
    rows = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    C = rows[torch.arange(10).unsqueeze(0) != y.unsqueeze(1)].reshape(len(y), 9, 10)
    region = Region.box((x - eps).clamp(0, 1), (x + eps).clamp(0, 1))
    return compute_bounds(net, region, method, C)[0]


def train_and_score(name: str, recipe: Recipe, seed: int) -> dict[str, object]:
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x_tr, y_tr, x_val, y_val = splits()
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, 1, 1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, 2, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 16, recipe.hidden),
        nn.ReLU(),
        nn.Linear(recipe.hidden, 10),
    )
    if recipe.weight_decay:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=recipe.weight_decay)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, recipe.epochs, eta_min=1e-5)
    for epoch in range(recipe.epochs):
        scale = min(1.0, (epoch + 1) / recipe.ramp)
        beta = recipe.beta[0] + (recipe.beta[1] - recipe.beta[0]) * scale
        order = torch.randperm(len(x_tr))
        for i in range(0, len(x_tr), 32):
            idx = order[i : i + 32]
            x, y = x_tr[idx], y_tr[idx]
            eps = recipe.train_eps * scale
            lower = margins_lower(net, x, y, eps, "ibp")
            if beta > 0:
                lower = beta * margins_lower(net, x, y, eps, "crown_ibp") + (1 - beta) * lower
            worst = torch.cat([lower.new_zeros(len(y), 1), -lower], dim=1)
            loss = recipe.ce_weight * F.cross_entropy(net(x), y) + torch.logsumexp(worst, 1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        schedule.step()
    net.eval()
    spec = propdsl.load(SPEC)
    row: dict[str, object] = dict(variant=name, seed=seed)
    for part, x, y in (("val", x_val, y_val), ("train", x_tr[: len(x_val)], y_tr[: len(x_val)])):
        with torch.no_grad():
            row[f"{part} clean"] = float((net(x).argmax(1) == y).float().mean())
        v = spec.verify(net, x, y, properties=["robust"], method="crown")["robust"]
        row[f"{part} verified"] = v.rate("verified")
        row[f"{part} falsified"] = v.rate("falsified")
    row["n"] = len(x_val)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=None, help="override (a smoke run)")
    args = parser.parse_args()
    tasks = []
    for name in args.variants:
        recipe = VARIANTS[name]
        if args.epochs is not None:
            recipe = replace(recipe, epochs=args.epochs, ramp=min(recipe.ramp, args.epochs))
        tasks += [(name, recipe, seed) for seed in args.seeds]
    if args.jobs <= 1:
        rows = [train_and_score(*t) for t in tasks]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            rows = list(pool.map(train_and_score, *zip(*tasks, strict=True)))
    print(
        f"{'variant':<18} {'seed':>4} {'val verified':>13} {'falsified':>9} {'clean':>6}"
        f" {'train verified':>15}"
    )
    for r in rows:
        n = int(r["n"])  # type: ignore[call-overload]
        verified = float(r["val verified"])  # type: ignore[arg-type]
        print(
            f"{r['variant']:<18} {r['seed']:>4} {verified:>6.3f} ({round(verified * n):>3})"
            f" {r['val falsified']:>9.3f} {r['val clean']:>6.3f} {r['train verified']:>15.3f}"
        )


if __name__ == "__main__":
    main()
