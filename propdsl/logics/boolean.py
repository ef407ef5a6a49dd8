"""Exact Boolean semantics on bool tensors, used to report whether properties hold."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from propdsl.logics.base import Cmp, Logic, register_logic

__all__ = ["Boolean"]


@register_logic
@dataclass(frozen=True, kw_only=True)
class Boolean(Logic):
    """Exact comparisons, ``and = all``, ``or = any``, ``not = ~``; loss 1 where false.

    >>> Boolean().atom(Cmp.LT, torch.tensor([1.0, 2.0]), torch.tensor(2.0))
    tensor([ True, False])
    """

    name = "boolean"
    aliases = ("bool",)
    has_negation = True
    trainable = False

    def atom(self, op: Cmp, lhs: Tensor, rhs: Tensor) -> Tensor:
        return op.holds(torch.as_tensor(lhs), torch.as_tensor(rhs))

    def conj(self, values: Tensor, dim: int = -1) -> Tensor:
        return values.all(dim)  # an empty `all` is True

    def disj(self, values: Tensor, dim: int = -1) -> Tensor:
        return values.any(dim)  # an empty `any` is False

    def neg(self, value: Tensor) -> Tensor:
        return torch.logical_not(value)

    def implies(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.logical_or(torch.logical_not(a), b)

    def loss(self, value: Tensor) -> Tensor:
        return torch.logical_not(value).to(torch.get_default_dtype())

    def constant(self, truth: bool, like: Tensor) -> Tensor:
        return torch.full_like(like, truth, dtype=torch.bool)
