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
        """A one-character span just after the last non-blank character (for end-of-file errors)."""
        lines = self.text.rstrip().split("\n")
        line = len(lines)
        col = len(lines[-1]) + 1
        return Span(line, col, line, col + 1)


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
            text = source.line(sp.line)
            width = len(str(sp.line))
            end = sp.end_col if sp.end_line == sp.line else len(text) + 1
            carets = max(1, end - sp.col)
            out.append(f"  {sp.line} | {text}".rstrip())
            out.append(f"  {' ' * width} | {' ' * (sp.col - 1)}{'^' * carets}")
        out.extend(f"  note: {n}" for n in self.notes)
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)


def suggest(name: str, candidates: list[str] | set[str] | tuple[str, ...]) -> str | None:
    """The closest candidate by edit distance, if close enough to be a likely typo."""
    best: tuple[int, str] | None = None
    for cand in sorted(set(candidates)):
        d = _edit_distance(name.lower(), cand.lower())
        if best is None or d < best[0]:
            best = (d, cand)
    if best is None:
        return None
    limit = max(1, len(name) // 3) if len(name) > 2 else 1
    if best[0] <= limit or (len(name) > 2 and best[1].lower().startswith(name.lower())):
        return best[1]
    return None


def _edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]
