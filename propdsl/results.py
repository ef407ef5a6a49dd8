"""Where the results of `eval` and `verify` go, and the checks of counts and time limits.

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

Every count and time limit of the commands is checked before any work (`positive_count`,
`positive_seconds`).

Opening a run for a spec (`open_run`, `Checkpoint`, `RunSetup`, the run's params as defaults,
the shared lock) moved to `propdsl.session`, the run setup of every command; its names are
importable from here as before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from propdsl import distributed, runs
from propdsl.errors import UsageError
from propdsl.session import (
    Checkpoint,
    ParamSource,
    RunSetup,
    check_fit,
    holds_run,
    json_value,
    open_run,
    run_params,
    show_params,
    show_value,
)
from propdsl.session import load_run_split as load_split

__all__ = [
    "Checkpoint",
    "ParamSource",
    "RunSetup",
    "check_fit",
    "holds_run",
    "load_split",
    "open_run",
    "positive_count",
    "positive_seconds",
    "result_key",
    "run_params",
    "show_params",
    "write_results",
]


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
        parts.append(f"{name}={show_value(value)}")
    if setup.spec_differs:
        parts.append(f"spec{setup.spec_sha256[:6]}")
    full = {
        **setup.record(),
        "run": None,  # the folder may move, and the spec file may be named otherwise:
        "spec": None,  # their names are no settings (the spec's text hash is)
        "seed": setup.seed,
        "split": split,
        "n": n,
        "settings": json_value(dict(settings)),
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
    if not distributed.is_main():
        return run / kind / key  # rank 0 writes a distributed job's results
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
