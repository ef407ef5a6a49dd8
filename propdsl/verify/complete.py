"""Complete verification by branch and bound on top of the bound engine.

`solve(model, problem)` answers a `Problem` (an input region and a disjunction of linear output
conditions, VNN-LIB's form): `sat` with a counterexample the model confirms, `unsat` when every
sub-domain of the region is proved, `timeout` at the wall-clock limit. The search
(`propdsl.verify.bab`) splits the input box (low-dimensional inputs, ACAS Xu) or unstable ReLUs
(the split constraints enter the bounds as in beta-CROWN, Wang et al. 2021), bounds the
sub-domains in batches, runs a falsifier on the worst ones and decides the leaves, where the
network is affine, by linear programming. It is sound (floating point aside: bounds are computed
in float64 by default) and, for piecewise-linear networks and box / L-inf / L1 regions, complete
given time. See docs/vnncomp.md.

`problems_from_query` and `complete_verdicts` bring propdsl's own properties (a `Query` of
`propdsl.verify.query`) to the same solver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from propdsl.errors import UsageError
from propdsl.region import Region
from propdsl.verify.bab.engine import Bounder, region_batch
from propdsl.verify.bab.falsify import climb
from propdsl.verify.bab.options import Branching, CompleteOptions, Progress, SubdomainBound
from propdsl.verify.bab.search import (
    Context,
    Found,
    InputSearch,
    ReluSearch,
    _dtype_of,
    rows_of_bounded,
)
from propdsl.verify.bab.spec import StrictDisjunct, rows_of
from propdsl.verify.problem import Answer, Disjunct, Problem, Result
from propdsl.verify.query import All, AnyOf, Masked, Query, Rows, Unsupported

__all__ = [
    "Branching",
    "CompleteOptions",
    "Progress",
    "StrictDisjunct",
    "SubdomainBound",
    "complete_verdicts",
    "problems_from_query",
    "solve",
]

# The verdict strings of propdsl.verify.run (not imported: run will import this module).
VERIFIED, FALSIFIED, UNKNOWN, TIMEOUT = "verified", "falsified", "unknown", "unknown (timeout)"

MAX_DISJUNCTS = 4096  # a property's negation in disjunctive normal form, per sample


def solve(
    model: nn.Module,
    problem: Problem,
    *,
    options: CompleteOptions = CompleteOptions(),
    progress: Callable[[Progress], None] | None = None,
) -> Result:
    """Decide `problem` for `model`: is there an input of the region whose outputs satisfy one
    of the disjuncts?

    Args:
        model: a single-input network the bound engine supports (`propdsl.verify.bounds`);
            ReLU splitting needs every nonlinearity to be a ReLU.
        problem: the region (one sample) and the disjuncts.
        options: `CompleteOptions` (timeout, batch, branching, bounds, falsifier, ...).
        progress: called after every round of the search with a `Progress`.

    Returns:
        `Result`: `Answer.SAT` with `counterexample` (in the region) and `output` (the model's,
        which satisfies a disjunct), `Answer.UNSAT` when every sub-domain of every disjunct was
        proved, `Answer.TIMEOUT`, or `Answer.UNKNOWN` (leaves that linear programming could not
        decide, too many sub-domains); `reason` in words, `stats` counters.

    Raises:
        UnsupportedLayerError: the model holds a layer without a bound rule.
        UsageError: ReLU splitting asked for a network with other nonlinearities, an
            unbounded region, or a model not on the CPU.
    """
    if not isinstance(options, CompleteOptions):
        raise TypeError(f"options must be CompleteOptions, got {type(options).__name__}")
    if any(t.device.type != "cpu" for t in [*model.parameters(), *model.buffers()]):
        raise UsageError("complete verification runs on the CPU: pass model.cpu()")
    region = problem.region
    if region.shape[0] != 1:
        raise ValueError(f"a problem's region holds one sample, got a batch of {region.shape[0]}")
    t0 = time.perf_counter()
    generator = torch.Generator().manual_seed(options.seed)
    dtype = _dtype_of(model)
    ctx = Context(
        model=model,
        problem=problem,
        # None when some disjunct has no rows (it holds everywhere; see _solve)
        rows=rows_of(problem, options.dtype) if _all_rows(problem) else None,  # type: ignore[arg-type]
        options=options,
        region_m=_region_to(region, dtype),
        region_b=_region_to(region, options.dtype),
        t0=t0,
        deadline=t0 + options.timeout,
        progress=progress,
        generator=generator,
    )
    with _eval_mode(model):
        answer, reason, found = _solve(ctx)
    seconds = time.perf_counter() - t0
    ctx.stats["seconds"] = seconds
    if answer is Answer.SAT:
        assert found is not None
        # The final check, on the user's model: a point that fails it is no counterexample.
        with torch.no_grad(), _eval_mode(model):
            y = model(found.x)
        ok = bool(region_batch(ctx.region_m, 1).contains(found.x)[0]) and bool(
            problem.violated_at(y.flatten(1))[0]
        )
        if not ok:  # pragma: no cover - confirm() already checked exactly this
            return Result(Answer.UNKNOWN, seconds, reason="a counterexample failed its check")
        return Result(
            Answer.SAT,
            seconds,
            counterexample=found.x[0].detach(),
            output=y[0].detach(),
            reason=reason,
            stats=ctx.stats,
        )
    return Result(answer, seconds, reason=reason, stats=ctx.stats)


def _all_rows(problem: Problem) -> bool:
    return all(d.b.shape[0] > 0 for d in problem.disjuncts) and bool(problem.disjuncts)


def _solve(ctx: Context) -> tuple[Answer, str, Found | None]:
    problem, options = ctx.problem, ctx.options
    if not problem.disjuncts:
        return Answer.UNSAT, "no disjunct: nothing can violate the property", None
    lo, hi = ctx.region_b.bounding_box()
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise UsageError("complete verification needs a bounded input region (finite box bounds)")
    if bool(ctx.region_b.is_empty()[0]):
        return (
            Answer.UNSAT,
            "the input region is empty (a lower bound above an upper one, or a ball that "
            "misses the box): no point violates the property",
            None,
        )
    points = _starts(ctx, options.attack_restarts)
    if ctx.rows is None:
        # A disjunct without rows holds everywhere: any point of the region is a counterexample.
        found = ctx.confirm(points, "")
        if found is not None:
            found.how = "a disjunct without constraints holds at every point of the region"
            return Answer.SAT, found.how, found
        return (
            Answer.UNKNOWN,
            "a disjunct has no constraints, but no point of the region was found (is it empty?)",
            None,
        )
    x, _ = climb(
        ctx.model,
        ctx.rows,
        region_batch(ctx.region_m, points.shape[0]),
        points,
        options.attack_steps,
    )
    ctx.count("attack_runs")
    found = ctx.confirm(torch.cat([points, x]), "")
    if found is not None:
        found.how = "counterexample found by the falsifier before any split"
        return Answer.SAT, found.how, found
    if ctx.out_of_time():
        return Answer.TIMEOUT, f"timeout after {options.timeout:g} s, in the falsifier", None
    bounder = Bounder(ctx.model, points[:1], ctx.rows.A, options.dtype)
    branching = cast(Branching, options.branching)
    numel = math.prod(ctx.region_m.shape[1:])
    if branching is Branching.RELU and not bounder.relu_only:
        raise UsageError(
            "ReLU splitting needs a network whose only nonlinearities are ReLUs; use input "
            "splitting (branching='input')"
        )
    if branching is Branching.AUTO:
        branching = _auto_branching(ctx, bounder, numel)
    if branching is Branching.RELU and not bounder.relus:
        branching = Branching.INPUT  # an affine network: nothing to split but the input
    if branching is Branching.INPUT:
        search = InputSearch(ctx, bounder)
        answer, reason = search.run()
        return answer, reason, search.found
    return _relu_search(ctx, bounder)


def _auto_branching(ctx: Context, bounder: Bounder, numel: int) -> Branching:
    """Input splitting for networks with other nonlinearities than ReLUs and for small inputs
    (L2 balls included), unless CROWN leaves at most `relu_split_unstable` ReLUs unstable over
    the whole region: then ReLU splitting's tree is small and its leaves exact, where input
    splitting can need ever smaller boxes along a thin margin."""
    if not bounder.relu_only:
        return Branching.INPUT
    if numel > ctx.options.input_split_dims:
        return Branching.RELU
    if ctx.region_b.centre is not None and ctx.region_b.p == 2:
        return Branching.INPUT  # no linear program decides a leaf of an L2 ball
    root = bounder.bound(region_batch(ctx.region_b, 1))
    ctx.count("bound_calls")
    unstable = int(root.unstable()[0])
    return Branching.RELU if unstable <= ctx.options.relu_split_unstable else Branching.INPUT


def _relu_search(ctx: Context, bounder: Bounder) -> tuple[Answer, str, Found | None]:
    """ReLU splitting. One alpha-CROWN bound of the whole region for every row gives the
    references of all sub-domains; then each disjunct the root leaves open gets a search of its
    own (easiest first): the output rows are the bulk of a sub-domain's cost, and a tree split
    for one disjunct's needs is smaller than one that must close all of them at once."""
    rows = ctx.rows
    joint = ReluSearch(ctx, bounder)
    root = joint.bound_root()
    if rows.n_disjuncts == 1 or not ctx.options.split_disjuncts:
        joint.given_root = root
        answer, reason = joint.run()
        return answer, reason, joint.found
    value = rows.disjunct_value(root.lower)[0]
    refuted = rows.refuted(root.lower)[0]
    order = [int(d) for d in torch.argsort(value, descending=True) if not bool(refuted[int(d)])]
    n_root = int(refuted.sum())
    proved = searched = depth = 0
    for d in order:
        own, idx = rows.select(d)
        sub = dataclasses.replace(ctx, rows=own)
        search = ReluSearch(sub, bounder.with_rows(own.A))
        search.given_root = rows_of_bounded(root, idx)
        answer, reason = search.run()
        ctx.stats[f"disjunct_{d}"] = {"answer": answer.value, "proved": search.proved}
        if answer is not Answer.UNSAT:
            done = f"{n_root + searched} of {rows.n_disjuncts} disjuncts proved before"
            return answer, f"searching disjunct {d} ({done}): {reason}", search.found
        searched += 1
        proved += search.proved
        depth = max(depth, search.max_depth)
    n = rows.n_disjuncts
    if not order:
        return Answer.UNSAT, f"the root bound refutes all {n} disjuncts", None
    return (
        Answer.UNSAT,
        (
            f"all {proved:,} sub-domains proved (relu splitting, max depth {depth}); {n} "
            f"disjuncts: {n_root} refuted at the root, {len(order)} searched one by one"
        ),
        None,
    )


