"""Static tables of what the spec's blocks accept: keys, option names and their keyword types.

The checker validates blocks against these tables without importing torch; the backends map the
same names onto their implementations. Keyword types: "Real", "Nat", "Bool", "String",
"List[Nat]", "Activation", or a tuple of allowed names.
"""

from __future__ import annotations

ACTIVATIONS = ("relu", "tanh", "leaky_relu", "softplus", "sigmoid")

MODELS: dict[str, dict[str, object]] = {
    "mlp": {
        "hidden": "List[Nat]",
        "activation": "Activation",
        "beta": "Real",
        "negative_slope": "Real",
    },
    "cnn": {
        "channels": "List[Nat]",
        "hidden": "List[Nat]",
        "activation": "Activation",
        "beta": "Real",
        "negative_slope": "Real",
        "kernel": "List[Nat]",
        "stride": "List[Nat]",
        "padding": "List[Nat]",
    },
    # A model passed in from the CLI (--model pkg.mod:factory) or the API.
    "user": {},
}

OPTIMIZERS: dict[str, dict[str, object]] = {
    "sgd": {"lr": "Real", "momentum": "Real", "weight_decay": "Real", "nesterov": "Bool"},
    "adam": {"lr": "Real", "weight_decay": "Real"},
    "adamw": {"lr": "Real", "weight_decay": "Real"},
}

SCHEDULES: dict[str, dict[str, object]] = {
    "none": {},
    "step": {"step_size": "Nat", "gamma": "Real"},
    "cosine": {"min_lr": "Real"},
}

LOGICS: dict[str, dict[str, object]] = {
    "dl2": {"xi": "Real"},
    "godel": {},
    "kleene_dienes": {},
    "lukasiewicz": {},
    "reichenbach": {},
    "goguen": {},
    "yager": {"p": "Real"},
    "stl": {"k": "Real"},
    "qll": {"p": "Real"},
}

ATTACKS: dict[str, dict[str, object]] = {
    "pgd": {
        "steps": "Nat",
        "restarts": "Nat",
        "step_size": "Real",
        "random_start": "Bool",
        "surrogate_beta": "Real",
    },
    "apgd": {
        "steps": "Nat",
        "restarts": "Nat",
        "rho": "Real",
        "momentum": "Real",
        "random_start": "Bool",
        "surrogate_beta": "Real",
    },
}

METHODS: dict[str, dict[str, object]] = {"ibp": {}, "crown_ibp": {}, "crown": {}, "alpha_crown": {}}
CERTIFIED_METHODS = ("ibp", "crown_ibp")
DEVICES = ("auto", "cpu", "cuda")

# data sources: keywords, and (input shape, classes) where known without reading files
_DATA_COMMON: dict[str, object] = {
    "split": ("train", "val", "test", "all"),
    "seed": "Nat",
    "limit": "Nat",
    "val_fraction": "Real",
    "test_fraction": "Real",
}
_DATA_FILES: dict[str, object] = {**_DATA_COMMON, "root": "String", "download": "Bool"}
DATASETS: dict[str, dict[str, object]] = {
    "digits": _DATA_COMMON,
    "breast_cancer": _DATA_COMMON,
    **{name: _DATA_FILES for name in ("mnist", "fashion_mnist", "cifar10", "svhn")},
    "tensors": {**_DATA_COMMON, "path": "String", "root": "String"},
}
DATASET_SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "breast_cancer": ((30,), 2),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
    "svhn": ((3, 32, 32), 10),
}

# train / verify block keys: the kind of value each takes
TRAIN_KEYS: dict[str, str] = {
    "model": "model",
    "epochs": "Nat",
    "batch": "Nat",
    "optimizer": "optimizer",
    "schedule": "schedule",
    "logic": "logic",
    "attack": "attack",
    "loss": "loss",
    "seed": "Nat",
    "device": "device",
    "ramp": "Nat",
    "threads": "Nat",
}
VERIFY_KEYS: dict[str, str] = {
    "properties": "properties",
    "method": "method",
    "attack": "attack",
    "timeout": "Real",
    "split": "Nat",
    "samples": "Nat",
}
OPTION_TABLES: dict[str, dict[str, dict[str, object]]] = {
    "model": MODELS,
    "optimizer": OPTIMIZERS,
    "schedule": SCHEDULES,
    "logic": LOGICS,
    "attack": ATTACKS,
    "method": METHODS,
}
