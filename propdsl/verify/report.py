"""`propdsl verify`: verdicts for a trained run on a data split, `verify.json`, counterexamples.

The results of one setting (method, split, samples, checkpoint, params, ...) go to their own
folder, `RUN/verify/<method>-<key>/` (`propdsl.results`): `verify.json` and `counterexamples/`;
`RUN/verify.json` is a copy of the latest `verify.json`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from propdsl import runs
from propdsl.errors import UsageError
from propdsl.registry import Method
from propdsl.results import positive_count, positive_seconds, result_key, write_results
from propdsl.session import (
    Checkpoint,
    RunSetup,
    draw_partners,
    holds_run,
    load_samples,
    open_run,
    resolve_device,
)
from propdsl.verify.run import (
    FALSIFIED,
    STATUSES,
    TIMEOUT,
    UNKNOWN,
    UNSUPPORTED,
    VERIFIED,
    PropertyVerdicts,
    as_method,
    verify,
)

DEFAULT_SAMPLES = 100
VERIFY_DIR = runs.VERIFY_DIR  # RUN/verify/<method>-<key>/verify.json
VERIFY_JSON = runs.VERIFY_JSON
COUNTEREXAMPLE_LIMIT = 8  # columns of a counterexample PNG (the .npz holds every one)


@dataclass(frozen=True)
class VerifyReport:
    method: str
    split: str
    samples: int
    verdicts: dict[str, PropertyVerdicts]
    json_path: Path
    counterexample_paths: tuple[Path, ...]
    header: str = ""  # checkpoint, params and notes (`RunSetup.header`)
    results: Path | None = None  # this setting's folder
    reasons: dict[str, list[str | None]] = field(default_factory=dict)

    def table(self) -> str:
        head = f"{'property':28} {'verified':>9} {'falsified':>10} {'unknown':>11} {'time (s)':>9}"
        lines = [f"verification: method {self.method}, split {self.split}, {self.samples} samples"]
        if self.header:
            lines += self.header.splitlines()
        lines += [head, "-" * len(head)]
        for name, v in self.verdicts.items():
            unknown = v.rate(UNKNOWN) + v.rate(TIMEOUT)
            if v.rate(UNSUPPORTED) > 0:
                lines.append(
                    f"{name:28} {v.rate(VERIFIED):9.1%} {v.rate(FALSIFIED):10.1%} "
                    f"{'unsupported':>11} {v.seconds:9.2f}"
                )
                lines.append(f"  unsupported: {v.reason}")
                continue
            lines.append(
                f"{name:28} {v.rate(VERIFIED):9.1%} {v.rate(FALSIFIED):10.1%} "
                f"{unknown:11.1%} {v.seconds:9.2f}"
            )
            lines += _reason_lines(v, self.reasons.get(name) or [])
        return "\n".join(lines)


def _reason_lines(v: PropertyVerdicts, reasons: list[str | None], shown: int = 3) -> list[str]:
    """`  unknown, 12 samples (e.g. #4): the crown bounds are too loose: ...`: the reasons of the
    open samples, grouped by their wording with the numbers left out, most frequent first."""
    groups: dict[str, list[int]] = {}
    for i, status in enumerate(v.status):
        if status in (UNKNOWN, TIMEOUT) and i < len(reasons) and reasons[i]:
            groups.setdefault(_wording(reasons[i] or ""), []).append(i)
    out = []
    for _, idx in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:shown]:
        count = f"{len(idx)} sample{'s' if len(idx) > 1 else ''}"
        out.append(f"  {v.status[idx[0]]}, {count} (e.g. #{idx[0]}): {reasons[idx[0]]}")
    if len(groups) > shown:
        out.append(f"  ... {len(groups) - shown} other reasons; every sample's in verify.json")
    return out


_NUMBER = re.compile(r"[-+]?\d+(\.\d+)?([eE][-+]?\d+)?")


def _wording(reason: str) -> str:
    return _NUMBER.sub("#", reason)


def _fallback_reasons(v: PropertyVerdicts) -> list[str | None]:
    """Per-sample reasons from the verdicts alone, where the verifier gave none: why a sample
    is open (the certified margin is below what a proof needs, or the time ran out)."""
    out: list[str | None] = []
    for i, status in enumerate(v.status):
        m = float(v.margin[i]) if i < len(v.margin) else math.nan
        if status == UNKNOWN:
            out.append(
                f"bounds too loose: certified margin {m:.4g}, a proof needs >= 0"
                if math.isfinite(m)
                else "no finite bound was certified"
            )
        elif status == TIMEOUT:
            out.append("the time limit per sample ran out")
        elif status == UNSUPPORTED:
            out.append(v.reason)
        else:
            out.append(None)
    return out


def _reasons(v: PropertyVerdicts) -> list[str | None]:
    given = list(getattr(v, "reasons", None) or [])
    fallback = _fallback_reasons(v)
    if len(given) != len(v.status):
        return fallback
    return [g if g else f for g, f in zip(given, fallback, strict=True)]


@holds_run("verify")
def verify_run(
    spec: Any,
    run: str | Path,
    *,
    method: Method | str | None = None,
    split: str = "test",
    samples: int | None = None,
    timeout: float | None = None,
    properties: list[str] | None = None,
    model_ref: str | None = None,
    device: str | None = None,
    checkpoint: Checkpoint | str | None = None,
    spec_differs_ok: bool = False,
    complete: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> VerifyReport:
    """Verify a checkpoint of a run on the first `samples` of a split of the spec's verify
    (else train) data source; write `RUN/verify/<method>-<key>/` and a copy of `verify.json`.

    The run's params are the defaults of the params the spec was not loaded with; `checkpoint`
    is `best` (default) or `last`; a spec that is not the run's is refused unless
    `spec_differs_ok`. With `complete`, the samples the bounds leave unknown go to the
    complete verifier, `timeout` seconds each (`propdsl.verify.run.verify_property`).
    `progress(stage, done, total)` is called before each property and at the end. Counts and
    the timeout are checked before any work.
    """
    positive_count("samples", samples)
    positive_seconds("timeout", timeout)
    dev = resolve_device(device)
    setup, x, y = open_run_data(
        spec,
        run,
        split,
        samples,
        model_ref,
        dev,
        checkpoint=checkpoint,
        spec_differs_ok=spec_differs_ok,
    )
    spec, model = setup.spec, setup.model
    chosen, timeout, falsifier, names = _settings(spec, method, timeout, properties)
    generator = torch.Generator(device=dev).manual_seed(setup.seed)
    # properties of a pair: partners from the split, as each `partner` clause says
    partners = draw_partners(setup, split, names, x, y, dev)
    verdicts = _verdicts(
        spec,
        model,
        x,
        y,
        names,
        chosen,
        falsifier,
        timeout,
        generator,
        complete,
        progress,
        partners,
    )
    reasons = {name: _reasons(v) for name, v in verdicts.items()}
    n = int(x.shape[0])
    settings = {
        "command": "verify",
        "method": chosen.value,
        "timeout": timeout,
        "properties": names,
        "falsifier": repr(falsifier),
        "device": dev.type,
        **({"complete": True} if complete else {}),  # keys of earlier results stay the same
    }
    key = result_key(setup, split=split, n=n, settings=settings, prefix=chosen.value)
    folder = setup.path / VERIFY_DIR / key
    written: list[Path] = []  # relative to the folder

    def write(tmp: Path) -> dict[str, Any]:
        for path in _save_counterexamples(tmp, spec, model, verdicts, x, y):
            written.append(path.relative_to(tmp))
        data = {
            **setup.record(),
            "method": chosen.value,
            "split": split,
            "samples": n,
            "seed": setup.seed,
            "timeout": timeout,
            "complete": complete,
            "settings": settings,
            "properties": {
                name: {
                    "rates": {s: v.rate(s) for s in STATUSES},
                    "seconds": v.seconds,
                    "reason": v.reason,
                    "per_sample": [
                        {
                            "index": i,
                            "label": int(y[i]) if y is not None else None,
                            "status": v.status[i],
                            "margin": _num(v.margin[i]),
                            "reason": reasons[name][i],
                        }
                        for i in range(len(v.status))
                    ],
                }
                for name, v in verdicts.items()
            },
        }
        return json.loads(json.dumps(data, default=str))

    write_results(setup.path, VERIFY_DIR, key, VERIFY_JSON, write)
    if progress is not None:
        progress("done", len(names), len(names))
    paths = tuple(folder / p for p in written)
    return VerifyReport(
        chosen.value + (" + complete" if complete else ""),
        split,
        n,
        verdicts,
        folder / VERIFY_JSON,
        paths,
        header=setup.header(),
        results=folder,
        reasons=reasons,
    )


def _settings(
    spec: Any, method: Method | str | None, timeout: float | None, properties: list[str] | None
) -> tuple[Method, float | None, Any, list[str]]:
    """The method, timeout, falsifier and property names: the arguments', else the verify
    block's, else the defaults; unknown property names are refused before any work."""
    vb = spec.verify_block
    # `method` (a `Method`, or its name from a library caller), else the block's, else CROWN
    chosen = as_method(method or (vb.get("method") if vb is not None else None) or Method.CROWN)
    if timeout is None and vb is not None and vb.get("timeout") is not None:
        timeout = positive_seconds("the verify block's timeout", vb.get("timeout"))
    falsifier = None
    if vb is not None and vb.get("attack") is not None:
        from propdsl.attacks import resolve_attack

        falsifier = resolve_attack(vb.get("attack"))
    names = list(properties) if properties is not None else None
    if names is None:
        from propdsl.verify.run import _default_properties

        names = _default_properties(spec)
    for name in names:
        spec.property(name)  # a clear error for an unknown name, before any work
    return chosen, timeout, falsifier, names


