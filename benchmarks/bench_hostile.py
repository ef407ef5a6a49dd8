"""Time to reject (or accept) hostile specs: the limits of docs/language.md section 15 at work.

Each row loads one spec in-process (`propdsl.load`, or `format_text` for fmt) and reports the
median wall time. The specs are the largest of their kind that the limits allow, or the small
ones that used to blow up (exponential expansion, quadratic work):

* `256 KiB of comments`: the largest file accepted, all comments (was quadratic: > 60 s for 10 MB);
* `256 KiB of lets`: the largest file accepted, dense code (parsing dominates);
* `2,000 unknown names`: did-you-mean hints for the first 50 only (was 51 s);
* `30 doubling lets` / `30 doubling let functions`: stopped at the expansion limit (minutes before);
* `500 chained lets`: stopped at the nesting limit (a RecursionError before);
* `range(10^9)`: refused where it is written (8.6 GB in training before).

Target: every row under 10 s on one core (`target` column: the limit in ms). Run
`python benchmarks/bench_hostile.py [--quick]` or through `benchmarks/run.py`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import propdsl
from propdsl.source import MAX_SOURCE_BYTES
from propdsl.syntax import format_text

NET = "network f : Tensor[2] -> Tensor[3]\n"
TARGET_MS = 10_000


def _fill(line: Callable[[int], str]) -> str:
    """Lines `line(0), line(1), ...` up to the largest spec accepted."""
    out, size, i = [NET], len(NET), 0
    while True:
        text = line(i)
        if size + len(text) > MAX_SOURCE_BYTES:
            return "".join(out)
        out.append(text)
        size += len(text)
        i += 1


def specs() -> dict[str, str]:
    doubling = "".join(f"let a{i} = a{i - 1} + a{i - 1}\n" for i in range(1, 31))
    functions = "".join(f"let g{i}(v) = g{i - 1}(v) + g{i - 1}(v)\n" for i in range(1, 31))
    chained = "".join(f"let c{i} = c{i - 1} + 1\n" for i in range(1, 500))
    return {
        "256 KiB of comments": _fill(lambda i: "#\n"),
        "256 KiB of lets": _fill(lambda i: f"let a{i} = {i} + 1\n"),
        "2,000 unknown names": NET
        + "".join(f"property p{i}(x) = f(x)[0] > undefined_{i}\n" for i in range(2000)),
        "30 doubling lets": NET + "let a0 = 1.0\n" + doubling + "property p(x) = f(x)[0] > a30\n",
        "30 doubling let functions": NET
        + "let g0(v) = v\n"
        + functions
        + "property p(x) = g30(f(x)[0]) > 0\n",
        "500 chained lets": NET + "let c0 = 1\n" + chained + "property p(x) = f(x)[0] > c499\n",
        "range(10^9)": NET + "property p(x) = forall i in range(1000000000): f(x)[0] > 0\n",
    }


def _load(text: str) -> None:
    try:
        propdsl.load(text)
    except propdsl.SpecError as err:
        err.render()


def _fmt(text: str) -> None:
    try:
        format_text(text)
    except propdsl.SpecError as err:
        err.render()


def _median_ms(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run(quick: bool = False) -> list[dict]:
    repeats = 1 if quick else 3
    _load(NET)  # the parser and the prelude are built once per process
    rows = []
    for name, text in specs().items():
        rows.append(
            {
                "benchmark": f"check: {name}",
                "ms": round(_median_ms(lambda t=text: _load(t), repeats), 1),
                "target": f"< {TARGET_MS} ms",
            }
        )
    comments = specs()["256 KiB of comments"]
    rows.append(
        {
            "benchmark": "fmt: 256 KiB of comments",
            "ms": round(_median_ms(lambda: _fmt(comments), repeats), 1),
            "target": f"< {TARGET_MS} ms",
        }
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repetition per row")
    args = parser.parse_args()
    for row in run(args.quick):
        print(f"{row['benchmark']:40s} {row['ms']:>10.1f} ms   ({row['target']})")


if __name__ == "__main__":
    main()
