"""The documentation as a test: README.md and docs/*.md run as written.

Marks (docs/README.md, "Writing the docs"), an HTML comment on the line right before a fence,
invisible on GitHub:

    <!-- runnable -->             the ```python or ```sh block below runs as written, in a
                                  fresh process; a failure fails this test
    <!-- runnable: slow -->       the same, as a slow test (training, over about 5 s)
    <!-- runnable: continue -->   a python block that builds on the previous runnable python
                                  block of the same page: the two (and any before them in the
                                  chain) run in order, as one script (`continue, slow` combine)
    <!-- output-of: COMMAND -->   the block is an excerpt of what `COMMAND` prints: its lines
                                  appear, in order and contiguous, in that output

Python blocks run as a script with the repository first on PYTHONPATH, in a temporary working
directory that holds a copy of specs/: relative paths such as `specs/digits.prop` work as from
the repository root, and whatever the snippet writes (`runs/...`) lands in the temporary
directory. Shell blocks run under `bash -eu` in the same kind of directory with `propdsl` on
PATH; keep them to fast commands (`propdsl check`, `propdsl fmt --check`).

Blocks without a mark are still checked: python must compile, sh must pass `bash -n`, and a
`prop` block (outside docs/language.md, which tests/test_specs.py covers) is a complete spec
that loads; write `prop-fragment` for an excerpt.

Also here: the README's command synopsis lists every option of every command (read from the
typer app, the same metadata `--help` prints), no command line in the docs uses an option its
command lacks, and the docs cite papers, not internal notes.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import propdsl
from propdsl.syntax import format_text

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGE_DOC = ROOT / "docs" / "language.md"  # its blocks: tests/test_specs.py

_FENCE = re.compile(r"^```(\S*)[ \t]*$")
_MARK = re.compile(r"^<!--\s*(runnable|output-of)\b\s*(?::\s*(.*?))?\s*-->\s*$")
_ANY_MARK = re.compile(r"^\s*<!--\s*(runnable|output-of)")
RUNNABLE_INFO = {"python", "sh"}
FLAGS = {"slow", "continue"}
FAST_TIMEOUT = 180
SLOW_TIMEOUT = 600


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    info: str
    body: str
    mark: str | None = None  # "runnable", "output-of" or None
    arg: str = ""  # the flags of a runnable mark, the command of an output-of mark
    flags: set[str] = field(default_factory=set)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"{page.relative_to(ROOT)}:{i + 1}: unclosed code fence"
        block = Block(page, i + 1, m.group(1), "\n".join(lines[i + 1 : j]) + "\n")
        mark = _MARK.match(lines[i - 1]) if i > 0 else None
        if mark is not None:
            block.mark, block.arg = mark.group(1), (mark.group(2) or "").strip()
            if block.mark == "runnable":
                block.flags = {f.strip() for f in block.arg.split(",") if f.strip()}
        out.append(block)
        i = j + 1
    return out


ALL_BLOCKS = [b for page in PAGES for b in _blocks(page)]


def _chains() -> list[list[Block]]:
    """Runnable python blocks grouped into scripts: a `continue` block joins the chain before."""
    chains: list[list[Block]] = []
    last: dict[Path, list[Block]] = {}
    for b in ALL_BLOCKS:
        if b.mark != "runnable" or b.info != "python":
            continue
        if "continue" in b.flags:
            assert b.page in last, f"{b.where}: `continue` with no runnable python block before"
            last[b.page].append(b)
        else:
            last[b.page] = [b]
            chains.append(last[b.page])
    return chains


def _param(items: list[Block], value) -> pytest.param:
    slow = any("slow" in b.flags for b in items)
    ids = items[0].where + (f"+{len(items) - 1}" if len(items) > 1 else "")
    return pytest.param(value, id=ids, marks=[pytest.mark.slow] if slow else [])


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(ROOT / "specs", work / "specs")
    return work


def _env(tmp_path: Path) -> dict[str, str]:
    """The repository first on PYTHONPATH, one torch thread, and `propdsl` on PATH (a shim that
    runs this tree's CLI with this interpreter, whether or not the console script exists)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "propdsl"
    shim.write_text(
        "#!/bin/sh\n"
        f'exec "{sys.executable}" -c "import sys; sys.argv[0] = \'propdsl\'; '
        'from propdsl.cli import main; main()" "$@"\n',
        encoding="utf-8",
    )
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(bindir), str(Path(sys.executable).parent), env["PATH"]])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int, where: str):
    done = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, (
        f"{where}: exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
        f"\n--- stderr\n{done.stderr[-3000:]}"
    )
    return done


