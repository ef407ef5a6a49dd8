"""Tensor implementations of the built-in functions and operators, batched (batch first).

`FUNCTIONS` maps a built-in's name to `impl(args, shapes, options) -> Tensor`: the evaluated
arguments ([B, *shape] each, or 0-dim constants), their per-sample shapes from the IR's types,
and the call's options. The built-ins that need the environment (`grad`, the explainers, the
loss side's `certified`) are compiled by the interpreter itself; `explanation` computes the
explainers' maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from propdsl import explain
from propdsl import ir as I
from propdsl.builtins import EXPLAINERS, INPUT_GRADIENTS
from propdsl.region import lp_norm

__all__ = [
    "ARITH",
    "ELEMENTWISE",
    "EXPLAINERS",
    "FUNCTIONS",
    "Implementation",
    "align",
    "differentiates",
    "explanation",
    "flat",
]

Implementation = Callable[[list[Tensor], list[tuple[int, ...]], dict[str, Any]], Tensor]


def differentiates(formula: I.Node) -> bool:
    """Whether the formula differentiates a network with respect to its input (an explainer or
    `grad`): the attacks on such a formula need a smooth surrogate on ReLU networks."""
    return any(isinstance(n, I.Fn) and n.fn in INPUT_GRADIENTS for n in I.walk(formula))


def align(v: Tensor, shape: tuple[int, ...], nd: int) -> Tensor:
    """[B, *shape] -> [B, 1.., *shape] with `nd` trailing dims, for broadcasting."""
    if v.dim() == 0 or len(shape) >= nd:
        return v
    return v.reshape(v.shape[0], *([1] * (nd - len(shape))), *shape)


def flat(v: Tensor) -> Tensor:
    """[B, ...] -> [B, N] ([B] -> [B, 1])."""
    return v.reshape(v.shape[0], -1) if v.dim() > 1 else v.reshape(-1, 1)


def _reduce_all(v: Tensor, how: str) -> Tensor:
    if v.dim() <= 1:
        return v
    flat_v = v.reshape(v.shape[0], -1)
    return {
        "sum": flat_v.sum(1),
        "mean": flat_v.mean(1),
        "max": flat_v.amax(1),
        "min": flat_v.amin(1),
    }[how]


def _kl(p: Tensor, q: Tensor) -> Tensor:
    p, q = flat(p), flat(q)
    tiny = torch.finfo(p.dtype).tiny
    return (p * (p.clamp_min(tiny).log() - q.clamp_min(tiny).log())).sum(1)


def _norm(args: list[Tensor], shapes: list[tuple[int, ...]], opts: dict[str, Any]) -> Tensor:
    v = args[0]
    if v.dim() <= 1:
        return v.abs()
    return lp_norm(v, float(opts["p"]))


# Binary operators and the two-argument `max` / `min`, element-wise with broadcasting.
ARITH: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "+": torch.add,
    "-": torch.sub,
    "*": torch.mul,
    "/": torch.div,
    "^": torch.pow,
    "max": torch.maximum,
    "min": torch.minimum,
}

# One-argument element-wise functions (also evaluated along a finite quantifier's axis).
ELEMENTWISE: dict[str, Callable[[Tensor], Tensor]] = {
    "abs": torch.abs,
    "exp": torch.exp,
    "log": torch.log,
    "sqrt": torch.sqrt,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": torch.relu,
}


def _elementwise(fn: Callable[[Tensor], Tensor]) -> Implementation:
    return lambda a, s, o: fn(a[0])


FUNCTIONS: dict[str, Implementation] = {
    **{name: _elementwise(fn) for name, fn in ELEMENTWISE.items()},
    "softmax": lambda a, s, o: torch.softmax(a[0], dim=-1),
    "log_softmax": lambda a, s, o: torch.log_softmax(a[0], dim=-1),
    "sum": lambda a, s, o: _reduce_all(a[0], "sum"),
    "mean": lambda a, s, o: _reduce_all(a[0], "mean"),
    "max": lambda a, s, o: _reduce_all(a[0], "max"),
    "min": lambda a, s, o: _reduce_all(a[0], "min"),
    "argmax": lambda a, s, o: a[0].argmax(dim=-1),
    "argmin": lambda a, s, o: a[0].argmin(dim=-1),
    "norm": _norm,
    "clamp": lambda a, s, o: torch.clamp(
        a[0], align(a[1], (), len(s[0])), align(a[2], (), len(s[0]))
    ),
    "dot": lambda a, s, o: (flat(a[0]) * flat(a[1])).sum(1),
    "cosine": lambda a, s, o: explain.cosine(a[0], a[1]),
    "pearson": lambda a, s, o: explain.pearson(a[0], a[1]),
    "mse": lambda a, s, o: explain.mse(a[0], a[1]),
    "kl": lambda a, s, o: _kl(a[0], a[1]),
    "topk_overlap": lambda a, s, o: explain.topk_intersection(a[0], a[1], int(o["k"])),
    "cross_entropy": lambda a, s, o: F.cross_entropy(a[0], a[1].long(), reduction="none"),
}


def explanation(
    fn: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    options: Mapping[str, Any],
    generator: torch.Generator | None = None,
) -> Tensor:
    """The map of explainer `fn` (one of `EXPLAINERS`) of `model` at `x` for labels `y`,
    differentiable again (call it under `torch.enable_grad()`)."""
    if fn == "saliency":
        return explain.saliency(model, x, y)
    if fn == "gradient_x_input":
        return explain.gradient_x_input(model, x, y)
    if fn == "guided_backprop":
        return explain.guided_backprop(model, x, y)
    if fn == "integrated_gradients":
        baseline = options.get("baseline")
        base = None if baseline is None else torch.full_like(x, float(baseline))
        return explain.integrated_gradients(
            model, x, y, baseline=base, steps=int(options.get("steps", 64))
        )
    return explain.smoothgrad(
        model,
        x,
        y,
        noise=float(options.get("noise", 0.1)),
        samples=int(options.get("samples", 16)),
        generator=generator,
    )
