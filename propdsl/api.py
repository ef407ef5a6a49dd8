"""The library facade: `load` a spec, inspect it, and (with torch) compile it."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from propdsl import ir as I
from propdsl.check import BlockInfo, Checked, Scope, build_prelude, check
from propdsl.errors import UsageError
from propdsl.source import MAX_SOURCE_BYTES, Source, Span, printable
from propdsl.syntax import format_module, parse
from propdsl.types import Ty


@lru_cache(maxsize=1)
def prelude_text() -> str:
    return resources.files("propdsl").joinpath("prelude.prop").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _prelude_scope() -> Scope:
    source = Source(prelude_text(), "<prelude>")
    return build_prelude(parse(source.text, source.name), source)


@dataclass(frozen=True)
class Quantified:
    """A quantified variable of a property, with its type and domain (typed IR)."""

    name: str
    kind: str
    type: Ty
    domain: I.Domain


@dataclass(frozen=True)
class Property:
    """A closed property of one data sample: `params` are bound to (x) or (x, y); or of a pair,
    `(x, y, xt, yt)`, whose partner `(xt, yt)` is drawn as `partner` says
    (`propdsl.partners.draw`)."""

    name: str
    params: tuple[tuple[str, Ty], ...]
    network: str | None
    body: I.Node
    formula: I.Node
    span: Span | None = field(default=None, compare=False)
    partner: Any = None  # an OptionValue (other_class, class_mean, prototype) or None

    @property
    def paired(self) -> bool:
        return self.partner is not None

    @property
    def quantified(self) -> list[Quantified]:
        out = []
        for node in I.walk(self.formula):
            if isinstance(node, I.Quant):
                for v, d in zip(node.vars, node.domains, strict=True):
                    out.append(Quantified(v.name, node.kind, v.type, d))
        return out

    @property
    def linear_forms(self) -> list[I.LinearForm]:
        return [f for n in I.walk(self.formula) if isinstance(n, I.Linear) for f in n.forms]

    def describe(self) -> str:
        """The normalised formula in mathematical notation."""
        from propdsl.pretty import show

        return show(self.formula)


class Spec:
    """A checked spec. Create one with `propdsl.load`.

    >>> import propdsl
    >>> spec = propdsl.load('''
    ... network f : Tensor[2] -> Tensor[3]
    ... param eps : Real = 0.1
    ... property robust(x, y) = forall x' in ball(x, eps, inf): argmax(f(x')) == y
    ... ''')
    >>> spec.params["eps"], list(spec.properties)
    (0.1, ['robust'])
    """

    def __init__(self, source: Source, overrides: dict[str, Any] | None = None):
        self.source = source
        self.overrides = dict(overrides or {})
        self.module = parse(source.text, source.name)
        self.checked: Checked = check(self.module, source, self.overrides, _prelude_scope())

    # -- contents --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.source.name

    @property
    def params(self) -> dict[str, Any]:
        return {k: v for k, (_, v) in self.checked.params.items()}

    @property
    def param_types(self) -> dict[str, Ty]:
        return {k: t for k, (t, _) in self.checked.params.items()}

    @property
    def networks(self) -> dict[str, Any]:
        return dict(self.checked.networks)

    @cached_property
    def properties(self) -> dict[str, Property]:
        from propdsl.simplify import simplify

        out = {}
        for name, info in self.checked.properties.items():
            formula = simplify(info.body, self.checked.params)
            out[name] = Property(
                name, info.params, info.network, info.body, formula, info.span, info.partner
            )
        return out

    @property
    def blocks(self) -> tuple[BlockInfo, ...]:
        return self.checked.blocks

    @property
    def train_block(self) -> BlockInfo | None:
        return next((b for b in self.blocks if b.kind == "train"), None)

    @property
    def verify_block(self) -> BlockInfo | None:
        return next((b for b in self.blocks if b.kind == "verify"), None)

    def property(self, name: str) -> Property:
        """The property called `name`; a clear error lists the known ones."""
        if name not in self.properties:
            from propdsl.source import suggest

            known = ", ".join(self.properties) or "none"
            hint = suggest(name, list(self.properties))
            extra = f" (did you mean '{hint}'?)" if hint else ""
            raise UsageError(f"unknown property '{name}'{extra}; known properties: {known}")
        return self.properties[name]

    # -- compilation (torch) ----------------------------------------------------------------------
    def default_logic(self) -> Any:
        block = self.train_block
        return block.get("logic", "dl2") if block is not None else "dl2"

    def default_attack(self) -> Any:
        block = self.train_block
        return block.get("attack") if block is not None else None

    def term_attacks(self) -> dict[str, Any]:
        """The train block's per-term attacks (`attacks = terms(name = attack, ...)`): term
        name -> `PGD` / `APGD` options; empty without the setting."""
        from propdsl.attacks import resolve_attack

        block = self.train_block
        value = block.get("attacks") if block is not None else None
        if value is None:
            return {}
        return {name: resolve_attack(a) for name, a in value.kwargs}

    def adaptive_weight(self) -> Any:
        """The train block's adaptive weight (`adaptive = woods_psi(weight = "psi", ...)`) as a
        `propdsl.loss.schedules.WoodsPsi`, or None."""
        from propdsl.loss.schedules import WoodsPsi

        block = self.train_block
        value = block.get("adaptive") if block is not None else None
        return None if value is None else WoodsPsi(**value.kw())

    def loss(self, name: str, logic: Any = None, attack: Any = None, *, generator: Any = None):
        """The property `name` compiled into a loss module under a differentiable logic.

        Args:
            name: a property of the spec (of the sample's `x`, or `x` and `y`).
            logic: a logic name (`"dl2"`, `"godel"`, ...), a `propdsl.logics.Logic`, or None for
                the train block's logic (else DL2).
            attack: `propdsl.PGD(...)` / `propdsl.APGD(...)`, or None for the train block's
                attack (else PGD with 10 steps).
            generator: a `torch.Generator` for the attack's random starts.

        Returns:
            A `torch.nn.Module`; `module(model, x, y)` returns a `LossOutput` with per-sample
            `loss`, `satisfied` (exact truth at the attack's points) and `counterexample`.

        >>> import propdsl, torch
        >>> spec = propdsl.load(
        ...     "network f : Tensor[2] -> Tensor[2]\\n"
        ...     "property robust(x, y) = forall x' in ball(x, 0.1, inf): argmax(f(x')) == y")
        >>> loss = spec.loss("robust", logic="dl2")
        >>> out = loss(torch.nn.Linear(2, 2), torch.zeros(3, 2), torch.zeros(3).long())
        >>> out.loss.shape
        torch.Size([3])
        """
        from propdsl.loss.compile import PropertyLoss, resolve_attack, resolve_logic

        if name not in self.properties and not name.isidentifier():
            return self.formula(name).loss("formula", logic, attack, generator=generator)
        prop = self.property(name)
        return PropertyLoss(
            name,
            prop.formula,
            [p for p, _ in prop.params],
            list(self.networks),
            resolve_logic(logic if logic is not None else self.default_logic()),
            resolve_attack(attack if attack is not None else self.default_attack()),
            generator=generator,
        )

    def formula(self, text: str, params: str = "x, y") -> Spec:
        """This spec with one more property, `formula(x, y) = text`, checked in its context.

        Lets `spec.loss("forall x' in ball(x, eps, inf): f(x')[0] >= 0")` compile any closed
        formula over the sample; errors point into the formula's text.
        """
        lines = self.source.text.rstrip("\n").split("\n")
        text_src = self.source.text.rstrip("\n") + f"\nproperty formula({params}) =\n  {text}\n"
        offset = len(lines) + 2
        source = Source(text_src, f"{self.source.name} (formula at line {offset})")
        return Spec(source, self.overrides)

    def objective(self, logic: Any = None, attack: Any = None, *, generator: Any = None):
        """The train block's `loss` expression compiled: `objective(model, x, y)` -> scalar.

        The per-sample expression is averaged over the batch; `objective.last_terms` holds the
        batch mean of each top-level term of the last call (for logging).
        """
        from propdsl.loss.compile import Objective, bind_param, resolve_attack, resolve_logic
        from propdsl.pretty import show
        from propdsl.simplify import simplify

        block = self.train_block
        if block is None or block.get("loss") is None:
            raise UsageError("the spec has no train block with a 'loss' setting")
        loss = block.get("loss")
        adaptive = self.adaptive_weight()
        if adaptive is not None:  # its param stays a variable, set per step by the objective
            loss = bind_param(loss, adaptive.weight)
        expr = simplify(loss, self.checked.params)
        props = {n: p.formula for n, p in self.properties.items()}
        terms = [(show(t), t) for t in _additive_terms(expr)]
        return Objective(
            expr,
            props,
            list(self.networks),
            resolve_logic(logic if logic is not None else self.default_logic()),
            resolve_attack(attack if attack is not None else self.default_attack()),
            terms=terms if len(terms) > 1 else (),
            property_params={n: [q for q, _ in p.params] for n, p in self.properties.items()},
            term_attacks=self.term_attacks(),
            adaptive=adaptive,
            generator=generator,
        )

    def verify(
        self,
        model: Any,
        x: Any,
        y: Any = None,
        properties: list[str] | None = None,
        method: str = "crown",
        **options: Any,
    ) -> dict[str, Any]:
        """Verdicts per property and sample: `verified`, `falsified`, `unknown`, `unsupported`.

        A strong attack runs first (a counterexample makes the verdict `falsified`); the other
        samples are checked with bound propagation (`method`: "ibp", "crown_ibp", "crown",
        "alpha_crown").
        Options: `falsifier` (attack), `timeout` (seconds per sample), `alpha` (AlphaOptions),
        `chunk` (samples bounded per call, 32: memory, not verdicts), `complete` (True: the
        samples the bounds leave unknown go to the complete verifier, branch and bound,
        `timeout` seconds each, default 60; CPU only).
        `model` may be an imported network, `propdsl.load_onnx(path)`: its input shape and
        output count must be the spec network's (else a UsageError naming both).
        Returns {property: PropertyVerdicts} with `.status`, `.margin`, `.counterexamples`.
        """
        from propdsl.verify.run import verify

        return verify(self, model, x, y, properties, method=method, **options)

    def with_params(self, **params: Any) -> Spec:
        """The same spec with some parameters overridden."""
        return Spec(self.source, {**self.overrides, **params})

    def format(self) -> str:
        """The canonical text of the spec (comments kept)."""
        return format_module(self.module)

    def summary(self) -> str:
        from propdsl.summary import summary

        return summary(self)

    def __repr__(self) -> str:
        return f"<Spec {self.name}: {len(self.properties)} properties>"


def _additive_terms(node: I.Node) -> list[I.Node]:
    if isinstance(node, I.Arith) and node.op == "+":
        return _additive_terms(node.left) + _additive_terms(node.right)
    return [node]


def load(spec: str | os.PathLike[str], params: dict[str, Any] | None = None) -> Spec:
    """Parse and check a spec from a file path or from its text.

    Args:
        spec: a path to a `.prop` file, or the spec's text itself.
        params: overrides of the spec's `param` declarations, typed by their declarations
            (strings such as "0.05" are converted as on the command line).

    Raises:
        propdsl.ParseError, propdsl.CheckError: with `.diagnostics`, each positioned.

    >>> import propdsl
    >>> propdsl.load("network f : Tensor[2] -> Tensor[2]").networks["f"].show()
    'Tensor[2] -> Tensor[2]'
    """
    source = read_source(spec)
    return Spec(source, params)


def read_source(spec: str | os.PathLike[str]) -> Source:
    """The spec's text and name, from a path (a `str` ending in `.prop` or any `PathLike`) or
    from the text itself.

    Raises `UsageError` for a missing or unreadable file, one that is not a regular file (a
    directory, a FIFO, a device such as /dev/zero: refused before anything is read, since reading
    them may never end), one larger than `MAX_SOURCE_BYTES`, or one that is not UTF-8.
    """
    if isinstance(spec, os.PathLike) or (
        isinstance(spec, str) and "\n" not in spec and spec.strip().endswith(".prop")
    ):
        return Source(_read_spec_file(Path(spec)), str(spec))
    if not isinstance(spec, str):
        raise UsageError(f"expected a path or spec text, got {type(spec).__name__}")
    if (
        len(spec) > MAX_SOURCE_BYTES
        or len(spec.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES
    ):
        raise UsageError(f"the spec text is larger than {_size(MAX_SOURCE_BYTES)}")
    return Source(spec, "<spec>")


def _read_spec_file(path: Path) -> str:
    # Opened without blocking (a FIFO would wait for a writer) and checked on the open file, not
    # on the name, so that nothing can be swapped in between the check and the read.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    shown = printable(str(path))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UsageError(f"no such spec file: {shown}") from None
    except OSError as err:
        raise UsageError(f"cannot read spec file {shown}: {err.strerror or err}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise UsageError(f"cannot read spec file {shown}: it is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(
                f"cannot read spec file {shown}: not a regular file (a device, FIFO or socket)"
            )
        if info.st_size > MAX_SOURCE_BYTES:
            raise UsageError(
                f"spec file {shown} is {_size(info.st_size)}; "
                f"specs may be at most {_size(MAX_SOURCE_BYTES)}"
            )
        # At most one byte past the limit: a file that grows while it is read is caught too.
        with os.fdopen(fd, "rb", closefd=True) as f:
            fd = -1
            data = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as err:
        raise UsageError(f"cannot read spec file {shown}: {err.strerror or err}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_SOURCE_BYTES:
        raise UsageError(f"spec file {shown} is larger than {_size(MAX_SOURCE_BYTES)}")
    try:
        # utf-8-sig: a byte order mark, which some editors write, is no part of the text
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(
            f"cannot read spec file {shown}: it is not UTF-8 text (byte {err.start})"
        ) from None


def _size(n: int) -> str:
    if n < 1024**2:
        return f"{n / 1024:.0f} KiB"
    return f"{n / 1024**2:.1f} MiB" if n < 1024**3 else f"{n / 1024**3:.1f} GiB"


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`["eps=0.05", "L=2"]` -> `{"eps": "0.05", "L": "2"}`; values are typed by the checker."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise UsageError(f"--param expects name=value, got {item!r}")
        out[key] = value.strip()
    return out
