"""Training from a spec's `train` block: data, model, optimiser, the objective, a run folder.

Determinism: every epoch's shuffling, attack starts and dropout draw from generators seeded by
(seed, epoch), so a run resumed from its last checkpoint ends with the same weights as an
uninterrupted run with the same seed.

Devices, threads, data splits and models come from `propdsl.session` (the run setup every
command shares); `set_threads`, `resolve_device`, `load_split` (`session.load_block_split`)
and `MAX_THREADS` stay importable from here.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
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

from propdsl import distributed, registry, runs, tracing
from propdsl.api import Spec
from propdsl.check import BlockInfo, OptionValue
from propdsl.errors import CheckError, PropdslError, UsageError
from propdsl.interpret import differentiates
from propdsl.loss.augment import FGSMAugment
from propdsl.session import (
    MAX_THREADS,
    block_split_seed,
    build_from_config,
    data_kwargs,
    model_config,
    resolve_device,
    set_threads,
)
from propdsl.session import load_block_split as load_split
from propdsl.source import Diagnostic

log = logging.getLogger("propdsl.train")


class TrainingDiverged(PropdslError):
    """The loss or the weights became NaN or infinite (or the weights exploded); the last good
    checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped `train`. `run` is the run folder, `epoch` its last committed
    epoch (0: none), `started` whether the folder holds this run's config (so `--resume` can
    continue it)."""

    def __init__(self, run: Path, epoch: int, started: bool):
        super().__init__(f"training interrupted; {run} keeps epoch {epoch}")
        self.run = run
        self.epoch = epoch
        self.started = started


# Weights above this size mean training exploded (zoo models on [0, 1] inputs stay far below):
# such an epoch never becomes `last` or `best`.
MAX_ABS_WEIGHT = 1e6
# Seeds feed `seed * 100_003 + epoch` into torch's 64-bit generators (the checker's range).
assert registry.SEED.hi is not None  # the checker's range has an upper end
MAX_SEED = int(registry.SEED.hi)


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
    force: bool = False  # replace a run already in `out` (and its eval / verify results)
    model: str | None = None  # "pkg.module:factory" for a user model
    quiet: bool = False
    eval_samples: int = 256  # validation samples for per-epoch property satisfaction


@dataclass
class TrainResult:
    run: Path
    model: nn.Module
    metrics: list[dict[str, Any]] = field(default_factory=list)


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


def _build_spec_model(
    spec: Spec, block: BlockInfo, config: dict[str, Any], seed: int, user_ref: str | None
) -> nn.Module:
    """`build_from_config` with the spec's model options: a bad option (a kernel list longer than
    the channels, a CNN that shrinks the image to nothing) is positioned at the train block."""
    from propdsl.models import ModelError

    try:
        return build_from_config(config, seed, user_ref)
    except ModelError as err:
        if config.get("user"):
            raise
        diagnostic = Diagnostic(f"model: {err.message}", block.span, err.hint)
        raise CheckError([diagnostic], spec.source) from None


_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def make_optimizer(block: BlockInfo, params) -> torch.optim.Optimizer:
    """The block's optimizer over `params`, with PyTorch's fused kernel (one kernel per step for
    all the parameters) unless the block sets `fused = false` or the kernel does not exist for
    the parameters' device and dtype: the same update, computed in another order (the weights
    differ from the unfused kernels' in the last bits), 2-2.5 times faster on small models.

    A run resumed from a checkpoint keeps the kernel it was trained with (it is part of the
    saved optimizer state)."""
    option = block.get("optimizer", OptionValue("adam"))
    kw = option.kw()
    lr = float(kw.pop("lr", 1e-3))
    fused = kw.pop("fused", None)
    cls = _OPTIMIZERS.get(option.name, torch.optim.Adam)
    params = list(params)
    problem = _no_fused_kernel(params)
    if problem is not None and fused:
        raise UsageError(
            f"optimizer {option.name}(fused = true): PyTorch has no fused kernel for {problem}; "
            "drop fused = true"
        )
    if problem is None and fused is not False:
        return cls(params, lr=lr, fused=True, **kw)
    return cls(params, lr=lr, **kw)


def _no_fused_kernel(params: list[Tensor]) -> str | None:
    """None when PyTorch's fused optimizer kernels take every parameter; else the first one
    they do not take (PyTorch itself finds out only at the first step)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - a torch without the list: the two it always had
        devices = {"cpu", "cuda"}
    for p in params:
        if not p.is_floating_point() or p.device.type not in devices:
            return f"{p.dtype} parameters on {p.device.type}"
    return None


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

    Every epoch ends with one atomic commit (`propdsl.runs.commit_epoch`) of a checkpoint
    (`last.safetensors`, and `best.safetensors` when the validation accuracy improved), the
    optimizer state and a metrics row: the batch means of the loss and of each of its additive
    terms, the validation accuracy and each property's satisfaction rate at the training
    attack's points. The files are serialised at the end of the epoch and committed in a
    background thread while the next epoch trains (one commit in flight at a time; a failed
    commit stops the run after the batch in progress; `train` returns or raises only once no
    commit is under way). A loss that becomes NaN or infinite, or weights that do at the end of an
    epoch (or exceed `MAX_ABS_WEIGHT`), stop the run with `TrainingDiverged`; the checkpoint of
    the last finished epoch stays as it was. The run folder is locked while training writes it.

    With `options.resume`, the run in the folder continues from its last committed epoch with
    the settings it started with (epochs, batch, seed, device, threads), except those `options`
    gives; a user model must be given again (`options.model` or `model`): a run folder names it
    but never runs it.

    Args:
        spec: a loaded spec with a train block.
        options: overrides (epochs, device, threads, seed, output folder, resume, user model).
        model: a ready model to train instead of the zoo's (its weights are the start).
        on_epoch: called with each epoch's metrics row at the end of the epoch (the model holds
            that epoch's weights), once its files are serialised; their commit may still be
            under way in the background. Whatever it raises (a KeyboardInterrupt) leaves the
            epoch committed: the commit in flight is finished first.

    Returns:
        `TrainResult` with the run folder, the trained model (last epoch) and the metrics rows.

    Raises:
        TrainingDiverged: the loss, or the weights at the end of an epoch, became NaN or infinite
            (or the weights exploded).
        TrainingInterrupted: Ctrl-C or SIGTERM (a KeyboardInterrupt saying what the folder keeps).
        CheckError: the data source does not fit the network (positioned at the train block).
        UsageError: no train block, an unavailable device, bad settings;
            `propdsl.runs.RunFolderError` for a run folder that cannot be resumed, is damaged,
            edited, another tool's or in use (`RunInUse`), `RunWriteError` when writing it fails.

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
    run = run_folder(spec, options)
    try:
        with _terminate_as_interrupt():
            return _train_in(spec, block, run, options, model, on_epoch)
    except _Interrupted as stop:
        raise TrainingInterrupted(
            run, _kept_epoch(run) if stop.started else 0, stop.started
        ) from None
    except KeyboardInterrupt:
        raise TrainingInterrupted(run, 0, False) from None


