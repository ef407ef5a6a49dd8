"""Shared test settings: few torch threads (2-core machines), deterministic seeds."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _torch_threads_and_seed():
    """Keep torch on one thread and seed it, when a test imports torch at all."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
        torch.manual_seed(0)
    yield
