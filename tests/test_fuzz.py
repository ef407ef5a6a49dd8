"""Mutation fuzzing of the parser and checker: no user mistake may end in a Python exception.

Valid specs (the files in `specs/`, one-declaration excerpts of them, and a few inline specs that
reach the corners the files do not) are mutated by deleting, inserting, replacing, duplicating and
swapping tokens and characters. Every mutant must either load (and then print its summary and its
canonical text) or raise a `PropdslError` subclass. The random generators are seeded, so a failure
reproduces; the failure message shows the smallest failing mutant.
"""

from __future__ import annotations

import random
import re
import traceback
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import propdsl
from propdsl.errors import PropdslError

pytestmark = pytest.mark.fuzz

ROOT = Path(__file__).resolve().parents[1]
CHUNKS = 10
MUTANTS_PER_CHUNK = 1_000  # 10,000 in all

INLINE = [
    # lets, templates, exists / range, if-then-else, annotations, explainers with options
    """\
network f : Tensor[30] -> Tensor[2]
param eps : Real = 0.05
param k : Nat = 2
param strict : Bool = true
let region = box(0, 1)
let margin(v, y) = v[y] - max(v)
let lo = 0.5 * eps
property robust(x, y) = classification_robustness(f, x, y, eps)
property near(x, y) =
  forall z in ball(x, eps, 2) & region: exists j in range(2): f(z)[j] >= f(z)[y] - 1
property calm(x) =
  forall z : Tensor[30] in ball(x, lo, 1): norm(softmax(f(z)) - softmax(f(x)), 1) <= 0.5
property pick(x, y) = if strict then argmax(f(x)) == y else margin(f(x), y) > -1
property grads(x, y) =
  forall z in ball(x, eps, inf) & region:
    topk_overlap(integrated_gradients(f, z, y, steps = 8),
                 smoothgrad(f, x, y, noise = 0.1, samples = 4), k) >= 1
train f on breast_cancer(split = "train", seed = 1) {
  model = mlp(hidden = [8, 8], activation = softplus(beta = 5))
  epochs = 1
  batch = 16
  optimizer = sgd(lr = 0.1, momentum = 0.9, nesterov = true)
  schedule = step(step_size = 1, gamma = 0.5)
  logic = yager(p = 2)
  attack = apgd(steps = 5, restarts = 2, rho = 0.75)
  seed = 3
  device = cpu
  loss = cross_entropy + (max z in ball(x, eps, inf) & region: cross_entropy(f(z), y))
         + certified(robust, method = crown_ibp)
}
verify f on breast_cancer(split = "test", limit = 10) {
  properties = [robust, near, calm]
  method = alpha_crown
  attack = pgd(steps = 3)
  timeout = 2.5
  samples = 4
}
""",
    # two networks, a template over a network, grad, classes, implies / or / not, min
    """\
# inline tensors
network g : Tensor[1, 2, 2] -> Tensor[2]
network h : Tensor[3] -> Tensor[4]
let unit = box(-1, 1)
let sq(v) = v * v
let small(x) = mean(abs(g(x))) < 10
property tmpl(net, x, c) = forall z in ball(x, c, inf) & unit: argmax(net(z)) == 0
property g_ok(x : Tensor[1, 2, 2], y : Label[2]) = tmpl(g, x, 0.1) and small(x)
property h_ok(x) = forall i in range(4): sq(h(x)[i]) <= 100 or not (h(x)[i] < 0)
property h_lin(x) =
  forall a in ball(x, 0.1) & box(0, 1), b in ball(x, 0.2, 2):
    norm(h(a) - h(b), 2) <= 3 * norm(a - b, 2)
property g_grad(x, y) =
  forall z in ball(x, 0.1):
    norm(grad(g(z)[y], z), inf) <= 2
      implies cosine(saliency(g, z, y), gradient_x_input(g, x, y)) > 0.5
property g_margins(x, y) =
  forall j in range(2): j != y implies g(x)[y] - g(x)[j] >= (min z in ball(x, 0.1): -g(z)[j])
train g on tensors(path = "data.npz", split = "train") {
  model = user
  epochs = 2
  optimizer = adamw(lr = 0.01, weight_decay = 0.0001)
  logic = stl(k = 3)
  loss = 0.5 * cross_entropy + g_ok + mean(saliency(g, x, y) ^ 2)
}
""",
    # a tiny one: mutations of it reach the edges of the grammar quickly
    "network f : Tensor[2] -> Tensor[3]\nparam eps : Real = 1e-2\n"
    "property p(x, y) = forall z in ball(x, eps): argmax(f(z)) == y\n"
    'verify f on tensors(path = "d.npz") { properties = [p] }\n',
]

