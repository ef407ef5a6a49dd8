"""Losses from properties, and the attacks that find the worst points of their quantifiers."""

from propdsl.loss.attacks import (
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
