"""Partner samples of properties of a pair: `property p(x, y, xt, yt) partner SOURCE = ...`.

Each sample `(x, y)` gets a partner `(xt, yt)` drawn from a pool of the same data (the split
being evaluated or verified, the training set when training), deterministically from the
source's `seed`:

* `other_class(seed)`: another sample of the pool whose label differs from `y`, uniformly;
* `class_mean(seed)`: the mean input of a class other than `y` (drawn uniformly among the
  classes the pool holds), labelled with that class;
* `prototype(k, seed)`: the pool is clustered by k-means (k-means++ seeding, Lloyd iterations)
  on the network's penultimate-layer features (the input of its last `nn.Linear`); each
  cluster's prototype is the pool sample nearest its centre, with its own label; the partner is
  a prototype of another class, uniformly. Chen et al. (2024, arXiv
  2403.06013) take the targets of their explanation-manipulation attack among 150 such prototypes.

Draws depend only on the pool, the samples in their order, the source's options and, for
prototypes, the network: the same call gives the same partners.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from propdsl.errors import UsageError

__all__ = [
    "Partners",
    "class_mean",
    "draw",
    "kmeans",
    "other_class",
    "penultimate_features",
    "prototype",
]

KMEANS_ITERATIONS = 50
FEATURE_BATCH = 512


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _choose_other(candidates_y: Tensor, y: Tensor, generator: torch.Generator, what: str) -> Tensor:
    """For each label of `y`, the index of a uniformly drawn candidate with another label."""
    cy = candidates_y.cpu()
    out = torch.empty(y.shape[0], dtype=torch.long)
    for i, label in enumerate(y.cpu().tolist()):
        idx = torch.nonzero(cy != int(label)).flatten()
        if idx.numel() == 0:
            raise UsageError(
                f"no {what} of a class other than {int(label)}: the pool holds only that class"
            )
        out[i] = idx[torch.randint(idx.numel(), (1,), generator=generator)].item()
    return out


def other_class(
    model: nn.Module | None, pool_x: Tensor, pool_y: Tensor, x: Tensor, y: Tensor, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Another sample of the pool, of a class other than each `y`."""
    del model, x
    pick = _choose_other(pool_y, y, _generator(seed, pool_x.device), "sample")
    pick = pick.to(pool_x.device)
    return pool_x[pick].to(y.device), pool_y[pick].to(y.device)


def class_mean(
    model: nn.Module | None, pool_x: Tensor, pool_y: Tensor, x: Tensor, y: Tensor, *, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The mean input of a class other than each `y`, labelled with that class."""
    del model, x
    classes = torch.unique(pool_y.cpu())
    means = torch.stack([pool_x[(pool_y == c).to(pool_x.device)].mean(0) for c in classes.tolist()])
    pick = _choose_other(classes, y, _generator(seed, pool_x.device), "class")
    return means[pick.to(means.device)].to(y.device), classes[pick].to(y.device)


def penultimate_features(model: nn.Module, x: Tensor, batch: int = FEATURE_BATCH) -> Tensor:
    """The input of the model's last `nn.Linear` (its penultimate-layer features), [N, D]."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise UsageError(
            "prototype partners read the penultimate-layer features, the input of the "
            "network's last nn.Linear, and this network has none: use other_class or class_mean"
        )
    captured: list[Tensor] = []
    handle = last.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach()))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, x.shape[0], batch):
                model(x[start : start + batch])
    finally:
        handle.remove()
        model.train(was)
    return torch.cat([c.flatten(1) for c in captured]).to(torch.float64)