# -- mutation --------------------------------------------------------------------------------------
_TOKEN = re.compile(
    r"""\s+|\#[^\n]*|"(?:[^"\\\n]|\\.)*"|[A-Za-z_][A-Za-z0-9_]*'*|\d+\.\d*(?:[eE][+-]?\d+)?"""
    r"""|\d+(?:[eE][+-]?\d+)?|\.\d+|<=|>=|==|!=|->|.""",
    re.S,
)
_VOCABULARY = (
    "network param let property train verify on forall exists in if then else and or not "
    "implies inf true false max min ( ) [ ] { } , : = == != < <= > >= + - * / ^ & -> "
    "x y x' f g eps 0 1 2 -1 0.5 1e-3 1e400 10 3 Real Bool Nat Index Label Tensor ball box "
    "range classes norm argmax softmax saliency grad cross_entropy clamp sum mean abs cosine "
    "kl integrated_gradients smoothgrad topk_overlap certified model epochs batch optimizer "
    'logic attack loss properties method digits "train" "x" adam dl2 pgd crown ; ! | \' " $'
).split() + ["\n", "\n  ", "# c\n", '"', "\t"]
_CHARACTERS = "()[]{},:=<>+-*/^&!|#\"'. \n\tabcxyfz0123456789eE_λ∀\r\x00\\"


_ATOM = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*'*|\d[\d.eE+-]*)$")
_KEYWORDS = frozenset(
    "network param let property train verify on forall exists in if then else and or not "
    "implies inf true false max min".split()
)
_ATOMS = [
    *(t for t in _VOCABULARY if _ATOM.match(t) and t not in _KEYWORDS),
    *"relu softplus sigmoid tanh exp log sqrt dot pearson mse argmin gradient_x_input".split(),
    *"0 2.5 -0 1e308 7 64 1000 classes range dl2 godel yager crown ibp cpu user mlp".split(),
]


def mutate(text: str, rng: random.Random) -> str:
    """One to three random edits: of tokens, of characters, or of names and numbers only (these
    mostly keep the syntax and so reach the checker)."""
    tokens = _TOKEN.findall(text)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(10)
        if op >= 8:
            atoms = [i for i, t in enumerate(tokens) if _ATOM.match(t) and t not in _KEYWORDS]
            if not atoms:
                break
            i = rng.choice(atoms)
            tokens[i] = tokens[rng.choice(atoms)] if op == 8 else rng.choice(_ATOMS)
        elif op < 5:
            solid = [i for i, t in enumerate(tokens) if not t.isspace()]
            if not solid:
                break
            i = rng.choice(solid)
            if op == 0:
                del tokens[i]
            elif op == 1:
                tokens.insert(i, rng.choice(_VOCABULARY) + rng.choice(("", " ")))
            elif op == 2:
                tokens[i] = rng.choice(_VOCABULARY)
            elif op == 3:
                j = rng.choice(solid)
                tokens[i], tokens[j] = tokens[j], tokens[i]
            else:
                tokens.insert(i, tokens[rng.choice(solid)])
        else:
            s = "".join(tokens)
            if not s:
                break
            p = rng.randrange(len(s))
            if op == 5:
                s = s[:p] + s[p + 1 :]
            elif op == 6:
                s = s[:p] + rng.choice(_CHARACTERS) + s[p:]
            else:
                s = s[:p] + s[p + 1 : p + 2] + s[p : p + 1] + s[p + 2 :]
            tokens = _TOKEN.findall(s)
    return "".join(tokens)


_DECL = re.compile(r"^(network|param|let|property|train|verify)\b", re.MULTILINE)


