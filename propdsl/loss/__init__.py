"""Losses from properties: the loss side of the interpreter (`propdsl.interpret`), with logics,
attack-driven quantifiers and certified terms. The attacks live in `propdsl.attacks`; their
names are re-exported here as before."""

from propdsl.attacks import (
    APGD,
    PGD,
    AttackResult,
    VanishingGradientWarning,
    run_attack,
    smooth_relu,
)

__all__ = [
    "APGD",
    "PGD",
    "AttackResult",
    "VanishingGradientWarning",
    "run_attack",
    "smooth_relu",
]
