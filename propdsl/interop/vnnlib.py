"""VNN-LIB in: a property file as verification problems (`propdsl.verify.problem.Problem`).

VNN-LIB 1.0, the dialect of the VNN-COMP benchmarks, is read by the small s-expression parser
here: `(declare-const X_i Real)` and `(declare-const Y_j Real)` name the flattened (row-major)
inputs and outputs; `(assert F)` adds a formula, where F is built from `and`, `or` and
comparisons (`<=`, `>=`, `<`, `>`, `=`) of linear terms (numbers, variables, `+`, `-`, `*` by a
constant, `/` by a constant). The conjunction of the assertions is brought into disjunctive
normal form; in each disjunct the constraints on single inputs form the input box and the
constraints on outputs the rows `A y <= b`. Disjuncts with the same box become one `Problem`
(a disjunction of `Disjunct`s), so a file whose `or` ranges over different boxes gives several
problems: the property is violated (`sat`) iff some problem is.

VNN-LIB 2.0 (`(vnnlib-version <2.0>)` first) is parsed by the `vnnlib` package, whose
reachability form (an input box and output polytopes per case) maps onto the same problems.

Numbers are exact decimals until the end, where the box and the right-hand sides b are rounded
*outward* to the chosen dtype (lower bounds down, upper bounds and b up): the problem's violation
set contains the file's, so `unsat` on it is `unsat` for the file; a counterexample lies within
one unit in the last place of the file's box. Strict comparisons are read as non-strict (the
closure; the two differ on a boundary of measure zero).

Every mistake in a file is a `VnnlibError`, one line `file:line:col: message`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from propdsl.errors import UsageError
from propdsl.region import Region
from propdsl.verify.problem import Disjunct, Problem

__all__ = ["MAX_DISJUNCTS", "VnnlibError", "parse_vnnlib", "read_vnnlib"]

# The disjunctive normal form of the assertions may grow exponentially; beyond this many
# disjuncts the file is refused.
MAX_DISJUNCTS = 100_000


class VnnlibError(UsageError):
    """A mistake in a VNN-LIB file, at `path:line:col` (1-based)."""

    def __init__(self, path: str, line: int, col: int, message: str):
        self.path, self.line, self.col, self.message = path, line, col, message
        super().__init__(f"{path}:{line}:{col}: {message}")


def read_vnnlib(
    path: str | Path,
    input_shape: int | Sequence[int],
    num_outputs: int,
    *,
    dtype: torch.dtype = torch.float32,
) -> list[Problem]:
    """The problems of the VNN-LIB file at `path`, for a network with inputs of shape
    `input_shape` (per sample, e.g. `load_onnx(...).input_shape`) and `num_outputs` outputs.

    Each problem's region is a box with tensors [1, *input_shape] (X_i in flattened row-major
    order); its disjuncts are `A @ y <= b` over the flattened outputs. The file's property is
    violated (`sat`) iff some problem is; an empty list means no disjunct is satisfiable on a
    non-empty box (`unsat`).

    Raises:
        VnnlibError: a positioned mistake (`file:line:col: message`): unbalanced parentheses,
            an unknown symbol, a nonlinear term, an input without bounds, an index beyond the
            network's sizes, ...

    >>> import tempfile
    >>> text = '''(declare-const X_0 Real)
    ... (declare-const X_1 Real)
    ... (declare-const Y_0 Real)
    ... (declare-const Y_1 Real)
    ... (assert (>= X_0 -1))
    ... (assert (<= X_0 1))
    ... (assert (and (>= X_1 0) (<= X_1 0.5)))
    ... (assert (or (>= Y_0 Y_1) (<= Y_0 -3)))'''
    >>> path = tempfile.mkdtemp() + "/p.vnnlib"
    >>> _ = open(path, "w").write(text)
    >>> (problem,) = read_vnnlib(path, (2,), 2)
    >>> problem.region.bounding_box()[1].tolist()
    [[1.0, 0.5]]
    >>> [(d.A.tolist(), d.b.tolist()) for d in problem.disjuncts]
    [([[-1.0, 1.0]], [0.0]), ([[1.0, 0.0]], [-3.0])]
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such VNN-LIB file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read it ({exc})") from None
    return parse_vnnlib(text, input_shape, num_outputs, name=str(path), dtype=dtype)


