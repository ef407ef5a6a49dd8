"""Data sources: splits, scaling, the original file formats of the torchvision sets, errors.

The torchvision sets are written here, tiny, in their original formats (IDX, CIFAR-10 pickles,
SVHN .mat files), in the folder layout torchvision uses; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_breast_cancer, load_digits

from propdsl.data import (
    DataError,
    Dataset,
    available_datasets,
    dataset_info,
    load_dataset,
    read_idx,
    split_indices,
)

# -- helpers that write the original formats ----------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_mnist(root: Path, folder: str, *, n_train: int = 30, n_test: int = 10, gz: bool = False):
    rng = np.random.default_rng(1)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    for name, array in arrays.items():
        write_idx(raw / name, array, gz=gz)
    return arrays


def write_cifar(root: Path, *, per_batch: int = 4, n_test: int = 10):
    rng = np.random.default_rng(2)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", n_test)]:
        entry = {
            "batch_label": name,
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": [int(v) for v in rng.integers(0, 10, n)],
            "filenames": [f"img_{i}.png" for i in range(n)],
        }
        # Protocol 2, as the original Python 2 batches.
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        batches[name] = entry
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def write_svhn(root: Path, *, n_train: int = 20, n_test: int = 10):
    from scipy.io import savemat

    rng = np.random.default_rng(3)
    mats = {}
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        # SVHN stores [row, col, channel, N] and labels 1..10, where 10 is the digit 0.
        mat = {
            "X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
            "y": (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8),
        }
        savemat(root / name, mat)
        mats[name] = mat
    return mats


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x}


# -- digits and splitting -----------------------------------------------------------------------


def test_digits_splits_shapes_ranges_and_sizes():
    parts = {s: load_dataset("digits", split=s) for s in ("train", "val", "test", "all")}
    for split, ds in parts.items():
        assert isinstance(ds, Dataset) and ds.split == split and ds.name == "digits"
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 8, 8) and ds.input_shape == (1, 8, 8)
        assert ds.num_classes == 10 and ds.class_names == tuple("0123456789")
        assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    n = 1797
    assert len(parts["all"]) == n
    assert len(parts["test"]) == round(0.2 * n) and len(parts["val"]) == round(0.1 * n)
    assert len(parts["train"]) + len(parts["val"]) + len(parts["test"]) == n


def test_split_indices_are_disjoint_cover_and_stratified():
    y = load_digits().target
    parts = split_indices(y, seed=3, val_fraction=0.1, test_fraction=0.2)
    joined = np.concatenate([parts["train"], parts["val"], parts["test"]])
    assert len(joined) == len(y) and set(joined.tolist()) == set(range(len(y)))
    share = np.bincount(y) / len(y)
    for idx in parts.values():
        counts = np.bincount(y[idx], minlength=10)
        assert np.all(np.abs(counts - share * len(idx)) <= 1.0)
        # Every prefix is stratified too, which is what `limit` relies on.
        head = np.bincount(y[idx[:50]], minlength=10)
        assert np.all(np.abs(head - share * 50) <= 1.0)


def test_loaded_splits_are_the_indexed_rows():
    bunch = load_digits()
    parts = split_indices(bunch.target, seed=0)
    for split in ("train", "val", "test"):
        ds = load_dataset("digits", split=split, seed=0)
        expect = bunch.images[parts[split]].reshape(-1, 1, 8, 8) / 16.0
        np.testing.assert_allclose(ds.x.numpy(), expect, rtol=0, atol=1e-7)
        assert ds.y.tolist() == bunch.target[parts[split]].tolist()


def test_splits_are_deterministic_and_depend_on_the_seed():
    a = load_dataset("digits", split="train", seed=0)
    b = load_dataset("digits", split="train", seed=0)
    c = load_dataset("digits", split="train", seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    # The stream is frozen: these indices must be the same on every machine and version.
    parts = split_indices(load_digits().target, seed=0)
    assert parts["test"][:8].tolist() == [1089, 541, 1117, 1778, 598, 1696, 1552, 1317]
    assert parts["val"][:4].tolist() == [1358, 575, 1500, 322]


def test_test_split_ignores_val_fraction_and_limit_is_a_prefix():
    a = load_dataset("digits", split="test", val_fraction=0.1)
    b = load_dataset("digits", split="test", val_fraction=0.3)
    assert torch.equal(a.x, b.x)
    small = load_dataset("digits", split="train", limit=25)
    full = load_dataset("digits", split="train")
    assert len(small) == 25 and torch.equal(small.x, full.x[:25])
    assert len(load_dataset("digits", split="val", limit=10_000)) == len(
        load_dataset("digits", split="val")
    )


def test_zero_val_fraction_gives_an_empty_validation_split():
    ds = load_dataset("digits", split="val", val_fraction=0.0)
    assert len(ds) == 0 and ds.x.shape == (0, 1, 8, 8)


# -- breast cancer ------------------------------------------------------------------------------


def test_breast_cancer_is_scaled_with_train_statistics_only():
    bunch = load_breast_cancer()
    parts = split_indices(bunch.target, seed=0)
    train_raw = bunch.data[parts["train"]]
    lo, span = train_raw.min(axis=0), train_raw.max(axis=0) - train_raw.min(axis=0)
    train = load_dataset("breast_cancer", split="train")
    test = load_dataset("breast_cancer", split="test")
    assert train.input_shape == (30,) and train.num_classes == 2
    assert train.class_names == ("malignant", "benign")
    np.testing.assert_allclose(train.x.min(0).values.numpy(), 0.0)
    np.testing.assert_allclose(train.x.max(0).values.numpy(), 1.0)
    expect = np.clip((bunch.data[parts["test"]] - lo) / span, 0.0, 1.0)
    np.testing.assert_allclose(test.x.numpy(), expect, atol=1e-6)
    # Test statistics leak nowhere: scaling the test split by its own range gives other values.
    own = bunch.data[parts["test"]]
    assert not np.allclose((own - own.min(0)) / (own.max(0) - own.min(0)), test.x.numpy())


# -- torchvision sources, from their original formats --------------------------------------------


def test_mnist_reads_raw_idx_files(tmp_path):
    arrays = write_mnist(tmp_path, "MNIST")
    train = load_dataset("mnist", split="train", root=str(tmp_path), val_fraction=0.2)
    val = load_dataset("mnist", split="val", root=str(tmp_path), val_fraction=0.2)
    test = load_dataset("mnist", split="test", root=str(tmp_path))
    assert (len(train), len(val), len(test)) == (24, 6, 10)
    assert train.x.shape[1:] == (1, 28, 28) and train.num_classes == 10
    assert 0.0 <= float(train.x.min()) and float(train.x.max()) <= 1.0
    images = arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    assert rows(train.x) | rows(val.x) == rows(torch.from_numpy(images[:, None]))
    assert not rows(train.x) & rows(val.x)
    # The test split is the official test file.
    t10k = arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255
    assert rows(test.x) == rows(torch.from_numpy(t10k[:, None]))
    assert sorted(test.y.tolist()) == sorted(arrays["t10k-labels-idx1-ubyte"].tolist())
    assert len(load_dataset("mnist", split="all", root=str(tmp_path))) == 40


def test_mnist_matches_torchvision_on_the_same_files(tmp_path):
    try:
        import torchvision.datasets as datasets
    # torchvision can fail with RuntimeError too (compiled operators not matching torch).
    except Exception as exc:
        pytest.skip(f"torchvision does not import here: {exc}")
    write_mnist(tmp_path, "MNIST")
    ours = load_dataset("mnist", split="test", root=str(tmp_path))
    theirs = datasets.MNIST(str(tmp_path), train=False)
    expect = {
        (theirs.data[i].float().div(255)[None].numpy().tobytes(), int(theirs.targets[i]))
        for i in range(len(theirs))
    }
    got = {(x.numpy().tobytes(), int(y)) for x, y in zip(ours.x, ours.y, strict=True)}
    assert got == expect


def test_fashion_mnist_reads_gzipped_idx_files(tmp_path):
    arrays = write_mnist(tmp_path, "FashionMNIST", gz=True)
    test = load_dataset("fashion_mnist", split="test", root=str(tmp_path))
    assert test.class_names is not None and test.class_names[0] == "T-shirt/top"
    t10k = arrays["t10k-images-idx3-ubyte"].astype(np.float32) / 255
    assert rows(test.x) == rows(torch.from_numpy(t10k[:, None]))


def test_read_idx_rejects_malformed_files(tmp_path):
    bad = tmp_path / "bad-idx1-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 5, 1, 2]))
    with pytest.raises(DataError, match="truncated"):
        read_idx(short)


def test_cifar10_reads_the_python_batches(tmp_path):
    batches = write_cifar(tmp_path)
    kw = {"root": str(tmp_path), "val_fraction": 0.25}
    train, val = (
        load_dataset("cifar10", split="train", **kw),
        load_dataset("cifar10", **kw, split="val"),
    )
    test = load_dataset("cifar10", split="test", **kw)
    assert (len(train), len(val), len(test)) == (15, 5, 10)
    assert test.input_shape == (3, 32, 32) and test.class_names == tuple(
        f"class{i}" for i in range(10)
    )
    # Rows are the red, green, blue planes, each 32 x 32 row-major.
    entry = batches["test_batch"]
    by_label = {}
    for x, y in zip(test.x, test.y, strict=True):
        by_label.setdefault(x.numpy().tobytes(), int(y))
    for row, label in zip(entry["data"], entry["labels"], strict=True):
        image = (row.reshape(3, 32, 32).astype(np.float32) / 255).tobytes()
        assert by_label[image] == label
    assert rows(test.x) == {
        (r.reshape(3, 32, 32).astype(np.float32) / 255).tobytes() for r in entry["data"]
    }


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path):
    write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match="refusing to load builtins.print"):
        load_dataset("cifar10", split="test", root=str(tmp_path))


def test_svhn_reads_mat_files(tmp_path):
    mats = write_svhn(tmp_path)
    train = load_dataset("svhn", split="train", root=str(tmp_path), val_fraction=0.0)
    test = load_dataset("svhn", split="test", root=str(tmp_path))
    assert (len(train), len(test)) == (20, 10) and train.input_shape == (3, 32, 32)
    assert set(train.y.tolist()) == set(range(10))  # label 10 became 0
    mat = mats["test_32x32.mat"]
    pairs = {(x.numpy().tobytes(), int(y)) for x, y in zip(test.x, test.y, strict=True)}
    for i in range(10):
        image = mat["X"][..., i].transpose(2, 0, 1).astype(np.float32) / 255
        assert (image.tobytes(), int(mat["y"][i, 0]) % 10) in pairs


def test_missing_torchvision_files_explain_what_is_expected(tmp_path):
    with pytest.raises(DataError, match="MNIST/raw/train-images-idx3-ubyte") as info:
        load_dataset("mnist", root=str(tmp_path))
    assert info.value.hint is not None and "download=True" in info.value.hint
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(DataError, match="train_32x32.mat"):
        load_dataset("svhn", root=str(tmp_path))


def test_download_passes_through_to_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeMNIST:
        def __init__(self, root, *, train, download):
            calls.append((root, train, download))
            if not train:
                write_mnist(Path(root), "MNIST")

    fake = types.ModuleType("torchvision")
    fake.datasets = types.ModuleType("torchvision.datasets")
    fake.datasets.MNIST = FakeMNIST
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake.datasets)
    ds = load_dataset("mnist", split="test", root=str(tmp_path), download=True)
    assert len(ds) == 10
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]


def test_download_without_a_working_torchvision_is_a_data_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DataError, match="needs torchvision, which failed to import"):
        load_dataset("fashion_mnist", root=str(tmp_path), download=True)


def test_importing_propdsl_data_does_not_import_torchvision():
    code = "import sys, propdsl.data; assert 'torchvision' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- user tensors -------------------------------------------------------------------------------


def test_tensors_npz_inputs_are_used_as_given(tmp_path):
    x = np.linspace(-3, 3, 40 * 5, dtype=np.float64).reshape(40, 5)
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_dataset("tensors", path=str(tmp_path / "d.npz"), split="all")
    assert ds.input_shape == (5,) and ds.num_classes == 4 and ds.class_names is None
    assert rows(ds.x) == rows(torch.from_numpy(x.astype(np.float32)))
    parts = [
        load_dataset("tensors", path="d.npz", root=str(tmp_path), split=s)
        for s in ("train", "val", "test")
    ]
    assert [len(p) for p in parts] == [28, 4, 8]
    assert dataset_info("tensors", path=str(tmp_path / "d.npz")) == ((5,), 4)


def test_tensors_npz_with_an_official_test_set_and_class_names(tmp_path):
    path = tmp_path / "d.npz"
    np.savez_compressed(
        path,
        x=np.zeros((10, 2, 3), np.float32),
        y=np.array([0, 1] * 5, dtype=np.float32),  # integral floats are accepted
        x_test=np.ones((4, 2, 3), np.float32),
        y_test=np.array([0, 1, 2, 0]),
        class_names=np.array(["a", "b", "c"]),
    )
    test = load_dataset("tensors", path=str(path), split="test")
    assert len(test) == 4 and bool((test.x == 1).all())
    assert test.num_classes == 3 and test.class_names == ("a", "b", "c")
    assert dataset_info("tensors", path=str(path)) == ((2, 3), 3)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((3, 2))}, "no array 'y'"),
        ({"x": np.zeros((3, 2)), "y": np.array([0.5, 1, 0])}, "integer labels"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, 1])}, "one row per label"),
        ({"x": np.zeros((3, 2)), "y": np.array([0, -1, 0])}, "negative"),
        ({"x": np.zeros((3, 2)), "y": np.zeros(3, int), "x_test": np.zeros((1, 2))}, "together"),
    ],
)
def test_tensors_npz_errors(tmp_path, arrays, message):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset("tensors", path=str(tmp_path / "d.npz"))


def test_tensors_needs_an_existing_path(tmp_path):
    with pytest.raises(DataError, match="needs a file"):
        load_dataset("tensors")
    with pytest.raises(DataError, match="not found"):
        load_dataset("tensors", path=str(tmp_path / "nope.npz"))


# -- registry and errors ------------------------------------------------------------------------


def test_registry_and_static_info(tmp_path):
    assert set(available_datasets()) >= {
        "digits",
        "breast_cancer",
        "mnist",
        "fashion_mnist",
        "cifar10",
        "svhn",
        "tensors",
    }
    # Static shapes: no files needed (tmp_path is empty).
    assert dataset_info("digits") == ((1, 8, 8), 10)
    assert dataset_info("breast_cancer") == ((30,), 2)
    assert dataset_info("mnist", root=str(tmp_path)) == ((1, 28, 28), 10)
    assert dataset_info("fashion_mnist") == ((1, 28, 28), 10)
    assert dataset_info("cifar10") == ((3, 32, 32), 10)
    assert dataset_info("svhn") == ((3, 32, 32), 10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "digit"}, "unknown data source 'digit'"),
        ({"name": "digits", "split": "training"}, "unknown split 'training'"),
        ({"name": "digits", "val_fraction": 1.5}, "val_fraction must be in"),
        ({"name": "digits", "val_fraction": 0.5, "test_fraction": 0.5}, "leave no training"),
        ({"name": "digits", "seed": -1}, "seed must be"),
        ({"name": "digits", "limit": 0}, "limit must be"),
        ({"name": "digits", "path": "x.npz"}, "takes no path"),
    ],
)
def test_errors_are_data_errors_with_clear_messages(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(DataError, match=message) as info:
        load_dataset(name, **kwargs)
    assert isinstance(info.value, ValueError)


def test_unknown_names_suggest_the_closest():
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist")
    assert info.value.hint == "did you mean 'fashion_mnist'?"
    assert "cifar10" in info.value.message


# -- non-finite and malformed files --------------------------------------------------------------


def _npz_members(path: Path) -> dict[str, bytes]:
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def _write_members(path: Path, members: dict[str, bytes]) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


@pytest.mark.parametrize("key", ["x", "x_test"])
def test_non_finite_inputs_are_data_errors_with_the_file_and_count(tmp_path, key):
    """Before, NaN / inf pixels loaded silently and verification reported NaN counterexamples."""
    arrays = {
        "x": np.random.rand(6, 2),
        "y": np.array([0, 1] * 3),
        "x_test": np.random.rand(4, 2),
        "y_test": np.array([0, 1] * 2),
    }
    arrays[key][1, 0] = np.nan
    arrays[key][2, 1] = -np.inf
    arrays[key][3, 1] = np.inf
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=rf"d\.npz: '{key}' has 3 NaN or infinite values"):
        load_dataset("tensors", path=str(path), split="train")


def test_values_beyond_float32_are_data_errors(tmp_path):
    path = tmp_path / "big.npz"
    np.savez(path, x=np.array([[1e300, 0.0], [0.0, 0.0]]), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"'all' split's inputs \(as float32\) has 1 NaN"):
        load_dataset("tensors", path=str(path), split="all")


def test_a_registered_source_with_nan_names_the_source():
    from propdsl.data import DataSource, RawData, register_dataset

    x = np.ones((4, 3))
    x[0, 0] = np.nan
    src = DataSource("with_nan", lambda o: RawData(x, np.array([0, 1, 0, 1])), "nan")
    register_dataset(src, replace=True)
    with pytest.raises(DataError, match=r"data source 'with_nan': 'x' has 1 NaN"):
        load_dataset("with_nan", split="all")


def _malformed(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.random.rand(10, 3).astype(np.float32), y=np.arange(10) % 2)
    members = _npz_members(good)
    files = {}
    files["object"] = tmp_path / "object.npz"
    np.savez(files["object"], x=np.array([[1, "a"], [2, 3]], dtype=object), y=np.array([0, 1]))
    x_npy = members["x.npy"]
    # a header that claims more rows than the data hold, and one that claims fewer
    files["larger"] = tmp_path / "larger.npz"
    _write_members(files["larger"], {**members, "x.npy": x_npy.replace(b"(10, 3)", b"(99, 3)")})
    files["smaller"] = tmp_path / "smaller.npz"
    _write_members(files["smaller"], {**members, "x.npy": x_npy.replace(b"(10, 3)", b"(9, 3) ")})
    files["member"] = tmp_path / "member.npz"  # a truncated array inside an intact archive
    _write_members(files["member"], {**members, "x.npy": x_npy[:-40]})
    files["archive"] = tmp_path / "archive.npz"  # the archive itself cut in half
    raw = good.read_bytes()
    files["archive"].write_bytes(raw[: len(raw) // 2])
    return files


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("object", r"'x' holds Python objects \(dtype object\)"),
        ("larger", r"claims shape \(99, 3\) of float32 \(1188 bytes\), but the file holds 120"),
        ("smaller", r"claims shape \(9, 3\) of float32 \(108 bytes\), but the file holds 120"),
        ("member", r"claims shape \(10, 3\) of float32 \(120 bytes\), but the file holds 80"),
        ("archive", "cannot read .* as an .npz file"),
    ],
)
def test_malformed_npz_files_are_data_errors(tmp_path, case, message):
    """Before, an object array or a header larger than its data raised a plain ValueError
    (exit 70 from the CLI) and a header smaller than its data loaded part of the file."""
    path = str(_malformed(tmp_path)[case])
    with pytest.raises(DataError, match=message):
        load_dataset("tensors", path=path, split="all")
    with pytest.raises(DataError, match=message):
        dataset_info("tensors", path=path)


def test_malformed_data_exits_1_from_the_cli_not_70(tmp_path):
    from typer.testing import CliRunner

    from propdsl import cli

    files = _malformed(tmp_path)
    np.savez(tmp_path / "nan.npz", x=np.array([[np.nan, 0.0], [0.0, 1.0]]), y=np.array([0, 1]))
    files["nan"] = tmp_path / "nan.npz"
    for case, path in files.items():
        spec = tmp_path / f"{case}.prop"
        spec.write_text(
            "network f : Tensor[3] -> Tensor[2]\n"
            f'train f on tensors(path = "{path.name}") {{\n'
            "  epochs = 1\n  loss = cross_entropy\n}\n",
            encoding="utf-8",
        )
        result = CliRunner().invoke(cli.app, ["train", str(spec), "--out", str(tmp_path / case)])
        assert result.exit_code in (1, 2), (case, result.output)
        assert "internal error" not in result.output and path.name in result.output, case


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_scikit_learn_sources_read_its_files_as_its_loaders_do(name, monkeypatch):
    """digits and breast_cancer are read from scikit-learn's bundled files without importing
    it; the arrays are its loaders' to the bit (and the loaders themselves where a file is not
    where it is expected)."""
    from sklearn.datasets import load_breast_cancer, load_digits

    import propdsl.data as D

    bunch = load_digits() if name == "digits" else load_breast_cancer()
    loader = D._load_digits if name == "digits" else D._load_breast_cancer
    assert D._sklearn_data("digits.csv.gz" if name == "digits" else "breast_cancer.csv")
    read = loader(None)
    monkeypatch.setattr(D, "_sklearn_data", lambda file: None)
    fallback = loader(None)
    expected = bunch.images.reshape(-1, 1, 8, 8) if name == "digits" else bunch.data
    for raw in (read, fallback):
        assert raw.x.dtype == expected.dtype and np.array_equal(raw.x, expected)
        assert raw.y.dtype == np.int64 and np.array_equal(raw.y, bunch.target)
    names = tuple(str(c) for c in bunch.target_names)
    assert read.class_names == fallback.class_names == names
