"""Checker regressions: template inlining, label constants, annotations, scopes, prelude errors."""

from __future__ import annotations

import math

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


# -- limits: no spec reaches Python's recursion limit ---------------------------------------------
DIGITS_NET = "network f : Tensor[1, 8, 8] -> Tensor[10]\n"


def _chain(n: int) -> str:
    """n let functions, each applying the previous one: n + 1 levels of nesting per link."""
    lets = "".join(f"let a{i}(v) = a{i - 1}(v) + 1\n" for i in range(1, n + 1))
    return (
        DIGITS_NET
        + "let a0(v) = v\n"
        + lets
        + f"property p(x, y) = forall x' in ball(x, 0.1, inf): a{n}(f(x')[y]) > f(x')[0]\n"
        + 'train f on digits(split = "train") {\n  loss = cross_entropy + p\n}\n'
    )


def _deep_body(k: int) -> str:
    """A let function nesting k levels by itself, applied to its own result."""
    body = "v"
    for _ in range(k):
        body = f"abs({body})"
    return (
        DIGITS_NET
        + f"let g(v) = {body}\n"
        + "property p(x, y) = forall x' in ball(x, 0.1, inf): g(g(f(x')[y])) >= f(x')[0]\n"
        + 'train f on digits(split = "train") {\n  loss = cross_entropy + p\n}\n'
    )


def _largest_accepted(make) -> int:
    """The largest n for which `make(n)` loads, and n + 1 is a nesting error."""
    lo, hi = 1, 200
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            propdsl.load(make(mid))
            lo = mid
        except propdsl.SpecError as err:  # the checker's limit, or the parser's
            assert "nested too deeply" in err.diagnostics[0].message
            hi = mid - 1
    with pytest.raises(propdsl.CheckError, match="nested too deeply"):
        propdsl.load(make(lo + 1))
    return lo


def _on_a_deep_stack(fn, frames: int):
    """`fn()` called `frames` Python frames deeper than here (a caller with a deep stack)."""
    if frames == 0:
        return fn()
    return _on_a_deep_stack(fn, frames - 1)


@pytest.mark.parametrize("make", [_chain, _deep_body], ids=["chain", "deep-body"])
def test_the_deepest_accepted_spec_runs_every_pass_with_stack_to_spare(make):
    import torch

    from propdsl.check import MAX_NESTING

    n = _largest_accepted(make)
    assert n >= MAX_NESTING // 3  # the limit is the nesting, not something smaller
    spec = propdsl.load(make(n))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])

    def every_pass():
        # simplifier, printers, loss compiler, objective, verifier's query builder and bounds
        assert "formula:" in spec.summary() and spec.format()
        out = spec.loss("p", attack=propdsl.PGD(steps=1))(model, x, y)
        assert out.loss.shape == (2,) and bool(torch.isfinite(out.loss).all())
        assert torch.isfinite(spec.objective(attack=propdsl.PGD(steps=1))(model, x, y))
        for method in ("ibp", "crown"):
            assert len(spec.verify(model, x, y, method=method)["p"].status) == 2

    # 250 frames more than a test's own stack: room for any caller (CLI, notebooks, runners)
    _on_a_deep_stack(every_pass, 250)


