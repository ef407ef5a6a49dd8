"""Bound time and memory at real sizes, side by side with auto_LiRPA.

Two parts, both on one torch thread, times the median of interleaved repetitions (propdsl,
auto_LiRPA, propdsl, ...), so both libraries see the same machine load:

* the comparison table: models from auto_LiRPA's own tests and examples, re-created here from
  their architectures (weights: auto_LiRPA's pretrained files where its checkout has them,
  seeded random ones otherwise; inputs seeded random):
  - `mnist_a_adv`: examples/vision/simple_verification.py, conv 16 / 32 (k4 s2) + 100 + 10 on
    1 x 28 x 28, L-inf 0.3, CROWN, and alpha-CROWN (20 steps, lr 0.1, tightness compared);
  - `cnn_MNIST` with constant scalings (tests/test_constant.py), L-inf 0.3, IBP and CROWN;
  - `cnn_4layer_test` (tests/test_vision_models.py): BatchNorm, a residual convolution, on
    3 x 32 x 32, L-inf 0.01 CROWN and L2 0.01 IBP and CROWN.
  Bounds are compared with `intersect_ibp=False` (auto_LiRPA does not intersect with IBP);
  `max |diff|` is the largest difference, `ours tighter` whether every propdsl bound is at
  least as tight up to 1e-4.
* scaling curves: the mnist_a_adv architecture against input size (1 x 8 x 8, 1 x 28 x 28,
  3 x 32 x 32), hidden width and batch size, CROWN: time, and peak memory of one bound call
  (measured in fresh processes, after one unmeasured call that pays both libraries' one-time
  costs: the peak resident set size above the one before the call, read from /proc on Linux,
  the median of 3 processes; absent elsewhere).

auto_LiRPA is not a dependency: point `AUTO_LIRPA_PATH` at a checkout of it (its own
dependencies, such as appdirs, importable), or its columns stay empty.

    AUTO_LIRPA_PATH=~/src/auto_LiRPA python benchmarks/bench_scaling.py
    python benchmarks/bench_scaling.py --quick            # fewer repetitions, smaller grid
    python benchmarks/bench_scaling.py --plot docs/bounds_scaling.png
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from propdsl.region import Region
from propdsl.verify import AlphaOptions
from propdsl.verify.bounds import compute_bounds

ROOT = Path(__file__).resolve().parent.parent


# -- auto_LiRPA, when a checkout is given ----------------------------------------------------------


def lirpa_path() -> Path | None:
    path = os.environ.get("AUTO_LIRPA_PATH")
    return Path(path).expanduser() if path else None


def import_lirpa() -> Any | None:
    """The auto_LiRPA package from AUTO_LIRPA_PATH, or None."""
    path = lirpa_path()
    if path is None:
        return None
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        import auto_LiRPA
    except ImportError as exc:
        print(f"auto_LiRPA at {path} cannot be imported ({exc}); its columns stay empty")
        return None
    return auto_LiRPA


# -- the models (architectures re-created from auto_LiRPA's tests and examples) -------------------


class Flatten(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.view(x.size(0), -1)


def mnist_a_adv(channels: int = 1, size: int = 28, width: int = 100) -> nn.Module:
    """examples/vision/simple_verification.py's model (from convex_adversarial)."""
    side = math.ceil(math.ceil(size / 2) / 2)
    return nn.Sequential(
        nn.Conv2d(channels, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        Flatten(), nn.Linear(32 * side * side, width), nn.ReLU(), nn.Linear(width, 10),
    )  # fmt: skip


class ConstantCNN(nn.Module):
    """tests/test_constant.py's cnn_MNIST: scalings by constants inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 4, stride=2, padding=1)
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = x.view(-1, 784)
        x = 2.0 * x
        x = F.relu(self.fc1(x))
        return 0.5 * self.fc2(x)


class ResidualCNN(nn.Module):
    """tests/test_vision_models.py's cnn_4layer_test: BatchNorm and a residual convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.shortcut = nn.Conv2d(3, 3, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 4, stride=2, padding=1)
        self.fc1 = nn.Linear(192, 10)

    def forward(self, x: Tensor) -> Tensor:
        x_ = x
        x = F.relu(self.conv1(self.bn(x)))
        x = x + self.shortcut(x_)
        x = F.relu(self.conv2(x))
        x = x.view(x.size(0), -1)
        return self.fc1(x)


def _pretrained(model: nn.Module, name: str) -> nn.Module:
    path = lirpa_path()
    file = None if path is None else path / "examples" / "vision" / "pretrained" / name
    if file is not None and file.exists():
        model.load_state_dict(torch.load(file, map_location="cpu"))
    return model.eval()


def table_models() -> dict[str, tuple[nn.Module, Tensor]]:
    torch.manual_seed(0)
    a_adv = _pretrained(mnist_a_adv(), "mnist_a_adv.pth")
    constant = _pretrained(ConstantCNN(), "mnist_cnn_small.pth")
    residual = ResidualCNN()
    residual.bn.running_mean.uniform_(-0.2, 0.2)
    residual.bn.running_var.uniform_(0.5, 1.5)
    residual.eval()
    gen = torch.Generator().manual_seed(1)
    return {
        "mnist_a_adv": (a_adv, torch.rand(2, 1, 28, 28, generator=gen)),
        "cnn_MNIST (constants)": (constant, torch.randn(2, 1, 28, 28, generator=gen) / 255),
        "cnn_4layer (BN, residual)": (residual, torch.rand(2, 3, 32, 32, generator=gen)),
    }


# (model, norm, eps, method) rows of the comparison table
TABLE = [
    ("mnist_a_adv", math.inf, 0.3, "crown"),
    ("cnn_MNIST (constants)", math.inf, 0.3, "ibp"),
    ("cnn_MNIST (constants)", math.inf, 0.3, "crown"),
    ("cnn_4layer (BN, residual)", math.inf, 0.01, "crown"),
    ("cnn_4layer (BN, residual)", 2, 0.01, "ibp"),
    ("cnn_4layer (BN, residual)", 2, 0.01, "crown"),
    ("mnist_a_adv", math.inf, 0.3, "alpha_crown"),
]
ALPHA = AlphaOptions(iterations=20, lr=0.1)
LIRPA_METHOD = {"ibp": "IBP", "crown": "backward", "alpha_crown": "CROWN-Optimized"}


# -- timing --------------------------------------------------------------------------------------


def ours(model: nn.Module, x: Tensor, p: float, eps: float, method: str) -> Callable[[], Any]:
    region = Region.ball(x, eps, p)

    def call() -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return compute_bounds(model, region, method, options=ALPHA, intersect_ibp=False)

    return call


def theirs(
    lirpa: Any, model: nn.Module, x: Tensor, p: float, eps: float, method: str
) -> Callable[[], Any]:
    bounded = lirpa.BoundedModule(model, torch.empty_like(x), verbose=0)
    if method == "alpha_crown":
        bounded.set_bound_opts(
            {"optimize_bound_args": {"iteration": ALPHA.iterations, "lr_alpha": ALPHA.lr}}
        )
    from auto_LiRPA.perturbations import PerturbationLpNorm

    tensor = lirpa.BoundedTensor(x, PerturbationLpNorm(norm=p, eps=eps))

    def call() -> tuple[Tensor, Tensor]:
        if method == "alpha_crown":  # optimises with gradients of its own
            lb, ub = bounded.compute_bounds(x=(tensor,), method=LIRPA_METHOD[method])
            return lb.detach(), ub.detach()
        with torch.no_grad():
            return bounded.compute_bounds(x=(tensor,), method=LIRPA_METHOD[method])

    return call


def interleaved(calls: list[Callable[[], Any]], repeats: int) -> tuple[list[float], list[Any]]:
    """Median wall seconds of each call over `repeats` interleaved rounds (after a warm-up),
    and each call's result."""
    results = [call() for call in calls]
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for k, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times], results


