"""Properties as losses: the loss side of the interpreter (`propdsl.interpret`).

`Compiler` extends the `Interpreter` (which compiles IR once into batched closures, shares
equal sub-expressions and vectorises finite quantifiers) with what only a loss needs:

* quantifiers over balls and boxes, solved by an attack (`propdsl.attacks`: PGD / APGD) that
  maximises the body's signed violation (logic `violation`: raw margins, so it keeps gradients
  where the property holds); the chosen logic then evaluates the body at the attack's points,
  and the exact (`boolean`) pass that reports `satisfied` reuses the same points and network
  outputs;
* property terms (a property named in a train block's loss) and `certified(p)` terms
  (`propdsl.loss.certified`, which bounds the property through the verifier);
* the public modules `PropertyLoss` (`spec.loss`) and `Objective` (`spec.objective`).

See docs/losses.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from propdsl import ir as I
from propdsl.attacks import APGD, PGD, Attack, option_parts, resolve_attack, run_attack
from propdsl.errors import UsageError
from propdsl.interpret import (
    BOOLEAN,
    Code,
    CompileError,
    EmptyRegionWarning,
    Env,
    EvalConfig,
    Interpreter,
    Lambda,
    as_batch,
    column,
    env_device,
    env_dtype,
    env_tensors,
    lookup,
    rebind,
    warn_empty,
)
from propdsl.logics import Logic, get_logic
from propdsl.loss.schedules import WoodsPsi
from propdsl.simplify import _rebuild as rebuild  # the simplifier's one-level IR map
from propdsl.tracing import Traceable
from propdsl.types import BOOL, REAL, IndexTy, TensorTy, Ty

__all__ = [
    "APGD",
    "PGD",
    "CompileConfig",
    "CompileError",
    "Compiler",
    "EmptyRegionWarning",
    "Env",
    "LossOutput",
    "Objective",
    "PropertyLoss",
    "resolve_attack",
    "resolve_logic",
]

VIOLATION = get_logic("violation")


@dataclass(frozen=True, kw_only=True)
class CompileConfig(EvalConfig):
    """An evaluation's settings (`EvalConfig`: generator, radius scale) and the attack that
    solves the quantifiers over regions."""

    attack: Attack = PGD()


def _attack(env: Env) -> Attack:
    config = env.config
    return config.attack if isinstance(config, CompileConfig) else PGD()


class Compiler(Interpreter):
    """The interpreter of losses: IR -> closures under a differentiable logic, with attacks.

    `properties` are the formulas that `PropTerm`s (a property named in a train block's loss)
    refer to; `property_params` their parameter names, bound to the objective's `x` and `y`.
    """

    target: ClassVar[str] = "a loss"
    kind: ClassVar[str] = "loss"

    def __init__(
        self,
        properties: Mapping[str, I.Node] | None = None,
        *,
        property_params: Mapping[str, Sequence[str]] | None = None,
        term_attacks: Mapping[str, Attack] | None = None,
        attack: Attack | None = None,
    ):
        super().__init__()
        self.properties = dict(properties or {})
        self.property_params = {k: tuple(v) for k, v in (property_params or {}).items()}
        self.prop_codes: dict[str, Code] = {}
        # Per-term attacks (a train block's `attacks = terms(...)`): by property name, or by a
        # variable bound by a quantifier over a region of the loss itself. `attack` overrides
        # the evaluation's attack for every quantifier this compiler builds (None: keep it).
        self.term_attacks = dict(term_attacks or {})
        self.attack = attack
        self._bodies: Compiler | None = None

    def _body_compiler(self, name: str) -> Compiler:
        """The compiler of property `name`'s body: its own attack where the loss gives it one;
        without per-term attacks, this compiler (one memo, shared sub-expressions)."""
        if not self.term_attacks:
            return self
        if name in self.term_attacks:
            return Compiler(
                self.properties,
                property_params=self.property_params,
                attack=self.term_attacks[name],
            )
        # The loss's variable names must not reach inside a property (its `x'` is its own).
        if self._bodies is None:
            self._bodies = Compiler(
                self.properties, property_params=self.property_params, attack=self.attack
            )
        return self._bodies

    def logical(self, node: I.Node) -> bool:
        """Formulas, and numbers that contain a property's loss, depend on the logic."""
        if node.ty == BOOL:
            return True
        return any(
            isinstance(n, I.PropTerm) or (isinstance(n, I.Fn) and n.fn == "certified")
            for n in I.walk(node)
        )

    def _PropTerm(self, node: I.PropTerm, free):
        if node.name not in self.properties:
            raise CompileError(f"unknown property '{node.name}'")
        if node.name not in self.prop_codes:
            compiler = self._body_compiler(node.name)
            self.prop_codes[node.name] = compiler(self.properties[node.name])
        body = self.prop_codes[node.name]
        params = self.property_params.get(node.name, ())
        data = ("x", "y")[: len(params)]
        if len(params) == 4:
            # a property of a pair: its partner is bound by the objective under these names
            data = ("x", "y", *partner_names(node.name))
        if params == data:
            return Lambda(node, free | body.free, lambda env: env.logic.loss(body(env)))
        # `property p(img, label)` in a loss: bind its parameters to the sample's x and y.
        # (Binding in an env, not renaming the IR, so that a quantified `x` inside stays itself.)
        outer = frozenset(data)

        def run(env: Env) -> Tensor:
            values = {p: lookup(env, d) for p, d in zip(params, data, strict=True)}
            return env.logic.loss(body(env.child(values)))

        return Lambda(node, free | outer, run)

    # -- random draws (Woods et al.'s random logit) ----------------------------------------------
    # A draw reads no variable (`free` is empty, whatever the argument), so `Code` lifts it to the
    # root env and caches it there: one draw per sample and evaluation, the same inside `grad`'s
    # re-evaluation and under every logic variant of the evaluation.
    def _fn_uniform(self, node: I.Fn, free):
        def run(env: Env) -> Tensor:
            device = env_device(env)
            gen = env.config.generator
            if gen is not None and gen.device != device:
                gen = None  # a generator on another device cannot draw here
            return torch.rand(env.batch, generator=gen, dtype=env_dtype(env), device=device)

        return Lambda(node, frozenset(), run)

    def _fn_random_class(self, node: I.Fn, free):
        assert isinstance(node.ty, IndexTy)
        k = node.ty.k

        def run(env: Env) -> Tensor:
            device = env_device(env)
            gen = env.config.generator
            if gen is not None and gen.device != device:
                gen = None
            return torch.randint(0, k, (env.batch,), generator=gen, device=device)

        return Lambda(node, frozenset(), run)

    def _fn_certified(self, node: I.Fn, free):
        try:
            from propdsl.loss.certified import compile_certified
        except ModuleNotFoundError as err:
            if err.name != "propdsl.loss.certified":
                raise
            raise CompileError("certified training is not available in this build") from None
        return Lambda(node, free, compile_certified(node, self))

    def _continuous(self, node: I.Quant, free):
        body = self(node.body)
        domains = [self.domain(d) for d in node.domains]
        names = tuple(v.name for v in node.vars)
        negate = node.kind in ("exists", "min")  # the attack maximises
        own = [self.term_attacks[n] for n in names if n in self.term_attacks]
        if len(set(own)) > 1:
            raise CompileError(
                f"the variables {', '.join(names)} move together in one attack; give them one"
            )
        fixed = own[0] if own else self.attack

        def run(env: Env) -> Tensor:
            record = env.recall(id(run))
            if record is None:
                regions = [d(env) for d in domains]
                # The attack's own chain: the `violation` logic, numbers computed afresh (the
                # models run in eval mode during the attack), nothing remembered.
                violation_env = env.with_logic(VIOLATION, share=False)

                def tiled(copies: int = 1):
                    # `copies` restarts per sample, stacked sample-major: the env's values
                    # (the data, f(x)) are computed once and repeated, as for a vectorised
                    # finite quantifier.
                    def objective(*pts: Tensor) -> Tensor:
                        points = dict(zip(names, pts, strict=True))
                        value = body(violation_env.child(points, factor=copies))
                        return -value if negate else value

                    return objective

                models = list(env.models.values())
                result = run_attack(
                    fixed if fixed is not None else _attack(env),
                    tiled(),
                    regions,
                    models=models,
                    generator=env.config.generator,
                    tiled=tiled,
                    traceable=Traceable(run, lambda: env_tensors(violation_env), models),
                )
                empty = result.empty
                if empty is not None and not bool(empty.any()):
                    empty = None
                if empty is not None:
                    warn_empty(names, node.kind)
                sub = env.child(dict(zip(names, result.points, strict=True)))
                env.keep(id(run), (sub, empty))
                if env.remember:
                    env.found.append((env.logic, names, result.points, empty))
            else:
                sub, empty = record
                if sub.parent is not env:
                    sub = rebind(sub, env)
            value = body(sub)
            if empty is None:
                return value
            # Over an empty region the quantifier is vacuous: `forall` is true, `exists` false,
            # `max` -inf and `min` +inf (the bounds of an empty set), whatever the placeholder
            # point gives; `where` passes no gradient to the placeholder's value.
            if node.kind in ("forall", "exists"):
                fill = env.logic.constant(node.kind == "forall", value)
            else:
                fill = torch.full_like(value, -math.inf if node.kind == "max" else math.inf)
            return torch.where(column(empty, value), fill, value)

        return Lambda(node, free, run)


# -- public modules ------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossOutput:
    """Per-sample results of a property loss on a batch.

    Attributes:
        loss: Tensor[B], >= 0, 0 where the logic says the property holds at the attack's points.
        satisfied: BoolTensor[B], the exact truth of the body at the attack's points.
        value: Tensor[B], the logic's value (truth degree or DL2 loss) of the property.
        counterexample: the attack's points per quantified variable (name -> Tensor[B, ...]),
            empty when the property has no quantifier over a region. NaN rows where the
            variable's region is empty (there is no point to report).
        empty: per quantified variable (the keys of `counterexample`), BoolTensor[B]: its region
            is empty for the sample, and its quantifier took the vacuous value there (`forall`
            true, `exists` false).
        all_empty: BoolTensor[B]: every quantifier over a region that the property evaluated for
            the sample ranged over an empty region, so `satisfied` is exact there: no attack
            point entered it. False where the property has no quantifier over a region, or one
            under a finite quantifier (K regions per sample).
    """

    loss: Tensor
    satisfied: Tensor
    value: Tensor
    counterexample: dict[str, Tensor]
    empty: dict[str, Tensor] = field(default_factory=dict)
    all_empty: Tensor | None = None


def partner_names(prop: str) -> tuple[str, str]:
    """The names an objective binds the partner of property `prop` to (not valid spec names,
    so they never meet a spec's own)."""
    return (f"{prop}.xt", f"{prop}.yt")


def resolve_logic(logic: str | Logic | Any) -> Logic:
    """A logic from a `Logic`, a name, or a checked option value such as `yager(p = 3)`."""
    if isinstance(logic, Logic):
        return logic
    name, kwargs = option_parts(logic)
    return get_logic(name, **kwargs)


def _models(model: nn.Module | Mapping[str, nn.Module], networks: Sequence[str]):
    if isinstance(model, nn.Module):
        if len(networks) > 1:
            raise UsageError(
                f"the spec has {len(networks)} networks ({', '.join(networks)}): "
                "pass a dict of models by name"
            )
        return {n: model for n in networks} or {"f": model}
    missing = [n for n in networks if n not in model]
    if missing:
        raise UsageError(f"no model given for network(s): {', '.join(missing)}")
    return dict(model)


class PropertyLoss(nn.Module):
    """A compiled property: `forward(model, x, y)` -> `LossOutput` (per-sample, batched)."""

    def __init__(
        self,
        name: str,
        formula: I.Node,
        params: Sequence[str],
        networks: Sequence[str],
        logic: Logic,
        attack: Attack,
        *,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.name = name
        self.formula = formula
        self.params = tuple(params)
        self.networks = tuple(networks)
        self.logic = logic
        self.attack = attack
        self.generator = generator
        self.radius_scale = 1.0
        self.code = Compiler()(formula)
        self.quantified = [
            v.name
            for n in I.walk(formula)
            if isinstance(n, I.Quant) and n.kind in ("forall", "exists")
            for v, d in zip(n.vars, n.domains, strict=True)
            if not isinstance(d, I.Range)
        ]

    def env(
        self,
        model,
        x: Tensor,
        y: Tensor | None,
        logic: Logic,
        partner: tuple[Tensor, Tensor] | None = None,
    ) -> Env:
        values: dict[str, Tensor] = {}
        for i, p in enumerate(self.params):
            if i == 0:
                values[p] = x
            elif i == 1:
                if y is None:
                    raise UsageError(f"property '{self.name}' needs labels y")
                values[p] = y
        if len(self.params) == 4:
            if partner is None:
                raise UsageError(
                    f"property '{self.name}' is a property of a pair: pass its partner "
                    "samples, partner=(xt, yt) (propdsl.partners.draw draws them)"
                )
            xt, yt = partner
            if xt.shape != x.shape or yt.shape[:1] != x.shape[:1]:
                raise UsageError(
                    f"property '{self.name}': the partner batch {tuple(xt.shape)} does not "
                    f"match the samples {tuple(x.shape)}"
                )
            values[self.params[2]], values[self.params[3]] = xt, yt
        config = CompileConfig(
            attack=self.attack, generator=self.generator, radius_scale=self.radius_scale
        )
        return Env(_models(model, self.networks), values, x.shape[0], logic, config)

    def forward(
        self,
        model,
        x: Tensor,
        y: Tensor | None = None,
        partner: tuple[Tensor, Tensor] | None = None,
    ) -> LossOutput:
        env = self.env(model, x, y, self.logic, partner)
        value = as_batch(self.code(env), env)
        points: dict[str, Tensor] = {}
        empty: dict[str, Tensor] = {}
        batch = x.shape[0]
        records = [r for r in env.found if r[0] is self.logic]  # the points the loss was at
        # Every sample's regions were all empty only where every quantifier found its region
        # empty (a quantifier that met none, or K regions per sample, rules all samples out).
        tracked = bool(records) and all(r[3] is not None for r in records)
        all_empty = torch.full((batch,), tracked, dtype=torch.bool, device=x.device)
        for _, names, pts, none_in in records:
            if tracked and none_in is not None:
                if none_in.shape[0] == batch:
                    all_empty = all_empty & none_in
                else:  # K regions per sample (under a finite quantifier): not tracked per sample
                    all_empty = torch.zeros_like(all_empty)
                    tracked = False
            mask = none_in
            if mask is None:
                mask = torch.zeros(pts[0].shape[0], dtype=torch.bool, device=pts[0].device)
            for name, p in zip(names, pts, strict=True):
                if name in points:
                    continue
                # No point to report where the region is empty: the placeholder is not in it.
                points[name] = p if none_in is None else p.masked_fill(column(mask, p), math.nan)
                empty[name] = mask
        with torch.no_grad():
            # The exact truth at the same points, reusing the numbers of the loss pass.
            exact = env.with_logic(BOOLEAN)
            satisfied = as_batch(self.code(exact), exact).bool()
        return LossOutput(self.logic.loss(value), satisfied, value, points, empty, all_empty)


class Objective(nn.Module):
    """The train block's `loss` expression: `forward(model, x, y)` -> scalar (batch mean).

    `last_terms` holds the batch mean of each top-level additive term of the last call (floats);
    `last_term_values` the same means as detached tensors on the batch's device, which a
    training loop can accumulate without a host sync per batch.
    """

    def __init__(
        self,
        expr: I.Node,
        properties: Mapping[str, I.Node],
        networks: Sequence[str],
        logic: Logic,
        attack: Attack,
        *,
        terms: Sequence[tuple[str, I.Node]] = (),
        property_params: Mapping[str, Sequence[str]] | None = None,
        term_attacks: Mapping[str, Attack] | None = None,
        adaptive: WoodsPsi | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.expr = expr
        self.networks = tuple(networks)
        self.logic = logic
        self.attack = attack
        self.term_attacks = dict(term_attacks or {})
        self.generator = generator
        compiler = Compiler(
            properties, property_params=property_params, term_attacks=self.term_attacks
        )
        self.code = compiler(expr)
        # the properties of a pair the loss names: their partners are bound per batch
        self.paired = tuple(
            dict.fromkeys(
                n.name
                for n in I.walk(expr)
                if isinstance(n, I.PropTerm) and len(compiler.property_params.get(n.name, ())) == 4
            )
        )
        self.term_codes = [(label, compiler(node)) for label, node in terms]
        # A loss that is `cross_entropy(f(x), y)` alone (standard training) is PyTorch's
        # cross-entropy with its mean reduction, taken without building an environment: the
        # same batch mean, one op and one backward node fewer every step.
        self._ce_net: str | None = None
        if (
            isinstance(expr, I.Fn)
            and expr.fn == "cross_entropy"
            and len(expr.args) == 2
            and not expr.options
            and not terms
            and adaptive is None
        ):
            logits, label = expr.args
            if (
                isinstance(logits, I.Apply)
                and isinstance(logits.arg, I.Var)
                and logits.arg.name == "x"
                and isinstance(label, I.Var)
                and label.name == "y"
            ):
                self._ce_net = logits.net
        self.last_term_values: dict[str, Tensor] = {}
        self.radius_scale = 1.0
        # An adaptive weight: the loss reads its param as the variable of that name (bound per
        # call), updated by `step_adaptive` from the batch's cross-entropy (the same Code as
        # the loss's `cross_entropy` term when it has one: hash-consed, computed once).
        self.adaptive = adaptive
        self._r: Tensor | float = 0.0  # R, on the batch's device once training runs (float64)
        self._ce: Tensor | None = None  # the last batch's cross-entropy, detached
        self._ce_code: Code | None = None
        if adaptive is not None:
            net = self.networks[0]
            x = I.Var("x", _input_type(expr))
            logits = I.Apply(net, x, _output_type(expr, net))
            label = I.Var("y", IndexTy(cast(TensorTy, logits.type).shape[0], True))
            self._ce_code = compiler(I.Fn("cross_entropy", (logits, label), REAL))

    @property
    def adaptive_r(self) -> float:
        """Woods et al.'s accumulator R (a host sync on an accelerator: read it per epoch)."""
        return float(self._r)

    @adaptive_r.setter
    def adaptive_r(self, value: float) -> None:
        self._r = float(value)

    @property
    def last_cross_entropy(self) -> float | None:
        return None if self._ce is None else float(self._ce)

    def adaptive_weight(self) -> float | None:
        """The adaptive param's value for the next step (None without one)."""
        return None if self.adaptive is None else self.adaptive.value(self.adaptive_r)

    def step_adaptive(self) -> None:
        """After an optimiser step: advance the adaptive weight with the last batch's CE, on the
        device (`WoodsPsi.advance` in tensor operations: no host sync per step)."""
        a = self.adaptive
        if a is None or self._ce is None:
            return
        ce = self._ce.to(torch.float64)
        r = torch.as_tensor(self._r, dtype=torch.float64, device=ce.device)
        # -log(ce / target) is +inf at ce = 0, clipped to `up` as `advance` does
        change = (-torch.log(ce / a.target)).clamp(-a.down, a.up)
        object.__setattr__(self, "_r", (r + change).clamp_min(0.0))

    @property
    def last_terms(self) -> dict[str, float]:
        # Converted on demand: each conversion is a host sync on an accelerator.
        return {label: float(v) for label, v in self.last_term_values.items()}

    def forward(
        self,
        model,
        x: Tensor,
        y: Tensor,
        partners: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    ) -> Tensor:
        """The batch mean of the loss; `partners` maps each property of a pair named in the
        loss (`paired`) to its partners `(xt, yt)` for this batch."""
        if self._ce_net is not None:
            # The builtin's own call (reduction aside): shapes that do not fit fail here as they
            # would there, and the network runs once either way.
            if self.last_term_values:
                object.__setattr__(self, "last_term_values", {})
            return F.cross_entropy(_models(model, self.networks)[self._ce_net](x), y.long())
        config = CompileConfig(
            attack=self.attack, generator=self.generator, radius_scale=self.radius_scale
        )
        values = {"x": x, "y": y}
        if self.adaptive is not None:
            a = self.adaptive
            r = torch.as_tensor(self._r, dtype=torch.float64, device=x.device)
            values[a.weight] = (a.base * torch.exp(a.rate * r)).to(x.dtype)
        for name in self.paired:
            if partners is None or name not in partners:
                raise UsageError(
                    f"the loss names '{name}', a property of a pair: pass partners="
                    f"{{'{name}': (xt, yt)}}"
                )
            values.update(zip(partner_names(name), partners[name], strict=True))
        env = Env(_models(model, self.networks), values, x.shape[0], self.logic, config)
        per_sample = as_batch(self.code(env), env)
        # Plain attributes, set without nn.Module.__setattr__'s checks (every training step).
        object.__setattr__(
            self,
            "last_term_values",
            {label: as_batch(code(env), env).detach().mean() for label, code in self.term_codes},
        )
        if self._ce_code is not None:
            object.__setattr__(self, "_ce", as_batch(self._ce_code(env), env).detach().mean())
        return per_sample.mean()


def _input_type(expr: I.Node) -> Ty:
    """The type of the loss's sample `x` (a variable of every loss that reads the data)."""
    for n in I.walk(expr):
        if isinstance(n, I.Var) and n.name == "x":
            return n.ty
    raise CompileError("an adaptive weight needs a loss over the sample x")


def _output_type(expr: I.Node, net: str) -> Ty:
    for n in I.walk(expr):
        if isinstance(n, I.Apply) and n.net == net:
            return n.type
    raise CompileError(f"an adaptive weight needs a loss that applies network '{net}'")


def bind_param(node: I.Node, name: str) -> I.Node:
    """`node` with param `name` read as a variable (`Objective` binds it per call), so that
    simplifying the loss does not fold its value in."""
    if isinstance(node, I.ParamRef) and node.name == name:
        return I.Var(name, node.ty, span=node.span)
    return rebuild(node, lambda c: bind_param(c, name))
