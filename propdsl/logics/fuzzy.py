"""Fuzzy logics: truth values in [0, 1], loss = 1 - truth.

The t-norm families share one atom semantics (``FuzzyLogic.atom``) and differ in their
connectives and implication. Formulas and the reasons behind each choice: docs/logics.md.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

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
    reduced_like,
    register_logic,
)

__all__ = [
    "FuzzyLogic",
    "Godel",
    "Goguen",
    "KleeneDienes",
    "Lukasiewicz",
    "Reichenbach",
    "Yager",
    "fuzzy_atom",
]


def _below_one(t: Tensor) -> Tensor:
    # 1 - r could round to 1 for a positive r below half an ulp; truth 1 is reserved for
    # 'holds'. (Comparisons are written so that NaN passes through, here and below.)
    one = torch.ones((), dtype=t.dtype, device=t.device)
    return torch.where(t >= 1, torch.nextafter(one, torch.zeros_like(one)), t)


def _floor0(x: Tensor) -> Tensor:
    # max(x, 0) whose gradient at x == 0 is 1 (torch's clamp/relu give 0 there): a conjunction
    # that has just reached truth 0 must still be able to climb out.
    return torch.where(x < 0, 0.0, x)


def _ceil1(x: Tensor) -> Tensor:
    # min(x, 1); at x == 1 the formula holds and its gradient is 0.
    return torch.where(x >= 1, 1.0, x)


def _graded(
    violated: Tensor, a: Tensor, b: Tensor, *, absolute: bool = False, penalty: Tensor | float = 0.0
) -> Tensor:
    """1 where not violated, else ``1 - e / (|a| + |b|) - penalty`` kept strictly below 1, where
    ``e`` is ``a - b`` or, if ``absolute``, ``|a - b|``."""
    # The ratio is scale-free: where |a| + |b| overflows (or an operand is infinite), halve the
    # clamped operands instead of computing inf / inf.
    big = violated & ~torch.isfinite(a.abs() + b.abs())
    top = torch.finfo(a.dtype).max
    a = torch.where(big, a.clamp(-top, top) / 2, a)
    b = torch.where(big, b.clamp(-top, top) / 2, b)
    excess = (a - b).abs() if absolute else a - b
    den = a.abs() + b.abs()
    # Inputs of the division are replaced where they are not used, so that neither value nor
    # gradient can be NaN there (0/0 at a == b == 0, huge 1/den^2 for tiny den).
    ratio = torch.where(violated, excess, 0.0) / torch.where(violated & (den > 0), den, 1.0)
    return torch.where(violated, _below_one(1 - ratio - penalty), 1.0)


def fuzzy_atom(op: Cmp, lhs: Tensor, rhs: Tensor, xi: float) -> Tensor:
    """The fuzzy truth of ``lhs op rhs``: 1 exactly when it holds, else in [0, 1).

    ``a <= b`` is ``1 - max(a - b, 0) / (|a| + |b|)`` (1 at a == b == 0); strict comparisons
    lose ``xi`` at equality, where they fail; ``==`` is ``1 - |a - b| / (|a| + |b|)``;
    ``!=`` is ``1``, or ``1 - xi`` at equality.
    """
    a, b = operands(lhs, rhs)
    if op in (Cmp.GE, Cmp.GT):
        a, b = b, a
    if op in (Cmp.LE, Cmp.GE):
        return _graded(~(a <= b), a, b)
    if op in (Cmp.LT, Cmp.GT):
        return _graded(~(a < b), a, b, penalty=xi * (a == b).to(a.dtype))
    if op is Cmp.EQ:
        return _graded(a != b, a, b, absolute=True)
    if op is Cmp.NE:
        d = difference(a, b)
        return torch.where(d == 0, _below_one(torch.full_like(d, 1 - xi)), 1.0) + connected_zero(d)
    raise TypeError(f"not a comparison: {op!r}")


@dataclass(frozen=True, kw_only=True)
class FuzzyLogic(Logic):
    """Base of the fuzzy logics: truth in [0, 1], ``not a = 1 - a``, loss ``1 - truth``.

    Args:
        xi: in (0, 1]; the truth of a strict comparison (``<``, ``>``, ``!=``) at equality of its
            operands is ``1 - xi`` (default 1: false).
    """

    has_negation = True
    xi: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "xi", check_real(type(self).__name__, "xi", self.xi, low=0.0, high=1.0)
        )

    def atom(self, op: Cmp, lhs: Tensor, rhs: Tensor) -> Tensor:
        return fuzzy_atom(op, lhs, rhs, self.xi)

    def conj(self, values: Tensor, dim: int = -1) -> Tensor:
        if values.shape[dim] == 0:
            return self.constant(True, reduced_like(values, dim))
        return self._and(values, dim)

    def disj(self, values: Tensor, dim: int = -1) -> Tensor:
        if values.shape[dim] == 0:
            return self.constant(False, reduced_like(values, dim))
        return self._or(values, dim)

    def neg(self, value: Tensor) -> Tensor:
        return 1 - value

    def loss(self, value: Tensor) -> Tensor:
        return 1 - value

    def constant(self, truth: bool, like: Tensor) -> Tensor:
        return torch.full_like(like, 1.0 if truth else 0.0, dtype=float_like(like))

    @abc.abstractmethod
    def _and(self, values: Tensor, dim: int) -> Tensor:
        """The t-norm over a non-empty ``dim``."""

    @abc.abstractmethod
    def _or(self, values: Tensor, dim: int) -> Tensor:
        """The t-conorm over a non-empty ``dim``."""


@register_logic
@dataclass(frozen=True, kw_only=True)
class Godel(FuzzyLogic):
    """Goedel logic: ``and = min``, ``or = max``, ``a -> b = 1 if a <= b else b``.

    >>> Godel().implies(torch.tensor(0.7), torch.tensor(0.4))
    tensor(0.4000)
    """

    name = "godel"
    aliases: ClassVar[tuple[str, ...]] = ("goedel", "gödel")

    def _and(self, values: Tensor, dim: int) -> Tensor:
        return values.amin(dim)

    def _or(self, values: Tensor, dim: int) -> Tensor:
        return values.amax(dim)

    def implies(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a <= b, 1.0, b)


@register_logic
@dataclass(frozen=True, kw_only=True)
class KleeneDienes(Godel):
    """Kleene-Dienes logic: Goedel's ``and``/``or``, ``a -> b = max(1 - a, b)``.

    >>> KleeneDienes().implies(torch.tensor(0.7), torch.tensor(0.2))
    tensor(0.3000)
    """

    name = "kleene_dienes"
    aliases = ("kd",)

    def implies(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.maximum(1 - a, b)


@register_logic
@dataclass(frozen=True, kw_only=True)
class Lukasiewicz(FuzzyLogic):
    """Lukasiewicz logic: ``and = max(0, sum - (n - 1))``, ``or = min(1, sum)``,
    ``a -> b = min(1, 1 - a + b)``.

    >>> Lukasiewicz().conj(torch.tensor([0.75, 0.5]))
    tensor(0.2500)
    """

    name = "lukasiewicz"
    aliases = ("łukasiewicz",)

    def _and(self, values: Tensor, dim: int) -> Tensor:
        return _floor0(values.sum(dim) - (values.shape[dim] - 1))

    def _or(self, values: Tensor, dim: int) -> Tensor:
        return _ceil1(values.sum(dim))

    def implies(self, a: Tensor, b: Tensor) -> Tensor:
        return _ceil1(1 - a + b)


@register_logic
@dataclass(frozen=True, kw_only=True)
class Reichenbach(FuzzyLogic):
    """Reichenbach logic: ``and = product``, ``or = 1 - prod(1 - v)``, ``a -> b = 1 - a + a b``.

    >>> Reichenbach().implies(torch.tensor(0.5), torch.tensor(0.5))
    tensor(0.7500)
    """

    name = "reichenbach"

    def _and(self, values: Tensor, dim: int) -> Tensor:
        return values.prod(dim)

    def _or(self, values: Tensor, dim: int) -> Tensor:
        return 1 - (1 - values).prod(dim)

    def implies(self, a: Tensor, b: Tensor) -> Tensor:
        return 1 - a + a * b


@register_logic
@dataclass(frozen=True, kw_only=True)
class Goguen(Reichenbach):
    """Goguen (product) logic: Reichenbach's ``and``/``or``, ``a -> b = 1 if a <= b else b / a``.

    >>> Goguen().implies(torch.tensor(0.8), torch.tensor(0.2))
    tensor(0.2500)
    """

    name = "goguen"
    aliases = ("product",)

    def implies(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = torch.broadcast_tensors(a, b)
        bigger = a > b  # then a > b >= 0, so the division is safe where it is used
        return torch.where(bigger, b / torch.where(bigger, a, 1.0), 1.0)


@register_logic
@dataclass(frozen=True, kw_only=True)
class Yager(FuzzyLogic):
    """Yager logic with parameter ``p > 0``: ``and = max(0, 1 - ||1 - v||_p)``,
    ``or = min(1, ||v||_p)``, ``a -> b = b ** a`` (``0 ** 0 = 1``).

    >>> Yager(p=2.0).disj(torch.tensor([0.6, 0.8]))
    tensor(1.)
    """

    name = "yager"
    p: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "p", check_real("Yager", "p", self.p, low=0.0, high=float("inf")))

    def _and(self, values: Tensor, dim: int) -> Tensor:
        return _floor0(1 - torch.linalg.vector_norm(1 - values, ord=self.p, dim=dim))

    def _or(self, values: Tensor, dim: int) -> Tensor:
        return _ceil1(torch.linalg.vector_norm(values, ord=self.p, dim=dim))

    def implies(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = torch.broadcast_tensors(a, b)
        positive = b > 0
        # b ** a through a base that is 1 where b == 0, so that d/da = b ** a * log(b) is not NaN.
        power = torch.where(positive, b, 1.0) ** a
        return torch.where(positive, power, (a == 0).to(power.dtype))
