"""One record per built-in function of the language: what every pass needs to know about it.

The checker types a call by the record's `rule` (a method `_rule_<rule>` of the checker, in
`propdsl.check.builtins`) after checking the keywords against `keywords`; the simplifier, the
pretty-printer and the backends read the flags instead of keeping their own lists of names.
Torch-free: the implementations live in the backends (the loss compiler's function table, the
explanation operators of `propdsl.explain`, named by `target`).

Adding a built-in: a record here, its type rule in `propdsl.check.builtins` when no existing
rule fits, and its implementation in the backends (docs/architecture.md, "How to add a
built-in").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from propdsl.registry import EXPLAIN_SAMPLES, NON_NEGATIVE, Kw, nat, real


@dataclass(frozen=True, kw_only=True)
class Builtin:
    """A built-in function.

    Attributes:
        name: as a spec writes it.
        rule: the checker's type rule (`elementwise`, `vector_map`, `reduction`, `pair`, `norm`,
            `extreme`, `argmax`, `clamp`, `cross_entropy`, `topk_overlap`, `ball`, `box`,
            `range`, `grad`, `explainer`).
        arity: the numbers of positional arguments it takes.
        keywords: keyword -> `Kw` (constant values, ranges checked).
        explainer: an attribution map `(network, input, label) -> input`: takes a network by
            name as its first argument.
        input_gradient: differentiates a network with respect to its input (`grad` and the
            explainers): its gradient through ReLUs is zero almost everywhere, so attacks on it
            run on a smooth surrogate of the network.
        selects: `"max"` / `"min"` for argmax / argmin: the position of the largest / smallest
            element (compared with a label, the simplifier rewrites it into margins).
        domain: builds a quantifier's domain (`ball`, `box`, `range`).
        sampled: an explainer that averages gradients over sampled points (integrated gradients,
            SmoothGrad): no exact Jacobian bounds exist for it.
        bounded: an exact explainer that Jacobian bounds cover (a function of the input
            gradient at the point); guided backprop is exact but modifies the backward pass, so
            it is not.
        metric: `"similarity"` (larger is closer: `cosine`, `topk_overlap`) or `"distance"`
            (smaller is closer: `norm`, `mse`), for explanation-stability properties.
        notation: the pretty-printer's form, `{0}` the argument and `{p}` the norm's subscript;
            None: `name(arguments)`.
        target: the implementation (`"module:function"`), where the backends call one by name.
        random: a draw from the evaluation's generator (`uniform`, `random_class`), one per sample
            and evaluation; losses only (the exact interpreter and the verifier have none).
    """

    name: str
    rule: str
    arity: tuple[int, ...]
    keywords: Mapping[str, Kw] = field(default_factory=dict)
    explainer: bool = False
    input_gradient: bool = False
    sampled: bool = False
    bounded: bool = True
    selects: str | None = None
    domain: bool = False
    metric: str | None = None
    notation: str | None = None
    target: str | None = None
    random: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "keywords", MappingProxyType(dict(self.keywords)))


def _records(*records: Builtin) -> dict[str, Builtin]:
    return {r.name: r for r in records}


def _explainer(
    name: str,
    keywords: Mapping[str, Kw] | None = None,
    *,
    sampled: bool = False,
    bounded: bool = True,
) -> Builtin:
    return Builtin(
        name=name,
        rule="explainer",
        arity=(3,),
        keywords=keywords or {},
        explainer=True,
        input_gradient=True,
        sampled=sampled,
        bounded=bounded and not sampled,
        target=f"propdsl.explain:{name}",
    )


def _unary(name: str, rule: str, **facts: object) -> Builtin:
    return Builtin(name=name, rule=rule, arity=(1,), **facts)  # type: ignore[arg-type]


BUILTINS: Mapping[str, Builtin] = MappingProxyType(
    _records(
        _unary("abs", "elementwise", notation="|{0}|"),
        *(_unary(n, "elementwise") for n in ("exp", "log", "sqrt", "sigmoid", "tanh", "relu")),
        _unary("softmax", "vector_map"),
        _unary("log_softmax", "vector_map"),
        _unary("sum", "reduction"),
        _unary("mean", "reduction"),
        Builtin(name="dot", rule="pair", arity=(2,)),
        Builtin(name="cosine", rule="pair", arity=(2,), metric="similarity"),
        Builtin(name="pearson", rule="pair", arity=(2,)),
        Builtin(name="mse", rule="pair", arity=(2,), metric="distance"),
        Builtin(name="kl", rule="pair", arity=(2,)),
        _explainer("saliency"),
        _explainer("gradient_x_input"),
        _explainer("guided_backprop", bounded=False),
        _explainer(
            "integrated_gradients",
            {"steps": nat(EXPLAIN_SAMPLES), "baseline": real()},
            sampled=True,
        ),
        _explainer(
            "smoothgrad",
            {"noise": real(NON_NEGATIVE), "samples": nat(EXPLAIN_SAMPLES)},
            sampled=True,
        ),
        Builtin(name="norm", rule="norm", arity=(1, 2), metric="distance", notation="‖{0}‖{p}"),
        Builtin(name="max", rule="extreme", arity=(1, 2)),
        Builtin(name="min", rule="extreme", arity=(1, 2)),
        _unary("argmax", "argmax", selects="max"),
        _unary("argmin", "argmax", selects="min"),
        Builtin(name="clamp", rule="clamp", arity=(3,)),
        Builtin(name="cross_entropy", rule="cross_entropy", arity=(2,)),
        Builtin(name="grad", rule="grad", arity=(2,), input_gradient=True),
        Builtin(
            name="topk_overlap",
            rule="topk_overlap",
            arity=(3,),
            metric="similarity",
            target="propdsl.explain:topk_intersection",
        ),
        Builtin(name="uniform", rule="uniform", arity=(0,), random=True),
        Builtin(name="random_class", rule="argmax", arity=(1,), random=True),
        Builtin(name="ball", rule="ball", arity=(2, 3), domain=True),
        Builtin(name="box", rule="box", arity=(2,), domain=True),
        Builtin(name="range", rule="range", arity=(1,), domain=True),
    )
)

# Built-in names that are not functions: `classes`, the domain of the network's labels.
BUILTIN_NAMES = frozenset(("classes",))
# Every name a spec may not declare, rebind or quantify over.
RESERVED = frozenset(BUILTINS) | BUILTIN_NAMES

EXPLAINERS = tuple(n for n, r in BUILTINS.items() if r.explainer)
# exact functions of the input gradient at the point, which Jacobian bounds cover
EXACT_EXPLAINERS = tuple(n for n in EXPLAINERS if BUILTINS[n].bounded)
SAMPLED_EXPLAINERS = tuple(n for n in EXPLAINERS if BUILTINS[n].sampled)
# explainers without Jacobian bounds: sampled ones and modified backward passes (guided backprop)
UNBOUNDED_EXPLAINERS = tuple(n for n in EXPLAINERS if not BUILTINS[n].bounded)
INPUT_GRADIENTS = frozenset(n for n, r in BUILTINS.items() if r.input_gradient)
SIMILARITIES = tuple(n for n, r in BUILTINS.items() if r.metric == "similarity")
DISTANCES = tuple(n for n, r in BUILTINS.items() if r.metric == "distance")
RANDOM = frozenset(n for n, r in BUILTINS.items() if r.random)


def record(name: str) -> Builtin | None:
    """The record of the built-in function `name`, or None."""
    return BUILTINS.get(name)
