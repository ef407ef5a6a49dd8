"""Run folders: what `propdsl train` writes and `propdsl eval` / `propdsl verify` read.

Layout of a run folder::

    config.json          spec hash, resolved params and settings, versions, seed, model
    spec.prop            the spec text as trained
    metrics.jsonl        one JSON object per epoch
    metrics.csv          the same, as a table
    last.safetensors     weights after the last finished epoch, with last.json (epoch, metrics)
    last.state.pt        optimizer / scheduler state for --resume (torch.load weights_only=True)
    best.safetensors     weights of the epoch with the best validation accuracy, with best.json

Checkpoints are written to a temporary file and renamed, so an interruption never leaves a
half-written checkpoint behind (a power cut may lose the newest epoch: files are not fsynced).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from propdsl.errors import UsageError

CONFIG = "config.json"
SPEC = "spec.prop"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
# Everything `train` writes; a fresh run in an old folder removes these first.
RUN_FILES = (
    CONFIG,
    SPEC,
    METRICS_JSONL,
    METRICS_CSV,
    "last.safetensors",
    "last.json",
    "last.state.pt",
    "best.safetensors",
    "best.json",
)


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    # Written aside and renamed: readers and an interrupted run see the old file or the new one,
    # never half of one. No fsync: it made every epoch end 3-4 times slower (five files), and
    # what it adds is only protection of the newest epoch against a power cut.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def clear(run: Path) -> None:
    """Remove a run's files from its folder (other files are left alone)."""
    for name in RUN_FILES:
        (run / name).unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: is this a propdsl run folder?") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON: {err}") from None


def save_checkpoint(run: Path, tag: str, model: Any, meta: dict[str, Any]) -> None:
    """`tag.safetensors` (weights) and `tag.json` (the sidecar: epoch, metrics, ...)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic_write(run / f"{tag}.safetensors", save(tensors))
    write_json(run / f"{tag}.json", meta)


def load_weights(run: Path, tag: str, model: Any) -> dict[str, Any]:
    """Load `tag.safetensors` into `model` (in place); returns the sidecar."""
    from safetensors.torch import load_file

    path = run / f"{tag}.safetensors"
    if not path.exists():
        raise UsageError(f"{path} is missing: the run has no '{tag}' checkpoint")
    state = load_file(str(path))
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UsageError(f"{path} does not fit the model: {err}") from None
    return read_json(run / f"{tag}.json")


def save_state(run: Path, state: dict[str, Any]) -> None:
    import io

    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    _atomic_write(run / "last.state.pt", buf.getvalue())


def load_state(run: Path) -> dict[str, Any] | None:
    import torch

    path = run / "last.state.pt"
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def append_metrics(run: Path, row: dict[str, Any]) -> None:
    """Append one epoch's metrics to metrics.jsonl and rewrite metrics.csv from it."""
    with open(run / METRICS_JSONL, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
    write_metrics_csv(run)


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / METRICS_JSONL
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # a row cut short by an interruption mid-append; --resume rewrites it
            continue
    return rows


def truncate_metrics(run: Path, epochs: int) -> None:
    """Keep the first `epochs` rows (a resumed run rewrites what came after its checkpoint)."""
    rows = [r for r in read_metrics(run) if r.get("epoch", 0) <= epochs]
    _atomic_write(
        run / METRICS_JSONL, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    )
    write_metrics_csv(run)


def write_metrics_csv(run: Path) -> None:
    rows = read_metrics(run)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    tmp = run / (METRICS_CSV + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, run / METRICS_CSV)


@dataclass(frozen=True)
class Run:
    """A run folder opened for evaluation or verification."""

    path: Path
    config: dict[str, Any]
    spec_text: str

    @staticmethod
    def open(path: str | os.PathLike[str]) -> Run:
        p = Path(path)
        if not p.is_dir():
            raise UsageError(f"no such run folder: {p}")
        config = read_json(p / CONFIG)
        spec_path = p / SPEC
        if not spec_path.exists():
            raise UsageError(f"{spec_path} is missing: is this a propdsl run folder?")
        return Run(p, config, spec_path.read_text(encoding="utf-8"))

    def build_model(self, model_ref: str | None = None) -> Any:
        """The network as trained (zoo or user model), weights not yet loaded."""
        from propdsl.models import build_model, load_user_model

        m = self.config["model"]
        ref = model_ref or m.get("user")
        shape, classes = tuple(m["input_shape"]), int(m["num_classes"])
        if ref:
            return load_user_model(ref, input_shape=shape, num_classes=classes)
        if m["name"] == "user":
            what = f" ({m['class']})" if m.get("class") else ""
            raise UsageError(
                f"{self.path} was trained with a model object from the API{what}: "
                "pass the model reference (--model pkg.module:factory)"
            )
        kwargs: dict[str, Any] = {
            k: tuple(v) if k == "activation" else v for k, v in m.get("kwargs", {}).items()
        }
        return build_model(m["name"], shape, classes, **kwargs)

    def load_model(self, tag: str = "best", model_ref: str | None = None, device: Any = "cpu"):
        model = self.build_model(model_ref).to(device)
        load_weights(
            self.path, tag if (self.path / f"{tag}.safetensors").exists() else "last", model
        )
        model.eval()
        return model
