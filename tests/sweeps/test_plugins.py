"""A plugin (an ``l0sweep.models`` entry point) that fails to import stops start-up with an error
naming it, instead of a log line and, later, "unknown model"."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from sweeps import registry
from sweeps.registry import MODELS, PluginLoadError
from tests.sweeps.conftest import write_broken_plugin

BROKEN = EntryPoint("broken-net", "l0sweep_no_such_plugin.models", "l0sweep.models")


@pytest.fixture
def broken_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broken entry point installed, the registry not loaded yet in this process."""
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(
        registry, "entry_points", lambda group: [BROKEN] if group == "l0sweep.models" else []
    )


@pytest.mark.fast
def test_a_broken_plugin_is_named_with_its_exception(broken_plugin):
    with pytest.raises(PluginLoadError) as err:
        registry.load_builtins()
    text = str(err.value)
    assert "'broken-net'" in text and "l0sweep_no_such_plugin.models" in text, text
    assert "ModuleNotFoundError" in text and "l0sweep.models" in text, text
    assert err.value.entry_point == "broken-net"


@pytest.mark.fast
def test_the_registry_says_so_on_every_use_not_unknown_model(broken_plugin):
    """Every later read raises the same error: never a registry quietly missing the plugin."""
    for _ in range(2):
        with pytest.raises(PluginLoadError, match="broken-net"):
            MODELS.get("mlp")


def test_start_up_fails_naming_the_plugin(tmp_path: Path):
    """A real installed distribution whose entry point raises: the start-up of the CLI (as of the
    service and the driver, which load the plugins first) fails with the entry point and the
    exception."""
    write_broken_plugin(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main(['schema'])"],
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("sweeps.registry.PluginLoadError: the model plugin 'bad-net'"), last
    assert "ImportError: needs libfoo 2" in last, last
