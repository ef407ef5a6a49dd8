"""The paper metrics `propdsl eval --metrics ...` adds: which exist, what they compute on the
evaluated samples, and how they are written (eval.json, the table, PNGs). Each is off by
default: `eval` stays fast unless asked.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from propdsl.errors import UsageError
from propdsl.metrics.etmann import EtmannMetrics, etmann_metrics
from propdsl.metrics.landscape import Landscape, loss_landscape, top_hessian_eigenvalue
from propdsl.metrics.search import SEARCH_ATTACK, Criterion
from propdsl.metrics.woods import (
    EXPLANATION_ATTACK,
    AdversarialExplanations,
    WoodsARA,
    adversarial_explanations,
    woods_ara,
)

__all__ = [
    "ADV_EXPLANATION_RMSE",
    "ADV_EXPLANATION_SAMPLES",
    "FLATNESS_ITERATIONS",
    "LANDSCAPE_POINTS",
    "LANDSCAPE_SAMPLES",
    "PaperMetric",
    "PaperResults",
    "compute",
    "parse_metrics",
    "plots",
    "table_lines",
    "to_json",
]

LANDSCAPE_SAMPLES = 32
LANDSCAPE_POINTS = 21  # offsets per axis: 21 points per curve, a 21 x 21 surface
FLATNESS_ITERATIONS = 20
ADV_EXPLANATION_SAMPLES = 4
ADV_EXPLANATION_RMSE = 0.1  # Woods et al.'s rho
SEARCH_BISECTIONS = 12
MAX_RMSE = 1.0


class PaperMetric(enum.Enum):
    ETMANN = "etmann"  # alignment, rho, rho~, scatter
    ARA = "ara"  # Woods: attack ARA and BTR ARA
    LANDSCAPE = "landscape"  # CE and explanation loss landscapes
    FLATNESS = "flatness"  # top eigenvalue of the input Hessian of CE
    ADV_EXPLANATIONS = "adv-explanations"  # Woods: x + delta toward each class


def parse_metrics(value: str | Iterable[str | PaperMetric] | None) -> tuple[PaperMetric, ...]:
    """`"etmann,ara"` or names / members -> the metrics, in the enum's order, each once.

    >>> parse_metrics("ara, etmann")
    (<PaperMetric.ETMANN: 'etmann'>, <PaperMetric.ARA: 'ara'>)
    """
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    chosen: set[PaperMetric] = set()
    for item in items:
        if isinstance(item, PaperMetric):
            chosen.add(item)
            continue
        name = str(item).strip()
        if not name:
            raise UsageError(f"--metrics has an empty entry in {value!r}")
        try:
            chosen.add(PaperMetric(name))
        except ValueError:
            known = ", ".join(m.value for m in PaperMetric)
            raise UsageError(f"unknown metric '{name}'; known metrics: {known}") from None
    return tuple(m for m in PaperMetric if m in chosen)


@dataclass(frozen=True)
class PaperResults:
    """What the asked metrics computed (None: not asked, or skipped with a reason)."""

    etmann: EtmannMetrics | None = None
    ara: dict[str, WoodsARA] | None = None
    landscape: Landscape | None = None
    flatness: Tensor | None = None
    explanations: AdversarialExplanations | None = None
    skipped: tuple[tuple[str, str], ...] = ()
    landscape_radius: float = 0.0


def compute(
    metrics: Sequence[PaperMetric],
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    box: tuple[float, float] | None,
    image: bool,
    radius: float,
    attack_ara: WoodsARA | None,
    batch: int,
    seed: int,
    device: torch.device,
    start: Any = None,
) -> PaperResults:
    """Run the asked metrics on (x, y); `attack_ara` reuses eval's accuracy-robustness area
    (the same search with the argmax criterion) instead of running it twice; `start(stage)` is
    called before each metric (progress)."""

    def gen() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    out: dict[str, Any] = {}
    skipped: list[tuple[str, str]] = []
    for metric in metrics:
        if start is not None:
            start(f"metric {metric.value}")
        if metric is PaperMetric.ETMANN:
            out["etmann"] = etmann_metrics(
                model, x, bisections=SEARCH_BISECTIONS, batch=batch, generator=gen()
            )
        elif metric is PaperMetric.ARA:
            btr = woods_ara(
                model,
                x,
                y,
                Criterion.BTR,
                attack=SEARCH_ATTACK,
                max_rmse=MAX_RMSE,
                bisections=SEARCH_BISECTIONS,
                box=box,
                batch=batch,
                generator=gen(),
            )
            if attack_ara is None:
                attack_ara = woods_ara(
                    model, x, y, Criterion.ARGMAX, box=box, batch=batch, generator=gen()
                )
            out["ara"] = {"attack": attack_ara, "btr": btr}
        elif metric is PaperMetric.LANDSCAPE:
            k = min(LANDSCAPE_SAMPLES, x.shape[0])
            out["landscape"] = loss_landscape(
                model, x[:k], y[:k], radius=radius, points=LANDSCAPE_POINTS, generator=gen()
            )
        elif metric is PaperMetric.FLATNESS:
            parts = [
                top_hessian_eigenvalue(
                    model,
                    x[i : i + batch],
                    y[i : i + batch],
                    iterations=FLATNESS_ITERATIONS,
                    generator=gen(),
                )
                .double()
                .cpu()
                for i in range(0, x.shape[0], batch)
            ]
            out["flatness"] = torch.cat(parts)
        elif metric is PaperMetric.ADV_EXPLANATIONS:
            if not image:
                skipped.append((metric.value, "the data are not images"))
                continue
            k = min(ADV_EXPLANATION_SAMPLES, x.shape[0])
            out["explanations"] = adversarial_explanations(
                model,
                x[:k],
                radius=ADV_EXPLANATION_RMSE,
                attack=EXPLANATION_ATTACK,
                box=box,
                generator=gen(),
            )
    return PaperResults(**out, skipped=tuple(skipped), landscape_radius=float(radius))


def _num(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def _floats(t: Tensor) -> list[float | None]:
    return [_num(float(v)) for v in t.flatten()]


def to_json(r: PaperResults) -> dict[str, Any]:
    """The `paper_metrics` object of eval.json (see docs/evaluation.md)."""
    data: dict[str, Any] = {}
    if r.etmann is not None:
        e = r.etmann
        data["etmann"] = {
            "definition": "Etmann et al. 2019; i* the predicted class",
            "rho": "L2, from the predicted class, no box; by attack: an upper bound",
            "attack": _show(SEARCH_ATTACK),
            "bisections": SEARCH_BISECTIONS,
            "max_l2": e.max_l2,
            **{k: _num(v) if isinstance(v, float) else v for k, v in e.summary().items()},
            "alignment_per_sample": _floats(e.alignment),
            "rho_per_sample": _floats(e.rho),
            "rho_found_per_sample": [bool(v) for v in e.rho_found],
            "rho_tilde_per_sample": _floats(e.rho_tilde),
            "bound_per_sample": _floats(e.bound),
        }
    if r.ara is not None:
        data["ara"] = {
            name: {
                "criterion": a.criterion.value,
                "area": a.area,
                "distance": "rmse",
                "max_rmse": a.max_rmse,
                "num_classes": a.num_classes,
                "n": a.n,
                "not_broken": a.not_broken,
                "median_distance": _num(a.median),
                "distances": list(a.distances),
            }
            for name, a in r.ara.items()
        }
    if r.landscape is not None:
        land = r.landscape
        data["landscape"] = {
            "n": land.n,
            "radius_linf": r.landscape_radius,
            "steps": _floats(land.steps),
            "ce_adversarial": _floats(land.ce_adversarial),
            "ce_random": _floats(land.ce_random),
            "explanation_adversarial": _floats(land.explanation_adversarial),
            "explanation_random": _floats(land.explanation_random),
            "ce_surface": None
            if land.ce_surface is None
            else [_floats(row) for row in land.ce_surface],
            "explanation_surface": None
            if land.explanation_surface is None
            else [_floats(row) for row in land.explanation_surface],
        }
    if r.flatness is not None:
        f = r.flatness
        data["flatness"] = {
            "definition": "top eigenvalue of the input Hessian of the CE loss (power iteration)",
            "iterations": FLATNESS_ITERATIONS,
            "mean": _num(float(f.mean())),
            "median": _num(float(f.median())),
            "per_sample": _floats(f),
        }
    if r.explanations is not None:
        ex = r.explanations
        data["adversarial_explanations"] = {
            "rmse": ex.radius,
            "attack": _show(EXPLANATION_ATTACK),
            "samples": int(ex.points.shape[0]),
            "targets": list(ex.targets),
            "probability": [_floats(row) for row in ex.probability],
            "reached": [[bool(v) for v in row] for row in ex.reached],
            "rmse_per_point": [_floats(row) for row in ex.rmse],
        }
    if r.skipped:
        data["skipped"] = dict(r.skipped)
    return data


def _show(attack: Any) -> str:
    return f"{type(attack).__name__.lower()}(steps={attack.steps}, restarts={attack.restarts})"


def _fmt(v: float | None, digits: int = 4) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def table_lines(r: PaperResults) -> list[str]:
    """The lines `render_table` prints for the paper metrics."""
    lines: list[str] = []
    if r.etmann is not None:
        s = r.etmann.summary()
        lines.append(
            f"Etmann et al. 2019, {s['n']} samples: alignment {_fmt(s['mean_alignment'])}  "
            f"rho {_fmt(s['mean_rho'])} (L2, attack: upper bound; {s['rho_found']} found)  "
            f"rho~ {_fmt(s['mean_rho_tilde'])}"
        )
        lines.append(
            f"  Spearman(alignment, rho) {_fmt(s['spearman_alignment_rho'], 3)}  "
            f"Spearman(alignment, rho~) {_fmt(s['spearman_alignment_rho_tilde'], 3)}  "
            f"rho~ <= alpha + |beta|/||g|| for {_fmt(s['rho_tilde_within_bound'], 3)}"
        )
    if r.ara is not None:
        a, b = r.ara["attack"], r.ara["btr"]
        lines.append(
            f"Woods et al. 2019 ARA (RMSE): attack {_fmt(a.area, 5)}  BTR {_fmt(b.area, 5)}  "
            f"(median distance {_fmt(a.median)} / {_fmt(b.median)})"
        )
    if r.explanations is not None:
        ex = r.explanations
        lines.append(
            f"adversarial explanations at RMSE {ex.radius:g}: {ex.points.shape[0]} samples x "
            f"{len(ex.targets)} targets, target reached {float(ex.reached.float().mean()):.3f}, "
            f"mean p_t {float(ex.probability.mean()):.3f}"
        )
    if r.landscape is not None:
        land = r.landscape
        lines.append(
            f"landscape, {land.n} samples, L-inf offset {r.landscape_radius:g}: CE "
            f"{_fmt(float(land.ce_adversarial[len(land.steps) // 2]))} at x, "
            f"{_fmt(float(land.ce_adversarial[-1]))} adversarial, "
            f"{_fmt(float(land.ce_random[-1]))} random; explanation loss "
            f"{_fmt(float(land.explanation_adversarial[-1]))} adversarial, "
            f"{_fmt(float(land.explanation_random[-1]))} random"
        )
    if r.flatness is not None:
        lines.append(
            f"flatness (top input-Hessian eigenvalue of CE): mean {_fmt(float(r.flatness.mean()))}"
            f"  median {_fmt(float(r.flatness.median()))}"
        )
    for name, why in r.skipped:
        lines.append(f"{name} skipped: {why}")
    return lines


def plots(r: PaperResults, folder: Path, x: Tensor, y: Tensor) -> list[Path]:
    """The PNGs of the computed metrics, written into `folder`."""
    from propdsl import plots as P

    written: list[Path] = []
    if r.etmann is not None:
        e = r.etmann
        written.append(
            P.alignment_scatter(
                e.alignment.tolist(),
                e.rho.tolist(),
                e.rho_tilde.tolist(),
                folder / "etmann_alignment_robustness.png",
                found=e.rho_found.tolist(),
            )
        )
    if r.ara is not None:
        written.append(
            P.ara_curves(
                {k: a.distances for k, a in r.ara.items()},
                r.ara["btr"].num_classes,
                {k: a.area for k, a in r.ara.items()},
                folder / "woods_ara.png",
            )
        )
    if r.explanations is not None:
        ex = r.explanations
        k = ex.points.shape[0]
        written.append(
            P.adversarial_explanation_grid(
                x[:k],
                [int(v) for v in y[:k]],
                ex.points,
                ex.targets,
                ex.probability,
                folder / "adversarial_explanations.png",
                radius=ex.radius,
            )
        )
    if r.landscape is not None:
        written.append(P.landscape_curves(r.landscape, folder / "landscape_1d.png"))
        if r.landscape.ce_surface is not None:
            written.append(P.landscape_surfaces(r.landscape, folder / "landscape_2d.png"))
    if r.flatness is not None:
        written.append(P.flatness_histogram(r.flatness.tolist(), folder / "flatness.png"))
    return written
