"""The interval pass of the Jacobian bounds: from the output back to the input, the Jacobian
rows asked for are kept as an interval matrix (a centre and a radius), exact through affine
layers (`A_mid M +- A_rad |M|`, `AffineRule.backward` and `abs_backward`) and bounded through
each nonlinear operation by its rule (`BoundRule.derivative_backward`: for an activation, the
interval product with its derivative range). See docs/jacobian.md, "Method".
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from propdsl.verify.bounds import _spec
from propdsl.verify.graph import BoundGraph
from propdsl.verify.layers import ActivationRule, AffineRule, Interval, UnsupportedLayerError

__all__ = ["add_optional", "interval_pass", "output_spec"]


def add_optional(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a + b, where None is an exact zero."""
    if a is None:
        return b
    return a if b is None else a + b


def interval_pass(
    graph: BoundGraph,
    pre: list[Interval],
    spec: Tensor,
    keep: dict[int, Interval] | None = None,
) -> Interval:
    """Interval bounds of spec . d out / d input, from the output back to the input; with
    `keep`, also those of spec . d out / d node for every activation node (its output).

    Per node the interval is a centre [B', S, *shape] and a radius (None while exact)."""
    mids: dict[int, Tensor] = {graph.output: spec}
    rads: dict[int, Tensor | None] = {graph.output: None}
    for i in range(graph.output, 0, -1):
        if i not in mids:
            continue
        mid, rad = mids.pop(i), rads.pop(i)
        node = graph.nodes[i]
        if keep is not None and isinstance(node.rule, ActivationRule):
            keep[i] = (mid, mid) if rad is None else (mid - rad, mid + rad)
        rule = node.rule
        if isinstance(rule, AffineRule):
            # Exact through an affine map: the centre by `backward`, the radius through |M|.
            ins: list[Tensor | None] = list(rule.backward(mid)[0])
            rad_ins: list[Tensor | None] = (
                [None] * len(ins) if rad is None else rule.abs_backward(rad)
            )
        elif rule is not None:
            # Activations (an interval product with their derivative range), max pooling, ...:
            # each rule bounds its own step (`BoundRule.derivative_backward`).
            a_lo, a_hi = (mid, mid) if rad is None else (mid - rad, mid + rad)
            lo, hi = rule.derivative_backward(a_lo, a_hi, *pre[node.inputs[0]])
            ins, rad_ins = [(lo + hi) / 2], [(hi - lo) / 2]
        else:
            raise UnsupportedLayerError(
                "the input: Jacobian bounds need an AffineRule or an ActivationRule for every "
                "operation"
            )
        for j, m, r in zip(node.inputs, ins, rad_ins, strict=True):
            if m is None:
                continue
            mids[j] = cast(Tensor, add_optional(mids.get(j), m))
            rads[j] = add_optional(rads.get(j), r)
    centre = mids.get(0)
    if centre is None:  # the output does not depend on the input through any path
        centre = spec.new_zeros(*spec.shape[:2], *graph.nodes[0].shape)
    radius = rads.get(0)
    return (centre, centre) if radius is None else (centre - radius, centre + radius)


def output_spec(
    outputs: Sequence[int] | Tensor | None,
    C: Tensor | None,
    out_shape: torch.Size,
    like: Tensor,
) -> Tensor:
    """Rows [B', S, *out_shape] whose Jacobians are bounded."""
    n = math.prod(out_shape)
    batch = like.shape[0]
    if C is not None:
        if outputs is not None:
            raise ValueError("give outputs or C, not both")
        rows = cast(Tensor, _spec(C, out_shape, like))
        return rows[:, : rows.shape[1] // 2]  # _spec stacks [C; -C]
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    if outputs is None:
        return eye.reshape(1, n, *out_shape)
    index = torch.as_tensor(outputs, device=like.device)
    if index.dtype in (torch.bool,) or index.is_floating_point() or index.dim() not in (1, 2):
        raise ValueError(
            "outputs must be output indices: a sequence [K] shared by the batch or a tensor "
            f"[B, K] per sample, got {tuple(index.shape)} {index.dtype}"
        )
    if index.dim() == 2 and index.shape[0] != batch:
        raise ValueError(f"outputs [B, K] must have B = {batch} rows, got {index.shape[0]}")
    if bool(((index < 0) | (index >= n)).any()):
        raise ValueError(f"outputs must lie in 0..{n - 1}")
    rows = eye[index.long()]  # [K, n] or [B, K, n]
    rows = rows if rows.dim() == 3 else rows.unsqueeze(0)
    return rows.reshape(rows.shape[0], rows.shape[1], *out_shape)
