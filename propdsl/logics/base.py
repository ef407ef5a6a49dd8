"""The logic interface, comparison operators and the registry of logics.

A logic gives every atom and connective of a property a tensor value. Values are batched and
stay differentiable where the logic is meant for training. ``loss`` turns a formula's value into
a loss that is >= 0 and == 0 exactly when the formula holds (for atoms and, up to floating-point
rounding and the smoothing of STL/QLL, for formulas; see docs/logics.md).
"""

from __future__ import annotations

import abc
import difflib
import enum
import inspect
import math
import re
from collections.abc import Callable, Sequence
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from propdsl.errors import UsageError

__all__ = [
    "Cmp",
    "Logic",
    "LogicError",
    "UnsupportedConnectiveError",
    "available_logics",
    "get_logic",
    "logic_class",
    "register_logic",
    "stack",
]


class LogicError(UsageError, ValueError):
    """A logic was asked for by a wrong name, with wrong parameters, or registered wrongly."""


class UnsupportedConnectiveError(LogicError):
    """The logic has no such connective (e.g. DL2 has no negation): rewrite the formula first."""


class Cmp(enum.Enum):
    """A comparison between two real tensors, as written in a spec."""

    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    EQ = "=="
    NE = "!="

    @property
    def negated(self) -> Cmp:
        """The comparison that holds exactly when this one fails: ``not a < b`` is ``a >= b``."""
        return _NEGATED[self]

    @property
    def converse(self) -> Cmp:
        """The comparison with swapped operands (``a < b`` is ``b > a``)."""
        return _CONVERSE[self]

    @property
    def strict(self) -> bool:
        """Whether the comparison fails at equality of its operands (``<``, ``>``, ``!=``)."""
        return self in (Cmp.LT, Cmp.GT, Cmp.NE)

    def holds(self, lhs: Tensor, rhs: Tensor) -> Tensor:
        """The exact comparison, a bool tensor (operands broadcast).

        >>> Cmp.LT.holds(torch.tensor([1.0, 2.0]), torch.tensor(2.0))
        tensor([ True, False])
        """
        return _EXACT[self](lhs, rhs)


_NEGATED = {
    Cmp.LT: Cmp.GE,
    Cmp.LE: Cmp.GT,
    Cmp.GT: Cmp.LE,
    Cmp.GE: Cmp.LT,
    Cmp.EQ: Cmp.NE,
    Cmp.NE: Cmp.EQ,
}
_CONVERSE = {
    Cmp.LT: Cmp.GT,
    Cmp.LE: Cmp.GE,
    Cmp.GT: Cmp.LT,
    Cmp.GE: Cmp.LE,
    Cmp.EQ: Cmp.EQ,
    Cmp.NE: Cmp.NE,
}
_EXACT: dict[Cmp, Callable[[Tensor, Tensor], Tensor]] = {
    Cmp.LT: torch.lt,
    Cmp.LE: torch.le,
    Cmp.GT: torch.gt,
    Cmp.GE: torch.ge,
    Cmp.EQ: torch.eq,
    Cmp.NE: torch.ne,
}


class Logic(abc.ABC):
    """A differentiable (or exact) semantics of the property language.

    Subclasses set the class variables and implement the methods below; ``@register_logic``
    makes them available by name. Parameters are constructor keywords (the built-in logics are
    frozen dataclasses, so equal parameters give equal, hashable logics).

    Class variables:
        name: the registry name used in specs (``logic = dl2``).
        has_negation: False means the compiler must push ``not`` down to the atoms (flipping
            comparisons) and rewrite ``a implies b`` as ``not a or b`` before compiling.
        trainable: False for logics meant for evaluation only (``boolean``, ``violation``).
        aliases: other names accepted by ``get_logic`` (those set on the class itself: a
            subclass of ``Godel`` does not inherit ``goedel``).
    """

    name: ClassVar[str]
    has_negation: ClassVar[bool]
    trainable: ClassVar[bool] = True
    aliases: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def atom(self, op: Cmp, lhs: Tensor, rhs: Tensor) -> Tensor:
        """The value of ``lhs op rhs`` (operands broadcast)."""

    @abc.abstractmethod
    def conj(self, values: Tensor, dim: int = -1) -> Tensor:
        """The conjunction of ``values`` along ``dim`` (an empty one is ``constant(True)``)."""

    @abc.abstractmethod
    def disj(self, values: Tensor, dim: int = -1) -> Tensor:
        """The disjunction of ``values`` along ``dim`` (an empty one is ``constant(False)``)."""

    @abc.abstractmethod
    def neg(self, value: Tensor) -> Tensor:
        """The negation; raises ``UnsupportedConnectiveError`` when ``has_negation`` is False."""

    def implies(self, a: Tensor, b: Tensor) -> Tensor:
        """The implication ``a implies b``; by default ``not a or b``."""
        if not self.has_negation:
            raise self._unsupported("implies")
        return self.disj(stack([self.neg(a), b]))

    @abc.abstractmethod
    def loss(self, value: Tensor) -> Tensor:
        """A loss that is >= 0 and == 0 exactly when the value means 'holds'."""

    @abc.abstractmethod
    def constant(self, truth: bool, like: Tensor) -> Tensor:
        """The value of ``True`` or ``False``, shaped like ``like``."""

    def _unsupported(self, connective: str) -> UnsupportedConnectiveError:
        return UnsupportedConnectiveError(
            f"logic '{self.name}' has no '{connective}': push negations down to the atoms "
            "(flipping comparisons) and rewrite 'a implies b' as 'not a or b' first"
        )


