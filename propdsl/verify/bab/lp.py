"""Exact decision of a leaf sub-domain, where the network is affine, by linear programming.

On a sub-domain with no unstable neuron the rows are affine in the input, `A_r y = G_r x + g_r`,
and the sub-domain is the input box intersected with the split constraints `s_k z_k(x) >= 0`
(each `z_k` affine too). For one disjunct the linear program

    minimise t  over x in the box (and the L1 ball), t free
    subject to  G_r x + g_r - b_r <= t    (each row of the disjunct)
                -s_k z_k(x) <= t          (each split constraint)

has optimum t* <= 0 exactly where the sub-domain holds a point satisfying the disjunct (then
its solution is a candidate counterexample, checked on the network by the caller). A refutation
is not taken from the solver's optimum, whose tolerances are not a proof: its dual multipliers
(lambda_r, mu_k >= 0, normalised to sum 1) give the affine function
`g(x) = sum_r lambda_r (G_r x + g_r - b_r) - sum_k mu_k s_k z_k(x)`, a lower bound of the
constraint violation's maximum on the whole box, and its minimum over the box, computed here in
float64 from the exact forms, must be > 0 (>= 0 for strict rows) to refute the disjunct.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["LeafResult", "solve_leaf"]


@dataclass
class LeafResult:
    """`refuted`: the disjunct has no point in the sub-domain (certified). `point`: the LP's
    solution when t* <= 0 (a candidate counterexample), else None. `status`: the solver's."""

    refuted: bool
    point: np.ndarray | None
    certified: float
    status: str


def solve_leaf(
    G: np.ndarray,
    g: np.ndarray,
    b: np.ndarray,
    strict: np.ndarray,
    split_W: np.ndarray,
    split_c: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    l1: tuple[np.ndarray, float] | None = None,
) -> LeafResult:
    """Decide one disjunct on one leaf.

    Args:
        G, g, b, strict: the disjunct's rows `G x + g <= b` ([m, n], [m], [m], [m] bool).
        split_W, split_c: the split constraints `split_W x + split_c >= 0` ([K, n], [K]), the
            signs already applied.
        lo, hi: the input box [n].
        l1: (centre, radius) of an L1 ball intersected with the box, if any.
    """
    from scipy.optimize import linprog  # scipy comes with scikit-learn; import when used

    m, K = G.shape[0], split_W.shape[0]
    n = lo.shape[0]
    extra = n if l1 is not None else 0
    width = n + 1 + extra  # x, t, (u for the L1 ball)
    rows = []
    rhs = []
    for r in range(m):
        row = np.zeros(width)
        row[:n] = G[r]
        row[n] = -1.0
        rows.append(row)
        rhs.append(b[r] - g[r])
    for k in range(K):
        row = np.zeros(width)
        row[:n] = -split_W[k]
        row[n] = -1.0
        rows.append(row)
        rhs.append(split_c[k])
    if l1 is not None:
        centre, radius = l1
        for i in range(n):  # u_i >= |x_i - c_i|
            for sign in (1.0, -1.0):
                row = np.zeros(width)
                row[i] = sign
                row[n + 1 + i] = -1.0
                rows.append(row)
                rhs.append(sign * centre[i])
        row = np.zeros(width)
        row[n + 1 :] = 1.0
        rows.append(row)
        rhs.append(radius)
    cost = np.zeros(width)
    cost[n] = 1.0
    bounds: list[tuple[float | None, float | None]] = [
        (float(a), float(c)) for a, c in zip(lo, hi, strict=True)
    ]
    bounds += [(None, None)] + [(0.0, None)] * extra
    res = linprog(cost, A_ub=np.array(rows), b_ub=np.array(rhs), bounds=bounds, method="highs")
    if res.status != 0:
        # Infeasible can only come from the L1 ball (t absorbs the rest): then the region is
        # empty, but without a certificate here the leaf stays open.
        return LeafResult(False, None, float("nan"), res.message)
    x = np.clip(res.x[:n], lo, hi)
    point = x if res.x[n] <= 0 else None
    # The dual multipliers of the constraints that contain t.
    duals = -np.asarray(res.ineqlin.marginals)[: m + K]
    duals = np.clip(duals, 0.0, None)
    total = duals.sum()
    if not total > 0:
        return LeafResult(False, point, float("nan"), "no dual multipliers")
    lam, mu = duals[:m] / total, duals[m:] / total
    coeff = lam @ G - mu @ split_W
    const = lam @ (g - b) - mu @ split_c
    certified = float(np.minimum(coeff * lo, coeff * hi).sum() + const)
    if l1 is not None:
        centre, radius = l1
        certified = max(certified, float(coeff @ centre - radius * np.abs(coeff).max() + const))
    # certified >= 0 is enough when every row is strict: on the sub-domain the split terms are
    # <= 0, so sum_r lambda_r (row_r) >= 0 there and some strict row fails.
    refuted = certified > 0 or (certified >= 0 and bool(strict.all()) and lam.sum() > 0)
    return LeafResult(refuted, point, certified, "optimal")
