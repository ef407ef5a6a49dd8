"""The `propdsl` command: a thin layer over the library API.

Exit codes: 0 success, 1 a spec error (positioned diagnostics on stderr), 2 a usage error
(bad flag, missing file), 70 an internal error (please report it; `--debug` shows the traceback).
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from propdsl import __version__, registry
from propdsl.errors import PropdslError, SpecError, UsageError

EXIT_SPEC = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70

app = typer.Typer(
    name="propdsl",
    help="A language for robustness properties of neural networks: check, format, train, verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state = {"debug": False}


def _or_list(names: tuple[str, ...]) -> str:
    """`a, b or c`, for help texts."""
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"propdsl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show Python tracebacks for internal errors.")
    ] = False,
    plugin: Annotated[
        list[str] | None,
        typer.Option(
            "--plugin",
            help="Import a module that registers logics, data sources or models before the "
            "command runs: pkg.module or file.py (repeatable).",
        ),
    ] = None,
) -> None:
    _state["debug"] = debug
    _install_output()
    _calm_threads()
    _join_job()
    _load_plugins(plugin or [])


def _other_rank() -> bool:
    """A process of a distributed job other than rank 0 (torchrun's RANK, WORLD_SIZE)."""
    return os.environ.get("WORLD_SIZE", "1") not in ("", "1") and os.environ.get(
        "RANK", "0"
    ) not in ("", "0")


def _join_job() -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group; rank 0 alone prints results
    (docs/distributed.md). The library's errors are the same on every rank and only rank 0
    prints them; an internal error prints on the rank it happens on."""
    if os.environ.get("WORLD_SIZE", "1") in ("", "1"):
        return
    from propdsl import distributed

    distributed.init_from_env()
    if _other_rank():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        # rank 0's warnings stand for all: the same warning N times is noise
        warnings.simplefilter("ignore")
        logging.getLogger("propdsl").setLevel(logging.ERROR)


def _load_plugins(refs: list[str]) -> None:
    """The entry points of the group `propdsl.plugins`, then each `--plugin` (docs:
    propdsl.plugins). A plugin that fails is a usage error naming it."""
    from propdsl.plugins import PluginError, load_entry_points, load_plugins

    try:
        load_entry_points()
        load_plugins(refs)
    except PluginError as err:
        _fail(f"error: {err}", EXIT_USAGE)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    """A warning as one line, `warning: ...`: no file name, line number or source line (those
    point into propdsl, not at anything the user can change)."""
    stream = file if file is not None else sys.stderr
    try:
        stream.write(f"warning: {message}\n")
    except OSError:
        pass


class _WarningLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        prefix = "warning" if record.levelno < logging.ERROR else "error"
        sys.stderr.write(f"{prefix}: {record.getMessage()}\n")


def _install_output() -> None:
    """Warnings and the library's log warnings as one line each on stderr."""
    warnings.showwarning = _show_warning
    logger = logging.getLogger("propdsl")
    if not any(isinstance(h, _WarningLines) for h in logger.handlers):
        handler = _WarningLines(level=logging.WARNING)
        logger.addHandler(handler)


def _calm_threads() -> None:
    """Let idle OpenMP threads sleep instead of spinning (unless the user chose otherwise).

    Training, evaluation and verification run many small tensor operations; with the default
    (spinning) wait policy, torch's threads busy-wait between them, and as soon as another
    process needs a core they slow each other down many times over (an attack step on the
    digits CNN took 25-40 ms instead of 3 ms with two threads on two shared cores;
    benchmarks/bench_eval.py). Called before any command runs: only effective before torch is
    first imported.
    """
    chosen = "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ
    if "torch" not in sys.modules and not chosen:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


class _Display:
    """Progress of a long command: a rich bar on a terminal, a line per stage on stderr
    otherwise, nothing with -q. Called as `display(stage, done, total)`."""

    def __init__(self, what: str, quiet: bool):
        self.what = what
        self.quiet = quiet
        self.live = not quiet and sys.stderr.isatty()
        self.bar: Any = None
        self.task: Any = None
        self.t0 = time.perf_counter()

    def __enter__(self) -> _Display:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn(f"{self.what}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(stage, total=total)
            self.bar.update(self.task, completed=done, total=total, description=stage)
            return
        elapsed = time.perf_counter() - self.t0
        if done >= total:
            sys.stderr.write(f"{self.what}: done in {elapsed:.0f}s\n")
        else:
            sys.stderr.write(f"{self.what} {done + 1}/{total}: {stage} ({elapsed:.0f}s so far)\n")
        sys.stderr.flush()


# How long a rank other than 0 waits before it exits with an error: rank 0, which prints the
# job's error, exits first, so the launcher reports rank 0's exit code (it stops the others).
OTHER_RANK_GRACE = 3.0


def _fail(message: str, code: int) -> None:
    if not _other_rank() or code == EXIT_INTERNAL:
        prefix = f"rank {os.environ.get('RANK')}: " if _other_rank() else ""
        sys.stderr.write(prefix + message.rstrip("\n") + "\n")
    if _other_rank():
        sys.stderr.flush()
        time.sleep(OTHER_RANK_GRACE)
    raise typer.Exit(code)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map library errors onto exit codes; never show a traceback for a user mistake."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SpecError as err:
            _fail(err.render(), EXIT_SPEC)
        except UsageError as err:
            _fail(f"error: {err}", EXIT_USAGE)
        except PropdslError as err:
            _fail(f"error: {err}", EXIT_SPEC)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as err:  # noqa: BLE001 - the last line of defence
            if _state["debug"]:
                traceback.print_exc()
            _fail(
                f"internal error: {type(err).__name__}: {err}\n"
                "This is a bug in propdsl; please report it with the spec and the command "
                "(run again with --debug for the traceback).",
                EXIT_INTERNAL,
            )

    return wrapper


ParamOpt = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="Override a spec param: name=value (repeatable)."),
]
SpecArg = Annotated[Path, typer.Argument(help="The .prop spec file.", show_default=False)]