# -- the marks ------------------------------------------------------------------------------------
def test_marks_are_well_formed():
    problems = []
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").split("\n")
        for n, text in enumerate(lines):
            if not _ANY_MARK.search(text):
                continue
            where = f"{page.relative_to(ROOT)}:{n + 1}"
            mark = _MARK.match(text)
            if mark is None:
                problems.append(f"{where}: malformed mark {text.strip()!r}")
                continue
            nxt = _FENCE.match(lines[n + 1]) if n + 1 < len(lines) else None
            if nxt is None:
                problems.append(f"{where}: a mark must sit on the line right before a fence")
                continue
            if mark.group(1) == "runnable":
                flags = {f.strip() for f in (mark.group(2) or "").split(",") if f.strip()}
                if flags - FLAGS:
                    problems.append(f"{where}: unknown flags {sorted(flags - FLAGS)}")
                if nxt.group(1) not in RUNNABLE_INFO:
                    problems.append(f"{where}: only python and sh blocks run, not {nxt.group(1)!r}")
                if "continue" in flags and nxt.group(1) != "python":
                    problems.append(f"{where}: `continue` is for python blocks")
            elif not (mark.group(2) or "").startswith("propdsl "):
                problems.append(f"{where}: output-of takes a propdsl command")
    assert not problems, "\n".join(problems)


def test_the_docs_have_runnable_blocks():
    """The README's library snippet runs, and so do blocks of most pages (guards the parser)."""
    runnable = [b for b in ALL_BLOCKS if b.mark == "runnable"]
    readme = [b for b in runnable if b.page.name == "README.md" and b.info == "python"]
    assert readme, "the README's library snippet is not marked runnable"
    assert {b.info for b in runnable} == RUNNABLE_INFO
    assert len({b.page for b in runnable}) >= 8


# -- running them ---------------------------------------------------------------------------------
@pytest.mark.parametrize("chain", [_param(c, c) for c in _chains()])
def test_python_block_runs(chain: list[Block], tmp_path: Path):
    work = _workdir(tmp_path)
    script = work / "snippet.py"
    script.write_text("\n".join(b.body for b in chain), encoding="utf-8")
    slow = any("slow" in b.flags for b in chain)
    _run(
        [sys.executable, str(script)],
        work,
        _env(tmp_path),
        SLOW_TIMEOUT if slow else FAST_TIMEOUT,
        chain[-1].where,
    )


SHELL = [b for b in ALL_BLOCKS if b.mark == "runnable" and b.info == "sh"]


@pytest.mark.parametrize("block", [_param([b], b) for b in SHELL])
def test_shell_block_runs(block: Block, tmp_path: Path):
    work = _workdir(tmp_path)
    script = work / "snippet.sh"
    script.write_text(block.body, encoding="utf-8")
    timeout = SLOW_TIMEOUT if "slow" in block.flags else FAST_TIMEOUT
    _run(["bash", "-eu", str(script)], work, _env(tmp_path), timeout, block.where)


OUTPUTS = [b for b in ALL_BLOCKS if b.mark == "output-of"]


@pytest.mark.parametrize("block", [_param([b], b) for b in OUTPUTS])
def test_output_excerpt_is_what_the_command_prints(block: Block, tmp_path: Path):
    work = _workdir(tmp_path)
    done = _run(["bash", "-euc", block.arg], work, _env(tmp_path), FAST_TIMEOUT, block.where)
    printed = [line.rstrip() for line in done.stdout.splitlines()]
    shown = [line.rstrip() for line in block.body.rstrip("\n").splitlines()]
    starts = [i for i in range(len(printed)) if printed[i : i + len(shown)] == shown]
    assert starts, f"{block.where}: not in the output of `{block.arg}`:\n{done.stdout}"


# -- blocks that do not run still parse -----------------------------------------------------------
PLAIN_PYTHON = [b for b in ALL_BLOCKS if b.info == "python" and b.mark is None]


@pytest.mark.parametrize("block", PLAIN_PYTHON, ids=[b.where for b in PLAIN_PYTHON])
def test_python_block_compiles(block: Block):
    compile(block.body, block.where, "exec")


PLAIN_SHELL = [b for b in ALL_BLOCKS if b.info == "sh" and b.mark is None]


@pytest.mark.parametrize("block", PLAIN_SHELL, ids=[b.where for b in PLAIN_SHELL])
def test_shell_block_parses(block: Block):
    done = subprocess.run(["bash", "-n"], input=block.body, capture_output=True, text=True)
    assert done.returncode == 0, f"{block.where}: {done.stderr}"


SPECS = [b for b in ALL_BLOCKS if b.info == "prop" and b.page != LANGUAGE_DOC]


@pytest.mark.parametrize("block", SPECS, ids=[b.where for b in SPECS])
def test_prop_block_loads_and_is_canonical(block: Block):
    propdsl.load(block.body)
    assert format_text(block.body) == block.body, f"{block.where}: not in canonical form"


# -- the command line synopsis --------------------------------------------------------------------
@functools.cache
def _app():
    import typer.main

    from propdsl.cli import app

    return typer.main.get_command(app)


def _options(command) -> set[str]:
    return {
        o
        for p in command.params
        if p.param_type_name == "option"
        for o in (*p.opts, *p.secondary_opts)
    } | {"--help"}


_OPTION = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)")
_COMMENT = re.compile(r"\s#\s.*$")