def parse_vnnlib(
    text: str,
    input_shape: int | Sequence[int],
    num_outputs: int,
    *,
    name: str = "<vnnlib>",
    dtype: torch.dtype = torch.float32,
) -> list[Problem]:
    """`read_vnnlib` of a text (`name` is the file name in messages and problem names)."""
    shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(input_shape)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    sizes = _Sizes(shape, math.prod(shape), int(num_outputs))
    forms = _parse(text, name)
    if forms and _is_command(forms[0], "vnnlib-version"):
        return _read_v2(text, name, sizes, dtype)
    return _Reader(name, sizes).read(forms).problems(dtype)


@dataclass(frozen=True)
class _Sizes:
    shape: tuple[int, ...]
    inputs: int
    outputs: int


# -- s-expressions -------------------------------------------------------------------------------


class _Tok(NamedTuple):  # a named tuple: files have tens of thousands of tokens
    text: str
    line: int
    col: int


class _List(NamedTuple):
    items: tuple[_Tok | _List, ...]
    line: int
    col: int


SExpr = _Tok | _List

# Parentheses, atoms, comments and newlines; finditer skips the other blanks.
_TOKEN = re.compile(r"[()]|[^\s();]+|;[^\n]*|\n")


def _tokens(text: str, name: str) -> Iterator[_Tok]:
    line, start = 1, 0
    for m in _TOKEN.finditer(text):
        s = m.group()
        if s == "\n":
            line, start = line + 1, m.end()
        elif s[0] != ";":
            yield _Tok(s, line, m.start() - start + 1)


def _parse(text: str, name: str) -> list[SExpr]:
    stack: list[tuple[_Tok, list[SExpr]]] = []
    top: list[SExpr] = []
    for tok in _tokens(text, name):
        if tok.text == "(":
            stack.append((tok, []))
        elif tok.text == ")":
            if not stack:
                raise VnnlibError(name, tok.line, tok.col, "unbalanced ')' (nothing to close)")
            opener, items = stack.pop()
            form = _List(tuple(items), opener.line, opener.col)
            (stack[-1][1] if stack else top).append(form)
        elif stack:
            stack[-1][1].append(tok)
        else:
            raise VnnlibError(
                name, tok.line, tok.col, f"'{tok.text}' outside parentheses (expected a command)"
            )
    if stack:
        opener = stack[-1][0]
        raise VnnlibError(name, opener.line, opener.col, "unbalanced '(' (never closed)")
    return top


def _is_command(form: SExpr, head: str) -> bool:
    return isinstance(form, _List) and bool(form.items) and _head(form) == head


def _head(form: _List) -> str | None:
    first = form.items[0] if form.items else None
    return first.text if isinstance(first, _Tok) else None


# -- linear terms --------------------------------------------------------------------------------

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_VAR = re.compile(r"([XY])_(0|[1-9]\d*)")

Var = tuple[str, int]  # ("X", i) or ("Y", j)


@dataclass
class _Lin:
    """sum coeffs[v] * v + const, exactly."""

    coeffs: dict[Var, Fraction] = field(default_factory=dict)
    const: Fraction = Fraction(0)

    def scaled(self, k: Fraction) -> _Lin:
        return _Lin({v: c * k for v, c in self.coeffs.items()}, self.const * k)

    def plus(self, other: _Lin) -> _Lin:
        coeffs = dict(self.coeffs)
        for v, c in other.coeffs.items():
            coeffs[v] = coeffs.get(v, Fraction(0)) + c
        return _Lin(coeffs, self.const + other.const)

    def variables(self) -> dict[Var, Fraction]:
        return {v: c for v, c in self.coeffs.items() if c != 0}


@dataclass(frozen=True)
class _Bound:
    """x_index <= value (upper) or >= value (lower)."""

    index: int
    value: Fraction
    upper: bool


@dataclass(frozen=True)
class _Row:
    """coeffs . y <= rhs over the outputs."""

    coeffs: dict[int, Fraction]
    rhs: Fraction


# An atom after classification: a bound, an output row, or a constant truth value.
_Atom = _Bound | _Row | bool


