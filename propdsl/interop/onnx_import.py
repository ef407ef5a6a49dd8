"""ONNX networks in: an ONNX graph as a torch module for bounds, attacks and Jacobian bounds.

`load_onnx(path)` converts the graph node by node into a `torch.fx.GraphModule` made of plain
torch layers (`nn.Linear` for Gemm and MatMul by a constant, `nn.Conv2d`, `nn.ReLU`,
`nn.MaxPool2d`, ...) and a few tensor functions (reshape, permute, cat, pad, +, -, *, /), each of
which has a bound rule in `propdsl.verify.layers`. Nodes whose inputs are all constants (shape
arithmetic, `Constant`, weights computed in the graph) are evaluated once with onnx's reference
implementation; `Shape` of an input-dependent tensor is a constant too (the shapes are static).

The batch. The module takes [B, *input_shape] and returns [B, *output_shape], sample by sample
what the ONNX graph computes on one sample:

* a graph whose input is [1, *s] (or [N, *s] with a symbolic N) has a batch axis: the module
  takes [B, *s]. Its operations must keep that axis first and alone (a Reshape to [1, ...], a
  Transpose that leaves axis 0 in place, a Concat along another axis), as exported networks do;
* a graph without one (VNN-COMP's smallest tests take an input of shape [1] and compute `W @ x`)
  runs on per-sample tensors: the module takes [B, *onnx_input_shape] and adds the batch axis
  in front of every operation (`W @ x` becomes a Linear layer).

Every conversion is compared with onnxruntime on random inputs when onnxruntime is installed
(`check=True`), so a converter mistake stops the load instead of verifying another network.
"""

from __future__ import annotations

import functools
import keyword
import logging
import math
import operator
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from propdsl.errors import UsageError
from propdsl.verify.layers import UnsupportedLayerError

__all__ = [
    "SUPPORTED_OPERATORS",
    "ConversionMismatchError",
    "OnnxImportError",
    "UnsupportedOperatorError",
    "load_onnx",
    "onnx_forward",
]

log = logging.getLogger("propdsl.interop.onnx")

# Operators converted when they act on input-dependent tensors (any operator whose inputs are all
# constants is evaluated at load time instead).
SUPPORTED_OPERATORS = (
    "Add",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Concat",
    "Conv",
    "Div",
    "Dropout",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Identity",
    "LeakyRelu",
    "MatMul",
    "MaxPool",
    "Mul",
    "Neg",
    "Pad",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Size",
    "Softplus",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
)

# Tolerance of the onnxruntime comparison at load time (float32 sums in another order).
CHECK_RTOL = 1e-4
CHECK_SAMPLES = 4


class OnnxImportError(UsageError):
    """The ONNX file cannot be read or converted (a usage error: exit code 2 in the CLI)."""


class UnsupportedOperatorError(OnnxImportError, UnsupportedLayerError):
    """A node whose operator, or the way it uses the batch axis, has no translation."""


class ConversionMismatchError(RuntimeError):
    """The converted module disagrees with onnxruntime: a bug in the converter, so the command
    line reports it as an internal error (exit 70), never as the user's mistake."""


# -- the public functions ------------------------------------------------------------------------


def load_onnx(path: str | Path, *, check: bool = True) -> fx.GraphModule:
    """The ONNX network at `path` as a torch module (a `torch.fx.GraphModule`, in eval mode).

    The module takes [B, *model.input_shape] and returns [B, *model.output_shape]; it also
    carries `num_outputs` (the flattened output size), `onnx_input_shape` (the ONNX input's
    shape, batch axis included) and `source` (the path). With `check`, the module is compared
    with onnxruntime on random inputs (when onnxruntime is installed).

    Raises:
        OnnxImportError: the file is missing or not a valid ONNX model.
        UnsupportedOperatorError: a node has no translation (it names the node and operator).

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from propdsl.export import export_onnx
    >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> path = export_onnx(net, (3,), tempfile.mkdtemp() + "/f.onnx")
    >>> model = load_onnx(path)
    >>> model.input_shape, model.num_outputs
    ((3,), 2)
    >>> x = torch.rand(5, 3)
    >>> bool(torch.allclose(model(x), net(x), atol=1e-6))
    True
    """
    onnx = _import("onnx", "load_onnx")
    path = Path(path)
    model = _read_model(onnx, path)
    try:
        converted = _Converter(model, path, batched=_has_batch_axis(model)).run()
    except _BatchAxisError as first:
        # A graph whose leading axis of size 1 is not a batch axis: try it as unbatched.
        try:
            converted = _Converter(model, path, batched=False).run()
        except OnnxImportError:
            raise first from None
        log.debug("%s: converted as a graph without a batch axis (%s)", path, first)
    if check:
        _check_with_onnxruntime(converted, model, path)
    return converted