class _Interrupted(KeyboardInterrupt):
    """Interrupted while holding the folder; `started`: its config.json is this run's."""

    def __init__(self, started: bool):
        super().__init__()
        self.started = started


def _kept_epoch(run: Path) -> int:
    try:
        manifest = runs.read_manifest(run)
    except runs.RunFolderError:
        return 0
    return manifest.epoch if manifest is not None else 0


def _setting(
    name: str, given: Any, remembered: dict[str, Any], block: BlockInfo, default: Any
) -> tuple[Any, str]:
    """A setting that shapes the run: the command's, else (resuming) the run's, else the block's,
    else the default. A resumed run thus continues with exactly the settings it started with."""
    if given is not None:
        return given, "command"
    if name in remembered:
        return remembered[name], "run"
    value = block.get(name)
    return (default, "default") if value is None else (value, "spec")


def _whole(name: str, value: Any, origin: str, run: Path, low: int, high: int | None) -> int:
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (high is not None and value > high)
    ):
        where = f"{run / runs.CONFIG}: " if origin == "run" else ""
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise UsageError(f"{where}{name} must be a whole number {bound}, got {value!r}")
    return value


def _train_in(
    spec: Spec,
    block: BlockInfo,
    run: Path,
    options: TrainOptions,
    model: nn.Module | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    remembered: dict[str, Any] = {}
    if options.resume and options.force:
        raise UsageError(
            "--resume continues the run in the folder and --force replaces it: use one"
        )
    if options.resume:
        # rank 0 reads the folder (the others may run where it is not: another machine)
        remembered = distributed.from_main(lambda: _run_config(run))
        before = remembered.get("processes", 1)
        if before != distributed.world():
            log.warning(
                "%s was trained in %s process(es) and continues in %d: the weights will differ "
                "in the last bits from an uninterrupted run (docs/distributed.md)",
                run, before, distributed.world(),
            )  # fmt: skip
        recorded = remembered["model"].get("user")
        if recorded and options.model is None and model is None:
            raise UsageError(
                f"{run} was trained with the user model '{recorded}'; a run folder never runs "
                f"code, so name it to continue: --model {recorded}"
            )
    else:
        distributed.from_main(lambda: _check_fresh_folder(run, options.force))
    seed = _whole("seed", *_setting("seed", options.seed, remembered, block, 0), run, 0, MAX_SEED)
    epochs = _whole(
        "epochs", *_setting("epochs", options.epochs, remembered, block, 10), run, 1, None
    )
    batch = _whole("batch", *_setting("batch", options.batch, remembered, block, 64), run, 1, None)
    threads_value, threads_origin = _setting("threads", options.threads, remembered, block, None)
    if threads_value is not None:
        _whole("threads", threads_value, threads_origin, run, 1, MAX_THREADS)
    if threads_value is None and distributed.active():
        threads_value = 1  # N processes with several threads each oversubscribe the cores
    threads = set_threads(threads_value)
    device_name, device_origin = _setting("device", options.device, remembered, block, None)
    try:
        device = resolve_device(device_name)
    except UsageError as err:
        if device_origin != "run":
            raise
        raise UsageError(
            f"{run} was trained on '{device_name}': {err}; pass --device to continue elsewhere "
            "(the weights may then differ in the last bits from a run on one device)"
        ) from None
    ramp = int(block.get("ramp", 0))
    if device.type == "cuda" and distributed.active():
        device = distributed.local_device()  # one GPU per process: its LOCAL_RANK's
    if batch < distributed.world():
        raise UsageError(
            f"the batch ({batch}) is the global batch, split over the {distributed.world()} "
            "processes: it must be at least their number"
        )

    # The split has its own seed (the data source's `seed`, else a fixed one), so the training
    # seed changes the initialisation and the order, never the test set; a resumed run keeps
    # the split it recorded (older runs: their training seed).
    split_seed = block_split_seed(block)
    if remembered:
        split_seed = int(remembered.get("split_seed", remembered.get("seed", split_seed)))
    root = Path(spec.name).parent
    train_ds = load_split(spec, block, "train", split_seed=split_seed, root=root)
    val_ds = load_split(spec, block, "val", split_seed=split_seed, root=root)
    mconf = model_config(spec, block, options.model, model)
    if model is None:
        model = _build_spec_model(spec, block, mconf, seed, options.model)
    model = model.to(device)
    optimizer = make_optimizer(block, model.parameters())
    schedule = make_schedule(block, optimizer, epochs)
    generator = torch.Generator(device=device)
    objective = spec.objective(generator=generator)
    # properties of a pair named in the loss: partners from the training set, per batch
    partners = None
    if getattr(objective, "paired", ()):
        from propdsl.partners import Partners

        partners = Partners(
            train_ds.x.to(device),
            train_ds.y.to(device),
            {n: spec.property(n).partner for n in objective.paired},
        )
    prop_names = list(spec.properties)
    prop_losses = {
        n: spec.loss(n, generator=generator) for n in prop_names if _closed_over_data(spec, n)
    }

    config = {
        "spec": spec.name,
        "spec_sha256": runs.spec_hash(spec.source.text),
        "params": spec.params,
        "seed": seed,
        "split_seed": split_seed,
        "epochs": epochs,
        "batch": batch,
        # a distributed run's processes each use their own GPU: the type is the setting
        "device": device.type if distributed.active() else str(device),
        "threads": threads,
        "ramp": ramp,
        "data": {"name": block.data[0], **data_kwargs(block)},
        "data_sha256": data_hash(train_ds, val_ds),
        "model": mconf,
        "optimizer": block.get("optimizer", OptionValue("adam")).show(),
        "schedule": block.get("schedule", OptionValue("none")).show(),
        "logic": _show(block.get("logic", "dl2")),
        "attack": _show(block.get("attack", "pgd")),
        "loss": _show_loss(objective),
        "versions": _versions(),
    }
    if distributed.world() > 1:
        # the global batch is split over this many processes (docs/distributed.md)
        config["processes"] = distributed.world()
        if block.get("adaptive") is not None:
            # each rank would follow its own shard's CE: the weight would differ between ranks
            raise UsageError(
                "an adaptive loss weight (`adaptive = ...`) follows the batch's cross-entropy "
                "and is not supported in a distributed run yet: train it in one process"
            )
        if objective.paired:
            raise UsageError(
                "a loss with a property of a pair (a `partner` clause) is not supported in a "
                "distributed run yet: train it in one process"
            )
    for key in ("attacks", "adaptive", "augment"):  # absent from older runs' configs
        if block.get(key) is not None:
            config[key] = _show(block.get(key))
    if block.get("augment") is not None:
        # Made once, from the model as built (its initial weights: a resumed run's weights are
        # loaded later, so it gets the same set), then fixed; data_sha256 above is of the data
        # as loaded, so a resume on another device is not refused for last-bit differences.
        augment = FGSMAugment(**block.get("augment").kw())
        x_aug, y_aug = augment.augment(model, train_ds.x.to(device), train_ds.y.to(device))
        train_ds = dataclasses.replace(train_ds, x=x_aug.cpu(), y=y_aug.cpu())
    started = options.resume  # a run to resume has its config.json already
    with contextlib.ExitStack() as folder:

        def hold() -> None:
            _make_folder(run)
            folder.enter_context(runs.locked(run, "train"))

        # Rank 0 alone holds and writes the run folder (docs/distributed.md).
        distributed.from_main(hold)
        try:

            def prepare() -> tuple[int, float, list[dict[str, Any]], dict[str, Any] | None]:
                if options.resume:
                    start_epoch, best_acc, metrics = _resume(
                        run, config, model, optimizer, schedule, epochs
                    )
                    if start_epoch > 0:  # the adaptive weight's accumulator (0 in older runs)
                        objective.adaptive_r = float(runs.load_state(run).get("adaptive_r", 0.0))
                    _write(run, lambda: _write_config(run, spec, config), "config.json")
                else:
                    # again, now that this process holds the folder
                    _check_fresh_folder(run, options.force)
                    _start_fresh(run, spec, config)
                    start_epoch, best_acc, metrics = 0, -1.0, []
                # the other processes start from rank 0's weights and optimizer state
                states = _states(model, optimizer, schedule) if distributed.active() else None
                return start_epoch, best_acc, metrics, states

            start_epoch, best_acc, metrics, states = distributed.from_main(prepare)
            if states is not None and not distributed.is_main():
                _load_states(states, model, optimizer, schedule)
            started = True
            loop = _Loop(
                run=run,
                options=options,
                model=model,
                optimizer=optimizer,
                schedule=schedule,
                generator=generator,
                objective=objective,
                prop_losses=prop_losses,
                train_ds=train_ds,
                val_ds=val_ds,
                device=device,
                seed=seed,
                epochs=epochs,
                batch=batch,
                ramp=ramp,
                partners=partners,
            )
            return _epochs(loop, start_epoch, best_acc, metrics, on_epoch)
        except KeyboardInterrupt:
            raise _Interrupted(started) from None


def _states(model: nn.Module, optimizer, schedule) -> dict[str, Any]:
    """Rank 0's starting point, for the other ranks (on the CPU: each loads it onto its own
    device; optimizer.load_state_dict moves the state to the parameters' device)."""
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": _on_cpu(optimizer.state_dict()),
        "schedule": schedule.state_dict() if schedule is not None else None,
    }


