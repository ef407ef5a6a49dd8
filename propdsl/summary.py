"""The text `propdsl check` prints: networks, params, properties and blocks of a spec."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from propdsl.check import OptionValue, show_value
from propdsl.pretty import domain, linear_form, number, show

if TYPE_CHECKING:
    from propdsl.api import Spec


def summary(spec: Spec) -> str:
    lines = [f"spec {spec.name}: ok"]
    lines.append("networks:")
    for name, ty in spec.networks.items():
        lines.append(f"  {name} : {ty.show()}")
    if not spec.networks:
        lines.append("  (none)")
    lines.append("params:")
    for name, value in spec.params.items():
        overridden = "  (overridden)" if name in spec.overrides else ""
        lines.append(f"  {name} : {spec.param_types[name].show()} = {number(value)}{overridden}")
    if not spec.params:
        lines.append("  (none)")
    lines.append("properties:")
    if not spec.properties:
        lines.append("  (none)")
    for prop in spec.properties.values():
        params = ", ".join(f"{n} : {t.show()}" for n, t in prop.params)
        lines.append(f"  {prop.name}({params})")
        if prop.partner is not None:
            pair = ", ".join(n for n, _ in prop.params[2:])
            lines.append(f"    partner ({pair}) : {show_value(prop.partner)}")
        for q in prop.quantified:
            lines.append(f"    {q.kind} {q.name} : {q.type.show()} in {domain(q.domain)}")
        lines.append(f"    formula: {show(prop.formula)}")
        forms = prop.linear_forms
        if forms:
            lines.append("    linear constraints (verification):")
            lines += [f"      {linear_form(f)}" for f in forms]
    for block in spec.blocks:
        data, kwargs = block.data
        args = ", ".join(f"{k} = {show_value(v)}" for k, v in kwargs)
        lines.append(f"{block.kind} {block.network} on {data}({args}):")
        for key, value in block.settings:
            lines.append(f"  {key} = {_setting(value)}")
    return "\n".join(lines)


def _setting(value: Any) -> str:
    from propdsl import ir as I

    if isinstance(value, OptionValue | enum.Enum):
        return show_value(value)
    if isinstance(value, I.Node):
        return show(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    return show_value(value)
