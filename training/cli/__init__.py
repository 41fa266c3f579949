"""The offline ``synthehr`` commands: ``data``, ``train``, ``evaluate`` and ``calibrate``.

``app.cli`` finds :func:`register` through the ``synthehr.commands`` entry-point group
(pyproject.toml), so the serving package never imports ``training``. Importing this package
stays cheap (no torch): the commands import the trainer, the model and the evaluation inside
their bodies, so ``synthehr --help`` is quick and works where torch is not installed.
"""

from __future__ import annotations

import typer

from training.cli.data import data_app
from training.cli.evaluate import calibrate_command, evaluate_command
from training.cli.train import train_command

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the offline commands to ``app``, the ``synthehr`` command."""
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("calibrate")(calibrate_command)
    app.add_typer(data_app, name="data")
