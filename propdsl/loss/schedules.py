"""Loss weights that adapt during training.

`WoodsPsi` is the adaptive regularisation weight of Woods, Chen & Teuscher 2019 ("Adversarial
explanations for understanding image classification decisions and improved neural network
robustness"): after every optimiser step t, with L_t the batch's cross-entropy,

    R_t = max(0, R_{t-1} + clip(-ln(L_t / target), -down, +up)),   psi_t = base * exp(rate * R_t),

target 1.5, down 0.01, up 1, base 220, rate 0.02 in the paper. While the cross-entropy stays
below `target` the weight grows (by up to a factor exp(rate * up) a step); above it, it shrinks
slowly. The step t uses psi_{t-1} (psi_0 = base, R_0 = 0): psi_t needs the loss of step t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["WoodsPsi"]


@dataclass(frozen=True, kw_only=True)
class WoodsPsi:
    """The options of Woods et al.'s adaptive weight: the spec param named `weight`.

    >>> s = WoodsPsi(weight="psi")
    >>> s.value(0.0), s.advance(0.0, 1.5 * math.exp(-0.5))  # L below target: R grows by 0.5
    (220.0, 0.5)
    """

    weight: str
    base: float = 220.0
    rate: float = 0.02
    target: float = 1.5
    down: float = 0.01
    up: float = 1.0

    def value(self, r: float) -> float:
        """psi for the accumulator value R."""
        return self.base * math.exp(self.rate * r)

    def advance(self, r: float, loss: float) -> float:
        """R after a step whose cross-entropy was `loss` (> 0; 0 counts as the largest rise)."""
        change = self.up if loss <= 0 else -math.log(loss / self.target)
        return max(0.0, r + min(self.up, max(-self.down, change)))
