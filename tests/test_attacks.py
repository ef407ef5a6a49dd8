"""PGD / APGD against closed-form optima, and the attack's guarantees."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from torch import nn

from propdsl.attacks import (
    APGD,
    PGD,
    AttackResult,
    VanishingGradientWarning,
    _apgd_checkpoints,
    resolve_attack,
    run_attack,
    smooth_relu,
)
from propdsl.errors import UsageError
from propdsl.explain import cosine, saliency
from propdsl.region import Region

INF = math.inf
F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear_case(dtype=F64, batch=8, n=6, seed=0):
    g = _gen(seed)
    w = torch.randn(n, generator=g, dtype=dtype)
    c = torch.rand(batch, n, generator=g, dtype=dtype)
    return w, 0.3, c


def _rel_gap(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((exact - got).abs() / exact.abs().clamp_min(1e-12)).max().item()


@pytest.mark.parametrize("attack", [PGD(), APGD()], ids=["pgd", "apgd"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_linf_ball_on_a_linear_model_reaches_the_closed_form(attack, dtype):
    w, b, c = _linear_case(dtype)
    eps = 0.1
    res = run_attack(attack, lambda x: x @ w + b, [Region.ball(c, eps)], generator=_gen())
    exact = c @ w + b + eps * w.abs().sum()  # max of w.x + b over the ball
    assert _rel_gap(res.value, exact) < 1e-3
    assert res.value.dtype == dtype and res.points[0].dtype == dtype


@pytest.mark.parametrize("attack", [PGD(), APGD()], ids=["pgd", "apgd"])
def test_linf_ball_and_box_on_a_linear_model_reaches_the_per_coordinate_extremes(attack):
    w, b, c = _linear_case()
    c[0, :3] = torch.tensor([0.0, 1.0, 0.97], dtype=F64)  # on and near the box's faces
    eps = 0.2
    lo, hi = (c - eps).clamp(0, 1), (c + eps).clamp(0, 1)
    exact = torch.where(w > 0, hi, lo) @ w + b
    region = Region.ball(c, eps, INF, lo=0.0, hi=1.0)
    res = run_attack(attack, lambda x: x @ w + b, [region], generator=_gen())
    assert _rel_gap(res.value, exact) < 1e-3


@pytest.mark.parametrize(
    "attack",
    [APGD(), PGD(random_start=False), PGD(steps=20, step_size=10.0)],
    ids=["apgd", "pgd-centre-start", "pgd-long-steps"],
)
def test_l2_ball_on_a_linear_model_reaches_the_closed_form(attack):
    w, b, c = _linear_case()
    eps = 0.3
    res = run_attack(attack, lambda x: x @ w + b, [Region.ball(c, eps, 2)], generator=_gen())
    assert _rel_gap(res.value, c @ w + b + eps * w.norm()) < 1e-3


@pytest.mark.parametrize(
    "attack", [APGD(), PGD(steps=20, step_size=10.0)], ids=["apgd", "pgd-long-steps"]
)
def test_l1_ball_on_a_linear_model_reaches_the_closed_form(attack):
    w, b, c = _linear_case()
    eps = 0.3
    res = run_attack(attack, lambda x: x @ w + b, [Region.ball(c, eps, 1)], generator=_gen())
    assert _rel_gap(res.value, c @ w + b + eps * w.abs().max()) < 1e-3


@pytest.mark.parametrize("attack", [PGD(), APGD()], ids=["pgd", "apgd"])
def test_two_binders_move_jointly(attack):
    # max ||W x1 - W x2||_1 over two L-inf balls, W diagonal: coordinate i contributes
    # |w_i| (|c1_i - c2_i| + 2 eps) when the centres differ by more than 2 eps (the sign of each
    # difference then never flips, so the objective is linear on the product of the balls).
    eps = 0.05
    g = _gen(1)
    w = torch.randn(5, generator=g, dtype=F64)
    c1 = torch.rand(4, 5, generator=g, dtype=F64)
    gap = (0.2 + torch.rand(4, 5, generator=g, dtype=F64)) * torch.where(
        torch.rand(4, 5, generator=g) < 0.5, -1.0, 1.0
    ).to(F64)
    c2 = c1 + gap

    def objective(x1, x2):
        return ((x1 - x2) * w).abs().sum(dim=1)

    regions = [Region.ball(c1, eps), Region.ball(c2, eps)]
    res = run_attack(attack, objective, regions, generator=_gen())
    exact = (w.abs() * (gap.abs() + 2 * eps)).sum(dim=1)
    assert _rel_gap(res.value, exact) < 1e-3
    assert len(res.points) == 2
    assert all(bool(r.contains(x).all()) for r, x in zip(regions, res.points, strict=True))


class _Recorder:
    """An objective that remembers every point and value it was called with."""

    def __init__(self, fn):
        self.fn, self.points, self.values = fn, [], []

    def __call__(self, *xs):
        v = self.fn(*xs)
        self.points.append([x.detach().clone() for x in xs])
        self.values.append(v.detach().clone())
        return v


def _small_net(act=nn.Tanh, n_in=4, seed=0, dtype=F64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(n_in, 16), act(), nn.Linear(16, 3)).to(dtype)


@pytest.mark.parametrize("attack", [PGD(steps=8), APGD(steps=12)], ids=["pgd", "apgd"])
@pytest.mark.parametrize("p", [1, 2, INF])
def test_every_iterate_stays_in_ball_and_box_and_the_best_one_is_returned(attack, p):
    net = _small_net()
    x = torch.rand(6, 4, dtype=F64)
    region = Region.ball(x, 0.4, p, lo=0.0, hi=1.0)
    rec = _Recorder(lambda v: net(v)[:, 1] - net(v)[:, 0])
    res = run_attack(attack, rec, [region], models=[net], generator=_gen())
    assert len(rec.values) == attack.steps + 1
    for (pt,) in rec.points:
        assert bool(region.contains(pt, tol=1e-9).all())
    seen = torch.stack(rec.values)
    assert torch.equal(res.value, seen.amax(dim=0))  # the best iterate, not the last one
    assert torch.allclose(res.value, rec.fn(res.points[0]).detach())


@pytest.mark.parametrize("kind", [PGD, APGD])
def test_restarts_never_do_worse_than_a_single_run_from_the_same_start(kind):
    net = _small_net(seed=3)
    x = torch.rand(16, 4, dtype=F64)
    region = Region.ball(x, 0.5, INF, lo=0.0, hi=1.0)

    def objective(v):
        out = net(v)
        return torch.sin(3 * out[:, 0]) + out[:, 2]  # many local maxima

    for seed in range(3):
        single = run_attack(kind(steps=5), objective, [region], generator=_gen(seed))
        many = run_attack(kind(steps=5, restarts=4), objective, [region], generator=_gen(seed))
        assert bool((many.value >= single.value).all())
    # The restarts found something better somewhere, so they are not all copies of the first.
    assert bool((many.value > single.value).any())


def test_parameter_grads_and_training_flags_are_left_alone():
    net = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, 2))
    net.train()
    net[2].eval()  # a mixed state must come back exactly
    flags = [m.training for m in net.modules()]
    for prm in net.parameters():
        prm.grad = torch.full_like(prm, 7.0)
    seen_training = []

    def objective(v):
        seen_training.append(any(m.training for m in net.modules()))
        return net(v)[:, 0]

    x = torch.rand(5, 4)
    with torch.no_grad():  # the attack still gets its gradients
        res = run_attack(PGD(steps=3), objective, [Region.ball(x, 0.1)], models=[net])
    assert seen_training and not any(seen_training)
    assert [m.training for m in net.modules()] == flags
    assert all(bool((prm.grad == 7.0).all()) for prm in net.parameters())
    assert not res.value.requires_grad and not res.points[0].requires_grad


def test_a_module_with_its_own_train_gets_its_call():
    # The fast path sets the flags directly; a module that overrides `train` (here: one that
    # freezes a statistic when put in eval mode) must still see `eval()` called on it.
    class Freezing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)
            self.calls: list[bool] = []

        def train(self, mode: bool = True):
            self.calls.append(mode)
            return super().train(mode)

        def forward(self, v):
            return self.lin(v)

    net = nn.Sequential(nn.Linear(4, 4), Freezing())
    net.train()
    net[1].calls.clear()
    seen = []

    def objective(v):
        seen.append([m.training for m in net.modules()])
        return net(v)[:, 0]

    run_attack(PGD(steps=2), objective, [Region.ball(torch.rand(3, 4), 0.1)], models=[net])
    assert net[1].calls == [False]  # eval() reached it; the flags came back without a call
    assert seen and not any(any(flags) for flags in seen)
    assert all(m.training for m in net.modules())


def test_flags_are_restored_when_the_objective_raises():
    net = _small_net()
    net.train()

    def objective(v):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_attack(PGD(), objective, [Region.ball(torch.rand(2, 4, dtype=F64), 0.1)], models=[net])
    assert all(m.training for m in net.modules())


@pytest.mark.parametrize("kind", [PGD, APGD])
def test_zero_radius_returns_the_centre(kind):
    w, b, c = _linear_case()
    res = run_attack(kind(), lambda x: x @ w + b, [Region.ball(c, 0.0, 2)], generator=_gen())
    assert torch.equal(res.points[0], c)
    assert torch.allclose(res.value, c @ w + b)


def test_a_plain_box_region_is_attacked_too():
    w, b, _ = _linear_case()
    lo = torch.zeros(3, 6, dtype=F64)
    res = run_attack(APGD(), lambda x: x @ w + b, [Region.box(lo, lo + 1)], generator=_gen())
    assert _rel_gap(res.value, (w.clamp_min(0).sum() + b).expand(3)) < 1e-3


def test_same_generator_state_gives_the_same_result():
    net = _small_net()
    region = Region.ball(torch.rand(4, 4, dtype=F64), 0.3)

    def run():
        return run_attack(PGD(restarts=2), lambda v: net(v)[:, 0], [region], generator=_gen(5))

    a, b = run(), run()
    assert isinstance(a, AttackResult)
    assert torch.equal(a.points[0], b.points[0]) and torch.equal(a.value, b.value)


def test_smooth_relu_replaces_every_relu_form_by_softplus():
    x = torch.linspace(-2, 2, 9, dtype=F64)
    expected = nn.functional.softplus(x, beta=4.0)
    with smooth_relu(4.0):
        outs = [
            nn.ReLU()(x),
            nn.ReLU(inplace=True)(x.clone()),
            torch.relu(x),
            nn.functional.relu(x),
            x.relu(),
            torch.relu_(x.clone()),
        ]
    for out in outs:
        assert torch.allclose(out, expected)
    assert torch.equal(torch.relu(x), x.clamp_min(0))  # only inside the block


def test_surrogate_changes_the_input_gradient_of_a_saliency_objective():
    net = _small_net(nn.ReLU, n_in=5)
    x = torch.rand(4, 5, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])

    def penalty(v):
        return saliency(net, v, y).pow(2).sum(dim=1)

    (plain,) = torch.autograd.grad(penalty(x).sum(), x)
    with smooth_relu(10.0):
        (smooth,) = torch.autograd.grad(penalty(x).sum(), x)
    assert bool((plain == 0).all())  # piecewise-constant saliency: flat almost everywhere
    assert bool((smooth.flatten(1).abs().amax(dim=1) > 0).all())


def _saliency_attack_case():
    net = _small_net(nn.ReLU, n_in=6, seed=1, dtype=torch.float32)
    x = torch.rand(32, 6)
    y = net(x).argmax(dim=1)
    s0 = saliency(net, x, y, create_graph=False)

    def objective(v):
        return -cosine(saliency(net, v, y), s0)

    return net, Region.ball(x, 0.3, INF, lo=0.0, hi=1.0), objective


def test_vanishing_gradient_warning_fires_without_a_surrogate_only():
    net, region, objective = _saliency_attack_case()
    with pytest.warns(VanishingGradientWarning, match="surrogate_beta") as record:
        plain = run_attack(PGD(), objective, [region], models=[net], generator=_gen())
    assert record[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smooth = run_attack(
            PGD(surrogate_beta=10.0), objective, [region], models=[net], generator=_gen()
        )
        # The value is that of the true (ReLU) model at the returned points.
        assert torch.allclose(smooth.value, objective(smooth.points[0]).detach())
        # Same start; the surrogate moves and finds more violating points.
        assert bool((smooth.value >= plain.value).all())
        assert (smooth.value > plain.value + 1e-3).float().mean() > 0.5
        # An ordinary objective does not warn either.
        run_attack(PGD(), lambda v: net(v)[:, 0], [region], models=[net])


def test_apgd_checkpoints_follow_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (Croce & Hein 2020, section 3.2)
    assert _apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert _apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]


def test_options_are_keyword_only_frozen_and_validated():
    with pytest.raises(TypeError):
        PGD(10)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PGD().steps = 3  # type: ignore[misc]
    for bad in (
        lambda: PGD(steps=-1),
        lambda: PGD(restarts=0),
        lambda: PGD(step_size=0.0),
        lambda: APGD(rho=1.5),
        lambda: APGD(momentum=-0.1),
        lambda: APGD(surrogate_beta=0.0),
    ):
        with pytest.raises(ValueError):
            bad()


def test_bad_calls_are_rejected():
    x = torch.rand(3, 2)
    with pytest.raises(ValueError, match="shape"):
        run_attack(PGD(), lambda v: v.sum(), [Region.ball(x, 0.1)])
    with pytest.raises(ValueError, match="batch"):
        run_attack(PGD(), lambda a, b: a.sum(1), [Region.ball(x, 0.1), Region.ball(x[:2], 0.1)])
    with pytest.raises(TypeError):
        run_attack("pgd", lambda v: v.sum(1), [Region.ball(x, 0.1)])  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", [PGD, APGD])
def test_cuda(kind):
    w = torch.randn(6, device="cuda")
    c = torch.rand(4, 6, device="cuda")
    region = Region.ball(c, 0.1, INF, lo=0.0, hi=1.0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    res = run_attack(kind(surrogate_beta=5.0), lambda x: x @ w, [region], generator=gen)
    assert res.points[0].device.type == "cuda" and bool(region.contains(res.points[0]).all())


def test_the_old_places_re_export_the_attacks():
    """`propdsl.attacks` was `propdsl.loss.attacks`: code importing from the old module, from
    `propdsl.loss` or from `propdsl` gets the same objects."""
    import propdsl
    import propdsl.loss
    import propdsl.loss.attacks as old

    for name in ("APGD", "PGD", "AttackResult", "VanishingGradientWarning", "run_attack"):
        assert getattr(old, name) is getattr(propdsl.loss, name) is globals()[name], name
    assert old.smooth_relu is smooth_relu
    assert propdsl.PGD is PGD and propdsl.APGD is APGD


def test_resolve_attack_takes_options_names_and_none():
    assert resolve_attack(None) == PGD()
    assert resolve_attack("apgd") == APGD()
    given = PGD(steps=3)
    assert resolve_attack(given) is given
    with pytest.raises(UsageError, match="unknown attack 'fgsm'; known attacks: pgd, apgd"):
        resolve_attack("fgsm")
    with pytest.raises(UsageError, match="expected a name or an option value"):
        resolve_attack(3)
