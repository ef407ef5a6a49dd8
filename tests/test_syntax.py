"""Parser and canonical printer: hypothesis round trips over random ASTs, comments, precedence."""

from __future__ import annotations

import math
import re
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from propdsl import ast as A
from propdsl.errors import ParseError
from propdsl.source import Diagnostic
from propdsl.syntax import format_expr, format_module, format_text, parse
from propdsl.syntax.parser import KEYWORDS

ROOT = Path(__file__).resolve().parents[1]
ROUND_TRIP = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ----------------------------------------------------------------------------------
# Names: plain identifiers with up to two primes, plus the lexer's edge cases (keyword prefixes,
# keywords followed by a prime, which are names, not keywords).
_LETTERS = string.ascii_letters + "_"
_IDENT = st.builds(
    lambda head, tail, primes: head + tail + "'" * primes,
    st.sampled_from(_LETTERS),
    st.text(_LETTERS + string.digits, max_size=5),
    st.integers(0, 2),
).filter(lambda s: s not in KEYWORDS)  # `inf'` is a name, `inf` a keyword
NAMES = st.one_of(
    st.sampled_from(
        ["x", "x'", "x''", "y", "f", "eps", "in_", "notx", "iff", "inf'", "max'", "_a"]
    ),
    _IDENT,
)
FUNC_NAMES = st.one_of(NAMES, st.sampled_from(["max", "min", "norm", "argmax"]))


def _positive_zero(v: float) -> bool:
    return math.copysign(1.0, v) > 0


NUMBERS = st.one_of(
    st.integers(min_value=0, max_value=10**20),
    st.floats(min_value=0.0, allow_nan=False, allow_infinity=True).filter(_positive_zero),
    st.sampled_from([1e-05, 1e-3, 0.5, 2.0, 1e16, 1.5e300, 5e-324, math.inf]),
)
STRINGS = st.text(
    alphabet=st.one_of(
        st.sampled_from("\\\"\n\t#'{}"),
        # what the lexer accepts: no control or invisible characters (tab and newline come from
        # their escapes above)
        st.characters(blacklist_categories=("Cc", "Cf", "Zl", "Zp", "Cs")),
    ),
    max_size=8,
)
COMPARE = list(A.COMPARE_OPS)
BINARY_OPS = [*A.ARITH_OPS, *COMPARE, "&", *A.BOOL_OPS]
QUANTS = ["forall", "exists", "max", "min"]

LEAVES = st.one_of(
    st.builds(A.Num, NUMBERS),
    st.builds(A.Str, STRINGS),
    st.builds(A.BoolLit, st.booleans()),
    st.builds(A.Name, NAMES),
)


@st.composite
def _unique_keywords(draw, children):
    names = draw(st.lists(NAMES, max_size=2, unique=True))
    return tuple(A.Keyword(name, draw(children)) for name in names)


def _types(children):
    dims = st.one_of(st.none(), st.lists(children, min_size=1, max_size=3).map(tuple))
    return st.builds(A.TypeExpr, NAMES, dims)


def _extend(children):
    small = st.lists(children, max_size=3).map(tuple)
    nonempty = st.lists(children, min_size=1, max_size=3).map(tuple)
    binder = st.builds(A.Binder, NAMES, children, st.one_of(st.none(), _types(children)))
    return st.one_of(
        st.builds(A.ListExpr, small),
        st.builds(A.Call, st.builds(A.Name, FUNC_NAMES), small, _unique_keywords(children)),
        st.builds(A.Index, children, nonempty),
        st.builds(A.Unary, st.sampled_from(["-", "not"]), children),
        st.builds(A.Binary, st.sampled_from(BINARY_OPS), children, children),
        st.builds(A.Binary, st.sampled_from(BINARY_OPS), children, children),
        st.builds(A.IfExpr, children, children, children),
        st.builds(
            A.Quantified,
            st.sampled_from(QUANTS),
            st.lists(binder, min_size=1, max_size=3).map(tuple),
            children,
        ),
    )


