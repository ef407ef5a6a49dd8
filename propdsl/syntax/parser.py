"""Text -> AST. The only module that imports lark; lark's exceptions never leave it."""

from __future__ import annotations

import math
import re
import unicodedata
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from propdsl import ast as A
from propdsl.errors import ParseError
from propdsl.source import Diagnostic, Source, Span, is_hidden, suggest

DECL_KEYWORDS = ("network", "param", "let", "property", "train", "verify")
KEYWORDS = frozenset(
    "network param let property train verify on forall exists in if then else and or not "
    "implies inf true false max min".split()
)
MAX_SYNTAX_ERRORS = 10
MAX_DEPTH = 100
# Longer integers do not fit a float (and Python refuses to convert very long ones).
_MAX_INT_DIGITS = 308

_TERMINAL_TEXT = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "COMP_OP": "a comparison",
    "QUANT": "'forall', 'exists', 'max' or 'min'",
    "BLOCK_KIND": "'train' or 'verify'",
    "$END": "end of file",
}


def grammar_text() -> str:
    """The grammar: from the installed package (wheel) or the repository's `grammars/` folder."""
    packaged = resources.files("propdsl").joinpath("grammars/propdsl.lark")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    repo = Path(__file__).resolve().parents[2] / "grammars" / "propdsl.lark"
    return repo.read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _parser() -> Any:
    import lark

    return lark.Lark(
        grammar_text(),
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        cache=True,
    )


def parse(text: str, name: str = "<spec>") -> A.Module:
    """Parse spec text into a `Module`, raising `ParseError` with every syntax error found."""
    source = Source(text, name)
    hidden = _hidden_characters(source)
    if hidden:
        raise ParseError(hidden, source)
    diagnostics: list[Diagnostic] = []
    tree = None
    offset = 0
    masked = text
    while True:
        result = _try_parse(masked, source)
        if isinstance(result, Diagnostic):
            diagnostics.append(result)
            if len(diagnostics) >= MAX_SYNTAX_ERRORS or result.span is None:
                break
            offset = _next_declaration(text, result.span, offset)
            if offset < 0:
                break
            # Blank out what came before (keeping newlines) so that positions stay true.
            masked = re.sub(r"[^\n]", " ", text[:offset]) + text[offset:]
            continue
        if not diagnostics:
            tree = result
        break
    if diagnostics:
        raise ParseError(diagnostics, source)
    deep = _too_deep(tree)
    if deep is not None:
        raise ParseError([deep], source)
    builder = _Builder(source)
    module = builder.transform(tree)
    if builder.diagnostics:
        raise ParseError(builder.diagnostics, source)
    return A.Module(module.decls, tuple(_comments(source)))


# Characters that are invisible or move the cursor: a spec holding one may read differently from
# what it is (a bidi override reorders the text on screen, "Trojan Source", Boucher and Anderson
# 2021), so they are refused everywhere, comments and strings included. Tabs and newlines are
# layout; a carriage return is accepted only in a CRLF line break.
def _hidden_characters(source: Source) -> list[Diagnostic]:
    text = source.text
    # The distinct characters first (a C-speed pass), so that the search below looks only for
    # the few that are hidden.
    found = {ch for ch in set(text) if is_hidden(ch)}
    if not found:
        return []
    out: list[Diagnostic] = []
    pattern = re.compile("[" + "".join(re.escape(ch) for ch in sorted(found)) + "]")
    for m in pattern.finditer(text):
        ch = m.group()
        if ch == "\r" and text.startswith("\n", m.end()):
            continue
        line, col = source.position(m.start())
        out.append(
            Diagnostic(
                f"{_character_words(ch)} is not allowed in a spec",
                Span(line, col, line, col + 1),
                "delete it; only spaces, tabs and line breaks may separate tokens"
                if unicodedata.category(ch) == "Cc"
                else "delete it (it may be invisible in an editor)",
            )
        )
        if len(out) >= MAX_SYNTAX_ERRORS:
            break
    return out


def _character_words(ch: str) -> str:
    """`the control character U+0000`, `the character U+202E RIGHT-TO-LEFT OVERRIDE`."""
    name = unicodedata.name(ch, "")
    kind = "control character" if unicodedata.category(ch) == "Cc" else "character"
    return f"the {kind} U+{ord(ch):04X}" + (f" {name}" if name else "")


