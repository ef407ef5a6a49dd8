"""DL2 (Fischer et al., ICML 2019): values are losses, >= 0 and 0 exactly when satisfied."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from propdsl.logics.base import (
    Cmp,
    Logic,
    check_real,
    connected_zero,
    difference,
    float_like,
    operands,
    register_logic,
)

__all__ = ["DL2"]


@register_logic
@dataclass(frozen=True, kw_only=True)
class DL2(Logic):
    """DL2: atoms are hinge distances, ``and = sum``, ``or = product``; no negation.

    The value of a formula is already its loss. Negation is pushed down to the atoms by the
    compiler (``has_negation`` is False), and ``a implies b`` is rewritten as ``not a or b``.

    Args:
        xi: > 0; the loss of a strict comparison (``<``, ``>``, ``!=``) at equality.

    >>> DL2().atom(Cmp.LT, torch.tensor([1.0, 2.0, 3.0]), torch.tensor(2.0))
    tensor([0., 1., 1.])
    """

    name = "dl2"
    has_negation = False
    xi: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "xi", check_real("DL2", "xi", self.xi, low=0.0, high=float("inf")))

    def atom(self, op: Cmp, lhs: Tensor, rhs: Tensor) -> Tensor:
        a, b = operands(lhs, rhs)
        if op in (Cmp.GE, Cmp.GT):
            a, b = b, a
        d = difference(a, b)
        if op in (Cmp.LE, Cmp.GE):
            return torch.relu(d)
        if op in (Cmp.LT, Cmp.GT):
            # Masked rather than relu so that the gradient at equality, where the
            # strict comparison fails, is that of a - b (relu's is 0 there); NaN passes.
            return torch.add(d, (d == 0).to(d.dtype), alpha=self.xi).masked_fill(d < 0, 0.0)
        if op is Cmp.EQ:
            return d.abs()
        if op is Cmp.NE:
            # No gradient can repair an equality: the value is piecewise constant.
            return (d == 0).to(d.dtype) * self.xi + connected_zero(d)
        raise TypeError(f"not a comparison: {op!r}")

    def conj(self, values: Tensor, dim: int = -1) -> Tensor:
        return values.sum(dim)  # an empty sum is 0: True

    def disj(self, values: Tensor, dim: int = -1) -> Tensor:
        return values.prod(dim)  # an empty product is 1: False

    def neg(self, value: Tensor) -> Tensor:
        raise self._unsupported("not")

    def loss(self, value: Tensor) -> Tensor:
        return value

    def constant(self, truth: bool, like: Tensor) -> Tensor:
        # 0 and 1 are the units of sum and product: True and x = x, False or x = x.
        return torch.full_like(like, 0.0 if truth else 1.0, dtype=float_like(like))
