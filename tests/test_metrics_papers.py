"""Metrics named after papers (propdsl.metrics), each against an independent computation:
hand values, brute force on 1-D models, closed forms on linear models, and a second
implementation in the test (the exact Hessian, the full Jacobian)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from propdsl import explain
from propdsl.attacks import APGD
from propdsl.metrics import (
    Criterion,
    Distance,
    accuracy_robustness_area,
    adversarial_explanations,
    alignment,
    etmann_metrics,
    linearized_robustness,
    loss_landscape,
    min_perturbation,
    rank_correlation,
    robustness,
    top_hessian_eigenvalue,
    woods_ara,
)

F64 = torch.float64
# Restarts: a margin max_j f_j - f_y is maximised over a ball with local maxima (one per class
# j), so a single run can settle on a farther class's boundary; see docs/evaluation.md.
ATTACK = APGD(steps=30, restarts=3)
ONE = APGD(steps=20, restarts=1)  # two classes, a linear margin: one maximum


def _linear(weight, bias=None) -> nn.Linear:
    w = torch.as_tensor(weight, dtype=F64)
    net = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None).double()
    with torch.no_grad():
        net.weight.copy_(w)
        if bias is not None:
            net.bias.copy_(torch.as_tensor(bias, dtype=F64))
    return net


def _tiny(act: nn.Module, d_in: int = 3, classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, 6), act, nn.Linear(6, classes)).double()


# -- the ARA integral ----------------------------------------------------------------------------


def test_the_ara_integral_is_the_hand_computation():
    # m = 0, .05, .1, .2, .4 (N = 5), C = 2: A(e) = 4/5 on [0, .05), 3/5 on [.05, .1), 2/5 on
    # [.1, .2), 1/5 on [.2, .4); minus 1/2, clipped: .3 * .05 + .1 * .05 = 0.02
    assert accuracy_robustness_area([0.4, 0.0, 0.1, 0.05, 0.2], 2) == pytest.approx(0.02)
    # C = 10: A(e) - 0.1 = .7, .5, .3, .1 on widths .05, .05, .1, .2
    expected = 0.7 * 0.05 + 0.5 * 0.05 + 0.3 * 0.1 + 0.1 * 0.2
    assert accuracy_robustness_area([0.4, 0.0, 0.1, 0.05, 0.2], 10) == pytest.approx(expected)
    assert accuracy_robustness_area([0.0, 0.0], 10) == 0.0  # nothing correct: no area
    assert accuracy_robustness_area([], 10) == 0.0


def test_the_ara_integral_matches_a_riemann_sum():
    gen = torch.Generator().manual_seed(3)
    d = torch.rand(40, generator=gen, dtype=F64) * 0.3
    d[:7] = 0.0
    grid = torch.linspace(0, 0.4, 400_001, dtype=F64)
    a = (d.unsqueeze(0) > grid.unsqueeze(1)).double().mean(1)
    riemann = float(((a - 0.1).clamp_min(0)[:-1] * torch.diff(grid)).sum())
    assert accuracy_robustness_area(d, 10) == pytest.approx(riemann, abs=1e-5)


# -- the minimal perturbation search -------------------------------------------------------------


def _brute_force_1d(model, x: float, label: int, criterion: Criterion) -> float:
    """The smallest |e| on a fine grid at which the criterion fails (1-D input)."""
    e = torch.linspace(-1.5, 1.5, 300_001, dtype=F64)
    with torch.no_grad():
        logits = model((x + e).unsqueeze(1))
    if criterion is Criterion.ARGMAX:
        fails = logits.argmax(1) != label
    else:
        fails = torch.softmax(logits, 1)[:, label] <= 1 / logits.shape[1]
    return float(e[fails].abs().min()) if bool(fails.any()) else math.inf


@pytest.mark.parametrize("criterion", list(Criterion))
def test_the_search_finds_the_brute_force_distance_on_a_1d_network(criterion):
    net = _tiny(nn.Tanh(), d_in=1, classes=3, seed=5)
    with torch.no_grad():
        net[0].weight.mul_(4)  # decision boundaries at x = -0.037 and 0.345
    xs = torch.linspace(-0.8, 0.8, 9, dtype=F64).unsqueeze(1)
    with torch.no_grad():
        labels = net(xs).argmax(1)  # correct everywhere under ARGMAX
    found = min_perturbation(
        net,
        xs,
        labels,
        criterion=criterion,
        distance=Distance.RMSE,  # D = 1: RMSE is |e|
        attack=ATTACK,
        max_distance=1.5,
        bisections=14,
    )
    for i, x in enumerate(xs.flatten().tolist()):
        truth = _brute_force_1d(net, x, int(labels[i]), criterion)
        if not bool(found.holds_at_x[i]):
            assert truth <= 1e-5 and found.distance[i] == 0.0
            continue
        assert bool(found.found[i])
        # an upper bound (a real breaking point), tight up to the bisection's resolution and the
        # attack's precision at a radius just above the boundary's
        assert truth - 1e-4 <= float(found.distance[i]) <= truth + 1e-3


def test_btr_breaks_where_argmax_still_holds():
    # logits (3x, 1, -5) at x = 0.8: argmax leaves class 0 at 3x = 1 (|e| = 0.467); p_0 <= 1/3
    # only at 2 e^{3x} <= e + e^-5, x <= 0.1023 (|e| = 0.698): BTR is broken later.
    net = _linear([[3.0], [0.0], [0.0]], [0.0, 1.0, -5.0])
    x, y = torch.tensor([[0.8]], dtype=F64), torch.tensor([0])
    by_hand = {
        Criterion.ARGMAX: 0.8 - 1 / 3,
        Criterion.BTR: 0.8 - math.log((math.e + math.exp(-5)) / 2) / 3,
    }
    for criterion, expected in by_hand.items():
        d = min_perturbation(
            net, x, y, criterion=criterion, attack=ATTACK, max_distance=1.0, bisections=14
        ).distance
        assert float(d[0]) == pytest.approx(expected, abs=2e-4)
        assert float(d[0]) == pytest.approx(_brute_force_1d(net, 0.8, 0, criterion), abs=2e-4)


def test_woods_ara_counts_a_misclassified_or_worse_than_random_sample_as_zero():
    net = _linear([[1.0, 0.0], [-1.0, 0.0]], [-0.5, 0.5])  # class 0 iff x_0 > 0.5
    x = torch.tensor([[0.6, 0.5], [0.9, 0.5], [0.2, 0.5]], dtype=F64)
    y = torch.tensor([0, 0, 0])  # the third is misclassified
    ara = woods_ara(net, x, y, Criterion.ARGMAX, attack=ONE, bisections=12)
    by_hand = [0.1 / math.sqrt(2), 0.4 / math.sqrt(2), 0.0]  # RMSE of the move to x_0 = 0.5
    assert list(ara.distances) == pytest.approx(by_hand, abs=1e-3)
    assert ara.area == pytest.approx(accuracy_robustness_area(by_hand, 2), abs=1e-3)
    assert ara.num_classes == 2 and ara.not_broken == 0


# -- Etmann et al. -------------------------------------------------------------------------------


def test_rho_rho_tilde_and_alignment_on_a_linear_model_are_the_closed_forms():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=gen, dtype=F64)
    b = torch.randn(3, generator=gen, dtype=F64)
    net = _linear(w, b)
    x = torch.randn(6, 5, generator=gen, dtype=F64)
    z = x @ w.T + b
    top = z.argmax(1)
    # distance to leaving a convex polyhedron: min over its facets
    exact = torch.tensor(
        [
            min(
                float((z[n, top[n]] - z[n, j]) / (w[top[n]] - w[j]).norm())
                for j in range(3)
                if j != top[n]
            )
            for n in range(6)
        ],
        dtype=F64,
    )
    assert torch.allclose(linearized_robustness(net, x), exact)
    rho, found = robustness(net, x, attack=ATTACK, max_l2=20.0, bisections=16)
    assert bool(found.all())
    assert bool((rho >= exact - 1e-6).all())  # an actual adversarial point: an upper bound
    assert torch.allclose(rho, exact, atol=20.0 / 2**16 + 1e-3)
    align, norm, beta = alignment(net, x)
    g = w[top]
    assert torch.allclose(align, (x * g).sum(1).abs() / g.norm(dim=1))
    assert torch.allclose(beta, b[top])
    # the same as propdsl.explain's alignment (a separate implementation)
    assert torch.allclose(align, explain.alignment(net, x).double())


def test_rho_starts_from_the_predicted_class_not_the_label():
    net = _linear([[1.0, 0.0], [-1.0, 0.0]], [-0.5, 0.5])  # class 0 iff x_0 > 0.5
    x = torch.tensor([[0.2, 0.0]], dtype=F64)  # predicted 1, whatever its label
    rho, found = robustness(net, x, attack=ONE, max_l2=2.0, bisections=14)
    assert bool(found[0]) and float(rho[0]) == pytest.approx(0.3, abs=1e-3)


def test_rho_tilde_matches_a_second_implementation_with_the_full_jacobian():
    net = _tiny(nn.Tanh(), d_in=4, classes=4, seed=2)
    x = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    ours = linearized_robustness(net, x)
    for n in range(5):
        jac = torch.autograd.functional.jacobian(lambda v: net(v.unsqueeze(0))[0], x[n])
        z = net(x[n].unsqueeze(0))[0].detach()
        i = int(z.argmax())
        ratios = [float((z[i] - z[j]) / (jac[i] - jac[j]).norm()) for j in range(4) if j != i]
        assert float(ours[n]) == pytest.approx(min(ratios), rel=1e-10)


def test_for_a_bias_free_relu_network_beta_is_zero():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)
    ).double()
    x = torch.randn(10, 4, dtype=F64)
    _, _, beta = alignment(net, x)
    assert torch.allclose(beta, torch.zeros_like(beta), atol=1e-12)  # Psi(x) = <x, g>


def test_etmann_metrics_summaries_are_over_the_per_sample_values():
    net = _tiny(nn.Tanh(), d_in=3, classes=3, seed=5)
    x = torch.rand(12, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    m = etmann_metrics(net, x, attack=ATTACK, max_l2=3.0, bisections=8, batch=5)
    s = m.summary()
    assert s["n"] == 12 and m.rho.shape == (12,)
    assert s["mean_alignment"] == pytest.approx(float(m.alignment.mean()))
    assert s["spearman_alignment_rho_tilde"] == pytest.approx(
        rank_correlation(m.alignment, m.rho_tilde)
    )
    assert bool((m.rho > 0).all() and (m.rho_tilde > 0).all())  # distances from inside
    assert s["rho_found"] == int(m.rho_found.sum())


def test_rank_correlation_against_the_pearson_correlation_of_ranks_by_hand():
    a = torch.tensor([0.1, 0.4, 0.2, 0.9, 0.3])  # ranks 0 3 1 4 2
    b = torch.tensor([1.0, 2.0, 3.0, 5.0, 4.0])  # ranks 0 1 2 4 3
    # d = 0, 2, -1, 0, -1: rho = 1 - 6 * 6 / (5 * 24) = 0.7
    assert rank_correlation(a, b) == pytest.approx(0.7)
    assert rank_correlation(a, torch.ones(5)) is None


# -- adversarial explanations --------------------------------------------------------------------


def test_adversarial_explanations_reach_the_closed_form_optimum_of_a_linear_model():
    # Two classes: log p_t = -softplus(z_o - z_t), largest where (w_t - w_o) . delta is: delta
    # = r (w_t - w_o) / ||w_t - w_o|| (no box, L2 ball of radius r = rmse * sqrt(D)).
    net = _linear([[1.0, 2.0, 0.0, -1.0], [0.0, -1.0, 1.0, 1.0]], [0.1, -0.1])
    x = torch.full((2, 4), 0.5, dtype=F64)
    out = adversarial_explanations(net, x, radius=0.1, attack=APGD(steps=60, restarts=1), box=None)
    assert out.points.shape == (2, 2, 4) and out.targets == (0, 1)
    assert bool((out.rmse <= 0.1 + 1e-9).all())
    r = 0.1 * math.sqrt(4)
    for t in (0, 1):
        d = net.weight[t] - net.weight[1 - t]
        best = x[0] + r * d / d.norm()
        p = torch.softmax(net(best.unsqueeze(0)), 1)[0, t].item()
        assert float(out.probability[0, t]) == pytest.approx(p, abs=1e-4)


def test_adversarial_explanations_stay_in_the_box():
    net = _tiny(nn.ReLU(), d_in=6, classes=3, seed=1)
    x = torch.rand(3, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = adversarial_explanations(net, x, radius=0.2, targets=[2], attack=ATTACK)
    assert out.targets == (2,)
    assert bool((out.points >= 0).all() and (out.points <= 1).all())
    with torch.no_grad():
        before = torch.softmax(net(x), 1)[:, 2]
    assert bool((out.probability[:, 0] >= before - 1e-12).all())


# -- landscapes and flatness ---------------------------------------------------------------------


def test_the_landscape_is_the_losses_at_the_shifted_points():
    net = _tiny(nn.Softplus(beta=3.0), d_in=5, classes=3, seed=3)
    x = torch.rand(4, 5, dtype=F64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 2, 0])
    gen = torch.Generator().manual_seed(9)
    land = loss_landscape(net, x, y, radius=0.2, points=5, generator=gen)
    assert land.steps.tolist() == pytest.approx([-0.2, -0.1, 0.0, 0.1, 0.2])
    # a second computation, by hand: d1 = sign of the CE gradient W1^T ... by autograd on a copy
    v = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(v), y, reduction="sum"), v)
    d1 = g.sign()
    for k, a in enumerate(land.steps.tolist()):
        ce = F.cross_entropy(net(x + a * d1), y).item()
        assert land.ce_adversarial[k].item() == pytest.approx(ce, rel=1e-10)
        s0 = explain.saliency(net, x, y, create_graph=False)
        s = explain.saliency(net, x + a * d1, y, create_graph=False)
        assert land.explanation_adversarial[k].item() == pytest.approx(
            float((s - s0).flatten(1).norm(dim=1).mean()), rel=1e-10
        )
    assert land.explanation_adversarial[2] == 0.0 and land.explanation_random[2] == 0.0
    assert land.ce_surface is not None and land.ce_surface.shape == (5, 5)
    assert land.ce_surface[2, 2] == pytest.approx(land.ce_adversarial[2].item())
    assert torch.allclose(land.ce_surface[:, 2], land.ce_adversarial)
    assert torch.allclose(land.ce_surface[2, :], land.ce_random)
    # ascent direction: the CE rises from the centre along d1 (first order)
    assert land.ce_adversarial[3] > land.ce_adversarial[2]


def test_the_explanation_landscape_of_a_linear_model_is_flat():
    net = _linear(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), [0.0, 0.1, 0.2])
    x = torch.rand(2, 4, dtype=F64)
    land = loss_landscape(net, x, torch.tensor([0, 1]), radius=0.5, points=3, surface=False)
    assert float(land.explanation_adversarial.abs().max()) < 1e-12
    assert land.ce_surface is None


@pytest.mark.parametrize("act", [nn.Tanh(), nn.ReLU()], ids=["tanh", "relu"])
def test_the_top_hessian_eigenvalue_is_the_exact_hessians(act):
    net = _tiny(act, d_in=4, classes=3, seed=6)
    x = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 2, 1])
    ours = top_hessian_eigenvalue(
        net, x, y, iterations=300, generator=torch.Generator().manual_seed(0)
    )
    for n in range(3):
        hess = torch.autograd.functional.hessian(
            lambda v, n=n: F.cross_entropy(net(v.unsqueeze(0)), y[n : n + 1]), x[n]
        )
        eig = torch.linalg.eigvalsh(hess)
        dominant = eig[eig.abs().argmax()]
        if isinstance(act, nn.ReLU):  # J^T (diag p - p p^T) J: positive semi-definite
            assert float(eig.min()) > -1e-12 and dominant == eig.max()
        assert float(ours[n]) == pytest.approx(float(dominant), rel=1e-6, abs=1e-12)


# -- propdsl eval --eps-grid / --attack / --metrics ----------------------------------------------

RUN_SPEC = """\
network f : Tensor[1, 8, 8] -> Tensor[10]
param eps : Real = 0.05

