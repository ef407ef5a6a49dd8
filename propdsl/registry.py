"""Every name a spec can mention, registered once: logics, data sources, attacks, bound methods,
models, optimizers, schedules, activations, and the keys of train and verify blocks.

Each entry has a kind, a name (and aliases), a keyword schema (the type and range of each
keyword a spec may give) and a lazy import target, `"module:attribute"`, that the backends
resolve when they run: this module imports no torch, so the checker, `propdsl check` and the
CLI's help read it without loading any backend. The built-in functions of expressions (`norm`,
`saliency`, ...) have their own records in `propdsl.builtins`.

Built-in entries are declared below. User code adds entries through the backends' registration
functions (`propdsl.logics.register_logic`, `propdsl.data.register_dataset`,
`propdsl.models.register_model`), which call `register` here, so that a spec loaded afterwards
may name them; the CLI imports plugin modules (`--plugin`, entry points of the group
`propdsl.plugins`) before it runs a command (`propdsl.plugins`). A spec never imports anything.

Keyword types: "Real", "Nat", "Bool", "String", "List[Nat]", "Activation"; a `Kw` with `choices`
takes one of the listed names. Every `Real` is also finite in float32 (the backends compute in
float32: `lr = 1e40` would overflow there).
"""

from __future__ import annotations

import enum
import importlib
import inspect
import math
import re
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from propdsl.errors import UsageError

# The largest float32: a Real option beyond it would become inf in the backends.
FLOAT32_MAX = 3.4028234663852886e38


class RegistryError(UsageError, ValueError):
    """A registration that would make a spec's names ambiguous, or a malformed entry."""


# -- value ranges ---------------------------------------------------------------------------------
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
    """One keyword (or block key): its type, the values it takes, and a note for the docs."""

    type: str
    bounds: Bounds | None = None
    choices: tuple[str, ...] = ()
    note: str = ""

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


def real(bounds: Bounds | None = None, note: str = "") -> Kw:
    return Kw(type="Real", bounds=bounds, note=note)


def nat(bounds: Bounds | None = None, note: str = "") -> Kw:
    return Kw(type="Nat", bounds=bounds, note=note)


def nats(bounds: Bounds, note: str = "") -> Kw:
    return Kw(type="List[Nat]", bounds=bounds, note=note)


BOOL = Kw(type="Bool")
STRING = Kw(type="String")
ACTIVATION = Kw(type="Activation")

# The types a keyword value may have in a spec (the checker converts to them).
KEYWORD_TYPES = ("Real", "Nat", "Bool", "String", "List[Nat]", "Activation")


# -- bound methods (an enum the CLI, the checker and the engine pass on as such) ------------------
class NamedEnum(enum.Enum):
    """An enum whose members can also be given as their value's string, ignoring case,
    surrounding spaces and '-' for '_' ("Alpha-CROWN" is `Method.ALPHA_CROWN`)."""

    @classmethod
    def _missing_(cls, value: object) -> enum.Enum | None:
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            for member in cls:
                if member.value == key:
                    return member
        return None


class Method(NamedEnum):
    """Bound propagation method; the strings "ibp", "crown_ibp", "crown" and "alpha_crown"
    also work. CROWN-IBP is CROWN's backward pass over IBP's intermediate bounds."""

    IBP = "ibp"
    CROWN_IBP = "crown_ibp"
    CROWN = "crown"
    ALPHA_CROWN = "alpha_crown"


# -- entries --------------------------------------------------------------------------------------
class Kind(enum.Enum):
    """What an entry names; the value is the block key (or keyword type) that takes it."""

    LOGIC = "logic"
    DATA = "data"
    ATTACK = "attack"
    METHOD = "method"
    MODEL = "model"
    OPTIMIZER = "optimizer"
    SCHEDULE = "schedule"
    ACTIVATION = "activation"
    ADAPTIVE = "adaptive"
    AUGMENT = "augment"
    PARTNER = "partner"

    @property
    def noun(self) -> str:
        """As messages name it: "unknown data source 'x'"."""
        return "data source" if self is Kind.DATA else self.value


