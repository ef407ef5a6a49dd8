"""Export to other verifiers: the network as ONNX, each (sample, property) query as VNN-LIB.

The layout is a VNN-COMP benchmark folder::

    OUT/onnx/f.onnx                 the network, input [1, *input_shape], output [1, K]
    OUT/vnnlib/robust_17.vnnlib     property `robust` on sample 17 of the split
    OUT/instances.csv               onnx, vnnlib, timeout (seconds) per line, no header

A VNN-LIB file states the *negation* of the property: an input satisfying every assertion is a
counterexample, so a verifier's `unsat` (`holds`) proves the property for that sample and `sat`
comes with a counterexample. The file is the per-sample concretisation of the property's query
(`propdsl.verify.query.to_query`): the input region's bounding box (exact for L-inf balls and
boxes; properties over L2 / L1 balls are skipped, as VNN-LIB input constraints are boxes), and the
negated constraint tree over the outputs, written as one disjunction of conjunctions
`(assert (or (and ...) ...))`. Negating `C y + d >= 0` gives `C y + d < 0`, written `<=` as in
VNN-COMP (the closure: a reported counterexample may lie on the boundary, `holds` stays sound).

Two syntaxes:

* `Format.VNNLIB` (`--to vnnlib`): VNN-LIB 1.0, the syntax of VNN-COMP benchmarks, read by
  alpha-beta-CROWN, Marabou, NNV, nnenum, PyRAT. Inputs `X_i` and outputs `Y_j` are the
  flattened tensors (C order). Atoms take the common shapes `(<= Y_0 Y_1)`, `(>= Y_3 0.5)`,
  `(<= Y_0 (+ Y_1 2.3))` where they can, general linear sums `(+ (* a Y_0) (* b Y_1))` else.
* `Format.VNNLIB2` (`--to vnnlib2`): VNN-LIB 2.0 (`(vnnlib-version <2.0>)`, a declared network
  with tensor-shaped `X` and `Y`), as read by the `vnnlib` Python package.
"""

from __future__ import annotations

import csv
import enum
import itertools
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from propdsl.errors import UsageError
from propdsl.region import INF
from propdsl.session import holds_run

__all__ = [
    "Atom",
    "ExportReport",
    "Format",
    "Instance",
    "export",
    "export_onnx",
    "export_run",
    "instances",
    "vnnlib_text",
]

MAX_TERMS = 4096  # the largest disjunction written for one sample


class Format(enum.Enum):
    """The VNN-LIB dialect: `vnnlib` (1.0, VNN-COMP) or `vnnlib2` (2.0)."""

    VNNLIB = "vnnlib"
    VNNLIB2 = "vnnlib2"


@dataclass(frozen=True)
class Atom:
    """`sum(coef * Y[j] for j, coef in terms) + const <= 0` over the flattened outputs."""

    terms: tuple[tuple[int, float], ...]
    const: float

    def holds(self, y: np.ndarray, tol: float = 0.0) -> bool:
        return sum(c * float(y[j]) for j, c in self.terms) + self.const <= tol