@dataclass
class Row:
    name: str
    ms: float
    lirpa_ms: float | None = None
    diff: float | None = None
    tighter: bool | None = None
    mean_lb: float | None = None
    lirpa_mean_lb: float | None = None


def comparison(quick: bool) -> list[Row]:
    lirpa = import_lirpa()
    models = table_models()
    rows = []
    for name, p, eps, method in TABLE:
        model, x = models[name]
        calls = [ours(model, x, p, eps, method)]
        if lirpa is not None:
            calls.append(theirs(lirpa, model, x, p, eps, method))
        repeats = (1 if quick else 3) if method == "alpha_crown" else (3 if quick else 9)
        times, results = interleaved(calls, repeats)
        norm = "L-inf" if p == math.inf else f"L{p:g}"
        row = Row(f"{name}, {norm} {eps:g}, {method}", times[0] * 1e3)
        row.mean_lb = float(results[0][0].mean())
        if lirpa is not None:
            (lb, ub), (their_lb, their_ub) = results
            row.lirpa_ms = times[1] * 1e3
            row.diff = float(max((lb - their_lb).abs().max(), (ub - their_ub).abs().max()))
            row.tighter = bool((lb >= their_lb - 1e-4).all() and (ub <= their_ub + 1e-4).all())
            row.lirpa_mean_lb = float(their_lb.mean())
        rows.append(row)
    return rows


