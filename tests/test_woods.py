"""Woods, Chen & Teuscher 2019: the gradient regulariser with its random score, and the adaptive
weight psi, against hand computations.

The regulariser is psi * mean over the image of |d s(x) / dx|^2, with s drawn per sample: a
uniformly random logit with probability 0.8, the margin f_y - max_{j != y} f_j with probability
0.2. psi follows R_t = max(0, R_{t-1} + clip(-ln(L_t / 1.5), -0.01, 1)), psi = 220 exp(0.02 R_t).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import propdsl
from propdsl.interpret import Env
from propdsl.logics import get_logic
from propdsl.loss import compile as C
from propdsl.loss.schedules import WoodsPsi
from propdsl.simplify import simplify
from propdsl.train import TrainOptions, train

ROOT = Path(__file__).resolve().parent.parent
WOODS = ROOT / "specs" / "methods" / "gradient_woods.prop"
NET = "network f : Tensor[4] -> Tensor[3]\n"


def hand_psi(losses: list[float]) -> list[float]:
    """psi after each step, from the paper's recurrence written out."""
    r, out = 0.0, []
    for loss in losses:
        step = -math.log(loss / 1.5)
        step = min(1.0, max(-0.01, step))
        r = max(0.0, r + step)
        out.append(220.0 * math.exp(0.02 * r))
    return out


def test_the_schedule_is_the_recurrence():
    s = WoodsPsi(weight="psi")
    losses = [2.3, 2.0, 1.6, 1.4, 0.9, 0.2, 0.05, 3.0, 3.0, 1.5, 0.6]
    r, got = 0.0, []
    for loss in losses:
        r = s.advance(r, loss)
        got.append(s.value(r))
    assert got == pytest.approx(hand_psi(losses), rel=1e-12)
    # the first three steps are above the target: R stays at its floor 0 (psi 220)
    assert got[:3] == [220.0] * 3
    # 0.05 < 1.5 / e: the rise is clipped at 1
    assert s.advance(0.0, 0.05) == 1.0


def test_the_objective_uses_the_current_psi_and_advances_it():
    spec = propdsl.load(
        NET + "param psi : Real = 1.0\n"
        'train f on tensors(path = "d.pt") {\n'
        '  adaptive = woods_psi(weight = "psi")\n'
        "  loss     = cross_entropy + psi * mean(grad(f(x)[0], x) ^ 2)\n"
        "}\n"
    )
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    objective = spec.objective()
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.rand(16, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (16,), generator=g),
    )
    ces = []
    for _ in range(4):
        psi = objective.adaptive_weight()
        value = objective(model, x, y)
        ce = torch.nn.functional.cross_entropy(model(x), y)
        penalty = model.weight[0].pow(2).mean()  # d f_0 / dx = W_0 for every sample
        torch.testing.assert_close(value, ce + psi * penalty)
        ces.append(float(ce.detach()))
        objective.step_adaptive()
        with torch.no_grad():
            model.weight.mul_(2.0)  # change the CE between steps
    assert objective.adaptive_weight() == pytest.approx(hand_psi(ces)[-1], rel=1e-12)


def test_adaptive_needs_a_real_param_that_the_loss_uses():
    def error(setting: str, loss: str = "cross_entropy + psi * mean(x)") -> str:
        with pytest.raises(propdsl.CheckError) as info:
            propdsl.load(
                NET + "param psi : Real = 1.0\nparam n : Nat = 1\n"
                'train f on tensors(path = "d.pt") {\n'
                f"  adaptive = {setting}\n  loss = {loss}\n}}\n"
            )
        (d,) = info.value.diagnostics
        return f"{d.span.line}:{d.span.col}: {d.message}"

    assert error('woods_psi(weight = "phi")') == (
        "5:14: 'adaptive' sets param 'phi', but the spec has no Real param of that name"
    )
    assert error('woods_psi(weight = "n")').endswith("no Real param of that name")
    assert error('woods_psi(weight = "psi")', "cross_entropy") == (
        "5:14: 'adaptive' sets param 'psi', which the loss does not use"
    )
    assert (
        error("woods_psi(base = 2)")
        == '5:14: woods_psi(...) needs weight = "NAME", the param it sets'
    )


# -- the random score ----------------------------------------------------------------------------
SCORE = NET + (
    "let margin(v, c) = v[c] - max j in classes: if j == c then min(v) else v[j]\n"
    "let score(v, c) = if uniform() < 0.8 then v[random_class(v)] else margin(v, c)\n"
    'train f on tensors(path = "d.pt") {\n'
    "  loss = mean(grad(score(f(x), y), x) ^ 2)\n"
    "}\n"
)


def per_sample(spec, model, x, y, seed: int) -> torch.Tensor:
    """The loss per sample (the objective averages it), compiled as the objective compiles it."""
    expr = simplify(spec.train_block.get("loss"), spec.checked.params)
    code = C.Compiler()(expr)
    config = C.CompileConfig(generator=torch.Generator().manual_seed(seed))
    env = Env({"f": model}, {"x": x, "y": y}, x.shape[0], get_logic("dl2"), config)
    return code(env).detach()