def _verdicts(
    spec: Any,
    model: Any,
    x: torch.Tensor,
    y: torch.Tensor | None,
    names: list[str],
    chosen: Method,
    falsifier: Any,
    timeout: float | None,
    generator: torch.Generator,
    complete: bool,
    progress: Callable[[str, int, int], None] | None,
    partners: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> dict[str, PropertyVerdicts]:
    verdicts: dict[str, PropertyVerdicts] = {}
    for k, name in enumerate(names):
        if progress is not None:
            progress(f"property {name}", k, len(names))
        # One property at a time, in order, with the same generator: what `verify` does for
        # the whole list, so the verdicts are the same.
        verdicts.update(
            verify(
                spec,
                model,
                x,
                y,
                [name],
                method=chosen,
                falsifier=falsifier,
                timeout=timeout,
                generator=generator,
                complete=complete,
                **({"partner": partners[name]} if partners and name in partners else {}),
            )
        )
    return verdicts


@dataclass(frozen=True)
class ModelReport:
    """The verdicts of `verify_model`: a network given as a module (an imported ONNX file),
    not a run; nothing is written."""

    method: str
    split: str
    samples: int
    verdicts: dict[str, PropertyVerdicts]
    source: str
    reasons: dict[str, list[str | None]] = field(default_factory=dict)

    def table(self) -> str:
        report = VerifyReport(
            self.method,
            self.split,
            self.samples,
            self.verdicts,
            Path(),
            (),
            header=f"model: {self.source}",
            reasons=self.reasons,
        )
        return report.table()


def verify_model(
    spec: Any,
    model: Any,
    *,
    method: Method | str | None = None,
    split: str = "test",
    samples: int | None = None,
    timeout: float | None = None,
    properties: list[str] | None = None,
    complete: bool = False,
    seed: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ModelReport:
    """Verify a network that is not a run (e.g. `propdsl.load_onnx(path)`) on the first
    `samples` (default: the verify block's, else 100) of a split of the spec's verify (else
    train) data source, split with the data source's `seed` (else 0: the split seed a run
    trained with the spec uses, whatever its training seed); `seed` (default: the train block's
    seed, else 0) seeds the falsifier. The model must fit the spec's network: its
    `input_shape` / `num_outputs` (an imported ONNX model's) or, for other modules, a forward
    pass on one sample; a mismatch is a usage error naming both.
    """
    from propdsl.session import load_block_split
    from propdsl.verify.run import check_model_fits

    positive_count("samples", samples)
    positive_seconds("timeout", timeout)
    chosen, timeout, falsifier, names = _settings(spec, method, timeout, properties)
    block = spec.verify_block or spec.train_block
    if block is None:
        raise UsageError(f"{spec.name} has no verify or train block: no data to verify on")
    check_model_fits(spec, model, block.network)
    if seed is None:
        tb = spec.train_block
        seed = int(tb.get("seed")) if tb is not None and tb.get("seed") is not None else 0
    vb = spec.verify_block
    n = samples or (vb.get("samples") if vb is not None else None) or DEFAULT_SAMPLES
    n = positive_count("the verify block's samples", n)
    ds = load_block_split(spec, block, split, root=Path(spec.name).parent)
    if len(ds) == 0:
        raise UsageError(f"the {split} split is empty")
    x, y = ds.x[:n], ds.y[:n]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if dtype is not None:
        x = x.to(dtype)
    generator = torch.Generator().manual_seed(seed)
    verdicts = _verdicts(
        spec, model, x, y, names, chosen, falsifier, timeout, generator, complete, progress
    )
    if progress is not None:
        progress("done", len(names), len(names))
    return ModelReport(
        chosen.value + (" + complete" if complete else ""),
        split,
        int(x.shape[0]),
        verdicts,
        str(getattr(model, "source", type(model).__name__)),
        reasons={name: _reasons(v) for name, v in verdicts.items()},
    )


def open_run_data(
    spec: Any,
    run: str | Path,
    split: str,
    samples: int | None,
    model_ref,
    device,
    *,
    checkpoint: Checkpoint | str | None = None,
    spec_differs_ok: bool = False,
) -> tuple[RunSetup, Any, Any]:
    """A run opened for the spec (`propdsl.session.open_run`: checked to fit, the run's params
    as defaults, the chosen checkpoint) and the first samples of a split of the spec's verify
    (else train) data source, drawn with the run's seed (`propdsl.session.load_samples`): what
    `verify` and `export` work on.

    `samples`: None for the verify block's `samples`, else 100.
    """
    positive_count("samples", samples)
    setup = open_run(
        spec,
        run,
        checkpoint=checkpoint,
        model_ref=model_ref,
        device=device,
        spec_differs_ok=spec_differs_ok,
    )
    block = setup.spec.verify_block
    n = samples or (block.get("samples") if block is not None else None) or DEFAULT_SAMPLES
    n = positive_count("the verify block's samples", n)
    ds = load_samples(setup, split, n, device)
    return setup, ds.x, ds.y


def _num(v: Any) -> float | None:
    """A JSON number, or null for NaN and infinities (which JSON cannot write)."""
    f = float(v)
    return f if math.isfinite(f) else None


def _margins(model, points, reference) -> torch.Tensor:
    """`f[c] - max_{j != c} f[j]` at the points, c the reference class per point."""
    with torch.no_grad():
        logits = model(points).flatten(1)
    true = logits.gather(1, reference.reshape(-1, 1)).squeeze(1)
    others = logits.scatter(1, reference.reshape(-1, 1), -math.inf)
    return true - others.amax(1)


def _save_counterexamples(folder: Path, spec, model, verdicts, x, y) -> list[Path]:
    from propdsl import plots

    out = []
    where = folder / "counterexamples"
    for name, v in verdicts.items():
        # A sample decided because every region it quantifies over is empty has no point (NaN
        # placeholders): it is falsified without a counterexample to save.
        idx = [
            i
            for i, s in enumerate(v.status)
            if s == FALSIFIED
            and all(bool(torch.isfinite(p[i]).all()) for p in v.counterexamples.values())
        ]
        if not idx or not v.counterexamples:
            continue
        where.mkdir(exist_ok=True)
        arrays = {"index": np.array(idx), "x": x[idx].detach().cpu().numpy()}
        for var, pts in v.counterexamples.items():
            arrays[f"point[{var}]"] = pts[idx].detach().cpu().numpy()
        path = where / f"{name}.npz"
        np.savez(path, **arrays)
        out.append(path)
        var, pts = next(iter(v.counterexamples.items()))
        if x.dim() == 4 and x.shape[1] in (1, 3) and tuple(pts.shape[1:]) == tuple(x.shape[1:]):
            sel = torch.tensor(idx[:COUNTEREXAMPLE_LIMIT], device=x.device)
            xs, ps = x[sel], pts[sel].to(x.device)
            with torch.no_grad():
                pred_x, pred_p = model(xs).argmax(1), model(ps).argmax(1)
            labelled = y is not None and len(spec.property(name).params) == 2
            reference = y[sel] if labelled else pred_x
            shown = min(len(idx), COUNTEREXAMPLE_LIMIT)
            title = (
                f"{name}: {shown} of {len(idx)} counterexamples ({var}; every one in "
                f"{name}.npz); margin: logit margin of the "
                f"{'label' if labelled else 'class predicted at the sample'} there"
            )
            png = plots.counterexample_grid(
                xs,
                ps,
                idx[:COUNTEREXAMPLE_LIMIT],
                y[sel].tolist() if y is not None else None,
                pred_x.tolist(),
                pred_p.tolist(),
                _margins(model, ps, reference).tolist(),
                where / f"{name}.png",
                title=title,
            )
            out.append(png)
    return out
