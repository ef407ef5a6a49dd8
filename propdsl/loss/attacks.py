"""Moved to `propdsl.attacks` (the evaluation and the verifier's falsifier use the attacks too);
this module re-exports its public names for code written against the old place."""

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
