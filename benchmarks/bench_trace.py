"""Would tracing or compiling the attack step pay? One PGD step's evaluation (forward pass, the
signed margin, the input gradient) on the digits MLP and CNN, batch 64, three ways:

* `eager`: the hand-written step of bench_loss.py (`nn.Module` calls, autograd's engine);
* `traced`: the same step traced once by `torch.fx.experimental.proxy_tensor.make_fx` into one
  graph of ATen operations, forward and backward (no module calls, no autograd engine at run
  time; the weights are inputs, so one trace serves every optimizer step), run as the graph's
  Python code. The trace time is reported too: it is paid once per input shape;
* `traced, TorchScript`: that graph run by TorchScript's interpreter, as `propdsl.tracing`
  runs a hot attack objective (`_interpreted`: its operations called from C++);
* `torch.compile` (only with `--compile`: about 20 s of compilation per model on this machine):
  the step compiled by TorchInductor (`dynamic=False`).

The ratio traced / eager (and compiled / eager) bounds what any tracing of a compiled property
could gain over the hand-written eager step on this hardware. The outputs of the three are
checked to agree (1e-6) before timing. Run `python benchmarks/bench_trace.py [--quick]
[--threads N] [--clock cpu] [--compile]` or through `benchmarks/run.py trace`.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch
from bench_loss import CLOCKS, _model, _timed  # the benchmarks folder is on the path
from torch import Tensor, nn
from torch.func import functional_call

from propdsl.tracing import _interpreted

BATCH = 64


def _step(model: nn.Module) -> Callable[..., tuple[Tensor, Tensor]]:
    """One attack evaluation: the margin max_{j != y} f_j - f_y and its input gradient, as a
    function of flat tensors (the weights, then the point, the labels, the excluded mask)."""
    names = [n for n, _ in model.named_parameters()]

    def step(*args: Tensor):
        *weights, point, y, own = args
        leaf = point.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = functional_call(model, dict(zip(names, weights, strict=True)), (leaf,))
            value = (logits - logits.gather(1, y[:, None])).masked_fill(own, -torch.inf).amax(1)
            (grad,) = torch.autograd.grad(value.sum(), leaf)
        return value.detach(), grad

    return step


def _eager(model: nn.Module) -> Callable[..., tuple[Tensor, Tensor]]:
    def step(*args: Tensor):
        point, y, own = args[-3:]
        leaf = point.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(leaf)
            value = (logits - logits.gather(1, y[:, None])).masked_fill(own, -torch.inf).amax(1)
            (grad,) = torch.autograd.grad(value.sum(), leaf)
        return value.detach(), grad

    return step


def _no_grad(fn: Callable[..., object], args: tuple) -> object:
    """A traced graph holds its own backward: run it without autograd, as propdsl.tracing does
    (the eager step records autograd's graph, as an attack does)."""
    with torch.no_grad():
        return fn(*args)


def run(
    quick: bool = False, threads: int | None = 2, clock: str = "wall", compile: bool = False
) -> list[dict]:
    from torch.fx.experimental.proxy_tensor import make_fx

    if threads is not None:
        torch.set_num_threads(threads)
    tick = CLOCKS[clock]
    repeats, inner = (3, 50) if quick else (7, 200)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 1, 8, 8, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    own = torch.arange(10) == y[:, None]
    rows = []
    for kind in ("mlp", "cnn"):
        model = _model(kind).eval()
        args = (*(p.detach() for p in model.parameters()), x, y, own)
        eager = _eager(model)
        start = time.perf_counter()
        traced = make_fx(_step(model))(*args)
        trace_s = time.perf_counter() - start
        variants: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
            "traced": traced,
            "traced, TorchScript": _interpreted(traced, list(args)),
        }
        if compile:
            variants["torch.compile"] = torch.compile(eager, dynamic=False)
        v0, g0 = eager(*args)
        for name, fn in variants.items():
            with torch.no_grad():
                v1, g1 = fn(*args)
            if not (torch.allclose(v0, v1, atol=1e-6) and torch.allclose(g0, g1, atol=1e-6)):
                raise AssertionError(f"{kind}: the {name} step disagrees with the eager one")
        # interleaved rounds, the best of each
        best: dict[str, float] = {}
        for _ in range(2 if quick else 3):
            for name, fn in {"eager": eager, **variants}.items():
                if name == "eager":
                    step = functools.partial(fn, *args)
                else:
                    step = functools.partial(_no_grad, fn, args)
                t = _timed(step, warmup=inner, repeats=repeats, inner=inner, clock=tick)
                best[name] = min(best.get(name, t), t)
        for name in variants:
            row = {
                "benchmark": f"trace/{kind}: one PGD evaluation (margin + input gradient), "
                f"batch {BATCH}, {name}",
                "baseline": "eager hand-written step",
                "ms": round(1e3 * best[name], 3),
                "baseline_ms": round(1e3 * best["eager"], 3),
                "ratio": round(best[name] / best["eager"], 3),
                "target": "report",
                "clock": clock,
            }
            if name == "traced":
                row["trace_s"] = round(trace_s, 2)
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    args = parser.parse_args()
    for row in run(args.quick, args.threads, args.clock, args.compile):
        print(row)


if __name__ == "__main__":
    main()
