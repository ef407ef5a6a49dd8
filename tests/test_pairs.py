"""Properties of a pair (`property p(x, y, xt, yt) partner SOURCE = ...`): syntax, checking,
partner draws, losses, objectives, verification; and Chen et al.'s targeted explanation attack
("Expl at Start / End") against an independent plain-torch implementation of the same attack."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import propdsl
from propdsl.errors import CheckError, UsageError
from propdsl.manipulation import (
    MANIPULATION_METHODS,
    ManipulationOptions,
    explanation_manipulation,
)
from propdsl.partners import Partners, class_mean, draw, kmeans, other_class, prototype
from propdsl.syntax.parser import parse
from propdsl.syntax.printer import format_module

F64 = torch.float64

PAIR = """network f : Tensor[1, 8, 8] -> Tensor[10]

param eps : Real = 0.05

property far(x, y, xt, yt) partner other_class(seed = 3) =
  forall x' in ball(x, eps, inf) & box(0, 1):
    norm(saliency(f, x', y) - saliency(f, xt, yt), 2) >= 0.5 * norm(saliency(f, x, y), 2)

property margin_vs_partner(x, y, xt, yt) partner class_mean =
  f(x)[y] - f(x)[yt] >= f(xt)[y] - f(xt)[yt]

property robust_logit(x, y, xt, yt) partner prototype(k = 5) =
  forall x' in ball(x, eps, inf):
    f(x')[y] >= f(xt)[yt] - 1000
"""


# -- syntax and checking ------------------------------------------------------------------------


def test_the_partner_clause_parses_formats_and_keeps_partner_an_ordinary_name():
    text = PAIR + "\nlet partner = 2\n\nproperty uses_name(x) =\n  f(x)[0] <= partner\n"
    module = parse(text)
    prop = module.decls[2]
    assert prop.partner is not None and prop.partner.func.id == "other_class"
    assert module.decls[3].partner is not None and module.decls[3].partner.id == "class_mean"
    assert format_module(module) == text  # canonical layout, round trip
    spec = propdsl.load(text)
    assert spec.params == {"eps": 0.05}
    assert spec.property("uses_name").partner is None


def test_a_property_of_a_pair_is_typed_like_two_samples_and_shows_its_partner():
    spec = propdsl.load(PAIR)
    prop = spec.property("far")
    assert [(n, t.show()) for n, t in prop.params] == [
        ("x", "Tensor[1, 8, 8]"),
        ("y", "Label[10]"),
        ("xt", "Tensor[1, 8, 8]"),
        ("yt", "Label[10]"),
    ]
    assert prop.paired and prop.partner.name == "other_class"
    assert dict(prop.partner.kwargs) == {"seed": 3}
    assert dict(spec.property("robust_logit").partner.kwargs) == {"k": 5}
    from propdsl.summary import summary

    assert "    partner (xt, yt) : other_class(seed = 3)" in summary(spec)


@pytest.mark.parametrize(
    ("text", "message", "where"),
    [
        (
            "property p(x, y, xt) partner other_class =\n  f(x)[y] >= f(xt)[y]\n",
            "a property with a partner takes four parameters (x, y, xt, yt), but 'p' has 3",
            (3, 12),
        ),
        (
            "property p(x, y, xt, yt) partner other_klass =\n  f(x)[y] >= f(xt)[yt]\n",
            "unknown partner 'other_klass'",
            (3, 34),
        ),
        (
            "property p(x, y, xt, yt) partner prototype(k = 0) =\n  f(x)[y] >= f(xt)[yt]\n",
            "k",
            (3, 48),
        ),
        (
            "property p(x, y, xt, yt) partner prototype(clusters = 3) =\n  f(x)[y] >= 0\n",
            "'prototype' has no option 'clusters'",
            (3, 44),
        ),
        (
            "property p(x, y, xt, yt) =\n  f(x)[y] >= f(xt)[yt]\n"
            'verify f on digits(split = "test") {\n  properties = [p]\n}\n',
            "'p' takes four samples (x, y, xt, yt) but names no partner source",
            (6, 17),
        ),
    ],
)
def test_partner_mistakes_are_positioned_errors(text, message, where):
    src = "network f : Tensor[1, 8, 8] -> Tensor[10]\n\n" + text
    with pytest.raises(CheckError) as err:
        propdsl.load(src)
    found = [d for d in err.value.diagnostics if message in d.message]
    assert found, [d.message for d in err.value.diagnostics]
    assert (found[0].span.line, found[0].span.col) == where


def test_certified_training_of_a_property_of_a_pair_is_a_spec_error():
    src = (
        "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
        "property p(x, y, xt, yt) partner other_class =\n"
        "  forall x' in ball(x, 0.1, inf): f(x')[y] >= f(xt)[yt]\n"
        'train f on digits(split = "train") {\n  loss = cross_entropy + certified(p)\n}\n'
    )
    with pytest.raises(CheckError) as err:
        propdsl.load(src)
    (d,) = err.value.diagnostics
    assert "'p' is a property of a pair" in d.message
    assert (d.span.line, d.span.col) == (5, 36)


def test_the_missing_partner_error_says_how_to_add_one():
    src = (
        "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
        "property p(x, y, xt, yt) =\n  f(x)[y] >= f(xt)[yt]\n"
        'train f on digits(split = "train") {\n  loss = cross_entropy + p\n}\n'
    )
    with pytest.raises(CheckError) as err:
        propdsl.load(src)
    (d,) = err.value.diagnostics
    assert "no partner source" in d.message and "partner other_class" in d.hint


# -- partner draws --------------------------------------------------------------------------------


def _pool(n=40, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, generator=g)
    y = torch.arange(n) % classes
    return x, y


def test_other_class_draws_pool_samples_of_another_class_deterministically():
    px, py = _pool()
    x, y = px[:10], py[:10]
    xt, yt = other_class(None, px, py, x, y, seed=5)
    assert bool((yt != y).all())
    for i in range(10):  # each partner is a row of the pool, with that row's label
        rows = (px == xt[i]).flatten(1).all(1).nonzero().flatten()
        assert rows.numel() == 1 and int(py[rows[0]]) == int(yt[i])
    again = other_class(None, px, py, x, y, seed=5)
    assert torch.equal(again[0], xt) and torch.equal(again[1], yt)
    other_seed = other_class(None, px, py, x, y, seed=6)
    assert not torch.equal(other_seed[0], xt)
    with pytest.raises(UsageError, match="only that class"):
        other_class(None, px[py == 0], py[py == 0], x[:1], py[:1])


def test_class_mean_is_the_mean_of_another_class():
    px, py = _pool()
    xt, yt = class_mean(None, px, py, px[:8], py[:8], seed=1)
    assert bool((yt != py[:8]).all())
    for i in range(8):
        assert torch.allclose(xt[i], px[py == yt[i]].mean(0))


def test_kmeans_finds_well_separated_clusters_and_prototypes_are_pool_samples():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=F64)
    pts = torch.cat([c + 0.1 * torch.randn(20, 2, generator=g, dtype=F64) for c in centres])
    found, assign = kmeans(pts, 3, seed=0)
    # each true cluster is one found cluster, whose centre is its mean (brute force)
    for j in range(3):
        labels = assign[20 * j : 20 * (j + 1)]
        assert bool((labels == labels[0]).all())
        assert torch.allclose(found[labels[0]], pts[20 * j : 20 * (j + 1)].mean(0))
    assert len(set(assign.tolist())) == 3

    px, py = _pool(n=30)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Softplus(), nn.Linear(6, 4))
    xt, yt = prototype(model, px, py, px[:12], py[:12], k=30, seed=0)
    # with k = pool size, every sample is its own prototype: partners are pool rows of another
    # class, with their labels
    assert bool((yt != py[:12]).all())
    for i in range(12):
        rows = (px == xt[i]).flatten(1).all(1).nonzero().flatten()
        assert rows.numel() == 1 and int(py[rows[0]]) == int(yt[i])
    with pytest.raises(UsageError, match="last nn.Linear"):
        prototype(nn.Flatten(), px, py, px[:2], py[:2], k=3)


def test_partners_of_a_training_loop_vary_by_batch_and_repeat_by_salt():
    px, py = _pool()
    spec = propdsl.load(PAIR)
    parts = Partners(px, py, {"far": spec.property("far").partner})
    a = parts.draw_for(None, px[:6], py[:6], salt=1)["far"]
    b = parts.draw_for(None, px[:6], py[:6], salt=1)["far"]
    c = parts.draw_for(None, px[:6], py[:6], salt=2)["far"]
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


# -- losses, objectives and verification -------------------------------------------------------


def _model(seed=0, act=None):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), act or nn.Softplus(beta=5.0), nn.Linear(16, 10)
    )


def test_a_property_of_a_pair_binds_its_partner_and_refuses_to_run_without():
    spec = propdsl.load(PAIR)
    model = _model()
    px, py = _pool(n=40, classes=10)
    x, y = px[:12], py[:12]
    xt, yt = draw(spec.property("margin_vs_partner").partner, model, px, py, x, y)
    out = spec.loss("margin_vs_partner", logic="dl2")(model, x, y, partner=(xt, yt))
    with torch.no_grad():
        a, b = model(x), model(xt)
    idx = torch.arange(12)
    want = (a[idx, y] - a[idx, yt]) >= (b[idx, y] - b[idx, yt])
    assert torch.equal(out.satisfied, want)
    assert want.any() and not want.all()
    with pytest.raises(UsageError, match="property of a pair"):
        spec.loss("margin_vs_partner")(model, x, y)


def test_an_objective_naming_a_property_of_a_pair_takes_partners_by_name():
    spec = propdsl.load(
        PAIR
        + '\ntrain f on digits(split = "train") {\n  loss = cross_entropy + margin_vs_partner\n}\n'
    )
    objective = spec.objective(logic="dl2")
    assert objective.paired == ("margin_vs_partner",)
    model = _model()
    px, py = _pool(n=40, classes=10)
    x, y = px[:12], py[:12]
    xt, yt = draw("class_mean", model, px, py, x, y)
    total = objective(model, x, y, partners={"margin_vs_partner": (xt, yt)})
    ce = F.cross_entropy(model(x), y)
    term = spec.loss("margin_vs_partner", logic="dl2")(model, x, y, partner=(xt, yt)).loss.mean()
    assert torch.allclose(total, ce + term)
    with pytest.raises(UsageError, match="margin_vs_partner"):
        objective(model, x, y)


def test_verify_treats_the_partner_as_a_constant_input():
    from propdsl.verify.run import FALSIFIED, VERIFIED, verify_property

    spec = propdsl.load(
        PAIR
        + "\nproperty beats_partner(x, y, xt, yt) partner other_class =\n"
        + "  forall x' in ball(x, eps, inf):\n    f(x')[y] >= f(xt)[yt] + 1000\n"
    )
    model = _model(act=nn.ReLU())
    px, py = _pool(n=20, classes=10)
    v = verify_property(spec, "robust_logit", model, px[:6], py[:6], method="crown")
    assert v.status == [VERIFIED] * 6
    assert bool((v.margin >= 0).all())
    # a margin of 1000 is false at x itself: falsified with a counterexample in the ball
    w = verify_property(spec, "beats_partner", model, px[:6], py[:6], method="crown")
    assert w.status == [FALSIFIED] * 6
    pts = w.counterexamples["x'"]
    assert bool(((pts - px[:6]).abs() <= 0.05 + 1e-6).all())


# -- Chen et al.'s explanation manipulation -------------------------------------------------------


def _hand_attack(weights, beta, x, xt, method, eps, steps, step_size, gamma, box):
    """The same attack, written independently: a manual softplus MLP (Flatten, Linear,
    Softplus, Linear), its maps by plain autograd or a manual guided backward pass."""
    (w1, b1), (w2, b2) = weights

    def logits(v):
        return F.softplus(v.flatten(1) @ w1.T + b1, beta=beta) @ w2.T + b2

    def grad_map(v, c):
        v = v if v.requires_grad else v.detach().requires_grad_(True)
        out = logits(v)[torch.arange(v.shape[0]), c].sum()
        (g,) = torch.autograd.grad(out, v, create_graph=True)
        return g

    def explain(v, c):
        if method == "saliency":
            return grad_map(v, c)
        if method == "gradient_x_input":
            return v * grad_map(v, c)
        z = v.flatten(1) @ w1.T + b1
        g = w2[c].clamp(min=0) * torch.sigmoid(beta * z)
        return (g @ w1).reshape(v.shape)

    def dist(a, b):
        return (a - b).flatten(1).norm(dim=1)

    with torch.no_grad():
        c, ct = logits(x).argmax(1), logits(xt).argmax(1)
    target = explain(xt, ct).detach()
    victim = explain(x, c).detach()
    start = dist(victim, target)
    best, best_pt = start.clone(), x.clone()
    lo, hi = (x - eps).clamp(min=box[0]), (x + eps).clamp(max=box[1])
    alpha = step_size * eps / steps
    v = x.clone()
    for _ in range(steps):
        p = v.detach().requires_grad_(True)
        out = logits(p)
        true = out[torch.arange(p.shape[0]), c]
        masked = out.clone()
        masked[torch.arange(p.shape[0]), c] = -math.inf
        hinge = F.relu(masked.max(1).values - true)
        loss = ((explain(p, c) - target).flatten(1) ** 2).sum(1) + gamma * hinge
        (g,) = torch.autograd.grad(loss.sum(), p)
        v = torch.min(torch.max(v - alpha * g.sign(), lo), hi).detach()
        with torch.no_grad():
            keeps = logits(v).argmax(1) == c
        d = dist(explain(v, c).detach(), target)
        better = keeps & (d < best)
        best = torch.where(better, d, best)
        best_pt[better] = v[better]
    scale = victim.flatten(1).norm(dim=1)
    end_map = explain(best_pt, c).detach()
    cos_start = F.cosine_similarity(victim.flatten(1), target.flatten(1), dim=1)
    cos_end = F.cosine_similarity(end_map.flatten(1), target.flatten(1), dim=1)
    return start, best, start / scale, best / scale, cos_start, cos_end


@pytest.fixture(scope="module")
def digits_pairs():
    from propdsl.data import load_dataset

    ds = load_dataset("digits", split="test")
    x, y = ds.x[:24].to(F64), ds.y[:24]
    xt, yt = other_class(None, ds.x.to(F64), ds.y, x, y, seed=0)
    torch.manual_seed(0)  # an untrained, seeded softplus MLP
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.Softplus(beta=5.0), nn.Linear(32, 10)
    ).to(F64)
    return model, x, y, xt, yt


@pytest.mark.parametrize("method", MANIPULATION_METHODS)
def test_chen_attack_equals_an_independent_implementation_and_lowers_the_distance(
    digits_pairs, method
):
    model, x, _, xt, _ = digits_pairs
    options = ManipulationOptions(eps=0.1, steps=15, surrogate_beta=None, box=(0.0, 1.0))
    got = explanation_manipulation(model, x, xt, method, options)
    weights = [(model[1].weight, model[1].bias), (model[3].weight, model[3].bias)]
    want = _hand_attack(weights, 5.0, x, xt, method, 0.1, 15, 2.5, options.gamma, (0.0, 1.0))
    fields = (
        got.start,
        got.end,
        got.start_relative,
        got.end_relative,
        got.start_cosine,
        got.end_cosine,
    )
    for a, b in zip(fields, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)
    # End <= Start for every victim; a real attack lowers it on an untrained model
    assert bool((got.end <= got.start).all())
    assert bool((got.end_relative <= got.start_relative).all())
    assert float(got.end.mean()) < 0.97 * float(got.start.mean())
    assert int((got.end < got.start).sum()) >= len(x) // 2
    # the label (the class predicted at the victim) is kept at the end point, in the ball
    with torch.no_grad():
        assert torch.equal(model(got.point).argmax(1), model(x).argmax(1))
    assert bool(got.kept.all())
    assert float((got.point - x).abs().max()) <= 0.1 + 1e-12
    assert bool((got.point >= 0).all() and (got.point <= 1).all())


def test_zero_steps_or_zero_radius_end_where_they_start(digits_pairs):
    model, x, _, xt, _ = digits_pairs
    for opts in (
        ManipulationOptions(eps=0.1, steps=0, surrogate_beta=None),
        ManipulationOptions(eps=0.0, steps=5, surrogate_beta=None),
    ):
        r = explanation_manipulation(model, x[:4], xt[:4], "saliency", opts)
        assert torch.equal(r.end, r.start) and torch.equal(r.point, x[:4])


def test_a_relu_network_is_attacked_on_its_surrogate_and_measured_on_itself(digits_pairs):
    _, x, _, xt, _ = digits_pairs
    torch.manual_seed(1)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(F64)
    plain = ManipulationOptions(eps=0.1, steps=10, surrogate_beta=None)
    smooth = ManipulationOptions(eps=0.1, steps=10, surrogate_beta=10.0)
    for method in MANIPULATION_METHODS:
        stuck = explanation_manipulation(relu, x, xt, method, plain)
        moved = explanation_manipulation(relu, x, xt, method, smooth)
        assert bool((moved.end <= moved.start).all())
        # on the ReLU network itself the maps' input gradient vanishes (gradient, guided
        # backprop): the surrogate is what moves them
        assert float(moved.end.mean()) < float(moved.start.mean())
        if method != "gradient_x_input":
            assert torch.equal(stuck.end, stuck.start)


@pytest.mark.slow
def test_propdsl_eval_reports_expl_at_start_and_end(tmp_path):
    """End to end: train the shipped spec briefly, evaluate, read eval.json."""
    from pathlib import Path

    from typer.testing import CliRunner

    from propdsl import cli

    spec = Path(__file__).resolve().parents[1] / "specs" / "explanation_manipulation.prop"
    run = tmp_path / "run"
    runner = CliRunner()
    args = ["train", str(spec), "--out", str(run), "--epochs", "1", "--threads", "1", "-q"]
    result = runner.invoke(cli.app, args)
    assert result.exit_code == 0, result.output
    args = ["eval", str(spec), "--run", str(run), "--samples", "12", "--no-plots", "-q"]
    result = runner.invoke(cli.app, [*args, "--threads", "1"])
    assert result.exit_code == 0, result.output
    data = json.loads((run / "eval.json").read_text())
    entry = data["explanation_manipulation"]
    assert set(entry) == {"hard_to_manipulate", "guided_hard_to_manipulate"}
    for prop in entry.values():
        assert prop["eps"] == 0.05 and prop["n"] == 12
        assert set(prop["methods"]) == set(MANIPULATION_METHODS)
        for m in prop["methods"].values():
            assert m["end"] <= m["start"] and m["end_relative"] <= m["start_relative"]
            assert m["kept"] == 1.0
    assert "Guided Backprop" in result.output and "explanation manipulation" in result.output
    result = runner.invoke(
        cli.app,
        ["verify", str(spec), "--run", str(run), "--samples", "4", "--threads", "1", "-q"],
    )
    assert result.exit_code == 0, result.output
    verdicts = json.loads((run / "verify.json").read_text())
    assert set(verdicts["properties"]) == {"hard_to_manipulate", "guided_hard_to_manipulate"}


def test_a_distributed_run_refuses_a_loss_with_a_property_of_a_pair(tmp_path, monkeypatch):
    # partners are drawn per batch by one process's loop; refused (usage error) before anything
    # is written, instead of a loss without its partners
    from propdsl import distributed
    from propdsl.errors import UsageError
    from propdsl.train import TrainOptions, train

    text = (
        PAIR
        + """
train f on digits(split = "train", limit = 64) {
  model     = mlp(hidden = [8])
  epochs    = 1
  batch     = 32
  optimizer = adam(lr = 0.01)
  loss      = cross_entropy + 0.1 * margin_vs_partner
}
"""
    )
    monkeypatch.setattr(distributed, "world", lambda: 2)
    with pytest.raises(UsageError, match="property of a pair"):
        train(propdsl.load(text), TrainOptions(out=tmp_path / "run", quiet=True, threads=1))
    assert not (tmp_path / "run").exists()
