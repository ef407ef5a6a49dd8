"""Strong classification robustness: the true class keeps probability >= eta on the whole ball.

    python examples/strong_classification_robustness.py

specs/strong_classification_robustness.prop states the property three ways: with the prelude's
template (`strong`: softmax(f(x'))[y] >= eta), on log-probabilities (`strong_direct`), and as the
sufficient condition linear in the logits that bound propagation proves (`strong_margins`: every
margin f[y] - f[j] >= log(eta (K - 1) / (1 - eta))). The verifier proves the softmax forms
through those same margin rows, so the three get the same verified images.

With eta > 0.5 the property implies classification robustness. The script trains a small MLP by
PGD adversarial training (the spec's own loss) for a few epochs, then, on the first 100 test
images at eps = 0.05, compares the verdicts for eta = 0.5, 0.9 and 0.99 with plain
classification robustness: a larger eta is harder to prove, and every image verified for the
strong property is verified for the plain one. About 10 s on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

import propdsl
from propdsl.data import load_dataset
from propdsl.models import build_model

SPEC = Path(__file__).resolve().parent.parent / "specs" / "strong_classification_robustness.prop"
CLASSIFICATION = "forall x' in ball(x, eps, inf) & pixels: argmax(f(x')) == y"


def verdicts(spec, model, x, y, names: list[str], seed: int) -> dict:
    # `spec.verify` attacks first (APGD), then bounds the open images with CROWN
    return spec.verify(model, x, y, names, generator=torch.Generator().manual_seed(seed))


def main(epochs: int = 8, samples: int = 100, eps: float = 0.05, seed: int = 0) -> None:
    torch.manual_seed(seed)
    spec = propdsl.load(SPEC, params={"eps": eps})
    print("strong:", spec.property("strong").describe())
    data = load_dataset("digits", split="train", seed=seed)
    test = load_dataset("digits", split="test", seed=seed, limit=samples)
    x, y = test.x, test.y

    # PGD adversarial training: the spec's loss is the cross-entropy at the worst point of the
    # ball, at most -log(eta) exactly where the strong property holds there
    model = build_model("mlp", data.input_shape, data.num_classes, hidden=[64], seed=seed)
    objective = spec.objective(generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(data), generator=order).split(64):
            optimizer.zero_grad()
            objective(model, data.x[batch], data.y[batch]).backward()
            optimizer.step()
    model.eval()
    probability = model(x).softmax(1).gather(1, y[:, None]).squeeze(1)
    print(
        f"clean accuracy {(model(x).argmax(1) == y).float().mean().item():.1%}, "
        f"median probability of the true class {probability.median().item():.3f}"
    )

    plain = verdicts(spec.formula(CLASSIFICATION), model, x, y, ["formula"], seed)["formula"]
    plain_ok = torch.tensor([s == "verified" for s in plain.status])
    print(f"\n{'property':36s} {'verified':>9s} {'falsified':>10s} {'unknown':>8s}")
    print(
        f"{'classification robustness':36s} {plain.rate('verified'):9.1%} "
        f"{plain.rate('falsified'):10.1%} {plain.rate('unknown'):8.1%}"
    )
    for eta in (0.5, 0.9, 0.99):
        at = spec.with_params(eta=eta)
        result = verdicts(at, model, x, y, ["strong", "strong_direct", "strong_margins"], seed)
        v = result["strong"]
        print(
            f"{f'strong, eta = {eta:g}':36s} {v.rate('verified'):9.1%} "
            f"{v.rate('falsified'):10.1%} {v.rate('unknown'):8.1%}"
        )
        proved = {n: [s == "verified" for s in r.status] for n, r in result.items()}
        assert proved["strong"] == proved["strong_direct"] == proved["strong_margins"]
        if eta > 0.5:
            assert not (torch.tensor(proved["strong"]) & ~plain_ok).any()
    print(
        "\nthe three forms verify the same images; for eta > 0.5 each of them is verified for"
        " classification robustness too"
    )


if __name__ == "__main__":
    main()
