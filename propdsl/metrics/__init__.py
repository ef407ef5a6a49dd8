"""Metrics named after papers, each exactly that paper's definition (docs/evaluation.md):

* `propdsl.metrics.etmann`: Etmann et al. (2019)'s alignment, robustness `rho` (by attack) and
  linearised robustness `rho~` (closed form);
* `propdsl.metrics.woods`: Woods et al. (2019)'s attack ARA and BTR ARA, adversarial
  explanations;
* `propdsl.metrics.landscape`: input loss landscapes of the cross-entropy and an explanation
  loss, and flatness (the input Hessian's top eigenvalue), for Chen et al. (2024);
* `propdsl.metrics.search`: the bisection over the radius behind `rho` and the ARA.
"""

from __future__ import annotations

from propdsl.metrics.etmann import (
    EtmannMetrics,
    alignment,
    etmann_metrics,
    linearized_robustness,
    rank_correlation,
    robustness,
)
from propdsl.metrics.landscape import (
    Landscape,
    ce_loss,
    directions,
    explanation_loss,
    loss_landscape,
    top_hessian_eigenvalue,
)
from propdsl.metrics.search import Criterion, Distance, MinPerturbation, min_perturbation
from propdsl.metrics.woods import (
    AdversarialExplanations,
    WoodsARA,
    accuracy_robustness_area,
    adversarial_explanations,
    woods_ara,
)

__all__ = [
    "AdversarialExplanations",
    "Criterion",
    "Distance",
    "EtmannMetrics",
    "Landscape",
    "MinPerturbation",
    "WoodsARA",
    "accuracy_robustness_area",
    "adversarial_explanations",
    "alignment",
    "ce_loss",
    "directions",
    "etmann_metrics",
    "explanation_loss",
    "linearized_robustness",
    "loss_landscape",
    "min_perturbation",
    "rank_correlation",
    "robustness",
    "top_hessian_eigenvalue",
    "woods_ara",
]
