"""Verify a model that propdsl did not build: plain PyTorch in, verdicts and bounds out.

    python examples/verify_external_model.py

The network below is an ordinary `nn.Module` with a residual connection, trained here with a
hand-written cross-entropy loop; propdsl never saw it being made. A spec written as text states
two properties of it, and

* `spec.verify` decides them per test image: a strong attack first (`falsified`, with the
  counterexample), then CROWN bounds (`verified`), else `unknown`;
* `propdsl.bounds` gives the bounds themselves.

The script then re-checks both by hand: every counterexample lies in its ball and really changes
the label, and the outputs at random points of each ball lie within the bounds. About 5 s on a CPU.
"""

from __future__ import annotations

import torch
from torch import nn

import propdsl
from propdsl.data import load_dataset
from propdsl.region import Region

SPEC = """\
network net : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = 0.03  # L-inf radius
param delta : Real = 4  # largest allowed logit change

let pixels = box(0, 1)

# argmax net(x') == y on the whole ball
property robust(x, y) =
  classification_robustness(net, x, y, eps)

# no logit moves by more than delta on the ball
property calm(x) =
  forall x' in ball(x, eps, inf) & pixels:
    norm(net(x') - net(x), inf) <= delta
"""


class ResidualNet(nn.Module):
    """Flatten, a hidden layer with a skip connection, logits: layers the bound engine traces."""

    def __init__(self, hidden: int = 48) -> None:
        super().__init__()
        self.inp = nn.Linear(64, hidden)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(hidden, hidden))
        self.out = nn.Sequential(nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.flatten(x, 1))
        return self.out(h + self.block(h))


def train_by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def rates(verdicts) -> str:
    return ", ".join(f"{s} {verdicts.rate(s):.0%}" for s in ("verified", "falsified", "unknown"))


def main(samples: int = 100, seed: int = 0) -> None:
    torch.manual_seed(seed)
    train = load_dataset("digits", split="train", seed=seed)
    test = load_dataset("digits", split="test", seed=seed, limit=samples)
    model = ResidualNet()
    train_by_hand(model, train.x, train.y, steps=150)
    model.eval()
    x, y = test.x, test.y
    accuracy = (model(x).argmax(1) == y).float().mean().item()
    print(f"a plain PyTorch model, test accuracy {accuracy:.1%} on {len(y)} images")

    spec = propdsl.load(SPEC)
    eps = spec.params["eps"]
    generator = torch.Generator().manual_seed(seed)
    verdicts = spec.verify(model, x, y, method="crown", generator=generator)
    for name, v in verdicts.items():
        print(f"{name:8s} {rates(v)}")
    for delta in (2.0, 8.0):  # the same spec with another value of a param
        v = spec.with_params(delta=delta).verify(model, x, y, ["calm"], generator=generator)
        print(f"calm with delta = {delta:g}: {rates(v['calm'])}")

    # Re-check the counterexamples: inside the ball and the box, and the label really changes.
    robust = verdicts["robust"]
    falsified = [i for i, s in enumerate(robust.status) if s == "falsified"]
    points = robust.counterexamples["x'"][falsified]
    inside = ((points - x[falsified]).abs().amax(dim=(1, 2, 3)) <= eps + 1e-6).all().item()
    inside = inside and bool(((points >= 0) & (points <= 1)).all())
    flipped = (model(points).argmax(1) != y[falsified]).all().item()
    print(f"{len(falsified)} counterexamples: inside their balls {inside}, label changed {flipped}")
    verified = [i for i, s in enumerate(robust.status) if s == "verified"]
    if verified:
        i = verified[0]
        print(f"image {i} is verified with certified margin {robust.margin[i].item():.3f}")

    # The bound engine itself: bounds of the 10 logits over each ball, checked by sampling.
    region = Region.ball(x, eps, float("inf"), lo=0.0, hi=1.0)
    lb, ub = propdsl.bounds(model, region=region, method="crown")
    with torch.no_grad():
        outside = 0
        for _ in range(200):
            out = model(region.sample(generator))
            outside += int(((out < lb - 1e-5) | (out > ub + 1e-5)).sum())
    width = (ub - lb).mean().item()
    print(f"CROWN bounds of the logits: mean width {width:.3f}; sampled outputs outside: {outside}")


if __name__ == "__main__":
    main()