def _too_deep(tree: Any) -> Diagnostic | None:
    """An error for an expression nested beyond `MAX_DEPTH` levels, or None.

    Every later stage (AST builder, checker, simplifier, printer) recurses on the tree, so an
    absurdly deep expression would otherwise end in a RecursionError instead of a message.
    """
    import lark

    # (node, depth, the outermost expression above it: start -> declaration -> expression)
    stack: list[tuple[Any, int, Any]] = [(tree, 0, None)]
    while stack:
        node, depth, top = stack.pop()
        if depth == 2:
            top = node
        if depth > MAX_DEPTH:
            return Diagnostic(
                f"this expression is nested too deeply (more than {MAX_DEPTH} levels)",
                _span(top.meta),
                "split it into smaller parts with 'let'",
            )
        stack.extend((c, depth + 1, top) for c in node.children if isinstance(c, lark.Tree))
    return None


def _try_parse(text: str, source: Source) -> Any:
    import lark

    try:
        return _parser().parse(text)
    except lark.exceptions.UnexpectedInput as err:
        return _diagnose(err, source)


def _next_declaration(text: str, span: Span, after: int) -> int:
    """Offset of the first line after the error that starts a declaration, or -1.

    Only offsets beyond `after` (where the last attempt started) count, so recovery always
    moves forward.
    """
    pos = 0
    for number, line in enumerate(text.split("\n"), 1):
        if number > span.line and pos > after and re.match(rf"({'|'.join(DECL_KEYWORDS)})\b", line):
            return pos
        pos += len(line) + 1
    return -1


_DECL_TERMINALS = frozenset(("NETWORK", "PARAM", "LET", "PROPERTY", "BLOCK_KIND"))


def _describe_expected(expected: set[str]) -> str:
    names = []
    if _DECL_TERMINALS <= expected:
        expected = expected - _DECL_TERMINALS
        names.append("a new declaration")
    for term in sorted(expected):
        if term in _TERMINAL_TEXT:
            names.append(_TERMINAL_TEXT[term])
            continue
        pattern = _literal(term)
        names.append(f"'{pattern}'" if pattern else term.lower())
    names = sorted(set(names))
    if len(names) > 8:
        return ""
    return ", ".join(names[:-1]) + (" or " if len(names) > 1 else "") + names[-1] if names else ""


@cache
def _literal_map() -> dict[str, str]:
    out = {}
    for term in _parser().terminals:
        if term.pattern.type == "str":
            out[term.name] = term.pattern.value
    return out


def _literal(term: str) -> str | None:
    return _literal_map().get(term)


def _diagnose(err: Any, source: Source) -> Diagnostic:
    import lark

    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        pos = err.pos_in_stream
        char = source.text[pos] if pos is not None and pos < len(source.text) else ""
        span = Span(err.line, err.column, err.line, err.column + 1)
        hint = None
        if char == "'":
            hint = "primes may only follow a name, as in x'"
        elif char in "!":
            hint = "use 'not' for negation, '!=' for inequality"
        elif char == "|":
            hint = "use 'or' for disjunction"
        elif char == '"':
            hint = "strings are written in double quotes on one line"
        elif char and not char.isascii():
            hint = _non_ascii_hint(char)
        return Diagnostic(f"unexpected character {char!r}", span, hint)
    if isinstance(err, lark.exceptions.UnexpectedToken):
        token = err.token
        expected = set(err.expected) - {"COMMENT"}
        wanted = _describe_expected(expected)
        if token.type == "$END":
            msg = "unexpected end of file"
            if wanted:
                msg += f"; expected {wanted}"
            end = len(source.text)
            return Diagnostic(msg, source.end_span(), _unfinished_hint(source, end))
        text = str(token)
        if text in DECL_KEYWORDS and token.column == 1:
            # A new declaration begins while the previous one is unfinished: the error is where
            # the previous one stops, not at the keyword.
            msg = "this declaration is incomplete"
            if wanted:
                msg += f"; expected {wanted}"
            start = token.start_pos
            hint = (
                _unfinished_hint(source, start) or f"a new declaration starts at line {token.line}"
            )
            return Diagnostic(msg, source.end_before(start), hint)
        span = Span(
            token.line,
            token.column,
            token.end_line or token.line,
            token.end_column or token.column + len(text),
        )
        msg = f"unexpected {text!r}"
        if wanted:
            msg += f"; expected {wanted}"
        hint = (
            _token_hint(text, expected)
            or _bracket_hint(source, token)
            or _misspelt_keyword_hint(source, token, expected)
        )
        if hint is None and token.type in ("NAME", "NUMBER", "STRING") and "COMMA" in expected:
            hint = f"is a ',' or an operator missing before {text!r}?"
        return Diagnostic(msg, span, hint)
    # UnexpectedEOF and other rare cases
    end = len(source.text)
    return Diagnostic("unexpected end of file", source.end_span(), _unfinished_hint(source, end))


