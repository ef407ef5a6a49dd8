"""The model zoo, input normalisation, and user models.

Zoo models are plain `nn.Sequential` stacks of layers the bound-propagation engine knows (Linear,
Conv2d, Flatten and the activations below), so every zoo model can be trained and verified.
A spec names one as `model = cnn(channels = [16, 32], hidden = 100)`; `build_model` turns that into
a module. User models come from Python, never from a spec: `load_user_model("pkg.mod:factory")`.

Weights are initialised from torch's global random generator: call `torch.manual_seed` first, or
pass `seed=` to `build_model` / `load_user_model`, which seeds a forked generator and leaves the
global one untouched.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from propdsl.errors import PropdslError

__all__ = [
    "ACTIVATIONS",
    "HalfHuberReLU",
    "ModelError",
    "Normalize",
    "available_models",
    "build_model",
    "check_model",
    "load_user_model",
    "make_activation",
    "register_model",
]


class ModelError(PropdslError, ValueError):
    """A model cannot be built or loaded as asked; `hint`, when set, says how to fix it."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def _did_you_mean(name: str, known: Sequence[str]) -> str | None:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean '{close[0]}'?" if close else None


# -- activations ---------------------------------------------------------------------------------

# Each activation with the options it takes and their defaults.
ACTIVATIONS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {
        "relu": {},
        "leaky_relu": {"negative_slope": 0.01},
        "tanh": {},
        "sigmoid": {},
        "softplus": {"beta": 1.0},
        "half_huber": {"delta": 0.5},
    }
)

ActivationSpec = str | tuple[str, Mapping[str, float]]


def _parse_activation(spec: Any, overrides: Mapping[str, float | None]) -> tuple[str, dict]:
    """`"softplus"` or `("softplus", {"beta": 5.0})`, merged with top-level `beta=` and the like."""
    if isinstance(spec, str):
        name, options = spec, {}
    elif (
        isinstance(spec, tuple | list)
        and len(spec) == 2
        and isinstance(spec[0], str)
        and isinstance(spec[1], Mapping)
    ):
        name, options = spec[0], dict(spec[1])
    else:
        raise ModelError(
            f"activation must be a name or (name, options), got {spec!r}",
            hint=f"one of {', '.join(ACTIVATIONS)}, e.g. activation = softplus(beta = 5)",
        )
    if name not in ACTIVATIONS:
        raise ModelError(
            f"unknown activation '{name}'; known activations: {', '.join(ACTIVATIONS)}",
            hint=_did_you_mean(name, list(ACTIVATIONS)),
        )
    accepted = ACTIVATIONS[name]
    for key, value in overrides.items():
        if value is None:
            continue
        if key in options and options[key] != value:
            raise ModelError(f"{key} is given twice for activation '{name}'")
        options[key] = value
    for key, value in options.items():
        if key not in accepted:
            takes = ", ".join(accepted) if accepted else "no options"
            raise ModelError(f"activation '{name}' takes {takes}, not '{key}'")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ModelError(f"activation option {key} must be a number, got {value!r}")
    if name == "softplus" and options.get("beta", 1.0) <= 0:
        raise ModelError(f"softplus beta must be positive, got {options['beta']}")
    if name == "half_huber" and options.get("delta", 0.5) <= 0:
        raise ModelError(f"half_huber delta must be positive, got {options['delta']}")
    return name, {**accepted, **{k: float(v) for k, v in options.items()}}


def make_activation(spec: ActivationSpec = "relu", **options: float | None) -> nn.Module:
    """One activation layer from a name and options (`beta` of softplus, `negative_slope`).

    >>> make_activation("softplus", beta=5.0)
    Softplus(beta=5.0, threshold=20.0)
    >>> make_activation(("leaky_relu", {"negative_slope": 0.1}))
    LeakyReLU(negative_slope=0.1)
    """
    name, opts = _parse_activation(spec, options)
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(negative_slope=opts["negative_slope"])
    if name == "tanh":
        return nn.Tanh()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "half_huber":
        return HalfHuberReLU(delta=opts["delta"])
    return nn.Softplus(beta=opts["beta"])


