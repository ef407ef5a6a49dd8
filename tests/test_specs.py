"""The shipped specs and the examples of docs/language.md: they load, and they stay canonical.

Fenced blocks in docs/language.md are tested by their info string:

- `prop`: a complete spec; it loads without error and is in canonical form.
- `prop-error`: a complete spec that must be rejected with positioned diagnostics.
- `prop-before`: text that the formatter turns into the `prop` block right after it.
- `prop-prelude`: a verbatim excerpt of propdsl/prelude.prop; together they cover the prelude.
- `console`: `$ propdsl check NAME [--param k=v ...]` and the exact output. NAME is a file of the
  repository (`specs/digits.prop`) or, otherwise, the `prop` / `prop-error` block just above.
- `prop-fragment` (and any other info string): an excerpt, not checked.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import propdsl
from propdsl.api import Spec, parse_overrides, prelude_text
from propdsl.source import Source
from propdsl.syntax import format_text, parse

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "specs").glob("*.prop"))
DOC = ROOT / "docs" / "language.md"

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)


def _blocks() -> list[tuple[str, str, int]]:
    """(info string, body, line number of the opening fence) of every fenced block."""
    text = DOC.read_text(encoding="utf-8")
    return [
        (m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in _FENCE.finditer(text)
    ]


def _of_kind(kind: str) -> list[tuple[str, int]]:
    return [(body, line) for info, body, line in _blocks() if info == kind]


def _ids(blocks: list[tuple[str, int]]) -> list[str]:
    return [f"line{line}" for _, line in blocks]


# -- specs/ --------------------------------------------------------------------------------------
def test_there_are_specs():
    names = {p.name for p in SPECS}
    for notion in (
        "classification_robustness",
        "strong_classification_robustness",
        "standard_robustness",
        "lipschitz_robustness",
        "explanation_stability",
        "breast_cancer",
    ):
        assert f"{notion}.prop" in names


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_spec_loads_with_a_property(path: Path):
    spec = propdsl.load(path)
    assert spec.properties, f"{path.name} declares no property of (x) or (x, y)"
    for prop in spec.properties.values():
        assert prop.formula is not None


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_spec_is_canonical(path: Path):
    text = path.read_text(encoding="utf-8")
    assert format_text(text, path.name) == text, f"run: propdsl fmt specs/{path.name}"


@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_spec_blocks_name_its_properties(path: Path):
    spec = propdsl.load(path)
    for block in spec.blocks:
        if block.kind == "verify":
            assert set(block.get("properties")) <= set(spec.properties)


# -- docs/language.md ----------------------------------------------------------------------------
def test_the_doc_has_examples():
    kinds = {info for info, _, _ in _blocks()}
    assert {"prop", "prop-error", "prop-prelude", "console"} <= kinds
    assert len(_of_kind("prop")) >= 20


@pytest.mark.parametrize("body", [b for b, _ in _of_kind("prop")], ids=_ids(_of_kind("prop")))
def test_doc_spec_loads(body: str):
    propdsl.load(body)


@pytest.mark.parametrize("body", [b for b, _ in _of_kind("prop")], ids=_ids(_of_kind("prop")))
def test_doc_spec_is_canonical(body: str):
    assert format_text(body) == body


@pytest.mark.parametrize(
    "body", [b for b, _ in _of_kind("prop-error")], ids=_ids(_of_kind("prop-error"))
)
def test_doc_error_example_is_rejected(body: str):
    with pytest.raises(propdsl.SpecError) as info:
        propdsl.load(body)
    assert all(d.message for d in info.value.diagnostics)


def _pairs_after(kind: str) -> list[tuple[str, str, int]]:
    blocks = _blocks()
    out = []
    for (info, body, line), nxt in zip(blocks, blocks[1:], strict=False):
        if info == kind:
            assert nxt[0] == "prop", f"line {line}: a {kind} block must be followed by a prop block"
            out.append((body, nxt[1], line))
    return out


@pytest.mark.parametrize(
    ("before", "after"),
    [(b, a) for b, a, _ in _pairs_after("prop-before")],
    ids=[f"line{n}" for _, _, n in _pairs_after("prop-before")],
)
def test_doc_formatting_example(before: str, after: str):
    assert format_text(before) == after


def test_doc_prelude_excerpts_are_verbatim_and_complete():
    prelude = prelude_text()
    shown = [body for body, _ in _of_kind("prop-prelude")]
    for body in shown:
        assert body.strip() in prelude, f"not in propdsl/prelude.prop:\n{body}"
    declared = {d.name for d in parse(prelude).decls}
    covered = {d.name for body in shown for d in parse(body).decls}
    assert declared <= covered, f"prelude declarations not shown: {sorted(declared - covered)}"


def _console_cases() -> list[tuple[str, str, str, dict[str, str], int]]:
    """(name, spec text, expected output, overrides, line) for each `console` block."""
    cases = []
    previous: str | None = None
    for info, body, line in _blocks():
        if info in ("prop", "prop-error"):
            previous = body
            continue
        if info != "console":
            continue
        command, _, expected = body.partition("\n")
        words = shlex.split(command.removeprefix("$ "))
        assert words[:2] == ["propdsl", "check"], f"line {line}: only propdsl check is tested"
        name, flags = words[2], words[3:]
        values = [v for flag, v in zip(flags[::2], flags[1::2], strict=True)]
        assert all(flag in ("--param", "-p") for flag in flags[::2]), f"line {line}: {flags}"
        path = ROOT / name
        if path.is_file():
            text = path.read_text(encoding="utf-8")
        else:
            assert previous is not None, f"line {line}: no spec above this console block"
            text = previous
        cases.append((name, text, expected, parse_overrides(values), line))
    return cases


@pytest.mark.parametrize(
    ("name", "text", "expected", "overrides"),
    [c[:4] for c in _console_cases()],
    ids=[f"line{c[4]}" for c in _console_cases()],
)
def test_doc_console_output(name: str, text: str, expected: str, overrides: dict[str, str]):
    try:
        out = Spec(Source(text, name), overrides).summary()
    except propdsl.SpecError as err:
        out = err.render()
    assert out.rstrip("\n") == expected.rstrip("\n")
