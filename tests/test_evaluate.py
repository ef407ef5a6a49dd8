"""propdsl.evaluate and propdsl.plots: numbers against hand computations on tiny seeded runs."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

import propdsl
from propdsl import runs
from propdsl.data import load_dataset
from propdsl.errors import UsageError
from propdsl.evaluate import (
    EVAL_JSON,
    accuracy_robustness_area,
    evaluate,
    min_adversarial_rmse,
    render_table,
    show_attack,
)
from propdsl.loss.attacks import APGD, PGD, VanishingGradientWarning

PNG = b"\x89PNG\r\n\x1a\n"
TEST_LIMIT = 40

# A linear model (mlp without hidden layers): its saliency is a weight row, constant in x.
LINEAR_SPEC = f"""\
network f : Tensor[1, 8, 8] -> Tensor[10]
param eps : Real = 0.05
param delta : Real = 1.0
param tau : Real = 0.9

let pixels = box(0, 1)

property robust(x, y) =
  forall x' in ball(x, eps, inf) & pixels: argmax(f(x')) == y

property bounded(x) =
  forall x' in ball(x, eps, inf) & pixels: norm(f(x') - f(x), inf) <= delta

property stable(x, y) =
  forall x' in ball(x, eps, inf) & pixels: cosine(saliency(f, x', y), saliency(f, x, y)) >= tau

property correct(x, y) = argmax(f(x)) == y

train f on digits(split = "train", limit = 300) {{
  model     = mlp(hidden = [])
  epochs    = 2
  batch     = 50
  optimizer = adam(lr = 0.05)
  loss      = cross_entropy
}}