@dataclass(frozen=True, kw_only=True)
class Entry:
    """A name a spec can mention, with its keyword schema and where the backend finds it.

    Attributes:
        kind, name: what it is and how a spec writes it.
        keywords: keyword -> `Kw`, the values a spec may give (ranges included).
        target: `"module:attribute"` (dots after the colon walk attributes) that implements it,
            imported only by `resolve`; None for a name without an implementation object
            (`model = user`, `schedule = none`).
        aliases: other names a spec may write; the checker stores the canonical `name`.
        summary: one line for help texts.
        builtin: declared here (False: added by user code through `register`).
        parameters: keyword -> the target's parameter where they are named differently.
        shape: data sources: (input shape, number of classes) where known without reading files.
        required: data sources: keywords a spec must give, with an example value for the message.
        trainable: logics: False for logics meant for evaluation only (`boolean`, `violation`).
        certified: methods: usable for certified training (`certified(p, method = ibp)`).
    """

    kind: Kind
    name: str
    keywords: Mapping[str, Kw] = field(default_factory=dict)
    target: str | None = None
    aliases: tuple[str, ...] = ()
    summary: str = ""
    builtin: bool = True
    parameters: Mapping[str, str] = field(default_factory=dict)
    shape: tuple[tuple[int, ...], int] | None = None
    required: tuple[tuple[str, str], ...] = ()
    trainable: bool = True
    certified: bool = False

    def __post_init__(self) -> None:
        # read-only views: an entry is shared by every spec checked in the process
        object.__setattr__(self, "keywords", MappingProxyType(dict(self.keywords)))
        object.__setattr__(self, "parameters", MappingProxyType(dict(self.parameters)))

    def resolve(self) -> Any:
        """The implementation object (imports its module); None where there is no target."""
        return None if self.target is None else resolve_target(self.target)


def resolve_target(target: str) -> Any:
    """`"pkg.mod:Attr.attr"` -> the object (the module is imported)."""
    module, _, path = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in path.split(".") if path else ():
        obj = getattr(obj, part)
    return obj


_ENTRIES: dict[Kind, dict[str, Entry]] = {kind: {} for kind in Kind}
_ALIASES: dict[Kind, dict[str, str]] = {kind: {} for kind in Kind}
_NAME = re.compile(r"[a-z_][a-z0-9_]*\Z")


def lookup(kind: Kind, name: str) -> Entry | None:
    """The entry a spec means by `name` (an alias gives its canonical entry), or None."""
    table = _ENTRIES[kind]
    return table.get(name) or table.get(_ALIASES[kind].get(name, ""))


def names(kind: Kind, *, trainable_only: bool = False) -> tuple[str, ...]:
    """The canonical names of a kind, built-ins first in declaration order, then user ones."""
    return tuple(e.name for e in entries(kind) if e.trainable or not trainable_only)


def entries(kind: Kind) -> tuple[Entry, ...]:
    return tuple(_ENTRIES[kind].values())


def aliases(kind: Kind) -> dict[str, str]:
    """alias -> canonical name."""
    return dict(_ALIASES[kind])


