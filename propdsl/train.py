"""Training from a spec's `train` block: data, model, optimiser, the objective, a run folder.

Determinism: every epoch's shuffling, attack starts and dropout draw from generators seeded by
(seed, epoch), so a run resumed from its last checkpoint ends with the same weights as an
uninterrupted run with the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from propdsl import runs
from propdsl.api import Spec
from propdsl.check import BlockInfo, OptionValue
from propdsl.errors import CheckError, PropdslError, UsageError
from propdsl.source import Diagnostic

log = logging.getLogger("propdsl.train")


class TrainingDiverged(PropdslError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """Command-line / API overrides of the spec's train block (None: the spec's value)."""

    out: Path | None = None
    epochs: int | None = None
    batch: int | None = None
    device: str | None = None
    threads: int | None = None
    seed: int | None = None
    resume: bool = False
    model: str | None = None  # "pkg.module:factory" for a user model
    quiet: bool = False
    eval_samples: int = 256  # validation samples for per-epoch property satisfaction


@dataclass
class TrainResult:
    run: Path
    model: nn.Module
    metrics: list[dict[str, Any]] = field(default_factory=list)


def default_threads() -> int:
    """All cores this process may use, at most 8 (small models gain nothing beyond that)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def set_threads(threads: int | None) -> int:
    n = threads or default_threads()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set once in this process
    return n


def resolve_device(name: str | None) -> torch.device:
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' asked for, but CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from None


def run_folder(spec: Spec, options: TrainOptions) -> Path:
    """Where `train` writes: `options.out`, else `runs/<spec file stem>` (`runs/spec` for text)."""
    if options.out is not None:
        return Path(options.out)
    stem = Path(spec.name).stem if spec.name.endswith(".prop") else "spec"
    return Path("runs") / (stem or "spec")


def _block(spec: Spec) -> BlockInfo:
    block = spec.train_block
    if block is None:
        raise UsageError(f"{spec.name} has no train block: add `train f on digits(...) {{ ... }}`")
    if block.get("loss") is None:
        raise CheckError(
            [Diagnostic("a train block needs a 'loss' setting", _name_span(spec, block))],
            spec.source,
        )
    return block


def _name_span(spec: Spec, block: BlockInfo):
    return block.span


def data_kwargs(block: BlockInfo) -> dict[str, Any]:
    name, kwargs = block.data
    return dict(kwargs)


def load_split(spec: Spec, block: BlockInfo, split: str, *, seed: int, root: Path | None = None):
    """One split of the block's data source, checked against the network's declared type."""
    from propdsl.data import DataError, load_dataset

    name, _ = block.data
    kwargs = data_kwargs(block)
    kwargs.pop("split", None)
    kwargs.setdefault("seed", seed)
    if name == "tensors" and root is not None:
        kwargs.setdefault("root", str(root))
    try:
        ds = load_dataset(name, split=split, **kwargs)
    except DataError as err:
        hint = getattr(err, "hint", None)
        raise CheckError([Diagnostic(str(err), block.span, hint)], spec.source) from None
    net = spec.networks[block.network]
    if tuple(ds.input_shape) != net.inp.shape or ds.num_classes > net.out.shape[0]:
        raise CheckError(
            [
                Diagnostic(
                    f"data source '{name}' gives Tensor[{', '.join(map(str, ds.input_shape))}] "
                    f"inputs in {ds.num_classes} classes, but network '{block.network}' is "
                    f"{net.show()}",
                    block.span,
                )
            ],
            spec.source,
        )
    return ds


