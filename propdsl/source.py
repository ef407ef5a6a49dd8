"""Source text, spans (1-based line/column) and diagnostics rendered with a caret."""

from __future__ import annotations

import bisect
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

# The largest spec accepted, in bytes of UTF-8 (files and text alike). Real specs are a few
# kilobytes; parsing is linear but slow (about 10 s per MiB of dense code), so the cap keeps the
# work on hostile input to a few seconds.
MAX_SOURCE_BYTES = 256 * 1024


@dataclass(frozen=True)
class Span:
    """A region of source text: 1-based lines and columns; `end_col` is exclusive."""

    line: int
    col: int
    end_line: int
    end_col: int

    def __add__(self, other: Span | None) -> Span:
        """The smallest span covering both."""
        if other is None:
            return self
        start = min((self.line, self.col), (other.line, other.col))
        end = max((self.end_line, self.end_col), (other.end_line, other.end_col))
        return Span(start[0], start[1], end[0], end[1])


@dataclass(frozen=True)
class Source:
    """The text of one spec with the name it is reported under."""

    text: str
    name: str = "<spec>"

    @cached_property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    def line(self, number: int) -> str:
        """Line `number` (1-based) without its line break (a CRLF's CR included)."""
        lines = self.lines
        return lines[number - 1].removesuffix("\r") if 1 <= number <= len(lines) else ""

    @cached_property
    def _line_starts(self) -> list[int]:
        starts = [0]
        find = self.text.find
        at = find("\n")
        while at >= 0:
            starts.append(at + 1)
            at = find("\n", at + 1)
        return starts

    def position(self, offset: int) -> tuple[int, int]:
        """The 1-based (line, column) of a character offset, in O(log lines)."""
        line = bisect.bisect_right(self._line_starts, offset)
        return line, offset - self._line_starts[line - 1] + 1

    def end_span(self) -> Span:
        """A one-character span just after the last code (for end-of-file errors).

        Blank lines and comments at the end are skipped: the caret goes where the missing text
        belongs.
        """
        return self.end_before(len(self.text))

    def end_before(self, offset: int) -> Span:
        """A one-character span just after the last code before `offset`."""
        lines = self.text[:offset].split("\n")
        while len(lines) > 1 and not _strip_comment(lines[-1]).strip():
            lines.pop()
        line = len(lines)
        col = len(_strip_comment(lines[-1]).rstrip()) + 1
        return Span(line, col, line, col + 1)


def _strip_comment(line: str) -> str:
    """The line without its `#` comment (a `#` inside a string does not start one)."""
    in_string = escaped = False
    for i, ch in enumerate(line):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "#":
            return line[:i]
    return line


@dataclass(frozen=True)
class Diagnostic:
    """One user-facing message about a spec, positioned by a span."""

    message: str
    span: Span | None = None
    hint: str | None = None
    severity: str = "error"
    notes: tuple[str, ...] = field(default=())

    def sort_key(self) -> tuple[int, int, str]:
        if self.span is None:
            return (0, 0, self.message)
        return (self.span.line, self.span.col, self.message)

    def render(self, source: Source | None) -> str:
        """`file:line:col: error: message`, the source line, a caret under the span, a hint."""
        # Nothing from the spec or the command line reaches the terminal raw: control and
        # invisible characters are shown escaped (a NUL, an ANSI escape, a bidi override).
        name = printable(source.name if source is not None else "<spec>")
        message = printable(self.message)
        if self.span is None or source is None:
            out = [f"{name}: {self.severity}: {message}"]
        else:
            sp = self.span
            out = [f"{name}:{sp.line}:{sp.col}: {self.severity}: {message}"]
            line = source.line(sp.line)
            width = len(str(sp.line))
            end = sp.end_col if sp.end_line == sp.line else len(line) + 1
            text, col, end = _display(line, sp.col, end)
            carets = max(1, end - col)
            out.append(f"  {sp.line} | {text}".rstrip())
            out.append(f"  {' ' * width} | {' ' * (col - 1)}{'^' * carets}")
        out.extend(f"  note: {printable(n)}" for n in self.notes)
        if self.hint:
            out.append(f"  hint: {printable(self.hint)}")
        return "\n".join(out)


def is_hidden(ch: str) -> bool:
    """A character that must not reach a terminal raw: controls (but tab and newline), format
    characters (bidi overrides, zero-width spaces), line and paragraph separators, surrogates."""
    return ch not in "\t\n" and unicodedata.category(ch) in _HIDDEN_CATEGORIES