# deferred: a short repr (hypothesis otherwise builds a repr of the whole recursive strategy)
EXPRS = st.deferred(lambda: st.recursive(LEAVES, _extend, max_leaves=14))
SMALL_EXPRS = st.deferred(lambda: st.recursive(LEAVES, _extend, max_leaves=3))
TYPES = _types(st.one_of(st.builds(A.Num, st.integers(0, 64)), SMALL_EXPRS))
PARAMS = st.lists(st.builds(A.Param, NAMES, st.one_of(st.none(), TYPES)), max_size=3).map(tuple)
SETTINGS = st.lists(st.builds(A.Setting, NAMES, EXPRS), max_size=4).map(tuple)
DECLS = st.one_of(
    st.builds(A.NetworkDecl, NAMES, st.builds(A.ArrowType, TYPES, TYPES)),
    st.builds(A.ParamDecl, NAMES, TYPES, EXPRS),
    st.builds(A.LetDecl, NAMES, st.none(), EXPRS),
    st.builds(A.LetDecl, NAMES, PARAMS, EXPRS),
    st.builds(A.PropertyDecl, NAMES, PARAMS, EXPRS),
    st.builds(A.Block, NAMES, st.sampled_from(["train", "verify"]), EXPRS, SETTINGS),
)
MODULES = st.deferred(lambda: st.lists(DECLS, max_size=5).map(lambda ds: A.Module(tuple(ds))))


def strict(node: object) -> str:
    """repr without spans: unlike ==, it tells `1` from `1.0` and `True` from `1`."""
    return repr(node)


# -- round trips ---------------------------------------------------------------------------------
@ROUND_TRIP
@given(MODULES)
def test_module_round_trip_and_idempotence(module):
    text = format_module(module)
    again = parse(text)
    assert again == module
    assert strict(again) == strict(module)
    assert format_module(again) == text
    assert text.endswith("\n") and not text.endswith("\n\n")


@ROUND_TRIP
@given(EXPRS)
def test_expression_round_trip(expr):
    text = format_expr(expr)
    body = parse(f"let e = {text}").decls[0].body
    assert body == expr
    assert strict(body) == strict(expr)
    assert format_expr(body) == text


@settings(ROUND_TRIP, max_examples=100)
@given(MODULES, st.data())
def test_comments_survive_and_keep_their_order(module, data):
    lines = format_module(module).rstrip("\n").split("\n")
    out, expected = [], []
    for line in [*lines, ""]:
        if data.draw(st.integers(0, 3)) == 0:
            out.append("")  # blank lines next to comments are kept; elsewhere they are free
        if data.draw(st.integers(0, 3)) == 0:
            expected.append(f"# c{len(expected)}")
            out.append(expected[-1])
        if line and data.draw(st.integers(0, 3)) == 0:
            expected.append(f"# c{len(expected)}")
            line = f"{line}  {expected[-1]}"
        out.append(line)
    text = "\n".join(out)
    assert parse(text) == module  # comments never change the tree
    formatted = format_text(text)
    assert re.findall(r"# c\d+", formatted) == expected
    assert format_text(formatted) == formatted
    assert parse(formatted) == module
    assert "\n\n\n" not in formatted and (formatted == "\n" or formatted[0] != "\n")


def test_every_ast_node_kind_is_generated_and_printed():
    """The strategies above cover the whole AST: a new node class must be added to them."""
    generated = {
        A.Num, A.Str, A.BoolLit, A.Name, A.ListExpr, A.Call, A.Index, A.Unary, A.Binary,
        A.IfExpr, A.Quantified, A.Keyword, A.Binder, A.TypeExpr, A.ArrowType, A.Param,
        A.NetworkDecl, A.ParamDecl, A.LetDecl, A.PropertyDecl, A.Setting, A.Block, A.Module,
        A.Comment,
    }  # fmt: skip
    nodes = {
        v
        for v in vars(A).values()
        if isinstance(v, type) and v.__module__ == A.__name__ and v not in (A.Expr, A.Decl)
    }
    assert nodes == generated


