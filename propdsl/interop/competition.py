"""VNN-COMP instances end to end: an ONNX network and a VNN-LIB property in, the competition's
answer out; whole benchmarks (`instances.csv`) with a summary against the expected answers.

`solve_instance(onnx, vnnlib, timeout=...)` loads the network (`load_onnx`), reads the property
(`read_vnnlib`: one or several input regions), decides the regions one after another with the
complete verifier (`propdsl.verify.complete.solve`) within the instance's timeout, and answers
`sat`, `unsat`, `timeout` or `unknown`. A `sat` answer is reported only after onnxruntime
itself (`onnx_forward`, not propdsl's translation of the graph) has run the ONNX file on the
counterexample and its outputs satisfy one of the property's output conditions, the point lying
in the region; when onnxruntime disagrees the answer is `unknown`, with the reason. The text of
the answer (`InstanceResult.text()`) is the competition's result file: the answer on the first
line and, for `sat`, the assignment `((X_0 v) ... (Y_0 v))`, Y the outputs onnxruntime computed.

`read_instances` / `run_instances` / `summarise` / `summary_table` run a benchmark's
`instances.csv` (the competition's rows `onnx,vnnlib,timeout`, or a header naming `onnx`,
`vnnlib`, `timeout_s` and optionally `benchmark` and `expected`) and judge the answers:
`propdsl vnnlib --instances` and benchmarks/bench_vnncomp.py share them.
"""

from __future__ import annotations

import csv
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from propdsl.errors import UsageError
from propdsl.verify.problem import Answer, Problem

__all__ = [
    "Instance",
    "InstanceResult",
    "read_instances",
    "run_instances",
    "solve_instance",
    "summarise",
    "summary_table",
]

DEFAULT_TIMEOUT = 60.0  # seconds per instance, as CompleteOptions


@dataclass(frozen=True)
class InstanceResult:
    """The answer to one instance (a network and a VNN-LIB file).

    `counterexample` (the flattened input, float64 copies of the values fed to onnxruntime) and
    `output` (onnxruntime's flattened outputs there) are set exactly when the answer is SAT.
    `reason` says what was proved, or why the answer is not decided; `regions` counts the input
    regions of the file, `stats` holds the solver's counters per region searched.
    """

    answer: Answer
    seconds: float
    reason: str
    regions: int = 0
    counterexample: np.ndarray | None = None
    output: np.ndarray | None = None
    stats: tuple[dict[str, Any], ...] = ()

    def text(self) -> str:
        """The competition's result file: `sat` / `unsat` / `timeout` / `unknown`, then for
        `sat` the assignment, one `(X_i value)` / `(Y_j value)` per line inside `( ... )`;
        the values are written with `repr` (the shortest text that reads back exactly)."""
        if self.answer is not Answer.SAT:
            return self.answer.value + "\n"
        assert self.counterexample is not None and self.output is not None
        lines = ["sat", "("]
        lines += [f"(X_{i} {float(v)!r})" for i, v in enumerate(self.counterexample)]
        lines += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(self.output)]
        lines.append(")")
        return "\n".join(lines) + "\n"