_HIDDEN_CATEGORIES = frozenset(("Cc", "Cf", "Zl", "Zp", "Cs"))


def escaped(ch: str) -> str:
    """A character written as its code point, as Python writes it: `\\x00`, `\\u202e`."""
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` with every hidden character escaped (see `is_hidden`); tabs and newlines kept."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(escaped(ch) if is_hidden(ch) else ch for ch in text)


def _shown(line: str, col: int, end: int) -> tuple[str, int, int]:
    """A source line as displayed (a tab as one space, hidden characters escaped), with the
    span's columns moved to match."""
    if line.isascii() and line.isprintable():
        return line, col, end
    out: list[str] = []
    width = 0
    new_col, new_end = None, None
    for i, ch in enumerate(line, 1):
        if i == col:
            new_col = width + 1
        if i == end:
            new_end = width + 1
        piece = " " if ch == "\t" else (escaped(ch) if is_hidden(ch) else ch)
        out.append(piece)
        width += len(piece)
    if new_col is None:
        new_col = width + 1 + (col - len(line) - 1)
    if new_end is None:
        new_end = width + 1 + (end - len(line) - 1)
    return "".join(out), new_col, new_end


MAX_LINE = 120


def _display(line: str, col: int, end: int) -> tuple[str, int, int]:
    """The source line shown under a message, with the span's columns moved to match."""
    # A very long line is cut first, so that the work stays proportional to what is shown.
    more_left = more_right = False
    if len(line) > 4 * MAX_LINE:
        lo = max(0, min(col - 1 - MAX_LINE, len(line) - 3 * MAX_LINE))
        hi = lo + 3 * MAX_LINE
        more_left, more_right = lo > 0, hi < len(line)
        line, col, end = line[lo:hi], col - lo, end - lo
    text, col, end = _shown(line, col, end)
    return _window(text, col, end, more_left, more_right)


def _window(
    text: str, col: int, end: int, more_left: bool = False, more_right: bool = False
) -> tuple[str, int, int]:
    """A long line cut to `MAX_LINE` characters around the span; columns moved to match.
    `more_left` / `more_right`: the line was already cut on that side."""
    if len(text) <= MAX_LINE and not (more_left or more_right):
        return text, col, end
    left = max(0, min(col - 1 - 20, len(text) - MAX_LINE))
    right = left + MAX_LINE
    dots_left, dots_right = left > 0 or more_left, right < len(text) or more_right
    shown = ("..." if dots_left else "") + text[left:right] + ("..." if dots_right else "")
    shift = left - (3 if dots_left else 0)
    return shown, col - shift, min(end, right + 1) - shift


def suggest(name: str, candidates: Iterable[str]) -> str | None:
    """The closest candidate, if close enough to be a likely typo or abbreviation.

    >>> suggest("epsilon", ["eps", "delta"]), suggest("pdg", ["pgd", "apgd"])
    ('eps', 'pgd')
    """
    lowered = name.lower()
    # One-letter names are not typos of other one-letter names (`z` is not a misspelt `x`).
    limit = max(1, len(name) // 3) if len(name) > 1 else 0
    close: tuple[int, str] | None = None
    prefixed: list[str] = []
    for cand in set(candidates):
        other = cand.lower()
        short, long = sorted((lowered, other), key=len)
        if len(short) >= 3 and long.startswith(short):
            prefixed.append(cand)
        # The distance is at least the difference in length: most candidates stop here.
        if len(long) - len(short) > limit:
            continue
        d = _edit_distance(lowered, other, limit)
        if d <= limit and (close is None or (d, cand) < close):
            close = (d, cand)
    if close is not None:
        return close[1]
    # An abbreviation of the name, or the name cut short: `epsilon` for `eps`, `adamw` for `adam`.
    if prefixed:
        return min((_edit_distance(lowered, c.lower()), c) for c in prefixed)[1]
    return None


def _edit_distance(a: str, b: str, limit: int | None = None) -> int:
    """Levenshtein distance where swapping two neighbouring characters counts as one edit.

    With `limit`, any distance above it may be returned as `limit + 1` (the rows' minima never
    decrease, so the computation stops at the first row whose minimum exceeds the limit).
    """
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            d = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                d = min(d, prev2[j - 2] + 1)
            cur.append(d)
        if limit is not None and min(cur) > limit:
            return limit + 1
        prev2, prev = prev, cur
    return prev[-1]