class _Reader:
    def __init__(self, name: str, sizes: _Sizes):
        self.name = name
        self.sizes = sizes
        self.declared: dict[str, _Tok] = {}
        self.atoms: list[_Atom] = []
        # The assertions so far in disjunctive normal form, over atom indices: the atoms of
        # every disjunct (`common`, from assertions without `or`) and the disjuncts' own ones.
        self.common: list[int] = []
        self.terms: list[tuple[int, ...]] = [()]

    def error(self, at: SExpr, message: str) -> VnnlibError:
        return VnnlibError(self.name, at.line, at.col, message)

    # -- commands ----------------------------------------------------------------------------
    def read(self, forms: list[SExpr]) -> _Reader:
        for form in forms:
            if not isinstance(form, _List) or not form.items:
                raise self.error(form, "empty command '()'")
            head = _head(form)
            if head == "declare-const":
                self.declare(form, form.items[1:])
            elif head == "declare-fun":
                if len(form.items) != 4 or not (
                    isinstance(form.items[2], _List) and not form.items[2].items
                ):
                    raise self.error(form, "declare-fun takes a name, () and a sort")
                self.declare(form, (form.items[1], form.items[3]))
            elif head == "assert":
                if len(form.items) != 2:
                    raise self.error(form, "assert takes one formula")
                self.conjoin(form, self.formula(form.items[1]))
            elif head in ("set-logic", "set-info", "set-option", "check-sat", "get-model", "exit"):
                continue
            elif head == "vnnlib-version":
                raise self.error(form, "vnnlib-version must be the first command")
            else:
                at = form.items[0]
                raise self.error(at, f"unknown command '{head or '(...)'}'")
        return self

    def declare(self, form: _List, args: Sequence[SExpr]) -> None:
        if len(args) != 2 or not all(isinstance(a, _Tok) for a in args):
            raise self.error(
                form, "declare-const takes a name and a sort: (declare-const X_0 Real)"
            )
        name, sort = args
        assert isinstance(name, _Tok) and isinstance(sort, _Tok)
        var = self.variable_name(name)
        if sort.text != "Real":
            raise self.error(sort, f"'{name.text}' must be declared Real, not '{sort.text}'")
        if name.text in self.declared:
            first = self.declared[name.text]
            raise self.error(
                name, f"'{name.text}' is declared twice (first at {first.line}:{first.col})"
            )
        kind, index = var
        limit = self.sizes.inputs if kind == "X" else self.sizes.outputs
        if index >= limit:
            what = "inputs" if kind == "X" else "outputs"
            raise self.error(
                name,
                f"'{name.text}' is beyond the network's {limit} {what} "
                f"({kind}_0 ... {kind}_{limit - 1})",
            )
        self.declared[name.text] = name

    def variable_name(self, tok: _Tok) -> Var:
        m = _VAR.fullmatch(tok.text)
        if m is None:
            raise self.error(
                tok, f"unknown symbol '{tok.text}' (VNN-LIB 1.0 names inputs X_i and outputs Y_j)"
            )
        return m.group(1), int(m.group(2))

    # -- formulas: DNF over atom indices -----------------------------------------------------
    def conjoin(self, at: SExpr, dnf: list[tuple[int, ...]]) -> None:
        if len(dnf) == 1:
            self.common.extend(dnf[0])
            return
        if len(self.terms) * len(dnf) > MAX_DISJUNCTS:
            raise self.error(
                at, f"the assertions have more than {MAX_DISJUNCTS} disjuncts in normal form"
            )
        self.terms = [t + u for t in self.terms for u in dnf]

    def formula(self, expr: SExpr) -> list[tuple[int, ...]]:
        if isinstance(expr, _Tok):
            if expr.text == "true":
                return [()]
            if expr.text == "false":
                return []
            raise self.error(expr, f"expected a formula, got '{expr.text}'")
        head = _head(expr)
        args = expr.items[1:]
        if head == "and":
            out: list[tuple[int, ...]] = [()]
            for a in args:
                part = self.formula(a)
                if len(out) * len(part) > MAX_DISJUNCTS:
                    raise self.error(
                        expr, f"the formula has more than {MAX_DISJUNCTS} disjuncts in normal form"
                    )
                out = [t + u for t in out for u in part]
            return out
        if head == "or":
            out = []
            for a in args:
                out += self.formula(a)
                if len(out) > MAX_DISJUNCTS:
                    raise self.error(
                        expr, f"the formula has more than {MAX_DISJUNCTS} disjuncts in normal form"
                    )
            return out
        if head in ("<=", ">=", "<", ">", "="):
            if len(args) < 2:
                raise self.error(expr, f"'{head}' compares at least two terms")
            terms = [self.term(a) for a in args]
            atoms: list[int] = []
            for left, right in zip(terms, terms[1:], strict=False):
                if head in ("<=", "<", "="):
                    atoms.append(self.atom(expr, left.plus(right.scaled(Fraction(-1)))))
                if head in (">=", ">", "="):
                    atoms.append(self.atom(expr, right.plus(left.scaled(Fraction(-1)))))
            return [tuple(atoms)]
        if head in ("not", "=>", "xor", "ite"):
            raise self.error(expr, f"'{head}' is not supported (VNN-LIB uses and, or, comparisons)")
        at = expr.items[0] if expr.items else expr
        raise self.error(at, f"unknown formula '{head or '(...)'}'")

    def atom(self, at: _List, lin: _Lin) -> int:
        """The index of the atom `lin <= 0`."""
        variables = lin.variables()
        kinds = {kind for kind, _ in variables}
        atom: _Atom
        if not variables:
            atom = lin.const <= 0
        elif kinds == {"X", "Y"}:
            raise self.error(at, "a constraint mixes inputs (X) and outputs (Y); not supported")
        elif kinds == {"X"}:
            if len(variables) > 1:
                raise self.error(
                    at,
                    "a constraint on several inputs is not a box bound; only bounds of single "
                    "inputs are supported",
                )
            ((_, index), c) = next(iter(variables.items()))
            atom = _Bound(index, -lin.const / c, upper=c > 0)
        else:
            atom = _Row({j: c for (_, j), c in variables.items()}, -lin.const)
        self.atoms.append(atom)
        return len(self.atoms) - 1

    def term(self, expr: SExpr) -> _Lin:
        if isinstance(expr, _Tok):
            if _NUMBER.fullmatch(expr.text):
                return _Lin(const=Fraction(expr.text))
            kind, index = self.variable_name(expr)
            if expr.text not in self.declared:
                raise self.error(expr, f"'{expr.text}' is not declared")
            return _Lin({(kind, index): Fraction(1)})
        head = _head(expr)
        args = [self.term(a) for a in expr.items[1:]]
        if head == "+" and args:
            total = _Lin()
            for a in args:
                total = total.plus(a)
            return total
        if head == "-" and args:
            if len(args) == 1:
                return args[0].scaled(Fraction(-1))
            total = args[0]
            for a in args[1:]:
                total = total.plus(a.scaled(Fraction(-1)))
            return total
        if head == "*" and args:
            product = _Lin(const=Fraction(1))
            for a, e in zip(args, expr.items[1:], strict=True):
                if a.variables() and product.variables():
                    raise self.error(e, "a nonlinear term (a product of variables)")
                if a.variables():
                    product = a.scaled(product.const)
                else:
                    product = product.scaled(a.const)
            return product
        if head == "/" and len(args) == 2:
            if args[1].variables():
                raise self.error(expr.items[2], "a nonlinear term (division by a variable)")
            if args[1].const == 0:
                raise self.error(expr.items[2], "division by zero")
            return args[0].scaled(1 / args[1].const)
        if head in ("+", "-", "*", "/"):
            raise self.error(expr, f"'{head}' needs arguments")
        at = expr.items[0] if expr.items else expr
        raise self.error(at, f"unknown term '{head or '(...)'}'")

    # -- problems ----------------------------------------------------------------------------
    def undeclared_input(self) -> str | None:
        for i in range(self.sizes.inputs):
            if f"X_{i}" not in self.declared:
                return f"X_{i}"
        return None

    def problems(self, dtype: torch.dtype) -> list[Problem]:
        missing = self.undeclared_input()
        if missing is not None:
            xs = [t for n, t in self.declared.items() if n.startswith("X_")]
            at = xs[-1] if xs else _Tok("", 1, 1)
            raise self.error(
                at,
                f"{missing} is never declared: the network has {self.sizes.inputs} inputs "
                f"(X_0 ... X_{self.sizes.inputs - 1})",
            )
        n = self.sizes.inputs
        common = _Conjunction.of(n, (self.atoms[a] for a in self.common))
        # Disjuncts with the same box become one problem. The key is the box's entries that
        # the disjunct's own atoms change (most files share the whole box).
        groups: dict[tuple, tuple[_Conjunction, list[list[_Row]]]] = {}
        for k, own in enumerate(self.terms):
            conj = common.extended(self.atoms[a] for a in own)
            if not conj.feasible:
                continue  # a disjunct with a false constant comparison
            for i in range(n):
                if conj.lo[i] is None or conj.hi[i] is None:
                    which = "lower" if conj.lo[i] is None else "upper"
                    where = (
                        f" in disjunct {k + 1} of {len(self.terms)}" if len(self.terms) > 1 else ""
                    )
                    raise self.error(self.declared[f"X_{i}"], f"X_{i} has no {which} bound{where}")
            if any(l > h for l, h in zip(conj.lo, conj.hi, strict=True)):  # type: ignore[operator]
                continue  # an empty box: nothing to violate there
            key = tuple((i, conj.lo[i], conj.hi[i]) for i in sorted(conj.touched))
            groups.setdefault(key, (conj, []))[1].append(conj.rows)
        problems = []
        base = Path(self.name).name
        for k, (conj, disjuncts) in enumerate(groups.values()):
            name = base if len(groups) == 1 else f"{base}[{k}]"
            problems.append(
                _problem(
                    [(conj.lo, conj.hi)],
                    [_disjunct(rows, self.sizes.outputs) for rows in disjuncts],
                    self.sizes,
                    dtype,
                    name,
                )
            )
        return problems


