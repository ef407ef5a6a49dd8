"""Environments of the interpreter: variable bindings for one batch, and the caches of an
evaluation.

Every value carries the batch as its first dimension. An environment binds the variables of one
scope (a property's `x` and `y`, a quantified `x'`, a finite `j`) and caches the values of the
closures evaluated in it; its `parent` is the enclosing scope. See `propdsl.interpret`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from propdsl.errors import UsageError
from propdsl.logics import Logic
from propdsl.tracing import module_tensors

__all__ = [
    "CompileError",
    "Env",
    "EvalConfig",
    "as_batch",
    "column",
    "env_device",
    "env_dtype",
    "env_tensors",
    "lookup",
    "rebind",
    "sample_env",
]


class CompileError(UsageError):
    """A formula that this backend cannot evaluate (with the reason)."""


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What an evaluation needs besides its bindings.

    `generator`: the random source of randomised built-ins (`smoothgrad`) and of the loss side's
    attacks; `radius_scale`: multiplies every ball's radius (the eps ramp-up of training).
    """

    generator: torch.Generator | None = None
    radius_scale: float = 1.0


class Env:
    """Variable bindings for one evaluation: tensors with the batch first.

    `parent` is the enclosing environment; `factor` > 1 means this environment's batch is the
    parent's repeated `factor` times (a vectorised finite quantifier), so values computed in the
    parent are `repeat_interleave`d on the way down.

    Two caches: `cache` holds formula values (they depend on the logic), `shared` holds numbers
    (network outputs, norms, saliency maps), which are the same under every logic and are shared
    by the logic variants of one evaluation (`with_logic(..., share=True)`): the exact Boolean
    pass that reports `satisfied` reuses the loss pass's network outputs instead of recomputing
    them. The attack's variant (`share=False`) computes its own, as it runs the models in eval
    mode.

    `store` (one per evaluation, shared by every env of it) remembers the envs that quantifiers
    derive from an env: the attack's points and the finite quantifiers' expanded bindings, so
    that every logic variant evaluates the body at the same points with the same numbers.
    Only envs with `remember` set write to it; the attack's objective envs do not (their values
    are used once, and keeping them would keep every step's graph alive).
    """

    __slots__ = (
        "models",
        "values",
        "batch",
        "logic",
        "config",
        "parent",
        "factor",
        "cache",
        "shared",
        "store",
        "found",
        "grid",
        "remember",
    )

    def __init__(
        self,
        models: Mapping[str, nn.Module],
        values: dict[str, Tensor],
        batch: int,
        logic: Logic,
        config: EvalConfig,
        parent: Env | None = None,
        factor: int = 1,
        *,
        shared: dict[int, Tensor] | None = None,
        remember: bool | None = None,
    ):
        self.models = models
        self.values = values
        self.batch = batch
        self.logic = logic
        self.config = config
        self.parent = parent
        self.factor = factor
        self.cache: dict[int, Tensor] = {}
        self.shared: dict[int, Tensor] = {} if shared is None else shared
        self.store: dict[tuple[int, int], Any] = parent.store if parent is not None else {}
        # the points quantifiers over regions were evaluated at: (logic, names, points), for
        # counterexamples, and the mask of samples whose region is empty (None: none is)
        self.found: list[tuple[Logic, tuple[str, ...], tuple[Tensor, ...], Tensor | None]] = (
            parent.found if parent is not None else []
        )
        # finite quantifier envs: variable -> (its index per parent row [factor], is arange(k))
        self.grid: dict[str, tuple[Tensor, bool]] | None = None
        if remember is None:
            remember = parent.remember if parent is not None else True
        self.remember: bool = remember

    def child(
        self,
        values: dict[str, Tensor],
        factor: int = 1,
        *,
        shared: dict[int, Tensor] | None = None,
    ) -> Env:
        return Env(
            self.models,
            values,
            self.batch * factor,
            self.logic,
            self.config,
            parent=self,
            factor=factor,
            shared=shared,
        )

    def with_logic(self, logic: Logic, *, share: bool = True) -> Env:
        """The same bindings (the whole chain of parents) under another logic.

        Formula caches are fresh (values depend on the logic). With `share`, numbers are shared
        with this env's chain; without, the new chain computes its own and remembers nothing.
        """
        if logic is self.logic and share:
            return self
        parent = self.parent.with_logic(logic, share=share) if self.parent is not None else None
        env = Env(
            self.models,
            self.values,
            self.batch,
            logic,
            self.config,
            parent,
            self.factor,
            shared=self.shared if share else None,
            remember=self.remember and share,
        )
        if parent is None:
            env.store, env.found = self.store, self.found
        env.grid = self.grid
        return env

    def recall(self, key: int) -> Any:
        """What `keep(key, ...)` stored for an env with the same bindings, or None."""
        found = self.store.get((key, id(self.shared))) if self.remember else None
        # The stored env's `shared` dict is kept alive by the record, so its id cannot have been
        # reused by another dict.
        return found[1] if found is not None and found[0] is self.shared else None

    def keep(self, key: int, record: Any) -> None:
        if self.remember:
            self.store[(key, id(self.shared))] = (self.shared, record)


