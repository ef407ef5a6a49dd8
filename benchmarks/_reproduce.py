"""Shared parts of the four paper reproductions (benchmarks/reproduce_*.py).

Each script trains small networks from spec text through the library (`propdsl.load`,
`propdsl.train.train`), measures them with the library's metrics, and writes `results.json`,
PNG figures and a markdown table into `--out`. Data: `--data digits` (scikit-learn, offline, the
default), or `mnist` / `fashion_mnist` / `cifar10` when their files are present (`$PROPDSL_DATA`
or `./data`); a missing file ends the script with a message and exit code 0 (skipped).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import propdsl
from propdsl.data import DataError, load_dataset
from propdsl.train import TrainOptions, train

# input shape and class count of each data source the scripts accept
DATA: dict[str, tuple[tuple[int, ...], int]] = {
    "digits": ((1, 8, 8), 10),
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10),
}
# the split is fixed (seed 0) for every training seed: seeds vary the weights and batches only
SPLIT_SEED = 0


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What one reproduction runs with (the command line's values, quick mode applied)."""

    data: str
    out: Path
    seeds: tuple[int, ...]
    epochs: int
    samples: int
    quick: bool
    hidden: tuple[int, ...]


def parser(description: str, *, epochs: int, samples: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data", choices=sorted(DATA), default="digits", help="data source")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--seeds", type=int, default=3, help="training seeds (default 3)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default {epochs})")
    p.add_argument(
        "--samples", type=int, default=samples, help=f"test samples measured (default {samples})"
    )
    p.add_argument(
        "--hidden", type=int, nargs="+", default=[64], help="MLP hidden widths (default 64)"
    )
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, 32 samples (tests)")
    return p


def settings(args: argparse.Namespace, name: str) -> Settings:
    if args.seeds < 1 or args.epochs < 1 or args.samples < 1:
        raise SystemExit("error: --seeds, --epochs and --samples must be >= 1")
    out = args.out if args.out is not None else Path("runs") / "reproduce" / name / args.data
    if args.quick:
        return Settings(
            data=args.data,
            out=out,
            seeds=(0,),
            epochs=min(args.epochs, 2),
            samples=min(args.samples, 32),
            quick=True,
            hidden=tuple(args.hidden),
        )
    return Settings(
        data=args.data,
        out=out,
        seeds=tuple(range(args.seeds)),
        epochs=args.epochs,
        samples=args.samples,
        quick=False,
        hidden=tuple(args.hidden),
    )


def setup_threads() -> None:
    # the machines these run on are shared: one thread unless the caller asks for more
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def test_data(s: Settings) -> Any:
    """The first `s.samples` test samples, or exit 0 with a message when the files are missing."""
    try:
        return load_dataset(s.data, split="test", seed=SPLIT_SEED, limit=s.samples)
    except DataError as e:
        print(f"skipped: {s.data}: {e}", file=sys.stderr)
        raise SystemExit(0) from None


def header(s: Settings) -> str:
    """The spec's network declaration for the data source."""
    shape, classes = DATA[s.data]
    return f"network f : Tensor[{', '.join(map(str, shape))}] -> Tensor[{classes}]\n"


def train_block(
    s: Settings, body: str, *, batch: int = 64, lr: float = 0.003, activation: str = ""
) -> str:
    """A train block on the data source's train split with an MLP of `s.hidden` (and
    `activation`, spec syntax, when given)."""
    hidden = ", ".join(map(str, s.hidden))
    act = f", activation = {activation}" if activation else ""
    return (
        f'train f on {s.data}(split = "train") {{\n'
        f"  model     = mlp(hidden = [{hidden}]{act})\n"
        f"  epochs    = {s.epochs}\n"
        f"  batch     = {batch}\n"
        f"  optimizer = adam(lr = {lr})\n"
        f"{body}"
        "}\n"
    )


def train_model(spec_text: str, seed: int, params: Mapping[str, Any] | None = None):
    """Train the spec's network (its train block) with `seed`; the model, in eval mode."""
    spec = propdsl.load(spec_text, params=dict(params or {}))
    with tempfile.TemporaryDirectory() as run:
        try:
            result = train(
                spec, TrainOptions(out=Path(run) / "run", seed=seed, threads=1, quiet=True)
            )
        except DataError as e:
            print(f"skipped: {e}", file=sys.stderr)
            raise SystemExit(0) from None
    return result.model.eval()


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value) of finite values."""
    vals = [float(v) for v in values]
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "n": len(vals),
    }


def cell(stat: Mapping[str, float], pct: bool = True) -> str:
    if pct:
        return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"
    return f"{stat['mean']:.3g} ± {stat['std']:.2g}"


def markdown(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def all_finite(obj: Any) -> bool:
    """Every number in a JSON-like object is finite."""
    if isinstance(obj, Mapping):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def write(s: Settings, name: str, results: dict[str, Any], table: str, started: float) -> None:
    """results.json and table.md into `s.out`; the table printed."""
    s.out.mkdir(parents=True, exist_ok=True)
    results = {
        "paper": name,
        "settings": {
            "data": s.data,
            "seeds": list(s.seeds),
            "epochs": s.epochs,
            "samples": s.samples,
            "hidden": list(s.hidden),
            "quick": s.quick,
            "threads": torch.get_num_threads(),
        },
        "seconds": round(time.perf_counter() - started, 1),
        **results,
    }
    (s.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (s.out / "table.md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {s.out / 'results.json'} ({results['seconds']} s)")


def figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