@dataclass
class _Conjunction:
    """The box (None: unbounded so far) and output rows of a conjunction of atoms; `touched`
    lists the inputs whose bounds came after the copy it was extended from."""

    lo: list[Fraction | None]
    hi: list[Fraction | None]
    rows: list[_Row]
    feasible: bool = True
    touched: set[int] = field(default_factory=set)

    @staticmethod
    def of(n: int, atoms: Iterator[_Atom]) -> _Conjunction:
        return _Conjunction([None] * n, [None] * n, []).extended(atoms, copy=False)

    def extended(self, atoms: Iterator[_Atom], copy: bool = True) -> _Conjunction:
        out = self
        if copy:
            out = _Conjunction(self.lo, self.hi, list(self.rows), self.feasible, set())
        copied = not copy
        for atom in atoms:
            if isinstance(atom, bool):
                out.feasible &= atom
            elif isinstance(atom, _Bound):
                if not copied:  # copy the box on the first bound only
                    out.lo, out.hi, copied = list(out.lo), list(out.hi), True
                i, v = atom.index, atom.value
                out.touched.add(i)
                if atom.upper:
                    out.hi[i] = v if out.hi[i] is None else min(out.hi[i], v)  # type: ignore[type-var]
                else:
                    out.lo[i] = v if out.lo[i] is None else max(out.lo[i], v)  # type: ignore[type-var]
            else:
                out.rows.append(atom)
        return out