verify f on digits(split = "test", limit = {TEST_LIMIT}) {{
  properties = [robust, bounded, stable, correct]
  method     = crown
}}
"""

ATTACK = APGD(steps=20, restarts=2)


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory):
    from propdsl.train import TrainOptions, train

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("run")
    spec_path = folder / "linear.prop"
    spec_path.write_text(LINEAR_SPEC, encoding="utf-8")
    spec = propdsl.load(str(spec_path))
    out = folder / "run"
    with warnings.catch_warnings():
        # `stable` on a linear model: the saliency is constant, the attack has nothing to climb.
        warnings.simplefilter("ignore", VanishingGradientWarning)
        train(spec, TrainOptions(out=out, threads=1, quiet=True, eval_samples=32))
        result = evaluate(spec, out, attack=ATTACK, device="cpu", seed=0)
    return spec, out, result


def _data_and_model(run):
    ds = load_dataset("digits", split="test", limit=TEST_LIMIT, seed=0)
    model = runs.Run.open(run).load_model("best")
    return ds.x, ds.y, model


def test_clean_accuracy_by_hand(linear_run):
    _, run, result = linear_run
    x, y, model = _data_and_model(run)
    with torch.no_grad():
        hand = (model(x).argmax(1) == y).float().mean().item()
    assert result.n == TEST_LIMIT  # the verify block's source (limit 40), not the train block's
    assert result.clean_accuracy == pytest.approx(hand)
    assert 0.3 < hand < 1.0  # trained, and not trivially robust


def test_property_without_quantifier_is_clean_accuracy(linear_run):
    _, _, result = linear_run
    correct = result.properties["correct"]
    assert correct.accuracy == correct.security == pytest.approx(result.clean_accuracy)
    assert correct.n == TEST_LIMIT


def test_security_at_eps_zero_is_the_fraction_correct(linear_run):
    _, run, result = linear_run
    x, y, model = _data_and_model(run)
    with torch.no_grad():
        hand = (model(x).argmax(1) == y).float().mean().item()
    assert result.eps_grid[0] == 0.0
    assert result.security_curve["robust"][0] == pytest.approx(hand)


def test_security_is_non_increasing_in_eps(linear_run):
    spec, _, result = linear_run
    curve = result.security_curve["robust"]
    assert len(curve) == len(result.eps_grid) == 6
    assert all(b <= a for a, b in zip(curve, curve[1:], strict=False))
    assert curve[-1] < curve[0]
    # The spec's own radius reuses the property's security.
    at = result.eps_grid.index(spec.params["eps"])
    assert curve[at] == result.properties["robust"].security
    # Only the classification-robustness-like property is swept.
    assert set(result.security_curve) == {"robust"}


def test_security_below_random_point_accuracy_for_robustness(linear_run):
    _, _, result = linear_run
    robust = result.properties["robust"]
    # A strong attack on a linear model breaks every sample that a random point breaks (not a
    # theorem in general: the attack climbs a margin, not the truth), and every misclassified one.
    assert robust.security <= robust.accuracy
    assert robust.security <= result.clean_accuracy
    assert robust.attack == show_attack(ATTACK) == result.attack


def test_eval_json(linear_run):
    _, run, result = linear_run
    data = json.loads((run / EVAL_JSON).read_text())
    assert result.json_path == run / EVAL_JSON
    assert data["split"] == "test" and data["n"] == TEST_LIMIT and data["data"] == "digits"
    assert data["attack"] == "apgd(steps=20, restarts=2)"
    assert data["clean_accuracy"] == pytest.approx(result.clean_accuracy)
    assert set(data["properties"]) == {"robust", "bounded", "stable", "correct"}
    for name, p in result.properties.items():
        assert data["properties"][name] == {
            "accuracy": pytest.approx(p.accuracy),
            "security": pytest.approx(p.security),
            "n": TEST_LIMIT,
            "attack": p.attack,
        }
    assert data["security_vs_eps"]["eps"] == list(result.eps_grid)
    assert data["security_vs_eps"]["properties"]["robust"] == pytest.approx(
        list(result.security_curve["robust"])
    )
    ara = data["accuracy_robustness"]
    assert ara["area"] == pytest.approx(result.robustness.area)
    assert len(ara["distances"]) == TEST_LIMIT
    assert data["explanations"]["max_sensitivity"] == 0.0
    assert sorted(data["plots"]) == sorted(p.name for p in result.plots)


def test_png_files_are_valid(linear_run):
    _, run, result = linear_run
    names = {p.name for p in result.plots}
    assert names == {
        "training_curves.png",
        "security_vs_eps.png",
        "accuracy_robustness.png",
        "samples.png",
    }
    for path in result.plots:
        assert path.parent == run
        head = path.read_bytes()[:24]
        assert head[:8] == PNG and head[12:16] == b"IHDR"
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        assert width > 100 and height > 100


def test_explanation_metrics_of_a_linear_model(linear_run):
    _, run, result = linear_run
    ex = result.explanation
    # The saliency of a linear model is the label's weight row wherever x is: it never moves.
    assert ex.max_sensitivity == ex.avg_sensitivity == ex.local_lipschitz_estimate == 0.0
    assert ex.radius == 0.05 and ex.n == TEST_LIMIT
    # Alignment |<x, w_c>| / ||w_c||, c the predicted class, by hand.
    x, _, model = _data_and_model(run)
    weight = model[-1].weight.detach()
    with torch.no_grad():
        c = model(x).argmax(1)
    w = weight[c]
    hand = ((x.flatten(1) * w).sum(1).abs() / w.norm(dim=1)).mean().item()
    assert ex.alignment == pytest.approx(hand, rel=1e-5)


def test_accuracy_robustness_of_the_run(linear_run):
    _, run, result = linear_run
    ara = result.robustness
    x, y, model = _data_and_model(run)
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).tolist()
    d = ara.distances
    assert [v == 0.0 for v in d] == wrong  # 0 exactly for the misclassified samples
    assert ara.area == pytest.approx(accuracy_robustness_area(d, 10))
    assert 0 < ara.area < result.clean_accuracy


def test_render_table(linear_run):
    _, _, result = linear_run
    table = render_table(result)
    lines = table.splitlines()
    assert f"clean accuracy  {result.clean_accuracy:.4f}" in lines
    header = next(line for line in lines if line.startswith("property"))
    assert "constraint accuracy" in header and "constraint security" in header
    row = next(line for line in lines if line.startswith("robust "))
    robust = result.properties["robust"]
    assert row.split() == ["robust", f"{robust.accuracy:.4f}", f"{robust.security:.4f}", "40"]
    assert "security at eps" in table and "accuracy-robustness area" in table
    assert "[" not in table  # rich would read brackets as markup


# -- pieces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("distances", "classes", "area"),
    [
        ([0.0, 0.1, 0.3], 2, 0.1 * (2 / 3 - 1 / 2)),  # A = 2/3 on [0, 0.1), 1/3 < 1/2 after
        ([0.2, 0.2, 0.2, 0.2], 10, 0.2 * (1 - 0.1)),
        ([0.0, 0.0], 10, 0.0),
        ([0.4, 0.1], 4, 0.1 * (1 - 0.25) + 0.3 * (0.5 - 0.25)),
    ],
)
def test_accuracy_robustness_area_by_hand(distances, classes, area):
    assert accuracy_robustness_area(distances, classes) == pytest.approx(area)


def test_min_adversarial_rmse_of_a_two_class_linear_model():
    torch.manual_seed(0)
    d = 16
    model = torch.nn.Linear(d, 2)
    normal = (model.weight[0] - model.weight[1]).detach()  # the margin's gradient
    unit = normal / normal.norm()
    with torch.no_grad():  # the decision boundary through the centre of the box
        model.bias[0] -= model(torch.full((1, d), 0.5))[0].diff().neg().item()
    # Points at L2 distances 0.05 to 0.2 from the boundary, near the centre of the box: the box
    # never binds, and the exact minimal perturbation is the distance to the hyperplane.
    side = torch.where(torch.rand(8) < 0.5, -1.0, 1.0)
    x = 0.5 + (side * (0.05 + 0.15 * torch.rand(8))).reshape(-1, 1) * unit
    margin = (model(x)[:, 0] - model(x)[:, 1]).detach()
    y = torch.where(margin > 0, 0, 1)
    y[:2] = 1 - y[:2]  # two misclassified samples
    found = min_adversarial_rmse(
        model, x, y, attack=PGD(steps=10), generator=torch.Generator().manual_seed(0)
    )
    exact = margin.abs() / normal.norm() / math.sqrt(d)  # RMSE distance to the hyperplane
    assert found[:2].tolist() == [0.0, 0.0]
    assert torch.allclose(found[2:], exact[2:].double(), atol=1e-3)
    assert bool((found[2:] >= exact[2:].double() - 1e-6).all())  # never below the true minimum


def test_show_attack():
    assert show_attack(PGD(steps=0)) == "pgd(steps=0, restarts=1)"
    assert show_attack(APGD(steps=50, restarts=3)) == "apgd(steps=50, restarts=3)"


RELU_SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]
param eps : Real = 0.05
param tau : Real = 0.9
property robust(x, y) = forall x' in ball(x, eps, inf) & box(0, 1): argmax(f(x')) == y
property stable(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1): cosine(saliency(f, x', y), saliency(f, x, y)) >= tau
train f on digits(split = "train") {
  model = mlp(hidden = [6])
  loss  = cross_entropy
}
"""