property robust(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1): argmax(f(x')) == y

train f on digits(split = "train", limit = 200) {
  model     = mlp(hidden = [16], activation = half_huber(delta = 0.5))
  epochs    = 2
  batch     = 50
  optimizer = adam(lr = 0.02)
  loss      = cross_entropy
}
"""


def _cli(*args: str):
    from typer.testing import CliRunner

    from propdsl import cli

    return CliRunner().invoke(cli.app, list(args))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--eps-grid", "0.1,-1", "--eps-grid must be non-negative"),
        ("--eps-grid", "0.1,abc", "--eps-grid must be a number"),
        ("--eps-grid", ",", "--eps-grid needs comma-separated radii"),
        ("--attack", "fgsm", "unknown attack 'fgsm'"),
        ("--attack", "pgd(steps=-1)", "steps must be a whole number"),
        ("--attack", "pgd(foo=1)", "pgd takes steps, restarts"),
        ("--attack", "apgd(restarts=0)", "restarts must be >= 1"),
        ("--attack", "pgd(steps=3", "must look like pgd(steps=20, restarts=2)"),
        ("--metrics", "etmann,bogus", "unknown metric 'bogus'; known metrics: etmann, ara"),
    ],
)
def test_bad_eval_options_are_one_line_usage_errors(tmp_path, option, value, message):
    spec = tmp_path / "s.prop"
    spec.write_text(RUN_SPEC, encoding="utf-8")
    # checked before the spec and the run are read: the run folder need not exist
    result = _cli("eval", str(spec), "--run", str(tmp_path / "none"), option, value)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_eval_writes_every_paper_metric_with_its_plots(tmp_path):
    import json

    from propdsl.train import TrainOptions, train

    spec_path = tmp_path / "s.prop"
    spec_path.write_text(RUN_SPEC, encoding="utf-8")
    out = tmp_path / "run"
    train(propdsl_load(spec_path), TrainOptions(out=out, threads=1, quiet=True, eval_samples=16))
    metrics = "etmann,ara,landscape,flatness,adv-explanations"
    result = _cli(
        "eval", str(out / "spec.prop"), "--run", str(out), "--samples", "12", "-q",
        "--eps-grid", "0,0.02,0.05", "--attack", "pgd(steps=5,restarts=1)", "--metrics", metrics,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads((out / "eval.json").read_text())
    folder = out / data["results"]
    assert data["attack"] == "pgd(steps=5, restarts=1)"
    curve = data["security_vs_eps"]
    assert curve["eps"] == [0.0, 0.02, 0.05]
    assert len(curve["properties"]["robust"]) == len(curve["accuracy"]["robust"]) == 3
    assert curve["accuracy"]["robust"][0] == pytest.approx(data["clean_accuracy"])
    assert "accuracy at eps" in result.output and "Etmann et al. 2019" in result.output
    paper = data["paper_metrics"]
    assert set(paper) == {"etmann", "ara", "landscape", "flatness", "adversarial_explanations"}
    # the attack ARA is eval's accuracy-robustness area
    assert paper["ara"]["attack"]["area"] == data["accuracy_robustness"]["area"]
    assert paper["ara"]["btr"]["criterion"] == "btr"
    # per sample, recomputed on the run's model and eval's samples: rho~ by the library, the
    # alignment by propdsl.explain's separate implementation
    from propdsl.session import load_samples, open_run

    setup = open_run(propdsl_load(out / "spec.prop"), out, device=torch.device("cpu"))
    ds = load_samples(setup, "test", 12, torch.device("cpu"))
    expected = linearized_robustness(setup.model, ds.x)
    assert paper["etmann"]["rho_tilde_per_sample"] == pytest.approx(expected.tolist(), rel=1e-5)
    align = explain.alignment(setup.model, ds.x)
    assert paper["etmann"]["alignment_per_sample"] == pytest.approx(align.tolist(), rel=1e-4)
    etmann = paper["etmann"]
    assert len(etmann["rho_tilde_per_sample"]) == 12
    assert etmann["mean_alignment"] == pytest.approx(
        sum(etmann["alignment_per_sample"]) / 12, rel=1e-9
    )
    assert len(paper["adversarial_explanations"]["probability"]) == 4
    assert len(paper["adversarial_explanations"]["targets"]) == 10
    for name in (
        "etmann_alignment_robustness.png",
        "woods_ara.png",
        "adversarial_explanations.png",
        "landscape_1d.png",
        "landscape_2d.png",
        "flatness.png",
        "security_vs_eps.png",
    ):
        assert name in data["plots"]
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def propdsl_load(path):
    import propdsl

    return propdsl.load(str(path))


def test_the_paper_metrics_of_eval_on_tabular_data():
    import json

    from propdsl.metrics import papers

    net = _tiny(nn.Tanh(), d_in=5, classes=3, seed=8)
    x = torch.rand(6, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = net(x).argmax(1)
    y[0] = (y[0] + 1) % 3  # one misclassified sample
    chosen = papers.parse_metrics("adv-explanations,flatness,ara,landscape,etmann")
    assert [m.value for m in chosen] == [
        "etmann",
        "ara",
        "landscape",
        "flatness",
        "adv-explanations",
    ]
    stages: list[str] = []
    r = papers.compute(
        chosen, net, x, y, box=None, image=False, radius=0.1, attack_ara=None,  # no box: fast
        batch=4, seed=0, device=torch.device("cpu"), start=stages.append,
    )  # fmt: skip
    assert stages == [f"metric {m.value}" for m in chosen]
    assert r.skipped == (("adv-explanations", "the data are not images"),)
    assert r.ara is not None and r.ara["attack"].distances[0] == 0.0  # misclassified
    for a in r.ara.values():
        assert a.area == accuracy_robustness_area(a.distances, 3)
    assert r.flatness is not None
    direct = top_hessian_eigenvalue(net, x[:4], y[:4], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(r.flatness[:4], direct)
    data = json.loads(json.dumps(papers.to_json(r)))  # plain JSON
    assert set(data) == {"etmann", "ara", "landscape", "flatness", "skipped"}
    assert (
        data["landscape"]["steps"][10] == pytest.approx(0.0, abs=1e-15)
        and len(data["landscape"]["ce_surface"]) == 21
    )
    lines = papers.table_lines(r)
    assert lines[-1] == "adv-explanations skipped: the data are not images"
    assert any(line.startswith("Woods et al. 2019 ARA (RMSE): attack") for line in lines)
