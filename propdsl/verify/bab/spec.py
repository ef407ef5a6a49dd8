"""A problem's output condition as stacked rows, and what bounds on them decide.

A `Problem` asks for an input whose outputs satisfy some disjunct `A y <= b` (every row). Branch
and bound bounds all rows of all disjuncts in one call: row r's lower bound `lb_r` of `A_r y`
over a sub-domain refutes the row there when `lb_r > b_r` (no point of the sub-domain satisfies
it), or `lb_r >= b_r` for a strict row `A_r y < b_r`. A disjunct is refuted on a sub-domain when
one of its rows is; a sub-domain is proved when every disjunct is refuted on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from propdsl.verify.problem import Disjunct, Problem

__all__ = ["Rows", "StrictDisjunct", "rows_of"]


@dataclass(frozen=True, eq=False)
class StrictDisjunct(Disjunct):
    """A disjunct some of whose rows are strict: `A_r y < b_r` where `strict[r]`, else `<=`.

    The violation of a non-strict property row `c . y + d >= 0` is `c . y + d < 0`, a strict
    row; `satisfied` checks the exact meaning, so a counterexample on the boundary
    `c . y + d = 0` is no counterexample.
    """

    strict: Tensor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strict is None or self.strict.shape != self.b.shape:
            raise ValueError("a strict disjunct needs a bool mask `strict` [m], one per row")

    def satisfied(self, y: Tensor, tol: float = 0.0) -> Tensor:
        A = self.A.to(dtype=y.dtype, device=y.device)
        b = self.b.to(dtype=y.dtype, device=y.device)
        assert self.strict is not None
        value = y.flatten(1) @ A.T
        strict = self.strict.to(y.device)
        ok = torch.where(strict, value < b + tol, value <= b + tol)
        return ok.all(dim=1)


@dataclass(frozen=True)
class Rows:
    """Every row of every disjunct: A [R, O], b [R], strict [R], disjunct [R] (its index)."""

    A: Tensor
    b: Tensor
    strict: Tensor
    disjunct: Tensor
    n_disjuncts: int

    @property
    def n_rows(self) -> int:
        return int(self.b.shape[0])

    def select(self, disjunct: int) -> tuple[Rows, Tensor]:
        """One disjunct's rows as a problem of their own, and their indices here."""
        idx = (self.disjunct == disjunct).nonzero().flatten()
        own = Rows(self.A[idx], self.b[idx], self.strict[idx], torch.zeros_like(idx), 1)
        return own, idx

    def row_margin(self, lower: Tensor) -> Tensor:
        """[B, R] how far each row is refuted: lb_r - b_r (refuted where > 0, or >= 0 where
        strict; `refuted` decides)."""
        return lower - self.b.to(lower)

    def refuted_rows(self, lower: Tensor) -> Tensor:
        m = self.row_margin(lower)
        return torch.where(self.strict.to(m.device), m >= 0, m > 0)

    def refuted(self, lower: Tensor) -> Tensor:
        """[B, D] the disjuncts refuted by the row lower bounds [B, R]."""
        rows = self.refuted_rows(lower).to(torch.int64)
        out = torch.zeros(lower.shape[0], self.n_disjuncts, dtype=torch.int64, device=lower.device)
        out.scatter_add_(1, self.disjunct.to(lower.device).expand_as(rows), rows)
        return out > 0

    def disjunct_value(self, lower: Tensor) -> Tensor:
        """[B, D] max over each disjunct's rows of lb_r - b_r (how close to refuted)."""
        m = self.row_margin(lower)
        out = torch.full(
            (lower.shape[0], self.n_disjuncts), -math.inf, dtype=m.dtype, device=m.device
        )
        return out.scatter_reduce(
            1, self.disjunct.to(m.device).expand_as(m), m, reduce="amax", include_self=True
        )

    def domain_value(self, lower: Tensor, open_: Tensor) -> Tensor:
        """[B] min over the open disjuncts of their values (+inf when none is open): the
        sub-domain's bound; > 0 proves it (up to strict rows)."""
        v = self.disjunct_value(lower)
        return torch.where(open_, v, torch.full_like(v, math.inf)).amin(dim=1)

    def row_weights(self, open_: Tensor) -> Tensor:
        """[B, R] 1 on the rows of open disjuncts."""
        return open_.gather(1, self.disjunct.to(open_.device).expand(open_.shape[0], -1)).to(
            self.A.dtype
        )

    def judge(
        self,
        lower: Tensor,
        coeffs: Tensor,
        bias: Tensor,
        lo: Tensor,
        hi: Tensor,
        open_: Tensor,
        steps: int = 25,
    ) -> tuple[Tensor, Tensor]:
        """[B, D] refuted disjuncts and [B, D] disjunct values of sub-domains, from the rows'
        bounds `lower` [B, R] and their linear lower bounds `coeffs . x + bias` ([B, R, n],
        [B, R]) over the sub-domains' boxes [B, n].

        A conjunction can be empty while no single row is refuted (`y0 <= 0 and y1 <= 0` with
        y1 = 0.1 - y0). For lambda >= 0 summing to 1, `min over the box of sum_r lambda_r
        (coeffs_r . x + bias_r - b_r)` is a lower bound of `sum_r lambda_r (A_r y - b_r)` on the
        sub-domain, positive only where every point violates some row: it refutes the disjunct
        (>= 0 suffices when every row is strict). lambda climbs this concave function by
        projected supergradient steps; every iterate is sound.
        """
        refuted = self.refuted(lower)
        value = self.disjunct_value(lower)
        for d in range(self.n_disjuncts):
            idx = (self.disjunct == d).nonzero().flatten()
            active = (open_[:, d] & ~refuted[:, d]).nonzero().flatten()
            if idx.numel() < 2 or active.numel() == 0 or steps == 0:
                continue
            L = coeffs[active][:, idx]  # [b, m, n]
            c = bias[active][:, idx] - self.b[idx].to(bias)  # [b, m]
            box_lo, box_hi = lo[active], hi[active]
            m = idx.numel()
            lam = torch.full((active.numel(), m), 1.0 / m, dtype=L.dtype, device=L.device)
            best = torch.full((active.numel(),), -math.inf, dtype=L.dtype, device=L.device)
            for k in range(steps):
                weights = (lam.unsqueeze(-1) * L).sum(1)
                corner = torch.where(weights >= 0, box_lo, box_hi)
                rows = (L @ corner.unsqueeze(-1)).squeeze(-1) + c  # the rows at the minimiser
                best = torch.maximum(best, (lam * rows).sum(1))
                scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
                lam = _project_simplex(lam + (0.5 / (k + 1) ** 0.5) * rows / scale)
            strict = bool(self.strict[idx].all())
            ok = (best > 0) | (best >= 0) if strict else best > 0
            refuted[active, d] |= ok
            value[active, d] = torch.maximum(value[active, d], best)
        return refuted, value

    def violation(self, y: Tensor) -> Tensor:
        """[P] max over disjuncts of min over rows of b_r - A_r y: > 0 where some disjunct's
        rows all hold with room (the falsifier climbs it; the exact check is the problem's)."""
        slack = self.b.to(y) - y.flatten(1) @ self.A.to(y).T
        out = torch.full((y.shape[0], self.n_disjuncts), math.inf, dtype=y.dtype, device=y.device)
        out = out.scatter_reduce(
            1, self.disjunct.to(y.device).expand_as(slack), slack, reduce="amin", include_self=True
        )
        return out.amax(dim=1)


