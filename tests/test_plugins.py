"""Plugins: the command line imports user modules that register logics, data sources and models
(`--plugin MODULE`, entry points of the group `propdsl.plugins`), so that specs may name them."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from propdsl import cli
from propdsl import registry as R

PLUGIN = textwrap.dedent(
    '''
    """A plugin: a logic, a data source and a model, registered on import."""

    import dataclasses

    import numpy as np
    import torch

    from propdsl.data import DataSource, RawData, register_dataset
    from propdsl.logics import Godel, register_logic
    from propdsl.models import register_model


    @register_logic
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Tempered(Godel):
        name = "tempered"
        temperature: float = 1.0

        def atom(self, op, lhs, rhs):
            return super().atom(op, lhs, rhs) ** self.temperature


    def _blobs(options):
        rng = np.random.default_rng(0)
        y = np.arange(60) % 2
        x = (rng.normal(size=(60, 4)) * 0.1 + y[:, None]).astype(np.float32)
        return RawData(x, y)


    def tiny(input_shape, num_classes, *, width: int = 4):
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(4, width), torch.nn.ReLU(),
            torch.nn.Linear(width, num_classes)
        )


    register_dataset(DataSource("blobs", _blobs, "two blobs", (4,), 2))
    register_model("tiny", tiny)
    '''
)

SPEC = textwrap.dedent(
    """\
    network f : Tensor[4] -> Tensor[2]

    property robust(x, y) =
      forall x' in ball(x, 0.05, inf):
        argmax(f(x')) == y

    train f on blobs(split = "train") {
      model  = tiny(width = 6)
      epochs = 1
      batch  = 16
      logic  = tempered(temperature = 2.0)
      attack = pgd(steps = 2)
      loss   = cross_entropy + robust
    }
    """
)


def run(*args: str):
    return CliRunner().invoke(cli.app, list(args))


@pytest.fixture
def files(tmp_path: Path, clean_registries) -> tuple[Path, Path]:
    plugin = tmp_path / "myplugin.py"
    plugin.write_text(PLUGIN, encoding="utf-8")
    spec = tmp_path / "blobs.prop"
    spec.write_text(SPEC, encoding="utf-8")
    yield plugin, spec
    import sys

    sys.modules.pop("_propdsl_plugin_myplugin", None)
    sys.modules.pop("myplugin", None)


def test_without_the_plugin_the_spec_names_unknown_things(files):
    _, spec = files
    result = run("check", str(spec))
    assert result.exit_code == 1
    assert "unknown data source 'blobs'" in result.stderr


def test_a_plugin_file_makes_its_names_usable(files):
    plugin, spec = files
    result = run("--plugin", str(plugin), "check", str(spec))
    assert result.exit_code == 0, result.stderr
    assert "  logic = tempered(temperature = 2.0)" in result.stdout.split("\n")
    assert 'train f on blobs(split = "train"):' in result.stdout


def test_a_plugin_module_by_name(files, monkeypatch):
    plugin, spec = files
    monkeypatch.syspath_prepend(str(plugin.parent))
    result = run("--plugin", "myplugin", "check", str(spec))
    assert result.exit_code == 0, result.stderr
    assert R.lookup(R.Kind.MODEL, "tiny") is not None


def test_train_one_epoch_and_evaluate_with_a_plugin(files, tmp_path):
    plugin, spec = files
    out = tmp_path / "run"
    trained = run("--plugin", str(plugin), "train", str(spec), "--out", str(out), "-q")
    assert trained.exit_code == 0, trained.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["name"] == "tiny" and config["logic"] == "tempered(temperature = 2.0)"
    evaluated = run("--plugin", str(plugin), "eval", str(spec), "--run", str(out), "--no-plots")
    assert evaluated.exit_code == 0, evaluated.stderr
    assert "clean accuracy" in evaluated.stdout


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("1 / 0\n", "failed to import: ZeroDivisionError: division by zero"),
        ("import no_such_module_here\n", "ModuleNotFoundError: No module named"),
        (
            "from propdsl.models import register_model\nregister_model('user', print)\n",
            "ModelError: a model named 'user' is already registered",
        ),
    ],
)
def test_a_plugin_that_fails_is_a_usage_error_naming_it(tmp_path, clean_registries, code, message):
    plugin = tmp_path / "broken.py"
    plugin.write_text(code, encoding="utf-8")
    spec = tmp_path / "s.prop"
    spec.write_text("network f : Tensor[2] -> Tensor[2]\n", encoding="utf-8")
    result = run("--plugin", str(plugin), "check", str(spec))
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: plugin '{plugin}' ")
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_missing_plugin_is_a_usage_error(tmp_path):
    spec = tmp_path / "s.prop"
    spec.write_text("network f : Tensor[2] -> Tensor[2]\n", encoding="utf-8")
    result = run("--plugin", "no_such_plugin_module", "check", str(spec))
    assert result.exit_code == 2
    assert "plugin 'no_such_plugin_module' failed to import: ModuleNotFoundError" in result.stderr
    result = run("--plugin", str(tmp_path / "nowhere.py"), "check", str(spec))
    assert result.exit_code == 2 and "plugin file not found" in result.stderr


def _install(site: Path, name: str, module: str, code: str, value: str) -> None:
    """A distribution on `site` whose entry point `name` of the group propdsl.plugins is `value`."""
    (site / f"{module}.py").write_text(code, encoding="utf-8")
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[propdsl.plugins]\n{name} = {value}\n")


def test_entry_points_are_loaded_at_start(tmp_path, monkeypatch, clean_registries):
    site = tmp_path / "site"
    site.mkdir()
    _install(site, "blobs", "blobs_plugin", PLUGIN, "blobs_plugin")
    code = (
        "from propdsl.registry import Entry, Kind, register\n"
        "CALLED = []\n"
        "def register_all():\n"
        "    CALLED.append(1)\n"
        "    register(Entry(kind=Kind.DATA, name='nothing', keywords={}, builtin=False))\n"
    )
    _install(site, "second", "second_plugin", code, "second_plugin:register_all")
    monkeypatch.syspath_prepend(str(site))
    spec = tmp_path / "blobs.prop"
    spec.write_text(SPEC, encoding="utf-8")
    try:
        result = run("check", str(spec))
        assert result.exit_code == 0, result.stderr
        import second_plugin

        assert second_plugin.CALLED == [1]  # a function entry point is called
        assert R.lookup(R.Kind.DATA, "nothing") is not None
    finally:
        import sys

        for name in ("blobs_plugin", "second_plugin"):
            sys.modules.pop(name, None)


def test_a_broken_entry_point_names_itself(tmp_path, monkeypatch, clean_registries):
    site = tmp_path / "site"
    site.mkdir()
    _install(site, "oops", "oops_plugin", "raise RuntimeError('no GPU here')\n", "oops_plugin")
    monkeypatch.syspath_prepend(str(site))
    spec = tmp_path / "s.prop"
    spec.write_text("network f : Tensor[2] -> Tensor[2]\n", encoding="utf-8")
    result = run("check", str(spec))
    assert result.exit_code == 2
    assert "plugin entry point 'oops' (oops_plugin) failed to load" in result.stderr
    assert "RuntimeError: no GPU here" in result.stderr


def test_entry_points_through_a_patched_metadata(monkeypatch, tmp_path, clean_registries):
    import importlib.metadata

    from propdsl import plugins

    seen = []
    point = importlib.metadata.EntryPoint("x", "json", plugins.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        importlib.metadata,
        "entry_points",
        lambda group=None: seen.append(group) or ([point] if group == "propdsl.plugins" else []),
    )
    assert plugins.load_entry_points() == [json]
    assert seen == ["propdsl.plugins"]


def test_a_spec_never_imports_a_plugin(tmp_path, clean_registries):
    # names in a spec are looked up in the registry only: naming a module does nothing
    import sys

    import propdsl

    spec = (
        "network f : Tensor[2] -> Tensor[2]\n"
        "property p(x, y) = argmax(f(x)) == y\n"
        "train f on json { logic = os }\n"
    )
    before = set(sys.modules)
    with pytest.raises(propdsl.CheckError) as info:
        propdsl.load(spec)
    assert [d.message for d in info.value.diagnostics] == [
        "unknown data source 'json'",
        "unknown logic 'os'",
    ]
    assert not {m for m in set(sys.modules) - before if not m.startswith(("propdsl", "_"))}