@dataclass(frozen=True)
class Instance:
    """One sample's negated query: a counterexample lies in the box [lower, upper] and satisfies
    every atom of at least one term of `terms` (a disjunction of conjunctions).

    `terms == ()` means no output can violate the property (it holds for this sample whatever the
    network computes); `terms == ((),)` means every output does.
    """

    lower: np.ndarray
    upper: np.ndarray
    terms: tuple[tuple[Atom, ...], ...]

    def is_counterexample(self, x: np.ndarray, y: np.ndarray, tol: float = 0.0) -> bool:
        """Whether input x (flattened) with outputs y satisfies the assertions (up to `tol`)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        inside = bool(np.all(x >= self.lower - tol) and np.all(x <= self.upper + tol))
        return inside and any(all(a.holds(y, tol) for a in t) for t in self.terms)


@dataclass(frozen=True)
class ExportReport:
    """What `export` wrote: the folder, the ONNX file, instances.csv, the VNN-LIB files, and
    the properties (or samples) left out with the reason."""

    out: Path
    onnx: Path
    instances: Path
    files: tuple[Path, ...]
    skipped: dict[str, str] = field(default_factory=dict)


# -- queries -> instances ------------------------------------------------------------------------
def instances(query: Any) -> list[Instance | None]:
    """The negation of each sample's query (see the module docstring), one `Instance` each;
    None for a sample whose region is empty (the ball misses the box): the property holds
    vacuously there, and the region's bounding box would be a point outside it."""
    from propdsl.verify.query import All, AnyOf, Masked, Rows

    if query.region is not None and query.region.centre is not None and query.region.p != INF:
        radius = query.region.radius
        if radius is None or bool((radius > 0).any()):
            raise ValueError("VNN-LIB input constraints are boxes: an L1 / L2 ball is not exported")
    empty = query.region.is_empty().cpu()
    lo, hi = query.region.bounding_box()
    lo, hi = _numpy(lo.flatten(1)), _numpy(hi.flatten(1))
    rows = {id(r): (_numpy(r.C), _numpy(r.d), r.strict.cpu().numpy()) for r in query.rows}

    def negate(node: Any, i: int) -> list[tuple[Atom, ...]]:
        if isinstance(node, Rows):
            C, d, strict = rows[id(node)]
            out: list[tuple[Atom, ...]] = []
            for r in range(C.shape[1]):
                coefs = tuple((int(j), float(C[i, r, j])) for j in np.flatnonzero(C[i, r]))
                const = float(d[i, r])
                if not coefs:  # a constant row: 0 + d >= 0 (> 0 when strict)
                    holds = const > 0 if strict[r] else const >= 0
                    if not holds:
                        out.append(())
                    continue
                if math.isinf(const):
                    if const < 0:
                        out.append(())
                    continue
                out.append((Atom(coefs, const),))
            return out
        if isinstance(node, All):  # not (a and b) = not a or not b
            return [t for c in node.children for t in negate(c, i)]
        if isinstance(node, AnyOf):  # not (a or b) = not a and not b
            dnf: list[tuple[Atom, ...]] = [()]
            for c in node.children:
                part = negate(c, i)
                dnf = [a + b for a, b in itertools.product(dnf, part)]
                if len(dnf) > MAX_TERMS:
                    raise ValueError(
                        f"the negated property has more than {MAX_TERMS} disjuncts for one sample"
                    )
            return dnf
        if isinstance(node, Masked):
            if bool(node.mask[i]):
                return [] if node.value else [()]
            return negate(node.child, i)
        raise TypeError(type(node).__name__)

    out: list[Instance | None] = []
    for i in range(lo.shape[0]):
        if bool(empty[i]):
            out.append(None)
            continue
        dnf = negate(query.root, i)
        if any(t == () for t in dnf):
            dnf = [()]
        unique = tuple(dict.fromkeys(dnf))
        out.append(Instance(lo[i], hi[i], unique))
    return out


EMPTY_REASON = (
    "the region is empty (the ball does not meet the box): the property holds vacuously, and "
    "there is no input box to write"
)


def _two_point_reason(formula: Any) -> str | None:
    """Why a property over two quantified inputs (a Lipschitz bound) has no VNN-LIB file, or
    None when the formula quantifies over one input."""
    from propdsl import ir as I
    from propdsl.verify.jacobian import norm_of_difference

    node, names = formula, []
    while isinstance(node, I.Quant):
        names += [
            v.name
            for v, d in zip(node.vars, node.domains, strict=True)
            if not isinstance(d, I.Range)
        ]
        node = node.body
    if len(names) < 2:
        return None
    ps = sorted({_norm_name(t[2]) for n in I.walk(node) if (t := norm_of_difference(n))})
    head = (
        f"it compares the network at {len(names)} inputs ({', '.join(names)}), and a VNN-LIB "
        "file as export writes it states one input and one output of one network"
    )
    if "2" in ps:
        return (
            f"{head}; its L2 norm is not linear either, so no linear constraint states it "
            "(L-inf and L1 norms are piecewise linear, L2 is not); `propdsl verify` decides "
            "it from Jacobian bounds"
        )
    if ps:
        norms = " and ".join(f"L{p}" for p in ps)
        return (
            f"{head}; its {norms} norms are piecewise linear, but the negation needs two "
            "network copies, a disjunction over the norms' terms and a strict '>' (two equal "
            "points satisfy the closure '>='), which export does not write; `propdsl verify` "
            "decides it from Jacobian bounds"
        )
    return head


def _norm_name(p: float) -> str:
    return "-inf" if p == INF else str(int(p))


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


# -- text --------------------------------------------------------------------------------------
def _num(v: float) -> str:
    """A decimal literal without exponent (VNN-LIB 2.0 numbers have none), exact round trip."""
    if not math.isfinite(v):
        raise ValueError(f"cannot write {v} in VNN-LIB")
    return np.format_float_positional(np.float64(v), unique=True, trim="0")


def _index(j: int, shape: tuple[int, ...]) -> str:
    return ", ".join(str(int(k)) for k in np.unravel_index(j, shape))


