"""benchmarks/bench_train.py's MNIST-sized rows: the data it writes are MNIST's files, read by
propdsl's own `mnist` source, and the 28 x 28 spec it derives trains the same work as the
hand-written loop (the benchmark's own check of equal losses, on a few hundred images).

The timings themselves are the benchmark's (docs/training.md, section 11), not a test's."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from propdsl.data import load_dataset, read_idx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    torch.set_num_threads(1)
    return importlib.import_module("bench_train")


def test_the_mnist_sized_data_are_digits_in_mnist_frames(bench, tmp_path):
    root = bench.write_mnist_sized(tmp_path / "data", 300, 40, seed=3)
    raw = root / "MNIST" / "raw"
    images = read_idx(raw / "train-images-idx3-ubyte")
    labels = read_idx(raw / "train-labels-idx1-ubyte")
    assert images.shape == (300, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (300,) and set(labels.tolist()) <= set(range(10))
    assert read_idx(raw / "t10k-images-idx3-ubyte").shape == (40, 28, 28)
    # Each frame is a digit of its label scaled to 20 x 20 and placed whole in the frame: some
    # 20 x 20 window of it is, to the byte's rounding, some digit of that label so scaled.
    digits = load_digits()
    scaled = (
        F.interpolate(
            torch.from_numpy(digits.images / 16.0)[:, None], size=(20, 20), mode="bilinear"
        )[:, 0].numpy()
        * 255
    )
    for image, label in zip(images, labels, strict=True):
        windows = np.lib.stride_tricks.sliding_window_view(image, (20, 20)).reshape(-1, 400)
        ink_outside = image.astype(np.int64).sum() - windows.astype(np.int64).sum(1)
        candidates = scaled[digits.target == label].reshape(-1, 400)
        whole = windows[ink_outside == 0].astype(np.float64)
        error = np.abs(whole[:, None, :] - candidates[None, :, :]).max(-1)
        assert error.min() <= 0.5 + 1e-6
    train = load_dataset("mnist", split="train", root=root)
    assert train.x.shape == (270, 1, 28, 28) and float(train.x.max()) <= 1.0


def test_the_mnist_sized_rows_train_the_same_work_as_the_hand_loop(bench, tmp_path):
    root = bench.write_mnist_sized(tmp_path / "data", 320, 10)
    data = tuple(
        (ds.x, ds.y) for ds in (load_dataset("mnist", split=s, root=root) for s in ("train", "val"))
    )
    spec = bench.spec_for("mlp28", "standard.prop", root, tmp_path)
    assert "Tensor[1, 28, 28]" in spec.read_text()
    # `_compare` raises when an epoch's mean loss differs from the hand-written loop's.
    rows = bench._compare("standard (CE)", spec, 0.0, 2, 1, data, "cpu", "mlp28")
    assert [row["baseline"].split(",")[0] for row in rows] == ["hand-written loop"] * 3
    assert all(row["ms"] > 0 and row["baseline_ms"] > 0 for row in rows)
