"""Evaluation of a trained run against its spec: what `propdsl eval` computes and writes.

For one split of the spec's data (the verify block's source, else the train block's):

* clean accuracy;
* per property of one sample (parameters `(x)` or `(x, y)`), **constraint accuracy** (the
  property holds at a uniformly random point of each of its regions) and **constraint security**
  (it holds at the point found by a strong attack that does not depend on the training logic);
* constraint security against the radius, for the properties that depend on a param `eps`;
* explanation robustness of gradient saliency (Quantus' MaxSensitivity, AvgSensitivity,
  LocalLipschitzEstimate) and Etmann et al.'s alignment;
* the accuracy-robustness area of Woods et al. (2019) from per-sample minimal adversarial RMSE
  distances found by bisection over the radius of an L2 ball;
* on request (`metrics`), the heavier metrics named after papers (`propdsl.metrics.papers`):
  Etmann et al.'s rho / rho~ / alignment, Woods et al.'s attack and BTR ARA and adversarial
  explanations, input loss landscapes and flatness.

Everything is written to `eval.json` in a folder of the run for these settings,
`RUN/eval/<key>/` (see `propdsl.results`), with PNG plots next to it; `RUN/eval.json` is a copy
of the latest. The exact definitions are in `docs/evaluation.md`.

Why the attack ignores the training logic: a loss under a differentiable logic is a smoothed
version of the property, and attacking a model with the logic it was trained on measures how
well it fits that smoothing, not whether the property holds (Flinkow et al. 2025 report 0.963
security for a DL2-trained model attacked through DL2, 0.260 under a common attack). The attack
here climbs the compiler's `violation` logic (raw signed margins, the same for every training
logic), and `satisfied` is the exact Boolean truth at the attack's point.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from propdsl import distributed, runs
from propdsl import ir as I
from propdsl.api import Spec
from propdsl.attacks import APGD, PGD
from propdsl.errors import UsageError
from propdsl.interpret import differentiates
from propdsl.manipulation import manipulation_lines, manipulation_summary
from propdsl.metrics import papers as paper_metrics
from propdsl.metrics.papers import PaperMetric, PaperResults
from propdsl.metrics.search import Criterion, Distance, min_perturbation
from propdsl.metrics.woods import WoodsARA, accuracy_robustness_area
from propdsl.results import positive_count, result_key, write_results
from propdsl.session import (
    Checkpoint,
    ParamSource,
    draw_partners,
    holds_run,
    load_samples,
    open_run,
    resolve_device,
    show_params,
)

__all__ = [
    "DEFAULT_ATTACK",
    "DEFAULT_EPS_GRID",
    "EVAL_DIR",
    "EVAL_JSON",
    "AccuracyRobustness",
    "EvalResult",
    "ExplanationMetrics",
    "PaperMetric",
    "PropertyResult",
    "accuracy_robustness_area",
    "evaluate",
    "min_adversarial_rmse",
    "parse_attack",
    "parse_eps_grid",
    "render_table",
    "show_attack",
]

log = logging.getLogger("propdsl.evaluate")

EVAL_JSON = runs.EVAL_JSON
EVAL_DIR = runs.EVAL_DIR  # RUN/eval/<key>/eval.json
DEFAULT_ATTACK = APGD(steps=50, restarts=3)
RANDOM_POINTS = PGD(steps=0, random_start=True)  # zero steps: the point is the uniform start
DEFAULT_EPS_GRID = (0.0, 0.025, 0.05, 0.1, 0.15, 0.2)
SURROGATE_BETA = 10.0
# The bisection's attack for the accuracy-robustness area (run once per bisection step).
ARA_ATTACK = APGD(steps=20, restarts=1)
ARA_BISECTIONS = 12
ARA_MAX_RMSE = 1.0
EXPLAIN_PERTURBATIONS = 16
GRID_SAMPLES = 6


# -- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PropertyResult:
    """One property's rates over the `n` evaluated samples.

    `accuracy`: the fraction of samples where the property holds at uniformly random points of
    its regions; `security`: where it holds at the strong attack's points; `attack`: that
    attack, as run (with the surrogate it got, if any).
    """

    name: str
    accuracy: float
    security: float
    n: int
    attack: str


@dataclass(frozen=True)
class ExplanationMetrics:
    """Means over the samples of per-sample robustness metrics of gradient saliency.

    Saliency is that of the true label; perturbed inputs are drawn uniformly in the L-inf ball
    of `radius` (clipped to the data's box), `perturbations` of them per sample. Lower is more
    robust, except `alignment` (higher is more robust). None where a mean is not finite.
    """

    radius: float
    perturbations: int
    n: int
    max_sensitivity: float | None
    avg_sensitivity: float | None
    local_lipschitz_estimate: float | None
    alignment: float | None


@dataclass(frozen=True)
class AccuracyRobustness:
    """Woods et al.'s accuracy-robustness area from per-sample adversarial RMSE distances.

    `distances[i]`: 0 for a misclassified sample, else the RMSE of the smallest decision-changing
    perturbation found, or `max_rmse` where none was found within it (then the area is the
    integral up to `max_rmse`).
    """

    area: float
    num_classes: int
    max_rmse: float
    n: int
    not_broken: int
    median: float
    distances: tuple[float, ...] = field(repr=False)


@dataclass(frozen=True)
class EvalResult:
    """What `evaluate` computed and where it wrote it."""

    run: Path
    split: str
    n: int
    clean_accuracy: float
    properties: Mapping[str, PropertyResult]
    attack: str
    random_attack: str
    seed: int
    eps_grid: tuple[float, ...]
    security_curve: Mapping[str, tuple[float, ...]]
    explanation: ExplanationMetrics | None
    robustness: AccuracyRobustness | None
    skipped: Mapping[str, str]
    json_path: Path
    plots: tuple[Path, ...]
    checkpoint: str = "best"
    checkpoint_epoch: int | None = None
    params: tuple[ParamSource, ...] = ()
    header: str = ""  # checkpoint, params and notes, as `RunSetup.header` gives them
    results: Path | None = None  # the folder of this setting's results
    # constraint accuracy (uniformly random points) at each radius of `eps_grid`
    accuracy_curve: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    papers: PaperResults | None = None  # the metrics asked for with `metrics`
    # per property of a pair: Chen et al.'s targeted explanation attack towards its partners
    # (`propdsl.manipulation.manipulation_summary`)
    manipulation: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


Progress = Callable[[str, int, int], None]


class _Steps:
    """Counts the stages of an evaluation for a `progress(stage, done, total)` callback."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress = progress
        self.total = total
        self.finished = 0

    def start(self, stage: str) -> None:
        if self.progress is not None:
            self.progress(stage, min(self.finished, self.total), self.total)
        self.finished += 1

    def skip(self, count: int) -> None:
        self.finished += count

    def done(self) -> None:
        if self.progress is not None:
            self.progress("done", self.total, self.total)


def _positive_radius(name: str, value: Any, *, zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v < 0 or (v == 0 and not zero):
        what = "non-negative" if zero else "positive"
        raise UsageError(f"{name} must be {what} and finite, got {value!r}")
    return v


# -- the evaluation ------------------------------------------------------------------------------


@holds_run("eval")
def evaluate(
    spec: Spec,
    run: str | os.PathLike[str],
    *,
    split: str = "test",
    model_ref: str | None = None,
    device: str | None = None,
    samples: int | None = None,
    attack: PGD | APGD | None = None,
    eps_grid: Sequence[float] | None = None,
    plots: bool = True,
    seed: int | None = None,
    batch: int = 256,
    explain_radius: float | None = None,
    curve_properties: Sequence[str] | None = None,
    checkpoint: Checkpoint | str | None = None,
    spec_differs_ok: bool = False,
    progress: Progress | None = None,
    metrics: str | Sequence[str | PaperMetric] | None = None,
) -> EvalResult:
    """Evaluate a checkpoint of a run on one split of the spec's data; write the results into
    `RUN/eval/<key>/` (see `propdsl.results`) and a copy of `eval.json` into the run folder.

    Args:
        spec: the loaded spec (normally the run's own `spec.prop`); the run's params are the
            defaults of the params the spec was not loaded with (`propdsl.session.run_params`).
        run: the run folder written by `propdsl train`.
        split: `test`, `val`, `train` or `all` of the verify block's data source (else the
            train block's, else the run's); the split is drawn with the run's seed, so it is the
            split the run was trained against.
        model_ref: `pkg.module:factory` for a run of a user model.
        device: `auto`, `cpu`, `cuda`, `cuda:N` (None: auto).
        samples: evaluate the first `samples` samples of the split (it comes shuffled by seed).
        attack: the strong attack of constraint security (default `APGD(steps=50, restarts=3)`);
            explanation properties on ReLU networks get `surrogate_beta=10` unless it is set.
        eps_grid: radii of the security curve (default 0, 0.025, 0.05, 0.1, 0.15, 0.2); only
            for specs with a param `eps`; `()` skips the curve.
        curve_properties: the properties of the curve (None: the classification-robustness-
            like ones: of `(x, y)`, reading the label, over a region sized by `eps`, no
            gradients; where there are none, every such property of `x` or `(x, y)`).
        plots: write PNG plots beside `eval.json` (matplotlib).
        seed: seeds the random points and the attacks' starts (None: the run's seed).
        batch: samples per forward pass.
        explain_radius: L-inf radius of the explanation metrics (None: the spec's `eps`, else
            0.1).
        checkpoint: `best` (default; the last one for a run without a best one) or `last`.
        spec_differs_ok: accept a spec whose text is not the run's `spec.prop` (else a
            `UsageError`); its results get a folder of their own.
        progress: called as `progress(stage, done, total)` before each stage and once at the
            end with `done == total` (the CLI draws it).
        metrics: the heavier metrics to add, names of `PaperMetric` (`"etmann,ara"` or a
            list): `etmann`, `ara`, `landscape`, `flatness`, `adv-explanations` (default none).

    Returns:
        `EvalResult` with every number and the paths written.

    Raises:
        UsageError: before any work, for a spec that does not fit the run, a count that is not
            positive, an unknown property name or checkpoint.

    >>> import propdsl                                              # doctest: +SKIP
    >>> spec = propdsl.load("runs/digits/spec.prop")                # doctest: +SKIP
    >>> result = evaluate(spec, "runs/digits", samples=200)         # doctest: +SKIP
    >>> print(render_table(result))                                 # doctest: +SKIP
    """
    positive_count("samples", samples)
    positive_count("batch", batch)
    if explain_radius is not None:
        _positive_radius("explain_radius", explain_radius)
    for e in eps_grid or ():
        _positive_radius("eps_grid", e, zero=True)
    strong = attack if attack is not None else DEFAULT_ATTACK
    if not isinstance(strong, PGD | APGD):
        raise UsageError(f"attack must be PGD(...) or APGD(...), got {type(strong).__name__}")
    for name in curve_properties or ():
        spec.property(name)  # a clear error for an unknown name, before any work
    chosen_metrics = paper_metrics.parse_metrics(metrics)
    dev = resolve_device(device)
    setup = open_run(
        spec,
        run,
        checkpoint=checkpoint,
        model_ref=model_ref,
        device=dev,
        spec_differs_ok=spec_differs_ok,
    )
    spec, model, run_path = setup.spec, setup.model, setup.path
    seed = setup.seed if seed is None else int(seed)

    ds = load_samples(setup, split, samples, dev)
    x, y = ds.x, ds.y
    n = int(x.shape[0])
    box = (0.0, 1.0) if bool(x.min() >= 0) and bool(x.max() <= 1) else None
    relu = any(isinstance(m, nn.ReLU) for m in model.modules())
    log.info("evaluating %s on %d %s samples", run_path, n, split)

    grid = tuple(float(e) for e in (DEFAULT_EPS_GRID if eps_grid is None else eps_grid))
    has_eps = getattr(spec.param_types.get("eps"), "kind", None) == "Real"
    closed = [name for name, p in spec.properties.items() if len(p.params) in (1, 2) or p.paired]
    # properties of a pair: their partners, drawn once from the split (`partner` clauses)
    partners = draw_partners(setup, split, closed, x, y, dev)
    single = [name for name in closed if name not in partners]
    planned_curve = _curve_choice(spec, single, curve_properties) if grid and has_eps else []
    steps = _Steps(
        progress,
        len(closed) + len(planned_curve) * len(grid) + 3 + len(partners) + len(chosen_metrics),
    )

    with torch.no_grad():
        predicted = _predict(model, x, batch)
    clean = float((predicted == y).float().mean())

    props: dict[str, PropertyResult] = {}
    skipped: dict[str, str] = {}
    grid_points: dict[str, tuple[str, Tensor, Tensor]] = {}
    attacks: dict[str, PGD | APGD] = {}
    for name, prop in spec.properties.items():
        if name not in closed:
            skipped[name] = "not a property of one sample (x) or (x, y)"
            continue
        steps.start(f"property {name}")
        prop_attack = strong
        if relu and differentiates(prop.formula) and strong.surrogate_beta is None:
            prop_attack = dataclasses.replace(strong, surrogate_beta=SURROGATE_BETA)
        t0 = time.perf_counter()
        try:
            pair = partners.get(name)
            at_random, _ = _holds(
                spec, name, RANDOM_POINTS, model, x, y, batch, seed, dev, partner=pair
            )
            secure, points = _holds(
                spec,
                name,
                prop_attack,
                model,
                x,
                y,
                batch,
                seed,
                dev,
                keep=GRID_SAMPLES,
                partner=pair,
            )
        except UsageError as err:  # CompileError: a property this backend cannot attack
            skipped[name] = str(err)
            log.warning("property '%s' skipped: %s", name, err)
            continue
        attacks[name] = prop_attack
        log.info("property %s: %.1fs", name, time.perf_counter() - t0)
        props[name] = PropertyResult(
            name, _mean(at_random), _mean(secure), n, show_attack(prop_attack)
        )
        for var, pts in points.items():
            if tuple(pts.shape[1:]) == tuple(x.shape[1:]):
                grid_points[name] = (var, pts, secure[: pts.shape[0]])
                break

    curve: dict[str, tuple[float, ...]] = {}
    accuracy_curve: dict[str, tuple[float, ...]] = {}
    for name in planned_curve:
        if name not in props:  # skipped above
            steps.skip(len(grid))
            continue
        t0 = time.perf_counter()
        own = float(spec.params["eps"])
        known = {own: (props[name].security, props[name].accuracy)}
        curve[name], accuracy_curve[name] = _security_curve(
            spec, name, attacks[name], grid, known, model, x, y, batch, seed, dev, steps
        )
        log.info("security curve of %s: %.1fs", name, time.perf_counter() - t0)

    radius = explain_radius
    if radius is None:
        eps = spec.params.get("eps")
        radius = float(eps) if isinstance(eps, int | float) and not isinstance(eps, bool) else 0.1
    steps.start("explanation metrics")
    t0 = time.perf_counter()
    explanation = _explanation_metrics(model, x, y, float(radius), box, batch, seed, dev)
    log.info("explanation metrics: %.1fs", time.perf_counter() - t0)
    manipulation: dict[str, Any] = {}
    for name, (xt, _) in partners.items():
        steps.start(f"explanation manipulation towards the partners of {name}")
        t0 = time.perf_counter()
        manipulation[name] = manipulation_summary(
            spec.property(name), model, x, xt, box, relu, float(radius), batch
        )
        log.info("explanation manipulation (%s): %.1fs", name, time.perf_counter() - t0)
    steps.start("accuracy-robustness area")
    t0 = time.perf_counter()
    robustness = _robustness(model, x, y, predicted, box, batch, seed, dev)
    log.info("accuracy-robustness area: %.1fs", time.perf_counter() - t0)
    papers = None
    if chosen_metrics:
        t0 = time.perf_counter()
        papers = paper_metrics.compute(
            chosen_metrics,
            model,
            x,
            y,
            box=box,
            image=_is_image(tuple(x.shape[1:])),
            radius=float(radius),
            attack_ara=_as_woods(robustness),
            batch=batch,
            seed=seed,
            device=dev,
            start=steps.start,
        )
        log.info("paper metrics: %.1fs", time.perf_counter() - t0)

    steps.start("writing results" + (" and plots" if plots else ""))
    settings = {
        "command": "eval",
        "attack": show_attack(strong),
        "attacks": {k: show_attack(a) for k, a in attacks.items()},
        "eps_grid": list(grid) if curve else [],
        "curve_properties": list(curve),
        "batch": batch,
        "seed": seed,
        "explain_radius": float(radius),
        "device": dev.type,
    }
    if chosen_metrics:  # only when asked: the folders of plain evaluations keep their keys
        settings["metrics"] = [m.value for m in chosen_metrics]
    key = result_key(setup, split=split, n=n, settings=settings)
    folder = run_path / EVAL_DIR / key
    partial = EvalResult(
        run=run_path,
        split=split,
        n=n,
        clean_accuracy=clean,
        properties=props,
        attack=show_attack(strong),
        random_attack="uniform random point of each region",
        seed=seed,
        eps_grid=grid if curve else (),
        security_curve=curve,
        explanation=explanation,
        robustness=robustness,
        skipped=skipped,
        json_path=folder / EVAL_JSON,
        manipulation=manipulation,
        plots=(),
        checkpoint=setup.checkpoint.value,
        checkpoint_epoch=setup.checkpoint_epoch,
        params=setup.params,
        header=setup.header(),
        results=folder,
        accuracy_curve=accuracy_curve,
        papers=papers,
    )
    names: list[str] = []

    def write(tmp: Path) -> dict[str, Any]:
        if plots:
            written = _plots(
                tmp,
                run_path,
                spec,
                x,
                y,
                predicted,
                model,
                grid,
                curve,
                robustness,
                grid_points,
                clean,
                accuracy_curve,
            )
            if papers is not None:
                written += paper_metrics.plots(papers, tmp, x, y)
            names.extend(p.name for p in written)
        data = _to_json(partial, setup, ds.name, names)
        data["settings"] = settings
        return data

    write_results(run_path, EVAL_DIR, key, EVAL_JSON, write)
    steps.done()
    return dataclasses.replace(partial, plots=tuple(folder / name for name in names))


def _predict(model: nn.Module, x: Tensor, batch: int) -> Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


def _mean(v: Tensor) -> float:
    return float(v.float().mean())


def _sized_by_eps(spec: Spec) -> set[str]:
    """The properties whose formula changes with `eps` (also through defaults such as
    `param delta : Real = 2 * eps`)."""
    a, b = spec.with_params(eps=0.125), spec.with_params(eps=0.25)
    return {n for n in spec.properties if a.properties[n].formula != b.properties[n].formula}


def _curve_choice(spec: Spec, props: Sequence[str], asked: Sequence[str] | None) -> list[str]:
    if asked is not None:
        return [name for name in asked if name in props]
    sized = _sized_by_eps(spec)
    candidates = [name for name in props if name in sized]
    chosen = [name for name in candidates if _curve_property(spec, name)]
    if not chosen:  # no classification-like property: every robustness property of the spec
        chosen = [name for name in candidates if _curve_property(spec, name, label=False)]
    return chosen


def _curve_property(spec: Spec, name: str, *, label: bool = True) -> bool:
    """Classification-robustness-like: a property of `(x, y)` whose formula reads the label
    (with `label`), quantifies over a region, and takes no input gradients.

    (Explanation properties are left out: their attack differentiates a gradient and is many
    times dearer; where a spec has classification-like properties, output properties of `x`
    alone are left out to keep `eval` fast: pass `curve_properties` to have them.)
    """
    prop = spec.properties[name]
    if label and len(prop.params) != 2:
        return False
    reads_label = not label or any(
        isinstance(n, I.Var) and n.name == prop.params[1][0] for n in I.walk(prop.formula)
    )
    region = any(
        isinstance(n, I.Quant) and not all(isinstance(d, I.Range) for d in n.domains)
        for n in I.walk(prop.formula)
    )
    return reads_label and region and not differentiates(prop.formula)


def _holds(
    spec: Spec,
    name: str,
    attack: PGD | APGD,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch: int,
    seed: int,
    device: torch.device,
    *,
    keep: int = 0,
    partner: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """[N] exact truth of the property at the attack's points, and the first `keep` points.

    The logic only shapes the loss, which is not used: `satisfied` is the Boolean truth, and
    the attack climbs the logic-independent signed violation.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    loss = spec.loss(name, logic="dl2", attack=attack, generator=generator)
    truth: list[Tensor] = []
    points: dict[str, Tensor] = {}
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb, yb = x[i : i + batch], y[i : i + batch]
            pb = None if partner is None else (partner[0][i : i + batch], partner[1][i : i + batch])
            # In a distributed job each rank attacks its part of the batch (docs/distributed.md)
            with distributed.sharded_batch(xb.shape[0]) as part:
                own = None if pb is None else (pb[0][part.lo : part.hi], pb[1][part.lo : part.hi])
                out = loss(model, xb[part.lo : part.hi], yb[part.lo : part.hi], partner=own)
            truth.append(part.gather(out.satisfied.detach().reshape(-1)))
            if i == 0 and keep:
                points = {
                    k: part.gather(v[:keep].detach())[:keep] for k, v in out.counterexample.items()
                }
    return torch.cat(truth), points


def _security_curve(spec, name, attack, grid, known, model, x, y, batch, seed, device, steps):
    """(security, constraint accuracy) of the property at each radius of the grid."""
    values, accuracy = [], []
    for eps in grid:
        steps.start(f"security of {name} at eps {eps:g}")
        if eps in known:  # the spec's own radius: the same attack with the same seed, done
            values.append(known[eps][0])
            accuracy.append(known[eps][1])
            continue
        at = spec.with_params(eps=eps)
        run = attack
        if _point_regions(at.properties[name].formula):
            # Every region is one point (a ball of radius 0): each step of the attack projects
            # back onto it, so its start is its answer; the same truth without the steps.
            run = dataclasses.replace(attack, steps=0, restarts=1)
        truth, _ = _holds(at, name, run, model, x, y, batch, seed, device)
        values.append(_mean(truth))
        at_random, _ = _holds(at, name, RANDOM_POINTS, model, x, y, batch, seed, device)
        accuracy.append(_mean(at_random))
    return tuple(values), tuple(accuracy)


def _point_regions(formula: I.Node) -> bool:
    """Whether every region a quantifier of the formula ranges over is a ball of radius 0
    (possibly intersected with boxes), i.e. at most one point."""

    def point(d: I.Domain) -> bool:
        parts = d.parts if isinstance(d, I.Inter) else (d,)
        return any(
            isinstance(p, I.Ball) and isinstance(p.radius, I.Const) and p.radius.value == 0
            for p in parts
        )

    domains = [
        d
        for n in I.walk(formula)
        if isinstance(n, I.Quant)
        for d in n.domains
        if not isinstance(d, I.Range)
    ]
    return bool(domains) and all(point(d) for d in domains)


# -- explanation metrics -------------------------------------------------------------------------


def _finite_mean(v: Tensor) -> float | None:
    m = float(v.double().mean())
    return m if math.isfinite(m) else None


def _explanation_metrics(model, x, y, radius, box, batch, seed, device) -> ExplanationMetrics:
    from propdsl import explain

    lo, hi = box if box is not None else (None, None)
    parts: dict[str, list[Tensor]] = {k: [] for k in ("max", "avg", "lip", "align")}
    metrics = {
        "max": explain.max_sensitivity,
        "avg": explain.avg_sensitivity,
        "lip": explain.local_lipschitz_estimate,
    }
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch], y[i : i + batch]

        def saliency(v: Tensor, yb: Tensor = yb) -> Tensor:
            return explain.saliency(model, v, yb, create_graph=False)

        for key, metric in metrics.items():
            # The same perturbations for every metric: one generator state per batch.
            generator = torch.Generator(device=device).manual_seed(seed + i)
            parts[key].append(
                metric(
                    saliency,
                    xb,
                    radius=radius,
                    samples=EXPLAIN_PERTURBATIONS,
                    lo=lo,
                    hi=hi,
                    generator=generator,
                ).detach()
            )
        parts["align"].append(explain.alignment(model, xb).detach())
    values = {k: _finite_mean(torch.cat(v)) for k, v in parts.items()}
    return ExplanationMetrics(
        radius=radius,
        perturbations=EXPLAIN_PERTURBATIONS,
        n=int(x.shape[0]),
        max_sensitivity=values["max"],
        avg_sensitivity=values["avg"],
        local_lipschitz_estimate=values["lip"],
        alignment=values["align"],
    )


# -- accuracy-robustness area --------------------------------------------------------------------


def min_adversarial_rmse(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    attack: PGD | APGD = ARA_ATTACK,
    max_rmse: float = ARA_MAX_RMSE,
    bisections: int = ARA_BISECTIONS,
    box: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per sample, the RMSE of the smallest decision-changing perturbation an attack finds.

    RMSE is `||x' - x||_2 / sqrt(d)` (d input entries), so the RMSE ball of radius `e` is the L2
    ball of radius `e * sqrt(d)`. A misclassified sample gets 0. For the others the attack
    maximises the margin `max_{j != y} f(x')_j - f(x')_y` over `ball(x, r, 2) & box`; first at
    `max_rmse` (samples it does not break get `max_rmse`), then `bisections` times at the middle
    of `[lo, hi]`, where `hi` is the smallest RMSE of a decision-changing point found so far and
    `lo` the largest radius at which the attack failed. The result is that smallest RMSE found:
    an upper bound on the true minimum (tight as far as the attack is), within
    `max_rmse / 2**bisections` of the attack's own threshold. Returns [B] (float64, on CPU).

    >>> import torch
    >>> model = torch.nn.Linear(2, 2)  # class 0 where x_0 > 0.5
    >>> _ = model.weight.data.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    >>> _ = model.bias.data.copy_(torch.tensor([-0.5, 0.5]))
    >>> d = min_adversarial_rmse(model, torch.tensor([[0.6, 0.5]]), torch.tensor([0]))
    >>> round(d.item(), 3)  # move x_0 by 0.1: RMSE 0.1 / sqrt(2)
    0.071
    """
    # Woods et al.'s attack ARA search (propdsl.metrics.search), the argmax criterion.
    return min_perturbation(
        model,
        x,
        y,
        criterion=Criterion.ARGMAX,
        distance=Distance.RMSE,
        attack=attack,
        max_distance=max_rmse,
        bisections=bisections,
        box=box,
        generator=generator,
    ).distance


def _robustness(model, x, y, predicted, box, batch, seed, device) -> AccuracyRobustness:
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = [
        min_adversarial_rmse(
            model, x[i : i + batch], y[i : i + batch], box=box, generator=generator
        )
        for i in range(0, x.shape[0], batch)
    ]
    d = torch.cat(parts)
    k = _num_classes(model, x)
    correct = (predicted == y).cpu()
    return AccuracyRobustness(
        area=accuracy_robustness_area(d, k),
        num_classes=k,
        max_rmse=ARA_MAX_RMSE,
        n=int(d.numel()),
        not_broken=int((correct & (d >= ARA_MAX_RMSE)).sum()),
        median=float(d.median()),
        distances=tuple(float(v) for v in d),
    )


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).flatten(1).shape[1])


def _as_woods(ara: AccuracyRobustness | None) -> WoodsARA | None:
    """eval's accuracy-robustness area is Woods et al.'s attack ARA (argmax criterion)."""
    if ara is None:
        return None
    return WoodsARA(
        criterion=Criterion.ARGMAX,
        area=ara.area,
        num_classes=ara.num_classes,
        max_rmse=ara.max_rmse,
        n=ara.n,
        not_broken=ara.not_broken,
        median=ara.median,
        distances=ara.distances,
    )


def _is_image(shape: tuple[int, ...]) -> bool:
    from propdsl import plots

    return plots.is_image(shape)


# -- options from the command line ---------------------------------------------------------------


def parse_eps_grid(text: str) -> tuple[float, ...]:
    """`"0.01,0.02,0.05"` -> (0.01, 0.02, 0.05): finite, non-negative, at least one.

    >>> parse_eps_grid("0, 0.05,0.1")
    (0.0, 0.05, 0.1)
    """
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise UsageError(f"--eps-grid needs comma-separated radii, got {text!r}")
    return tuple(_positive_radius("--eps-grid", p, zero=True) for p in parts)


def parse_attack(text: str) -> PGD | APGD:
    """`"pgd(steps=20, restarts=2)"`, `"apgd"` -> the attack options; a usage error for an
    unknown attack, option or value.

    >>> parse_attack("pgd(steps=20,restarts=2)")
    PGD(steps=20, restarts=2, step_size=2.5, random_start=True, surrogate_beta=None)
    """
    m = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*", str(text))
    if m is None:
        raise UsageError(f"--attack must look like pgd(steps=20, restarts=2), got {text!r}")
    name, body = m.group(1).lower(), m.group(2)
    kinds: dict[str, type[PGD] | type[APGD]] = {"pgd": PGD, "apgd": APGD}
    if name not in kinds:
        raise UsageError(f"unknown attack '{name}' in --attack; known attacks: pgd, apgd")
    kind = kinds[name]
    fields = {f.name: f for f in dataclasses.fields(kind)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in (body or "").split(","))):
        key, sep, raw = (v.strip() for v in item.partition("="))
        if not sep or key not in fields:
            known = ", ".join(fields)
            raise UsageError(f"--attack: {name} takes {known}; got {item!r}")
        kwargs[key] = _attack_value(name, key, raw)
    try:
        return kind(**kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(f"--attack: {err}") from None


def _attack_value(name: str, key: str, raw: str) -> Any:
    if key in ("steps", "restarts"):
        if not re.fullmatch(r"\d+", raw):
            raise UsageError(f"--attack: {name} {key} must be a whole number, got {raw!r}")
        return int(raw)
    if key == "random_start":
        if raw.lower() not in ("true", "false"):
            raise UsageError(f"--attack: {name} random_start must be true or false, got {raw!r}")
        return raw.lower() == "true"
    if key == "surrogate_beta" and raw.lower() == "none":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"--attack: {name} {key} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"--attack: {name} {key} must be finite, got {raw!r}")
    return value


# -- output --------------------------------------------------------------------------------------


def show_attack(attack: PGD | APGD) -> str:
    """`apgd(steps=50, restarts=3)`: the kind, steps and restarts, and options off default.

    >>> show_attack(APGD(steps=50, restarts=3, surrogate_beta=10.0))
    'apgd(steps=50, restarts=3, surrogate_beta=10.0)'
    """
    default = type(attack)()
    shown = []
    for f in dataclasses.fields(attack):
        value = getattr(attack, f.name)
        if f.name in ("steps", "restarts") or value != getattr(default, f.name):
            shown.append(f"{f.name}={value}")
    return f"{type(attack).__name__.lower()}({', '.join(shown)})"


def _num(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _to_json(result: EvalResult, setup: Any, data: str, plots: Sequence[str]) -> dict[str, Any]:
    ex, ara = result.explanation, result.robustness
    return {
        **setup.record(),
        "data": data,
        "split": result.split,
        "n": result.n,
        "seed": result.seed,
        "clean_accuracy": result.clean_accuracy,
        "attack": result.attack,
        "random_points": result.random_attack,
        "properties": {
            p.name: {"accuracy": p.accuracy, "security": p.security, "n": p.n, "attack": p.attack}
            for p in result.properties.values()
        },
        "skipped": dict(result.skipped),
        "security_vs_eps": {
            "eps": list(result.eps_grid),
            "properties": {k: list(v) for k, v in result.security_curve.items()},
            "accuracy": {k: list(v) for k, v in result.accuracy_curve.items()},
        },
        "explanation_manipulation": {k: dict(v) for k, v in result.manipulation.items()},
        "explanations": None
        if ex is None
        else {
            "attribution": "saliency of the true label",
            "radius": ex.radius,
            "perturbations": ex.perturbations,
            "n": ex.n,
            "max_sensitivity": _num(ex.max_sensitivity),
            "avg_sensitivity": _num(ex.avg_sensitivity),
            "local_lipschitz_estimate": _num(ex.local_lipschitz_estimate),
            "alignment": _num(ex.alignment),
        },
        "accuracy_robustness": None
        if ara is None
        else {
            "area": ara.area,
            "distance": "rmse",
            "attack": show_attack(ARA_ATTACK),
            "bisections": ARA_BISECTIONS,
            "max_rmse": ara.max_rmse,
            "num_classes": ara.num_classes,
            "n": ara.n,
            "not_broken": ara.not_broken,
            "median_distance": ara.median,
            "distances": list(ara.distances),
        },
        "paper_metrics": None if result.papers is None else paper_metrics.to_json(result.papers),
        "plots": list(plots),
    }


def _plots(
    folder,
    run_path,
    spec,
    x,
    y,
    predicted,
    model,
    grid,
    curve,
    robustness,
    grid_points,
    clean,
    accuracy_curve=None,
) -> list[Path]:
    from propdsl import explain, plots

    written: list[Path] = []
    rows = runs.read_metrics(run_path)
    if rows:
        written.append(plots.training_curves(rows, folder / "training_curves.png"))
    if curve:
        nominal = float(spec.params["eps"]) if "eps" in spec.params else None
        written.append(
            plots.security_curve(
                grid,
                curve,
                folder / "security_vs_eps.png",
                nominal=nominal,
                clean=clean,
                accuracy=accuracy_curve,
            )
        )
    if robustness is not None:
        written.append(
            plots.robustness_curve(
                robustness.distances,
                robustness.num_classes,
                robustness.area,
                folder / "accuracy_robustness.png",
            )
        )
    if plots.is_image(tuple(x.shape[1:])):
        k = min(GRID_SAMPLES, x.shape[0])
        xs, ys = x[:k], y[:k]
        sal = explain.saliency(model, xs, ys, create_graph=False)
        name, points, holds = _grid_choice(grid_points, curve)
        pts, point_pred = None, None
        if points is not None:
            pts = points[:k]
            with torch.no_grad():
                point_pred = model(pts).argmax(1)
        written.append(
            plots.sample_grid(
                xs,
                ys,
                predicted[:k],
                sal,
                folder / "samples.png",
                points=pts,
                point_pred=point_pred,
                holds=None if holds is None else holds[:k],
                title=f"the strong attack's points for {name}" if name else None,
            )
        )
    return written


def _grid_choice(grid_points, curve) -> tuple[str | None, Tensor | None, Tensor | None]:
    for name in [*curve, *grid_points]:
        if name in grid_points:
            var, pts, holds = grid_points[name]
            return f"{name} ({var})", pts, holds
    return None, None, None


def _fmt(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if math.isinf(v):
        return "inf"
    return f"{v:.{digits}f}"


def render_table(result: EvalResult) -> str:
    """The evaluation as plain text: clean accuracy, then one row per property with its
    constraint accuracy, constraint security and sample count, then the security curve, the
    explanation metrics and the accuracy-robustness area. No brackets, so rich prints it as is
    (an example is in docs/evaluation.md).
    """
    lines = [f"run {result.run}  split {result.split}  samples {result.n}  seed {result.seed}"]
    if result.header:
        lines += result.header.splitlines()
    else:
        lines.append(f"checkpoint {result.checkpoint}  params: {show_params(result.params)}")
    lines += [f"clean accuracy  {_fmt(result.clean_accuracy)}", ""]
    heads = ("property", "constraint accuracy", "constraint security", "n")
    names = list(result.properties)
    w = max([len(heads[0]), *(len(n) for n in names)])
    lines.append(f"{heads[0]:<{w}}  {heads[1]:>19}  {heads[2]:>19}  {heads[3]:>6}")
    lines.append("-" * (w + 2 + 19 + 2 + 19 + 2 + 6))
    for p in result.properties.values():
        lines.append(f"{p.name:<{w}}  {_fmt(p.accuracy):>19}  {_fmt(p.security):>19}  {p.n:>6}")
    for name, why in result.skipped.items():
        lines.append(f"{name:<{w}}  skipped: {why}")
    lines.append("")
    lines.append("constraint accuracy: holds at a uniformly random point of each region")
    lines.append(f"constraint security: holds at the point of {result.attack}")
    for other in sorted({p.attack for p in result.properties.values()} - {result.attack}):
        users = [p.name for p in result.properties.values() if p.attack == other]
        lines.append(f"  with {other} for {', '.join(users)}")
    if result.security_curve:
        lines.append("")
        cols = [f"{e:g}" for e in result.eps_grid]
        cw = max(6, *(len(c) for c in cols))
        title = "security at eps"
        w2 = max(len(title), *(len(n) for n in result.security_curve))
        lines.append(f"{title:<{w2}}  " + "  ".join(f"{c:>{cw}}" for c in cols))
        for name, values in result.security_curve.items():
            lines.append(f"{name:<{w2}}  " + "  ".join(f"{_fmt(v, 3):>{cw}}" for v in values))
        if result.accuracy_curve:
            title = "accuracy at eps"
            w3 = max(len(title), *(len(n) for n in result.accuracy_curve))
            lines.append(f"{title:<{w3}}  " + "  ".join(f"{c:>{cw}}" for c in cols))
            for name, values in result.accuracy_curve.items():
                lines.append(f"{name:<{w3}}  " + "  ".join(f"{_fmt(v, 3):>{cw}}" for v in values))
    ex = result.explanation
    if ex is not None:
        lines.append("")
        lines.append(
            f"saliency robustness, L-inf radius {ex.radius:g}, {ex.perturbations} draws: "
            f"alignment {_fmt(ex.alignment)}"
        )
        lines.append(
            f"  max sensitivity {_fmt(ex.max_sensitivity)}  "
            f"avg sensitivity {_fmt(ex.avg_sensitivity)}  "
            f"local Lipschitz {_fmt(ex.local_lipschitz_estimate)}"
        )
    lines += manipulation_lines(result.manipulation)
    ara = result.robustness
    if ara is not None:
        lines.append(
            f"accuracy-robustness area {_fmt(ara.area, 5)} (RMSE; median distance "
            f"{_fmt(ara.median)}; {ara.not_broken} not broken within RMSE {ara.max_rmse:g})"
        )
    if result.papers is not None:
        lines.append("")
        lines += paper_metrics.table_lines(result.papers)
    files = ", ".join([result.json_path.name, *(p.name for p in result.plots)])
    lines.append("")
    lines.append(f"wrote {result.json_path.parent}: {files}")
    if result.results is not None:
        lines.append(f"  and {result.run / EVAL_JSON}, a copy of this eval.json (the latest)")
    return "\n".join(lines)
