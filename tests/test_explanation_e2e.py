"""End to end: a curvature regulariser makes saliency maps certifiably stable (issue 6).

`specs/explanation_certified.prop` trained as written (cross-entropy plus the curvature penalty)
and with `lambda = 0` (cross-entropy alone), same seed and epochs, then `propdsl verify` on the
same 100 test images. docs/explanation_certification.md has the measured figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import propdsl
from propdsl import cli
from propdsl.explain import cosine, saliency
from propdsl.models import build_model
from propdsl.region import Region
from propdsl.runs import Run
from propdsl.train import load_split
from propdsl.verify.jacobian import distance_bound, jacobian_bounds

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "specs" / "explanation_certified.prop"
PROPERTIES = ("stable_saliency", "aligned_saliency")


def propdsl_cli(*args: str) -> str:
    done = CliRunner().invoke(cli.app, [str(a) for a in args])
    assert done.exit_code == 0, done.output
    return done.output


def test_the_spec_checks():
    out = propdsl_cli("check", SPEC)
    assert "ok" in out
    for name in PROPERTIES:
        assert name in out


def test_both_properties_go_to_the_jacobian_bounds():
    """Not `unsupported`: an untrained softplus model of the spec, a few test images."""
    spec = propdsl.load(SPEC)
    test = load_split(spec, spec.verify_block, "test", split_seed=0)
    model = build_model(
        "mlp", (1, 8, 8), 10, hidden=[64], activation=("softplus", {"beta": 1.0}), seed=0
    )
    verdicts = spec.verify(model, test.x[:4], test.y[:4], list(PROPERTIES))
    for name in PROPERTIES:
        assert verdicts[name].reason is None
        assert "unsupported" not in verdicts[name].status


def relative_change(model, x, y, points) -> torch.Tensor:
    """norm(s(x') - s(x), 2) / norm(s(x), 2) of the true class's saliency, per sample."""
    g = saliency(model, x, y, create_graph=False)
    moved = saliency(model, points, y, create_graph=False)
    return (moved - g).flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)


def search(model, x, y, eps: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest relative change and the smallest cosine of the saliency maps at random points
    and at the points of an independent attack (PGD with a seed of its own, not the verifier's
    APGD) on the relative change, per sample: both inside the ball intersected with [0, 1]."""
    region = Region.ball(x, eps, math.inf, lo=0.0, hi=1.0)
    generator = torch.Generator().manual_seed(seed)
    g = saliency(model, x, y, create_graph=False).detach()
    worst_change = torch.zeros(len(x))
    worst_cosine = torch.ones(len(x))
    candidates = [region.sample(generator) for _ in range(16)]
    point = region.sample(generator)
    for _ in range(30):  # signed-gradient ascent on the change, projected
        point.requires_grad_(True)
        s = saliency(model, point, y, create_graph=True)
        step = torch.autograd.grad((s - g).flatten(1).norm(dim=1).sum(), point)[0]
        point = region.project(point.detach() + 0.25 * eps * step.sign())
        candidates.append(point)
    for p in candidates:
        assert bool(region.contains(p).all())
        worst_change = torch.maximum(worst_change, relative_change(model, x, y, p).detach())
        s = saliency(model, p, y, create_graph=False)
        worst_cosine = torch.minimum(worst_cosine, cosine(s, g).detach())
    return worst_change, worst_cosine


@pytest.mark.slow  # 8-15 s: two digits MLPs of 30 epochs, verified on 100 test images
def test_the_regulariser_raises_the_verified_rate(tmp_path: Path):
    runs = {"regularised": tmp_path / "regularised", "baseline": tmp_path / "baseline"}
    params = {"regularised": [], "baseline": ["-p", "lambda=0"]}
    for name, run in runs.items():
        propdsl_cli("train", SPEC, "--out", run, "--threads", "1", "-q", *params[name])
        propdsl_cli("verify", SPEC, "--run", run, "--threads", "1", *params[name])

    spec = propdsl.load(SPEC)
    eps, delta, tau = (float(spec.params[k]) for k in ("eps", "delta", "tau"))
    test = load_split(spec, spec.verify_block, "test", split_seed=0)
    x, y = test.x[:100], test.y[:100]
    rates: dict[str, dict[str, float]] = {}
    falsified_rate: dict[str, float] = {}
    for name, run in runs.items():
        model = Run.open(run).load_model("best")
        with torch.no_grad():
            accuracy = float((model(test.x).argmax(1) == test.y).float().mean())
        assert accuracy >= 0.9, f"{name}: clean accuracy {accuracy:.3f}"

        report = json.loads((run / "verify.json").read_text())
        assert report["samples"] == 100
        status = {
            p: [s["status"] for s in report["properties"][p]["per_sample"]] for p in PROPERTIES
        }
        rates[name] = {p: status[p].count("verified") / 100 for p in PROPERTIES}
        falsified_rate[name] = status["stable_saliency"].count("falsified") / 100
        for p in PROPERTIES:
            assert "unsupported" not in status[p]

        # no verified sample has a counterexample: an independent search finds none
        change, cos = search(model, x, y, eps, seed=1)
        verified = torch.tensor([s == "verified" for s in status["stable_saliency"]])
        assert bool((change[verified] <= delta + 1e-5).all())
        verified = torch.tensor([s == "verified" for s in status["aligned_saliency"]])
        assert bool((cos[verified] >= tau - 1e-5).all())

        # the certified bound of the relative change holds at every point found
        region = Region.ball(x, eps, math.inf, lo=0.0, hi=1.0)
        g = saliency(model, x, y, create_graph=False).detach()
        with torch.no_grad():
            lo, hi = jacobian_bounds(model, region=region, outputs=y[:, None])
            bound = distance_bound(lo[:, 0], hi[:, 0], g, 2) / g.flatten(1).norm(dim=1)
        assert bool((change <= bound + 1e-4).all())

        # every falsified sample's counterexample lies in the region and violates the property
        falsified = [i for i, s in enumerate(status["stable_saliency"]) if s == "falsified"]
        if falsified:
            data = np.load(run / report["results"] / "counterexamples" / "stable_saliency.npz")
            assert sorted(data["index"].tolist()) == falsified
            idx = torch.as_tensor(data["index"])
            points = torch.as_tensor(data["point[x']"])
            inside = Region.ball(x[idx], eps, math.inf, lo=0.0, hi=1.0).contains(points)
            assert bool(inside.all())
            assert bool((relative_change(model, x[idx], y[idx], points) > delta).all())

    print(rates, falsified_rate)
    # measured (seed 0): verified 97% against 0%, and the baseline is falsified on 18%: its
    # saliency really moves by more than delta there, so the gap is not only the bounds'
    assert rates["regularised"]["stable_saliency"] >= rates["baseline"]["stable_saliency"] + 0.5
    assert falsified_rate["baseline"] >= 0.05
    assert falsified_rate["regularised"] <= falsified_rate["baseline"]
    # cosine >= 0.8 holds empirically for both models; only the bounds tell them apart (the
    # docs say why), so no margin is asserted here
    assert rates["regularised"]["aligned_saliency"] >= rates["baseline"]["aligned_saliency"]