def _entries(text: str, *, continued: bool) -> list[tuple[str, str]]:
    """(subcommand or "", the rest of the command line) of every `propdsl ...` in `text`; with
    `continued`, indented lines that start with `[` continue the command above (a synopsis)."""
    group = _app()
    globals_ = _options(group)
    # global options that take a value (`--plugin MODULE`): the value is not the command
    valued = {
        o
        for p in group.params
        if p.param_type_name == "option" and not getattr(p, "is_flag", False)
        for o in p.opts
    }
    out: list[list[str]] = []
    for raw in text.split("\n"):
        line = _COMMENT.sub("", raw)
        if continued and out and re.match(r"^\s+\[", line):
            out[-1][1] += " " + line.strip()
            continue
        for m in re.finditer(r"(?:^|[\s`$(])propdsl((?:\s+\S+)+)", line):
            words = m.group(1).split()
            k = 0
            while k < len(words) and (words[k] == "--" or words[k].strip("[]") in globals_):
                # `--`: torchrun's end of its own options (`-m propdsl -- train ...`)
                k += 2 if words[k].strip("[]") in valued else 1
            name = words[k] if k < len(words) and words[k] in group.commands else ""
            if name or words[0].startswith("-") or words[0].startswith("[-"):
                out.append([name, " ".join(words if not name else words[:k] + words[k + 1 :])])
    return [(name, rest) for name, rest in out]


def _synopsis() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## The command line", 1)[1]
    return re.search(r"^```\n(.*?)^```", section, re.DOTALL | re.MULTILINE).group(1)


def test_readme_synopsis_lists_every_command_and_option():
    group = _app()
    entries = _entries(_synopsis(), continued=True)
    by_command: dict[str, str] = {}
    for name, rest in entries:
        by_command[name] = by_command.get(name, "") + " " + rest
    missing = []
    for name, command in group.commands.items():
        assert name in by_command, f"the README synopsis has no line for `propdsl {name}`"
        shown = set(_OPTION.findall(by_command[name]))
        for opt in sorted(_options(command) - {"--help"}):
            if opt not in shown:
                missing.append(f"propdsl {name} {opt}")
        unknown = shown - _options(command) - _options(group)
        assert not unknown, f"propdsl {name}: no such options {sorted(unknown)}"
        for arg in (p for p in command.params if p.param_type_name == "argument"):
            placeholder = arg.name.upper().rstrip("S")
            assert re.search(rf"\b{placeholder}\b", by_command[name]), (
                f"propdsl {name}: argument {placeholder} missing from the synopsis"
            )
    for opt in sorted(_options(group) - {"--help"}):
        if opt not in set(_OPTION.findall(by_command.get("", ""))):
            missing.append(f"propdsl {opt}")
    assert not missing, "options missing from the README synopsis:\n" + "\n".join(missing)


def _command_lines() -> list[tuple[str, str, str]]:
    """(where, subcommand, rest) for every propdsl command line in code blocks and code spans."""
    found = []
    for b in ALL_BLOCKS:
        for name, rest in _entries(b.body, continued=True):
            found.append((b.where, name, rest))
    for page in PAGES:
        in_fence = False
        for n, line in enumerate(page.read_text(encoding="utf-8").split("\n"), 1):
            if _FENCE.match(line):
                in_fence = not in_fence
            if in_fence:
                continue
            for span in re.findall(r"`([^`]*\bpropdsl\b[^`]*)`", line):
                for name, rest in _entries(span, continued=False):
                    found.append((f"{page.relative_to(ROOT)}:{n}", name, rest))
    return found


def test_docs_use_only_options_that_exist():
    group = _app()
    lines = _command_lines()
    assert len(lines) > 50  # the parser finds the docs' command lines
    wrong = []
    for where, name, rest in lines:
        known = _options(group) | (_options(group.commands[name]) if name else set())
        for opt in _OPTION.findall(rest):
            if opt not in known:
                wrong.append(f"{where}: propdsl {name} {opt}")
    assert not wrong, "options that do not exist:\n" + "\n".join(wrong)


# -- citations, not internal notes ----------------------------------------------------------------
FORBIDDEN = [
    (re.compile(r"\bREFERENCE\b"), "an internal note (cite the paper: authors, year, title)"),
    # The VNN-COMP instances are data beside the repository (../shared/vnncomp2021, skipped when
    # absent); any other shared/ path is an internal note.
    (re.compile(r"shared/(?!vnncomp2021)"), "a path outside the repository"),
    (re.compile(r"/work/"), "a path of a development machine"),
]


def _shipped_text_files() -> list[Path]:
    roots = ["docs", "propdsl", "examples", "benchmarks", "specs", "tests", "grammars"]
    files = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for root in roots:
        files += [
            p
            for p in sorted((ROOT / root).rglob("*"))
            if p.is_file() and p.suffix in {".md", ".py", ".prop", ".lark", ".txt", ".toml"}
        ]
    return [p for p in files if p != Path(__file__).resolve()]


def test_docs_cite_papers_not_internal_notes():
    files = _shipped_text_files()
    assert any(p.name == "references.md" for p in files)
    found = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
            for pattern, why in FORBIDDEN:
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {why}: {line.strip()}")
    assert not found, "\n".join(found)
