"""Jacobian bounds of a model over a region: the bound engine's pre-activation bounds, then the
interval pass, tightened by the linear pass where affordable (`JacobianRelaxation`); and the
certified Lipschitz constants computed from them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from propdsl.region import Region
from propdsl.verify.bounds import Method, NamedEnum, _input_region, _method, _Propagation
from propdsl.verify.graph import BoundGraph, build_graph
from propdsl.verify.jacobian import linear
from propdsl.verify.jacobian.interval import interval_pass, output_spec
from propdsl.verify.jacobian.lipschitz import (
    chain_factors,
    factor_norm,
    lipschitz_bound,
    norm_value,
)
from propdsl.verify.layers import ActivationRule, Interval

__all__ = ["Analysis", "JacobianRelaxation", "analyse", "jacobian_bounds", "lipschitz_constant"]

log = logging.getLogger("propdsl.verify.jacobian")


class JacobianRelaxation(NamedEnum):
    """How `jacobian_bounds` bounds the products of the Jacobian with the derivative ranges; the
    strings "interval", "linear" and "auto" also work.

    * `INTERVAL`: interval products in one backward pass (Fast-Lip / RecurJac style);
    * `LINEAR`: that pass, then a CROWN-style linear pass in the derivatives (McCormick planes
      for the products; see docs/jacobian.md), the two intersected: never looser, tighter where
      Jacobian entries share derivatives (on the digits models: 2 to 6 times narrower, for
      1.0-1.3 times the cost with CROWN's pre-activation bounds, 1.5-2.3 times with IBP's);
    * `AUTO` (default): `LINEAR` while the linear pass takes at most `LINEAR_WORK_LIMIT`
      multiply-adds per sample, `INTERVAL` above (large inputs and wide layers).
    """

    INTERVAL = "interval"
    LINEAR = "linear"
    AUTO = "auto"


# AUTO takes the linear pass while it needs at most this many multiply-adds per sample (the


def jacobian_bounds(
    model: nn.Module,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
    *,
    region: Region | None = None,
    outputs: Sequence[int] | Tensor | None = None,
    C: Tensor | None = None,
    method: Method | str = Method.CROWN,
    relaxation: JacobianRelaxation | str = JacobianRelaxation.AUTO,
) -> tuple[Tensor, Tensor]:
    """Element-wise bounds of the Jacobian d f_o / d x valid at every x of the input region.

    Args:
        model: a network the bound engine can trace (see docs/bounds.md): nn.Sequential or a
            user module made of Linear, Conv2d, pooling, Normalize, reshapes, residual sums and
            ReLU / LeakyReLU / Tanh / Sigmoid / Softplus.
        lower, upper: the input box [B, *input_shape]; or give `region`.
        region: a `Region` (an Lp ball, optionally intersected with a box).
        outputs: which outputs (flattened indices): a sequence [K] shared by the batch, or a
            tensor [B, K] per sample (say `y[:, None]` for the saliency of the label). Default:
            every output.
        C: instead of `outputs`, a specification [B, S, O] or [S, O]: bound the Jacobian of
            C @ f (e.g. of margins f_y - f_j).
        method: how the pre-activation bounds are computed: `Method.CROWN` (tighter) or
            `Method.IBP` (faster).
        relaxation: how products with the derivative ranges are bounded: `"interval"`
            (interval products), `"linear"` (interval bounds intersected with CROWN-style
            linear bounds in the derivatives: never looser, a few times the cost) or `"auto"`
            (default: linear while its work is at most `LINEAR_WORK_LIMIT` per sample); see
            `JacobianRelaxation`.

    Returns:
        (lo, hi), each [B, K, *input_shape] (K = len(outputs), S with C, O by default), with
        lo <= d f_o(x) / d x <= hi for every x in the region: the gradients autograd computes,
        and at kinks of ReLU-like activations every one-sided derivative.

    Raises:
        UnsupportedLayerError: an operation without an affine rule or a derivative range.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    >>> x = torch.zeros(4, 2)
    >>> lo, hi = jacobian_bounds(net, x - 0.1, x + 0.1)
    >>> J = torch.func.vmap(torch.func.jacrev(net))(x)  # [4, 1, 2]
    >>> lo.shape, bool(((lo <= J) & (J <= hi)).all())
    (torch.Size([4, 1, 2]), True)
    """
    analysis = analyse(model, _input_region(lower, upper, region), method, relaxation)
    return analysis.jacobian(outputs, C)


@dataclass(eq=False)
class Analysis:
    """A model's bound graph with the bounds of every node over one region."""

    graph: BoundGraph
    bounds: list[Interval]
    box: Interval  # the region's bounding box [B, *input_shape]
    relaxation: JacobianRelaxation = JacobianRelaxation.AUTO
    # lipschitz's cache: every output's Jacobian bounds with respect to the input and to each
    # activation's output, and the chain's factors (None when the graph is not a chain)
    _cuts: tuple[Interval, dict[int, Interval]] | None = None
    _factors: list[tuple[Tensor, Tensor | None]] | None = None

    @property
    def like(self) -> Tensor:
        return self.box[0]

    def jacobian(self, outputs: Sequence[int] | Tensor | None, C: Tensor | None) -> Interval:
        out_shape = self.graph.nodes[self.graph.output].shape
        spec = output_spec(outputs, C, out_shape, self.like)
        lo, hi = self._rows(spec)
        shape = (self.like.shape[0], *lo.shape[1:])
        return lo.expand(shape), hi.expand(shape)

    def _linear(self, rows: int) -> bool:
        """Whether to take the linear pass for `rows` spec rows."""
        if self.relaxation is not JacobianRelaxation.AUTO:
            return self.relaxation is JacobianRelaxation.LINEAR
        work = linear.linear_work(self.graph, rows)
        if work > linear.LINEAR_WORK_LIMIT:
            log.debug(
                "Jacobian bounds: interval pass only (the linear pass would take about %d "
                "multiply-adds per sample, above LINEAR_WORK_LIMIT)",
                work,
            )
            return False
        return True

    def _rows(self, spec: Tensor, keep: dict[int, Interval] | None = None) -> Interval:
        """Bounds of spec . d out / d input: the interval pass, tightened by the linear pass
        where `relaxation` asks for it (`keep` as for `interval_pass`)."""
        cuts = keep if keep is not None else {}
        lo, hi = interval_pass(self.graph, self.bounds, spec, cuts)
        if bool((lo == hi).all()) or not self._linear(spec.shape[1]):
            return lo, hi  # exact already (every derivative known), or intervals asked for
        return _intersect((lo, hi), linear.linear_pass(self.graph, self.bounds, spec, cuts))

    def lipschitz(self, p: float | str, q: float | str) -> Tensor:
        """A certified Lipschitz constant [B] from the q-norm of the input to the p-norm of
        every output (see `lipschitz_constant`)."""
        p, q = norm_value(p), norm_value(q)
        if self._cuts is None:
            spec = output_spec(None, None, self.graph.nodes[self.graph.output].shape, self.like)
            keep: dict[int, Interval] = {}
            self._cuts = (self._rows(spec, keep), keep)
            self._factors = chain_factors(self.graph, self.bounds, self.like)
        (lo, hi), keep = self._cuts
        batch = self.like.shape[0]
        best = lipschitz_bound(*_expand(lo, hi, batch), p, q)
        if (p, q) != (2.0, 2.0):
            # Through the 2 -> 2 bound: ||y||_p <= n_out^max(0, 1/p - 1/2) ||y||_2 and
            # ||v||_2 <= n_in^max(0, 1/2 - 1/q) ||v||_q.
            n_out, n_in = lo.shape[1], math.prod(lo.shape[2:])
            factor = n_out ** max(0.0, 1 / p - 0.5) * n_in ** max(0.0, 0.5 - 1 / q)
            best = torch.minimum(best, factor * self.lipschitz(2, 2))
        if self._factors is None:
            return best
        # Cut the chain after each activation k: J = (d f / d u_k)(d u_k / d x), the first
        # factor bounded from its interval, the second by the product of the layers' norms.
        running = torch.ones(batch, dtype=best.dtype, device=best.device)
        nodes = self.graph.nodes
        activations = [n.index for n in nodes if isinstance(n.rule, ActivationRule)]
        for (A, m), k in zip(self._factors[:-1], activations, strict=True):
            running = running * factor_norm(A, m, q)
            best = torch.minimum(best, lipschitz_bound(*_expand(*keep[k], batch), p, q) * running)
        return best


