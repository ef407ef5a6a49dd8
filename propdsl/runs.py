"""Run folders: what `propdsl train` writes and `propdsl eval` / `propdsl verify` read.

Layout of a run folder::

    config.json          spec hash, resolved params and settings, versions, seed, model, data hash
    spec.prop            the spec text as trained
    checkpoint.json      the manifest of the last finished epoch: its number, every file's SHA-256
    metrics.jsonl        one JSON object per epoch
    metrics.csv          the same, as a table
    last.safetensors     weights after the last finished epoch, with last.json (epoch, metrics)
    last.state.pt        optimizer / scheduler state for --resume (torch.load weights_only=True)
    best.safetensors     weights of the epoch with the best validation accuracy, with best.json
    .lock                held while a process writes the folder (who holds it: pid, host, command)

A run folder is data. Nothing in it is imported or executed: a user model it names is built
only from a reference the user passes (`--model`), and checkpoints are safetensors plus a
`weights_only` torch state.

An epoch ends with one commit (`commit_epoch`): every changed file is written to a fresh temporary
name in the folder, then the manifest naming them is renamed into place (the commit point), then
the temporaries are renamed to their names and the folder is fsynced once. A process killed
anywhere leaves the previous epoch's complete set, or a committed set whose last renames
`recover` completes; it never leaves a mix of two epochs. Temporaries are created with O_EXCL (or
as hard links, which also fail rather than replace a name) and never follow a symlink; `best` of
an epoch that improved is a hard link to `last`, not a second copy.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import errno
import hashlib
import io
import json
import os
import random
import re
import secrets
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from propdsl.errors import UsageError

try:  # POSIX: flock locks, released by the kernel when their process dies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

CONFIG = "config.json"
SPEC = "spec.prop"
MANIFEST = "checkpoint.json"
LOCK = ".lock"
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
# The files one epoch commits (the best pair only when the epoch improved).
EPOCH_FILES = (
    "last.safetensors",
    "last.json",
    "last.state.pt",
    "best.safetensors",
    "best.json",
    METRICS_JSONL,
    METRICS_CSV,
)
# Everything `train` writes; a fresh run in an old folder removes these (the manifest last).
RUN_FILES = (CONFIG, SPEC, *EPOCH_FILES, MANIFEST)
MANIFEST_FORMAT = 1

# `.NAME.<12 hex>.tmp`: the temporaries of `_write_new`; anything else is never removed.
_TEMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.tmp$")


class RunFolderError(UsageError):
    """A run folder cannot be used as asked: missing, damaged, edited, foreign, or unwritable."""


class RunInUse(RunFolderError):
    """Another process holds the run folder's lock."""


def spec_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the write primitives (every change to a run folder goes through these five) ----------------
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
_OPEN_NEW |= getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)


# The temporaries' random parts: a generator seeded once from the system's entropy rather than a
# `secrets` call (a system call) per file, since O_EXCL, not secrecy, keeps two writers apart: a
# name taken (by another writer, a forked copy of this generator, or a planted file) is skipped.
# Each system call in a commit is a hand-over of the interpreter lock when the commit runs beside
# the training loop (`train`'s background commit), and those slow the loop's small tensor ops.
_NAMES = random.Random(secrets.randbits(64))


def _temp_name(name: str) -> str:
    return f".{name}.{_NAMES.getrandbits(48):012x}.tmp"


def _write_new(folder: Path, name: str, data: bytes) -> str:
    """Write `data` to a new file `.NAME.<random>.tmp` in `folder`; returns its name.

    O_EXCL (with O_NOFOLLOW) creates the file or fails: a symlink or file planted under the name
    is never followed or overwritten, and two writers never share a temporary. Written with
    `os.write` on the descriptor (no buffered file object: three system calls per file).
    """
    for _ in range(100):
        tmp = _temp_name(name)
        try:
            fd = os.open(os.path.join(folder, tmp), _OPEN_NEW, 0o666)
        except FileExistsError:
            continue
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, tmp))
            raise
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))  # pragma: no cover