def test_a_deep_constant_is_evaluated_without_recursion():
    from propdsl.check import MAX_NESTING

    lets = "".join(f"let a{i} = a{i - 1} * 1 + 1\n" for i in range(1, MAX_NESTING // 2))
    spec = propdsl.load(NET + "let a0 = 0\n" + lets + f"param q : Nat = a{MAX_NESTING // 2 - 1}\n")
    assert spec.params["q"] == MAX_NESTING // 2 - 1


# -- annotated boxes take the annotation's shape --------------------------------------------------
def test_a_box_with_scalar_bounds_takes_the_annotated_shape():
    import torch

    text = DIGITS_NET + (
        "property p(x, y) = forall z : Tensor[1, 8, 8] in box(0, 1) & box(-1, 0.5): "
        "f(z)[y] >= f(z)[0]\n"
    )
    spec = propdsl.load(text)
    (q,) = spec.properties["p"].quantified
    assert q.domain.shape == (1, 8, 8)
    # the attack used to build a [B] region for it and crash (exit 70 in `propdsl train`)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 3, 5])
    out = spec.loss("p", attack=propdsl.PGD(steps=3))(model, x, y)
    (z,) = out.counterexample.values()
    assert z.shape == (3, 1, 8, 8)
    assert bool(((z >= 0) & (z <= 0.5)).all())  # inside both boxes
    # its truth at the attack's point is the formula evaluated there by hand
    logits = model(z)
    assert torch.equal(out.satisfied, logits[torch.arange(3), y] >= logits[:, 0])


# -- command-line values are read as written ------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "ty", "expected"),
    [
        ("0.5", "Real", 0.5),
        (" -2.5e-3 ", "Real", -0.0025),
        ("inf", "Real", math.inf),
        ("-inf", "Real", -math.inf),
        ("1e999", "Real", None),  # too large, not infinity
        ("nan", "Real", None),
        ("infinity", "Real", None),
        ("1_000", "Real", None),
        ("\u0665", "Real", None),  # an Arabic-Indic five
        ("\uff11", "Nat", None),  # a full-width one
        ("7", "Nat", 7),
        ("7.0", "Nat", 7),
        ("-1", "Nat", None),
        ("9" * 5000, "Nat", None),  # more digits than Python converts, no crash
        ("true", "Bool", True),
        ("1", "Bool", None),
    ],
)
def test_override_strings_are_ascii_numbers(raw, ty, expected):
    from propdsl.check import coerce_param
    from propdsl.types import BOOL, NAT, REAL

    value = coerce_param(raw, {"Real": REAL, "Nat": NAT, "Bool": BOOL}[ty])
    assert value == expected and type(value) is type(expected)


def test_negative_infinity_is_shown_as_written():
    text = NET + "param eps : Real = 0.1\nproperty p(x) = forall z in ball(x, eps): f(z)[0] > 0\n"
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(text, params={"eps": "-inf"})
    assert [d.message for d in info.value.diagnostics] == [
        "a ball's radius must be non-negative, got -inf"
    ]


# -- option ranges --------------------------------------------------------------------------------
def test_every_numeric_option_has_a_range_and_the_docs_show_it():
    from pathlib import Path

    from propdsl import registry as R
    from propdsl.builtins import BUILTINS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "language.md").read_text()
    schemas = [e.keywords for kind in R.Kind for e in R.entries(kind) if e.builtin]
    schemas += [b.keywords for b in BUILTINS.values()]
    keywords = [(k, kw) for schema in schemas for k, kw in schema.items()]
    keywords += [*R.TRAIN_KEYS.items(), *R.VERIFY_KEYS.items(), *R.ACTIVATION_OPTIONS.items()]
    for key, kw in keywords:
        if kw.type in ("Real", "Nat", "List[Nat]") and key != "baseline":
            assert kw.bounds is not None, key
            assert f"`{key}: {kw.describe()}`" in doc or f"| `{key}` | `{kw.describe()}`" in doc, (
                key,
                kw.describe(),
            )


@pytest.mark.parametrize(
    ("bounds", "inside", "outside", "shown"),
    [
        ("POSITIVE", [1e-12, 3.0], [0, -1.0], "> 0"),
        ("FRACTION", [0, 0.999], [1, -0.1], "in [0, 1)"),
        ("DECAY", [1, 0.5], [0, 1.01], "in (0, 1]"),
        ("THREADS", [1, 1024], [0, 1025], "in [1, 1024]"),
    ],
)
def test_bounds(bounds, inside, outside, shown):
    from propdsl import registry as R

    b = getattr(R, bounds)
    assert all(v in b for v in inside) and not any(v in b for v in outside)
    assert b.show() == shown
    kw = R.Kw(type="Real", bounds=b)
    assert not kw.allows(math.inf) and not kw.allows(1e39) and not kw.allows(math.nan)


def test_a_limit_crossed_inside_the_prelude_leaves_it_intact_for_other_specs():
    # a12 is 8,191 nodes: passed to the template it is counted at the call and again where the
    # prelude's body uses it, which crosses the limit inside the (shared) prelude definition
    lets = "".join(f"let a{i} = a{i - 1} + a{i - 1}\n" for i in range(1, 13))
    text = (
        NET
        + "let a0 = 0.0\n"
        + lets
        + (
            "property p(x, y) = classification_robustness(f, x, y, a12)\n"
            "property q(x, y) = classification_robustness(f, x, y, a12)\n"
        )
    )
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(text)
    (diag,) = info.value.diagnostics  # q stays quiet
    assert diag.message.startswith(
        "in the prelude's definition of 'classification_robustness': this declaration is too large"
    )
    assert (diag.span.line, diag.span.col) == (15, 20)  # the call, not the prelude's text
    # the next spec using the same template is not affected
    spec = propdsl.load(NET + "property r(x, y) = classification_robustness(f, x, y, 0.1)\n")
    assert "B∞(x, 0.1)" in show(spec.properties["r"].formula)