def excerpts(text: str) -> list[str]:
    """Small valid specs cut from `text`: its networks, params and lets, then one property or
    block with the properties it names (mutants of small specs are fast to check)."""
    starts = [m.start() for m in _DECL.finditer(text)]
    decls = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    preamble = [d for d in decls if d.startswith(("network", "param", "let"))]
    props = {d.split()[1].split("(")[0]: d for d in decls if d.startswith("property")}
    out = []
    for d in decls:
        if d.startswith(("property", "train", "verify")):
            needed = {d}
            while True:  # the properties it names, and theirs
                more = {
                    p for n, p in props.items() if any(re.search(rf"\b{n}\b", q) for q in needed)
                }
                if more <= needed:
                    break
                needed |= more
            out.append("".join([*preamble, *(q for q in decls if q in needed)]))
    return out


@cache
def corpus() -> tuple[str, ...]:
    files = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "specs").glob("*.prop"))]
    texts = [*files, *INLINE]
    texts += [e for t in texts for e in excerpts(t)]
    return tuple(texts)


def _attempt(text: str) -> str | None:
    """None when `text` raises a PropdslError, or loads, prints, and its canonical text loads back
    to the same spec; else what went wrong."""
    try:
        spec = propdsl.load(text)
        spec.summary()
        formatted = spec.format()
    except PropdslError as err:
        str(err)
        return None
    except Exception:  # noqa: BLE001 - anything else is the bug this test looks for
        return traceback.format_exc()
    try:
        again = propdsl.load(formatted)
    except Exception:  # noqa: BLE001
        return f"its canonical text does not load:\n{formatted}\n{traceback.format_exc()}"
    if again.module != spec.module:
        return f"its canonical text means something else:\n{formatted}"
    return None


# -- tests ----------------------------------------------------------------------------------------
def test_corpus_is_valid() -> None:
    """The mutants start from specs that load: their excerpts too."""
    texts = corpus()
    assert len(texts) >= 20
    for text in texts:
        propdsl.load(text)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_mutants_load_or_raise_spec_errors(chunk: int) -> None:
    rng = random.Random(1000 + chunk)
    texts = corpus()
    failures: list[tuple[str, str]] = []
    for _ in range(MUTANTS_PER_CHUNK):
        mutant = mutate(rng.choice(texts), rng)
        problem = _attempt(mutant)
        if problem is not None:
            failures.append((mutant, problem))
    if failures:
        mutant, problem = min(failures, key=lambda f: len(f[0]))
        pytest.fail(
            f"{len(failures)} of {MUTANTS_PER_CHUNK} mutants failed (a non-propdsl exception, or "
            f"a canonical text that does not load back); the smallest:\n{mutant}\n{problem}"
        )


_PRINTABLE = st.text(
    alphabet=st.characters(min_codepoint=9, max_codepoint=0x2200, exclude_categories=("Cs",)),
    max_size=200,
)
_PIECES = st.lists(
    st.sampled_from(
        [*_VOCABULARY, "network f : Tensor[2] -> Tensor[3]\n", "property p(x, y) = ", "\n"]
    ),
    max_size=40,
).map(" ".join)
_FUZZ_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@_FUZZ_SETTINGS
@given(text=_PRINTABLE)
def test_random_text(text: str) -> None:
    # a one-line text ending in ".prop" would be read as a file name
    problem = _attempt(text + "\n")
    assert problem is None, problem


@_FUZZ_SETTINGS
@given(text=_PIECES)
def test_random_token_soup(text: str) -> None:
    problem = _attempt(text + "\n")
    assert problem is None, problem


@pytest.mark.parametrize(
    "text",
    [
        "param a : Real = " + "(" * 5000 + "1" + ")" * 5000,
        "param a : Real = " + "-" * 5000 + "1",
        "param a : Real = 1" + " + 1" * 5000,
        "network f : Tensor[2] -> Tensor[3]\nproperty p(x) = " + "not " * 5000 + "true",
        "network f : Tensor[2] -> Tensor[3]\nproperty p(x) = " + "abs(" * 3000 + "f(x)[0]",
        "param a : Real = " + "9" * 5000,
        "param a : Real = 10^10^10",
        "param a : Nat = 2^100000",
        "let s = " + "[" * 3000,
    ],
    ids=["parens", "negations", "sum", "nots", "calls", "digits", "tower", "power", "brackets"],
)
def test_extreme_inputs(text: str) -> None:
    """Deep nesting and huge numbers: an error message, not a RecursionError or a hang."""
    problem = _attempt(text + "\n")
    assert problem is None, problem
