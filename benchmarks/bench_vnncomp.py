"""Complete verification on VNN-COMP 2021 instances: decided, wrong, times, vs alpha-beta-CROWN.

Runs `propdsl.verify.complete.solve` on every instance of the shared VNN-COMP 2021 subset (its
`instances.csv`: benchmark, onnx, vnnlib, timeout_s, expected, abcrown_2021_result,
abcrown_2021_time_s), each within the competition's per-instance timeout (the time a VNN-LIB
file's several input regions share), by `propdsl.interop.competition` (what `propdsl vnnlib
--instances` runs). The network is `propdsl.load_onnx`'s, the problems `propdsl.read_vnnlib`'s;
an answer is `sat` only when onnxruntime, running the ONNX file on the counterexample, confirms
that its outputs satisfy a disjunct and the point lies in the file's box (else `unknown`). Per
benchmark: decided / total, wrong (a decided answer that contradicts the expected
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
import json
import os
import statistics
from pathlib import Path
from typing import Any

import torch

from propdsl.interop import competition
from propdsl.interop.competition import Instance, read_instances

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


def instances(root: Path, benchmarks: tuple[str, ...], limit: int | None) -> list[Instance]:
    rows = [r for r in read_instances(root / "instances.csv", root) if r.benchmark in benchmarks]
    if limit is not None:
        kept: list[Instance] = []
        for b in benchmarks:
            kept += [r for r in rows if r.benchmark == b][:limit]
        rows = kept
    return rows


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The library's rows per benchmark (decided / total, wrong, median and max time) and
    alpha-beta-CROWN's decided count and times in 2021."""
    rows = competition.summarise(records)
    for row in rows:
        mine = [r for r in records if r["benchmark"] == row["benchmark"]]
        theirs = [r for r in mine if r.get("abcrown_2021_result") in ("sat", "unsat")]
        their_times = [
            float(r["abcrown_2021_time_s"]) for r in theirs if r.get("abcrown_2021_time_s")
        ]
        row.update(
            abcrown_decided=len(theirs),
            abcrown_median_s=statistics.median(their_times) if their_times else None,
            abcrown_max_s=max(their_times) if their_times else None,
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

    def show(k: int, total: int, record: dict[str, Any]) -> None:
        if not verbose:
            return
        flag = "  WRONG" if record["wrong"] else ""
        print(
            f"{record['benchmark']:<8} {record['onnx'][:30]:<30} {record['vnnlib']:<22} "
            f"expected {record['expected'] or '-':<5} got {record['answer']:<7} "
            f"{record['seconds']:6.1f} s{flag}  {record['reason'][:120]}",
            flush=True,
        )

    records = competition.run_instances(
        instances(root, chosen, limit), options=options, progress=show
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