def test_the_score_is_a_random_logit_four_times_in_five_else_the_margin():
    model = nn.Linear(4, 3).double()
    with torch.no_grad():  # rows with distinct squared means, and distinct differences
        model.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 0, 3.0]]))
        model.bias.zero_()
    W = model.weight.detach()
    n = 6000
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    value = per_sample(propdsl.load(SCORE), model, x, y, seed=2)
    # hand: the logits' gradients are the rows of W; the margin's is W_y - W_j*, j* the
    # largest other logit at x
    logit_values = W.pow(2).mean(1)  # [3]: 0.25, 1, 2.25
    logits = x @ W.T
    others = logits.masked_fill(nn.functional.one_hot(y, 3).bool(), -math.inf)
    j = others.argmax(1)
    margin_values = (W[y] - W[j]).pow(2).mean(1)
    is_logit = (value[:, None] - logit_values[None]).abs() < 1e-12
    is_margin = (value - margin_values).abs() < 1e-12
    # every sample's penalty is one of its own possible values
    assert bool((is_logit.any(1) | is_margin).all())
    # the margins' values (1.25, 2.5, 3.25) differ from every logit's: the branch is identified
    assert not bool((is_logit.any(1) & is_margin).any())
    share = is_margin.double().mean().item()
    assert abs(share - 0.2) < 0.03  # binomial standard error 0.005
    per_class = is_logit.double().mean(0)
    assert bool(((per_class - 0.8 / 3).abs() < 0.03).all())  # each ~0.267, s.e. 0.006


def test_the_draws_follow_the_generator():
    model = nn.Linear(4, 3).double()
    x = torch.rand(64, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (64,))
    spec = propdsl.load(SCORE)
    assert torch.equal(per_sample(spec, model, x, y, 5), per_sample(spec, model, x, y, 5))
    assert not torch.equal(per_sample(spec, model, x, y, 5), per_sample(spec, model, x, y, 6))


def test_a_property_may_not_draw_at_random():
    # a verdict on a coin toss would be meaningless: `verified` must never come from one
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(NET + "property p(x) = uniform() <= 0.5\n")
    (d,) = info.value.diagnostics
    assert (d.message, d.span.line, d.span.col) == (
        "property 'p' uses 'uniform', a random draw",
        2,
        17,
    )
    with pytest.raises(propdsl.CheckError, match="uses 'random_class'"):
        propdsl.load(NET + "property q(x) = f(x)[random_class(f(x))] >= 0\n")


@pytest.mark.slow
def test_woods_spec_trains_with_the_recurrence(tmp_path, monkeypatch):
    text = WOODS.read_text(encoding="utf-8")
    spec = propdsl.load(
        text.replace('digits(split = "train")', 'digits(split = "train", limit = 96)')
    )
    seen: list[float] = []
    original = C.Objective.step_adaptive

    def record(self):
        seen.append(self.last_cross_entropy)
        original(self)

    monkeypatch.setattr(C.Objective, "step_adaptive", record)
    options = TrainOptions(
        out=tmp_path / "run", epochs=2, batch=32, quiet=True, threads=1, eval_samples=16
    )
    result = train(spec, options)
    assert len(seen) == 6  # 3 batches of 32 an epoch
    assert [row["psi"] for row in result.metrics] == pytest.approx(
        [hand_psi(seen)[2], hand_psi(seen)[5]], rel=1e-12
    )


ADAPTIVE = """
network f : Tensor[1, 8, 8] -> Tensor[10]

param psi : Real = 1.0

train f on digits(split = "train", limit = 96) {
  model     = mlp(hidden = [8])
  epochs    = 2
  batch     = 32
  optimizer = adam(lr = 0.01)
  adaptive  = woods_psi(weight = "psi", base = 1, rate = 0.1, target = 100)
  loss      = cross_entropy + psi * mean(grad(f(x)[0], x) ^ 2)
}
"""


def test_resume_continues_the_adaptive_weight(tmp_path):
    # target 100 is far above any cross-entropy here: R rises by the clip, 1, every step, so
    # psi = exp(0.1 * steps); a resumed run must start from the saved R, not from 0
    spec = propdsl.load(ADAPTIVE)

    def opts(out, **kw):
        return TrainOptions(out=out, quiet=True, threads=1, eval_samples=16, **kw)

    whole = train(spec, opts(tmp_path / "whole"))
    assert [r["psi"] for r in whole.metrics] == pytest.approx([math.exp(0.3), math.exp(0.6)])

    def interrupt(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(spec, opts(tmp_path / "cut"), on_epoch=interrupt)
    resumed = train(spec, opts(tmp_path / "cut", resume=True))
    assert [r["psi"] for r in resumed.metrics] == [r["psi"] for r in whole.metrics]
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_a_distributed_run_refuses_an_adaptive_weight(tmp_path, monkeypatch):
    # each rank would follow its own shard's cross-entropy, so the weight would differ between
    # ranks: refused with a usage error before anything is written
    from propdsl import distributed
    from propdsl.errors import UsageError

    monkeypatch.setattr(distributed, "world", lambda: 2)
    with pytest.raises(UsageError, match="adaptive loss weight"):
        train(propdsl.load(ADAPTIVE), TrainOptions(out=tmp_path / "run", quiet=True, threads=1))
    assert not (tmp_path / "run").exists()
