"""The branch-and-bound loop: a pool of open sub-domains, bounded in batches, split, falsified.

Both kinds of splitting share the loop (`_Search.run`):

1. take the open sub-domains with the worst bounds (best-first);
2. split each in two: the input box at the midpoint of one dimension (strong branching: every
   dimension is tried and the best pair kept), or one unstable ReLU into its active (z >= 0)
   and inactive (z <= 0) halves (chosen when the parent was bounded, with a look-ahead);
3. bound the children in one call of the engine (`Bounder.bound`): a child whose bounds refute
   every open disjunct (`Rows.judge`), or whose constraints are contradictory, is proved;
4. evaluate the network at each open child's candidate points (its centre, the minimising
   vertex of its worst row's linear bound) after a few gradient steps: a point that satisfies
   a disjunct ends the search with `sat`;
5. decide children with at most `lp_unstable` unstable neurons (the network is affine on each
   sign pattern of them) by linear programming (`lp.solve_leaf`), which gives a counterexample
   or a certified refutation;
6. put the rest back in the pool; every few rounds the falsifier climbs from the worst open
   sub-domains.

`unsat` only when the pool is empty and every sub-domain was proved; `sat` only with a point
the user's model confirms; at the deadline `timeout`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from propdsl.region import INF, Region
from propdsl.verify.bab.engine import Bounded, Bounder, region_batch
from propdsl.verify.bab.falsify import climb
from propdsl.verify.bab.lp import solve_leaf
from propdsl.verify.bab.options import CompleteOptions, Progress, SubdomainBound
from propdsl.verify.bab.spec import Rows
from propdsl.verify.bounds import AlphaOptions
from propdsl.verify.problem import Answer, Problem

__all__ = ["Context", "Found", "InputSearch", "ReluSearch"]

MAX_ASPECT = 2.0**10  # input splitting: the widest side over the narrowest, relative to the region


@dataclass
class Found:
    """A confirmed counterexample: the point [1, ...] and the model's output there."""

    x: Tensor
    y: Tensor
    how: str


@dataclass
class Context:
    """What one solve shares between its parts."""

    model: nn.Module
    problem: Problem
    rows: Rows
    options: CompleteOptions
    region_m: Region  # the region in the model's dtype (falsifier, checks)
    region_b: Region  # the region in the bounds' dtype
    t0: float
    deadline: float
    progress: Callable[[Progress], None] | None
    generator: torch.Generator
    stats: dict[str, Any] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def out_of_time(self) -> bool:
        return time.perf_counter() > self.deadline

    def confirm(self, points: Tensor, how: str) -> Found | None:
        """The most violating of `points` [P, ...] that lies in the region and satisfies a
        disjunct on the user's model (exactly), or None."""
        if points.shape[0] == 0:
            return None
        dtype = _dtype_of(self.model)
        x = points.detach().to(dtype).reshape(-1, *self.region_m.shape[1:])
        region = region_batch(self.region_m, x.shape[0])
        x = region.project(x)
        with torch.no_grad():
            y = self.model(x)
        self.count("points_checked", x.shape[0])
        hit = region.contains(x) & self.problem.violated_at(y.flatten(1))
        if not bool(hit.any()):
            return None
        if self.rows is None:  # a disjunct without rows: every point of the region violates
            score = hit.to(y.dtype)
        else:
            score = self.rows.violation(y.flatten(1)).masked_fill(~hit, -math.inf)
        # The answer's final check runs the model on the point alone, and a batch can round
        # differently: a point on a disjunct's boundary must pass alone too.
        one = region_batch(self.region_m, 1)
        for i in torch.argsort(score, descending=True)[:8].tolist():
            if not bool(hit[i]):
                break
            xi = x[i : i + 1].detach()
            with torch.no_grad():
                yi = self.model(xi)
            if bool(one.contains(xi)[0]) and bool(self.problem.violated_at(yi.flatten(1))[0]):
                return Found(xi, yi.detach(), how)
        return None