def onnx_forward(path: str | Path, x: Any) -> np.ndarray:
    """The network's output on one input, computed by onnxruntime (to confirm counterexamples).

    `x` is any array or tensor with as many elements as the ONNX input (it is reshaped to the
    input's shape, a symbolic batch axis taken as 1); the result has the ONNX output's shape.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from propdsl.export import export_onnx
    >>> net = nn.Linear(2, 1)
    >>> path = export_onnx(net, (2,), tempfile.mkdtemp() + "/f.onnx")
    >>> y = onnx_forward(path, [0.5, -1.0])
    >>> y.shape, bool(abs(y[0, 0] - net(torch.tensor([[0.5, -1.0]]))[0, 0].item()) < 1e-6)
    ((1, 1), True)
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxImportError(f"{path}: no such ONNX file")
    stat = path.stat()
    session = _session(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    dtype = np.float64 if inp.type == "tensor(double)" else np.float32
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=dtype)
    if arr.size != math.prod(shape):
        raise UsageError(
            f"{path}: the network takes {math.prod(shape)} input values (shape {shape}), got "
            f"{arr.size}"
        )
    return session.run(None, {inp.name: arr.reshape(shape)})[0]


# -- reading -------------------------------------------------------------------------------------


def _import(name: str, what: str) -> Any:
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        raise UsageError(f"{what} needs the '{name}' package: pip install {name}") from None


@functools.lru_cache(maxsize=8)
def _session(path: str, mtime_ns: int, size: int) -> Any:
    ort = _import("onnxruntime", "onnx_forward")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise OnnxImportError(f"{path}: onnxruntime cannot load it ({exc})") from None


def _read_model(onnx: Any, path: Path) -> Any:
    if not path.is_file():
        raise OnnxImportError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and friends
        raise OnnxImportError(f"{path}: not an ONNX model ({_first_line(exc)})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError
        raise OnnxImportError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None
    if not model.graph.node:
        raise OnnxImportError(f"{path}: the ONNX graph has no nodes")
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _graph_input(model: Any) -> Any:
    initialisers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initialisers]


def _dims(value_info: Any) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") else None
        for d in value_info.type.tensor_type.shape.dim
    ]


def _has_batch_axis(model: Any) -> bool:
    inputs = _graph_input(model)
    if len(inputs) != 1:
        return False  # the converter reports it
    dims = _dims(inputs[0])
    return bool(dims) and (dims[0] is None or (dims[0] == 1 and len(dims) >= 2))


# -- the converter -------------------------------------------------------------------------------


class _BatchAxisError(UnsupportedOperatorError):
    """An operation mixes the batch axis with the others (the graph may have none)."""


@dataclass(frozen=True, eq=False)
class _Dyn:
    """An input-dependent value: its fx node and its value on the example batch of 2."""

    node: fx.Node
    example: Tensor


Value = Any  # np.ndarray (a constant) | _Dyn | None (an absent optional input)

_DTYPES = {1: torch.float32, 11: torch.float64}  # ONNX TensorProto.FLOAT, DOUBLE


class _Converter:
    def __init__(self, model: Any, path: Path, *, batched: bool):
        self.model = model
        self.path = path
        self.batched = batched
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, Value] = {}
        self.names: set[str] = set()
        self.fusable: dict[str, nn.Linear] = {}  # value name -> the Linear without bias making it
        self.uses: Counter[str] = Counter()
        self.dtype = torch.float32
        self.current: Any = None  # the node being converted (for messages)

    # -- messages ----------------------------------------------------------------------------
    def _where(self) -> str:
        node = self.current
        if node is None:
            return f"{self.path}"
        name = node.name or "(unnamed)"
        return f"{self.path}: node '{name}' ({node.op_type})"

    def unsupported(self, why: str) -> UnsupportedOperatorError:
        return UnsupportedOperatorError(f"{self._where()}: {why}")

    def batch_error(self, why: str) -> _BatchAxisError:
        return _BatchAxisError(
            f"{self._where()}: {why}; bound propagation treats samples independently, so the "
            "batch axis (axis 0) must stay first and alone"
        )

    def malformed(self, why: str) -> OnnxImportError:
        return OnnxImportError(f"{self._where()}: {why}")

    # -- the graph ---------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        g = self.model.graph
        inputs = _graph_input(self.model)
        if len(inputs) != 1:
            raise self.unsupported(
                f"the graph has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
                "only single-input networks are supported"
            )
        if len(g.output) != 1:
            raise self.unsupported(
                f"the graph has {len(g.output)} outputs; only single-output networks are supported"
            )
        (inp,) = inputs
        elem = inp.type.tensor_type.elem_type
        if elem not in _DTYPES:
            raise self.unsupported(
                f"input '{inp.name}' has element type {elem}; float32 and float64 are supported"
            )
        self.dtype = _DTYPES[elem]
        if not inp.type.tensor_type.HasField("shape"):
            raise self.malformed(f"input '{inp.name}' has no shape")
        dims = _dims(inp)
        per_sample = dims[1:] if self.batched else dims
        if any(d is None for d in per_sample):
            raise self.unsupported(
                f"input '{inp.name}' has shape {[d if d is not None else '?' for d in dims]}: "
                "only the first (batch) dimension may be symbolic"
            )
        self.input_shape = tuple(int(d) for d in per_sample)  # type: ignore[arg-type]
        self.onnx_input_shape = tuple(1 if d is None else int(d) for d in dims)

        from onnx import numpy_helper

        for t in g.initializer:
            self.env[t.name] = numpy_helper.to_array(t).copy()
        gen = torch.Generator().manual_seed(0)
        example = torch.randn(2, *self.input_shape, generator=gen).to(self.dtype)
        self.env[inp.name] = _Dyn(self.graph.placeholder("x"), example)
        for node in g.node:
            self.uses.update(n for n in node.input if n)
        self.uses.update(o.name for o in g.output)

        for node in g.node:
            self.current = node
            self.convert(node)
        self.current = None

        result = self.env.get(g.output[0].name)
        if not isinstance(result, _Dyn):
            raise self.unsupported(f"the output '{g.output[0].name}' does not depend on the input")
        self.graph.output(result.node)
        self.graph.lint()
        module = fx.GraphModule(self.root, self.graph, class_name="OnnxNetwork")
        module.eval()
        module.input_shape = self.input_shape
        module.output_shape = tuple(result.example.shape[1:])
        module.num_outputs = math.prod(module.output_shape)
        module.onnx_input_shape = self.onnx_input_shape
        module.source = str(self.path)
        return module

    def convert(self, node: Any) -> None:
        ins: list[Value] = []
        for name in node.input:
            if not name:
                ins.append(None)
            elif name in self.env:
                ins.append(self.env[name])
            else:
                raise self.malformed(f"input '{name}' is not defined before the node")
        dynamic = any(isinstance(v, _Dyn) for v in ins)
        if node.domain not in ("", "ai.onnx"):
            if dynamic:
                raise self.unsupported(f"operator {node.op_type} of domain '{node.domain}'")
        if not dynamic:
            outs = self.fold(node, ins)
        else:
            handler: Callable | None = getattr(self, f"op_{node.op_type}", None)
            if handler is None:
                raise self.unsupported(
                    f"operator {node.op_type} is not supported on input-dependent tensors "
                    f"(supported: {', '.join(SUPPORTED_OPERATORS)})"
                )
            outs = handler(node, ins, self.attributes(node))
        for k, name in enumerate(node.output):
            if not name:
                continue
            if k < len(outs):
                self.env[name] = outs[k]
            elif self.uses[name]:
                raise self.unsupported(f"output {k} ('{name}') of {node.op_type} is not supported")

    def attributes(self, node: Any) -> dict[str, Any]:
        from onnx import helper

        out = {}
        for a in node.attribute:
            value = helper.get_attribute_value(a)
            out[a.name] = value.decode() if isinstance(value, bytes) else value
        return out

    def fold(self, node: Any, ins: list[Value]) -> list[Value]:
        """A node of constants: evaluated once with onnx's reference implementation."""
        from onnx.reference import ReferenceEvaluator

        feeds = {name: v for name, v in zip(node.input, ins, strict=True) if name}
        try:
            evaluator = ReferenceEvaluator(node, opsets={"": self.opset})
            outs = evaluator.run(None, feeds)
        except Exception as exc:  # the reference implementation's errors
            raise self.malformed(f"cannot evaluate it on constants ({_first_line(exc)})") from None
        return [np.asarray(o) for o in outs]

    # -- emitting ----------------------------------------------------------------------------
    def shape(self, v: _Dyn) -> tuple[int, ...]:
        """The ONNX shape of an input-dependent value (a batch of 1)."""
        per = tuple(v.example.shape[1:])
        return (1, *per) if self.batched else per

    def per_sample(self, onnx_shape: Sequence[int]) -> tuple[int, ...]:
        shape = tuple(int(d) for d in onnx_shape)
        if not self.batched:
            return shape
        if not shape or shape[0] != 1:
            raise self.batch_error(f"its result of shape {list(shape)} has no batch axis first")
        return shape[1:]

    def axis(self, v: _Dyn, axis: int) -> int:
        """An ONNX axis of v as a torch axis of the module (the batch axis refused)."""
        rank = len(self.shape(v))
        a = axis + rank if axis < 0 else axis
        if not 0 <= a < rank:
            raise self.malformed(f"axis {axis} is out of range for rank {rank}")
        if self.batched:
            if a == 0:
                raise self.batch_error("it acts along the batch axis")
            return a
        return a + 1

    def fresh(self, hint: str) -> str:
        name = re.sub(r"\W", "_", hint).strip("_") or "node"
        if name[0].isdigit():
            name = f"n{name}"
        if keyword.iskeyword(name):
            name += "_"
        base, k = name, 1
        while name in self.names or hasattr(nn.Module, name) or name == "x":
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name

    def hint(self, suffix: str = "") -> str:
        node = self.current
        base = (node.name or node.op_type.lower()) if node is not None else "const"
        return base + suffix

    def module(self, module: nn.Module, *args: _Dyn, suffix: str = "") -> _Dyn:
        module = module.to(self.dtype)
        name = self.fresh(self.hint(suffix))
        self.root.add_module(name, module)
        node = self.graph.call_module(name, tuple(a.node for a in args))
        with torch.no_grad():
            example = module.eval()(*(a.example for a in args))
        return _Dyn(node, example)

    def constant(self, value: Any) -> Tensor:
        return torch.tensor(np.array(value), dtype=self.dtype)

    def call(self, fn: Callable, args: tuple, kwargs: dict | None = None) -> _Dyn:
        kwargs = kwargs or {}

        def nodes(a: Any) -> Any:
            if isinstance(a, _Dyn):
                return a.node
            if isinstance(a, Tensor):
                name = self.fresh(self.hint("_const"))
                self.root.register_buffer(name, a)
                return self.graph.get_attr(name)
            if isinstance(a, list | tuple):
                return type(a)(nodes(x) for x in a)
            return a

        def examples(a: Any) -> Any:
            if isinstance(a, _Dyn):
                return a.example
            if isinstance(a, list | tuple):
                return type(a)(examples(x) for x in a)
            return a

        node = self.graph.call_function(fn, nodes(args), {k: nodes(v) for k, v in kwargs.items()})
        with torch.no_grad():
            example = fn(*examples(args), **{k: examples(v) for k, v in kwargs.items()})
        return _Dyn(node, example)

    def reshape(self, x: _Dyn, per_sample: Sequence[int]) -> _Dyn:
        per_sample = tuple(int(d) for d in per_sample)
        if tuple(x.example.shape[1:]) == per_sample:
            return x
        if math.prod(per_sample) != math.prod(x.example.shape[1:]):
            raise self.malformed(
                f"cannot reshape {list(self.shape(x))} to a sample of shape {list(per_sample)}"
            )
        if len(per_sample) == 1:
            return self.module(nn.Flatten(), x)
        return self.call(torch.reshape, (x, (-1, *per_sample)))

    def to_rank(self, x: _Dyn, rank: int) -> _Dyn:
        """x with leading axes of size 1 added up to `rank` per-sample axes (broadcasting)."""
        per = tuple(x.example.shape[1:])
        if len(per) >= rank:
            return x
        return self.reshape(x, (1,) * (rank - len(per)) + per)

    # -- element-wise arithmetic -------------------------------------------------------------
    def binary(self, fn: Callable, a: Value, b: Value) -> _Dyn:
        """a (op) b with ONNX broadcasting, at least one of them input-dependent."""
        shapes = [self.shape(v) if isinstance(v, _Dyn) else np.shape(v) for v in (a, b)]
        try:
            out = np.broadcast_shapes(*shapes)
        except ValueError:
            raise self.malformed(
                f"shapes {list(shapes[0])} and {list(shapes[1])} do not broadcast"
            ) from None
        per = self.per_sample(out)
        args = []
        for v in (a, b):
            if isinstance(v, _Dyn):
                args.append(self.to_rank(v, len(per)))
            else:
                c = np.asarray(v)
                c = c.reshape((1,) * (len(out) - c.ndim) + c.shape)
                args.append(self.constant(c[0] if self.batched else c))
        return self.call(fn, tuple(args))

    def op_Add(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        a, b = ins
        for dyn_name, dyn, const in ((node.input[0], a, b), (node.input[1], b, a)):
            if isinstance(dyn, _Dyn) and not isinstance(const, _Dyn):
                fused = self.fuse_bias(dyn_name, dyn, const)
                if fused is not None:
                    return [fused]
        return [self.binary(operator.add, a, b)]

    def fuse_bias(self, name: str, x: _Dyn, const: Any) -> _Dyn | None:
        """MatMul then Add of a bias vector: the bias of the Linear layer."""
        linear = self.fusable.get(name)
        if linear is None or self.uses[name] != 1:
            return None
        c = np.asarray(const)
        n = linear.out_features
        shape = self.shape(x)
        try:
            if np.broadcast_shapes(shape, c.shape) != shape:
                return None
        except ValueError:
            return None
        if c.size != n or c.shape[-1:] != (n,):
            return None
        bias = self.constant(c.reshape(n))
        linear.bias = nn.Parameter(bias)
        self.fusable.pop(name)
        return _Dyn(x.node, x.example + bias)

    def op_Sub(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.binary(operator.sub, *ins)]

    def op_Mul(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.binary(operator.mul, *ins)]

    def op_Div(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.binary(operator.truediv, *ins)]

    def op_Neg(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.call(operator.neg, (ins[0],))]

    # -- activations -------------------------------------------------------------------------
    def op_Relu(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.module(nn.ReLU(), ins[0])]

    def op_LeakyRelu(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.module(nn.LeakyReLU(float(attrs.get("alpha", 0.01))), ins[0])]

    def op_Sigmoid(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.module(nn.Sigmoid(), ins[0])]

    def op_Tanh(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.module(nn.Tanh(), ins[0])]

    def op_Softplus(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.module(nn.Softplus(), ins[0])]

    def op_Identity(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [ins[0]]

    def op_Dropout(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        training = ins[2] if len(ins) > 2 else None
        if isinstance(training, _Dyn) or (training is not None and bool(np.asarray(training))):
            raise self.unsupported("Dropout in training mode")
        return [ins[0]]  # inference: the identity (a mask output is refused by `convert`)

    def op_Cast(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        if _DTYPES.get(int(attrs.get("to", 0))) != self.dtype:
            raise self.unsupported("Cast of an input-dependent tensor to another element type")
        return [ins[0]]

    def op_Shape(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        shape = self.shape(ins[0])
        start, end = attrs.get("start", 0), attrs.get("end", None)
        return [np.array(shape[start:end], dtype=np.int64)]

    def op_Size(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [np.array(math.prod(self.shape(ins[0])), dtype=np.int64)]

    # -- matrix products ---------------------------------------------------------------------
    def linear(self, x: _Dyn, weight: np.ndarray, bias: np.ndarray | None = None) -> _Dyn:
        """x @ weight.T (+ bias) over the last axis, as nn.Linear."""
        out_features, in_features = weight.shape
        layer = nn.Linear(in_features, out_features, bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.constant(weight))
            if bias is not None:
                layer.bias.copy_(self.constant(bias))
        return self.module(layer, x)

    def right_product(self, x: _Dyn, w: Any) -> tuple[_Dyn, nn.Linear | None]:
        """x @ W for a constant W (MatMul semantics); the Linear layer when one was made."""
        w = np.asarray(w)
        shape = self.shape(x)
        if self.batched and len(shape) < 2:
            raise self.batch_error("the product contracts the batch axis")
        if w.ndim == 1:
            if shape[-1] != w.shape[0]:
                raise self.malformed(f"shapes {list(shape)} and {list(w.shape)} do not multiply")
            y = self.linear(x, w[None, :])
            return self.reshape(y, self.per_sample(shape[:-1])), None
        if w.ndim != 2:
            raise self.unsupported(
                f"a product with a constant of rank {w.ndim} (batched matrix products)"
            )
        if shape[-1] != w.shape[0]:
            raise self.malformed(f"shapes {list(shape)} and {list(w.shape)} do not multiply")
        y = self.linear(x, w.T)
        return y, self.root.get_submodule(str(y.node.target))

    def left_product(self, w: Any, x: _Dyn) -> _Dyn:
        """W @ x for a constant matrix W: a Linear layer over the second-last axis of x."""
        w = np.asarray(w)
        shape = self.shape(x)
        if w.ndim != 2:
            raise self.unsupported(f"a product with a constant of rank {w.ndim} on the left")
        m, n = w.shape
        if len(shape) == 1:  # a vector (no batch axis in the graph): W @ x = x @ W^T
            if self.batched:
                raise self.batch_error("the product contracts the batch axis")
            if shape[0] != n:
                raise self.malformed(f"shapes {list(w.shape)} and {list(shape)} do not multiply")
            return self.linear(x, w)
        if self.batched and len(shape) == 2:
            raise self.batch_error("the product contracts the batch axis")
        if shape[-2] != n:
            raise self.malformed(f"shapes {list(w.shape)} and {list(shape)} do not multiply")
        t = self.call(torch.transpose, (x, -1, -2))
        y = self.linear(t, w)
        return self.call(torch.transpose, (y, -1, -2))

    def transposed(self, x: _Dyn) -> _Dyn:
        """The transpose of a 2-d ONNX value (Gemm's transA / transB)."""
        if self.batched:
            raise self.batch_error("it transposes a matrix whose rows are the batch")
        return self.call(torch.transpose, (x, -1, -2))

    def op_MatMul(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        a, b = ins
        if isinstance(a, _Dyn) and isinstance(b, _Dyn):
            raise self.unsupported("a product of two input-dependent tensors has no bound rule")
        if isinstance(a, _Dyn):
            y, layer = self.right_product(a, b)
            if layer is not None:
                self.fusable[node.output[0]] = layer
            return [y]
        return [self.left_product(a, b)]

    def op_Gemm(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        a, b, c = (list(ins) + [None, None])[:3]
        alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
        trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))
        if isinstance(c, _Dyn) or (isinstance(a, _Dyn) and isinstance(b, _Dyn)):
            raise self.unsupported("Gemm with more than one input-dependent operand")
        if isinstance(a, _Dyn):
            x = self.transposed(a) if trans_a else a
            bm = np.asarray(b)
            weight = alpha * (bm if trans_b else bm.T)  # [N, K]: y = x @ weight.T
            if len(self.shape(x)) != 2 or self.shape(x)[-1] != weight.shape[1]:
                raise self.malformed(
                    f"shapes {list(self.shape(a))} and {list(bm.shape)} do not multiply"
                )
            bias = None
            if c is not None:
                cb = beta * np.asarray(c)
                n = weight.shape[0]
                try:
                    fits = np.broadcast_shapes(cb.shape, (1, n)) == (1, n)
                except ValueError:
                    raise self.malformed(
                        f"C of shape {list(cb.shape)} does not broadcast"
                    ) from None
                if fits:
                    bias = np.broadcast_to(cb.reshape((1,) * (2 - cb.ndim) + cb.shape), (1, n))[0]
                    c = None
            y = self.linear(x, weight, bias)
            if c is not None:
                y = self.binary(operator.add, y, beta * np.asarray(c))
            return [y]
        x = self.transposed(b) if trans_b else b
        am = np.asarray(a)
        y = self.left_product(alpha * (am.T if trans_a else am), x)
        if c is not None:
            y = self.binary(operator.add, y, beta * np.asarray(c))
        return [y]

    # -- convolutions and pooling ------------------------------------------------------------
    def spatial(self, x: _Dyn, kernel: Sequence[int], attrs: dict) -> tuple[list, list, list]:
        """(strides, pads before, pads after) per spatial axis, auto_pad resolved."""
        nd = len(kernel)
        strides = list(attrs.get("strides", [1] * nd))
        dilations = list(attrs.get("dilations", [1] * nd))
        pads = list(attrs.get("pads", [0] * (2 * nd)))
        auto = attrs.get("auto_pad", "NOTSET")
        sizes = self.shape(x)[2:]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            pads = [0] * (2 * nd)
            for i in range(nd):
                out = -(-sizes[i] // strides[i])
                total = max(
                    0, (out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - sizes[i]
                )
                small, large = total // 2, total - total // 2
                pads[i], pads[nd + i] = (small, large) if auto == "SAME_UPPER" else (large, small)
        elif auto == "VALID":
            pads = [0] * (2 * nd)
        elif auto != "NOTSET":
            raise self.malformed(f"unknown auto_pad {auto!r}")
        return strides, pads[:nd], pads[nd:]

    def image(self, x: _Dyn, nd: int) -> tuple[_Dyn, bool]:
        """x as [B, C, H, W] for a 2-d operation; a 1-d one ([N, C, L]) gets H = 1."""
        shape = self.shape(x)
        if nd not in (1, 2):
            raise self.unsupported(f"{nd}-d {self.current.op_type}; 1-d and 2-d are supported")
        if not self.batched or len(shape) != nd + 2:
            raise self.batch_error(
                f"it needs an [N, C, ...] input with the batch as N, got shape {list(shape)}"
            )
        if nd == 1:
            return self.reshape(x, (shape[1], 1, shape[2])), True
        return x, False

    def op_Conv(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        x, w, b = (list(ins) + [None])[:3]
        if isinstance(w, _Dyn) or isinstance(b, _Dyn) or not isinstance(x, _Dyn):
            raise self.unsupported("a convolution with input-dependent weights")
        w = np.asarray(w)
        nd = w.ndim - 2
        kernel = list(attrs.get("kernel_shape", w.shape[2:]))
        img, lifted = self.image(x, nd)
        strides, before, after = self.spatial(x, kernel, attrs)
        dilations = list(attrs.get("dilations", [1] * nd))
        groups = int(attrs.get("group", 1))
        channels = self.shape(x)[1]
        if w.shape[1] * groups != channels or w.shape[0] % groups:
            raise self.malformed(
                f"weights {list(w.shape)} with group={groups} do not fit {channels} channels"
            )
        if lifted:
            w = w[:, :, None, :]
            kernel, strides, dilations = [1, *kernel], [1, *strides], [1, *dilations]
            before, after = [0, *before], [0, *after]
        padding: Any = tuple(before)
        if before != after:
            img = self.call(F.pad, (img, (before[1], after[1], before[0], after[0])))
            padding = (0, 0)
        conv = nn.Conv2d(
            channels,
            w.shape[0],
            tuple(kernel),
            stride=tuple(strides),
            padding=padding,
            dilation=tuple(dilations),
            groups=groups,
            bias=b is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(self.constant(w))
            if b is not None:
                conv.bias.copy_(self.constant(b))
        y = self.module(conv, img)
        if lifted:
            out = y.example.shape[1:]
            y = self.reshape(y, (out[0], out[2]))
        return [y]

    def pool(self, x: _Dyn, attrs: dict, average: bool) -> _Dyn:
        kernel = list(attrs["kernel_shape"]) if "kernel_shape" in attrs else None
        if kernel is None:
            raise self.malformed("no kernel_shape")
        nd = len(kernel)
        img, lifted = self.image(x, nd)
        strides, before, after = self.spatial(x, kernel, attrs)
        dilations = list(attrs.get("dilations", [1] * nd))
        ceil = bool(attrs.get("ceil_mode", 0))
        if lifted:
            kernel, strides, dilations = [1, *kernel], [1, *strides], [1, *dilations]
            before, after = [0, *before], [0, *after]
        include = bool(attrs.get("count_include_pad", 0))
        if before != after:
            if not (average and include):
                raise self.unsupported(
                    "asymmetric padding in a pooling layer (supported for AveragePool with "
                    "count_include_pad=1 only)"
                )
            img = self.call(F.pad, (img, (before[1], after[1], before[0], after[0])))
            before = after = [0, 0]
        if any(p > k // 2 for p, k in zip(before, kernel, strict=True)):
            raise self.unsupported(f"pads {before} larger than half the kernel {kernel}")
        layer: nn.Module
        if average:
            if any(d != 1 for d in dilations):
                raise self.unsupported("AveragePool with dilations")
            layer = nn.AvgPool2d(
                tuple(kernel), tuple(strides), tuple(before), ceil, count_include_pad=include
            )
        else:
            layer = nn.MaxPool2d(
                tuple(kernel), tuple(strides), tuple(before), tuple(dilations), ceil_mode=ceil
            )
        y = self.module(layer, img)
        if lifted:
            out = y.example.shape[1:]
            y = self.reshape(y, (out[0], out[2]))
        return y

    def op_AveragePool(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.pool(ins[0], attrs, average=True)]

    def op_MaxPool(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        return [self.pool(ins[0], attrs, average=False)]

    def op_GlobalAveragePool(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        shape = self.shape(ins[0])
        return [self.pool(ins[0], {"kernel_shape": shape[2:]}, average=True)]

    def op_GlobalMaxPool(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        shape = self.shape(ins[0])
        return [self.pool(ins[0], {"kernel_shape": shape[2:]}, average=False)]

    def op_BatchNormalization(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        x, *params = ins[:5]
        if any(isinstance(p, _Dyn) or p is None for p in params):
            raise self.unsupported("BatchNormalization with input-dependent statistics")
        if int(attrs.get("training_mode", 0)):
            raise self.unsupported("BatchNormalization in training mode")
        scale, bias, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
        eps = float(attrs.get("epsilon", 1e-5))
        shape = self.shape(x)
        if len(shape) < 2:
            raise self.malformed(f"input of shape {list(shape)} has no channel axis")
        # Inference: y = (x - mean) / sqrt(var + eps) * scale + bias = x * s + t per channel.
        s = scale / np.sqrt(var + eps)
        t = bias - mean * s
        channel = (1, shape[1]) + (1,) * (len(shape) - 2)
        y = self.binary(operator.mul, x, s.reshape(channel))
        return [self.binary(operator.add, y, t.reshape(channel))]

    # -- shapes ------------------------------------------------------------------------------
    def op_Flatten(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        x = ins[0]
        shape = self.shape(x)
        axis = int(attrs.get("axis", 1))
        a = axis + len(shape) if axis < 0 else axis
        if not 0 <= a <= len(shape):
            raise self.malformed(f"axis {axis} is out of range for rank {len(shape)}")
        out = (math.prod(shape[:a]), math.prod(shape[a:]))
        return [self.reshape(x, self.per_sample(out))]

    def op_Reshape(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        x = ins[0]
        target = ins[1] if len(ins) > 1 else attrs.get("shape")
        if isinstance(target, _Dyn) or target is None:
            raise self.unsupported("a Reshape to an input-dependent shape")
        shape = self.shape(x)
        dims = [int(d) for d in np.asarray(target).reshape(-1)]
        if not int(attrs.get("allowzero", 0)):
            dims = [shape[i] if d == 0 else d for i, d in enumerate(dims)]
        if dims.count(-1) > 1:
            raise self.malformed(f"shape {dims} has more than one -1")
        if -1 in dims:
            known = math.prod(d for d in dims if d != -1)
            if known == 0 or math.prod(shape) % known:
                raise self.malformed(f"cannot reshape {list(shape)} to {dims}")
            dims[dims.index(-1)] = math.prod(shape) // known
        if math.prod(dims) != math.prod(shape):
            raise self.malformed(f"cannot reshape {list(shape)} to {dims}")
        return [self.reshape(x, self.per_sample(dims))]

    def axes_of(self, ins: list[Value], attrs: dict) -> list[int] | None:
        axes = ins[1] if len(ins) > 1 and ins[1] is not None else attrs.get("axes")
        if isinstance(axes, _Dyn):
            raise self.unsupported("input-dependent axes")
        return None if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]

    def op_Squeeze(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        x = ins[0]
        shape = self.shape(x)
        axes = self.axes_of(ins, attrs)
        if axes is None:
            drop = {i for i, d in enumerate(shape) if d == 1}
        else:
            drop = {a + len(shape) if a < 0 else a for a in axes}
            if any(shape[a] != 1 for a in drop):
                raise self.malformed(f"cannot squeeze axes {axes} of {list(shape)}")
        out = [d for i, d in enumerate(shape) if i not in drop]
        return [self.reshape(x, self.per_sample(out))]

    def op_Unsqueeze(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        x = ins[0]
        shape = self.shape(x)
        axes = self.axes_of(ins, attrs)
        if axes is None:
            raise self.malformed("no axes")
        rank = len(shape) + len(axes)
        where = sorted(a + rank if a < 0 else a for a in axes)
        out = list(shape)
        for a in where:
            out.insert(a, 1)
        return [self.reshape(x, self.per_sample(out))]

    def op_Transpose(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        x = ins[0]
        rank = len(self.shape(x))
        perm = [int(p) for p in attrs.get("perm", list(reversed(range(rank))))]
        if sorted(perm) != list(range(rank)):
            raise self.malformed(f"perm {perm} is not a permutation of {rank} axes")
        if self.batched:
            if perm[0] != 0:
                raise self.batch_error(f"perm {perm} moves the batch axis")
            dims = tuple(perm)
        else:
            dims = (0, *(p + 1 for p in perm))
        if dims == tuple(range(len(dims))):
            return [x]
        return [self.call(torch.permute, (x, dims))]

    def op_Concat(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        if not all(isinstance(v, _Dyn) for v in ins):
            raise self.unsupported(
                "a Concat of constants with input-dependent tensors (every input must depend "
                "on the network's input)"
            )
        dim = self.axis(ins[0], int(attrs["axis"]))
        return [self.call(torch.cat, (list(ins), dim))]

    def op_Pad(self, node: Any, ins: list[Value], attrs: dict) -> list[Value]:
        x = ins[0]
        if attrs.get("mode", "constant") != "constant":
            raise self.unsupported(f"Pad mode {attrs['mode']!r} (constant padding only)")
        pads = ins[1] if len(ins) > 1 else attrs.get("pads")
        value = ins[2] if len(ins) > 2 else attrs.get("value", 0.0)
        if any(isinstance(v, _Dyn) for v in (pads, value)) or (len(ins) > 3 and ins[3] is not None):
            raise self.unsupported("Pad with input-dependent pads or with axes")
        pads = [int(p) for p in np.asarray(pads).reshape(-1)]
        value = 0.0 if value is None or np.asarray(value).size == 0 else float(np.asarray(value))
        rank = len(self.shape(x))
        if len(pads) != 2 * rank:
            raise self.malformed(f"{len(pads)} pads for rank {rank}")
        if any(p < 0 for p in pads):
            raise self.unsupported("negative pads (cropping)")
        begin, end = pads[:rank], pads[rank:]
        if self.batched:
            if begin[0] or end[0]:
                raise self.batch_error("it pads the batch axis")
            begin, end = begin[1:], end[1:]
        flat: list[int] = []
        for b, e in zip(reversed(begin), reversed(end), strict=True):
            flat += [b, e]
        while flat and flat[-2:] == [0, 0]:
            flat = flat[:-2]
        if not flat:
            return [x]
        return [self.call(F.pad, (x, tuple(flat)), {"mode": "constant", "value": value})]


# -- the comparison with onnxruntime -------------------------------------------------------------


def _check_with_onnxruntime(module: fx.GraphModule, model: Any, path: Path) -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        log.info("%s: onnxruntime is not installed; the conversion is not compared with it", path)
        return
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # onnxruntime's own exception types
        raise OnnxImportError(f"{path}: onnxruntime cannot load it ({_first_line(exc)})") from None
    name = session.get_inputs()[0].name
    dtype = torch.float64 if module.onnx_input_shape and _is_double(session) else torch.float32
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(CHECK_SAMPLES, *module.input_shape, generator=gen, dtype=dtype)
    with torch.no_grad():
        ours = module(x).reshape(CHECK_SAMPLES, -1).double()
    for k in range(CHECK_SAMPLES):
        feed = x[k].numpy().reshape(module.onnx_input_shape)
        ref = torch.from_numpy(np.asarray(session.run(None, {name: feed})[0])).double().reshape(-1)
        scale = max(1.0, float(ref.abs().max()))
        diff = float((ours[k] - ref).abs().max())
        if diff > CHECK_RTOL * scale:
            raise ConversionMismatchError(
                f"{path}: the converted network differs from onnxruntime by {diff:.3g} on a "
                "random input; this is a bug in propdsl's ONNX converter, please report it"
            )


def _is_double(session: Any) -> bool:
    return session.get_inputs()[0].type == "tensor(double)"
