"""Data sources: a registry of named sources, each loaded into a split of tensors.

A spec names its data as `digits(split = "train")`; this module turns that into a `Dataset` of
float32 inputs and int64 labels. Inputs are given in the space the properties talk about (images
in [0, 1], tabular features min-max scaled to [0, 1]); normalisation for the network belongs to the
model (`propdsl.models.Normalize`), so that `ball(x, eps, inf) & box(0, 1)` means what it says.

Splits are deterministic functions of the seed, identical across calls, machines and library
versions: they come from NumPy's legacy `RandomState`, whose stream is frozen. They are stratified:
every class keeps (to within one sample) its share in every split.

Sources with an official test set (MNIST, Fashion-MNIST, CIFAR-10, SVHN and `tensors` files with
`x_test`) keep it as the test split and draw the validation split from their training files; the
others draw test and validation from all samples. `val_fraction` and `test_fraction` are fractions
of that pool (the training files where an official test set exists), so changing `val_fraction`
never changes the test split.

The torchvision sources are read by this module's own readers of the original file formats (IDX,
the CIFAR-10 pickles, SVHN's `.mat` files), in the folder layout torchvision uses. torchvision is
only imported to download missing files (`download=True`): its CIFAR-10 and SVHN classes refuse
any file whose md5 differs from the published one, which would also refuse a re-packed subset or a
test fixture, and reading the formats directly gives the same tensors torchvision would.
"""

from __future__ import annotations

import difflib
import gzip
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from propdsl.errors import PropdslError

__all__ = [
    "DataError",
    "DataSource",
    "Dataset",
    "SourceOptions",
    "RawData",
    "SPLITS",
    "available_datasets",
    "dataset_info",
    "load_dataset",
    "read_idx",
    "register_dataset",
    "split_indices",
]

SPLITS = ("train", "val", "test", "all")
DATA_ROOT_ENV = "PROPDSL_DATA"
DEFAULT_ROOT = "data"


class DataError(PropdslError, ValueError):
    """A data source cannot be loaded as asked (unknown name, missing files, bad split ...).

    `hint`, when set, says how to fix it; it is kept apart from the message so that a caller can
    render it as a diagnostic's hint under the spec position it attaches.
    """

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


