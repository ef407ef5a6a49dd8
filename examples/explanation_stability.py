"""Explanation stability: the saliency map keeps its direction on the whole ball.

    python examples/explanation_stability.py

specs/explanation_stability.prop states `cosine(saliency(f, x', y), saliency(f, x, y)) >= tau`
for every x' in the L-inf ball of radius eps (pixels kept in [0, 1]): the explanation of the true
class may not turn by much when the image moves a little. `saliency` is an input gradient, so
the property is outside the verifier's linear fragment; it is decided by bounds of the network's
Jacobian over the ball (`propdsl.verify.jacobian`).

The saliency of a ReLU network is piecewise constant: its input gradient is zero almost
everywhere, so an attack on the cosine cannot move. The script shows that first (the attack
warns, and stays put), then how `surrogate_beta` gets it moving. The rest uses a smooth
(softplus) MLP trained on the cross-entropy for a few epochs. On the first 50 test images, for
a few radii:

* the smallest cosine an APGD attack finds (an upper bound of the worst case),
* the certified lower bound of the cosine from the Jacobian bounds (`cosine_lower_bound`),
* the verdicts of `spec.verify`; verified images are those whose certified bound is >= tau.

The attacked cosine never lies below the certified bound. About 10 s on a CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

import propdsl
from propdsl.data import load_dataset
from propdsl.explain import saliency
from propdsl.models import build_model
from propdsl.region import Region
from propdsl.verify.jacobian import cosine_lower_bound, jacobian_bounds

SPEC = Path(__file__).resolve().parent.parent / "specs" / "explanation_stability.prop"
COSINE = (
    "forall x' in ball(x, eps, inf) & pixels: cosine(saliency(f, x', y), saliency(f, x, y)) >= 1"
)


def train(data, *, activation: str, epochs: int, seed: int) -> torch.nn.Module:
    options = {"beta": 5.0} if activation == "softplus" else {}
    model = build_model(
        "mlp",
        data.input_shape,
        data.num_classes,
        hidden=[64],
        activation=activation,
        seed=seed,
        **options,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(data), generator=order).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(data.x[batch]), data.y[batch]).backward()
            optimizer.step()
    return model.eval()


def smallest_cosine(spec, model, x, y, attack, seed: int) -> torch.Tensor:
    """The cosine at the attack's point: the DL2 value of `cosine >= 1` is 1 - cosine there."""
    check = spec.formula(COSINE).loss(
        "formula", logic="dl2", attack=attack, generator=torch.Generator().manual_seed(seed)
    )
    return 1 - check(model, x, y).value.detach()


def main(epochs: int = 8, samples: int = 50, seed: int = 0) -> None:
    torch.manual_seed(seed)
    spec = propdsl.load(SPEC)
    tau = spec.params["tau"]
    print("stable_saliency:", spec.property("stable_saliency").describe())
    data = load_dataset("digits", split="train", seed=seed)
    test = load_dataset("digits", split="test", seed=seed, limit=samples)
    x, y = test.x, test.y

    # A ReLU network: without a surrogate the attack on the cosine has no gradient to follow.
    relu = train(data, activation="relu", epochs=epochs, seed=seed)
    for beta in (None, 10.0):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attack = propdsl.APGD(steps=20, surrogate_beta=beta)
            cos = smallest_cosine(spec.with_params(eps=0.05), relu, x, y, attack, seed)
        flat = any("VanishingGradient" in type(w.message).__name__ for w in caught)
        print(
            f"ReLU MLP, surrogate_beta={beta}: smallest cosine found {cos.min().item():.3f}"
            f"{' (the attack warned: zero input gradient)' if flat else ''}"
        )

    model = train(data, activation="softplus", epochs=epochs, seed=seed)
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"\nsoftplus MLP, clean accuracy {accuracy:.1%}; tau = {tau}")
    g = saliency(model, x, y, create_graph=False)
    print(
        f"{'eps':>5s} {'attacked cos':>13s} {'certified cos':>14s} {'verified':>9s} "
        f"{'falsified':>10s} {'unknown':>8s}"
    )
    for eps in (0.05, 0.1, 0.2):
        at = spec.with_params(eps=eps)
        attacked = smallest_cosine(at, model, x, y, propdsl.APGD(steps=30), seed)
        region = Region.ball(x, eps, float("inf"), lo=0.0, hi=1.0)
        lo, hi = jacobian_bounds(model, region=region, outputs=y[:, None])
        certified = cosine_lower_bound(lo[:, 0], hi[:, 0], g)
        assert (attacked >= certified - 1e-5).all(), "the attack went below the certified bound"
        v = at.verify(model, x, y, ["stable_saliency"])["stable_saliency"]
        proved = [s == "verified" for s in v.status]
        assert proved == (certified >= tau).tolist(), "the verifier decides by the same bound"
        print(
            f"{eps:5.2f} {attacked.median().item():13.3f} {certified.median().item():14.3f} "
            f"{v.rate('verified'):9.0%} {v.rate('falsified'):10.0%} {v.rate('unknown'):8.0%}"
        )
    print("\n(cosines: medians over the images; verified where the certified cosine >= tau)")


if __name__ == "__main__":
    main()