@app.command("check")
@guarded
def check_cmd(spec: SpecArg, param: ParamOpt = None) -> None:
    """Parse and check a spec; print its networks, params, properties and blocks."""
    from propdsl.api import load, parse_overrides

    loaded = load(spec if spec.suffix == ".prop" else Path(spec), parse_overrides(param or []))
    typer.echo(loaded.summary())


@app.command("fmt")
@guarded
def fmt_cmd(
    files: Annotated[list[Path], typer.Argument(help="Spec files to format in place.")],
    check: Annotated[
        bool, typer.Option("--check", help="Only report files that would change (exit 1).")
    ] = False,
) -> None:
    """Format specs canonically (comments kept); with --check, change nothing."""
    from propdsl.api import read_source
    from propdsl.syntax import format_text

    changed = []
    for path in files:
        source = read_source(path)
        out = format_text(source.text, source.name)
        if out != source.text:
            changed.append(path)
            if not check:
                path.write_text(out, encoding="utf-8")
    for path in changed:
        typer.echo(f"{'would reformat' if check else 'reformatted'} {path}")
    if check and changed:
        raise typer.Exit(EXIT_SPEC)
    if not changed:
        typer.echo(f"{len(files)} file(s) already formatted")


@app.command("train")
@guarded
def train_cmd(
    spec: SpecArg,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Run folder (default runs/SPEC_NAME).")
    ] = None,
    param: ParamOpt = None,
    epochs: Annotated[int | None, typer.Option(help="Override the block's epochs.", min=1)] = None,
    batch: Annotated[
        int | None, typer.Option(help="Override the block's batch size.", min=1)
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="auto (GPU when present), cpu, cuda or cuda:N.")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch CPU threads, 1..1024 (default: the usable cores, <= 8).", min=1, max=1024
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Override the block's seed.", min=0, max=2**32 - 1)
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its last epoch, with its own settings.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace a run already in --out (and its eval / verify results).",
        ),
    ] = False,
    model: Annotated[
        str | None, typer.Option("--model", help="A user model: pkg.module:factory or file.py:f.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            help="Train data-parallel in N processes on this machine (torchrun's standalone "
            "launch; --batch stays the global batch). See docs/distributed.md.",
            min=1,
        ),
    ] = None,
) -> None:
    """Train the spec's network as its train block says; write a run folder.

    Ctrl-C (or SIGTERM) stops the run; its folder keeps the last finished epoch, and `--resume`
    continues from there, with the run's own settings, to the same weights an uninterrupted run
    ends with.
    """
    if nproc is not None and nproc > 1:
        _launch("train", nproc, lambda: _train_folder(spec, out, param))
        return
    from propdsl.api import load, parse_overrides
    from propdsl.train import RunWriteError, TrainingInterrupted, TrainOptions, run_folder, train

    overrides = parse_overrides(param or [])
    if resume and not overrides:
        # A resumed run keeps the params it started with (unless the spec text changed, which
        # the trainer refuses with a clear message).
        from propdsl import distributed

        # rank 0's reading: the other processes may run where the folder is not
        remembered = distributed.from_main(lambda: _run_params(spec, out))
        overrides = remembered or {}
    loaded = load(spec, overrides)
    options = TrainOptions(
        out=out,
        epochs=epochs,
        batch=batch,
        device=device,
        threads=threads,
        seed=seed,
        resume=resume,
        force=force,
        model=model,
        quiet=quiet,
    )
    folder = run_folder(loaded, options)
    command = _resume_command(spec, folder, model)
    try:
        result = train(loaded, options)
    except TrainingInterrupted as stop:
        if not stop.started:
            _fail(
                f"interrupted before the run started; {folder} holds nothing of it: run the "
                "same command again",
                130,
            )
        if stop.epoch == 0:
            _fail(
                f"interrupted before the first epoch finished; {folder} holds no checkpoint "
                f"yet. Start it again, with the same settings, with\n  {command}",
                130,
            )
        _fail(
            f"interrupted; {folder} keeps epoch {stop.epoch}: continue with\n  {command}",
            130,
        )
    except RunWriteError as err:
        again = command if (folder / "config.json").exists() else "the same command again"
        _fail(f"error: {err}\n  then: {again}", EXIT_USAGE)
    last = result.metrics[-1] if result.metrics else {}
    if not quiet:
        acc = last.get("val_accuracy")
        acc_text = f"; val accuracy {acc:.3f}" if acc is not None else ""
        typer.echo(f"run folder: {result.run}{acc_text}")


