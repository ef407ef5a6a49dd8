"""Differentiable logics: the semantics that turn properties into losses.

Every logic is registered by name; the compiler asks for one with ``get_logic``::

    >>> import torch
    >>> from propdsl.logics import Cmp, get_logic, stack
    >>> dl2 = get_logic("dl2")
    >>> v = dl2.conj(stack([dl2.atom(Cmp.LE, torch.tensor(3.0), torch.tensor(1.0)),
    ...                     dl2.atom(Cmp.EQ, torch.tensor(1.0), torch.tensor(1.0))]))
    >>> dl2.loss(v)
    tensor(2.)

Built in: ``dl2``, ``godel``, ``kleene_dienes``, ``lukasiewicz``, ``reichenbach``, ``goguen``,
``yager(p)``, ``stl(k)``, ``qll(p)``, and, for evaluation only, ``violation`` (signed violation
for attacks) and ``boolean`` (exact satisfaction). Formulas: docs/logics.md.
"""

from __future__ import annotations

from propdsl.logics.base import (
    Cmp,
    Logic,
    LogicError,
    UnsupportedConnectiveError,
    available_logics,
    get_logic,
    logic_class,
    register_logic,
    stack,
)
from propdsl.logics.boolean import Boolean
from propdsl.logics.dl2 import DL2
from propdsl.logics.fuzzy import (
    FuzzyLogic,
    Godel,
    Goguen,
    KleeneDienes,
    Lukasiewicz,
    Reichenbach,
    Yager,
)
from propdsl.logics.quantitative import QLL, STL, Violation, robustness

__all__ = [
    "DL2",
    "QLL",
    "STL",
    "Boolean",
    "Cmp",
    "FuzzyLogic",
    "Godel",
    "Goguen",
    "KleeneDienes",
    "Logic",
    "LogicError",
    "Lukasiewicz",
    "Reichenbach",
    "UnsupportedConnectiveError",
    "Violation",
    "Yager",
    "available_logics",
    "get_logic",
    "logic_class",
    "register_logic",
    "robustness",
    "stack",
]
