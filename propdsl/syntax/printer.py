"""AST -> canonical text. `parse(format(m)) == m` and `format` is idempotent; comments are kept.

Layout rules: one declaration per line (a property's body on the next lines, one quantifier per
line); groups of networks, params and constant lets stay together, anything else is separated by a
blank line; block settings one per line, indented by two spaces, `=` aligned.
Comments are attached by position: a comment on the last line of a declaration or setting stays
behind it; any other comment is printed on its own line before the next declaration or setting.
A blank line that separated a top-level comment from the code before or after it is kept (one).
"""

from __future__ import annotations

import math
from collections import deque

from propdsl import ast as A

INDENT = "  "

# precedence levels, low to high (see grammars/propdsl.lark)
P_IMPLIES, P_OR, P_AND, P_NOT, P_CMP, P_AND_SET, P_ADD, P_MUL, P_UNARY, P_POW, P_POSTFIX = range(11)
_BINARY_PREC = {
    "implies": P_IMPLIES,
    "or": P_OR,
    "and": P_AND,
    "&": P_AND_SET,
    "+": P_ADD,
    "-": P_ADD,
    "*": P_MUL,
    "/": P_MUL,
    **{op: P_CMP for op in A.COMPARE_OPS},
}


def format_expr(e: A.Expr) -> str:
    """One expression in canonical inline form."""
    return _expr(e, P_IMPLIES, True)


def _number(v: int | float) -> str:
    if isinstance(v, bool):
        raise TypeError("booleans are not numbers")
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return repr(v)


def _string(s: str) -> str:
    body = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{body}"'


def _expr(e: A.Expr, min_prec: int, tail: bool) -> str:
    text, prec = _expr_prec(e, tail)
    if prec < min_prec:
        return f"({_expr_prec(e, True)[0]})"
    return text


def _expr_prec(e: A.Expr, tail: bool) -> tuple[str, int]:
    if isinstance(e, A.Num):
        if isinstance(e.value, (int, float)) and e.value < 0:
            return f"-{_number(-e.value)}", P_UNARY
        return _number(e.value), P_POSTFIX + 1
    if isinstance(e, A.Str):
        return _string(e.value), P_POSTFIX + 1
    if isinstance(e, A.BoolLit):
        return ("true" if e.value else "false"), P_POSTFIX + 1
    if isinstance(e, A.Name):
        return e.id, P_POSTFIX + 1
    if isinstance(e, A.ListExpr):
        return "[" + ", ".join(format_expr(i) for i in e.items) + "]", P_POSTFIX + 1
    if isinstance(e, A.Call):
        args = [format_expr(a) for a in e.args]
        args += [f"{k.name} = {format_expr(k.value)}" for k in e.keywords]
        return f"{e.func.id}({', '.join(args)})", P_POSTFIX
    if isinstance(e, A.Index):
        base = _expr(e.value, P_POSTFIX, False)
        return f"{base}[{', '.join(format_expr(i) for i in e.indices)}]", P_POSTFIX
    if isinstance(e, A.Unary):
        if e.op == "not":
            return f"not {_expr(e.operand, P_NOT, tail)}", P_NOT
        return f"-{_expr(e.operand, P_UNARY, tail)}", P_UNARY
    if isinstance(e, A.Binary):
        if e.op == "^":
            base = _expr(e.left, P_POSTFIX, False)
            return f"{base} ^ {_expr(e.right, P_UNARY, tail)}", P_POW
        p = _BINARY_PREC[e.op]
        if e.op == "implies":  # right associative
            left = _expr(e.left, p + 1, False)
            right = _expr(e.right, p, tail)
        elif p == P_CMP:  # non associative
            left = _expr(e.left, p + 1, False)
            right = _expr(e.right, p + 1, tail)
        else:
            left = _expr(e.left, p, False)
            right = _expr(e.right, p + 1, tail)
        return f"{left} {e.op} {right}", p
    if isinstance(e, (A.Quantified, A.IfExpr)):
        # These extend as far right as possible: safe unparenthesised only at the tail.
        text = _binding(e)
        return text, (P_UNARY if tail else -1)
    raise TypeError(f"cannot format {type(e).__name__}")


def _binding(e: A.Quantified | A.IfExpr) -> str:
    if isinstance(e, A.IfExpr):
        return (
            f"if {format_expr(e.cond)} then {format_expr(e.then)} "
            f"else {_expr(e.orelse, P_IMPLIES, True)}"
        )
    return f"{_quant_head(e)} {format_expr(e.body)}"


def _quant_head(e: A.Quantified) -> str:
    return f"{e.kind} {', '.join(_binder(b) for b in e.binders)}:"


def _binder(b: A.Binder) -> str:
    ann = f" : {format_type(b.annotation)}" if b.annotation is not None else ""
    return f"{b.name}{ann} in {_expr(b.domain, P_AND_SET, True)}"


def format_type(t: A.TypeExpr | A.ArrowType) -> str:
    if isinstance(t, A.ArrowType):
        return f"{format_type(t.domain)} -> {format_type(t.codomain)}"
    if t.dims is None:
        return t.name
    return f"{t.name}[{', '.join(format_expr(d) for d in t.dims)}]"


def _stmt(e: A.Expr, depth: int) -> list[str]:
    """A property body: one quantifier head per line, the body indented below."""
    pad = INDENT * depth
    if isinstance(e, A.Quantified) and e.kind in ("forall", "exists"):
        return [pad + _quant_head(e)] + _stmt(e.body, depth + 1)
    return [pad + format_expr(e)]