def _train_folder(spec: Path, out: Path | None, param: list[str] | None) -> Path:
    from propdsl.api import load, parse_overrides
    from propdsl.train import TrainOptions, run_folder

    return run_folder(load(spec, parse_overrides(param or [])), TrainOptions(out=out))


def _launch(command: str, nproc: int, folder: Callable[[], Path] | None = None) -> None:
    """`--nproc N`: run this same command line without --nproc in N processes (docs:
    propdsl.distributed.launch); a process that dies ends the job with a line saying which,
    and what the run folder keeps."""
    from propdsl import distributed

    if distributed.env_world() > 1:
        raise UsageError("--nproc starts the processes itself: do not combine it with torchrun")
    args = _without_nproc(sys.argv[1:])
    if command not in args:
        raise UsageError(f"--nproc needs the command line of `propdsl {command}`")
    try:
        distributed.launch(args, nproc)
    except distributed.JobFailed as err:
        if err.died is None:
            raise typer.Exit(err.exit_code) from None  # rank 0 printed its error
        keeps = ""
        if folder is not None:
            from propdsl.runs import RunFolderError, read_manifest

            run = folder()
            try:
                manifest = read_manifest(run)
            except RunFolderError:
                manifest = None
            keeps = (
                f"; {run} keeps epoch {manifest.epoch} (continue with the same command and "
                "--resume)"
                if manifest is not None
                else f"; {run} holds no finished epoch"
            )
        _fail(f"error: {err.died}; the other processes were stopped{keeps}", EXIT_SPEC)