def _starts(ctx: Context, restarts: int) -> Tensor:
    """The falsifier's starts: the region's centre (or the box's) and random points."""
    region = ctx.region_m
    if region.centre is not None:
        centre = region.project(region.centre)
    else:
        lo, hi = region.bounding_box()
        centre = (lo + hi) / 2
    if restarts == 0:
        return centre
    many = region_batch(region, restarts)
    return torch.cat([centre, many.sample(ctx.generator)])


def _region_to(region: Region, dtype: torch.dtype) -> Region:
    def to(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype)

    return Region(to(region.centre), to(region.radius), region.p, to(region.lo), to(region.hi))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# -- propdsl's own properties ----------------------------------------------------------------------


def problems_from_query(query: Query, num_outputs: int | None = None) -> list[Problem]:
    """One `Problem` per sample of `query`: its region and the violation of its property.

    The query's tree says where the property holds: a leaf's rows `C f + d >= 0` (`> 0` where
    strict) all hold, `All` every child, `AnyOf` some child, `Masked` a constant where its mask
    holds. The violation is the negation in disjunctive normal form: `All` becomes a
    disjunction, `AnyOf` a conjunction (distributed: at most MAX_DISJUNCTS disjuncts), and a row
    `c . f + d > 0` becomes `c . f <= -d` (a plain row), a row `c . f + d >= 0` becomes the
    strict `c . f < -d` (a `StrictDisjunct` row; see `StrictDisjunct`). A row with `d = +inf`
    always holds (its negation never: the conjunction is dropped), one with `d = -inf` never
    holds (its negation always: the row is dropped from the conjunction). A conjunction left
    without rows holds everywhere; `num_outputs` (the network's flattened output size) shapes
    it when the query has no rows at all.

    Raises:
        Unsupported: the negation has more than MAX_DISJUNCTS disjuncts for some sample.
        ValueError: a disjunct without rows, no rows in the query, and no `num_outputs`.
    """
    if query.region is None:
        raise Unsupported("the property has no quantified input region")
    C, d, strict = query.matrix() if query.rows else (None, None, None)
    offsets: dict[int, int] = {}
    start = 0
    for r in query.rows:
        offsets[id(r)] = start
        start += r.C.shape[1]
    batch = query.region.shape[0]
    problems = []
    for b in range(batch):
        dnf = _violation(query.root, b, offsets)
        disjuncts: list[Disjunct] = []
        seen: set[tuple[int, ...]] = set()
        for conj in dnf:
            if C is None or d is None or strict is None:  # no rows anywhere: conj is empty
                if num_outputs is None:
                    raise ValueError("problems_from_query needs num_outputs for this query")
                empty = torch.zeros(0, num_outputs, dtype=torch.float64)
                disjuncts = [Disjunct(empty, torch.zeros(0, dtype=torch.float64))]
                break
            rows = []
            impossible = False
            for s in sorted(set(conj)):
                ds = float(d[b, s])
                if ds == math.inf:
                    impossible = True  # the property row always holds
                    break
                if ds == -math.inf:
                    continue  # the property row never holds: its violation always does
                rows.append(s)
            if impossible or tuple(rows) in seen:
                continue
            seen.add(tuple(rows))
            A = C[b, rows].detach().double().reshape(len(rows), -1)
            rhs = -d[b, rows].detach().double().reshape(len(rows))
            violation_strict = ~strict[rows].cpu().reshape(len(rows))
            if bool(violation_strict.any()):
                disjuncts.append(StrictDisjunct(A, rhs, strict=violation_strict))
            else:
                disjuncts.append(Disjunct(A, rhs))
        problems.append(
            Problem(_sample_region(query.region, b), tuple(disjuncts), f"{query.network}[{b}]")
        )
    return problems