class HalfHuberReLU(nn.Module):
    """Woods et al. (2019, "Adversarial explanations for understanding image classification
    decisions")'s half-Huber ReLU: 0 for x <= 0, x^2 / (2 delta) on (0, delta], x - delta / 2
    above. Continuously differentiable, with f'(x) = clamp(x, 0, delta) / delta: unlike ReLU its
    gradient changes smoothly, so input gradients (saliency, their attacks) are informative.
    Convex and non-decreasing on the whole line, which its bound rule uses.

    >>> f = HalfHuberReLU(delta=0.5)
    >>> f(torch.tensor([-1.0, 0.25, 0.5, 2.0])).tolist()
    [0.0, 0.0625, 0.25, 1.75]
    """

    def __init__(self, delta: float = 0.5):
        super().__init__()
        if not (isinstance(delta, int | float) and math.isfinite(delta) and delta > 0):
            raise ModelError(f"half_huber delta must be positive and finite, got {delta!r}")
        self.delta = float(delta)

    def forward(self, x: Tensor) -> Tensor:
        # clamp(x, 0, delta) * (x - clamp / 2) / delta: 0 below 0, x^2 / (2 delta) on
        # [0, delta], x - delta / 2 above, in one expression whose autograd is clamp / delta.
        c = x.clamp(0.0, self.delta)
        return c * (x - c / 2) / self.delta

    def extra_repr(self) -> str:
        return f"delta={self.delta}"


# -- normalisation -------------------------------------------------------------------------------


