"""Restarts run as one batch: the same results as the sequential restarts loop they replaced.

`run_attack` stacks all restarts into one batch of `restarts * B` samples. The reference here is
the loop it replaced, written out: one single-restart run after another from the same generator
(so from the same random starts), each sample keeping the first strictly better value, where a
number beats NaN. The batched attack must choose the same points with the same values.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import propdsl
from propdsl.attacks import APGD, PGD, _best_copy, run_attack
from propdsl.models import build_model
from propdsl.region import Region

INF = math.inf
F64 = torch.float64
SPEC = Path(__file__).resolve().parent.parent / "specs" / "digits.prop"


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sequential(attack, objective, regions, generator):
    """The old restarts loop: single runs one after another, the best kept per sample."""
    single = dataclasses.replace(attack, restarts=1)
    points, value = None, None
    for _ in range(attack.restarts):
        res = run_attack(single, objective, regions, generator=generator)
        if value is None:
            points, value = list(res.points), res.value
            continue
        better = (res.value > value) | (value.isnan() & ~res.value.isnan())
        points = [
            torch.where(better.reshape(-1, *[1] * (p.dim() - 1)), p, q)
            for p, q in zip(res.points, points, strict=True)
        ]
        value = torch.where(better, res.value, value)
    return points, value


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(F64)


def _labelled_objective(net, y):
    """An objective that reads per-sample data (labels): it cannot run on a stacked batch as
    it is, so the batched attack needs `tiled` (or evaluates it one restart at a time)."""

    def make(copies: int = 1):
        labels = y.repeat_interleave(copies)

        def objective(v):
            out = net(v)
            own = out.gather(1, labels[:, None])[:, 0]
            return torch.sin(3 * out[:, 0]) + out.amax(1) - own  # many local maxima

        return objective

    return make


@pytest.mark.parametrize("kind", [PGD, APGD])
@pytest.mark.parametrize("p", [1, 2, INF])
@pytest.mark.parametrize("with_tiled", [True, False], ids=["tiled", "sliced"])
def test_batched_restarts_equal_the_sequential_loop(kind, p, with_tiled):
    net = _net()
    g = _gen(1)
    x = torch.rand(12, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (12,), generator=g)
    region = Region.ball(x, 0.4, p, lo=0.0, hi=1.0)
    make = _labelled_objective(net, y)
    attack = kind(steps=6, restarts=5)
    ref_points, ref_value = sequential(attack, make(), [region], _gen(7))
    res = run_attack(
        attack, make(), [region], generator=_gen(7), tiled=make if with_tiled else None
    )
    assert res.value.shape == (12,) and res.points[0].shape == x.shape
    assert torch.allclose(res.value, ref_value, rtol=0, atol=1e-10)
    assert torch.allclose(res.points[0], ref_points[0], rtol=0, atol=1e-10)
    assert bool(region.contains(res.points[0], tol=1e-9).all())
    # The restarts matter here: a single run is worse for some sample.
    once = run_attack(kind(steps=6), make(), [region], generator=_gen(7))
    assert bool((res.value > once.value + 1e-6).any())


def test_two_binders_and_a_plain_box_are_batched_jointly():
    net = _net(2)
    x1 = torch.rand(5, 4, dtype=F64)
    lo = torch.zeros(5, 4, dtype=F64)
    regions = [Region.ball(x1, 0.3, 2), Region.box(lo, lo + 0.5)]

    def objective(a, b):
        return (net(a) - net(b)).norm(dim=1) + torch.cos(5 * b).sum(1)

    attack = PGD(steps=5, restarts=4)
    ref_points, ref_value = sequential(attack, objective, regions, _gen(3))
    res = run_attack(attack, objective, regions, generator=_gen(3), tiled=lambda k: objective)
    assert torch.allclose(res.value, ref_value, rtol=0, atol=1e-10)
    for got, ref in zip(res.points, ref_points, strict=True):
        assert torch.allclose(got, ref, rtol=0, atol=1e-10)


def test_one_objective_call_per_step_on_the_stacked_batch():
    net = _net()
    x = torch.rand(8, 4, dtype=F64)
    shapes = []

    def make(copies=1):
        def objective(v):
            shapes.append(tuple(v.shape))
            return net(v)[:, 0]

        return objective

    run_attack(PGD(steps=4, restarts=3), make(), [Region.ball(x, 0.2)], tiled=make)
    assert shapes == [(24, 4)] * 5  # the start and 4 steps, all restarts at once


def test_best_copy_keeps_the_first_maximum_and_prefers_numbers_to_nan():
    nan = math.nan
    # 4 samples x 3 copies, sample-major.
    value = torch.tensor(
        [
            [1.0, 3.0, 3.0],  # tie: the first of the maxima (copy 1)
            [nan, -INF, nan],  # -inf is a number: it beats NaN
            [nan, nan, nan],  # nothing beats NaN: the first copy
            [2.0, nan, 5.0],
        ]
    )
    points = [torch.arange(12.0).reshape(12, 1)]
    got_points, got_value = _best_copy(points, value.flatten(), 4, 3)
    # The same choice as offering the copies one after another (the old loop).
    best_v, best_i = value[:, 0].clone(), torch.zeros(4, dtype=torch.long)
    for r in (1, 2):
        v = value[:, r]
        better = (v > best_v) | (best_v.isnan() & ~v.isnan())
        best_v = torch.where(better, v, best_v)
        best_i = torch.where(better, torch.full_like(best_i, r), best_i)
    assert best_i.tolist() == [1, 1, 0, 2]
    assert got_points[0][:, 0].tolist() == (torch.arange(4) * 3 + best_i).float().tolist()
    assert torch.equal(got_value.isnan(), best_v.isnan())
    assert torch.equal(got_value.nan_to_num(0.5), best_v.nan_to_num(0.5))


@pytest.mark.parametrize("kind", [PGD, APGD])
def test_compiled_loss_with_restarts_matches_a_hand_written_sequential_attack(kind):
    """The compiled classification-robustness loss, restarts batched through the interpreter
    (its data and f(x) repeated per restart), picks the points that the sequential loop on a
    hand-written margin picks from the same starts."""
    spec = propdsl.load(SPEC, params={"eps": 0.15})
    attack = kind(steps=5, restarts=4)
    loss = spec.loss("classification_robust", logic="dl2", attack=attack, generator=_gen(11))
    model = build_model("mlp", (1, 8, 8), 10, hidden=[16], seed=0).to(F64)
    g = _gen(2)
    x = torch.rand(10, 1, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, 10, (10,), generator=g)
    out = loss(model, x, y)
    (point,) = out.counterexample.values()

    own = nn.functional.one_hot(y, 10).bool()

    def margin(v):
        logits = model(v)
        return (logits - logits.gather(1, y[:, None])).masked_fill(own, -INF).amax(1)

    region = Region.ball(x, 0.15, INF, lo=0.0, hi=1.0)
    model.eval()
    ref_points, ref_value = sequential(attack, margin, [region], _gen(11))
    assert torch.allclose(point, ref_points[0], rtol=0, atol=1e-9)
    with torch.no_grad():
        assert torch.allclose(margin(point), ref_value, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "name", ["classification_robust", "standard_robust", "lipschitz_robust", "explanation_stable"]
)
def test_every_digits_property_batches_its_restarts_like_one_restart_at_a_time(name, monkeypatch):
    """Through the interpreter's repeated env (`tiled`): f(x), the labels, saliency(f, x, y) and
    two binders at once give the points that evaluating each restart on its own gives."""
    import propdsl.loss.compile as C

    spec = propdsl.load(SPEC, params={"eps": 0.15})
    model = build_model("mlp", (1, 8, 8), 10, hidden=[16], activation="softplus", seed=0)
    model = model.to(F64)
    g = _gen(4)
    x = torch.rand(6, 1, 8, 8, generator=g, dtype=F64)
    y = torch.randint(0, 10, (6,), generator=g)
    attack = PGD(steps=3, restarts=3)

    def outcome():
        loss = spec.loss(name, logic="dl2", attack=attack, generator=_gen(9))
        out = loss(model, x, y)
        return out.loss, list(out.counterexample.values())

    batched = outcome()
    real = C.run_attack

    def one_at_a_time(*args, tiled=None, **kwargs):
        return real(*args, **kwargs)  # no `tiled`: each restart's slice on its own

    monkeypatch.setattr(C, "run_attack", one_at_a_time)
    sliced = outcome()
    assert torch.allclose(batched[0], sliced[0], rtol=1e-9, atol=1e-12)
    assert len(batched[1]) == len(sliced[1]) >= 1
    for a, b in zip(batched[1], sliced[1], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-9)


def test_min_perturbation_batches_restarts_with_the_labels_repeated(monkeypatch):
    """metrics.search passes `tiled=` (the labels repeated per restart): the same distances
    and breaking points as restarts run one at a time (run_attack without `tiled`)."""
    from propdsl.metrics import search

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    x = torch.rand(10, 6)
    labels = net(x).argmax(1)
    attack = APGD(steps=8, restarts=3)
    calls = []

    def run(tiled_on):
        real = search.run_attack

        def spy(*args, **kwargs):
            calls.append(kwargs.get("tiled") is not None)
            if not tiled_on:
                kwargs.pop("tiled", None)
            return real(*args, **kwargs)

        monkeypatch.setattr(search, "run_attack", spy)
        out = search.min_perturbation(
            net,
            x,
            labels,
            distance=search.Distance.L2,
            attack=attack,
            max_distance=2.0,
            bisections=4,
            box=(0.0, 1.0),
            generator=torch.Generator().manual_seed(1),
        )
        monkeypatch.setattr(search, "run_attack", real)
        return out

    batched, sequential = run(True), run(False)
    assert all(calls)  # every attack of the search was given the tiled objective
    assert bool(batched.found.any())  # the search breaks some samples: a real comparison
    assert torch.equal(batched.found, sequential.found)
    torch.testing.assert_close(batched.distance, sequential.distance, rtol=1e-5, atol=1e-6)
