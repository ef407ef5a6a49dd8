"""Traced attack evaluations: one objective's forward pass and input gradient as one graph.

An attack evaluates the same objective (a compiled property body, or any function given to
`propdsl.attacks.run_attack`) at every step, and each evaluation pays Python for the closures,
the modules and autograd's engine. Once an objective has been evaluated in `after` attacks with
the same signature (its code, the shapes, dtypes and devices of its points, the models), its
evaluation is traced by `torch.fx.experimental.proxy_tensor.make_fx` into one graph of ATen
operations, forward and backward (`value`, `d value / d points`), and later evaluations run that
graph: the same operations on the same kernels, so the values and gradients are bit-identical
to the eager ones (tests/test_tracing.py), without the Python around them. The graph is handed
to TorchScript's interpreter (`torch.jit.trace`, or `torch.jit.script` where the tracer
rejects an argument), which calls its operations from C++, with its optimisations (fusion) off,
and only when it gives bit-identical outputs on the traced example; otherwise the Python code
of the graph runs. (`torch.jit` is deprecated in favour of `torch.compile` and `torch.export`
but maintained; should it go, the Python-coded graph remains. `torch.compile` itself is no use
here on a CPU: benchmarks/bench_trace.py.)

What makes a trace reusable from one attack to the next: every tensor the objective reads
besides its points must be *named* by the caller (`Traceable.tensors`: the data, values cached
in its environment, the models' parameters and buffers), and becomes an input of the graph; the
only other tensors a graph may keep are those registered with `stable` (constants made once,
such as a logic's unit as a 0-dim tensor). A trace that reads any other tensor, draws random
numbers, or branches on a tensor's value (a host read) is not used: that objective stays eager.
A trace is keyed by the objective's site, the points' shapes, dtypes, devices and layouts, the
models (by identity) and the signature of the named tensors it reads; within one attack the
first evaluation is eager (it fills the caches the graph reads and checks the objective's
output), and evaluations without a gradient (the last step) stay eager too.

A traced graph bakes in the Python decisions the objective took while traced; those may only
depend on the signature above. A model whose `forward` branches on Python state that changes
between calls (not on its parameters or training flag) breaks that assumption: turn tracing off
with `set_tracing(False)` or the environment variable `PROPDSL_TRACE=0`
(`PROPDSL_TRACE_AFTER=N` sets `after`).
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Traceable", "eager", "module_tensors", "set_tracing", "stable", "tracing"]

_LOCK = threading.Lock()
_STABLE: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
_MAX_TRACES = 64


def _after_from_env() -> int:
    value = os.environ.get("PROPDSL_TRACE_AFTER", "").strip()
    return int(value) if value.isdigit() else 8


@dataclass
class _Settings:
    enabled: bool = os.environ.get("PROPDSL_TRACE", "1").strip() not in ("0", "false", "no")
    after: int = _after_from_env()  # attacks with one signature before it is traced


_SETTINGS = _Settings()


def set_tracing(enabled: bool | None = None, *, after: int | None = None) -> None:
    """Turn traced attack evaluations on or off, and set after how many attacks with one
    signature an objective is traced (`after=0`: from the second evaluation of the first).

    >>> set_tracing(False); tracing()
    False
    >>> set_tracing(True, after=8); tracing()
    True
    """
    if enabled is not None:
        _SETTINGS.enabled = bool(enabled)
    if after is not None:
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError(f"after must be a non-negative integer, got {after!r}")
        _SETTINGS.after = after


def tracing() -> bool:
    """Whether traced attack evaluations are on."""
    return _SETTINGS.enabled


_LOCAL = threading.local()


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Attacks started in this block (in this thread) are evaluated eagerly: they neither use
    nor make traces, and do not count towards an objective becoming hot. For attacks that run
    too rarely for a trace to pay for itself, such as `train`'s per-epoch validation check: a
    trace costs as much as 75-250 eager evaluations on the digits models (0.12 s; the first in
    a process about 0.9 s, for the tracing machinery's imports), while the check runs one attack
    an epoch."""
    before = getattr(_LOCAL, "eager", False)
    _LOCAL.eager = True
    try:
        yield
    finally:
        _LOCAL.eager = before


def stable(t: Tensor) -> Tensor:
    """Register `t` as a constant a traced graph may keep: a tensor made once and never changed
    (such as a logic's unit as a 0-dim tensor, cached by the closure that made it). Returns it."""
    _STABLE[id(t)] = t
    return t


@dataclass(frozen=True)
class Traceable:
    """What makes an objective traceable across attacks.

    `site`: equal for objectives that compute the same function of the same named tensors (the
    compiled quantifier and its number of copies per sample); `tensors()`: every tensor the
    objective may read besides its points, by a name that means the same tensor in the next
    attack (called once per attack, after the first evaluation); `models`: the modules it calls
    (a trace is kept for these objects only).
    """

    site: Hashable
    tensors: Callable[[], Mapping[str, Tensor]]
    models: Sequence[nn.Module] = ()