def _atom_v1(a: Atom) -> str:
    (terms, const) = (a.terms, a.const)
    if len(terms) == 1:
        ((j, c),) = terms
        # c * Y + const <= 0  <=>  Y <= -const / c  (c > 0)  or  Y >= -const / c  (c < 0)
        op = "<=" if c > 0 else ">="
        return f"({op} Y_{j} {_num(-const / c)})"
    if len(terms) == 2 and terms[0][1] == -terms[1][1]:
        (ja, ca), (jb, _) = terms
        if ca < 0:
            ja, jb, ca = jb, ja, -ca
        # ca * (Y_a - Y_b) + const <= 0  <=>  Y_a <= Y_b - const / ca
        shift = -const / ca
        if shift == 0:
            return f"(<= Y_{ja} Y_{jb})"
        return f"(<= Y_{ja} (+ Y_{jb} {_num(shift)}))"
    return f"(<= {_sum(a, lambda j: f'Y_{j}')} 0.0)"


def _sum(a: Atom, var) -> str:
    parts = [f"(* {_num(c)} {var(j)})" for j, c in a.terms]
    if a.const != 0:
        parts.append(_num(a.const))
    return f"(+ {' '.join(parts)})" if len(parts) > 1 else parts[0]


def vnnlib_text(
    inst: Instance,
    *,
    input_shape: tuple[int, ...],
    outputs: int,
    fmt: Format = Format.VNNLIB,
    comment: str = "",
) -> str:
    """The VNN-LIB text of one instance (inputs are the ONNX input [1, *input_shape])."""
    lines = [f"; {line}" for line in comment.splitlines()]
    n = int(np.prod(input_shape))
    if fmt is Format.VNNLIB:
        lines += [f"(declare-const X_{i} Real)" for i in range(n)]
        lines += [f"(declare-const Y_{j} Real)" for j in range(outputs)]
        lines.append("")
        for i in range(n):
            lines.append(f"(assert (>= X_{i} {_num(inst.lower[i])}))")
            lines.append(f"(assert (<= X_{i} {_num(inst.upper[i])}))")
        atom = _atom_v1
    else:
        xs, ys = (1, *input_shape), (1, outputs)
        lines.append("(vnnlib-version <2.0>)")
        lines.append(
            f"(declare-network f\n  (declare-input X float32 [{', '.join(map(str, xs))}])\n"
            f"  (declare-output Y float32 [{', '.join(map(str, ys))}]))"
        )
        lines.append("")
        for i in range(n):
            at = f"X[{_index(i, xs)}]"
            lines.append(f"(assert (>= {at} {_num(inst.lower[i])}))")
            lines.append(f"(assert (<= {at} {_num(inst.upper[i])}))")

        def atom(a: Atom) -> str:
            return f"(<= {_sum(a, lambda j: f'Y[{_index(j, ys)}]')} 0.0)"

    lines.append("")
    if inst.terms == ((),):
        lines.append("; every output violates the property: no output constraint")
    elif len(inst.terms) == 1:
        lines += [f"(assert {atom(a)})" for a in inst.terms[0]]
    else:
        lines.append("(assert (or")
        lines += [f"  (and {' '.join(atom(a) for a in t)})" for t in inst.terms]
        lines.append("))")
    return "\n".join(lines) + "\n"


# -- files ---------------------------------------------------------------------------------------
def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: str | Path,
    *,
    dynamic_batch: bool = False,
) -> Path:
    """Write `model` as ONNX (float32, CPU, eval mode) with input `input` [1, *input_shape] and
    output `output` ([batch, ...] with `dynamic_batch`); returns the path.

    >>> import tempfile, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3))
    >>> export_onnx(net, (2,), tempfile.mkdtemp() + "/f.onnx").suffix
    '.onnx'
    """
    import copy

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    net = copy.deepcopy(model).float().cpu().eval()
    dummy = torch.zeros(1, *input_shape)
    kwargs: dict[str, Any] = dict(input_names=["input"], output_names=["output"])
    if dynamic_batch:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    with warnings.catch_warnings():
        # the TorchScript exporter: no onnxscript needed, and static shapes verifiers expect
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        try:
            torch.onnx.export(net, (dummy,), str(path), dynamo=False, **kwargs)
        except TypeError:  # a torch without the `dynamo` switch
            torch.onnx.export(net, (dummy,), str(path), **kwargs)
    return path


