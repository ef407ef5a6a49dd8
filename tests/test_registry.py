"""The registry specs see (`propdsl.registry`) against the backends that implement it.

Every entry's keyword schema is checked against the signature of the class or function its
lazy target names (names, and types where they are annotated), every backend's own table has
exactly the registry's names, and the docs' options table is the registry's. The drift that
options.py had (a hand-kept copy of these tables) is tested here, each bug with its regression
test: aliases and `xi` refused in specs, user registrations invisible to the checker.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

import propdsl
from propdsl import registry as R
from propdsl.check import OptionValue
from propdsl.registry import Kind

ROOT = Path(__file__).resolve().parents[1]
DIGITS_NET = "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
PROP = "property robust(x, y) =\n  forall x' in ball(x, 0.1, inf):\n    argmax(f(x')) == y\n"


def _builtin(kind: Kind) -> list[R.Entry]:
    return [e for e in R.entries(kind) if e.builtin]


def _parameters(obj) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(obj).parameters)


def _check_types(entry: R.Entry, obj, *, skip: int = 0) -> None:
    """Each declared keyword's type is the one its annotated parameter has in the target."""
    derived = R.keywords_from_signature(obj, skip=skip)
    for key, kw in entry.keywords.items():
        if key in derived:
            assert derived[key].type == kw.type, (entry.name, key, derived[key].type, kw.type)


# -- each entry against its target ---------------------------------------------------------------
@pytest.mark.parametrize("entry", _builtin(Kind.LOGIC), ids=lambda e: e.name)
def test_logic_entries_are_their_classes(entry):
    from propdsl.logics import get_logic, logic_class

    cls = entry.resolve()
    assert cls is logic_class(entry.name)
    assert cls.name == entry.name and tuple(cls.aliases) == entry.aliases
    assert bool(cls.trainable) == entry.trainable
    # exactly the constructor's keywords a spec can write: `xi` of the fuzzy logics, STL and QLL
    # was missing from options.py
    assert set(entry.keywords) == set(R.keywords_from_signature(cls)), entry.name
    _check_types(entry, cls)
    for key, kw in entry.keywords.items():
        # the declared range is the class's: its edges are accepted or refused alike
        bounds = kw.bounds
        assert bounds is not None, (entry.name, key)
        inside = 1.0 if 1.0 in bounds else 0.5
        get_logic(entry.name, **{key: inside})
        if bounds.lo is not None:
            edge = bounds.lo
            if bounds.lo_open:
                with pytest.raises(ValueError):
                    get_logic(entry.name, **{key: edge})
            else:
                get_logic(entry.name, **{key: edge})
        if bounds.hi is not None:
            with pytest.raises(ValueError):
                get_logic(entry.name, **{key: bounds.hi + 0.5})


@pytest.mark.parametrize("entry", _builtin(Kind.DATA), ids=lambda e: e.name)
def test_data_entries_are_their_sources(entry):
    from propdsl.data import _source, load_dataset

    source = entry.resolve()
    assert source is _source(entry.name)
    static = None
    if source.input_shape is not None and source.num_classes is not None:
        static = (tuple(source.input_shape), source.num_classes)
    assert entry.shape == static
    assert ("path" in entry.keywords) == source.uses_path
    assert ("path" in dict(entry.required)) == source.uses_path
    # the keywords are load_dataset's, which passes them to every source
    params = _parameters(load_dataset)
    assert set(entry.keywords) <= set(params) - {"name"}, entry.name
    _check_types(entry, load_dataset, skip=1)


@pytest.mark.parametrize("entry", _builtin(Kind.ATTACK), ids=lambda e: e.name)
def test_attack_entries_are_their_classes(entry):
    from propdsl.loss.compile import resolve_attack

    cls = entry.resolve()
    assert set(entry.keywords) == set(R.keywords_from_signature(cls))
    _check_types(entry, cls)
    # the backend builds this class from the entry's name (`noise` is a factory of PGD options)
    built = resolve_attack(OptionValue(entry.name))
    assert built == cls() if not isinstance(cls, type) else type(built) is cls


@pytest.mark.parametrize("entry", _builtin(Kind.MODEL), ids=lambda e: e.name)
def test_model_entries_are_their_factories(entry):
    from propdsl.models import _MODELS

    if entry.target is None:
        assert entry.name == "user" and entry.name not in _MODELS and not entry.keywords
        return
    factory = entry.resolve()
    assert _MODELS[entry.name] is factory
    params = _parameters(factory)
    assert set(entry.keywords) <= set(params), entry.name
    # every option a spec could write is declared (mean / std are arrays: not spec values)
    writable = set(R.keywords_from_signature(factory, skip=2)) - {"seed"}
    assert writable <= set(entry.keywords), writable - set(entry.keywords)
    _check_types(entry, factory, skip=2)


