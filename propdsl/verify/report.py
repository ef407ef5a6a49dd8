"""`propdsl verify`: verdicts for a trained run on a data split, `verify.json`, counterexamples."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from propdsl import runs
from propdsl.errors import UsageError
from propdsl.verify.run import STATUSES, PropertyVerdicts, verify

DEFAULT_SAMPLES = 100


@dataclass(frozen=True)
class VerifyReport:
    method: str
    split: str
    samples: int
    verdicts: dict[str, PropertyVerdicts]
    json_path: Path
    counterexample_paths: tuple[Path, ...]

    def table(self) -> str:
        head = f"{'property':28} {'verified':>9} {'falsified':>10} {'unknown':>11} {'time (s)':>9}"
        lines = [
            f"verification: method {self.method}, split {self.split}, {self.samples} samples",
            head,
            "-" * len(head),
        ]
        for name, v in self.verdicts.items():
            unknown = v.rate("unknown") + v.rate("unknown (timeout)")
            if v.rate("unsupported") > 0:
                lines.append(
                    f"{name:28} {v.rate('verified'):9.1%} {v.rate('falsified'):10.1%} "
                    f"{'unsupported':>11} {v.seconds:9.2f}"
                )
                lines.append(f"  unsupported: {v.reason}")
                continue
            lines.append(
                f"{name:28} {v.rate('verified'):9.1%} {v.rate('falsified'):10.1%} "
                f"{unknown:11.1%} {v.seconds:9.2f}"
            )
        return "\n".join(lines)


def verify_run(
    spec: Any,
    run: str | Path,
    *,
    method: str | None = None,
    split: str = "test",
    samples: int | None = None,
    timeout: float | None = None,
    properties: list[str] | None = None,
    model_ref: str | None = None,
    device: str | None = None,
) -> VerifyReport:
    """Verify a run's best model on a split of the spec's verify (else train) data source."""
    from propdsl.train import resolve_device

    dev = resolve_device(device)
    r, model, x, y = open_run_data(spec, run, split, samples, model_ref, dev)
    seed = int(r.config.get("seed", 0))
    vb = spec.verify_block
    method = method or (vb.get("method").name if vb is not None and vb.get("method") else "crown")
    if timeout is None and vb is not None:
        timeout = vb.get("timeout")
    falsifier = None
    if vb is not None and vb.get("attack") is not None:
        from propdsl.loss.compile import resolve_attack

        falsifier = resolve_attack(vb.get("attack"))
    generator = torch.Generator(device=dev).manual_seed(seed)
    verdicts = verify(
        spec,
        model,
        x,
        y,
        properties,
        method=method,
        falsifier=falsifier,
        timeout=timeout,
        generator=generator,
    )
    paths = _save_counterexamples(r.path, verdicts, x)
    data = {
        "method": method,
        "split": split,
        "samples": int(x.shape[0]),
        "params": spec.params,
        "properties": {
            name: {
                "rates": {s: v.rate(s) for s in STATUSES},
                "seconds": v.seconds,
                "reason": v.reason,
                "per_sample": [
                    {
                        "index": i,
                        "label": int(y[i]),
                        "status": v.status[i],
                        "margin": _num(v.margin[i]),
                        "reason": v.reasons[i] if v.reasons else None,
                    }
                    for i in range(len(v.status))
                ],
            }
            for name, v in verdicts.items()
        },
    }
    path = r.path / "verify.json"
    runs.write_json(path, json.loads(json.dumps(data, default=str)))
    return VerifyReport(method, split, int(x.shape[0]), verdicts, path, tuple(paths))


def open_run_data(spec: Any, run: str | Path, split: str, samples: int | None, model_ref, device):
    """A run's best model and the first samples of a split of the spec's verify (else train)
    data source, drawn with the run's seed: what `verify` and `export` work on."""
    from propdsl.train import load_split

    r = runs.Run.open(run)
    model = r.load_model("best", model_ref=model_ref, device=device)
    block = spec.verify_block or spec.train_block
    if block is None:
        raise UsageError(f"{spec.name} has neither a verify nor a train block to take data from")
    seed = int(r.config.get("seed", 0))
    ds = load_split(spec, block, split, seed=seed, root=Path(spec.name).parent)
    n = samples or (block.get("samples") if spec.verify_block else None) or DEFAULT_SAMPLES
    return r, model, ds.x[:n].to(device), ds.y[:n].to(device)


def _num(v: Any) -> float | None:
    """A JSON number, or null for NaN and infinities (which JSON cannot write)."""
    f = float(v)
    return f if math.isfinite(f) else None


def _save_counterexamples(run: Path, verdicts: dict[str, PropertyVerdicts], x) -> list[Path]:
    out = []
    folder = run / "counterexamples"
    for name, v in verdicts.items():
        idx = [i for i, s in enumerate(v.status) if s == "falsified"]
        if not idx or not v.counterexamples:
            continue
        folder.mkdir(exist_ok=True)
        arrays = {"index": np.array(idx), "x": x[idx].detach().cpu().numpy()}
        for var, pts in v.counterexamples.items():
            arrays[f"point[{var}]"] = pts[idx].detach().cpu().numpy()
        path = folder / f"{name}.npz"
        np.savez(path, **arrays)
        out.append(path)
        if x.dim() == 4 and x.shape[1] in (1, 3):
            png = folder / f"{name}.png"
            _image_grid(png, arrays["x"], next(iter(v.counterexamples.values()))[idx])
            out.append(png)
    return out


def _image_grid(path: Path, originals, points, limit: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = points.detach().cpu().numpy() if hasattr(points, "detach") else points
    n = min(limit, len(originals))
    fig, axes = plt.subplots(2, n, figsize=(1.6 * n, 3.4), squeeze=False)
    for i in range(n):
        for row, img in enumerate((originals[i], points[i])):
            ax = axes[row][i]
            pic = img.transpose(1, 2, 0) if img.shape[0] == 3 else img[0]
            ax.imshow(pic, cmap=None if img.shape[0] == 3 else "gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][i].set_title(f"#{i}", fontsize=8)
    axes[0][0].set_ylabel("input")
    axes[1][0].set_ylabel("counterexample")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
