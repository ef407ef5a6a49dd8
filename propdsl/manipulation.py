"""Explanation robustness under a targeted manipulation attack: "Expl at Start / End".

After Dombrowski et al. (2019, "Explanations can be manipulated and geometry is to blame"), as
measured by Chen et al. (2024, arXiv 2403.06013): for a victim `x_v` and a target `x_t` (another
class, or a cluster prototype: `propdsl.partners`), find `delta` in the L-inf ball of radius
`eps` (and in the input box) that keeps the network's decision at `x_v` and minimises
`||I(x_v + delta) - I(x_t)||_2`, the distance between the raw explanation maps. "Expl at Start"
is that distance at `delta = 0`, "Expl at End" the smallest distance the attack reached: a
higher End is a more robust explanation.

Precisely, `I(x)` is the map of the class the network predicts at `x` (for the victim, the
class the attack must keep). The attack descends
`||I_s(x') - I_s(x_t)||_2^2 + gamma * relu(max_{j != c} f_s(x')_j - f_s(x')_c + margin)` by signed
gradient steps projected onto the ball and box, from `delta = 0`; `f_s`, `I_s` are the network
and its map on a softplus surrogate of every ReLU (`surrogate_beta`), since the map of a ReLU
network has a zero input gradient almost everywhere. The label is **penalised** (the hinge term)
**and checked**: a point counts only where the true network still predicts `c`, and End is the
distance, on the true network, at the best such point among the start and every step. So End <=
Start for every victim, by construction.

Raw distances mix robustness with the scale of the maps (a network with small gradients has small
distances), so the result also holds scale-free forms: the distance relative to the victim's map,
`||I(x') - I(x_t)|| / ||I(x_v)||` (the same denominator at Start and End), and the cosine
similarity `cos(I(x'), I(x_t))` at the start and at the End point.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from propdsl import explain
from propdsl.attacks import smooth_relu

__all__ = [
    "MANIPULATION_METHODS",
    "ManipulationOptions",
    "ManipulationResult",
    "ball_radius",
    "explanation_manipulation",
    "manipulation_lines",
    "manipulation_summary",
    "manipulation_table",
]

DEFAULT_STEPS = 50
# the explanations Chen et al. attack: gradient, gradient x input, guided backprop
MANIPULATION_METHODS = ("saliency", "gradient_x_input", "guided_backprop")


@dataclass(frozen=True, kw_only=True)
class ManipulationOptions:
    """Settings of the targeted attack.

    Attributes:
        eps: L-inf radius of the ball around the victim.
        steps: signed gradient steps (0: Start only, End = Start).
        step_size: per step, as a multiple of `eps / steps` (2.5 as in PGD).
        gamma: weight of the hinge that keeps the victim's label.
        margin: the hinge's logit margin.
        surrogate_beta: softplus beta of the surrogate of every ReLU; None: none (the network is
            attacked as it is: right for smooth networks).
        box: the valid inputs `(lo, hi)`, or None.
    """

    eps: float
    steps: int = DEFAULT_STEPS
    step_size: float = 2.5
    gamma: float = 10.0
    margin: float = 0.0
    surrogate_beta: float | None = 10.0
    box: tuple[float, float] | None = (0.0, 1.0)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.eps) and self.eps >= 0):
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.surrogate_beta is not None and not self.surrogate_beta > 0:
            raise ValueError(f"surrogate_beta must be positive, got {self.surrogate_beta}")


@dataclass(frozen=True)
class ManipulationResult:
    """Per victim ([B] each): raw distances, relative distances, cosines at Start and End, the
    End point, and whether the true network keeps the victim's class there (always, by
    construction: the check that it does)."""

    start: Tensor
    end: Tensor
    start_relative: Tensor
    end_relative: Tensor
    start_cosine: Tensor
    end_cosine: Tensor
    point: Tensor
    kept: Tensor

    def means(self) -> dict[str, float]:
        return {
            "start": float(self.start.mean()),
            "end": float(self.end.mean()),
            "start_relative": float(self.start_relative.mean()),
            "end_relative": float(self.end_relative.mean()),
            "start_cosine": float(self.start_cosine.mean()),
            "end_cosine": float(self.end_cosine.mean()),
            "kept": float(self.kept.float().mean()),
        }


def _map(method: str, model: nn.Module, x: Tensor, c: Tensor, create_graph: bool) -> Tensor:
    if method == "saliency":
        return explain.saliency(model, x, c, create_graph=create_graph)
    if method == "gradient_x_input":
        return explain.gradient_x_input(model, x, c, create_graph=create_graph)
    if method == "guided_backprop":
        return explain.guided_backprop(model, x, c, create_graph=create_graph)
    raise ValueError(
        f"unknown explanation '{method}'; use one of {', '.join(MANIPULATION_METHODS)}"
    )


def _surrogate(beta: float | None):
    import contextlib

    return smooth_relu(beta) if beta is not None else contextlib.nullcontext()


def _dist(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).flatten(1).norm(dim=1)


def explanation_manipulation(
    model: nn.Module,
    x: Tensor,
    xt: Tensor,
    method: str,
    options: ManipulationOptions,
) -> ManipulationResult:
    """Chen et al.'s targeted explanation attack (see the module docstring) of every victim of
    `x` [B, ...] towards its target `xt` [B, ...], for explanation `method` (one of
    `MANIPULATION_METHODS`)."""
    if method not in MANIPULATION_METHODS:
        raise ValueError(
            f"unknown explanation '{method}'; use one of {', '.join(MANIPULATION_METHODS)}"
        )
    was = model.training
    model.eval()
    try:
        return _attack(model, x.detach(), xt.detach(), method, options)
    finally:
        model.train(was)


def _attack(
    model: nn.Module, x: Tensor, xt: Tensor, method: str, o: ManipulationOptions
) -> ManipulationResult:
    with torch.no_grad():
        c = model(x).argmax(1)
        ct = model(xt).argmax(1)
    target = _map(method, model, xt, ct, False)  # the true network's maps
    victim = _map(method, model, x, c, False)
    with _surrogate(o.surrogate_beta):
        target_s = _map(method, model, xt, ct, False)
    start = _dist(victim, target)
    scale = victim.flatten(1).norm(dim=1)
    best, best_point = start.clone(), x.clone()
    alpha = o.step_size * o.eps / max(1, o.steps)
    lo = x - o.eps
    hi = x + o.eps
    if o.box is not None:
        lo, hi = lo.clamp(min=o.box[0]), hi.clamp(max=o.box[1])
    point = x.clone()
    for _ in range(o.steps if o.eps > 0 else 0):
        with torch.enable_grad():
            v = point.detach().requires_grad_(True)
            with _surrogate(o.surrogate_beta):
                m = _map(method, model, v, c, True)
                logits = model(v).flatten(1)
            true = logits.gather(1, c.reshape(-1, 1)).squeeze(1)
            others = logits.scatter(1, c.reshape(-1, 1), -math.inf).amax(1)
            hinge = F.relu(others - true + o.margin)
            loss = ((m - target_s).flatten(1) ** 2).sum(1) + o.gamma * hinge
            (g,) = torch.autograd.grad(loss.sum(), v)
        point = torch.maximum(torch.minimum(point - alpha * g.sign(), hi), lo).detach()
        with torch.no_grad():
            keeps = model(point).argmax(1) == c
        d = _dist(_map(method, model, point, c, False), target)
        better = keeps & (d < best)
        best = torch.where(better, d, best)
        best_point[better] = point[better]
    end_map = _map(method, model, best_point, c, False)
    with torch.no_grad():
        kept = model(best_point).argmax(1) == c
    safe = scale.clamp_min(explain.NORM_EPS)
    return ManipulationResult(
        start=start,
        end=best,
        start_relative=start / safe,
        end_relative=best / safe,
        start_cosine=explain.cosine(victim, target),
        end_cosine=explain.cosine(end_map, target),
        point=best_point,
        kept=kept,
    )


def manipulation_table(
    model: nn.Module,
    x: Tensor,
    xt: Tensor,
    options: ManipulationOptions,
    methods: Sequence[str] = MANIPULATION_METHODS,
    batch: int = 256,
) -> dict[str, dict[str, float]]:
    """Per method, the means over the victims of `ManipulationResult.means()` (batched)."""
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        parts = [
            explanation_manipulation(model, x[i : i + batch], xt[i : i + batch], method, options)
            for i in range(0, x.shape[0], batch)
        ]
        n = x.shape[0]
        sums: dict[str, float] = {}
        for part in parts:
            k = part.start.shape[0]
            for key, value in part.means().items():
                sums[key] = sums.get(key, 0.0) + value * k
        out[method] = {key: v / n for key, v in sums.items()}
    return out


# -- the eval report --------------------------------------------------------------------------


def ball_radius(formula: Any, centre: str) -> tuple[float, float] | None:
    """(radius, p) of the first ball around the variable `centre` with a constant radius that a
    quantifier of the (simplified) formula ranges over, or None."""
    from propdsl import ir as I

    for node in I.walk(formula):
        if not isinstance(node, I.Quant):
            continue
        for d in node.domains:
            parts = d.parts if isinstance(d, I.Inter) else (d,)
            for part in parts:
                if (
                    isinstance(part, I.Ball)
                    and isinstance(part.centre, I.Var)
                    and part.centre.name == centre
                    and isinstance(part.radius, I.Const)
                ):
                    return float(part.radius.value), float(part.p)
    return None


def manipulation_summary(
    prop: Any,
    model: nn.Module,
    x: Tensor,
    xt: Tensor,
    box: tuple[float, float] | None,
    relu: bool,
    default_radius: float,
    batch: int = 256,
    steps: int = DEFAULT_STEPS,
) -> dict[str, Any]:
    """The eval report's entry of a property of a pair: Chen et al.'s attack from each sample
    towards its partner, per method (means over the samples). The radius is the L-inf ball
    around the property's first parameter where the property has one, else `default_radius`."""
    found = ball_radius(prop.formula, prop.params[0][0])
    eps = found[0] if found is not None and found[1] == math.inf else default_radius
    options = ManipulationOptions(
        eps=eps, steps=steps, surrogate_beta=10.0 if relu else None, box=box
    )
    return {
        "partner": _show(prop.partner),
        "eps": eps,
        "steps": options.steps,
        "step_size": options.step_size,
        "surrogate_beta": options.surrogate_beta,
        "label": f"penalised (hinge, gamma {options.gamma:g}) and checked on the true network",
        "explained_class": "predicted",
        "n": int(x.shape[0]),
        "methods": manipulation_table(model, x, xt, options, batch=batch),
    }