@dataclass(frozen=True, eq=False)
class Dataset:
    """One split of a data source: `x` float32 [N, *input_shape], `y` int64 [N] in [0, K).

    >>> ds = load_dataset("digits", split="test", limit=5)
    >>> ds.x.shape, ds.y.dtype, ds.input_shape, ds.num_classes
    (torch.Size([5, 1, 8, 8]), torch.int64, (1, 8, 8), 10)
    """

    x: Tensor
    y: Tensor
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: tuple[str, ...] | None = None
    split: str = "all"

    def __post_init__(self) -> None:
        # Internal consistency of what a loader built; a failure here is a bug, not a user error.
        if self.x.dtype != torch.float32 or self.y.dtype != torch.int64:
            raise TypeError(
                f"Dataset wants float32 x and int64 y, got {self.x.dtype}, {self.y.dtype}"
            )
        if tuple(self.x.shape[1:]) != tuple(self.input_shape) or self.y.shape != self.x.shape[:1]:
            raise ValueError(
                f"Dataset shapes disagree: x {tuple(self.x.shape)}, y {tuple(self.y.shape)}, "
                f"input_shape {self.input_shape}"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError("Dataset class_names must have num_classes entries")

    def __len__(self) -> int:
        return int(self.y.shape[0])


# -- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceOptions:
    """What a source's loader gets: the data folder, whether it may download, a file path."""

    root: Path
    download: bool = False
    path: Path | None = None


@dataclass(frozen=True, eq=False)
class RawData:
    """What a source's loader returns, before splitting.

    `x` is [N, *input_shape] in any numeric dtype; inputs are `x / divisor` as float32 (255 for
    8-bit images, like torchvision's `ToTensor`). `x_test` / `y_test` hold an official test set.
    """

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    divisor: float = 1.0
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None


Loader = Callable[[SourceOptions], RawData]
InfoReader = Callable[[SourceOptions], tuple[tuple[int, ...], int]]


@dataclass(frozen=True)
class DataSource:
    """A registered source. `input_shape` / `num_classes` are known statically or read by `info`.

    `minmax_scale` makes `load_dataset` map each feature to [0, 1] with the train split's minimum
    and maximum (then clip the other splits into [0, 1]); for tabular data whose units differ.
    """

    name: str
    load: Loader
    description: str
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    info: InfoReader | None = None
    minmax_scale: bool = False
    uses_path: bool = False


_SOURCES: dict[str, DataSource] = {}


def register_dataset(source: DataSource, *, replace: bool = False) -> None:
    """Add a data source under `source.name` (refusing to shadow one unless `replace`).

    >>> src = DataSource("ones", lambda o: RawData(np.ones((4, 2)), np.array([0, 1, 0, 1])), "ones")
    >>> register_dataset(src, replace=True)
    >>> len(load_dataset("ones", split="all"))
    4
    """
    if source.name in _SOURCES and not replace:
        raise DataError(f"a data source named '{source.name}' is already registered")
    _register_for_specs(source, replace)
    _SOURCES[source.name] = source


def _register_for_specs(source: DataSource, replace: bool) -> None:
    """Make the source nameable in specs (`train f on name(...)`): an entry of the torch-free
    registry the checker reads. The built-in sources are declared there already (their entries
    name these module's constants, `propdsl.data:DIGITS`); another source takes the keywords
    `load_dataset` passes on, with `path` required when it reads a file, and its shape when it
    is known without loading."""
    from propdsl import registry

    declared = registry.lookup(registry.Kind.DATA, source.name)
    if declared is not None and declared.builtin and not replace:
        return
    keywords = registry.DATA_PATH if source.uses_path else registry.DATA_FILES
    shape = None
    if source.input_shape is not None and source.num_classes is not None:
        shape = (tuple(source.input_shape), int(source.num_classes))
    entry = registry.Entry(
        kind=registry.Kind.DATA,
        name=source.name,
        keywords=keywords,
        summary=source.description,
        builtin=False,
        shape=shape,
        required=registry.REQUIRES_PATH if source.uses_path else (),
    )
    try:
        registry.register(entry, replace=replace)
    except registry.RegistryError as err:
        raise DataError(str(err)) from None


def available_datasets() -> tuple[str, ...]:
    """The registered source names, in registration order.

    >>> available_datasets()[:2]
    ('digits', 'breast_cancer')
    """
    return tuple(_SOURCES)


def _source(name: str) -> DataSource:
    try:
        return _SOURCES[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_SOURCES), n=1)
        hint = f"did you mean '{close[0]}'?" if close else None
        raise DataError(
            f"unknown data source '{name}'; known sources: {', '.join(_SOURCES)}", hint=hint
        ) from None


def _options(
    source: DataSource, root: str | os.PathLike[str] | None, download: bool, path: str | None
) -> SourceOptions:
    if path is not None and not source.uses_path:
        raise DataError(f"'{source.name}' takes no path (path= is for 'tensors')")
    root_p = Path(root or os.environ.get(DATA_ROOT_ENV) or DEFAULT_ROOT).expanduser()
    path_p = None
    if path is not None:
        path_p = Path(path).expanduser()
        # An explicit root anchors relative paths (a caller passes the spec file's folder).
        if root is not None and not path_p.is_absolute():
            path_p = root_p / path_p
    return SourceOptions(root=root_p, download=bool(download), path=path_p)


def dataset_info(
    name: str, *, path: str | None = None, root: str | None = None
) -> tuple[tuple[int, ...], int]:
    """`(input_shape, num_classes)` of a source, without loading its tensors where possible.

    >>> dataset_info("cifar10")
    ((3, 32, 32), 10)
    """
    source = _source(name)
    if source.input_shape is not None and source.num_classes is not None:
        return source.input_shape, source.num_classes
    options = _options(source, root, False, path)
    if source.info is not None:
        return source.info(options)
    raw = source.load(options)
    return tuple(raw.x.shape[1:]), _num_classes(raw)


