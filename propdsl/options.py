"""Static tables of what the spec's blocks accept: keys, option names, their keyword types and the
range of values each takes.

The checker validates blocks against these tables without importing torch (a value out of range
is a positioned error, never a crash of the trainer); the backends map the same names onto their
implementations. Keyword types: "Real", "Nat", "Bool", "String", "List[Nat]", "Activation"; a
`Kw` with `choices` takes one of the listed names. Every `Real` is also finite in float32 (the
backends compute in float32: `lr = 1e40` would overflow there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The largest float32: a Real option beyond it would become inf in the backends.
FLOAT32_MAX = 3.4028234663852886e38


@dataclass(frozen=True, kw_only=True)
class Bounds:
    """The numbers an option takes: `lo` and `hi` (None: unbounded), inclusive unless open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return not (self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi))

    def show(self) -> str:
        """`> 0`, `>= 1`, `in [0, 1)`, `in [1, 1024]`: as the messages and docs write it."""
        lo, hi = _num(self.lo), _num(self.hi)
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            return f"in {left}{lo}, {hi}{right}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {hi}"
        return "any number"


def _num(v: float | None) -> str:
    if v is None:
        return ""
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


POSITIVE = Bounds(lo=0, lo_open=True)  # > 0
NON_NEGATIVE = Bounds(lo=0)  # >= 0
AT_LEAST_ONE = Bounds(lo=1)  # >= 1
FRACTION = Bounds(lo=0, hi=1, hi_open=True)  # [0, 1)
UNIT = Bounds(lo=0, hi=1)  # [0, 1]
DECAY = Bounds(lo=0, hi=1, lo_open=True)  # (0, 1]
SEED = Bounds(lo=0, hi=2**32 - 1)  # what numpy's and torch's generators accept alike
# Layer sizes: large enough for any model the data sources need, small enough that a typo
# (`hidden = [1000000000]`) is an error and not gigabytes of weights.
WIDTH = Bounds(lo=1, hi=65536)
CHANNELS = Bounds(lo=1, hi=4096)
KERNEL = Bounds(lo=1, hi=64)
PADDING = Bounds(lo=0, hi=64)
# Torch CPU threads: more than any machine has; a huge count crashes the process.
THREADS = Bounds(lo=1, hi=1024)
# Explanation samples (integrated_gradients' steps, smoothgrad's samples) run as one batch of
# that many copies of the input.
EXPLAIN_SAMPLES = Bounds(lo=1, hi=1024)