@pytest.mark.parametrize("entry", _builtin(Kind.ACTIVATION), ids=lambda e: e.name)
def test_activation_entries_are_the_models_activations(entry):
    from propdsl.models import ACTIVATIONS, make_activation

    assert set(entry.keywords) == set(ACTIVATIONS[entry.name])
    layer = make_activation(entry.name)
    assert type(layer) is entry.resolve()
    assert set(entry.keywords) <= set(_parameters(entry.resolve()))


@pytest.mark.parametrize(
    "entry", [*_builtin(Kind.OPTIMIZER), *_builtin(Kind.SCHEDULE)], ids=lambda e: e.name
)
def test_optimizer_and_schedule_entries_are_what_the_trainer_builds(entry):
    import torch

    from propdsl.check import BlockInfo
    from propdsl.train import make_optimizer, make_schedule

    params = [torch.nn.Parameter(torch.zeros(2))]
    block = BlockInfo("train", "f", ("digits", ()), ((entry.kind.value, OptionValue(entry.name)),))
    if entry.kind is Kind.OPTIMIZER:
        built = make_optimizer(block, params)
    else:
        built = make_schedule(block, torch.optim.SGD(params, lr=0.1), epochs=3)
    target = entry.resolve()
    assert (built is None) if target is None else type(built) is target
    if target is not None:
        accepted = set(_parameters(target))
        assert {entry.parameters.get(k, k) for k in entry.keywords} <= accepted, entry.name


@pytest.mark.parametrize("entry", _builtin(Kind.METHOD), ids=lambda e: e.name)
def test_method_entries_are_the_enum(entry):
    from propdsl.verify.bounds import Method

    assert entry.resolve() is Method(entry.name) and not entry.keywords
    assert entry.certified == (entry.name in ("ibp", "crown_ibp"))


# -- no drift either way ---------------------------------------------------------------------------
def test_every_backend_table_has_exactly_the_registrys_names():
    from propdsl.data import available_datasets
    from propdsl.logics import available_logics, base
    from propdsl.models import ACTIVATIONS, available_models
    from propdsl.verify.bounds import Method

    assert set(available_logics()) == set(R.names(Kind.LOGIC))
    assert base._ALIASES == R.aliases(Kind.LOGIC)
    assert set(available_datasets()) == set(R.names(Kind.DATA))
    assert set(available_models()) == set(R.names(Kind.MODEL)) - {"user"}
    assert {m.value for m in Method} == set(R.names(Kind.METHOD))
    assert set(ACTIVATIONS) == set(R.names(Kind.ACTIVATION))


def test_an_unknown_attack_or_name_is_refused_by_the_backends():
    from propdsl.loss.compile import resolve_attack

    with pytest.raises(propdsl.UsageError):
        resolve_attack(OptionValue("fgsm"))


def test_the_docs_options_table_is_the_registrys():
    doc = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    assert R.options_table() in doc


def test_every_built_in_function_is_documented():
    from propdsl.builtins import BUILTINS

    doc = (ROOT / "docs" / "language.md").read_text(encoding="utf-8")
    section = doc.split("## 7. Built-in functions", 1)[1].split("\n## ", 1)[0]
    reserved = doc.split("**Built-in names**", 1)[1].split("\n\n", 1)[0]
    for name, rec in BUILTINS.items():
        assert f"`{name}(" in section, name
        assert name in reserved.replace("`", " ").split() or name in ("max", "min"), name
        for key, kw in rec.keywords.items():
            assert f"`{key}: {kw.describe()}`" in section, (name, key)


def test_the_records_targets_are_the_implementations():
    from propdsl.builtins import BUILTINS, EXPLAINERS
    from propdsl.registry import resolve_target

    for rec in BUILTINS.values():
        if rec.target is not None:
            assert callable(resolve_target(rec.target)), rec.name
    # an explainer's target takes (model, x, y) and the record's keywords
    for name in EXPLAINERS:
        params = _parameters(resolve_target(BUILTINS[name].target))
        assert list(params)[:3] == ["model", "x", "y"], name
        assert set(BUILTINS[name].keywords) <= set(params), name


def test_the_records_rules_exist_in_the_checker():
    from propdsl.builtins import BUILTINS
    from propdsl.check import Checker

    for rec in BUILTINS.values():
        assert callable(getattr(Checker, f"_rule_{rec.rule}", None)), rec.name
        assert rec.arity and all(n >= 0 for n in rec.arity)


