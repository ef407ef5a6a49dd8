"""Complete verification on VNN-COMP 2021 instances: decided, wrong, times, vs alpha-beta-CROWN.

Runs `propdsl.verify.complete.solve` on every instance of the shared VNN-COMP 2021 subset (its
`instances.csv`: benchmark, onnx, vnnlib, timeout_s, expected, abcrown_2021_result,
abcrown_2021_time_s), each within the competition's per-instance timeout (the time a VNN-LIB
file's several input regions share). The network is `propdsl.load_onnx`'s, the problems
`propdsl.read_vnnlib`'s; a `sat` answer counts only when onnxruntime, running the ONNX file on
the counterexample, confirms that its outputs satisfy a disjunct and the point lies in the
region. Per benchmark: decided / total, wrong (a decided answer that contradicts the expected
one: must be 0), median and max seconds of the decided instances, and alpha-beta-CROWN's
decided count and times in the 2021 competition (one GPU per instance, so context rather than a
target for a CPU). One torch thread: the timings are a 2-core machine's, noisy when shared.

The data are found in `--data`, the environment variable PROPDSL_VNNCOMP, or
`<repo>/../shared/vnncomp2021`; without them the benchmark says so and skips.

    python benchmarks/bench_vnncomp.py                       # every instance (an hour or two)
    python benchmarks/bench_vnncomp.py --benchmark acasxu --limit 10
    python benchmarks/bench_vnncomp.py --benchmark test --out vnncomp.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("test", "acasxu", "mnistfc")
QUICK = ("test",)  # `run(quick=True)`: the smoke tests


def data_dir(given: str | None = None) -> Path | None:
    """The shared instances' folder, or None when it cannot be found."""
    for candidate in (
        given,
        os.environ.get("PROPDSL_VNNCOMP"),
        HERE.parent.parent / "shared" / "vnncomp2021",
    ):
        if candidate and (Path(candidate) / "instances.csv").is_file():
            return Path(candidate)
    return None


