"""Per-term attacks in a train block (`attacks = terms(name = attack, ...)`), the `noise`
sampler, and the bounded form of a negatively weighted term.

SEP (Chen et al. 2024, "Rethinking Robustness of Model Attributions") needs random noise for its
explanation term and PGD for its adversarial cross-entropy: one block, two attacks. The tests
record which attack each quantifier of the loss was solved with, by replacing the attack runner.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import propdsl
from propdsl.attacks import APGD, PGD, AttackResult, noise, run_attack
from propdsl.loss import compile as C
from propdsl.region import Region

NET = "network f : Tensor[4] -> Tensor[3]\n"
BASE = NET + (
    "property robust(x, y) =\n"
    "  forall x' in ball(x, 0.1, inf) & box(0, 1): argmax(f(x')) == y\n"
    'train f on tensors(path = "d.pt") {\n'
    "  attack  = pgd(steps = 5)\n"
    "  ATTACKS\n"
    "  loss    = (max x' in ball(x, 0.1, inf) & box(0, 1): cross_entropy(f(x'), y)) + robust"
    " + 0.5 * (max z in ball(x, 0.05, inf) & box(0, 1): norm(f(z) - f(x), 2))\n"
    "}\n"
)


def spec_with(attacks: str) -> propdsl.Spec:
    return propdsl.load(BASE.replace("ATTACKS", attacks))


def messages(attacks: str) -> list[tuple[str, int, int]]:
    with pytest.raises(propdsl.CheckError) as info:
        spec_with(attacks)
    return [(d.message, d.span.line, d.span.col) for d in info.value.diagnostics]


def test_each_term_is_solved_by_its_own_attack(monkeypatch):
    spec = spec_with("attacks = terms(z = noise(samples = 2), robust = apgd(steps = 3))")
    calls: list[tuple[object, float]] = []

    def record(attack, objective, regions, *, models=(), generator=None, **kw):
        calls.append((attack, float(regions[0].radius.flatten()[0])))
        return run_attack(attack, objective, regions, models=models, generator=generator, **kw)

    monkeypatch.setattr(C, "run_attack", record)
    model = nn.Linear(4, 3)
    x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
    objective = spec.objective(generator=torch.Generator().manual_seed(0))
    value = objective(model, x, y)
    assert math.isfinite(float(value.detach()))
    value.backward()
    by_radius = {}
    for attack, radius in calls:
        by_radius.setdefault(round(radius, 6), []).append(attack)
    # x' (radius 0.1, the loss's own max) keeps the block's attack; robust's x' (also 0.1)
    # runs APGD; z (radius 0.05) draws two uniform points
    assert by_radius[0.05] == [PGD(steps=0, restarts=2, random_start=True)]
    assert sorted(map(repr, by_radius[0.1])) == sorted([repr(PGD(steps=5)), repr(APGD(steps=3))])
    assert spec.term_attacks() == {"z": noise(samples=2), "robust": APGD(steps=3)}


def test_without_the_setting_every_term_uses_the_block_attack(monkeypatch):
    spec = spec_with("")
    seen = []

    def record(attack, objective, regions, *, models=(), generator=None, **kw):
        seen.append(attack)
        return run_attack(attack, objective, regions, models=models, generator=generator, **kw)

    monkeypatch.setattr(C, "run_attack", record)
    spec.objective()(nn.Linear(4, 3), torch.rand(3, 4), torch.zeros(3, dtype=torch.long))
    assert seen == [PGD(steps=5)] * 3
    assert spec.term_attacks() == {}


def test_unknown_term_names_are_positioned_errors():
    # line 6 is the attacks line; `terms(` ends at column 19
    assert messages("attacks = terms(zz = noise())") == [("'zz' is not a term of the loss", 6, 19)]
    # the quantified variable inside a property is not a term of the loss
    got = messages("attacks = terms(robust = noise(), x'' = noise())")
    assert got == [("'x''' is not a term of the loss", 6, 37)]
    assert messages("attacks = pgd(steps = 3)")[0][0] == (
        "'attacks' takes terms(name = attack, ...)"
    )
    assert messages("attacks = terms(z = fgsm())")[0][0] == "unknown attack 'fgsm'"
    assert messages("attacks = terms(z = noise(samples = 0))")[0][0].startswith("'samples' must")
    with pytest.raises(propdsl.SpecError, match="keyword argument 'z' given twice"):
        spec_with("attacks = terms(z = noise(), z = pgd())")  # the parser's own check


def test_attacks_are_shown_as_written():
    spec = spec_with("attacks = terms(z = noise, robust = apgd(steps = 3))")
    assert "attacks = terms(z = noise, robust = apgd(steps = 3))" in spec.summary()


def test_cli_check_exits_1_on_an_unknown_term(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "s.prop"
    path.write_text(BASE.replace("ATTACKS", "attacks = terms(w = noise())"))
    out = subprocess.run(
        [sys.executable, "-m", "propdsl", "check", str(path)], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert "6:19: error: 'w' is not a term of the loss" in out.stderr


def test_noise_draws_uniform_points_and_does_not_climb():
    # a linear objective w . x on an L-inf ball: PGD reaches eps * ||w||_1; one noise draw is
    # uniform, so its values average to w . centre (= 0 here) and stay within the ball's range
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    region = Region.ball(torch.zeros(4000, 3, dtype=torch.float64), 0.1, float("inf"))
    g = torch.Generator().manual_seed(0)
    drawn = run_attack(noise(), lambda v: v @ w, [region], generator=g)
    assert bool(region.contains(drawn.points[0]).all())
    assert abs(float(drawn.value.mean())) < 0.01  # standard error ~ 0.0019
    # uniform in [-0.1, 0.1]^3: each coordinate's variance is 0.01 / 3
    var = drawn.points[0].var(dim=0)
    uniform = torch.full((3,), 0.01 / 3, dtype=torch.float64)
    torch.testing.assert_close(var, uniform, rtol=0.1, atol=0)
    climbed = run_attack(PGD(steps=10), lambda v: v @ w, [region], generator=g)
    torch.testing.assert_close(climbed.value, torch.full((4000,), 0.35, dtype=torch.float64))
    # more samples keep the most violating draw: never below one draw's value in distribution
    best = run_attack(noise(samples=8), lambda v: v @ w, [region], generator=g)
    assert float(best.value.mean()) > 0.15


def test_noise_rejects_bad_sample_counts():
    with pytest.raises(ValueError):
        noise(samples=0)
    with pytest.raises(ValueError):
        noise(samples=True)


def test_injected_points_reach_the_right_terms(monkeypatch):
    # a noise term's value is the body at the drawn point: check it against torch directly
    spec = spec_with("attacks = terms(z = noise())")
    model = nn.Linear(4, 3)
    x, y = torch.rand(6, 4) * 0.8 + 0.1, torch.randint(0, 3, (6,))
    points = {}

    def record(attack, objective, regions, *, models=(), generator=None, **kw):
        result = run_attack(attack, objective, regions, models=models, generator=generator, **kw)
        if float(regions[0].radius.flatten()[0]) == pytest.approx(0.05):
            points["z"] = result.points[0]
        return result

    monkeypatch.setattr(C, "run_attack", record)
    objective = spec.objective(generator=torch.Generator().manual_seed(1))
    objective(model, x, y)
    z = points["z"]
    assert bool(((z - x).abs() <= 0.05 + 1e-7).all())
    term = [v for k, v in objective.last_terms.items() if "z" in k]
    expected = 0.5 * (model(z) - model(x)).norm(dim=1).mean()
    assert term == [pytest.approx(float(expected.detach()), rel=1e-5)]


def test_term_attack_for_a_property_leaves_other_quantifiers_alone(monkeypatch):
    # `robust`'s own variable is x' as well: giving robust an attack must not change the
    # loss's `max x'`, and giving no name to x' keeps the block's attack there
    spec = spec_with("attacks = terms(robust = noise())")
    seen = []

    def record(attack, objective, regions, *, models=(), generator=None, **kw):
        seen.append(attack)
        return AttackResult(points=tuple(r.sample(generator) for r in regions), value=None)

    monkeypatch.setattr(C, "run_attack", record)
    spec.objective()(nn.Linear(4, 3), torch.rand(2, 4), torch.zeros(2, dtype=torch.long))
    assert sorted(map(repr, seen)) == sorted(map(repr, [PGD(steps=5), noise(), PGD(steps=5)]))


# -- negative weights ----------------------------------------------------------------------------
SIGNED = NET + ('param mu : Real = 1.0\ntrain f on tensors(path = "d.pt") {\n  loss = TERM\n}\n')


def descend(term: str, steps: int = 150) -> list[float]:
    """Objective values of Adam on the loss, a seeded linear model and fixed random data."""
    spec = propdsl.load(SIGNED.replace("TERM", term))
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    objective = spec.objective()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    values = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = objective(model, x, y)
        loss.backward()
        optimizer.step()
        values.append(float(loss.detach()))
    return values


def test_a_negatively_weighted_norm_diverges_and_its_saturated_form_is_bounded():
    raw = descend("cross_entropy - mu * norm(f(x), 2)")
    # unbounded: the logits' norm grows with every step, and the objective falls with it
    assert raw[-1] < -10 and raw[-1] < raw[len(raw) // 2] - 3
    cap = 2.0
    bounded = descend(f"cross_entropy - mu * saturate(norm(f(x), 2), {cap})")
    # cross_entropy >= 0 and saturate(v, cap) < cap: the objective stays above -mu * cap
    assert min(bounded) > -cap
    # the optimiser still pushed the term up (the reward is not lost), then slowed down: the
    # last third of the run moves by a few hundredths where the raw one moves by 25
    assert bounded[-1] < bounded[0] - 1.0
    assert max(bounded[100:]) - min(bounded[100:]) < 0.05
    assert max(raw[100:]) - min(raw[100:]) > 20


def test_saturate_is_cap_tanh_v_over_cap():
    spec = propdsl.load(SIGNED.replace("TERM", "saturate(norm(f(x), 2), 3.0)"))
    model = nn.Linear(4, 3)
    x, y = torch.rand(8, 4), torch.zeros(8, dtype=torch.long)
    got = spec.objective()(model, x, y)
    expected = (3.0 * torch.tanh(model(x).norm(dim=1) / 3.0)).mean()
    torch.testing.assert_close(got, expected)
