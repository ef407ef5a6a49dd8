"""Quantitative logics: real values whose sign says whether the formula holds.

``stl`` gives robustness (>= 0: holds), ``qll`` and ``violation`` give violation (<= 0: holds).
Formulas and the reasons behind each choice: docs/logics.md.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from propdsl.logics.base import (
    Cmp,
    Logic,
    check_real,
    difference,
    float_like,
    operands,
    reduced_like,
    register_logic,
)

__all__ = ["QLL", "STL", "Violation", "robustness"]

_INF = float("inf")


def robustness(op: Cmp, lhs: Tensor, rhs: Tensor, xi: float = 0.0) -> Tensor:
    """The signed margin by which ``lhs op rhs`` holds (positive: holds, negative: fails).

    ``a <= b`` and ``a < b`` give ``b - a``, ``a == b`` gives ``-|a - b|`` and ``a != b`` gives
    ``|a - b|``. Strict comparisons (``<``, ``>``, ``!=``) lose ``xi`` at equality, where they
    fail: with ``xi > 0`` every comparison holds exactly when its margin is >= 0.

    >>> robustness(Cmp.LT, torch.tensor([1.0, 2.0]), torch.tensor(2.0), xi=0.5)
    tensor([ 1.0000, -0.5000])
    """
    a, b = operands(lhs, rhs)
    if op in (Cmp.GE, Cmp.GT):
        a, b = b, a
    if op in (Cmp.LE, Cmp.GE, Cmp.LT, Cmp.GT):
        margin = difference(b, a)
    elif op is Cmp.EQ:
        margin = -difference(a, b).abs()
    elif op is Cmp.NE:
        margin = difference(a, b).abs()
    else:
        raise TypeError(f"not a comparison: {op!r}")
    if op.strict and xi:
        margin = margin - xi * (a == b).to(margin.dtype)
    return margin


def _infinite(truth: bool, like: Tensor, true_sign: float) -> Tensor:
    return torch.full_like(like, true_sign * (_INF if truth else -_INF), dtype=float_like(like))


@dataclass(frozen=True, kw_only=True)
class _SignedLogic(Logic):
    """Shared reductions: empty conjunctions / disjunctions are the constants."""

    has_negation = True

    def conj(self, values: Tensor, dim: int = -1) -> Tensor:
        if values.shape[dim] == 0:
            return self.constant(True, reduced_like(values, dim))
        return self._and(values, dim)

    def disj(self, values: Tensor, dim: int = -1) -> Tensor:
        if values.shape[dim] == 0:
            return self.constant(False, reduced_like(values, dim))
        return self._or(values, dim)

    def neg(self, value: Tensor) -> Tensor:
        return -value

    @abc.abstractmethod
    def _and(self, values: Tensor, dim: int) -> Tensor:
        """The conjunction over a non-empty ``dim``."""

    @abc.abstractmethod
    def _or(self, values: Tensor, dim: int) -> Tensor:
        """The disjunction over a non-empty ``dim``."""


@register_logic
@dataclass(frozen=True, kw_only=True)
class STL(_SignedLogic):
    """Smooth STL robustness: positive = holds, ``not = -x``, loss ``max(-rho, 0)``.

    ``and`` is the log-sum-exp soft minimum ``-(1/k) log sum exp(-k v)``, and ``or`` the soft
    maximum ``(1/k) (log sum exp(k v) - log n)``. Both lie below the hard min / max (by at most
    ``log(n) / k``), so a positive smooth robustness proves the formula holds (for formulas in
    negation normal form, which is what the compiler produces).

    Args:
        k: > 0, the sharpness; larger is closer to min / max.
        xi: >= 0; strict comparisons lose ``xi`` at equality, where they fail.

    >>> STL(k=2.0).conj(torch.tensor([0.0, 0.0]))  # -log(2) / 2, below min = 0
    tensor(-0.3466)
    """

    name = "stl"
    k: float = 10.0
    xi: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "k", check_real("STL", "k", self.k, low=0.0, high=_INF))
        object.__setattr__(self, "xi", _check_xi("STL", self.xi))

    def atom(self, op: Cmp, lhs: Tensor, rhs: Tensor) -> Tensor:
        return robustness(op, lhs, rhs, self.xi)

    def _and(self, values: Tensor, dim: int) -> Tensor:
        return -torch.logsumexp(-self.k * values, dim) / self.k

    def _or(self, values: Tensor, dim: int) -> Tensor:
        return (torch.logsumexp(self.k * values, dim) - math.log(values.shape[dim])) / self.k

    def loss(self, value: Tensor) -> Tensor:
        return torch.relu(-value)

    def constant(self, truth: bool, like: Tensor) -> Tensor:
        return _infinite(truth, like, 1.0)


@register_logic
@dataclass(frozen=True, kw_only=True)
class QLL(_SignedLogic):
    """QLL: violation values (positive = violated), ``and = (1/p) log sum exp(p v)``,
    ``or = -(1/p) log sum exp(-p v)``, ``not = -x``, loss ``max(v, 0)``.

    Args:
        p: > 0, the sharpness; larger is closer to max / min.
        xi: >= 0; strict comparisons gain ``xi`` of violation at equality, where they fail.

    >>> QLL(p=1.0).atom(Cmp.LE, torch.tensor(3.0), torch.tensor(1.0))
    tensor(2.)
    """

    name = "qll"
    p: float = 10.0
    xi: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "p", check_real("QLL", "p", self.p, low=0.0, high=_INF))
        object.__setattr__(self, "xi", _check_xi("QLL", self.xi))

    def atom(self, op: Cmp, lhs: Tensor, rhs: Tensor) -> Tensor:
        return -robustness(op, lhs, rhs, self.xi)

    def _and(self, values: Tensor, dim: int) -> Tensor:
        return torch.logsumexp(self.p * values, dim) / self.p

    def _or(self, values: Tensor, dim: int) -> Tensor:
        return -torch.logsumexp(-self.p * values, dim) / self.p

    def loss(self, value: Tensor) -> Tensor:
        return torch.relu(value)

    def constant(self, truth: bool, like: Tensor) -> Tensor:
        return _infinite(truth, like, -1.0)


@register_logic
@dataclass(frozen=True, kw_only=True)
class Violation(_SignedLogic):
    """Hard signed violation for attacks (positive = violated, not trainable as a loss).

    ``a <= b`` and ``a < b`` give ``a - b``, ``a == b`` gives ``|a - b|``, ``a != b`` gives
    ``-|a - b|``; ``and = max``, ``or = min``, ``not = -v``, ``a -> b = min(-a, b)``,
    loss ``max(v, 0)``. Its gradient is informative where the formula holds too, which is what
    an attack climbing towards a counterexample needs. Strict and non-strict comparisons agree
    (the closure of the violated set): use ``boolean`` to decide satisfaction.

    >>> Violation().conj(torch.tensor([-1.0, 0.5]))
    tensor(0.5000)
    """

    name = "violation"
    trainable = False

    def atom(self, op: Cmp, lhs: Tensor, rhs: Tensor) -> Tensor:
        if not (isinstance(lhs, Tensor) and isinstance(rhs, Tensor)):
            lhs, rhs = operands(lhs, rhs)
        # The attack's hot path: a plain difference, no host sync; equal operands (two equal
        # infinities included) differ by exactly 0. `b - a` is exactly `-(a - b)` in floating
        # point, so `>=` subtracts the other way round instead of negating (one op fewer
        # forward and backward, every attack step).
        greater = op in (Cmp.GE, Cmp.GT)
        # masked_fill, not where: the same values and gradients, one op fewer each way
        d = (rhs - lhs if greater else lhs - rhs).masked_fill(lhs == rhs, 0.0)
        if greater or op in (Cmp.LE, Cmp.LT):
            return d
        if op is Cmp.EQ:
            return d.abs()
        return -d.abs()

    def _and(self, values: Tensor, dim: int) -> Tensor:
        return values.amax(dim)

    def _or(self, values: Tensor, dim: int) -> Tensor:
        return values.amin(dim)

    def implies(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.minimum(-a, b)

    def loss(self, value: Tensor) -> Tensor:
        return torch.relu(value)

    def constant(self, truth: bool, like: Tensor) -> Tensor:
        return _infinite(truth, like, -1.0)


def _check_xi(cls_name: str, xi: object) -> float:
    # xi == 0 is allowed here: it gives the closure semantics of `violation`.
    if isinstance(xi, int | float) and not isinstance(xi, bool) and xi == 0:
        return 0.0
    return check_real(cls_name, "xi", xi, low=0.0, high=_INF)
