"""Complete verification of digits MLPs against Marabou: the same verdicts, every sample decided.

Two MLPs on sklearn's 8x8 digits (64-16-16-10 and 64-100-100-10, plain torch, standard training,
seeded) and the property `argmax(f(x')) == y` over `ball(x, eps, inf) & box(0, 1)` at eps 0.01
and 0.05, for the first test digits. Per sample: propdsl's complete verifier through the
language's own query (`to_query` -> `complete_verdicts`, what `propdsl verify --complete` runs)
and Marabou (Katz et al. 2019), given the network and the violation `f_y - f_j <= 0 for some
j != y` equation by equation, both within the same time limit. The target: every sample Marabou
decides, propdsl decides too, with the same verdict; a disagreement is a wrong answer (must be
0). One torch thread; Marabou with one worker.

    python benchmarks/bench_complete.py                 # 50 samples, 60 s each
    python benchmarks/bench_complete.py --samples 10 --timeout 20 --out digits.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import propdsl
from propdsl.verify.complete import CompleteOptions, complete_verdicts
from propdsl.verify.query import to_query

NETWORKS = {"64-16-16-10": (16, 16), "64-100-100-10": (100, 100)}
EPS = (0.01, 0.05)
SPEC = """
network f : Tensor[64] -> Tensor[10]
param eps : Real = 0.01
property robust(x, y) =
  forall x' in ball(x, eps, inf) & box(0, 1):
    argmax(f(x')) == y
"""


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn's digits in [0, 1], shuffled (seed 0): 1,437 training and 360 test images."""
    data = load_digits()
    order = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(0))
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)[order]
    y = torch.tensor(data.target)[order]
    return x[:-360], y[:-360], x[-360:], y[-360:]


def train(hidden: tuple[int, int], x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(64, hidden[0]), nn.ReLU(), nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
        nn.Linear(hidden[1], 10),
    )  # fmt: skip
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(100):
        order = torch.randperm(x.shape[0], generator=gen)
        for k in range(0, x.shape[0], 64):
            idx = order[k : k + 64]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return net.eval()


def marabou(net: nn.Sequential, lo: np.ndarray, hi: np.ndarray, label: int, timeout: int) -> str:
    """Marabou's answer to: some x in [lo, hi] with f_y(x) - f_j(x) <= 0 for some j != y."""
    from maraboupy import Marabou, MarabouCore

    ipq = MarabouCore.InputQuery()
    count = lo.shape[0]
    prev = list(range(count))
    equations, relus = [], []
    for layer in net:
        if isinstance(layer, nn.Linear):
            W = layer.weight.detach().double().numpy()
            b = layer.bias.detach().double().numpy()
            out = list(range(count, count + W.shape[0]))
            count += W.shape[0]
            for k in range(W.shape[0]):
                eq = MarabouCore.Equation()
                for j in range(W.shape[1]):
                    eq.addAddend(float(W[k, j]), prev[j])
                eq.addAddend(-1.0, out[k])
                eq.setScalar(float(-b[k]))
                equations.append(eq)
            prev = out
        else:
            out = list(range(count, count + len(prev)))
            count += len(prev)
            relus += list(zip(prev, out, strict=True))
            prev = out
    ipq.setNumberOfVariables(count)
    for i in range(lo.shape[0]):
        ipq.setLowerBound(i, float(lo[i]))
        ipq.setUpperBound(i, float(hi[i]))
        ipq.markInputVariable(i, i)
    for k, v in enumerate(prev):
        ipq.markOutputVariable(v, k)
    for eq in equations:
        ipq.addEquation(eq)
    for b, f in relus:
        MarabouCore.addReluConstraint(ipq, b, f)
    disjuncts = []
    for j in range(10):
        if j == label:
            continue
        eq = MarabouCore.Equation(MarabouCore.Equation.LE)  # f_y - f_j <= 0
        eq.addAddend(1.0, prev[label])
        eq.addAddend(-1.0, prev[j])
        eq.setScalar(0.0)
        disjuncts.append([eq])
    MarabouCore.addDisjunctionConstraint(ipq, disjuncts)
    options = Marabou.createOptions(verbosity=0, timeoutInSeconds=timeout, numWorkers=1)
    code, _, stats = MarabouCore.solve(ipq, options, "")
    if stats.hasTimedOut():
        return "timeout"
    return code


