"""Verification problems in VNN-LIB's form, shared by the VNN-LIB reader and the complete verifier.

A VNN-LIB file states the *violation* of a property: an input region and a disjunction of
conjunctions of linear output constraints. The answer is `sat` when some input of the region
makes some conjunction true (a counterexample: the property is violated), `unsat` when none does
(the property holds). `propdsl.verify.problem` holds only the data; readers build it and solvers
answer it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from propdsl.region import Region

__all__ = ["Answer", "Disjunct", "Problem", "Result"]


@dataclass(frozen=True, eq=False)
class Disjunct:
    """One conjunction of linear constraints on the flattened output y: `A @ y <= b`, every row.

    `A` is [m, n_outputs] and `b` is [m]; a row `y_0 >= y_1` is stored as `-y_0 + y_1 <= 0`.
    """

    A: Tensor
    b: Tensor

    def __post_init__(self) -> None:
        if self.A.dim() != 2 or self.b.dim() != 1 or self.A.shape[0] != self.b.shape[0]:
            raise ValueError(
                f"a disjunct needs A [m, n] and b [m], got {tuple(self.A.shape)} and "
                f"{tuple(self.b.shape)}"
            )

    def satisfied(self, y: Tensor, tol: float = 0.0) -> Tensor:
        """BoolTensor[B]: where the outputs y [B, n] satisfy every row (within `tol`)."""
        A = self.A.to(dtype=y.dtype, device=y.device)
        b = self.b.to(dtype=y.dtype, device=y.device)
        return (y.flatten(1) @ A.T <= b + tol).all(dim=1)


@dataclass(frozen=True, eq=False)
class Problem:
    """Is there an input in `region` whose output satisfies one of `disjuncts`?

    `region` holds one sample (its tensors have a batch dimension of 1); a VNN-LIB input box is
    `Region.box(lo, hi)`. `name` says where the problem came from (a file, a property).
    """

    region: Region
    disjuncts: tuple[Disjunct, ...]
    name: str = ""

    def violated_at(self, y: Tensor, tol: float = 0.0) -> Tensor:
        """BoolTensor[B]: where the outputs y [B, n] satisfy some disjunct (a violation)."""
        hit = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        for d in self.disjuncts:
            hit |= d.satisfied(y, tol)
        return hit


class Answer(enum.Enum):
    """The verification competition's answers."""

    SAT = "sat"  # a counterexample exists (and is given)
    UNSAT = "unsat"  # proved: no input of the region violates the property
    TIMEOUT = "timeout"
    UNKNOWN = "unknown"  # neither proved nor refuted (incomplete method, or unsupported)


@dataclass(frozen=True)
class Result:
    """A solver's answer to one `Problem`.

    `counterexample` (the input, shape of one sample without the batch dimension) and `output`
    are set exactly when the answer is SAT. `reason` says in words what was proved or why not;
    `stats` holds counters (sub-domains visited, bound calls, ...).
    """

    answer: Answer
    seconds: float
    counterexample: Tensor | None = None
    output: Tensor | None = None
    reason: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