# -- by hand -------------------------------------------------------------------------------------
def expr_of(text: str) -> A.Expr:
    return parse(f"let e = {text}").decls[0].body


def n(name: str) -> A.Name:
    return A.Name(name)


def b(op: str, left: A.Expr, right: A.Expr) -> A.Binary:
    return A.Binary(op, left, right)


Q = A.Quantified("max", (A.Binder("x", n("D")),), b("+", n("e"), A.Num(1)))
FORALL = A.Quantified("forall", (A.Binder("x", n("D")),), n("p"))


@pytest.mark.parametrize(
    ("tree", "text"),
    [
        (A.Unary("-", b("^", n("x"), A.Num(2))), "-x ^ 2"),
        (b("^", A.Unary("-", n("x")), A.Num(2)), "(-x) ^ 2"),
        (b("^", n("x"), b("^", n("y"), n("z"))), "x ^ y ^ z"),
        (b("^", b("^", n("x"), n("y")), n("z")), "(x ^ y) ^ z"),
        (b("^", n("x"), A.Unary("-", n("y"))), "x ^ -y"),
        (b("-", n("a"), b("-", n("b"), n("c"))), "a - (b - c)"),
        (b("-", b("-", n("a"), n("b")), n("c")), "a - b - c"),
        (b("/", n("a"), b("*", n("b"), n("c"))), "a / (b * c)"),
        (b("*", b("+", n("a"), n("b")), n("c")), "(a + b) * c"),
        (b("*", n("a"), A.Unary("-", n("b"))), "a * -b"),
        (b("implies", b("implies", n("a"), n("b")), n("c")), "(a implies b) implies c"),
        (b("implies", n("a"), b("implies", n("b"), n("c"))), "a implies b implies c"),
        (b("+", n("a"), Q), "a + max x in D: e + 1"),
        (b("+", b("+", n("a"), Q), n("c")), "a + (max x in D: e + 1) + c"),
        (b("*", Q, n("c")), "(max x in D: e + 1) * c"),
        (b("and", FORALL, n("q")), "(forall x in D: p) and q"),
        (b("and", n("q"), FORALL), "q and forall x in D: p"),
        (A.Unary("not", b("<", n("a"), n("b"))), "not a < b"),
        (b("<", A.Unary("not", n("a")), n("b")), "(not a) < b"),
        (A.Unary("not", b("and", n("a"), n("b"))), "not (a and b)"),
        (b("and", A.Unary("not", n("a")), n("b")), "not a and b"),
        (b("<", b("<", n("a"), n("b")), n("c")), "(a < b) < c"),
        (b("==", n("a"), b("<", n("b"), n("c"))), "a == (b < c)"),
        (b("&", b("&", n("A"), n("B")), n("C")), "A & B & C"),
        (b("&", n("A"), b("&", n("B"), n("C"))), "A & (B & C)"),
        (b("<=", b("&", n("A"), n("B")), n("c")), "A & B <= c"),
        (b("&", b("<=", n("A"), n("B")), n("c")), "(A <= B) & c"),
        (A.Index(A.Unary("-", n("v")), (n("i"),)), "(-v)[i]"),
        (A.Index(A.Index(n("v"), (n("i"),)), (n("j"), n("k"))), "v[i][j, k]"),
        (A.Index(Q, (A.Num(0),)), "(max x in D: e + 1)[0]"),
        (
            A.IfExpr(n("c"), n("a"), A.IfExpr(n("d"), n("b"), n("e"))),
            "if c then a else if d then b else e",
        ),
        (b("+", A.IfExpr(n("c"), n("a"), n("b")), A.Num(1)), "(if c then a else b) + 1"),
        (A.Unary("-", A.Num(1)), "-1"),
        (
            A.Call(n("g"), (n("a"),), (A.Keyword("k", A.ListExpr(())),)),
            "g(a, k = [])",
        ),
    ],
)
def test_parenthesisation(tree, text):
    assert format_expr(tree) == text
    assert expr_of(text) == tree


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (7, "7"),
        (1.0, "1.0"),
        (0.1, "0.1"),
        (1e-05, "1e-05"),
        (1e16, "1e+16"),
        (math.inf, "inf"),
    ],
)
def test_numbers(value, text):
    assert format_expr(A.Num(value)) == text
    back = expr_of(text)
    assert back == A.Num(value) and type(back.value) is type(value)


