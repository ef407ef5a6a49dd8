"""Traced attack evaluations (propdsl.tracing): bit-identical to eager, never stale."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import propdsl
from propdsl import tracing
from propdsl.attacks import PGD, run_attack
from propdsl.models import build_model
from propdsl.region import Region
from propdsl.tracing import Traceable
from propdsl.train import TrainOptions, train

SPEC = Path(__file__).resolve().parent.parent / "specs" / "digits.prop"


@pytest.fixture(autouse=True)
def _fresh_traces():
    tracing.clear()
    yield
    tracing.clear()
    tracing.set_tracing(True, after=8)


def _model(kind: str, seed: int = 0) -> nn.Module:
    if kind == "mlp":
        return build_model("mlp", (1, 8, 8), 10, hidden=[16, 16], seed=seed)
    return build_model("cnn", (1, 8, 8), 10, channels=[4, 8], hidden=16, seed=seed)


def _batches(n: int = 3, size: int = 12):
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.rand(size, 1, 8, 8, generator=gen), torch.randint(0, 10, (size,), generator=gen))
        for _ in range(n)
    ]


def _run(prop: str, kind: str, traced: bool, restarts: int = 1, steps: int = 4):
    """Losses, truths and counterexamples of `prop` over three batches, with an SGD step in
    between (the weights change in place), with or without tracing from the start."""
    tracing.clear()
    tracing.set_tracing(traced, after=0)
    spec = propdsl.load(SPEC, params={"eps": 0.1})
    loss = spec.loss(prop, logic="dl2", attack=PGD(steps=steps, restarts=restarts))
    loss.generator = torch.Generator().manual_seed(0)
    model = _model(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = []
    for x, y in _batches():
        res = loss(model, x, y)
        opt.zero_grad()
        res.loss.mean().backward()
        opt.step()
        out.append((res.loss.detach(), res.satisfied, dict(res.counterexample)))
    used = [g for g in tracing._TRACES.values() if g is not None]
    return out, used


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize(
    "prop,restarts",
    [("classification_robust", 1), ("classification_robust", 3), ("standard_robust", 1)],
)
def test_traced_losses_are_bit_identical_to_eager(kind, prop, restarts):
    eager, none = _run(prop, kind, traced=False, restarts=restarts)
    traced, used = _run(prop, kind, traced=True, restarts=restarts)
    assert not none and used  # the traced run did trace, the eager one did not
    for (l0, s0, c0), (l1, s1, c1) in zip(eager, traced, strict=True):
        assert torch.equal(l0, l1) and torch.equal(s0, s1)
        assert c0.keys() == c1.keys()
        assert all(torch.equal(c0[k], c1[k]) for k in c0)


def test_standard_robustness_reads_the_lifted_f_x_as_an_input():
    # f(x) is computed once per attack in the parent environment; a graph that kept the first
    # batch's f(x) would give wrong values on the next batches (the comparison above would fail).
    _, used = _run("standard_robust", "mlp", traced=True)
    (graph,) = used
    # cached values of the environment (depth, then "c" for formulas or "s" for numbers)
    assert any(n[0].isdigit() and n.lstrip("0123456789")[0] in "cs" for n in graph.names)


def test_a_trace_is_not_used_for_another_model_of_the_same_architecture():
    tracing.set_tracing(True, after=0)
    x, y = _batches(1)[0]
    spec = propdsl.load(SPEC, params={"eps": 0.1})
    loss = spec.loss("classification_robust", logic="dl2", attack=PGD(steps=4))
    first, second = _model("mlp", seed=0), _model("mlp", seed=1)
    loss.generator = torch.Generator().manual_seed(0)
    loss(first, x, y)
    loss.generator = torch.Generator().manual_seed(0)
    got = loss(second, x, y)
    tracing.set_tracing(False)
    loss.generator = torch.Generator().manual_seed(0)
    want = loss(second, x, y)
    assert torch.equal(got.loss, want.loss)
    assert torch.equal(got.counterexample["x'"], want.counterexample["x'"])


def _attack(objective, x, traceable, seed=0):
    region = Region.ball(x, 0.1, math.inf, lo=0.0, hi=1.0)
    gen = torch.Generator().manual_seed(seed)
    return run_attack(PGD(steps=5), objective, [region], generator=gen, traceable=traceable)


def test_an_objective_reading_an_unnamed_tensor_stays_eager():
    tracing.set_tracing(True, after=0)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])
    x = torch.rand(6, 4, dtype=torch.float32)

    def objective(v):
        return torch.tanh(v @ w)

    site = Traceable("unnamed", lambda: {})
    _attack(objective, x, site)
    assert list(tracing._TRACES.values()) == [None]  # traced once, found unusable
    w.copy_(-w)  # the next attack must see the new weights
    got = _attack(objective, x, site)
    tracing.set_tracing(False)
    want = _attack(objective, x, None)
    assert torch.equal(got.value, want.value) and torch.equal(got.points[0], want.points[0])


def test_named_tensors_are_inputs_of_the_graph():
    tracing.set_tracing(True, after=0)
    x = torch.rand(6, 4)
    w = {"w": torch.tensor([1.0, -2.0, 0.5, 3.0])}

    def objective(v):
        return torch.tanh(v @ w["w"])

    site = Traceable("named", lambda: dict(w))
    _attack(objective, x, site)
    (graph,) = tracing._TRACES.values()
    assert graph is not None and graph.names == ["w"]
    w["w"] = torch.tensor([-1.0, 2.0, 0.5, -3.0])  # a new tensor under the same name
    got = _attack(objective, x, site)
    tracing.set_tracing(False)
    want = _attack(objective, x, None)
    assert torch.equal(got.value, want.value) and torch.equal(got.points[0], want.points[0])
    # a named tensor of another shape: the graph does not fit, the attack runs eagerly
    tracing.set_tracing(True)
    w["w"] = torch.tensor([[1.0], [2.0], [0.5], [-3.0]])
    got = _attack(lambda v: torch.tanh(v @ w["w"]).squeeze(1), x, site)
    tracing.set_tracing(False)
    want = _attack(lambda v: torch.tanh(v @ w["w"]).squeeze(1), x, None)
    assert torch.equal(got.value, want.value)


def test_random_draws_and_host_reads_keep_an_objective_eager():
    tracing.set_tracing(True, after=0)
    x = torch.rand(6, 4)

    def noisy(v):
        return (v + 0.01 * torch.randn_like(v)).sum(1)

    def branching(v):
        return v.sum(1) if bool(v.sum() > 0) else -v.sum(1)

    for name, objective in (("noisy", noisy), ("branching", branching)):
        _attack(objective, x, Traceable(name, lambda: {}))
    assert list(tracing._TRACES.values()) == [None, None]


def test_tracing_waits_for_a_hot_objective_and_can_be_turned_off():
    x = torch.rand(6, 4)

    def objective(v):
        return torch.tanh(v).sum(1)

    tracing.set_tracing(True, after=2)
    site = Traceable("hot", lambda: {})
    for _ in range(2):
        _attack(objective, x, site)
    assert not tracing._TRACES  # seen twice: not traced yet
    _attack(objective, x, site)
    assert [g is not None for g in tracing._TRACES.values()] == [True]
    tracing.clear()
    tracing.set_tracing(False, after=0)
    _attack(objective, x, site)
    assert not tracing._TRACES
    with pytest.raises(ValueError, match="non-negative"):
        tracing.set_tracing(after=-1)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_hot_graphs_run_in_torchscripts_interpreter(kind):
    # the comparisons above then cover the interpreted graphs (bit-identical losses and points)
    _, used = _run("classification_robust", kind, traced=True)
    assert [isinstance(g.module, torch.jit.ScriptModule) for g in used] == [True]


def test_a_graph_torchscript_gets_wrong_or_cannot_take_stays_python(monkeypatch):
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.rand(5, 3)
    module = make_fx(lambda a: (torch.tanh(a) * 2).sum(1))(x)

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported")

    monkeypatch.setattr(torch.jit, "trace", lambda m, example, **kw: lambda *a: [a[0].sum(1)])
    assert tracing._interpreted(module, [x]) is module  # different outputs: not used
    monkeypatch.setattr(torch.jit, "trace", refuse)
    monkeypatch.setattr(torch.jit, "script", refuse)
    assert tracing._interpreted(module, [x]) is module


def test_a_trace_that_draws_or_writes_leaves_the_generators_and_buffers_as_they_were():
    # Tracing runs the objective once: a model that draws noise or counts its calls in a
    # buffer (in eval mode too) is refused, and that run must not shift what follows.
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, v):
            self.calls += 1
            return self.lin(v + 0.01 * torch.randn_like(v))

    x = torch.rand(6, 4)

    def attacks(traced: bool):
        tracing.clear()
        tracing.set_tracing(traced, after=0)
        torch.manual_seed(0)
        net = Noisy()
        site = Traceable("noisy", lambda: {n: t for n, t in net.named_buffers()}, [net])
        values = [_attack(lambda v: net(v)[:, 0], x, site, seed=s).value for s in range(3)]
        return values, net.calls.clone(), torch.rand(3)

    eager, traced = attacks(False), attacks(True)
    assert list(tracing._TRACES.values()) == [None]  # tried once, refused
    assert all(torch.equal(a, b) for a, b in zip(eager[0], traced[0], strict=True))
    assert torch.equal(eager[1], traced[1]) and torch.equal(eager[2], traced[2])


def test_attacks_in_an_eager_block_neither_use_nor_make_nor_count_traces():
    """`tracing.eager()` (train's per-epoch validation): the attacks in it stay eager even when
    every objective is hot from its first attack, leave no trace or count behind, and the
    setting is back (nesting too) after the block."""
    tracing.set_tracing(True, after=0)
    spec = propdsl.load(SPEC, params={"eps": 0.1})
    loss = spec.loss("classification_robust", logic="dl2", attack=PGD(steps=4))
    model = _model("mlp")
    x, y = _batches(1)[0]
    results = []
    with tracing.eager():
        with tracing.eager():
            pass
        for _ in range(3):
            loss.generator = torch.Generator().manual_seed(0)
            results.append(loss(model, x, y).loss)
    assert not tracing._TRACES and not tracing._SEEN
    loss.generator = torch.Generator().manual_seed(0)
    traced = loss(model, x, y).loss  # outside the block the objective is traced at once
    assert [g is not None for g in tracing._TRACES.values()] == [True]
    assert all(torch.equal(r, traced) for r in results)


def test_train_s_validation_check_is_never_traced(tmp_path):
    tracing.set_tracing(True, after=0)
    text = (
        "network f : Tensor[1, 8, 8] -> Tensor[10]\nparam eps : Real = 0.1\n"
        "property robust(x, y) = classification_robustness(f, x, y, eps)\n"
        'train f on digits(split = "train") {\n  loss = cross_entropy\n  epochs = 2\n}\n'
    )
    options = TrainOptions(out=tmp_path / "run", quiet=True, eval_samples=16, threads=1)
    train(propdsl.load(text), options)
    assert not tracing._TRACES and not tracing._SEEN