def _without_nproc(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for word in args:
        if skip:
            skip = False
        elif word == "--nproc":
            skip = True
        elif not word.startswith("--nproc="):
            out.append(word)
    return out


def _run_params(spec: Path, out: Path | None) -> dict[str, Any] | None:
    """The params a run to resume was trained with, when its spec text is this spec's."""
    from propdsl.api import read_source
    from propdsl.runs import RunFolderError, is_run_config, read_json, spec_hash

    stem = spec.stem if spec.name.endswith(".prop") else "spec"
    folder = out if out is not None else Path("runs") / (stem or "spec")
    try:
        config = read_json(folder / "config.json")
        text = read_source(spec).text
    except (RunFolderError, UsageError):
        return None  # the trainer reports it
    if not is_run_config(config) or config.get("spec_sha256") != spec_hash(text):
        return None
    params = config.get("params")
    return dict(params) if isinstance(params, dict) else None


def _resume_command(spec: Path, folder: Path, model: str | None) -> str:
    """The command that continues the run in `folder`: the folder remembers every setting that
    shapes the run, except the user model, which is code and is never taken from a folder."""
    import shlex

    words = ["propdsl", "train", str(spec), "--out", str(folder), "--resume"]
    if model is not None:
        words += ["--model", model]
    world = os.environ.get("WORLD_SIZE", "1")
    if world not in ("", "1"):
        words += ["--nproc", world]  # the same number of processes: the same weights
    return shlex.join(words)


RunOpt = Annotated[Path, typer.Option("--run", help="The run folder written by propdsl train.")]
SplitOpt = Annotated[str, typer.Option(help="train, val or test.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="The run's user model.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="Torch CPU threads.")]
CheckpointOpt = Annotated[
    str,
    typer.Option(
        "--checkpoint",
        help="best (the epoch of best validation accuracy; the last one where there is none) "
        "or last.",
    ),
]
SpecDiffersOpt = Annotated[
    bool,
    typer.Option(
        "--spec-differs-ok",
        help="Accept a spec whose text is not the run's spec.prop (results in their own folder).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")]
NprocOpt = Annotated[
    int | None,
    typer.Option(
        "--nproc",
        help="Shard the samples over N processes on this machine (torchrun's standalone "
        "launch); the results are one process's. See docs/distributed.md.",
        min=1,
    ),
]


def _checked_common(
    split: str, checkpoint: str, samples: int | None, threads: int | None = None
) -> None:
    """The options eval, verify and export share, checked before anything is loaded."""
    from propdsl.results import Checkpoint, positive_count

    if split not in ("train", "val", "test"):
        raise UsageError(f"--split must be train, val or test, got {split!r}")
    if checkpoint not in {c.value for c in Checkpoint}:
        raise UsageError(f"--checkpoint must be best or last, got {checkpoint!r}")
    positive_count("--samples", samples)
    positive_count("--threads", threads)


@app.command("eval")
@guarded
def eval_cmd(
    spec: SpecArg,
    run: RunOpt,
    param: ParamOpt = None,
    split: SplitOpt = "test",
    samples: Annotated[int | None, typer.Option(help="Evaluate the first N samples only.")] = None,
    checkpoint: CheckpointOpt = "best",
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write PNG plots.")] = True,
    eps_grid: Annotated[
        str | None,
        typer.Option(
            "--eps-grid",
            help="Radii of the security / accuracy curve, comma-separated (e.g. 0.01,0.02,0.05; "
            "default 0,0.025,0.05,0.1,0.15,0.2); for specs with a param eps.",
        ),
    ] = None,
    attack: Annotated[
        str | None,
        typer.Option(
            "--attack",
            help="The strong attack of constraint security, e.g. pgd(steps=20,restarts=2) or "
            "apgd(steps=50,restarts=3) (the default).",
        ),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(
            "--metrics",
            help="Heavier metrics named after papers, comma-separated: etmann, ara, landscape, "
            "flatness, adv-explanations (default none).",
        ),
    ] = None,
    spec_differs_ok: SpecDiffersOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    nproc: NprocOpt = None,
) -> None:
    """Evaluate a trained run: clean accuracy, constraint accuracy and security, plots.

    The run's params are the defaults (--param overrides them). Results go to
    RUN/eval/<key>/ (eval.json and the PNGs), one folder per setting; RUN/eval.json is a copy
    of the latest eval.json.
    """
    if nproc is not None and nproc > 1:
        _launch("eval", nproc)
        return
    _checked_common(split, checkpoint, samples, threads)
    from propdsl.api import load, parse_overrides
    from propdsl.train import set_threads

    set_threads(threads)
    from propdsl.evaluate import evaluate, parse_attack, parse_eps_grid, render_table
    from propdsl.metrics.papers import parse_metrics

    # The new options are checked before the spec and the run are loaded (usage errors, exit 2).
    grid = None if eps_grid is None else parse_eps_grid(eps_grid)
    strong = None if attack is None else parse_attack(attack)
    chosen = parse_metrics(metrics)
    loaded = load(spec, parse_overrides(param or []))
    with _Display("eval", quiet) as display:
        result = evaluate(
            loaded,
            run,
            split=split,
            samples=samples,
            plots=plots,
            eps_grid=grid,
            attack=strong,
            metrics=chosen,
            model_ref=model,
            device=device,
            checkpoint=checkpoint,
            spec_differs_ok=spec_differs_ok,
            progress=display,
        )
    typer.echo(render_table(result))


@app.command("verify")
@guarded
def verify_cmd(
    spec: SpecArg,
    run: Annotated[
        Path | None,
        typer.Option("--run", help="The run folder of propdsl train (or give --model NET.onnx)."),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help=f"{_or_list(registry.names(registry.Kind.METHOD))} (default: the verify "
            "block's, else crown)."
        ),
    ] = None,
    param: ParamOpt = None,
    split: SplitOpt = "test",
    samples: Annotated[int | None, typer.Option(help="How many samples (default 100).")] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds per sample before unknown (with --complete: per open sample, default 60)."
        ),
    ] = None,
    prop: Annotated[
        list[str] | None, typer.Option("--property", help="Verify only these (repeatable).")
    ] = None,
    checkpoint: CheckpointOpt = "best",
    spec_differs_ok: SpecDiffersOpt = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="The run's user model; or NET.onnx, a network to verify instead of a run.",
        ),
    ] = None,
    complete: Annotated[
        bool,
        typer.Option(
            "--complete",
            help="Decide the samples the bounds leave unknown by branch and bound "
            "(--timeout seconds each, default 60).",
        ),
    ] = False,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    nproc: NprocOpt = None,
) -> None:
    """Verify a trained run: falsify with a strong attack, then prove with bound propagation.

    The run's params are the defaults (--param overrides them). Results go to
    RUN/verify/<method>-<key>/ (verify.json, counterexamples/), one folder per setting;
    RUN/verify.json is a copy of the latest verify.json. With --model NET.onnx instead of
    --run, the ONNX network is verified on the spec's data (nothing is written).
    """
    if nproc is not None and nproc > 1:
        _launch("verify", nproc)
        return
    from propdsl.results import positive_seconds

    _checked_common(split, checkpoint, samples, threads)
    positive_seconds("--timeout", timeout)
    from propdsl.api import load, parse_overrides
    from propdsl.train import set_threads
    from propdsl.verify.report import verify_run

    onnx = model is not None and model.lower().endswith(".onnx")
    if onnx and run is not None:
        raise UsageError("--model NET.onnx verifies that network instead of a run: drop --run")
    if run is None and not onnx:
        raise UsageError("give --run RUN (a run folder) or --model NET.onnx")
    if onnx and (checkpoint != "best" or spec_differs_ok):
        raise UsageError("--checkpoint and --spec-differs-ok go with --run, not an ONNX model")
    if onnx and device not in (None, "cpu"):
        raise UsageError("an ONNX model is verified on the CPU: drop --device")
    if complete and device not in (None, "cpu"):
        raise UsageError("--complete runs on the CPU: use --device cpu")

    chosen: registry.Method | None = None
    if method is not None:
        try:
            chosen = registry.Method(method)  # "CROWN-IBP" is crown_ibp, as in the library
        except ValueError:
            known = ", ".join(m.value for m in registry.Method)
            raise UsageError(f"--method must be one of {known}, got {method!r}") from None
    set_threads(threads)
    loaded = load(spec, parse_overrides(param or []))
    if onnx:
        assert model is not None
        _verify_onnx(loaded, Path(model), chosen, split, samples, timeout, prop, complete, quiet)
        return
    assert run is not None
    with _Display("verify", quiet) as display:
        report = verify_run(
            loaded,
            run,
            method=chosen,
            split=split,
            samples=samples,
            timeout=timeout,
            properties=prop or None,
            model_ref=model,
            device="cpu" if complete else device,
            checkpoint=checkpoint,
            spec_differs_ok=spec_differs_ok,
            complete=complete,
            progress=display,
        )
    typer.echo(report.table())
    typer.echo(f"verdicts: {report.json_path}")
    for path in report.counterexample_paths:
        typer.echo(f"counterexamples: {path}")
    typer.echo(f"  and {Path(run) / 'verify.json'}, a copy of this verify.json (the latest)")