def test_number_spellings_parse_to_the_same_value():
    assert expr_of("1e-3") == expr_of("0.001") == A.Num(0.001)
    assert expr_of(".5") == A.Num(0.5)
    assert isinstance(expr_of("2").value, int) and isinstance(expr_of("2.").value, float)


def test_strings_with_escapes():
    value = 'a"b\\c\nd\te#f'
    assert format_expr(A.Str(value)) == r'"a\"b\\c\nd\te#f"'
    assert expr_of(format_expr(A.Str(value))) == A.Str(value)


def test_names_with_primes_and_keyword_prefixes():
    text = "x' + x'' + inf' + notx + in_ + max'(1)"
    assert format_expr(expr_of(text)) == text
    assert expr_of("inf'") == n("inf'") and expr_of("inf") == A.Num(math.inf)


def test_quantifier_with_several_binders_and_annotations():
    text = "forall x : Tensor[1, 8] in ball(c, eps, inf) & box(0, 1), j : Label[10] in classes: p"
    tree = expr_of(text)
    assert isinstance(tree, A.Quantified) and [b.name for b in tree.binders] == ["x", "j"]
    assert tree.binders[0].annotation == A.TypeExpr("Tensor", (A.Num(1), A.Num(8)))
    assert tree.binders[1].domain == n("classes")
    assert format_expr(tree) == text


# -- declarations and layout ---------------------------------------------------------------------
ALL_DECLS = """\
network f : Tensor[1, 8, 8] -> Tensor[10]
network g : Tensor[2] -> Tensor[3]

param eps : Real = 0.1
param k : Nat = 3

let pixels = box(0, 1)

let margin(v, y : Label[10]) = v[y] - max(v)

let nothing() = 0

property robust(x : Tensor[1, 8, 8], y) =
  forall x' in ball(x, eps, inf) & pixels:
    exists j in classes:
      margin(f(x'), y) > -eps ^ 2 and not j == y

property flat() =
  if true then 1 < 2 else false

train f on digits(split = "train") {
  model     = cnn(channels = [16, 32], hidden = 100)
  optimizer = adam(lr = 0.001)
  loss      = cross_entropy + max x' in ball(x, eps, inf): cross_entropy(f(x'), y)
}

verify g on tensors(path = "a\\"b.npz") {
}
"""


def test_every_declaration_kind_is_canonical():
    module = parse(ALL_DECLS)
    kinds = [type(d).__name__ for d in module.decls]
    assert kinds == [
        "NetworkDecl", "NetworkDecl", "ParamDecl", "ParamDecl", "LetDecl", "LetDecl", "LetDecl",
        "PropertyDecl", "PropertyDecl", "Block", "Block",
    ]  # fmt: skip
    assert format_module(module) == ALL_DECLS
    assert module.decls[5].params == (A.Param("v"), A.Param("y", A.TypeExpr("Label", (A.Num(10),))))
    assert module.decls[6].params == () and module.decls[4].params is None


def test_printer_never_drops_a_construct():
    """Every token class of the input appears again in the output."""
    text = format_text(ALL_DECLS)
    for word in [
        "network", "param", "let", "property", "train", "verify", "forall", "exists", "max",
        "if", "then", "else", "and", "not", "inf", "true", "false", "->", "&", "^", "==", ">",
        "<", ":", "[16, 32]", '"train"', r'"a\"b.npz"', "x'", "Label[10]",
    ]:  # fmt: skip
        assert word in text, word
    assert parse(text) == parse(ALL_DECLS)