# -- scaling curves ------------------------------------------------------------------------------

SIZES = [(1, 8), (1, 28), (3, 32)]
WIDTHS = [100, 400, 1600]
BATCHES = [1, 4, 16]


def scaling_configs(quick: bool) -> list[dict[str, int]]:
    base = dict(channels=1, size=28, width=100, batch=2)
    configs = [dict(base, channels=c, size=s) for c, s in SIZES]
    configs += [dict(base, width=w) for w in (WIDTHS[:2] if quick else WIDTHS)]
    configs += [dict(base, batch=b) for b in (BATCHES[:2] if quick else BATCHES)]
    unique = {tuple(sorted(c.items())): c for c in configs}  # the base case once
    return list(unique.values())


def _scaling_case(config: dict[str, int]) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = mnist_a_adv(config["channels"], config["size"], config["width"]).eval()
    gen = torch.Generator().manual_seed(1)
    shape = (config["batch"], config["channels"], config["size"], config["size"])
    return model, torch.rand(shape, generator=gen)


SCALING_EPS = 0.02


def scaling_times(quick: bool) -> list[dict[str, Any]]:
    lirpa = import_lirpa()
    out = []
    for config in scaling_configs(quick):
        model, x = _scaling_case(config)
        calls = [ours(model, x, math.inf, SCALING_EPS, "crown")]
        if lirpa is not None:
            calls.append(theirs(lirpa, model, x, math.inf, SCALING_EPS, "crown"))
        times, _ = interleaved(calls, 3 if quick else 7)
        entry: dict[str, Any] = dict(config, ms=times[0] * 1e3)
        if lirpa is not None:
            entry["lirpa_ms"] = times[1] * 1e3
        for lib in ("propdsl", "auto_LiRPA") if lirpa is not None else ("propdsl",):
            entry[f"{lib}_mib"] = peak_memory(config, lib, 1 if quick else 3)
        out.append(entry)
    return out