def _intersect(bounds: Interval, tight: Interval | None) -> Interval:
    """The intersection of two bounds of one quantity; where rounding makes it empty (both
    nearly a point), the first."""
    if tight is None:
        return bounds
    lo, hi = torch.maximum(bounds[0], tight[0]), torch.minimum(bounds[1], tight[1])
    empty = lo > hi
    return torch.where(empty, bounds[0], lo), torch.where(empty, bounds[1], hi)


def _expand(lo: Tensor, hi: Tensor, batch: int) -> Interval:
    shape = (batch, *lo.shape[1:])
    return lo.expand(shape), hi.expand(shape)


def analyse(
    model: nn.Module,
    region: Region,
    method: Method | str,
    relaxation: JacobianRelaxation | str = JacobianRelaxation.AUTO,
) -> Analysis:
    method = _method(method)
    relaxation = JacobianRelaxation(relaxation)
    if method is Method.ALPHA_CROWN:
        raise ValueError("Jacobian bounds take pre-activation bounds from 'ibp' or 'crown'")
    if method is Method.CROWN_IBP:  # its intermediate bounds are IBP's
        method = Method.IBP
    lo, hi = region.bounding_box()
    example = ((lo[:1] + hi[:1]) / 2).repeat(2, *([1] * (lo.dim() - 1)))
    graph = build_graph(model, example)
    prop = _Propagation(graph, region, lo, hi)
    if method is Method.IBP:
        prop.run_ibp()
    else:
        prop.run_crown()
    return Analysis(graph, prop.bounds, (lo, hi), relaxation)


