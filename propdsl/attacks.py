"""Attacks: the points of a quantifier's regions where a property is violated the most.

`forall x' in D: phi(x')` becomes a loss (and a falsifier) by maximising a signed violation of
`phi` over `D`. The maximisation is projected gradient ascent: PGD (Madry et al. 2018) or APGD
(Croce & Hein 2020), batched over samples, over one or several binders at once (a Lipschitz
property moves `x1` and `x2` together), with random starts and restarts.

The losses (`propdsl.loss`), the evaluation's constraint security (`propdsl.evaluate`) and the
verifier's falsifier (`propdsl.verify.run`) all search with these attacks; the module was
`propdsl.loss.attacks`, which still re-exports its public names.

Guarantees the losses and the falsifier build on:
  * every returned point lies in its region (`Region.project` after every step), for every
    sample whose regions are non-empty; `AttackResult.empty` flags the others, whose points are
    placeholders outside the region (there is no point to return) that no caller may report;
  * the returned point of each sample is the most violating point visited (over all steps and
    all restarts, judged on the true model), so more restarts never do worse than fewer, and the
    first restart repeats a single run with the same generator state;
  * the models' parameter gradients and training flags are left as they were.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from propdsl.errors import UsageError
from propdsl.region import INF, Region, rows
from propdsl.tracing import Traceable, Tracer

__all__ = [
    "APGD",
    "PGD",
    "Attack",
    "AttackResult",
    "VanishingGradientWarning",
    "noise",
    "option_parts",
    "resolve_attack",
    "run_attack",
    "smooth_relu",
]

Objective = Callable[..., Tensor]


class VanishingGradientWarning(UserWarning):
    """The attack's objective has an exactly zero input gradient: the attack cannot move.

    Typical cause: an explanation (saliency) objective on a ReLU network, whose input gradient
    is zero almost everywhere. Set `surrogate_beta` on the attack to climb a softplus surrogate.
    """


@dataclass(frozen=True, kw_only=True)
class PGD:
    """Projected gradient ascent with a fixed step (Madry et al. 2018; torchattacks' `PGD`).

    Args:
        steps: gradient steps per restart.
        restarts: independent runs; each sample keeps its most violating point.
        step_size: the step relative to the radius: each step moves by
            `alpha = step_size * radius / steps` in the ball's norm (2.5 is Madry's rule).
        random_start: start uniformly in the region (else at its centre).
        surrogate_beta: when set, every ReLU is computed as `softplus(beta * x) / beta` during the
            ascent (see `smooth_relu`); each iterate is also evaluated on the true model (one
            more forward pass per step), which judges the points returned.

    >>> PGD(steps=20, restarts=2)
    PGD(steps=20, restarts=2, step_size=2.5, random_start=True, surrogate_beta=None)
    """

    steps: int = 10
    restarts: int = 1
    step_size: float = 2.5
    random_start: bool = True
    surrogate_beta: float | None = None

    def __post_init__(self) -> None:
        _check_common(self.steps, self.restarts, self.surrogate_beta)
        if not self.step_size > 0:
            raise ValueError(f"PGD step_size must be positive, got {self.step_size}")


@dataclass(frozen=True, kw_only=True)
class APGD:
    """Auto-PGD (Croce & Hein 2020): momentum and a step size that halves at checkpoints.

    The step starts at twice the radius; at checkpoints 22%, 41%, 57%, ... of the steps it is
    halved (and the sample restarts from its best point) when fewer than `rho` of the steps
    since the last checkpoint increased the objective, or when the best value has not improved
    and the step was not already halved at the last checkpoint.

    Args:
        steps: gradient steps per restart.
        restarts: independent runs; each sample keeps its most violating point.
        rho: the fraction of successful steps below which the step size is halved.
        momentum: the weight of the new gradient step; `1 - momentum` goes to the previous move
            (the paper's alpha = 0.75).
        random_start: start uniformly in the region (else at its centre).
        surrogate_beta: as in `PGD`.

    >>> APGD(steps=50).rho
    0.75
    """

    steps: int = 20
    restarts: int = 1
    rho: float = 0.75
    momentum: float = 0.75
    random_start: bool = True
    surrogate_beta: float | None = None

    def __post_init__(self) -> None:
        _check_common(self.steps, self.restarts, self.surrogate_beta)
        if not 0 <= self.rho <= 1:
            raise ValueError(f"APGD rho must be in [0, 1], got {self.rho}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"APGD momentum must be in [0, 1], got {self.momentum}")


Attack = PGD | APGD


def noise(samples: int = 1) -> PGD:
    """A noise sampler as attack options: `samples` points drawn uniformly in the region (as
    PGD's random start), no gradient step; each sample keeps its most violating draw. With one
    sample the quantifier's body is evaluated at one uniformly random point: an unbiased
    estimate of its mean over the region, the random perturbation `zeta` of Chen et al. 2024
    ("Rethinking Robustness of Model Attributions"), not a worst case.

    >>> noise()
    PGD(steps=0, restarts=1, step_size=2.5, random_start=True, surrogate_beta=None)
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"noise samples must be a positive integer, got {samples!r}")
    return PGD(steps=0, restarts=samples, random_start=True)


def resolve_attack(attack: Attack | Any | None) -> Attack:
    """Attack options from `PGD(...)` / `APGD(...)`, a name (`"pgd"`, `"apgd"`), a checked
    option value such as a spec's `pgd(steps = 20)`, or None (`PGD()`).

    >>> resolve_attack("apgd")
    APGD(steps=20, restarts=1, rho=0.75, momentum=0.75, random_start=True, surrogate_beta=None)
    """
    if attack is None:
        return PGD()
    if isinstance(attack, PGD | APGD):
        return attack
    name, kwargs = option_parts(attack)
    if name == "pgd":
        return PGD(**kwargs)
    if name == "apgd":
        return APGD(**kwargs)
    if name == "noise":
        return noise(**kwargs)
    raise UsageError(f"unknown attack '{name}'; known attacks: pgd, apgd, noise")


def option_parts(value: Any) -> tuple[str, dict[str, Any]]:
    """(name, keyword arguments) of a name or of a checked option value (`name(k = v, ...)` in a
    spec, which has `name` and `kw()`)."""
    if isinstance(value, str):
        return value, {}
    name = getattr(value, "name", None)
    if name is not None and hasattr(value, "kw"):
        return name, value.kw()
    raise UsageError(f"expected a name or an option value, got {value!r}")


def _check_common(steps: int, restarts: int, beta: float | None) -> None:
    if steps < 0:
        raise ValueError(f"attack steps must be >= 0, got {steps}")
    if restarts < 1:
        raise ValueError(f"attack restarts must be >= 1, got {restarts}")
    if beta is not None and not beta > 0:
        raise ValueError(f"surrogate_beta must be positive, got {beta}")


@dataclass(frozen=True)
class AttackResult:
    """The most violating points found, one tensor per binder, and the objective there.

    `points[i]` has the shape of `regions[i]`; `value` is the [B] objective evaluated on the true
    model (no surrogate) at `points`. Both are detached. `empty` [B] flags the samples for which
    some region is empty (`Region.is_empty`): the joint region has no point, and their `points`
    (the box point nearest each centre, finite so that gradients stay finite) and `value` mean
    nothing: a quantifier over them is vacuous.
    """

    points: tuple[Tensor, ...]
    value: Tensor
    empty: Tensor | None = None  # None: no sample's region is empty


# -- the smooth surrogate --------------------------------------------------------------------------

_RELU_OUT_OF_PLACE = {torch.relu, F.relu, Tensor.relu}
_RELU_IN_PLACE = {torch.relu_, F.relu_, Tensor.relu_}


class _SmoothReLU(TorchFunctionMode):
    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_OUT_OF_PLACE:
            if kwargs.get("inplace") or (len(args) > 1 and args[1] is True):
                return _inplace_softplus(args[0], self.beta)
            return F.softplus(args[0], beta=self.beta)
        if func in _RELU_IN_PLACE:
            return _inplace_softplus(args[0], self.beta)
        return func(*args, **kwargs)


def _inplace_softplus(x: Tensor, beta: float) -> Tensor:
    # softplus saves its input for backward, so it must read a copy of what it overwrites.
    return x.copy_(F.softplus(x.clone(), beta=beta))


@contextlib.contextmanager
def smooth_relu(beta: float) -> Iterator[None]:
    """Inside this block every ReLU is `softplus(beta * x) / beta`, on the same weights.

    Catches `nn.ReLU` modules (also `inplace=True`) and the functional forms `torch.relu`,
    `F.relu`, `Tensor.relu` and their in-place variants, through a `TorchFunctionMode`, so no
    model is copied or modified. ReLUs written as `clamp(min=0)` or `max(x, 0)` are not caught.
    Softplus tends to ReLU as beta grows, and has a non-zero second derivative, so the input
    gradient of a saliency-based objective stops vanishing.

    >>> import torch
    >>> with smooth_relu(1.0):
    ...     round(torch.relu(torch.zeros(1)).item(), 4)
    0.6931
    """
    if not beta > 0:
        raise ValueError(f"smooth_relu beta must be positive, got {beta}")
    with _SmoothReLU(float(beta)):
        yield


# -- the ascent ------------------------------------------------------------------------------------


def run_attack(
    attack: PGD | APGD,
    objective: Objective,
    regions: Sequence[Region],
    *,
    models: Sequence[nn.Module] = (),
    generator: torch.Generator | None = None,
    tiled: Callable[[int], Objective] | None = None,
    traceable: Traceable | None = None,
) -> AttackResult:
    """Maximise `objective(*points)` per sample, each point in its region.

    Args:
        attack: `PGD(...)` or `APGD(...)` options.
        objective: maps one [B, ...] tensor per region to a [B] signed violation (larger = more
            violated). It must keep a gradient where the property holds, i.e. climb `a - b`, not
            the hinge `max(a - b, 0)`. Samples must not interact (no batch statistics).
        regions: one `Region` per binder, all with the same batch size; the points move jointly.
        models: networks the objective calls; they run in eval mode during the attack and get
            their training flags back afterwards.
        generator: the random source of the starts (on the regions' device).
        tiled: `tiled(k)` is the objective of `k` copies of every sample, sample-major (row
            `b * k + r` of its [B * k, ...] points is copy `r` of sample `b`). With it, all
            restarts run as one batch of `restarts * B` samples through the objective, as a
            hand-written attack would; without it, each restart's slice is evaluated by
            `objective` on its own (the same points and values, `restarts` calls per step).
        traceable: makes the objective's evaluations traceable across attacks
            (`propdsl.tracing`): once hot, an evaluation runs as one traced graph, with the
            same values and gradients. Not used with a surrogate (`surrogate_beta`).

    Returns:
        `AttackResult` with one detached point tensor per region, the [B] objective there, and
        the [B] mask of samples whose region is empty (their points are not in it).

    Steps: L-inf balls (and plain boxes) use the gradient's sign; L2 balls the L2-normalised
    gradient; L1 balls the gradient divided by its largest entry (the largest coordinate moves by
    the full step, as in L1 steepest ascent, and the exact L1 projection then sparsifies).

    >>> import torch
    >>> w = torch.tensor([1.0, -2.0, 0.5])
    >>> region = Region.ball(torch.zeros(4, 3), 0.1, float("inf"))
    >>> result = run_attack(PGD(steps=10), lambda x: x @ w, [region])
    >>> round(result.value[0].item(), 4)  # eps * ||w||_1
    0.35
    """
    if not isinstance(attack, PGD | APGD):
        raise TypeError(f"attack must be PGD or APGD options, got {type(attack).__name__}")
    regions = tuple(regions)
    if not regions:
        raise ValueError("run_attack needs at least one region")
    batch = regions[0].shape[0]
    if any(r.shape[0] != batch for r in regions):
        raise ValueError("all regions of one attack must have the same batch size")

    empty = regions[0].is_empty()
    for r in regions[1:]:
        empty = empty | r.is_empty()
    k = attack.restarts
    with _eval_mode(models):
        # The restarts' starts in the order a sequential loop draws them (restart by restart),
        # so the first restart still starts where a single run does.
        starts = [[_start(r, attack.random_start, generator) for r in regions] for _ in range(k)]
        if k == 1:
            fn = objective
            problem = _Problem(objective, regions, attack.surrogate_beta, batch)
            start = starts[0]
        else:
            # All restarts as one batch of k * B samples, sample-major: copy r of sample b is
            # row b * k + r, so that the objective's per-sample values (the data, f(x)) are
            # repeated with `repeat_interleave`, as a vectorised finite quantifier does.
            index = torch.arange(batch, device=empty.device).repeat_interleave(k)
            tiled_regions = tuple(r.select(index) for r in regions)
            start = [
                torch.stack([s[i] for s in starts], dim=1).flatten(0, 1)
                for i in range(len(regions))
            ]
            fn = tiled(k) if tiled is not None else _sliced(objective, k)
            problem = _Problem(fn, tiled_regions, attack.surrogate_beta, batch * k, copies=k)
        if traceable is not None and attack.surrogate_beta is None:
            site = (traceable.site, k if tiled is not None else -k)
            problem.tracer = Tracer(Traceable(site, traceable.tensors, traceable.models), fn, start)
        if isinstance(attack, PGD):
            found = _pgd(attack, problem, start, warn=True)
        else:
            found = _apgd(attack, problem, start, warn=True)
    points, value = found.points, found.value
    if k > 1:
        points, value = _best_copy(points, value, batch, k)
    return AttackResult(points=tuple(points), value=value, empty=empty)


def _sliced(objective: Objective, k: int) -> Objective:
    """The objective of k copies per sample (sample-major), one call per copy."""

    def fn(*points: Tensor) -> Tensor:
        parts = [objective(*(x.unflatten(0, (-1, k))[:, r] for x in points)) for r in range(k)]
        return torch.stack(parts, dim=1).flatten()

    return fn


def _best_copy(
    points: Sequence[Tensor], value: Tensor, batch: int, k: int
) -> tuple[list[Tensor], Tensor]:
    """Per sample, the copy (restart) with the highest value, by tensor ops.

    The same choice as offering the restarts one after another to `_Best`: the first copy with
    the largest value wins ties, and a number always beats NaN (a sample all of whose copies are
    NaN keeps the first).
    """
    v = value.reshape(batch, k)
    nan = v.isnan()
    v = v.masked_fill(nan, -math.inf)
    top = (v == v.amax(dim=1, keepdim=True)) & ~nan
    pick = top.to(torch.uint8).argmax(dim=1)  # the first maximal entry (0 where none is)
    rows_ = torch.arange(batch, device=value.device) * k + pick
    return [x[rows_] for x in points], value[rows_]


_MODULE_TRAIN = nn.Module.train


@contextlib.contextmanager
def _eval_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    flags = [(m, m.training) for model in models for m in model.modules()]
    try:
        if any(type(m).train is not _MODULE_TRAIN for m, _ in flags):
            for model in models:
                model.eval()  # a module with its own `train` gets its call
        else:
            # What `model.eval()` does when no module overrides `train`, without its recursion
            # through `nn.Module.__setattr__` (this runs once per attack, every training step).
            for m, _ in flags:
                object.__setattr__(m, "training", False)
        yield
    finally:
        # Set each flag directly: `train(flag)` would recurse and overwrite the children's.
        for module, flag in flags:
            object.__setattr__(module, "training", flag)


def _start(region: Region, random_start: bool, generator: torch.Generator | None) -> Tensor:
    if random_start:
        return region.sample(generator)
    if region.centre is not None:
        return region.project(region.centre)
    lo, hi = region.bounding_box()
    return (lo + hi) / 2


def _column(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _scale(region: Region) -> Tensor:
    """[B] size of the region in its own norm: the ball's radius, or half the box's widest side."""
    if region.radius is not None:
        return region.radius.expand(region.shape[0])
    lo, hi = region.bounding_box()
    return rows(hi - lo).amax(dim=1) / 2


def _direction(g: Tensor, p: float) -> Tensor:
    """The ascent direction of unit size in the region's norm (see `run_attack`)."""
    if p == INF:
        return g.sign()
    flat = rows(g)
    size = flat.norm(dim=1) if p == 2 else flat.abs().amax(dim=1)
    return g / _column(torch.where(size > 0, size, torch.ones_like(size)), g)


class _Stepper:
    """One region's projected step, with what does not change between steps computed once.

    For L-inf balls and plain boxes the region is the box `bounding_box()` (exact there), so
    the projection is one clamp and a sign step one fused multiply-add: the hot loop of a
    hand-written PGD. Other norms step and project through the region.
    """

    __slots__ = ("region", "lo", "hi", "box")

    def __init__(self, region: Region):
        self.region = region
        self.box = region.p == INF
        if self.box:
            # For a sample whose region is empty, lo > hi and the clamp returns hi: a point
            # outside the region, like `project` (the caller flags these samples).
            self.lo, self.hi = region.bounding_box()

    def project(self, z: Tensor) -> Tensor:
        if self.box:
            return torch.clamp(z, self.lo, self.hi)
        return self.region.project(z)

    def step(self, x: Tensor, g: Tensor, size: Tensor) -> Tensor:
        """`size` is already shaped as a column (`_column`)."""
        if self.box:
            return torch.clamp(torch.addcmul(x, size, g.sign()), self.lo, self.hi)
        return self.region.project(x + size * _direction(g, self.region.p))


def _better(new: Tensor, old: Tensor) -> Tensor:
    """Where `new` beats `old`; a number always beats NaN.

    `new > old`, or `old` is NaN, and never where `new` is NaN: `~(new <= old)` is true where
    either is NaN, and `new == new` rules out a NaN `new`.
    """
    return ~(new <= old) & (new == new)


class _Best:
    """Per sample, the point with the highest objective seen so far."""

    def __init__(self, points: Sequence[Tensor], value: Tensor):
        self.points = list(points)
        self.value = value

    def offer(self, points: Sequence[Tensor], value: Tensor) -> Tensor:
        better = _better(value, self.value)
        self.points = [
            torch.where(_column(better, x), x, kept)
            for x, kept in zip(points, self.points, strict=True)
        ]
        self.value = torch.where(better, value, self.value)
        return better


@dataclass
class _Eval:
    climbed: Tensor  # [B] objective being climbed (the surrogate when one is on)
    grads: list[Tensor] | None  # its gradient w.r.t. each point
    true: Tensor  # [B] objective on the true model


class _Problem:
    """The objective, its regions and the surrogate: evaluations with gradients."""

    def __init__(
        self,
        objective: Objective,
        regions: tuple[Region, ...],
        beta: float | None,
        batch: int,
        *,
        copies: int = 1,
    ):
        self.objective = objective
        self.regions = regions
        self.beta = beta
        self.batch = batch
        self.copies = copies  # restarts stacked in the batch (sample-major)
        self._ones: Tensor | None = None
        self.tracer: Tracer | None = None

    def _call(self, points: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        # Leaves that require grad, so objectives that differentiate internally (saliency) work.
        leaves = [x.detach().requires_grad_(True) for x in points]
        value = self.objective(*leaves)
        if not isinstance(value, Tensor) or value.shape != (self.batch,):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"attack objective must return shape ({self.batch},), got {got}")
        return value, leaves

    def evaluate(self, points: Sequence[Tensor], *, need_grad: bool = True) -> _Eval:
        if self.beta is None:  # the hot path: one evaluation climbs and judges
            if need_grad and self.tracer is not None:
                traced = self.tracer.evaluate(points)
                if traced is not None:
                    return _Eval(traced[0], traced[1:], traced[0])
            with torch.enable_grad():
                value, leaves = self._call(points)
                grads = self._grads(value, leaves) if need_grad else None
            value = value.detach()
            return _Eval(value, grads, value)
        with torch.enable_grad():
            surrogate = (
                smooth_relu(self.beta) if self.beta is not None else contextlib.nullcontext()
            )
            with surrogate:
                value, leaves = self._call(points)
                grads = None
                if need_grad:
                    grads = self._grads(value, leaves)
            true = value.detach()
            if self.beta is not None:
                true = self._call(points)[0].detach()
        return _Eval(value.detach(), grads, true)

    def _grads(self, value: Tensor, leaves: list[Tensor]) -> list[Tensor]:
        if not value.requires_grad:
            return [torch.zeros_like(x) for x in leaves]
        # The gradient of value.sum(), from ones made once: no sum to run and differentiate.
        ones = self._ones
        if ones is None or ones.dtype != value.dtype or ones.device != value.device:
            ones = self._ones = torch.ones_like(value)
        grads = torch.autograd.grad(value, leaves, grad_outputs=ones, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads, strict=True)]

    def warn_if_flat(self, grads: Sequence[Tensor]) -> None:
        if self.beta is not None:
            return
        # Judged on the first restart, as a single run would be. A sample moves where some
        # gradient entry is non-zero (NaN included: it is not flat).
        moving = None
        for g in grads:
            first = g if self.copies == 1 else g.unflatten(0, (-1, self.copies))[:, 0]
            some = rows(first).any(dim=1)
            moving = some if moving is None else moving | some
        samples = self.batch // self.copies
        flat = samples - int(moving.sum()) if moving is not None else 0
        if 2 * flat > samples:
            warnings.warn(
                f"the attack objective's input gradient is exactly zero for {flat} of "
                f"{samples} samples at the start, so the attack cannot move; objectives built "
                "on input gradients (saliency) of ReLU networks are flat almost everywhere: give "
                "the attack a softplus surrogate to climb, surrogate_beta (in a spec: "
                "attack = pgd(steps = 10, surrogate_beta = 10); in Python: "
                "PGD(surrogate_beta=10))",
                VanishingGradientWarning,
                stacklevel=4,
            )


def _pgd(attack: PGD, problem: _Problem, start: list[Tensor], *, warn: bool) -> _Best:
    regions = problem.regions
    steps = attack.steps
    # Per region, computed once: the step sizes as columns, the projection's bounds.
    steppers = [_Stepper(r) for r in regions]
    alphas = [
        _column(attack.step_size * _scale(r) / max(steps, 1), x)
        for r, x in zip(regions, start, strict=True)
    ]
    x = start
    ev = problem.evaluate(x, need_grad=steps > 0)
    best = _Best(x, ev.true)
    if warn and ev.grads is not None:
        problem.warn_if_flat(ev.grads)
    for k in range(steps):
        assert ev.grads is not None
        x = [st.step(xi, g, a) for st, xi, g, a in zip(steppers, x, ev.grads, alphas, strict=True)]
        ev = problem.evaluate(x, need_grad=k + 1 < steps)
        best.offer(x, ev.true)
    return best


def _apgd_checkpoints(steps: int) -> list[int]:
    """Croce & Hein's checkpoints w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in exact integer hundredths."""
    p = [0, 22]
    while p[-1] < 100:
        p.append(p[-1] + max(p[-1] - p[-2] - 3, 6))
    return sorted({-(-q * steps // 100) for q in p if 0 < q < 100})


def _apgd(attack: APGD, problem: _Problem, start: list[Tensor], *, warn: bool) -> _Best:
    regions = problem.regions
    steps = attack.steps
    x = start
    ev = problem.evaluate(x, need_grad=steps > 0)
    best = _Best(x, ev.true)  # the most violating point on the true model (returned)
    if warn and ev.grads is not None:
        problem.warn_if_flat(ev.grads)
    if steps == 0:
        return best
    assert ev.grads is not None
    steppers = [_Stepper(r) for r in regions]
    eta = [2 * _scale(r) for r in regions]
    # The best point of the climbed objective, with its gradient: where the step restarts from.
    top = _Best([*x, *ev.grads], ev.climbed)

    x_prev, value, grads = x, ev.climbed, ev.grads
    x = [
        st.step(xi, g, _column(e, xi)) for st, xi, g, e in zip(steppers, x, grads, eta, strict=True)
    ]
    checkpoints = _apgd_checkpoints(steps)
    last_check, top_at_check = 0, value
    reduced_last = torch.zeros_like(value, dtype=torch.bool)
    successes = torch.zeros_like(value)
    a = attack.momentum
    for k in range(1, steps + 1):  # x is the k-th iterate
        ev = problem.evaluate(x, need_grad=k < steps)
        best.offer(x, ev.true)
        if k == steps:
            break
        assert ev.grads is not None
        successes += (ev.climbed > value).to(successes.dtype)
        top.offer([*x, *ev.grads], ev.climbed)
        value, grads = ev.climbed, ev.grads
        if k in checkpoints:
            reduce = (successes < attack.rho * (k - last_check)) | (
                ~reduced_last & ~_better(top.value, top_at_check)
            )
            eta = [torch.where(reduce, e / 2, e) for e in eta]
            n = len(regions)
            x = [
                torch.where(_column(reduce, xi), t, xi)
                for xi, t in zip(x, top.points[:n], strict=True)
            ]
            grads = [
                torch.where(_column(reduce, g), t, g)
                for g, t in zip(grads, top.points[n:], strict=True)
            ]
            # Momentum restarts too: the previous move of a reset sample is zero.
            x_prev = [
                torch.where(_column(reduce, xp), xi, xp) for xp, xi in zip(x_prev, x, strict=True)
            ]
            value = torch.where(reduce, top.value, value)
            reduced_last, top_at_check, last_check = reduce, top.value, k
            successes = torch.zeros_like(successes)
        nxt = []
        for st, xi, xp, g, e in zip(steppers, x, x_prev, grads, eta, strict=True):
            z = st.step(xi, g, _column(e, xi))
            nxt.append(st.project(xi + a * (z - xi) + (1 - a) * (xi - xp)))
        x_prev, x = x, nxt
    return best
