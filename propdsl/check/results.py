"""What the checker returns: properties, blocks and their settings as typed values."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from propdsl import ir as I
from propdsl.source import Span
from propdsl.types import NetworkTy, Ty


@dataclass(frozen=True)
class PropertyInfo:
    """A closed property: parameters bound to one data sample, body as typed IR."""

    name: str
    params: tuple[tuple[str, Ty], ...]
    network: str | None
    body: I.Node
    span: Span | None = field(default=None, compare=False)
    # a property of a pair: how the partner (the third and fourth parameters) is drawn
    partner: OptionValue | None = None


@dataclass(frozen=True)
class BlockInfo:
    """A checked `train` or `verify` block: settings as typed values.

    An option setting is an `OptionValue` with its canonical name (an alias resolved), except
    `method`, a `propdsl.registry.Method`."""

    kind: str
    network: str
    data: tuple[str, tuple[tuple[str, Any], ...]]
    settings: tuple[tuple[str, Any], ...]
    span: Span | None = field(default=None, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.settings).get(key, default)


@dataclass(frozen=True)
class OptionValue:
    """`adam(lr = 1e-3)` or `dl2`: a registered name with constant keyword values."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    def kw(self) -> dict[str, Any]:
        return dict(self.kwargs)

    def show(self) -> str:
        if not self.kwargs:
            return self.name
        return f"{self.name}({', '.join(f'{k} = {show_value(v)}' for k, v in self.kwargs)})"


def show_value(v: Any) -> str:
    """A setting's value as a spec writes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(show_value(x) for x in v) + "]"
    if isinstance(v, OptionValue):
        return v.show()
    if isinstance(v, enum.Enum):
        return str(v.value)
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v)


@dataclass(frozen=True)
class Checked:
    networks: dict[str, NetworkTy]
    params: dict[str, tuple[Ty, Any]]
    properties: dict[str, PropertyInfo]
    templates: tuple[str, ...]
    blocks: tuple[BlockInfo, ...]
    network_spans: dict[str, Span | None] = field(default_factory=dict, compare=False)