# -- drift bugs of the hand-kept tables (each failed before the registry) -------------------------
@pytest.mark.parametrize(
    ("written", "name", "kwargs"),
    [
        ("godel(xi = 0.5)", "godel", {"xi": 0.5}),
        ("goedel", "godel", {}),
        ("kd(xi = 1)", "kleene_dienes", {"xi": 1.0}),
        ("product", "goguen", {}),
        ("lukasiewicz(xi = 0.25)", "lukasiewicz", {"xi": 0.25}),
        ("reichenbach(xi = 0.5)", "reichenbach", {"xi": 0.5}),
        ("yager(p = 3, xi = 0.5)", "yager", {"p": 3.0, "xi": 0.5}),
        ("stl(k = 5, xi = 0)", "stl", {"k": 5.0, "xi": 0.0}),
        ("qll(xi = 2)", "qll", {"xi": 2.0}),
    ],
)
def test_specs_accept_the_logics_aliases_and_keywords(written, name, kwargs):
    from propdsl.loss.compile import resolve_logic

    text = DIGITS_NET + PROP + f'train f on digits(split = "train") {{\n  logic = {written}\n}}\n'
    spec = propdsl.load(text)
    logic = spec.train_block.get("logic")
    assert logic == OptionValue(name, tuple(sorted(kwargs.items())))  # the canonical name
    built = resolve_logic(logic)
    assert type(built).name == name
    assert all(getattr(built, k) == v for k, v in kwargs.items())


@pytest.mark.parametrize(
    ("written", "message"),
    [
        ("godel(xi = 0)", "'xi' must be in (0, 1], got 0"),
        ("godel(xi = 1.5)", "'xi' must be in (0, 1], got 1.5"),
        ("stl(xi = -1)", "'xi' must be >= 0, got -1"),
        ("dl2(xi = 0)", "'xi' must be > 0, got 0"),
        ("boolean", "logic 'boolean' is for evaluation only and cannot train"),
        ("violation", "logic 'violation' is for evaluation only and cannot train"),
    ],
)
def test_logic_keywords_out_of_range_are_positioned_errors(written, message):
    text = DIGITS_NET + f'train f on digits(split = "train") {{\n  logic = {written}\n}}\n'
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(text)
    (diag,) = info.value.diagnostics
    assert diag.message == message
    assert diag.span.line == 3


@pytest.mark.parametrize(
    ("written", "message"),
    [
        # options.py let every activation take beta and negative_slope; the model builder then
        # failed in the trainer ("activation 'softplus' takes beta, not 'negative_slope'")
        ("softplus(negative_slope = 0.1)", "'softplus' has no option 'negative_slope'"),
        ("relu(beta = 5)", "'relu' has no option 'beta'"),
    ],
)
def test_activations_take_their_own_options_only(written, message):
    text = DIGITS_NET + (
        f'train f on digits(split = "train") {{\n  model = mlp(activation = {written})\n}}\n'
    )
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(text)
    assert [d.message for d in info.value.diagnostics] == [message]
    spec = propdsl.load(
        DIGITS_NET + "train f on digits {\n  model = mlp(activation = softplus(beta = 5))\n}\n"
    )
    assert spec.train_block.get("model").kw()["activation"] == OptionValue(
        "softplus", (("beta", 5.0),)
    )


def test_a_verify_blocks_method_is_the_enum():
    from propdsl.registry import Method

    text = DIGITS_NET + PROP + 'verify f on digits(split = "test") {\n'
    text += "  properties = [robust]\n  method = alpha_crown\n}\n"
    spec = propdsl.load(text)
    assert spec.verify_block.get("method") is Method.ALPHA_CROWN
    assert "  method = alpha_crown" in spec.summary().split("\n")


# -- user registrations reach the checker ----------------------------------------------------------
def _ones_source():
    from propdsl.data import DataSource, RawData

    rng = np.random.default_rng(0)
    x = rng.random((40, 4)).astype(np.float32)
    y = (x[:, 0] > 0.5).astype(np.int64)
    return DataSource("ones", lambda options: RawData(x, y), "40 random points", (4,), 2)


ONES_SPEC = (
    "network f : Tensor[4] -> Tensor[2]\n\n"
    + PROP
    + '\ntrain f on ones(split = "train", seed = 3) {\n'
    + "  model  = tiny(width = 6)\n  epochs = 1\n  batch  = 16\n"
    + "  logic  = tempered(temperature = 2.0, xi = 0.5)\n"
    + "  attack = pgd(steps = 2)\n  loss   = cross_entropy + robust\n}\n"
)


