"""From an `nn.Module` to a graph of bound rules.

The model is traced once with torch.fx (modules that have a rule stay opaque leaves, so `x +
block(x)`, `F.relu`, `x.view(x.size(0), -1)` in a user's `forward` all appear as graph nodes); the
trace is cached per model. Each call of `build_graph` then walks the trace with a two-sample
example input: constants are evaluated for real (so parameters are read live and stay
differentiable), input-dependent operations become `BoundNode`s with their rule, and the example
gives every node's per-sample shape. Nodes the output does not depend on are dropped.
"""

from __future__ import annotations

import builtins
import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from propdsl.verify import layers
from propdsl.verify.layers import (
    ActivationRule,
    AffineRule,
    BoundArg,
    BoundRule,
    Call,
    NonlinearRule,
    UnsupportedLayerError,
    describe_target,
    rule_for_call,
    rule_for_module,
)

__all__ = ["BoundGraph", "BoundNode", "build_graph"]

# Queries about a bounded tensor's shape, answered from the example (they are constants).
_SHAPE_METHODS = frozenset({"size", "dim", "numel", "ndimension", "nelement"})
_SHAPE_ATTRIBUTES = frozenset({"shape", "ndim", "dtype", "device"})


@dataclass(eq=False)
class BoundNode:
    """One input-dependent value: the model input (index 0, no rule) or an operation on
    earlier nodes. `shape` is per sample."""

    index: int
    name: str
    rule: BoundRule | None
    inputs: tuple[int, ...]
    shape: torch.Size


