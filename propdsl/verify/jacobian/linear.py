"""The linear pass of the Jacobian bounds: CROWN-style linear bounds in the activations'
derivatives, which keep the correlations that the interval pass's products lose.

The rows Lambda_0 = spec . d out / d x are what `interval_pass` computes with intervals:
Lambda_out = spec and, for every other node i, Lambda_i = sum over its consumers c of Lambda_c
M_{c,i} (c affine) or Lambda_c * d_c (c an activation; d_c its derivative, one variable per
neuron, in the box [d_lo, d_hi] of `derivative_range`). Lambda_0 is multilinear in the d's, and
interval products lose the correlations between entries that share them. The linear pass keeps
them: CROWN-style back-substitution through this "Jacobian network", with each product z * d (z
an entry of Lambda_c, bounded by the interval pass; d its derivative) replaced by the average of
its two McCormick planes on each side:

    z d = d_mid z + z_mid (d - d_mid) + e,   |e| <= z_rad d_rad.

Both sides share the slopes, so the back-substitution does not depend on the bound's side or
on the coefficients' signs: starting from the input (Gamma_0 = I), the coefficients Gamma_i
of Lambda_i are the forward Jacobian d node_i / d x of the *centre network* (every derivative
replaced by d_mid), the same for every spec row; each activation adds its error,
|Gamma_in(c)| (max |Lambda_c| d_rad), where the z_mid (d - d_mid) and e terms are
concretised over the box (|z_mid| d_rad + z_rad d_rad); and the output gives the centre
network's Jacobian, Gamma_out . spec. The bounds are that Jacobian plus or minus the summed
errors (docs/jacobian.md: why this choice of planes, the soundness argument, the figures).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor

from propdsl.verify.graph import BoundGraph
from propdsl.verify.jacobian.interval import add_optional
from propdsl.verify.layers import (
    ActivationRule,
    AffineRule,
    Interval,
    NoForwardMap,
    derivative_range,
)

__all__ = ["LINEAR_BLOCK", "LINEAR_WORK_LIMIT", "linear_pass", "linear_work"]

# digits MLP needs 0.8 M, the CNN 3.4 M; a CIFAR-sized CNN billions).
LINEAR_WORK_LIMIT = 1 << 26
# The linear pass's coefficients are computed in blocks of input coordinates holding at most
# this many entries.
LINEAR_BLOCK = 1 << 22


def linear_work(graph: BoundGraph, rows: int) -> int:
    """Multiply-adds per sample of the linear pass for `rows` spec rows: the input's size times
    the affine layers' sizes (as dense matrices) from the first activation on, plus the error
    products of the activations."""
    n_in = math.prod(graph.nodes[0].shape)
    work, started = 0, False
    for node in graph.nodes[1:]:
        size = math.prod(node.shape)
        if isinstance(node.rule, ActivationRule):
            started = True
            work += size * (rows + 1)
        elif started:
            fan = sum(math.prod(graph.nodes[j].shape) for j in node.inputs)
            mixes = isinstance(node.rule, AffineRule) and node.rule.mixes
            work += size * fan if mixes else size
    return n_in * work


def linear_pass(
    graph: BoundGraph,
    pre: list[Interval],
    spec: Tensor,
    cuts: dict[int, Interval],
    block: int = LINEAR_BLOCK,
) -> Interval | None:
    """Linear bounds [B', S, *input_shape] of spec . d out / d input (see the comment above),
    from the pre-activation bounds `pre` and the interval pass's bounds `cuts` of
    spec . d out / d node for every activation node; None where an affine layer has no forward
    map within the size limits."""
    nodes = graph.nodes
    if not all(isinstance(node.rule, AffineRule | ActivationRule) for node in nodes[1:]):
        return None  # nonlinear rules of several elements (max pooling): the interval pass only
    # Per activation: the centre of its derivative range [B, 1, *shape] and the error weights
    # max |Lambda_c| d_rad [B, S, n_c].
    centres: dict[int, Tensor] = {}
    weights: dict[int, Tensor] = {}
    for c, node in enumerate(nodes):
        if isinstance(node.rule, ActivationRule):
            d_lo, d_hi = derivative_range(node.rule, *pre[node.inputs[0]])
            z_lo, z_hi = cuts[c]
            centres[c] = ((d_hi + d_lo) / 2).unsqueeze(1)
            bound = torch.maximum(z_lo.abs(), z_hi.abs())
            weights[c] = (bound * ((d_hi - d_lo) / 2).unsqueeze(1)).flatten(2)
    shape = nodes[0].shape
    n = math.prod(shape)
    batch = max([spec.shape[0], *(w.shape[0] for w in weights.values())])
    widest = max(math.prod(node.shape) for node in nodes)
    step = max(1, block // (batch * widest))
    eye = torch.eye(n, dtype=spec.dtype, device=spec.device)
    spec_t = spec.flatten(2).mT  # [B', n_out, S]
    mids: list[Tensor] = []
    rads: list[Tensor] = []
    try:
        for first in range(0, n, step):
            rows = eye[first : first + step].reshape(1, -1, *shape)
            mid, rad = _linear_block(graph, centres, weights, spec_t, rows)
            mids.append(mid)
            rads.append(rad)
    except NoForwardMap:
        return None
    mid = torch.cat(mids, dim=1).mT  # [B'', S, n]
    rad = torch.cat(rads, dim=1).mT
    lo, hi = mid - rad, mid + rad
    lead = lo.shape[:2]
    return lo.reshape(*lead, *shape), hi.reshape(*lead, *shape)


def _linear_block(
    graph: BoundGraph,
    centres: dict[int, Tensor],
    weights: dict[int, Tensor],
    spec_t: Tensor,
    rows: Tensor,
) -> tuple[Tensor, Tensor]:
    """The centre network's Jacobian and the error bound, [B'', T, S] each, for the input
    directions `rows` [1, T, *input_shape]."""
    gammas: dict[int, Tensor] = {0: rows}
    mid: Tensor | None = None
    rad: Tensor | None = None
    for i in range(len(graph.nodes)):
        G = gammas.pop(i, None)
        if G is None:
            continue
        if i == graph.output:
            mid = G.flatten(2) @ spec_t
            continue
        for c in graph.consumers[i]:
            consumer = graph.nodes[c]
            rule = consumer.rule
            if isinstance(rule, ActivationRule):
                rad = add_optional(rad, G.abs().flatten(2) @ weights[c].mT)
                new: Tensor | None = G * centres[c]
            else:
                new = None
                for k, j in enumerate(consumer.inputs):
                    if j == i:
                        new = add_optional(new, cast(AffineRule, rule).forward_linear(k, G))
            gammas[c] = cast(Tensor, add_optional(gammas.get(c), new))
    mid = cast(Tensor, mid)
    return mid, torch.zeros_like(mid) if rad is None else rad
