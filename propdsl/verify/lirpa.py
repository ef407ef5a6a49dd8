"""auto_LiRPA as an optional second backend (used only when it can be imported).

auto_LiRPA has no release that installs next to current torch, so nothing in propdsl requires
it; `lirpa_available()` says whether it is there, and `lirpa_bounds` has the signature of
`compute_bounds`. For L1 / L2 balls the box part of the region is left out (auto_LiRPA applies
its box only to L-inf balls): bounds over the whole ball are sound for its intersection too.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor, nn

from propdsl.region import INF, Region
from propdsl.verify.bounds import AlphaOptions, Method, _method

__all__ = ["lirpa_available", "lirpa_bounds"]

_METHODS = {
    Method.IBP: "IBP",
    Method.CROWN_IBP: "CROWN-IBP",
    Method.CROWN: "backward",
    Method.ALPHA_CROWN: "CROWN-Optimized",
}


def lirpa_available() -> bool:
    """Whether auto_LiRPA can be imported."""
    return importlib.util.find_spec("auto_LiRPA") is not None


def lirpa_bounds(
    model: nn.Module,
    region: Region,
    method: Method | str = Method.CROWN,
    C: Tensor | None = None,
    options: AlphaOptions | None = None,
) -> tuple[Tensor, Tensor]:
    """`compute_bounds` computed by auto_LiRPA (raises ImportError without it)."""
    from auto_LiRPA import BoundedModule, BoundedTensor
    from auto_LiRPA.perturbations import PerturbationLpNorm

    method = _method(method)
    options = options or AlphaOptions()
    lo, hi = region.bounding_box()
    if region.centre is None or region.p == INF:
        centre = (lo + hi) / 2
        perturbation = PerturbationLpNorm(norm=INF, x_L=lo, x_U=hi)
    else:
        centre = region.centre
        assert region.radius is not None  # a ball always has a radius
        perturbation = PerturbationLpNorm(norm=region.p, eps=region.radius.reshape(-1, 1))
    bounded = BoundedModule(
        model,
        torch.empty_like(centre),
        device=centre.device,
        bound_opts={
            "optimize_bound_args": {"iteration": options.iterations, "lr_alpha": options.lr}
        },
    )
    if C is not None and C.dim() == 2:
        C = C.unsqueeze(0).expand(centre.shape[0], *C.shape)
    lb, ub = bounded.compute_bounds(
        x=(BoundedTensor(centre, perturbation),), method=_METHODS[method], C=C
    )
    return lb, ub
