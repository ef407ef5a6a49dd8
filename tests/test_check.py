"""Checker regressions: template inlining, label constants, annotations, scopes, prelude errors."""

from __future__ import annotations

import pytest

import propdsl
from propdsl import ir as I
from propdsl.pretty import show

NET = "network f : Tensor[2] -> Tensor[3]\n"


def messages(text: str) -> list[str]:
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(text)
    return [d.message for d in info.value.diagnostics]


def test_template_binder_does_not_capture_the_callers_variable():
    # the prelude's `x'` must stay apart from the caller's `x'`
    spec = propdsl.load(NET + "property s(x') = standard_robustness(f, x', 0.1, 0.1)\n")
    formula = spec.properties["s"].formula
    (quant,) = [n for n in I.walk(formula) if isinstance(n, I.Quant)]
    assert quant.vars[0].name != "x'"
    assert show(formula) == "∀ x'' ∈ B∞(x', 0.1) ∩ [0, 1]. ‖f(x'') - f(x')‖∞ ≤ 0.1"


def test_label_constant_out_of_range():
    assert messages(NET + "property r(x) = argmax(f(x)) == 3\n") == [
        "3 is not an element of Label[3] (0 to 2)"
    ]
    propdsl.load(NET + "property r(x) = argmax(f(x)) == 2\n")


def test_label_parameter_annotation_is_checked():
    assert messages(NET + "property q(x, y : Real) = f(x)[0] > 1\n") == [
        "'y' is a label of f's 3 classes, but is annotated Real"
    ]
    propdsl.load(NET + "property q(x, y : Label[3]) = f(x)[y] > 1\n")


def test_two_balls_are_rejected_by_the_checker():
    text = NET + "property u(x) = forall z in ball(x, 0.1) & ball(x, 0.2): f(z)[0] > 0\n"
    assert messages(text) == ["an intersection of two balls is not supported"]


def test_prelude_errors_point_at_the_call():
    text = NET + "property p(x, y) = classification_robustness(f, x, y, -0.1)\n"
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(text)
    (diag,) = info.value.diagnostics
    assert diag.span is not None and (diag.span.line, diag.span.col) == (2, 20)
    assert diag.message.startswith("in the prelude's definition of 'classification_robustness'")


def test_network_found_through_a_template_argument():
    text = (
        NET
        + "network g : Tensor[4] -> Tensor[2]\n"
        + "property p(x, y) = classification_robustness(g, x, y, 0.1)\n"
    )
    spec = propdsl.load(text)
    assert spec.properties["p"].network == "g"
    assert str(spec.properties["p"].params[0][1]) == "Tensor[4]"


def test_data_source_options_see_earlier_params():
    text = NET.replace("Tensor[2] -> Tensor[3]", "Tensor[1, 8, 8] -> Tensor[10]") + (
        "param s : Nat = 3\n"
        "property r(x, y) = argmax(f(x)) == y\n"
        'train f on digits(split = "train", seed = s) {\n  loss = cross_entropy\n}\n'
    )
    spec = propdsl.load(text)
    assert dict(spec.train_block.data[1])["seed"] == 3


def test_loss_x_and_y_are_the_sample_even_with_a_param_named_y():
    text = (
        "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
        "param y : Real = 1.0\n"
        'train f on digits(split = "train") {\n  loss = cross_entropy(f(x), y)\n}\n'
    )
    loss = propdsl.load(text).train_block.get("loss")
    assert isinstance(loss, I.Fn) and isinstance(loss.args[1], I.Var)


def test_index_comparisons_are_crisp_in_every_logic():
    # `j != y implies ...` must not grade |j - y|: the implication idiom and the argmax form
    # agree on satisfaction and the attack climbs both (no vanishing gradient).
    import warnings

    import torch

    text = (
        "network f : Tensor[2] -> Tensor[3]\n"
        "property p(x, y) = forall x' in ball(x, 0.5, inf): "
        "forall j in classes: j != y implies f(x')[y] > f(x')[j]\n"
        "property q(x, y) = forall x' in ball(x, 0.5, inf): argmax(f(x')) == y\n"
    )
    spec = propdsl.load(text)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.rand(32, 2)
    y = model(x).argmax(1)

    def gen():
        return torch.Generator().manual_seed(0)  # the same random starts for both forms

    ref = spec.loss("q", attack=propdsl.APGD(steps=20), generator=gen())(model, x, y).satisfied
    for logic in ("dl2", "godel", "reichenbach", "stl", "qll"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = spec.loss("p", logic=logic, attack=propdsl.APGD(steps=20), generator=gen())
            out = loss(model, x, y)
        assert torch.equal(out.satisfied, ref)
        assert bool((out.loss[~out.satisfied] > 0).all())
