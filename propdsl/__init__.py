"""propdsl: a language for robustness properties of neural networks.

One `.prop` file states what a network must satisfy; the same file drives training (properties
become differentiable losses) and checking (properties become verification queries).

>>> import propdsl
>>> spec = propdsl.load("network f : Tensor[2] -> Tensor[2]")
>>> sorted(spec.networks)
['f']

Importing this package loads neither torch nor sympy: the heavy parts load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from propdsl.errors import (
    CheckError,
    OverrideError,
    ParseError,
    PropdslError,
    SpecError,
    UsageError,
)

__version__ = "0.1.0"

__all__ = [
    "APGD",
    "PGD",
    "CheckError",
    "OverrideError",
    "Property",
    "ParseError",
    "PropdslError",
    "Spec",
    "SpecError",
    "UsageError",
    "__version__",
    "bounds",
    "jacobian_bounds",
    "load",
    "load_onnx",
    "onnx_forward",
    "read_vnnlib",
    "register_dataset",
    "register_logic",
    "register_model",
]

_LAZY = {
    "PGD": "propdsl.loss.attacks",
    "APGD": "propdsl.loss.attacks",
    "load": "propdsl.api",
    "bounds": "propdsl.verify.bounds",
    "jacobian_bounds": "propdsl.verify.jacobian",
    "Spec": "propdsl.api",
    "Property": "propdsl.api",
    "load_onnx": "propdsl.interop.onnx_import",
    "onnx_forward": "propdsl.interop.onnx_import",
    "read_vnnlib": "propdsl.interop.vnnlib",
    # user registrations: what they add, a spec loaded afterwards may name (docs/architecture.md)
    "register_logic": "propdsl.logics",
    "register_dataset": "propdsl.data",
    "register_model": "propdsl.models",
}

if TYPE_CHECKING:
    from propdsl.api import Property, Spec, load
    from propdsl.data import register_dataset
    from propdsl.interop.onnx_import import load_onnx, onnx_forward
    from propdsl.interop.vnnlib import read_vnnlib
    from propdsl.logics import register_logic
    from propdsl.loss.attacks import APGD, PGD
    from propdsl.models import register_model
    from propdsl.verify.bounds import bounds
    from propdsl.verify.jacobian import jacobian_bounds


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'propdsl' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