def _disjunct(rows: list[_Row], outputs: int) -> tuple[np.ndarray, list[Fraction]]:
    A = np.zeros((len(rows), outputs), dtype=np.float64)
    for r, row in enumerate(rows):
        for j, c in row.coeffs.items():
            A[r, j] = float(c)
    return A, [row.rhs for row in rows]


def _problem(
    box: list[tuple[Sequence, Sequence]],
    disjuncts: list[tuple[np.ndarray, Sequence]],
    sizes: _Sizes,
    dtype: torch.dtype,
    name: str,
) -> Problem:
    ((lo, hi),) = box
    lower = torch.tensor([_round(v, dtype, up=False) for v in lo], dtype=dtype)
    upper = torch.tensor([_round(v, dtype, up=True) for v in hi], dtype=dtype)
    region = Region.box(lower.reshape(1, *sizes.shape), upper.reshape(1, *sizes.shape))
    parts = tuple(
        Disjunct(
            torch.tensor(A, dtype=dtype).reshape(len(b), sizes.outputs),
            torch.tensor([_round(v, dtype, up=True) for v in b], dtype=dtype),
        )
        for A, b in disjuncts
    )
    return Problem(region, parts, name)


def _round(value: Fraction | float, dtype: torch.dtype, *, up: bool) -> float:
    """The nearest number of `dtype` on the outer side of value (>= it when `up`)."""
    exact = Fraction(value)
    f: float = np.float32(float(exact)).item() if dtype == torch.float32 else float(exact)
    np_type = np.float32 if dtype == torch.float32 else np.float64
    if up and Fraction(f) < exact:
        f = np.nextafter(np_type(f), np_type(np.inf)).item()
    elif not up and Fraction(f) > exact:
        f = np.nextafter(np_type(f), np_type(-np.inf)).item()
    return f