def _on_cpu(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_on_cpu(v) for v in value)
    return value


def _load_states(states: dict[str, Any], model: nn.Module, optimizer, schedule) -> None:
    model.load_state_dict(states["model"])
    optimizer.load_state_dict(states["optimizer"])
    if schedule is not None and states["schedule"] is not None:
        schedule.load_state_dict(states["schedule"])


@dataclass(frozen=True, kw_only=True)
class _Loop:
    """What the epoch loop works with, resolved and built."""

    run: Path
    options: TrainOptions
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    generator: torch.Generator
    objective: Any
    prop_losses: dict[str, Any]
    train_ds: Any
    val_ds: Any
    device: torch.device
    seed: int
    epochs: int
    batch: int
    ramp: int
    partners: Any = None  # propdsl.partners.Partners of the loss's properties of a pair


def _epochs(
    loop: _Loop,
    start_epoch: int,
    best_acc: float,
    metrics: list[dict[str, Any]],
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> TrainResult:
    run, options, model, optimizer, schedule = (
        loop.run,
        loop.options,
        loop.model,
        loop.optimizer,
        loop.schedule,
    )
    generator, objective, prop_losses, device = (
        loop.generator,
        loop.objective,
        loop.prop_losses,
        loop.device,
    )
    seed, epochs, batch, ramp = loop.seed, loop.epochs, loop.batch, loop.ramp
    train_ds, val_ds = loop.train_ds, loop.val_ds
    x_all, y_all = train_ds.x.to(device), train_ds.y.to(device)
    n = x_all.shape[0]
    parallel = distributed.active()
    term_keys: list[str] = []  # the loss terms' order in the all-reduced statistics
    progress = _Progress(epochs, quiet=options.quiet or not distributed.is_main())
    table = runs.MetricsFiles(metrics)
    committer = _Committer(run, background=not parallel)
    with progress, committer:
        for epoch in range(start_epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            seed_global(seed * 100_003 + epoch, device)
            generator.manual_seed(seed * 100_003 + epoch)
            order_gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
            order = torch.randperm(n, generator=order_gen).to(device)
            scale = ramp_scale(epoch, ramp)
            _set_radius_scale([objective, *prop_losses.values()], scale)
            if loop.partners is not None:
                loop.partners.refresh(model)  # prototypes of this epoch's network
            model.train()
            # The epoch's sums stay on the device (one host sync per epoch on an accelerator);
            # see `_Sums`.
            sums = _Sums(device, check_each_step=_check_each_step(device))
            steps = 0
            for start in range(0, n, batch):
                idx = order[start : start + batch]
                if parallel:
                    loss_value, term_values = _parallel_step(
                        model, objective, optimizer, x_all, y_all, idx, term_keys
                    )
                    if not math.isfinite(loss_value):
                        bad = [k for k, v in term_values.items() if not math.isfinite(v)]
                        raise TrainingDiverged(
                            _diverged_message(objective, epoch, steps + 1, run, bad)
                        )
                    optimizer.step()
                    sums.add_reduced(loss_value, term_values)
                else:
                    xb, yb = x_all[idx], y_all[idx]
                    if loop.partners is None:
                        loss = objective(model, xb, yb)
                    else:
                        pairs = loop.partners.draw_for(model, xb, yb, salt=epoch * 100_003 + steps)
                        loss = objective(model, xb, yb, partners=pairs)
                    if not sums.add(loss.detach(), objective.last_term_values, steps + 1):
                        committer.wait()  # the message says which epoch the folder keeps
                        raise TrainingDiverged(_diverged_message(objective, epoch, steps + 1, run))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    objective.step_adaptive()  # Woods et al.'s psi follows each step's CE
                steps += 1
                committer.check()  # a failed commit of the epoch before stops the run now
                if progress.live:
                    progress.batch(epoch, min(start + batch, n), n, sums.last)
            diverged = sums.diverged()
            if diverged is not None:
                step, bad_terms = diverged
                committer.wait()
                raise TrainingDiverged(_diverged_message(objective, epoch, step, run, bad_terms))
            if schedule is not None:
                schedule.step()
            # An epoch whose weights are not finite, or exploded, never becomes last or best.
            problem = weights_problem(model)
            if problem is not None:
                committer.wait()
                raise TrainingDiverged(_exploded_message(problem, epoch, run))
            train_seconds = time.perf_counter() - t0

            row: dict[str, Any] = {"epoch": epoch}
            row.update({k: v / max(1, steps) for k, v in sums.totals().items()})
            row.update(evaluate_epoch(model, val_ds, prop_losses, device, options.eval_samples))
            row["radius_scale"] = scale
            if objective.adaptive is not None:  # the weight the next step uses
                row[objective.adaptive.weight] = objective.adaptive_weight()
            row["lr"] = optimizer.param_groups[0]["lr"]
            row["train_seconds"] = round(train_seconds, 3)
            row["seconds"] = round(time.perf_counter() - t0, 3)
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
            state = {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict() if schedule is not None else {},
                "best_acc": best_acc,
                "adaptive_r": objective.adaptive_r,
            }
            # Serialised here, at the end of the epoch: the bytes are the snapshot the commit
            # writes while the next epoch changes the weights and the optimizer state.
            committer.submit(epoch, epoch_files(model, state, row, improved, table))
            metrics.append(row)
            progress.epoch(row)
            if on_epoch is not None:
                on_epoch(row)
        committer.wait()
    return TrainResult(run, model, metrics)


def epoch_files(
    model: nn.Module,
    state: dict[str, Any],
    row: dict[str, Any],
    improved: bool,
    table: runs.MetricsFiles,
) -> dict[str, bytes]:
    """The files one epoch commits (`runs.commit_epoch`), serialised now: the weights as `last`
    (and as `best` when `improved`, the very same bytes objects, which the commit links rather
    than writes twice), their JSON sidecar holding the metrics `row`, the optimizer `state`, and
    the metrics files with `row` appended to `table`."""
    weights = runs.checkpoint_bytes(model)
    sidecar = runs.dumps_json({"epoch": row["epoch"], "metrics": row})
    files = {
        "last.safetensors": weights,
        "last.json": sidecar,
        "last.state.pt": runs.state_bytes(state),
    }
    if improved:
        files.update({"best.safetensors": weights, "best.json": sidecar})
    files.update(table.add(row))
    return files


# An epoch's files up to this size are committed in the loop's thread, larger ones in the
# background (`_Committer`). Epochs of standard training on digits, MLPs of growing width, one
# thread (docs/training.md, section 11): at 0.2 MB the wall time is the same either way and the
# process's CPU time 1.5 ms (7%) less inline; at 1.4 MB inline costs 1 ms more wall time and
# 1.8 ms less CPU time; at 4.9 MB inline is 110 ms an epoch against 87 ms in the background.
INLINE_COMMIT_BYTES = 512 * 1024


class _Committer:
    """Commits each epoch's files (`runs.commit_epoch`, through `_write`) in a background thread
    while the next epoch trains, one commit at a time.

    The thread only hashes, writes, renames and fsyncs bytes the loop serialised at the end of
    the epoch (no torch work, so no compute threads beside the loop's). `submit` first waits for
    the commit before it, so commits stay in epoch order and at most one is in flight;
    `check` (after every batch) raises the error of a commit that failed, `wait` waits for the
    commit in flight and raises its error: the same `RunWriteError` (or interrupt) an inline
    commit raised. Leaving the `with` block waits for the commit in flight whatever happens, so
    the folder's lock is released only once no write is under way, and an error or interrupt
    reports the epoch the folder really keeps. A kill (`kill -9`) mid-commit is what it always
    was: the folder keeps the epoch before or the committed one (`runs.recover`).

    A commit of at most `INLINE_COMMIT_BYTES` is made at once, in the loop's thread: handing it
    to the thread cost more than it saves (the two threads' handovers of the interpreter lock
    slow the loop's small tensor operations by about as much as the commit itself takes).

    In a distributed run (`background=False`) each commit is made at once, on rank 0, every rank
    waiting for it (`distributed.from_main`), as before.
    """

    def __init__(self, run: Path, *, background: bool):
        self.run = run
        # The folder's manifest after the last commit (read once, by the first commit): the
        # commits need not read it back every epoch.
        self.manifest: Any = runs.READ
        self.background = background
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # made at first use
        self._pending: concurrent.futures.Future | None = None

    def _commit(self, epoch: int, files: dict[str, bytes]) -> None:
        def commit() -> runs.Manifest:
            return runs.commit_epoch(self.run, epoch, files, previous=self.manifest)

        self.manifest = runs.READ  # unknown until this commit returns
        self.manifest = _write(self.run, commit, f"epoch {epoch}")

    def submit(self, epoch: int, files: dict[str, bytes]) -> None:
        self.wait()
        if not self.background:
            # Rank 0 alone writes the run folder; its error (a full disk) stops every rank.
            # The others computed the same row (the validation too: the same weights and draws).
            distributed.from_main(functools.partial(self._commit, epoch, files))
            return
        # `best` of an improved epoch is the very bytes of `last`: counted once.
        size = sum(len(data) for data in {id(data): data for data in files.values()}.values())
        if size <= INLINE_COMMIT_BYTES:
            self._commit(epoch, files)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="propdsl-commit"
            )
        self._pending = self._pool.submit(self._commit, epoch, files)

    def check(self) -> None:
        pending = self._pending
        if pending is not None and pending.done():
            self._pending = None
            pending.result()

    def wait(self) -> None:
        pending = self._pending
        if pending is None:
            return
        try:
            pending.result()
        finally:
            if pending.done():  # not when an interrupt stopped the wait: __exit__ waits
                self._pending = None

    def __enter__(self) -> _Committer:
        return self

    def __exit__(self, *exc: Any) -> None:
        # A commit in flight is waited for, Ctrl-C or not (it takes milliseconds): the lock
        # must outlive it. Its error, if any, is raised by `wait` on the way out without an
        # error of the loop's; with one, the loop's error is the one reported.
        interrupted = False
        while self._pending is not None and not self._pending.done():
            try:
                concurrent.futures.wait([self._pending])
            except KeyboardInterrupt:
                interrupted = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        pending = self._pending
        if exc[0] is not None and pending is not None and pending.exception() is not None:
            log.warning("the commit under way failed as well: %s", pending.exception())
        if interrupted and exc[0] is None:
            raise KeyboardInterrupt


def _parallel_step(
    model: nn.Module,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    x_all: Tensor,
    y_all: Tensor,
    idx: Tensor,
    term_keys: list[str],
) -> tuple[float, dict[str, float]]:
    """This rank's part of one global batch: forward (the attack included) and backward on its
    shard, then one all-reduce of the gradients together with the loss statistics.

    Each rank's loss is its shard's mean scaled by (shard size / global batch), so the summed
    gradients are those of the global batch's mean, as in one process, whatever the shard sizes
    (also for terms that do not depend on the batch, whose shares sum to one); a last batch
    smaller than the number of ranks is computed whole by every rank, each weighing 1 / ranks.
    The attack's random starts are drawn for the whole batch on every rank
    (`distributed.sharded_batch`), so each sample gets the start it gets in one process.
    Returns the global batch's loss and terms.
    """
    optimizer.zero_grad(set_to_none=True)
    with distributed.sharded_batch(len(idx)) as shard:
        local = idx[shard.lo : shard.hi]
        loss = objective(model, x_all[local], y_all[local])
        (loss * shard.weight).backward()
    if not term_keys:
        term_keys.extend(objective.last_terms)
    values = [float(loss.detach()), *(objective.last_terms[k] for k in term_keys)]
    stats = torch.tensor(values, dtype=torch.float64) * shard.weight
    params = [p for p in model.parameters() if p.requires_grad]
    reduced = distributed.sync_gradients(params, stats).tolist()
    return reduced[0], dict(zip(term_keys, reduced[1:], strict=True))


class RunWriteError(runs.RunFolderError):
    """Writing the run folder failed (a full disk, permissions); `epoch` is the epoch it keeps."""

    def __init__(self, message: str, run: Path, epoch: int):
        super().__init__(message)
        self.run = run
        self.epoch = epoch


def _write(run: Path, action: Callable[[], Any], what: str, *, fresh: bool = False) -> Any:
    """Run a write to the run folder; an OSError (ENOSPC, EACCES, ...) becomes a clear
    `RunWriteError` saying which epoch the folder still holds (none while a fresh run replaces
    an earlier one)."""
    try:
        return action()
    except OSError as err:
        kept = 0 if fresh else _kept_epoch(run)
        keeps = f"the run keeps epoch {kept}" if kept else "no epoch is kept"
        raise RunWriteError(
            f"cannot write {what} to {run}: {err.strerror or err}; {keeps} "
            "(fix the cause, then resume)",
            run,
            kept,
        ) from None


def _make_folder(run: Path) -> None:
    try:
        run.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise runs.RunFolderError(f"cannot use {run} as a run folder: it is not a folder") from None
    except OSError as err:
        raise runs.RunFolderError(
            f"cannot create the run folder {run}: {err.strerror or err}"
        ) from None


def _run_config(run: Path) -> dict[str, Any]:
    """The config.json of a run to resume."""
    config = runs.read_json(run / runs.CONFIG)
    if not runs.is_run_config(config):
        raise runs.RunFolderError(f"{run / runs.CONFIG} was not written by propdsl train")
    runs.check_model_config(config, run / runs.CONFIG)
    return config


def _check_fresh_folder(run: Path, force: bool = False) -> None:
    """A fresh run may replace an earlier run in `run` when asked to (`force`), never files
    another tool wrote there."""
    try:
        if not (run.exists() or run.is_symlink()):
            return
        if not run.is_dir():
            raise runs.RunFolderError(f"cannot use {run} as a run folder: it is not a folder")
        present = [n for n in runs.RUN_FILES if (run / n).exists() or (run / n).is_symlink()]
    except OSError as err:
        raise runs.RunFolderError(f"cannot use {run} as a run folder: {err.strerror}") from None
    if not present:
        return
    try:
        if (run / runs.CONFIG).exists():
            config = runs.read_json(run / runs.CONFIG)
            if runs.is_run_config(config):
                if force:
                    return
                raise runs.RunFolderError(
                    f"{run} holds a run ({_describe_run(run, config)}): continue it with "
                    "--resume, or replace it and its eval / verify results with --force; "
                    "nothing was changed"
                )
        elif runs.read_manifest(run) is not None:
            return  # an earlier run whose replacement was interrupted
    except runs.RunFolderError as err:
        if "holds a run" in str(err):
            raise
    raise runs.RunFolderError(
        f"{run} is not a propdsl run folder: it holds {', '.join(present)}, which propdsl train "
        "did not write; nothing was changed (choose another --out, or remove those files)"
    )


def _describe_run(run: Path, config: dict[str, Any]) -> str:
    try:
        manifest = runs.read_manifest(run)
    except runs.RunFolderError:
        manifest = None
    done = f"epoch {manifest.epoch}" if manifest is not None else "no finished epoch"
    return f"{done} of {config.get('epochs', '?')}, trained from {config.get('spec', '?')}"


def _start_fresh(run: Path, spec: Spec, config: dict[str, Any]) -> None:
    def write() -> None:
        if any((run / n).exists() or (run / n).is_symlink() for n in runs.RUN_FILES):
            log.warning("%s held an earlier run: replaced (--force)", run)
        runs.clear(run)
        # config.json first: from then on the folder is recognisably a run, whatever follows
        runs.write_json(run / runs.CONFIG, config)
        runs.write_text(run / runs.SPEC, spec.source.text)
        runs._fsync_dir(run)

    _write(run, write, "the run's config", fresh=True)


def _write_config(run: Path, spec: Spec, config: dict[str, Any]) -> None:
    """A resumed run's config (settings such as a larger --epochs) and its spec text (the same,
    as the spec hash was compared; rewritten in case a fresh start was cut short before it)."""
    runs.write_json(run / runs.CONFIG, config)
    runs.write_text(run / runs.SPEC, spec.source.text)


def data_hash(*datasets: Any) -> str:
    """SHA-256 of the data a run trains on (every split's inputs and labels, as loaded): a
    resumed run refuses data that changed since it started (an edited npz, another version)."""
    h = hashlib.sha256()
    for ds in datasets:
        for t in (ds.x, ds.y):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def seed_global(value: int, device: torch.device) -> None:
    """Seed torch's global generators for an epoch, as `torch.manual_seed(value)` does.

    On a CPU run the CPU generator alone is seeded: `torch.manual_seed` also seeds every CUDA,
    XPU and MTIA device, and where none is initialised it queues that seeding with a captured
    stack (`traceback.format_stack`, which reads source files through linecache), about 1 ms a
    call, 5% of a short epoch. Nothing on a CPU run draws from those generators, and the CPU
    generator's draws are the same either way. Elsewhere `torch.manual_seed` is called.
    """
    if device.type == "cpu":
        torch.default_generator.manual_seed(value)
    else:
        torch.manual_seed(value)


@torch.no_grad()
def weights_problem(model: nn.Module) -> str | None:
    """None when every weight is finite and at most MAX_ABS_WEIGHT in size; else what is wrong."""
    if _weights_fine(model):
        return None
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f"are not finite ('{name}' holds NaN or infinite values)"
    for name, p in model.named_parameters():
        if p.numel() and p.is_floating_point():
            top = float(p.detach().abs().max())
            if top > MAX_ABS_WEIGHT:
                return f"exploded (|w| reaches {top:.3g} in '{name}', over {MAX_ABS_WEIGHT:.0e})"
    return None


def _weights_fine(model: nn.Module) -> bool:
    """The usual case of `weights_problem` in one host read: the largest |value| of every
    parameter and buffer (NaN or inf where one holds one), checked together. False: look
    closer (the loop of `weights_problem` names the culprit, or finds nothing wrong)."""
    params = [p.detach() for p in model.parameters() if p.is_floating_point() and p.numel()]
    buffers = [b for b in model.buffers() if b.is_floating_point() and b.numel()]
    tensors = params + buffers
    if not tensors:
        return True
    if len({t.device for t in tensors}) != 1 or len({t.dtype for t in tensors}) != 1:
        return False  # one foreach call takes tensors of one device and dtype
    try:
        tops = torch.stack(torch._foreach_norm(tensors, math.inf)).to(torch.float64)
    except (AttributeError, RuntimeError, TypeError):  # a torch without it: the loop
        return False
    limit = torch.full_like(tops, math.inf)
    limit[: len(params)] = MAX_ABS_WEIGHT
    return bool((torch.isfinite(tops) & (tops <= limit)).all())


def _exploded_message(problem: str, epoch: int, run: Path) -> str:
    kept = _kept_epoch(run)
    keeps = (
        f"the checkpoint of epoch {kept} is kept: {run / 'last.safetensors'}"
        if kept
        else "no epoch had finished, so there is no checkpoint"
    )
    return (
        f"the weights after epoch {epoch} {problem}; training stopped and {keeps} "
        "(try a smaller learning rate)"
    )


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


def _check_each_step(device: torch.device) -> bool:
    """Whether the loop checks every batch's loss on the host before the optimizer step.

    On the CPU the check costs nothing. On an accelerator it would be a host sync per batch,
    which stalls the queue of kernels: there the first non-finite batch is recorded on the
    device and reported at the end of the epoch, with the same message; the epoch is then not
    committed, so the run folder keeps the last finished epoch either way (only the model
    object in memory has taken the remaining steps).
    """
    return device.type == "cpu"


class _Sums:
    """An epoch's loss and term sums: host floats when each step is checked (the CPU, where the
    check already reads the loss: a tensor sum would add an op per step), otherwise tensors on the
    training device (no host sync per step).

    `add` returns False at the first non-finite loss when each step is checked; otherwise the
    first non-finite batch (and which terms were non-finite there) is kept on the device for
    `diverged` at the end of the epoch. Either way the sums are float64 sums of the same values.
    """

    def __init__(self, device: torch.device, *, check_each_step: bool):
        self.check_each_step = check_each_step
        self.device = device
        self.loss: Tensor | float = (
            0.0 if check_each_step else torch.zeros((), dtype=torch.float64, device=device)
        )
        self.terms: dict[str, Any] = {}
        self.last: float = math.nan  # the last loss, when checked on the host (progress bar)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_terms: dict[str, Tensor] = {}

    def add(self, loss: Tensor, terms: dict[str, Tensor], step: int) -> bool:
        if self.check_each_step:
            self.last = float(loss)
            if not math.isfinite(self.last):
                return False
            self.loss += self.last
            for label, v in terms.items():
                column = _term_column(label)
                self.terms[column] = self.terms.get(column, 0.0) + float(v)
            return True
        first = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(first, step, self.first_bad)
        for label, v in terms.items():
            bad = first & ~torch.isfinite(v)
            self.bad_terms[label] = self.bad_terms.get(label, bad) | bad
        self.loss += loss
        for label, v in terms.items():
            column = _term_column(label)
            total = self.terms.get(column)
            self.terms[column] = v.double() if total is None else total + v
        return True

    def add_reduced(self, loss: float, terms: dict[str, float]) -> None:
        """A distributed step's loss and terms, already summed over the ranks (host floats,
        checked by the caller)."""
        self.last = loss
        self.loss += loss
        for label, v in terms.items():
            column = _term_column(label)
            total = self.terms.get(column)
            if self.check_each_step:
                self.terms[column] = (total or 0.0) + v
            else:
                value = torch.tensor(v, dtype=torch.float64, device=self.device)
                self.terms[column] = value if total is None else total + value

    def diverged(self) -> tuple[int, list[str]] | None:
        """(batch, non-finite terms) of the first non-finite loss of the epoch, or None."""
        if self.check_each_step:
            return None
        step = int(self.first_bad)  # the epoch's one host sync for the check
        if step < 0:
            return None
        return step, [label for label, bad in self.bad_terms.items() if bool(bad)]

    def totals(self) -> dict[str, float]:
        if self.check_each_step:
            return {"loss": float(self.loss), **{k: float(v) for k, v in self.terms.items()}}
        assert isinstance(self.loss, Tensor)
        values = torch.stack([self.loss, *self.terms.values()]).tolist()  # one host sync
        return dict(zip(["loss", *self.terms], values, strict=True))


def _diverged_message(
    objective, epoch: int, step: int, run: Path, terms: list[str] | None = None
) -> str:
    if terms is None:
        terms = [k for k, v in objective.last_terms.items() if not math.isfinite(v)]
    bad = terms
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


_DIFFERS = {
    "spec_sha256": "spec text",
    "seed": "seed",
    "params": "params",
    "batch": "batch size",
    "data_sha256": "training data",
}


def _resume(
    run: Path, config: dict[str, Any], model, optimizer, schedule, epochs: int
) -> tuple[int, float, list[dict[str, Any]]]:
    """Load the last committed epoch; returns (its number, the best accuracy so far, the rows).

    Holding the folder's lock: completes a commit a kill cut short, checks every file against the
    manifest's digests and the epoch numbers against each other, so a hand-edited or damaged
    folder is refused rather than resumed into different weights.
    """
    old = _run_config(run)
    for key, what in _DIFFERS.items():
        if key == "data_sha256" and key not in old:
            continue  # a run from before data hashing
        if old.get(key) != json.loads(json.dumps(config[key], default=str)):
            hint = " (was the data file changed?)" if key == "data_sha256" else ""
            raise UsageError(
                f"cannot resume {run}: its {what} {'differ' if key == 'params' else 'differs'} "
                f"from this command's{hint} "
                "(start a new run with another --out)"
            )
    if not _same_model(old["model"], json.loads(json.dumps(config["model"], default=str))):
        raise UsageError(
            f"cannot resume {run}: its model differs from this command's "
            "(start a new run with another --out)"
        )
    manifest = runs.recover(run)
    if manifest is None:
        if (run / "last.safetensors").exists():
            raise runs.RunFolderError(
                f"cannot resume {run}: it has checkpoints but no {runs.MANIFEST} (written by an "
                "older propdsl, or the manifest was removed), so they may not belong to one epoch; "
                "start a new run"
            )
        return 0, -1.0, []  # interrupted before its first epoch ended: start over, same folder
    bad = runs.verify(run, manifest)
    if runs.METRICS_CSV in bad:
        # a view of metrics.jsonl (a spreadsheet may have saved it); the next epoch rewrites it
        log.warning("%s was changed since epoch %d; it is rewritten", run / runs.METRICS_CSV,
                    manifest.epoch)  # fmt: skip
        bad.remove(runs.METRICS_CSV)
    if bad:
        raise runs.RunFolderError(
            f"cannot resume {run}: {', '.join(bad)} differ from {runs.MANIFEST} (damaged or "
            f"edited since epoch {manifest.epoch} was written)"
        )
    epoch = manifest.epoch
    rows = runs.read_metrics(run)
    if [r.get("epoch") for r in rows] != list(range(1, epoch + 1)):
        raise runs.RunFolderError(
            f"cannot resume {run}: {runs.METRICS_JSONL} does not hold one row for each of "
            f"epochs 1..{epoch}, the epochs {runs.MANIFEST} lists"
        )
    if epoch > epochs:
        raise UsageError(
            f"{run} has already trained {epoch} epochs, more than --epochs {epochs}: "
            "pass a larger --epochs to train on"
        )
    meta = runs.load_weights(run, "last", model)
    state = runs.load_state(run)
    if meta.get("epoch") != epoch or state.get("epoch") != epoch:
        raise runs.RunFolderError(
            f"cannot resume {run}: last.json says epoch {meta.get('epoch')!r} and last.state.pt "
            f"epoch {state.get('epoch')!r}, but {runs.MANIFEST} says epoch {epoch}"
        )
    best_acc = state.get("best_acc", -1.0)
    if not isinstance(best_acc, int | float) or isinstance(best_acc, bool):
        raise runs.RunFolderError(f"{run / 'last.state.pt'}: best_acc is not a number")
    try:
        optimizer.load_state_dict(state["optimizer"])
        if schedule is not None and state.get("schedule"):
            schedule.load_state_dict(state["schedule"])
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError, AttributeError) as err:
        raise runs.RunFolderError(
            f"cannot resume {run}: last.state.pt does not fit this optimizer or schedule "
            f"({type(err).__name__}: {err})"
        ) from None
    return epoch, float(best_acc), rows