def model_config(
    spec: Spec, block: BlockInfo, user_ref: str | None, given: nn.Module | None = None
) -> dict[str, Any]:
    net = spec.networks[block.network]
    if given is not None:
        # A model object from the API: the run can only be reopened with the same code, so the
        # config names its class (and the --model reference, when there is one).
        cls = type(given)
        return {
            "name": "user",
            "kwargs": {},
            "user": user_ref,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "input_shape": list(net.inp.shape),
            "num_classes": net.out.shape[0],
        }
    option = block.get("model", OptionValue("mlp"))
    kwargs = {}
    for key, value in option.kwargs:
        if isinstance(value, OptionValue):
            value = [value.name, value.kw()]
        elif isinstance(value, tuple):
            value = list(value)
        kwargs[key] = value
    if option.name == "cnn" and isinstance(kwargs.get("hidden"), list):
        hidden = kwargs["hidden"]
        kwargs["hidden"] = hidden[0] if len(hidden) == 1 else hidden
    if option.name == "user" and user_ref is None:
        raise UsageError("the spec's model is `user`: pass --model pkg.module:factory")
    return {
        "name": option.name,
        "kwargs": kwargs,
        "user": user_ref,
        "input_shape": list(net.inp.shape),
        "num_classes": net.out.shape[0],
    }


def build_from_config(config: dict[str, Any], seed: int) -> nn.Module:
    from propdsl.models import build_model, check_model, load_user_model

    shape, classes = tuple(config["input_shape"]), int(config["num_classes"])
    if config.get("user"):
        model = load_user_model(config["user"], input_shape=shape, num_classes=classes, seed=seed)
        check_model(model, shape, classes)
        return model
    kwargs = {k: tuple(v) if k == "activation" else v for k, v in config["kwargs"].items()}
    return build_model(config["name"], shape, classes, seed=seed, **kwargs)


def _build_spec_model(spec: Spec, block: BlockInfo, config: dict[str, Any], seed: int) -> nn.Module:
    """`build_from_config` with the spec's model options: a bad option (a kernel list longer than
    the channels, a CNN that shrinks the image to nothing) is positioned at the train block."""
    from propdsl.models import ModelError

    try:
        return build_from_config(config, seed)
    except ModelError as err:
        if config.get("user"):
            raise
        diagnostic = Diagnostic(f"model: {err.message}", block.span, err.hint)
        raise CheckError([diagnostic], spec.source) from None


def make_optimizer(block: BlockInfo, params) -> torch.optim.Optimizer:
    option = block.get("optimizer", OptionValue("adam"))
    kw = option.kw()
    lr = float(kw.pop("lr", 1e-3))
    if option.name == "sgd":
        return torch.optim.SGD(params, lr=lr, **kw)
    if option.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, **kw)
    return torch.optim.Adam(params, lr=lr, **kw)


def make_schedule(block: BlockInfo, optimizer, epochs: int):
    option = block.get("schedule", OptionValue("none"))
    kw = option.kw()
    if option.name == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=int(kw.get("step_size", 10)), gamma=float(kw.get("gamma", 0.1))
        )
    if option.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(1, epochs), eta_min=float(kw.get("min_lr", 0.0))
        )
    return None


def ramp_scale(epoch: int, ramp: int) -> float:
    """The eps ramp-up: radii grow linearly over the first `ramp` epochs (epoch is 1-based)."""
    if ramp <= 0:
        return 1.0
    return min(1.0, epoch / ramp)


