"""Typed IR in mathematical notation, for summaries (`propdsl check`) and reports."""

from __future__ import annotations

import math

from propdsl import ir as I
from propdsl.builtins import BUILTINS

_CMP = {"<": "<", "<=": "≤", ">": ">", ">=": "≥", "==": "=", "!=": "≠"}
_PREC = {
    "implies": 0,
    "or": 1,
    "and": 2,
    "not": 3,
    "cmp": 4,
    "+": 5,
    "-": 5,
    "*": 6,
    "/": 6,
    "neg": 7,
    "^": 8,
}
_SUB = {"1": "₁", "2": "₂"}


def number(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        # 12 significant digits: a param such as 0.123456789 shows as written (`:g` keeps 6),
        # while float noise such as 0.1 + 0.2 still shows as 0.3
        return f"{v:.12g}"
    return str(v)


def show(node: I.Node) -> str:
    """`node` in mathematical notation."""
    return _show(node, 0)


def _wrap(text: str, prec: int, ctx: int) -> str:
    return f"({text})" if prec < ctx else text


def _show(n: I.Node, ctx: int) -> str:
    if isinstance(n, I.Const):
        return (
            number(n.value)
            if not (isinstance(n.value, (int, float)) and n.value < 0)
            else (_wrap(number(n.value), _PREC["neg"], ctx))
        )
    if isinstance(n, (I.Var, I.ParamRef)):
        return n.name
    if isinstance(n, I.Apply):
        return f"{n.net}({_show(n.arg, 0)})"
    if isinstance(n, I.Idx):
        return f"{_show(n.base, 9)}[{', '.join(_show(i, 0) for i in n.indices)}]"
    if isinstance(n, I.Fn):
        return _fn(n)
    if isinstance(n, I.Neg):
        return _wrap(f"-{_show(n.operand, _PREC['neg'])}", _PREC["neg"], ctx)
    if isinstance(n, I.Arith):
        if n.op in ("max", "min"):
            return f"{n.op}({_show(n.left, 0)}, {_show(n.right, 0)})"
        p = _PREC[n.op]
        sym = {"*": "·"}.get(n.op, n.op)
        right_ctx = p if n.op == "^" else p + 1
        left_ctx = p + 1 if n.op == "^" else p
        return _wrap(f"{_show(n.left, left_ctx)} {sym} {_show(n.right, right_ctx)}", p, ctx)
    if isinstance(n, I.Cmp):
        p = _PREC["cmp"]
        return _wrap(f"{_show(n.left, p + 1)} {_CMP[n.op]} {_show(n.right, p + 1)}", p, ctx)
    if isinstance(n, I.Linear):
        return _show(n.atom, ctx)
    if isinstance(n, I.And):
        p = _PREC["and"]
        return _wrap(" ∧ ".join(_show(i, p + 1) for i in n.items), p, ctx)
    if isinstance(n, I.Or):
        p = _PREC["or"]
        return _wrap(" ∨ ".join(_show(i, p + 1) for i in n.items), p, ctx)
    if isinstance(n, I.Not):
        # `¬` binds tightest in mathematical notation: `¬(v ≥ 0)`, never `¬v ≥ 0`
        return _wrap(f"¬{_show(n.operand, _PREC['^'] + 1)}", _PREC["not"], ctx)
    if isinstance(n, I.Implies):
        p = _PREC["implies"]
        return _wrap(f"{_show(n.left, p + 1)} ⇒ {_show(n.right, p)}", p, ctx)
    if isinstance(n, I.Cond):
        return _wrap(
            f"if {_show(n.cond, 0)} then {_show(n.then, 0)} else {_show(n.orelse, 0)}", 0, ctx
        )
    if isinstance(n, I.Domain):
        return domain(n)
    if isinstance(n, I.Quant):
        sym = {"forall": "∀", "exists": "∃", "max": "max", "min": "min"}[n.kind]
        binds = ", ".join(f"{v.name} ∈ {domain(d)}" for v, d in zip(n.vars, n.domains, strict=True))
        if n.kind in ("max", "min"):
            return _wrap(f"{sym}_{{{binds}}} {_show(n.body, 0)}", 0, ctx)
        return _wrap(f"{sym} {binds}. {_show(n.body, 0)}", 0, ctx)
    if isinstance(n, I.PropTerm):
        return f"loss[{n.name}]"
    return f"<{type(n).__name__}>"


def _fn(n: I.Fn) -> str:
    args = [_show(a, 0) for a in n.args]
    rec = BUILTINS.get(n.fn)
    if rec is not None and rec.notation is not None:
        p = n.option("p")
        sub = "" if p is None else "∞" if p == math.inf else _SUB.get(number(p), number(p))
        return rec.notation.format(*args, p=sub)
    opts = [f"{k}={v}" for k, v in n.options if k != "net"]
    if n.option("net") is not None:
        args = [str(n.option("net"))] + args
    return f"{n.fn}({', '.join(args + opts)})"


def domain(d: I.Domain) -> str:
    if isinstance(d, I.Ball):
        p = "∞" if d.p == math.inf else _SUB.get(number(int(d.p)), number(d.p))
        return f"B{p}({_show(d.centre, 0)}, {_show(d.radius, 0)})"
    if isinstance(d, I.Box):
        return f"[{_show(d.lo, 0)}, {_show(d.hi, 0)}]"
    if isinstance(d, I.Inter):
        return " ∩ ".join(domain(p) for p in d.parts)
    if isinstance(d, I.Range):
        base = "classes" if d.label else f"{{0..{d.k - 1}}}"
        if d.exclude is not None:
            return f"{base} \\ {{{_show(d.exclude, 0)}}}"
        return base
    return f"<{type(d).__name__}>"


def linear_form(form: I.LinearForm) -> str:
    parts = []
    for t in form.terms:
        coef = "" if t.coef == 1 else ("-" if t.coef == -1 else f"{number(t.coef)}·")
        idx = ", ".join(_show(i, 0) for i in t.index)
        parts.append(f"{coef}{t.net}({_show(t.arg, 0)})[{idx}]")
    const = _show(form.const, 0)
    if const != "0":
        parts.append(const)
    text = " + ".join(parts).replace("+ -", "- ") or "0"
    over = ""
    if form.over:
        over = " for " + ", ".join(f"{v.name} ∈ {domain(r)}" for v, r in form.over)
    return f"{text} {_CMP[form.op]} 0{over}"


def type_of(ty: object) -> str:
    return ty.show() if hasattr(ty, "show") else str(ty)
