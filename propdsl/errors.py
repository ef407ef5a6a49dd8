"""The error family users see. Every spec error carries positioned diagnostics."""

from __future__ import annotations

from collections.abc import Iterable

from propdsl.source import Diagnostic, Source, Span

MAX_REPORTED = 20


class PropdslError(Exception):
    """Base class of every error propdsl raises on purpose (user-facing, no traceback needed)."""


class SpecError(PropdslError):
    """A problem in a spec: `.diagnostics` lists every one found, sorted by position."""

    kind = "spec"

    def __init__(self, diagnostics: Iterable[Diagnostic], source: Source | None = None):
        diags = sorted(diagnostics, key=Diagnostic.sort_key)
        self.diagnostics: list[Diagnostic] = diags
        self.source = source
        super().__init__(self.render())

    def render(self, limit: int = MAX_REPORTED) -> str:
        shown = [d.render(self.source) for d in self.diagnostics[:limit]]
        rest = len(self.diagnostics) - limit
        if rest > 0:
            shown.append(f"... and {rest} more error{'s' if rest > 1 else ''}")
        errors = sum(d.severity == "error" for d in self.diagnostics)
        if errors > 1:
            shown.append(f"{errors} errors")
        return "\n".join(shown)


class ParseError(SpecError):
    """The text is not in the language's syntax."""

    kind = "syntax"


class CheckError(SpecError):
    """Names, types or shapes are wrong, or a block has bad settings."""

    kind = "check"


class OverrideError(SpecError):
    """A parameter override (`--param k=v` or `params={...}`) is wrong."""

    kind = "override"


class UsageError(PropdslError):
    """The API or CLI was called wrongly (not a spec problem)."""


def spec_error(
    cls: type[SpecError],
    message: str,
    span: Span | None,
    source: Source | None,
    hint: str | None = None,
) -> SpecError:
    return cls([Diagnostic(message, span, hint)], source)