def register(entry: Entry, *, replace: bool = False) -> Entry:
    """Add an entry so that specs may name it; returns the entry now registered.

    The same target under the same name again is a no-op (a module imported twice, or a
    backend registering a built-in the registry already declares); another target under a
    taken name or alias is a `RegistryError` unless `replace`.
    """
    if not isinstance(entry, Entry):
        raise RegistryError(f"register expects a registry Entry, got {entry!r}")
    if not _NAME.match(entry.name):
        raise RegistryError(
            f"a {entry.kind.noun} name must be a lower-case identifier such as 'my_name', "
            f"got {entry.name!r}"
        )
    if not all(isinstance(a, str) and a and a == a.strip().lower() for a in entry.aliases):
        raise RegistryError(f"{entry.name}: aliases must be lower-case names")
    for key, kw in entry.keywords.items():
        if kw.type not in KEYWORD_TYPES:
            raise RegistryError(f"{entry.name}: keyword '{key}' has an unknown type {kw.type!r}")
    table, alias_table = _ENTRIES[entry.kind], _ALIASES[entry.kind]
    known = table.get(entry.name)
    if known is not None and known.target == entry.target and entry.target is not None:
        return known
    for key in (entry.name, *entry.aliases):
        taken = lookup(entry.kind, key)
        if taken is not None and taken.name != entry.name and not replace:
            raise RegistryError(
                f"{entry.kind.noun} name '{key}' is already taken by '{taken.name}'"
                + (f" ({taken.target})" if taken.target else "")
            )
    if known is not None and not replace:
        raise RegistryError(
            f"a {entry.kind.noun} named '{entry.name}' is already registered"
            + (f" ({known.target})" if known.target else "")
        )
    if known is not None:
        unregister(entry.kind, entry.name)
    table[entry.name] = entry
    for alias in entry.aliases:
        alias_table[alias] = entry.name
    return entry


def unregister(kind: Kind, name: str) -> Entry | None:
    """Remove an entry (and its aliases); returns it, or None when there was none."""
    entry = _ENTRIES[kind].pop(name, None)
    if entry is not None:
        for alias in entry.aliases:
            if _ALIASES[kind].get(alias) == name:
                del _ALIASES[kind][alias]
    return entry


def _declare(kind: Kind, entries_: Iterable[Entry]) -> None:
    for entry in entries_:
        assert entry.kind is kind, entry
        register(entry)


# -- schemas from signatures (user registrations) -------------------------------------------------
_SCALARS: dict[str, str] = {"float": "Real", "int": "Nat", "bool": "Bool", "str": "String"}
_LIST = re.compile(r"(?:list|tuple|Sequence|typing\.Sequence|collections\.abc\.Sequence)\[int")


def keyword_type(annotation: Any, default: Any = inspect.Parameter.empty) -> str | None:
    """The spec type of a Python parameter ("Real", "Nat", "Bool", "String", "List[Nat]"), from
    its annotation or else its default value; None when a spec cannot give it a value.

    >>> keyword_type("float | None"), keyword_type(int), keyword_type("int | Sequence[int]")
    ('Real', 'Nat', 'List[Nat]')
    """
    if annotation is not inspect.Parameter.empty:
        text = annotation if isinstance(annotation, str) else _annotation_text(annotation)
        if _LIST.search(text):
            return "List[Nat]"
        parts = [p.strip() for p in text.split("|") if p.strip() not in ("None", "NoneType")]
        kinds = {_SCALARS.get(p) for p in parts}
        if len(kinds) == 1 and None not in kinds:
            return kinds.pop()
        if kinds == {"Real", "Nat"}:
            return "Real"
        return None
    if isinstance(default, bool):
        return "Bool"
    if isinstance(default, int):
        return "Nat"
    if isinstance(default, float):
        return "Real"
    if isinstance(default, str):
        return "String"
    return None


def _annotation_text(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def keywords_from_signature(
    fn: Callable[..., Any], *, skip: int = 0, exclude: Iterable[str] = ()
) -> dict[str, Kw]:
    """The keyword schema of a user's function or class: its keyword parameters (after the first
    `skip` positional ones) whose type a spec can write, without ranges (the implementation
    checks its own values). Parameters of other types are not settable from a spec."""
    excluded = set(exclude)
    out: dict[str, Kw] = {}
    params = list(inspect.signature(fn).parameters.values())[skip:]
    hints = _hints(fn)
    for p in params:
        if p.kind not in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) or p.name in excluded:
            continue
        ty = keyword_type(hints.get(p.name, p.annotation), p.default)
        if ty is not None:
            out[p.name] = Kw(type=ty)
    return out