def solve_instance(
    onnx: str | Path,
    vnnlib: str | Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    options: dict[str, Any] | None = None,
    model: nn.Module | None = None,
) -> InstanceResult:
    """Decide one VNN-COMP instance within `timeout` seconds (its regions share them).

    Args:
        onnx, vnnlib: the network and the property's files.
        timeout: wall-clock seconds for the whole instance (loading excluded).
        options: other `CompleteOptions` fields (e.g. `{"batch": 128}`).
        model: `load_onnx(onnx)` already loaded (a benchmark reuses one network).

    Raises:
        OnnxImportError: the network cannot be read or has an unsupported operator.
        VnnlibError: a positioned mistake in the VNN-LIB file (a usage error).
        UsageError: a missing file, a timeout that is not a positive number.
    """
    from propdsl.interop.onnx_import import load_onnx
    from propdsl.interop.vnnlib import read_vnnlib
    from propdsl.verify.complete import CompleteOptions, solve
    from propdsl.verify.layers import UnsupportedLayerError

    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise UsageError(f"the timeout must be a positive number of seconds, got {timeout!r}")
    if not math.isfinite(timeout):
        raise UsageError("the timeout must be finite")
    extra = dict(options or {})
    try:
        CompleteOptions(timeout=timeout, **extra)
    except (TypeError, ValueError) as err:
        raise UsageError(f"complete verifier options: {err}") from None
    if model is None:
        model = load_onnx(onnx)
    problems = read_vnnlib(vnnlib, *_sizes(model))
    start = time.perf_counter()
    stats: list[dict[str, Any]] = []
    reasons: list[str] = []
    for k, problem in enumerate(problems):
        left = timeout - (time.perf_counter() - start)
        if left <= 0:
            reasons.append(f"timeout before region {k + 1} of {len(problems)}")
            return _result(Answer.TIMEOUT, start, reasons, problems, stats)
        try:
            result = solve(model, problem, options=CompleteOptions(timeout=left, **extra))
        except UnsupportedLayerError as err:
            # a graph the bound engine does not cover: no answer, and the reason why
            reasons.append(f"the complete verifier does not cover the network: {err}")
            return _result(Answer.UNKNOWN, start, reasons, problems, stats)
        stats.append({key: v for key, v in result.stats.items() if not isinstance(v, dict)})
        where = f"region {k + 1} of {len(problems)}: " if len(problems) > 1 else ""
        reasons.append(where + result.reason)
        if result.answer is Answer.SAT:
            assert result.counterexample is not None
            return _confirmed(
                onnx, vnnlib, model, k, result.counterexample, start, reasons, problems, stats
            )
        if result.answer is not Answer.UNSAT:
            return _result(result.answer, start, reasons, problems, stats)
    if not problems:
        reasons.append("no output condition is satisfiable on a non-empty input box")
    return _result(Answer.UNSAT, start, reasons, problems, stats)


def _sizes(model: nn.Module) -> tuple[tuple[int, ...], int]:
    """The input shape and output count an imported network carries (`load_onnx`)."""
    shape = getattr(model, "input_shape", None)
    outputs = getattr(model, "num_outputs", None)
    if shape is None or outputs is None:
        raise UsageError("the model must carry input_shape and num_outputs (use load_onnx)")
    return tuple(int(d) for d in shape), int(outputs)


def _result(
    answer: Answer,
    start: float,
    reasons: list[str],
    problems: list[Problem],
    stats: list[dict[str, Any]],
    **points: Any,
) -> InstanceResult:
    return InstanceResult(
        answer,
        time.perf_counter() - start,
        " | ".join(reasons),
        len(problems),
        stats=tuple(stats),
        **points,
    )


def _confirmed(
    onnx: str | Path,
    vnnlib: str | Path,
    model: nn.Module,
    k: int,
    point: torch.Tensor,
    start: float,
    reasons: list[str],
    problems: list[Problem],
    stats: list[dict[str, Any]],
) -> InstanceResult:
    """SAT when onnxruntime's outputs at the point satisfy a disjunct of region k and the point
    lies in the file's box; else UNKNOWN with the reason (the solver's own check ran on
    propdsl's translation of the graph, and on a box rounded outward to the model's precision).

    The file is read again in float64 (its box then within a float64 rounding of the decimal
    text) and the point is clamped into that box, rounded inward to the model's precision: a
    point on the float32 box's edge can lie one float32 unit outside the file's numbers."""
    from propdsl.interop import onnx_import
    from propdsl.interop.vnnlib import read_vnnlib
    from propdsl.verify.bab.search import _dtype_of

    dtype = _dtype_of(model)
    shape, outputs = _sizes(model)
    exact = read_vnnlib(vnnlib, shape, outputs, dtype=torch.float64)
    # region k of the float64 reading, then the others (boxes that differ only below float32's
    # precision are one region in float32 and two in float64): any region of the file will do
    order = [k] if k < len(exact) else []
    order += [j for j in range(len(exact)) if j != k]
    inside = violated = False
    y = np.zeros(0)
    for j in order:
        lo, hi = (t.reshape(-1) for t in exact[j].region.bounding_box())
        x = point.detach().cpu().reshape(-1).to(dtype)
        x = torch.minimum(
            torch.maximum(x, _inward(lo, dtype, up=True)), _inward(hi, dtype, up=False)
        )
        x64 = x.to(torch.float64).reshape(1, *shape)
        inside = bool(exact[j].region.contains(x64)[0])
        if not inside:
            continue
        y = np.asarray(onnx_import.onnx_forward(onnx, x.numpy()), dtype=np.float64).reshape(-1)
        violated = bool(exact[j].violated_at(torch.from_numpy(y).reshape(1, -1))[0])
        if violated:
            flat = x64.reshape(-1).numpy()
            return _result(
                Answer.SAT, start, reasons, problems, stats, counterexample=flat, output=y
            )
        break
    if not inside:
        why = "lies outside the file's input box"
    else:
        shown = ", ".join(f"{v:.6g}" for v in y[:10]) + (", ..." if y.size > 10 else "")
        why = f"does not violate the property by onnxruntime's outputs ({shown})"
    reasons.append(f"not reported as sat: the counterexample found on propdsl's translation {why}")
    return _result(Answer.UNKNOWN, start, reasons, problems, stats)


