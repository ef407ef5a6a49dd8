"""Syntax: text <-> AST: `parse` (lark, positions kept) and the canonical printer."""

from propdsl.syntax.parser import grammar_text, parse
from propdsl.syntax.printer import format_expr, format_module, format_type

__all__ = ["format_expr", "format_module", "format_type", "grammar_text", "parse"]


def format_text(text: str, name: str = "<spec>") -> str:
    """Parse `text` and print it canonically (comments kept)."""
    return format_module(parse(text, name))
