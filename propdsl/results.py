"""What `eval`, `verify` and `export` do before they measure anything, and where results go.

Opening a run for a spec (`open_run`) checks, before any work:

* that the spec's network has the run's model's shapes (a spec for 30 tabular features cannot be
  evaluated on a run of 8x8 images: a usage error naming both, not a crash inside the model);
* that the spec is the one the run was trained with (its text hash in `config.json`), unless the
  caller accepts a different one (`spec_differs_ok`, `--spec-differs-ok`);
* every count and time limit (`positive_count`, `positive_seconds`).

It applies the run's own params (`config.json` "params") as the defaults: a run trained with
`--param eps=0.05` is evaluated at 0.05, not at the spec's default, unless the caller overrides
`eps` (`spec.with_params`, `--param`). `ParamSource` records where each value came from, and the
commands print it.

Results of one setting live in their own folder (`write_results`)::

    RUN/eval/<key>/eval.json, *.png
    RUN/verify/<method>-<key>/verify.json, counterexamples/
    RUN/eval.json, RUN/verify.json       a copy of the latest result's JSON (with "results")

`<key>` is `<split>-n<N>-<checkpoint>[-<param>=<value>...][-spec<hash>]-<hash8>`: the split, the
number of samples, the checkpoint, the params that differ from the run's, a marker when the spec
is not the run's, and 8 hex digits of the SHA-256 of every setting that can change the result
(spec text, all params, the checkpoint's weights, seed, attack, method, timeout, properties,
device type, ...). The same settings give the same result, so running them again replaces
their folder (written aside and renamed into place); any other setting gets another folder.

`eval`, `verify` and `export` hold the run folder's shared lock while they work (`holds_run`):
several can read one run at once, but a training cannot replace its weights under them, and they
fail fast while a training holds the folder.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from propdsl import runs
from propdsl.errors import UsageError

__all__ = [
    "Checkpoint",
    "ParamSource",
    "RunSetup",
    "check_fit",
    "open_run",
    "positive_count",
    "positive_seconds",
    "result_key",
    "write_results",
]


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


# -- counts and limits ---------------------------------------------------------------------------


def positive_count(name: str, value: Any) -> int | None:
    """`value` as a positive int (None passes through); a usage error naming `name` else.

    >>> positive_count("--samples", 5), positive_count("samples", None)
    (5, None)
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive whole number, got {value!r}")
    return int(value)


def positive_seconds(name: str, value: Any) -> float | None:
    """`value` as a positive, finite float (None passes through); a usage error else.

    >>> positive_seconds("--timeout", 2)
    2.0
    """
    if value is None:
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a positive number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f"{name} must be a positive, finite number of seconds, got {value!r}")
    return seconds


# -- opening a run for a spec --------------------------------------------------------------------


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
        text = f"{self.name}={_show_value(self.value)}"
        if self.source == "run":
            return f"{text} (from the run)"
        if self.source == "override":
            if self.run_value is not None and self.run_value != self.value:
                return f"{text} (override; the run was trained with {_show_value(self.run_value)})"
            return f"{text} (override)"
        return text


def _show_value(v: Any) -> str:
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

    def changed_params(self) -> dict[str, Any]:
        """The params whose value differs from the run's (what the result folder's name shows)."""
        recorded = self.run.config.get("params") or {}
        return {
            p.name: p.value
            for p in self.params
            if p.name in recorded and _jsonable(recorded[p.name]) != _jsonable(p.value)
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
            "params": _jsonable(self.spec.params),
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


def _jsonable(value: Any) -> Any:
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
        if name in recorded and _jsonable(current.params[name]) != _jsonable(recorded[name]):
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


def load_split(setup: RunSetup, split: str):
    """The split of the spec's verify (else train) block's data, else of the data the run
    records, drawn with the run's seed (so `test` is the test split the run never saw)."""
    from propdsl.data import DataError, load_dataset
    from propdsl.train import load_split as block_split

    spec = setup.spec
    block = spec.verify_block or spec.train_block
    if block is not None:
        return block_split(spec, block, split, seed=setup.seed, root=Path(spec.name).parent)
    data = dict(setup.run.config.get("data") or {})
    name = data.pop("name", None)
    if name is None:
        raise UsageError(f"{spec.name} has no train or verify block and the run names no data")
    data.pop("split", None)
    data.setdefault("seed", setup.seed)
    try:
        return load_dataset(name, split=split, **data)
    except DataError as err:
        raise UsageError(str(err)) from None


# -- result folders ------------------------------------------------------------------------------


def result_key(
    setup: RunSetup, *, split: str, n: int, settings: Mapping[str, Any], prefix: str = ""
) -> str:
    """The folder name of one setting (see the module docstring).

    `settings`: everything else that can change the result (attack, method, ...); it enters
    the hash with the spec, params, checkpoint, weights and seed.
    """
    parts = [prefix] if prefix else []
    parts += [split, f"n{n}", setup.checkpoint.value]
    for name, value in setup.changed_params().items():
        parts.append(f"{name}={_show_value(value)}")
    if setup.spec_differs:
        parts.append(f"spec{setup.spec_sha256[:6]}")
    full = {
        **setup.record(),
        "run": None,  # the folder may move, and the spec file may be named otherwise:
        "spec": None,  # their names are no settings (the spec's text hash is)
        "seed": setup.seed,
        "split": split,
        "n": n,
        "settings": _jsonable(dict(settings)),
    }
    digest = hashlib.sha256(json.dumps(full, sort_keys=True).encode()).hexdigest()[:8]
    parts.append(digest)
    return "-".join(_safe(p) for p in parts)


def _safe(part: str) -> str:
    """A file-name-safe version of one part of a key (params are letters, digits, `.`, `-`)."""
    return "".join(c if c.isalnum() or c in "._=+" else "_" for c in part)


def write_results(
    run: Path, kind: str, key: str, json_name: str, write: Callable[[Path], dict[str, Any]]
) -> Path:
    """Write one setting's results into `run/kind/key/` and point `run/json_name` at them.

    `write(folder)` writes the PNGs and other files into a fresh folder and returns the JSON
    object, which is written last as `json_name` there. The folder is then renamed into place
    (an earlier folder of the same key, the same settings, is replaced; a crash leaves it as it
    was), and `run/json_name` becomes a copy of the JSON with `"results": "kind/key"`, so
    readers of the old layout find the latest result. Returns the final folder.
    """
    parent = run / kind
    if parent.is_symlink() or (parent.exists() and not parent.is_dir()):
        raise runs.RunFolderError(
            f"{parent} is not a folder of the run (a symlink or a file): results are never "
            "written through it; remove it"
        )
    parent.mkdir(exist_ok=True)
    final = parent / key
    if final.is_symlink():
        raise runs.RunFolderError(f"{final} is a symlink: results are never written through it")
    # Fresh names (mkdtemp creates its folder exclusively): nothing planted at a predictable
    # name is ever followed or removed.
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=parent))
    old = Path(tempfile.mkdtemp(prefix=f".{key}.", suffix=".old", dir=parent))
    old.rmdir()  # only its unique name is wanted
    try:
        data = dict(write(tmp))
        data["results"] = f"{kind}/{key}"
        runs.write_json(tmp / json_name, data)
        try:
            os.replace(final, old)
        except FileNotFoundError:
            pass  # the first result of these settings
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    runs.write_json(run / json_name, data)
    return final
