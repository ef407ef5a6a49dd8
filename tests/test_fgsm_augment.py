"""Casadio et al. 2022's FGSM-augmented training set: one FGSM copy of every training input,
made with the initial model before the first step, then fixed."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import propdsl
from propdsl.loss.augment import FGSMAugment
from propdsl.train import TrainOptions, train


def test_copies_are_the_fgsm_step_of_a_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    copies = FGSMAugment(eps=0.1, batch=7).copies(model, x, y)
    # hand: d CE / d x = W^T (softmax(Wx + b) - onehot(y))
    with torch.no_grad():
        p = torch.softmax(model(x), 1) - nn.functional.one_hot(y, 3).double()
        step = p @ model.weight
    torch.testing.assert_close(copies, (x + 0.1 * step.sign()).clamp(0, 1))
    assert bool((copies - x).abs().max() <= 0.1 + 1e-12)
    both_x, both_y = FGSMAugment(eps=0.1).augment(model, x, y)
    assert torch.equal(both_x[:40], x) and torch.equal(both_y, torch.cat([y, y]))


def test_options_are_checked():
    with pytest.raises(ValueError):
        FGSMAugment(eps=0.0)
    with pytest.raises(propdsl.CheckError, match="3:24: error: 'eps' must be > 0, got -1"):
        propdsl.load(
            "network f : Tensor[4] -> Tensor[2]\n"
            'train f on tensors(path = "d.pt") {\n'
            "  augment = fgsm(eps = -1)\n  loss = cross_entropy\n}\n"
        )


SPEC = """
network f : Tensor[1, 8, 8] -> Tensor[10]

train f on digits(split = "train", limit = 64) {
  model     = mlp(hidden = [8])
  epochs    = 2
  batch     = 32
  optimizer = adam(lr = 0.01)
  augment   = fgsm(eps = 0.1)
  loss      = cross_entropy
}
"""


@pytest.mark.slow
def test_the_set_is_made_once_from_the_initial_model_and_resumes_the_same(tmp_path, monkeypatch):
    calls = []
    original = FGSMAugment.augment

    def record(self, model, x, y):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        out = original(self, model, x, y)
        calls.append((weights, out))
        return out

    monkeypatch.setattr(FGSMAugment, "augment", record)
    spec = propdsl.load(SPEC)

    def opts(out, **kw):
        return TrainOptions(out=out, quiet=True, threads=1, eval_samples=16, **kw)

    whole = train(spec, opts(tmp_path / "whole"))
    assert len(calls) == 1  # once for both epochs: the set is fixed
    ((initial, (x_aug, y_aug)),) = calls
    n = x_aug.shape[0] // 2
    assert y_aug.shape[0] == 2 * n and torch.equal(y_aug[:n], y_aug[n:])
    # made before training: the weights it saw are not the trained ones
    trained = whole.model.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)
    assert whole.metrics[0]["loss"] > 0
    # config records it
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["augment"] == "fgsm(eps = 0.1)"

    def interrupt(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        train(spec, opts(tmp_path / "cut"), on_epoch=interrupt)
    resumed = train(spec, opts(tmp_path / "cut", resume=True))
    # the resumed process rebuilt the same set from the same initial weights
    assert len(calls) == 2
    for (w1, (xa, _)), (w2, (xb, _)) in zip(calls, calls[1:], strict=False):
        assert all(torch.equal(w1[k], w2[k]) for k in w1)
        assert torch.equal(xa, xb)
    assert torch.equal(calls[0][1][0], x_aug)
    for name, tensor in trained.items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
