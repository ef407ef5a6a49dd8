"""The library API in one page: load a spec, compile a property into a loss, train with it.

    python examples/library_api.py

Loads specs/digits.prop with eps = 0.05, evaluates classification robustness of a small digits
MLP (loss, exact satisfaction at the attack's points, counterexamples), then trains it for a few
epochs on the spec's own objective, `cross_entropy + 0.5 * classification_robust`, and reports
the satisfaction rate on the test split before and after. Runs in a few seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

import propdsl
from propdsl.data import load_dataset
from propdsl.models import build_model

SPEC = Path(__file__).resolve().parent.parent / "specs" / "digits.prop"


def satisfaction_rate(check, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The share of samples whose property holds at the attack's most violating point."""
    with torch.no_grad():  # the attack takes its own input gradients; no weight gradients here
        return check(model, x, y).satisfied.float().mean().item()


def main(epochs: int = 3, seed: int = 0) -> None:
    torch.manual_seed(seed)
    spec = propdsl.load(SPEC, params={"eps": 0.05})
    print("classification_robust:", spec.property("classification_robust").describe())

    train = load_dataset("digits", split="train", seed=seed)
    test = load_dataset("digits", split="test", seed=seed)
    model = build_model("mlp", train.input_shape, train.num_classes, hidden=[64], seed=seed)

    # A property as a loss module: per-sample loss, exact truth, and the attack's points.
    robust = spec.loss(
        "classification_robust", logic="dl2", attack=propdsl.PGD(steps=10, restarts=1)
    )
    x, y = train.x[:64], train.y[:64]
    out = robust(model, x, y)
    print(f"DL2 loss (batch mean)       {out.loss.mean().item():.4f}")
    print(f"satisfied at attack points  {out.satisfied.float().mean().item():.2%}")
    worst = out.counterexample["x'"]
    print(
        f"counterexamples             {tuple(worst.shape)}, "
        f"max |x' - x| = {(worst - x).abs().max().item():.3f} (eps = 0.05)"
    )

    # Evaluate with a stronger attack than the one used in training: attacking through the
    # training logic overstates security (Flinkow et al. 2025).
    check = spec.loss("classification_robust", attack=propdsl.PGD(steps=20, restarts=2))
    before = satisfaction_rate(check, model, test.x, test.y)

    # The train block's objective: cross_entropy + 0.5 * classification_robust, under the
    # block's logic (dl2) and attack (pgd, 10 steps).
    objective = spec.objective(generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        for batch in torch.randperm(len(train), generator=order).split(64):
            optimizer.zero_grad()
            loss = objective(model, train.x[batch], train.y[batch])
            loss.backward()
            optimizer.step()
        terms = ", ".join(f"{k} = {v:.3f}" for k, v in objective.last_terms.items())
        print(f"epoch {epoch + 1}: loss {loss.item():.3f} ({terms})")

    after = satisfaction_rate(check, model, test.x, test.y)
    accuracy = (model(test.x).argmax(1) == test.y).float().mean().item()
    print(f"test accuracy after training        {accuracy:.2%}")
    print(f"classification robustness, test set {before:.2%} before -> {after:.2%} after")


if __name__ == "__main__":
    main()