# Where hard links are not supported (some network or FAT file systems), `_link_new` fails with
# one of these and the file is written as a copy instead.
_NO_LINKS = {
    errno.EPERM,
    errno.EACCES,
    errno.EMLINK,
    errno.EXDEV,
    errno.ENOSYS,
    errno.ENOTSUP,
    getattr(errno, "EOPNOTSUPP", errno.ENOTSUP),
}


# linkat(2) without AT_SYMLINK_FOLLOW where the platform has it: never through a symlink.
_LINK_NOFOLLOW = {"follow_symlinks": False} if os.link in os.supports_follow_symlinks else {}


def _link_new(folder: Path, name: str, source: str) -> str:
    """A new temporary `.NAME.<random>.tmp` in `folder` that is a hard link to the temporary
    `source` (same folder): a second name for the same bytes, without writing them again.

    `os.link` creates the name or fails (never follows or overwrites a file or symlink planted
    under it). Raises OSError where the file system has no hard links (`_NO_LINKS`).
    """
    for _ in range(100):
        tmp = _temp_name(name)
        try:
            os.link(os.path.join(folder, source), os.path.join(folder, tmp), **_LINK_NOFOLLOW)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))  # pragma: no cover


def _replace(src: Path, dst: Path) -> None:
    """Rename `src` over `dst` (atomic; a symlink at `dst` is replaced, not followed)."""
    os.replace(src, dst)