def _hints(fn: Any) -> dict[str, Any]:
    # a class's annotations are its (dataclass) fields, those of its bases included
    try:
        return typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - unresolvable annotations: fall back on the raw text
        return {}


# -- the built-in entries -------------------------------------------------------------------------
def _entry(kind: Kind, name: str, target: str | None, keywords: Mapping[str, Kw] | None = None,
           **facts: Any) -> Entry:  # fmt: skip
    return Entry(kind=kind, name=name, target=target, keywords=keywords or {}, **facts)


_FUZZY_XI = real(DECAY)  # fuzzy truths stay in [0, 1]
_SIGNED_XI = real(NON_NEGATIVE)  # 0: the closure semantics
_LOGICS = "propdsl.logics"
_declare(
    Kind.LOGIC,
    [
        _entry(Kind.LOGIC, "dl2", f"{_LOGICS}.dl2:DL2", {"xi": real(POSITIVE)}),
        _entry(
            Kind.LOGIC,
            "godel",
            f"{_LOGICS}.fuzzy:Godel",
            {"xi": _FUZZY_XI},
            aliases=("goedel", "gödel"),
        ),
        _entry(
            Kind.LOGIC,
            "kleene_dienes",
            f"{_LOGICS}.fuzzy:KleeneDienes",
            {"xi": _FUZZY_XI},
            aliases=("kd",),
        ),
        _entry(
            Kind.LOGIC,
            "lukasiewicz",
            f"{_LOGICS}.fuzzy:Lukasiewicz",
            {"xi": _FUZZY_XI},
            aliases=("łukasiewicz",),
        ),
        _entry(Kind.LOGIC, "reichenbach", f"{_LOGICS}.fuzzy:Reichenbach", {"xi": _FUZZY_XI}),
        _entry(
            Kind.LOGIC, "goguen", f"{_LOGICS}.fuzzy:Goguen", {"xi": _FUZZY_XI}, aliases=("product",)
        ),
        _entry(
            Kind.LOGIC, "yager", f"{_LOGICS}.fuzzy:Yager", {"p": real(POSITIVE), "xi": _FUZZY_XI}
        ),
        _entry(
            Kind.LOGIC,
            "stl",
            f"{_LOGICS}.quantitative:STL",
            {"k": real(POSITIVE), "xi": _SIGNED_XI},
        ),
        _entry(
            Kind.LOGIC,
            "qll",
            f"{_LOGICS}.quantitative:QLL",
            {"p": real(POSITIVE), "xi": _SIGNED_XI},
        ),
        # for attacks and exact evaluation, not for a train block
        _entry(Kind.LOGIC, "violation", f"{_LOGICS}.quantitative:Violation", trainable=False),
        _entry(
            Kind.LOGIC, "boolean", f"{_LOGICS}.boolean:Boolean", aliases=("bool",), trainable=False
        ),
    ],
)