# -- splitting ----------------------------------------------------------------------------------

# Independent random streams per purpose, so that one split's draw never shifts another's.
_STREAM_TEST, _STREAM_VAL, _STREAM_OFFICIAL_TEST, _STREAM_ALL = 1, 2, 3, 4


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < 2**32:
        raise DataError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def _stratified_order(labels: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """A seeded permutation of `range(len(labels))` whose every prefix is stratified.

    Each class is shuffled and its i-th member gets the key (i + 1/2) / n_class; sorting by key
    interleaves the classes in proportion, so the first k indices hold every class's share of k
    to within one sample. Ties between classes are broken at random.
    """
    rng = np.random.RandomState([seed, stream])
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.lexsort((rng.random_sample(len(labels)), keys))


def _count(fraction: float, n: int, what: str) -> int:
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise DataError(f"{what} must be a number in [0, 1), got {fraction!r}")
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"{what} must be in [0, 1), got {fraction}")
    return int(math.floor(fraction * n + 0.5))


def split_indices(
    labels: np.ndarray | Tensor | Sequence[int],
    *,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
) -> dict[str, np.ndarray]:
    """Disjoint, stratified `train` / `val` / `test` index arrays covering `range(len(labels))`.

    The test part is drawn first and depends only on the labels, the seed and `test_fraction`.
    Each array is in a seeded class-interleaved order, so any prefix of it is stratified too.

    >>> parts = split_indices([0, 1] * 10, seed=0, val_fraction=0.1, test_fraction=0.2)
    >>> [len(parts[k]) for k in ("train", "val", "test")]
    [14, 2, 4]
    """
    y = np.asarray(labels)
    seed = _check_seed(seed)
    n = len(y)
    n_test = _count(test_fraction, n, "test_fraction")
    n_val = _count(val_fraction, n, "val_fraction")
    if n - n_test - n_val < 1:
        raise DataError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} leave no training "
            f"samples out of {n}"
        )
    order = _stratified_order(y, seed, _STREAM_TEST)
    test, rest = order[:n_test], order[n_test:]
    rest = rest[_stratified_order(y[rest], seed, _STREAM_VAL)]
    return {"train": rest[n_val:], "val": rest[:n_val], "test": test}


def _num_classes(raw: RawData) -> int:
    if raw.num_classes is not None:
        return raw.num_classes
    if raw.class_names is not None:
        return len(raw.class_names)
    tops = [int(raw.y.max()) if len(raw.y) else -1]
    if raw.y_test is not None and len(raw.y_test):
        tops.append(int(raw.y_test.max()))
    return max(tops) + 1