def _dtype_of(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    for b in model.buffers():
        if b.is_floating_point():
            return b.dtype
    return torch.get_default_dtype()


class _Pool:
    """Open sub-domains as rows of preallocated tensors (a field per tensor), with a free list;
    `take(k)` removes the k with the smallest `value`."""

    def __init__(self) -> None:
        self.fields: dict[str, Tensor] = {}
        self.alive = torch.zeros(0, dtype=torch.bool)
        self.value = torch.zeros(0, dtype=torch.float64)

    def __len__(self) -> int:
        return int(self.alive.sum())

    def add(self, items: dict[str, Tensor], value: Tensor) -> None:
        n = value.shape[0]
        if n == 0:
            return
        free = (~self.alive).nonzero().flatten()
        if free.numel() < n:
            old = self.alive.shape[0]
            cap = max(2 * old, old + n, 64)
            grow = cap - old
            self.alive = torch.cat([self.alive, torch.zeros(grow, dtype=torch.bool)])
            self.value = torch.cat([self.value, torch.zeros(grow, dtype=self.value.dtype)])
            for k, v in items.items():
                if k in self.fields:
                    pad = torch.zeros(grow, *v.shape[1:], dtype=v.dtype)
                    self.fields[k] = torch.cat([self.fields[k], pad])
                else:
                    self.fields[k] = torch.zeros(cap, *v.shape[1:], dtype=v.dtype)
            free = (~self.alive).nonzero().flatten()
        slots = free[:n]
        for k, v in items.items():
            self.fields[k][slots] = v.to(self.fields[k].dtype)
        self.value[slots] = value.to(self.value.dtype)
        self.alive[slots] = True

    def _select(self, k: int) -> Tensor:
        values = torch.where(self.alive, self.value, torch.full_like(self.value, math.inf))
        k = min(k, len(self))
        return torch.topk(values, k, largest=False).indices

    def take(self, k: int) -> dict[str, Tensor]:
        slots = self._select(k)
        out = {name: t[slots].clone() for name, t in self.fields.items()}
        out["value"] = self.value[slots].clone()
        self.alive[slots] = False
        return out

    def peek(self, k: int) -> dict[str, Tensor]:
        slots = self._select(k)
        out = {name: t[slots] for name, t in self.fields.items()}
        out["value"] = self.value[slots]
        return out

    def worst(self) -> float:
        if len(self) == 0:
            return math.inf
        return float(torch.where(self.alive, self.value, math.inf).min())


class _Search:
    """The shared loop; subclasses say how to bound, split and attack their sub-domains."""

    kind = ""

    def __init__(self, ctx: Context, bounder: Bounder):
        self.ctx = ctx
        self.bounder = bounder
        self.rows = ctx.rows
        self.options = ctx.options
        self.pool = _Pool()
        self.proved = 0
        self.proved_share = 0.0
        self.rounds = 0
        self.max_depth = 0
        self.undecided = 0  # leaves neither refuted nor falsified (LP tolerance, L2 balls)
        self.undecided_worst = math.inf
        self.leaf_lp = ctx.region_b.centre is None or ctx.region_b.p in (1, INF)
        self.found: Found | None = None

    # -- to override -------------------------------------------------------------------------
    def root(self) -> None: ...

    def round(self) -> None: ...

    def attack(self) -> None: ...

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> tuple[Answer, str]:
        ctx = self.ctx
        self.root()
        while self.found is None and len(self.pool) and not ctx.out_of_time():
            if len(self.pool) > self.options.max_domains:
                return Answer.UNKNOWN, self._describe_open(
                    f"stopped at {self.options.max_domains:,} open sub-domains (max_domains)"
                )
            self.round()
            self.rounds += 1
            if self.found is None and self.rounds % self.options.attack_every == 0:
                if not ctx.out_of_time():
                    self.attack()
            self.report()
        st = ctx.stats  # accumulated over the searches of one solve (one per disjunct)
        st["rounds"] = st.get("rounds", 0) + self.rounds
        st["proved_domains"] = st.get("proved_domains", 0) + self.proved
        st["max_depth"] = max(st.get("max_depth", 0), self.max_depth)
        st["open_domains"] = len(self.pool)
        st["branching"] = self.kind
        st["proved_share"] = self.proved_share
        if self.found is not None:
            return Answer.SAT, self.found.how
        if len(self.pool):
            seconds = time.perf_counter() - ctx.t0
            return Answer.TIMEOUT, self._describe_open(f"timeout after {seconds:.0f} s")
        if self.undecided:
            return Answer.UNKNOWN, (
                f"{self.undecided:,} leaf sub-domains could be neither refuted nor falsified "
                f"(worst certified bound {self.undecided_worst:.3g}); {self.proved:,} proved"
            )
        n = self.rows.n_disjuncts
        return Answer.UNSAT, (
            f"all {self.proved:,} sub-domains proved ({self.kind} splitting, max depth "
            f"{self.max_depth}); {n} disjunct{'s' if n != 1 else ''}"
        )

    def _describe_open(self, head: str) -> str:
        share = f"{100 * self.proved_share:.1f}%"
        what = "of the input volume" if self.kind == "input" else "of the search tree"
        return (
            f"{head} with {len(self.pool):,} open sub-domains, worst bound "
            f"{self.pool.worst():.3g}; {self.proved:,} proved ({share} {what})"
        )

    def report(self) -> None:
        if self.ctx.progress is None:
            return
        self.ctx.progress(
            Progress(
                elapsed=time.perf_counter() - self.ctx.t0,
                rounds=self.rounds,
                open_domains=len(self.pool),
                proved_domains=self.proved,
                proved_share=self.proved_share,
                worst_bound=self.pool.worst(),
                branching=self.kind,
            )
        )

    # -- shared steps ------------------------------------------------------------------------
    def boxes(self, bounded: Bounded) -> tuple[Tensor, Tensor]:
        """The sub-domains' input boxes, flat [B, n]."""
        raise NotImplementedError

    def judge(self, bounded: Bounded, open_: Tensor) -> tuple[Tensor, Tensor]:
        """[B, D] refuted disjuncts and [B] values (+inf where proved) of bounded sub-domains."""
        lo, hi = self.boxes(bounded)
        refuted, value = self.rows.judge(
            bounded.lower, bounded.input_coeffs, bounded.input_bias, lo, hi, open_
        )
        still = open_ & ~refuted
        value = torch.where(still, value, torch.full_like(value, math.inf)).amin(dim=1)
        value = torch.where(bounded.infeasible, torch.full_like(value, math.inf), value)
        return refuted, value

    def evaluate(
        self, bounded: Bounded, open_: Tensor, parent_lower: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """After bounding: the open disjuncts, whether each sub-domain is proved, its value.
        A child lies in its parent, so the parent's row bounds hold too: CROWN is not monotone
        under refinement (its slopes change with the bounds), and the better one is kept."""
        if parent_lower is not None:
            bounded.lower = torch.maximum(bounded.lower, parent_lower)
        refuted, value = self.judge(bounded, open_)
        open_ = open_ & ~refuted
        proved = bounded.infeasible | ~open_.any(dim=1)
        self.ctx.count("domains_bounded", int(open_.shape[0]))
        self.ctx.count("infeasible_domains", int(bounded.infeasible.sum()))
        return open_, proved, value

    def primal_points(self, bounded: Bounded, lo: Tensor, hi: Tensor, open_: Tensor) -> Tensor:
        """Per sub-domain, the box vertex minimising its worst open row's linear bound."""
        margin = self.rows.row_margin(bounded.lower)
        weights = self.rows.row_weights(open_)
        worst = torch.where(weights > 0, margin, torch.full_like(margin, math.inf)).argmin(dim=1)
        A = bounded.input_coeffs[torch.arange(worst.shape[0]), worst]
        flat_lo, flat_hi = lo.flatten(1), hi.flatten(1)
        return torch.where(A >= 0, flat_lo, flat_hi).reshape(lo.shape)

    def probe(self, points: Tensor, region: Region) -> Found | None:
        """Check candidate points after `probe_steps` gradient steps in their regions."""
        steps = self.options.probe_steps
        if steps:
            points, _ = climb(
                self.ctx.model, self.rows, region, points.to(_dtype_of(self.ctx.model)), steps
            )
        return self.ctx.confirm(points, "")

    def check_and_settle(
        self,
        points: Tensor,
        boxes: Region,
        how: str,
        bounded: Bounded,
        region: Callable[[], Region],
        open_: Tensor,
        signs: list[Tensor] | None,
    ) -> tuple[Tensor, Tensor] | None:
        """The step both searches take on the sub-domains they could not prove: probe the
        candidate points (a confirmed counterexample is kept in `found`, described by `how`),
        then decide the leaves by linear programming. None when a counterexample was found;
        else the masks of the sub-domains refuted and left undecided (all False: no leaf)."""
        found = self.probe(points, boxes)
        if found is not None:
            found.how = how
            self.found = found
            return None
        leaves = bounded.unstable() <= self.options.lp_unstable
        if not bool(leaves.any()):
            return torch.zeros_like(leaves), torch.zeros_like(leaves)
        refuted, undecided = self.decide_leaves(leaves, region(), open_, signs, bounded)
        if self.found is not None:
            return None
        return refuted, undecided

    def decide_leaves(
        self,
        leaves: Tensor,
        region: Region,
        open_: Tensor,
        signs: list[Tensor] | None,
        bounded: Bounded,
    ) -> tuple[Tensor, Tensor]:
        """Decide the leaf sub-domains (mask; at most `lp_unstable` unstable neurons each) by
        linear programming, one program per sign pattern of their unstable neurons and open
        disjunct: the masks of those refuted (certified) and of those left undecided. Sets
        `found` on a confirmed counterexample."""
        idx = leaves.nonzero().flatten()
        refuted = torch.zeros_like(leaves)
        undecided = torch.zeros_like(leaves)
        if idx.numel() == 0 or not (self.options.lp_leaves and self.leaf_lp):
            return refuted, undecided
        n = leaves.shape[0]
        base = (
            [torch.zeros(n, size, dtype=torch.int8) for size in self.bounder.sizes]
            if signs is None
            else signs
        )
        # one row per (leaf, sign pattern of its unstable neurons)
        owner: list[int] = []
        pattern_signs: list[list[torch.Tensor]] = [[] for _ in base]
        for d in idx.tolist():
            unstable = [((lo[d] < 0) & (hi[d] > 0)).nonzero().flatten() for lo, hi in bounded.pre]
            k = sum(u.numel() for u in unstable)
            for code in range(2**k):
                bit = 0
                for t, u in enumerate(unstable):
                    pattern = base[t][d].clone()
                    for j in u.tolist():
                        pattern[j] = 1 if (code >> bit) & 1 else -1
                        bit += 1
                    pattern_signs[t].append(pattern)
                owner.append(d)
        rows_idx = torch.tensor(owner)
        all_signs = [torch.stack(p) for p in pattern_signs]
        sub = _subregion(region, rows_idx)
        G, g, layers = self.bounder.affine_forms(
            sub, all_signs, [(lo[rows_idx], hi[rows_idx]) for lo, hi in bounded.pre]
        )
        lo_box, hi_box = sub.bounding_box()
        verdict: dict[int, bool] = {}
        for pos, d in enumerate(owner):
            if self.ctx.out_of_time():
                verdict.pop(d, None)  # this leaf stays open (in the pool)
                break
            W_rows, c_rows = [], []
            for (W, c), s in zip(layers, all_signs, strict=True):
                sd = s[pos].to(W.dtype)
                nz = (sd != 0).nonzero().flatten()
                W_rows.append(sd[nz, None] * W[pos, nz])
                c_rows.append(sd[nz] * c[pos, nz])
            split_W = torch.cat(W_rows).numpy()
            split_c = torch.cat(c_rows).numpy()
            l1 = None
            if sub.centre is not None and sub.p == 1:
                radius = cast(Tensor, sub.radius)
                l1 = (sub.centre[pos].flatten().double().numpy(), float(radius[pos]))
            for dj in open_[d].nonzero().flatten().tolist():
                r = (self.rows.disjunct == dj).nonzero().flatten()
                self.ctx.count("lp_calls")
                res = solve_leaf(
                    G[pos, r].double().numpy(),
                    g[pos, r].double().numpy(),
                    self.rows.b[r].double().numpy(),
                    self.rows.strict[r].numpy(),
                    split_W,
                    split_c,
                    lo_box[pos].flatten().double().numpy(),
                    hi_box[pos].flatten().double().numpy(),
                    l1,
                )
                if res.point is not None:
                    point = torch.from_numpy(res.point).reshape(1, *self.ctx.region_m.shape[1:])
                    found = self.ctx.confirm(point, "")
                    if found is not None:
                        found.how = (
                            f"counterexample from the linear program of a leaf sub-domain "
                            f"({self.kind} splitting, round {self.rounds + 1})"
                        )
                        self.found = found
                        return refuted, undecided
                if not res.refuted:
                    verdict[d] = False
                    if math.isfinite(res.certified):
                        self.undecided_worst = min(self.undecided_worst, res.certified)
            verdict.setdefault(d, True)
        for d in idx.tolist():
            if verdict.get(d, False):
                refuted[d] = True
                self.ctx.count("lp_refuted")
            elif d in verdict:
                self.undecided += 1
                undecided[d] = True
        return refuted, undecided


def _subregion(region: Region, idx: Tensor) -> Region:
    """The sub-domains idx (repeats allowed) of a batched region; tensors that broadcast over
    the batch stay as they are."""
    batch = region.shape[0]

    def pick(t: Tensor | None) -> Tensor | None:
        if t is None or t.dim() == 0 or t.shape[0] != batch:
            return t
        return t[idx]

    return Region(
        pick(region.centre), pick(region.radius), region.p, pick(region.lo), pick(region.hi)
    )


# -- input splitting -------------------------------------------------------------------------------


class InputSearch(_Search):
    """Sub-domains are sub-boxes of the input region (intersected with its ball, if any)."""

    kind = "input"

    def __init__(self, ctx: Context, bounder: Bounder):
        super().__init__(ctx, bounder)
        lo, hi = ctx.region_b.bounding_box()
        self.root_lo, self.root_hi = lo, hi
        opt = ctx.options
        self.iterations = opt.input_iterations if opt.bound is not SubdomainBound.CROWN else 0

    def _region(self, lo: Tensor, hi: Tensor) -> Region:
        return region_batch(self.ctx.region_b, lo.shape[0], lo, hi)

    def root(self) -> None:
        open_ = torch.ones(1, self.rows.n_disjuncts, dtype=torch.bool)
        self.process(self.root_lo, self.root_hi, open_, torch.zeros(1, dtype=torch.int64))

    def _bound(self, lo: Tensor, hi: Tensor, open_: Tensor) -> Bounded:
        """Bounds of the sub-boxes. A sub-box that misses the region's ball holds no point:
        it is not bounded (the engine refuses empty regions) but marked infeasible (proved)."""
        region = self._region(lo, hi)
        empty = region.is_empty() if region.centre is not None else None
        if empty is not None and bool(empty.any()):
            keep = (~empty).nonzero().flatten()
            part = self._bound(lo[keep], hi[keep], open_[keep]) if keep.numel() else None
            return _scatter(part, keep, empty, self.bounder, (lo.flatten(1), hi.flatten(1)))
        weights = self.rows.row_weights(open_)
        self.ctx.count("bound_calls")
        bounded = self.bounder.bound(
            region, iterations=self.iterations, weights=weights, deadline=self.ctx.deadline
        )
        bounded.box = (lo.flatten(1), hi.flatten(1))
        return bounded

    def boxes(self, bounded: Bounded) -> tuple[Tensor, Tensor]:
        assert bounded.box is not None
        return bounded.box

    def process(
        self,
        lo: Tensor,
        hi: Tensor,
        open_: Tensor,
        depth: Tensor,
        bounded: Bounded | None = None,
        parent_lower: Tensor | None = None,
    ) -> None:
        """Bound the boxes, prove, check, decide leaves, push the rest with their split."""
        if bounded is None:
            bounded = self._bound(lo, hi, open_)
        open_, proved, value = self.evaluate(bounded, open_, parent_lower)
        self.max_depth = max(self.max_depth, int(depth.max()))
        self._prove(proved, depth)
        keep = ~proved
        if not bool(keep.any()):
            return
        lo, hi, open_, depth, value = lo[keep], hi[keep], open_[keep], depth[keep], value[keep]
        bounded = _take(bounded, keep)
        region = self._region(lo, hi)
        # candidate points: the centres and the worst rows' minimising vertices, improved by a
        # few gradient steps inside their sub-box
        points = torch.cat([(lo + hi) / 2, self.primal_points(bounded, lo, hi, open_)])
        dtype = _dtype_of(self.ctx.model)
        boxes = region_batch(
            self.ctx.region_m,
            points.shape[0],
            torch.cat([lo, lo]).to(dtype),
            torch.cat([hi, hi]).to(dtype),
        )
        how = (
            f"counterexample near a sub-box's candidate point (input splitting, round "
            f"{self.rounds + 1})"
        )
        settled = self.check_and_settle(points, boxes, how, bounded, lambda: region, open_, None)
        if settled is None:
            return
        refuted, undecided = settled
        if bool((refuted | undecided).any()):
            self._prove(refuted, depth)
            keep = ~(refuted | undecided)
            lo, hi, open_, depth, value = lo[keep], hi[keep], open_[keep], depth[keep], value[keep]
            bounded = _take(bounded, keep)
        if lo.shape[0] == 0:
            return
        self.pool.add(
            {"lo": lo, "hi": hi, "open": open_, "depth": depth, "lower": bounded.lower}, value
        )

    def _prove(self, mask: Tensor, depth: Tensor) -> None:
        n = int(mask.sum())
        self.proved += n
        if n:
            self.proved_share += float(torch.pow(2.0, -depth[mask].double()).sum())

    def round(self) -> None:
        """Strong branching: split every parent along each dimension of positive width at its
        midpoint, bound all the children in one call, and keep, per parent, the pair whose
        bounds improve most (a box has a handful of dimensions, so trying them all is cheap
        next to the sub-domains it saves)."""
        dims = ((self.root_hi - self.root_lo).flatten() > 0).nonzero().flatten()
        nd = dims.numel()
        k = max(1, self.options.batch // (2 * nd))
        parents = self.pool.take(k)
        k = parents["lo"].shape[0]
        lo, hi = parents["lo"].flatten(1), parents["hi"].flatten(1)
        # children ordered [parent, dim, half]
        clo = lo[:, None, None, :].repeat(1, nd, 2, 1)
        chi = hi[:, None, None, :].repeat(1, nd, 2, 1)
        mid = (lo[:, dims] + hi[:, dims]) / 2  # [k, nd]
        ar = torch.arange(nd)
        chi[:, ar, 0, dims] = mid
        clo[:, ar, 1, dims] = mid
        shape = parents["lo"].shape[1:]
        flat_lo = clo.reshape(-1, *shape)
        flat_hi = chi.reshape(-1, *shape)
        open_ = parents["open"].repeat_interleave(2 * nd, 0)
        bounded = self._bound(flat_lo, flat_hi, open_)
        bounded.lower = torch.maximum(bounded.lower, parents["lower"].repeat_interleave(2 * nd, 0))
        _, value = self.judge(bounded, open_)
        # A proved child counts 0: the sum rewards one-sided progress (with ties, as the child
        # holding the worst corner often keeps the parent's bound, going to the wider side).
        # One-sided progress can shave slivers off one face forever while the rest of the box
        # keeps its bound: a side may not get narrower (relative to the region's) than the
        # widest side over MAX_ASPECT, nor reach the float resolution.
        pair = value.clamp(max=0.0).reshape(k, nd, 2).sum(dim=2)
        rel = ((hi - lo)[:, dims] / (self.root_hi - self.root_lo).flatten()[dims]).clamp_min(0)
        floor = (rel.amax(dim=1, keepdim=True) / MAX_ASPECT).clamp_min(1e-12)
        pair = torch.where(rel > floor, pair + 1e-9 * rel, torch.full_like(pair, -math.inf))
        best = pair.argmax(dim=1)  # [k]
        pick = (torch.arange(k) * nd + best).repeat_interleave(2) * 2 + torch.tensor([0, 1]).repeat(
            k
        )
        depth = parents["depth"].repeat_interleave(2) + 1
        self.process(flat_lo[pick], flat_hi[pick], open_[pick], depth, _take(bounded, pick))

    def attack(self) -> None:
        k = min(self.options.attack_domains, len(self.pool))
        if k == 0 or self.options.attack_steps == 0:
            return
        worst = self.pool.peek(k)
        dtype = _dtype_of(self.ctx.model)
        lo, hi = worst["lo"].to(dtype), worst["hi"].to(dtype)
        region = region_batch(self.ctx.region_m, k, lo, hi)
        start = torch.cat([(lo + hi) / 2, region.sample(self.ctx.generator)])
        region2 = region_batch(self.ctx.region_m, 2 * k, torch.cat([lo, lo]), torch.cat([hi, hi]))
        x, _ = climb(self.ctx.model, self.rows, region2, start, self.options.attack_steps // 2)
        self.ctx.count("attack_runs")
        found = self.ctx.confirm(x, "")
        if found is not None:
            found.how = (
                f"counterexample by the falsifier in a worst-bounded sub-box (round {self.rounds})"
            )
            self.found = found


def rows_of_bounded(b: Bounded, rows: Tensor) -> Bounded:
    """The bounds of some rows only (the per-row tensors sliced)."""
    return Bounded(
        lower=b.lower[:, rows],
        pre=b.pre,
        infeasible=b.infeasible,
        alphas=None if b.alphas is None else [a[:, rows] for a in b.alphas],
        betas=None if b.betas is None else [a[:, rows] for a in b.betas],
        relu_coeffs=[a[:, rows] for a in b.relu_coeffs],
        input_coeffs=b.input_coeffs[:, rows],
        input_bias=b.input_bias[:, rows],
    )


def _scatter(
    part: Bounded | None, keep: Tensor, empty: Tensor, bounder: Bounder, box: tuple[Tensor, Tensor]
) -> Bounded:
    """Bounds of a batch whose `empty` entries were not bounded: those are infeasible (their
    rows' bounds +inf, their coefficients 0); `part` holds the others (rows `keep`)."""
    n, rows = empty.shape[0], bounder.spec.shape[1]
    dtype = bounder.dtype

    def fill(values: Tensor | None, shape: tuple[int, ...], default: float) -> Tensor:
        out = torch.full((n, *shape), default, dtype=dtype)
        if values is not None:
            out[keep] = values.to(dtype)
        return out

    pre = [
        (fill(None if part is None else part.pre[t][0], (size,), 0.0),
         fill(None if part is None else part.pre[t][1], (size,), 0.0))
        for t, size in enumerate(bounder.sizes)
    ]  # fmt: skip
    n_in = box[0].shape[1]
    return Bounded(
        lower=fill(None if part is None else part.lower, (rows,), math.inf),
        pre=pre,
        infeasible=empty.clone(),
        alphas=None,
        betas=None,
        relu_coeffs=[
            fill(None if part is None else part.relu_coeffs[t], (rows, size), 0.0)
            for t, size in enumerate(bounder.sizes)
        ],
        input_coeffs=fill(None if part is None else part.input_coeffs, (rows, n_in), 0.0),
        input_bias=fill(None if part is None else part.input_bias, (rows,), 0.0),
        box=box,
    )


def _take(b: Bounded, keep: Tensor) -> Bounded:
    return Bounded(
        lower=b.lower[keep],
        pre=[(lo[keep], hi[keep]) for lo, hi in b.pre],
        infeasible=b.infeasible[keep],
        alphas=None if b.alphas is None else [a[keep] for a in b.alphas],
        betas=None if b.betas is None else [a[keep] for a in b.betas],
        relu_coeffs=[a[keep] for a in b.relu_coeffs],
        input_coeffs=b.input_coeffs[keep],
        input_bias=b.input_bias[keep],
        box=None if b.box is None else (b.box[0][keep], b.box[1][keep]),
    )


# -- ReLU splitting --------------------------------------------------------------------------------


class ReluSearch(_Search):
    """Sub-domains are sign patterns of split ReLUs over the whole input region."""

    kind = "relu"

    def __init__(self, ctx: Context, bounder: Bounder):
        super().__init__(ctx, bounder)
        self.box = ctx.region_b.bounding_box()
        opt = ctx.options
        self.optimise = opt.bound is not SubdomainBound.CROWN and opt.iterations > 0
        self.beta = opt.bound is SubdomainBound.BETA
        self.given_root: Bounded | None = None

    def _region(self, n: int) -> Region:
        return region_batch(self.ctx.region_b, n)

    def boxes(self, bounded: Bounded) -> tuple[Tensor, Tensor]:
        n = bounded.lower.shape[0]
        lo, hi = self.box
        return lo.flatten(1).expand(n, -1), hi.flatten(1).expand(n, -1)

    def bound_root(self) -> Bounded:
        """alpha-CROWN over the whole region, intermediate slopes optimised too: the
        references of every sub-domain."""
        opt = self.options
        root = AlphaOptions(iterations=opt.root_iterations) if opt.root_iterations else None
        open_ = torch.ones(1, self.rows.n_disjuncts, dtype=torch.bool)
        self.ctx.count("bound_calls")
        return self.bounder.bound(
            self._region(1),
            root=root,
            iterations=opt.iterations if self.optimise else 0,
            lr_alpha=opt.lr_alpha,
            weights=self.rows.row_weights(open_),
        )

    def root(self) -> None:
        bounded = self.given_root if self.given_root is not None else self.bound_root()
        open_ = torch.ones(1, self.rows.n_disjuncts, dtype=torch.bool)
        signs = [torch.zeros(1, n, dtype=torch.int8) for n in self.bounder.sizes]
        self.after_bound(bounded, signs, open_, torch.zeros(1, dtype=torch.int64))

    def after_bound(
        self,
        bounded: Bounded,
        signs: list[Tensor],
        open_: Tensor,
        depth: Tensor,
        parent_lower: Tensor | None = None,
    ) -> None:
        open_, proved, value = self.evaluate(bounded, open_, parent_lower)
        if depth.numel():
            self.max_depth = max(self.max_depth, int(depth.max()))
        n = int(proved.sum())
        self.proved += n
        if n:
            self.proved_share += float(torch.pow(2.0, -depth[proved].double()).sum())
        keep = ~proved
        if not bool(keep.any()):
            return
        bounded = _take(bounded, keep)
        signs = [s[keep] for s in signs]
        open_, depth, value = open_[keep], depth[keep], value[keep]
        lo, hi = self.box
        n_open = open_.shape[0]
        primal = self.primal_points(
            bounded, lo.expand(n_open, *lo.shape[1:]), hi.expand(n_open, *hi.shape[1:]), open_
        )
        how = (
            f"counterexample near a sub-domain's bound minimiser (ReLU splitting, round "
            f"{self.rounds + 1})"
        )
        boxes = region_batch(self.ctx.region_m, n_open)
        settled = self.check_and_settle(
            primal, boxes, how, bounded, lambda: self._region(n_open), open_, signs
        )
        if settled is None:
            return
        refuted, undecided = settled
        if bool((refuted | undecided).any()):
            d = int(refuted.sum())
            self.proved += d
            if d:
                self.proved_share += float(torch.pow(2.0, -depth[refuted].double()).sum())
            keep = ~(refuted | undecided)
            bounded = _take(bounded, keep)
            signs = [s[keep] for s in signs]
            open_, depth, value, primal = open_[keep], depth[keep], value[keep], primal[keep]
        if open_.shape[0] == 0:
            return
        layer, neuron = self.choose(bounded, signs, open_)
        items: dict[str, Tensor] = {
            "open": open_,
            "depth": depth,
            "layer": layer,
            "neuron": neuron,
            "primal": primal.to(torch.float32),
            "lower": bounded.lower,
        }
        for t, s in enumerate(signs):
            items[f"sign{t}"] = s
            items[f"lo{t}"], items[f"hi{t}"] = bounded.pre[t]
            if bounded.alphas is not None:
                items[f"alpha{t}"] = bounded.alphas[t].to(torch.float32)
            if bounded.betas is not None and self.beta:
                items[f"beta{t}"] = bounded.betas[t].to(torch.float32)
        self.pool.add(items, value)

    # -- branching ---------------------------------------------------------------------------
    def scores(self, bounded: Bounded, open_: Tensor) -> list[Tensor]:
        """Per layer [B, n_t]: the intercept score (the part of the worst rows' bound that the
        triangle relaxation's upper line costs, removed by splitting the neuron); -1 where the
        neuron is not unstable."""
        weights = self.rows.row_weights(open_)
        out = []
        for (lo, hi), A in zip(bounded.pre, bounded.relu_coeffs, strict=True):
            unstable = (lo < 0) & (hi > 0)
            width = torch.where(unstable, hi - lo, torch.ones_like(lo))
            intercept = torch.where(unstable, -lo * hi / width, torch.zeros_like(lo))
            neg = (A.clamp(max=0).neg() * weights.unsqueeze(-1)).sum(1)
            pos = (A.clamp(min=0) * weights.unsqueeze(-1)).sum(1)
            score = neg * intercept + 1e-3 * pos * torch.minimum(hi, -lo).clamp_min(0)
            out.append(torch.where(unstable, score, torch.full_like(score, -1.0)))
        return out

    def choose(self, bounded: Bounded, signs: list[Tensor], open_: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.scores(bounded, open_)
        flat = torch.cat(scores, dim=1)
        offsets = torch.tensor([0, *np.cumsum(self.bounder.sizes)[:-1].tolist()])
        k = min(self.options.candidates, flat.shape[1])
        if k <= 1:
            best = flat.argmax(dim=1)
        else:
            top = torch.topk(flat, k, dim=1)
            best = self.look_ahead(bounded, signs, open_, top.indices, top.values)
        layer = torch.searchsorted(offsets, best, right=True) - 1
        neuron = best - offsets[layer]
        return layer, neuron

    def look_ahead(
        self,
        bounded: Bounded,
        signs: list[Tensor],
        open_: Tensor,
        cand: Tensor,
        cand_score: Tensor,
    ) -> Tensor:
        """Filtered smart branching (De Palma et al. 2021): bound both children of each
        candidate cheaply (the parent's intermediate bounds, the split neuron clamped, the
        parent's slopes and multipliers) and keep the candidate whose worse child is best."""
        n, k = cand.shape
        offsets = np.cumsum([0, *self.bounder.sizes])
        reps = 2 * k
        child_signs = [s.repeat_interleave(reps, 0).clone() for s in signs]
        flat = cand.reshape(-1).repeat_interleave(2)
        sign = torch.tensor([1, -1], dtype=torch.int8).repeat(n * k)
        rows = torch.arange(n * reps)
        for t in range(len(signs)):
            in_layer = (flat >= offsets[t]) & (flat < offsets[t + 1])
            r = rows[in_layer]
            child_signs[t][r, flat[in_layer] - int(offsets[t])] = sign[in_layer]
        reference = [
            (a.repeat_interleave(reps, 0), b.repeat_interleave(reps, 0)) for a, b in bounded.pre
        ]
        alpha = (
            None
            if bounded.alphas is None
            else [a.repeat_interleave(reps, 0) for a in bounded.alphas]
        )
        beta = None
        if bounded.betas is not None and self.beta:
            beta = [a.repeat_interleave(reps, 0) for a in bounded.betas]
        child_open = open_.repeat_interleave(reps, 0)
        out = self.bounder.bound(
            self._region(n * reps),
            signs=child_signs,
            reference=reference,
            recompute=False,
            iterations=0,
            alpha_init=alpha,
            beta_init=beta,
        )
        self.ctx.count("lookahead_domains", n * reps)
        out.lower = torch.maximum(out.lower, bounded.lower.repeat_interleave(reps, 0))
        _, value = self.judge(out, child_open)
        worse = value.reshape(n, k, 2).amin(dim=2)
        # candidates that are not unstable (score -1) never win
        worse = torch.where(cand_score >= 0, worse, torch.full_like(worse, -math.inf))
        pick = worse.argmax(dim=1)
        return cand[torch.arange(n), pick]

    # -- the round ---------------------------------------------------------------------------
    def round(self) -> None:
        half = max(1, self.options.batch // 2)
        p = self.pool.take(half)
        n = p["value"].shape[0]
        layers = len(self.bounder.sizes)
        signs = []
        for t in range(layers):
            s = p[f"sign{t}"].repeat(2, 1)
            sel = (p["layer"] == t).nonzero().flatten()
            s[sel, p["neuron"][sel]] = 1
            s[sel + n, p["neuron"][sel]] = -1
            signs.append(s)
        reference = [(p[f"lo{t}"].repeat(2, 1), p[f"hi{t}"].repeat(2, 1)) for t in range(layers)]
        alpha = None
        if "alpha0" in p:
            alpha = [p[f"alpha{t}"].repeat(2, 1, 1) for t in range(layers)]
        beta = None
        if self.beta and "beta0" in p:
            beta = [p[f"beta{t}"].repeat(2, 1, 1) for t in range(layers)]
        open_ = p["open"].repeat(2, 1)
        depth = p["depth"].repeat(2) + 1
        opt = self.options
        bounded = self.bounder.bound(
            self._region(2 * n),
            signs=signs,
            reference=reference,
            recompute=opt.recompute_intermediate,
            iterations=opt.iterations if self.optimise else 0,
            lr_alpha=opt.lr_alpha,
            lr_beta=opt.lr_beta,
            alpha_init=alpha,
            beta_init=beta,
            weights=self.rows.row_weights(open_),
            deadline=self.ctx.deadline,
        )
        self.ctx.count("bound_calls")
        self.after_bound(bounded, signs, open_, depth, p["lower"].repeat(2, 1))

    def attack(self) -> None:
        k = min(self.options.attack_domains, len(self.pool))
        if k == 0 or self.options.attack_steps == 0:
            return
        worst = self.pool.peek(k)
        dtype = _dtype_of(self.ctx.model)
        start = worst["primal"].to(dtype)
        region = region_batch(self.ctx.region_m, k)
        x, _ = climb(self.ctx.model, self.rows, region, start, self.options.attack_steps // 2)
        self.ctx.count("attack_runs")
        found = self.ctx.confirm(x, "")
        if found is not None:
            found.how = (
                f"counterexample by the falsifier from a worst-bounded sub-domain (round "
                f"{self.rounds})"
            )
            self.found = found