def module_tensors(model: nn.Module) -> tuple[list[tuple[str, Tensor]], list[tuple[str, Tensor]]]:
    """`named_parameters()` and `named_buffers()` of `model` (each tensor once, at its first
    name), read from the modules' own tables: a fraction of their generators' cost."""
    params: list[tuple[str, Tensor]] = []
    buffers: list[tuple[str, Tensor]] = []
    seen: set[int] = set()
    modules: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        prefix, m = stack.pop()
        if id(m) in modules:
            continue
        modules.add(id(m))
        for table, out in ((m._parameters, params), (m._buffers, buffers)):
            for name, t in table.items():
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append((prefix + name, t))
        children = [(prefix + name + ".", c) for name, c in m._modules.items() if c is not None]
        stack.extend(reversed(children))
    return params, buffers


def _signature(t: Tensor) -> tuple[Any, ...]:
    return (tuple(t.shape), t.dtype, t.device, t.is_contiguous())


class _Graph:
    """A traced evaluation: `run(points, tensors)` -> (value, grads), the named tensors read."""

    def __init__(self, module: Callable[..., Any], names: list[str], signatures, models):
        self.module = module
        self.names = names
        self.signatures = signatures  # per name, its tensor's signature when traced
        self.models = [weakref.ref(m) for m in models]

    def fits(self, tensors: Mapping[str, Tensor], models: Sequence[nn.Module]) -> bool:
        if len(models) != len(self.models) or any(
            ref() is not m for ref, m in zip(self.models, models, strict=True)
        ):
            return False
        for name, sig in zip(self.names, self.signatures, strict=True):
            t = tensors.get(name)
            if t is None or _signature(t) != sig:
                return False
        return True

    def run(self, points: Sequence[Tensor], tensors: Mapping[str, Tensor]) -> list[Tensor]:
        # The graph holds its own backward: no autograd graph to record around it. No
        # TorchScript optimisation either (fusion would change the rounding).
        with torch.no_grad(), torch.jit.optimized_execution(False):
            return list(self.module(*points, *(tensors[n] for n in self.names)))


# traces by key (None: the objective cannot be traced), and how often each key was seen
_TRACES: OrderedDict[Hashable, _Graph | None] = OrderedDict()
_SEEN: OrderedDict[Hashable, int] = OrderedDict()


def _remember(table: OrderedDict, key: Hashable, value: Any) -> None:
    table[key] = value
    table.move_to_end(key)
    while len(table) > _MAX_TRACES:
        table.popitem(last=False)


def _random(node: torch.fx.Node) -> bool:
    target = node.target
    tags = getattr(target, "tags", ())
    return node.op == "call_function" and torch.Tag.nondeterministic_seeded in tags


def _mutates(node: torch.fx.Node) -> bool:
    target = node.target
    schema = getattr(target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _trace(
    objective: Callable[..., Tensor],
    points: Sequence[Tensor],
    tensors: Mapping[str, Tensor],
    models: Sequence[nn.Module],
) -> _Graph | None:
    """The evaluation of `objective` at points like `points` (its value and input gradient)
    as a graph whose inputs are the points and the named tensors it reads; None when that graph
    would not be reusable."""

    def joint(*pts: Tensor) -> tuple[Tensor, ...]:
        leaves = [p.detach().requires_grad_(True) for p in pts]
        with torch.enable_grad():
            value = objective(*leaves)
            if not value.requires_grad:
                return (value.detach(), *(torch.zeros_like(p) for p in leaves))
            grads = torch.autograd.grad(
                value, leaves, grad_outputs=torch.ones_like(value), allow_unused=True
            )
        return (
            value.detach(),
            *(torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads, strict=True)),
        )

    return _trace_joint(joint, points, tensors, models)