def _non_ascii_hint(char: str) -> str:
    """Names, numbers and operators are ASCII: say what the look-alike character really is."""
    name = unicodedata.name(char, "")
    what = f"U+{ord(char):04X}" + (f" {name}" if name else "")
    if unicodedata.category(char) == "Nd":
        return f"numbers are written with the ASCII digits 0-9; this is {what}"
    if char.isalpha():
        return f"names are written in ASCII letters; this is {what}"
    return f"this is {what}; outside comments and strings a spec is ASCII"


_TRAILING_OPERATOR = re.compile(
    r"(<=|>=|==|!=|->|[-+*/^&<>=,:]|\b(?:and|or|not|implies|in|if|then|else))\s*$"
)


def _unfinished_hint(source: Source, end: int) -> str | None:
    """Why the declaration ending at `end` is unfinished: an open bracket or a dangling operator."""
    hint = _unclosed_hint(source, end)
    if hint is not None:
        return hint
    span = source.end_before(end)
    code = source.line(span.line)[: span.col - 1]
    m = _TRAILING_OPERATOR.search(code)
    if m:
        return f"something is missing after '{m.group(1)}'"
    return None


_CLOSERS = {"(": ")", "[": "]", "{": "}"}


def _open_brackets(text: str) -> tuple[list[tuple[str, int]], bool]:
    """The brackets left open at the end of the last declaration in `text` (innermost last),
    and whether a closing bracket matched nothing."""
    start = _declaration_start(text)
    # Strings and comments blanked out, so that their brackets do not count.
    code = _COMMENT_RE.sub(lambda m: " " * len(m.group()), text[start:])
    stack: list[tuple[str, int]] = []
    unmatched = False
    for i, ch in enumerate(code):
        if ch in _CLOSERS:
            stack.append((ch, start + i))
        elif ch in ")]}":
            if stack and ch == _CLOSERS[stack[-1][0]]:
                stack.pop()
            else:
                unmatched = True
    return stack, unmatched


# Keywords long enough that a near miss is recognisable (`foral`, `trainf`, `porperty`).
_LONG_KEYWORDS = ("network", "param", "property", "train", "verify", "forall", "exists", "implies")


def _misspelt_keyword_hint(source: Source, token: Any, expected: set[str]) -> str | None:
    """`foral x' in ...`: the name before the unexpected token, or the token itself, is a
    misspelt keyword."""
    words = []
    if token.type == "NAME" and _DECL_TERMINALS <= expected:
        words.append(str(token))
    m = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", source.text[: token.start_pos])
    if m is not None:
        words.append(m.group(1))
    for word in words:
        if word in KEYWORDS or len(word) < 4:
            continue
        keyword = suggest(word, _LONG_KEYWORDS)
        if keyword:
            return f"did you mean '{keyword}' instead of '{word}'?"
    return None


def _bracket_hint(source: Source, token: Any) -> str | None:
    """For an unexpected closing bracket: is there no opening one?"""
    text = str(token)
    if text not in (")", "]", "}"):
        return None
    _, unmatched = _open_brackets(source.text[: token.start_pos + 1])
    return f"this '{text}' has no matching opening bracket" if unmatched else None


def _unclosed_hint(source: Source, end: int) -> str | None:
    """Where the innermost bracket left open in the declaration that ends at `end` was opened."""
    text = source.text[:end]
    stack, _ = _open_brackets(text)
    if not stack:
        return None
    ch, pos = stack[-1]
    line, col = source.position(pos)
    what = "the block's '{'" if ch == "{" else f"the '{ch}'"
    return f"{what} at line {line}, column {col} is never closed"


