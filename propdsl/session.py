"""Run setup, in one place: devices and threads, a block's data, models from configs, and a
trained run opened for a spec with its model and data.

`train`, `eval`, `verify` and `export` all start here:

* `resolve_device` / `set_threads`: the device a command runs on and torch's CPU threads;
* `load_block_split`: one split of a train or verify block's data source, checked against the
  network's declared type; `model_config` / `build_from_config`: the model a train block (or a
  run's `config.json`) describes;
* `open_run`: a run folder opened for a spec. It checks, before any work, that the spec's network
  has the run's model's shapes (a spec for 30 tabular features cannot be evaluated on a run of
  8x8 images: a usage error naming both, not a crash inside the model) and that the spec is the
  one the run was trained with (its text hash in `config.json`), unless the caller accepts a
  different one (`spec_differs_ok`, `--spec-differs-ok`). It applies the run's own params
  (`config.json` "params") as the defaults: a run trained with `--param eps=0.05` is evaluated
  at 0.05, not at the spec's default, unless the caller overrides `eps` (`spec.with_params`,
  `--param`); `ParamSource` records where each value came from, and the commands print it.
  `load_samples` then draws the first samples of a split with the run's split seed;
* `holds_run`: `eval`, `verify` and `export` hold the run folder's shared lock while they work:
  several can read one run at once, but a training cannot replace its weights under them, and
  they fail fast while a training holds the folder.

The run folder's format, locks and commits are `propdsl.runs`; where results go,
`propdsl.results`. This module imports torch only when a function needs it.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from propdsl import registry, runs
from propdsl.check import BlockInfo, OptionValue
from propdsl.errors import CheckError, UsageError
from propdsl.source import Diagnostic

if TYPE_CHECKING:
    import torch
    from torch import nn

    from propdsl.api import Spec

__all__ = [
    "MAX_THREADS",
    "Checkpoint",
    "ParamSource",
    "RunSetup",
    "build_from_config",
    "check_fit",
    "data_kwargs",
    "default_threads",
    "holds_run",
    "json_value",
    "load_block_split",
    "block_split_seed",
    "DEFAULT_SPLIT_SEED",
    "load_run_split",
    "draw_partners",
    "load_samples",
    "partner_pool",
    "model_config",
    "open_run",
    "resolve_device",
    "run_params",
    "set_threads",
    "show_params",
    "show_value",
]

# Torch's thread pools crash beyond a few thousand threads: the spec checker's range, one table.
assert registry.THREADS.hi is not None  # the checker's range has an upper end
MAX_THREADS = int(registry.THREADS.hi)


# -- device and threads ----------------------------------------------------------------------------


def default_threads() -> int:
    """All cores this process may use, at most 8 (small models gain nothing beyond that)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def set_threads(threads: int | None) -> int:
    """Set torch's CPU threads (None: `default_threads()`); 1..MAX_THREADS, else UsageError."""
    if threads is not None and (
        not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= MAX_THREADS
    ):
        raise UsageError(f"threads must be between 1 and {MAX_THREADS}, got {threads!r}")
    import torch

    if threads is None and os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        threads = 1  # one of several processes (docs/distributed.md): no oversubscription
    n = threads or default_threads()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set once in this process
    return n


def resolve_device(name: str | None) -> torch.device:
    """The device of `--device` (None or `auto`: CUDA where available, else the CPU); a usage
    error for an unknown or unavailable one."""
    import torch

    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' asked for, but CUDA is not available here")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}': use auto, cpu, cuda or cuda:N") from None


# -- data and models -------------------------------------------------------------------------------


def data_kwargs(block: BlockInfo) -> dict[str, Any]:
    name, kwargs = block.data
    return dict(kwargs)


# The seed of the train / val / test split when the data source names none (its `seed` keyword).
# Independent of the training seed, so that runs with different seeds are compared on one test
# set. (Runs from before `split_seed` was recorded drew their split with the training seed.)
DEFAULT_SPLIT_SEED = 0


def block_split_seed(block: BlockInfo) -> int:
    """The seed of the block's data split: the data source's `seed`, else the fixed default."""
    return int(data_kwargs(block).get("seed", DEFAULT_SPLIT_SEED))


