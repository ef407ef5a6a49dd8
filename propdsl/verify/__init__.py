"""Verification: sound bounds of networks over input regions (IBP, CROWN, alpha-CROWN).

`bounds(model, lower, upper, method=..., C=...)` is the entry point; `register_rule` extends the
set of layers it understands. See docs/bounds.md.
"""

from propdsl.verify.bounds import AlphaOptions, Method, bounds, compute_bounds
from propdsl.verify.layers import (
    REGISTRY,
    ActivationRule,
    AffineRule,
    BoundRule,
    Call,
    ElementwiseLinearRule,
    NonlinearRule,
    Relaxation,
    SShapedRule,
    UnsupportedLayerError,
    register_rule,
)

__all__ = [
    "REGISTRY",
    "ActivationRule",
    "AffineRule",
    "AlphaOptions",
    "BoundRule",
    "Call",
    "ElementwiseLinearRule",
    "Method",
    "NonlinearRule",
    "Relaxation",
    "SShapedRule",
    "UnsupportedLayerError",
    "bounds",
    "compute_bounds",
    "register_rule",
]
