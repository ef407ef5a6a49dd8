"""Hostile specs through the command line: every one ends in a clear, positioned one-line error
with exit code 1 (spec) or 2 (usage), quickly, and never in exit 70, a traceback, a hang or a
crash. Each case is a small spec that used to blow up (exponential expansion, RecursionError,
gigabytes for a finite domain), run for minutes (quadratic work), crash the trainer (options out
of range), or deceive (non-ASCII digits, overflowing numbers, invisible characters, lost
backslashes). The limits are documented in docs/language.md ("Limits") and docs/security.md.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import propdsl
from propdsl import ast as A
from propdsl import check as C
from propdsl import cli
from propdsl.source import MAX_SOURCE_BYTES
from propdsl.syntax import parse

ROOT = Path(__file__).resolve().parents[2]
NET = "network f : Tensor[2] -> Tensor[3]\n"
DIGITS_NET = "network f : Tensor[1, 8, 8] -> Tensor[10]\n"
# a train block that trains (if the spec ever gets that far) for one tiny epoch
SETTINGS = {
    "model": "mlp(hidden = [4])",
    "epochs": "1",
    "batch": "4",
    "attack": "pgd(steps = 1)",
    "loss": "cross_entropy + p",
}


def train_block(**changes: str) -> str:
    settings = {**SETTINGS, **changes}
    body = "".join(f"  {key} = {value}\n" for key, value in settings.items())
    return f'train f on digits(split = "train", limit = 8) {{\n{body}}}\n'


TRAIN = train_block()
POSITIONED = re.compile(r"^(?P<file>[^\n]+?):(?P<line>\d+):(?P<col>\d+): error: (?P<msg>[^\n]+)$")


def run(*args: str):
    return CliRunner().invoke(cli.app, list(args))


def write(tmp_path: Path, text: str, name: str = "hostile.prop") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_spec_error(result, line: int | None = None, contains: str = "") -> re.Match:
    """Exit 1, a positioned first line (at `line` when given) holding `contains`, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "internal error" not in result.output
    first = result.stderr.split("\n", 1)[0]
    m = POSITIONED.match(first)
    assert m is not None, first
    if line is not None:
        assert int(m["line"]) == line, first
    assert contains in m["msg"], first
    return m