def _params(ps: tuple[A.Param, ...]) -> str:
    out = []
    for p in ps:
        ann = f" : {format_type(p.annotation)}" if p.annotation is not None else ""
        out.append(p.name + ann)
    return "(" + ", ".join(out) + ")"


def _decl_lines(d: A.Decl) -> list[str]:
    if isinstance(d, A.NetworkDecl):
        return [f"network {d.name} : {format_type(d.type)}"]
    if isinstance(d, A.ParamDecl):
        return [f"param {d.name} : {format_type(d.type)} = {format_expr(d.default)}"]
    if isinstance(d, A.LetDecl):
        params = _params(d.params) if d.params is not None else ""
        return [f"let {d.name}{params} = {format_expr(d.body)}"]
    if isinstance(d, A.PropertyDecl):
        partner = f" partner {format_expr(d.partner)}" if d.partner is not None else ""
        return [f"property {d.name}{_params(d.params)}{partner} ="] + _stmt(d.body, 1)
    if isinstance(d, A.Block):
        raise TypeError("blocks are formatted by _block")
    raise TypeError(f"cannot format {type(d).__name__}")


def _group(d: A.Decl) -> str | None:
    if isinstance(d, A.NetworkDecl):
        return "network"
    if isinstance(d, A.ParamDecl):
        return "param"
    if isinstance(d, A.LetDecl) and d.params is None:
        return "let"
    return None


class _Comments:
    """Hands out comments in source order, by the spans of the items they precede or end."""

    def __init__(self, comments: tuple[A.Comment, ...]):
        # a deque: comments are taken from the front, one at a time (a list's pop(0) would make
        # a file of many comments quadratic)
        self.pending = deque(sorted(comments, key=lambda c: (c.span.line, c.span.col)))

    def before(self, span, end_line: int | None = None) -> tuple[list[A.Comment], str | None]:
        """Comments before or inside `span` (leading) and one on its last line (trailing)."""
        if span is None:
            return [], None
        last = span.end_line if end_line is None else end_line
        leading, trailing = [], None
        while self.pending and self.pending[0].span.line <= last:
            c = self.pending.popleft()
            if c.span.line == last and c.span.col >= span.end_col and trailing is None:
                trailing = c.text
            elif c.span.line == last and c.span.col >= span.end_col:
                trailing = f"{trailing} {c.text[1:].strip()}"
            else:
                leading.append(c)
        return leading, trailing

    def until(self, line: int) -> list[A.Comment]:
        out = []
        while self.pending and self.pending[0].span.line <= line:
            out.append(self.pending.popleft())
        return out

    def rest(self) -> list[A.Comment]:
        out = list(self.pending)
        self.pending.clear()
        return out


def _comment_lines(
    comments: list[A.Comment], out: list[str], prev_line: int | None, next_line: int | None
) -> list[str]:
    """Comments on their own lines, keeping one blank line where the source had a gap between
    them and the code before (ending on `prev_line`) or after (starting on `next_line`)."""
    lines: list[str] = []
    for c in comments:
        last = lines[-1] if lines else (out[-1] if out else "")
        if prev_line is not None and c.span.line > prev_line + 1 and last != "":
            lines.append("")
        lines.append(c.text)
        prev_line = c.span.line
    if comments and next_line is not None and next_line > comments[-1].span.line + 1:
        lines.append("")
    return lines


def _with_trailing(lines: list[str], trailing: str | None) -> list[str]:
    if trailing:
        lines = lines[:-1] + [f"{lines[-1]}  {trailing}"]
    return lines


def _block(b: A.Block, comments: _Comments) -> list[str]:
    head = f"{b.kind} {b.name} on {format_expr(b.source)} {{"
    lines = [head]
    width = max((len(s.key) for s in b.settings), default=0)
    for s in b.settings:
        leading, trailing = comments.before(s.span)
        lines += [INDENT + c.text for c in leading]
        lines += _with_trailing(
            [f"{INDENT}{s.key.ljust(width)} = {format_expr(s.value)}"], trailing
        )
    if b.span is not None:
        lines += [INDENT + c.text for c in comments.until(b.span.end_line - 1)]
        # a comment on the closing line, before or after the brace
        _, trailing = comments.before(b.span)
        return _with_trailing(lines + ["}"], trailing)
    return lines + ["}"]


def format_module(module: A.Module) -> str:
    """The canonical text of a whole spec (ends with a newline)."""
    comments = _Comments(module.comments)
    out: list[str] = []
    prev_group: str | None = None
    prev_line: int | None = 0  # the source line the previous declaration ended on
    for d in module.decls:
        group = _group(d)
        if out and not (group is not None and group == prev_group):
            out.append("")
        prev_group = group
        span = getattr(d, "span", None)
        start = span.line if span is not None else None
        if isinstance(d, A.Block):
            leading = comments.until(span.line - 1) if span is not None else []
            out += _comment_lines(leading, out, prev_line, start)
            out += _block(d, comments)
        else:
            leading, trailing = comments.before(span)
            out += _comment_lines(leading, out, prev_line, start)
            out += _with_trailing(_decl_lines(d), trailing)
        prev_line = span.end_line if span is not None else None
    tail = comments.rest()
    if tail:
        if out:
            out.append("")
        out += _comment_lines(tail, out, None, None)
    return "\n".join(out) + "\n"