def _trace_joint(
    joint: Callable[..., tuple[Tensor, ...]],
    points: Sequence[Tensor],
    tensors: Mapping[str, Tensor],
    models: Sequence[nn.Module],
) -> _Graph | None:
    """`joint(*points)` as a graph whose inputs are the points and the named tensors it reads;
    None when it reads an unnamed tensor, draws random numbers, writes into a tensor in place
    or cannot be traced. Tracing runs the function once: a named tensor it wrote into (a
    batch-norm's running statistics) gets its value back."""
    from torch.fx.experimental.proxy_tensor import make_fx

    versions = {name: t._version for name, t in tensors.items()}
    saved = {name: t.detach().clone() for name, t in tensors.items()}
    cuda = sorted({t.device.index or 0 for t in tensors.values() if t.device.type == "cuda"})
    try:
        # the random generators as they were: a model that draws (dropout in training) is not
        # traced, and its draws while being traced must not shift the eager run that follows
        with torch.random.fork_rng(devices=cuda):
            module = make_fx(joint)(*points)
    except Exception:  # a host read, an unsupported operation: the objective stays eager
        module = None
    # (compared by value: writes during make_fx's dispatch need not bump `_version`)
    changed = [
        n for n, t in tensors.items() if t._version != versions[n] or not torch.equal(t, saved[n])
    ]
    if changed:
        with torch.no_grad():
            for name in changed:
                tensors[name].copy_(saved[name])
        return None
    if module is None:
        return None
    by_id: dict[int, str] = {}
    for name, t in tensors.items():
        by_id.setdefault(id(t), name)
    graph = module.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    inputs: dict[str, torch.fx.Node] = {}  # attribute -> its new placeholder
    names: list[str] = []
    where = placeholders[-1] if placeholders else None
    for node in list(graph.nodes):
        if _random(node) or _mutates(node):
            return None
        if node.op != "get_attr":
            continue
        value = getattr(module, str(node.target), None)
        if not isinstance(value, Tensor):
            return None
        found = by_id.get(id(value))
        if found is None:
            if _STABLE.get(id(value)) is value:
                continue  # a registered constant: kept in the graph
            return None  # a tensor nobody named: the next call could not supply it
        attr = str(node.target)
        if attr not in inputs:
            ctx = graph.inserting_after(where) if where is not None else graph.inserting_before()
            with ctx:
                inputs[attr] = graph.placeholder(f"t{len(names)}")
            where = inputs[attr]
            names.append(found)
        node.replace_all_uses_with(inputs[attr])
        graph.erase_node(node)
    graph.lint()
    module.recompile()
    signatures = [_signature(tensors[n]) for n in names]
    inputs_now = [*points, *(tensors[n] for n in names)]
    return _Graph(_interpreted(module, inputs_now), names, signatures, models)


def _packets(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of `module` calling `torch.ops.aten.name` (resolved by its argument types), not
    `torch.ops.aten.name.overload`, which TorchScript's compiler does not accept."""
    import copy

    out = copy.deepcopy(module)
    for node in out.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
    out.recompile()
    return out


def _interpreted(module: torch.fx.GraphModule, example: list[Tensor]) -> Callable[..., Any]:
    """The graph run by TorchScript's interpreter (its operations called from C++, not from
    Python: about half the time of the Python-coded graph for a small MLP) when it records the
    same graph and gives bit-identical outputs on the example; else the Python-coded graph."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated, still maintained
            with torch.no_grad(), torch.jit.optimized_execution(False):
                try:
                    scripted = torch.jit.trace(module, tuple(example), check_trace=False)
                except RuntimeError:
                    # the tracer rejects some arguments (a convolution's output mask): compile
                    # the graph's code instead
                    scripted = torch.jit.script(_packets(module))
                want, got = module(*example), scripted(*example)
    except Exception:
        return module
    if len(want) != len(got) or not all(torch.equal(a, b) for a, b in zip(want, got, strict=True)):
        return module
    return scripted


class Tracer:
    """The traced evaluations of one attack's objective (`propdsl.attacks.run_attack` makes one
    per attack when it is given a `Traceable`)."""

    def __init__(
        self, traceable: Traceable, objective: Callable[..., Tensor], points: Sequence[Tensor]
    ):
        self.traceable = traceable
        self.objective = objective
        self.calls = 0
        self.graph: _Graph | None = None
        self.tensors: Mapping[str, Tensor] = {}
        self.active = _SETTINGS.enabled and not getattr(_LOCAL, "eager", False)
        self.points = tuple(_signature(p) for p in points)

    def evaluate(self, points: Sequence[Tensor]) -> list[Tensor] | None:
        """(value, *grads) from the traced graph, or None: evaluate eagerly (the first call of
        the attack, an objective that cannot be traced or is not hot yet)."""
        if not self.active:
            return None
        self.calls += 1
        if self.calls == 1:
            return None  # eager: it fills the caches the graph reads
        if self.graph is None:
            self.graph = self._graph(points)
            if self.graph is None:
                self.active = False
                return None
        return self.graph.run(points, self.tensors)

    def _graph(self, points: Sequence[Tensor]) -> _Graph | None:
        t = self.traceable
        models = tuple(t.models)
        key = (t.site, self.points, tuple(id(m) for m in models))
        tensors = t.tensors()
        with _LOCK:
            if key in _TRACES:
                graph = _TRACES[key]
                if graph is None or not graph.fits(tensors, models):
                    return None
                self.tensors = tensors
                return graph
            seen = _SEEN.get(key, 0) + 1
            _remember(_SEEN, key, seen)
            if seen <= _SETTINGS.after:
                return None
        if torch.is_autocast_enabled():
            return None
        graph = _trace(self.objective, points, tensors, models)
        with _LOCK:
            _remember(_TRACES, key, graph)
        self.tensors = tensors
        return graph


def clear() -> None:
    """Forget every trace (tests; a model whose Python state changed)."""
    with _LOCK:
        _TRACES.clear()
        _SEEN.clear()