# -- VNN-LIB 2.0 through the vnnlib package ------------------------------------------------------

_SYNTAX = re.compile(r"line (\d+), column (\d+)")


def _read_v2(text: str, name: str, sizes: _Sizes, dtype: torch.dtype) -> list[Problem]:
    try:
        import vnnlib
        import vnnlib.compat
    except ImportError:
        raise UsageError(
            f"{name}: VNN-LIB 2.0 files are read with the 'vnnlib' package: pip install vnnlib"
        ) from None
    try:
        query = vnnlib.parse_query_string(text)
    except vnnlib.VNNLibException as exc:
        raise _v2_error(text, name, str(exc)) from None
    if len(query.networks) != 1:
        raise VnnlibError(name, 1, 1, f"{len(query.networks)} networks declared; one is supported")
    network = query.networks[0]
    for kind, decls, expected in (
        ("inputs", network.inputs, sizes.inputs),
        ("outputs", network.outputs, sizes.outputs),
    ):
        count = sum(math.prod(d.shape) for d in decls)
        if len(decls) != 1 or count != expected:
            line, col = _find(text, "(declare-input" if kind == "inputs" else "(declare-output")
            raise VnnlibError(
                name,
                line,
                col,
                f"the file declares {count} {kind} in {len(decls)} tensor(s); the network has "
                f"one tensor of {expected}",
            )
    try:
        cases = vnnlib.compat.transform(query)
    except vnnlib.VNNLibException as exc:
        line, col = _find(text, "(assert")
        raise VnnlibError(name, line, col, f"{_first_line(str(exc))}") from None
    problems = []
    base = Path(name).name
    for k, case in enumerate(cases):
        box = list(case.input_box)
        for i, (lo, hi) in enumerate(box):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                line, col = _find(text, "(declare-input")
                which = "lower" if not math.isfinite(lo) else "upper"
                raise VnnlibError(name, line, col, f"input {i} has no {which} bound")
        if any(lo > hi for lo, hi in box):
            continue
        disjuncts = [
            (np.asarray(p.coeff_matrix, dtype=np.float64).reshape(-1, sizes.outputs), list(p.rhs))
            for p in case.output_constraints
        ]
        problem_name = base if len(cases) == 1 else f"{base}[{k}]"
        lows = [lo for lo, _ in box]
        highs = [hi for _, hi in box]
        problems.append(_problem([(lows, highs)], disjuncts, sizes, dtype, problem_name))
    return problems


def _find(text: str, needle: str) -> tuple[int, int]:
    for number, line in enumerate(text.splitlines(), start=1):
        col = line.find(needle)
        if col >= 0:
            return number, col + 1
    return 1, 1


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "invalid VNN-LIB"


def _v2_error(text: str, name: str, message: str) -> VnnlibError:
    """The vnnlib package's error (a syntax error with a 0-based column, or a JSON list of
    type errors with a line and the offending symbol) as a positioned error."""
    m = _SYNTAX.search(message)
    if m is not None:
        return VnnlibError(name, int(m.group(1)), int(m.group(2)) + 1, _first_line(message))
    try:
        report = json.loads(message)
        first = report["errors"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return VnnlibError(name, 1, 1, _first_line(message))
    line = int(first.get("line", 1))
    symbol = str(first.get("offendingSymbol", ""))
    lines = text.splitlines()
    col = _locate(lines[line - 1], symbol) if symbol and 0 < line <= len(lines) else 1
    words = first.get("message", "invalid VNN-LIB")
    hint = first.get("hint")
    return VnnlibError(name, line, col, f"{words}: {hint}" if hint else words)


def _locate(line: str, symbol: str) -> int:
    """The column of `symbol` as a whole token of `line` (the package prints `X[0,2]` for
    `X[0, 2]`, so blanks inside it are optional); 1 when not found."""
    parts = [re.escape(c) for c in symbol if not c.isspace()]
    m = re.search(r"(?:^|(?<=[\s(]))" + r"\s*".join(parts) + r"(?=[\s)]|$)", line)
    return m.start() + 1 if m else 1