def test_layout_of_a_messy_spec():
    messy = (
        "network f:Tensor[2]->Tensor[3] param eps:Real=0.1 let m(v,y)=v[y]\n"
        "property p(x,y)=forall x' in ball(x,eps,inf):exists z in box(0,1):m(f(x'),y)>(z)\n"
        "verify f on d(){method=crown properties=[p]}"
    )
    assert format_text(messy) == (
        "network f : Tensor[2] -> Tensor[3]\n"
        "\n"
        "param eps : Real = 0.1\n"
        "\n"
        "let m(v, y) = v[y]\n"
        "\n"
        "property p(x, y) =\n"
        "  forall x' in ball(x, eps, inf):\n"
        "    exists z in box(0, 1):\n"
        "      m(f(x'), y) > z\n"
        "\n"
        "verify f on d() {\n"
        "  method     = crown\n"
        "  properties = [p]\n"
        "}\n"
    )


def test_empty_module():
    assert format_module(parse("")) == "\n"
    assert format_text("# only a comment") == "# only a comment\n"


# -- comments ------------------------------------------------------------------------------------
COMMENTED = """\
# header: what this spec is about
# second header line

network f : Tensor[2] -> Tensor[3]

param eps : Real = 0.1  # the radius
param delta : Real = 2.0

# a section comment
let m(v, y) = v[y]  # trailing on a let

property p(x, y) =
  forall x' in ball(x, eps, inf):
    m(f(x'), y) > 0  # trailing on the last line

train f on d(split = "train") {
  # a comment inside a block
  epochs = 2  # two
  batch  = 8
  # before the closing brace
}  # after the brace

# at the end of the file
"""


def test_comments_are_kept_in_place():
    assert format_text(COMMENTED) == COMMENTED


def test_comments_are_stable_under_reformatting():
    moved = (
        "network f : Tensor[2] -> Tensor[3]  # net\n"
        "property p(x) =  # on the head line\n"
        "  forall x' in ball(x, 0.1, inf):  # on a quantifier line\n"
        "    f(x')[0] > 0\n"
        "train f on d() {  # on the block's first line\n"
        "  epochs = 1\n"
        "}\n"
        "# eof"
    )
    once = format_text(moved)
    assert format_text(once) == once
    assert re.findall(r"#.*", once) == re.findall(r"#.*", moved)
    assert parse(once) == parse(moved)


def test_hash_inside_a_string_is_not_a_comment():
    text = 'let s = "#not a comment"  # a comment\n'
    assert format_text(text) == text
    assert [c.text for c in parse(text).comments] == ["# a comment"]


def test_comment_at_end_of_file_without_newline():
    assert format_text("let a = 1\n# last") == "let a = 1\n\n# last\n"


# -- the shipped example -------------------------------------------------------------------------
def test_digits_spec_round_trips():
    text = (ROOT / "specs" / "digits.prop").read_text(encoding="utf-8")
    module = parse(text, "digits.prop")
    formatted = format_module(module)
    assert parse(formatted) == module
    assert format_text(formatted) == formatted
    assert re.findall(r"#.*", formatted) == [c.strip() for c in re.findall(r"#.*", text)]


# -- deceptive input: ASCII numbers, escapes, hidden characters ----------------------------------
def _syntax_error(text: str) -> Diagnostic:
    with pytest.raises(ParseError) as info:
        parse(text)
    return info.value.diagnostics[0]


@pytest.mark.parametrize("digit", ["\u0665", "\uff15", "\u09eb", "\U0001d7d3"])
def test_only_ascii_digits_make_numbers(digit):
    # Python's `\d` and `float` read every Unicode decimal digit: "٥" was the number 5
    for text in (f"let a = {digit}\n", f"let a = 1.{digit}\n", f"network f : Tensor[{digit}]"):
        diag = _syntax_error(text)
        assert diag.message == f"unexpected character {digit!r}", text
        assert diag.hint.startswith("numbers are written with the ASCII digits 0-9; this is U+")
        assert diag.span.col == text.index(digit) + 1
    _syntax_error(f"let a = 1e{digit}\n")  # `1` then the name `e`: no number either