def _verify_onnx(
    spec: Any,
    path: Path,
    method: registry.Method | None,
    split: str,
    samples: int | None,
    timeout: float | None,
    prop: list[str] | None,
    complete: bool,
    quiet: bool,
) -> None:
    """`propdsl verify SPEC --model NET.onnx`: the imported network on the spec's data."""
    from propdsl.interop.onnx_import import load_onnx
    from propdsl.verify.report import verify_model

    network = load_onnx(path)
    with _Display("verify", quiet) as display:
        report = verify_model(
            spec,
            network,
            method=method,
            split=split,
            samples=samples,
            timeout=timeout,
            properties=prop or None,
            complete=complete,
            progress=display,
        )
    typer.echo(report.table())


@app.command("export")
@guarded
def export_cmd(
    spec: SpecArg,
    out: Annotated[
        Path,
        typer.Argument(help="Folder to write: onnx/, vnnlib/, instances.csv.", show_default=False),
    ],
    run: RunOpt,
    to: Annotated[
        str, typer.Option("--to", help="vnnlib (VNN-LIB 1.0, as in VNN-COMP) or vnnlib2.")
    ] = "vnnlib",
    param: ParamOpt = None,
    split: SplitOpt = "test",
    samples: Annotated[int | None, typer.Option(help="How many samples (default 100).")] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds per instance in instances.csv (default 60).")
    ] = None,
    prop: Annotated[
        list[str] | None, typer.Option("--property", help="Export only these (repeatable).")
    ] = None,
    checkpoint: CheckpointOpt = "best",
    spec_differs_ok: SpecDiffersOpt = False,
    model: ModelOpt = None,
) -> None:
    """Export a trained run: the network as ONNX, each (sample, property) as a VNN-LIB file.

    The run's params are the defaults (--param overrides them).
    """
    from propdsl.results import positive_seconds

    if to not in ("vnnlib", "vnnlib2"):
        raise UsageError(f"--to must be vnnlib or vnnlib2, got {to!r}")
    _checked_common(split, checkpoint, samples)
    positive_seconds("--timeout", timeout)
    from propdsl.api import load, parse_overrides
    from propdsl.export import export_run

    loaded = load(spec, parse_overrides(param or []))
    report = export_run(
        loaded,
        run,
        out,
        fmt=to,
        split=split,
        samples=samples,
        properties=prop or None,
        timeout=timeout,
        model_ref=model,
        checkpoint=checkpoint,
        spec_differs_ok=spec_differs_ok,
    )
    typer.echo(f"network: {report.onnx}")
    typer.echo(f"{len(report.files)} VNN-LIB files in {report.out / 'vnnlib'}")
    typer.echo(f"instances: {report.instances}")
    for name, reason in report.skipped.items():
        typer.echo(f"skipped {name}: {reason}")