def instances(root: Path, benchmarks: tuple[str, ...], limit: int | None) -> list[dict[str, str]]:
    with open(root / "instances.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["benchmark"] in benchmarks]
    if limit is not None:
        kept: list[dict[str, str]] = []
        for b in benchmarks:
            kept += [r for r in rows if r["benchmark"] == b][:limit]
        rows = kept
    return rows


def onnx_outputs(session: Any, x: torch.Tensor) -> torch.Tensor:
    """The ONNX file's outputs at x (flattened), run by onnxruntime in float32."""
    import numpy as np

    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    feed = x.detach().to(torch.float32).reshape(shape).numpy().astype(np.float32)
    out = session.run(None, {inp.name: feed})[0]
    return torch.from_numpy(out.astype(np.float64)).reshape(1, -1)


def run_instance(root: Path, row: dict[str, str], options_kw: dict[str, Any]) -> dict[str, Any]:
    """Solve one instance within its timeout; confirm a counterexample with onnxruntime."""
    import onnxruntime

    import propdsl
    from propdsl.verify.complete import CompleteOptions, solve
    from propdsl.verify.problem import Answer

    folder = root / row["benchmark"]
    onnx_path, vnnlib_path = folder / row["onnx"], folder / row["vnnlib"]
    timeout = float(row["timeout_s"])
    start = time.perf_counter()
    record: dict[str, Any] = dict(
        benchmark=row["benchmark"],
        onnx=row["onnx"],
        vnnlib=row["vnnlib"],
        expected=row["expected"],
        timeout_s=timeout,
        abcrown=row["abcrown_2021_result"] or None,
        abcrown_s=float(row["abcrown_2021_time_s"]) if row["abcrown_2021_time_s"] else None,
    )
    try:
        session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        model = propdsl.load_onnx(onnx_path)
        problems = propdsl.read_vnnlib(vnnlib_path, model.input_shape, model.num_outputs)
    except Exception as exc:  # a file the readers cannot take: reported, not fatal
        record.update(answer="error", seconds=time.perf_counter() - start, reason=repr(exc))
        return _judge(record)
    answer, reason, confirmed, stats = "unsat", [], None, []
    for k, problem in enumerate(problems):
        left = timeout - (time.perf_counter() - start)
        if left <= 0:
            answer = "timeout"
            reason.append(f"timeout before region {k + 1} of {len(problems)}")
            break
        options = CompleteOptions(timeout=left, **options_kw)
        result = solve(model, problem, options=options)
        stats.append({k: v for k, v in result.stats.items() if not isinstance(v, dict)})
        reason.append(result.reason)
        if result.answer is Answer.SAT:
            assert result.counterexample is not None
            x = result.counterexample.unsqueeze(0)
            ref = problem.region.centre if problem.region.centre is not None else problem.region.lo
            inside = bool(
                problem.region.contains(x.to(ref.dtype if ref is not None else x.dtype))[0]
            )
            y = onnx_outputs(session, x)
            confirmed = inside and bool(problem.violated_at(y)[0])
            answer = "sat" if confirmed else "unconfirmed"
            break
        if result.answer is not Answer.UNSAT:
            answer = result.answer.value
            break
    record.update(
        answer=answer,
        seconds=time.perf_counter() - start,
        reason=" | ".join(reason),
        confirmed=confirmed,
        regions=len(problems),
        stats=stats,
    )
    return _judge(record)


def _judge(record: dict[str, Any]) -> dict[str, Any]:
    decided = record["answer"] in ("sat", "unsat")
    record["decided"] = decided
    record["wrong"] = decided and record["answer"] != record["expected"]
    return record


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per benchmark: decided / total, wrong, median and max time, alpha-beta-CROWN's."""
    rows = []
    for bench in dict.fromkeys(r["benchmark"] for r in records):
        mine = [r for r in records if r["benchmark"] == bench]
        times = [r["seconds"] for r in mine if r["decided"]]
        theirs = [r for r in mine if r["abcrown"] in ("sat", "unsat")]
        their_times = [r["abcrown_s"] for r in theirs if r["abcrown_s"] is not None]
        rows.append(
            dict(
                benchmark=bench,
                total=len(mine),
                decided=len(times),
                wrong=sum(r["wrong"] for r in mine),
                unconfirmed=sum(r["answer"] == "unconfirmed" for r in mine),
                median_s=statistics.median(times) if times else None,
                max_s=max(times) if times else None,
                abcrown_decided=len(theirs),
                abcrown_median_s=statistics.median(their_times) if their_times else None,
                abcrown_max_s=max(their_times) if their_times else None,
            )
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def t(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    lines = [
        f"{'benchmark':<10} {'decided':>9} {'wrong':>5} {'median s':>8} {'max s':>6}   "
        f"{'a-b-CROWN 2021':>14} {'median s':>8} {'max s':>6}"
    ]
    for r in rows:
        lines.append(
            f"{r['benchmark']:<10} {r['decided']:>4} / {r['total']:<3} {r['wrong']:>5} "
            f"{t(r['median_s']):>8} {t(r['max_s']):>6}   {r['abcrown_decided']:>7} / "
            f"{r['total']:<4} {t(r['abcrown_median_s']):>8} {t(r['abcrown_max_s']):>6}"
        )
    return "\n".join(lines)


def run(
    quick: bool = False,
    threads: int | None = 1,
    benchmarks: tuple[str, ...] | None = None,
    limit: int | None = None,
    data: str | None = None,
    out: str | None = None,
    verbose: bool = False,
    options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """The per-benchmark rows (`benchmarks/run.py` calls this; `quick`: the smoke tests)."""
    root = data_dir(data)
    if root is None:
        return [dict(benchmark="vnncomp", skipped="no VNN-COMP data (set PROPDSL_VNNCOMP)")]
    torch.set_num_threads(threads or 1)
    chosen = benchmarks or (QUICK if quick else BENCHMARKS)
    records = []
    for row in instances(root, chosen, limit):
        record = run_instance(root, row, options or {})
        records.append(record)
        if verbose:
            flag = "  WRONG" if record["wrong"] else ""
            print(
                f"{record['benchmark']:<8} {record['onnx'][:30]:<30} {record['vnnlib']:<22} "
                f"expected {record['expected']:<5} got {record['answer']:<11} "
                f"{record['seconds']:6.1f} s{flag}  {record['reason'][:120]}",
                flush=True,
            )
    rows = summarise(records)
    if out is not None:
        report = dict(threads=threads, options=options or {}, summary=rows, instances=records)
        Path(out).write_text(json.dumps(report, indent=1, default=str))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", nargs="*", choices=BENCHMARKS, help="default: all")
    parser.add_argument("--limit", type=int, help="the first N instances of each benchmark")
    parser.add_argument(
        "--data", help="the instances' folder (default: PROPDSL_VNNCOMP, ../shared/vnncomp2021)"
    )
    parser.add_argument("--out", help="write the JSON report (summary and every instance) here")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a CompleteOptions field, e.g. --option batch=128 (Python literal values)",
    )
    args = parser.parse_args()
    import ast

    options = {}
    for item in args.option:
        name, _, value = item.partition("=")
        try:
            options[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[name] = value
    rows = run(
        threads=args.threads,
        benchmarks=tuple(args.benchmark) if args.benchmark else None,
        limit=args.limit,
        data=args.data,
        out=args.out,
        verbose=True,
        options=options,
    )
    if "skipped" in rows[0]:
        print(rows[0]["skipped"])
        return
    print(table(rows))


if __name__ == "__main__":
    main()