def _versions() -> dict[str, str]:
    import propdsl

    return {
        "propdsl": propdsl.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so a killed run stops between checkpoints cleanly."""

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(
    spec: Spec,
    options: TrainOptions = TrainOptions(),
    *,
    model: nn.Module | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train the spec's network as its train block says; write a run folder.

    Every epoch ends with a checkpoint (`last.safetensors`, and `best.safetensors` when the
    validation accuracy improved) and a metrics row: the batch means of the loss and of each of
    its additive terms, the validation accuracy and each property's satisfaction rate at the
    training attack's points. A loss that becomes NaN or infinite stops the run with
    `TrainingDiverged`; the checkpoint of the last finished epoch stays as it was.

    Args:
        spec: a loaded spec with a train block.
        options: overrides (epochs, device, threads, seed, output folder, resume, user model).
        model: a ready model to train instead of the zoo's (its weights are the start).
        on_epoch: called with each epoch's metrics row, after its checkpoint is written.

    Returns:
        `TrainResult` with the run folder, the trained model (last epoch) and the metrics rows.

    Raises:
        TrainingDiverged: the loss became NaN or infinite.
        CheckError: the data source does not fit the network (positioned at the train block).
        UsageError: no train block, an unavailable device, a run folder that cannot be resumed.

    >>> import propdsl, tempfile
    >>> spec = propdsl.load('''
    ... network f : Tensor[1, 8, 8] -> Tensor[10]
    ... train f on digits(split = "train", limit = 100) {
    ...   model  = mlp(hidden = [16])
    ...   epochs = 2
    ...   loss   = cross_entropy
    ... }''')
    >>> result = train(spec, TrainOptions(out=tempfile.mkdtemp(), quiet=True))
    >>> [row["epoch"] for row in result.metrics]
    [1, 2]
    """
    previous_threads = torch.get_num_threads()
    try:
        return _train(spec, options, model, on_epoch)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    spec: Spec,
    options: TrainOptions,
    model: nn.Module | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    block = _block(spec)
    seed = options.seed if options.seed is not None else int(block.get("seed", 0))
    epochs = options.epochs if options.epochs is not None else int(block.get("epochs", 10))
    batch = options.batch if options.batch is not None else int(block.get("batch", 64))
    threads = set_threads(options.threads or block.get("threads"))
    device = resolve_device(options.device or block.get("device"))
    ramp = int(block.get("ramp", 0))
    run = run_folder(spec, options)

    train_ds = load_split(spec, block, "train", seed=seed, root=Path(spec.name).parent)
    val_ds = load_split(spec, block, "val", seed=seed, root=Path(spec.name).parent)
    mconf = model_config(spec, block, options.model, model)
    if model is None:
        model = _build_spec_model(spec, block, mconf, seed)
    model = model.to(device)
    optimizer = make_optimizer(block, model.parameters())
    schedule = make_schedule(block, optimizer, epochs)
    generator = torch.Generator(device=device)
    objective = spec.objective(generator=generator)
    prop_names = list(spec.properties)
    prop_losses = {
        n: spec.loss(n, generator=generator) for n in prop_names if _closed_over_data(spec, n)
    }

    config = {
        "spec": spec.name,
        "spec_sha256": runs.spec_hash(spec.source.text),
        "params": spec.params,
        "seed": seed,
        "epochs": epochs,
        "batch": batch,
        "device": str(device),
        "threads": threads,
        "ramp": ramp,
        "data": {"name": block.data[0], **data_kwargs(block)},
        "model": mconf,
        "optimizer": block.get("optimizer", OptionValue("adam")).show(),
        "schedule": block.get("schedule", OptionValue("none")).show(),
        "logic": _show(block.get("logic", "dl2")),
        "attack": _show(block.get("attack", "pgd")),
        "loss": _show_loss(objective),
        "versions": _versions(),
    }
    run.mkdir(parents=True, exist_ok=True)
    start_epoch = 0
    best_acc = -1.0
    if options.resume:
        start_epoch, best_acc = _resume(run, config, model, optimizer, schedule)
    else:
        if any((run / name).exists() for name in runs.RUN_FILES):
            log.warning("%s holds an earlier run; starting afresh (its files are replaced)", run)
            runs.clear(run)
        (run / runs.SPEC).write_text(spec.source.text, encoding="utf-8")
    runs.write_json(run / runs.CONFIG, config)

    x_all, y_all = train_ds.x.to(device), train_ds.y.to(device)
    n = x_all.shape[0]
    metrics: list[dict[str, Any]] = runs.read_metrics(run)
    progress = _Progress(epochs, quiet=options.quiet)
    with _terminate_as_interrupt(), progress:
        for epoch in range(start_epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            torch.manual_seed(seed * 100_003 + epoch)
            generator.manual_seed(seed * 100_003 + epoch)
            order_gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(n, generator=order_gen).to(device)
            scale = ramp_scale(epoch, ramp)
            _set_radius_scale([objective, *prop_losses.values()], scale)
            model.train()
            sums: dict[str, float] = {}
            seen = 0
            steps = 0
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                xb, yb = x_all[idx], y_all[idx]
                loss = objective(model, xb, yb)
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise TrainingDiverged(_diverged_message(objective, epoch, steps + 1, run))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                sums["loss"] = sums.get("loss", 0.0) + loss_value
                for k, v in objective.last_terms.items():
                    column = _term_column(k)
                    sums[column] = sums.get(column, 0.0) + v
                seen += len(idx)
                progress.batch(epoch, seen, n, loss_value)
            if schedule is not None:
                schedule.step()
            train_seconds = time.perf_counter() - t0
            row: dict[str, Any] = {"epoch": epoch}
            row.update({k: v / max(1, steps) for k, v in sums.items()})
            row.update(evaluate_epoch(model, val_ds, prop_losses, device, options.eval_samples))
            row["radius_scale"] = scale
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["train_seconds"] = round(train_seconds, 3)
            row["seconds"] = round(time.perf_counter() - t0, 3)
            meta = {"epoch": epoch, "metrics": row}
            runs.save_checkpoint(run, "last", model, meta)
            # Without validation data there is nothing to choose by: best is last. While the
            # radius still ramps up the properties are trained on smaller regions than they
            # state, so best follows last and the choice starts at the full radius.
            acc = row["val_accuracy"]
            if scale < 1.0:
                improved, best_acc = True, -1.0
            else:
                improved = acc is None or acc > best_acc
                if acc is not None:
                    best_acc = max(best_acc, acc)
            runs.save_state(
                run,
                {
                    "epoch": epoch,
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict() if schedule is not None else {},
                    "best_acc": best_acc,
                },
            )
            if improved:
                runs.save_checkpoint(run, "best", model, meta)
            runs.append_metrics(run, row)
            metrics.append(row)
            progress.epoch(row)
            if on_epoch is not None:
                on_epoch(row)
    return TrainResult(run, model, metrics)


def _closed_over_data(spec: Spec, name: str) -> bool:
    return len(spec.properties[name].params) in (1, 2)


def _term_column(label: str) -> str:
    """The metrics column of a loss term: `loss[TERM]`; a bare property term is already
    `loss[name]`."""
    if label.startswith("loss[") and label.endswith("]") and label.count("[") == 1:
        return label
    return f"loss[{label}]"


def _show(value: Any) -> str:
    return value.show() if isinstance(value, OptionValue) else str(value)


def _set_radius_scale(modules, scale: float) -> None:
    for m in modules:
        m.radius_scale = scale


def _show_loss(objective) -> str:
    from propdsl.pretty import show

    return show(objective.expr)


def _diverged_message(objective, epoch: int, step: int, run: Path) -> str:
    bad = [k for k, v in objective.last_terms.items() if not math.isfinite(v)]
    if bad:
        which = f"term {', '.join(repr(b) for b in bad)} of the loss"
    else:
        which = f"loss {_show_loss(objective)!r}"
    last = run / "last.safetensors"
    kept = (
        f"the checkpoint of the last finished epoch is kept: {last}"
        if last.exists()
        else "no epoch had finished, so there is no checkpoint"
    )
    return (
        f"the {which} became NaN or infinite in epoch {epoch}, batch {step}; training stopped "
        f"and {kept} (try a smaller learning rate, a smaller weight on that term, or another "
        "logic)"
    )


def _resume(run: Path, config: dict[str, Any], model, optimizer, schedule) -> tuple[int, float]:
    old = runs.read_json(run / runs.CONFIG)
    for key in ("spec_sha256", "seed", "model", "params", "batch"):
        if old.get(key) != json.loads(json.dumps(config[key], default=str)):
            raise UsageError(
                f"cannot resume {run}: its {key} differs from this command's "
                "(start a new run with another --out)"
            )
    if not (run / "last.safetensors").exists():
        # Interrupted before its first epoch ended: start from scratch in the same folder.
        runs.truncate_metrics(run, 0)
        return 0, -1.0
    runs.load_weights(run, "last", model)
    state = runs.load_state(run)
    if state is None:
        raise UsageError(f"cannot resume {run}: last.state.pt is missing")
    optimizer.load_state_dict(state["optimizer"])
    if schedule is not None and state.get("schedule"):
        schedule.load_state_dict(state["schedule"])
    epoch = int(state["epoch"])
    runs.truncate_metrics(run, epoch)
    return epoch, float(state.get("best_acc", -1.0))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train(was)
    return correct / max(1, x.shape[0])


def evaluate_epoch(model, val_ds, prop_losses, device, samples: int) -> dict[str, Any]:
    """Validation accuracy and each property's satisfaction rate at the training attack's point.

    Without validation data (`val_fraction = 0`) both are None. Explanation properties (those
    that differentiate the network: saliency maps, `grad`) of a network with ReLUs are attacked
    with the training attack on a softplus surrogate (`surrogate_beta = 10`, as `propdsl eval`
    does, unless the attack sets its own): the input gradient of a ReLU network's saliency map
    is zero almost everywhere, so without it the attack cannot move from its random start and
    the column would read 1.000 whatever the network does.
    """
    if len(val_ds) == 0:
        return {"val_accuracy": None, **{f"satisfied[{name}]": None for name in prop_losses}}
    from propdsl.evaluate import SURROGATE_BETA, _explains

    x, y = val_ds.x.to(device), val_ds.y.to(device)
    out: dict[str, Any] = {"val_accuracy": accuracy(model, x, y)}
    xs, ys = x[:samples], y[:samples]
    relu = any(isinstance(m, nn.ReLU) for m in model.modules())
    was = model.training
    model.eval()
    # The attacks (and explanations) take their input gradients under enable_grad; no graph
    # into the weights is needed here.
    with torch.no_grad():
        for name, loss in prop_losses.items():
            attack = loss.attack
            smooth = relu and attack.surrogate_beta is None and _explains(loss.formula)
            if smooth:
                loss.attack = dataclasses.replace(attack, surrogate_beta=SURROGATE_BETA)
            try:
                res = loss(model, xs, ys)
            finally:
                loss.attack = attack
            out[f"satisfied[{name}]"] = float(res.satisfied.float().mean())
    model.train(was)
    return out


class _Progress:
    """A rich progress bar on a terminal; one log line per epoch otherwise; silent with -q."""

    def __init__(self, epochs: int, quiet: bool):
        self.epochs = epochs
        self.quiet = quiet
        self.live = not quiet and sys.stderr.isatty()
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("epoch {task.fields[epoch]}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self.bar.__enter__()
            self.task = self.bar.add_task("train", total=self.epochs, epoch=0, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def batch(self, epoch: int, seen: int, n: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, epoch=epoch, info=f"loss {loss:.4f}  {seen}/{n}")

    def epoch(self, row: dict[str, Any]) -> None:
        if self.quiet:
            return
        sat = "  ".join(
            f"{k[len('satisfied[') : -1]} {v:.3f}"
            for k, v in row.items()
            if k.startswith("satisfied[") and v is not None
        )
        acc = row["val_accuracy"]
        line = (
            f"epoch {row['epoch']}/{self.epochs}  loss {row['loss']:.4f}  "
            f"val acc {'-' if acc is None else f'{acc:.3f}'}  {sat}  ({row['seconds']:.1f}s)"
        )
        if self.bar is not None:
            self.bar.update(self.task, advance=1, epoch=row["epoch"], info="")
            self.bar.console.print(line)
        else:
            sys.stderr.write(line + "\n")
