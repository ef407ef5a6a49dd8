"""Lipschitz constants from Jacobian bounds: the q -> p operator norm of every matrix between
two bounds (`lipschitz_bound`), and the chain cuts of `lipschitz_constant` (the layers' local
norms with the activations' largest derivatives). See docs/jacobian.md, "Lipschitz constants".
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from propdsl.region import INF
from propdsl.verify.graph import BoundGraph
from propdsl.verify.layers import ActivationRule, AffineRule, Interval, derivative_range

__all__ = [
    "CHAIN_DENSE_LIMIT",
    "chain_factors",
    "factor_norm",
    "lipschitz_bound",
    "norm_value",
    "spectral_norm",
]


def norm_value(p: float | int | str) -> float:
    """A norm's order, 1, 2 or inf (also the strings "inf" and "infinity")."""
    value = INF if isinstance(p, str) and p.strip().lower() in ("inf", "infinity") else float(p)
    if value not in (1.0, 2.0, INF):
        raise ValueError(f"norms must be 1, 2 or inf, got {p!r}")
    return value


def lipschitz_bound(lo: Tensor, hi: Tensor, p: float | str = 2, q: float | str = 2) -> Tensor:
    """An upper bound [B] of the operator norm ||J||_{q -> p} of every J with lo <= J <= hi.

    `lo`, `hi` are Jacobian bounds [B, O, *input_shape]; with M = max(|lo|, |hi|) (>= |J|
    element-wise) and ||J v||_p <= || M |v| ||_p, the bound is the q -> p norm of the
    non-negative matrix M, which has a closed form for every pair (rows of M are outputs):

    | q -> p | bound |
    |---|---|
    | inf -> inf | largest row sum |
    | 1 -> 1 | largest column sum |
    | 2 -> 2 | min(sigma_max(M), sigma_max(J_mid) + sigma_max(R)) |
    | 1 -> 2 | largest column L2 norm |
    | 1 -> inf | largest entry |
    | 2 -> inf | largest row L2 norm |
    | inf -> 1 | sum of all entries (v = 1 is optimal for M >= 0) |
    | inf -> 2 | L2 norm of the row sums (M v <= M 1 for 0 <= v <= 1) |
    | 2 -> 1 | L2 norm of the column sums (Cauchy-Schwarz with v along M^T 1) |

    For 2 -> 2 the signed centre J_mid = (lo + hi) / 2 and radius R = (hi - lo) / 2 can do better
    (||J||_2 <= ||J_mid||_2 + ||R||_2, as |J - J_mid| <= R): exact when lo = hi. For the other
    pairs the same split gains nothing: their bounds are monotone and subadditive in M, and
    M = |J_mid| + R.

    Over a convex region whose Jacobians all lie in [lo, hi], the mean-value theorem gives
    ||f(x1) - f(x2)||_p <= L ||x1 - x2||_q (see docs/jacobian.md).

    >>> import torch
    >>> J = torch.tensor([[[3.0, -4.0]]])
    >>> [round(float(lipschitz_bound(J, J, p, q)), 4) for p, q in ((2, 2), (1, "inf"), ("inf", 1))]
    [5.0, 7.0, 4.0]
    """
    p, q = norm_value(p), norm_value(q)
    if lo.shape != hi.shape or lo.dim() < 3:
        raise ValueError("lo and hi must be Jacobian bounds of one shape [B, O, *input_shape]")
    M = torch.maximum(lo.abs(), hi.abs()).flatten(2)  # [B, O, N]
    if q == INF:
        rows = M.sum(-1)  # M 1
        if p == INF:
            return rows.amax(-1)
        return rows.sum(-1) if p == 1 else rows.norm(dim=-1)
    if q == 1:
        cols = M.amax(1) if p == INF else (M.sum(1) if p == 1 else M.norm(dim=1))
        return cols.amax(-1)
    # q == 2
    if p == INF:
        return M.norm(dim=-1).amax(-1)
    if p == 1:
        return M.sum(1).norm(dim=-1)
    mid, rad = ((hi + lo) / 2).flatten(2), ((hi - lo) / 2).flatten(2)
    return torch.minimum(spectral_norm(M), spectral_norm(mid) + spectral_norm(rad))


def spectral_norm(S: Tensor) -> Tensor:
    """The largest singular value of each matrix [..., m, n], from above: the square root of
    the largest eigenvalue of the smaller Gram matrix (3x faster than an SVD on CPU), raised by
    the Gram's rounding error (about k eps relative for k x k)."""
    G = S @ S.mT if S.shape[-2] <= S.shape[-1] else S.mT @ S
    k = G.shape[-1]
    top = torch.linalg.eigvalsh(G)[..., -1].clamp_min(0).sqrt()
    return top * (1 + k * torch.finfo(S.dtype).eps)


CHAIN_DENSE_LIMIT = 1 << 20


def _dense(rule: AffineRule, like: Tensor) -> Tensor | None:
    """The linear part of a single-input affine rule as a matrix [n_out, n_in] (or None)."""
    n_out = math.prod(rule.call.out_shape)
    n_in = math.prod(rule.call.in_shapes[0])
    if n_out * n_in > CHAIN_DENSE_LIMIT:
        return None
    eye = torch.eye(n_out, dtype=like.dtype, device=like.device)
    (coeff,), _ = rule.backward(eye.reshape(1, n_out, *rule.call.out_shape))
    if coeff is None:
        return like.new_zeros(n_out, n_in)
    if coeff.shape[0] != 1:  # depends on the sample
        return None
    return coeff.reshape(n_out, n_in)


def chain_factors(
    graph: BoundGraph, bounds: list[Interval], like: Tensor
) -> list[tuple[Tensor, Tensor | None]] | None:
    """J = A_L D_{L-1} A_{L-1} ... D_1 A_1 as factors (A_i [n_out, n_in], the largest |f'|
    of the activation after it [B, n_out], None for the last), or None for other graphs."""
    factors: list[tuple[Tensor, Tensor | None]] = []
    segment: Tensor | None = None  # the product of the affine maps since the last activation
    with torch.no_grad():
        for i in range(1, len(graph.nodes)):
            node = graph.nodes[i]
            if node.inputs != (i - 1,):
                return None
            rule = node.rule
            if isinstance(rule, AffineRule):
                M = _dense(rule, like)
                if M is None:
                    return None
                segment = M if segment is None else M @ segment
                if segment.numel() > CHAIN_DENSE_LIMIT:
                    return None
            elif isinstance(rule, ActivationRule):
                d_lo, d_hi = derivative_range(rule, *bounds[node.inputs[0]])
                m = torch.maximum(d_lo.abs(), d_hi.abs()).flatten(1)
                factors.append((_or_eye(segment, m.shape[1], like), m))
                segment = None
            else:
                return None
    n_out = math.prod(graph.nodes[graph.output].shape)
    factors.append((_or_eye(segment, n_out, like), None))
    return factors


def _or_eye(segment: Tensor | None, n: int, like: Tensor) -> Tensor:
    return torch.eye(n, dtype=like.dtype, device=like.device) if segment is None else segment


def factor_norm(A: Tensor, m: Tensor | None, p: float) -> Tensor:
    """||diag(m) A||_{p -> p} per sample [B] (or ||A|| when m is None)."""
    S = A if m is None else m.unsqueeze(-1) * A
    if p == INF:
        return S.abs().sum(-1).amax(-1)
    if p == 1:
        return S.abs().sum(-2).amax(-1)
    return spectral_norm(S)