def load_block_split(
    spec: Spec,
    block: BlockInfo,
    split: str,
    *,
    split_seed: int | None = None,
    root: Path | None = None,
) -> Any:
    """One split of the block's data source, checked against the network's declared type.

    `split_seed` draws the split where the data source names no `seed` (None: the default,
    `DEFAULT_SPLIT_SEED`); a run passes the seed it recorded."""
    from propdsl.data import DataError, load_dataset

    name, _ = block.data
    kwargs = data_kwargs(block)
    kwargs.pop("split", None)
    kwargs.setdefault("seed", DEFAULT_SPLIT_SEED if split_seed is None else split_seed)
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


def build_from_config(config: dict[str, Any], seed: int, user_ref: str | None = None) -> nn.Module:
    """The model a config's `model` entry describes. A user model is imported only from
    `user_ref`, the reference the caller was given (`--model`), never from the config: a run
    folder is data and names code without running it."""
    from propdsl.models import build_model, check_model, load_user_model

    shape, classes = tuple(config["input_shape"]), int(config["num_classes"])
    recorded = config.get("user")
    if recorded or config.get("name") == "user":
        if user_ref is None:
            named = f" '{recorded}'" if recorded else ""
            raise UsageError(
                f"the model is the user model{named}: user code runs only when named, "
                f"pass --model {recorded or 'pkg.module:factory'}"
            )
        if recorded and not runs.same_model_ref(user_ref, recorded):
            raise UsageError(f"--model {user_ref} is not the run's model '{recorded}'")
        model = load_user_model(user_ref, input_shape=shape, num_classes=classes, seed=seed)
        check_model(model, shape, classes)
        return model
    kwargs = {k: tuple(v) if k == "activation" else v for k, v in config["kwargs"].items()}
    return build_model(config["name"], shape, classes, seed=seed, **kwargs)


# -- a run opened for a spec -----------------------------------------------------------------------


class Checkpoint(enum.Enum):
    """Which weights of a run: `best` (best validation accuracy) or `last` (last epoch)."""

    BEST = "best"
    LAST = "last"

    @classmethod
    def parse(cls, value: Checkpoint | str | None) -> Checkpoint:
        if value is None:
            return cls.BEST
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            raise UsageError(f"checkpoint must be best or last, got {value!r}") from None


@dataclass(frozen=True)
class ParamSource:
    """A param's value and where it came from: `spec` (its default), `run` (the value the run
    was trained with, which differs from the default) or `override` (given by the caller;
    `run_value` is then the run's, when the run records one)."""

    name: str
    value: Any
    source: str
    run_value: Any = None

    def show(self) -> str:
        text = f"{self.name}={show_value(self.value)}"
        if self.source == "run":
            return f"{text} (from the run)"
        if self.source == "override":
            if self.run_value is not None and self.run_value != self.value:
                return f"{text} (override; the run was trained with {show_value(self.run_value)})"
            return f"{text} (override)"
        return text