def _remove(path: Path) -> None:
    """Remove a file (a symlink itself, never its target); absent is fine."""
    path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable (one fsync; a no-op where directories can't be
    opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the renames still happened
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """One file, replaced atomically: readers see the old content or the new, never half."""
    tmp = _write_new(path.parent, path.name, data)
    try:
        _replace(path.parent / tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path.parent / tmp)
        raise


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


def write_json(path: Path, obj: Any) -> None:
    _atomic_write(Path(path), dumps_json(obj))


def write_text(path: Path, text: str) -> None:
    _atomic_write(Path(path), text.encode("utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    """Replace one file atomically through a fresh O_EXCL temporary (never through a symlink
    planted at the name): for result files readers add to a run folder (plots, reports)."""
    _atomic_write(Path(path), data)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing: is this a propdsl run folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path} is not valid JSON: {err}") from None
    except OSError as err:
        raise RunFolderError(f"cannot read {path}: {err.strerror or err}") from None


# What `eval` and `verify` write into a run folder: a folder per setting and a copy of the
# latest JSON (propdsl.results). They belong to the run's weights: a replaced run drops them.
EVAL_DIR, VERIFY_DIR = "eval", "verify"
EVAL_JSON, VERIFY_JSON = "eval.json", "verify.json"
RESULT_DIRS = (EVAL_DIR, VERIFY_DIR)
RESULT_COPIES = (EVAL_JSON, VERIFY_JSON)


def clear(run: Path) -> None:
    """Remove a run's files and its eval / verify results from its folder (other files are left
    alone).

    The manifest goes last, so an interrupted clear leaves a folder still recognised as a run.
    """
    import shutil

    for name in RESULT_COPIES:
        _remove(run / name)
    for name in RESULT_DIRS:
        path = run / name
        if path.is_symlink() or not path.is_dir():
            _remove(path)  # a symlink is removed, never followed
        else:
            shutil.rmtree(path)
    for name in RUN_FILES:
        _remove(run / name)
    remove_temporaries(run)


def remove_temporaries(run: Path) -> None:
    """Remove the temporaries a killed `train` left: only names `_write_new` makes for the run's
    own files (a reader's eval.json in the making is not touched)."""
    try:
        names = os.listdir(run)
    except OSError:
        return
    for name in names:
        match = _TEMP.match(name)
        if match and match["name"] in RUN_FILES:
            with contextlib.suppress(OSError):
                os.unlink(run / name)


# -- checkpoints ---------------------------------------------------------------------------------
def checkpoint_bytes(model: Any) -> bytes:
    """The model's weights as safetensors (CPU copies, so they load anywhere)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def state_bytes(state: dict[str, Any]) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def save_checkpoint(run: Path, tag: str, model: Any, meta: dict[str, Any]) -> None:
    """`tag.safetensors` (weights) and `tag.json` (the sidecar), each replaced atomically.

    For run folders made by hand (tests, other tools); `train` writes through `commit_epoch`.
    """
    _atomic_write(run / f"{tag}.safetensors", checkpoint_bytes(model))
    write_json(run / f"{tag}.json", meta)


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise RunFolderError(f"{path} is missing: the run has no {what}") from None
    except OSError as err:
        raise RunFolderError(f"cannot read {path}: {err.strerror or err}") from None


def load_weights(run: Path, tag: str, model: Any) -> dict[str, Any]:
    """Load `tag.safetensors` into `model` (in place); returns the sidecar.

    The file must be safetensors (never a pickle) and, where the run has a manifest, have the
    SHA-256 the manifest records: a damaged or edited checkpoint is a `RunFolderError`.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load

    name = f"{tag}.safetensors"
    path = run / name
    data = _read_bytes(path, f"'{tag}' checkpoint")
    expected = _manifest_hash(run, name)
    if expected is not None and sha256(data) != expected:
        # A writer may have been renaming this very file: read it once more before judging.
        data = _read_bytes(path, f"'{tag}' checkpoint")
        expected = _manifest_hash(run, name)
        if expected is not None and sha256(data) != expected:
            raise RunFolderError(
                f"{path} does not match {run / MANIFEST} (damaged or edited since it was written)"
            )
    try:
        state = load(data)
    except SafetensorError as err:
        raise RunFolderError(f"{path} is not a valid safetensors file: {err}") from None
    device = next((p.device for p in model.parameters()), None)
    if device is not None:
        state = {k: v.to(device) for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise RunFolderError(f"{path} does not fit the model: {err}") from None
    meta = read_json(run / f"{tag}.json")
    if not isinstance(meta, dict):
        raise RunFolderError(f"{run / f'{tag}.json'} is not a JSON object")
    return meta


def load_state(run: Path) -> dict[str, Any]:
    """`last.state.pt`, unpickled with `weights_only=True` (tensors and plain containers only)."""
    import pickle
    import warnings

    import torch

    path = run / "last.state.pt"
    data = _read_bytes(path, "optimizer state to resume from")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about unusual pickle protocols
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    # torch's own message suggests loading without weights_only, which would run any code the
    # file holds: say what happened, never that.
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as err:
        raise RunFolderError(
            f"{path} is damaged or is not a propdsl optimizer state ({type(err).__name__}); "
            "it was not loaded: start a new run"
        ) from None
    if not isinstance(state, dict):
        raise RunFolderError(f"{path} is not a propdsl optimizer state (no dict inside)")
    return state


# -- metrics -------------------------------------------------------------------------------------
def metrics_files(rows: list[dict[str, Any]]) -> dict[str, bytes]:
    """metrics.jsonl and metrics.csv holding exactly `rows`."""
    jsonl = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return {METRICS_JSONL: jsonl.encode(), METRICS_CSV: buf.getvalue().encode()}


class MetricsFiles:
    """`metrics_files` of a growing list of rows, each row serialised once: `add(row)` returns
    the files holding every row so far, byte for byte what `metrics_files` writes (rewriting
    every row each epoch made a long run's epoch end grow with its length)."""

    def __init__(self, rows: list[dict[str, Any]] = ()):  # type: ignore[assignment]
        self.rows: list[dict[str, Any]] = []
        self._jsonl: list[str] = []
        self._keys: list[str] = []
        self._csv: list[str] = []  # each row's CSV line under `_keys`
        for row in rows:
            self._append(row)

    def _append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._jsonl.append(json.dumps(row, sort_keys=True) + "\n")
        new = [k for k in row if k not in self._keys]
        if new:  # a new column: every line changes
            self._keys += new
            self._csv = [self._line(r) for r in self.rows]
        else:
            self._csv.append(self._line(row))

    def _line(self, row: dict[str, Any] | None) -> str:
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=self._keys)
        if row is None:
            writer.writeheader()
        else:
            writer.writerow(row)
        return buf.getvalue()

    def add(self, row: dict[str, Any]) -> dict[str, bytes]:
        self._append(row)
        table = self._line(None) + "".join(self._csv)
        return {METRICS_JSONL: "".join(self._jsonl).encode(), METRICS_CSV: table.encode()}


def read_metrics(run: Path) -> list[dict[str, Any]]:
    path = run / METRICS_JSONL
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a row of a hand-edited file; resume checks the rows against the manifest
        if isinstance(row, dict):
            rows.append(row)
    return rows


# -- the manifest and the epoch commit -----------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """checkpoint.json: the committed epoch and the SHA-256 of every file of its set.

    `staged` maps a file to the temporary it is renamed from (renames a kill may have left
    undone); `previous` is the epoch before, for the fallback of `recover`.
    """

    epoch: int
    files: Mapping[str, str]
    staged: Mapping[str, str] = field(default_factory=dict)
    previous: Manifest | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "epoch": self.epoch,
            "files": dict(self.files),
            "staged": dict(self.staged),
        }
        if self.previous is not None:
            out["previous"] = {"epoch": self.previous.epoch, "files": dict(self.previous.files)}
        return out

    @staticmethod
    def from_json(obj: Any, where: Path) -> Manifest:
        def bad(why: str) -> RunFolderError:
            return RunFolderError(f"{where} is not a propdsl checkpoint manifest: {why}")

        if not isinstance(obj, dict):
            raise bad("not a JSON object")
        if obj.get("format") != MANIFEST_FORMAT:
            raise bad(f"format {obj.get('format')!r}, expected {MANIFEST_FORMAT}")

        def files(o: Any) -> dict[str, str]:
            if not isinstance(o, dict) or not all(
                k in EPOCH_FILES and isinstance(v, str) for k, v in o.items()
            ):
                raise bad("'files' must map the run's file names to SHA-256 digests")
            return dict(o)

        def epoch(o: Any) -> int:
            if not isinstance(o, int) or isinstance(o, bool) or o < 1:
                raise bad(f"epoch {o!r} is not a positive whole number")
            return o

        staged = obj.get("staged", {})
        if not isinstance(staged, dict) or not all(
            k in EPOCH_FILES and isinstance(v, str) and _TEMP.match(v) and not set("/\\") & set(v)
            for k, v in staged.items()
        ):
            raise bad("'staged' must map the run's file names to temporary names")
        prev = obj.get("previous")
        previous = None
        if prev is not None:
            if not isinstance(prev, dict):
                raise bad("'previous' is not a JSON object")
            previous = Manifest(epoch(prev.get("epoch")), files(prev.get("files")))
        return Manifest(epoch(obj.get("epoch")), files(obj.get("files")), staged, previous)


def read_manifest(run: Path) -> Manifest | None:
    path = run / MANIFEST
    if not path.exists():
        return None
    return Manifest.from_json(read_json(path), path)


def _manifest_hash(run: Path, name: str) -> str | None:
    """The digest the manifest records for `name`; None without a manifest or while that file's
    rename is still pending."""
    try:
        manifest = read_manifest(run)
    except RunFolderError:
        return None  # Run.open and resume report a bad manifest; a reader just skips the check
    if manifest is None or name not in manifest.files:
        return None
    tmp = manifest.staged.get(name)
    if tmp is not None and (run / tmp).exists():
        return None
    return manifest.files[name]


def _file_hash(path: Path) -> str | None:
    try:
        return sha256(path.read_bytes())
    except OSError:
        return None


# `commit_epoch(previous=READ)`: the caller does not know the folder's manifest; read it.
READ: Any = object()


def commit_epoch(
    run: Path, epoch: int, files: Mapping[str, bytes], *, previous: Manifest | None = READ
) -> Manifest:
    """Write one epoch's files as one atomic step; returns the new manifest.

    1. every file goes to a fresh temporary in the folder (a failure here, such as a full disk,
       removes them and leaves the previous epoch as it was); a file whose bytes are the very
       object of an earlier file (`best.safetensors` of an improved epoch is `last`'s) becomes a
       hard link to that file's temporary, so it is neither written nor hashed twice (a copy
       where the file system has no hard links);
    2. the manifest naming the temporaries and the digests of the whole set is renamed into
       place: the commit point;
    3. the temporaries are renamed to their names and the folder is fsynced (once per epoch: an
       fsync of every file made tiny epochs several times slower).

    A process killed in step 3 leaves renames that `recover` completes from the manifest.

    `previous`: the folder's manifest as the caller knows it (what its last `commit_epoch`
    returned, or `recover`'s; None: no epoch committed yet), so it is not read again; by default
    it is read from the folder. Only the holder of the folder's lock writes it, so the two agree.
    """
    if previous is READ:
        previous = read_manifest(run)
    hashes = dict(previous.files) if previous is not None else {}
    staged: dict[str, str] = {}
    try:
        for name, data in files.items():
            if name not in EPOCH_FILES:
                raise ValueError(f"{name} is not a file of an epoch")
            same = next((n for n in staged if files[n] is data), None)
            if same is not None:
                try:
                    staged[name] = _link_new(run, name, staged[same])
                    hashes[name] = hashes[same]
                    continue
                except OSError as err:
                    if err.errno not in _NO_LINKS:
                        raise
            staged[name] = _write_new(run, name, data)
            hashes[name] = sha256(data)
        manifest = Manifest(
            epoch,
            hashes,
            staged,
            Manifest(previous.epoch, previous.files) if previous is not None else None,
        )
        _atomic_write(run / MANIFEST, dumps_json(manifest.to_json()))
    except BaseException:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                os.unlink(run / tmp)
        raise
    try:
        for name, tmp in staged.items():
            _replace(run / tmp, run / name)
    except BaseException:
        # Committed: finish what can be finished now; `recover` does the rest later.
        with contextlib.suppress(OSError):
            _roll_forward(run, manifest)
        raise
    _fsync_dir(run)
    return manifest


def _roll_forward(run: Path, manifest: Manifest) -> None:
    for name, tmp in manifest.staged.items():
        if (run / tmp).exists():
            os.replace(run / tmp, run / name)


def recover(run: Path) -> Manifest | None:
    """Bring a run folder to a committed state: finish the renames of a commit a kill cut short,
    or, when a staged file is damaged (a power cut before the data reached the disk) and none of
    its renames happened, fall back to the previous epoch. Removes stray temporaries.

    Call it holding the folder's exclusive lock (`locked`). Returns the manifest (None for a run
    without one: no epoch committed yet, or a folder by another tool or an older propdsl).
    """
    manifest = read_manifest(run)
    if manifest is None:
        remove_temporaries(run)
        return None
    pending = {n: t for n, t in manifest.staged.items() if (run / t).exists()}
    if pending:
        intact = all(_file_hash(run / t) == manifest.files[n] for n, t in pending.items())
        if intact:
            _roll_forward(run, manifest)
        elif len(pending) == len(manifest.staged) and manifest.previous is not None:
            before = manifest.previous
            if any(_file_hash(run / n) != h for n, h in before.files.items()):
                raise RunFolderError(
                    f"{run}: epoch {manifest.epoch} was cut short and epoch {before.epoch} is "
                    "damaged too; start a new run"
                )
            write_json(run / MANIFEST, before.to_json())
            manifest = before
        else:
            raise RunFolderError(
                f"{run}: the files of epoch {manifest.epoch} are damaged (cut short by a crash "
                "or edited); start a new run"
            )
        _fsync_dir(run)
    remove_temporaries(run)
    return Manifest(manifest.epoch, manifest.files, {}, manifest.previous)


def verify(run: Path, manifest: Manifest) -> list[str]:
    """The files of the manifest's set that are missing or differ from their digests."""
    return [n for n, h in sorted(manifest.files.items()) if _file_hash(run / n) != h]


def needs_recovery(run: Path) -> bool:
    try:
        manifest = read_manifest(run)
    except RunFolderError:
        return False
    return manifest is not None and any((run / t).exists() for t in manifest.staged.values())


# -- the lock ------------------------------------------------------------------------------------
def _holder_text(fd: int) -> str:
    try:
        raw = os.pread(fd, 4096, 0) if hasattr(os, "pread") else b""
        info = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        return "another process"
    parts = [f"{info.get('purpose', 'a propdsl command')} by pid {info.get('pid', '?')}"]
    if info.get("host"):
        parts.append(f"on {info['host']}")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    text = " ".join(parts)
    if info.get("command"):
        text += f" ({info['command']})"
    return text


@contextlib.contextmanager
def locked(run: str | os.PathLike[str], purpose: str = "train", *, shared: bool = False):
    """Hold the run folder's lock for the `with` block; raise `RunInUse` at once when taken.

    `shared=False` (train, and whatever rewrites the run's files) excludes every other holder and
    records who holds it in `.lock` (pid, host, start time, command), for the refusal message.
    `shared=True` (eval, verify, export: readers that only add their own result files) may be
    held by several processes at once, never together with an exclusive holder. A shared lock on
    a folder this user cannot write (read-only media) is skipped: nothing can change it.

    POSIX uses `flock` on `.lock`: the kernel releases it when the holder dies, so a killed run
    never leaves a stale lock. Elsewhere `filelock` provides the exclusive lock.
    """
    folder = Path(run)
    path = folder / LOCK
    if fcntl is None:  # pragma: no cover - Windows
        import filelock

        try:
            with filelock.FileLock(str(path), timeout=0):
                yield
        except filelock.Timeout:
            raise RunInUse(
                f"{folder} is in use by another process: wait for it to finish"
            ) from None
        return
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as err:
        if shared and err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield
            return
        raise RunFolderError(f"cannot lock {folder}: {err.strerror or err} ({path})") from None
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(_in_use_message(folder, fd)) from None
        if not shared:
            info = {
                "purpose": purpose,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join([Path(a).name for a in sys.argv[:1]] + sys.argv[1:])[:300],
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            if not shared:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)  # the record names the current holder only
    finally:
        os.close(fd)  # releases the flock


def _in_use_message(folder: Path, fd: int) -> str:
    assert fcntl is not None
    # An exclusive holder has written its record; readers (shared holders) write none.
    try:
        probe = os.open(folder / LOCK, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        probe = None
    readers_only = False
    if probe is not None:
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
            readers_only = True
        except BlockingIOError:
            pass
        finally:
            os.close(probe)
    if readers_only:
        who = "another propdsl process reading it (eval, verify or export)"
    else:
        who = _holder_text(fd)
    return f"{folder} is in use: {who}; wait for it to finish, or use another folder"


# -- reading a run -------------------------------------------------------------------------------
def is_run_config(config: Any) -> bool:
    """A config.json that propdsl wrote (not some other tool's config.json)."""
    return (
        isinstance(config, dict)
        and isinstance(config.get("model"), dict)
        and isinstance(config.get("spec_sha256"), str)
        and isinstance(config.get("versions"), dict)
    )


def check_model_config(config: Any, where: Path) -> dict[str, Any]:
    """The config's `model` entry, checked for the keys `Run.build_model` reads."""
    m = config.get("model") if isinstance(config, dict) else None
    if not isinstance(m, dict):
        raise RunFolderError(f"{where} has no 'model' object: is this a propdsl run folder?")

    def natural(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    shape = m.get("input_shape")
    problems = []
    if not isinstance(m.get("name"), str):
        problems.append("'name' is not a string")
    if not isinstance(shape, list) or not shape or not all(natural(d) for d in shape):
        problems.append("'input_shape' is not a list of positive whole numbers")
    if not natural(m.get("num_classes")):
        problems.append("'num_classes' is not a positive whole number")
    if not isinstance(m.get("kwargs", {}), dict):
        problems.append("'kwargs' is not an object")
    if m.get("user") is not None and not isinstance(m.get("user"), str):
        problems.append("'user' is not a string")
    if problems:
        raise RunFolderError(f"{where}: model entry is malformed: {'; '.join(problems)}")
    return m


def same_model_ref(a: str, b: str) -> bool:
    """Two references to the same factory: equal, or the same file name and attribute (a
    `file.py:f` reference given from another working folder)."""
    if a == b:
        return True
    (ma, _, fa), (mb, _, fb) = a.rpartition(":"), b.rpartition(":")
    files = ma.endswith(".py") and mb.endswith(".py")
    return files and fa == fb and Path(ma).name == Path(mb).name


@dataclass(frozen=True)
class Run:
    """A run folder opened for evaluation or verification."""

    path: Path
    config: dict[str, Any]
    spec_text: str

    @staticmethod
    def open(path: str | os.PathLike[str]) -> Run:
        """Open a run folder (reading only; a commit a crash cut short is completed first when
        no other process holds the folder)."""
        p = Path(path)
        try:
            is_dir = p.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            raise RunFolderError(f"no such run folder: {p}")
        if needs_recovery(p):
            with contextlib.suppress(RunFolderError):
                with locked(p, "recovery"):
                    recover(p)
        config = read_json(p / CONFIG)
        if not isinstance(config, dict):
            raise RunFolderError(f"{p / CONFIG} is not a JSON object")
        check_model_config(config, p / CONFIG)
        seed = config.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise RunFolderError(f"{p / CONFIG}: seed {seed!r} is not a whole number >= 0")
        spec_path = p / SPEC
        if not spec_path.exists():
            raise RunFolderError(f"{spec_path} is missing: is this a propdsl run folder?")
        try:
            text = spec_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise RunFolderError(f"cannot read {spec_path}: {err}") from None
        return Run(p, config, text)

    def build_model(self, model_ref: str | None = None) -> Any:
        """The network as trained (zoo or user model), weights not yet loaded.

        A run folder never runs code: a run of a user model is rebuilt only from the reference
        given here (`--model`), which must name the factory the run records.
        """
        from propdsl.models import ModelError, build_model, load_user_model

        m = check_model_config(self.config, self.path / CONFIG)
        recorded = m.get("user")
        shape, classes = tuple(m["input_shape"]), int(m["num_classes"])
        if m["name"] == "user" or recorded:
            if model_ref is None:
                if recorded:
                    raise RunFolderError(
                        f"{self.path} was trained with the user model '{recorded}'; a run folder "
                        f"never runs code, so name it yourself: --model {recorded}"
                    )
                what = f" ({m['class']})" if m.get("class") else ""
                raise RunFolderError(
                    f"{self.path} was trained with a model object from the API{what}: "
                    "pass the model reference (--model pkg.module:factory)"
                )
            if recorded and not same_model_ref(model_ref, recorded):
                raise RunFolderError(
                    f"--model {model_ref} is not the model {self.path} was trained with "
                    f"('{recorded}')"
                )
            return load_user_model(model_ref, input_shape=shape, num_classes=classes)
        if model_ref is not None:
            raise RunFolderError(
                f"{self.path} was trained with the zoo model '{m['name']}'; --model is only for "
                "runs of user models"
            )
        kwargs: dict[str, Any] = {
            k: tuple(v) if k == "activation" else v for k, v in m.get("kwargs", {}).items()
        }
        try:
            return build_model(m["name"], shape, classes, **kwargs)
        except (ModelError, TypeError, ValueError) as err:
            raise RunFolderError(
                f"{self.path / CONFIG}: its model cannot be built: {err}"
            ) from None

    def load_model(self, tag: str = "best", model_ref: str | None = None, device: Any = "cpu"):
        model = self.build_model(model_ref).to(device)
        load_weights(
            self.path, tag if (self.path / f"{tag}.safetensors").exists() else "last", model
        )
        model.eval()
        return model