def sample_env(
    models: Mapping[str, nn.Module],
    params: Sequence[str],
    x: Tensor,
    y: Tensor | None,
    *,
    logic: Logic,
    config: EvalConfig | None = None,
    partner: tuple[Tensor, Tensor] | None = None,
) -> Env:
    """The environment of a property of one sample for a batch: its first parameter bound to
    `x`, its second (when it has one and `y` is given) to `y`; a property of a pair also binds
    its third and fourth to the partner `(xt, yt)` ([B, ...] and [B])."""
    values = {params[0]: x}
    if len(params) > 1 and y is not None:
        values[params[1]] = y
    if len(params) == 4 and partner is not None:
        values[params[2]], values[params[3]] = partner
    return Env(models, values, x.shape[0], logic, config or EvalConfig())


def lookup(env: Env, name: str) -> Tensor:
    """The value of a variable, from the innermost environment that binds it."""
    e: Env | None = env
    while e is not None:
        if name in e.values:
            return e.values[name]
        e = e.parent
    raise CompileError(f"variable '{name}' is not bound")


def rebind(sub: Env, env: Env) -> Env:
    """`sub` (derived from another logic variant of `env`) as a child of `env`."""
    new = Env(
        env.models,
        sub.values,
        sub.batch,
        env.logic,
        env.config,
        env,
        sub.factor,
        shared=sub.shared,
    )
    new.grid = sub.grid
    return new


def as_batch(value: Tensor, env: Env) -> Tensor:
    """A value broadcast to the batch ([B]; a 0-dim value, such as a constant, expanded)."""
    if value.dim() == 0:
        return value.expand(env.batch)
    return value


def column(mask: Tensor, like: Tensor) -> Tensor:
    """A per-sample [B] mask shaped to broadcast against `like` [B, ...]."""
    return mask.reshape(-1, *([1] * (like.dim() - 1)))


def _first_tensor(env: Env) -> Tensor | None:
    e: Env | None = env
    while e is not None:
        for v in e.values.values():
            if isinstance(v, Tensor) and v.is_floating_point():
                return v
        e = e.parent
    return None


def env_tensors(env: Env) -> dict[str, Tensor]:
    """Every tensor an evaluation in a child of `env` may read besides the child's own
    bindings, by a name that means the same value in an environment built the same way for
    another batch (`propdsl.tracing`): the bindings, cached values and finite-quantifier grids
    of `env` and its parents (by depth and closure key), and the models' parameters and
    buffers."""
    out: dict[str, Tensor] = {}
    e: Env | None = env
    depth = 0
    while e is not None:
        for kind, table in (("v", e.values), ("c", e.cache), ("s", e.shared)):
            for key, t in table.items():
                if isinstance(t, Tensor):
                    out[f"{depth}{kind}{key}"] = t
        for var, (col, _) in (e.grid or {}).items():
            out[f"{depth}g{var}"] = col
        e, depth = e.parent, depth + 1
    for net, model in env.models.items():
        params, buffers = module_tensors(model)
        for name, t in params:
            out[f"m.{net}.{name}"] = t
        for name, t in buffers:
            out[f"b.{net}.{name}"] = t
    return out


def env_dtype(env: Env) -> torch.dtype:
    """The floating dtype of the data bound in the environment (torch's default without)."""
    t = _first_tensor(env)
    return t.dtype if t is not None else torch.get_default_dtype()


def env_device(env: Env) -> torch.device:
    """The device of the data bound in the environment (the CPU without)."""
    t = _first_tensor(env)
    return t.device if t is not None else torch.device("cpu")