def export(
    spec: Any,
    model: nn.Module,
    x: Tensor,
    y: Tensor | None,
    out: str | Path,
    *,
    properties: list[str] | None = None,
    fmt: Format | str = Format.VNNLIB,
    timeout: float = 60.0,
    indices: list[int] | None = None,
) -> ExportReport:
    """Write a VNN-COMP style benchmark folder for samples (x, y) of `spec`'s properties.

    Args:
        spec: a loaded spec (one network).
        model: the network.
        x, y: the samples (labels may be None for properties of `x` alone).
        out: the folder to write (created).
        properties: names (default: the verify block's, else all).
        fmt: `Format.VNNLIB` (1.0, default) or `Format.VNNLIB2`, or their names.
        timeout: the per-instance timeout written to instances.csv (seconds).
        indices: the samples' indices in their split, used in file names (default 0, 1, ...).

    Returns:
        `ExportReport`; properties outside the linear fragment, over L1 / L2 balls or with a
        single sample too large to write are listed in `skipped` with the reason, and so are
        samples whose region is empty (`name[i]`: nothing to verify, no input box to write).

    Raises:
        UsageError: x holds NaN or infinite values.
    """
    from propdsl.verify.query import Unsupported, to_query
    from propdsl.verify.run import _check_inputs, _default_properties, _positioned

    fmt = _format(fmt)
    _check_inputs(x)
    if len(spec.networks) != 1:
        raise UsageError("export writes one network: the spec declares several")
    ((net_name, net_ty),) = spec.networks.items()
    input_shape, outputs = tuple(net_ty.inp.shape), math.prod(net_ty.out.shape)
    names = properties if properties is not None else _default_properties(spec)
    indices = list(range(x.shape[0])) if indices is None else list(indices)
    out = Path(out)
    (out / "vnnlib").mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(model, input_shape, out / "onnx" / f"{net_name}.onnx")
    files: list[Path] = []
    rows: list[tuple[str, str, str]] = []
    skipped: dict[str, str] = {}
    was = model.training
    model.eval()
    try:
        for name in names:
            prop = spec.property(name)
            partner = None
            if prop.paired:
                if y is None:
                    raise UsageError(f"property '{name}' is a property of a pair: it needs labels")
                from propdsl.partners import draw

                # a constant input of each query, drawn from the exported samples
                partner = draw(prop.partner, model, x, y, x, y)
            try:
                with torch.no_grad():
                    query = to_query(
                        prop.formula,
                        [p for p, _ in prop.params],
                        {net_name: outputs},
                        x,
                        y,
                        {net_name: model},
                        partner=partner,
                    )
                if query is None:
                    skipped[name] = "no quantified input: nothing to verify"
                    continue
                insts = instances(query)
            except Unsupported as err:
                reason = _two_point_reason(prop.formula)
                skipped[name] = _positioned(spec, Unsupported(reason, err.span) if reason else err)
                continue
            except ValueError as err:
                skipped[name] = str(err)
                continue
            for k, (i, inst) in enumerate(zip(indices, insts, strict=True)):
                if inst is None:
                    skipped[f"{name}[{i}]"] = EMPTY_REASON
                    continue
                if inst.terms == ():
                    skipped[f"{name}[{i}]"] = "holds whatever the network computes"
                    continue
                label = "" if y is None or len(prop.params) < 2 else f", label {int(y[k])}"
                comment = (
                    f"propdsl export: {Path(spec.name).name}, property {name}, sample {i}{label}\n"
                    "The assertions describe a counterexample: unsat means the property holds."
                )
                path = out / "vnnlib" / f"{name}_{i}.vnnlib"
                path.write_text(
                    vnnlib_text(
                        inst, input_shape=input_shape, outputs=outputs, fmt=fmt, comment=comment
                    ),
                    encoding="utf-8",
                )
                files.append(path)
                rows.append((f"onnx/{onnx_path.name}", f"vnnlib/{path.name}", _num(timeout)))
    finally:
        model.train(was)
    csv_path = out / "instances.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(rows)
    return ExportReport(out, onnx_path, csv_path, tuple(files), skipped)


@holds_run("export")
def export_run(
    spec: Any,
    run: str | Path,
    out: str | Path,
    *,
    fmt: Format | str = Format.VNNLIB,
    split: str = "test",
    samples: int | None = None,
    properties: list[str] | None = None,
    timeout: float | None = None,
    model_ref: str | None = None,
    checkpoint: str | None = None,
    spec_differs_ok: bool = False,
) -> ExportReport:
    """`propdsl export`: a checkpoint of a run (`best` by default, or `last`) and the first
    `samples` of a split, opened as `verify` opens them (checked to fit the spec, the run's
    params as defaults: `propdsl.verify.report.open_run_data`)."""
    from propdsl.results import positive_seconds
    from propdsl.verify.report import open_run_data

    positive_seconds("timeout", timeout)
    setup, x, y = open_run_data(
        spec,
        run,
        split,
        samples,
        model_ref,
        "cpu",
        checkpoint=checkpoint,
        spec_differs_ok=spec_differs_ok,
    )
    spec, model = setup.spec, setup.model
    vb = spec.verify_block
    if timeout is None:
        timeout = float(vb.get("timeout")) if vb is not None and vb.get("timeout") else 60.0
    return export(spec, model, x, y, out, properties=properties, fmt=fmt, timeout=timeout)


def _format(fmt: Format | str) -> Format:
    try:
        return fmt if isinstance(fmt, Format) else Format(str(fmt).strip().lower())
    except ValueError:
        raise UsageError(f"unknown export format {fmt!r}: use vnnlib or vnnlib2") from None