def _inward(bound: torch.Tensor, dtype: torch.dtype, *, up: bool) -> torch.Tensor:
    """float64 bounds in `dtype`, rounded towards the inside of the box (lower bounds up,
    upper bounds down), so that a clamped point lies within the float64 bounds."""
    t = bound.to(dtype)
    off = t.to(torch.float64) < bound if up else t.to(torch.float64) > bound
    step = torch.full_like(t, math.inf if up else -math.inf)
    return torch.where(off, torch.nextafter(t, step), t)


# -- benchmarks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One row of an `instances.csv`: the files (resolved), the timeout, the expected answer
    (`""` where the file has none), the benchmark folder's name and the other columns."""

    onnx: Path
    vnnlib: Path
    timeout: float
    benchmark: str
    expected: str = ""
    line: int = 0
    columns: dict[str, str] = field(default_factory=dict)


def read_instances(path: str | Path, root: str | Path | None = None) -> list[Instance]:
    """The rows of an `instances.csv`.

    Two layouts: the competition's, no header and rows `onnx,vnnlib,timeout` (a fourth
    column, when present, is the expected answer), paths relative to `root` (default: the
    file's folder); or a header naming `onnx`, `vnnlib`, `timeout_s` (or `timeout`) and
    optionally `benchmark` (paths are then relative to `root/benchmark`) and `expected`.
    Every other column is kept in `Instance.columns`.

    Raises:
        UsageError: a missing file, a row without its columns, a timeout that is not a
            positive number, an expected answer other than sat / unsat (`path:line: ...`).
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"{path}: no such instances file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read it ({exc})") from None
    rows = [(n, r) for n, r in enumerate(csv.reader(text.splitlines()), 1) if any(r)]
    if not rows:
        raise UsageError(f"{path}: no instances")
    header = [c.strip().lower() for c in rows[0][1]]
    named = "onnx" in header and "vnnlib" in header
    out = []
    for n, row in rows[1:] if named else rows:
        cells = [c.strip() for c in row]
        if named:
            if len(cells) != len(header):
                raise UsageError(f"{path}:{n}: {len(cells)} columns, the header has {len(header)}")
            rec = dict(zip(header, cells, strict=True))
        else:
            if len(cells) < 3:
                raise UsageError(f"{path}:{n}: a row needs onnx,vnnlib,timeout")
            rec = dict(zip(("onnx", "vnnlib", "timeout", "expected"), cells, strict=False))
        raw = rec.get("timeout_s", rec.get("timeout", ""))
        try:
            timeout = float(raw)
        except ValueError:
            timeout = math.nan
        if not (math.isfinite(timeout) and timeout > 0):
            raise UsageError(f"{path}:{n}: the timeout {raw!r} is not a positive number")
        expected = rec.get("expected", "").lower()
        if expected not in ("", "sat", "unsat"):
            raise UsageError(f"{path}:{n}: the expected answer {expected!r} is not sat or unsat")
        bench = rec.get("benchmark", "")
        folder = base / bench if bench else base
        used = {"onnx", "vnnlib", "timeout", "timeout_s", "expected", "benchmark"}
        out.append(
            Instance(
                onnx=folder / rec["onnx"],
                vnnlib=folder / rec["vnnlib"],
                timeout=timeout,
                benchmark=bench or base.resolve().name,
                expected=expected,
                line=n,
                columns={k: v for k, v in rec.items() if k not in used},
            )
        )
    return out


def run_instances(
    instances: list[Instance],
    *,
    timeout_scale: float = 1.0,
    options: dict[str, Any] | None = None,
    progress: Callable[[int, int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Solve every instance within its timeout times `timeout_scale`; one record each.

    A record holds the instance (benchmark, onnx, vnnlib, timeout_s, expected, the other
    columns), the answer (`sat`, `unsat`, `timeout`, `unknown`, or `error` for a file the
    readers refuse, with the message as reason), seconds (loading included), reason, regions,
    the counterexample and onnxruntime's outputs for `sat`, `decided` and `wrong` (a decided
    answer that contradicts the expected one). `progress(done, total, record)` follows.
    """
    from propdsl.interop.onnx_import import load_onnx

    if not (isinstance(timeout_scale, int | float) and 0 < timeout_scale < math.inf):
        raise UsageError(f"the timeout scale must be a positive number, got {timeout_scale!r}")
    models: dict[Path, nn.Module] = {}
    records = []
    for k, inst in enumerate(instances):
        timeout = inst.timeout * timeout_scale
        record: dict[str, Any] = dict(
            benchmark=inst.benchmark,
            onnx=str(inst.onnx.name),
            vnnlib=str(inst.vnnlib.name),
            timeout_s=timeout,
            expected=inst.expected or None,
            **inst.columns,
        )
        t0 = time.perf_counter()
        try:
            key = inst.onnx.resolve()
            if key not in models:
                models.clear()  # one network at a time in memory
                models[key] = load_onnx(inst.onnx)
            result = solve_instance(
                inst.onnx, inst.vnnlib, timeout=timeout, options=options, model=models[key]
            )
        except UsageError as err:  # a file the readers refuse: reported, the run goes on
            record.update(answer="error", seconds=time.perf_counter() - t0, reason=str(err))
        else:
            record.update(
                answer=result.answer.value,
                seconds=time.perf_counter() - t0,
                reason=result.reason,
                regions=result.regions,
                counterexample=None
                if result.counterexample is None
                else result.counterexample.tolist(),
                output=None if result.output is None else result.output.tolist(),
                stats=list(result.stats),
            )
        decided = record["answer"] in ("sat", "unsat")
        record["decided"] = decided
        record["wrong"] = bool(decided and inst.expected and record["answer"] != inst.expected)
        records.append(record)
        if progress is not None:
            progress(k, len(instances), record)
    return records


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per benchmark folder, in order of appearance: total, decided, wrong, sat,
    unsat, timeout, unknown, error, and the median and max seconds of the decided instances."""
    rows = []
    for bench in dict.fromkeys(r["benchmark"] for r in records):
        mine = [r for r in records if r["benchmark"] == bench]
        times = [r["seconds"] for r in mine if r["decided"]]
        row: dict[str, Any] = dict(benchmark=bench, total=len(mine), decided=len(times))
        row["wrong"] = sum(bool(r["wrong"]) for r in mine)
        for answer in ("sat", "unsat", "timeout", "unknown", "error"):
            row[answer] = sum(r["answer"] == answer for r in mine)
        row["median_s"] = statistics.median(times) if times else None
        row["max_s"] = max(times) if times else None
        rows.append(row)
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The summary rows as a text table."""

    def t(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    width = max([len("benchmark"), *(len(r["benchmark"]) for r in rows)])
    head = (
        f"{'benchmark':<{width}} {'decided':>9} {'wrong':>5} {'sat':>4} {'unsat':>5} "
        f"{'timeout':>7} {'unknown':>7} {'error':>5} {'median s':>8} {'max s':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['benchmark']:<{width}} {r['decided']:>4} / {r['total']:<2} {r['wrong']:>5} "
            f"{r['sat']:>4} {r['unsat']:>5} {r['timeout']:>7} {r['unknown']:>7} "
            f"{r['error']:>5} {t(r['median_s']):>8} {t(r['max_s']):>6}"
        )
    return "\n".join(lines)
