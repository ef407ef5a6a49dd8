"""Classification robustness: train with the property, then attack it and verify it.

    python examples/classification_robustness.py

specs/classification_robustness.prop states that every image within eps (L-inf, pixels kept in
[0, 1]) of a test image gets the test label, twice: with the prelude's template (`robust`) and
written out (`robust_direct`). The script trains a small MLP twice for a few epochs, on the
cross-entropy alone and on the spec's own objective (`cross_entropy + 0.5 * robust` under DL2,
with a PGD attack inside the loss), and reports for each, on the first 100 test images:

* clean accuracy;
* constraint security: the share of images where the property holds at the point of a strong
  APGD attack, independent of the training logic (an upper bound of the robust share);
* `spec.verify`: `falsified` (the attack found a counterexample), `verified` (CROWN bounds prove
  the property on the whole ball) or `unknown`.

Verified can never exceed security, and the template and the written-out property get the same
verdicts; the script checks both. About 10 s on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

import propdsl
from propdsl.data import load_dataset
from propdsl.models import build_model

SPEC = Path(__file__).resolve().parent.parent / "specs" / "classification_robustness.prop"


def train(spec, data, *, property_loss: bool, epochs: int, seed: int) -> torch.nn.Module:
    """A small MLP trained on the spec's objective, or on the cross-entropy alone."""
    model = build_model("mlp", data.input_shape, data.num_classes, hidden=[64], seed=seed)
    objective = spec.objective(generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(data), generator=order).split(64):
            x, y = data.x[batch], data.y[batch]
            if property_loss:
                loss = objective(model, x, y)
            else:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main(epochs: int = 10, samples: int = 100, seed: int = 0) -> None:
    torch.manual_seed(seed)
    spec = propdsl.load(SPEC)
    print("robust:", spec.property("robust").describe())
    data = load_dataset("digits", split="train", seed=seed)
    test = load_dataset("digits", split="test", seed=seed, limit=samples)
    x, y = test.x, test.y
    strong = propdsl.APGD(steps=50, restarts=2)

    print(
        f"\n{'training':22s} {'eps':>5s} {'clean':>6s} {'secure':>7s} {'verified':>9s} "
        f"{'falsified':>10s} {'unknown':>8s}"
    )
    for label, property_loss in (("cross-entropy", False), ("+ 0.5 * robust (DL2)", True)):
        model = train(spec, data, property_loss=property_loss, epochs=epochs, seed=seed)
        clean = (model(x).argmax(1) == y).float().mean().item()
        for eps in (0.05, 0.1):
            at = spec.with_params(eps=eps)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():  # the attack takes its own input gradients
                secure = at.loss("robust", attack=strong, generator=gen)(model, x, y).satisfied
            # the same seed for both properties: the falsifier then starts from the same points
            v, direct = (
                at.verify(model, x, y, [name], generator=torch.Generator().manual_seed(seed))[name]
                for name in ("robust", "robust_direct")
            )
            print(
                f"{label:22s} {eps:5.2f} {clean:6.1%} {secure.float().mean().item():7.1%} "
                f"{v.rate('verified'):9.1%} {v.rate('falsified'):10.1%} {v.rate('unknown'):8.1%}"
            )
            proved = torch.tensor([s == "verified" for s in v.status])
            assert not (proved & ~secure).any(), "a verified image was broken by the attack"
            assert v.status == direct.status, "the template and the written-out form differ"
    print("\nverified images all resisted the attack; robust and robust_direct agree everywhere")


if __name__ == "__main__":
    main()
