"""Lipschitz robustness: certified local Lipschitz constants, and the property they decide.

    python examples/lipschitz_robustness.py

specs/lipschitz_robustness.prop states Casadio et al.'s (2022) Lipschitz robustness (`lipschitz`:
one point fixed at the image, L-inf on both sides) and the stronger two-point form
(`lipschitz_two_point`): on the L-inf ball of radius eps around each image the network is
L-Lipschitz from the L2 norm of the input to the L2 norm of the logits,
`norm(f(x1) - f(x2), 2) <= L * norm(x1 - x2, 2)` for every pair of points of the ball. Both are
outside the linear fragment of the verifier; they are decided by Jacobian bounds
(`propdsl.verify.jacobian`). This script studies the two-point form.

The script trains a small MLP on the cross-entropy for a few epochs, then on the first 50 test
images at eps = 0.05:

* computes the certified local constant of each ball (`lipschitz_constant`, an upper bound), and
  a sampled one (a lower bound: the largest difference quotient of random pairs of points and
  the largest spectral norm of the Jacobian at random points of the ball); the true constant
  lies in between, so the sampled one never exceeds the certified one;
* verifies the property (`spec.verify`: an attack on pairs of points first, then the Jacobian
  bounds) for a few values of L: below the sampled constants it is falsified, above the
  certified ones verified.

About 5 s on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

import propdsl
from propdsl.data import load_dataset
from propdsl.models import build_model
from propdsl.region import Region
from propdsl.verify.jacobian import lipschitz_constant

SPEC = Path(__file__).resolve().parent.parent / "specs" / "lipschitz_robustness.prop"


def sampled_constant(model, region: Region, generator: torch.Generator, draws: int = 32):
    """A lower bound [B] of the L2 -> L2 Lipschitz constant of `model` on each region."""
    best = torch.zeros(region.centre.shape[0])
    jacobian = torch.func.vmap(torch.func.jacrev(lambda v: model(v[None])[0]))
    with torch.no_grad():
        for _ in range(draws):
            a, b = region.sample(generator), region.sample(generator)
            quotient = (model(a) - model(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)
            norms = torch.linalg.matrix_norm(jacobian(a).flatten(2), ord=2)
            best = torch.maximum(best, torch.maximum(quotient, norms))
    return best


def main(epochs: int = 10, samples: int = 50, eps: float = 0.05, seed: int = 0) -> None:
    torch.manual_seed(seed)
    spec = propdsl.load(SPEC, params={"eps": eps})
    print("lipschitz_two_point:", spec.property("lipschitz_two_point").describe())
    data = load_dataset("digits", split="train", seed=seed)
    test = load_dataset("digits", split="test", seed=seed, limit=samples)
    x = test.x

    model = build_model("mlp", data.input_shape, data.num_classes, hidden=[64], seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(data), generator=order).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(data.x[batch]), data.y[batch]).backward()
            optimizer.step()
    model.eval()
    accuracy = (model(x).argmax(1) == test.y).float().mean().item()

    region = Region.ball(x, eps, float("inf"), lo=0.0, hi=1.0)
    certified = lipschitz_constant(model, region=region, p=2, q=2)
    sampled = sampled_constant(model, region, torch.Generator().manual_seed(seed))
    assert (sampled <= certified * (1 + 1e-4)).all(), "a sampled constant exceeds the bound"
    print(f"clean accuracy {accuracy:.1%}; local L2 Lipschitz constants on the balls:")
    print(
        f"  sampled (lower bounds)   median {sampled.median().item():.3f}, "
        f"max {sampled.max().item():.3f}"
    )
    print(
        f"  certified (upper bounds) median {certified.median().item():.3f}, "
        f"max {certified.max().item():.3f}"
    )

    print(f"\n{'L':>7s} {'verified':>9s} {'falsified':>10s} {'unknown':>8s}")
    values = (sampled.min() / 2, sampled.median(), certified.median(), certified.max() * 1.01)
    for L in (v.item() for v in values):
        name = "lipschitz_two_point"
        verdicts = spec.with_params(L=L).verify(model, x, None, [name])[name]
        print(
            f"{L:7.3f} {verdicts.rate('verified'):9.0%} {verdicts.rate('falsified'):10.0%} "
            f"{verdicts.rate('unknown'):8.0%}"
        )
        proved = torch.tensor([s == "verified" for s in verdicts.status])
        assert not (proved & (sampled > L)).any(), "verified below a sampled constant"
    print("\nno image is verified for an L below its sampled constant")


if __name__ == "__main__":
    main()