def load_dataset(
    name: str,
    *,
    split: str = "train",
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    path: str | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    limit: int | None = None,
) -> Dataset:
    """Load one split of a registered data source as float32 inputs and int64 labels.

    Args:
        name: a name from `available_datasets()`: `digits`, `breast_cancer`, `mnist`,
            `fashion_mnist`, `cifar10`, `svhn`, `tensors`, or one added by `register_dataset`.
        split: `train`, `val`, `test`, or `all` (every sample, official test set included).
        seed: fixes the split (an integer in [0, 2**32)); the same seed gives the same split on
            every machine.
        root: the data folder of the torchvision sources, laid out as torchvision lays it out
            (`MNIST/raw/`, `FashionMNIST/raw/`, `cifar-10-batches-py/`, SVHN's `.mat` files);
            defaults to `$PROPDSL_DATA`, else `./data`. When given, it also anchors a relative
            `path`.
        download: fetch missing torchvision files through torchvision (needs a network).
        path: the `.npz` file of `tensors`: arrays `x` [N, ...] and integer `y` [N], optionally
            `x_test`, `y_test` (an official test set) and `class_names`. Inputs are used as given.
        val_fraction: share of the pool (all samples, or the training files where an official
            test set exists) held out for validation.
        test_fraction: share of the pool held out for testing; unused with an official test set.
        limit: keep only the first `limit` samples of the split. Splits come in a seeded
            class-interleaved order, so this is a stratified random subset, the same on every
            call, and the splits themselves do not depend on `limit`.

    Raises:
        DataError: unknown name or split, missing or malformed files, bad fractions or seed.

    >>> train = load_dataset("digits", split="train", seed=0)
    >>> (len(train), float(train.x.min()), float(train.x.max()))
    (1258, 0.0, 1.0)
    """
    source = _source(name)
    if split not in SPLITS:
        close = difflib.get_close_matches(str(split), SPLITS, n=1)
        raise DataError(
            f"unknown split '{split}' for '{name}'; splits are {', '.join(SPLITS)}",
            hint=f"did you mean '{close[0]}'?" if close else None,
        )
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive integer, got {limit!r}")
    seed = _check_seed(seed)
    options = _options(source, root, download, path)
    raw = source.load(options)
    origin = f"{options.path}" if source.uses_path and options.path else f"data source '{name}'"
    for array, key in ((raw.x, "x"), (raw.x_test, "x_test")):
        if array is not None:
            _check_finite(array, f"{origin}: '{key}'")
    official_test = raw.x_test is not None
    num_classes = _num_classes(raw)

    parts = split_indices(
        raw.y,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=0.0 if official_test else test_fraction,
    )
    x_all: np.ndarray | _Concat = raw.x
    y_all = raw.y
    if official_test:
        assert raw.x_test is not None and raw.y_test is not None
        n_pool = len(raw.y)
        parts["test"] = n_pool + _stratified_order(raw.y_test, seed, _STREAM_OFFICIAL_TEST)
        # Concatenating lazily matters for CIFAR-sized data: only the chosen rows get copied.
        x_all = _Concat(raw.x, raw.x_test)
        y_all = np.concatenate([raw.y, raw.y_test])
    if split == "all":
        index = _stratified_order(np.asarray(y_all), seed, _STREAM_ALL)
    else:
        index = parts[split]
    if limit is not None:
        index = index[:limit]

    if source.minmax_scale:
        x = _minmax(x_all[index], x_all[parts["train"]])
    else:
        with np.errstate(over="ignore"):  # reported just below, with the file
            x = np.asarray(x_all[index], dtype=np.float32)
        if raw.divisor != 1.0:
            x /= np.float32(raw.divisor)
    # float64 values beyond float32's range become infinite in the conversion
    _check_finite(x, f"{origin}: the '{split}' split's inputs (as float32)")
    y = np.asarray(y_all[index], dtype=np.int64)
    return Dataset(
        x=torch.from_numpy(np.ascontiguousarray(x)),
        y=torch.from_numpy(np.ascontiguousarray(y)),
        name=name,
        input_shape=tuple(int(d) for d in raw.x.shape[1:]),
        num_classes=num_classes,
        class_names=raw.class_names,
        split=split,
    )


def _check_finite(array: np.ndarray, what: str) -> None:
    """Inputs must be finite: a NaN or infinite pixel makes every region around it, every
    bound and every counterexample NaN."""
    if array.dtype.kind not in "fc":
        return
    bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DataError(
            f"{what} has {bad} NaN or infinite values",
            hint="inputs must be finite numbers: fix or drop those samples",
        )


class _Concat:
    """Row indexing into two arrays as if they were concatenated, without copying them."""

    def __init__(self, a: np.ndarray, b: np.ndarray):
        self.a, self.b = a, b

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        in_a = index < len(self.a)
        out = np.empty((len(index), *self.a.shape[1:]), dtype=np.result_type(self.a, self.b))
        out[in_a] = self.a[index[in_a]]
        out[~in_a] = self.b[index[~in_a] - len(self.a)]
        return out


