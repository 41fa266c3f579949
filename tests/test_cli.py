"""The ``synthehr`` command's layering: the serving CLI never imports ``training``; the offline
commands arrive through the ``synthehr.commands`` entry-point group, and a plugin that cannot
be loaded leaves the serving commands working."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from app import cli
from app.cli import PLUGIN_GROUP, app

REPO = Path(__file__).resolve().parents[1]
OFFLINE = ("train", "evaluate", "calibrate", "data")
SERVING = ("info", "serve", "generate", "worker")

runner = CliRunner()


@pytest.fixture
def fresh_plugins():
    """Plugins loaded anew in the test, and again after it (``load_plugins`` is cached)."""
    cli.load_plugins.cache_clear()
    yield
    cli.load_plugins.cache_clear()


def test_the_serving_cli_imports_no_training():
    """Importing ``app.cli`` and running a serving command's help import nothing of training."""
    code = ("import sys\n"
            "from app.cli import app\n"
            "def loaded():\n"
            "    return sorted(m for m in sys.modules\n"
            "                  if m == 'training' or m.startswith('training.'))\n"
            "assert not loaded(), loaded()\n"
            "assert app(['serve', '--help'], standalone_mode=False) == 0\n"
            "assert not loaded(), loaded()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr


def test_training_is_a_registered_command_plugin():
    entries = {e.name: e.value for e in importlib.metadata.entry_points(group=PLUGIN_GROUP)}
    assert entries.get("training") == "training.cli:register"


def test_help_lists_serving_and_offline_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    for name in SERVING + OFFLINE:
        assert name in result.output


def test_offline_commands_keep_their_help():
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0, result.output
    assert "Train the hierarchical BART on a corpus" in result.output
    assert "--dp-epsilon" in result.output
    stats = runner.invoke(app, ["data", "stats", "--help"])
    assert stats.exit_code == 0, stats.output
    assert "--max-drop-share" in stats.output
    evaluate = runner.invoke(app, ["evaluate", "--help"])
    assert evaluate.exit_code == 0 and "--anonymeter-attacks" in evaluate.output


def test_the_console_script_reaches_train():
    """The installed ``synthehr`` (its entry-point metadata, not only the module) runs train."""
    script = Path(sys.executable).parent / "synthehr"
    if not script.exists():
        pytest.skip("no installed synthehr console script beside this interpreter")
    proc = subprocess.run([str(script), "train", "--help"], capture_output=True, text=True,
                          check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout


def test_a_broken_plugin_leaves_serving_working(monkeypatch, fresh_plugins):
    broken = importlib.metadata.EntryPoint(name="training", value="no_such_module_xyz:register",
                                           group=PLUGIN_GROUP)
    monkeypatch.setattr(cli.importlib.metadata, "entry_points", lambda group: [broken])
    listed = runner.invoke(app, ["--help"])
    assert listed.exit_code == 0, listed.output
    assert "serve" in listed.output and "unavailable" in listed.output
    assert runner.invoke(app, ["serve", "--help"]).exit_code == 0
    asked = runner.invoke(app, ["train", "--out", "x"])
    assert asked.exit_code == 2
    assert "No such command 'train'" in asked.output
    assert "no_such_module_xyz" in asked.output