@dataclass(frozen=True, kw_only=True)
class Kw:
    """One keyword (or block key): its type, and the values it takes."""

    type: str
    bounds: Bounds | None = None
    choices: tuple[str, ...] = ()

    def allows(self, value: float) -> bool:
        """Whether a number of the right type is in range (and finite in float32, for Reals)."""
        if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            return False
        return self.bounds is None or value in self.bounds

    def describe(self) -> str:
        """`Real > 0`, `Nat in [1, 1024]`, `one of train, val, test, all`: for messages and docs."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return f"{self.type} {self.bounds.show()}" if self.bounds else self.type


def _real(bounds: Bounds | None = None) -> Kw:
    return Kw(type="Real", bounds=bounds)


def _nat(bounds: Bounds | None = None) -> Kw:
    return Kw(type="Nat", bounds=bounds)


def _nats(bounds: Bounds) -> Kw:
    return Kw(type="List[Nat]", bounds=bounds)


BOOL = Kw(type="Bool")
STRING = Kw(type="String")

ACTIVATIONS = ("relu", "tanh", "leaky_relu", "softplus", "sigmoid")
# The options of an activation, alone (`softplus(beta = 5)`) or on the model (`beta = 5`).
ACTIVATION_OPTIONS: dict[str, Kw] = {"beta": _real(POSITIVE), "negative_slope": _real(UNIT)}

MODELS: dict[str, dict[str, Kw]] = {
    "mlp": {
        "hidden": _nats(WIDTH),
        "activation": Kw(type="Activation"),
        **ACTIVATION_OPTIONS,
    },
    "cnn": {
        "channels": _nats(CHANNELS),
        "hidden": _nats(WIDTH),
        "activation": Kw(type="Activation"),
        **ACTIVATION_OPTIONS,
        "kernel": _nats(KERNEL),
        "stride": _nats(KERNEL),
        "padding": _nats(PADDING),
    },
    # A model passed in from the CLI (--model pkg.mod:factory) or the API.
    "user": {},
}

OPTIMIZERS: dict[str, dict[str, Kw]] = {
    "sgd": {
        "lr": _real(POSITIVE),
        "momentum": _real(FRACTION),
        "weight_decay": _real(NON_NEGATIVE),
        "nesterov": BOOL,
    },
    "adam": {"lr": _real(POSITIVE), "weight_decay": _real(NON_NEGATIVE)},
    "adamw": {"lr": _real(POSITIVE), "weight_decay": _real(NON_NEGATIVE)},
}

SCHEDULES: dict[str, dict[str, Kw]] = {
    "none": {},
    "step": {"step_size": _nat(AT_LEAST_ONE), "gamma": _real(DECAY)},
    "cosine": {"min_lr": _real(NON_NEGATIVE)},
}

LOGICS: dict[str, dict[str, Kw]] = {
    "dl2": {"xi": _real(POSITIVE)},
    "godel": {},
    "kleene_dienes": {},
    "lukasiewicz": {},
    "reichenbach": {},
    "goguen": {},
    "yager": {"p": _real(POSITIVE)},
    "stl": {"k": _real(POSITIVE)},
    "qll": {"p": _real(POSITIVE)},
}

ATTACKS: dict[str, dict[str, Kw]] = {
    "pgd": {
        # 0 steps: the start point only (a random point of the region)
        "steps": _nat(NON_NEGATIVE),
        "restarts": _nat(AT_LEAST_ONE),
        "step_size": _real(POSITIVE),
        "random_start": BOOL,
        "surrogate_beta": _real(POSITIVE),
    },
    "apgd": {
        "steps": _nat(NON_NEGATIVE),
        "restarts": _nat(AT_LEAST_ONE),
        "rho": _real(UNIT),
        "momentum": _real(UNIT),
        "random_start": BOOL,
        "surrogate_beta": _real(POSITIVE),
    },
}

METHODS: dict[str, dict[str, Kw]] = {"ibp": {}, "crown_ibp": {}, "crown": {}, "alpha_crown": {}}
CERTIFIED_METHODS = ("ibp", "crown_ibp")
DEVICES = ("auto", "cpu", "cuda")

# Keywords of the explanation functions in expressions (`integrated_gradients(f, x, y, steps = 8)`).
EXPLAINER_KEYWORDS: dict[str, dict[str, Kw]] = {
    "integrated_gradients": {"steps": _nat(EXPLAIN_SAMPLES), "baseline": _real()},
    "smoothgrad": {"noise": _real(NON_NEGATIVE), "samples": _nat(EXPLAIN_SAMPLES)},
}

# data sources: keywords, and (input shape, classes) where known without reading files
_DATA_COMMON: dict[str, Kw] = {
    "split": Kw(type="String", choices=("train", "val", "test", "all")),
    "seed": _nat(SEED),
    "limit": _nat(AT_LEAST_ONE),
    "val_fraction": _real(FRACTION),
    "test_fraction": _real(FRACTION),
}
_DATA_FILES: dict[str, Kw] = {**_DATA_COMMON, "root": STRING, "download": BOOL}
DATASETS: dict[str, dict[str, Kw]] = {
    "digits": _DATA_COMMON,
    "breast_cancer": _DATA_COMMON,
    **{name: _DATA_FILES for name in ("mnist", "fashion_mnist", "cifar10", "svhn")},
    "tensors": {**_DATA_COMMON, "path": STRING, "root": STRING},
}
DATASET_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "breast_cancer": ((30,), 2),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "svhn": ((3, 32, 32), 10),
}

# train / verify block keys: the kind of value each takes ("model", "optimizer", ... are options
# from the tables above; "loss" an expression; "device" a device name)
TRAIN_KEYS: dict[str, Kw] = {
    "model": Kw(type="model"),
    "epochs": _nat(AT_LEAST_ONE),
    "batch": _nat(AT_LEAST_ONE),
    "optimizer": Kw(type="optimizer"),
    "schedule": Kw(type="schedule"),
    "logic": Kw(type="logic"),
    "attack": Kw(type="attack"),
    "loss": Kw(type="loss"),
    "seed": _nat(SEED),
    "device": Kw(type="device"),
    # epochs over which the radii grow to their value (0: from the start)
    "ramp": _nat(NON_NEGATIVE),
    "threads": _nat(THREADS),
}
VERIFY_KEYS: dict[str, Kw] = {
    "properties": Kw(type="properties"),
    "method": Kw(type="method"),
    "attack": Kw(type="attack"),
    "timeout": _real(POSITIVE),
    "split": _nat(NON_NEGATIVE),
    "samples": _nat(AT_LEAST_ONE),
}
OPTION_TABLES: dict[str, dict[str, dict[str, Kw]]] = {
    "model": MODELS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "logic": LOGICS,
    "attack": ATTACKS,
    "method": METHODS,
}