# data sources: keywords, and (input shape, classes) where known without reading files
DATA_SPLITS = ("train", "val", "test", "all")
DATA_COMMON: dict[str, Kw] = {
    "split": Kw(type="String", choices=DATA_SPLITS),
    "seed": nat(SEED),
    "limit": nat(AT_LEAST_ONE),
    "val_fraction": real(FRACTION),
    "test_fraction": real(FRACTION),
}
DATA_FILES: dict[str, Kw] = {**DATA_COMMON, "root": STRING, "download": BOOL}
DATA_PATH: dict[str, Kw] = {**DATA_COMMON, "path": STRING, "root": STRING}
REQUIRES_PATH = (("path", '"file.npz"'),)
_declare(
    Kind.DATA,
    [
        _entry(Kind.DATA, "digits", "propdsl.data:DIGITS", DATA_COMMON, shape=((1, 8, 8), 10)),
        _entry(
            Kind.DATA, "breast_cancer", "propdsl.data:BREAST_CANCER", DATA_COMMON, shape=((30,), 2)
        ),
        _entry(Kind.DATA, "mnist", "propdsl.data:MNIST", DATA_FILES, shape=((1, 28, 28), 10)),
        _entry(
            Kind.DATA,
            "fashion_mnist",
            "propdsl.data:FASHION_MNIST",
            DATA_FILES,
            shape=((1, 28, 28), 10),
        ),
        _entry(Kind.DATA, "cifar10", "propdsl.data:CIFAR10", DATA_FILES, shape=((3, 32, 32), 10)),
        _entry(Kind.DATA, "svhn", "propdsl.data:SVHN", DATA_FILES, shape=((3, 32, 32), 10)),
        _entry(Kind.DATA, "tensors", "propdsl.data:TENSORS", DATA_PATH, required=REQUIRES_PATH),
    ],
)

_SURROGATE = real(POSITIVE)
_declare(
    Kind.ATTACK,
    [
        _entry(
            Kind.ATTACK,
            "pgd",
            "propdsl.attacks:PGD",
            {
                "steps": nat(NON_NEGATIVE, "0: the start point only"),
                "restarts": nat(AT_LEAST_ONE),
                "step_size": real(POSITIVE),
                "random_start": BOOL,
                "surrogate_beta": _SURROGATE,
            },
        ),
        _entry(
            Kind.ATTACK,
            "apgd",
            "propdsl.attacks:APGD",
            {
                "steps": nat(NON_NEGATIVE),
                "restarts": nat(AT_LEAST_ONE),
                "rho": real(UNIT),
                "momentum": real(UNIT),
                "random_start": BOOL,
                "surrogate_beta": _SURROGATE,
            },
        ),
        # uniform random points, no gradient step (PGD with steps = 0): a noise sampler
        _entry(
            Kind.ATTACK,
            "noise",
            "propdsl.attacks:noise",
            {"samples": nat(AT_LEAST_ONE, "the most violating of the draws is kept")},
        ),
    ],
)

_declare(
    Kind.METHOD,
    [
        _entry(
            Kind.METHOD,
            m.value,
            f"propdsl.verify.bounds:Method.{m.name}",
            certified=m in (Method.IBP, Method.CROWN_IBP),
        )
        for m in Method
    ],
)

_declare(
    Kind.ACTIVATION,
    [
        _entry(Kind.ACTIVATION, "relu", "torch.nn:ReLU"),
        _entry(Kind.ACTIVATION, "tanh", "torch.nn:Tanh"),
        _entry(Kind.ACTIVATION, "leaky_relu", "torch.nn:LeakyReLU", {"negative_slope": real(UNIT)}),
        _entry(Kind.ACTIVATION, "softplus", "torch.nn:Softplus", {"beta": real(POSITIVE)}),
        _entry(Kind.ACTIVATION, "sigmoid", "torch.nn:Sigmoid"),
        _entry(
            Kind.ACTIVATION, "half_huber", "propdsl.models:HalfHuberReLU", {"delta": real(POSITIVE)}
        ),
    ],
)

# The options of an activation given on the model itself (`mlp(activation = softplus, beta = 5)`).
ACTIVATION_OPTIONS: dict[str, Kw] = {"beta": real(POSITIVE), "negative_slope": real(UNIT)}
_declare(
    Kind.MODEL,
    [
        _entry(
            Kind.MODEL,
            "mlp",
            "propdsl.models:mlp",
            {"hidden": nats(WIDTH), "activation": ACTIVATION, **ACTIVATION_OPTIONS},
        ),
        _entry(
            Kind.MODEL,
            "cnn",
            "propdsl.models:cnn",
            {
                "channels": nats(CHANNELS),
                "hidden": nats(WIDTH),
                "activation": ACTIVATION,
                **ACTIVATION_OPTIONS,
                "kernel": nats(KERNEL),
                "stride": nats(KERNEL),
                "padding": nats(PADDING, "one value for every conv layer, or one per layer"),
            },
        ),
        # the model passed in from the CLI (--model pkg.mod:factory) or the API
        _entry(Kind.MODEL, "user", None),
    ],
)

