"""The model zoo, Normalize, user models and their error messages."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from propdsl.models import (
    ACTIVATIONS,
    ModelError,
    Normalize,
    available_models,
    build_model,
    check_model,
    load_user_model,
    make_activation,
)

SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar": (3, 32, 32)}

# What the bound-propagation engine knows (DESIGN.md 2), plus Normalize (an affine map).
SUPPORTED = (
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Flatten,
    nn.AvgPool2d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Dropout,
    nn.Identity,
    Normalize,
)


def leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


# -- the zoo ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("data", list(SHAPES))
def test_zoo_output_shapes(name, data):
    shape = SHAPES[data]
    model = build_model(name, shape, 10)
    assert isinstance(model, nn.Sequential)
    assert model(torch.rand(3, *shape)).shape == (3, 10)
    assert all(isinstance(m, SUPPORTED) for m in leaves(model))


def test_cnn_follows_the_literature_layout():
    # k4 s2 p1 halves the image: 8 -> 4 -> 2, 28 -> 14 -> 7, 32 -> 16 -> 8.
    for shape, side in (((1, 8, 8), 2), ((1, 28, 28), 7), ((3, 32, 32), 8)):
        model = build_model("cnn", shape, 10, channels=[16, 32], hidden=100)
        first_linear = next(m for m in model if isinstance(m, nn.Linear))
        assert first_linear.in_features == 32 * side * side
        assert first_linear.out_features == 100
    convs = [m for m in build_model("cnn", (1, 8, 8), 10) if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [((4, 4), (2, 2), (1, 1))] * 2


def test_cnn_kernel_stride_and_padding_per_layer():
    # 8x8: k3 s1 p1 keeps 8x8, then k4 s2 p1 halves it to 4x4 -> 32 * 16 features.
    model = build_model(
        "cnn", (1, 8, 8), 10, channels=[16, 32], kernel=[3, 4], stride=[1, 2], hidden=[64]
    )
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convs] == [
        ((3, 3), (1, 1), (1, 1)),
        ((4, 4), (2, 2), (1, 1)),
    ]
    assert next(m for m in model if isinstance(m, nn.Linear)).in_features == 32 * 4 * 4
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    # A one-entry list is the same as a single value; padding may be 0 per layer.
    one = build_model("cnn", (1, 8, 8), 10, kernel=[3], stride=[1], padding=[0, 1])
    assert [(c.kernel_size, c.padding) for c in one if isinstance(c, nn.Conv2d)] == [
        ((3, 3), (0, 0)),
        ((3, 3), (1, 1)),
    ]
    with pytest.raises(ModelError, match="stride has 3 entries but channels has 2") as info:
        build_model("cnn", (1, 8, 8), 10, stride=[1, 2, 2])
    assert info.value.hint is not None and "every conv layer" in info.value.hint
    with pytest.raises(ModelError, match="must be a non-negative integer"):
        build_model("cnn", (1, 8, 8), 10, padding=[1, -1])


def test_mlp_hidden_widths_and_tabular_inputs():
    model = build_model("mlp", (30,), 2, hidden=[7, 5, 3])
    widths = [m.out_features for m in model if isinstance(m, nn.Linear)]
    assert widths == [7, 5, 3, 2]
    assert model(torch.rand(4, 30)).shape == (4, 2)
    assert [
        m.out_features for m in build_model("mlp", (30,), 2, hidden=9) if isinstance(m, nn.Linear)
    ] == [9, 2]
    linear = build_model("mlp", (1, 8, 8), 10, hidden=[])
    assert [type(m) for m in linear] == [nn.Flatten, nn.Linear]


@pytest.mark.parametrize(
    ("activation", "extra", "layer", "attrs"),
    [
        ("relu", {}, nn.ReLU, {}),
        ("tanh", {}, nn.Tanh, {}),
        ("sigmoid", {}, nn.Sigmoid, {}),
        ("leaky_relu", {}, nn.LeakyReLU, {"negative_slope": 0.01}),
        ("leaky_relu", {"negative_slope": 0.2}, nn.LeakyReLU, {"negative_slope": 0.2}),
        ("softplus", {}, nn.Softplus, {"beta": 1.0}),
        ("softplus", {"beta": 5.0}, nn.Softplus, {"beta": 5.0}),
        (("softplus", {"beta": 5.0}), {}, nn.Softplus, {"beta": 5.0}),
        (("leaky_relu", {"negative_slope": 0.3}), {}, nn.LeakyReLU, {"negative_slope": 0.3}),
    ],
)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_each_activation(name, activation, extra, layer, attrs):
    model = build_model(name, (1, 8, 8), 10, activation=activation, **extra)
    acts = [m for m in model if not isinstance(m, nn.Linear | nn.Conv2d | nn.Flatten)]
    assert acts and all(type(m) is layer for m in acts)
    for key, value in attrs.items():
        assert all(getattr(m, key) == value for m in acts)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)


def test_make_activation_matches_torch():
    x = torch.linspace(-3, 3, 13)
    assert torch.allclose(
        make_activation("softplus", beta=5.0)(x), nn.functional.softplus(x, beta=5.0)
    )
    assert set(ACTIVATIONS) == {"relu", "leaky_relu", "tanh", "sigmoid", "softplus", "half_huber"}
    assert available_models()[:2] == ("mlp", "cnn")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "gelu"}, "unknown activation 'gelu'"),
        ({"activation": "relu", "beta": 2.0}, "'relu' takes no options, not 'beta'"),
        ({"activation": "softplus", "beta": 0.0}, "beta must be positive"),
        ({"activation": ("softplus", {"beta": 2.0}), "beta": 3.0}, "given twice"),
        ({"activation": ("softplus", {"alpha": 2.0})}, "takes beta, not 'alpha'"),
        ({"activation": 3}, "activation must be a name"),
        ({"hidden": [100, -1]}, "must be a positive integer"),
        ({"hidden": "wide"}, "hidden must be an integer or a list"),
        ({"hiden": 10}, "no option 'hiden'; it accepts: hidden, activation"),
        ({"mean": [0.5]}, "mean and std together"),
    ],
)
def test_bad_options_are_model_errors(kwargs, message):
    with pytest.raises(ModelError, match=message):
        build_model("mlp", (1, 8, 8), 10, **kwargs)


def test_error_messages_list_names_and_suggest():
    with pytest.raises(ModelError, match="unknown model 'cnm'; known models: mlp, cnn") as info:
        build_model("cnm", (1, 8, 8), 10)
    assert info.value.hint == "did you mean 'cnn'?"
    with pytest.raises(ModelError) as info:
        build_model("cnn", (1, 8, 8), 10, chanels=[8])
    assert "channels" in info.value.message and info.value.hint == "did you mean 'channels'?"
    assert isinstance(info.value, ValueError)
    with pytest.raises(ModelError, match=r"cnn needs inputs of shape \[C, H, W\]"):
        build_model("cnn", (30,), 2)
    with pytest.raises(ModelError, match="shrinks a 8x8 image to nothing"):
        build_model("cnn", (1, 8, 8), 10, channels=[4, 4, 4, 4])
    with pytest.raises(ModelError, match="num_classes"):
        build_model("mlp", (1, 8, 8), 0)
    with pytest.raises(ModelError, match="input_shape"):
        build_model("mlp", (1, -8), 10)


def test_seed_makes_weights_reproducible_without_touching_the_global_generator():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = build_model("cnn", (1, 8, 8), 10, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = build_model("cnn", (1, 8, 8), 10, seed=7)
    c = build_model("cnn", (1, 8, 8), 10, seed=8)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    torch.manual_seed(7)
    assert torch.equal(
        pa, torch.cat([p.flatten() for p in build_model("cnn", (1, 8, 8), 10).parameters()])
    )


# -- Normalize ----------------------------------------------------------------------------------


def test_normalize_per_channel_math_and_buffers():
    mean, std = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
    norm = Normalize(mean, std)
    x = torch.rand(2, 3, 4, 4)
    expect = (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    assert torch.allclose(norm(x), expect)
    assert set(dict(norm.named_buffers())) == {"mean", "std"}
    assert set(norm.state_dict()) == {"mean", "std"}
    assert norm.mean.shape == (3, 1, 1)
    scale, shift = norm.affine()
    assert torch.allclose(x * scale + shift, expect, atol=1e-6)


def test_normalize_scalar_tabular_and_full_tensor_forms():
    x = torch.rand(5, 30)
    assert torch.allclose(Normalize(0.5, 0.25)(x), (x - 0.5) / 0.25)
    mean, std = torch.rand(30), torch.rand(30) + 0.5
    tab = Normalize(mean, std, input_shape=(30,))
    assert tab.mean.shape == (30,) and torch.allclose(tab(x), (x - mean) / std)
    full = Normalize(torch.zeros(1, 8, 8), torch.full((1, 8, 8), 2.0), input_shape=(1, 8, 8))
    assert torch.allclose(full(torch.ones(2, 1, 8, 8)), torch.full((2, 1, 8, 8), 0.5))


def test_normalize_rejects_bad_statistics():
    with pytest.raises(ModelError, match="std must be positive"):
        Normalize([0.5], [0.0])
    with pytest.raises(ModelError, match="do not broadcast"):
        Normalize([0.5, 0.5], [1.0, 1.0], input_shape=(3, 8, 8))
    with pytest.raises(ModelError, match="must be numbers"):
        Normalize("a", 1.0)


def test_zoo_models_can_start_with_normalize():
    model = build_model("cnn", (3, 32, 32), 10, mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    assert isinstance(model[0], Normalize) and model[0].mean.shape == (3, 1, 1)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    tab = build_model("mlp", (30,), 2, mean=[0.0] * 30, std=[1.0] * 30)
    assert isinstance(tab[0], Normalize) and tab[0].mean.shape == (30,)


# -- user models --------------------------------------------------------------------------------

USER_MODULE = "propdsl_test_user_models"


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    source = textwrap.dedent(
        """
        import math
        from torch import nn

        def make(input_shape, num_classes, width=16):
            return nn.Sequential(
                nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                nn.Linear(width, num_classes),
            )

        def fixed(width=4):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, width))

        def anything(**kwargs):
            anything.seen = kwargs
            return nn.Identity()

        def not_a_model():
            return 42

        def broken():
            raise RuntimeError("out of coffee")

        class Zoo:
            @staticmethod
            def tiny(num_classes):
                return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

        instance = nn.Linear(64, 10)
        NUMBER = 3
        """
    )
    (tmp_path / f"{USER_MODULE}.py").write_text(source)
    (tmp_path / "broken_import_mod.py").write_text("import propdsl_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in (USER_MODULE, "broken_import_mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield tmp_path
    for name in (USER_MODULE, "broken_import_mod"):
        sys.modules.pop(name, None)


def test_user_factory_gets_shape_and_classes_when_it_accepts_them(user_module):
    model = load_user_model(f"{USER_MODULE}:make", input_shape=(1, 8, 8), num_classes=10, width=8)
    assert model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert model[1].out_features == 8
    check_model(model, (1, 8, 8), 10)
    # A factory that does not declare them is called without them.
    fixed = load_user_model(f"{USER_MODULE}:fixed", input_shape=(1, 8, 8), num_classes=10)
    assert fixed[1].out_features == 4
    # **kwargs receives the context.
    mod = sys.modules[USER_MODULE]
    load_user_model(f"{USER_MODULE}:anything", input_shape=(1, 8, 8), num_classes=10, seed=3)
    assert mod.anything.seen == {"input_shape": (1, 8, 8), "num_classes": 10, "seed": 3}


def test_user_attribute_paths_instances_and_files(user_module):
    tiny = load_user_model(f"{USER_MODULE}:Zoo.tiny", num_classes=3)
    assert tiny(torch.rand(1, 1, 8, 8)).shape == (1, 3)
    instance = load_user_model(f"{USER_MODULE}:instance")
    assert instance is sys.modules[USER_MODULE].instance
    from_file = load_user_model(
        str(user_module / f"{USER_MODULE}.py") + ":make", input_shape=(4,), num_classes=2
    )
    assert from_file(torch.rand(3, 4)).shape == (3, 2)


def test_user_seed_is_reproducible(user_module):
    a = load_user_model(f"{USER_MODULE}:make", input_shape=(4,), num_classes=2, seed=5)
    b = load_user_model(f"{USER_MODULE}:make", input_shape=(4,), num_classes=2, seed=5)
    assert torch.equal(a[1].weight, b[1].weight)


@pytest.mark.parametrize(
    ("ref", "kwargs", "message"),
    [
        ("no_colon_here", {}, "reference is 'module:factory'"),
        (f"{USER_MODULE}:", {}, "reference is 'module:factory'"),
        ("propdsl_missing_module:make", {}, "no module named 'propdsl_missing_module'"),
        ("broken_import_mod:make", {}, "importing 'broken_import_mod' failed"),
        (f"{USER_MODULE}:mkae", {}, "has no attribute 'mkae'"),
        (f"{USER_MODULE}:NUMBER", {}, "is a int, not an nn.Module or a factory"),
        (f"{USER_MODULE}:not_a_model", {}, "returned a int, not a torch.nn.Module"),
        (f"{USER_MODULE}:broken", {}, "raised RuntimeError: out of coffee"),
        (f"{USER_MODULE}:make", {"depth": 3}, "takes no keyword 'depth'; it accepts: input_shape"),
        (f"{USER_MODULE}:instance", {"width": 3}, "module instance and takes no keywords"),
        ("missing_dir/models.py:make", {}, "model file not found"),
    ],
)
def test_user_model_errors(user_module, ref, kwargs, message):
    with pytest.raises(ModelError, match=message):
        load_user_model(ref, **kwargs)


def test_user_model_missing_attribute_suggests(user_module):
    with pytest.raises(ModelError) as info:
        load_user_model(f"{USER_MODULE}:mkae")
    assert info.value.hint == "did you mean 'make'?"


def test_check_model_reports_wrong_outputs():
    with pytest.raises(ModelError, match=r"expected logits \[B, 10\]"):
        check_model(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), (1, 8, 8), 10)
    with pytest.raises(ModelError, match="fails on inputs"):
        check_model(nn.Linear(5, 10), (1, 8, 8), 10)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model.train()
    check_model(model, (1, 8, 8), 10)
    assert model.training  # the mode is restored