def rows_of(problem: Problem, dtype: torch.dtype) -> Rows:
    """The problem's disjuncts stacked (disjuncts without rows are handled by the caller)."""
    A, b, strict, owner = [], [], [], []
    for k, d in enumerate(problem.disjuncts):
        m = d.b.shape[0]
        A.append(d.A.to(dtype))
        b.append(d.b.to(dtype))
        s = getattr(d, "strict", None)
        strict.append(torch.zeros(m, dtype=torch.bool) if s is None else s.to(torch.bool).cpu())
        owner.append(torch.full((m,), k, dtype=torch.int64))
    return Rows(
        torch.cat(A).cpu(),
        torch.cat(b).cpu(),
        torch.cat(strict),
        torch.cat(owner),
        len(problem.disjuncts),
    )


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of each row of v onto the probability simplex (Duchi et al. 2008)."""
    u, _ = v.sort(dim=1, descending=True)
    css = u.cumsum(dim=1) - 1
    k = torch.arange(1, v.shape[1] + 1, dtype=v.dtype, device=v.device)
    rho = ((u - css / k) > 0).to(v.dtype).mul(k).argmax(dim=1, keepdim=True)
    theta = css.gather(1, rho) / (rho + 1).to(v.dtype)
    return (v - theta).clamp_min(0)
