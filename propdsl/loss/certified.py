"""Certified training: `certified(p, method = ibp | crown_ibp)` in a train block's loss.

The loss of a batch is computed from sound bounds instead of an attack:

1. the property's query is built for the batch with the current model
   (`propdsl.verify.query.to_query`, radii scaled by the training eps ramp-up), giving linear rows
   `C f(x') + d >= 0` over the region, combined by all / any;
2. each row's lower bound `lb` over the region comes from bound propagation, differentiable in
   the weights: `ibp` uses interval bounds (Gowal et al. 2018); `crown_ibp` the mean of the
   interval and the CROWN lower bounds (the midpoint of CROWN-IBP's mixing schedule,
   Zhang et al. 2020, at a fixed beta = 0.5; our CROWN uses CROWN intermediate bounds, tighter
   than CROWN-IBP's interval ones);
3. the certified margins `m = lb + d` (>= 0 proves a row) become a cross-entropy on worst-case
   margins. For one block of rows, `loss = logsumexp([0, -m_1, ..., -m_S])`: for classification
   robustness (`m_j` bounds `f_y - f_j`) this is exactly the cross-entropy of the worst-case
   logits `z_y = 0, z_j = -m_j`, the loss of IBP / CROWN-IBP training.

The tree combines through a soft violation `v` (the loss is `softplus(v)`, and `v` is the
logsumexp of `-m` over a block of rows, so `softplus(v) = log(1 + sum exp(-m))`):

* `all` of clauses: `v = logsumexp(v_1, ..., v_n)`, a smooth maximum of the violations (every
  clause must be certified; the loss stays a cross-entropy over all their rows);
* `any` of clauses: `v = -logsumexp(-v_1, ..., -v_n)`, a smooth minimum (certifying one clause
  is enough, and the best-certified clause takes most of the gradient);
* clauses decided per sample without bounds (`j != y`, a premise about the label): `-BIG` where
  true (no loss) and `+BIG` where false (a constant loss without gradient: nothing the network
  does can help).

Strict rows are treated as non-strict (they differ on a set of measure zero). A sample whose
region is empty (the ball misses the box) holds vacuously: loss 0 without gradient, and it is
not bounded (an `EmptyRegionWarning` says so once).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from propdsl import ir as I
from propdsl.types import shape_of

BIG = 1e4  # the soft violation of clauses decided exactly: exp(-BIG) is 0, and no inf / NaN

__all__ = ["certified_loss", "compile_certified"]


def compile_certified(node: I.Fn, compiler: Any) -> Callable[[Any], Tensor]:
    """`env -> [B]` per-sample certified loss of `certified(p, method = ...)`.

    Args:
        node: the `certified` call (options `property` and `method`).
        compiler: the `Compiler` of the train block's loss (it knows the properties' formulas
            and parameter names).
    """
    from propdsl.loss.compile import CompileError, _lookup

    name = str(node.option("property"))
    method = str(node.option("method", "ibp"))
    if method not in ("ibp", "crown_ibp"):
        raise CompileError(f"unknown certified training method '{method}'; use ibp or crown_ibp")
    if name not in compiler.properties:
        raise CompileError(f"unknown property '{name}'")
    formula = compiler.properties[name]
    params = tuple(compiler.property_params.get(name, ("x", "y")))
    networks = {
        n.net: math.prod(shape_of(n.type) or (1,))
        for n in I.walk(formula)
        if isinstance(n, I.Apply)
    }
    if not networks:
        raise CompileError(f"certified({name}): the property does not apply a network")
    if not any(
        isinstance(n, I.Quant) and not all(isinstance(d, I.Range) for d in n.domains)
        for n in I.walk(formula)
    ):
        raise CompileError(f"certified({name}): the property quantifies over no region")

    def run(env: Any) -> Tensor:
        x = _lookup(env, "x")
        y = _lookup(env, "y") if len(params) > 1 else None
        return certified_loss(
            formula,
            params,
            networks,
            dict(env.models),
            x,
            y,
            method=method,
            config=env.config,
            name=name,
        )

    return run


def certified_loss(
    formula: I.Node,
    params: tuple[str, ...],
    networks: dict[str, int],
    models: dict[str, Any],
    x: Tensor,
    y: Tensor | None,
    *,
    method: str = "ibp",
    config: Any = None,
    name: str = "property",
) -> Tensor:
    """The per-sample certified loss (see the module docstring) of a property's normal form."""
    from propdsl.loss.compile import CompileError
    from propdsl.verify.bounds import Method, bounds
    from propdsl.verify.query import Unsupported, to_query

    try:
        query = to_query(formula, params, networks, x, y, models, config=config)
    except Unsupported as err:
        where = f" (line {err.span.line}, column {err.span.col})" if err.span else ""
        raise CompileError(f"certified({name}){where}: {err.reason}") from None
    if query is None:
        raise CompileError(f"certified({name}): the property quantifies over no region")
    C, d, _ = query.matrix()
    # A sample whose region is empty holds vacuously: no bounds (the engine refuses an empty
    # region), no loss; the other samples are bounded alone.
    assert query.region is not None
    empty = query.region.is_empty()
    keep = (~empty).nonzero().flatten()
    if bool(empty.any()):
        from propdsl.loss.compile import _warn_empty

        _warn_empty((query.variable or "the input",), "forall")
    lower = C.new_zeros(C.shape[0], C.shape[1])
    if C.shape[1] > 0 and keep.numel() > 0:
        model = models[query.network]
        region, rows = query.region.select(keep), C[keep]
        part, _ = bounds(model, region=region, method=Method.IBP, C=rows)
        if method == "crown_ibp":
            crown, _ = bounds(model, region=region, method=Method.CROWN, C=rows)
            part = 0.5 * (part + crown)
        lower = lower.index_put((keep,), part)
    margins = lower + d.clamp(-BIG, BIG)
    loss = torch.nn.functional.softplus(_violation(query, margins))
    return torch.where(empty, torch.zeros_like(loss), loss)


def _violation(query: Any, margins: Tensor) -> Tensor:
    """The soft violation [B] of the query's tree, rows worth `-margins`."""
    from propdsl.verify.query import All, AnyOf, Masked, Rows

    blocks: dict[int, Tensor] = {}
    start = 0
    for r in query.rows:
        s = r.C.shape[1]
        blocks[id(r)] = margins[:, start : start + s]
        start += s
    batch = margins.shape[0]

    def visit(node: Any) -> Tensor:
        if isinstance(node, Rows):
            m = blocks[id(node)]
            if m.shape[1] == 0:
                return margins.new_full((batch,), -BIG)
            return torch.logsumexp(-m, dim=1)
        if isinstance(node, All | AnyOf):
            if not node.children:
                return margins.new_full((batch,), -BIG if isinstance(node, All) else BIG)
            v = torch.stack([visit(c) for c in node.children], dim=1)
            if isinstance(node, All):
                return torch.logsumexp(v, dim=1)
            return -torch.logsumexp(-v, dim=1)
        if isinstance(node, Masked):
            inner = visit(node.child)
            fixed = inner.new_full((), -BIG if node.value else BIG)
            return torch.where(node.mask, fixed, inner)
        raise TypeError(type(node).__name__)

    return visit(query.root)