@dataclass(eq=False)
class BoundGraph:
    """Nodes in topological order; the last one is the model's output."""

    nodes: list[BoundNode]
    # Each consumer once, even when it reads the node twice (`h + h`): the users sum over a
    # consumer's inputs themselves.
    consumers: list[list[int]] = field(init=False)
    ancestors: list[frozenset[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.consumers = [[] for _ in self.nodes]
        self.ancestors = []
        for node in self.nodes:
            for j in dict.fromkeys(node.inputs):
                self.consumers[j].append(node.index)
            seen: set[int] = set()
            for j in node.inputs:
                seen |= self.ancestors[j] | {j}
            self.ancestors.append(frozenset(seen))

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    def is_preactivation(self, i: int) -> bool:
        """Whether a nonlinearity (an activation, max pooling) reads node i (so its bounds
        matter)."""
        return any(
            isinstance(self.nodes[c].rule, ActivationRule | NonlinearRule)
            for c in self.consumers[i]
        )

    def is_direct(self, i: int) -> bool:
        """An affine function of the input that interval arithmetic bounds exactly: a chain of
        single-input affine operations with at most one that mixes elements (Normalize, then a
        convolution, then BatchNorm, say)."""
        mixing = 0
        while i != 0:
            node = self.nodes[i]
            if not (isinstance(node.rule, AffineRule) and len(node.inputs) == 1):
                return False
            mixing += node.rule.mixes
            i = node.inputs[0]
        return mixing <= 1

    def activations_before(self, i: int) -> list[int]:
        """The element-wise nonlinearities that node i depends on."""
        return [
            j for j in sorted(self.ancestors[i]) if isinstance(self.nodes[j].rule, ActivationRule)
        ]


class _Tracer(fx.Tracer):
    """torch.fx tracing that keeps every module with a bound rule opaque."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return rule_for_module(m) is not None or super().is_leaf_module(m, module_qualified_name)


_TRACES: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, fx.Graph]] = weakref.WeakKeyDictionary()


def _trace(model: nn.Module) -> fx.Graph:
    # Traces bake in training flags (F.dropout(x, training=self.training)) and the registry's
    # leaf decisions, so those are part of the cache key.
    key = (
        tuple((id(m), m.training) for m in model.modules()),
        layers.registry_version(),
    )
    hit = _TRACES.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    try:
        graph = _Tracer().trace(model)
    except UnsupportedLayerError:
        raise
    except Exception as exc:  # fx raises many kinds (TraceError, TypeError, ...)
        raise UnsupportedLayerError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}). "
            "Input-dependent control flow cannot be traced: register a bound rule for the "
            "submodule that contains it (propdsl.verify.register_rule(ThatModule)(ARule)), "
            "which then stays opaque"
        ) from exc
    _TRACES[model] = (key, graph)
    return graph


@dataclass(frozen=True)
class _Bound:
    """The value of a bound node during the walk."""

    index: int


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Run the example through a layer without side effects (running statistics, dropout)."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _fetch(model: nn.Module, target: str) -> Any:
    value: Any = model
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _unsupported(op: str, target: Any, name: str) -> UnsupportedLayerError:
    if op == "call_module":
        what = f"layer '{name}' ({describe_target(target)})"
        key = type(target).__name__
        kind = "its class"
    elif op == "call_method":
        what = f"{describe_target(target)} (node '{name}')"
        key = repr(target)
        kind = "the method name"
    else:
        what = f"function {describe_target(target)} (node '{name}')"
        key = describe_target(target)
        kind = "the function"
    return UnsupportedLayerError(
        f"no bound rule for {what}. Register one for {kind}: "
        f"@propdsl.verify.register_rule({key}) on a subclass of AffineRule (affine layers) or "
        "ActivationRule (element-wise nonlinearities); see docs/bounds.md"
    )


def _rule_class(op: str, target: Any) -> type[BoundRule] | None:
    if op == "call_module":
        return rule_for_module(target)
    return rule_for_call(target)


def _run(op: str, target: Any, args: Any, kwargs: Any) -> Any:
    if op == "call_method":
        obj, *rest = args
        return getattr(obj, target)(*rest, **kwargs)
    return target(*args, **kwargs)


def _single_layer(model: nn.Module, rule_cls: type[BoundRule], example: Tensor) -> BoundGraph:
    with torch.no_grad(), _eval_mode(model):
        out = model(example)
    shape = torch.Size(example.shape[1:])
    call = Call(
        target=model,
        args=(BoundArg(0),),
        kwargs={},
        in_shapes=(shape,),
        out_shape=torch.Size(out.shape[1:]),
        name=type(model).__name__,
        dtype=example.dtype,
        device=example.device,
    )
    return BoundGraph(
        [
            BoundNode(0, "input", None, (), shape),
            BoundNode(1, call.name, rule_cls(call), (0,), call.out_shape),
        ]
    )


def build_graph(model: nn.Module, example: Tensor) -> BoundGraph:
    """The bound graph of `model` for inputs shaped like `example` ([2, *input_shape])."""
    rule_cls = rule_for_module(model)
    if rule_cls is not None:
        return _single_layer(model, rule_cls, example)
    graph = _trace(model)
    batch = example.shape[0]
    env: dict[fx.Node, Any] = {}
    nodes: list[BoundNode] = []
    values: list[Tensor] = []
    output: int | None = None

    def concrete(v: Any) -> Any:
        return values[v.index] if isinstance(v, _Bound) else v

    for n in graph.nodes:
        if n.op == "placeholder":
            if not nodes:
                nodes.append(BoundNode(0, "input", None, (), torch.Size(example.shape[1:])))
                values.append(example)
                env[n] = _Bound(0)
            elif n.args:
                env[n] = n.args[0]  # a parameter with a default value
            else:
                raise UnsupportedLayerError(
                    f"{type(model).__name__}.forward takes more than one input "
                    f"('{n.name}'): give one region per input, "
                    "bounds(model, region=(region_1, region_2, ...))"
                )
            continue
        if n.op == "get_attr":
            env[n] = _fetch(model, str(n.target))
            continue
        if n.op == "output":
            result = env[n.args[0]] if isinstance(n.args[0], fx.Node) else n.args[0]
            if not isinstance(result, _Bound):
                raise UnsupportedLayerError(
                    f"{type(model).__name__}.forward must return one tensor that depends on "
                    "its input"
                )
            output = result.index
            continue

        args = fx.node.map_arg(n.args, lambda a: env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
        target = model.get_submodule(str(n.target)) if n.op == "call_module" else n.target
        bound: list[int] = []

        def mark(v: Any, bound: list[int] = bound) -> Any:
            if isinstance(v, _Bound):
                bound.append(v.index)
                return BoundArg(len(bound) - 1)
            return v

        marked_args = fx.node.map_aggregate(args, mark)
        marked_kwargs = fx.node.map_aggregate(kwargs, mark)
        ex_args = fx.node.map_aggregate(args, concrete)
        ex_kwargs = fx.node.map_aggregate(kwargs, concrete)
        if not bound:
            env[n] = _run(n.op, target, ex_args, ex_kwargs)
            continue
        is_shape_query = (n.op == "call_method" and target in _SHAPE_METHODS) or (
            target is builtins.getattr and len(args) > 1 and args[1] in _SHAPE_ATTRIBUTES
        )
        if is_shape_query:
            env[n] = _run(n.op, target, ex_args, ex_kwargs)
            continue
        rule_cls = _rule_class(n.op, target)
        if rule_cls is None:
            raise _unsupported(n.op, target, str(n.target) if n.op == "call_module" else n.name)
        with torch.no_grad():
            if n.op == "call_module":
                with _eval_mode(target):
                    out = _run(n.op, target, ex_args, ex_kwargs)
            else:
                out = _run(n.op, target, ex_args, ex_kwargs)
        if not isinstance(out, Tensor):
            raise UnsupportedLayerError(
                f"{describe_target(target)} (node '{n.name}') returns a "
                f"{type(out).__name__}, not a tensor; bounds need tensor-valued operations"
            )
        if out.dim() == 0 or out.shape[0] != batch:
            raise UnsupportedLayerError(
                f"{describe_target(target)} (node '{n.name}') does not keep the batch as its "
                "first dimension; bound propagation treats samples independently"
            )
        call = Call(
            target=target,
            args=marked_args,
            kwargs=dict(marked_kwargs),
            in_shapes=tuple(nodes[j].shape for j in bound),
            out_shape=torch.Size(out.shape[1:]),
            name=n.name,
            dtype=example.dtype,
            device=example.device,
        )
        index = len(nodes)
        nodes.append(BoundNode(index, n.name, rule_cls(call), tuple(bound), call.out_shape))
        values.append(out)
        env[n] = _Bound(index)

    if output is None:  # pragma: no cover - fx graphs always end in an output node
        raise UnsupportedLayerError("the traced model has no output")
    return _prune(nodes, output)


def _prune(nodes: list[BoundNode], output: int) -> BoundGraph:
    """Keep the output's ancestors, renumbered in order; the output comes last."""
    keep = {output}
    for node in reversed(nodes[: output + 1]):
        if node.index in keep:
            keep.update(node.inputs)
    if 0 not in keep:
        raise UnsupportedLayerError("the model's output does not depend on its input")
    order = sorted(keep)
    new = {old: i for i, old in enumerate(order)}
    kept = [
        BoundNode(
            new[old],
            nodes[old].name,
            nodes[old].rule,
            tuple(new[j] for j in nodes[old].inputs),
            nodes[old].shape,
        )
        for old in order
    ]
    return BoundGraph(kept)