_LR, _WEIGHT_DECAY = real(POSITIVE), real(NON_NEGATIVE)
_FUSED = Kw(type="Bool", note="PyTorch's fused kernel; default true where one exists")
_ADAM = {"lr": _LR, "weight_decay": _WEIGHT_DECAY, "fused": _FUSED}
_declare(
    Kind.OPTIMIZER,
    [
        _entry(
            Kind.OPTIMIZER,
            "sgd",
            "torch.optim:SGD",
            {
                "lr": _LR,
                "momentum": real(FRACTION),
                "weight_decay": _WEIGHT_DECAY,
                "nesterov": Kw(type="Bool", note="`true` needs a momentum > 0"),
                "fused": _FUSED,
            },
        ),
        _entry(Kind.OPTIMIZER, "adam", "torch.optim:Adam", _ADAM),
        _entry(Kind.OPTIMIZER, "adamw", "torch.optim:AdamW", _ADAM),
    ],
)

_SCHEDULERS = "torch.optim.lr_scheduler"
_declare(
    Kind.SCHEDULE,
    [
        _entry(Kind.SCHEDULE, "none", None),
        _entry(
            Kind.SCHEDULE,
            "step",
            f"{_SCHEDULERS}:StepLR",
            {"step_size": nat(AT_LEAST_ONE, "epochs"), "gamma": real(DECAY)},
        ),
        _entry(
            Kind.SCHEDULE,
            "cosine",
            f"{_SCHEDULERS}:CosineAnnealingLR",
            {"min_lr": real(NON_NEGATIVE)},
            parameters={"min_lr": "eta_min"},
        ),
    ],
)

# weights of the loss that a train block adapts during training (a param of the spec)
_declare(
    Kind.ADAPTIVE,
    [
        _entry(
            Kind.ADAPTIVE,
            "woods_psi",
            "propdsl.loss.schedules:WoodsPsi",
            {
                "weight": Kw(type="String", note="the name of the Real param of the loss it sets"),
                "base": real(POSITIVE),
                "rate": real(NON_NEGATIVE),
                "target": real(POSITIVE, "the cross-entropy the weight steers to"),
                "down": real(NON_NEGATIVE),
                "up": real(NON_NEGATIVE),
            },
            required=(("weight", '"psi"'),),
        ),
    ],
)

# training data made once before the first step (Casadio et al.'s static FGSM set)
_declare(
    Kind.AUGMENT,
    [
        _entry(
            Kind.AUGMENT,
            "fgsm",
            "propdsl.loss.augment:FGSMAugment",
            # copies clipped to [0, 1], the inputs' box (as the prelude's unit_box)
            {"eps": real(POSITIVE, "one copy per input, by the initial model's FGSM step")},
            required=(("eps", "0.1"),),
        ),
    ],
)

# How a property of a pair draws the partner (xt, yt) of each sample (x, y): targets implemented
# by `propdsl.partners`. Prototypes are read from the network's penultimate-layer features.
PROTOTYPES = Bounds(lo=1, hi=10000)
_declare(
    Kind.PARTNER,
    [
        _entry(
            Kind.PARTNER,
            "other_class",
            "propdsl.partners:other_class",
            {"seed": nat(SEED)},
            summary="another sample of the data, of a different class",
        ),
        _entry(
            Kind.PARTNER,
            "class_mean",
            "propdsl.partners:class_mean",
            {"seed": nat(SEED)},
            summary="the mean input of a different class",
        ),
        _entry(
            Kind.PARTNER,
            "prototype",
            "propdsl.partners:prototype",
            {"k": nat(PROTOTYPES), "seed": nat(SEED)},
            summary="a prototype of a different class: the sample nearest the centre of one of "
            "k clusters (k-means) of penultimate-layer features",
        ),
    ],
)