def run(
    quick: bool = False,
    samples: int | None = None,
    timeout: float = 60.0,
    out: str | None = None,
    verbose: bool = False,
) -> list[dict[str, Any]]:
    """One row per (network, eps): propdsl's and Marabou's verdict counts and times, and the
    agreement on the samples Marabou decides."""
    torch.set_num_threads(1)
    n = samples or (5 if quick else 50)
    x_train, y_train, x_test, y_test = digits()
    spec = propdsl.load(SPEC)
    prop = spec.property("robust")
    params = [p for p, _ in prop.params]
    rows, records = [], []
    for name, hidden in NETWORKS.items():
        net = train(hidden, x_train, y_train)
        with torch.no_grad():
            accuracy = float((net(x_test).argmax(1) == y_test).float().mean())
        x, y = x_test[:n], y_test[:n]
        for eps in EPS:
            formula = spec.with_params(eps=eps).property("robust").formula
            ours, theirs, our_s, their_s = [], [], [], []
            for b in range(n):
                with torch.no_grad():  # the query of one sample
                    query = to_query(
                        formula, params, {"f": 10}, x[b : b + 1], y[b : b + 1], {"f": net}
                    )
                assert query is not None and query.region is not None
                lo, hi = (t[0].double().numpy() for t in query.region.bounding_box())
                start = time.perf_counter()
                status, reason, _ = complete_verdicts(query, net, CompleteOptions(timeout=timeout))
                our_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                answer = marabou(net, lo, hi, int(y[b]), int(timeout))
                their_s.append(time.perf_counter() - start)
                ours.append(status[0])
                theirs.append(answer)
                records.append(
                    dict(network=name, eps=eps, sample=b, propdsl=status[0], reason=reason[0],
                         propdsl_s=our_s[-1], marabou=answer, marabou_s=their_s[-1])
                )  # fmt: skip
                if verbose:
                    print(
                        f"{name} eps {eps} sample {b}: propdsl {status[0]} ({our_s[-1]:.1f} s), "
                        f"marabou {answer} ({their_s[-1]:.1f} s)",
                        flush=True,
                    )
            rows.append(_row(name, accuracy, eps, ours, theirs, our_s, their_s))
    if out is not None:
        Path(out).write_text(json.dumps(dict(rows=rows, samples=records), indent=1))
    return rows


def _row(name, accuracy, eps, ours, theirs, our_s, their_s) -> dict[str, Any]:
    verdict = {"verified": "unsat", "falsified": "sat"}
    decided_by_marabou = [i for i, a in enumerate(theirs) if a in ("sat", "unsat")]
    agree = sum(verdict.get(ours[i]) == theirs[i] for i in decided_by_marabou)
    wrong = sum(ours[i] in verdict and verdict[ours[i]] != theirs[i] for i in decided_by_marabou)
    ours_decided = [i for i, s in enumerate(ours) if s in verdict]
    return dict(
        benchmark=f"{name} eps {eps}",
        accuracy=accuracy,
        samples=len(ours),
        propdsl_verified=ours.count("verified"),
        propdsl_falsified=ours.count("falsified"),
        propdsl_open=len(ours) - len(ours_decided),
        propdsl_median_s=statistics.median(our_s),
        propdsl_max_s=max(our_s),
        marabou_unsat=theirs.count("unsat"),
        marabou_sat=theirs.count("sat"),
        marabou_open=len(theirs) - len(decided_by_marabou),
        marabou_median_s=statistics.median(their_s),
        marabou_max_s=max(their_s),
        same_verdict_where_marabou_decides=f"{agree} / {len(decided_by_marabou)}",
        wrong=wrong,
        target="met" if agree == len(decided_by_marabou) else "NOT met",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per sample, each")
    parser.add_argument("--out", help="write the rows and every sample's verdicts (JSON)")
    args = parser.parse_args()
    rows = run(samples=args.samples, timeout=args.timeout, out=args.out, verbose=True)
    for r in rows:
        print(
            f"{r['benchmark']:<24} acc {r['accuracy']:.3f}  propdsl {r['propdsl_verified']} "
            f"verified / {r['propdsl_falsified']} falsified / {r['propdsl_open']} open "
            f"(median {r['propdsl_median_s']:.2f} s, max {r['propdsl_max_s']:.1f} s)  marabou "
            f"{r['marabou_unsat']} unsat / {r['marabou_sat']} sat / {r['marabou_open']} open "
            f"(median {r['marabou_median_s']:.2f} s, max {r['marabou_max_s']:.1f} s)  same "
            f"verdict {r['same_verdict_where_marabou_decides']}, wrong {r['wrong']}: "
            f"target {r['target']}"
        )


if __name__ == "__main__":
    main()
