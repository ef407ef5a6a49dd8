"""A property as a loss in a training loop of your own.

    python examples/own_training_loop.py

`spec.loss(name, logic, attack)` compiles one property of a spec into a PyTorch module:
`module(model, x, y)` returns a per-sample `loss` (0 where the logic says the property holds at
the attack's most violating point), `satisfied` (the exact truth there) and the attack's points.
Nothing else of propdsl is needed: the loop below is plain PyTorch, with its own optimizer
(SGD with momentum), its own weighting of the terms, and a radius that grows over the epochs (a
new module per epoch, from `spec.with_params(eps=...)`).

The property term uses DL2 here; any logic works the same way (`logic="godel"`, `"stl"`, ...,
or a `propdsl.logics.get_logic(...)` object), usually with another weight.

It trains the same MLP twice, with and without the property term, and compares constraint
security on the test split (the property holds at the point of a stronger APGD attack than the
training one, independent of the training logic): the property term raises it. About 5 s on a
CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import propdsl
from propdsl.data import load_dataset
from propdsl.models import build_model

SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = 0.1  # L-inf radius

property robust(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1):
    argmax(f(x')) == y
"""


def train(spec, data, *, weight: float, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("mlp", data.input_shape, data.num_classes, hidden=[64], seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)  # the attack's random starts
    order = torch.Generator().manual_seed(seed)
    eps = spec.params["eps"]
    for epoch in range(epochs):
        radius = eps * min(1.0, (epoch + 1) / 3)  # ramp the radius up over three epochs
        robust = spec.with_params(eps=radius).loss(
            "robust", logic="dl2", attack=propdsl.PGD(steps=5), generator=generator
        )
        held = []
        for batch in torch.randperm(len(data), generator=order).split(64):
            x, y = data.x[batch], data.y[batch]
            out = robust(model, x, y)
            loss = F.cross_entropy(model(x), y) + weight * out.loss.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            held.append(out.satisfied.float().mean().item())
        if weight:
            print(
                f"  epoch {epoch + 1}: eps {radius:.3f}, loss {loss.item():.3f}, "
                f"property held at the training attack's points {sum(held) / len(held):.1%}"
            )
    return model.eval()


def main(epochs: int = 6, seed: int = 0) -> None:
    spec = propdsl.load(SPEC)
    data = load_dataset("digits", split="train", seed=seed)
    test = load_dataset("digits", split="test", seed=seed)
    check = spec.loss(
        "robust",
        attack=propdsl.APGD(steps=20, restarts=2),
        generator=torch.Generator().manual_seed(seed),
    )
    for label, weight in (("cross-entropy only", 0.0), ("cross-entropy + robust (DL2)", 1.0)):
        print(label)
        model = train(spec, data, weight=weight, epochs=epochs, seed=seed)
        accuracy = (model(test.x).argmax(1) == test.y).float().mean().item()
        with torch.no_grad():  # the attack takes its own input gradients
            secure = check(model, test.x, test.y).satisfied.float().mean().item()
        print(f"  test accuracy {accuracy:.1%}, constraint security at eps 0.1 {secure:.1%}")


if __name__ == "__main__":
    main()