L = TypeVar("L", bound=type[Logic])

_REGISTRY: dict[str, type[Logic]] = {}
_ALIASES: dict[str, str] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def register_logic(cls: L) -> L:
    """Make a ``Logic`` subclass available by its ``name`` (a class decorator).

    Registering the same class again is allowed; another class under a taken name is an error.

    >>> @register_logic  # doctest: +SKIP
    ... @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class Drastic(Godel):
    ...     name = "drastic"
    ...
    ...     def conj(self, values, dim=-1):
    ...         return torch.where((values < 1).sum(dim) <= 1, values.amin(dim), 0.0)
    """
    if not (isinstance(cls, type) and issubclass(cls, Logic)):
        raise LogicError(f"register_logic expects a Logic subclass, got {cls!r}")
    if inspect.isabstract(cls):
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise LogicError(f"cannot register abstract logic {cls.__qualname__}: implement {missing}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _NAME.match(name):
        raise LogicError(
            f"{cls.__qualname__}.name must be a lower-case identifier such as 'my_logic', "
            f"got {name!r}"
        )
    aliases = _own_aliases(cls)
    if not isinstance(aliases, tuple) or not all(
        isinstance(a, str) and a == a.strip().lower() and a for a in aliases
    ):
        raise LogicError(f"{cls.__qualname__}.aliases must be a tuple of lower-case names")
    if not isinstance(getattr(cls, "has_negation", None), bool):
        raise LogicError(f"{cls.__qualname__}.has_negation must be set to True or False")
    for key in (name, *aliases):
        known = _lookup(key)
        if known is not None and _identity(known) != _identity(cls):
            raise LogicError(
                f"logic name '{key}' is already taken by {known.__module__}.{known.__qualname__}"
            )
    # the spec registry first (it may refuse the name), so that both always agree
    _register_for_specs(cls)
    _REGISTRY[name] = cls
    for alias in aliases:
        _ALIASES[alias] = name
    return cls


def _own_aliases(cls: type[Logic]) -> tuple[str, ...]:
    """The aliases a class declares itself: a subclass of a built-in logic does not inherit its
    parent's names (registering it would otherwise clash with the parent's aliases)."""
    return cls.__dict__.get("aliases", ())


def _register_for_specs(cls: type[Logic]) -> None:
    """Make the logic nameable in specs (`logic = name(keyword = value)`): an entry of the
    torch-free registry the checker reads. The built-in logics are declared there already;
    a user's logic gets the keywords of its constructor that a spec can write."""
    from propdsl import registry

    target = f"{cls.__module__}:{cls.__qualname__}"
    entry = registry.Entry(
        kind=registry.Kind.LOGIC,
        name=cls.name,
        aliases=tuple(_own_aliases(cls)),
        keywords=registry.keywords_from_signature(cls),
        target=None if "<" in target else target,
        summary=(cls.__doc__ or "").strip().split("\n")[0],
        builtin=False,
        trainable=bool(cls.trainable),
    )
    try:
        registry.register(entry, replace=_identity_registered(cls))
    except registry.RegistryError as err:
        raise LogicError(str(err)) from None


def _identity_registered(cls: type[Logic]) -> bool:
    """Whether this very class (same module and name) was registered before: a reloaded module
    registers its logic again, and the spec registry then takes the new class's entry."""
    known = _lookup(cls.name)
    return known is not None and _identity(known) == _identity(cls)


def _identity(cls: type) -> tuple[str, str]:
    # Same module and qualified name counts as the same class, so reloading a module that
    # registers a logic does not fail.
    return cls.__module__, cls.__qualname__


def _lookup(name: str) -> type[Logic] | None:
    return _REGISTRY.get(_ALIASES.get(name, name))


def available_logics() -> list[str]:
    """The registered logic names, sorted.

    >>> "dl2" in available_logics()
    True
    """
    return sorted(_REGISTRY)


def logic_class(name: str) -> type[Logic]:
    """The class registered under ``name`` (or one of its aliases); ``LogicError`` if unknown."""
    key = name.strip().lower() if isinstance(name, str) else name
    cls = _lookup(key) if isinstance(key, str) else None
    if cls is None:
        known = available_logics()
        close = difflib.get_close_matches(str(key), [*known, *_ALIASES], n=1)
        hint = f"; did you mean '{_ALIASES.get(close[0], close[0])}'?" if close else ""
        raise LogicError(f"unknown logic {name!r}{hint} (known: {', '.join(known)})")
    return cls


def get_logic(name: str, **params: object) -> Logic:
    """An instance of the logic registered under ``name`` with the given parameters.

    Raises ``LogicError`` (a ``ValueError``) for an unknown name, an unknown parameter or a
    parameter value out of range.

    >>> get_logic("yager", p=2.0)
    Yager(xi=1.0, p=2.0)
    """
    cls = logic_class(name)
    try:
        inspect.signature(cls).bind(**params)
    except TypeError as err:
        accepted = _parameters(cls)
        listed = ", ".join(accepted) if accepted else "none"
        raise LogicError(
            f"bad parameters for logic '{cls.name}': {err} (accepted: {listed})"
        ) from None
    return cls(**params)


def _parameters(cls: type[Logic]) -> list[str]:
    return [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def stack(values: Sequence[Tensor], dim: int = -1) -> Tensor:
    """Broadcast ``values`` to one shape and stack them along ``dim``, ready for conj/disj.

    >>> stack([torch.tensor([1.0, 2.0]), torch.tensor(0.0)]).shape
    torch.Size([2, 2])
    """
    return torch.stack(torch.broadcast_tensors(*values), dim=dim)


# Helpers shared by the logic families.


def check_real(cls_name: str, param: str, value: object, *, low: float, high: float) -> float:
    """``value`` as a float in ``(low, high]``, else ``LogicError``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LogicError(f"{cls_name}: {param} must be a number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and low < value <= high):
        upper = "" if math.isinf(high) else f" and <= {high:g}"
        raise LogicError(f"{cls_name}: {param} must be > {low:g}{upper}, got {value:g}")
    return value


def operands(lhs: Tensor | float, rhs: Tensor | float) -> tuple[Tensor, Tensor]:
    """Both operands as floating tensors of one dtype and device (not yet broadcast)."""
    ref = lhs if isinstance(lhs, Tensor) else rhs
    lhs_t = torch.as_tensor(lhs, device=ref.device if isinstance(ref, Tensor) else None)
    rhs_t = torch.as_tensor(rhs, device=lhs_t.device)
    dtype = torch.result_type(lhs_t, rhs_t)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return lhs_t.to(dtype), rhs_t.to(dtype)


def float_like(like: Tensor) -> torch.dtype:
    return like.dtype if like.dtype.is_floating_point else torch.get_default_dtype()


def reduced_like(values: Tensor, dim: int) -> Tensor:
    """An empty tensor with the shape ``values`` has once ``dim`` is reduced away."""
    shape = list(values.shape)
    del shape[dim]
    return torch.empty(shape, dtype=values.dtype, device=values.device)


def connected_zero(x: Tensor) -> Tensor:
    """Zeros shaped like ``x`` that stay in its autograd graph with a zero gradient; NaN where
    ``x`` is NaN.

    Added to a piecewise-constant atom (``!=``) so that a loss made only of such atoms can still
    be back-propagated (a zero gradient, not an error) and NaN inputs still show; infinite ``x``
    gives 0, not NaN.
    """
    return torch.where(torch.isnan(x), x, 0.0)


def difference(a: Tensor, b: Tensor) -> Tensor:
    """``a - b``, but 0 (not NaN) where both are the same infinity, which compare equal."""
    return (a - b).masked_fill(torch.isinf(a) & (a == b), 0.0)
