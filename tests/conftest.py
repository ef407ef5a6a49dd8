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


@pytest.fixture
def clean_registries():
    """Restore every registry of names (the spec registry and the backends') after a test that
    registers logics, data sources or models."""
    from propdsl import data, models
    from propdsl import registry as R
    from propdsl.logics import base

    saved = (
        {k: dict(v) for k, v in R._ENTRIES.items()},
        {k: dict(v) for k, v in R._ALIASES.items()},
        dict(base._REGISTRY),
        dict(base._ALIASES),
        dict(data._SOURCES),
        dict(models._MODELS),
    )
    yield
    entries, aliases, logics, logic_aliases, sources, zoo = saved
    for table, old in ((R._ENTRIES, entries), (R._ALIASES, aliases)):
        for kind in R.Kind:
            table[kind].clear()
            table[kind].update(old[kind])
    for table, old in (
        (base._REGISTRY, logics),
        (base._ALIASES, logic_aliases),
        (data._SOURCES, sources),
        (models._MODELS, zoo),
    ):
        table.clear()
        table.update(old)