def _same_model(old: dict[str, Any], new: dict[str, Any]) -> bool:
    a, b = dict(old), dict(new)
    ra, rb = a.pop("user", None), b.pop("user", None)
    if a != b or (ra is None) != (rb is None):
        return False
    return ra is None or runs.same_model_ref(ra, rb)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    was = model.training
    model.eval()
    try:
        return _accuracy(model, x, y, batch)
    finally:
        model.train(was)


def _accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 512) -> float:
    """`accuracy` of a model already in eval mode (without no_grad: the caller's)."""
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
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
    x, y = val_ds.x.to(device), val_ds.y.to(device)
    xs, ys = x[:samples], y[:samples]
    relu = any(isinstance(m, nn.ReLU) for m in model.modules())
    was = model.training
    model.eval()  # once for the whole validation (each switch walks every module)
    try:
        # The attacks (and explanations) take their input gradients under enable_grad; no
        # graph into the weights is needed here. One attack per property and epoch is too rare
        # for a traced evaluation to pay for itself: they stay eager (`tracing.eager`).
        with torch.no_grad(), tracing.eager():
            out: dict[str, Any] = {"val_accuracy": _accuracy(model, x, y)}
            for name, loss in prop_losses.items():
                attack = loss.attack
                smooth = relu and attack.surrogate_beta is None and differentiates(loss.formula)
                if smooth:
                    from propdsl.evaluate import SURROGATE_BETA

                    loss.attack = dataclasses.replace(attack, surrogate_beta=SURROGATE_BETA)
                try:
                    res = loss(model, xs, ys)
                finally:
                    loss.attack = attack
                out[f"satisfied[{name}]"] = float(res.satisfied.float().mean())
    finally:
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
            # NaN where the loss stays on the device (not read back every batch)
            shown = f"loss {loss:.4f}  " if math.isfinite(loss) else ""
            self.bar.update(self.task, epoch=epoch, info=f"{shown}{seen}/{n}")

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
