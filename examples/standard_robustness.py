"""Standard robustness: no logit moves by more than delta when the image moves within eps.

    python examples/standard_robustness.py

specs/standard_robustness.prop states `norm(f(x') - f(x), inf) <= delta` on the L-inf ball of
radius eps (pixels kept in [0, 1]), with the prelude's template (`stable`), written out
(`stable_direct`) and element by element (`stable_elementwise`). Its train block uses a
TRADES-style loss: the cross-entropy plus the worst KL divergence between the clean and the
perturbed output distributions on the ball.

The script trains a small MLP on that loss and on the cross-entropy alone, then on the first 100
test images at eps = 0.05:

* bounds the logit change directly: CROWN bounds of f(x') over the ball give, per image, a
  certified largest change max_k max(ub_k - f(x)_k, f(x)_k - lb_k), and an APGD attack on the
  same quantity gives a change that is actually reached: the truth lies in between;
* verifies the property for several delta with `spec.with_params(delta=...)`: the verified
  share grows with delta, and the three forms of the property get the same verified images.

About 10 s on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

import propdsl
from propdsl.data import load_dataset
from propdsl.models import build_model
from propdsl.region import Region

SPEC = Path(__file__).resolve().parent.parent / "specs" / "standard_robustness.prop"
FORMS = ["stable", "stable_direct", "stable_elementwise"]


def train(spec, data, *, trades: bool, epochs: int, seed: int) -> torch.nn.Module:
    model = build_model("mlp", data.input_shape, data.num_classes, hidden=[64], seed=seed)
    objective = spec.objective(generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(data), generator=order).split(64):
            x, y = data.x[batch], data.y[batch]
            if trades:
                loss = objective(model, x, y)
            else:
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main(epochs: int = 8, samples: int = 100, eps: float = 0.05, seed: int = 0) -> None:
    torch.manual_seed(seed)
    spec = propdsl.load(SPEC, params={"eps": eps})
    print("stable:", spec.property("stable").describe())
    data = load_dataset("digits", split="train", seed=seed)
    test = load_dataset("digits", split="test", seed=seed, limit=samples)
    x, y = test.x, test.y
    deltas = (0.5, 1.0, 2.0, 4.0)

    # the change an attack reaches: the largest logit change, as a formula of the spec
    text = "forall x' in ball(x, eps, inf) & pixels: norm(f(x') - f(x), inf) <= 0"
    reach = spec.formula(text, params="x")
    attack = propdsl.APGD(steps=50, restarts=2)

    header = " ".join(f"{f'delta {d:g}':>9s}" for d in deltas)
    print(
        f"\n{'training':14s} {'clean':>6s} {'reached':>8s} {'certified':>10s}   verified: {header}"
    )
    for label, trades in (("cross-entropy", False), ("TRADES", True)):
        model = train(spec, data, trades=trades, epochs=epochs, seed=seed)
        clean = (model(x).argmax(1) == y).float().mean().item()
        with torch.no_grad():
            fx = model(x)
            lb, ub = propdsl.bounds(model, region=Region.ball(x, eps, float("inf"), lo=0, hi=1))
            certified = torch.maximum(ub - fx, fx - lb).amax(dim=1)
            gen = torch.Generator().manual_seed(seed)
            # the violation of `change <= 0` at the attack's point is the change it reached
            reached = reach.loss("formula", logic="dl2", attack=attack, generator=gen)(
                model, x
            ).value
        assert (reached <= certified + 1e-5).all(), "an attack went past the certified bound"
        rates = []
        for delta in deltas:
            result = spec.with_params(delta=delta).verify(model, x, None, FORMS)
            proved = {n: [s == "verified" for s in r.status] for n, r in result.items()}
            assert proved["stable"] == proved["stable_direct"] == proved["stable_elementwise"]
            rates.append(result["stable"].rate("verified"))
        cells = " ".join(f"{r:9.0%}" for r in rates)
        print(
            f"{label:14s} {clean:6.1%} {reached.median().item():8.2f} "
            f"{certified.median().item():10.2f}             {cells}"
        )
        assert rates == sorted(rates), "a larger delta is never harder to verify"
    print("\n(reached and certified: median over the images of the largest logit change)")


if __name__ == "__main__":
    main()
