"""Source text, spans (1-based line/column) and diagnostics rendered with a caret."""

from __future__ import annotations

from dataclasses import dataclass, field


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

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")

    def line(self, number: int) -> str:
        lines = self.lines
        return lines[number - 1] if 1 <= number <= len(lines) else ""

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
        name = source.name if source is not None else "<spec>"
        if self.span is None or source is None:
            out = [f"{name}: {self.severity}: {self.message}"]
        else:
            sp = self.span
            out = [f"{name}:{sp.line}:{sp.col}: {self.severity}: {self.message}"]
            # A tab would move the text but not the caret: shown as one space.
            text = source.line(sp.line).replace("\t", " ")
            width = len(str(sp.line))
            end = sp.end_col if sp.end_line == sp.line else len(text) + 1
            text, col, end = _window(text, sp.col, end)
            carets = max(1, end - col)
            out.append(f"  {sp.line} | {text}".rstrip())
            out.append(f"  {' ' * width} | {' ' * (col - 1)}{'^' * carets}")
        out.extend(f"  note: {n}" for n in self.notes)
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)


MAX_LINE = 120


def _window(text: str, col: int, end: int) -> tuple[str, int, int]:
    """A long line cut to `MAX_LINE` characters around the span; columns moved to match."""
    if len(text) <= MAX_LINE:
        return text, col, end
    left = max(0, min(col - 1 - 20, len(text) - MAX_LINE))
    right = left + MAX_LINE
    shown = ("..." if left else "") + text[left:right] + ("..." if right < len(text) else "")
    shift = left - (3 if left else 0)
    return shown, col - shift, min(end, right + 1) - shift


def suggest(name: str, candidates: list[str] | set[str] | tuple[str, ...]) -> str | None:
    """The closest candidate, if close enough to be a likely typo or abbreviation.

    >>> suggest("epsilon", ["eps", "delta"]), suggest("pdg", ["pgd", "apgd"])
    ('eps', 'pgd')
    """
    lowered = name.lower()
    scored = sorted((_edit_distance(lowered, c.lower()), c) for c in set(candidates))
    if not scored:
        return None
    # One-letter names are not typos of other one-letter names (`z` is not a misspelt `x`).
    limit = max(1, len(name) // 3) if len(name) > 1 else 0
    if scored[0][0] <= limit:
        return scored[0][1]
    # An abbreviation of the name, or the name cut short: `epsilon` for `eps`, `adamw` for `adam`.
    for _, cand in scored:
        short, long = sorted((lowered, cand.lower()), key=len)
        if len(short) >= 3 and long.startswith(short):
            return cand
    return None


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance where swapping two neighbouring characters counts as one edit."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            d = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                d = min(d, prev2[j - 2] + 1)
            cur.append(d)
        prev2, prev = prev, cur
    return prev[-1]