@pytest.fixture
def relu_run(tmp_path):
    """A run folder made by hand: config.json, spec.prop and a checkpoint (no metrics)."""
    from propdsl.models import build_model

    run = tmp_path / "relu"
    run.mkdir()
    (run / runs.SPEC).write_text(RELU_SPEC, encoding="utf-8")
    model_conf = {
        "name": "mlp",
        "kwargs": {"hidden": [6]},
        "user": None,
        "input_shape": [1, 8, 8],
        "num_classes": 10,
    }
    runs.write_json(run / runs.CONFIG, {"seed": 3, "model": model_conf})
    model = build_model("mlp", (1, 8, 8), 10, hidden=[6], seed=0)
    runs.save_checkpoint(run, "best", model, {"epoch": 0})
    return propdsl.load(str(run / runs.SPEC)), run


def test_explanation_property_on_relu_gets_the_surrogate(relu_run):
    spec, run = relu_run
    with warnings.catch_warnings():
        warnings.simplefilter("error", VanishingGradientWarning)
        result = evaluate(
            spec, run, samples=6, attack=APGD(steps=3), eps_grid=(), plots=False, device="cpu"
        )
    assert result.seed == 3  # the run's seed by default
    assert result.n == 6 and result.plots == () and result.security_curve == {}
    assert result.properties["stable"].attack == "apgd(steps=3, restarts=1, surrogate_beta=10.0)"
    assert result.properties["robust"].attack == "apgd(steps=3, restarts=1)"
    assert result.skipped == {}
    data = json.loads((run / EVAL_JSON).read_text())
    assert data["skipped"] == {} and data["plots"] == []


def test_usage_errors(relu_run):
    spec, run = relu_run
    with pytest.raises(UsageError, match="samples"):
        evaluate(spec, run, samples=0, plots=False)
    with pytest.raises(UsageError, match="no such run folder"):
        evaluate(spec, run / "missing", plots=False)
    with pytest.raises(UsageError, match="nope"):
        evaluate(
            spec,
            run,
            samples=2,
            attack=APGD(steps=1),
            plots=False,
            curve_properties=["nope"],
            device="cpu",
        )