def test_the_only_escapes_are_backslash_quote_newline_and_tab():
    assert expr_of(r'"a\\b\"c\nd\te"') == A.Str('a\\b"c\nd\te')
    text = 'let p = "C:\\data\\x.npz"\n'
    with pytest.raises(ParseError) as info:
        parse(text)
    assert [(d.message, d.span.col) for d in info.value.diagnostics] == [
        ("unknown escape '\\d' in a string", text.index("\\d") + 1),
        ("unknown escape '\\x' in a string", text.index("\\x") + 1),
    ]
    assert "write paths with '/'" in info.value.diagnostics[0].hint


@given(STRINGS)
@ROUND_TRIP
def test_every_accepted_string_round_trips_exactly_through_fmt(value):
    text = format_text(f"let s = {format_expr(A.Str(value))}\n")
    (decl,) = parse(text).decls
    assert decl.body == A.Str(value)
    assert format_text(text) == text


@pytest.mark.parametrize(
    ("char", "words"),
    [
        ("\x00", "the control character U+0000"),
        ("\x1b", "the control character U+001B"),
        ("\x7f", "the control character U+007F"),
        ("\r", "the control character U+000D"),
        ("\u202e", "the character U+202E RIGHT-TO-LEFT OVERRIDE"),
        ("\u2066", "the character U+2066 LEFT-TO-RIGHT ISOLATE"),
        ("\u200b", "the character U+200B ZERO WIDTH SPACE"),
        ("\ufeff", "the character U+FEFF ZERO WIDTH NO-BREAK SPACE"),
        ("\u2028", "the character U+2028 LINE SEPARATOR"),
    ],
)
@pytest.mark.parametrize("where", ["code", "comment", "string"])
def test_hidden_characters_are_refused_everywhere(char, words, where):
    line = {"code": f"let a ={char} 1", "comment": f"let a = 1  # x{char}y", "string": ""}[where]
    if where == "string":
        line = f'let a = f(s = "x{char}y")'
    text = f"let b = 2\n{line}\n"
    diag = _syntax_error(text)
    assert diag.message == f"{words} is not allowed in a spec"
    assert (diag.span.line, diag.span.col) == (2, line.index(char) + 1)


def test_crlf_line_breaks_are_layout():
    text = "let a = 1  # one\r\nlet b = a\r\n"
    module = parse(text)
    assert [d.name for d in module.decls] == ["a", "b"]
    assert [c.text for c in module.comments] == ["# one"]
    assert format_text(text) == "let a = 1  # one\nlet b = a\n"


class _CountingText(str):
    """A spec text that counts the characters its searches examine (count, find, rfind)."""

    scanned = 0

    def _charge(self, start, end):
        start = 0 if start is None else start
        end = len(self) if end is None else end
        type(self).scanned += max(0, end - start)

    def count(self, sub, start=None, end=None):
        self._charge(start, end)
        return super().count(sub, start, end)

    def find(self, sub, start=None, end=None):
        found = super().find(sub, start, end)
        self._charge(start, end if found < 0 else found + len(sub))  # up to the match
        return found

    def rfind(self, sub, start=None, end=None):
        self._charge(start, end)
        return super().rfind(sub, start, end)


def test_comment_positions_cost_linear_work():
    # Each comment's line used to be counted from the start of the text: quadratic work, more
    # than a minute for a 10 MB file of comments.
    n = 2000
    text = _CountingText("let a = 1\n" + "#\n" * n)
    _CountingText.scanned = 0
    comments = parse(text).comments
    assert [c.span.line for c in comments] == list(range(2, n + 2))
    # a search from each line break to the end would be n * len(text) / 2 characters
    assert _CountingText.scanned <= 4 * len(text)
