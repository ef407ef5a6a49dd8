"""ONNX networks in (`load_onnx`): every converted graph computes what onnxruntime computes.

* small graphs built with onnx.helper, one or a few operators each (Gemm with transA / transB /
  alpha / beta, MatMul on either side, arithmetic with constants, activations, Conv with pads /
  strides / groups / dilations / auto_pad, Flatten, Reshape (also from a computed shape),
  Transpose, Concat, AveragePool, BatchNormalization, MaxPool, ...) match onnxruntime on random
  inputs, batch by batch, and the bound engine's IBP / CROWN bounds on each contain onnxruntime's
  outputs on sampled points of a box (soundness against a second implementation);
* every network of the VNN-COMP 2021 set loads and matches onnxruntime (skipped without it);
* unsupported operators, batch-mixing graphs and malformed files are clear errors that name the
  node, and a converter mistake is caught by the load-time comparison.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from _vnncomp import require_vnncomp  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import propdsl  # noqa: E402
from propdsl.errors import UsageError  # noqa: E402
from propdsl.interop import onnx_import  # noqa: E402
from propdsl.interop.onnx_import import (  # noqa: E402
    ConversionMismatchError,
    OnnxImportError,
    UnsupportedOperatorError,
    load_onnx,
    onnx_forward,
)
from propdsl.loss.attacks import PGD, run_attack  # noqa: E402
from propdsl.region import Region  # noqa: E402
from propdsl.verify import UnsupportedLayerError  # noqa: E402

TOL = 1e-5


# -- building graphs -----------------------------------------------------------------------------


def _arr(rng: np.random.Generator, *shape: int, scale: float = 0.5) -> np.ndarray:
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def save_graph(path: Path, nodes, in_shape, inits: dict, opset: int = 13, out: str = "y") -> Path:
    """A single-input, single-output float32 graph (initialisers: name -> array); the output's
    shape is found by onnx's reference implementation (a symbolic batch stays symbolic)."""

    def make(out_shape) -> onnx.ModelProto:
        graph = helper.make_graph(
            nodes,
            path.stem,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
            [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 7
        return model

    feed = np.zeros([1 if isinstance(d, str) else d for d in in_shape], np.float32)
    (y,) = ReferenceEvaluator(make(None)).run(None, {"x": feed})
    out_shape = list(y.shape)
    if in_shape and isinstance(in_shape[0], str):
        out_shape[0] = in_shape[0]
    model = make(out_shape)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def N(op: str, ins: list[str], outs: list[str] | str, **attrs) -> onnx.NodeProto:
    outs = [outs] if isinstance(outs, str) else outs
    return helper.make_node(op, ins, outs, name=f"{op.lower()}_{outs[0]}", **attrs)


def _mlp_tail(rng, h: str, width: int, out: int = 3) -> tuple[list, dict]:
    """Gemm to `out` outputs from a [1, width] value h."""
    return [N("Gemm", [h, "Wt", "bt"], "y", transB=1)], {
        "Wt": _arr(rng, out, width),
        "bt": _arr(rng, out),
    }


def case_gemm_transB_bias(rng):
    nodes = [N("Gemm", ["x", "W", "b"], "h", transB=1), N("Relu", ["h"], "r")]
    tail, inits = _mlp_tail(rng, "r", 5)
    return nodes + tail, ["N", 4], {"W": _arr(rng, 5, 4), "b": _arr(rng, 5), **inits}, 13


def case_gemm_alpha_beta(rng):
    nodes = [N("Gemm", ["x", "W", "C"], "y", alpha=0.5, beta=2.0)]
    return nodes, [1, 4], {"W": _arr(rng, 4, 3), "C": _arr(rng, 1, 3)}, 9


def case_gemm_scalar_c(rng):
    nodes = [N("Gemm", ["x", "W", "C"], "y", beta=-1.5, transB=1)]
    return nodes, [1, 4], {"W": _arr(rng, 3, 4), "C": np.array(0.7, np.float32)}, 13


def case_gemm_matrix_c_without_batch(rng):
    # input [2, 4]: no batch axis (its first dimension is not 1); C is added row by row
    nodes = [N("Gemm", ["x", "W", "C"], "y", beta=0.5)]
    return nodes, [2, 4], {"W": _arr(rng, 4, 3), "C": _arr(rng, 2, 3)}, 13


def case_gemm_transA(rng):
    nodes = [N("Gemm", ["x", "W"], "y", transA=1, alpha=2.0)]
    return nodes, [4, 2], {"W": _arr(rng, 4, 3)}, 13


def case_gemm_constant_left(rng):
    nodes = [N("Gemm", ["A", "x", "c"], "y", transB=1, transA=1)]
    return nodes, [2, 4], {"A": _arr(rng, 4, 3), "c": _arr(rng, 3, 1)}, 13


def case_matmul_right_fused_bias(rng):
    nodes = [
        N("MatMul", ["x", "W1"], "m1"),
        N("Add", ["m1", "b1"], "h1"),
        N("Relu", ["h1"], "r1"),
        N("MatMul", ["r1", "W2"], "m2"),
        N("Add", ["b2", "m2"], "y"),
    ]
    inits = {
        "W1": _arr(rng, 5, 6),
        "b1": _arr(rng, 6),
        "W2": _arr(rng, 6, 3),
        "b2": _arr(rng, 1, 3),
    }
    return nodes, ["N", 5], inits, 13


def case_matmul_left_vector(rng):
    # VNN-COMP's test_tiny style: input [5] without a batch axis, W @ x
    nodes = [
        N("MatMul", ["W1", "x"], "m1"),
        N("Add", ["m1", "b1"], "h1"),
        N("Relu", ["h1"], "r1"),
        N("MatMul", ["W2", "r1"], "y"),
    ]
    return nodes, [5], {"W1": _arr(rng, 4, 5), "b1": _arr(rng, 4), "W2": _arr(rng, 2, 4)}, 14


def case_matmul_left_matrix(rng):
    nodes = [N("MatMul", ["W", "x"], "m"), N("Relu", ["m"], "y")]
    return nodes, [1, 2, 5], {"W": _arr(rng, 3, 2)}, 13


def case_matmul_rank3_and_vector(rng):
    nodes = [N("MatMul", ["x", "W"], "m"), N("Tanh", ["m"], "t"), N("MatMul", ["t", "v"], "y")]
    return nodes, ["N", 2, 5], {"W": _arr(rng, 5, 4), "v": _arr(rng, 4)}, 13


def case_arithmetic_with_constants(rng):
    nodes = [
        N("Sub", ["x", "c1"], "a"),
        N("Mul", ["c2", "a"], "b"),
        N("Div", ["b", "c3"], "c"),
        N("Sub", ["c4", "c"], "d"),
        N("Add", ["d", "c5"], "e"),
        N("Neg", ["e"], "f"),
        N("Mul", ["f", "c6"], "y"),
    ]
    inits = {
        "c1": _arr(rng, 1, 3, 1, 1),
        "c2": np.array(1.5, np.float32),
        "c3": np.array([2.0, -4.0], np.float32),
        "c4": _arr(rng, 3, 1, 1),
        "c5": _arr(rng, 1, 1, 1, 2),
        "c6": _arr(rng, 2, 2),
    }
    return nodes, [1, 3, 2, 2], inits, 13


def case_residual(rng):
    nodes = [
        N("Gemm", ["x", "W1", "b1"], "h", transB=1),
        N("Relu", ["h"], "r"),
        N("Gemm", ["x", "W2"], "s", transB=1),
        N("Add", ["r", "s"], "t"),
        N("Sub", ["t", "r"], "u"),
        N("Gemm", ["u", "W3"], "y", transB=1),
    ]
    inits = {
        "W1": _arr(rng, 4, 3),
        "b1": _arr(rng, 4),
        "W2": _arr(rng, 4, 3),
        "W3": _arr(rng, 2, 4),
    }
    return nodes, ["N", 3], inits, 13


def case_activations(rng):
    nodes = [
        N("Gemm", ["x", "W1"], "a", transB=1),
        N("Sigmoid", ["a"], "b"),
        N("Gemm", ["b", "W2"], "c", transB=1),
        N("Tanh", ["c"], "d"),
        N("Gemm", ["d", "W3"], "e", transB=1),
        N("LeakyRelu", ["e"], "f", alpha=0.2),
        N("Gemm", ["f", "W4"], "y", transB=1),
    ]
    inits = {f"W{k}": _arr(rng, 4, 4, scale=1.0) for k in range(1, 5)}
    return nodes, [1, 4], inits, 13


def _conv_head(rng, name: str, features: int) -> tuple[list, dict]:
    nodes = [N("Flatten", [name], "flat"), N("Gemm", ["flat", "Wh"], "y", transB=1)]
    return nodes, {"Wh": _arr(rng, 3, features, scale=0.3)}


def case_conv_pads_strides(rng):
    nodes = [
        N("Conv", ["x", "W", "b"], "c", pads=[1, 1, 1, 1], strides=[2, 2]),
        N("Relu", ["c"], "r"),
    ]
    head, inits = _conv_head(rng, "r", 4 * 3 * 3)
    return (
        nodes + head,
        ["N", 2, 6, 6],
        {"W": _arr(rng, 4, 2, 3, 3), "b": _arr(rng, 4), **inits},
        13,
    )


def case_conv_groups_dilations(rng):
    nodes = [N("Conv", ["x", "W"], "c", group=2, dilations=[2, 2]), N("Relu", ["c"], "r")]
    head, inits = _conv_head(rng, "r", 4 * 3 * 3)
    return nodes + head, [1, 4, 7, 7], {"W": _arr(rng, 4, 2, 3, 3), **inits}, 13


def case_conv_asymmetric_pads(rng):
    nodes = [N("Conv", ["x", "W", "b"], "c", pads=[0, 1, 1, 0]), N("Sigmoid", ["c"], "r")]
    head, inits = _conv_head(rng, "r", 3 * 5 * 5)
    return nodes + head, [1, 2, 5, 5], {"W": _arr(rng, 3, 2, 2, 2), "b": _arr(rng, 3), **inits}, 13


def case_conv_same_upper(rng):
    nodes = [
        N("Conv", ["x", "W"], "c", auto_pad="SAME_UPPER", strides=[2, 2]),
        N("Relu", ["c"], "r"),
    ]
    head, inits = _conv_head(rng, "r", 3 * 3 * 3)
    return nodes + head, [1, 2, 5, 5], {"W": _arr(rng, 3, 2, 2, 2), **inits}, 13


def case_conv1d_maxpool1d(rng):
    nodes = [
        N("Conv", ["x", "W", "b"], "c", pads=[1, 1]),
        N("Relu", ["c"], "r"),
        N("MaxPool", ["r"], "p", kernel_shape=[2], strides=[2]),
    ]
    head, inits = _conv_head(rng, "p", 3 * 4)
    return nodes + head, [1, 2, 8], {"W": _arr(rng, 3, 2, 3), "b": _arr(rng, 3), **inits}, 13


def case_flatten_axis0(rng):
    nodes = [N("Flatten", ["x"], "f", axis=0), N("Gemm", ["f", "W"], "y", transB=1)]
    return nodes, [1, 2, 3], {"W": _arr(rng, 2, 6)}, 11


def case_flatten_inner_axis_without_batch(rng):
    # Flatten(axis=2) of [1, 2, 3, 4] is [2, 12]: the leading 1 is no batch axis here
    nodes = [N("Flatten", ["x"], "f", axis=2), N("MatMul", ["f", "W"], "y")]
    return nodes, [1, 2, 3, 4], {"W": _arr(rng, 12, 3)}, 13


def case_reshape_transpose(rng):
    nodes = [
        N("Reshape", ["x", "s1"], "a"),
        N("Transpose", ["a"], "b", perm=[0, 2, 1]),
        N("Relu", ["b"], "c"),
        N("Reshape", ["c", "s2"], "d"),
        N("Gemm", ["d", "W"], "y", transB=1),
    ]
    inits = {"s1": _i64(-1, 3, 4), "s2": _i64(0, 12), "W": _arr(rng, 2, 12)}
    return nodes, ["N", 12], inits, 13


def case_reshape_from_computed_shape(rng):
    # torch.onnx's `x.view(x.size(0), -1)`: Shape -> Gather -> Unsqueeze -> Concat -> Reshape
    nodes = [
        N("Shape", ["x"], "s"),
        N("Gather", ["s", "zero"], "n", axis=0),
        N("Unsqueeze", ["n", "axes"], "n1"),
        N("Concat", ["n1", "minus1"], "shape", axis=0),
        N("Reshape", ["x", "shape"], "flat"),
        N("Gemm", ["flat", "W"], "y", transB=1),
    ]
    inits = {
        "zero": np.array(0, np.int64),
        "axes": _i64(0),
        "minus1": _i64(-1),
        "W": _arr(rng, 2, 12),
    }
    return nodes, ["N", 3, 4], inits, 13


def case_transpose_4d(rng):
    nodes = [N("Transpose", ["x"], "t", perm=[0, 3, 1, 2]), N("Sigmoid", ["t"], "y")]
    return nodes, [1, 2, 3, 4], {}, 13


def case_concat(rng):
    nodes = [
        N("Relu", ["x"], "a"),
        N("Gemm", ["x", "W"], "g", transB=1),
        N("Sigmoid", ["g"], "b"),
        N("Concat", ["a", "b", "a"], "c", axis=-1),
        N("Gemm", ["c", "W2"], "y", transB=1),
    ]
    return nodes, ["N", 4], {"W": _arr(rng, 3, 4), "W2": _arr(rng, 2, 11)}, 13


def case_averagepool(rng):
    nodes = [
        N("AveragePool", ["x"], "a", kernel_shape=[2, 2], strides=[2, 2]),
        N("AveragePool", ["x"], "b", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        N("AveragePool", ["x"], "c", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
        N("AveragePool", ["x"], "d", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        N("Flatten", ["a"], "fa"),
        N("Flatten", ["b"], "fb"),
        N("Flatten", ["c"], "fc"),
        N("Flatten", ["d"], "fd"),
        N("Concat", ["fa", "fb", "fc", "fd"], "y", axis=1),
    ]
    return nodes, [1, 2, 6, 6], {}, 13


def case_batchnorm(rng):
    nodes = [
        N("Conv", ["x", "W"], "c", pads=[1, 1, 1, 1]),
        N("BatchNormalization", ["c", "s", "B", "m", "v"], "n", epsilon=1e-3),
        N("Relu", ["n"], "r"),
        N("Flatten", ["r"], "f"),
        N("Gemm", ["f", "W2"], "g", transB=1),
        N("BatchNormalization", ["g", "s2", "B2", "m2", "v2"], "y"),
    ]
    inits = {
        "W": _arr(rng, 3, 1, 3, 3),
        "s": _arr(rng, 3) + 1,
        "B": _arr(rng, 3),
        "m": _arr(rng, 3),
        "v": np.abs(_arr(rng, 3)) + 0.5,
        "W2": _arr(rng, 2, 48, scale=0.2),
        "s2": _arr(rng, 2) + 1,
        "B2": _arr(rng, 2),
        "m2": _arr(rng, 2),
        "v2": np.abs(_arr(rng, 2)) + 0.5,
    }
    return nodes, [1, 1, 4, 4], inits, 13


def case_maxpool(rng):
    nodes = [
        N("Conv", ["x", "W"], "c"),
        N("MaxPool", ["c"], "a", kernel_shape=[2, 2], strides=[2, 2]),
        N("MaxPool", ["c"], "b", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
        N("MaxPool", ["c"], "d", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
        N("MaxPool", ["c"], "e", kernel_shape=[2, 2], dilations=[2, 2]),
        N("Flatten", ["a"], "fa"),
        N("Flatten", ["b"], "fb"),
        N("Flatten", ["d"], "fd"),
        N("Flatten", ["e"], "fe"),
        N("Concat", ["fa", "fb", "fd", "fe"], "y", axis=1),
    ]
    return nodes, [1, 1, 7, 7], {"W": _arr(rng, 2, 1, 2, 2, scale=1.0)}, 13


def case_global_pools(rng):
    nodes = [
        N("Conv", ["x", "W"], "c"),
        N("GlobalAveragePool", ["c"], "a"),
        N("GlobalMaxPool", ["c"], "b"),
        N("Concat", ["a", "b"], "y", axis=1),
    ]
    return nodes, [1, 2, 4, 4], {"W": _arr(rng, 3, 2, 2, 2)}, 13


def case_squeeze_unsqueeze_pad(rng):
    nodes = [
        N("Unsqueeze", ["x"], "u", axes=[2]),
        N("Pad", ["u"], "p", pads=[0, 0, 0, 1, 0, 0, 0, 2], value=0.5),
        N("Squeeze", ["p"], "s", axes=[2]),
        N("Tanh", ["s"], "y"),
    ]
    return nodes, [1, 3, 4], {}, 10


def case_constant_dropout_identity(rng):
    nodes = [
        helper.make_node(
            "Constant", [], ["k"], name="const_k", value=numpy_helper.from_array(_arr(rng, 4))
        ),
        N("Add", ["x", "k"], "a"),
        N("Dropout", ["a"], "d"),
        N("Identity", ["d"], "y"),
    ]
    return nodes, ["N", 4], {}, 13


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def build(tmp_path: Path, name: str, seed: int = 0) -> Path:
    nodes, shape, inits, opset = CASES[name](np.random.default_rng(seed))
    return save_graph(tmp_path / f"{name}.onnx", nodes, shape, inits, opset)


# -- onnxruntime as the reference ----------------------------------------------------------------


def ort_outputs(path: Path, model, x: torch.Tensor) -> np.ndarray:
    """onnxruntime's outputs [B, n] on the samples x [B, *input_shape]."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    shape = model.onnx_input_shape
    outs = [
        session.run(None, {name: x[k].numpy().reshape(shape)})[0].reshape(-1)
        for k in range(x.shape[0])
    ]
    return np.stack(outs)


def assert_matches(path: Path, model, x: torch.Tensor) -> None:
    ref = ort_outputs(path, model, x)
    with torch.no_grad():
        ours = model(x).reshape(x.shape[0], -1).numpy()
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    diff = float(np.abs(ours - ref).max())
    assert diff <= TOL * scale, f"{path.name}: differs from onnxruntime by {diff:.3g}"


# -- every operator matches onnxruntime ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_operator_matches_onnxruntime(tmp_path: Path, name: str) -> None:
    path = build(tmp_path, name)
    model = load_onnx(path, check=False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, *model.input_shape, generator=gen)
    assert_matches(path, model, x)
    assert model.num_outputs == math.prod(model.output_shape)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_contain_onnxruntime_outputs(tmp_path: Path, name: str, method: str) -> None:
    path = build(tmp_path, name)
    model = load_onnx(path, check=False)
    gen = torch.Generator().manual_seed(4)
    centre = torch.randn(1, *model.input_shape, generator=gen)
    eps = 0.2
    lb, ub = propdsl.bounds(model, centre - eps, centre + eps, method=method)
    points = centre + eps * (2 * torch.rand(120, *model.input_shape, generator=gen) - 1)
    corners = centre + eps * torch.sign(torch.randn(40, *model.input_shape, generator=gen))
    ref = ort_outputs(path, model, torch.cat([points, corners]))
    lb, ub = lb.detach().reshape(1, -1).numpy(), ub.detach().reshape(1, -1).numpy()
    assert (ref >= lb - TOL).all() and (ref <= ub + TOL).all(), f"{name} {method}: unsound"
    assert (ub - lb).max() < 1e3  # and not vacuous


def test_matmul_then_add_becomes_one_linear_layer(tmp_path: Path) -> None:
    model = load_onnx(build(tmp_path, "matmul_right_fused_bias"))
    kinds = [type(m).__name__ for m in model.children()]
    assert kinds == ["Linear", "ReLU", "Linear"]
    assert all(m.bias is not None for m in model.children() if isinstance(m, torch.nn.Linear))


def test_graphs_without_batch_axis_take_the_onnx_shape_per_sample(tmp_path: Path) -> None:
    model = load_onnx(build(tmp_path, "matmul_left_vector"))
    assert model.input_shape == (5,) and model.output_shape == (2,)
    model = load_onnx(build(tmp_path, "flatten_inner_axis_without_batch"))
    assert model.input_shape == (1, 2, 3, 4) and model.output_shape == (2, 3)
    model = load_onnx(build(tmp_path, "conv_pads_strides"))  # symbolic batch
    assert model.input_shape == (2, 6, 6) and model.onnx_input_shape == (1, 2, 6, 6)


def test_float64_graphs_stay_float64(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [N("MatMul", ["x", "W"], "y")],
        "f64",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 2])],
        [numpy_helper.from_array(np.arange(6.0).reshape(3, 2), "W")],
    )
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model_proto.ir_version = 7
    path = tmp_path / "f64.onnx"
    onnx.save(model_proto, str(path))
    model = load_onnx(path)
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert model(x).dtype == torch.float64
    assert model(x).tolist() == [[16.0, 22.0]]  # [1, 2, 3] @ [[0, 1], [2, 3], [4, 5]]


# -- errors --------------------------------------------------------------------------------------


def test_unsupported_operator_names_the_operator_and_the_node(tmp_path: Path) -> None:
    nodes = [N("Gemm", ["x", "W"], "h", transB=1), N("Softmax", ["h"], "y", axis=1)]
    path = save_graph(tmp_path / "softmax.onnx", nodes, [1, 3], {"W": np.ones((2, 3), np.float32)})
    with pytest.raises(UnsupportedOperatorError, match=r"node 'softmax_y' \(Softmax\).*Softmax"):
        load_onnx(path)
    # both a usage error (exit code 2) and an unsupported-layer error
    with pytest.raises(UsageError):
        load_onnx(path)
    with pytest.raises(UnsupportedLayerError):
        load_onnx(path)


def test_loop_is_unsupported(tmp_path: Path) -> None:
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep"),
            helper.make_node("Add", ["v_in", "one"], ["v_out"], name="step"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 2]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 2]),
        ],
        [numpy_helper.from_array(np.ones((1, 2), np.float32), "one")],
    )
    loop = helper.make_node("Loop", ["M", "cond", "x"], ["y"], name="the_loop", body=body)
    inits = {"M": np.array(3, np.int64), "cond": np.array(True)}
    path = save_graph(tmp_path / "loop.onnx", [loop], [1, 2], inits)
    with pytest.raises(UnsupportedOperatorError, match=r"node 'the_loop' \(Loop\).*operator Loop"):
        load_onnx(path)


def test_a_graph_that_mixes_the_batch_axis_is_refused(tmp_path: Path) -> None:
    # [1, 2, 4, 4] reshaped to [2, 1, 4, 4]: the two channels become two images
    nodes = [N("Reshape", ["x", "s"], "r"), N("Conv", ["r", "W"], "y")]
    inits = {"s": _i64(2, 1, 4, 4), "W": np.ones((1, 1, 2, 2), np.float32)}
    path = save_graph(tmp_path / "mix.onnx", nodes, [1, 2, 4, 4], inits)
    with pytest.raises(UnsupportedOperatorError, match=r"node 'reshape_r' \(Reshape\).*batch"):
        load_onnx(path)


def test_products_of_input_dependent_tensors_are_refused(tmp_path: Path) -> None:
    path = save_graph(tmp_path / "square.onnx", [N("MatMul", ["x", "x"], "y")], [1, 1], {})
    with pytest.raises(UnsupportedOperatorError, match="product of two input-dependent"):
        load_onnx(path)


def test_several_inputs_are_refused(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [N("Add", ["a", "b"], "y")],
        "two",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 2]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, 2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    path = tmp_path / "two.onnx"
    onnx.save(model, str(path))
    with pytest.raises(UnsupportedOperatorError, match="2 inputs"):
        load_onnx(path)


def test_malformed_and_missing_files_are_usage_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \x00\xff\x13")
    with pytest.raises(OnnxImportError, match=r"junk\.onnx: not an ONNX model"):
        load_onnx(junk)
    with pytest.raises(OnnxImportError, match="no such ONNX file"):
        load_onnx(tmp_path / "absent.onnx")
    with pytest.raises(OnnxImportError, match="no such ONNX file"):
        onnx_forward(tmp_path / "absent.onnx", [0.0])
    # a graph that refers to a value nobody defines fails onnx's checker
    graph = helper.make_graph(
        [N("Relu", ["nowhere"], "y")],
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    bad = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph), str(bad))
    with pytest.raises(OnnxImportError, match=r"bad\.onnx: not a valid ONNX model"):
        load_onnx(bad)


def test_a_converter_mistake_is_caught_by_the_comparison_with_onnxruntime(
    tmp_path: Path, monkeypatch
) -> None:
    path = build(tmp_path, "gemm_transB_bias")
    load_onnx(path)  # the honest converter passes

    def wrong_relu(self, node, ins, attrs):
        return [self.module(torch.nn.Tanh(), ins[0])]

    monkeypatch.setattr(onnx_import._Converter, "op_Relu", wrong_relu)
    with pytest.raises(ConversionMismatchError, match="differs from onnxruntime"):
        load_onnx(path)
    load_onnx(path, check=False)  # without the check the mistake goes through


def test_onnx_forward_checks_the_input_size(tmp_path: Path) -> None:
    path = build(tmp_path, "gemm_alpha_beta")
    model = load_onnx(path)
    x = torch.rand(1, 4)
    assert np.allclose(onnx_forward(path, x[0]), model(x).detach().numpy(), atol=1e-6)
    with pytest.raises(UsageError, match="takes 4 input values"):
        onnx_forward(path, np.zeros(5))


# -- attacks and Jacobian bounds on converted networks -------------------------------------------


@pytest.mark.parametrize("name", ["activations", "maxpool", "batchnorm", "concat"])
def test_attacks_and_jacobian_bounds_accept_converted_networks(tmp_path: Path, name: str) -> None:
    model = load_onnx(build(tmp_path, name))
    gen = torch.Generator().manual_seed(5)
    centre = torch.randn(3, *model.input_shape, generator=gen)
    lo, hi = centre - 0.3, centre + 0.3
    region = Region.box(lo, hi)
    result = run_attack(PGD(steps=20), lambda x: model(x)[:, 0], [region], models=[model])
    (point,) = result.points
    assert bool(region.contains(point).all())
    _, ub = propdsl.bounds(model, lo, hi, method="crown")
    with torch.no_grad():
        assert bool((result.value >= model(centre)[:, 0] - 1e-6).all())
        assert bool((result.value <= ub[:, 0] + 1e-5).all())
    jlo, jhi = propdsl.jacobian_bounds(model, lo, hi)
    for _ in range(10):
        x = (lo + (hi - lo) * torch.rand(lo.shape, generator=gen)).requires_grad_()
        jac = torch.autograd.functional.jacobian(lambda z: model(z).sum(0), x)  # [O, B, *in]
        jac = jac.transpose(0, 1)
        assert bool((jac >= jlo - 1e-5).all() and (jac <= jhi + 1e-5).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_converted_networks_run_on_cuda(tmp_path: Path) -> None:
    model = load_onnx(build(tmp_path, "maxpool"))
    x = torch.randn(3, *model.input_shape)
    cpu = propdsl.bounds(model, x - 0.1, x + 0.1, method="crown")
    model = model.cuda()
    gpu = propdsl.bounds(model, x.cuda() - 0.1, x.cuda() + 0.1, method="crown")
    for a, b in zip(cpu, gpu, strict=True):
        assert torch.allclose(a.detach(), b.detach().cpu(), atol=1e-4)


# -- the VNN-COMP 2021 networks ------------------------------------------------------------------


def test_every_vnncomp_network_loads_and_matches_onnxruntime() -> None:
    root = require_vnncomp()
    paths = sorted(root.glob("*/*.onnx"))
    assert len(paths) >= 24
    gen = torch.Generator().manual_seed(6)
    for path in paths:
        model = load_onnx(path)
        x = torch.rand(4, *model.input_shape, generator=gen)
        assert_matches(path, model, x)
        lb, ub = propdsl.bounds(model, x - 0.01, x + 0.01, method="crown")
        with torch.no_grad():
            y = model(x).reshape(4, -1)
        assert bool((lb.reshape(4, -1) <= y + TOL).all() and (y <= ub.reshape(4, -1) + TOL).all())