def _violation(node: Any, b: int, offsets: dict[int, int]) -> list[list[int]]:
    """The negation of `node` for sample b in DNF: a list of conjunctions of row indices."""
    if isinstance(node, Rows):
        start = offsets[id(node)]
        return [[start + j] for j in range(node.C.shape[1])]
    if isinstance(node, All):
        out: list[list[int]] = []
        for c in node.children:
            out.extend(_violation(c, b, offsets))
            _check_size(len(out))
        return out
    if isinstance(node, AnyOf):
        acc: list[list[int]] = [[]]
        for c in node.children:
            child = _violation(c, b, offsets)
            acc = [a + x for a in acc for x in child]
            _check_size(len(acc))
            if not acc:
                return []
        return acc
    if isinstance(node, Masked):
        if bool(node.mask.reshape(-1)[b if node.mask.numel() > 1 else 0]):
            return [] if node.value else [[]]
        return _violation(node.child, b, offsets)
    raise TypeError(type(node).__name__)


def _check_size(n: int) -> None:
    if n > MAX_DISJUNCTS:
        raise Unsupported(
            f"the property's negation has more than {MAX_DISJUNCTS} disjuncts; complete "
            "verification handles smaller disjunctions"
        )


def _sample_region(region: Region, b: int) -> Region:
    batch = region.shape[0]

    def pick(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        if t.dim() >= 1 and t.shape[0] == batch and t.dim() == len(region.shape):
            return t[b : b + 1]
        return t

    radius = None if region.radius is None else region.radius.reshape(-1)[b : b + 1]
    if region.radius is not None and region.radius.numel() == 1:
        radius = region.radius.reshape(1)
    return Region(pick(region.centre), radius, region.p, pick(region.lo), pick(region.hi))


def complete_verdicts(
    query: Query,
    model: nn.Module,
    options: CompleteOptions = CompleteOptions(),
    progress: Callable[[int, Progress], None] | None = None,
) -> tuple[list[str], list[str], Tensor]:
    """Per sample of `query`: the complete verifier's verdict, its reason and counterexample.

    `sat` -> `falsified` (the point violates the property under its exact semantics, strict
    rows included), `unsat` -> `verified`, `timeout` -> `unknown (timeout)`, anything else
    (and a point on the property's boundary) -> `unknown`. `options.timeout` applies per
    sample. Returns (statuses, reasons, counterexamples [B, *input_shape], NaN where the
    sample was not falsified). `progress(sample, Progress)` follows each sample's search.
    """
    assert query.region is not None
    problems = problems_from_query(query, _num_outputs(query, model))
    shape = query.region.shape
    ref = query.region.centre if query.region.centre is not None else query.region.lo
    assert ref is not None
    points = torch.full(shape, math.nan, dtype=ref.dtype, device=ref.device)
    statuses: list[str] = []
    reasons: list[str] = []
    for b, problem in enumerate(problems):
        callback = None if progress is None else (lambda p, b=b: progress(b, p))
        result = solve(model, problem, options=options, progress=callback)
        if result.answer is Answer.SAT:
            assert result.counterexample is not None and result.output is not None
            if _holds_at(query, b, result.output):
                statuses.append(UNKNOWN)
                reasons.append(
                    "the point found satisfies the property's closure only (it lies on the "
                    "boundary of a non-strict row)"
                )
                continue
            points[b] = result.counterexample.to(points)
            statuses.append(FALSIFIED)
        elif result.answer is Answer.UNSAT:
            statuses.append(VERIFIED)
        elif result.answer is Answer.TIMEOUT:
            statuses.append(TIMEOUT)
        else:
            statuses.append(UNKNOWN)
        reasons.append(result.reason)
    return statuses, reasons, points


def _num_outputs(query: Query, model: nn.Module) -> int:
    if query.rows:
        return int(query.rows[0].C.shape[-1])
    assert query.region is not None
    lo, hi = query.region.bounding_box()
    with torch.no_grad(), _eval_mode(model):
        return int(model(((lo[:1] + hi[:1]) / 2).to(_dtype_of(model))).flatten(1).shape[1])


def _holds_at(query: Query, b: int, output: Tensor) -> bool:
    """Whether the property holds for sample b at the point whose outputs are `output`."""
    if not query.rows:
        empty = torch.zeros(query.region.shape[0] if query.region is not None else 1, 0)
        return bool(query.decide(empty)[b])
    C, _, _ = query.matrix()
    y = output.flatten().to(C.dtype)
    values = torch.zeros(C.shape[0], C.shape[1], dtype=C.dtype, device=C.device)
    values[b] = C[b] @ y
    return bool(query.decide(values)[b])