def show_value(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def show_params(params: tuple[ParamSource, ...]) -> str:
    """`eps=0.05 (from the run), delta=2`: one line for a command's header."""
    return ", ".join(p.show() for p in params) if params else "none"


@dataclass(frozen=True)
class RunSetup:
    """A run opened for a spec: the spec with the run's params as defaults, the model of the
    chosen checkpoint, and what the result records about them."""

    run: runs.Run
    spec: Any  # propdsl.api.Spec
    params: tuple[ParamSource, ...]
    model: Any  # torch.nn.Module, in eval mode, on the device
    checkpoint: Checkpoint
    checkpoint_epoch: int | None
    checkpoint_note: str | None  # why the checkpoint differs from the one asked for
    weights_sha256: str
    spec_sha256: str
    spec_differs: bool

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def seed(self) -> int:
        return int(self.run.config.get("seed", 0))

    @property
    def split_seed(self) -> int:
        """The seed the run's data split was drawn with (older runs: their training seed)."""
        config = self.run.config
        return int(config.get("split_seed", config.get("seed", 0)))

    def changed_params(self) -> dict[str, Any]:
        """The params whose value differs from the run's (what the result folder's name shows)."""
        recorded = self.run.config.get("params") or {}
        return {
            p.name: p.value
            for p in self.params
            if p.name in recorded and json_value(recorded[p.name]) != json_value(p.value)
        }

    def header(self) -> str:
        """`checkpoint best (epoch 12)  params: eps=0.05 (from the run), ...` and a note line
        when the spec is not the run's or the checkpoint is not the one asked for."""
        epoch = f" (epoch {self.checkpoint_epoch})" if self.checkpoint_epoch is not None else ""
        lines = [f"checkpoint {self.checkpoint.value}{epoch}  params: {show_params(self.params)}"]
        if self.checkpoint_note:
            lines.append(f"note: {self.checkpoint_note}")
        if self.spec_differs:
            lines.append(
                f"note: {self.spec.name} is not the spec {self.path} was trained with "
                "(--spec-differs-ok); its results go to a folder of their own"
            )
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """What every result JSON records about the run, spec, params and checkpoint."""
        return {
            "run": str(self.path),
            "spec": self.spec.name,
            "spec_sha256": self.spec_sha256,
            "spec_differs": self.spec_differs,
            "params": json_value(self.spec.params),
            "param_sources": {p.name: p.source for p in self.params},
            "checkpoint": self.checkpoint.value,
            "checkpoint_epoch": self.checkpoint_epoch,
            "weights_sha256": self.weights_sha256,
        }


def _block_network(spec: Any) -> str | None:
    block = spec.verify_block or spec.train_block
    if block is not None and getattr(block, "network", None) in spec.networks:
        return block.network
    if len(spec.networks) == 1:
        return next(iter(spec.networks))
    return None


def check_fit(spec: Any, run: runs.Run) -> None:
    """A usage error, naming both, when the spec's network is not the run's model's shape.

    Compares the network the spec's verify (else train) block names (else its only network)
    with the input shape and class count recorded in the run's `config.json`.
    """
    model = run.config.get("model") or {}
    shape, classes = model.get("input_shape"), model.get("num_classes")
    name = _block_network(spec)
    if name is None or shape is None or classes is None:
        return
    net = spec.networks[name]
    run_inp, run_out = tuple(int(s) for s in shape), (int(classes),)
    if tuple(net.inp.shape) == run_inp and tuple(net.out.shape) == run_out:
        return
    trained = run.config.get("spec")
    own = f" (trained from {trained})" if trained else ""
    raise UsageError(
        f"{spec.name} does not fit the run {run.path}: its network '{name}' is {net.show()}, "
        f"but the run's model is Tensor[{', '.join(map(str, run_inp))}] -> Tensor[{classes}]"
        f"{own}; use the run's own spec, {run.path / runs.SPEC}"
    )


def json_value(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def run_params(spec: Any, run: runs.Run) -> tuple[Any, tuple[ParamSource, ...]]:
    """The spec with the run's recorded params as defaults, and where each value came from.

    Params the caller set (`spec.overrides`) win. Of the others, a param takes the run's value
    where it differs from what the spec gives, in declaration order, so a derived default
    (`param delta : Real = 2 * eps`) follows a changed `eps` instead of being pinned to the run's
    value of `delta` when only `eps` was set at training.
    """
    recorded = run.config.get("params") or {}
    given = dict(spec.overrides)
    # The smallest set of params set at training: replayed on the spec without the caller's
    # overrides, so that derived defaults are judged against the training values.
    base = type(spec)(spec.source) if given else spec
    trained, current = {}, base
    for name in list(base.params):
        if name in recorded and json_value(current.params[name]) != json_value(recorded[name]):
            trained[name] = recorded[name]
            current = type(spec)(spec.source, trained)
    from_run = {k: v for k, v in trained.items() if k not in given}
    if given:
        current = spec.with_params(**from_run) if from_run else spec
    sources = []
    for name, value in current.params.items():
        if name in given:
            sources.append(ParamSource(name, value, "override", recorded.get(name)))
        elif name in from_run:
            sources.append(ParamSource(name, value, "run"))
        else:
            sources.append(ParamSource(name, value, "spec"))
    return current, tuple(sources)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def holds_run(purpose: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run `fn(spec, run, ...)` while holding the shared lock of the run folder `run`.

    The run is opened first: `Run.open` may take the exclusive lock for a moment to finish a
    commit that a kill cut short, which it could not do under this process's shared lock.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(spec: Any, run: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
            opened = runs.Run.open(run)
            with runs.locked(opened.path, purpose, shared=True):
                return fn(spec, run, *args, **kwargs)

        return wrapper

    return decorate


def open_run(
    spec: Any,
    run: str | os.PathLike[str],
    *,
    checkpoint: Checkpoint | str | None = None,
    model_ref: str | None = None,
    device: Any = "cpu",
    spec_differs_ok: bool = False,
) -> RunSetup:
    """Open a run folder for `spec`: check that they fit, take the run's params as defaults,
    load the checkpoint's weights. Raises `UsageError` before any work when they do not fit.

    `checkpoint`: `best` (default) or `last`; `best` falls back to `last` for a run without a
    best checkpoint, and `RunSetup.checkpoint_note` says so.
    """
    r = runs.Run.open(run)
    check_fit(spec, r)
    text_hash = runs.spec_hash(spec.source.text)
    trained_hash = r.config.get("spec_sha256")
    differs = trained_hash is not None and trained_hash != text_hash
    if differs and not spec_differs_ok:
        raise UsageError(
            f"{spec.name} is not the spec {r.path} was trained with (its text differs from "
            f"{r.path / runs.SPEC}): pass that file, or --spec-differs-ok (spec_differs_ok=True) "
            "to use this one; its results then go to a folder of their own"
        )
    spec, params = run_params(spec, r)
    wanted = Checkpoint.parse(checkpoint)
    tag, note = wanted, None
    if not (r.path / f"{tag.value}.safetensors").exists():
        if wanted is Checkpoint.BEST and (r.path / "last.safetensors").exists():
            tag = Checkpoint.LAST
            note = f"{r.path} has no best checkpoint: using the last one"
        else:
            raise UsageError(
                f"{r.path} has no {wanted.value} checkpoint ({wanted.value}.safetensors)"
            )
    model = r.build_model(model_ref).to(device)
    sidecar = runs.load_weights(r.path, tag.value, model)
    model.eval()
    epoch = sidecar.get("epoch") if isinstance(sidecar, dict) else None
    return RunSetup(
        run=r,
        spec=spec,
        params=params,
        model=model,
        checkpoint=tag,
        checkpoint_epoch=int(epoch) if isinstance(epoch, int) else None,
        checkpoint_note=note,
        weights_sha256=_file_sha256(r.path / f"{tag.value}.safetensors"),
        spec_sha256=text_hash,
        spec_differs=differs,
    )


def load_run_split(setup: RunSetup, split: str) -> Any:
    """The split of the spec's verify (else train) block's data, else of the data the run
    records, drawn with the run's split seed (so `test` is the test split the run never saw)."""
    from propdsl.data import DataError, load_dataset

    spec = setup.spec
    block = spec.verify_block or spec.train_block
    if block is not None:
        return load_block_split(
            spec, block, split, split_seed=setup.split_seed, root=Path(spec.name).parent
        )
    data = dict(setup.run.config.get("data") or {})
    name = data.pop("name", None)
    if name is None:
        raise UsageError(f"{spec.name} has no train or verify block and the run names no data")
    data.pop("split", None)
    data.setdefault("seed", setup.split_seed)
    try:
        return load_dataset(name, split=split, **data)
    except DataError as err:
        raise UsageError(str(err)) from None


# Partners of properties of a pair are drawn from at most this many samples of the split (the
# k-means of prototype partners runs over them).
PARTNER_POOL = 2000


def partner_pool(setup: RunSetup, split: str, device: Any) -> tuple[Any, Any]:
    """(x, y) of the first `PARTNER_POOL` samples of a split of the run's data: the pool the
    partners of properties of a pair are drawn from (`propdsl.partners.draw`)."""
    ds = load_run_split(setup, split)
    if len(ds) == 0:
        raise UsageError(f"the {split} split is empty")
    return ds.x[:PARTNER_POOL].to(device), ds.y[:PARTNER_POOL].to(device)


def draw_partners(
    setup: RunSetup, split: str, names: Any, x: Any, y: Any, device: Any
) -> dict[str, tuple[Any, Any]]:
    """The partners `(xt, yt)` of the samples `(x, y)` for each property of a pair among
    `names`, drawn from `partner_pool` as each property's `partner` clause says."""
    from propdsl.partners import draw

    paired = [n for n in names if setup.spec.property(n).paired]
    if not paired:
        return {}
    pool_x, pool_y = partner_pool(setup, split, device)
    return {
        n: draw(setup.spec.property(n).partner, setup.model, pool_x, pool_y, x, y) for n in paired
    }


def load_samples(setup: RunSetup, split: str, samples: int | None, device: Any) -> Any:
    """The first `samples` (None: all) of a split of the run's data (`load_run_split`), as a
    `propdsl.data.Dataset` on `device`; a usage error when the split is empty."""
    ds = load_run_split(setup, split)
    if len(ds) == 0:
        raise UsageError(f"the {split} split is empty")
    n = len(ds) if samples is None else samples
    return dataclasses.replace(ds, x=ds.x[:n].to(device), y=ds.y[:n].to(device))
