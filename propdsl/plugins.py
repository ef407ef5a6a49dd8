"""Plugins: user modules that register logics, data sources and models, for the command line.

A plugin is a Python module that calls `propdsl.logics.register_logic`,
`propdsl.data.register_dataset` or `propdsl.models.register_model` when it is imported; the
registrations reach the registry the checker reads (`propdsl.registry`), so a spec checked
afterwards may name what it added. The command line imports plugins before it runs a command:

- every entry point of the group `propdsl.plugins` of the installed distributions (a module, or
  a function called without arguments after its module is imported), in name order;
- then every `--plugin MODULE` (a global option, repeatable): a module name (`mypkg.mymod`) or a
  file (`path/to/plugin.py`).

Importing a plugin runs its code: it is the user's explicit choice, like `--model`. A spec never
imports anything, and nothing in a run folder names a plugin to import (docs/security.md).
A plugin that fails to import is a `PluginError` (a usage error, exit 2) naming it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from propdsl.errors import UsageError

ENTRY_POINT_GROUP = "propdsl.plugins"


class PluginError(UsageError):
    """A plugin could not be imported (or its registrations failed)."""


def load_plugin(ref: str) -> ModuleType:
    """Import the plugin `ref`: a module name (`mypkg.mymod`) or a Python file (`plugin.py`).

    A module already imported is not imported again (its registrations stay as they are).
    """
    if ref.endswith(".py") or "/" in ref or "\\" in ref:
        return _load_file(Path(ref).expanduser())
    try:
        return importlib.import_module(ref)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported
        raise PluginError(f"plugin '{ref}' failed to import: {_why(exc)}") from exc


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise PluginError(f"plugin file not found: {path}")
    name = f"_propdsl_plugin_{path.stem}"
    known = sys.modules.get(name)
    if known is not None and getattr(known, "__file__", None) == str(path):
        return known
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"plugin '{path}' cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported
        del sys.modules[name]
        raise PluginError(f"plugin '{path}' failed to import: {_why(exc)}") from exc
    return module


def load_plugins(refs: Iterable[str]) -> list[ModuleType]:
    """`load_plugin` for each, in order."""
    return [load_plugin(ref) for ref in refs]


def entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of the group `propdsl.plugins`, sorted by name."""
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


def load_entry_points() -> list[Any]:
    """Load every plugin entry point: import its module, and call the object it names when that
    is a function (`mypkg.plugin:register`). Returns what each entry point named."""
    loaded = []
    for ep in entry_points():
        what = f"plugin entry point '{ep.name}' ({ep.value})"
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, type):
                obj()
        except Exception as exc:  # noqa: BLE001 - any failure of the user's code is reported
            raise PluginError(f"{what} failed to load: {_why(exc)}") from exc
        loaded.append(obj)
    return loaded


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