def kmeans(
    features: Tensor, k: int, *, seed: int = 0, iterations: int = KMEANS_ITERATIONS
) -> tuple[Tensor, Tensor]:
    """k-means with k-means++ seeding (Arthur and Vassilvitskii 2007): (centres [k, D],
    assignment [N]). Deterministic from `seed`; an empty cluster keeps its centre."""
    n = features.shape[0]
    gen = _generator(seed, features.device)
    feats = features.cpu()
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [feats[first]]
    d2 = ((feats - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than k: repeat one
            nxt = int(torch.randint(n, (1,), generator=gen))
        else:
            nxt = int(torch.multinomial(d2 / total, 1, generator=gen))
        centres.append(feats[nxt])
        d2 = torch.minimum(d2, ((feats - feats[nxt]) ** 2).sum(1))
    c = torch.stack(centres)
    assign = torch.cdist(feats, c).argmin(1)
    for _ in range(iterations):
        new = c.clone()
        for j in range(k):
            members = feats[assign == j]
            if members.shape[0] > 0:
                new[j] = members.mean(0)
        new_assign = torch.cdist(feats, new).argmin(1)
        c = new
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return c, assign


def prototypes(
    model: nn.Module, pool_x: Tensor, pool_y: Tensor, *, k: int = 150, seed: int = 0
) -> Tensor:
    """Indices into the pool of the k cluster prototypes (distinct, sorted)."""
    n = pool_x.shape[0]
    if k > n:
        warnings.warn(f"prototype(k = {k}) on a pool of {n} samples: using k = {n}", stacklevel=2)
        k = n
    feats = penultimate_features(model, pool_x)
    centres, _ = kmeans(feats, k, seed=seed)
    nearest = torch.cdist(centres, feats.cpu()).argmin(1)
    return torch.unique(nearest)


def prototype(
    model: nn.Module | None,
    pool_x: Tensor,
    pool_y: Tensor,
    x: Tensor,
    y: Tensor,
    *,
    k: int = 150,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """A cluster prototype of a class other than each `y` (see the module docstring)."""
    if model is None:
        raise UsageError("prototype partners need the network (its penultimate-layer features)")
    protos = prototypes(model, pool_x, pool_y, k=k, seed=seed).to(pool_x.device)
    pick = _choose_other(pool_y[protos], y, _generator(seed, pool_x.device), "prototype")
    chosen = protos[pick.to(protos.device)]
    return pool_x[chosen].to(y.device), pool_y[chosen].to(y.device)


_SOURCES = {"other_class": other_class, "class_mean": class_mean, "prototype": prototype}


def _parts(source: Any) -> tuple[str, dict[str, Any]]:
    """(name, options) of an `OptionValue`, a name, or a (name, options) pair."""
    if isinstance(source, str):
        return source, {}
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], Mapping):
        return source[0], dict(source[1])
    name = getattr(source, "name", None)
    kwargs = getattr(source, "kwargs", None)
    if isinstance(name, str):
        return name, dict(kwargs or ())
    raise UsageError(f"not a partner source: {source!r}")


def draw(
    source: Any, model: nn.Module | None, pool_x: Tensor, pool_y: Tensor, x: Tensor, y: Tensor
) -> tuple[Tensor, Tensor]:
    """The partners `(xt, yt)` of the samples `(x, y)` drawn from the pool as `source` says
    (a property's `partner`: `other_class`, `class_mean` or `prototype`, with its options)."""
    name, options = _parts(source)
    if name not in _SOURCES:
        raise UsageError(f"unknown partner source '{name}'; known: {', '.join(_SOURCES)}")
    if pool_x.shape[0] == 0:
        raise UsageError("no samples to draw partners from")
    xt, yt = _SOURCES[name](model, pool_x, pool_y, x, y, **options)
    return xt.to(dtype=x.dtype, device=x.device), yt.to(device=y.device, dtype=y.dtype)


@dataclass
class Partners:
    """Draws the partners of the properties of a pair an objective names, batch by batch, from
    one pool (the training set): `draw_for(model, x, y, salt)` gives `{property: (xt, yt)}` for
    `Objective(..., partners=...)`. `salt` (the batch's number) varies the draws from batch to
    batch, reproducibly. Prototypes depend on the network: `refresh(model)` recomputes them
    (the trainer does at the start of every epoch)."""

    pool_x: Tensor
    pool_y: Tensor
    sources: dict[str, Any] = field(default_factory=dict)
    _prototypes: dict[str, Tensor] = field(default_factory=dict)

    def refresh(self, model: nn.Module) -> None:
        self._prototypes = {}
        for name, src in self.sources.items():
            kind, options = _parts(src)
            if kind == "prototype":
                self._prototypes[name] = prototypes(model, self.pool_x, self.pool_y, **options)

    def draw_for(
        self, model: nn.Module | None, x: Tensor, y: Tensor, salt: int = 0
    ) -> dict[str, tuple[Tensor, Tensor]]:
        out = {}
        for name, src in self.sources.items():
            kind, options = _parts(src)
            seed = int(options.get("seed", 0)) + int(salt)
            if kind == "prototype":
                if name not in self._prototypes:
                    if model is None:
                        raise UsageError("prototype partners need the network")
                    self.refresh(model)
                protos = self._prototypes[name].to(self.pool_x.device)
                pick = _choose_other(
                    self.pool_y[protos], y, _generator(seed, x.device), "prototype"
                )
                chosen = protos[pick.to(protos.device)]
                xt, yt = self.pool_x[chosen], self.pool_y[chosen]
            else:
                xt, yt = _SOURCES[kind](model, self.pool_x, self.pool_y, x, y, seed=seed)
            out[name] = (xt.to(dtype=x.dtype, device=x.device), yt.to(y.device, y.dtype))
        return out