def _declaration_start(text: str) -> int:
    """Offset of the last line of `text` that starts a declaration (0 if none)."""
    found = 0
    for m in re.finditer(rf"^({'|'.join(DECL_KEYWORDS)})\b", text, re.MULTILINE):
        found = m.start()
    return found


def _token_hint(text: str, expected: set[str]) -> str | None:
    if text in ("train", "test", "val", "all") and "STRING" in expected:
        return f'write "{text}" in double quotes'
    if text in KEYWORDS and "NAME" in expected:
        return f"'{text}' is a keyword and cannot be used as a name"
    if text == "=" and "COMP_OP" in expected:
        return "use '==' to compare"
    if text in ("&&", "&") and "COMP_OP" in expected:
        return "use 'and' for conjunction"
    if {"AMPERSAND", "COLON", "COMMA"} <= expected and len(expected) <= 4:
        return "a quantifier's binders end with ':' before its body"
    return None


def _span(meta: Any) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    return Span(meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(tok: Any) -> Span:
    return Span(tok.line, tok.column, tok.end_line, tok.end_column)


# The escapes a string knows; any other backslash is an error (a Windows path such as
# "C:\data\x.npz" would otherwise lose its backslashes silently).
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t"}


def _unescape(token: Any) -> tuple[str, list[Diagnostic]]:
    """The value of a STRING token and an error for each unknown escape in it."""
    body = str(token)[1:-1]
    problems: list[Diagnostic] = []

    def one(m: re.Match[str]) -> str:
        ch = m.group(1)
        if ch in _ESCAPES:
            return _ESCAPES[ch]
        # Strings hold one line: the escape's column is the token's plus its offset.
        col = token.column + 1 + m.start()
        problems.append(
            Diagnostic(
                f"unknown escape '\\{ch}' in a string",
                Span(token.line, col, token.line, col + 2),
                "a string knows \\\\, \\\", \\n and \\t; write paths with '/' "
                "(or '\\\\' for a backslash)",
            )
        )
        return "\\" + ch

    return re.sub(r"\\(.)", one, body), problems


def _make_builder() -> type:
    import lark
    from lark import v_args

    @v_args(meta=True)
    class Builder(lark.Transformer):
        def __init__(self, source: Source):
            super().__init__()
            self.source = source
            # Errors found while building (they need the tree): collected, raised by `parse`.
            self.diagnostics: list[Diagnostic] = []

        # -- declarations ------------------------------------------------------------------------
        def start(self, meta, decls):
            return A.Module(tuple(decls))

        def network_decl(self, meta, c):
            name, typ = c
            return A.NetworkDecl(str(name), typ, span=_span(meta), name_span=_tok_span(name))

        def param_decl(self, meta, c):
            name, typ, default = c
            return A.ParamDecl(str(name), typ, default, span=_span(meta), name_span=_tok_span(name))

        def let_decl(self, meta, c):
            name, params, body = c
            return A.LetDecl(str(name), params, body, span=_span(meta), name_span=_tok_span(name))

        def property_decl(self, meta, c):
            name, params, _keyword, partner, body = c
            return A.PropertyDecl(
                str(name), params, body, partner, span=_span(meta), name_span=_tok_span(name)
            )

        def fun_params(self, meta, c):
            return tuple(p for p in c if p is not None)

        def fun_param(self, meta, c):
            name, ann = c
            return A.Param(str(name), ann, span=_tok_span(name))

        def block(self, meta, c):
            kind, name, source, *settings = c
            return A.Block(
                str(name),
                str(kind),
                source,
                tuple(settings),
                span=_span(meta),
                name_span=_tok_span(name),
            )

        def setting(self, meta, c):
            key, value = c
            return A.Setting(str(key), value, span=_span(meta), key_span=_tok_span(key))

        # -- types -------------------------------------------------------------------------------
        def arrow_type(self, meta, c):
            return A.ArrowType(c[0], c[1], span=_span(meta))

        def type(self, meta, c):
            name, *dims = c
            if dims == [None]:
                dim_tuple = None
            else:
                dim_tuple = tuple(d for d in dims if d is not None)
            return A.TypeExpr(str(name), dim_tuple, span=_span(meta))

        # -- expressions -------------------------------------------------------------------------
        def quantified(self, meta, c):
            kind, binders, body = c
            return A.Quantified(str(kind), binders, body, span=_span(meta))

        def binders(self, meta, c):
            return tuple(c)

        def binder(self, meta, c):
            name, ann, domain = c
            return A.Binder(str(name), domain, ann, span=_tok_span(name))

        def conditional(self, meta, c):
            return A.IfExpr(c[0], c[1], c[2], span=_span(meta))

        @staticmethod
        def _binary(op: str) -> Any:  # a helper building methods
            def method(self, meta, c):
                return A.Binary(op, c[0], c[-1], span=_span(meta))

            return method

        implies = _binary("implies")
        or_ = _binary("or")
        and_ = _binary("and")
        intersect = _binary("&")
        add = _binary("+")
        sub = _binary("-")
        mul = _binary("*")
        div = _binary("/")
        pow = _binary("^")

        def compare(self, meta, c):
            return A.Binary(str(c[1]), c[0], c[2], span=_span(meta))

        def not_(self, meta, c):
            return A.Unary("not", c[0], span=_span(meta))

        def neg(self, meta, c):
            return A.Unary("-", c[0], span=_span(meta))

        def index(self, meta, c):
            return A.Index(c[0], tuple(c[1:]), span=_span(meta))

        def call(self, meta, c):
            func, *args = c
            fname = A.Name(str(func), span=_tok_span(func))
            positional: list[A.Expr] = []
            keywords: list[A.Keyword] = []
            for arg in args:
                if arg is None:
                    continue
                if isinstance(arg, A.Keyword):
                    if any(k.name == arg.name for k in keywords):
                        self.diagnostics.append(
                            Diagnostic(f"keyword argument '{arg.name}' given twice", arg.span)
                        )
                        continue
                    keywords.append(arg)
                elif keywords:
                    self.diagnostics.append(
                        Diagnostic(
                            "positional argument after a keyword argument",
                            getattr(arg, "span", None),
                            "put positional arguments first",
                        )
                    )
                else:
                    positional.append(arg)
            return A.Call(fname, tuple(positional), tuple(keywords), span=_span(meta))

        def keyword(self, meta, c):
            name, value = c
            return A.Keyword(str(name), value, span=_tok_span(name) + getattr(value, "span", None))

        def name(self, meta, c):
            return A.Name(str(c[0]), span=_tok_span(c[0]))

        def number(self, meta, c):
            text = str(c[0])
            value: int | float
            if re.fullmatch(r"[0-9]+", text) and len(text.lstrip("0")) <= _MAX_INT_DIGITS:
                value = int(text)
            else:
                value = float(text)
                if math.isinf(value):
                    shown = text if len(text) <= 20 else text[:12] + "..."
                    self.diagnostics.append(
                        Diagnostic(f"number {shown} is too large", _tok_span(c[0]), "use 'inf'")
                    )
            return A.Num(value, span=_tok_span(c[0]))

        def string(self, meta, c):
            value, problems = _unescape(c[0])
            self.diagnostics.extend(problems)
            return A.Str(value, span=_tok_span(c[0]))

        def inf(self, meta, c):
            return A.Num(math.inf, span=_span(meta))

        def true(self, meta, c):
            return A.BoolLit(True, span=_span(meta))

        def false(self, meta, c):
            return A.BoolLit(False, span=_span(meta))

        def list(self, meta, c):
            return A.ListExpr(tuple(x for x in c if x is not None), span=_span(meta))

    return Builder


@lru_cache(maxsize=1)
def _builder_class() -> type:
    return _make_builder()


def _Builder(source: Source) -> Any:  # noqa: N802 - reads as a class at the call site
    return _builder_class()(source)


_COMMENT_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*')


def _comments(source: Source) -> list[A.Comment]:
    out = []
    for m in _COMMENT_RE.finditer(source.text):
        if not m.group().startswith("#"):
            continue
        # Positions from the line index: counting newlines up to each comment would make a file
        # of many comments quadratic.
        line, col = source.position(m.start())
        text = m.group().removesuffix("\r")  # the CR of a CRLF line break is no part of it
        out.append(A.Comment(text, Span(line, col, line, col + len(text))))
    return out