@app.command("vnnlib")
@guarded
def vnnlib_cmd(
    network: Annotated[
        Path | None, typer.Argument(help="The network, an ONNX file.", show_default=False)
    ] = None,
    prop: Annotated[
        Path | None,
        typer.Argument(help="The property, a VNN-LIB file.", show_default=False),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds for the instance (default 60).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the answer to this file.")
    ] = None,
    instances: Annotated[
        Path | None,
        typer.Option(
            "--instances", help="Run every row of this instances.csv (onnx,vnnlib,timeout)."
        ),
    ] = None,
    root: Annotated[
        Path | None,
        typer.Option(help="The folder the instances' paths are relative to (default: its own)."),
    ] = None,
    timeout_scale: Annotated[
        float, typer.Option("--timeout-scale", help="Multiply every instance's timeout.")
    ] = 1.0,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the report of --instances (one record each) here."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite an existing --out or --json file.")
    ] = False,
    threads: ThreadsOpt = None,
    nproc: Annotated[
        int | None,
        typer.Option(
            "--nproc",
            help="With --instances: share the instances out over N processes on this machine "
            "(torchrun's standalone launch). See docs/distributed.md.",
            min=1,
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Decide a VNN-COMP instance: sat (with a counterexample onnxruntime confirms), unsat,
    timeout or unknown, in the competition's result format; or a whole benchmark.

    Exit 0 whatever the answer; 2 for a missing or unreadable file or a bad option, 1 for a
    mistake in the VNN-LIB file (file:line:col).
    """
    from propdsl.interop.vnnlib import VnnlibError
    from propdsl.results import positive_count, positive_seconds

    positive_seconds("--timeout", timeout)
    positive_count("--threads", threads)
    if nproc is not None and nproc > 1:
        if instances is None:
            raise UsageError("--nproc goes with --instances (one instance runs in one process)")
        _launch("vnnlib", nproc)
        return
    if instances is None:
        if network is None or prop is None:
            raise UsageError("give NETWORK.onnx and PROPERTY.vnnlib, or --instances FILE")
        for name, given in (("--root", root), ("--json", json_out)):
            if given is not None:
                raise UsageError(f"{name} goes with --instances")
    elif network is not None or prop is not None:
        raise UsageError("--instances runs a whole benchmark: give no NETWORK or PROPERTY")
    elif timeout is not None or out is not None:
        raise UsageError("--instances takes each row's timeout (--timeout-scale scales them)")
    for path in (out, json_out):
        if path is not None and path.exists() and not force:
            raise UsageError(f"{path} exists; --force overwrites it")
    from propdsl.train import set_threads

    set_threads(threads)
    try:
        if instances is not None:
            _vnnlib_instances(instances, root, timeout_scale, json_out, force, quiet)
            return
        assert network is not None and prop is not None
        from propdsl.interop.competition import DEFAULT_TIMEOUT, solve_instance

        result = solve_instance(network, prop, timeout=timeout or DEFAULT_TIMEOUT)
    except VnnlibError as err:
        _fail(f"error: {err}", EXIT_SPEC)
    text = result.text()
    if out is not None:
        _write_new(out, text, force)
    else:
        typer.echo(text, nl=False)
    if not quiet:
        sys.stderr.write(f"{result.answer.value} in {result.seconds:.2f} s: {result.reason}\n")


def _write_new(path: Path, text: str, force: bool) -> None:
    """Write a file the user named; an existing one only with --force (checked again here)."""
    try:
        with open(path, "w" if force else "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise UsageError(f"{path} exists; --force overwrites it") from None
    except OSError as err:
        raise UsageError(f"cannot write {path}: {err.strerror or err}") from None


def _vnnlib_instances(
    csv_path: Path,
    root: Path | None,
    scale: float,
    json_out: Path | None,
    force: bool,
    quiet: bool,
) -> None:
    import json

    from propdsl import distributed
    from propdsl.interop.competition import (
        read_instances,
        run_instances,
        summarise,
        summary_table,
    )

    if root is not None and not root.is_dir():
        raise UsageError(f"--root {root}: no such folder")
    if not scale > 0 or scale == float("inf"):
        raise UsageError(f"--timeout-scale must be a positive number, got {scale}")
    rows = read_instances(csv_path, root)

    def show(k: int, total: int, r: dict[str, Any]) -> None:
        if quiet:
            return
        expected = f" (expected {r['expected']})" if r.get("expected") else ""
        flag = "  WRONG" if r["wrong"] else ""
        sys.stderr.write(
            f"[{k + 1}/{total}] {r['benchmark']} {r['onnx']} {r['vnnlib']}: {r['answer']}"
            f"{expected} in {r['seconds']:.1f} s{flag}\n"
        )
        sys.stderr.flush()

    records = run_instances(rows, timeout_scale=scale, progress=show)
    summary = summarise(records)
    typer.echo(summary_table(summary))
    wrong = sum(r["wrong"] for r in summary)
    if wrong:
        typer.echo(f"{wrong} decided answer(s) contradict the expected ones")
    if json_out is not None and distributed.is_main():  # one report, from rank 0
        report = dict(instances_csv=str(csv_path), timeout_scale=scale, summary=summary)
        report["instances"] = records
        _write_new(json_out, json.dumps(report, indent=1, default=str) + "\n", force)
        typer.echo(f"report: {json_out}")


def main() -> None:
    """Console-script entry point."""
    try:
        app(standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        if "torch.distributed" in sys.modules:
            from propdsl import distributed

            ok = code in (0, None)
            if distributed.active() and (ok or distributed.peer_lost() or distributed.is_main()):
                # After a command that succeeded the ranks meet at a barrier (no collective of
                # a peer is left in flight); then the process ends without tearing the group
                # down: the system closes its connections. So does a process whose peer died
                # (its error is printed; a teardown with a dead peer aborted it), and rank 0
                # after an error or an interrupt: its message is printed, its commit done, and
                # its teardown aborted it in CI (SIGABRT, and the job's exit code was lost).
                # The other ranks leave as before after an error: their teardown frees a rank 0
                # still blocked in a collective, and they do not end before rank 0 has said
                # what the folder keeps (the launcher stops the job when a process ends).
                distributed.finish(ok=ok)
                _leave_now(code)
            distributed.shutdown()
        raise SystemExit(code) from None


def _leave_now(code: object) -> None:
    """End a process of a distributed job at once, its output flushed and its work committed:
    without destroying its process group or the interpreter's finalisation, where gloo's threads
    were seen aborting a finished process ("terminate called without an active exception",
    SIGABRT) in CI."""
    import logging
    import os

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # SystemExit("message"): the message on stderr, status 1
        print(code, file=sys.stderr)
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