def assert_usage_error(result, contains: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "internal error" not in result.output
    first = result.stderr.split("\n", 1)[0]
    assert first.startswith("error: ") and contains in first, first


def check_fmt_train(path: Path, tmp_path: Path) -> list:
    """`check`, `fmt --check` and `train --epochs 1` on one spec: never exit 70."""
    results = [
        run("check", str(path)),
        run("fmt", "--check", str(path)),
        run("train", str(path), "--epochs", "1", "--out", str(tmp_path / "run"), "-q"),
    ]
    for result in results:
        assert result.exit_code in (0, 1), (result.exit_code, result.output[-2000:])
        assert "Traceback" not in result.output and "internal error" not in result.output
    return results


# -- 6. blow-ups from small specs ------------------------------------------------------------------
def doubling_lets(n: int) -> str:
    lets = "".join(f"let a{i} = a{i - 1} + a{i - 1}\n" for i in range(1, n + 1))
    return NET + "let a0 = 1.0\n" + lets + f"property p(x) = f(x)[0] > a{n}\n"


def test_doubling_lets_stop_at_the_expansion_limit(tmp_path):
    # 30 lines used to expand to 2^31 nodes (minutes); the use that crosses the limit is named
    result = run("check", str(write(tmp_path, doubling_lets(30))))
    crossing = 2 + 13  # a13 = a12 + a12 is the first let above MAX_EXPANDED (2^14 nodes)
    m = assert_spec_error(result, line=crossing, contains="this declaration is too large")
    assert f"more than {C.MAX_EXPANDED:,} expression nodes" in m["msg"]
    assert result.stderr.count(": error: ") == 1  # the later lets stay quiet


def test_doubling_let_functions_stop_at_the_expansion_limit(tmp_path):
    funs = "".join(f"let g{i}(v) = g{i - 1}(v) + g{i - 1}(v)\n" for i in range(1, 31))
    text = NET + "let g0(v) = v\n" + funs + "property p(x) = g30(f(x)[0]) > 0\n"
    result = run("check", str(write(tmp_path, text)))
    assert_spec_error(result, contains="this declaration is too large")
    # the chain of expansions is named, cut short, and ends at the declaration checked
    assert "  note: ... " in result.stderr and "  note: while checking 'p'" in result.stderr
    assert result.stderr.count("  note: ") <= 8


def test_work_on_ignored_arguments_is_counted_too(tmp_path):
    # k ignores its argument: the result stays tiny while the work doubles per line
    funs = "".join(f"let h{i}(v) = k(h{i - 1}(v)) + k(h{i - 1}(v))\n" for i in range(1, 40))
    text = NET + "let k(v) = 1\nlet h0(v) = v\n" + funs + "property p(x) = f(x)[0] > h39(0)\n"
    assert_spec_error(run("check", str(write(tmp_path, text))), contains="too large")


def test_an_argument_used_many_times_counts_each_use(tmp_path):
    text = NET + "let d(v) = v + v + v + v\nproperty p(x) = f(x)[0] > d(d(d(d(d(d(d(d(1))))))))\n"
    assert_spec_error(run("check", str(write(tmp_path, text))), line=2, contains="too large")


def test_the_whole_spec_is_bounded_too(tmp_path):
    # each property stays below its own limit (about 8,000 nodes); together they cross the spec's
    body = " + ".join(["f(x)[0]"] * 40)
    per = "let big(v) = " + " + ".join(["v"] * 40) + "\n"
    one = NET + per + f"property p0(x) = big({body}) > 0\n"
    assert run("check", str(write(tmp_path, one))).exit_code == 0
    props = "".join(f"property p{i}(x) = big({body}) > 0\n" for i in range(20))
    result = run("check", str(write(tmp_path, NET + per + props)))
    m = assert_spec_error(result, contains="the spec is too large")
    assert f"more than {C.MAX_SPEC_EXPANDED:,}" in m["msg"]
    assert result.stderr.count(": error: ") == 1  # nothing is checked after it


def test_a_huge_finite_domain_is_refused_where_it_is_written(tmp_path):
    # used to pass `check` and allocate 8.6 GB in `train`
    text = DIGITS_NET + "property p(x, y) = forall i in range(1000000000): f(x)[y] > 0\n" + TRAIN
    path = write(tmp_path, text)
    for result in check_fmt_train(path, tmp_path)[::2]:  # check and train
        m = assert_spec_error(result, line=2, contains="range(1000000000) is too large")
        assert int(m["col"]) == len("property p(x, y) = forall i in range(") + 1
    assert f"at most {C.MAX_RANGE:,} values" in result.stderr


def test_a_huge_annotated_box_variable_is_refused(tmp_path):
    # its shape comes from the annotation alone: training would hold a batch of such points
    text = NET + "property p(x) = forall z : Tensor[100000, 100000] in box(0, 1): norm(z) >= 0\n"
    result = run("check", str(write(tmp_path, text)))
    m = assert_spec_error(result, line=2, contains="'z' would hold 10,000,000,000 numbers")
    assert int(m["col"]) == text.split("\n")[1].index("Tensor") + 1


def test_nested_finite_domains_multiply(tmp_path):
    text = NET + "property p(x) = forall i in range(200): forall j in range(200): f(x)[0] > 0\n"
    result = run("check", str(write(tmp_path, text)))
    m = assert_spec_error(result, line=2, contains="combinations of nested finite quantifiers")
    assert "40,000" in m["msg"]
    # the same domains one after the other are fine
    ok = "(forall i in range(200): f(x)[0] > 0) and (forall j in range(200): f(x)[1] > 0)"
    assert run("check", str(write(tmp_path, NET + f"property p(x) = {ok}\n"))).exit_code == 0


def test_nested_attacks_are_bounded(tmp_path):
    inner = "f(z3)[0] > 0"
    for i in (3, 2, 1, 0):
        centre = "x" if i == 0 else f"z{i - 1}"
        inner = f"exists z{i} in ball({centre}, 0.1, inf): {inner}"
    result = run("check", str(write(tmp_path, NET + f"property p(x) = {inner}\n")))
    m = assert_spec_error(result, contains="nested 4 deep")
    assert int(m["col"]) == inner.index("z3") + len("property p(x) = ") + 1


def chained(n: int, kind: str) -> str:
    if kind == "properties":
        return (
            DIGITS_NET
            + "property p0(x, y) = f(x)[y] > 0\n"
            + "".join(f"property p{i}(x, y) = p{i - 1}(x, y)\n" for i in range(1, n))
            + train_block(loss=f"cross_entropy + p{n - 1}")
        )
    if kind == "constants":
        lets = "".join(f"let a{i} = a{i - 1} + 1\n" for i in range(1, n))
        return (
            DIGITS_NET + "let a0 = 1\n" + lets + f"property p(x, y) = f(x)[y] > a{n - 1}\n" + TRAIN
        )
    lets = "".join(f"let a{i}(v) = a{i - 1}(v) + 1\n" for i in range(1, n))
    return (
        DIGITS_NET
        + "let a0(v) = v\n"
        + lets
        + f"property p(x, y) = a{n - 1}(f(x)[y]) > 0\n"
        + TRAIN
    )


@pytest.mark.parametrize(
    ("kind", "n"), [("properties", 200), ("constants", 500), ("functions", 500)]
)
def test_long_chains_of_definitions_are_a_positioned_error(tmp_path, kind, n):
    # each used to end in a RecursionError (exit 70): the nesting limit counts inlined levels
    check, fmt, train = check_fmt_train(write(tmp_path, chained(n, kind)), tmp_path)
    assert_spec_error(check, contains="nested too deeply")
    assert f"more than {C.MAX_NESTING} levels" in check.stderr
    assert_spec_error(train, contains="nested too deeply")
    assert fmt.stderr == ""  # formatting needs no inlining: no error


def test_the_deepest_accepted_chain_trains(tmp_path):
    # the largest chain the nesting limit accepts goes through every pass of `propdsl train`
    def spec(n: int) -> str:
        return chained(n, "functions").replace(
            f"a{n - 1}(f(x)[y]) > 0", f"forall x' in ball(x, 0.1, inf): a{n - 1}(f(x')[y]) > 0"
        )

    lo, hi = 1, C.MAX_NESTING  # bisection: the largest n that loads
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if _loads(spec(mid)) else (lo, mid - 1)
    n = lo
    assert n >= C.MAX_NESTING // 3 and not _loads(spec(n + 1))
    path = write(tmp_path, spec(n))
    result = run("train", str(path), "--epochs", "1", "--out", str(tmp_path / "run"), "-q")
    assert result.exit_code == 0, result.output[-2000:]
    assert (tmp_path / "run" / "last.safetensors").exists()


def _loads(text: str) -> bool:
    try:
        propdsl.load(text)
    except propdsl.CheckError as err:
        assert "nested too deeply" in err.diagnostics[0].message
        return False
    return True


@pytest.mark.parametrize(
    "body",
    [
        "f(x)[0] > " + " + ".join(["f(x)[1]"] * 10_000),
        "not " * 10_000 + "f(x)[0] > 0",
        "-" * 10_000 + "f(x)[0] > 1",
    ],
    ids=["sum", "not", "minus"],
)
def test_long_operator_chains_are_a_positioned_error(tmp_path, body):
    # parsing 10,000 terms takes a few seconds: one command each (check, fmt, train)
    text = DIGITS_NET + f"property p(x, y) = {body}\n" + TRAIN
    path = write(tmp_path, text)
    command = {"f": ["check"], "n": ["fmt"], "-": ["train", "--out", str(tmp_path / "run")]}
    assert_spec_error(run(*command[body[0]], str(path)), line=2, contains="nested too deeply")
    assert path.read_text(encoding="utf-8") == text  # fmt left it alone


# -- 7. quadratic work -----------------------------------------------------------------------------
def test_an_oversized_spec_file_is_a_usage_error(tmp_path):
    path = tmp_path / "big.prop"
    path.write_text("#\n" * (MAX_SOURCE_BYTES // 2 + 1), encoding="utf-8")
    assert_usage_error(run("check", str(path)), "specs may be at most 256 KiB")
    assert_usage_error(run("fmt", str(path)), "specs may be at most 256 KiB")


def test_a_sparse_huge_file_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "huge.prop"
    with open(path, "wb") as f:
        f.truncate(8 * 1024**3)  # 8 GiB that take no disk space
    assert_usage_error(run("check", str(path)), "is 8.0 GiB; specs may be at most 256 KiB")


def test_many_undefined_names_get_hints_for_the_first_errors_only(tmp_path, monkeypatch):
    calls = []
    from propdsl.check import base  # where the checker computes its hints

    real = base.suggest
    monkeypatch.setattr(base, "suggest", lambda *a: calls.append(a) or real(*a))
    props = "".join(f"property p{i}(x) = f(x)[0] > undefined_{i}\n" for i in range(2000))
    result = run("check", str(write(tmp_path, NET + props)))
    assert_spec_error(result, line=2, contains="unknown name 'undefined_0'")
    assert result.stderr.rstrip().endswith(" errors")
    assert 0 < len(calls) <= C.MAX_HINTS


# -- 8. user errors that used to exit 70 -----------------------------------------------------------
@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("attack = pgd(step_size = -1.0)", "'step_size' must be > 0, got -1.0"),
        ("optimizer = adam(lr = -1.0)", "'lr' must be > 0, got -1.0"),
        (
            "optimizer = sgd(lr = 1e40)",
            "'lr' must be a finite number (at most 3.403e+38 in size, the float32 range), got 1e40",
        ),
        ("optimizer = sgd(lr = 0.1, momentum = 1.5)", "'momentum' must be in [0, 1), got 1.5"),
        ("optimizer = sgd(lr = 0.1, nesterov = true)", "'nesterov = true' needs a momentum"),
        ("optimizer = adamw(weight_decay = -0.1)", "'weight_decay' must be >= 0"),
        ("schedule = step(step_size = 0)", "'step_size' must be >= 1, got 0"),
        ("schedule = step(gamma = 2.0)", "'gamma' must be in (0, 1], got 2.0"),
        ("attack = pgd(restarts = 0)", "'restarts' must be >= 1, got 0"),
        ("attack = apgd(rho = 1.5)", "'rho' must be in [0, 1], got 1.5"),
        ("attack = pgd(surrogate_beta = 0.0)", "'surrogate_beta' must be > 0"),
        ("logic = dl2(xi = -1.0)", "'xi' must be > 0, got -1.0"),
        ("logic = yager(p = 0.0)", "'p' must be > 0, got 0.0"),
        ("model = mlp(hidden = [1000000000])", "'hidden' must be in [1, 65536], got 1000000000"),
        ("model = mlp(activation = softplus(beta = 0.0))", "'beta' must be > 0, got 0.0"),
        ("threads = 100000", "'threads' must be in [1, 1024], got 100000"),
        ("threads = 0", "'threads' must be in [1, 1024], got 0"),
        ("seed = 4294967296", "'seed' must be in [0, 4294967295], got 4294967296"),
        ("batch = 0", "'batch' must be >= 1, got 0"),
        ('device = "cuda:x"', 'device must be auto, cpu, cuda or "cuda:N"'),
    ],
)
def test_option_values_out_of_range_are_positioned_errors(tmp_path, setting, message):
    key, value = setting.split(" = ", 1)
    text = DIGITS_NET + "property p(x, y) = f(x)[y] > 0\n" + train_block(**{key: value})
    path = write(tmp_path, text)
    line = text.split("\n").index(f"  {setting}") + 1
    for result in (run("check", str(path)), run("train", str(path), "--out", str(tmp_path / "r"))):
        assert_spec_error(result, line=line, contains=message)


def test_data_and_verify_options_have_ranges_too(tmp_path):
    text = (
        DIGITS_NET
        + "property p(x, y) = f(x)[y] > 0\n"
        + 'verify f on digits(split = "test", val_fraction = 1.0) {\n'
        + "  properties = [p]\n  timeout = 0\n}\n"
    )
    result = run("check", str(write(tmp_path, text)))
    assert_spec_error(result, line=3, contains="'val_fraction' must be in [0, 1), got 1.0")
    assert "'timeout' must be > 0, got 0" in result.stderr


@pytest.mark.parametrize("what", ["dev-zero", "fifo", "directory"])
def test_special_files_are_refused_without_reading(tmp_path, what):
    if what == "dev-zero":
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero here")
        path = Path("/dev/zero")
    elif what == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        path = tmp_path / "pipe.prop"
        os.mkfifo(path)
    else:
        path = tmp_path / "folder.prop"
        path.mkdir()
    # a fresh process with a time limit: reading /dev/zero never ends, opening a FIFO blocks
    proc = subprocess.run(
        [sys.executable, "-c", "from propdsl.cli import main; main()", "check", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: cannot read spec file {path}: ")
    assert (
        "directory" in proc.stderr if what == "directory" else "not a regular file" in proc.stderr
    )


def test_an_annotated_box_variable_that_does_not_fit_the_network(tmp_path):
    text = DIGITS_NET + "property p(x, y) = forall z : Tensor[3] in box(0, 1): argmax(f(z)) == y\n"
    text += TRAIN
    check, _, train = check_fmt_train(write(tmp_path, text), tmp_path)
    for result in (check, train):
        m = assert_spec_error(result, line=2, contains="network 'f' expects Tensor[1, 8, 8]")
        assert int(m["col"]) == text.split("\n")[1].index("z)") + 1  # where z meets f


# -- 12. deceptive input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "char"),
    [
        (NET + "property p(x) = f(x)[0] > \u0660.\u0665\n", "U+0660 ARABIC-INDIC DIGIT ZERO"),
        ("network f : Tensor[\u0663] -> Tensor[3]\n", "U+0663 ARABIC-INDIC DIGIT THREE"),
        (NET + "let a = \uff10.1\n", "U+FF10 FULLWIDTH DIGIT ZERO"),
        (NET + "let \u0430 = 1\n", "U+0430 CYRILLIC SMALL LETTER A"),
    ],
    ids=["arabic-indic", "in-a-type", "full-width", "cyrillic-name"],
)
def test_numbers_and_names_are_ascii(tmp_path, text, char):
    result = run("check", str(write(tmp_path, text)))
    assert_spec_error(result, contains="unexpected character")
    assert char in result.stderr


@pytest.mark.parametrize(
    ("value", "message", "hint"),
    [
        ("1e999", "the override gives '1e999'", "too large for a float; write inf"),
        ("-inf", "a ball's radius must be non-negative, got -inf", None),
        ("\u0661", "the override gives '\u0661'", "ASCII digits"),
        ("1_0", "the override gives '1_0'", None),
        ("nan", "the override gives 'nan'", None),
        ("infinity", "the override gives 'infinity'", None),
    ],
)
def test_param_overrides_are_read_as_written(tmp_path, value, message, hint):
    text = NET + "param eps : Real = 0.1\nproperty p(x) = forall z in ball(x, eps): f(z)[0] > 0\n"
    result = run("check", str(write(tmp_path, text)), "-p", f"eps={value}")
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    if hint:
        assert hint in result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("raw", "shown"),
    [("\x00", "\\x00"), ("\x1b", "\\x1b"), ("\u202e", "\\u202e"), ("\u200b", "\\u200b")],
    ids=["nul", "escape", "bidi-override", "zero-width-space"],
)
def test_hidden_characters_are_errors_and_never_echoed_raw(tmp_path, raw, shown):
    text = NET + f"property p(x) = f(x)[0] > 0  # note {raw}here\n"
    result = run("check", str(write(tmp_path, text)))
    m = assert_spec_error(result, line=2, contains="is not allowed in a spec")
    assert int(m["col"]) == text.split("\n")[1].index(raw) + 1
    assert raw not in result.output
    assert shown in result.stderr  # the source line quoted with the character escaped
    # the caret stays under the escaped character
    quoted, carets = result.stderr.split("\n")[1:3]
    assert quoted[carets.index("^") :].startswith(shown)


def test_a_file_name_with_control_characters_is_not_echoed_raw(tmp_path):
    path = write(tmp_path, NET + "let a = b\n", name="e\x1b[31mvil.prop")
    result = run("check", str(path))
    assert result.exit_code == 1
    assert "\x1b" not in result.output and "e\\x1b[31mvil.prop:2:9: error:" in result.stderr


def test_an_unknown_string_escape_is_an_error_and_fmt_keeps_the_file(tmp_path):
    text = (
        DIGITS_NET + 'train f on tensors(path = "C:\\data\\x.npz") {\n  loss = cross_entropy\n}\n'
    )
    path = write(tmp_path, text)
    result = run("check", str(path))
    m = assert_spec_error(result, line=2, contains="unknown escape '\\d' in a string")
    assert int(m["col"]) == text.split("\n")[1].index("\\d") + 1
    assert "write paths with '/'" in result.stderr
    assert run("fmt", str(path)).exit_code == 1
    assert path.read_text(encoding="utf-8") == text  # not rewritten without its backslashes


def test_fmt_keeps_every_accepted_escape(tmp_path):
    value = 'C:\\\\data\\\\x.npz \\"q\\" tab\\tnl\\n'
    text = DIGITS_NET + f'\ntrain f on tensors(path = "{value}") {{\n  loss = cross_entropy\n}}\n'
    path = write(tmp_path, text)
    assert run("fmt", "--check", str(path)).exit_code == 0, run("fmt", str(path)).output
    (block,) = [d for d in parse(text).decls if isinstance(d, A.Block)]
    assert block.source.keywords[0].value.value == 'C:\\data\\x.npz "q" tab\tnl\n'