class Normalize(nn.Module):
    """`(x - mean) / std`, the first layer of a model whose data live in [0, 1].

    Normalisation belongs to the model, not the data, so that the properties' balls and boxes
    are stated in the input space. `mean` and `std` are scalars, per-channel vectors (reshaped to
    [C, 1, 1] for images: torchvision's convention), or tensors that broadcast against one input.
    For tabular inputs give `input_shape=(D,)`, and a vector is taken per feature.
    Both are buffers, saved with the weights.

    >>> norm = Normalize([0.5, 0.25], [0.5, 0.25])
    >>> norm.mean.shape
    torch.Size([2, 1, 1])
    >>> norm(torch.ones(1, 2, 3, 3))[0, :, 0, 0].tolist()
    [1.0, 3.0]
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        mean: float | Sequence[float] | Tensor,
        std: float | Sequence[float] | Tensor,
        *,
        input_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        rank = 3 if input_shape is None else len(input_shape)
        mean_t, std_t = (self._shaped(v, rank, name) for v, name in ((mean, "mean"), (std, "std")))
        if not bool(torch.isfinite(mean_t).all()):
            raise ModelError("Normalize mean must be finite")
        if not bool((std_t > 0).all()) or not bool(torch.isfinite(std_t).all()):
            raise ModelError("Normalize std must be positive and finite")
        if input_shape is not None:
            try:
                torch.broadcast_shapes(mean_t.shape, std_t.shape, tuple(input_shape))
            except RuntimeError:
                raise ModelError(
                    f"Normalize mean {tuple(mean_t.shape)} and std {tuple(std_t.shape)} do not "
                    f"broadcast against inputs of shape {tuple(input_shape)}"
                ) from None
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    @staticmethod
    def _shaped(value: Any, rank: int, name: str) -> Tensor:
        try:
            t = torch.as_tensor(value, dtype=torch.float32).clone()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ModelError(f"Normalize {name} must be numbers, got {value!r}") from exc
        if t.dim() == 1 and rank > 1:
            # A vector runs along the first input dimension (the channels of an image).
            t = t.reshape(-1, *([1] * (rank - 1)))
        return t

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def affine(self) -> tuple[Tensor, Tensor]:
        """`(scale, shift)` with `forward(x) == x * scale + shift` (for bound propagation)."""
        scale = 1.0 / self.std
        return scale, -self.mean * scale

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


# -- the zoo -------------------------------------------------------------------------------------

Factory = Callable[..., nn.Module]
_MODELS: dict[str, Factory] = {}

# Keywords that build_model handles itself, so a factory never declares them.
_RESERVED = ("seed",)


def register_model(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Add a zoo model: `factory(input_shape, num_classes, **options) -> nn.Module`.

    Its keyword-only parameters are the options a spec may set; `build_model` checks them.

    >>> register_model("linear", lambda input_shape, num_classes: nn.Sequential(
    ...     nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes)), replace=True)
    >>> build_model("linear", (1, 8, 8), 10)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    if name in _MODELS and not replace:
        raise ModelError(f"a model named '{name}' is already registered")
    _register_for_specs(name, factory, replace)
    _MODELS[name] = factory


def _register_for_specs(name: str, factory: Factory, replace: bool) -> None:
    """Make the model nameable in specs (`model = name(keyword = value)`): an entry of the
    torch-free registry the checker reads, with the factory's keyword options that a spec can
    write (numbers, booleans, strings, lists of sizes). `mlp` and `cnn` are declared there
    already, with the ranges of their options."""
    from propdsl import registry

    target = f"{getattr(factory, '__module__', '')}:{getattr(factory, '__qualname__', '')}"
    entry = registry.Entry(
        kind=registry.Kind.MODEL,
        name=name,
        keywords=registry.keywords_from_signature(factory, skip=2, exclude=_RESERVED),
        target=None if "<" in target or target.startswith(":") else target,
        summary=(factory.__doc__ or "").strip().split("\n")[0],
        builtin=False,
    )
    try:
        registry.register(entry, replace=replace)
    except registry.RegistryError as err:
        raise ModelError(str(err)) from None


def available_models() -> tuple[str, ...]:
    """The zoo's model names, in registration order.

    >>> available_models()[:2]
    ('mlp', 'cnn')
    """
    return tuple(_MODELS)


def _options_of(factory: Factory) -> tuple[list[str], bool]:
    """The keyword options a factory takes after (input_shape, num_classes), and **kwargs."""
    params = list(inspect.signature(factory).parameters.values())[2:]
    names = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ModelError(f"seed must be an integer, got {seed!r}")
    # A forked generator: seeding the model must not reseed the caller's stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _shape(input_shape: Any) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise ModelError(f"input_shape must be a sequence of sizes, got {input_shape!r}") from None
    if not shape or any(d < 1 for d in shape) or list(shape) != list(input_shape):
        raise ModelError(f"input_shape must be positive integer sizes, got {input_shape!r}")
    return shape


def build_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    seed: int | None = None,
    **options: Any,
) -> nn.Module:
    """Build a zoo model for inputs [B, *input_shape] and `num_classes` logits.

    Args:
        name: `mlp` or `cnn` (or a name added by `register_model`).
        input_shape: one sample's shape, e.g. `(1, 8, 8)` or `(30,)`.
        num_classes: the number of outputs.
        seed: seeds the weight initialisation (on a forked generator); without it the global
            generator is used, so call `torch.manual_seed` first for reproducible weights.
        **options: the model's own options; see `mlp` and `cnn`. The activation is a name or a
            parsed `(name, {option: value})`, and `beta` / `negative_slope` may also be given
            at top level: `activation="softplus", beta=5.0`.

    Raises:
        ModelError: an unknown name, an unknown option (listing the accepted ones), a bad value.

    >>> model = build_model("cnn", (1, 8, 8), 10, channels=[16, 32], hidden=100, seed=0)
    >>> model(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """
    if name not in _MODELS:
        raise ModelError(
            f"unknown model '{name}'; known models: {', '.join(_MODELS)}",
            hint=_did_you_mean(name, list(_MODELS)),
        )
    factory = _MODELS[name]
    accepted, any_keyword = _options_of(factory)
    for key in options:
        if key not in accepted and not any_keyword:
            raise ModelError(
                f"model '{name}' has no option '{key}'; it accepts: {', '.join(accepted)}",
                hint=_did_you_mean(key, accepted),
            )
    shape = _shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    with _seeded(seed):
        return factory(shape, num_classes, **options)


def _positive_int(value: Any, what: str, *, minimum: int = 1) -> int:
    # Spec numbers may arrive as integral floats (`hidden = 1e2`).
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ModelError(f"{what} must be {kind} integer, got {value!r}")
    return value


def _int_list(value: Any, what: str, *, allow_empty: bool = True, minimum: int = 1) -> list[int]:
    items = [value] if isinstance(value, int | float) else value
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise ModelError(f"{what} must be an integer or a list of integers, got {value!r}")
    if not items and not allow_empty:
        raise ModelError(f"{what} must not be empty")
    return [_positive_int(v, f"each of {what}", minimum=minimum) for v in items]


def _per_layer(value: Any, what: str, layers: int, *, minimum: int = 1) -> list[int]:
    """One integer per conv layer: a single value (or a one-entry list) applies to every layer."""
    items = _int_list(value, what, allow_empty=False, minimum=minimum)
    if len(items) == 1:
        return items * layers
    if len(items) != layers:
        raise ModelError(
            f"{what} has {len(items)} entries but channels has {layers}",
            hint=f"give one {what} for every conv layer, or a single value for all of them",
        )
    return items


def _front(
    input_shape: tuple[int, ...], mean: Any, std: Any, layers: list[nn.Module]
) -> list[nn.Module]:
    if (mean is None) != (std is None):
        raise ModelError("give mean and std together (or neither)")
    if mean is None:
        return layers
    return [Normalize(mean, std, input_shape=input_shape), *layers]


def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden: int | Sequence[int] = (100, 100),
    activation: ActivationSpec = "relu",
    beta: float | None = None,
    negative_slope: float | None = None,
    mean: Any = None,
    std: Any = None,
) -> nn.Sequential:
    """Flatten, then fully connected layers of widths `hidden`, each followed by the activation.

    `hidden` is one width or a list (`[]` gives a linear model). `mean` / `std` put a `Normalize`
    first.

    >>> mlp((30,), 2, hidden=[8], activation="tanh")
    Sequential(
      (0): Flatten(start_dim=1, end_dim=-1)
      (1): Linear(in_features=30, out_features=8, bias=True)
      (2): Tanh()
      (3): Linear(in_features=8, out_features=2, bias=True)
    )
    """
    widths = _int_list(hidden, "hidden")
    act = {"beta": beta, "negative_slope": negative_slope}
    make_activation(activation, **act)  # validate before building anything
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for w in widths:
        layers += [nn.Linear(width, w), make_activation(activation, **act)]
        width = w
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*_front(input_shape, mean, std, layers))


def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    channels: Sequence[int] = (16, 32),
    hidden: int | Sequence[int] = 100,
    activation: ActivationSpec = "relu",
    beta: float | None = None,
    negative_slope: float | None = None,
    kernel: int | Sequence[int] = 4,
    stride: int | Sequence[int] = 2,
    padding: int | Sequence[int] = 1,
    mean: Any = None,
    std: Any = None,
) -> nn.Sequential:
    """Convolutions (k4 s2 p1 by default, halving the image each time), then an MLP head.

    The default is the small CNN of the certified-training literature: on 8x8 digits two layers
    give 32 x 2 x 2 features; on 28x28 images 32 x 7 x 7; on 32x32 images 32 x 8 x 8.
    `kernel`, `stride` and `padding` are one value for every conv layer or a list with one entry
    per layer (`kernel = [3, 4], stride = [1, 2]` keeps the full resolution in the first layer).
    `input_shape` must be [C, H, W].

    >>> cnn((3, 32, 32), 10)[:4]
    Sequential(
      (0): Conv2d(3, 16, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1))
      (1): ReLU()
      (2): Conv2d(16, 32, kernel_size=(4, 4), stride=(2, 2), padding=(1, 1))
      (3): ReLU()
    )
    """
    if len(input_shape) != 3:
        raise ModelError(f"cnn needs inputs of shape [C, H, W], got {list(input_shape)}")
    chans = _int_list(channels, "channels", allow_empty=False)
    widths = _int_list(hidden, "hidden")
    kernels = _per_layer(kernel, "kernel", len(chans))
    strides = _per_layer(stride, "stride", len(chans))
    paddings = _per_layer(padding, "padding", len(chans), minimum=0)
    act = {"beta": beta, "negative_slope": negative_slope}
    make_activation(activation, **act)
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for out, k, s, pad in zip(chans, kernels, strides, paddings, strict=True):
        h, w = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
        if h < 1 or w < 1:
            raise ModelError(
                f"cnn with {len(chans)} conv layers (kernel {kernels}, stride {strides}, "
                f"padding {paddings}) shrinks a {input_shape[1]}x{input_shape[2]} image to nothing",
                hint="use fewer channels entries or a smaller kernel / stride",
            )
        layers += [
            nn.Conv2d(c, out, k, stride=s, padding=pad),
            make_activation(activation, **act),
        ]
        c = out
    layers.append(nn.Flatten())
    width = c * h * w
    for hw in widths:
        layers += [nn.Linear(width, hw), make_activation(activation, **act)]
        width = hw
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*_front(input_shape, mean, std, layers))


register_model("mlp", mlp)
register_model("cnn", cnn)


# -- checking and user models --------------------------------------------------------------------


def check_model(model: nn.Module, input_shape: Sequence[int], num_classes: int) -> None:
    """Run two zero inputs through `model` (eval mode, no grad) and check the logits' shape.

    >>> check_model(mlp((4,), 3), (4,), 3)
    """
    param = next(model.parameters(), None)
    buffer = next(model.buffers(), None)
    ref = param if param is not None else buffer
    device = ref.device if ref is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *input_shape, device=device))
    except Exception as exc:
        # Any failure of the user's forward on a well-shaped input is a model / shape mismatch.
        raise ModelError(
            f"the model fails on inputs of shape [B, {', '.join(map(str, input_shape))}]: {exc}"
        ) from exc
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or tuple(out.shape) != (2, num_classes):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ModelError(
            f"the model maps inputs [B, {', '.join(map(str, input_shape))}] to {got}, "
            f"expected logits [B, {num_classes}]"
        )


def _import_module(spec: str) -> Any:
    if spec.endswith(".py") or "/" in spec or "\\" in spec:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        name = f"_propdsl_user_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ModelError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise ModelError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
        return module
    try:
        return importlib.import_module(spec)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (spec == exc.name or spec.startswith(exc.name + ".")):
            raise ModelError(
                f"no module named '{spec}'",
                hint="is its folder on sys.path (the working folder, PYTHONPATH)?",
            ) from exc
        raise ModelError(f"importing '{spec}' failed: {exc}") from exc
    # User code may raise anything while importing; the user needs to see which module failed.
    except Exception as exc:
        raise ModelError(f"importing '{spec}' failed: {type(exc).__name__}: {exc}") from exc


def load_user_model(
    ref: str,
    *,
    input_shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    seed: int | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Import a user's model: `"pkg.module:factory"` or `"path/to/file.py:factory"`.

    The attribute after the colon (dots allowed: `module:Class.make`) is an `nn.Module`, or a
    callable returning one. A callable gets `input_shape`, `num_classes` and `seed` when it
    declares parameters of those names (or `**kwargs`), and every other keyword given here. With
    `seed`, the call runs on a seeded forked generator, as in `build_model`.

    Raises:
        ModelError: a malformed reference, an import failure, a missing attribute, keywords the
            factory does not take (listing the ones it does), or a result that is no `nn.Module`.

    >>> load_user_model("torch.nn:Identity")
    Identity()
    """
    if not isinstance(ref, str) or ":" not in ref:
        raise ModelError(
            f"a user model reference is 'module:factory', got {ref!r}",
            hint="e.g. mypkg.models:make_net or models.py:make_net",
        )
    module_name, _, attr = ref.rpartition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise ModelError(
            f"a user model reference is 'module:factory', got {ref!r}",
            hint="e.g. mypkg.models:make_net or models.py:make_net",
        )
    obj: Any = _import_module(module_name)
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise ModelError(
                f"'{module_name}' has no attribute '{attr}'", hint=_did_you_mean(part, names)
            )
        obj = getattr(obj, part)
    if isinstance(obj, nn.Module):
        if kwargs:
            raise ModelError(f"'{ref}' is a module instance and takes no keywords")
        return obj
    if not callable(obj):
        raise ModelError(f"'{ref}' is a {type(obj).__name__}, not an nn.Module or a factory")
    context = {"input_shape": input_shape, "num_classes": num_classes, "seed": seed}
    if input_shape is not None:
        context["input_shape"] = _shape(input_shape)
    call = dict(kwargs)
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # some builtins have no signature: pass what we have
        params = None
    if params is not None:
        any_keyword = any(p.kind is p.VAR_KEYWORD for p in params.values())
        named = [p.name for p in params.values() if p.kind is not p.VAR_POSITIONAL]
        unknown = [k for k in kwargs if k not in named]
        if unknown and not any_keyword:
            raise ModelError(
                f"'{ref}' takes no keyword '{unknown[0]}'; "
                f"it accepts: {', '.join(named) or 'no keywords'}",
                hint=_did_you_mean(unknown[0], named),
            )
        for key, value in context.items():
            if value is not None and (key in named or any_keyword) and key not in call:
                call[key] = value
    with _seeded(seed):
        try:
            model = obj(**call)
        # The factory is user code: wrap whatever it raises, keeping it as the cause.
        except Exception as exc:
            raise ModelError(f"'{ref}' raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise ModelError(f"'{ref}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model