DEVICES = ("auto", "cpu", "cuda")

# train / verify block keys: the kind of value each takes (a `Kind`'s value: an entry of that
# kind; "loss": an expression; "device": a device name; "properties": property names)
TRAIN_KEYS: dict[str, Kw] = {
    "model": Kw(type="model"),
    "epochs": nat(AT_LEAST_ONE),
    "batch": nat(AT_LEAST_ONE),
    "optimizer": Kw(type="optimizer"),
    "schedule": Kw(type="schedule"),
    "logic": Kw(type="logic"),
    "attack": Kw(type="attack"),
    # per-term attacks: terms(name = attack, ...), a name being a property or a variable bound
    # by a quantifier over a region in the loss
    "attacks": Kw(type="attacks"),
    "loss": Kw(type="loss"),
    "seed": nat(SEED),
    "device": Kw(type="device"),
    # training data added once before training (Casadio et al.'s FGSM-augmented set)
    "augment": Kw(type="augment"),
    # a param of the loss set every step by an adaptive rule (Woods et al.'s psi)
    "adaptive": Kw(type="adaptive"),
    # epochs over which the radii grow to their value (0: from the start)
    "ramp": nat(NON_NEGATIVE),
    "threads": nat(THREADS),
}
VERIFY_KEYS: dict[str, Kw] = {
    "properties": Kw(type="properties"),
    "method": Kw(type="method"),
    "attack": Kw(type="attack"),
    "timeout": real(POSITIVE),
    "split": nat(NON_NEGATIVE),
    "samples": nat(AT_LEAST_ONE),
}
BLOCK_KEYS: dict[str, dict[str, Kw]] = {"train": TRAIN_KEYS, "verify": VERIFY_KEYS}
# The kinds a block key may name: key -> Kind.
OPTION_KINDS: dict[str, Kind] = {
    k.value: k
    for k in (
        Kind.MODEL,
        Kind.OPTIMIZER,
        Kind.SCHEDULE,
        Kind.LOGIC,
        Kind.ATTACK,
        Kind.ADAPTIVE,
        Kind.AUGMENT,
        Kind.METHOD,
    )
}


# -- the docs' table ------------------------------------------------------------------------------
def options_table() -> str:
    """The table of block options of docs/language.md (section 12.4), made from the entries:
    entries of one kind with the same keywords share a row. A test keeps the page equal to it."""
    rows = ["| key | name | keywords |", "|---|---|---|"]
    for key, kind in OPTION_KINDS.items():
        groups: list[tuple[list[str], Mapping[str, Kw]]] = []
        for e in entries(kind):
            if not e.builtin or not e.trainable:
                continue
            shown = f"`{e.name}`" + "".join(f" (or `{a}`)" for a in e.aliases if _NAME.match(a))
            if groups and dict(groups[-1][1]) == dict(e.keywords):
                groups[-1][0].append(shown)
            else:
                groups.append(([shown], e.keywords))
        for i, (group, keywords) in enumerate(groups):
            shown = ", ".join(group)
            first = f"`{key}` " if i == 0 else ""
            rows.append(f"| {first}| {shown} | {_keywords_cell(keywords)} |")
    return "\n".join(rows)


def _keywords_cell(keywords: Mapping[str, Kw]) -> str:
    if not keywords:
        return "none"
    parts = []
    for name, kw in keywords.items():
        text = f"`{name}`" if kw.type == "Activation" else f"`{name}: {kw.describe()}`"
        parts.append(f"{text} ({kw.note})" if kw.note else text)
    return ", ".join(parts)