def _minmax(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    # Statistics of the train split only: val / test must not leak into the input space. Values
    # beyond the train range are clipped so that every input lies in box(0, 1). Computed in
    # float64 from the raw values, so the train split's extremes map to exactly 0 and 1.
    train = train.astype(np.float64)
    lo = train.min(axis=0)
    span = train.max(axis=0) - lo
    span[span == 0] = 1.0  # a constant feature maps to 0
    scaled = (x.astype(np.float64) - lo) / span
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


# -- scikit-learn sources -----------------------------------------------------------------------


def _sklearn_data(name: str) -> Path | None:
    """scikit-learn's bundled data file `name` (`sklearn/datasets/data/NAME`), found without
    importing scikit-learn (its import takes about a second, more than reading the file);
    None where the installed scikit-learn keeps it elsewhere."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "datasets" / "data" / name
        if path.is_file():
            return path
    return None


def _load_digits(options: SourceOptions) -> RawData:
    # scikit-learn's `load_digits`: 1797 rows of 64 pixels (0-16) and the digit, as a CSV.
    path = _sklearn_data("digits.csv.gz")
    if path is not None:
        with gzip.open(path, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",")
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        images, target = bunch.images, bunch.target.astype(np.int64)
    return RawData(
        x=images.reshape(-1, 1, 8, 8),
        y=target,
        divisor=16.0,
        num_classes=10,
        class_names=tuple(str(c) for c in range(10)),
    )


def _load_breast_cancer(options: SourceOptions) -> RawData:
    # scikit-learn's `load_breast_cancer`: a header line (569, 30, the class names), then 569
    # rows of 30 features and the class.
    path = _sklearn_data("breast_cancer.csv")
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            names = tuple(fh.readline().strip().split(",")[2:])
            table = np.loadtxt(fh, delimiter=",")
        data, target = table[:, :-1], table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        data, target = bunch.data, bunch.target.astype(np.int64)
        names = tuple(str(c) for c in bunch.target_names)
    return RawData(
        x=data,
        y=target,
        num_classes=2,
        class_names=names,
    )


# -- the torchvision sources, read from their original formats ----------------------------------

# IDX type codes (the "Pascal Vincent" SN3 format of MNIST); the data are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (MNIST's format), raw or gzipped (`.gz`), into a native-endian array.

    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "a-idx1-ubyte"
    >>> _ = f.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
    >>> read_idx(f).tolist()
    [7, 8, 9]
    """
    path = Path(path)
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise DataError(f"{path} is not an IDX file (bad header)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = math.prod(dims)
    if len(data) != header + count * dtype.itemsize:
        raise DataError(
            f"{path} is truncated or padded: header says {dims}, file has "
            f"{len(data) - header} data bytes"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _missing_files(name: str, wanted: Sequence[Path], where: str) -> DataError:
    listed = ", ".join(str(p) for p in wanted)
    return DataError(
        f"{name} files not found: {listed}",
        hint=f"put {where} under root (root= or ${DATA_ROOT_ENV}), or pass download=True when "
        "a network is available",
    )


def _torchvision_download(name: str, root: Path, cls_name: str, calls: Sequence[dict]) -> None:
    try:
        import torchvision.datasets as tv_datasets
    # torchvision fails with more than ImportError (e.g. RuntimeError when its compiled operators
    # do not match the installed torch), and any failure here means the same thing to the user.
    except Exception as exc:
        raise DataError(
            f"downloading {name} needs torchvision, which failed to import: {exc}",
            hint=f"install a torchvision matching torch, or put the {name} files under {root}",
        ) from exc
    root.mkdir(parents=True, exist_ok=True)
    try:
        for kwargs in calls:
            getattr(tv_datasets, cls_name)(str(root), download=True, **kwargs)
    except Exception as exc:
        raise DataError(f"downloading {name} into {root} failed: {exc}") from exc


def _find(candidates: Sequence[Path], filename: str) -> Path | None:
    for folder in candidates:
        for suffix in ("", ".gz"):
            if (folder / (filename + suffix)).is_file():
                return folder / (filename + suffix)
    return None


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _idx_source(name: str, folder: str, class_names: tuple[str, ...]) -> Loader:
    def load(options: SourceOptions) -> RawData:
        candidates = [options.root / folder / "raw", options.root]
        found = [_find(candidates, f) for f in _IDX_FILES]
        if None in found and options.download:
            _torchvision_download(name, options.root, folder, [{"train": True}, {"train": False}])
            found = [_find(candidates, f) for f in _IDX_FILES]
        if None in found:
            wanted = [
                candidates[0] / f for f, p in zip(_IDX_FILES, found, strict=True) if p is None
            ]
            raise _missing_files(name, wanted, f"{folder}/raw/ (IDX files, raw or .gz)")
        paths = [p for p in found if p is not None]
        x, y, x_test, y_test = (read_idx(p) for p in paths)
        for images, labels, what in ((x, y, "train"), (x_test, y_test, "t10k")):
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
                raise DataError(
                    f"{name} {what} files disagree: images {images.shape}, labels {labels.shape}"
                )
        return RawData(
            x=x[:, None],
            y=y.astype(np.int64),
            x_test=x_test[:, None],
            y_test=y_test.astype(np.int64),
            divisor=255.0,
            num_classes=len(class_names),
            class_names=class_names,
        )

    return load


_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches while refusing every global but NumPy's array rebuilders.

    A pickle can run arbitrary code on load; the batches only need dicts, lists, strings and
    arrays, so anything else in a file is refused rather than executed.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            # latin1: the original batches were pickled by Python 2 (torchvision reads them so).
            entry = _CifarUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}") from exc
    if not isinstance(entry, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch (expected a dict)")
    return entry


def _cifar_images(path: Path) -> tuple[np.ndarray, np.ndarray]:
    entry = _read_cifar_batch(path)
    if "data" not in entry or "labels" not in entry:
        raise DataError(f"{path} is not a CIFAR-10 batch (needs 'data' and 'labels')")
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry["labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DataError(f"{path}: data {data.shape} and labels {labels.shape} are not CIFAR-10's")
    # Rows hold the red, green and blue planes in turn, each 32 x 32 row-major: CHW already.
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(options: SourceOptions) -> RawData:
    folder = options.root / _CIFAR_FOLDER
    names = (*_CIFAR_TRAIN, "test_batch")
    if not all((folder / n).is_file() for n in names) and options.download:
        _torchvision_download("cifar10", options.root, "CIFAR10", [{"train": True}])
    missing = [folder / n for n in names if not (folder / n).is_file()]
    if missing:
        raise _missing_files("cifar10", missing, f"{_CIFAR_FOLDER}/ (the python batches)")
    train = [_cifar_images(folder / n) for n in _CIFAR_TRAIN]
    x_test, y_test = _cifar_images(folder / "test_batch")
    class_names: tuple[str, ...] = _CIFAR_CLASSES
    if (folder / "batches.meta").is_file():
        names_in_meta = _read_cifar_batch(folder / "batches.meta").get("label_names")
        if names_in_meta is not None and len(names_in_meta) == 10:
            class_names = tuple(str(n) for n in names_in_meta)
    return RawData(
        x=np.concatenate([x for x, _ in train]),
        y=np.concatenate([y for _, y in train]),
        x_test=x_test,
        y_test=y_test,
        divisor=255.0,
        num_classes=10,
        class_names=class_names,
    )


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read SVHN file {path}: {exc}") from exc
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} is not an SVHN file (needs arrays 'X' and 'y')")
    images, labels = mat["X"], mat["y"].astype(np.int64).reshape(-1)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3) or images.shape[3] != len(labels):
        raise DataError(f"{path}: X {images.shape} and y {labels.shape} are not SVHN's")
    # SVHN labels the digit 0 as 10; X is [row, col, channel, N].
    labels = np.where(labels == 10, 0, labels)
    return np.transpose(images, (3, 2, 0, 1)), labels


def _load_svhn(options: SourceOptions) -> RawData:
    candidates = [options.root, options.root / "SVHN", options.root / "svhn"]
    files = ("train_32x32.mat", "test_32x32.mat")
    found = [_find(candidates, f) for f in files]
    if None in found and options.download:
        calls = [{"split": "train"}, {"split": "test"}]
        _torchvision_download("svhn", options.root, "SVHN", calls)
        found = [_find(candidates, f) for f in files]
    if None in found:
        wanted = [options.root / f for f, p in zip(files, found, strict=True) if p is None]
        raise _missing_files("svhn", wanted, "train_32x32.mat and test_32x32.mat")
    (x, y), (x_test, y_test) = (_read_svhn(p) for p in found if p is not None)
    return RawData(
        x=x,
        y=y,
        x_test=x_test,
        y_test=y_test,
        divisor=255.0,
        num_classes=10,
        class_names=tuple(str(c) for c in range(10)),
    )


# -- user tensors --------------------------------------------------------------------------------


def _npz_path(options: SourceOptions) -> Path:
    if options.path is None:
        raise DataError(
            "'tensors' needs a file: tensors(path = \"data.npz\")",
            hint="the .npz holds arrays x [N, ...] and y [N], optionally x_test and y_test",
        )
    if not options.path.is_file():
        raise DataError(f"tensors file not found: {options.path}")
    return options.path


def _open_npz(path: Path) -> Any:
    try:
        # No pickles: an .npz of plain arrays is all this source reads, and loading one is safe.
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as an .npz file: {exc}") from exc


def _npy_header(archive: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) of array `key` of an .npz from its .npy header, checked against the
    member's size: a header that claims more (or less) data than the file holds is refused."""
    try:
        info = archive.getinfo(f"{key}.npy")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
            offset = member.tell()
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"cannot read array '{key}' of {path}: {exc}") from exc
    if dtype.hasobject:
        raise DataError(
            f"{path}: '{key}' holds Python objects (dtype {dtype}), not numbers; "
            "save numeric arrays"
        )
    expected = offset + math.prod(shape) * dtype.itemsize
    if info.file_size != expected:
        raise DataError(
            f"{path}: the header of '{key}' claims shape {tuple(shape)} of {dtype} "
            f"({expected - offset} bytes), but the file holds {info.file_size - offset} bytes: "
            "the file is truncated or corrupt"
        )
    return tuple(shape), dtype


def _check_npz(path: Path) -> None:
    """Every member of an .npz is an .npy whose header matches its size (no object arrays)."""
    try:
        with zipfile.ZipFile(path) as archive:
            keys = [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
            for key in keys:
                _npy_header(archive, key, path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as an .npz file: {exc}") from exc


def _array(npz: Any, key: str, path: Path) -> np.ndarray:
    try:
        return npz[key]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"cannot read array '{key}' of {path}: {exc}") from exc


def _labels(array: np.ndarray, path: Path, key: str) -> np.ndarray:
    if array.ndim != 1:
        raise DataError(f"{path}: '{key}' must be one label per sample, got shape {array.shape}")
    if array.dtype.kind == "f" and np.all(np.mod(array, 1) == 0):
        array = array.astype(np.int64)
    if array.dtype.kind not in "iub":
        raise DataError(f"{path}: '{key}' must hold integer labels, got {array.dtype}")
    if len(array) and array.min() < 0:
        raise DataError(f"{path}: '{key}' has negative labels")
    return array.astype(np.int64)


def _load_tensors(options: SourceOptions) -> RawData:
    path = _npz_path(options)
    _check_npz(path)
    with _open_npz(path) as npz:
        keys = set(npz.files)
        for needed in ("x", "y"):
            if needed not in keys:
                raise DataError(
                    f"{path} has no array '{needed}' (it has: {', '.join(sorted(keys))})"
                )
        if ("x_test" in keys) != ("y_test" in keys):
            raise DataError(f"{path}: 'x_test' and 'y_test' come together")
        x, y = _array(npz, "x", path), _labels(_array(npz, "y", path), path, "y")
        x_test = _array(npz, "x_test", path) if "x_test" in keys else None
        y_test = _labels(_array(npz, "y_test", path), path, "y_test") if "y_test" in keys else None
        class_names = (
            tuple(str(c) for c in _array(npz, "class_names", path))
            if "class_names" in keys
            else None
        )
    for inputs, labels, what in ((x, y, "x"), (x_test, y_test, "x_test")):
        if inputs is None or labels is None:
            continue
        if inputs.ndim < 2 or len(inputs) != len(labels):
            raise DataError(
                f"{path}: '{what}' {inputs.shape} must be [N, ...] with one row per label "
                f"({len(labels)} labels)"
            )
        if inputs.dtype.kind not in "fiub":
            raise DataError(f"{path}: '{what}' must be numeric, got {inputs.dtype}")
    if x_test is not None and x_test.shape[1:] != x.shape[1:]:
        raise DataError(
            f"{path}: 'x_test' samples {x_test.shape[1:]} differ from 'x' {x.shape[1:]}"
        )
    raw = RawData(x=x, y=y, x_test=x_test, y_test=y_test, class_names=class_names)
    top = max((int(lab.max()) for lab in (y, y_test) if lab is not None and len(lab)), default=-1)
    if class_names is not None and top >= len(class_names):
        raise DataError(f"{path}: label {top} but only {len(class_names)} class_names")
    return raw


def _tensors_info(options: SourceOptions) -> tuple[tuple[int, ...], int]:
    path = _npz_path(options)
    # The input shape comes from the .npy header inside the archive; only labels are read.
    _check_npz(path)
    try:
        with zipfile.ZipFile(path) as archive:
            shape, _ = _npy_header(archive, "x", path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read array 'x' of {path}: {exc}") from exc
    if len(shape) < 2:
        raise DataError(f"{path}: 'x' {shape} must be [N, ...]")
    with _open_npz(path) as npz:
        keys = set(npz.files)
        if "class_names" in keys:
            return tuple(shape[1:]), len(_array(npz, "class_names", path))
        if "y" not in keys:
            raise DataError(f"{path} has no array 'y'")
        labels = [_labels(_array(npz, k, path), path, k) for k in ("y", "y_test") if k in keys]
    return tuple(shape[1:]), max((int(lab.max()) for lab in labels if len(lab)), default=-1) + 1


# -- the built-in sources ------------------------------------------------------------------------

_DIGIT_NAMES = tuple(str(c) for c in range(10))
_FASHION_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# The built-in sources, by the names the registry's entries give as their targets.
DIGITS = DataSource(
    "digits",
    _load_digits,
    "scikit-learn's 8x8 digits (1797 images, bundled: works offline), pixels / 16",
    (1, 8, 8),
    10,
)
BREAST_CANCER = DataSource(
    "breast_cancer",
    _load_breast_cancer,
    "scikit-learn's Wisconsin breast cancer (569 x 30 features), min-max scaled on train",
    (30,),
    2,
    minmax_scale=True,
)
MNIST = DataSource(
    "mnist",
    _idx_source("mnist", "MNIST", _DIGIT_NAMES),
    "MNIST from root/MNIST/raw (IDX files), pixels / 255",
    (1, 28, 28),
    10,
)
FASHION_MNIST = DataSource(
    "fashion_mnist",
    _idx_source("fashion_mnist", "FashionMNIST", _FASHION_NAMES),
    "Fashion-MNIST from root/FashionMNIST/raw (IDX files), pixels / 255",
    (1, 28, 28),
    10,
)
CIFAR10 = DataSource(
    "cifar10",
    _load_cifar10,
    "CIFAR-10 from root/cifar-10-batches-py (python batches), pixels / 255",
    (3, 32, 32),
    10,
)
SVHN = DataSource(
    "svhn",
    _load_svhn,
    "SVHN from root/{train,test}_32x32.mat, pixels / 255, digit 0 labelled 0",
    (3, 32, 32),
    10,
)
TENSORS = DataSource(
    "tensors",
    _load_tensors,
    "arrays x, y (optionally x_test, y_test, class_names) from an .npz file, used as given",
    info=_tensors_info,
    uses_path=True,
)
for _source_def in (DIGITS, BREAST_CANCER, MNIST, FASHION_MNIST, CIFAR10, SVHN, TENSORS):
    register_dataset(_source_def)
del _source_def