def _rss_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed() -> None:
    """Hand memory freed by the allocator back to the system (glibc's malloc_trim), so that
    the resident size before the measured call holds live objects only."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def _measure_child(config: dict[str, int], lib: str) -> None:
    """In a fresh process: the peak resident memory of one bound call above the memory before.

    One call first, unmeasured, so that neither side's one-time costs count: propdsl traces
    the model (torch.fx) inside its first call where auto_LiRPA does it in `BoundedModule`
    (built before the measurement), the first convolutions set up their kernels, and
    auto_LiRPA's first call on some models imports sympy and torch's compiler (over 150 MiB).
    """
    model, x = _scaling_case(config)
    if lib == "propdsl":
        call = ours(model, x, math.inf, SCALING_EPS, "crown")
    else:
        call = theirs(import_lirpa(), model, x, math.inf, SCALING_EPS, "crown")
    call()
    _release_freed()
    before = _rss_kib("VmRSS")
    try:  # reset the high-water mark to the current size (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        before = None
    call()
    peak = _rss_kib("VmHWM")
    mib = None if before is None or peak is None else (peak - before) / 1024
    print(json.dumps({"mib": mib}))


def peak_memory(config: dict[str, int], lib: str, repeats: int = 3) -> float | None:
    """The median over `repeats` fresh processes: the peak resident size moves by 10-20%
    from one process to the next with the same work (where the allocator places blocks)."""
    if not Path("/proc/self/status").exists():
        return None
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    peaks = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(config), lib],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        mib = json.loads(lines[-1])["mib"] if done.returncode == 0 and lines else None
        if mib is not None:
            peaks.append(mib)
    return statistics.median(peaks) if peaks else None


# -- output --------------------------------------------------------------------------------------


def run(quick: bool = False) -> list[dict[str, object]]:
    """Rows for benchmarks/run.py: the comparison table (baseline: auto_LiRPA, target 1.0)."""
    torch.set_num_threads(1)
    rows: list[dict[str, object]] = []
    for r in comparison(quick):
        row: dict[str, object] = dict(benchmark=f"scaling: {r.name}", ms=r.ms)
        if r.lirpa_ms is not None:
            row.update(baseline="auto_LiRPA", baseline_ms=r.lirpa_ms, ratio=r.ms / r.lirpa_ms)
            row.update(target=1.0)
        rows.append(row)
    return rows


def print_comparison(rows: list[Row]) -> None:
    print(f"{'model, region, method':<48} {'propdsl ms':>10} {'LiRPA ms':>9} {'ratio':>6} "
          f"{'max|diff|':>10} {'ours tighter':>12} {'mean lb':>9} {'LiRPA lb':>9}")  # fmt: skip
    for r in rows:
        lirpa = r.lirpa_ms is not None
        print(
            f"{r.name:<48} {r.ms:>10.1f} "
            + (f"{r.lirpa_ms:>9.1f} {r.ms / r.lirpa_ms:>6.2f} " if lirpa else f"{'-':>9} {'-':>6} ")
            + (f"{r.diff:>10.2e} {r.tighter!s:>12} " if lirpa else f"{'-':>10} {'-':>12} ")
            + f"{r.mean_lb:>9.3f} "
            + (f"{r.lirpa_mean_lb:>9.3f}" if lirpa else "")
        )


def print_scaling(entries: list[dict[str, Any]]) -> None:
    print(f"{'C x H x W':>10} {'width':>6} {'batch':>6} {'propdsl ms':>10} {'LiRPA ms':>9} "
          f"{'propdsl MiB':>11} {'LiRPA MiB':>10}")  # fmt: skip

    def fmt(v: Any, spec: str) -> str:
        return format(v, spec) if v is not None else "-"

    for e in entries:
        shape = f"{e['channels']}x{e['size']}x{e['size']}"
        print(
            f"{shape:>10} {e['width']:>6} {e['batch']:>6} {e['ms']:>10.1f} "
            f"{fmt(e.get('lirpa_ms'), '.1f'):>9} {fmt(e.get('propdsl_mib'), '.1f'):>11} "
            f"{fmt(e.get('auto_LiRPA_mib'), '.1f'):>10}"
        )


def plot(entries: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 6.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    groups = [
        ("input size", lambda e: e["width"] == 100 and e["batch"] == 2,
         lambda e: e["channels"] * e["size"] ** 2, "input elements"),
        ("width", lambda e: e["size"] == 28 and e["batch"] == 2 and e["channels"] == 1,
         lambda e: e["width"], "hidden width"),
        ("batch", lambda e: e["size"] == 28 and e["width"] == 100 and e["channels"] == 1,
         lambda e: e["batch"], "batch size"),
    ]  # fmt: skip
    for col, (title, keep, xkey, xlabel) in enumerate(groups):
        chosen = sorted((e for e in entries if keep(e)), key=xkey)
        xs = [xkey(e) for e in chosen]
        for row, (key, lkey, ylabel) in enumerate(
            [("ms", "lirpa_ms", "CROWN time (ms)"), ("propdsl_mib", "auto_LiRPA_mib", "peak MiB")]
        ):
            ax = axes[row][col]
            for k, label, style in ((key, "propdsl", "o-"), (lkey, "auto_LiRPA", "s--")):
                pts = [(x, e.get(k)) for x, e in zip(xs, chosen, strict=True) if e.get(k)]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(f"CROWN against {title}")
            ax.legend()
    fig.suptitle(
        "mnist_a_adv architecture, L-inf 0.02, one thread (memory: peak of one call)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller grid")
    parser.add_argument("--plot", type=Path, help="write the scaling curves to this PNG")
    parser.add_argument("--no-table", action="store_true", help="the scaling curves only")
    parser.add_argument("--no-scaling", action="store_true", help="the comparison table only")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.child:
        _measure_child(json.loads(args.child[0]), args.child[1])
        return
    print(f"torch {torch.__version__}, 1 thread; auto_LiRPA: {lirpa_path() or 'not given'}")
    if not args.no_table:
        print_comparison(comparison(args.quick))
    if args.no_scaling:
        return
    entries = scaling_times(args.quick)
    print_scaling(entries)
    if args.plot:
        plot(entries, args.plot)


if __name__ == "__main__":
    main()
