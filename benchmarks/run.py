"""Run the benchmarks: every `benchmarks/bench_*.py` module's `run(quick)`, printed as one table.
`FIGURES` adds the figure scripts (`fig_*.py`) that provide the same function.

    python benchmarks/run.py              # all benchmarks
    python benchmarks/run.py --quick      # fewer repetitions (a smoke test)
    python benchmarks/run.py loss bounds  # only bench_loss.py and bench_bounds.py

Each module provides `run(quick: bool) -> list[dict]`, one dict per table row (keys such as
`benchmark`, `ms`, `baseline_ms`, `ratio`, `target`). A module that is missing, fails to import
or raises is reported with its error and the others still run; the exit status is 1 when any
failed. Timings use 2 torch threads unless `--threads` says otherwise; `--clock cpu` asks the
modules that accept a `clock` option for CPU time instead of wall time.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
COLUMNS = ("benchmark", "ms", "baseline", "baseline_ms", "ratio", "target")


# scripts that measure a figure of the docs rather than a speed, with the same run(quick)
FIGURES = {"explanation_stability": HERE / "fig_explanation_stability.py"}


def discover(names: list[str]) -> list[tuple[str, Path]]:
    """(name, path) of the benchmark modules: all of them, or the ones named."""
    if not names:
        found = [(p.stem.removeprefix("bench_"), p) for p in sorted(HERE.glob("bench_*.py"))]
        return found + list(FIGURES.items())
    return [(n, FIGURES.get(n, HERE / f"bench_{n.removeprefix('bench_')}.py")) for n in names]


def load(name: str, path: Path) -> ModuleType:
    if not path.exists():
        raise FileNotFoundError(f"no benchmark module {path.name}")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def call_run(
    module: ModuleType, quick: bool, threads: int | None, clock: str | None = None
) -> list[dict[str, Any]]:
    run = getattr(module, "run", None)
    if not callable(run):
        raise TypeError(f"{module.__name__} has no run(quick) function")
    params = inspect.signature(run).parameters
    kwargs: dict[str, Any] = {}
    if "threads" in params:
        kwargs["threads"] = threads
    elif threads is not None:
        import torch

        torch.set_num_threads(threads)
    if clock is not None and "clock" in params:
        kwargs["clock"] = clock
    takes_quick = "quick" in params or any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in kwargs
        for p in params.values()
    )
    rows = run(quick, **kwargs) if takes_quick else run(**kwargs)
    return [dict(r) for r in rows or []]


def table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table: the usual columns first, then any others the rows have."""
    keys = [c for c in COLUMNS if any(c in r for r in rows)]
    keys += sorted({k for r in rows for k in r} - set(keys))
    cells = [[_cell(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e3 else f"{value:.0f}"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run propdsl's benchmarks.")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        help="for modules that support it: wall time (default) or process CPU time "
        "(steadier on a shared machine; use with --threads 1)",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))  # benchmark modules may import each other

    rows: list[dict[str, Any]] = []
    failed: list[tuple[str, str]] = []
    for name, path in discover(args.names):
        start = time.perf_counter()
        try:
            found = call_run(load(name, path), args.quick, args.threads, args.clock)
        except Exception as err:  # a broken benchmark must not hide the others
            failed.append((name, f"{type(err).__name__}: {err}"))
            print(f"[{name}] failed:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        print(f"[{name}] {len(found)} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        rows += [{"benchmark": name, **r} if "benchmark" not in r else r for r in found]

    if rows:
        print(table(rows))
    for name, error in failed:
        print(f"{name}: FAILED: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
