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
    EVAL_DIR,
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
    # The results of this setting in their own folder; RUN/eval.json: a copy of the latest.
    assert result.results.parent == run / EVAL_DIR
    assert result.json_path == result.results / EVAL_JSON
    data = json.loads(result.json_path.read_text())
    assert json.loads((run / EVAL_JSON).read_text()) == data
    assert data["results"] == f"eval/{result.results.name}"
    assert result.results.name.startswith("test-n40-best-")
    best = json.loads((run / "best.json").read_text())["epoch"]
    assert data["checkpoint"] == "best" and data["checkpoint_epoch"] == best
    assert data["params"] == {"eps": 0.05, "delta": 1.0, "tau": 0.9}
    assert set(data["param_sources"].values()) == {"spec"}
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
        assert path.parent == result.results
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


# -- a run opened for a spec: fit, params, checkpoints, result folders (issue 13) ----------------

TABULAR_SPEC = """\
network f : Tensor[30] -> Tensor[2]
param eps : Real = 0.02
property robust(x, y) = forall x' in ball(x, eps, inf): argmax(f(x')) == y
train f on breast_cancer(split = "train") {
  model = mlp(hidden = [8])
  loss  = cross_entropy
}
"""

# eps, and a param whose default depends on it; `wide` reads delta.
PARAM_SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]
param eps : Real = 0.05
param delta : Real = 2 * eps
param tau : Real = 0.9
property robust(x, y) = forall x' in ball(x, eps, inf) & box(0, 1): argmax(f(x')) == y
property wide(x, y) = forall x' in ball(x, delta, inf) & box(0, 1): argmax(f(x')) == y
train f on digits(split = "train") {
  model = mlp(hidden = [6])
  loss  = cross_entropy
}
"""

QUICK = {"attack": APGD(steps=2), "eps_grid": (), "device": "cpu"}


def _hand_made_run(tmp_path, text, params, *, best_seed=0, last_seed=None, epochs=(3, 5)):
    """A run folder of an mlp(hidden=[6]) on digits trained with `params`: config.json as
    `train` writes it (spec hash, params, seed 3), spec.prop, and a best (and a last)
    checkpoint with their epochs."""
    from propdsl.models import build_model

    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / runs.SPEC).write_text(text, encoding="utf-8")
    model_conf = {
        "name": "mlp",
        "kwargs": {"hidden": [6]},
        "user": None,
        "input_shape": [1, 8, 8],
        "num_classes": 10,
    }
    config = {
        "spec": "hand.prop",
        "spec_sha256": runs.spec_hash(text),
        "params": params,
        "seed": 3,
        "model": model_conf,
    }
    runs.write_json(run / runs.CONFIG, config)
    best = build_model("mlp", (1, 8, 8), 10, hidden=[6], seed=best_seed)
    runs.save_checkpoint(run, "best", best, {"epoch": epochs[0]})
    if last_seed is not None:
        last = build_model("mlp", (1, 8, 8), 10, hidden=[6], seed=last_seed)
        runs.save_checkpoint(run, "last", last, {"epoch": epochs[1]})
    return run


def test_a_spec_that_does_not_fit_the_run_is_a_usage_error_naming_both(relu_run, tmp_path):
    """A tabular spec on a run of 8x8 images: before, a RuntimeError inside conv/linear."""
    from propdsl.export import export_run
    from propdsl.verify.report import verify_run

    _, run = relu_run
    spec = propdsl.load(TABULAR_SPEC)
    wanted = r"Tensor\[30\] -> Tensor\[2\].*Tensor\[1, 8, 8\] -> Tensor\[10\]"
    with pytest.raises(UsageError, match=wanted):
        evaluate(spec, run, samples=2, plots=False, **QUICK)
    with pytest.raises(UsageError, match=wanted):
        verify_run(spec, run, samples=2)
    with pytest.raises(UsageError, match=wanted):
        export_run(spec, run, tmp_path / "out", samples=2)
    assert not (run / EVAL_DIR).exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_sample_counts_are_checked_everywhere(relu_run, tmp_path, bad):
    """`--samples -3` verified 356 samples (slicing) and 0 meant the default 100."""
    from propdsl.export import export_run
    from propdsl.verify.report import verify_run

    spec, run = relu_run
    with pytest.raises(UsageError, match="samples must be a positive whole number"):
        evaluate(spec, run, samples=bad, plots=False, **QUICK)
    with pytest.raises(UsageError, match="samples must be a positive whole number"):
        verify_run(spec, run, samples=bad)
    with pytest.raises(UsageError, match="samples must be a positive whole number"):
        export_run(spec, run, tmp_path / "out", samples=bad)
    with pytest.raises(UsageError, match="batch must be a positive whole number"):
        evaluate(spec, run, samples=2, batch=0, plots=False, **QUICK)


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan])
def test_timeouts_are_positive_and_finite(relu_run, tmp_path, bad):
    from propdsl.export import export_run
    from propdsl.verify.report import verify_run

    spec, run = relu_run
    with pytest.raises(UsageError, match="timeout must be a positive, finite number"):
        verify_run(spec, run, samples=2, timeout=bad)
    with pytest.raises(UsageError, match="timeout must be a positive, finite number"):
        export_run(spec, run, tmp_path / "out", samples=2, timeout=bad)


def test_the_runs_params_are_the_default(tmp_path):
    """A run trained with eps=0.08 is evaluated at 0.08 unless the caller says otherwise; a
    derived default (delta = 2 * eps) follows the eps in use."""
    from propdsl.results import open_run

    run = _hand_made_run(tmp_path, PARAM_SPEC, {"eps": 0.08, "delta": 0.16, "tau": 0.9})
    spec = propdsl.load(PARAM_SPEC)
    setup = open_run(spec, run)
    assert setup.spec.params == {"eps": 0.08, "delta": 0.16, "tau": 0.9}
    assert [(p.name, p.source) for p in setup.params] == [
        ("eps", "run"),
        ("delta", "spec"),
        ("tau", "spec"),
    ]
    assert "eps=0.08 (from the run), delta=0.16, tau=0.9" in setup.header()
    # An override wins, and delta follows it (it was not set at training, only derived).
    setup = open_run(spec.with_params(eps=0.2), run)
    assert setup.spec.params == {"eps": 0.2, "delta": 0.4, "tau": 0.9}
    assert setup.params[0].show() == "eps=0.2 (override; the run was trained with 0.08)"
    # A delta set at training (not 2 * eps) is the run's, whatever eps is asked for.
    run2 = _hand_made_run(tmp_path / "b", PARAM_SPEC, {"eps": 0.05, "delta": 0.3, "tau": 0.9})
    setup = open_run(spec.with_params(eps=0.2), run2)
    assert setup.spec.params == {"eps": 0.2, "delta": 0.3, "tau": 0.9}
    assert [p.source for p in setup.params] == ["override", "run", "spec"]


def test_eval_uses_the_runs_params_and_records_them(tmp_path):
    run = _hand_made_run(tmp_path, PARAM_SPEC, {"eps": 0.08, "delta": 0.16, "tau": 0.9})
    spec = propdsl.load(PARAM_SPEC)
    result = evaluate(spec, run, samples=4, plots=False, **QUICK)
    data = json.loads(result.json_path.read_text())
    assert data["params"]["eps"] == 0.08 and data["param_sources"]["eps"] == "run"
    assert "params: eps=0.08 (from the run)" in render_table(result)
    # The same evaluation by hand at eps 0.08: the same security of `robust`.
    by_hand = evaluate(
        spec.with_params(eps=0.08), run, samples=4, plots=False, seed=result.seed, **QUICK
    )
    assert by_hand.properties["robust"] == result.properties["robust"]


def test_results_are_kept_per_setting(tmp_path):
    """Another param, another checkpoint or another method: another folder; the same settings
    again: the same folder, replaced (and --no-plots leaves no PNG of another setting)."""
    from propdsl.verify.report import verify_run

    run = _hand_made_run(tmp_path, PARAM_SPEC, {"eps": 0.05, "delta": 0.1, "tau": 0.9}, last_seed=1)
    spec = propdsl.load(PARAM_SPEC)
    a = evaluate(spec, run, samples=4, plots=True, **QUICK)
    b = evaluate(spec.with_params(eps=0.1), run, samples=4, plots=False, **QUICK)
    c = evaluate(spec, run, samples=4, plots=False, checkpoint="last", **QUICK)
    names = sorted(p.name for p in (run / EVAL_DIR).iterdir())
    assert names == sorted([a.results.name, b.results.name, c.results.name])
    assert len(set(names)) == 3
    assert a.results.name.startswith("test-n4-best-")
    assert b.results.name.startswith("test-n4-best-eps=0.1-")
    assert c.results.name.startswith("test-n4-last-")
    assert {p.name for p in a.results.iterdir()} == {EVAL_JSON, *(p.name for p in a.plots)}
    assert {p.name for p in b.results.iterdir()} == {EVAL_JSON}  # no PNG of another setting
    # RUN/eval.json: the latest.
    assert json.loads((run / EVAL_JSON).read_text())["results"] == f"eval/{c.results.name}"
    # The same settings: the same folder, replaced with the same numbers; nothing left aside.
    again = evaluate(spec.with_params(eps=0.1), run, samples=4, plots=False, **QUICK)
    assert again.results == b.results and again.properties == b.properties
    # The spec's file name is no setting: the run's own spec.prop gives the same folder.
    own = propdsl.load(run / runs.SPEC).with_params(eps=0.1)
    assert evaluate(own, run, samples=4, plots=False, **QUICK).results == b.results
    assert sorted(p.name for p in (run / EVAL_DIR).iterdir()) == names
    # verify: one folder per method, each with its own verify.json.
    v1 = verify_run(spec, run, samples=4, method="ibp")
    v2 = verify_run(spec, run, samples=4, method="crown")
    assert v1.results != v2.results
    assert v1.results.name.startswith("ibp-test-n4-best-")
    assert json.loads(v1.json_path.read_text())["method"] == "ibp"
    assert json.loads(v2.json_path.read_text())["method"] == "crown"
    assert json.loads((run / "verify.json").read_text())["method"] == "crown"


def test_a_spec_other_than_the_runs_is_refused_unless_accepted(tmp_path):
    run = _hand_made_run(tmp_path, PARAM_SPEC, {"eps": 0.05, "delta": 0.1, "tau": 0.9})
    other = propdsl.load(PARAM_SPEC.replace("param tau : Real = 0.9", "param tau : Real = 0.8"))
    with pytest.raises(UsageError, match="is not the spec .* was trained with"):
        evaluate(other, run, samples=2, plots=False, **QUICK)
    result = evaluate(other, run, samples=2, plots=False, spec_differs_ok=True, **QUICK)
    assert f"-spec{runs.spec_hash(other.source.text)[:6]}-" in result.results.name
    assert "is not the spec" in render_table(result)
    assert json.loads(result.json_path.read_text())["spec_differs"] is True


def test_the_checkpoint_is_chosen_and_recorded(tmp_path):
    """`best` and `last` are different weights: the clean accuracy of each by hand."""
    run = _hand_made_run(tmp_path, PARAM_SPEC, {"eps": 0.05, "delta": 0.1, "tau": 0.9}, last_seed=7)
    spec = propdsl.load(PARAM_SPEC)
    ds = load_dataset("digits", split="test", seed=3)
    x, y = ds.x[:30], ds.y[:30]
    for tag, epoch in (("best", 3), ("last", 5)):
        model = runs.Run.open(run).build_model()
        runs.load_weights(run, tag, model)
        with torch.no_grad():
            hand = (model(x).argmax(1) == y).float().mean().item()
        result = evaluate(spec, run, samples=30, plots=False, checkpoint=tag, **QUICK)
        assert result.clean_accuracy == pytest.approx(hand)
        data = json.loads(result.json_path.read_text())
        assert data["checkpoint"] == tag and data["checkpoint_epoch"] == epoch
        assert f"checkpoint {tag} (epoch {epoch})" in render_table(result)
    with pytest.raises(UsageError, match="checkpoint must be best or last"):
        evaluate(spec, run, samples=2, plots=False, checkpoint="worst", **QUICK)


def test_best_falls_back_to_last_and_says_so(tmp_path):
    run = _hand_made_run(tmp_path, PARAM_SPEC, {"eps": 0.05, "delta": 0.1, "tau": 0.9}, last_seed=7)
    (run / "best.safetensors").unlink()
    spec = propdsl.load(PARAM_SPEC)
    result = evaluate(spec, run, samples=2, plots=False, **QUICK)
    assert result.checkpoint == "last" and "no best checkpoint" in render_table(result)
    (run / "last.safetensors").unlink()
    with pytest.raises(UsageError, match="no best checkpoint"):
        evaluate(spec, run, samples=2, plots=False, **QUICK)


def test_progress_reports_every_stage(relu_run):
    spec, run = relu_run
    calls = []
    evaluate(
        spec,
        run,
        samples=3,
        plots=False,
        attack=APGD(steps=1),
        eps_grid=(0.0, 0.05, 0.1),
        device="cpu",
        progress=lambda *a: calls.append(a),
    )
    stages = [c[0] for c in calls]
    total = calls[0][2]
    # 2 properties, the curve of `robust` at 3 radii, explanations, robustness area, writing.
    assert total == 2 + 3 + 3 and all(c[2] == total for c in calls)
    assert stages[:2] == ["property robust", "property stable"]
    assert "security of robust at eps 0.05" in stages
    assert [c[1] for c in calls] == list(range(total)) + [total]
    assert calls[-1][0] == "done"


def test_the_point_sized_curve_radius_skips_the_attack_steps(linear_run):
    """At eps 0 every region is one point, so the attack's start is its answer: the truth
    without the steps is the truth with them, sample by sample."""
    from propdsl.evaluate import _holds, _point_regions

    spec, run, _ = linear_run
    x, y, model = _data_and_model(run)
    at0 = spec.with_params(eps=0.0)
    assert _point_regions(at0.properties["robust"].formula)
    assert not _point_regions(spec.properties["robust"].formula)
    assert not _point_regions(at0.properties["correct"].formula)  # no region at all
    full, _ = _holds(at0, "robust", ATTACK, model, x, y, 16, 0, torch.device("cpu"))
    none = PGD(steps=0, restarts=1)
    short, _ = _holds(at0, "robust", none, model, x, y, 16, 0, torch.device("cpu"))
    assert torch.equal(full, short)
    with torch.no_grad():
        assert torch.equal(full, model(x).argmax(1) == y)


def test_evaluate_epoch_measures_explanation_properties_with_the_surrogate():
    """The per-epoch satisfaction of a saliency property of a ReLU network: the training
    attack on the softplus surrogate (as eval does), not a flat objective that cannot move
    (which read 1.000 every epoch, with a VanishingGradientWarning)."""
    import dataclasses

    from propdsl.models import build_model
    from propdsl.train import evaluate_epoch

    spec = propdsl.load(RELU_SPEC.replace("tau : Real = 0.9", "tau : Real = 0.999"))
    val = load_dataset("digits", split="val", seed=0, limit=200)
    model = build_model("mlp", (1, 8, 8), 10, hidden=[6], seed=0)
    generator = torch.Generator().manual_seed(5)
    loss = spec.loss("stable", generator=generator)
    attack = loss.attack
    assert attack.surrogate_beta is None  # the train block's attack: pgd, no surrogate
    with warnings.catch_warnings():
        warnings.simplefilter("error", VanishingGradientWarning)
        row = evaluate_epoch(model, val, {"stable": loss}, "cpu", 24)
    assert loss.attack is attack  # put back
    generator.manual_seed(5)
    smooth = dataclasses.replace(attack, surrogate_beta=10.0)
    by_hand = spec.loss("stable", attack=smooth, generator=generator)(model, val.x[:24], val.y[:24])
    assert row["satisfied[stable]"] == pytest.approx(by_hand.satisfied.float().mean().item())
    assert row["satisfied[stable]"] < 1.0


# -- plots say what they show ----------------------------------------------------------------------


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot functions save, kept for inspection."""
    from propdsl import plots

    kept = []
    save = plots._save

    def keep(fig, path):
        kept.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_sample_grid_says_whether_the_point_is_a_counterexample(figures, tmp_path):
    """Rows titled "counterexample" where the prediction did not change, no colour bars:
    now each attack point says its prediction and whether the property holds there, and the
    difference and saliency panels have colour bars."""
    from propdsl import plots

    x = torch.rand(2, 1, 4, 4)
    plots.sample_grid(
        x,
        [3, 5],
        [3, 5],
        torch.randn(2, 1, 4, 4),
        tmp_path / "g.png",
        points=x.clamp(0.1, 0.9),
        point_pred=[3, 8],
        holds=[True, False],
        title="the strong attack's points for robust (x')",
    )
    (fig,) = figures
    titles = _titles(fig)
    assert "sample 0: label 3, pred 3" in titles
    assert "attack point: pred 3 (unchanged)\nproperty holds" in titles
    assert "attack point: pred 8 (was 5)\nviolated: counterexample" in titles
    assert not any(t.startswith("counterexample") for t in titles)
    # 2 rows x 4 panels, and a colour bar beside each difference and saliency panel.
    colorbars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(fig.axes) == 8 + 4 and len(colorbars) == 4