def lipschitz_constant(
    model: nn.Module,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
    *,
    region: Region | None = None,
    p: float | str = 2,
    q: float | str = 2,
    method: Method | str = Method.CROWN,
    relaxation: JacobianRelaxation | str = JacobianRelaxation.AUTO,
) -> Tensor:
    """A certified local Lipschitz constant [B] of the model over each (convex) region:
    ||f(x1) - f(x2)||_p <= L ||x1 - x2||_q for all x1, x2 in the region.

    `lipschitz_bound` of the Jacobian bounds (tight for small regions, where few neurons are
    unstable), and, for chains of layers (nn.Sequential), the smallest of the bounds obtained
    by cutting the chain after an activation k: `lipschitz_bound` of the bounds of d f / d u_k
    (u_k the activation's output) times the product of the q -> q norms of the layers before,
    each with the activation's largest |f'| on the region, `||diag(m_i) A_i||`. The cut after
    the last activation is the product of the layers' local norms, which never exceeds the
    global product of the layers' norms. For norms other than 2 -> 2, the 2 -> 2 bound
    converted with the norm equivalences of the input and output dimensions competes too.
    Computed without gradients.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    >>> x = torch.rand(4, 2)
    >>> L = lipschitz_constant(net, x - 0.1, x + 0.1, p=2, q=2)
    >>> L.shape
    torch.Size([4])
    """
    with torch.no_grad():
        analysis = analyse(model, _input_region(lower, upper, region), method, relaxation)
        return analysis.lipschitz(p, q)


# Chains whose affine segments have at most this many (input, output) pairs get the chain bound.