def _register_user_things():
    import torch

    from propdsl.data import register_dataset
    from propdsl.logics import Godel, register_logic
    from propdsl.models import register_model

    @register_logic
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Tempered(Godel):
        """Goedel with its atoms raised to a power: still 1 exactly where they hold."""

        name = "tempered"
        temperature: float = 1.0

        def atom(self, op, lhs, rhs):
            return super().atom(op, lhs, rhs) ** self.temperature

    def tiny(input_shape, num_classes, *, width: int = 4):
        return torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(int(np.prod(input_shape)), width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, num_classes),
        )

    register_dataset(_ones_source())
    register_model("tiny", tiny)
    return Tempered


def test_before_registration_the_names_are_unknown(clean_registries):
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(ONES_SPEC)
    messages = [d.message for d in info.value.diagnostics]
    assert messages == [
        "unknown data source 'ones'",
        "unknown model 'tiny'",
        "unknown logic 'tempered'",
    ]


def test_a_spec_names_what_user_code_registered(clean_registries, tmp_path):
    import torch

    from propdsl.evaluate import evaluate
    from propdsl.loss.compile import resolve_logic
    from propdsl.train import TrainOptions, train

    tempered = _register_user_things()
    entry = R.lookup(Kind.LOGIC, "tempered")
    assert entry is not None and not entry.builtin
    # a subclass of Godel: it used to inherit the aliases goedel and gödel, and registering it
    # failed ("logic name 'goedel' is already taken")
    assert entry.aliases == () and R.lookup(Kind.LOGIC, "goedel").name == "godel"
    assert {k: kw.type for k, kw in entry.keywords.items()} == {"xi": "Real", "temperature": "Real"}
    assert R.lookup(Kind.MODEL, "tiny").keywords["width"].type == "Nat"
    assert R.lookup(Kind.DATA, "ones").shape == ((4,), 2)

    spec = propdsl.load(ONES_SPEC)
    block = spec.train_block
    assert block.data == ("ones", (("seed", 3), ("split", "train")))
    assert block.get("logic") == OptionValue("tempered", (("temperature", 2.0), ("xi", 0.5)))
    assert resolve_logic(block.get("logic")) == tempered(temperature=2.0, xi=0.5)
    # checks, trains one epoch and evaluates
    torch.manual_seed(0)
    result = train(spec, TrainOptions(out=tmp_path / "run", quiet=True))
    assert len(result.metrics) == 1 and np.isfinite(result.metrics[-1]["loss"])
    ev = evaluate(spec, tmp_path / "run", split="test", plots=False)
    assert 0.0 <= ev.clean_accuracy <= 1.0
    assert "robust" in ev.properties


def test_user_data_sources_are_checked_like_the_built_in_ones(clean_registries):
    _register_user_things()
    wrong = ONES_SPEC.replace("Tensor[4] -> Tensor[2]", "Tensor[3] -> Tensor[2]")
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(wrong)
    assert info.value.diagnostics[0].message.startswith(
        "data source 'ones' gives Tensor[4] inputs in 2 classes"
    )
    bad = ONES_SPEC.replace("seed = 3", "seed = -1")
    with pytest.raises(propdsl.CheckError, match="'seed' must be Nat"):
        propdsl.load(bad)
    with pytest.raises(propdsl.CheckError, match="'tempered' has no option 'heat'"):
        propdsl.load(ONES_SPEC.replace("temperature = 2.0", "heat = 2.0"))


def test_names_that_specs_would_confuse_are_refused(clean_registries):
    from propdsl.data import DataError, register_dataset
    from propdsl.models import ModelError, register_model

    with pytest.raises(ModelError, match="'user' is already registered"):
        register_model("user", lambda input_shape, num_classes: None)
    register_dataset(_ones_source())
    with pytest.raises(DataError, match="already registered"):
        register_dataset(_ones_source())
    register_dataset(_ones_source(), replace=True)  # allowed, and the entry follows
    assert R.lookup(Kind.DATA, "ones") is not None
    with pytest.raises(R.RegistryError, match="already taken"):
        R.register(R.Entry(kind=Kind.LOGIC, name="mine", aliases=("kd",)))


def test_the_registration_functions_are_at_the_top_level():
    from propdsl.data import register_dataset
    from propdsl.logics import register_logic
    from propdsl.models import register_model

    assert propdsl.register_logic is register_logic
    assert propdsl.register_dataset is register_dataset
    assert propdsl.register_model is register_model


def test_schema_types_from_annotations():
    def f(a, b, *, n: int = 1, r: float | None = None, s: str = "", k=2, sizes: list[int] = (),
          flag: bool = False, anything: object = None):  # fmt: skip
        return None

    types = {k: kw.type for k, kw in R.keywords_from_signature(f, skip=2).items()}
    assert types == {
        "n": "Nat",
        "r": "Real",
        "s": "String",
        "k": "Nat",
        "sizes": "List[Nat]",
        "flag": "Bool",
    }