def _show(partner: Any) -> str:
    kwargs = ", ".join(f"{k} = {v}" for k, v in getattr(partner, "kwargs", ()))
    name = getattr(partner, "name", str(partner))
    return f"{name}({kwargs})" if kwargs else name


_NAMES = {
    "saliency": "Gradient",
    "gradient_x_input": "Gradient x Input",
    "guided_backprop": "Guided Backprop",
}


def manipulation_lines(manipulation: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The eval table's lines: per property of a pair, Expl at Start / End per method, raw,
    relative to the victim's map and as cosines."""
    lines: list[str] = []
    for name, entry in manipulation.items():
        lines.append("")
        lines.append(
            f"explanation manipulation ({name}: towards {entry['partner']} partners, L-inf "
            f"eps {entry['eps']:g}, {entry['steps']} steps, label kept; Chen et al. 2024)"
        )
        head = ("explanation", "start", "end", "start rel", "end rel", "start cos", "end cos")
        w = max(len(v) for v in _NAMES.values())
        lines.append(f"  {head[0]:<{w}}  " + "  ".join(f"{h:>10}" for h in head[1:]))
        for method, m in entry["methods"].items():
            keys = ("start", "end", "start_relative", "end_relative", "start_cosine", "end_cosine")
            cells = "  ".join(f"{_cell(m[k]):>10}" for k in keys)
            lines.append(f"  {_NAMES.get(method, method):<{w}}  {cells}")
    return lines


def _cell(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else "n/a"