def test_counterexample_grid_names_each_sample(figures, tmp_path):
    from propdsl import plots

    x = torch.rand(3, 1, 4, 4)
    plots.counterexample_grid(
        x,
        x.flip(0),
        [4, 17, 30],
        [1, 2, 3],
        [1, 2, 3],
        [7, 2, 0],
        [-0.5, 0.25, -1.0],
        tmp_path / "c.png",
        title="robust: 3 of 3 counterexamples",
    )
    (fig,) = figures
    titles = _titles(fig)
    assert titles[:3] == ["#4: label 1, pred 1", "#17: label 2, pred 2", "#30: label 3, pred 3"]
    assert "pred 7, margin -0.5" in titles and "pred 0, margin -1" in titles
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 1
    assert fig.get_suptitle() == "robust: 3 of 3 counterexamples"


def test_coinciding_curves_stay_visible(figures, tmp_path):
    """Two properties at 1.0 at every radius: different markers, the one below larger and
    hollow, so neither hides the other."""
    from propdsl import plots

    plots.security_curve([0, 0.1], {"a": [1.0, 1.0], "b": [1.0, 1.0]}, tmp_path / "s.png")
    (fig,) = figures
    a, b = fig.axes[0].get_lines()[:2]
    assert a.get_marker() != b.get_marker() and a.get_linestyle() != b.get_linestyle()
    assert a.get_markersize() > b.get_markersize() and a.get_markerfacecolor() == "none"
